//! Change tracking for one volume: every write, trim and zero the tracker acknowledges is in
//! the volume's journal before it reaches the backing device; when the journal is full the
//! volume falls back to a dirty-region map and needs a resync.
//!
//! The journal is a write-ahead log ([`wal`], docs/FORMAT.md "The write-ahead rule"): a change
//! is appended and made pending under the volume's lock, and its reply leaves once the record
//! is in the journal file. The volume's flusher thread syncs the journal once for everything
//! appended, then applies the changes to the backing device in journal order (invariant O),
//! so no byte reaches the device before its record is durable (invariant J); it checkpoints the
//! device before journal space is reused, and start-up replays what follows the checkpoint.
//! No sync of any file is on the path of an ordinary write; FLUSH and FUA wait for the
//! flusher's next journal sync, which every request waiting shares.
//!
//! When the journal is full, [`OnFull`] decides: dirty regions (writes go on, a resync
//! follows) or back-pressure (writes wait, without the lock, for the shipper to release).

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{error, info, warn};
use serde::{Deserialize, Serialize};

use crate::journal::format::{Kind, MIN_FILE_SIZE, MarkerInfo, PointKind, SyncInfo, SyncRole};
use crate::journal::inspect::find_damage;
use crate::journal::mark::{DurableMark, durable_path};
use crate::journal::reader::read_release;
use crate::journal::{Journal, JournalError, Policy, Store, read_superblock};
use crate::nbd::IoOp;

pub mod gate;
pub mod map;
pub mod pending;
pub mod queue;
pub mod volume;
pub mod wal;

use gate::Gate;
use map::RegionMap;
use pending::{Change, Content};
use wal::{Shared, State};

/// Default size of a volume's dirty region.
pub const DEFAULT_REGION: u64 = 64 * 1024;

/// How a volume's change log is set up (`[tracker.journal]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// Size of a new journal file.
    pub size: u64,
    pub on_full: OnFull,
    /// Dirty-region size of a new region map (an existing map keeps its own).
    pub region: u64,
    /// The journal counts as full once this percentage of its capacity is unreleased.
    pub full_percent: u8,
    /// The volume takes part in the tracker's consistency group: its replies pass a gate.
    pub grouped: bool,
    /// Most bytes of acknowledged writes held in memory until the flusher applied them;
    /// writers wait beyond (back-pressure).
    pub pending_max: u64,
    /// Longest a record waits for the journal's sync while nobody waits for one
    /// ([`wal::Shared::with_sync_interval`]).
    pub sync_interval: Duration,
}

/// Default of [`LogOptions::size`] (docs/CONFIG.md: what a larger or smaller journal costs).
pub const DEFAULT_JOURNAL_SIZE: u64 = 4 << 30;

/// Default of [`LogOptions::pending_max`].
pub const DEFAULT_PENDING_MAX: u64 = 128 << 20;

/// Default of [`LogOptions::sync_interval`], in milliseconds (docs/CONFIG.md).
pub const DEFAULT_SYNC_INTERVAL_MS: u64 = 100;

impl Default for LogOptions {
    fn default() -> LogOptions {
        LogOptions {
            size: DEFAULT_JOURNAL_SIZE,
            on_full: OnFull::Bitmap,
            region: DEFAULT_REGION,
            full_percent: 100,
            grouped: false,
            pending_max: DEFAULT_PENDING_MAX,
            sync_interval: Duration::from_millis(DEFAULT_SYNC_INTERVAL_MS),
        }
    }
}

/// Checks a dirty-region size: a power of two from 4 KiB to the 4 MiB extent.
pub fn check_region(region: u64) -> Result<u64, String> {
    if region.is_power_of_two() && (4096..=map::DEFAULT_EXTENT).contains(&region) {
        Ok(region)
    } else {
        Err(format!(
            "region size {region}: expected a power of two from 4K to 4M, e.g. 64K"
        ))
    }
}

/// What a volume does when its journal is full (`journal.on_full`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFull {
    /// Keep writing at full speed; track the changes as dirty regions (a resync follows).
    #[default]
    Bitmap,
    /// Hold each write until the shipper releases enough of the journal (back-pressure).
    Block,
}

impl std::str::FromStr for OnFull {
    type Err = String;
    fn from_str(s: &str) -> Result<OnFull, String> {
        match s {
            "bitmap" => Ok(OnFull::Bitmap),
            "block" => Ok(OnFull::Block),
            _ => Err(format!("{s:?}: expected \"bitmap\" or \"block\"")),
        }
    }
}

