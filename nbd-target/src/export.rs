//! NBD exports of recovery points, served by the tracker's NBD server over a [`View`] of the
//! replica store: `NAME@latest` (everything durable when the client connects) and
//! `NAME@ID` for every usable point, read-only.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, Weak};

use log::{debug, warn};
use redun_tracker::io::MAX_REQUEST;
use redun_tracker::nbd::{
    BlockBackend, Capabilities, CompletionSink, Export, Extent, IoOp, IoQueue, IoRequest, Resolve,
};

use crate::server::Target;
use crate::store::View;

/// A point of a volume, read-only.
#[derive(Debug)]
pub struct ViewBackend {
    view: Arc<View>,
    description: String,
}

/// Reads complete inline on the connection's thread (page cache or disk reads of the
/// segments and the base).
pub struct ViewQueue {
    view: Arc<View>,
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
        let r = match req.op {
            IoOp::Read { offset, len } => {
                let mut buf = vec![0u8; len as usize];
                self.view.read_at(&mut buf, offset).map(|()| buf)
            }
            // Prefetching a point is not worth a thread; flushing has nothing to do.
            IoOp::Cache { .. } | IoOp::Flush => Ok(Vec::new()),
            // The server refuses these on a read-only export before they get here.
            IoOp::Write { .. } | IoOp::Trim { .. } | IoOp::WriteZeroes { .. } => {
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
            sink,
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.view.block_status(offset, len)
    }
}

/// Which image of a volume an export name asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Latest,
    Point(u64),
}

/// Splits `NAME@latest` / `NAME@ID`.
pub fn parse_export(name: &str) -> Option<(&str, Which)> {
    let (vol, which) = name.rsplit_once('@')?;
    let which = match which {
        "latest" => Which::Latest,
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

impl Resolve<ViewBackend> for PointExports {
    fn find(&self, name: &str) -> Option<Arc<Export<ViewBackend>>> {
        let (vol, which) = parse_export(name)?;
        crate::replica::check_name(vol).ok()?;
        let store = match self.target.store(vol) {
            Ok(Some(s)) => s,
            Ok(None) => return None,
            Err(e) => {
                warn!("nbd export={name}: {e}");
                return None;
            }
        };
        let seq = match which {
            Which::Latest => store.latest(),
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
        let view = store.view(seq)?;
        let description = match which {
            Which::Latest => format!("volume {vol}, latest replicated data (seq {seq})"),
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
                view: Arc::new(view),
                description,
            },
        ));
        live.insert(name.to_string(), Arc::downgrade(&e));
        Some(e)
    }

    fn list(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for v in self.target.status() {
            let Ok(Some(store)) = self.target.store(&v.name) else {
                continue;
            };
            out.push((
                format!("{}@latest", v.name),
                format!("volume {}, latest replicated data", v.name),
            ));
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

    #[test]
    fn export_names_parse() {
        assert_eq!(parse_export("disk@latest"), Some(("disk", Which::Latest)));
        assert_eq!(parse_export("a@b@17"), Some(("a@b", Which::Point(17))));
        assert_eq!(parse_export("disk"), None);
        assert_eq!(parse_export("disk@x"), None);
    }
}
