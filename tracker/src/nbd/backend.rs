//! The block backend trait the NBD server is generic over.
//!
//! The server owns the protocol; a backend owns the bytes. The tracker serves a backing file
//! or block device ([`crate::io::FileBackend`], tracked by [`crate::track::volume::VolumeBackend`]); the master target will serve a recovery point
//! of its replica store through the same trait.
//!
//! Requests are asynchronous: the server hands each one to the connection's [`IoQueue`] and
//! goes on reading; the queue reports each completion, in any order and from any thread, to
//! the [`CompletionSink`] it was opened with.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

/// What a backend can do; the server turns this into transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub read_only: bool,
    pub flush: bool,
    pub fua: bool,
    pub trim: bool,
    pub write_zeroes: bool,
    pub fast_zero: bool,
    pub cache: bool,
    /// A FLUSH or FUA on one connection covers writes acknowledged on every connection.
    pub multi_conn: bool,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
}

impl Capabilities {
    /// A writable export that supports every command, byte-granular, with the given maximum
    /// request size. `multi_conn` must only be kept when every connection shares one cache.
    pub fn full(max_block: u32) -> Capabilities {
        Capabilities {
            read_only: false,
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            min_block: 1,
            preferred_block: 4096,
            max_block,
        }
    }
}

/// Opaque identity of a request, handed back unchanged with its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// When the request was read (for its latency).
    pub(crate) started: std::time::Instant,
    pub(crate) cookie: u64,
    pub(crate) command: u16,
    pub(crate) flags: u16,
    pub(crate) offset: u64,
    pub(crate) length: u32,
}

/// One block operation. Ranges are already checked against the export size.
#[derive(Debug)]
pub enum IoOp {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    /// Make every previously completed write durable.
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    /// `may_trim`: the range may be deallocated (no NO_HOLE flag). `fast_only`: fail with
    /// `EOPNOTSUPP` rather than fall back to writing zeroes (NBD_CMD_FLAG_FAST_ZERO).
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
        fast_only: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
}

impl IoOp {
    /// Write, trim or zero: the operations that change the volume.
    pub fn is_mutation(&self) -> bool {
        matches!(
            self,
            IoOp::Write { .. } | IoOp::Trim { .. } | IoOp::WriteZeroes { .. }
        )
    }

    /// The FUA flag of a mutation.
    pub fn fua(&self) -> bool {
        match self {
            IoOp::Write { fua, .. } | IoOp::Trim { fua, .. } | IoOp::WriteZeroes { fua, .. } => {
                *fua
            }
            _ => false,
        }
    }
}

#[derive(Debug)]
pub struct IoRequest {
    pub token: Token,
    pub op: IoOp,
}

/// Receives completions. `data` is the buffer read for `Read`, empty otherwise.
pub trait CompletionSink: Send + Sync {
    fn complete(&self, token: Token, result: io::Result<Vec<u8>>);
    /// Called after a batch of completions: push buffered replies to the client.
    fn flush(&self);
}

/// A per-connection submission queue, driven by the connection's thread.
pub trait IoQueue: Send {
    /// Starts `req`; its completion goes to the sink, possibly before this returns. May
    /// block while the queue is at its in-flight limit (back-pressure).
    fn submit(&mut self, req: IoRequest);
    /// Hands submissions batched so far to the device and delivers the completions that are
    /// already available.
    fn kick(&mut self);
    /// Called when the connection has no buffered input: delivers completions as they
    /// arrive until `input` is readable (or nothing is in flight). Queues whose completions
    /// arrive on their own (or inline) need not wait.
    fn wait_readable(&mut self, input: Option<BorrowedFd<'_>>);
    /// Returns once every submitted request has completed.
    fn drain(&mut self);
}

/// An allocation extent for `base:allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// `STATE_HOLE` / `STATE_ZERO` bits.
    pub flags: u32,
}

/// A block device the NBD server can export.
pub trait BlockBackend: Send + Sync + 'static {
    type Queue: IoQueue;

    fn size(&self) -> u64;
    fn capabilities(&self) -> Capabilities;
    /// Human description sent with NBD_INFO_DESCRIPTION.
    fn description(&self) -> String;
    fn open_queue(&self, sink: Arc<dyn CompletionSink>) -> io::Result<Self::Queue>;
    /// Allocation status starting at `offset`, covering at most `len` bytes and at least one
    /// byte. Called on the connection's reader thread.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>>;
}
