//! Change tracking for one volume: every write, trim and zero the tracker acknowledges is
//! appended to the volume's journal before it is applied to the backing file; when the
//! journal is full the volume falls back to a dirty-region map and needs a resync.
//!
//! Both steps happen under one lock per volume, so writes reach the backing file in journal
//! order (invariant O). The journal record goes first: a process that dies between the two
//! leaves a record for a write that may not have happened, never a write without a record.
//!
//! Before either, the region map ([`map`]) makes the change's extents hot, durably: that is
//! what keeps invariant J after a power loss, when the page cache of the journal and of the
//! backing file reach the disk in any order.
//!
//! Not done yet (issue 3 continues): `journal.on_full = "block"`, group commit, and the reader
//! side for the shipper.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use log::{error, info, warn};
use serde::{Deserialize, Serialize};

use crate::io::ops;
use crate::journal::format::{Kind, MIN_FILE_SIZE};
use crate::journal::reader::read_release;
use crate::journal::{Journal, JournalError, Policy, Store};
use crate::nbd::IoOp;

pub mod map;

use map::RegionMap;

/// How many appends may pass between two looks at the release file.
const RELEASE_CHECK_EVERY: u32 = 1024;
/// The same once the journal is half full.
const RELEASE_CHECK_PRESSED: u32 = 32;

/// Default size of a volume's dirty region.
pub const DEFAULT_REGION: u64 = 64 * 1024;

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
}

#[derive(Debug)]
struct State {
    journal: Option<Journal<File>>,
    /// The journal stopped taking records (full or failed) until a resync.
    overflowed: bool,
    map: Option<RegionMap<File>>,
    /// Appends since the release file was last looked at.
    since_release_check: u32,
}

/// The change log of one volume.
#[derive(Debug)]
pub struct ChangeLog {
    path: PathBuf,
    map_path: PathBuf,
    state: Mutex<State>,
    /// A second handle on the journal file, so that syncing does not take the lock.
    sync_file: File,
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
    #[error("Cannot create journal {path}: {source}")]
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

/// The tracking state one change goes through, generic over storage so that crash tests run
/// the very same steps over simulated disks.
pub(crate) struct Change<'a, J: Store, M: Store> {
    pub journal: Option<&'a mut Journal<J>>,
    pub overflowed: &'a mut bool,
    pub map: Option<&'a mut RegionMap<M>>,
    /// For log messages.
    pub name: &'a Path,
}

impl<J: Store, M: Store> Change<'_, J, M> {
    /// The write path of one change: its extents hot (durably), its record in the journal
    /// (or its regions dirty when the journal is full), then `apply` on the backing device.
    /// `sync_all` must make the backing device and the journal durable; the region map calls
    /// it before cooling extents.
    pub fn record_and_apply(
        &mut self,
        kind: Kind,
        offset: u64,
        len: u32,
        payload: &[u8],
        sync_all: &mut dyn FnMut() -> io::Result<()>,
        apply: &mut dyn FnMut() -> io::Result<()>,
    ) -> io::Result<()> {
        if let Some(map) = self.map.as_deref_mut() {
            // Hot before anything can reach the journal or the backing device.
            map.prepare(offset, u64::from(len), sync_all)?;
        }
        if !*self.overflowed {
            match self
                .journal
                .as_deref_mut()
                .map(|j| j.append(kind, offset, len, payload))
            {
                Some(Ok(_)) => {}
                Some(Err(JournalError::Full { capacity, .. })) => {
                    warn!(
                        "journal {} is full ({capacity} bytes unreleased): tracking dirty \
                         regions instead; the volume needs a resync",
                        self.name.display()
                    );
                    *self.overflowed = true;
                }
                Some(Err(e)) => {
                    error!(
                        "journal {} failed ({e}): tracking dirty regions instead; the volume \
                         needs a resync",
                        self.name.display()
                    );
                    *self.overflowed = true;
                }
                None => *self.overflowed = true,
            }
        }
        if *self.overflowed {
            if let Some(map) = self.map.as_deref_mut() {
                map.mark_dirty(offset, u64::from(len));
            }
        }
        let r = apply();
        if r.is_err() {
            // The journal has a record the backing device may not fully reflect.
            if let Some(map) = self.map.as_deref_mut() {
                map.mark_dirty(offset, u64::from(len));
            }
        }
        r
    }
}

