//! Replication end to end with the real binaries on loopback: a tracker journals the writes
//! of real NBD clients, `redun-shipper` drains the journal over mutual TLS, `redun-target`
//! applies it to a replica, which must become byte-identical to the backing file.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use redun_tracker::admin::request_json;
use redun_tracker::journal::reader::read_release;

const VOL: u64 = 64 << 20;

/// A tracker, a target and a shipper in one temporary directory.
struct Site {
    tracker: Tracker,
    target: Option<Daemon>,
    shipper: Option<Daemon>,
    target_addr: String,
    /// The target's data directory.
    data: PathBuf,
    /// More flags for the target.
    target_args: Vec<String>,
}

impl Site {
    fn new() -> Site {
        Site::build(VOL, |d| d.join("data"))
    }

    /// A site of a `size`-byte volume whose target keeps its replicas where `data` says.
    fn build(size: u64, data: impl FnOnce(&Path) -> PathBuf) -> Site {
        Site::build_with(size, data, &[])
    }

    fn build_with(size: u64, data: impl FnOnce(&Path) -> PathBuf, tracker_args: &[&str]) -> Site {
        Site::build_on(size, data, tracker_args, |_| {})
    }

    /// A site whose volume `prepare` fills before the tracker first sees it.
    fn build_on(
        size: u64,
        data: impl FnOnce(&Path) -> PathBuf,
        tracker_args: &[&str],
        prepare: impl FnOnce(&Path),
    ) -> Site {
        let mut args = vec![];
        if !tracker_args.contains(&"--journal-size") {
            args.extend(["--journal-size", "256M"]);
        }
        args.extend_from_slice(tracker_args);
        let tracker = Tracker::start_on("uring", size, &args, prepare);
        let d = tracker.dir.path().to_path_buf();
        pki(&d.join("pki"), &["localhost", "shipper"]);
        let mut site = Site {
            data: data(&d),
            tracker,
            target: None,
            shipper: None,
            target_addr: String::new(),
            target_args: Vec::new(),
        };
        site.start_target();
        site.start_shipper(&d.join("pki"), "shipper");
        site
    }

    fn dir(&self) -> PathBuf {
        self.tracker.dir.path().to_path_buf()
    }

    /// The target's NBD socket, where `disk@latest` and `disk@POINT` are served.
    fn nbd_socket(&self) -> PathBuf {
        self.dir().join("target-nbd.sock")
    }

    /// Reads export `name` of the target over NBD (`disk@latest`, `disk@ID`).
    fn read_export(&self, name: &str) -> Vec<u8> {
        let out = self.dir().join("export.img");
        let _ = std::fs::remove_file(&out);
        run(Command::new("nbdcopy")
            .arg(format!(
                "nbd+unix:///{name}?socket={}",
                self.nbd_socket().display()
            ))
            .arg(&out));
        let b = std::fs::read(&out).unwrap();
        let _ = std::fs::remove_file(&out);
        b
    }

    /// Gives the replica of `name` another volume's identity, behind the target's back: the
    /// target is stopped meanwhile and reads the store again when it restarts.
    /// Returns the files as they were, for [`Site::restore_files`].
    fn forge_uuid(&mut self, name: &str) -> Vec<(PathBuf, String)> {
        self.target.as_mut().unwrap().stop();
        let mut before = Vec::new();
        for f in [
            self.data.join(format!("{name}.state")),
            self.data.join(format!("{name}.store/manifest.json")),
        ] {
            let text = std::fs::read_to_string(&f).unwrap();
            let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
            v["uuid"] = serde_json::json!("00000000000000000000000000000000");
            std::fs::write(&f, v.to_string()).unwrap();
            before.push((f, text));
        }
        self.start_target();
        before
    }

    /// Puts files back as they were, with the target stopped meanwhile.
    fn restore_files(&mut self, files: &[(PathBuf, String)]) {
        self.target.as_mut().unwrap().stop();
        for (f, text) in files {
            std::fs::write(f, text).unwrap();
        }
        self.start_target();
    }

