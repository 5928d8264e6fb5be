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
