//! Block-checksum synchronisation of one volume (docs/PROTOCOL.md, "Synchronisation"): the
//! initial replication, a resync after an overflow or an unclean stop, and offline seeding
//! are one job. The job's ranges are split into chunks; for each chunk the shipper asks the
//! target for its block checksums (in the stream, so they are as of every record sent
//! before), has the tracker append a slot record (every change before it is on the backing
//! device), reads and checksums the source blocks on a worker thread, and fills the slot
//! with the blocks that differ when the journal reader reaches it. The end record follows
//! the last slot; once the target holds it durably, the tracker clears the job's ranges.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::info;
use redun_tracker::admin::{self, AdminRequest, AdminResponse};
use redun_tracker::journal::format::{SyncInfo, SyncRole};
use redun_tracker::track::SyncJob;
use serde::{Deserialize, Serialize};

use crate::proto::{self, SyncBlock, ZERO_HASH, block_hash};

/// Default block: the unit compared and sent.
pub const DEFAULT_BLOCK: u64 = 64 << 10;
/// Bytes one hash request and one slot cover.
const CHUNK: u64 = 8 << 20;
/// Chunks asked for ahead of the journal reader.
pub(crate) const AHEAD: usize = 16;
/// The finer block that differing blocks are compared in again, so that a 4 KiB change costs
/// about 4 KiB on the wire.
const FINE: u64 = 4096;

/// What a job is, in the words of `redun jobs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    InitialReplication,
    Resync,
    FullResync,
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobPhase {
    /// Comparing blocks and sending those that differ.
    Comparing,
    /// Every block compared: waiting for the target to hold the end record.
    FinalizeProtection,
}

/// A job's progress, for `redun jobs` and `redun status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub job: u64,
    pub kind: JobKind,
    pub phase: JobPhase,
    /// Bytes the job covers, and how many of them were compared (on both sides).
    pub total_bytes: u64,
    pub compared_bytes: u64,
    /// Bytes of blocks that differed and were sent (data; zeroed blocks travel as ranges).
    pub sent_bytes: u64,
    /// Bytes below the replica's cursor when this shipper took the job over (not compared
    /// again).
    pub resumed_bytes: u64,
    pub percent: f64,
    pub rate_bytes_per_second: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    pub started_unix: f64,
    /// "Enable protection": what was checked before an initial replication began.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prerequisites: Vec<String>,
}

/// A chunk asked for: its slot, and the two sides' checksums as they arrive.
#[derive(Debug)]
struct Chunk {
    offset: u64,
    len: u64,
    slot: u64,
    target: Option<Vec<u128>>,
    source: Option<Source>,
    /// Whole blocks compared: `coarse` holds the runs to send as they are, `refine` the
    /// blocks that hold data on both sides and differ, compared again in [`FINE`] blocks.
    compared: bool,
    coarse: Vec<(u64, u64, bool)>,
    refine: Vec<Refine>,
    /// The runs to send: (offset in the chunk, length, data or zeroes).
    runs: Option<Vec<(u64, u64, bool)>>,
}

/// A run of blocks compared again at a finer grain. It is asked for in the stream after the
/// chunk's slot was appended (the stream waits at that slot until it is filled), so the
/// argument of docs/PROTOCOL.md holds with this request in place of the chunk's.
#[derive(Debug)]
struct Refine {
    /// Offset in the chunk and length.
    at: u64,
    len: u64,
    asked: bool,
    target: Option<Vec<u128>>,
}

/// The source side of a chunk, read after its slot was appended.
#[derive(Debug)]
pub(crate) struct Source {
    pub(crate) hashes: Vec<u128>,
    pub(crate) data: Vec<u8>,
}

