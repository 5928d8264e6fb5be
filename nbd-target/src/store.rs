//! The replica store of one volume (docs/FORMAT.md, "Replica store"): a base image plus
//! checksummed delta segments and a manifest naming the recovery points, so that any point
//! inside the retention window reads back through an extent index ([`View`]).
//!
//! ```text
//! DATA/NAME.state               replication progress: identity, next seq, the open segment
//! DATA/NAME.store/manifest.json base seq, sealed segments, recovery points (replaced atomically)
//! DATA/NAME.store/base.img      the volume as of the base seq (sparse)
//! DATA/NAME.store/SEQ.seg       a segment: the records from seq SEQ on, in order
//! ```
//!
//! Records are appended to the open segment; a commit writes them out, syncs the segment and
//! then replaces the state file with the new durable length. Once a segment holds
//! [`SEAL_BYTES`] it gets its index and trailer and enters the manifest, and a new one opens.
//! Sealed segments never change. Retention prunes points from the manifest first, then
//! merges the sealed segments below the oldest point still needed into the base image, then
//! drops them from the manifest, then deletes their files: a crash anywhere in between
//! leaves a store that reads the same.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use log::{info, warn};
use redun_store::extent::{ExtentMap, Src};
pub use redun_store::retention::{Retention, Tier};
use redun_store::segment::{self as codec, Scanned, SegmentError, encode_entry, encode_index};
pub use redun_store::segment::{
    Decided, ENTRY_HEADER_LEN, Entry, Identity, MANIFEST_FORMAT, Manifest, Point,
    SEGMENT_HEADER_LEN, SegmentRef, SyncState,
};
use redun_tracker::journal::format::{GroupDecision, Kind, SyncInfo};
use serde::{Deserialize, Serialize};

/// A segment is sealed at the first commit after it holds this many bytes.
pub const SEAL_BYTES: u64 = 64 << 20;
/// Appended records are written to the segment file once this many bytes wait in memory.
const WRITE_BYTES: usize = 8 << 20;
/// What `NAME.state` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    pub name: String,
    /// The volume's uuid, hex.
    pub uuid: String,
    pub size: u64,
    pub generation: u64,
    /// The first sequence number not applied (0 until the first batch).
    pub next_seq: u64,
    /// The open segment's file name and how many of its bytes are durable.
    #[serde(default)]
    pub open_segment: String,
    #[serde(default)]
    pub open_len: u64,
    /// The block-checksum synchronisation under way: points from its begin on are
    /// inconsistent, and `latest` is not an image of the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncState>,
    /// `[begin, end]` sequence numbers of finished synchronisations: the points inside are
    /// inconsistent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inconsistent: Vec<[u64; 2]>,
}

impl ReplicaState {
    /// True when the point placed by marker `id` is a consistent image.
    pub fn consistent_at(&self, id: u64) -> bool {
        codec::consistent_at(self.sync.as_ref(), &self.inconsistent, id)
    }
}

impl ReplicaState {
    pub fn identity(&self) -> Identity {
        Identity {
            name: self.name.clone(),
            uuid: self.uuid.clone(),
            size: self.size,
            generation: self.generation,
        }
    }
}

/// A sealed segment: immutable.
#[derive(Debug)]
struct Sealed {
    r: SegmentRef,
    file: Arc<File>,
    entries: Vec<Entry>,
}

/// The segment records are appended to.
#[derive(Debug)]
struct Open {
    name: String,
    first_seq: u64,
    file: Arc<File>,
    entries: Vec<Entry>,
    points: Vec<Point>,
    decisions: Vec<Decided>,
    /// Bytes in the file (written, durable or not) and waiting in `buf`.
    written: u64,
    buf: Vec<u8>,
}

impl Open {
    fn len(&self) -> u64 {
        self.written + self.buf.len() as u64
    }
}

/// Why a store cannot be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("replica store {path} is damaged: {reason} (move the replica away to start over)")]
    Damaged { path: PathBuf, reason: String },
}

impl StoreError {
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            StoreError::Io { source, .. } => Some(source),
            StoreError::Damaged { .. } => None,
        }
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn damaged(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Damaged {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The replica store of one volume, shared by the replication connection (the only writer)
/// and the NBD exports of its points.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    state_path: PathBuf,
    inner: Mutex<Inner>,
    /// Sequence numbers that open views read at: merging stops below the lowest.
    pins: Arc<Mutex<BTreeMap<u64, usize>>>,
    /// One retention pass at a time; it holds the runs of sealed segments (by file name)
    /// found not worth compacting, so that later passes do not read their indexes again.
    maintenance: Mutex<HashSet<Vec<String>>>,
    /// The open segment is sealed once it holds this many bytes.
    seal_bytes: u64,
}

#[derive(Debug)]
struct Inner {
    /// What is durable.
    state: ReplicaState,
    manifest: Manifest,
    base: Arc<File>,
    sealed: Vec<Arc<Sealed>>,
    open: Open,
    /// The first sequence number not yet appended (durable or not).
    applied: u64,
    /// `state.sync` and `state.inconsistent` with what was appended since the last commit.
    sync: Option<SyncState>,
    inconsistent: Vec<[u64; 2]>,
}

pub fn state_path(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join(format!("{name}.state"))
}

pub fn store_dir(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join(format!("{name}.store"))
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

/// Writes `bytes` to `path` through a temporary file, durably (file, rename, directory).
fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let r = (|| {
        let f = File::create(&tmp)?;
        f.write_all_at(bytes, 0)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(d) = path.parent() {
            File::open(d)?.sync_all()?;
        }
        Ok::<(), io::Error>(())
    })();
    r.map_err(io_err("cannot write", path))
}

/// Writes `v` as JSON to `path`, atomically and durably ([`replace_file`]).
pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), StoreError> {
    replace_file(path, &to_json(v))
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, StoreError> {
    let text = std::fs::read_to_string(path).map_err(io_err("cannot read", path))?;
    serde_json::from_str(&text).map_err(|e| damaged(path, e.to_string()))
}

/// Reads the state file of volume `name`, if there is one.
pub fn read_state(data_dir: &Path, name: &str) -> Result<Option<ReplicaState>, StoreError> {
    let p = state_path(data_dir, name);
    if !p.exists() {
        return Ok(None);
    }
    read_json(&p).map(Some)
}

fn segment_err(path: &Path) -> impl FnOnce(SegmentError) -> StoreError + '_ {
    move |e| match e {
        SegmentError::Io(source) => io_err("cannot read", path)(source),
        SegmentError::Damaged(reason) => damaged(path, reason),
    }
}

