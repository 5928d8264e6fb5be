//! Journal tests: wrap-around, crash simulation with torn and lost writes, damage detection.

#![allow(clippy::cast_possible_truncation)] // Test schedules use small numbers.

use proptest::prelude::*;

use super::format::*;
use super::*;

use super::crash_store::{CrashStore, Rng};

const SMALL: usize = MIN_FILE_SIZE as usize; // 1 MiB ring

fn payload(seq: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seq as usize * 31 + i) as u8).collect()
}

fn check_chain(j: &mut Journal<CrashStore>, expected: &[(u64, usize)]) {
    let recs = j.read_from(0).unwrap();
    let got: Vec<(u64, usize)> = recs
        .iter()
        .map(|r| (r.header.seq, r.payload.len()))
        .collect();
    assert_eq!(got, expected);
    for r in &recs {
        assert_eq!(r.payload, payload(r.header.seq, r.payload.len()));
    }
}

#[test]
fn wraps_around_many_laps_and_reopens() {
    let mut j = Journal::create(CrashStore::new(SMALL), [1; 16], 1 << 30).unwrap();
    let mut live: Vec<(u64, usize)> = Vec::new();
    let mut rng = Rng::new(42);
    for i in 0..3000u64 {
        let len = (rng.next() % 70_000) as usize;
        match j.append(
            Kind::Write,
            i * 4096,
            len as u32,
            &payload(j.next_seq(), len),
        ) {
            Ok(seq) => live.push((seq, len)),
            Err(JournalError::Full { .. }) => {
                // Release about half of what is held.
                let upto = live[live.len() / 2].0;
                j.release(upto).unwrap();
                live.retain(|&(s, _)| s > upto);
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        j.superblock().tail_pos > 5 * j.capacity(),
        "ring must have wrapped"
    );
    check_chain(&mut j, &live);
    let store = j.store;
    let sb = read_superblock(&store).unwrap();
    let (mut j, rec) = Journal::open(store, Policy::Strict).unwrap();
    assert!(!rec.was_clean && rec.end.is_clean(), "{rec:?}");
    assert_eq!(rec.tail_seq, sb.tail_seq);
    check_chain(&mut j, &live);
}

#[test]
fn every_boundary_of_the_ring_end() {
    // Records of every size class placed right before the end of the ring: a pad record,
    // an implicit skip (room < header), and an exact fit.
    for first in [0usize, 8, 16, 40, 48, 100, 4000] {
        let mut j = Journal::create(CrashStore::new(SMALL), [2; 16], 1 << 30).unwrap();
        let cap = j.capacity() as usize;
        // Fill up to `first` bytes before the end with one record, release it.
        let fill = cap - first - RECORD_HEADER_LEN;
        let fill = fill.min(MAX_PAYLOAD as usize) / 8 * 8;
        let s = j.append(Kind::Write, 0, 0, &payload(1, fill)).unwrap();
        j.release(s).unwrap();
        let mut live = Vec::new();
        for len in [0usize, 1, 7, 8, 9, 100, 5000] {
            let seq = j.next_seq();
            j.append(Kind::Write, 0, len as u32, &payload(seq, len))
                .unwrap();
            live.push((seq, len));
        }
        check_chain(&mut j, &live);
        j.close().unwrap();
    }
}

#[test]
fn stale_records_of_an_earlier_lap_are_not_read() {
    let mut j = Journal::create(CrashStore::new(SMALL), [3; 16], 1 << 30).unwrap();
    // Lap 0: fill the ring with 4 KiB records, release them all, then write a few in lap 1.
    let mut last = 0;
    while let Ok(s) = j.append(Kind::Write, 0, 4096, &payload(j.next_seq(), 4096)) {
        last = s;
    }
    j.release(last).unwrap();
    let lap0 = image(&j.store);
    let mut live = Vec::new();
    while j.superblock().tail_pos + j.used() < j.capacity() + 3 * 4200 {
        let seq = j.next_seq();
        j.append(Kind::Write, 0, 4096, &payload(seq, 4096)).unwrap();
        live.push((seq, 4096));
    }
    j.write_out().unwrap();
    // As if the zeroes after the last record had not reached the disk.
    let head = RING_OFFSET + j.head_pos % j.capacity();
    j.store.restore(&lap0, head, RECORD_HEADER_LEN);
    let (mut j, rec) = Journal::open(j.store, Policy::Strict).unwrap();
    // The old lap-0 records right after the head have valid checksums for lap 0 only.
    assert!(matches!(rec.end.why, Invalid::StaleLap { .. }), "{rec:?}");
    check_chain(&mut j, &live);
}

#[test]
fn torn_and_zeroed_tails_and_mid_ring_damage() {
    let mut j = Journal::create(CrashStore::new(SMALL), [4; 16], 1 << 30).unwrap();
    let mut pos = Vec::new();
    for seq in 1..=10u64 {
        pos.push(j.superblock().ring_offset + j.head_pos % j.capacity());
        j.append(Kind::Write, seq * 512, 1000, &payload(seq, 1000))
            .unwrap();
    }
    j.sync().unwrap();
    // A clean, zero-filled end.
    let store = j.store;
    let (j, rec) = Journal::open(store, Policy::Strict).unwrap();
    assert_eq!(rec.end.why, Invalid::Zeroed);
    assert_eq!(rec.next_seq, 11);
    let store = j.store;
    // Torn last record: strict refuses, tolerant cuts it.
    store.corrupt(pos[9] + 600);
    let err = Journal::open(CrashStore::from_image(image(&store)), Policy::Strict).unwrap_err();
    assert!(err.to_string().contains("seq 10"), "{err}");
    let (mut j, rec) = Journal::open(
        CrashStore::from_image(image(&store)),
        Policy::TolerateTornTail,
    )
    .unwrap();
    assert_eq!(rec.next_seq, 10);
    assert!(matches!(rec.end.why, Invalid::Checksum { .. }));
    check_chain(&mut j, &(1..=9).map(|s| (s, 1000)).collect::<Vec<_>>());
    // Damage in the middle is reported with its offset and sequence number, and nothing from
    // it on is returned as valid.
    store.corrupt(pos[4] + 100);
    match Journal::open(CrashStore::from_image(image(&store)), Policy::Strict) {
        Err(JournalError::Corruption { offset, reason }) => {
            assert_eq!(offset, pos[4]);
            assert!(reason.contains("seq 5"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let (mut j, _) = Journal::open(
        CrashStore::from_image(image(&store)),
        Policy::TolerateTornTail,
    )
    .unwrap();
    check_chain(&mut j, &(1..=4).map(|s| (s, 1000)).collect::<Vec<_>>());
}

fn image(s: &CrashStore) -> Vec<u8> {
    s.image()
}

#[test]
fn a_recovered_journal_never_accepts_leftovers_beyond_its_head() {
    // Records 1..=5 written; a crash keeps 1, 2 and 4, 5 but tears 3. Recovery stops at 3;
    // new records from there must not chain into the old 4 and 5.
    let mut j = Journal::create(CrashStore::new(SMALL), [5; 16], 1 << 30).unwrap();
    j.sync().unwrap();
    let mut pos = Vec::new();
    for seq in 1..=5u64 {
        pos.push(RING_OFFSET + j.head_pos % j.capacity());
        j.append(Kind::Write, 0, 100, &payload(seq, 100)).unwrap();
    }
    j.sync().unwrap();
    j.store.corrupt(pos[2] + 60);
    let (mut j, rec) = Journal::open(j.store, Policy::TolerateTornTail).unwrap();
    assert_eq!(rec.next_seq, 3);
    // Same sizes: the new record 3 lands exactly where the old 3 was, the old 4 follows it
    // (its header survives when the zeroes written after the new record are lost).
    let before = image(&j.store);
    j.append(Kind::Write, 0, 100, &payload(3, 100)).unwrap();
    j.sync().unwrap();
    j.store.restore(&before, pos[3], RECORD_HEADER_LEN);
    let (mut j, rec) = Journal::open(j.store, Policy::Strict).unwrap();
    assert_eq!(rec.next_seq, 4, "{rec:?}");
    assert!(matches!(rec.end.why, Invalid::StaleEpoch { .. }), "{rec:?}");
    check_chain(&mut j, &(1..=3).map(|s| (s, 100)).collect::<Vec<_>>());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    /// Random appends, syncs and releases, then a crash that loses, keeps or tears every write
    /// since the last sync. Recovery returns a prefix of what was appended, in order, that
    /// contains every record synced before the crash, and never anything else.
    #[test]
    fn crash_recovery_returns_a_synced_prefix(seed: u64, ops in 1usize..120) {
        let mut rng = Rng::new(seed);
        let mut j = Journal::create(CrashStore::new(SMALL), [6; 16], 1 << 30).unwrap();
        let mut appended: Vec<(u64, usize)> = Vec::new();
        let mut synced_upto = 0u64;
        for _ in 0..ops {
            match rng.next() % 10 {
                0..=6 => {
                    let len = match rng.next() % 4 { 0 => 0, 1 => (rng.next() % 600) as usize,
                        2 => 4096, _ => (rng.next() % 200_000) as usize };
                    let seq = j.next_seq();
                    match j.append(Kind::Write, seq * 4096, len as u32, &payload(seq, len)) {
                        Ok(s) => appended.push((s, len)),
                        Err(JournalError::Full { .. }) => {
                            let upto = j.next_seq() - 1;
                            j.release(upto).unwrap();
                            synced_upto = upto;
                            appended.clear();
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                7 | 8 => {
                    j.sync().unwrap();
                    synced_upto = j.next_seq() - 1;
                }
                _ => {
                    if let Some(&(s, _)) = appended.get(appended.len() / 2) {
                        j.sync().unwrap();
                        j.release(s).unwrap();
                        synced_upto = j.next_seq() - 1;
                        appended.retain(|&(x, _)| x > s);
                    }
                }
            }
        }
        let crashed = j.store.crash(&mut rng);
        let (mut j2, rec) = Journal::open(crashed, Policy::TolerateTornTail).unwrap();
        let got: Vec<(u64, usize)> = j2.read_from(0).unwrap().iter()
            .map(|r| (r.header.seq, r.payload.len())).collect();
        prop_assert!(got.len() <= appended.len());
        prop_assert_eq!(&got[..], &appended[..got.len()]);
        let durable = appended.iter().filter(|&&(s, _)| s <= synced_upto).count();
        prop_assert!(got.len() >= durable, "lost synced records: {} < {}", got.len(), durable);
        prop_assert_eq!(rec.next_seq, appended.first().map_or(j2.next_seq(), |a| a.0) + got.len() as u64);
        // And the recovered journal goes on working.
        let seq = j2.next_seq();
        j2.append(Kind::Marker, 0, 0, b"after").unwrap();
        let last = j2.read_from(seq).unwrap();
        prop_assert_eq!(last.len(), 1);
    }
}

#[test]
fn inspection_tells_mid_ring_damage_from_a_torn_head() {
    let mut j = Journal::create(CrashStore::new(SMALL), [7; 16], 1 << 30).unwrap();
    let mut pos = Vec::new();
    for seq in 1..=10u64 {
        pos.push(RING_OFFSET + j.head_pos % j.capacity());
        j.append(Kind::Write, seq * 512, 700, &payload(seq, 700))
            .unwrap();
    }
    j.write_out().unwrap();
    let healthy = inspect::inspect(&j.store).unwrap();
    assert!(healthy.healthy(), "{healthy:?}");
    assert_eq!(healthy.records.len(), 10);
    assert_eq!(healthy.records[3].file_offset, pos[3]);
    // Torn head: the end is damage, but nothing lies beyond it.
    let store = CrashStore::from_image(image(&j.store));
    store.corrupt(pos[9] + 300);
    let torn = inspect::inspect(&store).unwrap();
    assert!(!torn.end_ok && torn.orphans.is_empty(), "{torn:?}");
    assert_eq!((torn.end_seq, torn.end_file_offset), (10, pos[9]));
    // Damage in the middle: the records after it are found as orphans.
    j.store.corrupt(pos[4] + 20);
    let mid = inspect::inspect(&j.store).unwrap();
    assert!(!mid.healthy());
    assert_eq!((mid.end_seq, mid.end_file_offset), (5, pos[4]));
    assert_eq!(mid.records.len(), 4);
    assert_eq!(mid.orphans.first().map(|o| o.seq), Some(6), "{mid:?}");
    // Once recovered (cut at the torn record) and closed, the journal is healthy.
    let (j, _) = Journal::open(store, Policy::TolerateTornTail).unwrap();
    let store = j.close().unwrap();
    let closed = inspect::inspect(&store).unwrap();
    assert!(closed.healthy() && closed.clean, "{closed:?}");
    assert_eq!(closed.next_seq, 10);
}

/// Ten 700-byte writes at `seq * 4096`; returns the journal and each record's file offset.
fn ten_records() -> (Journal<CrashStore>, Vec<u64>) {
    let mut j = Journal::create(CrashStore::new(SMALL), [9; 16], 1 << 30).unwrap();
    let mut pos = Vec::new();
    for seq in 1..=10u64 {
        pos.push(RING_OFFSET + j.head_pos % j.capacity());
        j.append(Kind::Write, seq * 4096, 700, &payload(seq, 700))
            .unwrap();
    }
    (j, pos)
}

#[test]
fn damage_in_the_middle_names_the_ranges_of_every_lost_record() {
    let lost: Vec<(u64, u64)> = (5..=10).map(|s| (s * 4096, 700)).collect();
    // Closed cleanly: the head is known, records 5..=10 are lost by a flipped payload byte.
    let (j, pos) = ten_records();
    let store = j.close().unwrap();
    assert_eq!(inspect::find_damage(&store).unwrap(), None);
    store.corrupt(pos[4] + RECORD_HEADER_LEN as u64 + 100);
    let d = inspect::find_damage(&store).unwrap().expect("damage");
    assert_eq!((d.seq, d.file_offset, d.lost_records), (5, pos[4], 6));
    assert_eq!(d.ranges.as_deref(), Some(&lost[..]), "{d:?}");

    // Not closed: the valid records after the damage show it is not a torn head.
    let (mut j, pos) = ten_records();
    j.sync().unwrap();
    assert_eq!(inspect::find_damage(&j.store).unwrap(), None);
    j.store.corrupt(pos[4] + RECORD_HEADER_LEN as u64 + 100);
    let d = inspect::find_damage(&j.store).unwrap().expect("damage");
    assert_eq!(d.ranges.as_deref(), Some(&lost[..]), "{d:?}");
    // A torn head with nothing after it is a crash's trace, not damage.
    let (mut j2, pos2) = ten_records();
    j2.sync().unwrap();
    j2.store.corrupt(pos2[9] + 60);
    assert_eq!(inspect::find_damage(&j2.store).unwrap(), None);

    // A damaged header (its magic) leaves the record's range unknown: the whole volume.
    let (j, pos) = ten_records();
    let store = j.close().unwrap();
    store.corrupt(pos[4]);
    let d = inspect::find_damage(&store).unwrap().expect("damage");
    assert_eq!((d.seq, d.ranges), (5, None));
    // So does a missing record after it (two damaged records).
    let (j, pos) = ten_records();
    let store = j.close().unwrap();
    store.corrupt(pos[4] + 100);
    store.corrupt(pos[6] + 100);
    let d = inspect::find_damage(&store).unwrap().expect("damage");
    assert_eq!((d.seq, d.lost_records, d.ranges), (5, 6, None));
}

#[test]
fn reopening_a_cut_clean_journal_starts_a_new_epoch() {
    // Records written after the cut must never line up with the old ones beyond it.
    let (j, pos) = ten_records();
    let store = j.close().unwrap();
    let epoch = read_superblock(&store).unwrap().epoch;
    store.corrupt(pos[4] + 100);
    let (mut j, rec) = Journal::open(store, Policy::TolerateTornTail).unwrap();
    assert_eq!(rec.next_seq, 5);
    assert_eq!(j.superblock().epoch, epoch + 1);
    // The same sizes as before: without the new epoch, old record 6 would follow new 5.
    j.append(Kind::Write, 5 * 4096, 700, &payload(5, 700))
        .unwrap();
    j.sync().unwrap();
    let (_, rec) = Journal::open(j.store, Policy::TolerateTornTail).unwrap();
    assert_eq!(rec.next_seq, 6);
}

#[test]
fn damage_scan_sees_records_across_its_read_chunks() {
    // 4096-byte records: record 257 starts 8 bytes before the end of the scan's first 1 MiB
    // read (the scan starts 8 bytes after the damaged record 1).
    let mut j = Journal::create(CrashStore::new(4 << 20), [3; 16], 1 << 30).unwrap();
    let first = RING_OFFSET + j.head_pos % j.capacity();
    for seq in 1..=300u64 {
        j.append(Kind::Write, seq * 4096, 4048, &payload(seq, 4048))
            .unwrap();
    }
    let store = j.close().unwrap();
    store.corrupt(first + 100);
    let d = inspect::find_damage(&store).unwrap().expect("damage");
    assert_eq!((d.seq, d.lost_records), (1, 300));
    let ranges = d.ranges.expect("every lost record found");
    assert_eq!(ranges.len(), 300);
    assert_eq!(ranges[256], (257 * 4096, 4048));
}
