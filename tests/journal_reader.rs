//! The shipper's side of the journal, from another file handle while the tracker writes:
//! follow the chain, wait for records without polling, release them, and the tracker reuses
//! the space; the followed records reproduce the backing file.

#![allow(clippy::cast_possible_truncation)] // Small test volumes.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use redun_tracker::journal::format::Kind;
use redun_tracker::journal::mark::durable_path;
use redun_tracker::journal::reader::{JournalReader, read_release};

const MIB: u64 = 1 << 20;
const VOL: u64 = 32 * MIB;

#[test]
fn a_follower_ships_and_releases_while_the_tracker_writes() {
    require("fio");
    // Writes wait for the follower rather than overflow when it falls behind (a busy
    // machine): this test is about following and releasing, not about speed.
    let mut t = Tracker::start_with(
        "uring",
        VOL,
        &["--journal-size", "8M", "--journal-on-full", "block"],
    );
    let jpath = t.journal_path();

    let done = Arc::new(AtomicBool::new(false));
    let follower = {
        let done = done.clone();
        let jpath = jpath.clone();
        std::thread::spawn(move || {
            let mut r = JournalReader::open(&jpath).unwrap();
            let mut img = vec![0u8; VOL as usize];
            let mut waits = 0u64;
            let mut idle_since: Option<Instant> = None;
            loop {
                match r.next_record().unwrap() {
                    Some(rec) => {
                        idle_since = None;
                        let h = rec.header;
                        let o = h.offset as usize;
                        match h.kind {
                            Kind::Write => {
                                img[o..o + rec.payload.len()].copy_from_slice(&rec.payload)
                            }
                            Kind::Trim | Kind::Zero => img[o..o + h.length as usize].fill(0),
                            _ => {}
                        }
                        if h.seq % 16 == 0 {
                            r.release(h.seq).unwrap();
                        }
                    }
                    None => {
                        if done.load(Ordering::SeqCst) {
                            let since = *idle_since.get_or_insert_with(Instant::now);
                            if since.elapsed() > Duration::from_millis(500) {
                                return (img, waits, r.next_seq());
                            }
                        }
                        if r.wait(Duration::from_millis(100)).unwrap() {
                            waits += 1;
                        }
                    }
                }
            }
        })
    };

    // 64 MiB through an 8 MiB journal, at a pace the follower keeps up with.
    let out = spawn_fio(&t, "64m", &["--rate=40m"]).wait().unwrap();
    assert!(out.success());
    done.store(true, Ordering::SeqCst);
    let (img, waits, next) = follower.join().unwrap();
    assert!(waits > 0, "the follower never woke up on a write");
    let s = t.status_json();
    let v = &s["tracker"]["status"]["volumes"][0];
    assert_eq!(v["state"], "protected", "the journal overflowed: {v}");
    assert!(v["journal"]["released_seq"].as_u64().unwrap() > 500, "{v}");
    assert_eq!(v["journal"]["head_seq"].as_u64().unwrap() + 1, next, "{v}");
    // The follower got every record because the syncer marked them durable once idle.
    let mark = std::fs::File::open(durable_path(&jpath)).unwrap();
    assert_eq!(
        redun_tracker::journal::mark::read(&mark).unwrap(),
        v["journal"]["head_seq"].as_u64(),
        "the durable mark, once writes stopped"
    );
    assert!(
        std::fs::read(&t.image).unwrap() == img,
        "followed records differ from the volume"
    );

    // The release position survives a restart of the tracker.
    let released = read_release(&jpath).unwrap().unwrap();
    assert!(t.stop().success());
    t.spawn("uring", &["--journal-size", "8M"]);
    let s = t.status_json();
    let v = &s["tracker"]["status"]["volumes"][0];
    assert_eq!(
        v["journal"]["released_seq"].as_u64().unwrap(),
        released,
        "{v}"
    );
    // Releasing what is already released, or a position the reader cannot seek to, is refused.
    let mut r = JournalReader::open(&jpath).unwrap();
    assert!(r.seek(released).is_err());
    assert!(r.seek(released + 1).is_ok());
}

