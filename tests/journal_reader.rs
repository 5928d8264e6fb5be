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
use redun_tracker::journal::reader::{JournalReader, read_release};

const MIB: u64 = 1 << 20;
const VOL: u64 = 32 * MIB;

#[test]
fn a_follower_ships_and_releases_while_the_tracker_writes() {
    require("fio");
    let mut t = Tracker::start_with("uring", VOL, &["--no-journal"]);
    let _ = t.stop();
    let jdir = t.dir.path().join("journal");
    t.spawn(
        "uring",
        &[
            "--journal-dir",
            jdir.to_str().unwrap(),
            "--journal-size",
            "8M",
        ],
    );
    let jpath = jdir.join(format!("{EXPORT}.journal"));

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
                        if h.seq % 64 == 0 {
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
    let out = Command::new("fio")
        .args([
            "--name=w",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=4",
            "--size=32m",
            "--io_size=64m",
            "--rate=40m",
        ])
        .arg(format!("--uri={}", t.uri()))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(out.success());
    done.store(true, Ordering::SeqCst);
    let (img, waits, next) = follower.join().unwrap();
    assert!(waits > 0, "the follower never woke up on a write");
    let s = t.status_json();
    let v = &s["tracker"]["status"]["volumes"][0];
    assert_eq!(v["state"], "protected", "the journal overflowed: {v}");
    assert!(v["journal"]["released_seq"].as_u64().unwrap() > 500, "{v}");
    assert_eq!(v["journal"]["head_seq"].as_u64().unwrap() + 1, next, "{v}");
    assert!(
        std::fs::read(&t.image).unwrap() == img,
        "followed records differ from the volume"
    );

    // The release position survives a restart of the tracker.
    let released = read_release(&jpath).unwrap().unwrap();
    assert!(t.stop().success());
    t.spawn(
        "uring",
        &[
            "--journal-dir",
            jdir.to_str().unwrap(),
            "--journal-size",
            "8M",
        ],
    );
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
