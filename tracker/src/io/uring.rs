//! io_uring engine: one ring per NBD connection, driven by that connection's thread. Every
//! `unsafe` block of redun lives here, but for two system calls in [`crate::sys`].
//!
//! # Ownership contract
//! Each submitted request is a [`Pending`] stored in the queue's slab; the SQE's `user_data`
//! is the slab index. The slab owns the request's buffer from submission until the kernel
//! posts the matching CQE, and a slot is only freed after that CQE was reaped. Buffers are
//! `Vec<u8>` whose heap storage never moves while the `Pending` sits in the slab (the `Vec`
//! itself may move when the slab grows, its allocation does not). Requests are never
//! cancelled: dropping a queue first waits for every in-flight request to complete
//! ([`IoQueue::drain`]), so no buffer is freed while the kernel may still use it.
//!
//! # Driving
//! Plain (non-FUA) writes are the exception: they are copied into the page cache inline with
//! `pwrite`, see [`UringQueue::submit`]. Reads, FUA writes, flushes, trims, zeroes and cache
//! hints go through the ring.
//!
//! The connection's thread pushes SQEs ([`IoQueue::submit`]), submits them in batches
//! ([`IoQueue::kick`]) and reaps completions itself: right after each batch (page-cache hits
//! complete inline) and, while requests are in flight and no input is buffered, in
//! `io_uring_enter` with a POLL_ADD on the client socket in the ring, so one wait covers both
//! ([`IoQueue::wait_readable`]). Short transfers and
//! the durability step of FUA trims and zeroes are resubmitted from the reaping code.
//! No other thread touches the ring, so the SQ and CQ are used through `&mut IoUring`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use io_uring::{IoUring, opcode, squeue, types};
use log::{error, warn};

use super::ops;
use crate::nbd::{CompletionSink, IoOp, IoQueue, IoRequest, Token};

/// Submission queue entries per ring; also the in-flight limit, so the SQ never overflows
/// and the CQ (twice as big) never does either.
const RING_ENTRIES: u32 = 128;
const MAX_INFLIGHT: usize = RING_ENTRIES as usize;
/// `user_data` of the POLL_ADD that watches the client socket.
const POLL_INPUT: u64 = u64::MAX;

/// Returns an error if io_uring cannot be used here (for example
/// `kernel.io_uring_disabled=2`, or a seccomp policy).
pub fn probe() -> io::Result<()> {
    let mut ring = IoUring::new(4)?;
    let nop = opcode::Nop::new().build().user_data(1);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    ring.submit_and_wait(1)?;
    let res = ring.completion().next().map(|c| c.result());
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

/// The io_uring queue of one connection.
pub struct UringQueue {
    ring: IoUring,
    file: Arc<File>,
    slab: Vec<Option<Pending>>,
    free: Vec<usize>,
    inflight: usize,
    sink: Arc<dyn CompletionSink>,
    /// A POLL_ADD on the client socket is in the ring.
    poll_armed: bool,
    /// That poll has fired since `wait_readable` began.
    input_ready: bool,
}

impl std::fmt::Debug for UringQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringQueue")
            .field("inflight", &self.inflight)
            .finish_non_exhaustive()
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

impl UringQueue {
    pub fn new(file: Arc<File>, sink: Arc<dyn CompletionSink>) -> io::Result<UringQueue> {
        Ok(UringQueue {
            ring: IoUring::new(RING_ENTRIES)?,
            file,
            slab: Vec::with_capacity(MAX_INFLIGHT),
            free: Vec::new(),
            inflight: 0,
            sink,
            poll_armed: false,
            input_ready: false,
        })
    }

    /// Pushes the SQE for slot `idx`, submitting to make room if the SQ is full.
    fn push(&mut self, idx: usize) {
        let fd = types::Fd(self.file.as_raw_fd());
        let entry = match self.slab[idx].as_mut() {
            Some(p) => sqe(p, fd, idx),
            None => return,
        };
        loop {
            // SAFETY: the entry's buffer is owned by slot `idx` until its CQE is reaped
            // (module doc); `fd` stays open as long as `self.file`.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                warn!("io_uring submit failed while the SQ was full: {e}");
            }
        }
    }

    /// Delivers every completion already posted; returns how many requests finished.
    fn reap(&mut self) -> usize {
        let mut finished = 0;
        let mut resubmit = false;
        loop {
            let Some(cqe) = self.ring.completion().next() else {
                break;
            };
            if cqe.user_data() == POLL_INPUT {
                self.poll_armed = false;
                self.input_ready = true;
                continue;
            }
            let idx = usize::try_from(cqe.user_data()).unwrap_or(usize::MAX);
            let Some(p) = self.slab.get_mut(idx).and_then(|s| s.as_mut()) else {
                error!(
                    "slot={}: io_uring completion for an unknown slot",
                    cqe.user_data()
                );
                continue;
            };
            match on_cqe(p, cqe.result(), &self.file) {
                After::Resubmit => {
                    self.push(idx);
                    resubmit = true;
                }
                After::Finish(r) => {
                    if let Some(p) = self.slab[idx].take() {
                        self.free.push(idx);
                        self.inflight -= 1;
                        finished += 1;
                        self.sink.complete(p.token, r);
                    }
                }
            }
        }
        if resubmit {
            if let Err(e) = self.ring.submit() {
                error!("io_uring submit failed: {e}");
            }
        }
        if finished > 0 {
            self.sink.flush();
        }
        finished
    }

    /// Blocks until at least one completion is posted, then delivers what is there.
    fn wait_one(&mut self) {
        match self.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
            Err(e) => error!("io_uring wait failed: {e}"),
        }
        self.reap();
    }
}

