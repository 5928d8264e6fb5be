//! io_uring engine: one ring per NBD connection. Every `unsafe` block of redun lives here.
//!
//! # Ownership contract
//! Each submitted request is a [`Pending`] stored in the queue's slab; the SQE's `user_data`
//! is the slab index. The slab owns the request's buffer from submission until the kernel
//! posts the matching CQE, and a slot is only freed by the completion thread after that CQE
//! was reaped. Buffers are `Vec<u8>` whose heap storage never moves while the `Pending` sits in
//! the slab (the `Vec` itself may move with the slab, its allocation does not). Requests are
//! never cancelled: dropping a queue first waits for every in-flight request to complete
//! ([`IoQueue::drain`]), then posts a NOP carrying [`EXIT`] that stops the completion thread.
//!
//! # Threads
//! The connection's reader thread pushes SQEs (under the `state` mutex) and submits them in
//! batches ([`IoQueue::kick`]); a dedicated completion thread waits for CQEs, resubmits short
//! transfers and the durability step of FUA trims and zeroes, and hands finished requests to
//! the [`CompletionSink`]. Only the completion thread touches the completion queue; the
//! submission queue is only touched with the `state` mutex held.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};

use io_uring::{IoUring, opcode, squeue, types};
use log::{error, warn};

use super::ops;
use crate::nbd::{CompletionSink, IoOp, IoQueue, IoRequest, Token};

/// Submission queue entries per ring; also the in-flight limit, so the SQ never overflows
/// and the CQ (twice as big) never does either.
const RING_ENTRIES: u32 = 128;
const MAX_INFLIGHT: usize = RING_ENTRIES as usize;
/// `user_data` of the NOP that stops the completion thread.
const EXIT: u64 = u64::MAX;

/// Returns an error if io_uring cannot be used here (for example
/// `kernel.io_uring_disabled=2`, or a seccomp policy).
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(4)?;
    let nop = opcode::Nop::new().build().user_data(1);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission_shared().push(&nop) }
        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    ring.submit_and_wait(1)?;
    // SAFETY: this thread is the only user of this ring.
    let res = unsafe { ring.completion_shared() }
        .next()
        .map(|c| c.result());
    match res {
        Some(r) if r >= 0 => Ok(()),
        Some(r) => Err(io::Error::from_raw_os_error(-r)),
        None => Err(io::Error::other("io_uring NOP did not complete")),
    }
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    Read,
    Write,
    Flush,
    Trim,
    Zero {
        may_trim: bool,
        fast_only: bool,
    },
    Cache,
    /// The fdatasync that makes a FUA trim or zero durable.
    SyncAfter,
}

#[derive(Debug)]
struct Pending {
    token: Token,
    stage: Stage,
    buf: Vec<u8>,
    offset: u64,
    len: u32,
    /// Bytes already transferred (short reads and writes are resubmitted for the rest).
    done: u32,
    fua: bool,
}

#[derive(Debug, Default)]
struct State {
    slab: Vec<Option<Pending>>,
    free: Vec<usize>,
    inflight: usize,
}

impl State {
    fn insert(&mut self, p: Pending) -> usize {
        self.inflight += 1;
        match self.free.pop() {
            Some(i) => {
                self.slab[i] = Some(p);
                i
            }
            None => {
                self.slab.push(Some(p));
                self.slab.len() - 1
            }
        }
    }

    /// Frees slot `i`. `inflight` drops only once the completion has been delivered, so that
    /// [`IoQueue::drain`] returns after every reply is in the sink.
    fn remove(&mut self, i: usize) -> Option<Pending> {
        let p = self.slab.get_mut(i)?.take()?;
        self.free.push(i);
        Some(p)
    }
}

struct Shared {
    ring: IoUring,
    file: Arc<File>,
    state: Mutex<State>,
    /// Signalled whenever `inflight` drops.
    idle: Condvar,
    sink: Arc<dyn CompletionSink>,
}

/// The io_uring queue of one connection.
pub struct UringQueue {
    shared: Arc<Shared>,
    completer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for UringQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringQueue").finish_non_exhaustive()
    }
}

impl UringQueue {
    pub fn new(file: Arc<File>, sink: Arc<dyn CompletionSink>) -> io::Result<UringQueue> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let shared = Arc::new(Shared {
            ring,
            file,
            state: Mutex::new(State::default()),
            idle: Condvar::new(),
            sink,
        });
        let s = shared.clone();
        let completer = thread::Builder::new()
            .name("uring-cq".into())
            .spawn(move || completion_loop(&s))?;
        Ok(UringQueue {
            shared,
            completer: Some(completer),
        })
    }
}

