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

use common::objstore::{ObjServer, Server};
use common::*;
use object_store::ObjectStoreExt;
use redun_store::bucket::{Bucket, BucketOptions, VolumeReader, VolumeWriter};
use redun_store::crypt::VolumeKey;
use redun_store::segment::Identity;
use redun_tracker::admin::request_json;
use redun_tracker::journal::format::Kind;
use redun_tracker::journal::reader::read_release;

const VOL: u64 = 32 << 20;
/// Plaintext written before protection, searched for in every object of the bucket.
const CANARY: &[u8] = b"redun plaintext canary: this sentence must never appear in a bucket";
const CANARY_AT: usize = (30 << 20) + 123;

struct Site {
    tracker: Tracker,
    shipper: Option<Daemon>,
    url: String,
    keys: PathBuf,
    /// A config file whose `[bucket]` table reaches the object server (empty for file://).
    config: PathBuf,
    options: BucketOptions,
    /// Dropped last: the daemons above stop first.
    server: Option<ObjServer>,
}

impl Site {
    /// A site shipping into a `file://` bucket.
    fn new() -> Site {
        Site::on(None)
    }

    /// A site shipping into a bucket on `server` (`None`: a `file://` directory).
    fn on(server: Option<Server>) -> Site {
        Site::configured(server, "")
    }