/// Reads the entries of a segment file from its first record to `len`, checking every
/// checksum ([`codec::scan_segment`]).
fn scan_segment(file: &File, path: &Path, first_seq: u64, len: u64) -> Result<Scanned, StoreError> {
    let s = codec::scan_segment(file, first_seq, len).map_err(segment_err(path))?;
    plain_only(&s.0, path)?;
    Ok(s)
}

/// Reads a sealed segment file's index through its trailer.
fn read_index(file: &File, path: &Path, r: &SegmentRef) -> Result<Vec<Entry>, StoreError> {
    let len = file.metadata().map_err(io_err("cannot stat", path))?.len();
    let entries = codec::read_index(file, len, r).map_err(segment_err(path))?;
    plain_only(&entries, path)?;
    Ok(entries)
}

/// Refuses compressed entries: only bucket objects hold them, so that a view's extent map
/// never has a [`Src::Packed`] piece here.
fn plain_only(entries: &[Entry], path: &Path) -> Result<(), StoreError> {
    match entries.iter().find(|e| e.packed > 0) {
        Some(e) => Err(damaged(
            path,
            format!(
                "the entry of seq {} at byte {} is compressed (only bucket objects hold compressed entries)",
                e.seq, e.data
            ),
        )),
        None => Ok(()),
    }
}

fn open_rw(path: &Path, create: bool) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(io_err("cannot open", path))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot sync", dir))
}

impl Store {
    /// Creates the store of a volume seen for the first time: an empty (sparse) base, or
    /// the seed image `DATA/NAME.seed` when an operator copied one there (offline seeding:
    /// the initial synchronisation then sends only the blocks that differ), an empty open
    /// segment, the manifest, and last the state file that says it exists.
    pub fn create(data_dir: &Path, id: &Identity) -> Result<Store, StoreError> {
        let dir = store_dir(data_dir, &id.name);
        std::fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        let base_path = dir.join("base.img");
        let seed = data_dir.join(format!("{}.seed", id.name));
        let seeded = std::fs::metadata(&seed).ok();
        if let Some(m) = &seeded {
            if m.len() != id.size {
                return Err(damaged(
                    &seed,
                    format!(
                        "the seed image has {} bytes, volume {} has {}: copy an image of this \
                         volume, or remove the file",
                        m.len(),
                        id.name,
                        id.size
                    ),
                ));
            }
            std::fs::rename(&seed, &base_path).map_err(io_err("cannot adopt", &seed))?;
            info!(
                "replica={}: seeded from {} (only blocks that differ will be sent)",
                id.name,
                seed.display()
            );
        }
        let base = open_rw(&base_path, true)?;
        // Without a seed the replica starts as zeroes, whatever an earlier store left.
        if seeded.is_none() || base.metadata().map(|m| m.len()).ok() != Some(id.size) {
            base.set_len(0)
                .and_then(|()| base.set_len(id.size))
                .map_err(io_err("cannot size", &base_path))?;
        }
        base.sync_all().map_err(io_err("cannot sync", &base_path))?;
        let manifest = Manifest::new(id);
        let open = new_open(&dir, id, 0)?;
        let state = ReplicaState {
            name: id.name.clone(),
            uuid: id.uuid.clone(),
            size: id.size,
            generation: id.generation,
            next_seq: 0,
            open_segment: open.name.clone(),
            open_len: open.written,
            sync: None,
            inconsistent: Vec::new(),
        };
        write_json(&dir.join("manifest.json"), &manifest)?;
        let state_path = state_path(data_dir, &id.name);
        write_json(&state_path, &state)?;
        Ok(Store::assemble(
            dir,
            state_path,
            Inner {
                state,
                manifest,
                base: Arc::new(base),
                sealed: Vec::new(),
                open,
                applied: 0,
                sync: None,
                inconsistent: Vec::new(),
            },
        ))
    }

