//! The store against a model: every point reads back the bytes of its moment, across
//! seals, reopening, crashes between commits, pruning and merging.

#![allow(clippy::cast_possible_truncation)] // Test volumes are small.
use super::*;
use proptest::prelude::*;
use redun_tracker::journal::format::{MarkerInfo, PointKind, SyncRole};

const SIZE: u64 = 64 * 1024;

fn id() -> Identity {
    Identity {
        name: "vol".into(),
        uuid: "0123456789abcdef0123456789abcdef".into(),
        size: SIZE,
        generation: 1,
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: u32, byte: u8 },
    Zero { offset: u64, len: u32 },
    Point,
    Commit,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..SIZE, 1u32..9000, any::<u8>()).prop_map(|(offset, len, byte)| {
            let len = len.min(u32::try_from(SIZE - offset).unwrap());
            Op::Write { offset, len, byte }
        }),
        1 => (0..SIZE, 1u32..20000).prop_map(|(offset, len)| {
            let len = len.min(u32::try_from(SIZE - offset).unwrap());
            Op::Zero { offset, len }
        }),
        2 => Just(Op::Point),
        2 => Just(Op::Commit),
        1 => Just(Op::Reopen),
    ]
}

/// The model: the volume's bytes after each committed point.
struct Model {
    bytes: Vec<u8>,
    points: Vec<(u64, Vec<u8>)>,
    seq: u64,
}

fn marker(unix_ms: u64) -> Vec<u8> {
    MarkerInfo {
        kind: PointKind::Crash,
        unix_ms,
        group_point: 0,
    }
    .encode()
}

fn read_all(v: &View) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    // In odd-sized pieces, so that reads start and end inside extents.
    let mut pos = 0;
    while pos < SIZE {
        let n = (SIZE - pos).min(7777);
        v.read_at(&mut buf[pos as usize..(pos + n) as usize], pos)
            .unwrap();
        pos += n;
    }
    buf
}

fn check_points(store: &Store, model: &Model) {
    let listed = store.points();
    for (seq, bytes) in &model.points {
        let Some((p, usable)) = listed.iter().find(|(p, _)| p.id == *seq) else {
            continue; // pruned
        };
        assert!(usable, "point {p:?} is durable but not usable");
        let v = store.view(*seq).expect("a view of a usable point");
        assert!(read_all(&v) == *bytes, "point {seq} reads other bytes");
    }
}

/// Runs `ops`; at every commit the model's uncommitted points become durable, and a reopen
/// without a commit loses what was appended since the last one (a crash).
fn run(dir: &Path, ops: &[Op], seal: u64) -> (Store, Model) {
    let mut store = Store::create(dir, &id()).unwrap().with_seal_bytes(seal);
    let mut model = Model {
        bytes: vec![0u8; SIZE as usize],
        points: Vec::new(),
        seq: 1,
    };
    // (bytes, points) as of the last commit, for crashes.
    let mut durable = (model.bytes.clone(), 0usize, model.seq);
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Write { offset, len, byte } => {
                let data = vec![*byte; *len as usize];
                store
                    .append(Kind::Write, model.seq, *offset, *len, &data)
                    .unwrap();
                model.bytes[*offset as usize..(*offset + u64::from(*len)) as usize].fill(*byte);
                model.seq += 1;
            }
            Op::Zero { offset, len } => {
                store
                    .append(Kind::Zero, model.seq, *offset, *len, &[])
                    .unwrap();
                model.bytes[*offset as usize..(*offset + u64::from(*len)) as usize].fill(0);
                model.seq += 1;
            }
            Op::Point => {
                store
                    .append(Kind::Marker, model.seq, 0, 0, &marker(i as u64))
                    .unwrap();
                model.points.push((model.seq, model.bytes.clone()));
                model.seq += 1;
            }
            Op::Commit => {
                let through = store.commit().unwrap();
                assert_eq!(through, model.seq - 1);
                durable = (model.bytes.clone(), model.points.len(), model.seq);
            }
            Op::Reopen => {
                drop(store);
                store = Store::open(dir, "vol").unwrap().with_seal_bytes(seal);
                model.bytes = durable.0.clone();
                model.points.truncate(durable.1);
                model.seq = durable.2;
                assert_eq!(store.applied(), if model.seq == 1 { 0 } else { model.seq });
            }
        }
    }
    store.commit().unwrap();
    (store, model)
}

