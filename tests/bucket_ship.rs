//! Shipping straight into a bucket with the real binaries: a tracker journals fio's writes,
//! `redun-shipper --target-store file://...` replicates them (initial replication of data
//! that was there before, then the stream), `redun point create` places points, and
//! `redun restore` of every point equals the image at that moment. A killed shipper loses
//! nothing; a second writer fences the shipper (critical); a missing key is named.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use redun_store::bucket::{Bucket, BucketOptions, VolumeReader, VolumeWriter};
use redun_store::crypt::VolumeKey;
use redun_store::segment::Identity;
use redun_tracker::admin::request_json;
use redun_tracker::journal::format::Kind;
use redun_tracker::journal::reader::read_release;

const VOL: u64 = 32 << 20;

struct Site {
    tracker: Tracker,
    shipper: Option<Daemon>,
    url: String,
    keys: PathBuf,
}

impl Site {
    fn new() -> Site {
        // Data that was on the volume before it was protected: the initial replication
        // must carry it.
        let tracker = Tracker::start_on("uring", VOL, &["--journal-size", "64M"], |img| {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
            for i in 0..16u8 {
                let at = u64::from(i) * (2 << 20) + 777;
                f.write_all_at(&vec![0x40 + i; 100_000], at).unwrap();
            }
        });
        let d = tracker.dir.path().to_path_buf();
        std::fs::create_dir(d.join("bucket")).unwrap();
        std::fs::create_dir(d.join("keys")).unwrap();
        run(Command::new(bin("redun"))
            .args(["key", "new"])
            .arg(d.join(format!("keys/{EXPORT}.key"))));
        let mut site = Site {
            url: format!("file://{}", d.join("bucket").display()),
            keys: d.join("keys"),
            tracker,
            shipper: None,
        };
        site.start_shipper();
        site
    }

    fn dir(&self) -> PathBuf {
        self.tracker.dir.path().to_path_buf()
    }

    fn start_shipper(&mut self) {
        let d = self.dir();
        let args: Vec<String> = vec![
            "--journal-dir".into(),
            s(&self.tracker.journal_dir()),
            "--tracker-socket".into(),
            s(&self.tracker.admin),
            "--target-store".into(),
            self.url.clone(),
            "--key-dir".into(),
            s(&self.keys),
            "--store-flush".into(),
            "300ms".into(),
            "--admin-socket".into(),
            s(&d.join("shipper.sock")),
            "--retry-unit-ms".into(),
            "100".into(),
        ];
        self.shipper = Some(Daemon::start(
            "redun-shipper",
            &args,
            &d.join("shipper.log"),
        ));
    }

    fn status(&self) -> Option<serde_json::Value> {
        let v = request_json(
            &self.dir().join("shipper.sock"),
            &serde_json::json!({"cmd": "status"}),
        )
        .ok()?;
        v["status"]["volumes"].get(0).cloned()
    }