    /// Like [`Site::on`], with `extra` appended to the config file.
    fn configured(server: Option<Server>, extra: &str) -> Site {
        // Data that was on the volume before it was protected: the initial replication
        // must carry it.
        let tracker = Tracker::start_on("uring", VOL, &["--journal-size", "64M"], |img| {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
            for i in 0..16u8 {
                let at = u64::from(i) * (2 << 20) + 777;
                f.write_all_at(&vec![0x40 + i; 100_000], at).unwrap();
            }
            f.write_all_at(CANARY, CANARY_AT as u64).unwrap();
        });
        let d = tracker.dir.path().to_path_buf();
        std::fs::create_dir(d.join("keys")).unwrap();
        run(Command::new(bin("redun"))
            .args(["key", "new"])
            .arg(d.join(format!("keys/{EXPORT}.key"))));
        let server = server.map(|k| ObjServer::start(k, &d));
        let (url, options, table) = match &server {
            Some(srv) => (srv.url("site-a"), srv.options(), srv.options_toml()),
            None => {
                std::fs::create_dir(d.join("bucket")).unwrap();
                let url = format!("file://{}", d.join("bucket").display());
                (url, BucketOptions::default(), String::new())
            }
        };
        let config = d.join("redun.toml");
        std::fs::write(&config, format!("{table}\n{extra}")).unwrap();
        let mut site = Site {
            url,
            keys: d.join("keys"),
            config,
            options,
            server,
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
            "--config".into(),
            s(&self.config),
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
            // Half of each 4 KiB compresses: the bucket holds compressed entries.
            "--buffer_compress_percentage=50",
            "--buffer_compress_chunk=4096",
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
            .arg("--config")
            .arg(&self.config)
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
        let key = VolumeKey::load(&self.keys.join(format!("{EXPORT}.key"))).unwrap();
        VolumeReader::open(self.bucket(), EXPORT, Arc::new(key), 16 << 20).unwrap()
    }

    fn bucket(&self) -> Arc<Bucket> {
        Arc::new(Bucket::open(&self.url, &self.options).unwrap())
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
    // fio's data is half compressible, and so is what reached the bucket.
    let ratio = st["compression_ratio"].as_f64().unwrap();
    assert!(ratio > 1.3, "{st}");
    // Another writer advances the volume's manifest: the shipper is fenced and stops
    // (critical) instead of writing over it, and says why.
    let r = site.reader();
    let id = Identity {
        name: EXPORT.into(),
        uuid: r.manifest().store.uuid.clone(),
        size: VOL,
        generation: r.manifest().store.generation,
    };
    second_writer_appends(&site, &id);
    site.fio("1M", 21);
    wait_fenced(&site);
    site.shipper.as_mut().unwrap().stop();
}

/// Another writer of volume `id` (same key) appends one 4 KiB write to the bucket.
fn second_writer_appends(site: &Site, id: &Identity) {
    let key = VolumeKey::load(&site.keys.join(format!("{EXPORT}.key"))).unwrap();
    let mut other = VolumeWriter::open(site.bucket(), id, Arc::new(key)).unwrap();
    let seq = other.next_seq();
    let mut seg = other.segment(seq);
    seg.push(Kind::Write, seq, 0, 4096, &[0xee; 4096]);
    other.append(vec![seg]).unwrap();
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
                "--config".into(),
                s(&self.config),
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

/// The segment objects of the bucket's volume (names below the volume), largest first.
fn segment_objects(site: &Site) -> Vec<String> {
    let mut v: Vec<(String, u64)> = site
        .bucket()
        .objects(EXPORT)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n.starts_with("seg/"))
        .collect();
    v.sort_by_key(|(_, size)| std::cmp::Reverse(*size));
    v.into_iter().map(|(n, _)| n).collect()
}

fn get_object(site: &Site, name: &str) -> Vec<u8> {
    let b = site.bucket();
    let p = b.path(EXPORT, name);
    b.block_on(async { b.store().get(&p).await.unwrap().bytes().await.unwrap() })
        .to_vec()
}

/// Replaces object `name` behind the writers' backs (a fault: objects are never rewritten).
fn put_object(site: &Site, name: &str, bytes: Vec<u8>) {
    let b = site.bucket();
    let p = b.path(EXPORT, name);
    b.block_on(b.store().put(&p, bytes.into())).unwrap();
}

/// Waits until the shipper is critical, fenced, and says so naming the volume.
fn wait_fenced(site: &Site) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = site.status().unwrap();
        if st["state"] == "critical" {
            let e = st["last_error"].as_str().unwrap();
            assert!(e.contains("fenced") && e.contains(EXPORT), "{e}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the shipper was not fenced: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes two rounds of fio, each followed by a point: the points with their images.
fn two_points(site: &Site, seed: u64) -> Vec<(u64, Vec<u8>)> {
    let mut expect = Vec::new();
    for s in [seed, seed + 1] {
        site.fio("4M", s);
        expect.push((site.point_create(), site.image()));
    }
    site.wait_caught_up();
    expect
}

/// Every point of `expect` is listed usable by the target and its export equals its image.
fn points_served(site: &Site, expect: &[(u64, Vec<u8>)]) {
    let v: serde_json::Value =
        serde_json::from_str(&ok(&site.redun_target(&["points", EXPORT, "--json"]))).unwrap();
    for (id, image) in expect {
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
}

/// A test failover of point `id`: writable; what it writes never reaches the bucket.
fn test_failover(site: &Site, id: u64, image: &[u8]) {
    ok(&site.redun_target(&["test-failover", "start", EXPORT, "--point", &id.to_string()]));
    let test = format!("{EXPORT}@test");
    same("the test failover", site.read_export(&test), image);
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "flush"])
        .arg(site.export_uri(&test)));
    let mut changed = image.to_vec();
    changed[1 << 20..(1 << 20) + 65536].fill(0x5a);
    same(
        "the test failover after a write",
        site.read_export(&test),
        &changed,
    );
    ok(&site.redun_target(&["test-failover", "cleanup", EXPORT]));
    same(
        "the point after the test failover",
        site.read_export(&format!("{EXPORT}@{id}")),
        image,
    );
}

/// Unplanned failover to point `id`: served read-write as plain NAME, and the bucket's
/// manifest moves to generation 2 (which fences the old primary). Returns the volume's
/// image after a 4 KiB write to it.
fn unplanned_failover(site: &Site, id: u64, image: &[u8]) -> Vec<u8> {
    ok(&site.redun_target(&[
        "failover",
        EXPORT,
        "--unplanned",
        "--point",
        &id.to_string(),
    ]));
    same("the failed-over volume", site.read_export(EXPORT), image);
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x6b 0 4k", "-c", "flush"])
        .arg(site.export_uri(EXPORT)));
    assert_eq!(site.reader().manifest().store.generation, 2);
    let mut after = image.to_vec();
    after[..4096].fill(0x6b);
    same(
        "the failed-over volume after a write",
        site.read_export(EXPORT),
        &after,
    );
    after
}

/// A flipped byte in the largest segment object, then (that one repaired) a truncated
/// second one: a freshly started target serves no image that needs them and names the
/// object; `redun restore` refuses too.
fn damage_is_named_and_never_served(site: &Site) {
    let segs = segment_objects(site);
    let (flipped, cut) = (&segs[0], &segs[1]);
    let base = |n: &str| n.rsplit('/').next().unwrap().to_string();
    let original = get_object(site, flipped);
    let mut b = original.clone();
    let mid = b.len() / 2;
    b[mid] ^= 0x01;
    put_object(site, flipped, b);
    let mut target = site.start_bucket_target(&site.keys);
    assert!(
        site.read_export(&format!("{EXPORT}@latest")).is_none(),
        "latest was served from a damaged segment"
    );
    let log = target.log_text();
    assert!(log.contains(&base(flipped)), "{log}");
    target.stop();
    let to = site.dir().join("damaged.img");
    let o = site.redun(&[
        "restore",
        EXPORT,
        "--point",
        "latest",
        "--quiet",
        "--to",
        &s(&to),
    ]);
    assert!(!o.status.success(), "a damaged point was restored");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains(&base(flipped)), "{e}");
    put_object(site, flipped, original);
    let c = get_object(site, cut);
    put_object(site, cut, c[..c.len() - 100].to_vec());
    let mut target = site.start_bucket_target(&site.keys);
    assert!(
        site.read_export(&format!("{EXPORT}@latest")).is_none(),
        "latest was served from a truncated segment"
    );
    let log = target.log_text();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(&base(cut)))
        .unwrap_or_else(|| panic!("{cut} not named: {log}"));
    assert!(line.contains("truncated"), "{line}");
    target.stop();
    put_object(site, cut, c);
}

