//! An in-memory block backend: for tests, the fuzz target, and as the smallest example of
//! [`BlockBackend`].

use std::io;
use std::sync::{Arc, Mutex};

use super::backend::*;

/// A RAM disk.
#[derive(Debug, Clone)]
pub struct MemBackend {
    data: Arc<Mutex<Vec<u8>>>,
    max_block: u32,
}

impl MemBackend {
    pub fn new(size: usize) -> Self {
        MemBackend {
            data: Arc::new(Mutex::new(vec![0; size])),
            max_block: 1 << 20,
        }
    }

    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }
}

/// Runs each request inline.
pub struct MemQueue {
    data: Arc<Mutex<Vec<u8>>>,
    sink: Arc<dyn CompletionSink>,
}

impl std::fmt::Debug for MemQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemQueue").finish_non_exhaustive()
    }
}

fn range(offset: u64, len: usize) -> std::ops::Range<usize> {
    // The server checked the range against the size, which fits in memory.
    let o = usize::try_from(offset).unwrap_or(usize::MAX);
    o..o + len
}

impl IoQueue for MemQueue {
    fn submit(&mut self, req: IoRequest) {
        let mut d = self.data.lock().unwrap();
        let r = match req.op {
            IoOp::Read { offset, len } => Ok(d[range(offset, len as usize)].to_vec()),
            IoOp::Write { offset, data, .. } => {
                d[range(offset, data.len())].copy_from_slice(&data);
                Ok(Vec::new())
            }
            IoOp::Trim { offset, len, .. } | IoOp::WriteZeroes { offset, len, .. } => {
                d[range(offset, len as usize)].fill(0);
                Ok(Vec::new())
            }
            IoOp::Flush | IoOp::Cache { .. } => Ok(Vec::new()),
        };
        drop(d);
        self.sink.complete(req.token, r);
    }
    fn kick(&mut self) {}

    /// Requests complete inline: nothing is ever pending here.
    fn wait_readable(&mut self, _input: Option<std::os::fd::BorrowedFd<'_>>) {}
    fn drain(&mut self) {}
}

impl BlockBackend for MemBackend {
    type Queue = MemQueue;

    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn capabilities(&self) -> Capabilities {
        // One shared buffer: every connection sees every completed write.
        Capabilities::full(self.max_block)
    }

    fn description(&self) -> String {
        "in-memory disk".into()
    }

    fn open_queue(&self, sink: Arc<dyn CompletionSink>) -> io::Result<MemQueue> {
        Ok(MemQueue {
            data: self.data.clone(),
            sink,
        })
    }

    fn block_status(&self, _offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            length: len,
            flags: 0,
        }])
    }
}
