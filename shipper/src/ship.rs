//! Shipping one volume: follow its journal, send batches to the target, release what the
//! target acknowledged durable; on failure retry on the schedule or, for errors no retry can
//! fix, stop in state `critical` until an operator resumes the volume.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{info, warn};
use redun_tracker::journal::format::Kind;
use redun_tracker::journal::reader::JournalReader;
use redun_tracker::journal::{JournalError, Record};
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};

use crate::heads::Heads;
use crate::proto::{self, Frame, Hello, ProtoError, WireRecord};
use crate::sync::{Fill, JobStatus, Sync};
use crate::throttle::Throttle;
use crate::verify::{Verify, VerifyStatus};

/// How long connecting and the TLS handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the target may take to acknowledge a batch.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// An idle connection pings this often, so that a dead one is noticed.
const PING_INTERVAL: Duration = Duration::from_secs(5);
/// How long to wait for new records before looking again.
pub(crate) const IDLE_WAIT: Duration = Duration::from_millis(100);
/// The release file is written at most this often while acknowledgements stream in: each
/// write is two syncs of the disk the protected application writes to.
const RELEASE_GAP: Duration = Duration::from_millis(100);

/// Back-off after the first failure, in retry units; then every [`RETRY_STEADY`] units.
const RETRY_SCHEDULE: [u32; 5] = [1, 2, 4, 8, 10];
const RETRY_STEADY: u32 = 30;

/// The delay before retry number `n` (0 for the first retry).
pub fn retry_delay(n: u32, unit: Duration) -> Duration {
    unit * RETRY_SCHEDULE
        .get(n as usize)
        .copied()
        .unwrap_or(RETRY_STEADY)
}

/// Where a volume is shipped.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A target, over mutual TLS with this client set-up.
    Target(Arc<rustls::ClientConfig>),
    /// A bucket (`--target-store`).
    Bucket(Arc<crate::to_bucket::StoreTarget>),
}

impl ShipOptions {
    /// The bucket the volume is shipped into, if it is not a target.
    pub fn bucket(&self) -> Option<&Arc<crate::to_bucket::StoreTarget>> {
        match &self.dest {
            Destination::Bucket(b) => Some(b),
            Destination::Target(_) => None,
        }
    }
}

/// How a volume is shipped.
#[derive(Debug, Clone)]
pub struct ShipOptions {
    /// `HOST:PORT` of the target, or the bucket's URL.
    pub target: String,
    /// The name the target's certificate must carry.
    pub server_name: String,
    /// Where the volume goes.
    pub dest: Destination,
    /// A batch closes at this many bytes of records (or when no more are waiting).
    pub batch_bytes: usize,
    pub level: i32,
    pub generation: u64,
    pub retry_unit: Duration,
    /// The process's bandwidth limit, shared by every volume.
    pub throttle: Arc<Throttle>,
    /// Automatic resyncs wait for this window of local time.
    pub resync_window: Option<crate::throttle::Window>,
    /// The block synchronisations and verifies compare (`resync.block_size`).
    pub sync_block: u64,
    /// Every volume is verified online this often (`resync.verify_every`; `None`: by hand).
    pub verify_every: Option<Duration>,
}

/// `connecting`, `shipping`, `retrying`, `critical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ShipState {
    #[default]
    Connecting,
    Shipping,
    Retrying,
    Critical,
}

/// A volume's shipping figures, for the admin socket (`redun status`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShipStatus {
    pub name: String,
    pub journal: String,
    pub target: String,
    pub state: ShipState,
    /// Every record up to this sequence number is durable on the target.
    pub acked_seq: u64,
    /// Journal bytes not yet durable on the target: the batches in flight, or, when the
    /// tracker answers and the target is behind, the journal's unreleased bytes (an upper
    /// bound until the tracker takes in the latest release).
    pub lag_bytes: u64,
    /// Age of the oldest record not yet durable on the target (0 when caught up): from the
    /// tracker's head sampled every 100 ms, else from when the batches in flight were read.
    pub rpo_seconds: f64,
    pub batches: u64,
    /// Record bytes shipped, and bytes on the wire for them (compressed).
    pub bytes_shipped: u64,
    pub bytes_sent: u64,
    /// `bytes_shipped / bytes_sent` (1 before anything was sent).
    pub compression_ratio: f64,
    /// Record bytes acknowledged per second, over the last few seconds.
    pub throughput_bytes_per_second: f64,
    /// The bandwidth limit in force now (bytes on the wire per second, all volumes together;
    /// absent when unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit_bytes_per_second: Option<u64>,
    pub retries: u64,
    /// Unix time of the next attempt while retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_unix: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The RPO is above `shipper.rpo_warning`.
    #[serde(default)]
    pub rpo_warning: bool,
    /// The synchronisation under way (initial replication or resync).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<JobStatus>,
    /// Block bytes synchronisation jobs sent since the shipper started (uncompressed).
    #[serde(default)]
    pub sync_bytes_sent: u64,
    /// The online verify under way, or the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyStatus>,
    /// A resync is due and waits for this window (`resync.window`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for_window: Option<String>,
    /// The failback under way, or the last one (`redun reverse`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse: Option<crate::reverse::ReverseStatus>,
    /// The relationship's generation this shipper presents.
    #[serde(default)]
    pub generation: u64,
    /// Into a bucket: the PUT requests this volume's writer made (objects, parts of large
    /// ones, manifest versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket_puts: Option<u64>,
}

