//! The NBD server: listeners, one thread pair per connection, the transmission loop and
//! reply encoding.
//!
//! Per connection, the reader thread negotiates, then reads requests, validates them and
//! submits them to the export's [`IoQueue`]; replies are written by whichever thread
//! completes a request (the reader itself for the synchronous engine, the ring's completion
//! thread for io_uring), so replies leave in completion order, not request order. Replies are
//! batched in a per-connection buffer and flushed when a batch of completions ends or when
//! the reader has no more buffered input.

use std::sync::LazyLock;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use crate::metrics;
use std::collections::HashMap;
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use log::{debug, info, warn};

use super::backend::{BlockBackend, CompletionSink, IoOp, IoQueue, IoRequest, Token};
use super::handshake::{HandshakeError, Negotiated, negotiate};
use super::proto::*;

/// How long a client may take to finish the negotiation.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Replies smaller than this are copied into the batch buffer; bigger ones go out with writev.
const COPY_THRESHOLD: usize = 16 * 1024;
/// Zero runs shorter than this are sent as data in structured reads.
const HOLE_GRANULE: usize = 4096;

/// NBD request durations, by volume and request type, for every export of the process.
pub static NBD_LATENCY: LazyLock<metrics::HistogramFamily> =
    LazyLock::new(|| Family::new_with_constructor(metrics::latency_histogram));

/// Request types with a latency histogram.
const TIMED: [(u16, &str); 5] = [
    (CMD_READ, "read"),
    (CMD_WRITE, "write"),
    (CMD_FLUSH, "flush"),
    (CMD_TRIM, "trim"),
    (CMD_WRITE_ZEROES, "zero"),
];

/// Counters of one export, reported by the admin socket.
#[derive(Debug)]
pub struct ExportStats {
    pub connections: AtomicU64,
    pub total_connections: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub errors: AtomicU64,
    /// This export's series of [`NBD_LATENCY`], in the order of `TIMED`.
    latency: [Histogram; 5],
}

impl ExportStats {
    pub fn new(export: &str) -> ExportStats {
        let h = |kind: &str| {
            let labels = vec![
                ("volume".to_string(), export.to_string()),
                ("request".to_string(), kind.to_string()),
            ];
            NBD_LATENCY.get_or_create(&labels).clone()
        };
        ExportStats {
            connections: AtomicU64::new(0),
            total_connections: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            trims: AtomicU64::new(0),
            zeroes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: TIMED.map(|(_, name)| h(name)),
        }
    }

    fn observe(&self, token: &Token) {
        if let Some(i) = TIMED.iter().position(|(c, _)| *c == token.command) {
            self.latency[i].observe(token.started.elapsed().as_secs_f64());
        }
    }
}

/// One named export.
#[derive(Debug)]
pub struct Export<B: BlockBackend> {
    pub name: String,
    pub backend: B,
    pub stats: ExportStats,
}

/// Exports that exist only while someone asks for them (the master target's recovery
/// points): looked up by name at negotiation.
pub trait Resolve<B: BlockBackend>: Send + Sync + std::fmt::Debug {
    fn find(&self, name: &str) -> Option<Arc<Export<B>>>;
    /// Names and descriptions for NBD_OPT_LIST.
    fn list(&self) -> Vec<(String, String)>;
}

/// The set of exports a server offers. The empty name (the protocol's default export)
/// selects the first fixed one.
#[derive(Debug)]
pub struct Exports<B: BlockBackend> {
    list: Vec<Arc<Export<B>>>,
    resolver: Option<Box<dyn Resolve<B>>>,
}

impl<B: BlockBackend> Export<B> {
    pub fn new(name: String, backend: B) -> Export<B> {
        Export {
            stats: ExportStats::new(&name),
            name,
            backend,
        }
    }
}

impl<B: BlockBackend> Exports<B> {
    pub fn new(list: Vec<(String, B)>) -> Self {
        Exports {
            list: list
                .into_iter()
                .map(|(name, backend)| Arc::new(Export::new(name, backend)))
                .collect(),
            resolver: None,
        }
    }