/// Every listed point and `latest` read back as the model says, before and after reopening
/// the store from its files.
fn check_all(dir: &Path, store: Store, model: &Model) -> Store {
    check_points(&store, model);
    let latest = store.view(store.latest()).unwrap();
    assert!(read_all(&latest) == model.bytes, "latest reads other bytes");
    drop(latest);
    drop(store);
    let store = Store::open(dir, "vol").unwrap();
    check_points(&store, model);
    let latest = store.view(store.latest()).unwrap();
    assert!(
        read_all(&latest) == model.bytes,
        "latest reads other bytes after reopening"
    );
    drop(latest);
    store
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn every_point_reads_back_its_moment(ops in proptest::collection::vec(op(), 1..120)) {
        let dir = tempfile::tempdir().unwrap();
        let (store, model) = run(dir.path(), &ops, 40_000);
        let store = check_all(dir.path(), store, &model);
        // Keep only the newest few points: the rest merge into the base.
        let r = Retention { keep_all_ms: 10, tiers: vec![] };
        store.maintain(&r, ops.len() as u64).unwrap();
        check_all(dir.path(), store, &model);
    }

    #[test]
    fn thinned_points_compact_and_still_read_back(ops in proptest::collection::vec(op(), 20..150)) {
        let dir = tempfile::tempdir().unwrap();
        let (store, model) = run(dir.path(), &ops, 8_000);
        // One point per 5 ms of (op-index) time: the segments between kept points compact.
        let r = Retention {
            keep_all_ms: 0,
            tiers: vec![Tier { every_ms: 5, for_ms: u64::MAX / 2 }],
        };
        store.maintain(&r, ops.len() as u64).unwrap();
        check_all(dir.path(), store, &model);
    }
}

