//! The admin socket: newline-delimited JSON requests and responses on a Unix socket.
//!
//! The socket file is created mode 0600 and every peer's credentials are checked: only root
//! or the daemon's own user may talk to it. One request per line, one response per line; a
//! malformed line gets an error response and the connection stays usable. The message types
//! are public so that the `redun` CLI speaks the same language (documented in
//! docs/PROTOCOL.md).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};

/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// A request to a daemon's admin socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum AdminRequest {
    Status,
    /// Place a recovery point (a marker in the volume's journal) now.
    Point {
        volume: String,
        #[serde(default = "crash")]
        kind: crate::journal::format::PointKind,
    },
    /// Refuse writes on the volume from now on, flush, and place a final point (a planned
    /// failover's first step). The answer's `point` is that final point.
    Fence {
        volume: String,
    },
    /// Take writes on the volume again.
    Unfence {
        volume: String,
    },
    /// Begin synchronising the volume's dirty ranges (the whole volume with `full`), or get
    /// the job under way (the shipper's side of a resync; docs/PROTOCOL.md).
    SyncBegin {
        volume: String,
        #[serde(default)]
        full: bool,
    },
    /// Append a slot for `[offset, offset + length)`, or the end, of a synchronisation.
    SyncRecord {
        volume: String,
        job: u64,
        role: crate::journal::format::SyncRole,
        #[serde(default)]
        offset: u64,
        #[serde(default)]
        length: u32,
    },
    /// The target holds the job's end durably: its ranges are clean again.
    SyncDone {
        volume: String,
        job: u64,
    },
    /// Apply the blocks of a failback (`NAME.failback` beside the journal) to the fenced
    /// volume, durably; the answer's `seq` is the last record's.
    FailbackApply {
        volume: String,
    },
    /// The sequence number of the volume's last record: every change up to it is on the
    /// backing device (an online verify brackets its reads with it).
    Head {
        volume: String,
    },
    /// Run a consistency-group round from this tracker now (`redun point --group`): the
    /// answer's `group_point` is the committed point.
    GroupPoint {
        #[serde(default = "crash")]
        kind: crate::journal::format::PointKind,
        /// Every member volume refuses writes from the point on, if it commits (`redun
        /// failover --planned --group`).
        #[serde(default)]
        fence: bool,
        /// Refused unless this tracker is a member of this group.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
    },
}

fn crash() -> crate::journal::format::PointKind {
    crate::journal::format::PointKind::Crash
}

/// A recovery point the tracker placed: its id is the marker's sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedPoint {
    pub volume: String,
    pub id: u64,
    pub kind: crate::journal::format::PointKind,
}

/// Per-volume status of the tracker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub path: String,
    pub size: u64,
    pub engine: String,
    pub connections: u64,
    pub total_connections: u64,
    pub reads: u64,
    pub writes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flushes: u64,
    pub trims: u64,
    pub zeroes: u64,
    pub errors: u64,
    /// `protected`, `resync-required` or `untracked`.
    pub state: crate::track::TrackState,
    /// Bytes inside dirty regions (changes not in the journal).
    pub dirty_bytes: u64,
    /// The first dirty ranges as `[offset, length]`, merged (at most 256).
    #[serde(default)]
    pub dirty_ranges: Vec<(u64, u64)>,
    /// The volume's journal, when changes are tracked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal: Option<crate::track::JournalStatus>,
    /// Writes are refused (`redun failover --planned` fenced the volume).
    #[serde(default)]
    pub fenced: bool,
    /// Recovery points placed since start: crash- and app-consistent, and app-consistent
    /// ones that failed.
    #[serde(default)]
    pub points_crash: u64,
    #[serde(default)]
    pub points_app: u64,
    #[serde(default)]
    pub points_failed: u64,
}

/// The tracker's answer to `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackerStatus {
    pub daemon: String,
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub listen: Vec<String>,
    pub volumes: Vec<VolumeStatus>,
    /// The consistency group this tracker is a member of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<crate::group::GroupStatus>,
}

