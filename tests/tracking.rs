//! Change tracking through the real tracker: every acknowledged write is in the journal,
//! `redun journal replay` reproduces the backing file, kill -9 loses nothing that was
//! acknowledged (flushed or not: start-up replays the journal and the volume stays
//! protected), a full journal falls back to dirty regions without stalling the writer, and a
//! damaged record in the middle of the journal turns the ranges it loses dirty.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use redun_tracker::track::map::DirtyView;

const MIB: u64 = 1 << 20;

/// A tracker with a journal of `size` on a new zero image of `vol` bytes.
fn tracked(backend: &str, vol: u64, size: &str) -> Tracker {
    Tracker::start_with(backend, vol, &["--journal-size", size])
}

fn replay(t: &Tracker) -> Vec<u8> {
    let size = std::fs::metadata(&t.image).unwrap().len();
    let base = t.dir.path().join("zero.img");
    let out = t.dir.path().join("replayed.img");
    std::fs::File::create(&base).unwrap().set_len(size).unwrap();
    run(Command::new(bin("redun"))
        .args(["journal", "replay", "--base"])
        .arg(&base)
        .arg("--journal")
        .arg(t.journal_path())
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
            .arg(t.journal_path()));
        assert!(String::from_utf8_lossy(&check.stdout).contains("clean=true"));
        let replayed = replay(&t);
        let image = std::fs::read(&t.image).unwrap();
        assert!(
            replayed == image,
            "{backend}: replay differs from the backing file"
        );
        // A clean restart keeps the volume protected and goes on numbering.
        t.spawn(backend, &["--journal-size", "256M"]);
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
                    // One process: a kill reaches the job, not only its parent.
                    "--thread",
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
            // Once fio writes (it takes a moment to start), a different moment in every trial.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while volume_status(&t)["writes"].as_u64().unwrap() == 0 {
                assert!(std::time::Instant::now() < deadline, "fio never wrote");
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(100 + (trial * 7919) % 1500));
            let v = volume_status(&t);
            assert_eq!(v["state"], "protected", "{backend} trial {i}: {v}");
            let mut child = t.child.take().unwrap();
            child.kill().unwrap();
            child.wait().unwrap();
            let _ = fio.kill();
            let _ = fio.wait();
            // The process died, the page cache did not: every acknowledged change is in the
            // journal file, some not yet on the backing file. The restart replays them from
            // the checkpoint: the volume stays protected and the backing file is exactly the
            // journal replayed (invariant J, with nothing dirty).
            t.spawn(backend, &["--journal-size", "512M"]);
            let v = volume_status(&t);
            assert_eq!(v["state"], "protected", "{backend} trial {i}: {v}");
            assert_eq!(v["dirty_bytes"], 0, "{backend} trial {i}: {v}");
            assert!(t.stop().success());
            let replayed = replay(&t);
            let image = std::fs::read(&t.image).unwrap();
            let differing = replayed
                .chunks(4096)
                .zip(image.chunks(4096))
                .position(|(a, b)| a != b);
            assert_eq!(
                differing, None,
                "{backend} trial {i}: the backing file differs from the journal replayed (block)"
            );
        }
    }
}

/// Runs `script` (tests/scripts), which writes block N with `N % 250 + 1`, prints "`what` N"
/// for each block it counts, and kills the tracker with SIGKILL; returns those blocks once the
/// tracker is dead.
fn written_then_killed(t: &mut Tracker, script: &str, what: &str) -> Vec<u64> {
    let out = python(script, &[&t.uri(), &t.pid().to_string()]);
    let _ = t.child.take().unwrap().wait();
    let prefix = format!("{what} ");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|n| n.trim().parse().unwrap())
        .collect()
}

/// Asserts that `image` holds each of `blocks` as the kill scripts wrote it.
fn assert_blocks(image: &[u8], blocks: &[u64], what: &str) {
    for &i in blocks {
        let off = usize::try_from(i * 4096).unwrap();
        let want = u8::try_from(i % 250 + 1).unwrap();
        assert!(
            image[off..off + 4096].iter().all(|&b| b == want),
            "{what} {i}"
        );
    }
}

#[test]
fn acknowledged_writes_survive_kill_9_flushed_or_not() {
    for backend in BACKENDS {
        // A volume bigger than the writes that are pending at once, written all over.
        let mut t = tracked(backend, 256 * MIB, "512M");
        let acked = written_then_killed(&mut t, "acked_then_kill.py", "acked");
        assert!(
            acked.len() >= 2000,
            "{backend}: {} acknowledged",
            acked.len()
        );
        // The restart replays what the backing file missed; the volume stays protected.
        t.spawn(backend, &["--journal-size", "512M"]);
        let v = volume_status(&t);
        assert_eq!(v["state"], "protected", "{backend}: {v}");
        let image = std::fs::read(&t.image).unwrap();
        let what = format!("{backend}: lost after kill -9 and restart: acknowledged write");
        assert_blocks(&image, &acked, &what);
    }
}

