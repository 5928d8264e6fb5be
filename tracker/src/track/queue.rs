//! The tracked queue: change tracking as a layer over an I/O engine's queue. The engines
//! ([`crate::io`]) only do file I/O; this queue takes a tracked volume's writes, trims, zeroes
//! and flushes, and the reads that overlap a change not yet applied, and hands everything else
//! to the engine.
//!
//! - A write, trim or zero is recorded ([`ChangeLog::record`]: journal and pending map); its
//!   reply leaves at the next [`IoQueue::kick`], right after the journal's memory is written
//!   into the journal file, so a batch of replies shares one `pwrite`.
//! - A FUA change and a FLUSH are answered by the volume's flusher once the journal is durable
//!   through them ([`ChangeLog::when_durable`]); every FLUSH and FUA in the meantime shares
//!   that one sync. The connection's thread does not wait.
//! - A read overlapping a pending change is read from the backing device with the pending
//!   changes laid over it ([`ChangeLog::read_through`]); other reads go to the engine.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Condvar, Mutex};

use super::ChangeLog;
use crate::nbd::{CompletionSink, IoOp, IoQueue, IoRequest, Token};

/// Replies a flusher still owes a connection.
#[derive(Debug, Default)]
struct Owed {
    count: Mutex<usize>,
    zero: Condvar,
}

/// A connection's queue on a tracked volume.
pub struct TrackedQueue<Q: IoQueue> {
    inner: Q,
    log: Arc<ChangeLog>,
    sink: Arc<dyn CompletionSink>,
    /// Changes recorded since the last kick: their replies wait for the write-out.
    acks: Vec<Token>,
    owed: Arc<Owed>,
    /// `NBD_CMD_FLAG_FAST_ZERO` can be honoured (a regular file: the flusher zeroes it with
    /// `fallocate`); on a block device a fast zero is refused with `EOPNOTSUPP`, which
    /// clients answer by writing zeroes.
    fast_zero: bool,
}

impl<Q: IoQueue> std::fmt::Debug for TrackedQueue<Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedQueue")
            .field("acks", &self.acks.len())
            .finish_non_exhaustive()
    }
}

impl<Q: IoQueue> TrackedQueue<Q> {
    pub fn new(
        inner: Q,
        log: Arc<ChangeLog>,
        sink: Arc<dyn CompletionSink>,
        fast_zero: bool,
    ) -> Self {
        TrackedQueue {
            inner,
            log,
            sink,
            acks: Vec::new(),
            owed: Arc::default(),
            fast_zero,
        }
    }

    /// Answers `token` once everything recorded so far is durable.
    fn when_durable(&mut self, token: Token) {
        *self.owed.count.lock().unwrap() += 1;
        let sink = self.sink.clone();
        let owed = self.owed.clone();
        self.log.when_durable(Box::new(move |r| {
            sink.complete(token, r.map(|()| Vec::new()));
            sink.flush();
            let mut n = owed.count.lock().unwrap();
            *n -= 1;
            if *n == 0 {
                owed.zero.notify_all();
            }
        }));
    }
}

impl<Q: IoQueue> IoQueue for TrackedQueue<Q> {
    fn submit(&mut self, req: IoRequest) {
        let IoRequest { token, op } = req;
        match op {
            IoOp::WriteZeroes {
                fast_only: true, ..
            } if !self.fast_zero => {
                self.sink.complete(
                    token,
                    Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
                );
            }
            op if op.is_mutation() => {
                let fua = op.fua();
                match self.log.record(op) {
                    Ok(()) if fua => self.when_durable(token),
                    Ok(()) => self.acks.push(token),
                    Err(e) => self.sink.complete(token, Err(e)),
                }
            }
            IoOp::Flush => self.when_durable(token),
            IoOp::Read { offset, len } if self.log.overlaps_pending(offset, u64::from(len)) => {
                let r = self.log.read_through(offset, len);
                self.sink.complete(token, r);
            }
            op => self.inner.submit(IoRequest { token, op }),
        }
    }

    fn kick(&mut self) {
        if !self.acks.is_empty() {
            // In the journal file from here: a killed tracker replays them at start-up.
            self.log.write_out();
            for t in self.acks.drain(..) {
                self.sink.complete(t, Ok(Vec::new()));
            }
        }
        self.inner.kick();
    }

    fn wait_readable(&mut self, input: Option<BorrowedFd<'_>>) {
        self.inner.wait_readable(input);
    }

    fn drain(&mut self) {
        self.kick();
        self.inner.drain();
        let mut n = self.owed.count.lock().unwrap();
        while *n > 0 {
            n = self.owed.zero.wait(n).unwrap();
        }
    }
}

impl<Q: IoQueue> Drop for TrackedQueue<Q> {
    fn drop(&mut self) {
        self.drain();
    }
}
