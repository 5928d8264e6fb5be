//! Change tracking through the real tracker: every acknowledged write is in the journal,
//! `redun journal replay` reproduces the backing file, kill -9 loses nothing that was
//! acknowledged, and a full journal falls back to dirty regions without stalling the writer.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

fn journal_args(t: &Tracker, size: &str) -> Vec<String> {
    vec![
        "--journal-dir".into(),
        t.dir.path().join("journal").display().to_string(),
        "--journal-size".into(),
        size.into(),
    ]
}

/// A tracker with a journal of `size` on a new zero image of `vol` bytes.
fn tracked(backend: &str, vol: u64, size: &str) -> Tracker {
    let mut t = Tracker::start_with(backend, vol, &["--no-journal"]);
    let _ = t.stop();
    let args = journal_args(&t, size);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    t.spawn(backend, &args);
    t
}

fn journal_path(t: &Tracker) -> std::path::PathBuf {
    t.dir
        .path()
        .join("journal")
        .join(format!("{EXPORT}.journal"))
}

/// Replays the journal onto a zero image of the volume's size and returns it.
fn replay(t: &Tracker) -> Vec<u8> {
    let size = std::fs::metadata(&t.image).unwrap().len();
    let base = t.dir.path().join("zero.img");
    let out = t.dir.path().join("replayed.img");
    std::fs::File::create(&base).unwrap().set_len(size).unwrap();
    run(Command::new(bin("redun"))
        .args(["journal", "replay", "--base"])
        .arg(&base)
        .arg("--journal")
        .arg(journal_path(t))
        .arg("--out")
        .arg(&out));
    std::fs::read(&out).unwrap()
}

fn volume_status(t: &Tracker) -> serde_json::Value {
    t.status_json()["tracker"]["status"]["volumes"][0].clone()
}

#[test]
fn journal_holds_every_change_and_replays_to_the_backing_file() {
    for backend in BACKENDS {
        let mut t = tracked(backend, GIB_SPARSE, "256M");
        python("nbd_conformance.py", &[&t.uri()]);
        let v = volume_status(&t);
        assert_eq!(v["state"], "protected", "{v}");
        assert!(v["journal"]["head_seq"].as_u64().unwrap() > 50, "{v}");
        assert_eq!(v["dirty_bytes"], 0, "{v}");
        assert!(t.stop().success());
        let check = run(Command::new(bin("redun"))
            .args(["journal", "check"])
            .arg(journal_path(&t)));
        assert!(String::from_utf8_lossy(&check.stdout).contains("clean=true"));
        let replayed = replay(&t);
        let image = std::fs::read(&t.image).unwrap();
        assert!(
            replayed == image,
            "{backend}: replay differs from the backing file"
        );
        // A clean restart keeps the volume protected and goes on numbering.
        let args = journal_args(&t, "256M");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        t.spawn(backend, &args);
        let v = volume_status(&t);
        assert_eq!(v["state"], "protected", "{v}");
    }
}

const GIB_SPARSE: u64 = 1 << 30;