    /// Waits until every record is in the bucket and no synchronisation is under way.
    fn wait_caught_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let head = self.tracker.head_seq();
            let dirty =
                self.tracker.status_json()["tracker"]["status"]["volumes"][0]["dirty_bytes"]
                    .as_u64();
            let st = self.status();
            if let Some(v) = &st {
                if v["acked_seq"].as_u64() == Some(head)
                    && v.get("sync").is_none()
                    && dirty == Some(0)
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the bucket did not catch up with seq {head}: {st:?}\n{}",
                self.shipper
                    .as_ref()
                    .map(Daemon::log_text)
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn fio(&self, amount: &str, seed: u64) {
        run(Command::new("fio").args([
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={}", self.tracker.uri()),
            "--rw=randwrite",
            "--bsrange=4k-256k",
            "--iodepth=8",
            &format!("--size={VOL}"),
            &format!("--io_size={amount}"),
            &format!("--randseed={seed}"),
            "--refill_buffers",
            "--thread",
        ]));
    }

    fn point_create(&self) -> u64 {
        let out = run(Command::new(bin("redun"))
            .args(["point", "create", EXPORT, "--tracker-socket"])
            .arg(&self.tracker.admin)
            .arg("--shipper-socket")
            .arg(self.dir().join("shipper.sock")));
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    fn redun(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("redun"))
            .args(args)
            .args(["--store", &self.url, "--key"])
            .arg(self.keys.join(format!("{EXPORT}.key")))
            .output()
            .unwrap()
    }

    fn restore(&self, point: &str) -> Vec<u8> {
        let out = self.dir().join("restored.img");
        let _ = std::fs::remove_file(&out);
        let o = self.redun(&[
            "restore",
            EXPORT,
            "--point",
            point,
            "--quiet",
            "--to",
            &s(&out),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let b = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        b
    }

    fn image(&self) -> Vec<u8> {
        std::fs::read(&self.tracker.image).unwrap()
    }

    /// The journal is never released past what the bucket's manifest lists.
    fn assert_release_not_early(&self) {
        let released = read_release(&self.tracker.journal_path())
            .unwrap()
            .unwrap_or(0);
        let r = self.reader();
        assert!(
            released <= r.manifest().latest(),
            "the journal was released through seq {released} but the bucket holds {}",
            r.manifest().latest()
        );
    }

    fn reader(&self) -> VolumeReader {
        let bucket = Arc::new(Bucket::open(&self.url, &BucketOptions::default()).unwrap());
        let key = VolumeKey::load(&self.keys.join(format!("{EXPORT}.key"))).unwrap();
        VolumeReader::open(bucket, EXPORT, Arc::new(key), 16 << 20).unwrap()
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[test]
fn a_volume_replicates_into_a_bucket_and_every_point_restores_its_moment() {
    require("fio");
    let mut site = Site::new();
    site.wait_caught_up();
    // The initial replication carried what was there before.
    let first = site.point_create();
    let mut expect = vec![(first, site.image())];
    for (round, seed) in [11u64, 12, 13].into_iter().enumerate() {
        site.fio("6M", seed);
        if round == 1 {
            // A shipper killed while records are buffered loses none of them.
            site.shipper.as_mut().unwrap().kill9();
            site.fio("2M", seed + 100);
            site.start_shipper();
        }
        expect.push((site.point_create(), site.image()));
    }
    site.wait_caught_up();
    site.assert_release_not_early();
    let o = site.redun(&["points", EXPORT, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let listed: Vec<u64> = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["usable"] == true)
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    for (id, image) in &expect {
        assert!(listed.contains(id), "point {id} not usable in {v}");
        let got = site.restore(&id.to_string());
        if let Some(i) = first_difference(&got, image) {
            panic!("point {id} restored from the bucket differs at byte {i}");
        }
    }
    assert!(first_difference(&site.restore("latest"), &site.image()).is_none());
    // What the shipper reports.
    let st = site.status().unwrap();
    assert_eq!(st["state"], "shipping", "{st}");
    assert!(
        st["target"].as_str().unwrap().starts_with("file://"),
        "{st}"
    );
    assert!(st["bytes_shipped"].as_u64().unwrap() > 10 << 20, "{st}");
    // Another writer advances the volume's manifest: the shipper is fenced and stops
    // (critical) instead of writing over it, and says why.
    let r = site.reader();
    let id = Identity {
        name: EXPORT.into(),
        uuid: r.manifest().store.uuid.clone(),
        size: VOL,
        generation: r.manifest().store.generation,
    };
    let bucket = Arc::new(Bucket::open(&site.url, &BucketOptions::default()).unwrap());
    let key = VolumeKey::load(&site.keys.join(format!("{EXPORT}.key"))).unwrap();
    let mut other = VolumeWriter::open(bucket, &id, Arc::new(key)).unwrap();
    let seq = other.next_seq();
    let mut seg = other.segment(seq);
    seg.push(Kind::Write, seq, 0, 4096, &[0xee; 4096]);
    other.append(vec![seg]).unwrap();
    site.fio("1M", 21);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = site.status().unwrap();
        if st["state"] == "critical" {
            let e = st["last_error"].as_str().unwrap();
            assert!(e.contains("fenced") && e.contains(EXPORT), "{e}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the shipper was not fenced: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    site.shipper.as_mut().unwrap().stop();
}

#[test]
fn a_missing_key_and_conflicting_targets_are_refused_with_what_to_do() {
    let mut site = Site::new();
    let key = site.keys.join(format!("{EXPORT}.key"));
    site.shipper.as_mut().unwrap().stop();
    std::fs::rename(&key, site.keys.join("elsewhere")).unwrap();
    site.start_shipper();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = site.status() {
            if st["state"] == "critical" {
                let e = st["last_error"].as_str().unwrap();
                assert!(e.contains(&s(&key)) && e.contains("redun key new"), "{e}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "no critical state");
        std::thread::sleep(Duration::from_millis(50));
    }
    site.shipper.as_mut().unwrap().stop();
    let o = Command::new(bin("redun-shipper"))
        .args(["--journal-dir", &s(&site.tracker.journal_dir())])
        .args(["--target", "localhost:1", "--target-store", &site.url])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("not both") && e.contains(&site.url), "{e}");
    let o = Command::new(bin("redun-shipper"))
        .args(["--journal-dir", &s(&site.tracker.journal_dir())])
        .args(["--target-store", "file:///no/such/bucket/dir"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("file:///no/such/bucket/dir"), "{e}");
}

impl Site {
    /// `redun-target --store` on the site's bucket, its exports on a Unix socket.
    fn start_bucket_target(&self, keys: &std::path::Path) -> Daemon {
        let d = self.dir();
        let log = d.join("target.log");
        let earlier = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("overlays in")
            .count();
        let t = Daemon::start(
            "redun-target",
            &[
                "--store".into(),
                self.url.clone(),
                "--key-dir".into(),
                s(keys),
                "--data-dir".into(),
                s(&d.join("target-data")),
                "--admin-socket".into(),
                s(&d.join("target.sock")),
                "--nbd-listen".into(),
                format!("unix:{}", s(&d.join("target-nbd.sock"))),
            ],
            &log,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while t.log_text().matches("overlays in").count() <= earlier {
            assert!(
                Instant::now() < deadline,
                "the target did not start: {}",
                t.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        t
    }

    /// `redun ARGS --target-socket` of the bucket target.
    fn redun_target(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("redun"))
            .args(args)
            .arg("--target-socket")
            .arg(self.dir().join("target.sock"))
            .output()
            .unwrap()
    }

    /// Export `name` of the bucket target, read with nbdcopy; `None` when the read fails.
    fn read_export(&self, name: &str) -> Option<Vec<u8>> {
        let out = self.dir().join("export.img");
        let _ = std::fs::remove_file(&out);
        let ok = Command::new("nbdcopy")
            .arg(self.export_uri(name))
            .arg(&out)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        let b = ok.then(|| std::fs::read(&out).unwrap());
        let _ = std::fs::remove_file(&out);
        b
    }

    fn export_uri(&self, name: &str) -> String {
        format!(
            "nbd+unix:///{name}?socket={}",
            self.dir().join("target-nbd.sock").display()
        )
    }
}

fn ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn same(what: &str, got: Option<Vec<u8>>, want: &[u8]) {
    let got = got.unwrap_or_else(|| panic!("{what} could not be read"));
    if let Some(i) = first_difference(&got, want) {
        panic!("{what} differs at byte {i}");
    }
}

/// The segment objects of the bucket's volume, largest first.
fn segment_objects(site: &Site) -> Vec<PathBuf> {
    let dir = site.dir().join(format!("bucket/{EXPORT}/seg"));
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).unwrap().len()));
    v
}

#[test]
fn the_target_serves_points_test_failover_and_failover_straight_from_the_bucket() {
    require("fio");
    require("nbdcopy");
    require("qemu-io");
    let mut site = Site::new();
    site.wait_caught_up();
    let mut expect = Vec::new();
    for seed in [31u64, 32] {
        site.fio("4M", seed);
        expect.push((site.point_create(), site.image()));
    }
    site.wait_caught_up();
    // Without the volume's key the target serves nothing of it and says what to do.
    let empty = site.dir().join("no-keys");
    std::fs::create_dir(&empty).unwrap();
    let mut target = site.start_bucket_target(&empty);
    let o = site.redun_target(&["points", EXPORT]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains(&format!("{EXPORT}.key")) && e.contains("copy"),
        "{e}"
    );
    assert!(site.read_export(&format!("{EXPORT}@latest")).is_none());
    target.stop();

    let mut target = site.start_bucket_target(&site.keys);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&site.redun_target(&["points", EXPORT, "--json"]))).unwrap();
    for (id, image) in &expect {
        assert!(
            v.as_array()
                .unwrap()
                .iter()
                .any(|p| p["id"] == *id && p["usable"] == true),
            "point {id} not listed usable: {v}"
        );
        same(
            &format!("{EXPORT}@{id}"),
            site.read_export(&format!("{EXPORT}@{id}")),
            image,
        );
    }
    same(
        "latest",
        site.read_export(&format!("{EXPORT}@latest")),
        &site.image(),
    );
    // Newer records appear without a restart.
    site.fio("2M", 33);
    let third = site.point_create();
    let third_image = site.image();
    site.wait_caught_up();
    std::thread::sleep(Duration::from_millis(1100));
    same(
        "the newest point",
        site.read_export(&format!("{EXPORT}@{third}")),
        &third_image,
    );
    let st = request_json(
        &site.dir().join("target.sock"),
        &serde_json::json!({"cmd": "status"}),
    )
    .unwrap();
    let tv = &st["status"]["volumes"][0];
    assert_eq!(tv["name"], EXPORT, "{st}");
    assert_eq!(tv["points"].as_u64(), Some(3), "{st}");
    assert_eq!(
        tv["applied_seq"].as_u64(),
        Some(site.tracker.head_seq()),
        "{st}"
    );

    // Test failover: the first point, writable; what it writes never reaches the bucket.
    let (first, first_image) = &expect[0];
    ok(&site.redun_target(&[
        "test-failover",
        "start",
        EXPORT,
        "--point",
        &first.to_string(),
    ]));
    let test = format!("{EXPORT}@test");
    same("the test failover", site.read_export(&test), first_image);
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "flush"])
        .arg(site.export_uri(&test)));
    let mut changed = first_image.clone();
    changed[1 << 20..(1 << 20) + 65536].fill(0x5a);
    same(
        "the test failover after a write",
        site.read_export(&test),
        &changed,
    );
    ok(&site.redun_target(&["test-failover", "cleanup", EXPORT]));
    same(
        "the point after the test failover",
        site.read_export(&format!("{EXPORT}@{first}")),
        first_image,
    );

    // Unplanned failover to the second point: served read-write; the source's shipper is
    // fenced by the generation the target wrote into the bucket.
    let (second, second_image) = &expect[1];
    ok(&site.redun_target(&[
        "failover",
        EXPORT,
        "--unplanned",
        "--point",
        &second.to_string(),
    ]));
    same(
        "the failed-over volume",
        site.read_export(EXPORT),
        second_image,
    );
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x6b 0 4k", "-c", "flush"])
        .arg(site.export_uri(EXPORT)));
    assert_eq!(site.reader().manifest().store.generation, 2);
    site.fio("1M", 34);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = site.status().unwrap();
        if st["state"] == "critical" {
            let e = st["last_error"].as_str().unwrap();
            assert!(e.contains("fenced") && e.contains(EXPORT), "{e}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old primary was not fenced: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    site.shipper.as_mut().unwrap().stop();
    // A target restart serves the failed-over volume again, with its write.
    target.stop();
    let mut target = site.start_bucket_target(&site.keys);
    let mut after = second_image.clone();
    after[..4096].fill(0x6b);
    same(
        "the failed-over volume after a restart",
        site.read_export(EXPORT),
        &after,
    );
    target.stop();

    // A flipped byte in a segment object, then a truncated one: the reads fail, the target
    // names the object, and nothing damaged is served.
    let segs = segment_objects(&site);
    let (flipped, cut) = (&segs[0], &segs[1]);
    let name = |p: &PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();
    let original = std::fs::read(flipped).unwrap();
    let mut b = original.clone();
    let mid = b.len() / 2;
    b[mid] ^= 0x01;
    std::fs::write(flipped, &b).unwrap();
    let mut target = site.start_bucket_target(&site.keys);
    assert!(
        site.read_export(&format!("{EXPORT}@latest")).is_none(),
        "latest was served from a damaged segment"
    );
    let log = target.log_text();
    assert!(log.contains(&name(flipped)), "{log}");
    target.stop();
    std::fs::write(flipped, &original).unwrap();
    let c = std::fs::read(cut).unwrap();
    std::fs::write(cut, &c[..c.len() - 100]).unwrap();
    let mut target = site.start_bucket_target(&site.keys);
    assert!(
        site.read_export(&format!("{EXPORT}@latest")).is_none(),
        "latest was served from a truncated segment"
    );
    let log = target.log_text();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(&name(cut)))
        .unwrap_or_else(|| panic!("{} not named: {log}", name(cut)));
    assert!(line.contains("truncated"), "{line}");
    target.stop();
}
