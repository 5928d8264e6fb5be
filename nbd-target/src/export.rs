//! NBD exports of recovery points, served by the tracker's NBD server over a [`View`] of the
//! replica store: `NAME@latest` (everything durable when the client connects) and
//! `NAME@ID` for every usable point, read-only; and `NAME@test` during a test failover, a
//! point made writable by an [`Overlay`] whose writes go to a scratch file and never reach
//! the replica.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Serialize};

use log::{debug, warn};
use redun_tracker::io::MAX_REQUEST;
use redun_tracker::nbd::{
    BlockBackend, Capabilities, CompletionSink, Export, Extent, IoOp, IoQueue, IoRequest, Resolve,
};

use crate::server::Target;
use crate::source::Image;
use crate::store::insert_range;

/// A point of a volume: read-only, or writable through an overlay.
#[derive(Debug)]
pub struct ViewBackend {
    view: Arc<dyn Image>,
    overlay: Option<Arc<Overlay>>,
    description: String,
}

/// Granularity of an overlay: whole blocks are copied up from the point before a partial
/// write, so that every block the overlay holds is whole.
const OVERLAY_BLOCK: u64 = 4096;

/// The writable layer of a test failover: written blocks live in a sparse scratch file of
/// the volume's size; everything else reads from the point underneath. Not kept across a
/// target restart.
#[derive(Debug)]
pub struct Overlay {
    view: Arc<dyn Image>,
    file: File,
    path: PathBuf,
    point: u64,
    started_unix: u64,
    /// Block-aligned ranges held in the scratch file, start -> end, merged. Written only
    /// after their data is in the file.
    written: Mutex<BTreeMap<u64, u64>>,
    /// Serialises writes (their read-modify-write of partial blocks).
    writing: Mutex<()>,
    bytes_written: AtomicU64,
    /// For a promoted volume: the durable record of the written ranges.
    log: Option<Mutex<RangeLog>>,
    /// Ranges written since the last failback pass took them (a promoted volume's).
    fresh: Mutex<BTreeMap<u64, u64>>,
    /// Writes are refused (`EPERM`): the failback's last pass is due.
    fenced: AtomicBool,
}

/// `NAME.promoted.ranges`: the ranges a promoted volume's overlay holds, 16 bytes each
/// (offset, end; little-endian), appended at each flush after the overlay's data is synced.
#[derive(Debug)]
struct RangeLog {
    file: File,
    path: PathBuf,
    pending: Vec<u8>,
    len: u64,
}

/// What `status` says of a test failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestFailover {
    pub export: String,
    pub point: u64,
    pub started_unix: u64,
    pub bytes_written: u64,
}