/// A response line: `{"ok":true,"status":{...}}` or `{"ok":false,"error":"..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<TrackerStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<PlacedPoint>,
    /// The synchronisation job (`sync-begin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<crate::track::SyncJob>,
    /// A sequence number: the record appended (`sync-record`), the last record (`head`,
    /// `failback-apply`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The dirty bytes left (`sync-done`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_bytes: Option<u64>,
    /// The committed consistency-group point (`group-point`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_point: Option<u64>,
}

impl AdminResponse {
    /// Success with nothing more to say.
    pub fn ok() -> Self {
        AdminResponse {
            ok: true,
            error: None,
            status: None,
            point: None,
            sync: None,
            seq: None,
            dirty_bytes: None,
            group_point: None,
        }
    }

    /// Success: `point` was placed.
    pub fn placed(point: PlacedPoint) -> Self {
        AdminResponse {
            point: Some(point),
            ..AdminResponse::ok()
        }
    }

    pub fn error(msg: impl Into<String>) -> Self {
        AdminResponse {
            ok: false,
            error: Some(msg.into()),
            ..AdminResponse::ok()
        }
    }
}

/// What answers requests.
pub type Handler = Arc<dyn Fn(AdminRequest) -> AdminResponse + Send + Sync>;

/// What answers request lines of any daemon: one JSON request in, one JSON response out
/// (`{"ok":true,...}` or `{"ok":false,"error":"..."}`), so that the shipper and the target
/// serve their own requests on the same socket machinery.
pub type LineHandler = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// What answers parsed requests of a daemon with untyped messages: `Ok(fields)` becomes
/// `{"ok":true,...fields}`, `Err(message)` becomes `{"ok":false,"error":message}`.
pub type JsonHandler =
    Arc<dyn Fn(&serde_json::Value) -> Result<serde_json::Value, String> + Send + Sync>;

/// A running admin socket; dropping it stops the listener and removes the socket file.
#[derive(Debug)]
pub struct AdminServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

/// Why the admin socket could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("Cannot open admin socket {path}: {source} (choose another path with --admin-socket)")]
pub struct AdminBindError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl AdminServer {
    pub fn bind(path: &Path, handler: Handler) -> Result<AdminServer, AdminBindError> {
        let lines: LineHandler = Arc::new(move |line| {
            let resp = match serde_json::from_str::<AdminRequest>(line) {
                Ok(req) => handler(req),
                Err(e) => AdminResponse::error(format!(
                    "Bad request {line:?}: {e}; send e.g. {{\"cmd\":\"status\"}}"
                )),
            };
            serde_json::to_string(&resp).unwrap_or_default()
        });
        AdminServer::bind_lines(path, lines)
    }

    /// Like [`AdminServer::bind`], for a daemon whose requests and responses are plain JSON;
    /// a line that is not JSON gets the usual bad-request answer.
    pub fn bind_json(path: &Path, handler: JsonHandler) -> Result<AdminServer, AdminBindError> {
        let lines: LineHandler = Arc::new(move |line| {
            let answer = serde_json::from_str::<serde_json::Value>(line)
                .map_err(|e| format!("Bad request {line:?}: {e}; send e.g. {{\"cmd\":\"status\"}}"))
                .and_then(|req| handler(&req));
            match answer {
                Ok(mut v) => {
                    if let Some(o) = v.as_object_mut() {
                        o.insert("ok".into(), true.into());
                    }
                    v.to_string()
                }
                Err(e) => serde_json::json!({"ok": false, "error": e}).to_string(),
            }
        });
        AdminServer::bind_lines(path, lines)
    }

