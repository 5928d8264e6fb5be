//! The write-ahead path of one volume (docs/FORMAT.md, "The write-ahead rule"), generic over
//! storage so that the crash tests run these very steps over simulated disks.
//!
//! A change is appended to the journal and put in the [`Pending`] map under the volume's
//! lock; its reply leaves once the record is written into the journal file (the page cache:
//! a killed process loses nothing acknowledged). Nothing syncs on that path. The volume's
//! flusher ([`Shared::cycle`]) then, off the connection threads and without the lock:
//! 1. syncs the journal once for everything appended so far (group commit: every FLUSH and FUA
//!    waiting is answered by that one sync);
//! 2. applies those changes to the backing device, in sequence order (invariant O), and takes
//!    them out of the map: no byte reaches the backing device before its record is durable,
//!    which is invariant J without an activity log;
//! 3. now and then (a quarter of the ring unchecked, space wanted, or every
//!    [`CHECKPOINT_INTERVAL`]), a checkpoint: syncs the backing device, then records in the
//!    superblock that nothing before the applied position needs replay, and moves the tail to
//!    the older of that position and what the shipper released.
//!
//! After a crash, start-up replays the records from the checkpoint on ([`replay`]).
//!
//! When the journal takes no records (full, failed, or no resync yet), a change goes straight
//! to the backing device once its regions are durably dirty (one sync per region, once), after
//! every journaled change before it was applied.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{error, info, warn};

use super::map::RegionMap;
use super::pending::{Change, Content, Pending};
use super::{OnFull, SyncJob};
use crate::journal::format::{Kind, record_size};
use crate::journal::mark::DurableMark;
use crate::journal::reader::read_release;
use crate::journal::{Journal, JournalError, Scanner, Store, write_superblock_to};

/// How long a write that waits for journal space sleeps before it looks again.
pub const SPACE_POLL: Duration = Duration::from_millis(5);

/// Longest time between two checkpoints while the volume changes.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);

/// How often an idle flusher looks at the release file and the clock.
const IDLE_TICK: Duration = Duration::from_millis(100);

/// What a FLUSH or FUA is told once what it covers is durable.
pub type Done = Box<dyn FnOnce(io::Result<()>) + Send>;

/// A [`Done`] waiting for the flusher.
pub struct Waiter(Done);

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waiter")
    }
}

/// Where a volume's changes land: its backing file or device (a simulated disk in tests).
pub trait Backing: Send + Sync {
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes `[offset, offset + len)` read as zeroes: a hole when `trim` or `may_trim`
    /// allow it.
    fn zero(&self, offset: u64, len: u64, trim: bool, may_trim: bool) -> io::Result<()>;
    /// Makes every write so far durable.
    fn sync(&self) -> io::Result<()>;
}

impl Backing for std::fs::File {
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        crate::io::ops::write_at(self, offset, data, false)
    }

    fn zero(&self, offset: u64, len: u64, trim: bool, may_trim: bool) -> io::Result<()> {
        let len = u32::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        if trim {
            crate::io::ops::trim(self, offset, len, false)
        } else {
            crate::io::ops::write_zeroes(self, offset, len, may_trim, false, false)
        }
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
}

/// Applies one change to the backing device.
pub fn apply_change<B: Backing + ?Sized>(backing: &B, c: &Change) -> io::Result<()> {
    match &c.content {
        Content::Data(d) => backing.write(c.offset, d),
        Content::Zero { trim, may_trim } => backing.zero(c.offset, c.len, *trim, *may_trim),
    }
}

/// The journal kind of a change.
pub fn kind_of(c: &Change) -> Kind {
    match c.content {
        Content::Data(_) => Kind::Write,
        Content::Zero { trim: true, .. } => Kind::Trim,
        Content::Zero { trim: false, .. } => Kind::Zero,
    }
}

