//! Invariant J under simulated power loss: random changes, flushes and crashes over three
//! simulated disks (backing device, journal, region map) that each lose or tear any write not
//! yet synced. After every crash, each byte where the backing device differs from the durable
//! journal replayed onto the initial image lies in a region the recovered map calls dirty.

#![allow(clippy::cast_possible_truncation)] // Small simulated disks.

use std::path::Path;

use super::map::RegionMap;
use super::{Change, OnFull, Outcome};
use crate::journal::crash_store::{CrashStore, Rng};
use crate::journal::format::{Kind, RING_OFFSET};
use crate::journal::{Journal, Policy, Scanner, Store, read_superblock};

const VOL: u64 = 8 << 20;
const REGION: u64 = 64 << 10;
const EXTENT: u64 = 1 << 20;

fn replay(journal: &CrashStore) -> Vec<u8> {
    let mut img = vec![0u8; VOL as usize];
    let sb = read_superblock(journal).unwrap();
    let mut scan = Scanner::new(journal, &sb, sb.tail_pos, sb.tail_seq);
    while let Some(r) = scan.next_record() {
        let r = r.unwrap();
        let (o, l) = (r.header.offset as usize, r.header.length as usize);
        match r.header.kind {
            Kind::Write => img[o..o + r.payload.len()].copy_from_slice(&r.payload),
            Kind::Trim | Kind::Zero => img[o..o + l].fill(0),
            Kind::Marker | Kind::Pad | Kind::Sync | Kind::Decision => {}
        }
    }
    img
}

fn schedule(seed: u64) {
    let mut rng = Rng::new(seed);
    // A ring of 1 to 3 MiB: small enough to fill up (overflow) in some schedules.
    let ring = (1 + rng.next() % 3) << 20;
    let jstore = CrashStore::new((RING_OFFSET + ring) as usize);
    let mut journal = Journal::create(jstore, [1; 16], VOL).unwrap();
    let mstore = CrashStore::new(RegionMap::<CrashStore>::file_size(VOL, REGION, EXTENT) as usize);
    let msync = mstore.share();
    let mut map = RegionMap::create(mstore, VOL, REGION, EXTENT).unwrap();
    map.set_max_hot(1 + (rng.next() % 4) as usize);
    let backing = CrashStore::new(VOL as usize);
    let mut overflowed = false;
    let mut journal_failed = false;
    let ops = 20 + rng.next() % 150;
    for _ in 0..ops {
        let choice = rng.next() % 10;
        if choice >= 8 {
            // A flush: backing device, then the journal (written out of its buffer and synced).
            backing.sync().unwrap();
            journal.sync().unwrap();
            continue;
        }
        let off = (rng.next() % (VOL / 512)) * 512;
        // Mostly small changes, some of up to 512 KiB (over the journal's group-commit size).
        let sectors = if rng.next() % 8 == 0 { 1024 } else { 128 };
        let len = ((1 + rng.next() % sectors) * 512).min(VOL - off);
        let (kind, data) = if choice == 7 {
            (Kind::Zero, vec![0u8; len as usize])
        } else {
            let b = rng.next() as u8 | 1;
            (Kind::Write, vec![b; len as usize])
        };
        let payload: &[u8] = if kind == Kind::Write { &data } else { &[] };
        let mut change = Change {
            journal: Some(&mut journal),
            overflowed: &mut overflowed,
            map: Some(&mut map),
            name: Path::new("sim"),
            on_full: OnFull::Bitmap,
            journal_failed: &mut journal_failed,
        };
        change
            .record_and_apply(
                kind,
                off,
                len as u32,
                payload,
                &mut || backing.sync(),
                &mut || backing.write_at(&[&data], off),
            )
            .unwrap();
    }
    // Power loss: each disk keeps, loses or tears whatever was not synced.
    let jc = journal.store().crash(&mut rng);
    let mc = msync.crash(&mut rng);
    let bc = backing.crash(&mut rng);
    let (j2, _) = Journal::open(jc, Policy::TolerateTornTail).unwrap();
    let (m2, _) = RegionMap::open(mc, VOL).unwrap();
    let replayed = replay(j2.store());
    let image = bc.image();
    for (i, (a, b)) in replayed.chunks(512).zip(image.chunks(512)).enumerate() {
        if a != b {
            let at = i as u64 * 512;
            assert!(
                m2.is_dirty(at),
                "seed {seed}: byte {at} differs from the journal and is not dirty \
                 (overflowed={overflowed})"
            );
        }
    }
}