impl ChangeLog {
    /// Opens `dir/NAME.journal` and `dir/NAME.map`, or creates them (the journal with `size`
    /// bytes, preallocated).
    pub fn open_or_create(
        dir: &Path,
        name: &str,
        size: u64,
        volume_size: u64,
    ) -> Result<ChangeLog, TrackError> {
        let path = dir.join(format!("{name}.journal"));
        let map_path = dir.join(format!("{name}.map"));
        let jerr = |source| TrackError::Journal {
            path: path.clone(),
            source,
        };
        let cerr = |p: &Path, source| TrackError::Create {
            path: p.to_path_buf(),
            source,
        };
        let journal = if path.exists() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| jerr(e.into()))?;
            let (j, _) = Journal::open(f, Policy::TolerateTornTail).map_err(jerr)?;
            if j.superblock().volume_size != volume_size {
                return Err(TrackError::SizeMismatch {
                    path,
                    journal: j.superblock().volume_size,
                    volume: volume_size,
                });
            }
            j
        } else {
            if size < MIN_FILE_SIZE {
                return Err(TrackError::TooSmall {
                    size,
                    min: MIN_FILE_SIZE,
                });
            }
            std::fs::create_dir_all(dir).map_err(|e| cerr(dir, e))?;
            let f = create_preallocated(&path, size).map_err(|e| cerr(&path, e))?;
            info!("journal {} created ({size} bytes)", path.display());
            Journal::create(f, random_uuid(), volume_size).map_err(jerr)?
        };
        let map = if map_path.exists() {
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
                    "region map {}: unclean stop, {} hot extents of the volume need a resync",
                    map_path.display(),
                    rec.hot_extents
                );
            }
            m
        } else {
            let fsize =
                RegionMap::<File>::file_size(volume_size, DEFAULT_REGION, map::DEFAULT_EXTENT);
            let f = create_preallocated(&map_path, fsize).map_err(|e| cerr(&map_path, e))?;
            let mut m = RegionMap::create(f, volume_size, DEFAULT_REGION, map::DEFAULT_EXTENT)
                .map_err(|e| cerr(&map_path, e))?;
            if journal.next_seq() > 1 || journal.tail_seq() > 1 {
                // A journal without its map: nothing tells which regions a crash touched.
                warn!(
                    "region map {} is missing beside an existing journal: the whole volume \
                     needs a resync",
                    map_path.display()
                );
                m.mark_all_dirty();
            }
            m
        };
        let sync_file = journal.store().try_clone().map_err(|e| jerr(e.into()))?;
        let overflowed = map.dirty_bytes() > 0;
        let mut journal = journal;
        if let Some(seq) = read_release(&path).map_err(|e| jerr(e.into()))? {
            if seq >= journal.tail_seq() {
                journal.release(seq).map_err(jerr)?;
            }
        }
        Ok(ChangeLog {
            path,
            map_path,
            state: Mutex::new(State {
                journal: Some(journal),
                overflowed,
                map: Some(map),
                since_release_check: 0,
            }),
            sync_file,
        })
    }

    /// The journal file's descriptor, for syncing it through io_uring.
    pub fn sync_fd(&self) -> RawFd {
        self.sync_file.as_raw_fd()
    }

    /// Records `op` and applies it to `backing`, both under the volume's lock. Only writes,
    /// trims and zeroes are accepted; durability (FUA) is the caller's: sync the backing file
    /// and [`ChangeLog::sync`].
    pub fn apply(&self, backing: &File, op: &IoOp) -> io::Result<()> {
        let (kind, offset, len, payload): (Kind, u64, u32, &[u8]) = match op {
            IoOp::Write { offset, data, .. } => (
                Kind::Write,
                *offset,
                u32::try_from(data.len()).unwrap_or(u32::MAX),
                data,
            ),
            IoOp::Trim { offset, len, .. } => (Kind::Trim, *offset, *len, &[]),
            IoOp::WriteZeroes { offset, len, .. } => (Kind::Zero, *offset, *len, &[]),
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        let mut st = self.state.lock().unwrap();
        let st = &mut *st;
        st.since_release_check += 1;
        let nearly_full = st
            .journal
            .as_ref()
            .is_some_and(|j| j.used() + u64::from(len) + 4096 > j.capacity() / 2);
        let due = st.since_release_check >= RELEASE_CHECK_EVERY
            || nearly_full && !st.overflowed && st.since_release_check >= RELEASE_CHECK_PRESSED;
        if due {
            st.since_release_check = 0;
            self.absorb_release(st.journal.as_mut());
        }
        let sync_file = &self.sync_file;
        let mut change = Change {
            journal: st.journal.as_mut(),
            overflowed: &mut st.overflowed,
            map: st.map.as_mut(),
            name: &self.path,
        };
        change.record_and_apply(
            kind,
            offset,
            len,
            payload,
            &mut || {
                backing.sync_data()?;
                sync_file.sync_data()
            },
            &mut || match op {
                IoOp::Write { offset, data, .. } => ops::write_at(backing, *offset, data, false),
                IoOp::Trim { offset, len, .. } => ops::trim(backing, *offset, *len, false),
                IoOp::WriteZeroes {
                    offset,
                    len,
                    may_trim,
                    fast_only,
                    ..
                } => ops::write_zeroes(backing, *offset, *len, *may_trim, *fast_only, false),
                _ => Ok(()),
            },
        )
    }

    /// Moves the journal's tail to what the reader released (see
    /// [`crate::journal::reader`]).
    fn absorb_release(&self, journal: Option<&mut Journal<File>>) {
        let Some(j) = journal else {
            return;
        };
        match read_release(&self.path) {
            Ok(Some(seq)) if seq >= j.tail_seq() => {
                if let Err(e) = j.release(seq) {
                    error!(
                        "journal {}: cannot release through seq {seq}: {e}",
                        self.path.display()
                    );
                }
            }
            Ok(_) => {}
            Err(e) => warn!("journal {}: {e}; not releasing", self.path.display()),
        }
    }

    /// Makes every record appended so far durable. Does not take the lock.
    pub fn sync(&self) -> io::Result<()> {
        self.sync_file.sync_data()
    }

    pub fn state(&self) -> TrackState {
        if self.dirty_bytes() > 0 {
            TrackState::ResyncRequired
        } else {
            TrackState::Protected
        }
    }

    pub fn dirty_bytes(&self) -> u64 {
        let st = self.state.lock().unwrap();
        st.map.as_ref().map_or(0, |m| m.dirty_bytes())
    }

    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let st = self.state.lock().unwrap();
        st.map.as_ref().map_or(Vec::new(), |m| m.dirty_ranges())
    }

    pub fn hot_extents(&self) -> u64 {
        let st = self.state.lock().unwrap();
        st.map.as_ref().map_or(0, |m| m.hot_extents())
    }

    pub fn status(&self) -> Option<JournalStatus> {
        let st = self.state.lock().unwrap();
        st.journal.as_ref().map(|j| JournalStatus {
            path: self.path.display().to_string(),
            capacity: j.capacity(),
            used_bytes: j.used(),
            head_seq: j.next_seq() - 1,
            released_seq: j.tail_seq() - 1,
        })
    }

    /// Syncs and closes the journal, then the region map, cleanly (at shutdown, after the
    /// last write). The journal goes first: the map may only forget its hot extents once
    /// every record is durable.
    pub fn close(&self) {
        let mut st = self.state.lock().unwrap();
        let journal_ok = match st.journal.take().map(|j| j.close()) {
            Some(Ok(_)) => {
                info!("journal {} closed cleanly", self.path.display());
                true
            }
            Some(Err(e)) => {
                error!("journal {}: cannot close cleanly: {e}", self.path.display());
                false
            }
            None => true,
        };
        if let Some(m) = st.map.take() {
            if !journal_ok {
                // Leave the map open: its hot extents become dirty at the next start.
                return;
            }
            if let Err(e) = m.close() {
                error!(
                    "region map {}: cannot close cleanly: {e}",
                    self.map_path.display()
                );
            }
        }
    }
}

fn create_preallocated(path: &Path, size: u64) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    let len = i64::try_from(size).unwrap_or(i64::MAX);
    nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, len)?;
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
