//! A volume as the tracker serves it: the backing file ([`crate::io::FileBackend`], which only
//! does file I/O) with, when the volume is tracked, its change log layered over every
//! connection's queue ([`TrackedQueue`]) and its consistency-group gate over every reply.
//!
//! This is where `io` and `track` meet: `io` knows nothing of tracking, and the tracking rules
//! are written once, whichever engine runs underneath.

use std::io;
use std::sync::Arc;

use super::ChangeLog;
use super::gate::GateSink;
use super::queue::TrackedQueue;
use crate::io::{FileBackend, FileQueue};
use crate::nbd::{BlockBackend, Capabilities, CompletionSink, Extent, IoQueue, IoRequest};

/// One export of the tracker: a backing file, tracked or not.
#[derive(Debug)]
pub struct VolumeBackend {
    backing: FileBackend,
    log: Option<Arc<ChangeLog>>,
}

impl VolumeBackend {
    /// An untracked volume: requests go straight to the backing file.
    pub fn untracked(backing: FileBackend) -> VolumeBackend {
        VolumeBackend { backing, log: None }
    }

    /// A tracked volume: every change is recorded in `log` before it reaches `backing`.
    pub fn tracked(backing: FileBackend, log: Arc<ChangeLog>) -> VolumeBackend {
        VolumeBackend {
            backing,
            log: Some(log),
        }
    }

    pub fn backing(&self) -> &FileBackend {
        &self.backing
    }

    pub fn log(&self) -> Option<&Arc<ChangeLog>> {
        self.log.as_ref()
    }
}

/// A connection's queue on a [`VolumeBackend`].
#[derive(Debug)]
pub enum VolumeQueue {
    Untracked(FileQueue),
    Tracked(Box<TrackedQueue<FileQueue>>),
}

impl IoQueue for VolumeQueue {
    fn submit(&mut self, req: IoRequest) {
        match self {
            VolumeQueue::Untracked(q) => q.submit(req),
            VolumeQueue::Tracked(q) => q.submit(req),
        }
    }
    fn kick(&mut self) {
        match self {
            VolumeQueue::Untracked(q) => q.kick(),
            VolumeQueue::Tracked(q) => q.kick(),
        }
    }
    fn wait_readable(&mut self, input: Option<std::os::fd::BorrowedFd<'_>>) {
        match self {
            VolumeQueue::Untracked(q) => q.wait_readable(input),
            VolumeQueue::Tracked(q) => q.wait_readable(input),
        }
    }
    fn drain(&mut self) {
        match self {
            VolumeQueue::Untracked(q) => q.drain(),
            VolumeQueue::Tracked(q) => q.drain(),
        }
    }
}

impl BlockBackend for VolumeBackend {
    type Queue = VolumeQueue;

    fn size(&self) -> u64 {
        self.backing.size()
    }

    fn capabilities(&self) -> Capabilities {
        // A tracked volume keeps CAN_MULTI_CONN: a FLUSH on any connection waits for the one
        // journal sync that covers every change any connection had acknowledged.
        self.backing.capabilities()
    }

    fn description(&self) -> String {
        self.backing.description()
    }

    fn open_queue(&self, sink: Arc<dyn CompletionSink>) -> io::Result<VolumeQueue> {
        let Some(log) = &self.log else {
            return self.backing.open_queue(sink).map(VolumeQueue::Untracked);
        };
        // Replies of a volume of the consistency group pass its gate.
        let sink: Arc<dyn CompletionSink> = match log.gate() {
            Some(gate) => Arc::new(GateSink {
                inner: sink,
                gate: gate.clone(),
            }),
            None => sink,
        };
        let engine = self.backing.open_queue(sink.clone())?;
        Ok(VolumeQueue::Tracked(Box::new(TrackedQueue::new(
            engine,
            log.clone(),
            sink,
            self.backing.is_regular(),
        ))))
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        // A change not yet applied is not in the file's allocation map: let it land first.
        if let Some(log) = self
            .log
            .as_ref()
            .filter(|l| l.overlaps_pending(offset, len))
        {
            log.settle()?;
        }
        self.backing.block_status(offset, len)
    }
}
