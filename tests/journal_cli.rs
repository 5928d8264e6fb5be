//! `redun journal dump | check | replay` on journal files written through the library.

#![allow(clippy::cast_possible_truncation)] // Small test images.

mod common;

use std::fs::OpenOptions;
use std::process::Command;

use common::*;
use redun_tracker::journal::format::Kind;
use redun_tracker::journal::{Journal, inspect::inspect};

const VOL: u64 = 1 << 20;

/// A new journal of `size` bytes at `path` for a 1 MiB volume.
fn create(path: &std::path::Path, size: u64) -> Journal<std::fs::File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    f.set_len(size).unwrap();
    Journal::create(f, [9; 16], VOL).unwrap()
}

/// A journal of writes, a trim and a zero over a 1 MiB volume, and the image they produce.
fn make(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join("v.journal");
    let mut j = create(&path, 4 << 20);
    let mut img = vec![0u8; VOL as usize];
    for i in 0..40u64 {
        let off = (i * 7919 * 13) % (VOL - 5000);
        let len = 100 + (i as usize * 37) % 4000;
        let data: Vec<u8> = (0..len).map(|k| (i as usize + k) as u8 | 1).collect();
        j.append(Kind::Write, off, len as u32, &data).unwrap();
        img[off as usize..off as usize + len].copy_from_slice(&data);
    }
    j.append(Kind::Trim, 4096, 8192, &[]).unwrap();
    img[4096..4096 + 8192].fill(0);
    j.append(Kind::Zero, 100_000, 3000, &[]).unwrap();
    img[100_000..103_000].fill(0);
    j.append(Kind::Marker, 0, 0, b"point-1").unwrap();
    j.close().unwrap();
    (path, img)
}

fn redun(args: &[&str]) -> std::process::Output {
    Command::new(bin("redun")).args(args).output().unwrap()
}

#[test]
fn dump_check_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let (path, img) = make(dir.path());
    let p = path.to_str().unwrap();
    let out = redun(&["journal", "dump", p]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("marker") && text.contains("trim") && text.contains("zero"),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains(" write ")).count(),
        40,
        "{text}"
    );
    let out = redun(&["journal", "check", p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let base = dir.path().join("base.img");
    std::fs::write(&base, vec![0u8; VOL as usize]).unwrap();
    let replayed = dir.path().join("out.img");
    let out = redun(&[
        "journal",
        "replay",
        "--base",
        base.to_str().unwrap(),
        "--journal",
        p,
        "--out",
        replayed.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(&replayed).unwrap() == img,
        "replay differs from the expected image"
    );
}

#[test]
fn check_names_the_offset_and_sequence_of_damage() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = make(dir.path());
    let before = inspect(&std::fs::File::open(&path).unwrap()).unwrap();
    let victim = &before.records[19];
    // Flip a byte inside record seq 20's payload.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let at = victim.file_offset + 48 + 10;
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[b[0] ^ 0x10], at).unwrap();
    let out = redun(&["journal", "check", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "record seq {} at file offset {}",
            victim.seq, victim.file_offset
        )),
        "{text}"
    );
    assert!(text.contains("checksum mismatch"), "{text}");
    assert!(
        text.contains(&format!("valid record seq {}", victim.seq + 1)),
        "{text}"
    );
    // The reader never returns the damaged record, nor anything after it.
    let out = redun(&["journal", "dump", "--json", path.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let seqs: Vec<u64> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..victim.seq).collect::<Vec<_>>());
    // Unreadable input gets a clear error.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![1u8; 100_000]).unwrap();
    let out = redun(&["journal", "check", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no valid superblock") && err.contains("junk"),
        "{err}"
    );
}

/// `redun journal dump ... | head -1`: the CLI ends on SIGPIPE, as Unix tools do, instead of
/// panicking about a broken pipe.
#[test]
fn a_reader_that_goes_away_ends_the_dump_quietly() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.journal");
    let mut j = create(&path, 16 << 20);
    // Far more lines than a pipe holds.
    for i in 0..20_000u64 {
        j.append(Kind::Trim, (i * 512) % VOL, 512, &[]).unwrap();
    }
    j.close().unwrap();
    let mut child = Command::new(bin("redun"))
        .args(["journal", "dump", path.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(!first.is_empty());
    // The reader is gone: the next writes hit a broken pipe.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(13), // SIGPIPE
        "{:?}: {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
