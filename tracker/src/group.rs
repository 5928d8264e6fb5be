//! Consistency groups: recovery points shared by the volumes of several trackers
//! (docs/PROTOCOL.md, "Consistency groups").
//!
//! Every member runs a [`Member`] behind a TLS listener (port 20004 by default, mutual TLS
//! with the replication CA). The coordinator (the configured member, or else each member
//! that reaches no member with a lower id: [`Group::coordinating`]) runs a round every
//! `group.interval`: PREPARE to every other member, each appends the point's marker to each
//! of its group volumes and closes their reply gates (`track::gate`), READY back; when every
//! peer is READY within `group.timeout`, the coordinator places its own markers (last, so its
//! gates close only until its own decision) and sends COMMIT; ABORT otherwise. A member
//! decides by itself (abort) when no decision arrives within the timeout, so no reply is held
//! longer.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};

use crate::hooks::Hooks;
use crate::journal::format::{GroupDecision, PointKind};
use crate::tls::TlsFiles;
use crate::track::ChangeLog;

pub const DEFAULT_PORT: u16 = 20004;
pub const DEFAULT_TIMEOUT_MS: u64 = 50;
pub const DEFAULT_INTERVAL_MS: u64 = 5000;
/// The nice value of the group's threads unless `group.nice` says otherwise.
pub const DEFAULT_NICE: i32 = -10;
/// Longest line a peer may send.
const MAX_LINE: usize = 1 << 20;
/// How long a TLS handshake and HELLO may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection attempt to a peer may take, and how often a lost peer is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RECONNECT_EVERY: Duration = Duration::from_millis(200);

/// `[group]` in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSection {
    /// The group's name: every member's config says the same.
    pub name: String,
    /// This member's id (one of `member`'s).
    pub id: u32,
    /// Where this member listens for the group [default: 0.0.0.0:20004].
    pub listen: Option<String>,
    /// How often the coordinator places a group point, e.g. "5s"; "0" only on demand
    /// [default: 5s].
    pub interval: Option<String>,
    /// How long the coordinator waits for every READY, and a member for the decision
    /// [default: 50ms].
    pub timeout: Option<String>,
    /// How often the coordinator places an app-consistent group point (every member's
    /// hooks run around it), e.g. "15m"; "0" only on demand [default: 0].
    pub app_interval: Option<String>,
    /// The member that coordinates [default: the lowest id that every lower id cannot
    /// outrank: see docs/PROTOCOL.md].
    pub coordinator: Option<u32>,
    /// The volumes of this tracker in the group [default: all].
    pub volumes: Option<Vec<String>>,
    /// The nice value (-20 to 19) of the threads that run the rounds, so that a busy host
    /// does not stretch them, and the replies they hold; 0 leaves them at the tracker's
    /// [default: -10].
    pub nice: Option<i32>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    #[serde(default)]
    pub member: Vec<MemberEntry>,
}

/// `[[group.member]]`: one member of the group (this one too).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemberEntry {
    pub id: u32,
    /// `HOST:PORT` of the member's group listener.
    pub address: String,
    /// The name in the member's certificate [default: HOST of `address`].
    pub name: Option<String>,
}

/// The group settings after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    pub name: String,
    pub id: u32,
    pub listen: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub app_interval_ms: u64,
    pub coordinator: Option<u32>,
    /// `None`: every volume of the tracker.
    pub volumes: Option<Vec<String>>,
    /// The nice value of the group's threads.
    pub nice: i32,
    pub tls: TlsFiles,
    pub members: Vec<MemberEntry>,
}

impl GroupConfig {
    /// Whether volume `name` of this tracker takes part.
    pub fn includes(&self, name: &str) -> bool {
        self.volumes
            .as_ref()
            .is_none_or(|v| v.iter().any(|x| x == name))
    }
}

impl GroupSection {
    /// Checks the section; errors name the key, the value and what is expected.
    pub fn validate(&self, volumes: &[String]) -> Result<GroupConfig, String> {
        if crate::config::check_name(&self.name).is_err() {
            return Err(format!(
                "group.name = {:?}: use 1 to 64 characters of A-Z a-z 0-9 - _ .",
                self.name
            ));
        }
        let ms = |key: &str, v: &Option<String>, default: u64| match v {
            Some(s) => crate::config::parse_duration(s).map_err(|e| format!("group.{key}: {e}")),
            None => Ok(default),
        };
        let interval_ms = ms("interval", &self.interval, DEFAULT_INTERVAL_MS)?;
        let timeout_ms = ms("timeout", &self.timeout, DEFAULT_TIMEOUT_MS)?;
        let app_interval_ms = ms("app_interval", &self.app_interval, 0)?;
        if timeout_ms == 0 {
            return Err("group.timeout = \"0\": the members need some time, e.g. \"50ms\"".into());
        }
        let nice = self.nice.unwrap_or(DEFAULT_NICE);
        if !(-20..=19).contains(&nice) {
            return Err(format!(
                "group.nice = {nice}: expected a nice value from -20 (first) to 19 (last)"
            ));
        }
        let listen = self
            .listen
            .clone()
            .unwrap_or_else(|| format!("0.0.0.0:{DEFAULT_PORT}"));
        listen.parse::<SocketAddr>().map_err(|e| {
            format!("group.listen = {listen:?}: {e} (expected IP:PORT, e.g. 0.0.0.0:20004)")
        })?;
        let mut ids = std::collections::HashSet::new();
        for m in &self.member {
            if !ids.insert(m.id) {
                return Err(format!("group.member id {} is listed twice", m.id));
            }
            if !crate::tls::has_port(&m.address) {
                return Err(format!(
                    "group.member {} address = {:?}: expected HOST:PORT, e.g. 10.0.0.2:20004",
                    m.id, m.address
                ));
            }
        }
        if !ids.contains(&self.id) {
            return Err(format!(
                "group.id = {}: no [[group.member]] has this id (list every member, this one too)",
                self.id
            ));
        }
        if let Some(c) = self.coordinator.filter(|c| !ids.contains(c)) {
            return Err(format!(
                "group.coordinator = {c}: no [[group.member]] has this id"
            ));
        }
        if let Some(vs) = &self.volumes {
            if let Some(v) = vs.iter().find(|v| !volumes.contains(v)) {
                return Err(format!(
                    "group.volumes: there is no volume {v:?} on this tracker"
                ));
            }
        }
        let file = |key: &str, v: &Option<PathBuf>| {
            v.clone().ok_or_else(|| {
                format!(
                    "group.{key} is missing: members authenticate each other with the \
                     replication CA (make the files with `redun pki init`)"
                )
            })
        };
        Ok(GroupConfig {
            name: self.name.clone(),
            id: self.id,
            listen,
            interval_ms,
            timeout_ms,
            app_interval_ms,
            coordinator: self.coordinator,
            volumes: self.volumes.clone(),
            nice,
            tls: TlsFiles {
                ca: file("tls_ca", &self.tls_ca)?,
                cert: file("tls_cert", &self.tls_cert)?,
                key: file("tls_key", &self.tls_key)?,
            },
            members: self.member.clone(),
        })
    }
}