#[test]
fn segments_between_kept_points_compact_into_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), &id()).unwrap().with_seal_bytes(1);
    let mut seq = 1;
    let mut put = |store: &Store, kind: Kind, off: u64, data: &[u8]| {
        let len = u32::try_from(data.len()).unwrap();
        store.append(kind, seq, off, len, data).unwrap();
        seq += 1;
        store.commit().unwrap();
        seq - 1
    };
    let p1 = put(&store, Kind::Marker, 0, &marker(0));
    // Four segments overwriting the same 8 KiB, then a point.
    for b in 1..=4u8 {
        put(&store, Kind::Write, 0, &[b; 8192]);
    }
    let p2 = put(&store, Kind::Marker, 0, &marker(1));
    put(&store, Kind::Write, 4096, &[9u8; 100]);
    let before = store.layout().0;
    let r = Retention {
        keep_all_ms: 10,
        tiers: vec![],
    };
    let m = store.maintain(&r, 5).unwrap();
    // The four writes and p2's marker are five segments between p1 and p2.
    assert_eq!(m.compacted_segments, 5, "{m:?}");
    assert!(m.compacted_bytes_freed > 3 * 8192, "{m:?}");
    // p1's own segment merged into the base; the five became one.
    assert_eq!(store.layout().0, before - 5);
    let mut b = vec![0u8; 8192];
    store.view(p2).unwrap().read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 4));
    store.view(p1).unwrap().read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    drop(store);
    let store = Store::open(dir.path(), "vol").unwrap();
    let v = store.view(store.latest()).unwrap();
    v.read_at(&mut b, 0).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 4) && b[4096..4196].iter().all(|&x| x == 9));
    let files = std::fs::read_dir(store_dir(dir.path(), "vol"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".seg")
        })
        .count();
    assert_eq!(
        files,
        store.layout().0 + 1,
        "old segment files are gone: {:?}",
        std::fs::read_dir(store_dir(dir.path(), "vol"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_run_that_would_free_little_is_not_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), &id()).unwrap().with_seal_bytes(1);
    let mut seq = 1;
    let mut put = |store: &Store, kind: Kind, off: u64, data: &[u8]| {
        let len = u32::try_from(data.len()).unwrap();
        store.append(kind, seq, off, len, data).unwrap();
        seq += 1;
        store.commit().unwrap();
        seq - 1
    };
    let p1 = put(&store, Kind::Marker, 0, &marker(0));
    // Four segments writing four different 8 KiB ranges, one overwriting half of another:
    // compacting would keep 28 of their 32 KiB.
    for (b, off) in [(1u8, 0u64), (2, 8192), (3, 16384), (4, 20480)] {
        put(&store, Kind::Write, off, &[b; 8192]);
    }
    let p2 = put(&store, Kind::Marker, 0, &marker(1));
    put(&store, Kind::Write, 4096, &[9u8; 100]);
    let r = Retention {
        keep_all_ms: 10,
        tiers: vec![],
    };
    let before = store.layout().0;
    let m = store.maintain(&r, 5).unwrap();
    assert_eq!(m.compacted_segments, 0, "{m:?}");
    // Only p1's own segment merged into the base.
    assert_eq!(store.layout().0, before - 1);
    let m = store.maintain(&r, 6).unwrap();
    assert_eq!((m.compacted_segments, m.merged_segments), (0, 0), "{m:?}");
    assert_eq!(store.layout().0, before - 1);
    let mut b = vec![0u8; 32768];
    store.view(p2).unwrap().read_at(&mut b, 0).unwrap();
    let mut want = vec![1u8; 8192];
    want.extend([2u8; 8192]);
    want.extend([3u8; 4096]);
    want.extend([4u8; 8192]);
    want.extend([0u8; 4096]);
    assert_eq!(b, want);
    store.view(p1).unwrap().read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn a_pinned_view_keeps_its_segments_from_merging() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), &id()).unwrap().with_seal_bytes(1);
    store.append(Kind::Write, 1, 0, 4, b"aaaa").unwrap();
    store.append(Kind::Marker, 2, 0, 0, &marker(1)).unwrap();
    store.commit().unwrap();
    store.append(Kind::Write, 3, 0, 4, b"bbbb").unwrap();
    store.append(Kind::Marker, 4, 0, 0, &marker(2)).unwrap();
    store.commit().unwrap();
    store.append(Kind::Write, 5, 0, 4, b"cccc").unwrap();
    store.commit().unwrap();
    assert_eq!(store.layout(), (3, 0));
    let old = store.view(2).unwrap();
    // Every point pruned but the newest: the pin at seq 2 lets the first segment merge
    // (the view reads it from the segment) but holds the second back.
    let r = Retention {
        keep_all_ms: 0,
        tiers: vec![],
    };
    let m = store.maintain(&r, 100).unwrap();
    assert_eq!(m.pruned, 1);
    assert_eq!(m.merged_segments, 1);
    assert_eq!(store.layout(), (2, 2));
    let mut b = [0u8; 4];
    old.read_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"aaaa");
    drop(old);
    let m = store.maintain(&r, 100).unwrap();
    assert_eq!(m.merged_segments, 1, "{m:?}");
    assert_eq!(store.layout(), (1, 4));
    assert!(store.view(2).is_none(), "a merged point cannot be read");
    let v = store.view(4).unwrap();
    v.read_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"bbbb");
    let v = store.view(store.latest()).unwrap();
    v.read_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"cccc");
}

#[test]
fn retention_keeps_tiers_and_prefers_app_points() {
    let r = Retention {
        keep_all_ms: 1000,
        tiers: vec![
            Tier {
                every_ms: 100,
                for_ms: 2000,
            },
            Tier {
                every_ms: 1000,
                for_ms: 5000,
            },
        ],
    };
    let p = |id, unix_ms, kind| Point {
        id,
        unix_ms,
        kind,
        group: 0,
    };
    let points: Vec<Point> = (0..100)
        .map(|i| {
            let kind = if i % 7 == 3 {
                PointKind::App
            } else {
                PointKind::Crash
            };
            p(i + 1, i * 50, kind)
        })
        .collect();
    let now = 5000;
    let keep = r.keep(&points, now);
    for k in &keep {
        let age = now - k.unix_ms;
        assert!(age <= 5000, "{k:?}");
    }
    // Everything within a second.
    assert_eq!(keep.iter().filter(|k| now - k.unix_ms <= 1000).count(), 20);
    // One per 100 ms between 1 s and 2 s of age, the app point where there is one.
    let mid: Vec<_> = keep
        .iter()
        .filter(|k| (1001..=2000).contains(&(now - k.unix_ms)))
        .collect();
    assert!(mid.len() == 10 || mid.len() == 11, "{mid:?}");
    // In [2000, 3000) the first point is a crash point, the second an app point.
    let p4 = points.iter().find(|x| x.unix_ms == 2250).unwrap();
    assert_eq!(p4.kind, PointKind::App);
    assert!(keep.contains(p4), "the app point of its interval stays");
    // The newest point stays whatever its age.
    let keep = r.keep(&points, 1_000_000);
    assert_eq!(keep, vec![points[99]]);
}