impl Overlay {
    /// A new, empty overlay on `view` in scratch file `path` (created, sparse).
    pub fn create(view: Arc<dyn Image>, point: u64, path: PathBuf) -> io::Result<Overlay> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        file.set_len(view.size())?;
        Ok(Overlay::new(view, point, path, file, None))
    }

    /// The overlay of a promoted volume: its writes survive a crash once flushed, and the
    /// ranges it holds (what was written since the failover) are kept in `log_path`. With
    /// `fresh`, both files start empty; otherwise they are read back.
    pub fn tracked(
        view: Arc<dyn Image>,
        point: u64,
        path: PathBuf,
        log_path: PathBuf,
        fresh: bool,
    ) -> io::Result<Overlay> {
        let open = |p: &PathBuf| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(fresh)
                .open(p)
        };
        let file = open(&path)?;
        if fresh {
            file.set_len(view.size())?;
            file.sync_all()?;
        }
        let log_file = open(&log_path)?;
        let bytes = std::fs::read(&log_path)?;
        // A torn last entry (a crash during a flush) is dropped.
        let whole = bytes.len() / 16 * 16;
        let mut ranges = Vec::new();
        for e in bytes[..whole].chunks_exact(16) {
            let a = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
            let b = u64::from_le_bytes(e[8..].try_into().expect("8 bytes"));
            if a < b {
                ranges.push((a, b));
            }
        }
        let log = RangeLog {
            file: log_file,
            path: log_path,
            pending: Vec::new(),
            len: whole as u64,
        };
        let o = Overlay::new(view, point, path, file, Some(Mutex::new(log)));
        {
            let mut w = o.written.lock().unwrap();
            for (a, b) in ranges {
                insert_range(&mut w, a, b);
            }
        }
        Ok(o)
    }

    fn new(
        view: Arc<dyn Image>,
        point: u64,
        path: PathBuf,
        file: File,
        log: Option<Mutex<RangeLog>>,
    ) -> Overlay {
        Overlay {
            view,
            file,
            path,
            point,
            started_unix: crate::server::now_unix(),
            written: Mutex::new(BTreeMap::new()),
            writing: Mutex::new(()),
            bytes_written: AtomicU64::new(0),
            log,
            fresh: Mutex::new(BTreeMap::new()),
            fenced: AtomicBool::new(false),
        }
    }

    /// Refuses writes from now on, waits for the writes under way and makes them durable:
    /// after this, the overlay changes no more (the last pass of a failback).
    pub fn fence(&self) -> io::Result<()> {
        self.fenced.store(true, Ordering::SeqCst);
        drop(self.writing.lock().unwrap());
        self.flush()
    }

    pub fn fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Fenced, with every write taken by a pass: the overlay changes no more.
    pub fn settled(&self) -> bool {
        self.fenced() && {
            let _quiet = self.writing.lock().unwrap();
            self.fresh.lock().unwrap().is_empty()
        }
    }

    /// The ranges a failback pass compares: with `all`, every range written since the
    /// failover, else those written since the previous pass. Returns whether this is the
    /// last pass (the overlay is fenced: nothing is written after these ranges were taken).
    /// A range is taken only after its data is in the file, so the pass reads it.
    pub fn take_pass(&self, all: bool) -> (bool, Vec<(u64, u64)>) {
        let last = self.fenced();
        // A write that passed the fence check before the fence finishes first.
        let _quiet = last.then(|| self.writing.lock().unwrap());
        let fresh = std::mem::take(&mut *self.fresh.lock().unwrap());
        let ranges = if all {
            self.written_ranges()
        } else {
            fresh.into_iter().collect()
        };
        (last, ranges)
    }

    /// Makes every write so far durable (a promoted volume's; a test failover's writes are
    /// thrown away and need not be).
    pub fn flush(&self) -> io::Result<()> {
        let Some(log) = &self.log else {
            return Ok(());
        };
        let mut l = log.lock().unwrap();
        self.file.sync_data()?;
        if !l.pending.is_empty() {
            l.file
                .write_all_at(&l.pending, l.len)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", l.path.display())))?;
            l.file.sync_data()?;
            l.len += l.pending.len() as u64;
            l.pending.clear();
        }
        Ok(())
    }

    /// The ranges written since the overlay began, merged.
    pub fn written_ranges(&self) -> Vec<(u64, u64)> {
        self.written
            .lock()
            .unwrap()
            .iter()
            .map(|(&a, &b)| (a, b))
            .collect()
    }

    pub fn point(&self) -> u64 {
        self.point
    }

    pub fn view(&self) -> &Arc<dyn Image> {
        &self.view
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub fn info(&self, volume: &str) -> TestFailover {
        TestFailover {
            export: format!("{volume}@test"),
            point: self.point,
            started_unix: self.started_unix,
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
        }
    }

    /// The overlay's ranges overlapping `[start, end)`, clipped.
    fn held(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let w = self.written.lock().unwrap();
        let first = w.range(..=start).next_back().filter(|(_, e)| **e > start);
        let rest = w.range((Bound::Excluded(start), Bound::Excluded(end)));
        first
            .into_iter()
            .chain(rest)
            .map(|(&s, &e)| (s.max(start), e.min(end)))
            .collect()
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let at = |x: u64| usize::try_from(x - offset).unwrap_or(usize::MAX);
        let mut pos = offset;
        for (s, e) in self.held(offset, end) {
            if s > pos {
                self.view.read_at(&mut buf[at(pos)..at(s)], pos)?;
            }
            self.file.read_exact_at(&mut buf[at(s)..at(e)], s)?;
            pos = e;
        }
        if pos < end {
            self.view.read_at(&mut buf[at(pos)..], pos)?;
        }
        Ok(())
    }

    /// Writes `data` at `offset` (`None`: zeroes of `len`): whole blocks go to the scratch
    /// file, partial ones completed from what the export shows now.
    pub fn write_at(&self, data: Option<&[u8]>, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let _one = self.writing.lock().unwrap();
        if self.fenced() {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let a = offset / OVERLAY_BLOCK * OVERLAY_BLOCK;
        let b = (offset + len).div_ceil(OVERLAY_BLOCK) * OVERLAY_BLOCK;
        let b = b.min(self.view.size().div_ceil(OVERLAY_BLOCK) * OVERLAY_BLOCK);
        let n = usize::try_from(b - a).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut block = vec![0u8; n];
        let head = usize::try_from(offset - a).unwrap_or(0);
        let size = self.view.size();
        // The partial blocks at both ends keep what the export shows there.
        if head > 0 || offset + len < b {
            let readable = usize::try_from(size.min(b) - a).unwrap_or(n);
            self.read_at(&mut block[..readable], a)?;
        }
        let body = &mut block[head..head + usize::try_from(len).unwrap_or(0)];
        match data {
            Some(d) => body.copy_from_slice(d),
            None => body.fill(0),
        }
        self.file.write_all_at(&block, a)?;
        insert_range(&mut self.written.lock().unwrap(), a, b);
        insert_range(&mut self.fresh.lock().unwrap(), a, b);
        if let Some(log) = &self.log {
            let mut l = log.lock().unwrap();
            l.pending.extend_from_slice(&a.to_le_bytes());
            l.pending.extend_from_slice(&b.to_le_bytes());
        }
        self.bytes_written.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

/// Reads complete inline on the connection's thread (page cache or disk reads of the
/// segments and the base).
pub struct ViewQueue {
    view: Arc<dyn Image>,
    overlay: Option<Arc<Overlay>>,
    sink: Arc<dyn CompletionSink>,
}

impl std::fmt::Debug for ViewQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewQueue")
            .field("seq", &self.view.seq())
            .finish_non_exhaustive()
    }
}

impl IoQueue for ViewQueue {
    fn submit(&mut self, req: IoRequest) {
        let r = match (&self.overlay, req.op) {
            (None, IoOp::Read { offset, len }) => {
                let mut buf = vec![0u8; len as usize];
                self.view.read_at(&mut buf, offset).map(|()| buf)
            }
            (Some(o), IoOp::Read { offset, len }) => {
                let mut buf = vec![0u8; len as usize];
                o.read_at(&mut buf, offset).map(|()| buf)
            }
            (Some(o), IoOp::Write { offset, data, fua }) => o
                .write_at(Some(&data), offset, data.len() as u64)
                .and_then(|()| if fua { o.flush() } else { Ok(()) })
                .map(|()| Vec::new()),
            (
                Some(o),
                IoOp::Trim {
                    offset, len, fua, ..
                }
                | IoOp::WriteZeroes {
                    offset, len, fua, ..
                },
            ) => o
                .write_at(None, offset, u64::from(len))
                .and_then(|()| if fua { o.flush() } else { Ok(()) })
                .map(|()| Vec::new()),
            // Durable for a promoted volume; a test failover's writes are thrown away.
            (Some(o), IoOp::Flush) => o.flush().map(|()| Vec::new()),
            (_, IoOp::Cache { .. } | IoOp::Flush) => Ok(Vec::new()),
            // The server refuses these on a read-only export before they get here.
            (None, IoOp::Write { .. } | IoOp::Trim { .. } | IoOp::WriteZeroes { .. }) => {
                Err(io::Error::from_raw_os_error(libc::EROFS))
            }
        };
        self.sink.complete(req.token, r);
    }
    fn kick(&mut self) {}
    fn wait_readable(&mut self, _input: Option<std::os::fd::BorrowedFd<'_>>) {}
    fn drain(&mut self) {}
}

impl BlockBackend for ViewBackend {
    type Queue = ViewQueue;

    fn size(&self) -> u64 {
        self.view.size()
    }

    fn capabilities(&self) -> Capabilities {
        if self.overlay.is_some() {
            return Capabilities {
                fast_zero: false,
                cache: false,
                // Every connection writes through the same overlay.
                ..Capabilities::full(MAX_REQUEST)
            };
        }
        Capabilities {
            read_only: true,
            flush: false,
            fua: false,
            trim: false,
            write_zeroes: false,
            fast_zero: false,
            cache: false,
            // Nothing changes under a view: every connection sees the same bytes.
            multi_conn: true,
            min_block: 1,
            preferred_block: 4096,
            max_block: MAX_REQUEST,
        }
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    fn open_queue(&self, sink: Arc<dyn CompletionSink>) -> io::Result<ViewQueue> {
        Ok(ViewQueue {
            view: self.view.clone(),
            overlay: self.overlay.clone(),
            sink,
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        if let Some(o) = &self.overlay {
            // Written blocks are data; the rest is as the point says.
            let end = offset + len;
            let mut out = Vec::new();
            let mut pos = offset;
            for (s, e) in o.held(offset, end) {
                if s > pos {
                    out.extend(self.view.block_status(pos, s - pos)?);
                }
                out.push(Extent {
                    length: e - s,
                    flags: 0,
                });
                pos = e;
            }
            if pos < end {
                out.extend(self.view.block_status(pos, end - pos)?);
            }
            return Ok(out);
        }
        self.view.block_status(offset, len)
    }
}

/// Which image of a volume an export name asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Latest,
    Point(u64),
    Test,
}

/// Splits `NAME@latest` / `NAME@ID` / `NAME@test`.
pub fn parse_export(name: &str) -> Option<(&str, Which)> {
    let (vol, which) = name.rsplit_once('@')?;
    let which = match which {
        "latest" => Which::Latest,
        "test" => Which::Test,
        n => Which::Point(n.parse().ok()?),
    };
    Some((vol, which))
}

/// Finds exports in the target's stores when a client names them. While a connection to
/// an export lives, later connections to the same name share its view (for `@latest`, only
/// as long as nothing newer is durable).
#[derive(Debug)]
pub struct PointExports {
    target: Arc<Target>,
    live: Mutex<HashMap<String, Weak<Export<ViewBackend>>>>,
}

impl PointExports {
    pub fn new(target: Arc<Target>) -> PointExports {
        PointExports {
            target,
            live: Mutex::new(HashMap::new()),
        }
    }
}

impl PointExports {
    /// Clients connected to export `name` now.
    pub fn connections(&self, name: &str) -> u64 {
        self.live
            .lock()
            .unwrap()
            .get(name)
            .and_then(Weak::upgrade)
            .map_or(0, |e| e.stats.connections.load(Ordering::Relaxed))
    }
}

impl PointExports {
    /// The export of a volume failed over to the target: read-write, tracked.
    fn promoted(&self, name: &str) -> Option<Arc<Export<ViewBackend>>> {
        let (p, overlay) = self.target.promoted(name)?;
        let description = format!(
            "volume {name}, failed over at point {} (generation {}), read-write",
            p.point, p.generation
        );
        Some(self.overlay_export(name, overlay, description))
    }

    /// The export `name` of a writable overlay: the one clients already use, or a new one.
    fn overlay_export(
        &self,
        name: &str,
        overlay: Arc<Overlay>,
        description: String,
    ) -> Arc<Export<ViewBackend>> {
        let mut live = self.live.lock().unwrap();
        live.retain(|_, w| w.strong_count() > 0);
        if let Some(e) = live.get(name).and_then(Weak::upgrade) {
            if e.backend
                .overlay
                .as_ref()
                .is_some_and(|o| Arc::ptr_eq(o, &overlay))
            {
                return e;
            }
        }
        let e = Arc::new(Export::new(
            name.to_string(),
            ViewBackend {
                view: overlay.view().clone(),
                description,
                overlay: Some(overlay),
            },
        ));
        live.insert(name.to_string(), Arc::downgrade(&e));
        e
    }
}

impl Resolve<ViewBackend> for Arc<PointExports> {
    fn find(&self, name: &str) -> Option<Arc<Export<ViewBackend>>> {
        self.as_ref().find(name)
    }
    fn list(&self) -> Vec<(String, String)> {
        self.as_ref().list()
    }
}

impl Resolve<ViewBackend> for PointExports {
    fn find(&self, name: &str) -> Option<Arc<Export<ViewBackend>>> {
        if !name.contains('@') {
            return self.promoted(name);
        }
        let (vol, which) = parse_export(name)?;
        crate::replica::check_name(vol).ok()?;
        if which == Which::Test {
            let overlay = self.target.test_failover(vol)?;
            let description = format!(
                "volume {vol}, test failover of point {} (writes are discarded at cleanup)",
                overlay.point
            );
            return Some(self.overlay_export(name, overlay, description));
        }
        let store = match self.target.volume(vol) {
            Ok(Some(s)) => s,
            Ok(None) => return None,
            Err(e) => {
                warn!("nbd export={name}: {e}");
                return None;
            }
        };
        let seq = match which {
            Which::Latest => match store.latest_image() {
                // Mid-synchronisation, the latest state is no image of the volume.
                Err(s) => {
                    warn!(
                        "nbd export={name} volume={vol}: the volume is being synchronised since seq {}: \
                         latest is not a consistent image; use a point before it",
                        s.since_seq
                    );
                    return None;
                }
                Ok(seq) => seq,
            },
            Which::Test => return None,
            Which::Point(id) => {
                let usable = store.points().iter().any(|(p, ok)| p.id == id && *ok);
                if !usable {
                    debug!("nbd export={name}: no usable point {id}");
                    return None;
                }
                id
            }
        };
        let mut live = self.live.lock().unwrap();
        live.retain(|_, w| w.strong_count() > 0);
        if let Some(e) = live.get(name).and_then(Weak::upgrade) {
            if e.backend.view.seq() == seq {
                return Some(e);
            }
        }
        let view = match store.image(seq) {
            Ok(v) => v,
            Err(e) => {
                warn!("nbd export={name}: {e}");
                return None;
            }
        };
        let description = match which {
            Which::Latest => format!("volume {vol}, latest replicated data (seq {seq})"),
            Which::Test => return None,
            Which::Point(id) => {
                let kind = store
                    .points()
                    .iter()
                    .find(|(p, _)| p.id == id)
                    .map_or("crash", |(p, _)| p.kind.name());
                format!("volume {vol}, {kind}-consistent recovery point {id}")
            }
        };
        let e = Arc::new(Export::new(
            name.to_string(),
            ViewBackend {
                view,
                overlay: None,
                description,
            },
        ));
        live.insert(name.to_string(), Arc::downgrade(&e));
        Some(e)
    }

    fn list(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for v in self.target.status() {
            let Ok(Some(store)) = self.target.volume(&v.name) else {
                continue;
            };
            out.push((
                format!("{}@latest", v.name),
                format!("volume {}, latest replicated data", v.name),
            ));
            if let Some((p, _)) = self.target.promoted(&v.name) {
                out.push((
                    v.name.clone(),
                    format!(
                        "volume {}, failed over at point {} (read-write)",
                        v.name, p.point
                    ),
                ));
            }
            if let Some(o) = self.target.test_failover(&v.name) {
                out.push((
                    format!("{}@test", v.name),
                    format!(
                        "volume {}, test failover of point {} (writable)",
                        v.name, o.point
                    ),
                ));
            }
            for (p, usable) in store.points() {
                if usable {
                    out.push((
                        format!("{}@{}", v.name, p.id),
                        format!(
                            "volume {}, {}-consistent recovery point {}",
                            v.name,
                            p.kind.name(),
                            p.id
                        ),
                    ));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Identity, Store};
    use redun_tracker::journal::format::Kind;

    /// A new replica store of volume `v` with `size` bytes in `dir`.
    fn new_store(dir: &std::path::Path, size: u64) -> Store {
        let id = Identity {
            name: "v".into(),
            uuid: "00112233445566778899aabbccddeeff".into(),
            size,
            generation: 1,
        };
        Store::create(dir, &id).unwrap()
    }

    #[test]
    fn failback_passes_take_each_write_once_and_a_fenced_overlay_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = new_store(dir.path(), 1 << 20);
        store.append(Kind::Write, 1, 0, 4096, &[7u8; 4096]).unwrap();
        store.append(Kind::Zero, 2, 65536, 8192, &[]).unwrap();
        store.commit().unwrap();
        assert_eq!(store.changed_after(1), vec![(65536, 73728)]);
        assert!(store.changed_after(2).is_empty());
        let view = Arc::new(store.view(1).unwrap());
        let (img, log) = (dir.path().join("v.img"), dir.path().join("v.ranges"));
        let o = Overlay::tracked(view, 1, img, log, true).unwrap();
        o.write_at(Some(&[1u8; 100]), 10_000, 100).unwrap();
        // The first pass takes every range written since the failover.
        assert_eq!(o.take_pass(true), (false, vec![(8192, 12288)]));
        assert_eq!(o.take_pass(false), (false, vec![]));
        o.write_at(None, 40_960, 4096).unwrap();
        o.fence().unwrap();
        let e = o.write_at(Some(&[2u8; 10]), 0, 10).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        // Fenced: the next pass is the last, with what came since the previous one.
        assert_eq!(o.take_pass(false), (true, vec![(40_960, 45_056)]));
        assert_eq!(o.take_pass(false), (true, vec![]));
    }

    #[test]
    fn an_overlay_keeps_partial_blocks_whole_and_leaves_the_point_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = new_store(dir.path(), 20_000);
        store
            .append(Kind::Write, 1, 0, 20_000, &[7u8; 20_000])
            .unwrap();
        store.commit().unwrap();
        let view = Arc::new(store.view(1).unwrap());
        let o = Overlay::create(view.clone(), 1, dir.path().join("v.test.img")).unwrap();
        // Unaligned write inside a block, a zeroed range across blocks, a write at the end.
        o.write_at(Some(&[1u8; 10]), 5000, 10).unwrap();
        o.write_at(None, 8000, 1000).unwrap();
        o.write_at(Some(&[2u8; 30]), 19_970, 30).unwrap();
        let mut want = vec![7u8; 20_000];
        want[5000..5010].fill(1);
        want[8000..9000].fill(0);
        want[19_970..].fill(2);
        let mut got = vec![0u8; 20_000];
        o.read_at(&mut got, 0).unwrap();
        assert!(got == want);
        let mut piece = vec![0u8; 3001];
        o.read_at(&mut piece, 4999).unwrap();
        assert!(piece[..] == want[4999..8000]);
        // The point underneath is untouched.
        view.read_at(&mut got, 0).unwrap();
        assert!(got.iter().all(|&b| b == 7));
        assert_eq!(o.info("v").bytes_written, 1040);
    }

    #[test]
    fn export_names_parse() {
        assert_eq!(parse_export("disk@latest"), Some(("disk", Which::Latest)));
        assert_eq!(parse_export("a@b@17"), Some(("a@b", Which::Point(17))));
        assert_eq!(parse_export("disk"), None);
        assert_eq!(parse_export("disk@x"), None);
    }
}