/// Builds the SQE for the current stage of `p`.
fn sqe(p: &mut Pending, fd: types::Fd, idx: usize) -> squeue::Entry {
    let off = p.offset + u64::from(p.done);
    let left = p.len - p.done;
    let e = match p.stage {
        Stage::Read => {
            // SAFETY: `done <= len == buf.len()`, so the pointer stays inside the buffer.
            let ptr = unsafe { p.buf.as_mut_ptr().add(p.done as usize) };
            opcode::Read::new(fd, ptr, left).offset(off).build()
        }
        Stage::Write => {
            // SAFETY: as above.
            let ptr = unsafe { p.buf.as_ptr().add(p.done as usize) };
            let flags = if p.fua { libc::RWF_DSYNC } else { 0 };
            opcode::Write::new(fd, ptr, left)
                .offset(off)
                .rw_flags(flags)
                .build()
        }
        Stage::Flush | Stage::SyncAfter => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        Stage::Trim => opcode::Fallocate::new(fd, u64::from(p.len))
            .offset(p.offset)
            .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
            .build(),
        Stage::Zero { may_trim, .. } => {
            let mode = if may_trim {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            opcode::Fallocate::new(fd, u64::from(p.len))
                .offset(p.offset)
                .mode(mode)
                .build()
        }
        Stage::Cache => opcode::Fadvise::new(fd, i64::from(p.len), libc::POSIX_FADV_WILLNEED)
            .offset(p.offset)
            .build(),
    };
    e.user_data(idx as u64)
}

impl Shared {
    fn fd(&self) -> types::Fd {
        types::Fd(self.file.as_raw_fd())
    }

    /// Pushes the SQE for slot `idx`, submitting to make room if the SQ is full.
    /// Must be called with the state lock held (`st`).
    fn push(&self, st: &mut State, idx: usize) {
        let fd = self.fd();
        let entry = match st.slab[idx].as_mut() {
            Some(p) => sqe(p, fd, idx),
            None => return,
        };
        loop {
            // SAFETY: the SQ is only touched with the state lock held, which the caller holds.
            // The entry's buffer is owned by slot `idx` until its CQE is reaped (module doc).
            let pushed = unsafe { self.ring.submission_shared().push(&entry) };
            if pushed.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                warn!("io_uring submit failed while the SQ was full: {e}");
            }
        }
    }
}

impl IoQueue for UringQueue {
    fn submit(&mut self, req: IoRequest) {
        let (stage, buf, offset, len, fua) = match req.op {
            IoOp::Read { offset, len } => {
                (Stage::Read, vec![0u8; len as usize], offset, len, false)
            }
            IoOp::Write { offset, data, fua } => {
                let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
                (Stage::Write, data, offset, len, fua)
            }
            IoOp::Flush => (Stage::Flush, Vec::new(), 0, 0, false),
            IoOp::Trim { offset, len, fua } => (Stage::Trim, Vec::new(), offset, len, fua),
            IoOp::WriteZeroes {
                offset,
                len,
                fua,
                may_trim,
                fast_only,
            } => (
                Stage::Zero {
                    may_trim,
                    fast_only,
                },
                Vec::new(),
                offset,
                len,
                fua,
            ),
            IoOp::Cache { offset, len } => (Stage::Cache, Vec::new(), offset, len, false),
        };
        if len == 0 && !matches!(stage, Stage::Flush) {
            self.shared.sink.complete(req.token, Ok(Vec::new()));
            return;
        }
        let mut st = self.shared.state.lock().unwrap();
        while st.inflight >= MAX_INFLIGHT {
            // Back-pressure: let the device catch up before reading more requests.
            drop(st);
            self.kick();
            st = self.shared.state.lock().unwrap();
            if st.inflight >= MAX_INFLIGHT {
                st = self.shared.idle.wait(st).unwrap();
            }
        }
        let idx = st.insert(Pending {
            token: req.token,
            stage,
            buf,
            offset,
            len,
            done: 0,
            fua,
        });
        self.shared.push(&mut st, idx);
    }

    fn kick(&mut self) {
        if let Err(e) = self.shared.ring.submit() {
            error!("io_uring submit failed: {e}");
        }
    }

