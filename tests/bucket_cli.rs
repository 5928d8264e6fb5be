//! `redun key new`, `redun points --store` and `redun restore` on a bucket written through
//! the store library into a local directory (`file://`): every point restores to the bytes
//! that were written, and wrong keys, missing keys, unknown points and damaged objects are
//! refused with messages that say what to do.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use common::bin;
use redun_store::bucket::{Bucket, BucketOptions, VolumeWriter};
use redun_store::crypt::VolumeKey;
use redun_store::segment::Identity;
use redun_tracker::journal::format::{Kind, MarkerInfo, PointKind, SyncInfo, SyncRole};

const SIZE: u64 = 8 << 20;

fn redun(args: &[&str]) -> Output {
    Command::new(bin("redun")).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn marker(seq: u64) -> Vec<u8> {
    MarkerInfo {
        kind: PointKind::Crash,
        unix_ms: 1_700_000_000_000 + seq,
        group_point: 0,
    }
    .encode()
}

/// A temporary directory holding an empty `file://` bucket: the directory, the bucket's
/// directory and its URL.
fn bucket_dir() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("bucket");
    std::fs::create_dir(&store).unwrap();
    let url = format!("file://{}", store.display());
    (d, store, url)
}

/// The writer of volume `db` in the bucket at `url`, with the key file `key`.
fn writer(url: &str, key: &Path) -> VolumeWriter {
    let bucket = Arc::new(Bucket::open(url, &BucketOptions::default()).unwrap());
    let id = Identity {
        name: "db".into(),
        uuid: "00000000000000000000000000000042".into(),
        size: SIZE,
        generation: 1,
    };
    VolumeWriter::open(bucket, &id, Arc::new(VolumeKey::load(key).unwrap())).unwrap()
}

/// Writes three batches into the bucket at `url` with `key`: returns each point's id and
/// the volume's bytes at it.
fn replicate(url: &str, key: &Path) -> Vec<(u64, Vec<u8>)> {
    let mut w = writer(url, key);
    let mut image = vec![0u8; usize::try_from(SIZE).unwrap()];
    let mut points = Vec::new();
    for round in 0..3u64 {
        let first = w.next_seq();
        let mut seg = w.segment(first);
        let mut seq = first;
        for i in 0..50u64 {
            let off = ((round * 31 + i * 7) % 2000) * 4096;
            let data = vec![u8::try_from(seq % 251).unwrap() + 1; 12_288];
            let o = usize::try_from(off).unwrap();
            let end = (o + data.len()).min(image.len());
            seg.push(
                Kind::Write,
                seq,
                off,
                u32::try_from(end - o).unwrap(),
                &data[..end - o],
            );
            image[o..end].copy_from_slice(&data[..end - o]);
            seq += 1;
        }
        seg.push(Kind::Zero, seq, 4096 * 100, 65_536, &[]);
        image[4096 * 100..4096 * 100 + 65_536].fill(0);
        seg.push(Kind::Marker, seq + 1, 0, 0, &marker(seq + 1));
        points.push((seq + 1, image.clone()));
        w.append(vec![seg]).unwrap();
    }
    points
}