    /// Exports found by `resolver` when a client names them.
    pub fn dynamic(resolver: Box<dyn Resolve<B>>) -> Self {
        Exports {
            list: Vec::new(),
            resolver: Some(resolver),
        }
    }

    pub fn find(&self, name: &str) -> Option<Arc<Export<B>>> {
        if name.is_empty() {
            return self.list.first().cloned();
        }
        if let Some(e) = self.list.iter().find(|e| e.name == name) {
            return Some(e.clone());
        }
        self.resolver.as_ref().and_then(|r| r.find(name))
    }

    /// The fixed exports.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export<B>>> {
        self.list.iter()
    }

    /// Every export's name and description, fixed and dynamic.
    pub fn list(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .list
            .iter()
            .map(|e| (e.name.clone(), e.backend.description()))
            .collect();
        if let Some(r) = &self.resolver {
            v.extend(r.list());
        }
        v
    }
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/redun/nbd.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(p)));
        }
        s.parse::<std::net::SocketAddr>()
            .map_err(|e| format!("{s:?} is neither HOST:PORT nor unix:/path ({e})"))?;
        Ok(ListenAddr::Tcp(s.to_string()))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a)?)),
            ListenAddr::Unix(p) => {
                // A stale socket from an earlier run would make bind fail; a live one would be
                // answered by connect, so only remove what nobody listens on.
                if p.exists() && UnixStream::connect(p).is_err() {
                    let _ = std::fs::remove_file(p);
                }
                Ok(Listener::Unix(UnixListener::bind(p)?, p.clone()))
            }
        }
    }

    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept()?.0)),
        }
    }

    fn poll_readable(&self, timeout_ms: u16) -> io::Result<bool> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let fd = match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(timeout_ms)) {
            Ok(n) => Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A connected client socket.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        };
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl From<Stream> for OwnedFd {
    fn from(s: Stream) -> OwnedFd {
        match s {
            Stream::Tcp(s) => s.into(),
            Stream::Unix(s) => s.into(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Tracks live connections so that shutdown can stop them and wait for them.
#[derive(Debug, Default)]
struct Registry {
    conns: Mutex<HashMap<u64, Stream>>,
    idle: Condvar,
    next_id: AtomicU64,
}

/// The NBD server over exports of backend `B`.
#[derive(Debug)]
pub struct Server<B: BlockBackend> {
    exports: Arc<Exports<B>>,
    stopping: Arc<AtomicBool>,
    registry: Arc<Registry>,
}

impl<B: BlockBackend> Clone for Server<B> {
    fn clone(&self) -> Self {
        Server {
            exports: self.exports.clone(),
            stopping: self.stopping.clone(),
            registry: self.registry.clone(),
        }
    }
}

impl<B: BlockBackend> Server<B> {
    pub fn new(exports: Exports<B>) -> Self {
        Server {
            exports: Arc::new(exports),
            stopping: Arc::new(AtomicBool::new(false)),
            registry: Arc::new(Registry::default()),
        }
    }

    pub fn exports(&self) -> &Arc<Exports<B>> {
        &self.exports
    }

    /// Accepts connections on `listener` until [`Server::shutdown`]; each connection gets its
    /// own thread.
    pub fn spawn_listener(&self, listener: Listener) -> io::Result<thread::JoinHandle<()>> {
        let server = self.clone();
        thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || server.accept_loop(listener))
    }

    fn accept_loop(&self, listener: Listener) {
        info!("listen={}: nbd listening", listener.local_addr());
        while !self.stopping.load(Ordering::SeqCst) {
            match listener.poll_readable(200) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => {
                    warn!("listen={}: nbd poll failed: {e}", listener.local_addr());
                    thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            match listener.accept() {
                Ok(stream) => {
                    if let Err(e) = self.spawn_connection(stream) {
                        warn!("nbd cannot start a connection thread: {e}");
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("listen={}: nbd accept failed: {e}", listener.local_addr());
                    thread::sleep(Duration::from_millis(50));
                }
            }
        }
        debug!("nbd listener {} closed", listener.local_addr());
    }

    fn spawn_connection(&self, stream: Stream) -> io::Result<()> {
        let id = self.registry.next_id.fetch_add(1, Ordering::Relaxed);
        self.registry
            .conns
            .lock()
            .unwrap()
            .insert(id, stream.try_clone()?);
        let server = self.clone();
        let spawned = thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                server.serve_stream(stream);
                let mut conns = server.registry.conns.lock().unwrap();
                conns.remove(&id);
                server.registry.idle.notify_all();
            });
        if let Err(e) = spawned {
            self.registry.conns.lock().unwrap().remove(&id);
            return Err(e);
        }
        Ok(())
    }

    fn serve_stream(&self, stream: Stream) {
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
        let Ok(write_half) = stream.try_clone() else {
            return;
        };
        let Ok(closer) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::with_capacity(256 * 1024, stream);
        let mut writer = write_half;
        let negotiated = match negotiate(&self.exports, &mut reader, &mut writer) {
            Ok(Some(n)) => n,
            Ok(None) | Err(HandshakeError::Aborted) => return,
            Err(e) => {
                debug!("nbd negotiation ended: {e}");
                return;
            }
        };
        let _ = reader.get_ref().set_read_timeout(None);
        let input = reader.get_ref().try_clone().ok().map(OwnedFd::from);
        let close = move || closer.shutdown(Shutdown::Both);
        if let Err(e) = serve_transmission(negotiated, reader, writer, input, Box::new(close)) {
            debug!("nbd connection ended: {e}");
        }
    }

    /// Stops accepting, tells every connection to stop reading new requests, and waits (up
    /// to `timeout`) until each has completed its in-flight requests and closed.
    /// Returns false if some connection did not finish in time.
    pub fn shutdown(&self, timeout: Duration) -> bool {
        self.stopping.store(true, Ordering::SeqCst);
        let conns = self.registry.conns.lock().unwrap();
        for s in conns.values() {
            s.shutdown(Shutdown::Read);
        }
        let (conns, res) = self
            .registry
            .idle
            .wait_timeout_while(conns, timeout, |c| !c.is_empty())
            .unwrap();
        if res.timed_out() {
            warn!(
                "connections={}: nbd shutdown: connections still busy",
                conns.len()
            );
            return false;
        }
        true
    }
}

/// Serves the transmission phase of one negotiated connection until the client disconnects,
/// the stream fails, or the framing is lost. Every submitted request is completed and its
/// reply written (if the stream still works) before this returns.
pub fn serve_transmission<B, R, W>(
    neg: Negotiated<B>,
    mut reader: BufReader<R>,
    writer: W,
    input: Option<OwnedFd>,
    close: Box<dyn Fn() + Send + Sync>,
) -> io::Result<()>
where
    B: BlockBackend,
    R: Read,
    W: Write + Send + 'static,
{
    let export = neg.export.clone();
    export.stats.connections.fetch_add(1, Ordering::Relaxed);
    export
        .stats
        .total_connections
        .fetch_add(1, Ordering::Relaxed);
    let sink = Arc::new(ConnWriter {
        state: Mutex::new(WriterState {
            out: Vec::with_capacity(64 * 1024),
            w: writer,
            failed: false,
        }),
        structured: neg.structured,
        export: export.clone(),
        close,
    });
    let result = match export.backend.open_queue(sink.clone()) {
        Ok(mut queue) => {
            let r = request_loop(&neg, &mut reader, input.as_ref(), &mut queue, &sink);
            queue.drain();
            sink.flush();
            r
        }
        Err(e) => {
            warn!("nbd export={}: cannot open an I/O queue: {e}", export.name);
            Err(e)
        }
    };
    export.stats.connections.fetch_sub(1, Ordering::Relaxed);
    result
}

fn request_loop<B: BlockBackend, R: Read, W: Write + Send + 'static>(
    neg: &Negotiated<B>,
    reader: &mut BufReader<R>,
    input: Option<&OwnedFd>,
    queue: &mut B::Queue,
    sink: &Arc<ConnWriter<B, W>>,
) -> io::Result<()> {
    let export = &neg.export;
    let size = export.backend.size();
    let caps = export.backend.capabilities();
    let max = caps.max_block;
    loop {
        if reader.buffer().is_empty() {
            queue.kick();
            sink.flush();
            queue.wait_readable(input.map(|f| f.as_fd()));
        }
        let mut hdr = [0u8; REQUEST_LEN];
        match reader.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let req = match Request::decode(&hdr) {
            Ok(r) => r,
            Err(e) => {
                warn!("nbd export={}: {e}; closing the connection", export.name);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        };
        let token = Token {
            started: std::time::Instant::now(),
            cookie: req.cookie,
            command: req.kind,
            flags: req.flags,
            offset: req.offset,
            length: req.length,
        };
        let end = req.offset.checked_add(u64::from(req.length));
        let in_range = end.is_some_and(|e| e <= size);
        let fua = req.flags & CMD_FLAG_FUA != 0;
        // FUA is accepted on every command (the spec requires it once SEND_FUA is
        // advertised) and means something only on the ones that write.
        let allowed = CMD_FLAG_FUA
            | match req.kind {
                CMD_READ => CMD_FLAG_DF,
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
                _ => 0,
            };
        let bad_flags = req.flags & !allowed != 0
            || (req.flags & CMD_FLAG_DF != 0 && !neg.structured)
            || (req.flags & CMD_FLAG_FAST_ZERO != 0 && !caps.fast_zero);

        if req.kind == CMD_WRITE {
            // The payload follows whatever we think of the request: consume it first so the
            // framing survives an error reply.
            let err = if bad_flags {
                Some(Errno::Inval)
            } else if caps.read_only {
                Some(Errno::Perm)
            } else if req.length > max {
                Some(Errno::Inval)
            } else if !in_range {
                Some(Errno::NoSpc)
            } else {
                None
            };
            if let Some(err) = err {
                io::copy(
                    &mut reader.by_ref().take(u64::from(req.length)),
                    &mut io::sink(),
                )?;
                sink.error(token, err, "write refused");
                continue;
            }
            let mut data = vec![0u8; req.length as usize];
            reader.read_exact(&mut data)?;
            queue.submit(IoRequest {
                token,
                op: IoOp::Write {
                    offset: req.offset,
                    data,
                    fua,
                },
            });
            continue;
        }
        if bad_flags {
            sink.error(token, Errno::Inval, "unsupported command flags");
            continue;
        }
        let op = match req.kind {
            CMD_DISC => {
                debug!("nbd export={} client sent DISC", export.name);
                return Ok(());
            }
            CMD_READ if req.length > max => {
                sink.error(
                    token,
                    Errno::Inval,
                    "read larger than the maximum block size",
                );
                continue;
            }
            CMD_READ => IoOp::Read {
                offset: req.offset,
                len: req.length,
            },
            CMD_FLUSH if caps.flush => IoOp::Flush,
            CMD_TRIM if caps.trim && !caps.read_only => IoOp::Trim {
                offset: req.offset,
                len: req.length,
                fua,
            },
            CMD_WRITE_ZEROES if caps.write_zeroes && !caps.read_only => IoOp::WriteZeroes {
                offset: req.offset,
                len: req.length,
                fua,
                may_trim: req.flags & CMD_FLAG_NO_HOLE == 0,
                fast_only: req.flags & CMD_FLAG_FAST_ZERO != 0,
            },
            CMD_CACHE if caps.cache => IoOp::Cache {
                offset: req.offset,
                len: req.length,
            },
            CMD_BLOCK_STATUS if neg.base_allocation => {
                if !in_range || req.length == 0 {
                    sink.error(token, Errno::Inval, "block status range past the end");
                } else {
                    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
                    match export
                        .backend
                        .block_status(req.offset, u64::from(req.length))
                    {
                        Ok(extents) => sink.block_status(token, &extents, one),
                        Err(e) => sink.error(token, Errno::from_io(&e), "block status failed"),
                    }
                }
                continue;
            }
            _ => {
                sink.error(token, Errno::Inval, "unknown or unsupported command");
                continue;
            }
        };
        if !in_range && !matches!(op, IoOp::Flush) {
            let err = if matches!(op, IoOp::WriteZeroes { .. }) {
                Errno::NoSpc
            } else {
                Errno::Inval
            };
            sink.error(token, err, "request past the end of the export");
            continue;
        }
        queue.submit(IoRequest { token, op });
    }
}

struct WriterState<W> {
    out: Vec<u8>,
    w: W,
    failed: bool,
}

/// The per-connection reply writer; it is the connection's [`CompletionSink`].
struct ConnWriter<B: BlockBackend, W> {
    state: Mutex<WriterState<W>>,
    structured: bool,
    export: Arc<Export<B>>,
    close: Box<dyn Fn() + Send + Sync>,
}

impl<B: BlockBackend, W: Write> ConnWriter<B, W> {
    /// Queues `parts` as one reply; big payloads are written straight from their buffer.
    fn send(&self, parts: &[&[u8]]) {
        let mut st = self.state.lock().unwrap();
        if st.failed {
            return;
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total <= COPY_THRESHOLD {
            for p in parts {
                st.out.extend_from_slice(p);
            }
            if st.out.len() >= 256 * 1024 {
                Self::flush_locked(&mut st, &self.close);
            }
            return;
        }
        let st = &mut *st;
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() + 1);
        slices.push(IoSlice::new(&st.out));
        slices.extend(parts.iter().map(|p| IoSlice::new(p)));
        let r = write_all_vectored(&mut st.w, &mut slices);
        st.out.clear();
        if let Err(e) = r {
            debug!("nbd reply write failed: {e}");
            st.failed = true;
            (self.close)();
        }
    }

    fn flush_locked(st: &mut WriterState<W>, close: &(dyn Fn() + Send + Sync)) {
        if st.out.is_empty() || st.failed {
            return;
        }
        let r = st.w.write_all(&st.out);
        st.out.clear();
        if let Err(e) = r {
            debug!("nbd reply write failed: {e}");
            st.failed = true;
            close();
        }
    }

    fn count_error(&self) {
        self.export.stats.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Replies `err` to the request behind `token`.
    fn error(&self, token: Token, err: Errno, why: &str) {
        self.count_error();
        debug!(
            "nbd export={} cookie={} cmd={} off={} len={}: {why} ({err:?})",
            self.export.name, token.cookie, token.command, token.offset, token.length
        );
        let mut b = Vec::with_capacity(64);
        if self.structured && matches!(token.command, CMD_READ | CMD_BLOCK_STATUS) {
            put_error_chunk(&mut b, token.cookie, err.code(), why);
        } else {
            put_simple_reply(&mut b, token.cookie, err.code());
        }
        self.send(&[&b]);
    }

    fn block_status(&self, token: Token, extents: &[super::backend::Extent], one: bool) {
        let mut body = Vec::with_capacity(4 + extents.len() * 8);
        body.extend_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
        let mut left = u64::from(token.length);
        for e in extents {
            if left == 0 {
                break;
            }
            // Descriptor lengths are u32: cap each at the largest 4 KiB multiple.
            let len = e.length.min(left).min(u64::from(!4095u32));
            if len == 0 {
                break;
            }
            body.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
            body.extend_from_slice(&e.flags.to_be_bytes());
            left -= len;
            if one {
                break;
            }
        }
        let mut b = Vec::with_capacity(STRUCTURED_HEADER_LEN + body.len());
        put_chunk_header(
            &mut b,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            token.cookie,
            u32::try_from(body.len()).unwrap_or(u32::MAX),
        );
        b.extend_from_slice(&body);
        self.send(&[&b]);
    }

    fn read_reply(&self, token: Token, data: &[u8]) {
        if !self.structured {
            let mut h = Vec::with_capacity(SIMPLE_REPLY_LEN);
            put_simple_reply(&mut h, token.cookie, 0);
            self.send(&[&h, data]);
            return;
        }
        if data.is_empty() {
            let mut h = Vec::with_capacity(STRUCTURED_HEADER_LEN);
            put_chunk_header(&mut h, REPLY_FLAG_DONE, REPLY_TYPE_NONE, token.cookie, 0);
            self.send(&[&h]);
            return;
        }
        let df = token.flags & CMD_FLAG_DF != 0;
        let runs = if df || data.len() < 2 * HOLE_GRANULE {
            vec![(0, data.len(), false)]
        } else {
            zero_runs(data)
        };
        // Headers for all chunks first, so that the data slices can be borrowed alongside.
        let mut headers: Vec<Vec<u8>> = Vec::with_capacity(runs.len());
        for (i, &(start, len, hole)) in runs.iter().enumerate() {
            let flags = if i + 1 == runs.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            let off = token.offset + start as u64;
            let len32 = u32::try_from(len).unwrap_or(u32::MAX);
            let mut h = Vec::with_capacity(STRUCTURED_HEADER_LEN + 12);
            if hole {
                put_chunk_header(&mut h, flags, REPLY_TYPE_OFFSET_HOLE, token.cookie, 12);
                h.extend_from_slice(&off.to_be_bytes());
                h.extend_from_slice(&len32.to_be_bytes());
            } else {
                put_chunk_header(
                    &mut h,
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    token.cookie,
                    len32 + 8,
                );
                h.extend_from_slice(&off.to_be_bytes());
            }
            headers.push(h);
        }
        let mut parts: Vec<&[u8]> = Vec::with_capacity(runs.len() * 2);
        for (h, &(start, len, hole)) in headers.iter().zip(&runs) {
            parts.push(h);
            if !hole {
                parts.push(&data[start..start + len]);
            }
        }
        self.send(&parts);
    }
}

/// Splits `data` into (start, len, is_zero) runs at [`HOLE_GRANULE`] granularity.
fn zero_runs(data: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, block) in data.chunks(HOLE_GRANULE).enumerate() {
        let zero = block.len() == HOLE_GRANULE && block.iter().all(|&b| b == 0);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 += block.len(),
            _ => runs.push((i * HOLE_GRANULE, block.len(), zero)),
        }
    }
    runs
}

fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl<B: BlockBackend, W: Write + Send> CompletionSink for ConnWriter<B, W> {
    fn complete(&self, token: Token, result: io::Result<Vec<u8>>) {
        let stats = &self.export.stats;
        stats.observe(&token);
        match result {
            Err(e) => {
                let errno = Errno::from_io(&e);
                if !(errno == Errno::NotSup && token.flags & CMD_FLAG_FAST_ZERO != 0) {
                    warn!(
                        "nbd export={} cmd={} off={} len={} failed: {e}",
                        self.export.name, token.command, token.offset, token.length
                    );
                }
                self.error(token, errno, &e.to_string());
            }
            Ok(data) => {
                let len = u64::from(token.length);
                match token.command {
                    CMD_READ => {
                        stats.reads.fetch_add(1, Ordering::Relaxed);
                        stats.bytes_read.fetch_add(len, Ordering::Relaxed);
                        self.read_reply(token, &data);
                        return;
                    }
                    CMD_WRITE => {
                        stats.writes.fetch_add(1, Ordering::Relaxed);
                        stats.bytes_written.fetch_add(len, Ordering::Relaxed);
                    }
                    CMD_FLUSH => {
                        stats.flushes.fetch_add(1, Ordering::Relaxed);
                    }
                    CMD_TRIM => {
                        stats.trims.fetch_add(1, Ordering::Relaxed);
                    }
                    CMD_WRITE_ZEROES => {
                        stats.zeroes.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
                let mut b = Vec::with_capacity(SIMPLE_REPLY_LEN);
                put_simple_reply(&mut b, token.cookie, 0);
                self.send(&[&b]);
            }
        }
    }

    fn flush(&self) {
        let mut st = self.state.lock().unwrap();
        Self::flush_locked(&mut st, &self.close);
    }
}

/// Reads from `r` through a `BufRead`; used by tests and the fuzz target to feed a whole
/// client conversation from memory.
pub fn serve_in_memory<B: BlockBackend, W: Write + Send + 'static>(
    exports: &Exports<B>,
    input: &[u8],
    mut output: W,
) -> io::Result<()> {
    let mut reader = BufReader::new(input);
    match negotiate(exports, &mut reader, &mut output) {
        Ok(Some(neg)) => serve_transmission(neg, reader, output, None, Box::new(|| {})),
        Ok(None) | Err(_) => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_split_at_granule() {
        let mut d = vec![0u8; 4 * HOLE_GRANULE + 10];
        d[HOLE_GRANULE + 5] = 1;
        let r = zero_runs(&d);
        assert_eq!(
            r,
            vec![
                (0, HOLE_GRANULE, true),
                (HOLE_GRANULE, HOLE_GRANULE, false),
                (2 * HOLE_GRANULE, 2 * HOLE_GRANULE, true),
                (4 * HOLE_GRANULE, 10, false),
            ]
        );
    }

    /// A whole client conversation as bytes: flags, STRUCTURED_REPLY, GO, a write, a read,
    /// a read past the end, DISC.
    fn conversation() -> Vec<u8> {
        let mut c = Vec::new();
        c.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        let opt = |c: &mut Vec<u8>, o: u32, d: &[u8]| {
            c.extend_from_slice(&IHAVEOPT.to_be_bytes());
            c.extend_from_slice(&o.to_be_bytes());
            c.extend_from_slice(&(d.len() as u32).to_be_bytes());
            c.extend_from_slice(d);
        };
        opt(&mut c, OPT_STRUCTURED_REPLY, &[]);
        let mut go = 1u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"x");
        go.extend_from_slice(&0u16.to_be_bytes());
        opt(&mut c, OPT_GO, &go);
        let req = |kind, cookie, offset, length, flags| {
            Request {
                flags,
                kind,
                cookie,
                offset,
                length,
            }
            .encode()
        };
        c.extend_from_slice(&req(CMD_WRITE, 1, 100, 5, CMD_FLAG_FUA));
        c.extend_from_slice(b"hello");
        c.extend_from_slice(&req(CMD_READ, 2, 100, 5, 0));
        c.extend_from_slice(&req(CMD_READ, 3, 65536, 1, 0));
        c.extend_from_slice(&req(CMD_DISC, 4, 0, 0, 0));
        c
    }

    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<Vec<u8>>>);
    impl Write for Out {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn in_memory_conversation() {
        let mem = crate::nbd::mem::MemBackend::new(65536);
        let exports = Exports::new(vec![("x".to_string(), mem.clone())]);
        let out = Out::default();
        serve_in_memory(&exports, &conversation(), out.clone()).unwrap();
        assert_eq!(&mem.contents()[100..105], b"hello");
        let o = out.0.lock().unwrap().clone();
        // The read's data chunk and the past-EOF error chunk are in the output.
        assert!(o.windows(5).any(|w| w == b"hello"));
        let err = Errno::Inval.code().to_be_bytes();
        let mut chunk = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        chunk.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        chunk.extend_from_slice(&REPLY_TYPE_ERROR.to_be_bytes());
        chunk.extend_from_slice(&3u64.to_be_bytes());
        let at = o
            .windows(chunk.len())
            .position(|w| w == chunk)
            .expect("error chunk");
        assert_eq!(&o[at + 20..at + 24], &err);
    }

    /// A stable-toolchain cousin of the fuzz target: mutated conversations never panic.
    #[test]
    fn mutated_conversations_do_not_panic() {
        let base = conversation();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..3000 {
            let mut c = base.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % c.len();
                c[i] = next() as u8;
            }
            if next() % 3 == 0 {
                let cut = (next() as usize) % c.len();
                c.truncate(cut);
            }
            let exports = Exports::new(vec![(
                "x".to_string(),
                crate::nbd::mem::MemBackend::new(65536),
            )]);
            let _ = serve_in_memory(&exports, &c, io::sink());
        }
    }

    #[test]
    fn listen_addr_parses() {
        assert_eq!(
            "unix:/tmp/x".parse::<ListenAddr>(),
            Ok(ListenAddr::Unix("/tmp/x".into()))
        );
        assert!("127.0.0.1:10809".parse::<ListenAddr>().is_ok());
        assert!("nonsense".parse::<ListenAddr>().is_err());
        assert!("unix:".parse::<ListenAddr>().is_err());
    }
}
