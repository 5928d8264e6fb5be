//! Invariants J and O, and durability, under simulated crashes of the write-ahead path
//! ([`super::wal`]): random changes, flushes, checkpoints and releases over three simulated
//! disks (backing device, journal, region map). The process dies after a random number of
//! disk operations (in the middle of an apply, a checkpoint, a superblock write: anything),
//! then each disk keeps, loses or tears whatever was not synced (a power loss), or keeps
//! everything written (kill -9: the page cache survives). Start-up (region map, journal
//! recovery, replay) may itself die part way and run again. After recovery:
//! - every byte where the backing device differs from the recovered journal's changes,
//!   replayed in order onto the initial image, lies in a region the map calls dirty (J);
//! - every change a FLUSH covered is in the recovered journal (power loss), and every change
//!   acknowledged is (kill -9);
//! - the durable mark the shipper reads never said more than the recovered journal holds.

#![allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)] // Small simulated disks.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use super::OnFull;
use super::map::RegionMap;
use super::pending::{Change, Content};
use super::wal::{Backing, Recorded, Shared, State, replay};
use crate::journal::crash_store::{CrashStore, Rng};
use crate::journal::format::RING_OFFSET;
use crate::journal::mark::{self, DurableMark};
use crate::journal::{Journal, Policy, Store};

const VOL: u64 = 8 << 20;
const REGION: u64 = 64 << 10;
const EXTENT: u64 = 1 << 20;

/// A disk that stops taking writes and syncs once the process has died: after `budget`
/// operations across every disk of the volume, nothing more reaches any of them.
#[derive(Debug)]
struct Mortal {
    disk: CrashStore,
    budget: Arc<AtomicI64>,
}

impl Mortal {
    fn alive(&self) -> bool {
        self.budget.fetch_sub(1, Ordering::SeqCst) > 0
    }
}