#[test]
fn points_restore_from_a_bucket_and_bad_input_is_refused() {
    let (d, store, url) = bucket_dir();
    let key = d.path().join("db.key");
    let keys = key.to_str().unwrap();
    let o = redun(&["key", "new", keys]);
    assert!(
        o.status.success() && text(&o).contains("keep a copy"),
        "{}",
        text(&o)
    );
    let o = redun(&["key", "new", keys]);
    assert!(
        !o.status.success() && text(&o).contains("never replaced"),
        "{}",
        text(&o)
    );
    let points = replicate(&url, &key);
    let none = d.path().join("none.toml");
    let common = [
        "--store",
        &url,
        "--key",
        keys,
        "--config",
        none.to_str().unwrap(),
    ];

    let o = redun(&[&["points", "db", "--json"][..], &common].concat());
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let listed: Vec<u64> = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        listed,
        points.iter().map(|p| p.0).collect::<Vec<_>>(),
        "{v}"
    );
    assert_eq!(v["manifest_version"], 4);
    let o = redun(&[&["points", "db"][..], &common].concat());
    assert!(
        text(&o).contains("manifest version 4") && text(&o).contains("crash"),
        "{}",
        text(&o)
    );

    for (id, image) in &points {
        let out = d.path().join(format!("p{id}.img"));
        let o = redun(
            &[
                &["restore", "db", "--quiet", "--point", &id.to_string()][..],
                &["--to", out.to_str().unwrap()],
                &common,
            ]
            .concat(),
        );
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains(&format!("at point {id}")), "{}", text(&o));
        assert!(std::fs::read(&out).unwrap() == *image, "point {id} differs");
    }
    let latest = d.path().join("latest.img");
    let o = redun(
        &[
            &["restore", "db", "--quiet", "--to", latest.to_str().unwrap()][..],
            &common,
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read(&latest).unwrap() == points[2].1);

    // An unknown point, a key of another volume, no key file, no such volume.
    let o = redun(
        &[
            &["restore", "db", "--point", "5", "--to", "/dev/null"][..],
            &common,
        ]
        .concat(),
    );
    assert!(
        !o.status.success() && text(&o).contains("no point 5"),
        "{}",
        text(&o)
    );
    let other = d.path().join("other.key");
    assert!(
        redun(&["key", "new", other.to_str().unwrap()])
            .status
            .success()
    );
    let cfg = none.to_str().unwrap();
    let o = redun(&[
        "restore",
        "db",
        "--store",
        &url,
        "--key",
        other.to_str().unwrap(),
        "--config",
        cfg,
        "--to",
        "/dev/null",
    ]);
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("another key") && t.contains("volume db"),
        "{t}"
    );
    let o = redun(&[
        "points",
        "db",
        "--store",
        &url,
        "--key",
        "/nonexistent/db.key",
        "--config",
        cfg,
    ]);
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("/nonexistent/db.key") && t.contains("redun key new"),
        "{t}"
    );
    let o = redun(&[&["points", "web"][..], &common].concat());
    assert!(
        !o.status.success() && text(&o).contains("volume web: not in"),
        "{}",
        text(&o)
    );
    // A bad [bucket] table is named.
    let bad = d.path().join("bad.toml");
    std::fs::write(&bad, "[bucket]\nendpint = \"x\"\n").unwrap();
    let o = redun(&[
        "points",
        "db",
        "--store",
        &url,
        "--key",
        keys,
        "--config",
        bad.to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("endpint"),
        "{}",
        text(&o)
    );

    // A damaged segment object: the restore fails naming it, and says the point is not served.
    let seg = std::fs::read_dir(store.join("db/seg"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut b = std::fs::read(&seg).unwrap();
    b[200] ^= 0x40;
    std::fs::write(&seg, &b).unwrap();
    let out = d.path().join("bad.img");
    let o = redun(
        &[
            &["restore", "db", "--quiet", "--to", out.to_str().unwrap()][..],
            &common,
        ]
        .concat(),
    );
    let t = text(&o);
    let name = seg.file_name().unwrap().to_str().unwrap();
    assert!(
        !o.status.success() && t.contains(name) && t.contains("damaged"),
        "{t}"
    );
}

#[test]
fn points_and_latest_inside_a_synchronisation_are_not_restored() {
    let (d, _, url) = bucket_dir();
    let key = d.path().join("db.key");
    let keys = key.to_str().unwrap();
    assert!(redun(&["key", "new", keys]).status.success());
    let points = replicate(&url, &key);
    // A resync begins (its blocks are not all there yet), and a point is placed inside it.
    let mut w = writer(&url, &key);
    let seq = w.next_seq();
    let mut seg = w.segment(seq);
    let begin = SyncInfo {
        role: SyncRole::Begin,
        job: 7,
    };
    let mut packer = redun_store::pack::Packer::new(3, 8).unwrap();
    seg.push_sync(seq, begin, (0, 0), None, &mut packer)
        .unwrap();
    seg.push(Kind::Marker, seq + 1, 0, 0, &marker(seq + 1));
    w.append(vec![seg]).unwrap();
    let common = ["--store", &url, "--key", keys];
    let out = d.path().join("out.img");
    let restore = |point: &str| {
        redun(
            &[
                &["restore", "db", "--quiet", "--point", point, "--to"][..],
                &[out.to_str().unwrap()],
                &common,
            ]
            .concat(),
        )
    };
    let o = restore("latest");
    assert!(
        !o.status.success() && text(&o).contains("mid-synchronisation"),
        "{}",
        text(&o)
    );
    let o = restore(&(seq + 1).to_string());
    assert!(
        !o.status.success() && text(&o).contains("cannot be read"),
        "{}",
        text(&o)
    );
    // The points before it still restore.
    let (p, image) = points.last().unwrap();
    assert!(restore(&p.to_string()).status.success());
    assert!(std::fs::read(&out).unwrap() == *image);
}