#[test]
fn invariant_j_holds_over_random_crash_schedules() {
    for seed in 1..=400u64 {
        schedule(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
}

/// A journal disk that starts failing every write and sync when told to.
#[derive(Debug)]
struct FailingStore {
    inner: CrashStore,
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FailingStore {
    fn check(&self) -> std::io::Result<()> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        } else {
            Ok(())
        }
    }
}

impl Store for FailingStore {
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, bufs: &[&[u8]], off: u64) -> std::io::Result<()> {
        self.check()?;
        self.inner.write_at(bufs, off)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.check()?;
        self.inner.sync()
    }
}

/// One volume over a journal disk that can be made to fail.
struct Sim {
    journal: Journal<FailingStore>,
    map: RegionMap<CrashStore>,
    backing: CrashStore,
    overflowed: bool,
    journal_failed: bool,
}

impl Sim {
    /// Writes 4 KiB of 7s at `off` through the tracking steps.
    fn write(&mut self, off: u64) -> std::io::Result<super::Outcome> {
        let data = vec![7u8; 4096];
        let backing = &self.backing;
        let mut change = Change {
            journal: Some(&mut self.journal),
            overflowed: &mut self.overflowed,
            map: Some(&mut self.map),
            name: Path::new("sim"),
            on_full: OnFull::Bitmap,
            journal_failed: &mut self.journal_failed,
        };
        change.record_and_apply(
            Kind::Write,
            off,
            4096,
            &data,
            &mut || backing.sync(),
            &mut || backing.write_at(&[&data], off),
        )
    }
}

#[test]
fn a_failing_journal_turns_hot_extents_dirty_and_writes_go_on() {
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let jstore = FailingStore {
        inner: CrashStore::new((RING_OFFSET + (1 << 20)) as usize),
        failing: failing.clone(),
    };
    let mstore = CrashStore::new(RegionMap::<CrashStore>::file_size(VOL, REGION, EXTENT) as usize);
    let mut sim = Sim {
        journal: Journal::create(jstore, [2; 16], VOL).unwrap(),
        map: RegionMap::create(mstore, VOL, REGION, EXTENT).unwrap(),
        backing: CrashStore::new(VOL as usize),
        overflowed: false,
        journal_failed: false,
    };
    sim.map.set_max_hot(1);
    // Extent 0 hot, its record buffered; then the journal disk fails.
    assert_eq!(sim.write(0).unwrap(), Outcome::Applied);
    failing.store(true, std::sync::atomic::Ordering::SeqCst);
    // Extent 1 needs extent 0 cooled, which needs the journal synced: it cannot be. The
    // write still succeeds, and extent 0, whose record is lost, is dirty.
    assert_eq!(sim.write(EXTENT).unwrap(), Outcome::Applied);
    assert!(sim.overflowed && sim.journal_failed);
    assert!(sim.map.is_dirty(0) && sim.map.is_dirty(EXTENT));
    // Later writes to cold extents go on without touching the journal.
    assert_eq!(sim.write(3 * EXTENT).unwrap(), Outcome::Applied);
    assert!(sim.map.is_dirty(3 * EXTENT));
    assert_eq!(sim.backing.image()[3 * EXTENT as usize], 7);
}

#[test]
fn a_failed_group_write_leaves_the_journal_as_it_was() {
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = FailingStore {
        inner: CrashStore::new((RING_OFFSET + (4 << 20)) as usize),
        failing: failing.clone(),
    };
    let mut j = Journal::create(store, [4; 16], VOL).unwrap();
    j.append(Kind::Write, 0, 4096, &[1u8; 4096]).unwrap();
    failing.store(true, std::sync::atomic::Ordering::SeqCst);
    let (used, next) = (j.used(), j.next_seq());
    // Large enough to be written at once, with what is buffered.
    let big = vec![2u8; crate::journal::COMMIT_BYTES];
    assert!(j.append(Kind::Write, 4096, big.len() as u32, &big).is_err());
    assert_eq!((j.used(), j.next_seq()), (used, next));
    // Once the disk works again the same record goes in, right after the first.
    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        j.append(Kind::Write, 4096, big.len() as u32, &big).unwrap(),
        next
    );
    let store = j.close().unwrap();
    let i = crate::journal::inspect::inspect(&store).unwrap();
    assert!(i.healthy(), "{i:?}");
    assert_eq!(i.records.len(), 2);
}