impl Store for Mortal {
    fn size(&self) -> io::Result<u64> {
        self.disk.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.disk.read_at(buf, off)
    }
    fn write_at(&self, bufs: &[&[u8]], off: u64) -> io::Result<()> {
        if self.alive() {
            self.disk.write_at(bufs, off)?;
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        if self.alive() {
            self.disk.sync()?;
        }
        Ok(())
    }
}

/// A simulated disk as a volume's backing device.
#[derive(Debug)]
struct Disk<S>(S);

impl<S: Store + Send + Sync> Backing for Disk<S> {
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_at(&[data], offset)
    }
    fn zero(&self, offset: u64, len: u64, _trim: bool, _may_trim: bool) -> io::Result<()> {
        self.0.write_at(&[&vec![0u8; len as usize]], offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync()
    }
}

/// A volume over a new journal on `journal` (`jstore`: another handle on it) and a new region
/// map on `map`.
fn volume<J: Store, M: Store>(journal: J, jstore: J, map: M, uuid: u8) -> Shared<J, M> {
    Shared::new(
        State::new(
            Some(Journal::create(journal, [uuid; 16], VOL).unwrap()),
            Some(RegionMap::create(map, VOL, REGION, EXTENT).unwrap()),
            false,
        ),
        jstore,
        PathBuf::from("/nonexistent/sim.journal"),
        u64::MAX,
    )
}

fn mortal(disk: &CrashStore, budget: &Arc<AtomicI64>) -> Mortal {
    Mortal {
        disk: disk.share(),
        budget: budget.clone(),
    }
}

/// What the crash leaves of a disk.
fn after_crash(disk: &CrashStore, power_loss: bool, rng: &mut Rng) -> CrashStore {
    if power_loss {
        disk.crash(rng)
    } else {
        CrashStore::from_image(disk.image())
    }
}

/// Start-up over the crashed disks, dying after `budget` operations (or not at all).
/// Returns the recovered journal's next sequence number and the map when it got through.
fn start_up(
    jdisk: &CrashStore,
    mdisk: &CrashStore,
    bdisk: &CrashStore,
    budget: i64,
) -> Option<(u64, RegionMap<CrashStore>)> {
    let budget = Arc::new(AtomicI64::new(budget));
    let (map, _) = RegionMap::open(mortal(mdisk, &budget), VOL).ok()?;
    let (mut j, _) = Journal::open(mortal(jdisk, &budget), Policy::TolerateTornTail).ok()?;
    replay(&mut j, &Disk(mortal(bdisk, &budget)), &PathBuf::from("sim")).ok()?;
    if budget.load(Ordering::SeqCst) <= 0 {
        return None;
    }
    drop(map);
    // Read what the disks hold now, as the next user of the volume would.
    let (map, _) = RegionMap::open(mdisk.share(), VOL).ok()?;
    Some((j.next_seq(), map))
}

fn schedule(seed: u64) {
    let mut rng = Rng::new(seed);
    // A ring of 1 to 3 MiB: small enough to wrap, and to fill up (overflow) when the
    // simulated shipper falls behind.
    let ring = (1 + rng.next() % 3) << 20;
    let jdisk = CrashStore::new((RING_OFFSET + ring) as usize);
    let mdisk = CrashStore::new(RegionMap::<CrashStore>::file_size(VOL, REGION, EXTENT) as usize);
    let bdisk = CrashStore::new(VOL as usize);
    let budget = Arc::new(AtomicI64::new(i64::MAX));
    // The durable mark, on a disk of its own that dies with the others.
    let markdisk = CrashStore::new(4096);
    let shared = volume(
        mortal(&jdisk, &budget),
        mortal(&jdisk, &budget),
        mortal(&mdisk, &budget),
        1,
    )
    .with_durable_mark(DurableMark::in_store(
        mortal(&markdisk, &budget),
        "sim.journal.durable".into(),
    ));
    let backing = Disk(mortal(&bdisk, &budget));
    // The process dies after this many disk operations from here on.
    budget.store((rng.next() % 3000) as i64, Ordering::SeqCst);
    let power_loss = rng.next() % 3 != 0;
    let ships = rng.next() % 4 != 0;
    // Every change journaled, by sequence number; the last sequence number a completed
    // FLUSH covered; the last one acknowledged.
    let mut journaled: Vec<(u64, u64, Vec<u8>)> = Vec::new();
    let mut flushed = 0u64;
    let mut acknowledged = 0u64;
    let ops = 20 + rng.next() % 200;
    for _ in 0..ops {
        if budget.load(Ordering::SeqCst) <= 0 {
            break;
        }
        let choice = rng.next() % 16;
        if choice >= 13 {
            // The flusher's round: a FLUSH waits for it; sometimes a checkpoint too.
            let head = shared.lock().journal.as_ref().unwrap().next_seq() - 1;
            let _ = shared.cycle(&backing, choice == 15);
            if budget.load(Ordering::SeqCst) > 0 {
                flushed = head;
            }
            continue;
        }
        if choice == 12 {
            if ships {
                // The shipper releases some of what is written.
                let mut st = shared.lock();
                let j = st.journal.as_mut().unwrap();
                let head = j.next_seq() - 1;
                j.set_released(head - rng.next() % 4);
            }
            continue;
        }
        let off = (rng.next() % (VOL / 512)) * 512;
        // Mostly small changes, some of up to 512 KiB (over the journal's group-commit size).
        let sectors = if rng.next() % 8 == 0 { 1024 } else { 128 };
        let len = ((1 + rng.next() % sectors) * 512).min(VOL - off);
        let data = if choice == 11 {
            vec![0u8; len as usize]
        } else {
            vec![rng.next() as u8 | 1; len as usize]
        };
        let content = if choice == 11 {
            Content::Zero {
                trim: false,
                may_trim: false,
            }
        } else {
            Content::Data(data.clone())
        };
        // The flusher runs alongside: when the ring has no room for the change, it
        // checkpoints (and looks at what the shipper released) first.
        {
            let need = 2 * (len + 4096);
            let full = {
                let st = shared.lock();
                let j = st.journal.as_ref().unwrap();
                j.used() + need > j.capacity()
            };
            if full {
                let _ = shared.cycle(&backing, true);
            }
        }
        let c = Change {
            seq: 0,
            offset: off,
            len,
            content,
        };
        match shared.record(&backing, c, OnFull::Bitmap, false) {
            Ok(Recorded::Journaled(seq)) => {
                // The reply leaves once the record is in the journal file.
                shared.write_out(&mut shared.lock());
                journaled.push((seq, off, data));
                if budget.load(Ordering::SeqCst) > 0 {
                    acknowledged = seq;
                }
            }
            Ok(Recorded::Direct) => {}
            // What a dead process does no longer matters.
            Err(_) if budget.load(Ordering::SeqCst) <= 0 => break,
            Err(e) => panic!("seed {seed}: {e}"),
        }
    }
    let overflowed = shared.lock().overflowed;
    let jc = after_crash(&jdisk, power_loss, &mut rng);
    let mc = after_crash(&mdisk, power_loss, &mut rng);
    let bc = after_crash(&bdisk, power_loss, &mut rng);
    // Start-up may die part way (during replay too); then the disks crash again.
    let (jc, mc, bc) = if rng.next() % 3 == 0 {
        let _ = start_up(&jc, &mc, &bc, (rng.next() % 40) as i64);
        (
            after_crash(&jc, power_loss, &mut rng),
            after_crash(&mc, power_loss, &mut rng),
            after_crash(&bc, power_loss, &mut rng),
        )
    } else {
        (jc, mc, bc)
    };
    let (next_seq, map) = start_up(&jc, &mc, &bc, i64::MAX).expect("start-up");
    // The mark is written without a sync: the worst case is that its last write reached the
    // disk while the journal's unsynced records did not.
    let marked = mark::decode(&markdisk.image()).unwrap_or(0);
    assert!(
        marked < next_seq,
        "seed {seed}: the durable mark said seq {marked} but the journal recovered up to seq {} \
         (power_loss={power_loss})",
        next_seq - 1
    );
    let mut model = vec![0u8; VOL as usize];
    for (seq, off, data) in &journaled {
        if *seq < next_seq {
            model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
    }
    let image = bc.image();
    for (i, (a, b)) in model.chunks(512).zip(image.chunks(512)).enumerate() {
        if a != b {
            let at = i as u64 * 512;
            assert!(
                map.is_dirty(at),
                "seed {seed}: byte {at} differs from the journal and is not dirty \
                 (overflowed={overflowed} power_loss={power_loss})"
            );
        }
    }
    if !overflowed {
        let must = if power_loss { flushed } else { acknowledged };
        assert!(
            next_seq > must,
            "seed {seed}: the journal recovered up to seq {} but seq {must} was {} \
             (power_loss={power_loss})",
            next_seq - 1,
            if power_loss {
                "flushed"
            } else {
                "acknowledged"
            }
        );
        assert_eq!(map.dirty_bytes(), 0, "seed {seed}: nothing overflowed");
    }
}

#[test]
fn invariant_j_and_durability_hold_over_random_crash_schedules() {
    for seed in 1..=500u64 {
        schedule(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
}

/// A journal disk that starts failing every write and sync when told to.
#[derive(Debug)]
struct FailingStore {
    inner: CrashStore,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl FailingStore {
    fn check(&self) -> io::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            Ok(())
        }
    }
}

impl Store for FailingStore {
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, bufs: &[&[u8]], off: u64) -> io::Result<()> {
        self.check()?;
        self.inner.write_at(bufs, off)
    }
    fn sync(&self) -> io::Result<()> {
        self.check()?;
        self.inner.sync()
    }
}

fn write4k(off: u64, b: u8) -> Change {
    Change {
        seq: 0,
        offset: off,
        len: 4096,
        content: Content::Data(vec![b; 4096]),
    }
}

#[test]
fn a_failing_journal_makes_pending_changes_dirty_and_writes_go_on() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let jdisk = CrashStore::new((RING_OFFSET + (1 << 20)) as usize);
    let store = |d: &CrashStore| FailingStore {
        inner: d.share(),
        failing: failing.clone(),
    };
    let mdisk = CrashStore::new(RegionMap::<CrashStore>::file_size(VOL, REGION, EXTENT) as usize);
    let backing = Disk(CrashStore::new(VOL as usize));
    let shared = volume(store(&jdisk), store(&jdisk), mdisk.share(), 2);
    let r = shared.record(&backing, write4k(0, 7), OnFull::Bitmap, false);
    assert_eq!(r.unwrap(), Recorded::Journaled(1));
    // The journal disk fails before the flusher could sync: the pending change's range
    // becomes durably dirty, and it still reaches the backing device.
    failing.store(true, Ordering::SeqCst);
    shared.cycle(&backing, false).unwrap();
    {
        let st = shared.lock();
        assert!(st.journal_failed && st.overflowed);
        assert!(st.map.as_ref().unwrap().is_dirty(0));
    }
    assert_eq!(backing.0.image()[0], 7);
    let (m, _) = RegionMap::open(CrashStore::from_image(mdisk.durable_image()), VOL).unwrap();
    assert!(m.is_dirty(0));
    // Later writes go straight to the backing device, their regions durably dirty first.
    let r = shared.record(&backing, write4k(3 * EXTENT, 9), OnFull::Bitmap, false);
    assert_eq!(r.unwrap(), Recorded::Direct);
    assert_eq!(backing.0.image()[3 * EXTENT as usize], 9);
    let (m, _) = RegionMap::open(CrashStore::from_image(mdisk.durable_image()), VOL).unwrap();
    assert!(m.is_dirty(3 * EXTENT));
}

#[test]
fn an_acknowledged_change_is_read_before_it_is_applied() {
    let jdisk = CrashStore::new((RING_OFFSET + (1 << 20)) as usize);
    let mdisk = CrashStore::new(RegionMap::<CrashStore>::file_size(VOL, REGION, EXTENT) as usize);
    let backing = Disk(CrashStore::new(VOL as usize));
    let shared = volume(jdisk.share(), jdisk.share(), mdisk.share(), 3);
    shared
        .record(&backing, write4k(8192, 5), OnFull::Bitmap, false)
        .unwrap();
    shared
        .record(&backing, write4k(10240, 6), OnFull::Bitmap, false)
        .unwrap();
    // Not on the backing device yet, not even in its page cache.
    assert!(backing.0.image()[8192..16384].iter().all(|&b| b == 0));
    let over = shared
        .applied
        .lock()
        .unwrap()
        .pending
        .overlapping(8192, 8192);
    let mut buf = vec![0u8; 8192];
    for c in &over {
        c.overlay(8192, &mut buf);
    }
    assert!(buf[..2048].iter().all(|&b| b == 5));
    assert!(
        buf[2048..6144].iter().all(|&b| b == 6),
        "the later write wins"
    );
    assert!(buf[6144..].iter().all(|&b| b == 0));
    // After the flusher's round they are on the device, in order, and no longer pending.
    shared.cycle(&backing, false).unwrap();
    assert!(shared.applied.lock().unwrap().pending.is_empty());
    assert_eq!(&backing.0.image()[8192..16384], &buf[..]);
}

#[test]
fn a_change_the_backing_device_refuses_stays_pending_and_visible_until_it_lands() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let jdisk = CrashStore::new((RING_OFFSET + (1 << 20)) as usize);
    let mdisk = CrashStore::new(RegionMap::<CrashStore>::file_size(VOL, REGION, EXTENT) as usize);
    let bdisk = CrashStore::new(VOL as usize);
    let backing = Disk(FailingStore {
        inner: bdisk.share(),
        failing: failing.clone(),
    });
    let shared = volume(jdisk.share(), jdisk.share(), mdisk.share(), 5);
    failing.store(true, Ordering::SeqCst);
    shared
        .record(&backing, write4k(4096, 8), OnFull::Bitmap, false)
        .unwrap();
    // A FLUSH is answered: the change is durable in the journal.
    let (tx, rx) = std::sync::mpsc::channel();
    shared.when_durable(Box::new(move |r| tx.send(r.is_ok()).unwrap()));
    shared.cycle(&backing, false).unwrap();
    assert!(rx.recv().unwrap(), "the flush failed");
    // The device refused it: it stays pending, reads still see it, waiting for it says why.
    let a = shared.applied.lock().unwrap();
    assert!(
        a.error.as_deref().is_some_and(|e| e.contains("os error 5")),
        "{:?}",
        a.error
    );
    assert_eq!(a.pending.overlapping(4096, 4096).len(), 1);
    drop(a);
    let e = shared.settle().unwrap_err();
    assert!(e.to_string().contains("cannot be applied"), "{e}");
    // The journal still holds it: a crash now replays it.
    let (mut j, _) = Journal::open(
        CrashStore::from_image(jdisk.durable_image()),
        Policy::TolerateTornTail,
    )
    .unwrap();
    let b2 = Disk(CrashStore::new(VOL as usize));
    assert_eq!(replay(&mut j, &b2, &PathBuf::from("sim")).unwrap(), 1);
    assert_eq!(b2.0.image()[4096], 8);
    // Once the device takes writes again, the next round applies it.
    failing.store(false, Ordering::SeqCst);
    shared.cycle(&backing, false).unwrap();
    assert!(shared.settle().is_ok());
    assert_eq!(bdisk.image()[4096], 8);
}