/// Why a session ended.
#[derive(Debug)]
pub enum ShipError {
    /// Retrying later may work (connection refused or lost, timeouts, target out of space).
    Retry(String),
    /// An operator must act (certificate rejected, identity or generation mismatch, a gap).
    Fatal(String),
}

impl std::fmt::Display for ShipError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShipError::Retry(m) | ShipError::Fatal(m) => f.write_str(m),
        }
    }
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Classifies an I/O error of the connection: TLS certificate problems are fatal.
pub(crate) fn classify_io(target: &str, e: &io::Error) -> ShipError {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        use rustls::AlertDescription as A;
        return match tls {
            rustls::Error::InvalidCertificate(c) => ShipError::Fatal(format!(
                "the certificate of target {target} is not acceptable: {c:?} (is it signed by \
                 --tls-ca, and does it carry the name dialled or --target-name?)"
            )),
            rustls::Error::AlertReceived(
                a @ (A::BadCertificate
                | A::UnknownCA
                | A::CertificateRequired
                | A::CertificateUnknown
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::UnsupportedCertificate
                | A::AccessDenied
                // What rustls sends when a certificate's signature does not verify.
                | A::DecryptError),
            ) => ShipError::Fatal(format!(
                "target {target} rejected our certificate ({a:?}): it must be signed by the CA \
                 the target trusts (--tls-ca there)"
            )),
            other => ShipError::Retry(format!("TLS with target {target}: {other}")),
        };
    }
    ShipError::Retry(format!("target {target}: {e}"))
}

pub(crate) fn proto_err(target: &str, e: ProtoError) -> ShipError {
    match e {
        ProtoError::Closed => ShipError::Retry(format!("target {target} closed the connection")),
        ProtoError::Io(e) => classify_io(target, &e),
        ProtoError::Malformed(m) => ShipError::Retry(format!("target {target}: {m}")),
    }
}

/// A refusal: retried when `code` may heal by itself, else critical.
pub(crate) fn refused(target: &str, code: proto::RefuseCode, message: &str) -> ShipError {
    let m = format!("target {target} refused: {message}");
    if code.recoverable() {
        ShipError::Retry(m)
    } else {
        ShipError::Fatal(m)
    }
}

fn unexpected(target: &str) -> ShipError {
    ShipError::Retry(format!(
        "target {target}: unexpected frame instead of an ACK"
    ))
}

pub(crate) fn journal_err(path: &std::path::Path, e: JournalError) -> ShipError {
    ShipError::Retry(format!("journal {}: {e}", path.display()))
}

/// One volume's shipper.
#[derive(Debug)]
pub struct VolumeShipper {
    pub name: String,
    pub journal: PathBuf,
    pub(crate) opts: ShipOptions,
    status: Mutex<ShipStatus>,
    heads: Option<Arc<Heads>>,
    /// Set by [`VolumeShipper::resume`]; wakes a critical volume.
    resume: (Mutex<bool>, Condvar),
    /// A resync asked for by hand (`Some(full)`), until a job takes it.
    resync: Mutex<Option<bool>>,
    /// Online verifies asked for (the id the next one gets), and started.
    verifies_asked: std::sync::atomic::AtomicU64,
    verifies_started: std::sync::atomic::AtomicU64,
    /// When this shipper started (the first scheduled verify is `verify_every` later).
    started_unix: f64,
    /// The relationship's generation: `shipper.generation`, or the one a failback moved to.
    generation: std::sync::atomic::AtomicU64,
    /// A failback runs.
    reversing: std::sync::atomic::AtomicBool,
    /// The bucket writer, kept across sessions so that an append whose answer was lost is
    /// settled by the next one.
    pub(crate) writer: Mutex<Option<redun_store::bucket::VolumeWriter>>,
}

/// A batch sent and not yet acknowledged.
#[derive(Debug)]
pub(crate) struct InFlight {
    pub(crate) last_seq: u64,
    /// Record bytes, and bytes on the wire.
    pub(crate) bytes: u64,
    pub(crate) sent: u64,
    /// When its records were read from the journal.
    pub(crate) read_at: Instant,
}

/// Batches the shipper sends ahead of their acknowledgements.
const WINDOW: usize = 4;

/// A release position acknowledged by the target and not yet written to the release file:
/// written at once when the last write is [`RELEASE_GAP`] old, else when the shipper next
/// finds time (a later acknowledgement, idling, stopping). One lost in a crash only means
/// its records are read and shipped again; the target knows what it has.
#[derive(Debug, Default)]
struct OwedRelease {
    owed: Option<u64>,
    written_at: Option<Instant>,
}

impl OwedRelease {
    fn owe(&mut self, seq: u64) {
        self.owed = Some(seq);
    }