#[test]
fn flushed_writes_survive_kill_9_in_the_journal() {
    for backend in BACKENDS {
        let mut t = tracked(backend, 64 * MIB, "64M");
        let flushed = written_then_killed(&mut t, "flushed_then_kill.py", "flushed");
        assert!(flushed.len() >= 50, "{backend}: {flushed:?}");
        let replayed = replay(&t);
        let what = format!("{backend}: not in the journal: flushed write");
        assert_blocks(&replayed, &flushed, &what);
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
        // The shipper's view of the map file, read while the tracker runs, agrees.
        let view = DirtyView::read(&t.journal_dir().join(format!("{EXPORT}.map"))).unwrap();
        assert_eq!(view.ranges, ranges, "{backend}");
        assert_eq!(view.dirty_bytes, v["dirty_bytes"].as_u64().unwrap());
        assert_eq!(view.region, 64 << 10);
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

#[test]
fn a_damaged_record_mid_journal_is_reported_and_its_ranges_become_dirty() {
    let mut t = tracked("uring", 64 * MIB, "64M");
    // 20 writes of 64 KiB, one per MiB: record seq i changes [(i-1) MiB, +64 KiB).
    python("write_blocks.py", &[&t.uri(), "20", "65536", "1048576"]);
    assert!(t.stop().success());
    let jpath = t.journal_path();
    let dump = run(Command::new(bin("redun"))
        .args(["journal", "dump", "--json"])
        .arg(&jpath));
    let d: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
    let victim = d["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["seq"] == 10)
        .unwrap()
        .clone();
    assert_eq!(victim["offset"], 9 * MIB, "{victim}");
    let file_offset = victim["file_offset"].as_u64().unwrap();
    // One flipped byte in its payload.
    sh(&format!(
        "printf '\\x5a' | dd of={} bs=1 seek={} conv=notrunc status=none",
        jpath.display(),
        file_offset + 48 + 1000
    ));

    let check = Command::new(bin("redun"))
        .args(["journal", "check"])
        .arg(&jpath)
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(1));
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        text.contains(&format!("record seq 10 at file offset {file_offset}")),
        "{text}"
    );
    assert!(text.contains("11 records lost"), "{text}");

    // The shipper's reader stops before it, never returning it.
    let mut r = redun_tracker::journal::reader::JournalReader::open(&jpath).unwrap();
    let mut seqs = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        seqs.push(rec.header.seq);
    }
    assert_eq!(seqs, (1..10).collect::<Vec<u64>>());

    // The restarted tracker marks exactly what records 10..=20 changed dirty.
    let args = ["--journal-size", "64M"];
    t.spawn("uring", &args);
    let v = volume_status(&t);
    assert_eq!(v["state"], "resync-required", "{v}");
    let dirty: Vec<(u64, u64)> = serde_json::from_value(v["dirty_ranges"].clone()).unwrap();
    let want: Vec<(u64, u64)> = (9..20).map(|i| (i * MIB, 64 << 10)).collect();
    assert_eq!(dirty, want);
    assert!(t.log_text().contains("record seq 10 at file offset"));
    // Until a resync, changes go to dirty regions, not the journal; the cut journal closes
    // healthy (what lies beyond its head is a leftover).
    python("write_blocks.py", &[&t.uri(), "3", "4096", "4096"]);
    assert!(t.stop().success());
    let check = Command::new(bin("redun"))
        .args(["journal", "check"])
        .arg(&jpath)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // The dirty ranges survive the restart.
    t.spawn("uring", &args);
    let v = volume_status(&t);
    let dirty: Vec<(u64, u64)> = serde_json::from_value(v["dirty_ranges"].clone()).unwrap();
    assert_eq!(dirty.len(), 12, "{v}");
    assert_eq!(dirty[0], (0, 64 << 10), "{v}");
}