/// The tracking state of a volume, under its lock.
#[derive(Debug)]
pub struct State<J: Store, M: Store> {
    pub journal: Option<Journal<J>>,
    /// The journal stopped taking records (full or failed) until a resync.
    pub overflowed: bool,
    pub map: Option<RegionMap<M>>,
    /// Writing or syncing the journal failed: it is left alone until a resync.
    pub journal_failed: bool,
    /// Writes waiting for journal space.
    pub waiting: u64,
    /// The tracker is stopping: writes no longer wait for journal space.
    pub no_waiting: bool,
    /// The log is closing: the flusher finishes, changes are refused.
    pub stopping: bool,
    /// A change was recorded since the last marker.
    pub changed_since_mark: bool,
    /// Writes are refused: the volume was (being) failed over (`NAME.fenced` exists).
    pub fenced: bool,
    /// The synchronisation the shipper runs, if any.
    pub sync: Option<SyncJob>,
    /// FLUSH and FUA replies waiting for the next journal sync.
    pub waiters: Vec<Waiter>,
    /// Every record up to this sequence number is durable (in the journal, or on the backing
    /// device for changes that bypassed it).
    pub durable_seq: u64,
    /// A change went straight to the backing device since it was last synced.
    pub direct_unsynced: bool,
    /// A write waits for space that a checkpoint (or a release) would free.
    pub checkpoint_wanted: bool,
    /// The syncer sleeps until woken (or its idle tick).
    pub syncer_idle: bool,
    /// The applier ends once nothing it can apply is left (the syncer ended).
    pub apply_stop: bool,
}

impl<J: Store, M: Store> State<J, M> {
    pub fn new(journal: Option<Journal<J>>, map: Option<RegionMap<M>>, overflowed: bool) -> Self {
        let durable_seq = journal.as_ref().map_or(0, |j| j.next_seq() - 1);
        State {
            journal,
            overflowed,
            map,
            journal_failed: false,
            waiting: 0,
            no_waiting: false,
            stopping: false,
            changed_since_mark: false,
            fenced: false,
            sync: None,
            waiters: Vec::new(),
            durable_seq,
            direct_unsynced: false,
            checkpoint_wanted: false,
            syncer_idle: false,
            apply_stop: false,
        }
    }

    fn head(&self) -> u64 {
        self.journal.as_ref().map_or(0, |j| j.next_seq() - 1)
    }
}

/// What the flusher has applied.
#[derive(Debug, Default)]
pub struct Applied {
    pub pending: Pending,
    /// Every change up to this sequence number is on the backing device (not necessarily
    /// durably).
    pub through: u64,
    /// Why the last apply failed (the change stays pending and is tried again).
    pub error: Option<String>,
}

/// A volume's tracking state and the flusher's, shared by its connections, its flusher
/// thread and the admin requests. Lock order: `state`, then `applied`.
#[derive(Debug)]
pub struct Shared<J: Store, M: Store> {
    pub state: Mutex<State<J, M>>,
    /// Wakes the syncer (the flusher's first half).
    pub wake: Condvar,
    /// Wakes the applier (its second half).
    pub apply_wake: Condvar,
    /// Wakes writes waiting for journal space, or for the log to stop.
    pub space: Condvar,
    pub applied: Mutex<Applied>,
    /// Signalled whenever changes were applied.
    pub applied_cv: Condvar,
    /// Another handle on the journal's store: its syncs and superblock writes need no lock.
    pub jstore: J,
    /// The journal's path (logs, the release file beside it).
    pub path: PathBuf,
    /// Most data bytes held in memory unapplied before writers wait.
    pub pending_max: u64,
    /// Held for a whole [`Shared::cycle`]: one applier at a time, so changes reach the
    /// backing device in order.
    cycling: Mutex<()>,
    /// Checkpoints asked of the checkpointer thread, when one runs ([`Shared::checkpointer`]);
    /// without it (tests), the flusher's round checkpoints itself.
    ckpt: Mutex<Checkpoints>,
    ckpt_cv: Condvar,
    /// Held for a whole [`Shared::checkpoint`]: one superblock write at a time.
    checkpointing: Mutex<()>,
    /// Where the syncer publishes the durable head for the shipper (none in tests): held
    /// while writing, so that two rounds never leave the lower head.
    mark: Option<Mutex<Published<J>>>,
    /// The syncer syncs at most once per this long while nobody waits for it
    /// ([`Shared::with_sync_interval`]; zero: as soon as records wait).
    sync_interval: Duration,
    /// Someone needs the syncer now: memory or journal space runs short, or the volume stops.
    hurry: AtomicBool,
}

