//! Online verify of one volume (docs/PROTOCOL.md, "Online verify"): source and replica block
//! checksums compared while replication runs, without stopping writes and without marking the
//! replica inconsistent.
//!
//! Per chunk, the shipper sends a HASH_REQUEST in the stream after record `H` (the target
//! answers as of `H`), asks the tracker for its head (at least `H`: every record up to it is
//! on the backing device), reads the chunk, and asks for the head again (`Q`). A block whose
//! checksums differ is a suspect: the difference is real unless a record in `(H, Q]` wrote
//! it, which the shipper sees as it reads those records from the journal. Touched suspects
//! are compared again (up to [`PASSES`] times); the others are reported.

use std::collections::VecDeque;
use std::fs::File;
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::proto;
use crate::sync::{
    AHEAD, Pool, ReadReq, Source, SyncError, block_ranges, drain, next_chunk, read_chunk,
    request_hashes,
};

/// Passes over blocks that writes kept touching before they are reported as unsettled.
const PASSES: u32 = 3;

/// A verify's progress and result, for `redun verify` and `redun status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyStatus {
    /// Which verify (counts up per shipper process).
    pub id: u64,
    pub done: bool,
    /// The block compared.
    pub block_bytes: u64,
    pub total_bytes: u64,
    pub compared_bytes: u64,
    /// Ranges `[offset, length]` where source and replica differ.
    pub differing: Vec<(u64, u64)>,
    /// Bytes that writes kept changing in every pass: not verified.
    pub unsettled_bytes: u64,
    pub started_unix: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_unix: Option<f64>,
}

#[derive(Debug)]
struct Chunk {
    offset: u64,
    len: u64,
    /// The record the target's checksums are as of.
    h: u64,
    target: Option<Vec<u128>>,
    source: Option<(Source, u64)>,
}

/// A block that differed, until the records in `(h, q]` were seen.
#[derive(Debug, Clone, Copy)]
struct Suspect {
    offset: u64,
    len: u64,
    h: u64,
    q: u64,
}

impl Suspect {
    /// Record `seq` wrote `[offset, offset + len)` within the suspect's window and range.
    fn touched_by(&self, seq: u64, offset: u64, len: u64) -> bool {
        seq > self.h
            && seq <= self.q
            && offset < self.offset + self.len
            && self.offset < offset + len
    }
}

type ReadDone = (u64, Result<(Source, u64), String>);

/// One verify, driven by the shipping session.
#[derive(Debug)]
pub struct Verify {
    volume: String,
    size: u64,
    block: u64,
    todo: VecDeque<(u64, u64)>,
    asked: VecDeque<Chunk>,
    suspects: Vec<Suspect>,
    /// Records read from the journal since the oldest chunk asked for: `(seq, offset,
    /// length)`. A suspect found later may have been written by one of them.
    seen: VecDeque<(u64, u64, u64)>,
    recheck: Vec<(u64, u64)>,
    passes: u32,
    to_worker: Sender<(ReadReq, u64)>,
    from_worker: Receiver<ReadDone>,
    status: VerifyStatus,
    started: Instant,
}

impl Verify {
    /// Starts verifying the whole volume; `path` is its backing device, `socket` the
    /// tracker's admin socket.
    pub fn start(
        id: u64,
        volume: &str,
        socket: &Path,
        path: &str,
        size: u64,
        block: u64,
    ) -> Result<Verify, SyncError> {
        let file = File::open(path).map_err(|e| {
            SyncError(format!(
                "volume {volume}: cannot read the source {path} to verify it: {e}"
            ))
        })?;
        let (to_worker, requests) = channel::<(ReadReq, u64)>();
        let (done, from_worker) = channel::<ReadDone>();
        let (sock, vol) = (socket.to_path_buf(), volume.to_string());
        std::thread::Builder::new()
            .name(format!("verify-{volume}"))
            .spawn(move || read_bracketed(&file, block, &sock, &vol, &requests, &done))
            .map_err(|e| SyncError(format!("cannot start a thread: {e}")))?;
        info!("volume={volume}: verify {id} of {size} bytes begins");
        Ok(Verify {
            volume: volume.to_string(),
            size,
            block,
            todo: VecDeque::from(vec![(0, size)]),
            asked: VecDeque::new(),
            suspects: Vec::new(),
            seen: VecDeque::new(),
            recheck: Vec::new(),
            passes: 1,
            to_worker,
            from_worker,
            status: VerifyStatus {
                id,
                done: false,
                block_bytes: block,
                total_bytes: size,
                compared_bytes: 0,
                differing: Vec::new(),
                unsettled_bytes: 0,
                started_unix: crate::ship::unix_now(),
                finished_unix: None,
            },
            started: Instant::now(),
        })
    }