impl IoQueue for UringQueue {
    fn submit(&mut self, req: IoRequest) {
        let (stage, buf, offset, len, fua) = match req.op {
            IoOp::Read { offset, len } => {
                (Stage::Read, vec![0u8; len as usize], offset, len, false)
            }
            IoOp::Write {
                offset,
                data,
                fua: false,
            } => {
                // A plain write is a copy into the page cache. Filesystems without a
                // non-blocking buffered write path (ext4 among them) make io_uring punt every
                // such write to an io-wq thread, which costs two context switches per write;
                // copying inline is faster (ARCHITECTURE.md has the figures).
                let r = ops::write_at(&self.file, offset, &data, false).map(|()| data);
                self.sink.complete(req.token, r);
                return;
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
            self.sink.complete(req.token, Ok(Vec::new()));
            return;
        }
        // Back-pressure: let the device catch up before taking more.
        while self.inflight >= MAX_INFLIGHT {
            self.wait_one();
        }
        let p = Pending {
            token: req.token,
            stage,
            buf,
            offset,
            len,
            done: 0,
            fua,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.slab[i] = Some(p);
                i
            }
            None => {
                self.slab.push(Some(p));
                self.slab.len() - 1
            }
        };
        self.inflight += 1;
        self.push(idx);
    }

    fn kick(&mut self) {
        if let Err(e) = self.ring.submit() {
            error!("io_uring submit failed: {e}");
        }
        self.reap();
    }

    fn wait_readable(&mut self, input: Option<BorrowedFd<'_>>) {
        let Some(input) = input else {
            return;
        };
        // The socket is watched by the ring itself, so one io_uring_enter waits for both.
        self.input_ready = false;
        while self.inflight > 0 && !self.input_ready {
            if !self.poll_armed {
                let poll = opcode::PollAdd::new(types::Fd(input.as_raw_fd()), libc::POLLIN as u32)
                    .build()
                    .user_data(POLL_INPUT);
                loop {
                    // SAFETY: POLL_ADD references no memory; the kernel holds its own
                    // reference to the socket's file while the poll is armed.
                    if unsafe { self.ring.submission().push(&poll) }.is_ok() {
                        break;
                    }
                    let _ = self.ring.submit();
                }
                self.poll_armed = true;
            }
            self.wait_one();
        }
    }

    fn drain(&mut self) {
        if let Err(e) = self.ring.submit() {
            error!("io_uring submit failed: {e}");
        }
        self.reap();
        while self.inflight > 0 {
            self.wait_one();
        }
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        // The kernel may still write into buffers the slab owns: never free them early.
        self.drain();
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
            // without ZERO_RANGE, old filesystems), so it runs inline.
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