    /// Like [`AdminServer::bind`], for a daemon with its own request and response types.
    pub fn bind_lines(path: &Path, handler: LineHandler) -> Result<AdminServer, AdminBindError> {
        let err = |source| AdminBindError {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another daemon is answering on it",
                )));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = thread::Builder::new()
            .name("admin".into())
            .spawn(move || accept_loop(listener, handler, &s))
            .map_err(err)?;
        info!("socket={}: admin socket listening", path.display());
        Ok(AdminServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, handler: LineHandler, stop: &AtomicBool) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(200u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => {
                warn!("admin poll failed: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        let allowed = peer_allowed(&stream);
        let h: LineHandler = if allowed {
            handler.clone()
        } else {
            Arc::new(|_| {
                let resp = AdminResponse::error(
                    "Permission denied: the admin socket is for root or the daemon's user",
                );
                serde_json::to_string(&resp).unwrap_or_default()
            })
        };
        let _ = thread::Builder::new()
            .name("admin-conn".into())
            .spawn(move || {
                if let Err(e) = serve(stream, &h, allowed) {
                    debug!("admin connection ended: {e}");
                }
            });
    }
}

fn peer_allowed(stream: &UnixStream) -> bool {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    match getsockopt(stream, PeerCredentials) {
        Ok(c) => c.uid() == 0 || c.uid() == nix::unistd::geteuid().as_raw(),
        Err(_) => false,
    }
}

/// Answers requests until the peer closes; a peer that is not `allowed` gets one (refusing)
/// answer and is disconnected.
fn serve(stream: UnixStream, handler: &LineHandler, allowed: bool) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = reader.by_ref().take(MAX_LINE).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 >= MAX_LINE {
            let resp = AdminResponse::error(format!("Request longer than {MAX_LINE} bytes"));
            writeln!(writer, "{}", serde_json::to_string(&resp)?)?;
            return Ok(());
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        writeln!(writer, "{}", handler(line))?;
        if !allowed {
            return Ok(());
        }
    }
}

/// Client side: sends one JSON request line and reads the JSON response line, for any
/// daemon's admin socket.
pub fn request_json(socket: &Path, req: &serde_json::Value) -> io::Result<serde_json::Value> {
    request_json_within(socket, req, Duration::from_secs(30))
}

/// [`request_json`] for requests that take long (an app-consistent point runs two hooks).
pub fn request_json_within(
    socket: &Path,
    req: &serde_json::Value,
    timeout: Duration,
) -> io::Result<serde_json::Value> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut w = &stream;
    writeln!(w, "{req}")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad response from {}: {e}", socket.display()),
        )
    })
}

/// Client side: sends one request and reads one response.
pub fn request(socket: &Path, req: &AdminRequest) -> io::Result<AdminResponse> {
    // Points may run hooks (two of at most `points.hook_timeout` each).
    let timeout = match req {
        AdminRequest::Point { .. } | AdminRequest::GroupPoint { .. } => Duration::from_secs(600),
        _ => Duration::from_secs(60),
    };
    let v = request_json_within(socket, &serde_json::to_value(req)?, timeout)?;
    serde_json::from_value(v).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad response from {}: {e}", socket.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let handler: Handler = Arc::new(|_req| AdminResponse {
            ok: true,
            error: None,
            status: Some(TrackerStatus {
                daemon: "tracker".into(),
                version: "t".into(),
                pid: 1,
                uptime_seconds: 0,
                listen: vec![],
                volumes: vec![],
                group: None,
            }),
            point: None,
            sync: None,
            seq: None,
            dirty_bytes: None,
            group_point: None,
        });
        let srv = AdminServer::bind(&path, handler).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let r = request(&path, &AdminRequest::Status).unwrap();
        assert!(r.ok);
        let s = UnixStream::connect(&path).unwrap();
        let mut w = &s;
        writeln!(w, "not json").unwrap();
        writeln!(w, "{{\"cmd\":\"status\"}}").unwrap();
        let mut rd = BufReader::new(&s);
        let mut l1 = String::new();
        rd.read_line(&mut l1).unwrap();
        assert!(
            l1.contains("\"ok\":false") && l1.contains("Bad request"),
            "{l1}"
        );
        let mut l2 = String::new();
        rd.read_line(&mut l2).unwrap();
        assert!(l2.contains("\"ok\":true"), "{l2}");
        drop(srv);
        assert!(!path.exists());
    }
}
