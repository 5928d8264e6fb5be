//! Change tracking for one volume: every write, trim and zero the tracker acknowledges is
//! appended to the volume's journal before it is applied to the backing file; when the
//! journal is full the volume falls back to a dirty-region map and needs a resync.
//!
//! Both steps happen under one lock per volume, so writes reach the backing file in journal
//! order (invariant O). The journal record goes first: a process that dies between the two
//! leaves a record for a write that may not have happened, never a write without a record.
//!
//! Not done yet (issue 3 continues): the on-disk activity log and a persistent dirty bitmap
//! (until then an unclean restart marks the whole volume dirty), `journal.on_full = "block"`,
//! group commit, and the reader side for the shipper.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use log::{error, info, warn};
use serde::{Deserialize, Serialize};

use crate::io::ops;
use crate::journal::format::{Kind, MIN_FILE_SIZE};
use crate::journal::{Journal, JournalError, Policy};
use crate::nbd::IoOp;

/// Default size of a volume's dirty region.
pub const DEFAULT_REGION: u64 = 64 * 1024;

/// Dirty regions of a volume, one bit per region.
#[derive(Debug, Clone)]
pub struct DirtyMap {
    region: u64,
    volume_size: u64,
    bits: Vec<u64>,
    count: u64,
}

impl DirtyMap {
    pub fn new(volume_size: u64, region: u64) -> DirtyMap {
        let regions = volume_size.div_ceil(region);
        DirtyMap {
            region,
            volume_size,
            bits: vec![0; usize::try_from(regions.div_ceil(64)).expect("bitmap fits in memory")],
            count: 0,
        }
    }

    /// Marks every region that `[offset, offset + len)` touches.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.region;
        let last = (offset + len - 1).min(self.volume_size.saturating_sub(1)) / self.region;
        for r in first..=last {
            let (w, b) = (r / 64, r % 64);
            let Some(word) = usize::try_from(w).ok().and_then(|w| self.bits.get_mut(w)) else {
                break;
            };
            if *word & (1 << b) == 0 {
                *word |= 1 << b;
                self.count += 1;
            }
        }
    }

    pub fn mark_all(&mut self) {
        self.mark(0, self.volume_size);
    }

    /// Bytes inside dirty regions (the last region may be short).
    pub fn dirty_bytes(&self) -> u64 {
        (self.count * self.region).min(self.volume_size)
    }

    pub fn is_dirty(&self, offset: u64) -> bool {
        let r = offset / self.region;
        usize::try_from(r / 64)
            .ok()
            .and_then(|w| self.bits.get(w))
            .is_some_and(|word| word & (1 << (r % 64)) != 0)
    }

    pub fn region(&self) -> u64 {
        self.region
    }

    /// Dirty ranges as (offset, length), merged.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let regions = self.volume_size.div_ceil(self.region);
        for r in 0..regions {
            if !self.is_dirty(r * self.region) {
                continue;
            }
            let start = r * self.region;
            let len = self.region.min(self.volume_size - start);
            match out.last_mut() {
                Some(last) if last.0 + last.1 == start => last.1 += len,
                _ => out.push((start, len)),
            }
        }
        out
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
}

#[derive(Debug)]
struct State {
    journal: Option<Journal<File>>,
    /// The journal stopped taking records (full or failed) until a resync.
    overflowed: bool,
    dirty: DirtyMap,
}

/// The change log of one volume.
#[derive(Debug)]
pub struct ChangeLog {
    path: PathBuf,
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
    #[error("Journal size {size} is too small: at least {min} bytes")]
    TooSmall { size: u64, min: u64 },
}

fn random_uuid() -> [u8; 16] {
    let mut b = [0u8; 16];
    if let Ok(f) = File::open("/dev/urandom") {
        let _ = std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0);
    }
    b
}

