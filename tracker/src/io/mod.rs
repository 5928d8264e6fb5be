//! Block I/O on a backing file or block device, behind [`crate::nbd::BlockBackend`].
//!
//! Two engines share one backend: io_uring ([`uring`], the default) and plain synchronous
//! `pread`/`pwrite` ([`SyncQueue`]), chosen at start-up, automatically falling back to the
//! synchronous one when io_uring is unavailable. This module only does file I/O and knows
//! nothing of change tracking: [`crate::track::volume`] layers a tracked volume over it.
//!
//! Architecture invariant: [`uring`] is the only module of the tracker with `unsafe` code,
//! besides three system calls in [`crate::sys`].

pub mod ops;
#[allow(unsafe_code)] // The one module allowed to: see its ownership contract.
pub mod uring;

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::warn;

use crate::nbd::{BlockBackend, Capabilities, CompletionSink, Extent, IoOp, IoQueue, IoRequest};

/// Largest request payload we accept (and advertise as the maximum block size).
pub const MAX_REQUEST: u32 = 32 << 20;

/// Which I/O engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// io_uring if the kernel allows it, else synchronous.
    Auto,
    Uring,
    Sync,
}

impl std::str::FromStr for EngineChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(EngineChoice::Auto),
            "uring" => Ok(EngineChoice::Uring),
            "sync" => Ok(EngineChoice::Sync),
            _ => Err(format!("unknown backend {s:?}: use uring, sync or auto")),
        }
    }
}

/// The engine actually in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Uring,
    Sync,
}

impl Engine {
    /// Resolves a choice: `Auto` probes io_uring and falls back to `Sync` with a warning;
    /// an explicit `Uring` that does not work is an error.
    pub fn resolve(choice: EngineChoice) -> io::Result<Engine> {
        match choice {
            EngineChoice::Sync => Ok(Engine::Sync),
            EngineChoice::Uring => uring::probe().map(|()| Engine::Uring).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("io_uring is not usable here ({e}); run with --backend sync"),
                )
            }),
            EngineChoice::Auto => match uring::probe() {
                Ok(()) => Ok(Engine::Uring),
                Err(e) => {
                    warn!("io_uring is not usable ({e}); using the synchronous backend");
                    Ok(Engine::Sync)
                }
            },
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Engine::Uring => "uring",
            Engine::Sync => "sync",
        }
    }
}

/// A backing file or block device served as one export.
#[derive(Debug)]
pub struct FileBackend {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    regular: bool,
    engine: Engine,
}

/// Why a backing path cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("Cannot open backing {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Backing {path} is neither a regular file nor a block device")]
    NotBlock { path: PathBuf },
    #[error("Backing {path} is empty: give it a size first (e.g. truncate -s 10G {path})")]
    Empty { path: PathBuf },
}

impl FileBackend {
    pub fn open(path: &Path, engine: Engine) -> Result<FileBackend, OpenError> {
        let open_err = |source| OpenError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_err)?;
        let ft = file.metadata().map_err(open_err)?.file_type();
        let regular = ft.is_file();
        if !regular && !ft.is_block_device() {
            return Err(OpenError::NotBlock {
                path: path.to_path_buf(),
            });
        }
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        if size == 0 {
            return Err(OpenError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(FileBackend {
            file: Arc::new(file),
            path: path.to_path_buf(),
            size,
            regular,
            engine,
        })
    }

    /// A regular file (not a block device): holes can be punched and fast zeroes honoured.
    pub fn is_regular(&self) -> bool {
        self.regular
    }

    /// The ranges of the backing file that may hold data (holes left out).
    pub fn data_ranges(&self) -> io::Result<Vec<(u64, u64)>> {
        ops::data_ranges(&self.file, self.regular, self.size)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The backing file, shared (the change log applies changes to it).
    pub fn shared_file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Makes every completed write durable on the backing device.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }
}

/// A connection's queue on a [`FileBackend`]: the engine's.
#[derive(Debug)]
pub enum FileQueue {
    Uring(Box<uring::UringQueue>),
    Sync(SyncQueue),
}

impl IoQueue for FileQueue {
    fn submit(&mut self, req: IoRequest) {
        match self {
            FileQueue::Uring(q) => q.submit(req),
            FileQueue::Sync(q) => q.submit(req),
        }
    }
    fn kick(&mut self) {
        match self {
            FileQueue::Uring(q) => q.kick(),
            FileQueue::Sync(q) => q.kick(),
        }
    }
    fn wait_readable(&mut self, input: Option<std::os::fd::BorrowedFd<'_>>) {
        match self {
            FileQueue::Uring(q) => q.wait_readable(input),
            FileQueue::Sync(q) => q.wait_readable(input),
        }
    }
    fn drain(&mut self) {
        match self {
            FileQueue::Uring(q) => q.drain(),
            FileQueue::Sync(q) => q.drain(),
        }
    }
}

impl BlockBackend for FileBackend {
    type Queue = FileQueue;

    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        // One file, one page cache: fdatasync on any connection covers every write that any
        // connection had acknowledged, so CAN_MULTI_CONN holds.
        Capabilities::full(MAX_REQUEST)
    }

    fn description(&self) -> String {
        format!("redun tracker volume on {}", self.path.display())
    }

    fn open_queue(&self, sink: Arc<dyn CompletionSink>) -> io::Result<FileQueue> {
        Ok(match self.engine {
            Engine::Uring => {
                FileQueue::Uring(Box::new(uring::UringQueue::new(self.file.clone(), sink)?))
            }
            Engine::Sync => FileQueue::Sync(SyncQueue {
                file: self.file.clone(),
                sink,
            }),
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        ops::block_status(&self.file, self.regular, offset, len)
    }
}

/// The synchronous engine: each request runs to completion on the reader thread.
pub struct SyncQueue {
    file: Arc<File>,
    sink: Arc<dyn CompletionSink>,
}

impl std::fmt::Debug for SyncQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncQueue").finish_non_exhaustive()
    }
}

impl IoQueue for SyncQueue {
    fn submit(&mut self, req: IoRequest) {
        let f = &*self.file;
        let r = match req.op {
            IoOp::Read { offset, len } => ops::read_at(f, offset, len),
            IoOp::Write { offset, data, fua } => {
                ops::write_at(f, offset, &data, fua).map(|()| Vec::new())
            }
            IoOp::Flush => ops::flush(f).map(|()| Vec::new()),
            IoOp::Trim { offset, len, fua } => ops::trim(f, offset, len, fua).map(|()| Vec::new()),
            IoOp::WriteZeroes {
                offset,
                len,
                fua,
                may_trim,
                fast_only,
            } => ops::write_zeroes(f, offset, len, may_trim, fast_only, fua).map(|()| Vec::new()),
            IoOp::Cache { offset, len } => ops::cache(f, offset, len).map(|()| Vec::new()),
        };
        self.sink.complete(req.token, r);
    }

    fn kick(&mut self) {}

    /// Requests complete inline: nothing is ever pending here.
    fn wait_readable(&mut self, _input: Option<std::os::fd::BorrowedFd<'_>>) {}

    fn drain(&mut self) {}
}