/// Replication state of a volume as the tracker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackState {
    /// Every acknowledged change is in the journal.
    Protected,
    /// Some changes are only known as dirty regions: a resync must bring the replica back.
    ResyncRequired,
    /// Changes are not tracked (`--no-journal`, or no journal directory).
    Untracked,
}

/// Journal figures for the admin socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalStatus {
    pub path: String,
    pub capacity: u64,
    pub used_bytes: u64,
    /// Last sequence number written (0 before the first).
    pub head_seq: u64,
    /// Records up to this sequence number are released.
    pub released_seq: u64,
    pub on_full: OnFull,
    /// Writes held until the shipper releases journal space (`on_full = "block"`).
    pub waiting_writes: u64,
    /// Bytes of acknowledged writes not yet applied to the backing device (held in memory).
    #[serde(default)]
    pub pending_bytes: u64,
    /// Start-up after a crash would replay the records from this sequence number on.
    #[serde(default)]
    pub checkpoint_seq: u64,
}

/// A block-checksum synchronisation of a volume's dirty ranges (docs/PROTOCOL.md,
/// "Synchronisation"), as the tracker hands it to the shipper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncJob {
    pub job: u64,
    /// The begin record's sequence number.
    pub begin_seq: u64,
    /// What to synchronise: the dirty ranges when the job began (or the whole volume).
    pub ranges: Vec<(u64, u64)>,
    pub full: bool,
    /// The backing device or file the shipper reads the source blocks from.
    #[serde(default)]
    pub path: String,
}

/// The change log of one volume.
#[derive(Debug)]
pub struct ChangeLog {
    path: PathBuf,
    map_path: PathBuf,
    shared: Arc<Shared<File, File>>,
    /// The backing file or device the flusher applies changes to.
    backing: Arc<File>,
    /// The syncer, the applier and the checkpointer ([`wal`]), in that order.
    threads: Mutex<Vec<JoinHandle<()>>>,
    on_full: OnFull,
    /// Points placed (crash, app) and app-consistent points that failed.
    points: [AtomicU64; 2],
    points_failed: AtomicU64,
    /// Replies held for consistency-group points ([`ChangeLog::mark_group`]); only a volume
    /// of the group has one, so no other pays for it on its replies.
    gate: Option<Arc<Gate>>,
}

/// Why a journal could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("Journal {path}: {source}")]
    Journal {
        path: PathBuf,
        #[source]
        source: JournalError,
    },
    #[error("Cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "Journal {path} belongs to a volume of {journal} bytes, but this volume has {volume}: \
         move the journal away (the replica then needs a full resync) or serve the right volume"
    )]
    SizeMismatch {
        path: PathBuf,
        journal: u64,
        volume: u64,
    },
    #[error("Region map {path}: {reason} (move it away: the volume then needs a full resync)")]
    Map { path: PathBuf, reason: String },
    #[error("Journal size {size} is too small: at least {min} bytes")]
    TooSmall { size: u64, min: u64 },
}

fn random_uuid() -> [u8; 16] {
    let mut b = [0u8; 16];
    crate::journal::random_bytes(&mut b);
    b
}

/// `NAME.fenced` beside `NAME.journal`.
fn fence_path(journal: &Path) -> PathBuf {
    journal.with_extension("fenced")
}

/// `NAME.map` (the region map) beside `NAME.journal`.
pub fn map_path(journal: &Path) -> PathBuf {
    journal.with_extension("map")
}

/// `NAME.failback` beside `NAME.journal`: the blocks of a failback step, written by the
/// shipper, applied by the tracker ([`ChangeLog::apply_failback`]).
pub fn failback_path(journal: &Path) -> PathBuf {
    journal.with_extension("failback")
}