#[derive(Debug)]
pub(crate) struct ReadReq {
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

type ReadDone = (u64, std::io::Result<Source>);

/// Why a job cannot go on in this session.
#[derive(Debug)]
pub struct SyncError(pub String);

/// One job, driven by the shipping session.
#[derive(Debug)]
pub struct Sync {
    volume: String,
    socket: PathBuf,
    job: SyncJob,
    block: u64,
    todo: VecDeque<(u64, u64)>,
    asked: VecDeque<Chunk>,
    /// Filled slot payloads by sequence number, until the journal reader reaches them.
    filled: BTreeMap<u64, Vec<u8>>,
    end_seq: Option<u64>,
    to_worker: Sender<ReadReq>,
    from_worker: Receiver<ReadDone>,
    pool: Pool,
    status: JobStatus,
    started: Instant,
}

/// An offset within a chunk as an index.
pub(crate) fn ix(x: u64) -> usize {
    usize::try_from(x).expect("offsets within a chunk fit")
}

/// What a sync record of the journal travels with.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// A slot of this job: its blocks that differ.
    Filled(Vec<u8>),
    /// As it is: another job's slot (never filled), a begin or an end.
    AsIs,
    /// Not yet: the slot's blocks are still being compared.
    NotYet,
}

/// The next chunk, at most [`CHUNK`] bytes, from the front of `todo`.
pub(crate) fn next_chunk(todo: &mut VecDeque<(u64, u64)>) -> Option<(u64, u64)> {
    let (o, l) = todo.pop_front()?;
    let len = l.min(CHUNK);
    if l > len {
        todo.push_front((o + len, l - len));
    }
    Some((o, len))
}

/// Puts a HASH_REQUEST for `range` in `block`s into the stream.
pub(crate) fn request_hashes(
    send: &mut dyn FnMut(&proto::Frame) -> std::io::Result<()>,
    volume: &str,
    job: u64,
    range: (u64, u64),
    block: u64,
) -> Result<(), SyncError> {
    send(&proto::Frame::HashRequest {
        job,
        offset: range.0,
        length: range.1,
        block: u32::try_from(block).expect("blocks are at most 4 MiB"),
    })
    .map_err(|e| SyncError(format!("volume {volume}: {e}")))
}

/// What a worker finished: the first after waiting up to `wait` (if given), and everything
/// else already there.
pub(crate) fn drain<T>(rx: &Receiver<T>, wait: Option<Duration>) -> Result<Vec<T>, SyncError> {
    let stopped = || SyncError("the source reader thread stopped".into());
    let mut out = Vec::new();
    if let Some(d) = wait {
        match rx.recv_timeout(d) {
            Ok(v) => out.push(v),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return Ok(out),
            Err(_) => return Err(stopped()),
        }
    }
    loop {
        match rx.try_recv() {
            Ok(v) => out.push(v),
            Err(TryRecvError::Empty) => return Ok(out),
            Err(TryRecvError::Disconnected) => return Err(stopped()),
        }
    }
}

/// Asks the tracker; an error names the volume and says what to do.
pub(crate) fn ask(
    socket: &Path,
    volume: &str,
    req: &AdminRequest,
) -> Result<AdminResponse, SyncError> {
    let r = admin::request(socket, req).map_err(|e| {
        SyncError(format!(
            "volume {volume}: the tracker's admin socket {} does not answer ({e}): a \
             synchronisation needs the tracker (--tracker-socket)",
            socket.display()
        ))
    })?;
    if r.ok {
        Ok(r)
    } else {
        Err(SyncError(r.error.unwrap_or_else(|| "refused".into())))
    }
}

/// The volume's backing device or file, as the tracker says.
pub(crate) fn device_path(socket: &Path, volume: &str) -> Result<String, SyncError> {
    ask(socket, volume, &AdminRequest::Status)?
        .status
        .and_then(|s| s.volumes.into_iter().find(|v| v.name == volume))
        .map(|v| v.path)
        .ok_or_else(|| SyncError(format!("the tracker does not serve volume {volume}")))
}

/// The sequence number of the volume's last record: every change up to it is on the device.
pub(crate) fn head(socket: &Path, volume: &str) -> Result<u64, SyncError> {
    ask(
        socket,
        volume,
        &AdminRequest::Head {
            volume: volume.to_string(),
        },
    )?
    .seq
    .ok_or_else(|| SyncError(format!("volume {volume}: the tracker sent no head")))
}