impl ChangeLog {
    /// Opens `dir/NAME.journal`, or creates it with `size` bytes (preallocated).
    pub fn open_or_create(
        dir: &Path,
        name: &str,
        size: u64,
        volume_size: u64,
    ) -> Result<ChangeLog, TrackError> {
        let path = dir.join(format!("{name}.journal"));
        let jerr = |source| TrackError::Journal {
            path: path.clone(),
            source,
        };
        let cerr = |source| TrackError::Create {
            path: path.clone(),
            source,
        };
        let mut dirty = DirtyMap::new(volume_size, DEFAULT_REGION);
        let journal = if path.exists() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| jerr(e.into()))?;
            let (j, rec) = Journal::open(f, Policy::TolerateTornTail).map_err(jerr)?;
            if j.superblock().volume_size != volume_size {
                return Err(TrackError::SizeMismatch {
                    path,
                    journal: j.superblock().volume_size,
                    volume: volume_size,
                });
            }
            if !rec.was_clean {
                // Without the activity log we cannot tell which regions the crash touched.
                warn!(
                    "journal {}: unclean stop; marking the whole volume dirty (resync required)",
                    path.display()
                );
                dirty.mark_all();
            }
            j
        } else {
            if size < MIN_FILE_SIZE {
                return Err(TrackError::TooSmall {
                    size,
                    min: MIN_FILE_SIZE,
                });
            }
            std::fs::create_dir_all(dir).map_err(cerr)?;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(cerr)?;
            let len = i64::try_from(size).unwrap_or(i64::MAX);
            nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, len)
                .map_err(|e| cerr(e.into()))?;
            info!("journal {} created ({size} bytes)", path.display());
            Journal::create(f, random_uuid(), volume_size).map_err(jerr)?
        };
        let sync_file = journal.store().try_clone().map_err(|e| jerr(e.into()))?;
        let overflowed = dirty.dirty_bytes() > 0;
        Ok(ChangeLog {
            path,
            state: Mutex::new(State {
                journal: Some(journal),
                overflowed,
                dirty,
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
        if !st.overflowed {
            match st
                .journal
                .as_mut()
                .map(|j| j.append(kind, offset, len, payload))
            {
                Some(Ok(_)) => {}
                Some(Err(JournalError::Full { capacity, .. })) => {
                    warn!(
                        "journal {} is full ({capacity} bytes unreleased): tracking dirty \
                         regions instead; the volume needs a resync",
                        self.path.display()
                    );
                    st.overflowed = true;
                }
                Some(Err(e)) => {
                    error!(
                        "journal {} failed ({e}): tracking dirty regions instead; the volume \
                         needs a resync",
                        self.path.display()
                    );
                    st.overflowed = true;
                }
                None => st.overflowed = true,
            }
        }
        if st.overflowed {
            st.dirty.mark(offset, u64::from(len));
        }
        let r = match op {
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
        };
        if r.is_err() {
            // The journal has a record the backing file may not fully reflect.
            st.dirty.mark(offset, u64::from(len));
        }
        r
    }

    /// Makes every record appended so far durable. Does not take the lock.
    pub fn sync(&self) -> io::Result<()> {
        self.sync_file.sync_data()
    }

    pub fn state(&self) -> TrackState {
        if self.state.lock().unwrap().dirty.dirty_bytes() > 0 {
            TrackState::ResyncRequired
        } else {
            TrackState::Protected
        }
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.state.lock().unwrap().dirty.dirty_bytes()
    }

    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        self.state.lock().unwrap().dirty.ranges()
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

    /// Syncs and closes the journal cleanly (at shutdown, after the last write).
    pub fn close(&self) {
        let mut st = self.state.lock().unwrap();
        if let Some(j) = st.journal.take() {
            match j.close() {
                Ok(_) => info!("journal {} closed cleanly", self.path.display()),
                Err(e) => error!("journal {}: cannot close cleanly: {e}", self.path.display()),
            }
        }
    }
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
mod tests {
    use super::*;

    #[test]
    fn dirty_map_marks_and_merges() {
        let mut d = DirtyMap::new(1 << 20, 64 * 1024);
        d.mark(100, 10);
        d.mark(64 * 1024 - 1, 2);
        d.mark((1 << 20) - 1, 100);
        assert_eq!(d.dirty_bytes(), 3 * 64 * 1024);
        assert_eq!(
            d.ranges(),
            vec![(0, 128 * 1024), ((1 << 20) - 64 * 1024, 64 * 1024)]
        );
        d.mark_all();
        assert_eq!(d.dirty_bytes(), 1 << 20);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("G").is_err());
    }
}