/// The durable mark and what the syncer last wrote into it.
#[derive(Debug)]
struct Published<J> {
    mark: DurableMark<J>,
    /// `None` until the first write since the tracker started.
    said: Option<u64>,
    /// A write failed (logged once, until one succeeds again).
    failed: bool,
}

/// The checkpointer's queue.
#[derive(Debug, Default)]
struct Checkpoints {
    /// A checkpoint through this sequence number is wanted.
    wanted: Option<u64>,
    /// A checkpointer thread takes them.
    background: bool,
    stopping: bool,
}

/// What became of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Journaled with this sequence number, and pending.
    Journaled(u64),
    /// Written to the backing device, its regions durably dirty.
    Direct,
}

impl<J: Store, M: Store> Shared<J, M> {
    pub fn new(state: State<J, M>, jstore: J, path: PathBuf, pending_max: u64) -> Self {
        let through = state.head();
        Shared {
            state: Mutex::new(state),
            wake: Condvar::new(),
            apply_wake: Condvar::new(),
            space: Condvar::new(),
            applied: Mutex::new(Applied {
                through,
                ..Applied::default()
            }),
            applied_cv: Condvar::new(),
            jstore,
            path,
            pending_max,
            cycling: Mutex::new(()),
            ckpt: Mutex::default(),
            ckpt_cv: Condvar::new(),
            checkpointing: Mutex::new(()),
            mark: None,
            sync_interval: Duration::ZERO,
            hurry: AtomicBool::new(false),
        }
    }

    /// Lets records wait up to `interval` for their journal sync while nobody waits for one
    /// (no FLUSH or FUA, memory and journal space to spare): fewer, larger syncs. What an
    /// acknowledged write risks is unchanged (its record is in the journal file, which a
    /// kill -9 keeps; a power loss takes what no FLUSH covered, as with any disk's write
    /// cache); the shipper and the applier see it up to `interval` later.
    pub fn with_sync_interval(mut self, interval: Duration) -> Self {
        self.sync_interval = interval;
        self
    }

    /// Publishes the durable head in `mark` after every sync of the journal
    /// ([`crate::journal::mark`]).
    pub fn with_durable_mark(mut self, mark: DurableMark<J>) -> Self {
        self.mark = Some(Mutex::new(Published {
            mark,
            said: None,
            failed: false,
        }));
        self
    }