#[test]
fn a_damaged_open_segment_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), &id()).unwrap();
    store.append(Kind::Write, 1, 0, 4, b"aaaa").unwrap();
    store.commit().unwrap();
    let name = store.state().open_segment;
    drop(store);
    let p = store_dir(dir.path(), "vol").join(&name);
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(
        b"X",
        SEGMENT_HEADER_LEN as u64 + ENTRY_HEADER_LEN as u64 + 1,
    )
    .unwrap();
    let e = Store::open(dir.path(), "vol").unwrap_err().to_string();
    assert!(e.contains(&name) && e.contains("checksum"), "{e}");
}

#[test]
fn a_synchronisation_makes_its_points_unusable_and_its_blocks_read_back() {
    use redun_shipper::proto::SyncBlock;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), &id())
        .unwrap()
        .with_seal_bytes(200);
    let sync = |role, job| SyncInfo { role, job };
    store.append(Kind::Write, 1, 0, 4, b"aaaa").unwrap();
    store.append(Kind::Marker, 2, 0, 0, &marker(1)).unwrap();
    store
        .append_sync(3, sync(SyncRole::Begin, 0), (0, 0), None)
        .unwrap();
    // The shipper claims the begin with its job.
    store
        .append_sync(4, sync(SyncRole::Begin, 9), (0, 0), None)
        .unwrap();
    store.append(Kind::Marker, 5, 0, 0, &marker(2)).unwrap();
    let data = [7u8; 4096];
    let blocks = [
        SyncBlock {
            offset: 4096,
            length: 4096,
            data: Some(&data),
        },
        SyncBlock {
            offset: 0,
            length: 4,
            data: None,
        },
    ];
    store
        .append_sync(6, sync(SyncRole::Slot, 9), (0, 8192), Some(&blocks))
        .unwrap();
    // A slot its shipper never filled changes nothing, not even the cursor.
    store
        .append_sync(7, sync(SyncRole::Slot, 9), (8192, 8192), None)
        .unwrap();
    store.commit().unwrap();
    let mid = store.syncing().unwrap();
    assert_eq!((mid.job, mid.since_seq, mid.cursor), (9, 3, 8192));
    let usable =
        |s: &Store| -> Vec<(u64, bool)> { s.points().iter().map(|(p, ok)| (p.id, *ok)).collect() };
    assert_eq!(usable(&store), [(2, true), (5, false)]);
    store
        .append_sync(8, sync(SyncRole::End, 9), (0, 0), None)
        .unwrap();
    store.append(Kind::Marker, 9, 0, 0, &marker(3)).unwrap();
    store.commit().unwrap();
    for s in [store, Store::open(dir.path(), "vol").unwrap()] {
        assert!(s.syncing().is_none());
        assert_eq!(s.state().inconsistent, [[3, 8]]);
        assert_eq!(usable(&s), [(2, true), (5, false), (9, true)]);
        let v = s.view(9).unwrap();
        let all = read_all(&v);
        assert_eq!(&all[..4], &[0; 4], "the zero block of the slot");
        assert_eq!(&all[4096..8192], &data[..]);
        let (as_of, applied) = s.applied_view(0, 8192).unwrap();
        assert_eq!(as_of, 9);
        let h = applied.hashes(0, 8192, 4096).unwrap();
        assert_eq!(h[0], redun_shipper::proto::ZERO_HASH);
        assert_eq!(h[1], redun_shipper::proto::block_hash(&data));
    }
}