    fn drain(&mut self) {
        self.kick();
        let st = self.shared.state.lock().unwrap();
        let _st = self.shared.idle.wait_while(st, |s| s.inflight > 0).unwrap();
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        self.drain();
        {
            let _st = self.shared.state.lock().unwrap();
            let nop = opcode::Nop::new().build().user_data(EXIT);
            loop {
                // SAFETY: SQ touched under the state lock; a NOP references no memory.
                if unsafe { self.shared.ring.submission_shared().push(&nop) }.is_ok() {
                    break;
                }
                let _ = self.shared.ring.submit();
            }
        }
        let _ = self.shared.ring.submit();
        if let Some(h) = self.completer.take() {
            let _ = h.join();
        }
    }
}

/// What to do with a slot after its CQE.
enum After {
    Resubmit,
    Finish(io::Result<Vec<u8>>),
}

fn on_cqe(p: &mut Pending, res: i32, file: &File) -> After {
    if res < 0 {
        let errno = -res;
        if errno == libc::EAGAIN || errno == libc::EINTR {
            return After::Resubmit;
        }
        return match (p.stage, errno) {
            // Trim is a hint, caching is advisory.
            (Stage::Trim, libc::EOPNOTSUPP) | (Stage::Cache, _) => finish_or_sync(p),
            // No fast zeroing here: the synchronous path knows the fallbacks. Rare (tmpfs
            // without ZERO_RANGE, old filesystems), so it runs on the completion thread.
            (
                Stage::Zero {
                    may_trim,
                    fast_only,
                },
                libc::EOPNOTSUPP | libc::ENODEV,
            ) => After::Finish(
                ops::write_zeroes(file, p.offset, p.len, may_trim, fast_only, p.fua)
                    .map(|()| Vec::new()),
            ),
            _ => After::Finish(Err(io::Error::from_raw_os_error(errno))),
        };
    }
    match p.stage {
        Stage::Read | Stage::Write => {
            let n = res.unsigned_abs();
            if n == 0 {
                // End of file inside the export: the backing file shrank under us.
                return After::Finish(Err(io::Error::from_raw_os_error(libc::EIO)));
            }
            p.done += n;
            if p.done < p.len {
                return After::Resubmit;
            }
            After::Finish(Ok(std::mem::take(&mut p.buf)))
        }
        Stage::Trim | Stage::Zero { .. } | Stage::Cache => finish_or_sync(p),
        Stage::Flush | Stage::SyncAfter => After::Finish(Ok(Vec::new())),
    }
}

fn finish_or_sync(p: &mut Pending) -> After {
    if p.fua && !matches!(p.stage, Stage::Cache) {
        p.stage = Stage::SyncAfter;
        return After::Resubmit;
    }
    After::Finish(Ok(Vec::new()))
}

fn completion_loop(shared: &Shared) {
    let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(RING_ENTRIES as usize * 2);
    let mut finished: Vec<(Token, io::Result<Vec<u8>>)> = Vec::new();
    loop {
        match shared.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => {
                error!("io_uring wait failed, completion thread stops: {e}");
                return;
            }
        }
        {
            // SAFETY: this thread is the only consumer of the completion queue.
            let cq = unsafe { shared.ring.completion_shared() };
            cqes.extend(cq.map(|c| (c.user_data(), c.result())));
        }
        if cqes.is_empty() {
            continue;
        }
        let mut exit = false;
        {
            let mut st = shared.state.lock().unwrap();
            for (ud, res) in cqes.drain(..) {
                if ud == EXIT {
                    exit = true;
                    continue;
                }
                let idx = usize::try_from(ud).unwrap_or(usize::MAX);
                let Some(p) = st.slab.get_mut(idx).and_then(|s| s.as_mut()) else {
                    error!("io_uring completion for unknown slot {ud}");
                    continue;
                };
                match on_cqe(p, res, &shared.file) {
                    After::Resubmit => shared.push(&mut st, idx),
                    After::Finish(r) => {
                        if let Some(p) = st.remove(idx) {
                            finished.push((p.token, r));
                        }
                    }
                }
            }
        }
        let _ = shared.ring.submit();
        let n = finished.len();
        for (token, r) in finished.drain(..) {
            shared.sink.complete(token, r);
        }
        shared.sink.flush();
        if n > 0 {
            shared.state.lock().unwrap().inflight -= n;
            shared.idle.notify_all();
        }
        if exit {
            return;
        }
    }
}