/// The job's ranges as whole blocks, merged, from `cursor` on.
pub(crate) fn block_ranges(
    ranges: &[(u64, u64)],
    block: u64,
    size: u64,
    cursor: u64,
) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(o, l) in ranges {
        let start = (o / block * block).max(cursor.div_ceil(block) * block);
        let end = (o + l).next_multiple_of(block).min(size);
        if start >= end {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 >= start => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

impl Sync {
    /// Begins a job with the tracker (or takes over the one under way); `replica` is what
    /// the target's WELCOME said: its job and cursor, and whether it was new.
    pub fn begin(
        volume: &str,
        socket: &Path,
        full: bool,
        replica: (u64, u64),
        size: u64,
        block: u64,
        checked: &[String],
    ) -> Result<Sync, SyncError> {
        let r = ask(
            socket,
            volume,
            &AdminRequest::SyncBegin {
                volume: volume.to_string(),
                full,
            },
        )?;
        let job = r
            .sync
            .ok_or_else(|| SyncError(format!("volume {volume}: the tracker sent no job")))?;
        let cursor = if replica.0 == job.job { replica.1 } else { 0 };
        let ranges = block_ranges(&job.ranges, block, size, 0);
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        let todo: VecDeque<_> = block_ranges(&job.ranges, block, size, cursor).into();
        let left: u64 = todo.iter().map(|r| r.1).sum();
        let file = File::open(&job.path).map_err(|e| {
            SyncError(format!(
                "volume {volume}: cannot read the source {} for synchronisation: {e}",
                job.path
            ))
        })?;
        let (to_worker, requests) = channel::<ReadReq>();
        let (done, from_worker) = channel::<ReadDone>();
        let block_size = block;
        let pool = Pool::default();
        let worker_pool = pool.clone();
        std::thread::Builder::new()
            .name(format!("sync-{volume}"))
            .spawn(move || read_source(&file, block_size, &requests, &done, &worker_pool))
            .map_err(|e| SyncError(format!("cannot start a thread: {e}")))?;
        let kind = if job.full {
            JobKind::FullResync
        } else if job.begin_seq == 1 {
            JobKind::InitialReplication
        } else {
            JobKind::Resync
        };
        info!(
            "volume={volume}: {} {} of {total} bytes{}",
            match kind {
                JobKind::InitialReplication => "initial replication",
                JobKind::Resync => "resync",
                JobKind::FullResync => "full resync",
            },
            job.job,
            if left < total {
                format!(", resumed with {left} bytes left")
            } else {
                String::new()
            }
        );
        Ok(Sync {
            volume: volume.to_string(),
            socket: socket.to_path_buf(),
            status: JobStatus {
                job: job.job,
                kind,
                phase: JobPhase::Comparing,
                total_bytes: total,
                compared_bytes: total - left,
                sent_bytes: 0,
                resumed_bytes: total - left,
                percent: 0.0,
                rate_bytes_per_second: 0.0,
                eta_seconds: None,
                started_unix: crate::ship::unix_now(),
                prerequisites: if kind == JobKind::InitialReplication {
                    let mut p = checked.to_vec();
                    p.push(format!(
                        "backing device {} readable ({size} bytes)",
                        job.path
                    ));
                    p
                } else {
                    Vec::new()
                },
            },
            job,
            block,
            todo,
            asked: VecDeque::new(),
            filled: BTreeMap::new(),
            end_seq: None,
            to_worker,
            from_worker,
            pool,
            started: Instant::now(),
        })
    }

    pub fn status(&self) -> JobStatus {
        let mut s = self.status.clone();
        s.percent = if s.total_bytes == 0 {
            100.0
        } else {
            100.0 * s.compared_bytes as f64 / s.total_bytes as f64
        };
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        s.rate_bytes_per_second = (s.compared_bytes - s.resumed_bytes) as f64 / secs;
        s.eta_seconds = (s.rate_bytes_per_second > 0.0)
            .then(|| (s.total_bytes - s.compared_bytes) as f64 / s.rate_bytes_per_second);
        s
    }

    /// Hash requests the target has not answered yet.
    pub fn awaiting_hashes(&self) -> usize {
        self.asked
            .iter()
            .map(|c| {
                usize::from(c.target.is_none())
                    + c.refine
                        .iter()
                        .filter(|r| r.asked && r.target.is_none())
                        .count()
            })
            .sum()
    }

    /// Chunks whose source side is still being read.
    pub fn awaiting_source(&self) -> bool {
        self.asked.iter().any(|c| c.source.is_none())
    }

    /// Asks for the next chunks: the hash request goes into the stream first (so that the
    /// target hashes as of every record sent so far), then the tracker appends the slot
    /// (every change before it is on the backing device), then the worker reads the source.
    pub fn pump(
        &mut self,
        send: &mut dyn FnMut(&proto::Frame) -> std::io::Result<()>,
    ) -> Result<(), SyncError> {
        for c in &mut self.asked {
            for r in c.refine.iter_mut().filter(|r| !r.asked) {
                let (job, at) = (self.job.job, c.offset + r.at);
                request_hashes(send, &self.volume, job, (at, r.len), FINE)?;
                r.asked = true;
            }
        }
        // Compared blocks wait in memory until the journal reader reaches their slot: both
        // count against the limit.
        while self.asked.len() + self.filled.len() < AHEAD {
            let Some((o, len)) = next_chunk(&mut self.todo) else {
                break;
            };
            request_hashes(send, &self.volume, self.job.job, (o, len), self.block)?;
            let slot = self.record(SyncRole::Slot, o, len)?;
            self.to_worker
                .send(ReadReq { offset: o, len })
                .map_err(|_| SyncError("the sync reader stopped".into()))?;
            self.asked.push_back(Chunk {
                offset: o,
                len,
                slot,
                target: None,
                source: None,
                compared: false,
                coarse: Vec::new(),
                refine: Vec::new(),
                runs: None,
            });
        }
        if self.todo.is_empty() && self.asked.is_empty() && self.end_seq.is_none() {
            self.end_seq = Some(self.record(SyncRole::End, 0, 0)?);
            self.status.phase = JobPhase::FinalizeProtection;
        }
        Ok(())
    }

    fn record(&self, role: SyncRole, offset: u64, len: u64) -> Result<u64, SyncError> {
        let r = ask(
            &self.socket,
            &self.volume,
            &AdminRequest::SyncRecord {
                volume: self.volume.clone(),
                job: self.job.job,
                role,
                offset,
                length: u32::try_from(len).expect("chunks are small"),
            },
        )?;
        r.seq
            .ok_or_else(|| SyncError(format!("volume {}: the tracker sent no seq", self.volume)))
    }

    /// The target's checksums of a chunk.
    pub fn on_hashes(
        &mut self,
        job: u64,
        offset: u64,
        block: u32,
        hashes: Vec<u128>,
    ) -> Result<(), SyncError> {
        if u64::from(block) == FINE && job == self.job.job {
            let fine = self.asked.iter_mut().find_map(|c| {
                let at = offset.checked_sub(c.offset)?;
                c.refine
                    .iter_mut()
                    .find(|r| r.at == at && r.asked && r.target.is_none())
            });
            if let Some(r) = fine {
                if hashes.len() as u64 != r.len.div_ceil(FINE) {
                    return Err(SyncError(format!(
                        "volume {}: the target sent {} checksums for {} bytes",
                        self.volume,
                        hashes.len(),
                        r.len
                    )));
                }
                r.target = Some(hashes);
                self.complete();
                return Ok(());
            }
        }
        let Some(c) = self
            .asked
            .iter_mut()
            .find(|c| job == self.job.job && c.offset == offset && c.target.is_none())
        else {
            return Err(SyncError(format!(
                "volume {}: the target answered a hash request that was not asked ({job}, \
                 {offset})",
                self.volume
            )));
        };
        if hashes.len() as u64 != c.len.div_ceil(self.block) {
            return Err(SyncError(format!(
                "volume {}: the target sent {} checksums for {} bytes",
                self.volume,
                hashes.len(),
                c.len
            )));
        }
        c.target = Some(hashes);
        self.complete();
        Ok(())
    }

    /// Takes in what the worker read; with `wait`, waits up to that long for one chunk.
    pub fn poll_source(&mut self, wait: Option<Duration>) -> Result<(), SyncError> {
        for (offset, r) in drain(&self.from_worker, wait)? {
            let src = r.map_err(|e| {
                SyncError(format!(
                    "volume {}: cannot read the source {} at {offset}: {e}",
                    self.volume, self.job.path
                ))
            })?;
            if let Some(c) = self
                .asked
                .iter_mut()
                .find(|c| c.offset == offset && c.source.is_none())
            {
                c.source = Some(src);
            }
        }
        self.complete();
        Ok(())
    }

    /// Compares chunks that have both sides (planning the finer comparisons their
    /// differing data blocks need), and fills the slots of those at the front that are done.
    fn complete(&mut self) {
        let block = self.block;
        for c in &mut self.asked {
            let (Some(target), Some(src)) = (&c.target, &c.source) else {
                continue;
            };
            if !c.compared {
                c.compared = true;
                for (i, (&s, &t)) in src.hashes.iter().zip(target).enumerate() {
                    if s == t {
                        continue;
                    }
                    let at = i as u64 * block;
                    let n = block.min(c.len - at);
                    if s != ZERO_HASH && t != ZERO_HASH && block > FINE {
                        match c.refine.last_mut() {
                            Some(r) if r.at + r.len == at => r.len += n,
                            _ => c.refine.push(Refine {
                                at,
                                len: n,
                                asked: false,
                                target: None,
                            }),
                        }
                    } else {
                        push_run(&mut c.coarse, at, n, s != ZERO_HASH);
                    }
                }
            }
            if c.runs.is_some() || c.refine.iter().any(|r| r.target.is_none()) {
                continue;
            }
            let mut runs = std::mem::take(&mut c.coarse);
            for r in &c.refine {
                for (i, &t) in r.target.as_ref().expect("checked").iter().enumerate() {
                    let at = r.at + i as u64 * FINE;
                    let n = FINE.min(r.at + r.len - at);
                    let s = block_hash(&src.data[ix(at)..ix(at + n)]);
                    if s != t {
                        runs.push((at, n, s != ZERO_HASH));
                    }
                }
            }
            runs.sort_unstable();
            let mut merged = Vec::new();
            for (at, n, data) in runs {
                push_run(&mut merged, at, n, data);
            }
            c.runs = Some(merged);
        }
        while self.asked.front().is_some_and(|c| c.runs.is_some()) {
            let c = self.asked.pop_front().expect("checked");
            let src = c.source.expect("compared");
            let runs = c.runs.expect("checked");
            let blocks: Vec<SyncBlock<'_>> = runs
                .iter()
                .map(|&(at, n, data)| SyncBlock {
                    offset: c.offset + at,
                    length: u32::try_from(n).expect("chunks are small"),
                    data: data.then(|| &src.data[ix(at)..ix(at + n)]),
                })
                .collect();
            self.status.sent_bytes += runs.iter().filter(|r| r.2).map(|r| r.1).sum::<u64>();
            let head = SyncInfo {
                role: SyncRole::Slot,
                job: self.job.job,
            }
            .encode();
            let mut payload = Vec::new();
            proto::encode_slot(&head, &blocks, &mut payload);
            self.filled.insert(c.slot, payload);
            self.status.compared_bytes += c.len;
            drop(blocks);
            self.pool.lock().unwrap().push(src.data);
        }
    }

    /// What the sync record `seq` with `payload` travels with.
    pub fn fill(&mut self, seq: u64, payload: &[u8]) -> Fill {
        match SyncInfo::decode(payload) {
            Some(i) if i.role == SyncRole::Slot && i.job == self.job.job => {
                if let Some(p) = self.filled.remove(&seq) {
                    Fill::Filled(p)
                } else if self.asked.iter().any(|c| c.slot == seq) {
                    Fill::NotYet
                } else {
                    Fill::AsIs
                }
            }
            _ => Fill::AsIs,
        }
    }

    /// The target holds every record through `acked`: once that covers the end record, the
    /// tracker clears the job's ranges. True when the job is over.
    pub fn acked(&mut self, acked: u64) -> Result<bool, SyncError> {
        match self.end_seq {
            Some(end) if acked >= end => {
                let r = ask(
                    &self.socket,
                    &self.volume,
                    &AdminRequest::SyncDone {
                        volume: self.volume.clone(),
                        job: self.job.job,
                    },
                )?;
                let s = self.status();
                info!(
                    "volume={}: synchronisation {} done: {} bytes compared, {} sent, in {:.3}s; \
                     {} dirty bytes left",
                    self.volume,
                    self.job.job,
                    s.compared_bytes,
                    s.sent_bytes,
                    self.started.elapsed().as_secs_f64(),
                    r.dirty_bytes.unwrap_or(0)
                );
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// Adds a run of differing bytes (data or zeroes) at `at`, merged with the last one when
/// they touch and are of one kind.
fn push_run(runs: &mut Vec<(u64, u64, bool)>, at: u64, n: u64, data: bool) {
    match runs.last_mut() {
        Some(r) if r.0 + r.1 == at && r.2 == data => r.1 += n,
        _ => runs.push((at, n, data)),
    }
}

/// The worker: reads each chunk asked for (holes of a sparse file are not read) and
/// checksums its blocks.
fn read_source(
    file: &File,
    block: u64,
    requests: &Receiver<ReadReq>,
    done: &Sender<ReadDone>,
    pool: &Pool,
) {
    let regular = file.metadata().is_ok_and(|m| m.is_file());
    while let Ok(req) = requests.recv() {
        let r = read_chunk(file, regular, block, &req, pool);
        if done.send((req.offset, r)).is_err() {
            return;
        }
    }
}

/// Chunk buffers given back once their slot is filled, so that reading does not fault in
/// fresh memory for every chunk.
pub(crate) type Pool = Arc<Mutex<Vec<Vec<u8>>>>;

pub(crate) fn read_chunk(
    file: &File,
    regular: bool,
    block: u64,
    req: &ReadReq,
    pool: &Pool,
) -> std::io::Result<Source> {
    let n = usize::try_from(req.len).expect("chunks are small");
    let mut data = pool.lock().unwrap().pop().unwrap_or_default();
    data.resize(n, 0);
    let mut at = 0u64;
    for x in redun_tracker::io::ops::block_status(file, regular, req.offset, req.len)? {
        let (s, e) = (ix(at), ix(at + x.length));
        if x.flags & redun_tracker::nbd::proto::STATE_HOLE == 0 {
            file.read_exact_at(&mut data[s..e], req.offset + at)?;
        } else {
            data[s..e].fill(0);
        }
        at += x.length;
    }
    if at < req.len {
        file.read_exact_at(&mut data[ix(at)..], req.offset + at)?;
    }
    let hashes = data.chunks(ix(block)).map(block_hash).collect();
    Ok(Source { hashes, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_become_whole_blocks_from_the_cursor() {
        let b = 65536;
        let size = 10 * b + 100;
        assert_eq!(
            block_ranges(&[(4096, 4096), (b, b), (5 * b, 5 * b + 100)], b, size, 0),
            [(0, 2 * b), (5 * b, 5 * b + 100)]
        );
        assert_eq!(
            block_ranges(&[(0, size)], b, size, 7 * b + 1),
            [(8 * b, 2 * b + 100)]
        );
    }
}