    /// Opens the store of volume `name` (whose state file exists), recovering from a crash
    /// at any step: the open segment is cut back to its durable length, a seal that reached
    /// the manifest but not the state file is completed, files no longer listed are removed.
    pub fn open(data_dir: &Path, name: &str) -> Result<Store, StoreError> {
        let state_path = state_path(data_dir, name);
        let mut state: ReplicaState = read_json(&state_path)?;
        let dir = store_dir(data_dir, name);
        let manifest_path = dir.join("manifest.json");
        let manifest: Manifest = read_json(&manifest_path)?;
        manifest
            .check_format()
            .map_err(|why| damaged(&manifest_path, why))?;
        if manifest.uuid != state.uuid || manifest.size != state.size {
            return Err(damaged(
                &manifest_path,
                format!(
                    "the manifest is of volume uuid {} with {} bytes, the state file {} says \
                     uuid {} with {} bytes",
                    manifest.uuid,
                    manifest.size,
                    state_path.display(),
                    state.uuid,
                    state.size
                ),
            ));
        }
        let id = state.identity();
        let base_path = dir.join("base.img");
        let base = open_rw(&base_path, false)?;
        let mut sealed = Vec::new();
        for r in &manifest.segments {
            let p = dir.join(&r.file);
            let file = File::open(&p).map_err(io_err("cannot open", &p))?;
            let entries = read_index(&file, &p, r)?;
            sealed.push(Arc::new(Sealed {
                r: r.clone(),
                file: Arc::new(file),
                entries,
            }));
        }
        let sealed_end = manifest
            .segments
            .last()
            .map_or(manifest.base_seq, |s| s.last_seq);
        let open = if manifest
            .segments
            .iter()
            .any(|s| s.file == state.open_segment)
        {
            // Sealed, but the state file still names it: open the next one.
            let open = new_open(&dir, &id, sealed_end + 1)?;
            state.open_segment = open.name.clone();
            state.open_len = open.written;
            state.next_seq = state.next_seq.max(sealed_end + 1);
            write_json(&state_path, &state)?;
            open
        } else {
            let p = dir.join(&state.open_segment);
            let file = open_rw(&p, false)?;
            file.set_len(state.open_len)
                .map_err(io_err("cannot truncate", &p))?;
            let first_seq = state
                .open_segment
                .strip_suffix(".seg")
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| damaged(&state_path, "open_segment is not a segment file name"))?;
            let (entries, points, decisions) = scan_segment(&file, &p, first_seq, state.open_len)?;
            Open {
                name: state.open_segment.clone(),
                first_seq,
                file: Arc::new(file),
                entries,
                points,
                decisions,
                written: state.open_len,
                buf: Vec::new(),
            }
        };
        // Files of merged segments whose deletion did not happen, or of a seal that did not
        // reach the manifest.
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let f = e.file_name().to_string_lossy().to_string();
                let listed = f == open.name || manifest.segments.iter().any(|s| s.file == f);
                if (f.ends_with(".seg") || f.ends_with(".tmp")) && !listed {
                    info!("replica={name}: removing {f}, which the store no longer uses");
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let applied = state.next_seq;
        let (sync, inconsistent) = (state.sync, state.inconsistent.clone());
        Ok(Store::assemble(
            dir,
            state_path,
            Inner {
                state,
                manifest,
                base: Arc::new(base),
                sealed,
                open,
                applied,
                sync,
                inconsistent,
            },
        ))
    }

    fn assemble(dir: PathBuf, state_path: PathBuf, inner: Inner) -> Store {
        Store {
            dir,
            state_path,
            inner: Mutex::new(inner),
            pins: Arc::default(),
            maintenance: Mutex::default(),
            seal_bytes: SEAL_BYTES,
        }
    }

    fn save_manifest(&self, m: &Manifest) -> Result<(), StoreError> {
        write_json(&self.dir.join("manifest.json"), m)
    }