#[test]
fn full_threshold_and_region_size_are_honoured() {
    let t = Tracker::start_with(
        "uring",
        64 * MIB,
        &[
            "--journal-size",
            "4M",
            "--journal-full-percent",
            "50",
            "--region-size",
            "1M",
        ],
    );
    // 40 writes of 64 KiB, one per MiB: 2.5 MiB of records, more than half the journal.
    python("write_blocks.py", &[&t.uri(), "40", "65536", "1048576"]);
    let v = volume_status(&t);
    assert_eq!(v["state"], "resync-required", "{v}");
    let cap = v["journal"]["capacity"].as_u64().unwrap();
    let used = v["journal"]["used_bytes"].as_u64().unwrap();
    assert!(used <= cap / 2 && used > cap / 2 - (66 << 10), "{v}");
    let records = v["journal"]["head_seq"].as_u64().unwrap();
    // Every write past the threshold is a dirty 1 MiB region.
    let dirty: Vec<(u64, u64)> = serde_json::from_value(v["dirty_ranges"].clone()).unwrap();
    assert_eq!(dirty, vec![(records * MIB, (40 - records) * MIB)], "{v}");
    let view = DirtyView::read(&t.journal_dir().join(format!("{EXPORT}.map"))).unwrap();
    assert_eq!(view.region, MIB);
    assert!(t.log_text().contains("is full"));
    // Bad values are refused with the flag named.
    let out = Command::new(bin("redun-tracker"))
        .args(["--volume", "x=/dev/null", "--region-size", "3K"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--region-size"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A journal and region map written by the previous release (journal format version 1),
/// `tests/fixtures/v1-journals.tar.gz`: a 16 MiB volume written by that release's tracker
/// (64 KiB of 0x11 at 0, 128 KiB of 0x22 at 5 MiB, 4 KiB of 0x33 at 9 MiB + 4 KiB, flushed),
/// then stopped cleanly (`clean/`) or killed with kill -9 (`unclean/`, its three extents left
/// hot). This release opens both, applies nothing from them (that release applied every write
/// before acknowledging it), turns the hot extents dirty, and writes version 2 from then on.
#[test]
fn journals_of_the_previous_release_are_opened() {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-journals.tar.gz");
    for kind in ["clean", "unclean"] {
        let prepare = |image: &std::path::Path| {
            let dir = image.parent().unwrap();
            sh(&format!(
                "cd {d} && tar xzf {f} {kind} && cp {kind}/vol.img {img} && mkdir -p journal && \
                 cp {kind}/journal/vol.journal journal/{EXPORT}.journal && \
                 cp {kind}/journal/vol.map journal/{EXPORT}.map",
                d = dir.display(),
                f = fixture.display(),
                img = image.display()
            ));
        };
        let mut t = Tracker::start_on("uring", 16 * MIB, &["--journal-size", "1056K"], prepare);
        let v = volume_status(&t);
        assert_eq!(v["journal"]["head_seq"], 3, "{kind}: {v}");
        if kind == "clean" {
            assert_eq!(v["state"], "protected", "{kind}: {v}");
        } else {
            // The previous release's activity log: the three hot extents (4 MiB) are dirty.
            assert_eq!(v["state"], "resync-required", "{kind}: {v}");
            let dirty: Vec<(u64, u64)> = serde_json::from_value(v["dirty_ranges"].clone()).unwrap();
            assert_eq!(dirty, vec![(0, 12 * MIB)], "{kind}");
        }
        let img = std::fs::read(&t.image).unwrap();
        let u = |n: u64| usize::try_from(n).unwrap();
        let at = |o: u64, l: u64| &img[u(o)..u(o + l)];
        assert!(at(0, 64 << 10).iter().all(|&b| b == 0x11), "{kind}");
        assert!(at(5 * MIB, 128 << 10).iter().all(|&b| b == 0x22), "{kind}");
        assert!(
            at(9 * MIB + 4096, 4096).iter().all(|&b| b == 0x33),
            "{kind}"
        );
        // Writes go on, numbered after the old records; the superblock is version 2.
        run(Command::new("qemu-io").args([
            "-f",
            "raw",
            &t.uri(),
            "-c",
            "write -P 0x44 1M 4k",
            "-c",
            "flush",
        ]));
        assert!(t.stop().success());
        let check = run(Command::new(bin("redun"))
            .args(["journal", "check"])
            .arg(t.journal_path()));
        let out = String::from_utf8_lossy(&check.stdout);
        // The unclean volume waits for a resync: its write went to dirty regions.
        let next = if kind == "clean" { 5 } else { 4 };
        assert!(
            out.contains(&format!("next_seq={next}")) && out.contains("clean=true"),
            "{kind}: {out}"
        );
        let j = std::fs::read(t.journal_path()).unwrap();
        let version = |slot: usize| {
            u32::from_le_bytes(j[slot * 4096 + 8..slot * 4096 + 12].try_into().unwrap())
        };
        assert!(
            version(0) == 2 || version(1) == 2,
            "{kind}: no version 2 superblock"
        );
        assert!(
            std::fs::read(&t.image).unwrap()[usize::try_from(MIB).unwrap()] == 0x44,
            "{kind}"
        );
    }
}