#[test]
fn the_syncer_paces_its_syncs_unless_someone_waits() {
    use std::time::{Duration, Instant};
    let jdisk = CrashStore::new((RING_OFFSET + (4 << 20)) as usize);
    let mdisk = CrashStore::new(RegionMap::<CrashStore>::file_size(VOL, REGION, EXTENT) as usize);
    let backing = Disk(CrashStore::new(VOL as usize));
    let shared = Shared::new(
        State::new(
            Some(Journal::create(jdisk.share(), [6; 16], VOL).unwrap()),
            Some(RegionMap::create(mdisk.share(), VOL, REGION, EXTENT).unwrap()),
            false,
        ),
        jdisk.share(),
        PathBuf::from("/nonexistent/sim.journal"),
        64 << 10,
    )
    .with_sync_interval(Duration::from_secs(3600));
    let durable = || shared.lock().durable_seq;
    let head = || shared.lock().journal.as_ref().unwrap().next_seq() - 1;
    std::thread::scope(|s| {
        s.spawn(|| shared.syncer(&backing));
        // The syncer ends however the checks below end.
        let checks = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // The first records are synced at once (no sync yet to pace from).
            shared
                .record(&backing, write4k(0, 1), OnFull::Bitmap, false)
                .unwrap();
            let until = |what: &dyn Fn() -> bool| {
                let t = Instant::now();
                while !what() {
                    assert!(
                        t.elapsed() < Duration::from_secs(10),
                        "the syncer never synced"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
            };
            until(&|| durable() == head());
            // Later ones wait for the interval while nobody waits for them...
            shared
                .record(&backing, write4k(4096, 2), OnFull::Bitmap, false)
                .unwrap();
            // The connection thread writes the record out before it replies.
            shared.write_out(&mut shared.lock());
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                durable() < head(),
                "synced before the interval with nobody waiting"
            );
            assert!(
                jdisk.durable_image() != jdisk.image(),
                "the journal was synced with nobody waiting"
            );
            // ...until a FLUSH does: it is answered at once.
            let t = Instant::now();
            shared.sync().unwrap();
            assert!(t.elapsed() < Duration::from_secs(10));
            assert!(
                jdisk.durable_image() == jdisk.image(),
                "the FLUSH was answered before the journal's sync"
            );
            // A writer holding half of journal.memory hurries the syncer too.
            for i in 0..9u8 {
                shared
                    .record(
                        &backing,
                        write4k(8192 * u64::from(i), i),
                        OnFull::Bitmap,
                        false,
                    )
                    .unwrap();
            }
            until(&|| durable() == head());
        }));
        shared.lock().stopping = true;
        shared.wake.notify_all();
        if let Err(p) = checks {
            std::panic::resume_unwind(p);
        }
    });
}