/// Wall-clock milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl ChangeLog {
    /// Opens `dir/NAME.journal` and `dir/NAME.map`, or creates them (the journal with
    /// `opts.size` bytes, preallocated). A new volume's map starts with `existing_data()`
    /// dirty, durably, before the journal exists: that is its initial replication. An
    /// existing journal's records after its checkpoint are replayed onto `backing` first.
    pub fn open_or_create(
        dir: &Path,
        name: &str,
        backing: Arc<File>,
        opts: &LogOptions,
        existing_data: &dyn Fn() -> io::Result<Vec<(u64, u64)>>,
    ) -> Result<ChangeLog, TrackError> {
        let volume_size = Store::size(&*backing).map_err(|e| TrackError::Create {
            path: dir.join(name),
            source: e,
        })?;
        let size = opts.size;
        let path = dir.join(format!("{name}.journal"));
        let map_path = map_path(&path);
        let jerr = |source| TrackError::Journal {
            path: path.clone(),
            source,
        };
        let cerr = |p: &Path, source| TrackError::Create {
            path: p.to_path_buf(),
            source,
        };
        // Damage in the middle of an existing journal is found (read-only) and its ranges
        // made durably dirty before the journal is opened: opening cuts the chain there, and
        // new records overwrite what followed.
        let existing = if path.exists() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| jerr(e.into()))?;
            let sb = read_superblock(&f).map_err(jerr)?;
            if sb.volume_size != volume_size {
                return Err(TrackError::SizeMismatch {
                    path,
                    journal: sb.volume_size,
                    volume: volume_size,
                });
            }
            let damage = find_damage(&f).map_err(jerr)?;
            Some((f, damage))
        } else {
            if size < MIN_FILE_SIZE {
                return Err(TrackError::TooSmall {
                    size,
                    min: MIN_FILE_SIZE,
                });
            }
            None
        };
        let mut map = if map_path.exists() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&map_path)
                .map_err(|e| cerr(&map_path, e))?;
            let (m, rec) = RegionMap::open(f, volume_size).map_err(|reason| TrackError::Map {
                path: map_path.clone(),
                reason,
            })?;
            if rec.hot_extents > 0 {
                warn!(
                    "region_map={}: unclean stop, {} hot extents of the volume need a resync",
                    map_path.display(),
                    rec.hot_extents
                );
            }
            m
        } else {
            std::fs::create_dir_all(dir).map_err(|e| cerr(dir, e))?;
            let fsize = RegionMap::<File>::file_size(volume_size, opts.region, map::DEFAULT_EXTENT);
            let f = create_preallocated(&map_path, fsize).map_err(|e| cerr(&map_path, e))?;
            let mut m = RegionMap::create(f, volume_size, opts.region, map::DEFAULT_EXTENT)
                .map_err(|e| cerr(&map_path, e))?;
            if existing.is_some() {
                // The map is created before its journal: a journal without one lost it, and
                // nothing tells which regions a crash touched.
                warn!(
                    "region_map={}: missing beside an existing journal: the whole volume \
                     needs a resync",
                    map_path.display()
                );
                m.mark_all_dirty();
                m.persist_dirty().map_err(|e| cerr(&map_path, e))?;
            } else {
                let data = existing_data().map_err(|e| cerr(&map_path, e))?;
                for &(o, l) in &data {
                    m.mark_dirty(o, l);
                }
                m.persist_dirty().map_err(|e| cerr(&map_path, e))?;
                if m.dirty_bytes() > 0 {
                    info!(
                        "volume={name}: new journal; {} bytes of existing data need an initial \
                         replication",
                        m.dirty_bytes()
                    );
                }
            }
            m
        };
        // The mark exists before a new journal does, and says nothing beyond what the
        // journal opened below holds until it is published again.
        let mark_path = durable_path(&path);
        let mark = DurableMark::open(&path).map_err(|e| cerr(&mark_path, e))?;
        if existing.is_none() {
            mark.publish(0).map_err(|e| cerr(&mark_path, e))?;
        }
        let journal = match existing {
            Some((f, damage)) => {
                if let Some(d) = damage {
                    match &d.ranges {
                        Some(ranges) => {
                            for &(o, l) in ranges {
                                map.mark_dirty(o, l);
                            }
                        }
                        None => map.mark_all_dirty(),
                    }
                    map.persist_dirty().map_err(|e| cerr(&map_path, e))?;
                    error!(
                        "journal={}: record seq {} at file offset {} is damaged ({}); it and \
                         the {} records after it are dropped and {} of the volume is marked \
                         dirty{}: the volume needs a resync",
                        path.display(),
                        d.seq,
                        d.file_offset,
                        d.reason,
                        d.lost_records - 1,
                        if d.ranges.is_some() {
                            "the ranges they changed"
                        } else {
                            "all"
                        },
                        if d.ranges.is_some() {
                            ""
                        } else {
                            " (the damaged record's range cannot be trusted)"
                        },
                    );
                }
                let (mut j, _) = Journal::open(f, Policy::TolerateTornTail).map_err(jerr)?;
                if let Some(seq) = read_release(&path).map_err(|e| jerr(e.into()))? {
                    j.set_released(seq);
                }
                wal::replay(&mut j, &*backing, &path).map_err(jerr)?;
                // What the shipper released since the last superblock is given up now.
                j.move_tail().map_err(jerr)?;
                j
            }
            None => {
                let f = create_preallocated(&path, size).map_err(|e| cerr(&path, e))?;
                info!("journal={} size={size}: created", path.display());
                Journal::create(f, random_uuid(), volume_size).map_err(jerr)?
            }
        };
        let jstore = journal.store().try_clone().map_err(|e| jerr(e.into()))?;
        let overflowed = map.dirty_bytes() > 0;
        let mut journal = journal;
        journal
            .set_full_limit(journal.capacity() / 100 * u64::from(opts.full_percent.clamp(1, 100)));
        let head = journal.next_seq() - 1;
        let mut state = State::new(Some(journal), Some(map), overflowed);
        state.fenced = fence_path(&path).exists();
        // Every record the journal kept is durable now: opening it synced them.
        let shared = Shared::new(state, jstore, path.clone(), opts.pending_max)
            .with_durable_mark(mark)
            .with_sync_interval(opts.sync_interval);
        shared.publish_durable(head);
        let shared = Arc::new(shared);
        let spawn = |what: &str, run: fn(&Shared<File, File>, &File)| {
            let shared = shared.clone();
            let backing = backing.clone();
            std::thread::Builder::new()
                .name(format!("{what}-{name}"))
                .spawn(move || run(&shared, &backing))
                .map_err(|e| cerr(&path, e))
        };
        let threads = vec![
            spawn("sync", Shared::syncer)?,
            spawn("apply", Shared::applier)?,
            spawn("ckpt", Shared::checkpointer)?,
        ];
        Ok(ChangeLog {
            path,
            map_path,
            shared,
            backing,
            threads: Mutex::new(threads),
            on_full: opts.on_full,
            points: Default::default(),
            points_failed: AtomicU64::new(0),
            gate: opts.grouped.then(Arc::default),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<File, File>> {
        self.shared.lock()
    }

    /// Records a write, trim or zero (taking its data) and makes it pending: once this
    /// returns, reads see it and it is in the journal's memory; its reply may leave after
    /// [`ChangeLog::write_out`], or, with FUA, after [`ChangeLog::when_durable`].
    pub fn record(&self, op: IoOp) -> io::Result<()> {
        let c = match op {
            IoOp::Write { offset, data, .. } => Change {
                seq: 0,
                offset,
                len: data.len() as u64,
                content: Content::Data(data),
            },
            IoOp::Trim { offset, len, .. } => Change {
                seq: 0,
                offset,
                len: u64::from(len),
                content: Content::Zero {
                    trim: true,
                    may_trim: true,
                },
            },
            IoOp::WriteZeroes {
                offset,
                len,
                may_trim,
                ..
            } => Change {
                seq: 0,
                offset,
                len: u64::from(len),
                content: Content::Zero {
                    trim: false,
                    may_trim,
                },
            },
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        if c.len == 0 {
            return Ok(());
        }
        self.shared
            .record(&*self.backing, c, self.on_full, false)
            .map(|_| ())
    }

    /// Writes every record appended so far into the journal file (not durably): after this,
    /// a killed tracker loses none of them (start-up replays them).
    pub fn write_out(&self) {
        let mut st = self.lock();
        self.shared.write_out(&mut st);
    }

    /// Calls `done` once every change recorded so far is durable (group commit with every
    /// other caller until the flusher's next journal sync).
    pub fn when_durable(&self, done: wal::Done) {
        self.shared.when_durable(done);
    }

    /// True when a change not yet applied to the backing device overlaps the range.
    pub fn overlaps_pending(&self, offset: u64, len: u64) -> bool {
        self.shared
            .applied
            .lock()
            .unwrap()
            .pending
            .overlaps(offset, len)
    }

    /// Reads `[offset, offset + len)` as the volume holds it: the backing device with the
    /// pending changes that overlap laid over it, oldest first.
    pub fn read_through(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let changes = self
            .shared
            .applied
            .lock()
            .unwrap()
            .pending
            .overlapping(offset, u64::from(len));
        let mut buf = crate::io::ops::read_at(&self.backing, offset, len)?;
        for c in &changes {
            c.overlay(offset, &mut buf);
        }
        Ok(buf)
    }

    /// Waits until every change recorded so far is applied to the backing device.
    pub fn settle(&self) -> io::Result<()> {
        self.shared.settle()
    }

    /// Refuses every write from now on (`EPERM`), durably (`NAME.fenced` beside the
    /// journal, so a restart keeps refusing), places a final crash-consistent marker after
    /// every write recorded so far, and makes the journal durable. Returns the marker's
    /// sequence number: the planned failover promotes it.
    pub fn fence(&self) -> io::Result<u64> {
        self.set_fenced(&mut self.lock())?;
        let seq = self
            .mark(PointKind::Crash, false)?
            .ok_or_else(|| io::Error::other("no point placed"))?;
        self.sync()?;
        // What the failback reads later is the backing device.
        self.settle()?;
        Ok(seq)
    }

    /// Refuses writes from now on, durably. Returns whether it did not already.
    fn set_fenced(&self, st: &mut State<File, File>) -> io::Result<bool> {
        if st.fenced {
            return Ok(false);
        }
        let f = fence_path(&self.path);
        std::fs::write(&f, b"writes refused: failed over to the target\n")
            .and_then(|()| File::open(&f)?.sync_all())
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", f.display())))?;
        st.fenced = true;
        warn!(
            "journal={}: fenced: writes are refused from now on",
            self.path.display()
        );
        Ok(true)
    }

    /// Takes writes again (after a failover was abandoned, or once the volume is the
    /// primary again).
    pub fn unfence(&self) -> io::Result<()> {
        self.clear_fenced(&mut self.lock())
    }

    fn clear_fenced(&self, st: &mut State<File, File>) -> io::Result<()> {
        let f = fence_path(&self.path);
        match std::fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", f.display()))),
        }
        st.fenced = false;
        Ok(())
    }

    pub fn fenced(&self) -> bool {
        self.lock().fenced
    }

    /// Applies the blocks a failback brought back (`NAME.failback` beside the journal,
    /// written by the shipper; docs/FORMAT.md) to the fenced volume: each is
    /// recorded in the journal like a write, then the backing file and the journal are made
    /// durable. Returns the last record's sequence number and the bytes applied.
    pub fn apply_failback(&self) -> io::Result<(u64, u64)> {
        if !self.fenced() {
            return Err(io::Error::other(
                "the volume takes writes: a failback only writes to a fenced (failed over) \
                 volume",
            ));
        }
        let path = failback_path(&self.path);
        let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let bytes = std::fs::read(&path).map_err(named)?;
        let size = self
            .lock()
            .journal
            .as_ref()
            .map(|j| j.superblock().volume_size)
            .ok_or_else(|| io::Error::other("changes are not journaled (--no-journal)"))?;
        let extents = crate::journal::format::decode_extents(&bytes, 0, size).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        let mut applied = 0;
        for x in extents {
            let content = match x.data {
                Some(d) => Content::Data(d.to_vec()),
                None => Content::Zero {
                    trim: false,
                    may_trim: false,
                },
            };
            let c = Change {
                seq: 0,
                offset: x.offset,
                len: u64::from(x.length),
                content,
            };
            self.shared.record(&*self.backing, c, self.on_full, true)?;
            applied += u64::from(x.length);
        }
        self.sync()?;
        self.settle()?;
        self.backing.sync_data()?;
        Ok((self.head()?, applied))
    }

    /// Points placed so far: crash-consistent, app-consistent, and app-consistent ones that
    /// failed (hook or marker).
    pub fn point_counts(&self) -> (u64, u64, u64) {
        (
            self.points[0].load(Ordering::Relaxed),
            self.points[1].load(Ordering::Relaxed),
            self.points_failed.load(Ordering::Relaxed),
        )
    }

    pub fn note_point_failed(&self) {
        self.points_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// A change was recorded since the last marker.
    pub fn changed_since_mark(&self) -> bool {
        self.lock().changed_since_mark
    }

    /// Appends a consistency marker (a recovery point of `kind`) after every change recorded
    /// so far, and returns its sequence number. With `only_if_changed`, nothing is placed
    /// (`Ok(None)`) when no change was recorded since the last marker. Fails when the journal
    /// does not take records (overflow or failure: the volume needs a resync first).
    pub fn mark(&self, kind: PointKind, only_if_changed: bool) -> io::Result<Option<u64>> {
        let mut guard = self.lock();
        let st = &mut *guard;
        if only_if_changed && !st.changed_since_mark {
            return Ok(None);
        }
        let seq = self.append_marker(st, kind, 0, "no recovery point can be placed")?;
        st.changed_since_mark = false;
        self.points[usize::from(kind == PointKind::App)].fetch_add(1, Ordering::Relaxed);
        Ok(Some(seq))
    }

    /// Appends the marker of consistency-group point `point` and, under the same lock, closes
    /// the volume's reply gate: from here on no reply leaves until [`ChangeLog::decide`]
    /// (docs/PROTOCOL.md, "Consistency groups"). With `fence`, writes are refused from the
    /// marker on (a planned failover of the group). Returns the marker's sequence number and
    /// whether this call fenced the volume.
    pub fn mark_group(&self, kind: PointKind, point: u64, fence: bool) -> io::Result<(u64, bool)> {
        let Some(gate) = &self.gate else {
            return Err(io::Error::other(
                "the volume is not in the consistency group",
            ));
        };
        let mut guard = self.lock();
        let fenced = fence && self.set_fenced(&mut guard)?;
        let seq = self
            .append_marker(
                &mut guard,
                kind,
                point,
                "it cannot take part in group points",
            )
            .inspect_err(|_| {
                if fenced {
                    let _ = self.clear_fenced(&mut guard);
                }
            })?;
        gate.hold(point);
        Ok((seq, fenced))
    }

    /// Appends a marker of `kind` (of group point `group_point`, 0: none). Refused while the
    /// log is stopping, or while the journal takes no records (`why`: what that prevents).
    fn append_marker(
        &self,
        st: &mut State<File, File>,
        kind: PointKind,
        group_point: u64,
        why: &str,
    ) -> io::Result<u64> {
        if st.stopping {
            return Err(io::Error::from_raw_os_error(libc::ESHUTDOWN));
        }
        self.takes_records(st, why)?;
        let payload = MarkerInfo {
            kind,
            unix_ms: unix_ms(),
            group_point,
        }
        .encode();
        self.append_note(st, Kind::Marker, (0, 0), &payload, "place a recovery point")
    }

    /// Fails, saying `why` matters, while the journal takes no records (overflow or failure:
    /// until the volume is resynced).
    fn takes_records(&self, st: &State<File, File>, why: &str) -> io::Result<()> {
        if st.overflowed || st.journal_failed {
            return Err(io::Error::other(format!(
                "journal {} takes no records until the volume is resynced: {why}",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// Records a group's decision (an encoded [`GroupDecision`](crate::journal::format::GroupDecision))
    /// on a point placed by [`ChangeLog::mark_group`]. Returns the record's sequence number.
    /// The gate stays closed until its [`Gate::release`]: the caller opens it whatever this
    /// returns (a point whose decision is not recorded is simply never complete on the
    /// target).
    pub fn decide(&self, decision: &[u8]) -> io::Result<u64> {
        let mut guard = self.lock();
        let st = &mut *guard;
        self.takes_records(st, "the decision is not recorded")?;
        self.append_note(
            st,
            Kind::Decision,
            (0, 0),
            decision,
            "record a group decision",
        )
    }

    /// The gate replies pass through (held during a group point's two phases), on a volume
    /// of the consistency group.
    pub fn gate(&self) -> Option<&Arc<Gate>> {
        self.gate.as_ref()
    }

    /// Appends a record that is not a change (a marker, a sync record) covering `range`, and
    /// tells the committer. An error says it could not `what`.
    fn append_note(
        &self,
        st: &mut State<File, File>,
        kind: Kind,
        range: (u64, u32),
        payload: &[u8],
        what: &str,
    ) -> io::Result<u64> {
        let Some(j) = st.journal.as_mut() else {
            return Err(io::Error::other("changes are not journaled (--no-journal)"));
        };
        let seq = j.append(kind, range.0, range.1, payload).map_err(|e| {
            io::Error::other(format!(
                "journal {}: cannot {what}: {e}",
                self.path.display()
            ))
        })?;
        // The flusher writes it out (where the shipper reads it) and syncs it.
        self.shared.wake.notify_one();
        Ok(seq)
    }

    /// Starts synchronising the volume's dirty ranges (all of it with `full`), or returns the
    /// job under way (a shipper that reconnects resumes it). Appends the job's begin record,
    /// after which the journal takes records again if it had overflowed: from that record on
    /// the replica is inconsistent until the job's end record.
    pub fn sync_begin(&self, full: bool) -> io::Result<SyncJob> {
        let mut guard = self.lock();
        let st = &mut *guard;
        if let Some(job) = st.sync.as_ref().filter(|j| !full || j.full) {
            return Ok(job.clone());
        }
        if st.stopping {
            return Err(io::Error::from_raw_os_error(libc::ESHUTDOWN));
        }
        if st.journal_failed {
            return Err(io::Error::other(format!(
                "journal {} failed: restart the tracker before synchronising",
                self.path.display()
            )));
        }
        let (Some(journal), Some(map)) = (st.journal.as_ref(), st.map.as_ref()) else {
            return Err(io::Error::other("changes are not journaled (--no-journal)"));
        };
        let ranges = if full {
            vec![(0, journal.superblock().volume_size)]
        } else {
            map.dirty_ranges()
        };
        // Room the shipper released since the journal overflowed.
        if let (Ok(Some(seq)), Some(j)) = (read_release(&self.path), st.journal.as_mut()) {
            j.set_released(seq);
            self.shared.want_checkpoint(st);
        }
        let mut id = [0u8; 8];
        crate::journal::random_bytes(&mut id);
        let job = u64::from_le_bytes(id).max(1);
        let payload = SyncInfo {
            role: SyncRole::Begin,
            job,
        }
        .encode();
        let begin_seq = self.append_note(
            st,
            Kind::Sync,
            (0, 0),
            &payload,
            "begin a synchronisation (the shipper must drain it first)",
        )?;
        st.map.as_mut().expect("checked").start_sync();
        st.overflowed = false;
        let job = SyncJob {
            job,
            begin_seq,
            ranges,
            full,
            path: String::new(),
        };
        st.sync = Some(job.clone());
        Ok(job)
    }

    /// Appends a sync record of `job` (a slot for `[offset, offset + length)`, or the end)
    /// and returns its sequence number: every change recorded before it has been applied to
    /// the backing device. Fails, and drops the job, when the journal overflowed again.
    pub fn sync_record(
        &self,
        job: u64,
        role: SyncRole,
        offset: u64,
        length: u32,
    ) -> io::Result<u64> {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.sync.as_ref().is_none_or(|j| j.job != job) {
            return Err(io::Error::other(format!(
                "volume journal {}: synchronisation {job} is not under way (the tracker \
                 restarted, or another began): begin again",
                self.path.display()
            )));
        }
        let appended = if st.overflowed || st.journal_failed {
            Err(io::Error::other(format!(
                "journal {}: it overflowed during the synchronisation",
                self.path.display()
            )))
        } else {
            let payload = SyncInfo { role, job }.encode();
            let what = format!("append to synchronisation {job}");
            self.append_note(st, Kind::Sync, (offset, length), &payload, &what)
        };
        let seq = appended
            .inspect_err(|_| {
                st.sync = None;
                if let Some(m) = st.map.as_mut() {
                    m.abort_sync();
                }
            })
            .map_err(|e| {
                io::Error::other(format!("{e}; the job stopped, its ranges stay dirty"))
            })?;
        drop(guard);
        // The shipper reads the slot's blocks from the backing device next.
        self.settle()?;
        Ok(seq)
    }

    /// The target holds `job`'s end record durably: the job's ranges are clean again (except
    /// regions dirtied since it began), durably.
    pub fn sync_done(&self, job: u64) -> io::Result<u64> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(j) = st.sync.take_if(|j| j.job == job) else {
            return Err(io::Error::other(format!(
                "journal {}: synchronisation {job} is not under way",
                self.path.display()
            )));
        };
        let map = st.map.as_mut().expect("a job needs a region map");
        map.finish_sync(&j.ranges)?;
        Ok(map.dirty_bytes())
    }

    /// The sequence number of the last record appended, once every change up to it has been
    /// applied to the backing device.
    pub fn head(&self) -> io::Result<u64> {
        let head = self
            .lock()
            .journal
            .as_ref()
            .map(|j| j.next_seq() - 1)
            .ok_or_else(|| io::Error::other("changes are not journaled (--no-journal)"))?;
        self.settle()?;
        Ok(head)
    }

    /// Makes writes that wait for journal space give up (with `ESHUTDOWN`) and refuses new
    /// ones that would wait: the tracker is stopping.
    pub fn stop_waiting(&self) {
        self.lock().no_waiting = true;
        self.shared.space.notify_all();
    }

    /// False once the journal failed (it takes no records until a resync).
    pub fn journal_usable(&self) -> bool {
        !self.lock().journal_failed
    }

    /// Waits until every change recorded so far is durable.
    pub fn sync(&self) -> io::Result<()> {
        self.shared.sync()
    }

    pub fn state(&self) -> TrackState {
        if self.dirty_bytes() > 0 {
            TrackState::ResyncRequired
        } else {
            TrackState::Protected
        }
    }

    pub fn dirty_bytes(&self) -> u64 {
        let st = self.lock();
        st.map.as_ref().map_or(0, |m| m.dirty_bytes())
    }

    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let st = self.lock();
        st.map.as_ref().map_or(Vec::new(), |m| m.dirty_ranges())
    }

    pub fn status(&self) -> Option<JournalStatus> {
        let st = self.lock();
        let pending_bytes = self.shared.applied.lock().unwrap().pending.bytes();
        st.journal.as_ref().map(|j| JournalStatus {
            path: self.path.display().to_string(),
            capacity: j.capacity(),
            used_bytes: j.used(),
            head_seq: j.next_seq() - 1,
            released_seq: j.released_seq(),
            on_full: self.on_full,
            waiting_writes: st.waiting,
            pending_bytes,
            checkpoint_seq: j.checkpoint_seq(),
        })
    }

    /// Applies every pending change, checkpoints, and closes the journal, then the region
    /// map, cleanly (at shutdown, after the last write). The journal goes first: the map may
    /// only be marked clean once every change is durable.
    pub fn close(&self) {
        self.stop_flusher();
        let mut st = self.lock();
        let pending = !self.shared.applied.lock().unwrap().pending.is_empty();
        let journal_ok = match st.journal.take() {
            Some(_) if pending => {
                // Left unclean: start-up replays what is still pending.
                error!(
                    "journal={}: changes could not be applied to the backing device; the next \
                     start replays them",
                    self.path.display()
                );
                false
            }
            Some(mut j) => {
                if let Ok(Some(seq)) = read_release(&self.path) {
                    j.set_released(seq);
                }
                let head = j.next_seq() - 1;
                let r = self
                    .backing
                    .sync_data()
                    .map_err(JournalError::Io)
                    .and_then(|()| {
                        j.set_checkpoint(j.next_seq());
                        j.close()
                    });
                match r {
                    Ok(_) => {
                        // Closing synced every record: the shipper may take the last ones.
                        self.shared.publish_durable(head);
                        info!("journal={}: closed cleanly", self.path.display());
                        true
                    }
                    Err(e) => {
                        error!("journal={}: cannot close cleanly: {e}", self.path.display());
                        false
                    }
                }
            }
            None => true,
        };
        if let Some(m) = st.map.take() {
            if !journal_ok {
                // Leave the map open: the next start sees the unclean stop.
                return;
            }
            if let Err(e) = m.close() {
                error!(
                    "region_map={}: cannot close cleanly: {e}",
                    self.map_path.display()
                );
            }
        }
    }
}

impl ChangeLog {
    /// Stops the syncer once everything is durable, then the applier once everything is
    /// applied, then the checkpointer.
    fn stop_flusher(&self) {
        self.lock().stopping = true;
        self.shared.wake.notify_all();
        self.shared.space.notify_all();
        let mut threads = std::mem::take(&mut *self.threads.lock().unwrap()).into_iter();
        let mut join = |stop: &dyn Fn()| {
            stop();
            if let Some(t) = threads.next() {
                let _ = t.join();
            }
        };
        join(&|| {});
        join(&|| self.shared.stop_applier());
        join(&|| self.shared.stop_checkpointer());
    }
}

impl Drop for ChangeLog {
    fn drop(&mut self) {
        self.stop_flusher();
    }
}

/// Preallocates a new file of `size` bytes.
fn create_preallocated(path: &Path, size: u64) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    let len = i64::try_from(size).unwrap_or(i64::MAX);
    if let Err(e) = nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, len) {
        // Nothing half-made is left for the next start to trip over.
        let _ = std::fs::remove_file(path);
        return Err(e.into());
    }
    Ok(f)
}

/// Parses a size such as `1073741824`, `512M`, `1G`, `1GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?}: expected a number with an optional unit, e.g. 1G"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        u => return Err(format!("size {s:?}: unknown unit {u:?} (use K, M, G or T)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod crash_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("G").is_err());
    }
}