    /// Tells readers that every record through `seq` is durable. The mark never goes back:
    /// a `seq` at or below what it says already is not written.
    pub fn publish_durable(&self, seq: u64) {
        let Some(p) = &self.mark else { return };
        let mut p = p.lock().unwrap();
        // Not written since the tracker started: the first write is always made.
        if p.said.is_some_and(|said| seq <= said) {
            return;
        }
        match p.mark.publish(seq) {
            Ok(()) => {
                p.said = Some(seq);
                if std::mem::take(&mut p.failed) {
                    info!(
                        "journal={}: durable mark {} written again (seq {seq})",
                        self.name(),
                        p.mark.path().display()
                    );
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut p.failed, true) {
                    error!(
                        "journal={}: cannot write its durable mark {}: {e}; the shipper ships \
                         nothing beyond what it said last until it can (check the disk of the \
                         journal directory)",
                        self.name(),
                        p.mark.path().display()
                    );
                }
            }
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State<J, M>> {
        self.state.lock().unwrap()
    }

    fn name(&self) -> std::path::Display<'_> {
        self.path.display()
    }

    /// The write path of one change: its record appended to the journal and the change made
    /// pending (visible to reads), or, when the journal takes no records, its regions made
    /// durably dirty and the change written to the backing device. Never syncs the journal
    /// or the backing device. Application changes only while the volume is not fenced; a
    /// failback's (`failback`) only while it is.
    pub fn record<B: Backing + ?Sized>(
        &self,
        backing: &B,
        mut c: Change,
        on_full: OnFull,
        failback: bool,
    ) -> io::Result<Recorded> {
        self.wait_for_memory();
        let kind = kind_of(&c);
        let len = u32::try_from(c.len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut st = self.lock();
        let mut waited = false;
        let r = loop {
            if st.stopping || st.journal.is_none() && st.map.is_none() {
                break Err(io::Error::from_raw_os_error(libc::ESHUTDOWN));
            }
            // Checked on every pass: a write that waited for journal space must not land
            // after a fence's final point.
            if st.fenced != failback {
                break Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            if st.overflowed || st.journal.is_none() {
                if !self.applied.lock().unwrap().pending.is_empty() {
                    // Journaled changes go first (invariant O): a round of the flusher's
                    // work, here, once, when the journal stops taking records.
                    drop(st);
                    self.cycle(backing, false)?;
                    st = self.lock();
                    continue;
                }
                if let Some(map) = st.map.as_mut() {
                    map.mark_dirty_durably(c.offset, c.len)?;
                }
                st.direct_unsynced = true;
                break apply_change(backing, &c).map(|()| Recorded::Direct);
            }
            let payload: &[u8] = match &c.content {
                Content::Data(d) => d,
                Content::Zero { .. } => &[],
            };
            let j = st.journal.as_mut().expect("checked");
            let too_big = record_size(if payload.is_empty() { 0 } else { len }) > j.full_limit();
            match j.append(kind, c.offset, len, payload) {
                Ok(seq) => {
                    c.seq = seq;
                    self.applied.lock().unwrap().pending.push(c);
                    // A wake-up is a system call: only for a flusher that sleeps.
                    if std::mem::take(&mut st.syncer_idle) {
                        self.wake.notify_one();
                    }
                    break Ok(Recorded::Journaled(seq));
                }
                Err(JournalError::Unapplied { .. }) => {
                    // The shipper released the space; a checkpoint frees it. The applier asks
                    // for one long before this (a quarter of the ring); a ring this full of
                    // unapplied changes is applied and checkpointed here, by the writer.
                    let used = j.used();
                    drop(st);
                    self.cycle(backing, false)?;
                    let through = self.applied.lock().unwrap().through;
                    self.checkpoint(backing, through, false)?;
                    st = self.lock();
                    if st.journal.as_ref().is_some_and(|j| j.used() >= used) {
                        let why = self.applied.lock().unwrap().error.clone();
                        break Err(io::Error::other(format!(
                            "journal {}: no space can be reclaimed: {}",
                            self.name(),
                            why.as_deref()
                                .unwrap_or("the checkpoint did not move the tail")
                        )));
                    }
                }
                Err(JournalError::Full { .. }) if on_full == OnFull::Block && !too_big => {
                    if st.no_waiting {
                        break Err(io::Error::from_raw_os_error(libc::ESHUTDOWN));
                    }
                    if !waited {
                        waited = true;
                        st.waiting += 1;
                        if st.waiting == 1 {
                            warn!(
                                "journal={}: the journal is full: writes wait until the shipper \
                                 releases records (journal.on_full = \"block\")",
                                self.name()
                            );
                        }
                    }
                    // The applier looks at the release file and moves the tail.
                    self.want_checkpoint(&mut st);
                    st = self.space.wait_timeout(st, SPACE_POLL).unwrap().0;
                }
                Err(JournalError::Full { capacity, .. }) if too_big => {
                    warn!(
                        "journal={}: a {len}-byte change does not fit even in the empty \
                         journal ({capacity} bytes): tracking dirty regions instead; the volume \
                         needs a resync (use a larger --journal-size)",
                        self.name()
                    );
                    st.overflowed = true;
                }
                Err(JournalError::Full { capacity, .. }) => {
                    warn!(
                        "journal={}: the journal is full ({capacity} bytes unreleased): \
                         tracking dirty regions instead; the volume needs a resync",
                        self.name()
                    );
                    st.overflowed = true;
                }
                Err(e) => {
                    self.fail_journal(&mut st, &e.to_string());
                }
            }
        };
        if r.is_ok() {
            st.changed_since_mark = true;
        }
        if waited {
            st.waiting -= 1;
            if st.waiting == 0 && r.is_ok() {
                info!("journal={}: space released, writes resume", self.name());
            }
        }
        r
    }

    /// Asks the applier for a checkpoint (a writer waits for the space it frees, or the
    /// shipper released some).
    pub fn want_checkpoint(&self, st: &mut State<J, M>) {
        st.checkpoint_wanted = true;
        // The checkpoint frees only what is applied, and only durable records are.
        self.hurry.store(true, Ordering::Relaxed);
        self.wake.notify_one();
        self.apply_wake.notify_one();
    }

    /// Wakes the syncer and the applier: someone waits for changes to be durable and applied.
    fn kick(&self) {
        self.hurry.store(true, Ordering::Relaxed);
        self.wake.notify_one();
        self.apply_wake.notify_one();
    }

    /// True while the changes waiting to be applied hold more than half of `pending_max`:
    /// the syncer does not pace its syncs then (the applier applies only durable changes).
    fn memory_short(&self) -> bool {
        self.applied.lock().unwrap().pending.bytes() > self.pending_max / 2
    }

    /// Holds a writer while the changes waiting to be applied hold more than
    /// `pending_max` bytes (back-pressure: memory stays bounded).
    fn wait_for_memory(&self) {
        let mut a = self.applied.lock().unwrap();
        // Half the memory held: the syncer stops pacing ([`Shared::memory_short`]); one
        // wake-up per sync.
        if a.pending.bytes() > self.pending_max / 2 && !self.hurry.swap(true, Ordering::Relaxed) {
            self.wake.notify_one();
        }
        while a.pending.bytes() > self.pending_max {
            self.kick();
            a = self.applied_cv.wait_timeout(a, IDLE_TICK).unwrap().0;
        }
    }

    /// The journal cannot be written or synced: the ranges of every change it may have lost
    /// (all that are pending) become durably dirty, and the journal takes no more records
    /// until a resync. The pending changes are still applied.
    pub fn fail_journal(&self, st: &mut State<J, M>, why: &str) {
        if !st.journal_failed {
            error!(
                "journal={}: the journal failed ({why}): tracking dirty regions instead; the \
                 volume needs a resync",
                self.name()
            );
        }
        st.journal_failed = true;
        st.overflowed = true;
        if let Some(map) = st.map.as_mut() {
            for c in self.applied.lock().unwrap().pending.up_to(u64::MAX) {
                map.mark_dirty(c.offset, c.len);
            }
            if let Err(e) = map.persist_dirty() {
                error!(
                    "journal={}: cannot make the dirty regions durable: {e}",
                    self.name()
                );
            }
        }
    }

    /// Writes what the journal holds in memory to its file (not durably): what a reply to a
    /// change waits for, and what the shipper reads.
    pub fn write_out(&self, st: &mut State<J, M>) {
        let Some(j) = st.journal.as_mut() else {
            return;
        };
        if st.journal_failed {
            return;
        }
        if let Err(e) = j.write_out() {
            self.fail_journal(st, &e.to_string());
        }
    }

    /// Calls `done` once every change recorded so far is durable: at once when it already
    /// is, else after the flusher's next sync (shared by every caller in the meantime).
    pub fn when_durable(&self, done: Done) {
        let mut st = self.lock();
        if st.head() <= st.durable_seq && !st.direct_unsynced {
            drop(st);
            done(Ok(()));
            return;
        }
        st.waiters.push(Waiter(done));
        self.wake.notify_one();
    }

    /// Waits until every change recorded so far is durable.
    pub fn sync(&self) -> io::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.when_durable(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.recv()
            .unwrap_or_else(|_| Err(io::Error::from_raw_os_error(libc::ESHUTDOWN)))
    }

    /// Waits until every change recorded so far is applied to the backing device.
    pub fn settle(&self) -> io::Result<()> {
        let mut a = self.applied.lock().unwrap();
        while !a.pending.is_empty() {
            if let Some(e) = &a.error {
                return Err(io::Error::other(format!(
                    "journal {}: changes cannot be applied to the backing device: {e}",
                    self.name()
                )));
            }
            self.kick();
            a = self.applied_cv.wait_timeout(a, IDLE_TICK).unwrap().0;
        }
        Ok(())
    }

    /// True when the syncer has something to do.
    fn sync_due(st: &State<J, M>) -> bool {
        !st.waiters.is_empty() || st.head() > st.durable_seq
    }

    /// True when the applier has something to do: durable changes to apply, or space wanted.
    fn apply_due(&self, st: &State<J, M>) -> bool {
        st.checkpoint_wanted
            || self
                .applied
                .lock()
                .unwrap()
                .pending
                .first_seq()
                .is_some_and(|s| s <= st.durable_seq)
    }

    /// One round of both halves of the flusher, one after the other (what the threads do
    /// side by side; tests and the rare inline rounds call this): [`Shared::sync_round`], then
    /// [`Shared::apply_round`]. Returns whether it checkpointed.
    pub fn cycle<B: Backing + ?Sized>(&self, backing: &B, checkpoint: bool) -> io::Result<bool> {
        let (head, synced) = self.sync_round(backing);
        self.apply_round(backing, head, checkpoint, synced)
    }

    /// The syncer's round: the journal written out and synced once for every record appended
    /// so far, then every FLUSH and FUA that was waiting answered. Those that need the backing
    /// device too (changes went straight to it, or the journal failed) are answered after the
    /// pending changes are applied and the device synced. Returns the head it made durable
    /// and whether it synced the backing device.
    pub fn sync_round<B: Backing + ?Sized>(&self, backing: &B) -> (u64, bool) {
        let (head, waiters, direct, mut failed, was_durable) = {
            let mut st = self.lock();
            self.write_out(&mut st);
            let direct = std::mem::take(&mut st.direct_unsynced);
            let waiters = std::mem::take(&mut st.waiters);
            (
                st.head(),
                waiters,
                direct,
                st.journal_failed,
                st.durable_seq,
            )
        };
        if !failed && head > was_durable {
            if let Err(e) = self.jstore.sync() {
                self.fail_journal(&mut self.lock(), &format!("sync: {e}"));
                failed = true;
            }
        }
        let mut synced = false;
        if !failed && !direct {
            for w in waiters {
                (w.0)(Ok(()));
            }
        } else {
            let applied = {
                let _one = self.cycling.lock().unwrap();
                self.apply_through(backing, head)
            };
            let r = applied.and_then(|()| backing.sync());
            synced = r.is_ok();
            for w in waiters {
                (w.0)(r.as_ref().map(|_| ()).map_err(copy_err));
            }
        }
        {
            let mut st = self.lock();
            st.durable_seq = st.durable_seq.max(head);
            // Without a sync of the backing device here, the next FLUSH needs one.
            st.direct_unsynced |= (direct || failed) && !synced;
        }
        if !failed && head > was_durable {
            self.publish_durable(head);
        }
        self.apply_wake.notify_one();
        self.space.notify_all();
        (head, synced)
    }

    /// The applier's round: the pending changes up to `durable` (the syncer made their
    /// records durable) applied in order, then a checkpoint when one is due (or
    /// `checkpoint`). Returns whether it checkpointed.
    pub fn apply_round<B: Backing + ?Sized>(
        &self,
        backing: &B,
        durable: u64,
        checkpoint: bool,
        synced: bool,
    ) -> io::Result<bool> {
        let _one = self.cycling.lock().unwrap();
        let _ = self.apply_through(backing, durable);
        self.space.notify_all();
        self.maybe_checkpoint(backing, checkpoint, synced)
    }

    /// Applies the pending changes up to `head` in order; stops at the first that fails
    /// (it stays pending, and is tried again by the next cycle).
    fn apply_through<B: Backing + ?Sized>(&self, backing: &B, head: u64) -> io::Result<()> {
        let changes = self.applied.lock().unwrap().pending.up_to(head);
        let mut last = None;
        let mut err = None;
        for c in &changes {
            match apply_change(backing, c) {
                Ok(()) => last = Some(c.seq),
                Err(e) => {
                    err = Some((c.seq, e));
                    break;
                }
            }
        }
        let mut a = self.applied.lock().unwrap();
        if let Some(s) = last {
            a.pending.applied(s);
        }
        let r = match err {
            None => {
                a.through = a.through.max(head);
                if a.error.take().is_some() {
                    info!(
                        "journal={}: changes apply to the backing device again",
                        self.name()
                    );
                }
                Ok(())
            }
            Some((seq, e)) => {
                a.through = a.through.max(seq - 1);
                if a.error.is_none() {
                    error!(
                        "journal={} seq={seq}: cannot apply a change to the backing device \
                         ({e}); it stays in memory and in the journal and is tried again; \
                         reads still see it",
                        self.name()
                    );
                }
                a.error = Some(e.to_string());
                Err(e)
            }
        };
        drop(a);
        self.applied_cv.notify_all();
        r
    }

    /// Looks at the release file, then checkpoints when due: the backing device synced, then
    /// the superblock written with the applied position and the tail moved.
    fn maybe_checkpoint<B: Backing + ?Sized>(
        &self,
        backing: &B,
        force: bool,
        backing_synced: bool,
    ) -> io::Result<bool> {
        let released = match read_release(&self.path) {
            Ok(r) => r,
            Err(e) => {
                warn!("journal={}: {e}; not releasing", self.name());
                None
            }
        };
        let through = self.applied.lock().unwrap().through;
        {
            let mut st = self.lock();
            let failed = st.journal_failed;
            let wanted = std::mem::take(&mut st.checkpoint_wanted);
            let Some(j) = st.journal.as_mut() else {
                return Ok(false);
            };
            if let Some(seq) = released {
                j.set_released(seq);
            }
            let cap = j.capacity();
            let due = force || wanted || j.unchecked() > cap / 4 || j.reclaimable() > cap / 8;
            if !due || failed {
                return Ok(false);
            }
        }
        {
            let mut c = self.ckpt.lock().unwrap();
            if c.background {
                c.wanted = Some(c.wanted.map_or(through, |w| w.max(through)));
                self.ckpt_cv.notify_one();
                return Ok(false);
            }
        }
        self.checkpoint(backing, through, backing_synced)
    }

    /// A checkpoint: the backing device synced (unless `synced` already), then the superblock
    /// written with every change through `through` needing no replay, and the tail moved.
    fn checkpoint<B: Backing + ?Sized>(
        &self,
        backing: &B,
        through: u64,
        synced: bool,
    ) -> io::Result<bool> {
        let _one = self.checkpointing.lock().unwrap();
        if !synced {
            backing.sync()?;
        }
        let sb = {
            let mut st = self.lock();
            let Some(j) = st.journal.as_mut() else {
                return Ok(false);
            };
            j.set_checkpoint(through + 1);
            j.stage()
        };
        if let Some(sb) = sb {
            write_superblock_to(&self.jstore, &sb)?;
            if let Some(j) = self.lock().journal.as_mut() {
                j.commit(sb);
            }
        }
        self.space.notify_all();
        Ok(true)
    }

    /// The checkpointer thread's loop: the checkpoints the flusher asks for, off its path (a
    /// sync of the backing device can take seconds when much is dirty; FLUSH and FUA go on
    /// being answered meanwhile). Ends at [`Shared::stop_checkpointer`].
    pub fn checkpointer<B: Backing + ?Sized>(&self, backing: &B) {
        self.ckpt.lock().unwrap().background = true;
        loop {
            let through = {
                let mut c = self.ckpt.lock().unwrap();
                loop {
                    if let Some(t) = c.wanted.take() {
                        break t;
                    }
                    if c.stopping {
                        c.background = false;
                        return;
                    }
                    c = self.ckpt_cv.wait(c).unwrap();
                }
            };
            if let Err(e) = self.checkpoint(backing, through, false) {
                warn!("journal={}: checkpoint: {e}", self.name());
                std::thread::sleep(IDLE_TICK);
            }
        }
    }

    /// Ends the checkpointer once it has done what was asked.
    pub fn stop_checkpointer(&self) {
        self.ckpt.lock().unwrap().stopping = true;
        self.ckpt_cv.notify_all();
    }

    /// The syncer thread's loop (the flusher's first half): a [`Shared::sync_round`] whenever
    /// records wait to be made durable or replies wait for it, at most once per sync interval
    /// unless someone waits for it (a FLUSH or FUA, a writer short of memory or journal
    /// space, the volume stopping); ends once the log is stopping and nothing is left to sync.
    pub fn syncer<B: Backing + ?Sized>(&self, backing: &B) {
        let mut last: Option<Instant> = None;
        loop {
            {
                let mut st = self.lock();
                while !Self::sync_due(&st) {
                    if st.stopping {
                        return;
                    }
                    st.syncer_idle = true;
                    st = self.wake.wait_timeout(st, IDLE_TICK).unwrap().0;
                    st.syncer_idle = false;
                }
                while let Some(left) = last
                    .map(|t| self.sync_interval.saturating_sub(t.elapsed()))
                    .filter(|left| !left.is_zero())
                {
                    if !st.waiters.is_empty()
                        || st.stopping
                        || self.hurry.load(Ordering::Relaxed)
                        || self.memory_short()
                    {
                        break;
                    }
                    st = self.wake.wait_timeout(st, left).unwrap().0;
                }
            }
            self.hurry.store(false, Ordering::Relaxed);
            last = Some(Instant::now());
            self.sync_round(backing);
        }
    }

    /// The applier thread's loop (the flusher's second half): a [`Shared::apply_round`]
    /// whenever durable changes wait, space is wanted, or [`CHECKPOINT_INTERVAL`] passed while
    /// the volume changes; ends at [`Shared::stop_applier`] once nothing it can apply is left.
    pub fn applier<B: Backing + ?Sized>(&self, backing: &B) {
        let mut last = Instant::now();
        loop {
            let durable = {
                let mut st = self.lock();
                loop {
                    if self.apply_due(&st) || last.elapsed() >= CHECKPOINT_INTERVAL {
                        break;
                    }
                    if st.apply_stop {
                        return;
                    }
                    st = self.apply_wake.wait_timeout(st, IDLE_TICK).unwrap().0;
                }
                st.durable_seq
            };
            if self.applied.lock().unwrap().error.is_some() {
                // The device refuses a change: try again now and then, not in a loop.
                std::thread::sleep(IDLE_TICK);
                if self.lock().apply_stop {
                    return;
                }
            }
            let periodic = last.elapsed() >= CHECKPOINT_INTERVAL;
            if periodic {
                last = Instant::now();
            }
            match self.apply_round(backing, durable, periodic, false) {
                Ok(true) => last = Instant::now(),
                Ok(false) => {}
                Err(e) => {
                    warn!("journal={}: applier: {e}", self.name());
                    std::thread::sleep(IDLE_TICK);
                }
            }
        }
    }

    /// Ends the applier once it applied what it can (after the syncer ended).
    pub fn stop_applier(&self) {
        self.lock().apply_stop = true;
        self.apply_wake.notify_all();
    }
}

fn copy_err(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(n) => io::Error::from_raw_os_error(n),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// Applies the change records that `scan` reads, from sequence number `from` on, to
/// `backing` in order, until the chain ends (`scan.end()` says why). Returns how many.
pub fn apply_records<S: Store, B: Backing + ?Sized>(
    scan: &mut Scanner<'_, S>,
    from: u64,
    backing: &B,
) -> Result<u64, JournalError> {
    let mut n = 0u64;
    while let Some(r) = scan.next_record() {
        let r = r?;
        let h = r.header;
        if h.seq < from {
            continue;
        }
        let len = u64::from(h.length);
        match h.kind {
            Kind::Write => backing.write(h.offset, &r.payload)?,
            Kind::Trim => backing.zero(h.offset, len, true, true)?,
            Kind::Zero => backing.zero(h.offset, len, false, false)?,
            Kind::Marker | Kind::Pad | Kind::Sync | Kind::Decision => continue,
        }
        n += 1;
    }
    Ok(n)
}

/// Start-up after an unclean stop: applies the records from the journal's checkpoint on to
/// the backing device, in order. The checkpoint stays where it is until the next one (which
/// syncs the device first): a crash before then replays them again, which gives the same
/// bytes. Returns how many records were replayed.
pub fn replay<J: Store, B: Backing + ?Sized>(
    journal: &mut Journal<J>,
    backing: &B,
    name: &Path,
) -> Result<u64, JournalError> {
    let from = journal.checkpoint_seq();
    let sb = *journal.superblock();
    // From the last remembered record start before the checkpoint, not from the tail.
    let (seq, pos) = journal.start_at_or_before(from);
    let mut scan = Scanner::new(journal.store(), &sb, pos, seq);
    let n = apply_records(&mut scan, from, backing)?;
    if n > 0 {
        info!(
            "journal={}: replayed {n} changes from seq {from} onto the backing device",
            name.display()
        );
    }
    Ok(n)
}