    pub fn status(&self) -> VerifyStatus {
        self.status.clone()
    }

    pub fn awaiting_hashes(&self) -> usize {
        self.asked.iter().filter(|c| c.target.is_none()).count()
    }

    pub fn awaiting_source(&self) -> bool {
        self.asked.iter().any(|c| c.source.is_none())
    }

    /// Asks for the next chunks; `sent` is the last record sent to the target (the
    /// checksums will be as of it).
    pub fn pump(
        &mut self,
        sent: u64,
        send: &mut dyn FnMut(&proto::Frame) -> std::io::Result<()>,
    ) -> Result<(), SyncError> {
        while self.asked.len() < AHEAD {
            let Some((o, len)) = next_chunk(&mut self.todo) else {
                break;
            };
            request_hashes(send, &self.volume, self.status.id, (o, len), self.block)?;
            self.to_worker
                .send((ReadReq { offset: o, len }, sent))
                .map_err(|_| SyncError("the verify reader stopped".into()))?;
            self.asked.push_back(Chunk {
                offset: o,
                len,
                h: sent,
                target: None,
                source: None,
            });
        }
        Ok(())
    }

    /// The target's checksums of a chunk.
    pub fn on_hashes(
        &mut self,
        offset: u64,
        as_of: u64,
        hashes: Vec<u128>,
    ) -> Result<(), SyncError> {
        let Some(c) = self
            .asked
            .iter_mut()
            .find(|c| c.offset == offset && c.target.is_none())
        else {
            return Err(SyncError(format!(
                "volume {}: the target answered a hash request that was not asked ({offset})",
                self.volume
            )));
        };
        if hashes.len() as u64 != c.len.div_ceil(self.block) || as_of != c.h {
            return Err(SyncError(format!(
                "volume {}: the target's checksums of {offset} are as of seq {as_of}, not {}",
                self.volume, c.h
            )));
        }
        c.target = Some(hashes);
        self.compare();
        Ok(())
    }

    /// Takes in what the worker read; with `wait`, waits up to that long for one chunk.
    pub fn poll_source(&mut self, wait: Option<Duration>) -> Result<(), SyncError> {
        for (offset, r) in drain(&self.from_worker, wait)? {
            let src = r.map_err(|e| SyncError(format!("volume {}: {e}", self.volume)))?;
            if let Some(c) = self
                .asked
                .iter_mut()
                .find(|c| c.offset == offset && c.source.is_none())
            {
                c.source = Some(src);
            }
        }
        self.compare();
        Ok(())
    }

    fn compare(&mut self) {
        while self
            .asked
            .front()
            .is_some_and(|c| c.target.is_some() && c.source.is_some())
        {
            let c = self.asked.pop_front().expect("checked");
            let target = c.target.expect("checked");
            let (src, q) = c.source.expect("checked");
            for (i, (s, t)) in src.hashes.iter().zip(&target).enumerate() {
                if s != t {
                    let at = i as u64 * self.block;
                    let suspect = Suspect {
                        offset: c.offset + at,
                        len: self.block.min(c.len - at),
                        h: c.h,
                        q,
                    };
                    if self
                        .seen
                        .iter()
                        .any(|&(seq, o, l)| suspect.touched_by(seq, o, l))
                    {
                        self.recheck.push((suspect.offset, suspect.len));
                    } else {
                        self.suspects.push(suspect);
                    }
                }
            }
            self.status.compared_bytes += c.len;
        }
        // Records older than every open window are of no use any more.
        let oldest = self
            .asked
            .iter()
            .map(|c| c.h)
            .chain(self.suspects.iter().map(|s| s.h))
            .min();
        match oldest {
            Some(h) => {
                while self.seen.front().is_some_and(|r| r.0 <= h) {
                    self.seen.pop_front();
                }
            }
            None => self.seen.clear(),
        }
    }