    /// The position to write now: one is owed and the last write is old enough.
    fn due(&mut self) -> Option<u64> {
        if self.written_at.is_some_and(|t| t.elapsed() < RELEASE_GAP) {
            return None;
        }
        self.take()
    }

    /// The position owed, to write now whatever the time.
    fn take(&mut self) -> Option<u64> {
        let seq = self.owed.take()?;
        self.written_at = Some(Instant::now());
        Some(seq)
    }
}

impl VolumeShipper {
    pub fn new(name: String, journal: PathBuf, opts: ShipOptions) -> VolumeShipper {
        let status = ShipStatus {
            name: name.clone(),
            journal: journal.display().to_string(),
            target: opts.target.clone(),
            compression_ratio: 1.0,
            ..Default::default()
        };
        VolumeShipper {
            name,
            status: Mutex::new(status),
            heads: None,
            resume: (Mutex::new(false), Condvar::new()),
            resync: Mutex::new(None),
            verifies_asked: std::sync::atomic::AtomicU64::new(0),
            verifies_started: std::sync::atomic::AtomicU64::new(0),
            started_unix: unix_now(),
            generation: std::sync::atomic::AtomicU64::new(
                crate::reverse::stored_generation(&journal)
                    .unwrap_or(0)
                    .max(opts.generation),
            ),
            reversing: std::sync::atomic::AtomicBool::new(false),
            writer: Mutex::new(None),
            journal,
            opts,
        }
    }