/// One line of the group protocol (JSON, newline-terminated, over TLS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Msg {
    /// The connecting member's first line.
    Hello {
        group: String,
        id: u32,
    },
    Welcome {
        group: String,
        id: u32,
    },
    Ping,
    Pong,
    /// App-consistent points only, before PREPARE: run the pre-hooks. The member runs its
    /// post-hooks when the point is decided, or by itself after `patience_ms`.
    Freeze {
        point: u64,
        patience_ms: u64,
    },
    Frozen {
        point: u64,
    },
    Prepare {
        point: u64,
        kind: PointKind,
        /// The volumes refuse writes from the marker on (a planned failover of the group).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fence: bool,
    },
    Ready {
        point: u64,
        volumes: Vec<Marked>,
    },
    Commit {
        point: u64,
        volumes: Vec<String>,
    },
    Abort {
        point: u64,
    },
    /// The answer to COMMIT and ABORT: whether the member committed the point.
    Done {
        point: u64,
        committed: bool,
    },
    Error {
        message: String,
    },
}

/// A volume's marker of a group point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marked {
    pub volume: String,
    pub marker: u64,
}

fn send<W: Write>(w: &mut W, msg: &Msg) -> io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

fn receive<R: BufRead>(r: &mut R) -> io::Result<Msg> {
    let mut line = Vec::new();
    let n = Read::by_ref(r)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "line too long or cut short",
        ));
    }
    serde_json::from_slice(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Longest a coordinator may ask a member to stay frozen without a decision.
const MAX_PATIENCE: Duration = Duration::from_secs(3600);

/// A point this member froze for or prepared, and has not seen decided.
#[derive(Debug)]
struct Pending {
    /// When this member gives the point up by itself.
    deadline: Instant,
    /// The markers are placed and the replies held (PREPARE).
    prepared: bool,
    /// The pre-hooks ran or are running (FREEZE): the post-hooks run when the point ends.
    frozen: bool,
    /// The volumes (indices) this point fenced: they take writes again if it aborts.
    fenced: Vec<usize>,
}

/// The hooks of a member's group volumes, one phase at a time: a thaw waits for a freeze
/// that still runs, and the other way round.
#[derive(Debug, Default)]
pub struct GroupHooks {
    volumes: Vec<(String, Hooks)>,
    running: Mutex<()>,
}

impl GroupHooks {
    /// The hooks of `volumes` (those without any are left out).
    pub fn new(volumes: Vec<(String, Hooks)>) -> Self {
        GroupHooks {
            volumes: volumes.into_iter().filter(|(_, h)| !h.is_empty()).collect(),
            running: Mutex::default(),
        }
    }

    /// The pre-hooks, volume after volume, up to the first that fails.
    fn freeze(&self) -> Result<(), String> {
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        for (name, h) in &self.volumes {
            h.run_pre(name).map_err(|e| format!("volume {name}: {e}"))?;
        }
        Ok(())
    }

    /// Every post-hook, whatever the others did.
    fn thaw(&self, group: &str, point: u64) {
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        for (name, h) in &self.volumes {
            match h.run_post(name) {
                Ok(()) => debug!("group={group} point={point} volume={name}: thawed"),
                Err(e) => warn!(
                    "group={group} point={point} volume={name}: {e}: check that the \
                     application is running again"
                ),
            }
        }
    }
}

/// This tracker's side of the two phases: hooks, markers, held replies, decisions.
#[derive(Debug)]
pub struct Member {
    group: String,
    volumes: Vec<(String, Arc<ChangeLog>)>,
    hooks: Arc<GroupHooks>,
    timeout: Duration,
    /// Points frozen or prepared and not decided yet.
    pending: Mutex<HashMap<u64, Pending>>,
    wake: Condvar,
    stopping: AtomicBool,
    /// Points this member committed and aborted.
    committed: AtomicU64,
    aborted: AtomicU64,
}

impl Member {
    pub fn new(
        group: &str,
        volumes: Vec<(String, Arc<ChangeLog>)>,
        hooks: GroupHooks,
        timeout: Duration,
    ) -> Self {
        Member {
            group: group.to_string(),
            volumes,
            hooks: Arc::new(hooks),
            timeout,
            pending: Mutex::default(),
            wake: Condvar::new(),
            stopping: AtomicBool::new(false),
            committed: AtomicU64::new(0),
            aborted: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// FREEZE: the pre-hooks of every group volume. On failure the post-hooks run at once
    /// (they always run) and the point is over here.
    pub fn freeze(&self, point: u64, patience: Duration) -> Result<(), String> {
        {
            let mut pending = self.lock();
            if self.stopping.load(Ordering::SeqCst) {
                return Err("the tracker is stopping".into());
            }
            if pending.contains_key(&point) {
                return Err(format!("point {point} is already under way"));
            }
            let deadline = Instant::now() + patience.min(MAX_PATIENCE);
            let p = Pending {
                deadline,
                prepared: false,
                frozen: true,
                fenced: Vec::new(),
            };
            pending.insert(point, p);
            self.wake.notify_all();
        }
        self.hooks.freeze().inspect_err(|e| {
            warn!("group={} point={point}: {e}: the point aborts", self.group);
            // Whoever takes the point out thaws: here, or a decision or the timer meanwhile.
            if let Some(p) = self.lock().remove(&point) {
                self.conclude(point, &p, false, &[]);
                self.thaw(point, true);
            }
        })
    }

    /// The post-hooks of `point`: `now` in this thread, otherwise in a thread of their own
    /// (a decision is not held up).
    fn thaw(&self, point: u64, now: bool) {
        let (hooks, group) = (self.hooks.clone(), self.group.clone());
        let spawned = !now
            && std::thread::Builder::new()
                .name("group-thaw".into())
                .spawn(move || hooks.thaw(&group, point))
                .is_ok();
        if !spawned {
            self.hooks.thaw(&self.group, point);
        }
    }

    /// Ends `point`, which the caller took out of `pending`: a prepared point records the
    /// decision and opens its gates, any other counts as aborted. Its thaw is the caller's.
    /// Returns whether it committed here.
    fn conclude(&self, point: u64, p: &Pending, commit: bool, volumes: &[String]) -> bool {
        if p.prepared {
            self.finish(point, commit, volumes, &self.volumes, &p.fenced)
        } else {
            self.aborted.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// PREPARE: the marker in every group volume, replies held from there on. An
    /// app-consistent point must be frozen first. With `fence`, the volumes refuse writes
    /// from their marker on, for good if the point commits (a planned failover).
    pub fn prepare(&self, point: u64, kind: PointKind, fence: bool) -> Result<Vec<Marked>, String> {
        let mut pending = self.lock();
        if self.stopping.load(Ordering::SeqCst) {
            return Err("the tracker is stopping".into());
        }
        let frozen = match pending.get(&point) {
            Some(p) if p.prepared => return Err(format!("point {point} is already prepared")),
            Some(p) => p.frozen,
            None => false,
        };
        if kind == PointKind::App && !frozen {
            return Err(format!(
                "app-consistent point {point} was not frozen here (no FREEZE, or it was \
                 given up)"
            ));
        }
        let mut marked = Vec::new();
        let mut fenced = Vec::new();
        for (i, (name, log)) in self.volumes.iter().enumerate() {
            match log.mark_group(kind, point, fence) {
                Ok((marker, new)) => {
                    marked.push(Marked {
                        volume: name.clone(),
                        marker,
                    });
                    if new {
                        fenced.push(i);
                    }
                }
                Err(e) => {
                    pending.remove(&point);
                    drop(pending);
                    // The volumes marked so far, in order, hear the abort.
                    self.finish(point, false, &[], &self.volumes[..i], &fenced);
                    if frozen {
                        self.thaw(point, false);
                    }
                    return Err(format!("volume {name}: {e}"));
                }
            }
        }
        let p = Pending {
            deadline: Instant::now() + self.timeout,
            prepared: true,
            frozen,
            fenced,
        };
        pending.insert(point, p);
        self.wake.notify_all();
        Ok(marked)
    }

    /// COMMIT or ABORT. Returns whether the point was committed here: not when this member
    /// had already given it up (its own timeout), never prepared it, or did not record it.
    /// A frozen point thaws in the background.
    pub fn decide(&self, point: u64, commit: bool, volumes: &[String]) -> bool {
        let Some(p) = self.lock().remove(&point) else {
            return false;
        };
        let committed = self.conclude(point, &p, commit, volumes);
        if p.frozen {
            self.thaw(point, false);
        }
        committed
    }

    /// Appends the decision to each of the `marked` volumes and opens its gate. An abort
    /// unfences the volumes the point `fenced` (indices in `marked`).
    fn finish(
        &self,
        point: u64,
        commit: bool,
        volumes: &[String],
        marked: &[(String, Arc<ChangeLog>)],
        fenced: &[usize],
    ) -> bool {
        let decision = GroupDecision {
            group: self.group.clone(),
            point,
            commit,
            volumes: volumes.to_vec(),
        }
        .encode();
        let mut ok = commit;
        for (i, (name, log)) in marked.iter().enumerate() {
            if !commit && fenced.contains(&i) {
                match log.unfence() {
                    Ok(()) => info!(
                        "group={} point={point} volume={name}: the fencing point aborted: \
                         writes are taken again",
                        self.group
                    ),
                    Err(e) => warn!(
                        "group={} point={point} volume={name}: the fencing point aborted but \
                         the volume stays fenced ({e}): `redun unfence {name}`",
                        self.group
                    ),
                }
            }
            if let Err(e) = log.decide(&decision) {
                warn!(
                    "group={} point={point} volume={name}: the decision is not recorded ({e}); \
                     the point will not be listed",
                    self.group
                );
                ok = false;
            }
        }
        // Every decision is in its journal before any held reply leaves.
        for (_, log) in marked {
            if let Some(gate) = log.gate() {
                gate.release(point);
            }
        }
        if ok {
            self.committed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.aborted.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Aborts the points whose decision is late, until [`Member::stop`].
    fn expire_loop(&self) {
        let mut pending = self.lock();
        loop {
            let now = Instant::now();
            let stopping = self.stopping.load(Ordering::SeqCst);
            let ids: Vec<u64> = pending
                .iter()
                .filter(|(_, p)| p.deadline <= now || stopping)
                .map(|(id, _)| *id)
                .collect();
            if !ids.is_empty() {
                // Taken here, under the lock: a decision arriving now finds them gone.
                let late: Vec<(u64, Pending)> = ids
                    .into_iter()
                    .filter_map(|id| Some((id, pending.remove(&id)?)))
                    .collect();
                drop(pending);
                // Held replies first: a thaw may take a while.
                for (id, p) in &late {
                    self.conclude(*id, p, false, &[]);
                    if p.prepared {
                        warn!(
                            "group={} point={id}: no decision within {:?}: aborted here, \
                             replies released{}",
                            self.group,
                            self.timeout,
                            if p.frozen { ", thawing" } else { "" }
                        );
                    } else {
                        warn!(
                            "group={} point={id}: frozen, and no PREPARE or decision came in \
                             time: thawing",
                            self.group
                        );
                    }
                }
                // A stopping tracker thaws before it exits.
                for (id, _) in late.iter().filter(|(_, p)| p.frozen) {
                    self.thaw(*id, stopping);
                }
                pending = self.lock();
                continue;
            }
            if stopping {
                return;
            }
            let wait = pending
                .values()
                .map(|p| p.deadline)
                .min()
                .map_or(Duration::from_secs(1), |d| d.saturating_duration_since(now));
            pending = self
                .wake
                .wait_timeout(pending, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Refuses new points and aborts the pending ones (their replies leave).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake.notify_all();
    }

    /// Answers one request of the coordinator.
    fn handle(&self, msg: Msg) -> Msg {
        match msg {
            Msg::Ping => Msg::Pong,
            Msg::Freeze { point, patience_ms } => {
                match self.freeze(point, Duration::from_millis(patience_ms)) {
                    Ok(()) => Msg::Frozen { point },
                    Err(message) => Msg::Error { message },
                }
            }
            Msg::Prepare { point, kind, fence } => match self.prepare(point, kind, fence) {
                Ok(volumes) => Msg::Ready { point, volumes },
                Err(message) => Msg::Error { message },
            },
            Msg::Commit { point, volumes } => Msg::Done {
                point,
                committed: self.decide(point, true, &volumes),
            },
            Msg::Abort { point } => {
                self.decide(point, false, &[]);
                Msg::Done {
                    point,
                    committed: false,
                }
            }
            other => Msg::Error {
                message: format!("unexpected {other:?}"),
            },
        }
    }
}

/// Requests sent to peers whose answers are awaited.
struct Asked {
    rx: mpsc::Receiver<(u32, Result<Msg, String>)>,
    deadline: Instant,
    answers: HashMap<u32, Result<Msg, String>>,
    /// Every peer asked (or refused for being down).
    ids: Vec<u32>,
    waiting: usize,
}

impl Asked {
    /// The answers by the deadline; a peer that did not answer by then has an error.
    fn collect(mut self) -> HashMap<u32, Result<Msg, String>> {
        while self.waiting > 0 {
            let left = self.deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((id, a)) => {
                    self.answers.insert(id, a);
                    self.waiting -= 1;
                }
                Err(_) => break,
            }
        }
        for id in self.ids {
            self.answers
                .entry(id)
                .or_insert_with(|| Err("no answer within the timeout".into()));
        }
        self.answers
    }
}

/// A peer as the coordinating side sees it: a worker thread owns the connection.
#[derive(Debug)]
struct Peer {
    id: u32,
    address: String,
    jobs: mpsc::Sender<Job>,
    up: AtomicBool,
    last_error: Mutex<String>,
}

#[derive(Debug)]
struct Job {
    msg: Msg,
    deadline: Instant,
    answer: mpsc::Sender<(u32, Result<Msg, String>)>,
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Status of the group as `redun status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub name: String,
    pub id: u32,
    /// `ok`, or `degraded` when a member is unreachable or the last point aborted.
    pub state: String,
    /// This member runs the rounds.
    pub coordinating: bool,
    /// Points committed and aborted by the rounds this member ran.
    pub rounds_committed: u64,
    pub rounds_aborted: u64,
    /// Points this member committed and aborted (whoever coordinated).
    pub committed: u64,
    pub aborted: u64,
    /// The last point this member coordinated, and how long its round took.
    #[serde(default)]
    pub last_point: u64,
    #[serde(default)]
    pub last_round_us: u64,
    #[serde(default)]
    pub last_error: String,
    /// What the rounds cost this member's replies: how many waited at a gate, their waits
    /// added up, and the longest wait (its group volumes together, since start).
    #[serde(default)]
    pub held_replies: u64,
    #[serde(default)]
    pub held_wait_us: u64,
    #[serde(default)]
    pub held_longest_us: u64,
    pub members: Vec<MemberStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: u32,
    pub address: String,
    pub reachable: bool,
    #[serde(default)]
    pub error: String,
}

/// What a round decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    pub point: u64,
    pub committed: bool,
    /// Every volume of every member that placed the marker.
    pub volumes: Vec<String>,
    pub elapsed: Duration,
    pub error: String,
}

/// A running group member: listener, peers, rounds.
#[derive(Debug)]
pub struct Group {
    cfg: GroupConfig,
    member: Arc<Member>,
    peers: Vec<Arc<Peer>>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    status: Mutex<GroupStatus>,
    /// How long the coordinator waits for the members' pre-hooks (`points.hook_timeout`).
    hook_timeout: Duration,
    /// One round at a time; the last point id this coordinator gave out.
    round: Mutex<u64>,
}

impl Group {
    /// Starts the member: its listener, a worker per peer and the timer that aborts points
    /// whose decision is late.
    pub fn start(
        cfg: GroupConfig,
        volumes: Vec<(String, Arc<ChangeLog>)>,
        hooks: GroupHooks,
        hook_timeout: Duration,
    ) -> anyhow::Result<Arc<Group>> {
        let server_tls = cfg.tls.server_config()?;
        let client_tls = cfg.tls.client_config()?;
        let listener = TcpListener::bind(&cfg.listen).map_err(|e| {
            anyhow::anyhow!(
                "group {}: cannot listen on group.listen = {} ({e}): is another tracker using \
                 it? choose another address",
                cfg.name,
                cfg.listen
            )
        })?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let member = Arc::new(Member::new(
            &cfg.name,
            volumes,
            hooks,
            Duration::from_millis(cfg.timeout_ms),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let m = member.clone();
        let nice = cfg.nice;
        threads.push(spawn("group-timer".into(), nice, move || m.expire_loop())?);
        let (name, id) = (cfg.name.clone(), cfg.id);
        let (m, s) = (member.clone(), stop.clone());
        let members: Vec<u32> = cfg.members.iter().map(|m| m.id).collect();
        // The coordinators' connection threads it starts inherit its nice value.
        threads.push(spawn("group-accept".into(), nice, move || {
            accept_loop(&listener, &server_tls, &name, id, &members, &m, &s);
        })?);
        let mut peers = Vec::new();
        for e in cfg.members.iter().filter(|m| m.id != cfg.id) {
            let (tx, rx) = mpsc::channel();
            let peer = Arc::new(Peer {
                id: e.id,
                address: e.address.clone(),
                jobs: tx,
                up: AtomicBool::new(false),
                last_error: Mutex::new("not connected yet".into()),
            });
            let server_name = e
                .name
                .clone()
                .unwrap_or_else(|| crate::tls::host_of(&e.address));
            let server_name = rustls_pki_types::ServerName::try_from(server_name.clone())
            .map_err(|err| {
                anyhow::anyhow!(
                    "group.member {}: {server_name:?} is not a certificate name ({err}); set name",
                    e.id
                )
            })?;
            let link = Link {
                peer: peer.clone(),
                tls: client_tls.clone(),
                server_name,
                hello: Msg::Hello {
                    group: cfg.name.clone(),
                    id: cfg.id,
                },
                stop: stop.clone(),
            };
            threads.push(spawn(format!("group-peer-{}", e.id), nice, move || {
                link.run(&rx);
            })?);
            peers.push(peer);
        }
        let group = Arc::new(Group {
            status: Mutex::new(GroupStatus {
                name: cfg.name.clone(),
                id: cfg.id,
                ..GroupStatus::default()
            }),
            cfg,
            member,
            peers,
            stop,
            threads: Mutex::new(threads),
            hook_timeout,
            round: Mutex::new(0),
        });
        if group.cfg.interval_ms > 0 || group.cfg.app_interval_ms > 0 {
            let g = group.clone();
            let t = spawn("group-rounds".into(), nice, move || g.rounds())?;
            group.threads.lock().unwrap().push(t);
        }
        info!(
            "group={} member={} listening on {} with {} peer(s), timeout={}ms interval={}ms",
            group.cfg.name,
            group.cfg.id,
            addr,
            group.peers.len(),
            group.cfg.timeout_ms,
            group.cfg.interval_ms
        );
        Ok(group)
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Whether this member runs the rounds now: the configured coordinator, or else no
    /// member with a lower id is reachable.
    pub fn coordinating(&self) -> bool {
        match self.cfg.coordinator {
            Some(c) => c == self.cfg.id,
            None => !self
                .peers
                .iter()
                .any(|p| p.id < self.cfg.id && p.up.load(Ordering::SeqCst)),
        }
    }

    fn rounds(&self) {
        // Without crash-consistent rounds, the loop still wakes to check the links.
        let every = match self.cfg.interval_ms {
            0 => Duration::from_secs(1),
            ms => Duration::from_millis(ms),
        };
        let app_every = Duration::from_millis(self.cfg.app_interval_ms);
        let mut next = Instant::now() + every;
        let mut next_app = (self.cfg.app_interval_ms > 0).then(|| Instant::now() + app_every);
        let mut was_degraded = false;
        while !self.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now < next {
                std::thread::sleep((next - now).min(Duration::from_millis(100)));
                continue;
            }
            next = now + every;
            // Keeps the links to the connected peers checked, coordinating or not (a link
            // that is down reconnects by itself); a peer slower than this is dropped.
            let patience = Duration::from_millis((2 * self.cfg.timeout_ms).max(200));
            drop(self.ask_all(&|_| Some(Msg::Ping), now + patience, true));
            if !self.coordinating() {
                continue;
            }
            let kind = match next_app {
                Some(t) if now >= t => {
                    next_app = Some(now + app_every);
                    PointKind::App
                }
                _ if self.cfg.interval_ms > 0 => PointKind::Crash,
                _ => continue,
            };
            let r = self.round(kind, false);
            let degraded = !r.committed;
            if degraded && !was_degraded {
                warn!(
                    "group={} point={} aborted: {}; the group is degraded until a point commits",
                    self.cfg.name, r.point, r.error
                );
            } else if !degraded && was_degraded {
                info!(
                    "group={} point={} committed: the group is ok again",
                    self.cfg.name, r.point
                );
            }
            was_degraded = degraded;
        }
    }

    /// Sends `msg(peer)` to every peer that gets one and collects the answers until
    /// `deadline`. With `only_up`, a peer not connected gets nothing and answers an error.
    fn ask_all(
        &self,
        msg: &dyn Fn(&Peer) -> Option<Msg>,
        deadline: Instant,
        only_up: bool,
    ) -> HashMap<u32, Result<Msg, String>> {
        self.ask(msg, deadline, only_up).collect()
    }

    /// [`Group::ask_all`] without waiting: the link threads send at once, the answers are
    /// [`Asked::collect`]ed later.
    fn ask(&self, msg: &dyn Fn(&Peer) -> Option<Msg>, deadline: Instant, only_up: bool) -> Asked {
        let (tx, rx) = mpsc::channel();
        let mut asked = Asked {
            rx,
            deadline,
            answers: HashMap::new(),
            ids: Vec::new(),
            waiting: 0,
        };
        for p in &self.peers {
            let Some(m) = msg(p) else { continue };
            asked.ids.push(p.id);
            if only_up && !p.up.load(Ordering::SeqCst) {
                let e = p.last_error.lock().unwrap().clone();
                asked.answers.insert(p.id, Err(e));
                continue;
            }
            let job = Job {
                msg: m,
                deadline,
                answer: tx.clone(),
            };
            if p.jobs.send(job).is_ok() {
                asked.waiting += 1;
            }
        }
        asked
    }

    /// [`Group::round`] on demand (`redun point group`), in a thread at the group's nice
    /// value like the timed rounds: the caller's thread keeps its own.
    pub fn round_now(self: &Arc<Self>, kind: PointKind, fence: bool) -> Round {
        let g = self.clone();
        match spawn("group-point".into(), self.cfg.nice, move || {
            g.round(kind, fence)
        }) {
            Ok(t) => t.join().unwrap_or_else(|e| std::panic::resume_unwind(e)),
            Err(_) => self.round(kind, fence),
        }
    }

    /// Runs one round as coordinator: FREEZE (app-consistent points), PREPARE, then
    /// COMMIT or ABORT. With `fence`, every member volume refuses writes from its marker on
    /// if the point commits (a planned failover of the whole group).
    pub fn round(&self, kind: PointKind, fence: bool) -> Round {
        let mut last = self.round.lock().unwrap_or_else(|e| e.into_inner());
        let point = next_point(&mut last, self.cfg.id);
        let start = Instant::now();
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        let mut error = String::new();
        let mut volumes = Vec::new();
        // The peers that must hear the decision: they may have frozen or prepared.
        let mut involved = Vec::new();
        // A member known to be unreachable makes the point abort before anyone holds a reply.
        if let Some(p) = self.peers.iter().find(|p| !p.up.load(Ordering::SeqCst)) {
            error = format!(
                "member {} ({}) is unreachable: {}",
                p.id,
                p.address,
                p.last_error.lock().unwrap()
            );
        } else {
            if kind == PointKind::App {
                self.freeze(point, &mut involved, &mut error);
            }
            let sent = Instant::now();
            if error.is_empty() {
                let answers = self.ask_all(
                    &|_| Some(Msg::Prepare { point, kind, fence }),
                    sent + timeout,
                    true,
                );
                for p in &self.peers {
                    let ready = |m: &Msg| matches!(m, Msg::Ready { point: q, .. } if *q == point);
                    let answer = answers.get(&p.id);
                    if let Some(Msg::Ready { volumes: v, .. }) =
                        take_answer(p, answer, ready, &mut involved, &mut error)
                    {
                        volumes.extend(v.iter().map(|m| m.volume.clone()));
                    }
                }
            }
            // The coordinator marks last, once every peer has: a write after its marker can
            // only be acknowledged after every marker is placed, so its gate closes only for
            // the moment until its own decision (docs/PROTOCOL.md, "A round").
            if error.is_empty() {
                match self.member.prepare(point, kind, fence) {
                    Ok(v) => volumes.extend(v.into_iter().map(|m| m.volume)),
                    Err(e) => error = format!("member {}: {e}", self.cfg.id),
                }
                // The peers give the point up `timeout` after its PREPARE: a COMMIT sent
                // later than that would commit here what they aborted (a fence's markers,
                // synced, take the longest).
                if error.is_empty() && sent.elapsed() >= timeout {
                    error = format!(
                        "member {}: its own markers were placed {:?} after the PREPARE, past \
                         group.timeout ({timeout:?}); the others may have given the point up",
                        self.cfg.id,
                        sent.elapsed()
                    );
                }
            }
        }
        let commit = error.is_empty();
        volumes.sort();
        let to_send = |p: &Peer| {
            involved.contains(&p.id).then(|| {
                if commit {
                    Msg::Commit {
                        point,
                        volumes: volumes.clone(),
                    }
                } else {
                    Msg::Abort { point }
                }
            })
        };
        // The peers' decisions leave first; the coordinator's own volumes decide meanwhile.
        let asked = self.ask(&to_send, Instant::now() + timeout, false);
        let mut committed = self.member.decide(point, commit, &volumes) && commit;
        let answers = asked.collect();
        if commit {
            for (id, a) in &answers {
                match a {
                    Ok(Msg::Done {
                        committed: true, ..
                    }) => {}
                    Ok(other) => {
                        committed = false;
                        error = format!("member {id} did not commit: {other:?}");
                    }
                    Err(e) => {
                        committed = false;
                        error = format!("member {id} did not confirm the commit: {e}");
                    }
                }
            }
            if !committed && error.is_empty() {
                error = format!("member {} did not commit", self.cfg.id);
            }
        }
        let elapsed = start.elapsed();
        let mut st = self.status.lock().unwrap();
        st.last_point = point;
        st.last_round_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if committed {
            st.rounds_committed += 1;
            st.last_error.clear();
            debug!(
                "group={} point={point} committed volumes={} in {}us",
                self.cfg.name,
                volumes.len(),
                st.last_round_us
            );
        } else {
            st.rounds_aborted += 1;
            st.last_error.clone_from(&error);
        }
        Round {
            point,
            committed,
            volumes,
            elapsed,
            error,
        }
    }

    /// The FREEZE phase: every member's pre-hooks, this one's meanwhile. Peers that froze
    /// or may have are added to `involved`; the first failure is left in `error`.
    fn freeze(&self, point: u64, involved: &mut Vec<u32>, error: &mut String) {
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        let wait = self.hook_timeout + timeout;
        // A frozen member hears the decision within this, unless the coordinator is gone.
        let patience = wait + 3 * timeout;
        let patience_ms = u64::try_from(patience.as_millis()).unwrap_or(u64::MAX);
        let asked = self.ask(
            &|_| Some(Msg::Freeze { point, patience_ms }),
            Instant::now() + wait,
            true,
        );
        if let Err(e) = self.member.freeze(point, patience) {
            *error = format!("member {}: {e}", self.cfg.id);
        }
        let answers = asked.collect();
        for p in &self.peers {
            let frozen = |m: &Msg| matches!(m, Msg::Frozen { point: q } if *q == point);
            take_answer(p, answers.get(&p.id), frozen, involved, error);
        }
    }

    pub fn status(&self) -> GroupStatus {
        let mut st = self.status.lock().unwrap().clone();
        st.coordinating = self.coordinating();
        st.committed = self.member.committed.load(Ordering::Relaxed);
        st.aborted = self.member.aborted.load(Ordering::Relaxed);
        for gate in self.member.volumes.iter().filter_map(|(_, log)| log.gate()) {
            let h = gate.cost();
            st.held_replies += h.replies;
            st.held_wait_us += h.waited_us;
            st.held_longest_us = st.held_longest_us.max(h.longest_us);
        }
        st.members = self
            .cfg
            .members
            .iter()
            .map(|m| match self.peers.iter().find(|p| p.id == m.id) {
                Some(p) => MemberStatus {
                    id: m.id,
                    address: m.address.clone(),
                    reachable: p.up.load(Ordering::SeqCst),
                    error: if p.up.load(Ordering::SeqCst) {
                        String::new()
                    } else {
                        p.last_error.lock().unwrap().clone()
                    },
                },
                None => MemberStatus {
                    id: m.id,
                    address: m.address.clone(),
                    reachable: true,
                    error: String::new(),
                },
            })
            .collect();
        let all_up = st.members.iter().all(|m| m.reachable);
        st.state = if all_up && st.last_error.is_empty() {
            "ok".into()
        } else {
            "degraded".into()
        };
        st
    }

    /// Stops rounds and the listener, aborts pending points (releasing their replies).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.member.stop();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap());
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Peer `p`'s `answer` to FREEZE or PREPARE: the answer when `expected` accepts it;
/// otherwise the failure is left in `error`. A peer that may have acted (any answer but
/// ERROR, or none in time) joins `involved`: it must hear the decision.
fn take_answer<'a>(
    p: &Peer,
    answer: Option<&'a Result<Msg, String>>,
    expected: impl Fn(&Msg) -> bool,
    involved: &mut Vec<u32>,
    error: &mut String,
) -> Option<&'a Msg> {
    let good = match answer? {
        Ok(m) if expected(m) => Some(m),
        Ok(Msg::Error { message }) => {
            *error = format!("member {}: {message}", p.id);
            return None;
        }
        Ok(other) => {
            *error = format!("member {}: unexpected answer {other:?}", p.id);
            None
        }
        Err(e) => {
            *error = format!("member {} ({}): {e}", p.id, p.address);
            None
        }
    };
    if !involved.contains(&p.id) {
        involved.push(p.id);
    }
    good
}

/// A fresh point id after `last`: milliseconds since the epoch in the high bits, the
/// coordinator's `id` in the low 12, increasing for this coordinator.
fn next_point(last: &mut u64, id: u32) -> u64 {
    let now = crate::track::unix_ms();
    *last = ((now << 12) | u64::from(id & 0xfff)).max(*last + (1 << 12));
    *last
}

/// The coordinating side's connection to one peer.
struct Link {
    peer: Arc<Peer>,
    tls: Arc<rustls::ClientConfig>,
    server_name: rustls_pki_types::ServerName<'static>,
    hello: Msg,
    stop: Arc<AtomicBool>,
}

impl Link {
    fn run(&self, jobs: &mpsc::Receiver<Job>) {
        let mut conn: Option<BufReader<Tls>> = None;
        let mut last_try: Option<Instant> = None;
        while !self.stop.load(Ordering::SeqCst) {
            if conn.is_none() && last_try.is_none_or(|t| t.elapsed() >= RECONNECT_EVERY) {
                last_try = Some(Instant::now());
                match self.connect() {
                    Ok(c) => {
                        if !self.peer.up.swap(true, Ordering::SeqCst) {
                            info!(
                                "member={} address={}: group member is reachable",
                                self.peer.id, self.peer.address
                            );
                        }
                        conn = Some(c);
                    }
                    Err(e) => self.down(&format!("cannot connect: {e}")),
                }
            }
            let job = match jobs.recv_timeout(RECONNECT_EVERY) {
                Ok(j) => j,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let answer = match conn.as_mut() {
                None => Err(self.peer.last_error.lock().unwrap().clone()),
                Some(_) if Instant::now() >= job.deadline => Err("too late to send".into()),
                Some(c) => match exchange(c, &job.msg, job.deadline) {
                    Ok(m) => Ok(m),
                    Err(e) => {
                        // The connection may carry a late answer: start afresh.
                        conn = None;
                        let e = format!("{e}");
                        self.down(&e);
                        Err(e)
                    }
                },
            };
            let _ = job.answer.send((self.peer.id, answer));
        }
    }

    fn down(&self, why: &str) {
        if self.peer.up.swap(false, Ordering::SeqCst) {
            warn!(
                "member={} address={}: group member is unreachable: {why}",
                self.peer.id, self.peer.address
            );
        }
        *self.peer.last_error.lock().unwrap() = why.to_string();
    }

    fn connect(&self) -> io::Result<BufReader<Tls>> {
        let addr = self
            .peer
            .address
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::other("the address resolves to nothing"))?;
        let tcp = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let c = rustls::ClientConnection::new(self.tls.clone(), self.server_name.clone())
            .map_err(io::Error::other)?;
        let mut r = BufReader::new(rustls::StreamOwned::new(c, tcp));
        send(r.get_mut(), &self.hello)?;
        match receive(&mut r)? {
            Msg::Welcome { .. } => Ok(r),
            Msg::Error { message } => Err(io::Error::other(message)),
            other => Err(io::Error::other(format!("unexpected answer {other:?}"))),
        }
    }
}

/// Sends `msg` and reads its answer before `deadline`.
fn exchange(c: &mut BufReader<Tls>, msg: &Msg, deadline: Instant) -> io::Result<Msg> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    c.get_ref().sock.set_read_timeout(Some(left))?;
    c.get_ref().sock.set_write_timeout(Some(left))?;
    send(c.get_mut(), msg)?;
    receive(c).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock => {
            io::Error::new(io::ErrorKind::TimedOut, "no answer within the timeout")
        }
        _ => e,
    })
}

/// Starts thread `name` at nice value `nice` (see [`GroupConfig::nice`]): the threads a
/// round waits for. Hook commands they start inherit it.
fn spawn<T: Send + 'static>(
    name: String,
    nice: i32,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    std::thread::Builder::new().name(name).spawn(move || {
        static TOLD: AtomicBool = AtomicBool::new(false);
        let set = if nice == 0 {
            Ok(())
        } else {
            crate::sys::set_thread_nice(nice)
        };
        if let Err(e) = set {
            if !TOLD.swap(true, Ordering::Relaxed) {
                warn!(
                    "group: cannot set the group threads' nice value to {nice} ({e}): they \
                     keep the tracker's, and rounds may take longer on a busy host (run the \
                     tracker with CAP_SYS_NICE, or set group.nice = 0)"
                );
            }
        }
        f()
    })
}

fn accept_loop(
    listener: &TcpListener,
    tls: &Arc<rustls::ServerConfig>,
    group: &str,
    id: u32,
    members: &[u32],
    member: &Arc<Member>,
    stop: &AtomicBool,
) {
    let what = format!("group={group}");
    crate::service::accept_until(listener, stop, &what, |tcp, peer| {
        let (tls, group, members, member) = (
            tls.clone(),
            group.to_string(),
            members.to_vec(),
            member.clone(),
        );
        let _ = std::thread::Builder::new()
            .name("group-conn".into())
            .spawn(move || {
                if let Err(e) = serve(tcp, &tls, &group, id, &members, &member) {
                    if e.kind() != io::ErrorKind::UnexpectedEof {
                        warn!("group={group}: connection from {peer}: {e}");
                    }
                }
            });
    });
}

/// One coordinator's connection: HELLO, then requests until it closes.
fn serve(
    tcp: TcpStream,
    tls: &Arc<rustls::ServerConfig>,
    group: &str,
    id: u32,
    members: &[u32],
    member: &Member,
) -> io::Result<()> {
    tcp.set_nonblocking(false)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let conn = rustls::ServerConnection::new(tls.clone()).map_err(io::Error::other)?;
    let mut r = BufReader::new(rustls::StreamOwned::new(conn, tcp));
    match receive(&mut r)? {
        Msg::Hello { group: g, id: from } if g == group && members.contains(&from) => {
            send(
                r.get_mut(),
                &Msg::Welcome {
                    group: group.to_string(),
                    id,
                },
            )?;
        }
        Msg::Hello { group: g, id: from } => {
            let message = format!(
                "group {g:?} member {from} is not a member of group {group:?} here: check \
                 group.name and [[group.member]] on both sides"
            );
            send(
                r.get_mut(),
                &Msg::Error {
                    message: message.clone(),
                },
            )?;
            return Err(io::Error::other(message));
        }
        other => {
            return Err(io::Error::other(format!("expected HELLO, got {other:?}")));
        }
    }
    r.get_ref().sock.set_read_timeout(None)?;
    loop {
        let msg = receive(&mut r)?;
        let answer = member.handle(msg);
        send(r.get_mut(), &answer)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_json_line_each() {
        let m = Msg::Ready {
            point: 5,
            volumes: vec![Marked {
                volume: "db".into(),
                marker: 9,
            }],
        };
        let mut b = Vec::new();
        send(&mut b, &m).unwrap();
        assert_eq!(
            String::from_utf8(b.clone()).unwrap(),
            "{\"op\":\"ready\",\"point\":5,\"volumes\":[{\"volume\":\"db\",\"marker\":9}]}\n"
        );
        assert_eq!(receive(&mut &b[..]).unwrap(), m);
        assert!(receive(&mut &b"{\"op\":\"ready\"}"[..]).is_err());
        assert!(receive(&mut &b"{\"op\":\"nope\"}\n"[..]).is_err());
    }

    fn section() -> GroupSection {
        GroupSection {
            name: "g".into(),
            id: 1,
            tls_ca: Some("ca".into()),
            tls_cert: Some("c".into()),
            tls_key: Some("k".into()),
            member: vec![
                MemberEntry {
                    id: 1,
                    address: "10.0.0.1:20004".into(),
                    name: None,
                },
                MemberEntry {
                    id: 2,
                    address: "10.0.0.2:20004".into(),
                    name: Some("b".into()),
                },
            ],
            ..GroupSection::default()
        }
    }

    #[test]
    fn validation_names_the_key() {
        let vols = ["db".to_string()];
        let c = section().validate(&vols).unwrap();
        assert_eq!(
            (c.timeout_ms, c.interval_ms, c.app_interval_ms),
            (50, 5000, 0)
        );
        assert_eq!(c.listen, "0.0.0.0:20004");
        assert_eq!(c.nice, -10);
        let bad = |f: &dyn Fn(&mut GroupSection), want: &str| {
            let mut s = section();
            f(&mut s);
            let e = s.validate(&vols).unwrap_err();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        };
        bad(&|s| s.id = 3, "group.id = 3");
        bad(&|s| s.member[1].id = 1, "listed twice");
        bad(
            &|s| s.member[1].address = "10.0.0.2".into(),
            "group.member 2 address",
        );
        bad(&|s| s.timeout = Some("0".into()), "group.timeout");
        bad(&|s| s.interval = Some("5 parsecs".into()), "group.interval");
        bad(
            &|s| s.app_interval = Some("-1m".into()),
            "group.app_interval",
        );
        bad(&|s| s.coordinator = Some(7), "group.coordinator = 7");
        bad(
            &|s| s.volumes = Some(vec!["logs".into()]),
            "no volume \"logs\"",
        );
        bad(&|s| s.tls_ca = None, "group.tls_ca is missing");
        bad(&|s| s.listen = Some("x".into()), "group.listen");
        bad(&|s| s.name = "a b".into(), "group.name");
        bad(&|s| s.nice = Some(-21), "group.nice = -21");
    }
}