    /// A record the shipper read from the journal: suspects it wrote are compared again.
    pub fn observe(&mut self, seq: u64, offset: u64, len: u64) {
        if !self.asked.is_empty() || !self.suspects.is_empty() {
            self.seen.push_back((seq, offset, len));
        }
        let (mut kept, mut again) = (Vec::new(), Vec::new());
        for s in self.suspects.drain(..) {
            if s.touched_by(seq, offset, len) {
                again.push((s.offset, s.len));
            } else {
                kept.push(s);
            }
        }
        self.suspects = kept;
        self.recheck.extend(again);
    }

    /// The shipper has read every record up to `read`: suspects whose window it covers are
    /// real differences. True when the verify is over.
    pub fn settle(&mut self, read: u64) -> bool {
        let (done, open): (Vec<_>, Vec<_>) = self.suspects.drain(..).partition(|s| s.q <= read);
        self.suspects = open;
        for s in done {
            match self.status.differing.last_mut() {
                Some(d) if d.0 + d.1 == s.offset => d.1 += s.len,
                _ => self.status.differing.push((s.offset, s.len)),
            }
        }
        if !self.todo.is_empty() || !self.asked.is_empty() || !self.suspects.is_empty() {
            return false;
        }
        if !self.recheck.is_empty() && self.passes < PASSES {
            self.passes += 1;
            let again = std::mem::take(&mut self.recheck);
            self.todo = block_ranges(&again, self.block, self.size, 0).into();
            return false;
        }
        if self.status.done {
            return true;
        }
        self.status.unsettled_bytes = self.recheck.iter().map(|r| r.1).sum();
        self.status.done = true;
        self.status.finished_unix = Some(crate::ship::unix_now());
        let s = &self.status;
        let list: Vec<String> = s
            .differing
            .iter()
            .map(|(o, l)| format!("{o}+{l}"))
            .collect();
        if s.differing.is_empty() {
            info!(
                "volume={}: verify {} done in {:.1}s: {} bytes compared, source and replica \
                 agree{}",
                self.volume,
                s.id,
                self.started.elapsed().as_secs_f64(),
                s.compared_bytes,
                unsettled(s.unsettled_bytes)
            );
        } else {
            warn!(
                "volume={}: verify {} done: the replica differs from the source in {} ranges \
                 ({}){}; run `redun resync {} --full` to repair it",
                self.volume,
                s.id,
                s.differing.len(),
                list.join(", "),
                unsettled(s.unsettled_bytes),
                self.volume
            );
        }
        true
    }
}

fn unsettled(bytes: u64) -> String {
    if bytes == 0 {
        String::new()
    } else {
        format!(" ({bytes} bytes changed in every pass and were not verified)")
    }
}

/// The verify worker: for each chunk, the tracker's head once it reached `h` (every record up
/// to it on the backing device), the read, then the head again.
fn read_bracketed(
    file: &File,
    block: u64,
    socket: &Path,
    volume: &str,
    requests: &Receiver<(ReadReq, u64)>,
    done: &Sender<ReadDone>,
) {
    let regular = file.metadata().is_ok_and(|m| m.is_file());
    let pool = Pool::default();
    let head = || crate::sync::head(socket, volume).map_err(|e| e.0);
    while let Ok((req, h)) = requests.recv() {
        let r = (|| {
            // The records up to `h` were visible in the journal; the tracker applies each
            // before it releases the lock it appended it under.
            let mut before = head()?;
            while before < h {
                std::thread::sleep(Duration::from_millis(1));
                before = head()?;
            }
            let mut src = read_chunk(file, regular, block, &req, &pool)
                .map_err(|e| format!("cannot read the source at {}: {e}", req.offset))?;
            let q = head()?;
            // Only the checksums are compared: the buffer goes back.
            pool.lock().unwrap().push(std::mem::take(&mut src.data));
            Ok((src, q))
        })();
        if done.send((req.offset, r)).is_err() {
            return;
        }
    }
}