/// Follows the journal like a shipper that starts late: applies records to an image, releases
/// every 16 records and whenever it catches up, and stops once `done` is set and nothing new
/// came for half a second.
fn follow_and_release(
    jpath: std::path::PathBuf,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut r = JournalReader::open(&jpath).unwrap();
        let mut img = vec![0u8; VOL as usize];
        let mut last = 0;
        let mut released = 0;
        let mut idle_since: Option<Instant> = None;
        loop {
            if let Some(rec) = r.next_record().unwrap() {
                idle_since = None;
                let h = rec.header;
                let o = h.offset as usize;
                match h.kind {
                    Kind::Write => img[o..o + rec.payload.len()].copy_from_slice(&rec.payload),
                    Kind::Trim | Kind::Zero => img[o..o + h.length as usize].fill(0),
                    _ => {}
                }
                last = h.seq;
                if h.seq % 16 == 0 {
                    r.release(h.seq).unwrap();
                    released = h.seq;
                }
                continue;
            }
            if last > released {
                r.release(last).unwrap();
                released = last;
            }
            if done.load(Ordering::SeqCst) {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(500) {
                    return img;
                }
            }
            r.wait(Duration::from_millis(100)).unwrap();
        }
    })
}

fn volume_status(t: &Tracker) -> serde_json::Value {
    t.status_json()["tracker"]["status"]["volumes"][0].clone()
}

fn wait_for_waiting_writes(t: &Tracker, fio: &mut std::process::Child) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = volume_status(t);
        if v["journal"]["waiting_writes"].as_u64().unwrap() > 0 {
            return v;
        }
        assert!(
            fio.try_wait().unwrap().is_none(),
            "fio finished without ever waiting for the full journal: {v}"
        );
        assert!(Instant::now() < deadline, "no write ever waited: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// fio writing 64 KiB blocks at random in the first 32 MiB, `io_size` in all.
fn spawn_fio(t: &Tracker, io_size: &str, extra: &[&str]) -> std::process::Child {
    Command::new("fio")
        .args([
            "--name=w",
            // One process: a kill reaches the job, not only its parent.
            "--thread",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=4",
            "--size=32m",
        ])
        .arg(format!("--io_size={io_size}"))
        .arg(format!("--uri={}", t.uri()))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn on_full_block_holds_writes_until_the_shipper_releases() {
    require("fio");
    let args = ["--journal-size", "2M", "--journal-on-full", "block"];
    let mut t = Tracker::start_with("uring", VOL, &args);
    let jpath = t.journal_path();

    // 24 MiB through a 2 MiB journal that nobody releases yet: the writer must wait.
    let mut fio = spawn_fio(&t, "24m", &[]);
    let v = wait_for_waiting_writes(&t, &mut fio);
    assert_eq!(v["state"], "protected", "{v}");
    assert_eq!(v["journal"]["on_full"], "block", "{v}");
    let cap = v["journal"]["capacity"].as_u64().unwrap();
    assert!(
        v["journal"]["used_bytes"].as_u64().unwrap() > cap / 2,
        "{v}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        fio.try_wait().unwrap().is_none(),
        "fio went on past a full journal"
    );
    let written_while_full = volume_status(&t)["bytes_written"].as_u64().unwrap();
    assert!(
        written_while_full < 4 << 20,
        "{written_while_full} bytes written"
    );

    // The shipper arrives: every write goes through, none is dropped.
    let done = Arc::new(AtomicBool::new(false));
    let follower = follow_and_release(jpath.clone(), done.clone());
    let st = wait_timeout(&mut fio, Duration::from_secs(120)).expect("fio still blocked");
    assert!(st.success());
    done.store(true, Ordering::SeqCst);
    let img = follower.join().unwrap();
    let v = volume_status(&t);
    assert_eq!(v["state"], "protected", "{v}");
    assert_eq!(v["dirty_bytes"], 0, "{v}");
    assert_eq!(v["journal"]["waiting_writes"], 0, "{v}");
    assert_eq!(v["bytes_written"], 24 << 20, "{v}");
    assert!(
        std::fs::read(&t.image).unwrap() == img,
        "the shipped records differ from the volume"
    );
    assert!(
        t.log_text()
            .contains("writes wait until the shipper releases")
    );

    // Stopping while writes wait: they fail (ESHUTDOWN, never acknowledged) and the tracker
    // exits at once instead of waiting for a shipper; the journal closes cleanly.
    let mut fio = spawn_fio(&t, "8m", &[]);
    wait_for_waiting_writes(&t, &mut fio);
    let started = Instant::now();
    assert!(t.stop().success(), "{}", t.log_text());
    assert!(started.elapsed() < Duration::from_secs(10));
    let st = wait_timeout(&mut fio, Duration::from_secs(30)).expect("fio hangs");
    assert!(!st.success(), "fio did not see its waiting writes fail");
    t.spawn("uring", &args);
    let v = volume_status(&t);
    assert_eq!(v["state"], "protected", "{v}");
    assert_eq!(v["dirty_bytes"], 0, "{v}");
}