#[test]
fn the_target_serves_points_test_failover_and_failover_straight_from_the_bucket() {
    require("fio");
    require("nbdcopy");
    require("qemu-io");
    let mut site = Site::new();
    site.wait_caught_up();
    let expect = two_points(&site, 31);
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
    points_served(&site, &expect);
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
    test_failover(&site, expect[0].0, &expect[0].1);
    let after = unplanned_failover(&site, expect[1].0, &expect[1].1);
    site.fio("1M", 34);
    wait_fenced(&site);
    site.shipper.as_mut().unwrap().stop();
    // A target restart serves the failed-over volume again, with its write.
    target.stop();
    let mut target = site.start_bucket_target(&site.keys);
    same(
        "the failed-over volume after a restart",
        site.read_export(EXPORT),
        &after,
    );
    target.stop();
    damage_is_named_and_never_served(&site);
}

/// The whole life of a volume in a bucket on a real object server: replication with fio,
/// the server killed mid-upload and restarted, points restored with the CLI and served by
/// the target, test failover, a second writer fencing the shipper, unplanned failover,
/// damaged objects, and no plaintext in any object.
fn on_a_real_server(server: Server) {
    require("fio");
    require("nbdcopy");
    require("qemu-io");
    let mut site = Site::on(Some(server));
    site.wait_caught_up();
    let mut expect = two_points(&site, 41);
    // The server dies while fio writes and the shipper uploads, then comes back: the
    // shipper retries, nothing is lost or listed twice.
    let mut fio = Command::new("fio")
        .args([
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={}", site.tracker.uri()),
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=4",
            &format!("--size={VOL}"),
            "--io_size=8M",
            "--rate=4m",
            "--randseed=43",
            "--thread",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    site.server.as_mut().unwrap().stop();
    assert!(
        fio.wait().unwrap().success(),
        "fio failed while the bucket was down"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let st = site.status().unwrap();
    assert_ne!(
        st["state"], "critical",
        "an unreachable bucket is not critical: {st}"
    );
    site.server.as_mut().unwrap().restart();
    std::thread::sleep(Duration::from_secs(3));
    let st = site.status().unwrap();
    assert_ne!(
        st["state"],
        "critical",
        "{st}\n{}",
        site.shipper.as_ref().unwrap().log_text()
    );
    expect.push((site.point_create(), site.image()));
    site.wait_caught_up();
    site.assert_release_not_early();
    let versions = site.bucket().versions(EXPORT).unwrap();
    let newest = *versions.iter().max().unwrap();
    assert_eq!(site.reader().manifest().version, newest);
    // Every point restores with the CLI, and from the target.
    for (id, image) in &expect {
        let got = site.restore(&id.to_string());
        if let Some(i) = first_difference(&got, image) {
            panic!("point {id} restored from the bucket differs at byte {i}");
        }
    }
    let mut target = site.start_bucket_target(&site.keys);
    points_served(&site, &expect);
    test_failover(&site, expect[0].0, &expect[0].1);
    // No object holds the volume's plaintext: neither the canary written before it was
    // protected nor a run of fio's data.
    let canary = site.image()[CANARY_AT..][..CANARY.len()].to_vec();
    assert_eq!(canary, CANARY, "the canary is on the volume");
    let sample = site.image()[(1 << 20)..(1 << 20) + 64].to_vec();
    for (name, _) in site.bucket().objects(EXPORT).unwrap() {
        let b = get_object(&site, &name);
        for needle in [&canary[..], &sample[..]] {
            assert!(
                !b.windows(needle.len()).any(|w| w == needle),
                "object {name} holds plaintext"
            );
        }
    }
    // A second writer racing the shipper: one wins, the shipper goes critical.
    let r = site.reader();
    let id = Identity {
        name: EXPORT.into(),
        uuid: r.manifest().store.uuid.clone(),
        size: VOL,
        generation: 1,
    };
    second_writer_appends(&site, &id);
    site.fio("1M", 44);
    wait_fenced(&site);
    site.shipper.as_mut().unwrap().stop();
    unplanned_failover(&site, expect[1].0, &expect[1].1);
    target.stop();
    damage_is_named_and_never_served(&site);
}

#[test]
fn a_volume_lives_in_s3_s3s_fs_on_loopback() {
    on_a_real_server(Server::S3);
}

#[test]
fn a_volume_lives_in_azure_blob_azurite_on_loopback() {
    on_a_real_server(Server::Azure);
}

#[test]
fn retention_in_the_bucket_merges_pruned_points_into_base_objects() {
    retention_merges_and_deletes(None);
}

#[test]
fn retention_merges_and_deletes_in_s3_s3s_fs() {
    retention_merges_and_deletes(Some(Server::S3));
}

#[test]
fn retention_merges_and_deletes_in_azure_blob_azurite() {
    retention_merges_and_deletes(Some(Server::Azure));
}

fn retention_merges_and_deletes(server: Option<Server>) {
    require("fio");
    // Keep only the newest point; merge whatever comes before it; delete unlisted objects
    // a second after.
    let mut site = Site::configured(
        server,
        "[shipper]\nstore_merge = \"0\"\nstore_grace = \"1s\"\n\n[retention]\nkeep_all = \"0\"\ntiers = []\n",
    );
    site.wait_caught_up();
    site.fio("6M", 31);
    site.point_create();
    site.fio("6M", 32);
    let kept = site.point_create();
    let image = site.image();
    // No writes after it, so no scheduled crash point comes after it either.
    site.wait_caught_up();
    // Within a few maintenance passes (every 5 s): one point listed, everything before it
    // in base objects, and no object left that the manifest does not use.
    let deadline = Instant::now() + Duration::from_secs(60);
    let base = loop {
        let r = site.reader();
        let m = r.manifest();
        let points: Vec<u64> = m.points().iter().map(|(p, _)| p.id).collect();
        let mut used: Vec<String> = m.store.segments.iter().map(|s| s.file.clone()).collect();
        if let Some(i) = r.base_index().unwrap() {
            used.push(m.base.as_ref().unwrap().file.clone());
            used.extend(i.regions.iter().map(|o| o.file.clone()));
        }
        let all: Vec<String> = site
            .bucket()
            .objects(EXPORT)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| !n.starts_with("manifest/"))
            .collect();
        let unused = all.iter().filter(|n| !used.contains(n)).count();
        if points == [kept] && m.store.base_seq == kept && unused == 0 {
            break m.base.clone().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "retention did not run: points {points:?} (want [{kept}]), base seq {}, {unused} unused objects\n{}",
            m.store.base_seq,
            site.shipper.as_ref().unwrap().log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(base.objects >= 1, "{base:?}");
    let log = site.shipper.as_ref().unwrap().log_text();
    assert!(log.contains("retention pruned"), "{log}");
    // The kept point and latest restore from the base objects.
    if let Some(i) = first_difference(&site.restore(&kept.to_string()), &image) {
        panic!("point {kept} restored from base objects differs at byte {i}");
    }
    assert!(first_difference(&site.restore("latest"), &site.image()).is_none());
    // A bad retention key stops the shipper at start-up, naming the key.
    site.shipper.as_mut().unwrap().stop();
    if server.is_some() {
        return;
    }
    std::fs::write(&site.config, "[shipper]\nstore_grace = \"soon\"\n").unwrap();
    let o = Command::new(bin("redun-shipper"))
        .args(["--target-store", &site.url, "--journal-dir"])
        .arg(site.tracker.journal_dir())
        .arg("--config")
        .arg(&site.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("shipper.store_grace"),
        "{err}"
    );
}