    /// What this shipper says of its volume first: the journal's identity and the generation.
    pub(crate) fn hello(&self, sb: &redun_tracker::journal::format::Superblock) -> Hello {
        Hello {
            version: proto::VERSION,
            name: self.name.clone(),
            uuid: sb.volume_uuid,
            size: sb.volume_size,
            generation: self.generation(),
            tail_seq: sb.tail_seq,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub(crate) fn set_generation(&self, g: u64) {
        self.generation.store(g, Ordering::SeqCst);
    }

    pub(crate) fn target(&self) -> &str {
        &self.opts.target
    }

    pub(crate) fn retry_unit(&self) -> Duration {
        self.opts.retry_unit
    }

    pub(crate) fn status_mut(&self) -> std::sync::MutexGuard<'_, ShipStatus> {
        self.status.lock().unwrap()
    }

    /// Claims the right to run a failback (one at a time), with a fresh status; false when
    /// one runs.
    pub fn begin_reverse(&self) -> bool {
        if self.reversing.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.status_mut().reverse = None;
        self.update_reverse(|_| {});
        true
    }

    pub fn end_reverse(&self) {
        self.reversing.store(false, Ordering::SeqCst);
    }

    /// Asks for an online verify of the volume, which starts once the volume is shipping
    /// with nothing else to do; returns its id (`status().verify.id`).
    pub fn request_verify(&self) -> Result<u64, String> {
        if self.opts.bucket().is_some() {
            return Err(format!(
                "volume {}: it ships to a bucket, which cannot checksum its blocks: verify \
                 by restoring a point (`redun restore`) and comparing",
                self.name
            ));
        }
        if self.heads.is_none() {
            return Err(format!(
                "volume {}: a verify needs the tracker's admin socket (--tracker-socket)",
                self.name
            ));
        }
        let started = self.verifies_started.load(Ordering::SeqCst);
        let asked = self.verifies_asked.load(Ordering::SeqCst);
        if asked > started {
            return Ok(asked);
        }
        self.verifies_asked.store(started + 1, Ordering::SeqCst);
        Ok(started + 1)
    }

    /// Starts the verify asked for, or due (`resync.verify_every`), if any.
    fn maybe_verify(&self, size: u64, path: &mut Option<String>) -> Option<Verify> {
        let heads = self.heads.as_ref()?;
        if let Some(every) = self.opts.verify_every {
            let last = self
                .status
                .lock()
                .unwrap()
                .verify
                .as_ref()
                .map_or(Some(self.started_unix), |v| v.finished_unix);
            // (A verify under way has no finish time: nothing is due.)
            if last.is_some_and(|t| unix_now() - t >= every.as_secs_f64()) {
                let _ = self.request_verify();
            }
        }
        let asked = self.verifies_asked.load(Ordering::SeqCst);
        if asked <= self.verifies_started.load(Ordering::SeqCst) {
            return None;
        }
        if path.is_none() {
            *path = crate::sync::device_path(heads.socket(), &self.name).ok();
        }
        let p = path.as_deref()?;
        match Verify::start(
            asked,
            &self.name,
            heads.socket(),
            p,
            size,
            self.opts.sync_block,
        ) {
            Ok(v) => {
                self.verifies_started.store(asked, Ordering::SeqCst);
                Some(v)
            }
            Err(e) => {
                warn!("volume={}: cannot verify: {}", self.name, e.0);
                self.verifies_started.store(asked, Ordering::SeqCst);
                None
            }
        }
    }

    /// Asks for a resync of the volume's dirty ranges (the whole volume with `full`), which
    /// starts as soon as the volume is shipping. Needs the tracker (`--tracker-socket`).
    pub fn request_resync(&self, full: bool) -> Result<(), String> {
        if self.heads.is_none() {
            return Err(format!(
                "volume {}: a resync needs the tracker's admin socket (--tracker-socket)",
                self.name
            ));
        }
        let mut r = self.resync.lock().unwrap();
        *r = Some(r.unwrap_or(false) || full);
        Ok(())
    }

    /// Starts a synchronisation when one was asked for or the tracker has dirty regions.
    /// `replica` is the job (id, cursor) the replica was in when this session began, and
    /// `next_seq` the record it needed next: a replica that held data and no job may wait
    /// for the resync window; an initial replication, or a job under way, does not.
    pub(crate) fn maybe_sync(
        &self,
        replica: (u64, u64),
        next_seq: u64,
        size: u64,
        next_try: &mut Instant,
    ) -> Option<Sync> {
        let replica_started = next_seq > 0 && replica.0 == 0;
        let heads = self.heads.as_ref()?;
        if Instant::now() < *next_try {
            return None;
        }
        let asked = *self.resync.lock().unwrap();
        if asked.is_none() && heads.dirty(&self.name).unwrap_or(0) == 0 {
            return None;
        }
        // An automatic resync of a replica that has data waits for the window; an initial
        // replication (a new replica) does not.
        let now = chrono::Timelike::num_seconds_from_midnight(&chrono::Local::now());
        if let Some(w) = self
            .opts
            .resync_window
            .filter(|w| asked.is_none() && replica_started && !w.contains(now))
        {
            let mut st = self.status.lock().unwrap();
            if st.waiting_for_window.is_none() {
                info!(
                    "volume={}: a resync is due; it waits for the resync window {}",
                    self.name, w
                );
            }
            st.waiting_for_window = Some(w.to_string());
            return None;
        }
        self.status.lock().unwrap().waiting_for_window = None;
        match Sync::begin(
            &self.name,
            heads.socket(),
            asked == Some(true),
            replica,
            size,
            self.opts.sync_block,
            &[
                format!("journal {} open", self.journal.display()),
                if self.opts.bucket().is_some() {
                    format!(
                        "bucket {} reachable, the volume's key matches",
                        self.opts.target
                    )
                } else {
                    format!(
                        "target {} reachable and authenticated (mutual TLS)",
                        self.opts.target
                    )
                },
                format!("replica accepted the volume's identity and size ({size} bytes)"),
            ],
        ) {
            Ok(s) => {
                *self.resync.lock().unwrap() = None;
                Some(s)
            }
            Err(e) => {
                warn!(
                    "volume={}: cannot synchronise now: {}; trying again in 5s",
                    self.name, e.0
                );
                self.status.lock().unwrap().last_error = Some(e.0);
                *next_try = Instant::now() + Duration::from_secs(5);
                None
            }
        }
    }

    /// The volume's figures; RPO and lag from the tracker's heads when it answers.
    pub fn status(&self) -> ShipStatus {
        let mut s = self.status.lock().unwrap().clone();
        s.generation = self.generation();
        s.bandwidth_limit_bytes_per_second = self.opts.throttle.limit();
        if let Some(known) = self
            .heads
            .as_ref()
            .and_then(|h| h.behind(&self.name, s.acked_seq))
        {
            match known {
                None => {
                    s.rpo_seconds = 0.0;
                    s.lag_bytes = 0;
                }
                Some(b) => {
                    s.rpo_seconds = s.rpo_seconds.max(b.since.elapsed().as_secs_f64());
                    s.lag_bytes = s.lag_bytes.max(b.used_bytes);
                }
            }
        }
        s
    }

    /// Lets [`VolumeShipper::status`] measure RPO and lag from the tracker's heads.
    pub fn with_heads(mut self, heads: Arc<Heads>) -> VolumeShipper {
        self.heads = Some(heads);
        self
    }

    /// Retries a volume now (after `critical`, or during a back-off).
    pub fn resume(&self) {
        *self.resume.0.lock().unwrap() = true;
        self.resume.1.notify_all();
    }

    /// Sleeps up to `d`, or until resumed or stopped. True if resumed.
    fn pause(&self, d: Option<Duration>, stop: &AtomicBool) -> bool {
        let deadline = d.map(|d| Instant::now() + d);
        let mut resumed = self.resume.0.lock().unwrap();
        loop {
            if std::mem::take(&mut *resumed) {
                return true;
            }
            if stop.load(Ordering::SeqCst) {
                return false;
            }
            let left = match deadline {
                Some(t) => match t.checked_duration_since(Instant::now()) {
                    Some(l) if !l.is_zero() => l,
                    _ => return false,
                },
                None => Duration::from_millis(200),
            };
            resumed = self
                .resume
                .1
                .wait_timeout(resumed, left.min(Duration::from_millis(200)))
                .unwrap()
                .0;
        }
    }

    /// Ships until `stop`.
    pub fn run(&self, stop: &AtomicBool) {
        let mut failures = 0u32;
        while !stop.load(Ordering::SeqCst) {
            let mut connected = false;
            let r = self.session(stop, &mut connected);
            if self
                .status
                .lock()
                .unwrap()
                .verify
                .as_ref()
                .is_some_and(|v| !v.done && v.id == self.verifies_started.load(Ordering::SeqCst))
            {
                // The verify did not finish: the next session runs it again.
                self.verifies_started.fetch_sub(1, Ordering::SeqCst);
            }
            if connected {
                failures = 0;
            }
            match r {
                Ok(()) => return,
                Err(ShipError::Fatal(m)) => {
                    warn!(
                        "volume={}: {m}; shipping stopped (state critical) until `redun resume {}`",
                        self.name, self.name
                    );
                    {
                        let mut s = self.status.lock().unwrap();
                        s.state = ShipState::Critical;
                        s.last_error = Some(m);
                        s.next_retry_unix = None;
                        s.lag_bytes = 0;
                    }
                    while !stop.load(Ordering::SeqCst) && !self.pause(None, stop) {}
                    failures = 0;
                }
                Err(ShipError::Retry(m)) => {
                    let delay = retry_delay(failures, self.opts.retry_unit);
                    failures = failures.saturating_add(1);
                    warn!(
                        "volume={}: {m}; retry {failures} in {:.1}s",
                        self.name,
                        delay.as_secs_f64()
                    );
                    {
                        let mut s = self.status.lock().unwrap();
                        s.state = ShipState::Retrying;
                        s.retries += 1;
                        s.last_error = Some(m);
                        s.next_retry_unix = Some(unix_now() + delay.as_secs_f64());
                    }
                    self.pause(Some(delay), stop);
                }
            }
        }
    }

    pub(crate) fn connect(
        &self,
    ) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, ShipError> {
        let target = &self.opts.target;
        let addrs: Vec<_> = target
            .to_socket_addrs()
            .map_err(|e| ShipError::Retry(format!("cannot resolve target {target}: {e}")))?
            .collect();
        let mut last = None;
        let mut tcp = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = tcp.ok_or_else(|| {
            ShipError::Retry(format!(
                "cannot connect to target {target}: {}",
                last.map_or_else(|| "no address".to_string(), |e| e.to_string())
            ))
        })?;
        let _ = tcp.set_nodelay(true);
        tcp.set_read_timeout(Some(CONNECT_TIMEOUT))
            .and_then(|()| tcp.set_write_timeout(Some(ACK_TIMEOUT)))
            .map_err(|e| classify_io(target, &e))?;
        let name = ServerName::try_from(self.opts.server_name.clone()).map_err(|e| {
            ShipError::Fatal(format!(
                "target name {:?} is not a valid DNS name: {e}",
                self.opts.server_name
            ))
        })?;
        let Destination::Target(tls) = self.opts.dest.clone() else {
            return Err(ShipError::Fatal(format!(
                "volume {}: this shipper sends to a bucket and has no TLS set-up",
                self.name
            )));
        };
        let conn = rustls::ClientConnection::new(tls, name)
            .map_err(|e| ShipError::Fatal(format!("TLS set-up: {e}")))?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| classify_io(target, &e))?;
        }
        Ok(tls)
    }

    fn session(&self, stop: &AtomicBool, connected: &mut bool) -> Result<(), ShipError> {
        if let Some(st) = self.opts.bucket().cloned() {
            return self.bucket_session(&st, stop, connected);
        }
        let target = self.opts.target.clone();
        let mut reader = self.open_journal()?;
        let mut tls = self.connect()?;
        let sb = *reader.superblock();
        let hello = self.hello(&sb);
        proto::write_frame(&mut tls, &Frame::Hello(hello)).map_err(|e| classify_io(&target, &e))?;
        let (next_seq, replica_job) =
            match proto::read_frame(&mut tls).map_err(|e| proto_err(&target, e))? {
                Frame::Welcome {
                    next_seq,
                    sync_job,
                    sync_cursor,
                    ..
                } => (next_seq, (sync_job, sync_cursor)),
                Frame::Refuse { code, message } => {
                    return Err(refused(&target, code, &message));
                }
                _ => {
                    return Err(ShipError::Retry(format!(
                        "target {target}: unexpected answer to HELLO"
                    )));
                }
            };
        let start = self.start_at(&mut reader, next_seq, &format!("the replica on {target}"))?;
        tls.sock
            .set_read_timeout(Some(ACK_TIMEOUT))
            .map_err(|e| classify_io(&target, &e))?;
        info!(
            "volume={}: shipping to {target} from seq {start}",
            self.name
        );
        let mut last_io = Instant::now();
        let mut rate = RateWindow::default();
        // Batches sent and not yet acknowledged, oldest first.
        let mut window: VecDeque<InFlight> = VecDeque::new();
        let mut encoder = proto::BatchEncoder::new(self.opts.level)
            .map_err(|e| ShipError::Retry(format!("cannot set up zstd: {e}")))?;
        // The synchronisation under way, and a sync slot read from the journal before its
        // blocks were compared.
        let mut sync: Option<Sync> = None;
        let mut held: Option<Record> = None;
        let mut next_sync_try = Instant::now();
        let mut acked = start - 1;
        let mut release = OwedRelease::default();
        // The online verify under way, the last record sent, the source's path.
        let mut verify: Option<Verify> = None;
        let mut last_sent = start - 1;
        let mut source_path: Option<String> = None;
        loop {
            if stop.load(Ordering::SeqCst) {
                if let Some(seq) = release.take() {
                    self.write_release(&reader, seq)?;
                }
                return Ok(());
            }
            if let Some(s) = sync.as_mut() {
                let pumped = s
                    .poll_source(None)
                    .and_then(|()| s.pump(&mut |f| proto::write_frame(&mut tls, f)));
                if let Err(e) = pumped {
                    warn!("volume={}: synchronisation stopped: {}", self.name, e.0);
                    self.status.lock().unwrap().last_error = Some(e.0);
                    sync = None;
                    next_sync_try = Instant::now() + Duration::from_secs(5);
                }
                self.note_sync(sync.as_ref());
            }
            if let Some(v) = verify.as_mut() {
                let pumped = v
                    .poll_source(None)
                    .and_then(|()| v.pump(last_sent, &mut |f| proto::write_frame(&mut tls, f)));
                if let Err(e) = pumped {
                    warn!("volume={}: verify stopped: {}", self.name, e.0);
                    verify = None;
                }
            }
            let records = if window.len() < WINDOW {
                self.read_batch(&mut reader, &mut held, sync.as_mut())?
            } else {
                Vec::new()
            };
            if let Some(v) = verify.as_mut() {
                for r in &records {
                    v.observe(r.seq, r.offset, u64::from(r.length));
                }
                let read = records.last().map_or(reader.next_seq() - 1, |r| r.seq);
                let over = v.settle(read);
                self.status.lock().unwrap().verify = Some(v.status());
                if over {
                    verify = None;
                }
            }
            if !records.is_empty() {
                let bytes: u64 = records
                    .iter()
                    .map(|r| (proto::RECORD_LEN + r.payload.len()) as u64)
                    .sum();
                let last_seq = records.last().expect("not empty").seq;
                let batch = encoder
                    .encode(&records)
                    .map_err(|e| ShipError::Retry(format!("cannot compress a batch: {e}")))?;
                let sent = batch.compressed.len() as u64;
                if !self.opts.throttle.take(sent, stop) {
                    return Ok(());
                }
                let frame = Frame::Batch(batch);
                if let Err(e) = proto::write_frame(&mut tls, &frame) {
                    return Err(self
                        .refusal_after(&mut tls)
                        .unwrap_or_else(|| classify_io(&target, &e)));
                }
                if let Frame::Batch(b) = frame {
                    encoder.recycle(b);
                }
                last_sent = last_seq;
                last_io = Instant::now();
                window.push_back(InFlight {
                    last_seq,
                    bytes,
                    sent,
                    read_at: last_io,
                });
                self.note_lag(&window);
                continue;
            }
            let awaiting = sync.as_ref().map_or(0, Sync::awaiting_hashes)
                + verify.as_ref().map_or(0, Verify::awaiting_hashes);
            if !window.is_empty() || awaiting > 0 {
                let through = match self.receive(&mut tls)? {
                    Frame::Hashes {
                        offset,
                        as_of,
                        hashes,
                        ..
                    } if verify.is_some() => {
                        if let Some(v) = verify.as_mut() {
                            v.on_hashes(offset, as_of, hashes)
                                .map_err(|e| ShipError::Retry(e.0))?;
                        }
                        continue;
                    }
                    Frame::Hashes {
                        job,
                        offset,
                        block,
                        hashes,
                        ..
                    } => {
                        if let Some(s) = sync.as_mut() {
                            s.on_hashes(job, offset, block, hashes)
                                .map_err(|e| ShipError::Retry(e.0))?;
                        }
                        continue;
                    }
                    Frame::Ack { through } if through >= acked => through,
                    Frame::Ack { through } => {
                        return Err(ShipError::Retry(format!(
                            "target {target} acknowledged seq {through} after {acked}"
                        )));
                    }
                    _ => unreachable!("receive answers ACKs and HASHES"),
                };
                acked = through;
                self.sync_acked(&mut sync, through, &mut next_sync_try);
                // Progress: the retry schedule starts over at the next failure.
                *connected = true;
                last_io = Instant::now();
                let mut done = (0u64, 0u64, 0u64);
                while window.front().is_some_and(|b| b.last_seq <= through) {
                    let b = window.pop_front().expect("checked");
                    done = (done.0 + 1, done.1 + b.bytes, done.2 + b.sent);
                }
                release.owe(through);
                if let Some(seq) = release.due() {
                    self.write_release(&reader, seq)?;
                }
                self.count_durable(through, done, &mut rate);
                self.note_lag(&window);
                continue;
            }
            {
                let mut s = self.status.lock().unwrap();
                s.throughput_bytes_per_second = rate.per_second(0);
            }
            if last_io.elapsed() >= PING_INTERVAL {
                proto::write_frame(&mut tls, &Frame::Ping).map_err(|e| classify_io(&target, &e))?;
                self.expect_ack(&mut tls, 0)?;
                last_io = Instant::now();
            }
            // Caught up: nothing to send, nothing in flight. A synchronisation starts only now,
            // so that its records find room in the journal.
            if sync.is_none() && verify.is_none() {
                sync = self.maybe_sync(replica_job, next_seq, sb.volume_size, &mut next_sync_try);
                if sync.is_some() {
                    continue;
                }
                verify = self.maybe_verify(sb.volume_size, &mut source_path);
                if verify.is_some() {
                    continue;
                }
            }
            if let Some(v) = verify.as_mut().filter(|v| v.awaiting_source()) {
                v.poll_source(Some(Duration::from_millis(20)))
                    .map_err(|e| ShipError::Retry(e.0))?;
                continue;
            }
            if let Some(s) = sync.as_mut().filter(|s| s.awaiting_source()) {
                // A slot waits for the source blocks being read.
                s.poll_source(Some(Duration::from_millis(20)))
                    .map_err(|e| ShipError::Retry(e.0))?;
                continue;
            }
            if let Some(seq) = release.due() {
                self.write_release(&reader, seq)?;
            }
            reader
                .wait(IDLE_WAIT.min(RELEASE_GAP))
                .map_err(|e| journal_err(&self.journal, e.into()))?;
        }
    }

    /// The next records, up to the batch size; none when none are waiting. A sync slot whose
    /// blocks are still being compared ends the batch and is `held` until they are.
    pub(crate) fn read_batch(
        &self,
        reader: &mut JournalReader,
        held: &mut Option<Record>,
        mut sync: Option<&mut Sync>,
    ) -> Result<Vec<WireRecord>, ShipError> {
        let mut records = Vec::new();
        let mut bytes = 0usize;
        while bytes < self.opts.batch_bytes {
            let next = match held.take() {
                Some(r) => Some(r),
                None => reader
                    .next_record()
                    .map_err(|e| journal_err(&self.journal, e))?,
            };
            match next {
                Some(mut r) => {
                    if r.header.kind == Kind::Sync {
                        if let Some(s) = sync.as_deref_mut() {
                            match s.fill(r.header.seq, &r.payload) {
                                Fill::Filled(p) => r.payload = p,
                                Fill::AsIs => {}
                                Fill::NotYet => {
                                    *held = Some(r);
                                    break;
                                }
                            }
                        }
                    }
                    bytes += proto::RECORD_LEN + r.payload.len();
                    records.push(WireRecord {
                        seq: r.header.seq,
                        kind: r.header.kind as u8,
                        offset: r.header.offset,
                        length: r.header.length,
                        payload: r.payload,
                    });
                }
                None => break,
            }
        }
        Ok(records)
    }

    /// Opens the volume's journal for a session.
    pub(crate) fn open_journal(&self) -> Result<JournalReader, ShipError> {
        let reader = JournalReader::open(&self.journal).map_err(|e| {
            ShipError::Retry(format!(
                "cannot open journal {}: {e} (is the tracker running with this --journal-dir?)",
                self.journal.display()
            ))
        })?;
        if !reader.follows_durable_mark() {
            warn!(
                "volume={}: journal {} has no durable mark (written by an older tracker): \
                 records are shipped as soon as they are written, and a power loss on this \
                 host could leave the replica ahead of the volume; upgrade the tracker",
                self.name,
                self.journal.display()
            );
        }
        Ok(reader)
    }

    /// Positions `reader` where the replica (`who`, for messages) needs the next record:
    /// `next_seq`, or the journal's tail for a new replica. A replica the journal cannot
    /// continue needs a resync. Returns the position; status says `shipping` from it.
    pub(crate) fn start_at(
        &self,
        reader: &mut JournalReader,
        next_seq: u64,
        who: &str,
    ) -> Result<u64, ShipError> {
        let tail = reader.superblock().tail_seq;
        let start = if next_seq == 0 { tail } else { next_seq };
        if start < tail {
            return Err(ShipError::Fatal(format!(
                "{who} needs seq {start} next but the journal starts at seq {tail}: records it \
                 lacks were released; the volume needs a resync"
            )));
        }
        if let Err(e) = reader.seek(start) {
            return Err(ShipError::Fatal(format!(
                "{who} is at seq {start}, which journal {} cannot give ({e}): the replica is \
                 ahead of this journal; the volume needs a resync",
                self.journal.display()
            )));
        }
        let mut s = self.status.lock().unwrap();
        s.state = ShipState::Shipping;
        s.acked_seq = start - 1;
        s.next_retry_unix = None;
        s.last_error = None;
        Ok(start)
    }

    /// Records through `through` are durable on the other side: only now may the journal
    /// reuse their space. `done` (batches, record bytes, bytes sent) is counted in status.
    pub(crate) fn durable(
        &self,
        reader: &mut JournalReader,
        through: u64,
        done: (u64, u64, u64),
        rate: &mut RateWindow,
    ) -> Result<(), ShipError> {
        self.write_release(reader, through)?;
        self.count_durable(through, done, rate);
        Ok(())
    }

    /// Tells the tracker that the journal may reuse the space of every record through `seq`.
    fn write_release(&self, reader: &JournalReader, seq: u64) -> Result<(), ShipError> {
        reader.release(seq).map_err(|e| {
            ShipError::Retry(format!(
                "cannot record the release of journal {}: {e}",
                self.journal.display()
            ))
        })
    }

    /// Counts in status what became durable on the other side (see [`Self::durable`]).
    fn count_durable(&self, through: u64, done: (u64, u64, u64), rate: &mut RateWindow) {
        let mut s = self.status.lock().unwrap();
        s.acked_seq = through;
        s.batches += done.0;
        s.bytes_shipped += done.1;
        s.bytes_sent += done.2;
        s.compression_ratio = s.bytes_shipped as f64 / s.bytes_sent.max(1) as f64;
        s.throughput_bytes_per_second = rate.per_second(done.1);
    }

    /// Records through `through` are durable on the other side: a synchronisation whose end
    /// record they cover is over (the tracker clears its ranges).
    pub(crate) fn sync_acked(
        &self,
        sync: &mut Option<Sync>,
        through: u64,
        next_sync_try: &mut Instant,
    ) {
        let Some(s) = sync.as_mut() else { return };
        match s.acked(through) {
            Ok(false) => return,
            // Until the tracker's heads were sampled again, they still show the job's
            // dirty bytes.
            Ok(true) => *next_sync_try = Instant::now() + 3 * crate::heads::INTERVAL,
            Err(e) => warn!("volume={}: {}", self.name, e.0),
        }
        *sync = None;
        self.status.lock().unwrap().sync = None;
    }

    /// The synchronisation's figures in status.
    pub(crate) fn note_sync(&self, sync: Option<&Sync>) {
        let mut st = self.status.lock().unwrap();
        let before = st.sync.as_ref().map_or(0, |j| j.sent_bytes);
        st.sync = sync.map(Sync::status);
        let now = st.sync.as_ref().map_or(before, |j| j.sent_bytes);
        st.sync_bytes_sent += now.saturating_sub(before);
    }

    /// Lag and RPO from the batches in flight.
    pub(crate) fn note_lag(&self, window: &VecDeque<InFlight>) {
        let mut s = self.status.lock().unwrap();
        s.lag_bytes = window.iter().map(|b| b.bytes).sum();
        s.rpo_seconds = window
            .front()
            .map_or(0.0, |b| b.read_at.elapsed().as_secs_f64());
    }

    /// After a failed write: the target may have said why before it closed (a refusal waits
    /// behind the ACKs of earlier batches).
    fn refusal_after<S: Read + Write>(
        &self,
        tls: &mut rustls::StreamOwned<rustls::ClientConnection, S>,
    ) -> Option<ShipError> {
        let target = &self.opts.target;
        for _ in 0..=WINDOW {
            match proto::read_frame(tls) {
                Ok(Frame::Ack { .. }) => {}
                Ok(Frame::Refuse { code, message }) => {
                    return Some(refused(target, code, &message));
                }
                _ => return None,
            }
        }
        None
    }

    /// Reads the target's next ACK or HASHES; a refusal or anything else is an error.
    fn receive<S: Read + Write>(&self, tls: &mut S) -> Result<Frame, ShipError> {
        let target = &self.opts.target;
        match proto::read_frame(tls).map_err(|e| proto_err(target, e))? {
            f @ (Frame::Ack { .. } | Frame::Hashes { .. }) => Ok(f),
            Frame::Refuse { code, message } => Err(refused(target, code, &message)),
            _ => Err(unexpected(target)),
        }
    }

    /// Reads the target's answer to a batch or ping: an ACK through at least `want`.
    fn expect_ack<S: Read + Write>(&self, tls: &mut S, want: u64) -> Result<u64, ShipError> {
        let target = &self.opts.target;
        match self.receive(tls)? {
            Frame::Ack { through } if through >= want => Ok(through),
            Frame::Ack { through } => Err(ShipError::Retry(format!(
                "target {target} acknowledged seq {through}, short of {want}"
            ))),
            _ => Err(unexpected(target)),
        }
    }
}

/// Bytes acknowledged over a sliding window of a few seconds.
#[derive(Debug, Default)]
pub(crate) struct RateWindow {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl RateWindow {
    const WINDOW: Duration = Duration::from_secs(5);

    pub(crate) fn per_second(&mut self, bytes: u64) -> f64 {
        let now = Instant::now();
        if bytes > 0 {
            self.samples.push_back((now, bytes));
        }
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Self::WINDOW)
        {
            self.samples.pop_front();
        }
        let total: u64 = self.samples.iter().map(|(_, b)| b).sum();
        total as f64 / Self::WINDOW.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_schedule_follows_the_reference() {
        let unit = Duration::from_millis(100);
        let got: Vec<_> = (0..8).map(|n| retry_delay(n, unit).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1000, 3000, 3000, 3000]);
    }
}