    /// Seals segments at `bytes` instead of [`SEAL_BYTES`] (tests and benchmarks).
    pub fn with_seal_bytes(mut self, bytes: u64) -> Store {
        self.seal_bytes = bytes;
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> ReplicaState {
        self.lock().state.clone()
    }

    /// The first sequence number not yet appended.
    pub fn applied(&self) -> u64 {
        self.lock().applied
    }

    /// Appends one record to the open segment (not yet durably: see [`Store::commit`]).
    /// The caller checks order and ranges.
    pub fn append(
        &self,
        kind: Kind,
        seq: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        let mut g = self.lock();
        self.push(&mut g, kind, seq, offset, length, payload)
    }

    /// Appends a sync record: a slot's blocks (data or zeroes) as entries of the slot's
    /// sequence number, then the record itself, and follows the job (begin, cursor, end).
    pub fn append_sync(
        &self,
        seq: u64,
        info: SyncInfo,
        range: (u64, u32),
        blocks: Option<&[redun_shipper::proto::SyncBlock<'_>]>,
    ) -> Result<(), StoreError> {
        let mut g = self.lock();
        for b in blocks.unwrap_or_default() {
            let (kind, data) = match b.data {
                Some(d) => (Kind::Write, d),
                None => (Kind::Zero, &[][..]),
            };
            self.push(&mut g, kind, seq, b.offset, b.length, data)?;
        }
        self.push(&mut g, Kind::Sync, seq, range.0, range.1, &info.encode())?;
        let inner = &mut *g;
        let note = codec::SyncNote {
            seq,
            info,
            offset: range.0,
            length: range.1,
            filled: blocks.is_some(),
        };
        codec::follow_sync(&mut inner.sync, &mut inner.inconsistent, &note);
        Ok(())
    }

    fn push(
        &self,
        inner: &mut Inner,
        kind: Kind,
        seq: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        let o = &mut inner.open;
        let data = o.len() + ENTRY_HEADER_LEN as u64;
        encode_entry(&mut o.buf, o.first_seq, kind, seq, offset, length, payload);
        o.entries.push(Entry {
            seq,
            offset,
            data,
            length,
            kind,
            packed: 0,
        });
        codec::note_record(kind, seq, payload, &mut o.points, &mut o.decisions);
        inner.applied = seq + 1;
        if o.buf.len() >= WRITE_BYTES {
            if let Err(e) = write_buf(o, &self.dir) {
                rollback(inner);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Makes everything appended durable (the segment, then the state file that says so)
    /// and seals the segment once it is big enough. Returns the last durable sequence number
    /// (0 when none). On failure, what was appended since the last commit is dropped: the
    /// shipper sends it again.
    pub fn commit(&self) -> Result<u64, StoreError> {
        let mut g = self.lock();
        let inner = &mut *g;
        if inner.applied != inner.state.next_seq {
            if let Err(e) = self.make_durable(inner) {
                rollback(inner);
                return Err(e);
            }
            if inner.open.written >= self.seal_bytes {
                if let Err(e) = self.seal(inner) {
                    // The records are durable; sealing is tried again at the next commit.
                    warn!(
                        "replica={}: cannot seal a segment yet: {e}",
                        inner.state.name
                    );
                }
            }
        }
        Ok(inner.state.next_seq.saturating_sub(1))
    }

    /// Forgets what was appended and not committed (a new connection starts from what is
    /// durable).
    pub fn discard_uncommitted(&self) {
        rollback(&mut self.lock());
    }

    fn make_durable(&self, inner: &mut Inner) -> Result<(), StoreError> {
        write_buf(&mut inner.open, &self.dir)?;
        let path = self.dir.join(&inner.open.name);
        inner
            .open
            .file
            .sync_data()
            .map_err(io_err("cannot sync", &path))?;
        let mut st = inner.state.clone();
        st.next_seq = inner.applied;
        st.sync = inner.sync;
        st.inconsistent.clone_from(&inner.inconsistent);
        st.open_segment = inner.open.name.clone();
        st.open_len = inner.open.written;
        write_json(&self.state_path, &st)?;
        inner.state = st;
        Ok(())
    }

    /// Seals the open segment (index, trailer, sync), lists it in the manifest and opens the
    /// next one. Everything appended is durable when this is called. Until the manifest
    /// names the segment, a failure leaves the open segment as it was; after that, the state
    /// file is brought up to date by the next commit (or by [`Store::open`]).
    fn seal(&self, inner: &mut Inner) -> Result<(), StoreError> {
        let o = &inner.open;
        let (Some(first), Some(last)) = (o.entries.first(), o.entries.last()) else {
            return Ok(());
        };
        let path = self.dir.join(&o.name);
        let tail = encode_index(&o.entries, o.written);
        let id = inner.state.identity();
        let r = SegmentRef {
            file: o.name.clone(),
            first_seq: first.seq,
            last_seq: last.seq,
            bytes: o.written + tail.len() as u64,
        };
        let mut m = inner.manifest.clone();
        m.segments.push(r.clone());
        m.points.extend(o.points.iter().copied());
        m.decisions.extend(o.decisions.iter().cloned());
        let prepared = o
            .file
            .write_all_at(&tail, o.written)
            .and_then(|()| o.file.sync_data())
            .map_err(io_err("cannot seal", &path))
            .and_then(|()| new_open(&self.dir, &id, last.seq + 1))
            .and_then(|next| {
                self.save_manifest(&m)?;
                Ok(next)
            });
        let next = match prepared {
            Ok(next) => next,
            Err(e) => {
                let _ = o.file.set_len(o.written);
                return Err(e);
            }
        };
        inner.manifest = m;
        let old = std::mem::replace(&mut inner.open, next);
        inner.sealed.push(Arc::new(Sealed {
            r,
            file: old.file,
            entries: old.entries,
        }));
        inner.state.open_segment = inner.open.name.clone();
        inner.state.open_len = inner.open.written;
        write_json(&self.state_path, &inner.state)
    }

    /// Every recovery point, oldest first, with whether it can be read (durable and not yet
    /// merged away).
    /// A group's marker is listed only once a decision committing it is durable.
    pub fn points(&self) -> Vec<(Point, bool)> {
        self.listed(|p, _, ok| Some((p, ok)))
    }

    /// The committed points of consistency group `group`, oldest first, with the volumes
    /// their decision names and whether they can be read.
    pub fn group_points(&self, group: &str) -> Vec<(Point, Vec<String>, bool)> {
        self.listed(|p, d, ok| {
            d.filter(|d| d.group == group)
                .map(|d| (p, d.volumes.clone(), ok))
        })
    }

    /// `f` of every listed point (with its committing decision for a group's point, and
    /// whether it can be read), oldest first, where `f` says `Some`.
    fn listed<T>(
        &self,
        mut f: impl FnMut(Point, Option<&GroupDecision>, bool) -> Option<T>,
    ) -> Vec<T> {
        let g = self.lock();
        let durable = g.state.next_seq;
        let decisions: Vec<&Decided> = g
            .manifest
            .decisions
            .iter()
            .chain(g.open.decisions.iter())
            .filter(|d| d.seq < durable)
            .collect();
        let points = g.manifest.points.iter().chain(g.open.points.iter());
        codec::listed(points, &decisions, |p, d| {
            let usable =
                p.id < durable && p.id >= g.manifest.base_seq && g.state.consistent_at(p.id);
            f(p, d, usable)
        })
    }

    /// The synchronisation under way (durably), if any: `latest` is then no image of the
    /// volume.
    pub fn syncing(&self) -> Option<SyncState> {
        self.lock().state.sync
    }

    /// The last durable sequence number, which `latest` reads at (0: nothing yet).
    pub fn latest(&self) -> u64 {
        self.lock().state.next_seq.saturating_sub(1)
    }

    pub fn size(&self) -> u64 {
        self.lock().state.size
    }

    /// The volume as of sequence number `seq` (every record up to it applied), or `None`
    /// when `seq` is not durable yet or was merged into the base. The view pins `seq`:
    /// nothing it needs is merged away while it lives.
    pub fn view(&self, seq: u64) -> Option<View> {
        let g = self.lock();
        if seq > g.state.next_seq.saturating_sub(1) || seq < g.manifest.base_seq {
            return None;
        }
        Some(self.build_view(g, seq, None))
    }

    /// `[offset, offset + len)` of the volume as of every record appended so far, committed
    /// or not (what a hash request compares: the connection that appended them uses it before
    /// anything else can roll them back). Returns the last record's sequence number too.
    pub fn applied_view(&self, offset: u64, len: u64) -> Result<(u64, View), StoreError> {
        let mut g = self.lock();
        write_buf(&mut g.open, &self.dir)?;
        let seq = g.applied.saturating_sub(1).max(g.manifest.base_seq);
        Ok((seq, self.build_view(g, seq, Some((offset, offset + len)))))
    }

    /// The ranges that records after `seq` changed (as `(offset, end)`, in record order, not
    /// merged: the caller merges them with its other ranges): what differs between point
    /// `seq` and the latest state at most.
    pub fn changed_after(&self, seq: u64) -> Vec<(u64, u64)> {
        let g = self.lock();
        let mut out: Vec<(u64, u64)> = Vec::new();
        let sealed = g.sealed.iter().map(|s| &s.entries[..]);
        for entries in sealed.chain(std::iter::once(&g.open.entries[..])) {
            let from = entries.partition_point(|e| e.seq <= seq);
            for e in &entries[from..] {
                if matches!(e.kind, Kind::Write | Kind::Trim | Kind::Zero) && e.length > 0 {
                    out.push((e.offset, e.offset + u64::from(e.length)));
                }
            }
        }
        out
    }

    /// A view at `seq` of the whole volume, or of the entries that overlap `range` only.
    fn build_view(&self, g: MutexGuard<'_, Inner>, seq: u64, range: Option<(u64, u64)>) -> View {
        let overlaps = |e: &Entry| {
            range.is_none_or(|(s, end)| e.offset < end && s < e.offset + u64::from(e.length))
        };
        *self.pins.lock().unwrap().entry(seq).or_default() += 1;
        let pin = Pin {
            pins: self.pins.clone(),
            seq,
        };
        let mut files: Vec<Arc<File>> = Vec::new();
        let mut parts: Vec<(u32, Vec<Entry>)> = Vec::new();
        for s in g.sealed.iter().filter(|s| s.r.first_seq <= seq) {
            files.push(s.file.clone());
            let n = s.entries.partition_point(|e| e.seq <= seq);
            // Sealed entries are immutable: copying the prefix keeps the lock short enough.
            let part = s.entries[..n].iter().filter(|e| overlaps(e)).copied();
            parts.push((file_index(&files), part.collect()));
        }
        if g.open.first_seq <= seq {
            files.push(g.open.file.clone());
            let n = g.open.entries.partition_point(|e| e.seq <= seq);
            let part = g.open.entries[..n].iter().filter(|e| overlaps(e)).copied();
            parts.push((file_index(&files), part.collect()));
        }
        let base = g.base.clone();
        let size = g.state.size;
        drop(g);
        let mut map = ExtentMap::default();
        for (file, entries) in &parts {
            for e in entries {
                map.apply(*file, e);
            }
        }
        View {
            seq,
            size,
            base,
            files,
            map,
            _pin: pin,
        }
    }

    /// Applies the retention policy at `now_ms`: prunes points, merges the sealed segments
    /// that no remaining point and no open view needs into the base image, then compacts the
    /// runs of segments between two needed points into one.
    pub fn maintain(&self, retention: &Retention, now_ms: u64) -> Result<Maintained, StoreError> {
        let mut not_worth = self.maintenance.lock().unwrap_or_else(|e| e.into_inner());
        let mut done = Maintained::default();
        self.prune_and_merge(retention, now_ms, &mut done)?;
        self.compact(&mut not_worth, &mut done)?;
        Ok(done)
    }

    fn prune_and_merge(
        &self,
        retention: &Retention,
        now_ms: u64,
        done: &mut Maintained,
    ) -> Result<(), StoreError> {
        // 1. Prune points, durably, before any base write can make them unreadable.
        let (merge, through) = {
            let mut g = self.lock();
            let inner = &mut *g;
            let all: Vec<Point> = inner
                .manifest
                .points
                .iter()
                .chain(inner.open.points.iter())
                .copied()
                .collect();
            let keep = retention.keep(&all, now_ms);
            if keep.len() < all.len() {
                done.pruned = all.len() - keep.len();
                let kept = |p: &Point| keep.iter().any(|k| k.id == p.id);
                let mut m = inner.manifest.clone();
                m.points.retain(kept);
                let decided = |d: &Decided| keep.iter().any(|k| k.group == d.decision.point);
                m.decisions.retain(decided);
                self.save_manifest(&m)?;
                inner.manifest = m;
                inner.open.points.retain(kept);
                inner.open.decisions.retain(decided);
            }
            let oldest_point = inner
                .manifest
                .points
                .first()
                .or(inner.open.points.first())
                .map_or(u64::MAX, |p| p.id);
            let oldest_pin = self
                .pins
                .lock()
                .unwrap()
                .keys()
                .next()
                .copied()
                .unwrap_or(u64::MAX);
            let limit = oldest_point.min(oldest_pin);
            let merge: Vec<Arc<Sealed>> = inner
                .sealed
                .iter()
                .take_while(|s| s.r.last_seq <= limit)
                .cloned()
                .collect();
            let through = merge.last().map(|s| s.r.last_seq);
            (merge, through)
        };
        let Some(through) = through else {
            return Ok(());
        };
        // 2. Merge into the base. Views that need these segments read them from the
        //    segments (they are pinned at or above `through`), never from the base ranges
        //    being rewritten; re-merging after a crash writes the same bytes.
        let base_path = self.dir.join("base.img");
        let base = self.lock().base.clone();
        for s in &merge {
            let p = self.dir.join(&s.r.file);
            for e in &s.entries {
                match e.kind {
                    Kind::Write => {
                        let mut buf = vec![0u8; e.length as usize];
                        s.file
                            .read_exact_at(&mut buf, e.data)
                            .map_err(io_err("cannot read", &p))?;
                        base.write_all_at(&buf, e.offset)
                            .map_err(io_err("cannot write", &base_path))?;
                    }
                    Kind::Trim | Kind::Zero => {
                        redun_tracker::io::ops::write_zeroes(
                            &base, e.offset, e.length, true, false, false,
                        )
                        .map_err(io_err("cannot zero", &base_path))?;
                    }
                    Kind::Marker | Kind::Pad | Kind::Sync | Kind::Decision => {}
                }
                done.merged_bytes += u64::from(e.length);
            }
            done.merged_segments += 1;
        }
        base.sync_data()
            .map_err(io_err("cannot sync", &base_path))?;
        // 3. The manifest forgets them; 4. their files go.
        {
            let mut g = self.lock();
            let inner = &mut *g;
            let mut m = inner.manifest.clone();
            m.base_seq = through;
            m.segments.retain(|s| s.last_seq > through);
            self.save_manifest(&m)?;
            inner.manifest = m;
            inner.sealed.retain(|s| s.r.last_seq > through);
        }
        for s in &merge {
            let _ = std::fs::remove_file(self.dir.join(&s.r.file));
        }
        sync_dir(&self.dir)?;
        info!(
            "replica={}: merged {} segments ({} bytes) into the base, now at seq {through}",
            self.lock().state.name,
            done.merged_segments,
            done.merged_bytes
        );
        Ok(())
    }

    /// Replaces each run of two or more sealed segments that lie between two needed sequence
    /// numbers (kept points and open views) by one segment holding only what the later of the
    /// two sees: the last data of every range, when that drops at least a quarter of the
    /// run's write data ([`ExtentMap::worth_compacting`]; a run that is not worth it is
    /// remembered in `not_worth` and left as it is). Its entries all carry the run's last
    /// sequence number. The new file is complete and synced before the manifest names it; the
    /// old files go after.
    fn compact(
        &self,
        not_worth: &mut HashSet<Vec<String>>,
        done: &mut Maintained,
    ) -> Result<(), StoreError> {
        let (runs, id) = {
            let g = self.lock();
            let mut needed: Vec<u64> = g
                .manifest
                .points
                .iter()
                .chain(g.open.points.iter())
                .map(|p| p.id)
                .collect();
            needed.extend(self.pins.lock().unwrap().keys().copied());
            needed.sort_unstable();
            needed.dedup();
            let mut runs: Vec<Vec<Arc<Sealed>>> = Vec::new();
            let mut cur: Vec<Arc<Sealed>> = Vec::new();
            let mut cur_bucket = None;
            for s in &g.sealed {
                let straddles = needed
                    .iter()
                    .any(|&n| n >= s.r.first_seq && n < s.r.last_seq);
                // The first needed sequence number at or after the segment's end.
                let bucket = needed.partition_point(|&n| n < s.r.last_seq);
                if straddles || cur_bucket != Some(bucket) {
                    runs.push(std::mem::take(&mut cur));
                    cur_bucket = (!straddles).then_some(bucket);
                }
                if !straddles {
                    cur.push(s.clone());
                }
            }
            runs.push(cur);
            runs.retain(|r| r.len() >= 2);
            let id = g.state.identity();
            (runs, id)
        };
        // Forget the runs that no longer exist (a point was pruned, or they were merged).
        not_worth.retain(|names| runs.iter().any(|r| same_files(r, names)));
        for run in runs {
            if not_worth.iter().any(|names| same_files(&run, names)) {
                continue;
            }
            if !self.compact_run(&run, &id, done)? {
                not_worth.insert(run.iter().map(|s| s.r.file.clone()).collect());
            }
        }
        Ok(())
    }

    /// Compacts `run`; false when that is not worth it (nothing is written then).
    fn compact_run(
        &self,
        run: &[Arc<Sealed>],
        id: &Identity,
        done: &mut Maintained,
    ) -> Result<bool, StoreError> {
        let last = run.last().expect("a run").r.last_seq;
        let mut map = ExtentMap::default();
        let mut written = 0u64;
        for (i, s) in run.iter().enumerate() {
            let file = u32::try_from(i).expect("a short run");
            for e in &s.entries {
                map.apply(file, e);
                if e.kind == Kind::Write {
                    written += u64::from(e.length);
                }
            }
        }
        if map.pieces.is_empty() || !map.worth_compacting(written) {
            return Ok(false);
        }
        let mut n = 1;
        let name = loop {
            let name = format!("{last:020}-c{n}.seg");
            if !self.dir.join(&name).exists() {
                break name;
            }
            n += 1;
        };
        let path = self.dir.join(&name);
        let file = open_rw(&path, true)?;
        let werr = io_err("cannot write", &path);
        let mut buf = codec::segment_header(id, last).to_vec();
        let mut written = 0u64;
        let mut entries = Vec::with_capacity(map.pieces.len());
        for (&start, p) in &map.pieces {
            let len = u32::try_from(p.end - start).expect("pieces come from records");
            let (kind, payload) = match p.src {
                Src::Zero => (Kind::Zero, Vec::new()),
                Src::Packed { .. } => unreachable!("plain_only refuses compressed entries"),
                Src::Data { file: f, pos } => {
                    let s = &run[f as usize];
                    let mut b = vec![0u8; len as usize];
                    s.file
                        .read_exact_at(&mut b, pos)
                        .map_err(io_err("cannot read", &self.dir.join(&s.r.file)))?;
                    (Kind::Write, b)
                }
            };
            let data = written + buf.len() as u64 + ENTRY_HEADER_LEN as u64;
            encode_entry(&mut buf, last, kind, last, start, len, &payload);
            entries.push(Entry {
                seq: last,
                offset: start,
                data,
                length: len,
                kind,
                packed: 0,
            });
            if buf.len() >= WRITE_BYTES {
                file.write_all_at(&buf, written)
                    .map_err(io_err("cannot write", &path))?;
                written += buf.len() as u64;
                buf.clear();
            }
        }
        let at = written + buf.len() as u64;
        buf.extend_from_slice(&encode_index(&entries, at));
        file.write_all_at(&buf, written)
            .and_then(|()| file.sync_all())
            .map_err(werr)?;
        sync_dir(&self.dir)?;
        let r = SegmentRef {
            file: name,
            first_seq: last,
            last_seq: last,
            bytes: written + buf.len() as u64,
        };
        let old_bytes: u64 = run.iter().map(|s| s.r.bytes).sum();
        {
            let mut g = self.lock();
            let inner = &mut *g;
            let files: Vec<&str> = run.iter().map(|s| s.r.file.as_str()).collect();
            let at = inner
                .manifest
                .segments
                .iter()
                .position(|s| s.file == files[0])
                .expect("the run is listed");
            let mut m = inner.manifest.clone();
            m.segments
                .splice(at..at + run.len(), std::iter::once(r.clone()));
            self.save_manifest(&m)?;
            inner.manifest = m;
            inner.sealed.splice(
                at..at + run.len(),
                std::iter::once(Arc::new(Sealed {
                    r: r.clone(),
                    file: Arc::new(file),
                    entries,
                })),
            );
        }
        for s in run {
            let _ = std::fs::remove_file(self.dir.join(&s.r.file));
        }
        sync_dir(&self.dir)?;
        done.compacted_segments += run.len();
        done.compacted_bytes_freed += old_bytes.saturating_sub(r.bytes);
        info!(
            "replica={}: compacted {} segments into {} ({} bytes freed)",
            id.name,
            run.len(),
            r.file,
            old_bytes.saturating_sub(r.bytes)
        );
        Ok(true)
    }

    /// Moves the replication relationship to generation `g` (a failover): shippers of the
    /// older generation are refused from now on. Durable when this returns.
    pub fn set_generation(&self, g: u64) -> Result<(), StoreError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let mut m = inner.manifest.clone();
        m.generation = g;
        self.save_manifest(&m)?;
        inner.manifest = m;
        let mut st = inner.state.clone();
        st.generation = g;
        write_json(&self.state_path, &st)?;
        inner.state = st;
        Ok(())
    }

    /// How many sealed segments the store holds, and the base's sequence number.
    pub fn layout(&self) -> (usize, u64) {
        let g = self.lock();
        (g.sealed.len(), g.manifest.base_seq)
    }
}

/// What a retention pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Maintained {
    pub pruned: usize,
    pub merged_segments: usize,
    pub merged_bytes: u64,
    /// Segments replaced by compaction, and the bytes that saved.
    pub compacted_segments: usize,
    pub compacted_bytes_freed: u64,
}

/// Whether `run` is the run of segment files `names`.
fn same_files(run: &[Arc<Sealed>], names: &[String]) -> bool {
    run.len() == names.len() && run.iter().zip(names).all(|(s, n)| s.r.file == *n)
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(v).expect("serializable")
}

fn new_open(dir: &Path, id: &Identity, first_seq: u64) -> Result<Open, StoreError> {
    let name = segment_name(first_seq);
    let path = dir.join(&name);
    let file = open_rw(&path, true)?;
    let head = codec::segment_header(id, first_seq);
    file.set_len(0)
        .and_then(|()| file.write_all_at(&head, 0))
        .and_then(|()| file.sync_all())
        .map_err(io_err("cannot create", &path))?;
    sync_dir(dir)?;
    Ok(Open {
        name,
        first_seq,
        file: Arc::new(file),
        entries: Vec::new(),
        points: Vec::new(),
        decisions: Vec::new(),
        written: SEGMENT_HEADER_LEN as u64,
        buf: Vec::new(),
    })
}

/// Back to what is durable: appended records not committed are forgotten.
fn rollback(inner: &mut Inner) {
    let durable = inner.state.next_seq;
    let o = &mut inner.open;
    o.buf.clear();
    o.entries.retain(|e| e.seq < durable);
    o.points.retain(|p| p.id < durable);
    o.decisions.retain(|d| d.seq < durable);
    if o.name == inner.state.open_segment {
        o.written = inner.state.open_len;
        let _ = o.file.set_len(o.written);
    }
    inner.applied = durable;
    inner.sync = inner.state.sync;
    inner.inconsistent.clone_from(&inner.state.inconsistent);
}

fn write_buf(o: &mut Open, dir: &Path) -> Result<(), StoreError> {
    if o.buf.is_empty() {
        return Ok(());
    }
    o.file
        .write_all_at(&o.buf, o.written)
        .map_err(io_err("cannot write", &dir.join(&o.name)))?;
    o.written += o.buf.len() as u64;
    o.buf.clear();
    if o.buf.capacity() > 2 * WRITE_BYTES {
        o.buf.shrink_to(WRITE_BYTES);
    }
    Ok(())
}

/// Keeps a view's sequence number from being merged away.
#[derive(Debug)]
struct Pin {
    pins: Arc<Mutex<BTreeMap<u64, usize>>>,
    seq: u64,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut p = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = p.get_mut(&self.seq) {
            *n -= 1;
            if *n == 0 {
                p.remove(&self.seq);
            }
        }
    }
}

/// A read-only image of the volume at one sequence number.
#[derive(Debug)]
pub struct View {
    seq: u64,
    size: u64,
    base: Arc<File>,
    files: Vec<Arc<File>>,
    map: ExtentMap,
    _pin: Pin,
}

impl View {
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads `buf.len()` bytes at `offset` (within the volume).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.map.read(buf, offset, |out, s, src| match src {
            None => self.base.read_exact_at(out, s),
            Some(Src::Zero) => {
                out.fill(0);
                Ok(())
            }
            Some(Src::Data { file, pos }) => self.files[file as usize].read_exact_at(out, pos),
            Some(Src::Packed { .. }) => unreachable!("plain_only refuses compressed entries"),
        })
    }

    /// The checksum of each `block`-sized block of `[offset, offset + len)`
    /// ([`redun_shipper::proto::block_hash`]); blocks the view knows to be holes or zeroes are
    /// not read.
    pub fn hashes(&self, offset: u64, len: u64, block: u64) -> io::Result<Vec<u128>> {
        use redun_shipper::proto::{ZERO_HASH, block_hash};
        let end = (offset + len).min(self.size);
        let mut zero =
            vec![false; usize::try_from(end.saturating_sub(offset).div_ceil(block)).unwrap_or(0)];
        let mut at = offset;
        for x in self.block_status(offset, end - offset)? {
            if x.flags & redun_tracker::nbd::proto::STATE_ZERO != 0 {
                // Blocks wholly inside this zero extent.
                let first = (at - offset).div_ceil(block);
                let last = (at + x.length - offset) / block;
                for z in zero
                    .iter_mut()
                    .take(usize::try_from(last).unwrap_or(0))
                    .skip(usize::try_from(first).unwrap_or(0))
                {
                    *z = true;
                }
            }
            at += x.length;
        }
        let mut buf = vec![0u8; usize::try_from(block).unwrap_or(0)];
        let mut out = Vec::with_capacity(zero.len());
        for (i, known_zero) in zero.iter().enumerate() {
            let at = offset + i as u64 * block;
            if *known_zero {
                out.push(ZERO_HASH);
                continue;
            }
            let n = usize::try_from(block.min(end - at)).unwrap_or(0);
            self.read_at(&mut buf[..n], at)?;
            out.push(block_hash(&buf[..n]));
        }
        Ok(out)
    }

    /// Allocation extents of `[offset, offset + len)`: zeroed pieces and the base's holes
    /// read as holes, everything else as data.
    pub fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> io::Result<Vec<redun_tracker::nbd::Extent>> {
        use redun_tracker::nbd::Extent;
        use redun_tracker::nbd::proto::{STATE_HOLE, STATE_ZERO};
        let mut out: Vec<Extent> = Vec::new();
        let mut r = Ok(());
        let mut push = |length: u64, flags: u32| match out.last_mut() {
            Some(l) if l.flags == flags => l.length += length,
            _ => out.push(Extent { length, flags }),
        };
        self.map.walk(offset, offset + len, |s, e, src| {
            if r.is_err() {
                return;
            }
            match src {
                Some(Src::Zero) => push(e - s, STATE_HOLE | STATE_ZERO),
                Some(Src::Data { .. } | Src::Packed { .. }) => push(e - s, 0),
                None => match redun_tracker::io::ops::block_status(&self.base, true, s, e - s) {
                    Ok(ext) => {
                        let mut covered = 0;
                        for x in ext {
                            let l = x.length.min(e - s - covered);
                            push(l, x.flags);
                            covered += l;
                        }
                        if covered < e - s {
                            push(e - s - covered, 0);
                        }
                    }
                    Err(err) => r = Err(err),
                },
            }
        });
        r.map(|()| out)
    }
}

/// Sorts `(start, end)` ranges and merges those that overlap or touch.
pub fn merge_ranges(v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut m = BTreeMap::new();
    for (a, b) in v {
        insert_range(&mut m, a, b);
    }
    m.into_iter().collect()
}

/// Adds `[a, b)` to a set of merged ranges, merging with what overlaps or touches.
pub fn insert_range(w: &mut BTreeMap<u64, u64>, a: u64, b: u64) {
    let (mut s, mut e) = (a, b);
    let touching: Vec<(u64, u64)> = w
        .range(..=e)
        .rev()
        .take_while(|(_, end)| **end >= s)
        .map(|(&x, &y)| (x, y))
        .collect();
    for (x, y) in touching {
        w.remove(&x);
        s = s.min(x);
        e = e.max(y);
    }
    w.insert(s, e);
}

/// The index of the last file of a view (views hold one file per segment).
fn file_index(files: &[Arc<File>]) -> u32 {
    u32::try_from(files.len() - 1).expect("fewer than 2^32 segments")
}

#[cfg(test)]
mod tests;