    /// Starts the target; on a restart, on the address it had.
    fn start_target(&mut self) {
        let d = self.dir();
        let port = self.target_addr.rsplit(':').next().unwrap_or("0");
        let listen = format!("127.0.0.1:{}", if port.is_empty() { "0" } else { port });
        let log = d.join("target.log");
        let earlier = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("shippers on ")
            .count();
        let t = Daemon::start(
            "redun-target",
            &[
                "--data-dir".into(),
                s(&self.data),
                "--listen".into(),
                listen,
                "--tls-ca".into(),
                s(&d.join("pki/ca.crt")),
                "--tls-cert".into(),
                s(&d.join("pki/localhost.crt")),
                "--tls-key".into(),
                s(&d.join("pki/localhost.key")),
                "--admin-socket".into(),
                s(&d.join("target.sock")),
                "--nbd-listen".into(),
                format!("unix:{}", s(&self.nbd_socket())),
            ]
            .into_iter()
            .chain(self.target_args.iter().cloned())
            .collect::<Vec<_>>(),
            &log,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = t.log_text();
            if let Some(line) = text.split("shippers on ").nth(earlier + 1) {
                let addr = line.lines().next().unwrap().trim().to_string();
                let port = addr.rsplit(':').next().unwrap();
                // The certificate names localhost: dial it by that name.
                self.target_addr = format!("localhost:{port}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "redun-target did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.target = Some(t);
    }

    fn start_shipper(&mut self, pki: &Path, name: &str) {
        self.start_shipper_with(pki, name, &[]);
    }

    fn start_shipper_with(&mut self, pki: &Path, name: &str, extra: &[String]) {
        self.start_shipper_as(pki, name, name, extra);
    }

    /// A shipper with the certificate `name` whose admin socket and log are named after `id`.
    fn start_shipper_as(&mut self, pki: &Path, name: &str, id: &str, extra: &[String]) {
        let d = self.dir();
        let mut args: Vec<String> = vec![
            "--journal-dir".into(),
            s(&self.tracker.journal_dir()),
            "--tracker-socket".into(),
            s(&self.tracker.admin),
            "--target".into(),
            self.target_addr.clone(),
            "--tls-ca".into(),
            s(&pki.join("ca.crt")),
            "--tls-cert".into(),
            s(&pki.join(format!("{name}.crt"))),
            "--tls-key".into(),
            s(&pki.join(format!("{name}.key"))),
            "--admin-socket".into(),
            s(&d.join(format!("shipper-{id}.sock"))),
            "--retry-unit-ms".into(),
            "100".into(),
        ];
        args.extend_from_slice(extra);
        self.shipper = Some(Daemon::start(
            "redun-shipper",
            &args,
            &d.join(format!("shipper-{id}.log")),
        ));
    }

    fn shipper_status(&self, name: &str) -> Option<serde_json::Value> {
        let sock = self.dir().join(format!("shipper-{name}.sock"));
        let v = request_json(&sock, &serde_json::json!({"cmd": "status"})).ok()?;
        v["status"]["volumes"].get(0).cloned()
    }

    /// `redun status --json` over the three daemons: the merged volume.
    fn merged(&self) -> serde_json::Value {
        let d = self.dir();
        let out = run(Command::new(bin("redun"))
            .args(["status", "--json", "--tracker-socket"])
            .arg(&self.tracker.admin)
            .arg("--shipper-socket")
            .arg(d.join("shipper-shipper.sock"))
            .arg("--target-socket")
            .arg(d.join("target.sock")));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["volumes"][0].clone()
    }

    /// Waits until the shipper reports every record the tracker wrote as durable on the
    /// target, with no lag.
    fn wait_caught_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let head = self.tracker.head_seq();
            let st = self.shipper_status("shipper");
            if let Some(v) = &st {
                if v["acked_seq"].as_u64() == Some(head) && v["lag_bytes"].as_u64() == Some(0) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "replication did not catch up with seq {head}: {st:?}\nshipper:\n{}\ntarget:\n{}",
                self.shipper
                    .as_ref()
                    .map(Daemon::log_text)
                    .unwrap_or_default(),
                self.target
                    .as_ref()
                    .map(Daemon::log_text)
                    .unwrap_or_default(),
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn assert_identical(&self) {
        let a = std::fs::read(&self.tracker.image).unwrap();
        let b = self.read_export(&format!("{EXPORT}@latest"));
        assert_eq!(a.len(), b.len());
        if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
            panic!("replica differs from the backing file at byte {i}");
        }
    }

    /// Waits until the shipper says the volume is `critical` (never retried) for a reason
    /// that contains `why`.
    fn wait_critical(&self, why: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.shipper_status("shipper") {
                if st["state"] == "critical" {
                    let e = st["last_error"].as_str().unwrap();
                    assert!(e.contains(why), "{e}");
                    assert_eq!(st["retries"].as_u64(), Some(0), "{st}");
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the shipper did not go critical");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The position the shipper released must never pass what the target holds durably.
    fn assert_release_not_early(&self) {
        let released = read_release(&self.tracker.journal_path())
            .unwrap()
            .unwrap_or(0);
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(self.data.join(format!("{EXPORT}.state"))).unwrap(),
        )
        .unwrap();
        let durable = state["next_seq"].as_u64().unwrap().saturating_sub(1);
        assert!(
            released <= durable,
            "the journal was released through seq {released} but the replica holds {durable}"
        );
    }

    fn fio(&self, rw: &str, bs: &str, amount: &str, seed: u64) {
        run(Command::new("fio").args([
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={}", self.tracker.uri()),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            "--iodepth=8",
            &format!(
                "--size={}",
                std::fs::metadata(&self.tracker.image).unwrap().len()
            ),
            &format!("--io_size={amount}"),
            &format!("--randseed={seed}"),
            "--refill_buffers",
            "--thread",
        ]));
    }
}

#[test]
fn the_replica_follows_the_volume_and_converges() {
    require("fio");
    require("nbdcopy");
    let site = Site::new();
    // Random data from two different clients: nbdcopy and fio.
    let src = site.dir().join("random.bin");
    sh(&format!("head -c 8M /dev/urandom > {}", src.display()));
    run(Command::new("nbdcopy").arg(&src).arg(site.tracker.uri()));
    site.fio("randwrite", "4k", "8m", 1);
    site.fio("write", "1m", "32m", 2);
    site.fio("randtrim", "64k", "2m", 3);
    site.wait_caught_up();
    site.assert_identical();
    site.assert_release_not_early();
    let st = site.shipper_status("shipper").unwrap();
    assert_eq!(st["state"], "shipping", "{st}");
    let m = site.merged();
    assert_eq!(m["state"], "protected", "{m}");
    assert_eq!(m["lag_bytes"], 0, "{m}");
    assert_eq!(m["rpo_seconds"], 0.0, "{m}");
    assert_eq!(m["acked_seq"], m["head_seq"], "{m}");
    assert_eq!(m["replica_applied_seq"], m["head_seq"], "{m}");
    assert!(st["compression_ratio"].as_f64().unwrap() > 0.0);
    let t = request_json(
        &site.dir().join("target.sock"),
        &serde_json::json!({"cmd": "status"}),
    )
    .unwrap();
    assert_eq!(
        t["status"]["volumes"][0]["applied_seq"].as_u64(),
        Some(site.tracker.head_seq()),
        "{t}"
    );
}

/// Writes in the background while `fault` strikes at random moments; then the replica must
/// converge and the journal must not have been released ahead of the replica.
fn trials(kill_target: bool) {
    require("fio");
    let mut site = Site::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    for trial in 0..10u64 {
        let uri = site.tracker.uri();
        let writer = std::thread::spawn(move || {
            run(Command::new("fio").args([
                "--name=w",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=16k",
                "--iodepth=8",
                &format!("--size={VOL}"),
                "--io_size=24m",
                &format!("--randseed={}", trial + 10),
                "--refill_buffers",
                "--thread",
            ]));
        });
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(50 + rng % 400));
        if kill_target {
            site.target.as_mut().unwrap().kill9();
            site.assert_release_not_early();
            std::thread::sleep(Duration::from_millis(rng % 300));
            site.start_target();
        } else {
            site.shipper.as_mut().unwrap().kill9();
            site.assert_release_not_early();
            let pki = site.dir().join("pki");
            site.start_shipper(&pki, "shipper");
        }
        writer.join().unwrap();
        site.wait_caught_up();
        site.assert_identical();
        site.assert_release_not_early();
    }
    if let Some(t) = site.target.as_mut() {
        t.stop();
    }
    if let Some(s) = site.shipper.as_mut() {
        s.stop();
    }
}

#[test]
fn kill_9_of_the_shipper_during_writes_loses_nothing() {
    trials(false);
}

#[test]
fn kill_9_of_the_target_during_writes_loses_nothing() {
    trials(true);
}

#[test]
fn a_foreign_certificate_and_a_plain_client_are_refused_and_others_go_on() {
    require("fio");
    let mut site = Site::new();
    let d = site.dir();
    // A plain TCP client that speaks no TLS.
    let port = site.target_addr.rsplit(':').next().unwrap().to_string();
    let mut plain = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    let _ = plain.write_all(b"RDR1 hello in plain text\n");
    drop(plain);
    // A shipper that trusts the target's CA but whose own certificate another CA signed.
    pki(&d.join("other-pki"), &["intruder"]);
    let mixed = d.join("mixed-pki");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(d.join("pki/ca.crt"), mixed.join("ca.crt")).unwrap();
    for f in ["intruder.crt", "intruder.key"] {
        std::fs::copy(d.join("other-pki").join(f), mixed.join(f)).unwrap();
    }
    let good = site.shipper.take();
    site.start_shipper(&mixed, "intruder");
    let intruder = site.shipper.take();
    site.shipper = good;
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        if let Some(st) = site.shipper_status("intruder") {
            if st["state"] == "critical" {
                break st;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the intruder did not go critical:\n{}",
            intruder.as_ref().unwrap().log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = st["last_error"].as_str().unwrap();
    assert!(err.contains("certificate"), "{err}");
    // The other direction: the target's log names the refusal.
    let tlog = site.target.as_ref().unwrap().log_text();
    assert!(tlog.contains("TLS handshake failed"), "{tlog}");
    // The good shipper still replicates.
    site.fio("randwrite", "4k", "4m", 7);
    site.wait_caught_up();
    site.assert_identical();
    drop(intruder);
    // A target whose certificate does not carry the name the shipper dials is refused.
    let good = site.shipper.take();
    site.start_shipper_as(
        &d.join("pki"),
        "shipper",
        "wrongname",
        &["--target-name".into(), "elsewhere.example.com".into()],
    );
    let wrong = site.shipper.take();
    site.shipper = good;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = site.shipper_status("wrongname");
        if let Some(st) = st.filter(|st| st["state"] == "critical") {
            let e = st["last_error"].as_str().unwrap();
            assert!(
                e.contains("certificate") && e.contains("NotValidForName"),
                "{e}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a wrong target name was not refused"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(wrong);
}

#[test]
fn one_stalled_volume_does_not_hold_up_another() {
    require("fio");
    let other = tempfile::NamedTempFile::new_in("/tmp").unwrap();
    other.as_file().set_len(16 << 20).unwrap();
    let spec = format!("other={}", other.path().display());
    let mut site = Site::build_with(VOL, |d| d.join("data"), &["--volume", &spec]);
    let other_uri = format!("nbd+unix:///other?socket={}", site.tracker.sock.display());
    let write_other = |seed: u64| {
        run(Command::new("fio").args([
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={other_uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=16m",
            "--io_size=1m",
            &format!("--randseed={seed}"),
            "--thread",
        ]));
    };
    site.fio("randwrite", "4k", "2m", 41);
    write_other(42);
    site.wait_caught_up();
    // Wait until the other volume's replica exists, then make it another volume's replica.
    let state = site.data.join("other.state");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !state.exists() {
        assert!(Instant::now() < deadline, "volume other was never shipped");
        std::thread::sleep(Duration::from_millis(50));
    }
    site.shipper.as_mut().unwrap().stop();
    let _ = site.forge_uuid("other");
    let pki = site.dir().join("pki");
    site.start_shipper(&pki, "shipper");
    // "other" goes critical; "disk" keeps replicating.
    write_other(43);
    site.fio("randwrite", "4k", "4m", 44);
    site.wait_caught_up();
    site.assert_identical();
    let sock = site.dir().join("shipper-shipper.sock");
    let st = request_json(&sock, &serde_json::json!({"cmd": "status"})).unwrap();
    let vols = st["status"]["volumes"].as_array().unwrap();
    let other_st = vols.iter().find(|v| v["name"] == "other").unwrap();
    assert_eq!(other_st["state"], "critical", "{other_st}");
}

#[test]
fn a_replica_of_another_volume_is_refused_without_retrying() {
    require("fio");
    let mut site = Site::new();
    site.fio("randwrite", "4k", "1m", 5);
    site.wait_caught_up();
    site.shipper.as_mut().unwrap().stop();
    // Another volume's identity under the same name: the replica's state says so.
    let original = site.forge_uuid(EXPORT);
    let before = site.tracker.head_seq();
    let pki = site.dir().join("pki");
    site.start_shipper(&pki, "shipper");
    site.wait_critical("uuid");
    let m = site.merged();
    assert_eq!(m["state"], "critical", "{m}");
    assert!(m["last_error"].as_str().unwrap().contains("uuid"), "{m}");
    // Writes go on while shipping is stopped; the operator fixes the cause and resumes.
    site.fio("randwrite", "4k", "1m", 6);
    assert!(site.tracker.head_seq() > before);
    // The tracker's heads tell the RPO and lag while nothing is shipped.
    std::thread::sleep(Duration::from_millis(400));
    let m = site.merged();
    assert!(m["rpo_seconds"].as_f64().unwrap() > 0.2, "{m}");
    assert!(m["lag_bytes"].as_u64().unwrap() > 0, "{m}");
    site.restore_files(&original);
    let sock = site.dir().join("shipper-shipper.sock");
    run(Command::new(bin("redun"))
        .args(["resume", EXPORT, "--shipper-socket"])
        .arg(&sock));
    site.wait_caught_up();
    site.assert_identical();
    assert_eq!(site.merged()["state"], "protected");
    let _ = site.target.as_ref().map(Daemon::pid);
}

/// Unmounts the target's small filesystem, whatever happened to the test.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_target_disk_is_retried_and_nothing_is_lost_once_space_is_freed() {
    require("fio");
    require("mkfs.ext4");
    const SMALL_VOL: u64 = 32 << 20;
    let mut mount = None;
    let mut site = Site::build(SMALL_VOL, |d| {
        // The target's data directory on a 48 MiB ext4 filesystem of its own, most of it taken
        // by a filler file.
        let img = d.join("target-fs.img");
        let mnt = d.join("target-fs");
        std::fs::create_dir(&mnt).unwrap();
        sh(&format!(
            "truncate -s 48M {0} && mkfs.ext4 -F -q {0}",
            img.display()
        ));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        mount = Some(Mount(mnt.clone()));
        sh(&format!(
            "fallocate -l 32M {}",
            mnt.join("filler").display()
        ));
        mnt.join("data")
    });
    let _mount = mount;
    site.fio("write", "1m", "30m", 11);
    // The replica runs out of space: the shipper retries and says why.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = site.shipper_status("shipper").unwrap_or_default();
        let err = st["last_error"].as_str().unwrap_or("").to_string();
        if st["state"] == "retrying" && err.contains("No space") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the shipper did not report the full disk: {st}\ntarget:\n{}",
            site.target.as_ref().unwrap().log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    site.assert_release_not_early();
    // Writes go on meanwhile; then space is freed and replication catches up by itself.
    site.fio("randwrite", "64k", "4m", 12);
    std::fs::remove_file(site.data.parent().unwrap().join("filler")).unwrap();
    site.wait_caught_up();
    site.assert_identical();
    site.assert_release_not_early();
    site.shipper.as_mut().unwrap().stop();
    site.target.as_mut().unwrap().stop();
}

#[test]
fn the_bandwidth_limit_paces_shipping_from_flag_and_from_the_schedule() {
    require("fio");
    let mut site = Site::new();
    let pki = site.dir().join("pki");
    // Half the day each: the schedule covers every moment with 2 MiB/s; the flag-free
    // default (unlimited) would never apply.
    let cfg = site.dir().join("redun.toml");
    std::fs::write(
        &cfg,
        "[tracker]\n[shipper]\nbandwidth_limit = \"unlimited\"\n\
         [[shipper.bandwidth_schedule]]\nwindow = \"00:00-12:00\"\nlimit = \"2MiB/s\"\n\
         [[shipper.bandwidth_schedule]]\nwindow = \"12:00-00:00\"\nlimit = \"2MiB/s\"\n",
    )
    .unwrap();
    for extra in [
        vec!["--bandwidth-limit".to_string(), "2MiB/s".to_string()],
        vec!["--config".to_string(), s(&cfg)],
    ] {
        // Small batches: the pace applies batch by batch.
        let extra = [extra, vec!["--batch-size".into(), "256K".into()]].concat();
        site.shipper.as_mut().unwrap().stop();
        site.start_shipper_with(&pki, "shipper", &extra);
        // 8 MiB of incompressible data at 2 MiB/s takes about 4 s (less a 0.2 s burst).
        site.fio("write", "1m", "8m", 21);
        let t0 = Instant::now();
        site.wait_caught_up();
        let took = t0.elapsed();
        let st = site.shipper_status("shipper").unwrap();
        assert_eq!(
            st["bandwidth_limit_bytes_per_second"].as_u64(),
            Some(2 << 20),
            "{st}"
        );
        assert!(
            took >= Duration::from_millis(3000),
            "8 MiB shipped in {took:?} under a 2 MiB/s limit ({extra:?})"
        );
        site.assert_identical();
    }
    // A bad rate stops the shipper at start with a message naming the key.
    std::fs::write(&cfg, "[shipper]\nbandwidth_limit = \"fast\"\n").unwrap();
    let out = Command::new(bin("redun-shipper"))
        .args([
            "--config",
            &s(&cfg),
            "--journal-dir",
            &s(&site.tracker.journal_dir()),
        ])
        .args([
            "--target",
            "localhost:1",
            "--tls-ca",
            &s(&pki.join("ca.crt")),
        ])
        .args([
            "--tls-cert",
            &s(&pki.join("shipper.crt")),
            "--tls-key",
            &s(&pki.join("shipper.key")),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("shipper.bandwidth_limit") && err.contains("fast"),
        "{err}"
    );
}

/// Two network namespaces joined by a veth pair: host A (10.99.N.1) and host B (10.99.N.2).
/// Deleted on drop (after the daemons in them, which are declared later and dropped first).
struct Hosts {
    a: String,
    b: String,
    ip_b: String,
}

impl Hosts {
    fn new() -> Hosts {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let tag = format!("{}x{n}", std::process::id());
        let net = (std::process::id() * 7 + n) % 200 + 20;
        let h = Hosts {
            a: format!("rdn{tag}a"),
            b: format!("rdn{tag}b"),
            ip_b: format!("10.99.{net}.2"),
        };
        sh(&format!(
            "ip netns add {a} && ip netns add {b} && \
             ip link add va{tag} type veth peer name vb{tag} && \
             ip link set va{tag} netns {a} && ip link set vb{tag} netns {b} && \
             ip -n {a} addr add 10.99.{net}.1/24 dev va{tag} && \
             ip -n {b} addr add 10.99.{net}.2/24 dev vb{tag} && \
             ip -n {a} link set va{tag} up && ip -n {b} link set vb{tag} up && \
             ip -n {a} link set lo up && ip -n {b} link set lo up",
            a = h.a,
            b = h.b
        ));
        h
    }

    fn exec(&self, ns: &str, bin_name: &str, args: &[String]) -> Vec<String> {
        netns_exec(ns, bin_name, args)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

/// A TCP proxy inside a namespace, in this test process, that can cut the connection: while
/// cut it closes every connection at once and records when each one was attempted.
struct Proxy {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    attempts: std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    fn start(ns: &str, upstream: String) -> Proxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let attempts: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let ns_path = format!("/run/netns/{ns}");
        let (c, st, at) = (cut.clone(), stop.clone(), attempts.clone());
        let thread = std::thread::spawn(move || {
            // This thread, and the threads it starts, live in the namespace.
            let f = std::fs::File::open(&ns_path).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            tx.send(l.local_addr().unwrap().port()).unwrap();
            l.set_nonblocking(true).unwrap();
            while !st.load(Ordering::SeqCst) {
                let Ok((down, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                at.lock().unwrap().push(Instant::now());
                if c.load(Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let Ok(up) = TcpStream::connect(&upstream) else {
                    continue;
                };
                down.set_nonblocking(false).unwrap();
                for (from, to) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    let (c, st) = (c.clone(), st.clone());
                    std::thread::spawn(move || pump(from, to, &c, &st));
                }
            }
        });
        Proxy {
            port: rx.recv().unwrap(),
            cut,
            stop,
            attempts,
            thread: Some(thread),
        }
    }
}

/// Copies `from` to `to` until either ends, or the proxy cuts or stops.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    cut: &std::sync::atomic::AtomicBool,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::io::Read;
    use std::sync::atomic::Ordering;
    from.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = vec![0u8; 256 << 10];
    while !cut.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn across_hosts_loss_a_cut_and_a_target_restart_heal_by_themselves() {
    use std::sync::atomic::Ordering;
    require("fio");
    require("ip");
    require("nft");
    let hosts = Hosts::new();
    // The tracker needs no network: its NBD and admin sockets are Unix sockets, which every
    // namespace sees. The shipper lives on host A, the target on host B.
    let tracker = Tracker::start_with("uring", VOL, &["--journal-size", "256M"]);
    let d = tracker.dir.path().to_path_buf();
    pki(&d.join("pki"), &["localhost", "shipper"]);
    let data = d.join("data");
    let target_args = |h: &Hosts| {
        h.exec(
            &h.b,
            "redun-target",
            &[
                "--data-dir".into(),
                s(&data),
                "--listen".into(),
                format!("{}:9443", h.ip_b),
                "--tls-ca".into(),
                s(&d.join("pki/ca.crt")),
                "--tls-cert".into(),
                s(&d.join("pki/localhost.crt")),
                "--tls-key".into(),
                s(&d.join("pki/localhost.key")),
                "--admin-socket".into(),
                s(&d.join("target.sock")),
                "--nbd-listen".into(),
                format!("unix:{}", s(&d.join("target-nbd.sock"))),
            ],
        )
    };
    let ip = PathBuf::from("ip");
    let mut target = Some(Daemon::start_program(
        &ip,
        &target_args(&hosts),
        &d.join("target.log"),
    ));
    let proxy = Proxy::start(&hosts.a, format!("{}:9443", hosts.ip_b));
    let shipper_args = hosts.exec(
        &hosts.a,
        "redun-shipper",
        &[
            "--journal-dir".into(),
            s(&tracker.journal_dir()),
            "--tracker-socket".into(),
            s(&tracker.admin),
            "--target".into(),
            format!("127.0.0.1:{}", proxy.port),
            "--target-name".into(),
            "localhost".into(),
            "--tls-ca".into(),
            s(&d.join("pki/ca.crt")),
            "--tls-cert".into(),
            s(&d.join("pki/shipper.crt")),
            "--tls-key".into(),
            s(&d.join("pki/shipper.key")),
            "--admin-socket".into(),
            s(&d.join("shipper-shipper.sock")),
            "--retry-unit-ms".into(),
            "100".into(),
        ],
    );
    let shipper = Daemon::start_program(&ip, &shipper_args, &d.join("shipper-shipper.log"));
    let site = Site {
        tracker,
        target: None,
        shipper: Some(shipper),
        target_addr: String::new(),
        data: data.clone(),
        target_args: Vec::new(),
    };

    // 1. 5% packet loss each way on the link between the hosts.
    for (ns, dir) in [(&hosts.a, "dport"), (&hosts.b, "sport")] {
        sh(&format!(
            "ip netns exec {ns} nft add table inet chaos && \
             ip netns exec {ns} nft add chain inet chaos out '{{ type filter hook output priority 0; }}' && \
             ip netns exec {ns} nft add rule inet chaos out tcp {dir} 9443 numgen random mod 100 '<' 5 drop"
        ));
    }
    site.fio("randwrite", "16k", "16m", 31);
    site.wait_caught_up();
    site.assert_identical();
    for ns in [&hosts.a, &hosts.b] {
        sh(&format!("ip netns exec {ns} nft delete table inet chaos"));
    }

    // 2. A 30-second cut: every attempt is refused at once; the attempts follow the schedule.
    proxy.attempts.lock().unwrap().clear();
    proxy.cut.store(true, Ordering::SeqCst);
    site.fio("randwrite", "16k", "4m", 32);
    std::thread::sleep(Duration::from_secs(30));
    let attempts = proxy.attempts.lock().unwrap().clone();
    proxy.cut.store(false, Ordering::SeqCst);
    // Retry k (k >= 1) comes RETRY_SCHEDULE[k] units after retry k-1: 2, 4, 8, 10, 30, 30, ...
    let expect =
        |k: usize| Duration::from_millis(100 * [1u64, 2, 4, 8, 10].get(k).copied().unwrap_or(30));
    assert!(
        attempts.len() >= 8,
        "only {} attempts in 30 s",
        attempts.len()
    );
    for k in 1..attempts.len() {
        let gap = attempts[k] - attempts[k - 1];
        let want = expect(k);
        assert!(
            gap + Duration::from_millis(20) >= want && gap <= want + Duration::from_millis(600),
            "retry {k} came {gap:?} after the previous one, the schedule says {want:?} \
             (attempts at {:?})",
            attempts
                .iter()
                .map(|t| *t - attempts[0])
                .collect::<Vec<_>>()
        );
    }
    let st = site.shipper_status("shipper").unwrap();
    assert_eq!(st["state"], "retrying", "{st}");
    assert!(st["next_retry_unix"].as_f64().is_some(), "{st}");
    site.wait_caught_up();
    site.assert_identical();

    // 3. The target stopped and started again.
    target.as_mut().unwrap().stop();
    site.fio("randwrite", "16k", "4m", 33);
    std::thread::sleep(Duration::from_secs(1));
    target = Some(Daemon::start_program(
        &ip,
        &target_args(&hosts),
        &d.join("target.log"),
    ));
    site.wait_caught_up();
    site.assert_identical();
    site.assert_release_not_early();
    drop(site);
    drop(target);
    drop(proxy);
    drop(hosts);
}

/// A digest of a whole image.
fn digest(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

fn point_create(site: &Site) -> u64 {
    let out = run(Command::new(bin("redun"))
        .args(["point", "create", EXPORT, "--tracker-socket"])
        .arg(&site.tracker.admin)
        .arg("--shipper-socket")
        .arg(site.dir().join("shipper-shipper.sock")));
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("redun point create prints the point's id")
}

fn points_json(site: &Site) -> Vec<serde_json::Value> {
    let out = run(Command::new(bin("redun"))
        .args(["points", EXPORT, "--json", "--target-socket"])
        .arg(site.dir().join("target.sock")));
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn every_recovery_point_reads_back_its_moment_over_nbd() {
    require("fio");
    require("nbdcopy");
    // Points only on demand here; small segments so that retention has some to merge.
    let mut site = Site::build_with(16 << 20, |d| d.join("data"), &["--crash-interval", "0"]);
    site.target_args = vec!["--segment-size".into(), "2M".into()];
    site.target.as_mut().unwrap().stop();
    site.start_target();
    let mut expected = Vec::new();
    for round in 0..30 {
        site.fio("randwrite", "4k", "512k", 100 + round);
        if round % 5 == 4 {
            site.fio("randtrim", "64k", "256k", 200 + round);
        }
        let id = point_create(&site);
        let image = std::fs::read(&site.tracker.image).unwrap();
        expected.push((id, digest(&image)));
    }
    let listed = points_json(&site);
    assert_eq!(listed.len(), expected.len(), "{listed:?}");
    for ((id, _), p) in expected.iter().zip(&listed) {
        assert_eq!(p["id"].as_u64(), Some(*id), "{p}");
        assert_eq!(p["kind"], "crash", "{p}");
        assert_eq!(p["usable"], true, "{p}");
    }
    let check = |site: &Site, which: &[(u64, u64)]| {
        for (id, want) in which {
            let got = digest(&site.read_export(&format!("{EXPORT}@{id}")));
            assert_eq!(
                got, *want,
                "point {id} reads other bytes than at its moment"
            );
        }
    };
    check(&site, &expected);
    // A target restart finds every point again (sealed segments and the open one).
    site.target.as_mut().unwrap().stop();
    site.start_target();
    check(&site, &expected);
    // An unknown point is not exported, and says so.
    let out = Command::new("nbdinfo")
        .arg(format!(
            "nbd+unix:///{EXPORT}@999999?socket={}",
            site.nbd_socket().display()
        ))
        .output()
        .unwrap();
    assert!(!out.status.success());
    // Retention keeps only the newest points: the rest merge into the base image, and
    // what is left still reads back.
    let cfg = site.dir().join("retention.toml");
    std::fs::write(&cfg, "[retention]\nkeep_all = \"1s\"\ntiers = []\n").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    site.fio("randwrite", "4k", "256k", 400);
    let last = point_create(&site);
    let last_digest = digest(&std::fs::read(&site.tracker.image).unwrap());
    site.target_args.extend(["--config".into(), s(&cfg)]);
    site.target.as_mut().unwrap().stop();
    site.start_target();
    let deadline = Instant::now() + Duration::from_secs(30);
    let segments = |site: &Site| {
        std::fs::read_dir(site.data.join(format!("{EXPORT}.store")))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".seg")
            })
            .count()
    };
    let before = segments(&site);
    loop {
        let listed = points_json(&site);
        if listed.len() == 1 && segments(&site) < before {
            assert_eq!(listed[0]["id"].as_u64(), Some(last));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "retention did not prune and merge: {listed:?}, {} segments of {before}",
            segments(&site)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    check(&site, &[(last, last_digest)]);
    site.wait_caught_up();
    site.assert_identical();
}

fn point_create_app(site: &Site) -> Output {
    Command::new(bin("redun"))
        .args(["point", "create", EXPORT, "--app", "--tracker-socket"])
        .arg(&site.tracker.admin)
        .arg("--shipper-socket")
        .arg(site.dir().join("shipper-shipper.sock"))
        .output()
        .unwrap()
}

#[test]
fn an_app_consistent_point_of_ext4_is_clean_and_its_test_failover_leaves_the_replica_alone() {
    if !privileged() {
        return;
    }
    require("nbdfuse");
    require("mkfs.ext4");
    require("fsfreeze");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let mnt = w.join("src/mnt");
    // The freeze hook fails while `fail` exists; the thaw hook logs every run.
    let pre = format!(
        "disk=test ! -e {w}/fail && fsfreeze -f {m}",
        w = w.display(),
        m = mnt.display()
    );
    let post = format!(
        "disk=echo post >> {w}/post.log; fsfreeze -u {m} 2>/dev/null || true",
        w = w.display(),
        m = mnt.display()
    );
    let site = Site::build_with(
        256 << 20,
        |d| d.join("data"),
        &[
            "--crash-interval",
            "0",
            "--pre-hook",
            &pre,
            "--post-hook",
            &post,
        ],
    );
    let src = Stack::attach(&site.tracker.uri(), &w.join("src"), false);
    run(Command::new("mkfs.ext4").args(["-F", "-q", src.dev()]));
    src.mount("");
    sh(&format!(
        "cd {m} && mkdir d && for i in $(seq 1 12); do head -c $((i * 613 * 1024)) /dev/urandom > d/f$i; done \
         && sync && sha256sum d/* > {w}/sums",
        m = mnt.display(),
        w = w.display()
    ));
    let out = point_create_app(&site);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let posts = || {
        std::fs::read_to_string(w.join("post.log"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert_eq!(posts(), 1);
    // After the point: a new file, a changed one.
    sh(&format!(
        "cd {m} && head -c 1M /dev/urandom > later && head -c 4096 /dev/urandom >> d/f1 && sync",
        m = mnt.display()
    ));
    // A freeze that fails places no point, and the thaw hook still runs.
    std::fs::write(w.join("fail"), "").unwrap();
    let out = point_create_app(&site);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("pre-hook") && err.contains("no point placed"),
        "{err}"
    );
    assert_eq!(posts(), 2);
    std::fs::remove_file(w.join("fail")).unwrap();
    sh(&format!(
        "cd {m} && echo alive > alive && sync",
        m = mnt.display()
    ));
    site.wait_caught_up();
    let listed = points_json(&site);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["kind"], "app");
    // Test failover at that point: writable, its writes in a scratch overlay, replication
    // going on underneath.
    let redun = |args: &[&str]| {
        Command::new(bin("redun"))
            .args(args)
            .arg("--target-socket")
            .arg(site.dir().join("target.sock"))
            .output()
            .unwrap()
    };
    let out = redun(&["test-failover", "start", EXPORT, "--point", &id.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("disk@test"));
    let again = redun(&["test-failover", "start", EXPORT]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("under way"));
    let test_uri = format!(
        "nbd+unix:///{EXPORT}@test?socket={}",
        site.nbd_socket().display()
    );
    let test = Stack::attach(&test_uri, &w.join("test"), false);
    run(Command::new("e2fsck").args(["-fn", test.dev()]));
    test.mount("");
    let check = sh(&format!(
        "cd {} && sha256sum -c --quiet {}/sums && test ! -e later && echo test > only-in-test \
         && rm d/f2 && sync",
        test.mnt.display(),
        w.display()
    ));
    assert!(check.status.success());
    let seq_before = site.tracker.head_seq();
    sh(&format!(
        "cd {m} && head -c 256K /dev/urandom > during-test && sync",
        m = mnt.display()
    ));
    site.wait_caught_up();
    assert!(
        site.tracker.head_seq() > seq_before,
        "the source kept writing"
    );
    let t = request_json(
        &site.dir().join("target.sock"),
        &serde_json::json!({"cmd": "status"}),
    )
    .unwrap();
    let tv = &t["status"]["volumes"][0];
    assert_eq!(tv["test_failover"]["point"].as_u64(), Some(id), "{tv}");
    assert_eq!(
        tv["applied_seq"].as_u64(),
        Some(site.tracker.head_seq()),
        "{tv}"
    );
    let busy = redun(&["test-failover", "cleanup", EXPORT]);
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("still use"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    drop(test);
    let out = redun(&["test-failover", "cleanup", EXPORT]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gone = Command::new("nbdinfo").arg(&test_uri).output().unwrap();
    assert!(!gone.status.success(), "disk@test is still exported");
    // The point, read-only through a second stack: a clean ext4 with exactly its files;
    // nothing the test failover wrote reached it.
    let uri = format!(
        "nbd+unix:///{EXPORT}@{id}?socket={}",
        site.nbd_socket().display()
    );
    let point = Stack::attach(&uri, &w.join("point"), true);
    run(Command::new("e2fsck").args(["-fn", point.dev()]));
    point.mount("ro,noload");
    let check = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "cd {} && sha256sum -c --quiet {}/sums",
            point.mnt.display(),
            w.display()
        ))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the point's files differ: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    assert!(!point.mnt.join("later").exists());
    assert!(!point.mnt.join("alive").exists());
    assert!(!point.mnt.join("only-in-test").exists());
    assert!(point.mnt.join("d/f2").exists());
    drop(point);
    drop(src);
}

fn redun_ok(args: &[&str], sockets: &[(&str, PathBuf)]) -> String {
    let mut cmd = Command::new(bin("redun"));
    cmd.args(args);
    for (flag, p) in sockets {
        cmd.arg(flag).arg(p);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "redun {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_planned_failover_under_writes_loses_nothing_and_fences_the_old_primary() {
    require("fio");
    require("nbdcopy");
    require("qemu-io");
    let mut site = Site::new();
    let target_sock = site.dir().join("target.sock");
    // A writer that runs until the source refuses its writes.
    let mut writer = fio_spawn(
        &site.tracker.uri(),
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            &format!("--size={VOL}"),
            "--time_based",
            "--runtime=60",
            "--rate=20m",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let out = redun_ok(
        &["failover", EXPORT, "--planned"],
        &[
            ("--tracker-socket", site.tracker.admin.clone()),
            ("--shipper-socket", site.dir().join("shipper-shipper.sock")),
            ("--target-socket", target_sock.clone()),
        ],
    );
    assert!(out.contains("nothing lost"), "{out}");
    // The writer met the fence and gave up.
    assert!(
        wait_timeout(&mut writer, Duration::from_secs(30)).is_some(),
        "the writer was not stopped by the fence"
    );
    let st = site.tracker.status_json();
    assert_eq!(
        st["tracker"]["status"]["volumes"][0]["fenced"], true,
        "{st}"
    );
    // The promoted volume is the source as it was when writes were refused.
    let source = std::fs::read(&site.tracker.image).unwrap();
    let promoted = site.read_export(EXPORT);
    assert!(
        digest(&promoted) == digest(&source),
        "the promoted volume differs from the source at the fence"
    );
    // It is served read-write and keeps what is written to it.
    let uri = format!(
        "nbd+unix:///{EXPORT}?socket={}",
        site.nbd_socket().display()
    );
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "flush"])
        .arg(&uri));
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read -P 0x5a 1M 64k"])
        .arg(&uri));
    let t = request_json(&target_sock, &serde_json::json!({"cmd": "status"})).unwrap();
    let tv = &t["status"]["volumes"][0];
    assert_eq!(tv["failed_over"]["committed"], false, "{tv}");
    assert_eq!(tv["generation"], 2, "{tv}");
    // The old primary's shipper, restarted, is refused for good and says why.
    site.shipper.as_mut().unwrap().stop();
    let pki = site.dir().join("pki");
    site.start_shipper(&pki, "shipper");
    site.wait_critical("failed over");
    // Committed, the failover is final.
    redun_ok(
        &["failover", "commit", EXPORT],
        &[("--target-socket", target_sock.clone())],
    );
    let again = Command::new(bin("redun"))
        .args(["failover", EXPORT, "--unplanned", "--target-socket"])
        .arg(&target_sock)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("final"));
    // A target restart serves the promoted volume again, with its writes.
    site.target.as_mut().unwrap().stop();
    site.start_target();
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read -P 0x5a 1M 64k"])
        .arg(&uri));
}

/// The shipper's failback status (`redun reverse`), once one ran.
fn reverse_status(site: &Site) -> serde_json::Value {
    site.shipper_status("shipper")
        .map_or(serde_json::Value::Null, |v| v["reverse"].clone())
}

fn qemu_write(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    run(c.arg("-c").arg("flush").arg(uri));
}

#[test]
fn a_failback_round_trip_copies_back_only_what_changed_and_replication_goes_on() {
    require("fio");
    require("nbdcopy");
    require("qemu-io");
    let mut site = Site::new();
    let sockets = [
        ("--tracker-socket", site.tracker.admin.clone()),
        ("--shipper-socket", site.dir().join("shipper-shipper.sock")),
        ("--target-socket", site.dir().join("target.sock")),
    ];
    let target_only = [sockets[2].clone()];
    let shipper_only = [sockets[1].clone()];
    // Not failed over: nothing to fail back, and the source keeps taking writes.
    site.wait_caught_up();
    let out = Command::new(bin("redun"))
        .args(["reverse", EXPORT, "--shipper-socket"])
        .arg(&sockets[1].1)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not failed over"), "{err}");
    assert_eq!(
        site.tracker.status_json()["tracker"]["status"]["volumes"][0]["fenced"],
        false
    );
    let r = request_json(
        &site.tracker.admin,
        &serde_json::json!({"cmd": "failback-apply", "volume": EXPORT}),
    )
    .unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("fenced"), "{r}");
    // Data, a point, and more data after it, all replicated.
    site.fio("randwrite", "64k", "16m", 1);
    let point = point_create(&site);
    site.fio("randwrite", "4k", "1m", 2);
    site.wait_caught_up();
    // The source is cut off from the DR site: an unplanned failover to the point.
    redun_ok(
        &[
            "failover",
            EXPORT,
            "--unplanned",
            "--point",
            &point.to_string(),
        ],
        &target_only,
    );
    // The old primary goes on writing for a while (its shipper is refused: they stay in
    // its journal).
    site.fio("randwrite", "4k", "1m", 3);
    site.wait_critical("failed over");
    // The application on the DR site writes to the promoted volume.
    let dr = format!(
        "nbd+unix:///{EXPORT}?socket={}",
        site.nbd_socket().display()
    );
    qemu_write(&dr, &["write -P 0x5a 1M 256k", "write -P 0x6b 20M 4k"]);
    // Failback: the first pass copies what differs, while the DR application goes on.
    let out = redun_ok(&["reverse", EXPORT], &shipper_only);
    assert!(out.contains("failback under way"), "{out}");
    let fenced = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k"])
        .arg(site.tracker.uri())
        .output()
        .unwrap();
    assert!(
        !fenced.status.success() || String::from_utf8_lossy(&fenced.stdout).contains("failed"),
        "the old primary took a write during the failback"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while reverse_status(&site)["passes"].as_u64().unwrap_or(0) < 1 {
        assert!(Instant::now() < deadline, "{}", reverse_status(&site));
        std::thread::sleep(Duration::from_millis(50));
    }
    // The shipper killed mid-failback: the volume stays fenced, and the failback asked for
    // again starts over with what may still differ.
    let before_kill = reverse_status(&site);
    site.shipper.as_mut().unwrap().kill9();
    let pki = site.dir().join("pki");
    site.start_shipper(&pki, "shipper");
    qemu_write(&dr, &["write -P 0x7c 30M 64k"]);
    assert_eq!(
        site.tracker.status_json()["tracker"]["status"]["volumes"][0]["fenced"],
        true
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while site.shipper_status("shipper").is_none() {
        assert!(Instant::now() < deadline, "the shipper did not come back");
        std::thread::sleep(Duration::from_millis(50));
    }
    redun_ok(&["reverse", EXPORT], &shipper_only);
    let passes = reverse_status(&site)["passes"].as_u64().unwrap();
    while reverse_status(&site)["passes"].as_u64().unwrap() < passes + 2 {
        assert!(Instant::now() < deadline, "{}", reverse_status(&site));
        std::thread::sleep(Duration::from_millis(50));
    }
    // The DR application stops; the planned failover brings the workload home.
    let promoted = site.read_export(EXPORT);
    let out = redun_ok(&["failover", EXPORT, "--planned"], &sockets);
    assert!(out.contains("failed back"), "{out}");
    let source = std::fs::read(&site.tracker.image).unwrap();
    assert!(
        digest(&source) == digest(&promoted),
        "the original site does not hold the promoted volume's latest data"
    );
    let r = reverse_status(&site);
    assert_eq!(r["phase"], "done", "{r}");
    // Changed on either side since the point: the source's 2 MiB of 4 KiB writes (some
    // overlap), and 324 KiB on the DR site, 64 KiB of it after the restart.
    let dr_bytes = (256 + 4 + 64) << 10;
    let changed = (2 << 20) + dr_bytes;
    let copied = r["copied_bytes"].as_u64().unwrap();
    let compared = r["compared_bytes"].as_u64().unwrap();
    eprintln!(
        "failback: before kill -9 {} bytes compared, {} copied back; after it {compared} \
         compared, {copied} copied ({} on the wire); at most {changed} bytes changed since the \
         point ({dr_bytes} on the DR site)",
        before_kill["compared_bytes"], before_kill["copied_bytes"], r["wire_bytes"]
    );
    let first = before_kill["copied_bytes"].as_u64().unwrap();
    assert!(
        first >= (256 + 4) << 10 && first <= changed,
        "{before_kill}"
    );
    assert!(copied >= 64 << 10 && copied <= changed, "{r}");
    assert!(compared < VOL / 4, "the comparison was not narrowed: {r}");
    // The target no longer serves the promoted volume, and replication goes on home -> DR
    // at the next generation: what the source writes reaches the replica.
    let t = request_json(&sockets[2].1, &serde_json::json!({"cmd": "status"})).unwrap();
    let tv = &t["status"]["volumes"][0];
    assert!(tv["failed_over"].is_null(), "{tv}");
    assert_eq!(tv["generation"], 3, "{tv}");
    site.fio("randwrite", "4k", "1m", 4);
    site.wait_caught_up();
    site.assert_identical();
    assert_eq!(site.shipper_status("shipper").unwrap()["generation"], 3);
    // A shipper restart keeps the new generation.
    site.shipper.as_mut().unwrap().stop();
    site.start_shipper(&pki, "shipper");
    site.fio("randwrite", "4k", "256k", 5);
    site.wait_caught_up();
    site.assert_identical();
}

#[test]
fn an_unplanned_failover_after_kill_9_serves_a_filesystem_that_recovers() {
    if !privileged() {
        return;
    }
    require("nbdfuse");
    require("mkfs.ext4");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let mut site = Site::build_with(256 << 20, |d| d.join("data"), &["--crash-interval", "1s"]);
    let target_sock = site.dir().join("target.sock");
    let src = Stack::attach(&site.tracker.uri(), &w.join("src"), false);
    run(Command::new("mkfs.ext4").args(["-F", "-q", src.dev()]));
    src.mount("");
    let files = |set: &str, n: u32| {
        sh(&format!(
            "cd {m} && mkdir -p {set} && for i in $(seq 1 {n}); do \
             head -c $((i * 421 * 1024)) /dev/urandom > {set}/f$i; done && sync \
             && sha256sum {set}/* > {w}/sums-{set}",
            m = src.mnt.display(),
            w = w.display()
        ))
    };
    files("a", 8);
    let early = point_create(&site);
    files("b", 8);
    site.wait_caught_up();
    // The source dies: tracker and shipper killed, the filesystem never unmounted cleanly.
    kill(site.tracker.pid(), Signal::SIGKILL).unwrap();
    site.shipper.as_mut().unwrap().kill9();
    drop(src);
    let out = redun_ok(
        &["failover", EXPORT, "--unplanned"],
        &[("--target-socket", target_sock.clone())],
    );
    assert!(out.contains("unplanned"), "{out}");
    let uri = format!(
        "nbd+unix:///{EXPORT}?socket={}",
        site.nbd_socket().display()
    );
    let check = |stack: &Stack, set: &str| {
        sh(&format!(
            "cd {} && sha256sum -c --quiet {}/sums-{set}",
            stack.mnt.display(),
            w.display()
        ))
        .status
        .success()
    };
    {
        // The journal replays onto the promoted volume; everything synced before the crash
        // and shipped is there.
        let promoted = Stack::attach(&uri, &w.join("promoted"), false);
        promoted.mount("");
        assert!(check(&promoted, "a") && check(&promoted, "b"));
        sh(&format!(
            "cd {} && echo new > new && sync",
            promoted.mnt.display()
        ));
        let _ = Command::new("umount").arg(&promoted.mnt).status();
        run(Command::new("e2fsck").args(["-fn", promoted.dev()]));
    }
    // Before the commit another point may be chosen: the earlier one, without set b.
    redun_ok(
        &[
            "failover",
            EXPORT,
            "--unplanned",
            "--point",
            &early.to_string(),
        ],
        &[("--target-socket", target_sock.clone())],
    );
    {
        let promoted = Stack::attach(&uri, &w.join("promoted2"), false);
        promoted.mount("");
        assert!(check(&promoted, "a"));
        assert!(!promoted.mnt.join("b").exists());
        assert!(!promoted.mnt.join("new").exists());
    }
    redun_ok(
        &["failover", "commit", EXPORT],
        &[("--target-socket", target_sock)],
    );
}

/// The newest PostgreSQL server binaries installed (Debian keeps them per version).
fn pg_bin() -> PathBuf {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: run scripts/install-test-deps.sh")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").exists())
        .collect();
    v.sort();
    v.pop()
        .expect("no PostgreSQL server in /usr/lib/postgresql")
}

/// Runs a PostgreSQL tool as the postgres user.
fn as_postgres(tool: &Path, args: &[&str]) -> Output {
    run(Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(tool)
        .args(args))
}

/// Every process whose parent is `pid`.
fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|x| x.parse::<i32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

#[test]
fn postgresql_survives_an_unplanned_failover_after_kill_9_of_the_whole_source() {
    if !privileged() {
        return;
    }
    require("nbdfuse");
    require("mkfs.ext4");
    require("runuser");
    let pg = pg_bin();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // The postgres user must reach the mount points and the socket directory.
    sh(&format!(
        "chmod 755 {w} && mkdir -m 1777 {w}/sock {w}/logs",
        w = w.display()
    ));
    let sock = w.join("sock");
    let port = (20_000 + std::process::id() % 20_000).to_string();
    let mut site = Site::build_with(768 << 20, |d| d.join("data"), &["--crash-interval", "1s"]);
    let src = Stack::attach(&site.tracker.uri(), &w.join("src"), false);
    run(Command::new("mkfs.ext4").args(["-F", "-q", src.dev()]));
    src.mount("");
    let pgdata = src.mnt.join("pg");
    sh(&format!(
        "mkdir {d} && chown postgres: {d} && chmod 700 {d}",
        d = pgdata.display()
    ));
    let opts = format!("-k {} -p {port} -c listen_addresses=''", sock.display());
    as_postgres(
        &pg.join("initdb"),
        &["-D", &s(&pgdata), "-A", "trust", "-U", "postgres"],
    );
    let start = |data: &Path, log: &str| {
        let log = w.join("logs").join(log);
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg.join("pg_ctl"))
            .args(["-D", &s(data), "-o", &opts, "-l", &s(&log), "-w", "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "PostgreSQL did not start on {}:\n{}",
            data.display(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };
    start(&pgdata, "pg-source.log");
    let conn = ["-h", &s(&sock), "-p", &port];
    let mut init = vec!["-i", "-s", "4", "-q"];
    init.extend_from_slice(&conn);
    init.push("postgres");
    as_postgres(&pg.join("pgbench"), &init);
    let mut bench: Vec<&str> = vec!["-c", "4", "-T", "120", "-n"];
    bench.extend_from_slice(&conn);
    bench.push("postgres");
    let mut load = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pg.join("pgbench"))
        .args(&bench)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(6));
    // The whole source side dies at once: PostgreSQL, the tracker, the shipper.
    let postmaster: i32 = std::fs::read_to_string(pgdata.join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut victims = children(postmaster);
    victims.push(postmaster);
    for &p in &victims {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    kill(site.tracker.pid(), Signal::SIGKILL).unwrap();
    site.shipper.as_mut().unwrap().kill9();
    let _ = load.kill();
    let _ = load.wait();
    // On another host the old postmaster's PID would mean nothing; here PostgreSQL would see
    // it alive until it is reaped (and the source filesystem stays busy).
    let deadline = Instant::now() + Duration::from_secs(30);
    while victims
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        assert!(
            Instant::now() < deadline,
            "killed PostgreSQL processes linger"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(src);
    // The target promotes everything it holds.
    redun_ok(
        &["failover", EXPORT, "--unplanned", "--point", "latest"],
        &[("--target-socket", site.dir().join("target.sock"))],
    );
    let uri = format!(
        "nbd+unix:///{EXPORT}?socket={}",
        site.nbd_socket().display()
    );
    let promoted = Stack::attach(&uri, &w.join("promoted"), false);
    promoted.mount("");
    let data = promoted.mnt.join("pg");
    // A stale pid file from the dead postmaster stays; PostgreSQL sees no such process.
    start(&data, "pg-promoted.log");
    let stop = || {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg.join("pg_ctl"))
            .args(["-D", &s(&data), "-m", "immediate", "stop"])
            .output();
    };
    let checked = std::panic::catch_unwind(|| {
        let mut amcheck = vec!["--install-missing", "-d", "postgres"];
        amcheck.extend_from_slice(&conn);
        as_postgres(&pg.join("pg_amcheck"), &amcheck);
        let mut q = vec![
            "-At",
            "-c",
            "select (select sum(abalance) from pgbench_accounts), \
             (select sum(bbalance) from pgbench_branches), \
             (select sum(tbalance) from pgbench_tellers), \
             (select coalesce(sum(delta), 0) from pgbench_history), \
             (select count(*) from pgbench_history)",
        ];
        q.extend_from_slice(&conn);
        q.push("postgres");
        let out = as_postgres(&pg.join("psql"), &q);
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let v: Vec<i64> = text.split('|').map(|x| x.parse().unwrap()).collect();
        assert!(
            v[4] > 0,
            "pgbench committed nothing before the kill: {text}"
        );
        assert!(
            v[0] == v[1] && v[1] == v[2] && v[2] == v[3],
            "balances disagree after recovery: {text}"
        );
    });
    stop();
    drop(promoted);
    if let Err(e) = checked {
        std::panic::resume_unwind(e);
    }
}

/// The address a daemon logged for its metrics listener.
fn metrics_addr(log: &str) -> String {
    log.split("metrics on http://")
        .nth(1)
        .and_then(|r| r.split("/metrics").next())
        .unwrap_or_else(|| panic!("no metrics listener in the log:\n{log}"))
        .to_string()
}

/// `GET /metrics` from `addr`.
fn scrape(addr: &str) -> String {
    use std::io::Read;
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

/// Lints a scrape's body with `promtool check metrics`.
fn promtool_check(scrape: &str) {
    let body = scrape.split_once("\r\n\r\n").map_or(scrape, |(_, b)| b);
    let mut c = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the series `name{labels}` (labels as printed) in a scrape.
fn series(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name_and_labels} in:\n{text}"))
}

#[test]
fn metrics_and_the_rpo_warning_tell_what_replication_does() {
    require("fio");
    require("promtool");
    let mut site = Site::build_with(
        VOL,
        |d| d.join("data"),
        &["--metrics-listen", "127.0.0.1:0"],
    );
    site.target_args = vec!["--metrics-listen".into(), "127.0.0.1:0".into()];
    site.target.as_mut().unwrap().stop();
    site.start_target();
    site.shipper.as_mut().unwrap().stop();
    let pki = site.dir().join("pki");
    site.start_shipper_with(
        &pki,
        "shipper",
        &[
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--rpo-warning".into(),
            "1s".into(),
        ],
    );
    site.fio("randwrite", "4k", "2m", 7);
    site.wait_caught_up();
    let tracker = scrape(&metrics_addr(&site.tracker.log_text()));
    assert!(series(&tracker, "redun_nbd_writes_total{volume=\"disk\"}") >= 512.0);
    assert!(series(&tracker, "redun_bytes_written_total{volume=\"disk\"}") >= 2097152.0);
    assert_eq!(
        series(
            &tracker,
            "redun_volume_state{volume=\"disk\",state=\"protected\"}"
        ),
        1.0
    );
    assert!(series(&tracker, "redun_journal_capacity_bytes{volume=\"disk\"}") > 0.0);
    assert!(
        series(
            &tracker,
            "redun_nbd_request_duration_seconds_count{volume=\"disk\",request=\"write\"}"
        ) >= 512.0
    );
    let shipper_log = || site.shipper.as_ref().unwrap().log_text();
    let shipper_addr = metrics_addr(&shipper_log());
    let shipper = scrape(&shipper_addr);
    assert_eq!(series(&shipper, "redun_lag_bytes{volume=\"disk\"}"), 0.0);
    assert!(series(&shipper, "redun_bytes_shipped_total{volume=\"disk\"}") >= 2097152.0);
    assert_eq!(series(&shipper, "redun_rpo_warning{volume=\"disk\"}"), 0.0);
    // No synchronisation runs (the new volume held no data).
    assert_eq!(series(&shipper, "redun_sync_running{volume=\"disk\"}"), 0.0);
    assert_eq!(
        series(&shipper, "redun_sync_bytes_sent_total{volume=\"disk\"}"),
        0.0
    );
    let target = scrape(&metrics_addr(&site.target.as_ref().unwrap().log_text()));
    for s in [&tracker, &shipper, &target] {
        promtool_check(s);
    }
    assert_eq!(
        series(&target, "redun_replica_applied_seq{volume=\"disk\"}"),
        site.tracker.head_seq() as f64
    );
    // The target goes away while writes go on: past 1 s of RPO the shipper warns, in status,
    // in the metrics and in its log; once the target is back, the warning goes.
    site.target.as_mut().unwrap().stop();
    site.fio("randwrite", "4k", "256k", 8);
    let deadline = Instant::now() + Duration::from_secs(30);
    while site.shipper_status("shipper").unwrap()["rpo_warning"] != true {
        assert!(Instant::now() < deadline, "no RPO warning");
        std::thread::sleep(Duration::from_millis(100));
    }
    let stalled = scrape(&shipper_addr);
    assert_eq!(series(&stalled, "redun_rpo_warning{volume=\"disk\"}"), 1.0);
    assert!(series(&stalled, "redun_lag_bytes{volume=\"disk\"}") > 0.0);
    assert!(series(&stalled, "redun_rpo_seconds{volume=\"disk\"}") > 1.0);
    promtool_check(&stalled);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !shipper_log().contains("exceeds shipper.rpo_warning") {
        assert!(Instant::now() < deadline, "no RPO warning in the log");
        std::thread::sleep(Duration::from_millis(100));
    }
    site.start_target();
    site.wait_caught_up();
    assert_eq!(
        site.shipper_status("shipper").unwrap()["rpo_warning"],
        false
    );
    let healed = scrape(&shipper_addr);
    assert_eq!(series(&healed, "redun_lag_bytes{volume=\"disk\"}"), 0.0);
    assert_eq!(series(&healed, "redun_rpo_warning{volume=\"disk\"}"), 0.0);
}

/// fio writing through NBD to `uri` in the background, with `opts` besides the usual ones.
fn fio_spawn(uri: &str, opts: &[&str]) -> Child {
    Command::new("fio")
        .args(["--name=w", "--ioengine=nbd", &format!("--uri={uri}")])
        .args(opts)
        .args(["--refill_buffers", "--thread"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn sync_status(site: &Site) -> Option<serde_json::Value> {
    site.shipper_status("shipper")
        .map(|s| s["sync"].clone())
        .filter(|s| !s.is_null())
}

/// Waits until the tracker says the volume is `protected` and the shipper runs no job.
fn wait_protected(site: &Site, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let st = site.tracker.status_json();
        let v = &st["tracker"]["status"]["volumes"][0];
        if v["state"] == "protected" && sync_status(site).is_none() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the volume did not become protected: {v}\nshipper:\n{}",
            site.shipper
                .as_ref()
                .map(Daemon::log_text)
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn initial_replication_of_a_volume_in_use_resumes_after_kill_9_and_ends_identical() {
    require("fio");
    const BIG: u64 = 4 << 30;
    let mut site = Site::build_on(
        BIG,
        |d| d.join("data"),
        &[],
        |img| {
            sh(&format!(
                "head -c 4G /dev/urandom | dd of={} bs=4M conv=notrunc iflag=fullblock status=none",
                img.display()
            ));
        },
    );
    // The application writes while the initial replication runs.
    let mut fio = fio_spawn(
        &site.tracker.uri(),
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            &format!("--size={BIG}"),
            "--io_size=64m",
            "--rate=8m",
            "--randseed=5",
        ],
    );
    // Until it is done, the replica is inconsistent and says so.
    let deadline = Instant::now() + Duration::from_secs(300);
    let before = loop {
        if let Some(s) = sync_status(&site) {
            if s["percent"].as_f64().unwrap() >= 50.0 {
                break s;
            }
            assert_eq!(s["kind"], "initial-replication", "{s}");
            // "Enable protection" checked what it needs before the copy began.
            let checks = s["prerequisites"].to_string();
            assert!(
                checks.contains("reachable and authenticated") && checks.contains("readable"),
                "{s}"
            );
        }
        // Once the target acknowledged the job's begin (seq 1, the volume's first record), its
        // state says the replica is being synchronised.
        let acked = site
            .shipper_status("shipper")
            .and_then(|s| s["acked_seq"].as_u64())
            .unwrap_or(0);
        if let Some(s) = sync_status(&site).filter(|_| acked >= 1) {
            let t = request_json(
                &site.dir().join("target.sock"),
                &serde_json::json!({"cmd": "status"}),
            )
            .unwrap();
            let since = &t["status"]["volumes"][0]["sync"]["since_seq"];
            assert!(
                since.is_u64(),
                "the target does not say it is syncing: {t} {s}"
            );
            let m = site.merged();
            assert!(
                m["state"] == "initial-replication" || m["sync"].is_null(),
                "{m}"
            );
        }
        assert!(
            Instant::now() < deadline,
            "the initial replication did not get to 50%"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let jobs = run(Command::new(bin("redun"))
        .args(["jobs", "--json", "--shipper-socket"])
        .arg(site.dir().join("shipper-shipper.sock")));
    let jobs: serde_json::Value = serde_json::from_slice(&jobs.stdout).unwrap();
    assert_eq!(jobs["disk"]["kind"], "initial-replication", "{jobs}");
    site.shipper.as_mut().unwrap().kill9();
    let total = before["total_bytes"].as_u64().unwrap();
    let done_before = before["compared_bytes"].as_u64().unwrap();
    assert!(total >= BIG - (4 << 20), "{before}");
    site.start_shipper(&site.dir().join("pki"), "shipper");
    // The new shipper takes the job over where the replica's cursor says.
    let deadline = Instant::now() + Duration::from_secs(60);
    let resumed = loop {
        if let Some(s) = sync_status(&site) {
            break s;
        }
        assert!(Instant::now() < deadline, "the job was not taken over");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(resumed["job"], before["job"], "{resumed} {before}");
    let skipped = resumed["resumed_bytes"].as_u64().unwrap();
    // Behind what was compared by at most the blocks compared ahead of the stream and those
    // not committed yet on the target.
    assert!(
        skipped + (256 << 20) >= done_before,
        "started over: {resumed} after {before}"
    );
    wait_protected(&site, Duration::from_secs(300));
    assert!(fio.wait().unwrap().success());
    let log = site.shipper.as_ref().unwrap().log_text();
    let line = log
        .lines()
        .find(|l| l.contains("synchronisation") && l.contains(" done: "))
        .unwrap_or_else(|| panic!("no end of the job in the log:\n{log}"));
    let sent: u64 = line
        .split(" compared, ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    // The second shipper sent the second half, not everything again.
    assert!(
        sent <= total - skipped + (8 << 20),
        "{sent} bytes sent after resuming at {skipped} of {total}"
    );
    let t = request_json(
        &site.dir().join("target.sock"),
        &serde_json::json!({"cmd": "status"}),
    )
    .unwrap();
    assert!(t["status"]["volumes"][0]["sync"].is_null(), "{t}");
    assert_eq!(site.merged()["state"], "protected");
    site.wait_caught_up();
    site.assert_identical();
    site.assert_release_not_early();
}

/// The figures of the shipper's last finished job: (bytes compared, bytes sent).
fn last_job(site: &Site) -> (u64, u64) {
    last_job_opt(site).unwrap_or_else(|| {
        panic!(
            "no finished job in the log:\n{}",
            site.shipper.as_ref().unwrap().log_text()
        )
    })
}

fn last_job_opt(site: &Site) -> Option<(u64, u64)> {
    let log = site.shipper.as_ref().unwrap().log_text();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("synchronisation") && l.contains(" done: "))?;
    let num = |after: &str| -> u64 {
        line.split(after)
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}"))
    };
    Some((num(" done: "), num(" compared, ")))
}

#[test]
fn after_an_overflow_only_dirty_regions_are_compared_and_sent() {
    require("fio");
    const SIZE: u64 = 1 << 30;
    let mut site = Site::build_with(SIZE, |d| d.join("data"), &["--journal-size", "16M"]);
    // The replica holds something already.
    site.fio("write", "64k", "1m", 20);
    site.wait_caught_up();
    // The target goes away; the journal fills up and the volume falls back to dirty regions.
    site.target.as_mut().unwrap().stop();
    site.fio("randwrite", "64k", "96m", 21);
    let st = site.tracker.status_json();
    let v = &st["tracker"]["status"]["volumes"][0];
    assert_eq!(v["state"], "resync-required", "{v}");
    let dirty = v["dirty_bytes"].as_u64().unwrap();
    assert!(dirty > 32 << 20 && dirty < 96 << 20, "{v}");
    // Resyncs may only run outside business hours: the shipper starts again with a window
    // that excludes now.
    let hour: u32 = String::from_utf8(run(Command::new("date").arg("+%H")).stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let window = format!("{:02}:00-{:02}:00", (hour + 2) % 24, (hour + 3) % 24);
    site.shipper.as_mut().unwrap().stop();
    let pki = site.dir().join("pki");
    site.start_shipper_with(&pki, "shipper", &["--resync-window".into(), window.clone()]);
    // The target comes back: the journal drains, and the resync waits for its window.
    site.start_target();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = site.shipper_status("shipper").unwrap_or_default();
        if st["waiting_for_window"] == window.as_str() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resync did not wait: {st}\n{}",
            site.shipper.as_ref().unwrap().log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    let st = site.tracker.status_json();
    assert_eq!(
        st["tracker"]["status"]["volumes"][0]["state"],
        "resync-required"
    );
    assert!(sync_status(&site).is_none());
    // By hand it runs now; only the dirty regions are compared.
    run(Command::new(bin("redun"))
        .args(["resync", "disk", "--shipper-socket"])
        .arg(site.dir().join("shipper-shipper.sock")));
    wait_protected(&site, Duration::from_secs(120));
    let (compared, _) = last_job(&site);
    assert_eq!(
        compared, dirty,
        "compared {compared} for {dirty} dirty bytes"
    );
    let sent = site.shipper_status("shipper").unwrap()["sync_bytes_sent"]
        .as_u64()
        .unwrap();
    // Every dirty region was rewritten with new random data: about all of it travels, and
    // hardly more.
    assert!(
        sent * 100 <= dirty * 105 && sent * 100 >= dirty * 95,
        "sent {sent} for {dirty} changed bytes\n{}",
        site.shipper.as_ref().unwrap().log_text()
    );
    site.wait_caught_up();
    site.assert_identical();
    // A full resync by hand compares every block and, the replica being identical, sends
    // nothing.
    let sent_before = site.shipper_status("shipper").unwrap()["sync_bytes_sent"]
        .as_u64()
        .unwrap();
    run(Command::new(bin("redun"))
        .args(["resync", "disk", "--full", "--shipper-socket"])
        .arg(site.dir().join("shipper-shipper.sock")));
    let deadline = Instant::now() + Duration::from_secs(120);
    while last_job(&site).0 != SIZE {
        assert!(Instant::now() < deadline, "the full resync did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_protected(&site, Duration::from_secs(120));
    let sent_after = site.shipper_status("shipper").unwrap()["sync_bytes_sent"]
        .as_u64()
        .unwrap();
    assert_eq!(
        sent_after, sent_before,
        "a full resync of an identical replica sent data"
    );
    // Points after the resync are usable again.
    let id = point_create(&site);
    assert!(
        points_json(&site)
            .iter()
            .any(|p| p["id"] == id && p["usable"] == true),
        "{:?}",
        points_json(&site)
    );
}

#[test]
fn after_kill_9_of_the_tracker_under_writes_the_journal_is_replayed_and_no_resync_follows() {
    require("fio");
    let mut site = Site::new();
    site.wait_caught_up();
    let jobs = |site: &Site| {
        let log = site.shipper.as_ref().unwrap().log_text();
        log.lines()
            .filter(|l| l.contains("synchronisation") && l.contains(" done: "))
            .count()
    };
    let jobs_before = jobs(&site);
    let mut fio = fio_spawn(
        &site.tracker.uri(),
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=64m",
            "--time_based",
            "--runtime=30",
            "--randseed=22",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let child = site.tracker.child.take().unwrap();
    kill(
        Pid::from_raw(i32::try_from(child.id()).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    let mut child = child;
    child.wait().unwrap();
    let _ = fio.wait();
    // The restart applies what the backing file missed from the journal (the write-ahead
    // rule): nothing acknowledged is lost, nothing turns dirty, no resync.
    site.tracker.spawn("uring", &["--journal-size", "256M"]);
    let st = site.tracker.status_json();
    let v = &st["tracker"]["status"]["volumes"][0];
    assert_eq!(v["state"], "protected", "{v}");
    assert_eq!(v["dirty_bytes"], 0, "{v}");
    site.wait_caught_up();
    site.assert_identical();
    assert_eq!(
        jobs_before,
        jobs(&site),
        "a synchronisation ran after the kill"
    );
}

#[test]
fn a_seeded_replica_receives_only_the_blocks_that_differ() {
    const SIZE: u64 = 256 << 20;
    let mut changed = 0u64;
    let site = Site::build_on(
        SIZE,
        |d| {
            // The operator copied the volume to the target by other means, then the volume
            // changed in 1% of its 4 KiB blocks, scattered.
            let data = d.join("data");
            std::fs::create_dir_all(&data).unwrap();
            let seed = data.join(format!("{EXPORT}.seed"));
            std::fs::copy(d.join("disk.img"), &seed).unwrap();
            let f = std::fs::OpenOptions::new().write(true).open(&seed).unwrap();
            let blocks = SIZE / 4096;
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut picked = std::collections::BTreeSet::new();
            while picked.len() < usize::try_from(blocks / 100).unwrap() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                picked.insert(x % blocks);
            }
            for b in &picked {
                use std::os::unix::fs::FileExt;
                f.write_all_at(&[0x5a; 4096], b * 4096).unwrap();
            }
            changed = picked.len() as u64 * 4096;
            data
        },
        &[],
        |img| {
            sh(&format!(
                "head -c 256M /dev/urandom | dd of={} bs=4M conv=notrunc iflag=fullblock status=none",
                img.display()
            ));
        },
    );
    wait_protected(&site, Duration::from_secs(120));
    let (compared, _) = last_job(&site);
    assert_eq!(compared, SIZE);
    let sent = site.shipper_status("shipper").unwrap()["sync_bytes_sent"]
        .as_u64()
        .unwrap();
    assert!(
        sent >= changed && sent * 100 <= changed * 105,
        "sent {sent} for {changed} changed bytes"
    );
    assert!(
        site.target
            .as_ref()
            .unwrap()
            .log_text()
            .contains("seeded from"),
        "{}",
        site.target.as_ref().unwrap().log_text()
    );
    site.wait_caught_up();
    site.assert_identical();
}

#[test]
fn verify_names_a_corruption_planted_in_the_replica_while_writes_go_on() {
    require("fio");
    require("nbdcopy");
    let site = Site::new();
    let src = site.dir().join("random.bin");
    // The first 32 MiB hold data; the rest was never written (the replica's base has it).
    sh(&format!("head -c 32M /dev/urandom > {}", src.display()));
    run(Command::new("nbdcopy").arg(&src).arg(site.tracker.uri()));
    site.wait_caught_up();
    // Behind the target's back, 4 KiB of the replica's base image rot at 40 MiB.
    const ROT: u64 = 40 << 20;
    let base = site.data.join(format!("{EXPORT}.store/base.img"));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
        f.write_all_at(&[0xa5; 4096], ROT + 8192).unwrap();
    }
    // The application goes on writing (elsewhere) while the verify runs.
    let mut fio = fio_spawn(
        &site.tracker.uri(),
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=16m",
            "--time_based",
            "--runtime=8",
            "--rate=4m",
            "--randseed=31",
        ],
    );
    let verify = |want: i32| -> serde_json::Value {
        let out = Command::new(bin("redun"))
            .args(["verify", EXPORT, "--json", "--shipper-socket"])
            .arg(site.dir().join("shipper-shipper.sock"))
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(want),
            "{}{}\nshipper:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            site.shipper.as_ref().unwrap().log_text()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // Several verifies while the writes go on: each names the rotten range, and only it (the
    // blocks being written are not mistaken for differences).
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..3 {
        let found = verify(1);
        assert_eq!(
            found["differing"],
            serde_json::json!([[ROT, 65536]]),
            "{found}"
        );
        // Blocks being written are compared again: at least the whole volume.
        assert!(found["compared_bytes"].as_u64() >= Some(VOL), "{found}");
    }
    assert!(fio.wait().unwrap().success());
    // A full resync repairs it; the next verify finds nothing.
    run(Command::new(bin("redun"))
        .args(["resync", EXPORT, "--full", "--shipper-socket"])
        .arg(site.dir().join("shipper-shipper.sock")));
    let deadline = Instant::now() + Duration::from_secs(60);
    while last_job_opt(&site).is_none_or(|(c, _)| c != VOL) {
        assert!(Instant::now() < deadline, "the full resync did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_protected(&site, Duration::from_secs(60));
    let clean = verify(0);
    assert_eq!(clean["differing"], serde_json::json!([]), "{clean}");
    site.wait_caught_up();
    site.assert_identical();
}

#[test]
fn verify_runs_on_its_schedule_with_the_configured_block_size() {
    let mut site = Site::new();
    site.fio("randwrite", "4k", "4m", 41);
    site.wait_caught_up();
    let cfg = site.dir().join("resync.toml");
    std::fs::write(
        &cfg,
        "[resync]\nverify_every = \"1s\"\nblock_size = \"16K\"\nwindow = \"00:00-23:59\"\n",
    )
    .unwrap();
    site.shipper.as_mut().unwrap().stop();
    let pki = site.dir().join("pki");
    site.start_shipper_with(&pki, "shipper", &["--config".into(), s(&cfg)]);
    // Nobody asks: the schedule does, twice.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = site.shipper_status("shipper").unwrap_or_default();
        let v = &st["verify"];
        if v["done"] == true && v["id"].as_u64() >= Some(2) {
            assert_eq!(v["differing"], serde_json::json!([]), "{v}");
            assert!(v["compared_bytes"].as_u64() >= Some(VOL), "{v}");
            assert_eq!(v["block_bytes"], 16384, "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "no scheduled verify: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = site.shipper.as_ref().unwrap().log_text();
    assert!(log.contains("source and replica agree"), "{log}");
}