#[test]
fn kill_9_during_fio_loses_no_acknowledged_write() {
    require("fio");
    let mut trial = 0u64;
    for backend in BACKENDS {
        for i in 0..10u64 {
            trial += 1;
            let mut t = tracked(backend, 64 * MIB, "512M");
            let mut fio = Command::new("fio")
                .args([
                    "--name=w",
                    "--ioengine=nbd",
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=16",
                    "--size=64m",
                    "--time_based",
                    "--runtime=10",
                    "--fsync=32",
                    // Well below what fills the journal before the kill.
                    "--rate_iops=20000",
                ])
                .arg(format!("--uri={}", t.uri()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // A different moment in every trial.
            std::thread::sleep(Duration::from_millis(300 + (trial * 7919) % 1500));
            let v = volume_status(&t);
            assert_eq!(v["state"], "protected", "{backend} trial {i}: {v}");
            let mut child = t.child.take().unwrap();
            child.kill().unwrap();
            child.wait().unwrap();
            let _ = fio.kill();
            let _ = fio.wait();
            // The process died, the page cache did not: the journal replays to the backing
            // file, except possibly the one write that was being applied at the kill (its
            // record goes first, so it is in the journal and maybe not yet in the file).
            let replayed = replay(&t);
            let image = std::fs::read(&t.image).unwrap();
            let differing: Vec<u64> = replayed
                .chunks(4096)
                .zip(image.chunks(4096))
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(n, _)| n as u64 * 4096)
                .collect();
            if !differing.is_empty() {
                let dump = run(Command::new(bin("redun"))
                    .args(["journal", "dump", "--json"])
                    .arg(journal_path(&t)));
                let d: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
                let last = d["records"].as_array().unwrap().last().unwrap()["offset"].clone();
                assert_eq!(
                    (differing.len(), differing[0]),
                    (1, last.as_u64().unwrap()),
                    "{backend} trial {i}: journal replay differs from the backing file \
                     beyond the last record"
                );
            }
            // The restart sees the unclean stop and asks for a resync.
            let args = journal_args(&t, "512M");
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            t.spawn(backend, &args);
            let v = volume_status(&t);
            assert_eq!(v["state"], "resync-required", "{v}");
            assert!(t.log_text().contains("unclean stop"));
        }
    }
}

#[test]
fn flushed_writes_survive_kill_9_in_the_journal() {
    for backend in BACKENDS {
        let mut t = tracked(backend, 64 * MIB, "64M");
        let out = python("flushed_then_kill.py", &[&t.uri(), &t.pid().to_string()]);
        let mut child = t.child.take().unwrap();
        let _ = child.wait();
        let flushed: Vec<u64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("flushed "))
            .map(|n| n.trim().parse().unwrap())
            .collect();
        assert!(flushed.len() >= 50, "{backend}: {flushed:?}");
        let replayed = replay(&t);
        for i in flushed {
            let off = usize::try_from(i * 4096).unwrap();
            let want = u8::try_from(i % 250 + 1).unwrap();
            assert!(
                replayed[off..off + 4096].iter().all(|&b| b == want),
                "{backend}: flushed write {i} is not in the journal"
            );
        }
    }
}

#[test]
fn full_journal_falls_back_to_dirty_regions_without_stalling() {
    require("nbdcopy");
    for backend in BACKENDS {
        let t = tracked(backend, 64 * MIB, "1056K");
        let src = t.dir.path().join("src.raw");
        sh(&format!("head -c 32M /dev/urandom > {}", src.display()));
        let started = std::time::Instant::now();
        run(Command::new("nbdcopy")
            .args(["--connections=2", "--requests=16"])
            .arg(&src)
            .arg(t.uri()));
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(60),
            "{backend}: writer stalled ({took:?})"
        );
        run(Command::new("cmp")
            .args(["-n", "32M"])
            .arg(&src)
            .arg(&t.image));
        let v = volume_status(&t);
        assert_eq!(v["state"], "resync-required", "{v}");
        assert!(v["dirty_bytes"].as_u64().unwrap() >= 30 * MIB, "{v}");
        assert!(t.log_text().contains("is full"), "{}", t.log_text());
        // Every byte the journal does not reproduce lies in a dirty range.
        let ranges: Vec<(u64, u64)> = v["dirty_ranges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
            .collect();
        let replayed = replay(&t);
        let image = std::fs::read(&t.image).unwrap();
        for (block, (a, b)) in replayed.chunks(4096).zip(image.chunks(4096)).enumerate() {
            if a != b {
                let off = block as u64 * 4096;
                assert!(
                    ranges.iter().any(|&(o, l)| o <= off && off < o + l),
                    "{backend}: byte {off} differs from the journal and is not dirty"
                );
            }
        }
    }
}
