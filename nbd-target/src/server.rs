//! The target's replication listener: TLS 1.3 with client certificates, one thread per
//! shipper connection, one connection per volume at a time. A connection that misbehaves is
//! refused or dropped on its own; the others go on.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use redun_shipper::proto::{self, Frame, ProtoError, RefuseCode};
use serde::{Deserialize, Serialize};

mod failback;

use crate::export::Overlay;
use crate::replica::{Refusal, Replica};
use crate::source::{BucketReplicas, Points};
use crate::store::{self, ReplicaState, Store, StoreError};

/// How long a shipper has to complete TLS and say HELLO.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may stay silent (shippers ping every few seconds when idle).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// A consistency group's point as the target lists it: one marker in each member volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPoint {
    pub id: u64,
    /// The earliest of the members' marker times.
    pub unix_ms: u64,
    pub kind: redun_tracker::journal::format::PointKind,
    /// Every member volume's point can be read.
    pub usable: bool,
    pub volumes: Vec<GroupMember>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    pub volume: String,
    /// The volume's point (its marker's sequence number).
    pub point: u64,
}

/// Per-volume figures for the admin socket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetVolumeStatus {
    pub name: String,
    pub size: u64,
    pub generation: u64,
    /// Every record up to this sequence number is durable in the replica (0: none yet).
    pub applied_seq: u64,
    /// A shipper is connected for this volume.
    pub connected: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    pub batches: u64,
    /// Bytes received in batches (compressed) and applied (uncompressed records).
    pub bytes_received: u64,
    pub bytes_applied: u64,
    /// Recovery points that can be read, and the newest of them.
    #[serde(default)]
    pub points: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_point: Option<store::Point>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_failover: Option<crate::export::TestFailover>,
    /// Set once the volume was failed over to this target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_over: Option<Promotion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Unix time of the last applied batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_batch_unix: Option<u64>,
    /// The synchronisation under way: the replica is inconsistent since `since_seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<store::SyncState>,
}

#[derive(Debug, Default)]
struct Slot {
    /// A connection serves this volume.
    busy: AtomicBool,
    status: Mutex<TargetVolumeStatus>,
}

/// The replication service of one target.
#[derive(Debug)]
pub struct Target {
    data_dir: PathBuf,
    /// Shippers are accepted only with it (not when the volumes are in a bucket).
    tls: Option<Arc<rustls::ServerConfig>>,
    /// `--store URL`: the volumes are read from this bucket, not from replica stores in
    /// the data directory (which then holds only overlays and promotions).
    bucket: Option<Arc<BucketReplicas>>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// Replica stores opened so far (by a shipper or an NBD client).
    stores: Mutex<HashMap<String, Arc<Store>>>,
    /// Segments are sealed at this size.
    segment_size: u64,
    /// Test failovers under way, by volume.
    tests: Mutex<HashMap<String, Arc<Overlay>>>,
    /// Volumes failed over to this target: served read-write as NAME.
    promoted: Mutex<HashMap<String, (Promotion, Arc<Overlay>)>>,
}

/// `DATA/NAME.promoted`: a volume failed over to the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    /// The point (sequence number) the promoted volume started from.
    pub point: u64,
    /// The relationship's generation from the failover on.
    pub generation: u64,
    /// `redun failover commit` was run: no other point may be chosen.
    pub committed: bool,
    pub since_unix: u64,
    /// Bytes written to the promoted volume since (not kept across restarts).
    #[serde(default)]
    pub bytes_written: u64,
    /// The failback's last pass is due: writes are refused (`redun failover --planned` on a
    /// volume being reversed).
    #[serde(default)]
    pub failback: bool,
}

/// Which point a failover promotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Everything durable on the target (any prefix of the journal is crash-consistent).
    Latest,
    Point(u64),
}

/// Frees a volume's slot when its connection ends.
struct Claim(Arc<Slot>);

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.status.lock().unwrap().connected = false;
        self.0.busy.store(false, Ordering::SeqCst);
    }
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Target {
    /// A target keeping replica stores in `data_dir`, accepting shippers over `tls`.
    pub fn new(data_dir: PathBuf, tls: Arc<rustls::ServerConfig>) -> Target {
        Target::with_source(data_dir, Some(tls), None)
    }

    /// A target serving the volumes of a bucket; `data_dir` keeps test failover overlays
    /// and failed-over volumes.
    pub fn on_bucket(data_dir: PathBuf, bucket: BucketReplicas) -> Target {
        Target::with_source(data_dir, None, Some(Arc::new(bucket)))
    }

    fn with_source(
        data_dir: PathBuf,
        tls: Option<Arc<rustls::ServerConfig>>,
        bucket: Option<Arc<BucketReplicas>>,
    ) -> Target {
        Target {
            data_dir,
            tls,
            bucket,
            slots: Mutex::new(HashMap::new()),
            stores: Mutex::new(HashMap::new()),
            segment_size: store::SEAL_BYTES,
            tests: Mutex::new(HashMap::new()),
            promoted: Mutex::new(HashMap::new()),
        }
    }

    fn promotion_path(&self, volume: &str) -> PathBuf {
        self.data_dir.join(format!("{volume}.promoted"))
    }

    fn overlay_paths(&self, volume: &str) -> (PathBuf, PathBuf) {
        (
            self.data_dir.join(format!("{volume}.promoted.img")),
            self.data_dir.join(format!("{volume}.promoted.ranges")),
        )
    }

    /// The promoted volume `volume`, if it was failed over to this target.
    pub fn promoted(&self, volume: &str) -> Option<(Promotion, Arc<Overlay>)> {
        self.promoted.lock().unwrap().get(volume).map(|(p, o)| {
            let mut p = p.clone();
            p.bytes_written = o.info(volume).bytes_written;
            (p, o.clone())
        })
    }

    /// Serves again, at start-up, what was failed over before a restart.
    pub fn load_promotion(&self, volume: &str) -> Result<(), String> {
        let path = self.promotion_path(volume);
        if !path.exists() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let p: Promotion = serde_json::from_str(&text)
            .map_err(|e| format!("{} is damaged: {e}", path.display()))?;
        let source = self
            .volume(volume)?
            .ok_or_else(|| format!("{} names no replica", path.display()))?;
        let view = source.image(p.point)?;
        let (img, ranges) = self.overlay_paths(volume);
        let o = Overlay::tracked(view, p.point, img.clone(), ranges, false)
            .map_err(|e| format!("cannot open {}: {e}", img.display()))?;
        if p.failback {
            o.fence()
                .map_err(|e| format!("cannot sync {}: {e}", img.display()))?;
        }
        info!(
            "volume={volume}: failed over at point {} (generation {}), served read-write",
            p.point, p.generation
        );
        self.promoted
            .lock()
            .unwrap()
            .insert(volume.to_string(), (p, Arc::new(o)));
        Ok(())
    }

    /// Fails `volume` over to this target at `choice`: the point becomes the volume, served
    /// read-write as `volume` with its writes tracked, and the relationship moves to the next
    /// generation, so the old primary's shipper is refused. Before `failover_commit`, another
    /// point may be chosen (what was written to the promoted volume is then discarded);
    /// `in_use` tells whether clients are connected to it.
    pub fn failover(
        &self,
        volume: &str,
        choice: Choice,
        in_use: bool,
    ) -> Result<Promotion, String> {
        let store = self
            .volume(volume)?
            .ok_or_else(|| self.no_replica(volume))?;
        let mut promoted = self.promoted.lock().unwrap();
        let before = promoted.get(volume).map(|(p, _)| p.clone());
        if let Some(p) = &before {
            if p.committed {
                return Err(format!(
                    "volume {volume} was failed over at point {} and committed: it is final",
                    p.point
                ));
            }
            if in_use {
                return Err(format!(
                    "volume {volume} is failed over at point {} and clients use it: disconnect \
                     them before choosing another point",
                    p.point
                ));
            }
        }
        let seq = match choice {
            Choice::Latest => match store.latest_image() {
                Err(s) => {
                    return Err(format!(
                        "volume {volume} is being synchronised since seq {}: its latest state \
                         is not a consistent image; choose a point (`redun points {volume}` \
                         lists the usable ones)",
                        s.since_seq
                    ));
                }
                Ok(seq) => seq,
            },
            Choice::Point(id) => match store.points().iter().find(|(p, _)| p.id == id) {
                Some((_, true)) => id,
                Some((_, false)) => {
                    return Err(format!(
                        "point {id} of volume {volume} is not usable: `redun points {volume}` \
                         lists the usable ones"
                    ));
                }
                None => {
                    return Err(format!(
                        "volume {volume} has no point {id}: `redun points {volume}` lists them"
                    ));
                }
            },
        };
        let view = store.image(seq)?;
        let generation = match &before {
            Some(p) => p.generation,
            None => store.generation() + 1,
        };
        // The generation first: from here on the old primary is refused. (A point chosen
        // again keeps the generation of the first choice.)
        if store.generation() < generation {
            store.set_generation(generation)?;
        }
        // What the promoted volume held is discarded from here on: its overlay is started
        // afresh, so the old one must not be served any more.
        promoted.remove(volume);
        let (img, ranges) = self.overlay_paths(volume);
        let o = Overlay::tracked(view, seq, img.clone(), ranges, true)
            .map_err(|e| format!("cannot create {}: {e}", img.display()))?;
        let p = Promotion {
            point: seq,
            generation,
            committed: false,
            since_unix: now_unix(),
            bytes_written: 0,
            failback: false,
        };
        store::write_json(&self.promotion_path(volume), &p).map_err(|e| e.to_string())?;
        promoted.insert(volume.to_string(), (p.clone(), Arc::new(o)));
        info!(
            "volume={volume}: failed over at seq {seq} (generation {generation}), served \
             read-write as {volume}"
        );
        Ok(p)
    }

    /// Makes the failover of `volume` final.
    pub fn failover_commit(&self, volume: &str) -> Result<Promotion, String> {
        let mut promoted = self.promoted.lock().unwrap();
        let (p, _) = promoted
            .get_mut(volume)
            .ok_or_else(|| format!("volume {volume} is not failed over to this target"))?;
        self.update_promotion(volume, p, |n| n.committed = true)?;
        info!("volume={volume}: failover at point {} committed", p.point);
        Ok(p.clone())
    }

    /// Changes `volume`'s promotion `p` with `change`, durably (`NAME.promoted`) first.
    fn update_promotion(
        &self,
        volume: &str,
        p: &mut Promotion,
        change: impl FnOnce(&mut Promotion),
    ) -> Result<(), String> {
        let mut next = p.clone();
        change(&mut next);
        store::write_json(&self.promotion_path(volume), &next).map_err(|e| e.to_string())?;
        *p = next;
        Ok(())
    }

    /// The test failover of `volume`, if one is under way.
    pub fn test_failover(&self, volume: &str) -> Option<Arc<Overlay>> {
        self.tests.lock().unwrap().get(volume).cloned()
    }

    /// Starts a test failover of `volume` at `point` (default: the newest usable point):
    /// export `VOLUME@test`, writable, over an empty overlay. No data is copied.
    pub fn start_test_failover(
        &self,
        volume: &str,
        point: Option<u64>,
    ) -> Result<Arc<Overlay>, String> {
        let store = self
            .volume(volume)?
            .ok_or_else(|| self.no_replica(volume))?;
        let mut tests = self.tests.lock().unwrap();
        if let Some(o) = tests.get(volume) {
            return Err(format!(
                "a test failover of volume {volume} is under way (point {}): run \
                 `redun test-failover cleanup {volume}` first",
                o.info(volume).point
            ));
        }
        let points = store.points();
        let id = match point {
            Some(id) => match points.iter().find(|(p, _)| p.id == id) {
                Some((_, true)) => id,
                Some((_, false)) => {
                    return Err(format!(
                        "point {id} of volume {volume} is not usable (not durable yet, or \
                             merged away): `redun points {volume}` lists the usable ones"
                    ));
                }
                None => {
                    return Err(format!(
                        "volume {volume} has no point {id}: `redun points {volume}` lists \
                             them"
                    ));
                }
            },
            None => points
                .iter()
                .rev()
                .find(|(_, ok)| *ok)
                .map(|(p, _)| p.id)
                .ok_or_else(|| {
                    format!(
                        "volume {volume} has no usable recovery point yet (redun point create \
                         {volume})"
                    )
                })?,
        };
        let view = store.image(id)?;
        let path = self.data_dir.join(format!("{volume}.test.img"));
        let o = Overlay::create(view, id, path.clone())
            .map_err(|e| format!("cannot create the scratch overlay {}: {e}", path.display()))?;
        let o = Arc::new(o);
        tests.insert(volume.to_string(), o.clone());
        info!("volume={volume}: test failover of point {id} exported as {volume}@test");
        Ok(o)
    }

    /// Ends the test failover of `volume`: its export goes and its overlay is deleted.
    pub fn end_test_failover(&self, volume: &str) -> Result<Arc<Overlay>, String> {
        let o = self
            .tests
            .lock()
            .unwrap()
            .remove(volume)
            .ok_or_else(|| format!("no test failover of volume {volume} is under way"))?;
        if let Err(e) = std::fs::remove_file(o.path()) {
            warn!("file={}: cannot delete: {e}", o.path().display());
        }
        info!("volume={volume}: test failover cleaned up");
        Ok(o)
    }

    /// Seals the stores' segments at `bytes` instead of [`store::SEAL_BYTES`].
    pub fn with_segment_size(mut self, bytes: u64) -> Target {
        self.segment_size = bytes;
        self
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// The points of volume `name`, from its replica store or the bucket; `None` when the
    /// target holds no such volume.
    pub fn volume(&self, name: &str) -> Result<Option<Arc<dyn Points>>, String> {
        match &self.bucket {
            Some(b) => Ok(b.volume(name)?.map(|v| v as Arc<dyn Points>)),
            None => Ok(self
                .store(name)
                .map_err(|e| e.to_string())?
                .map(|s| s as Arc<dyn Points>)),
        }
    }

    /// The bucket the volumes are read from, if any (`--store`).
    pub fn bucket(&self) -> Option<&Arc<BucketReplicas>> {
        self.bucket.as_ref()
    }

    fn no_replica(&self, volume: &str) -> String {
        match &self.bucket {
            Some(b) => format!(
                "{} holds no volume {volume} (`redun points --store {} {volume}` lists what \
                 is there)",
                b.url(),
                b.url()
            ),
            None => format!("this target holds no replica of volume {volume}"),
        }
    }

    /// The store of volume `name`, opened on first use; `None` when the target holds no
    /// replica of that name.
    pub fn store(&self, name: &str) -> Result<Option<Arc<Store>>, StoreError> {
        let mut stores = self.stores.lock().unwrap();
        if let Some(s) = stores.get(name) {
            return Ok(Some(s.clone()));
        }
        if !store::state_path(&self.data_dir, name).exists() {
            return Ok(None);
        }
        let s = Arc::new(Store::open(&self.data_dir, name)?.with_seal_bytes(self.segment_size));
        stores.insert(name.to_string(), s.clone());
        Ok(Some(s))
    }

    /// The store for a shipper's volume, created on its first contact.
    fn store_for(&self, hello: &proto::Hello) -> Result<Arc<Store>, Refusal> {
        if let Some(s) = self.store(&hello.name)? {
            return Ok(s);
        }
        let mut stores = self.stores.lock().unwrap();
        if let Some(s) = stores.get(&hello.name) {
            return Ok(s.clone());
        }
        let s = Arc::new(
            Store::create(&self.data_dir, &Replica::identity(hello))?
                .with_seal_bytes(self.segment_size),
        );
        stores.insert(hello.name.clone(), s.clone());
        Ok(s)
    }

    /// The points of consistency group `group` that every member volume has committed,
    /// oldest first (docs/PROTOCOL.md, "Consistency groups"): a point whose decision names a
    /// volume that lacks it here (not shipped yet, or aborted there) is not listed.
    pub fn group_points(&self, group: &str) -> Vec<GroupPoint> {
        // Each group point with the volumes its (first seen) decision names.
        let mut found: std::collections::BTreeMap<u64, (GroupPoint, Vec<String>)> =
            Default::default();
        // Every replica is opened at start and when a shipper first connects.
        let stores: Vec<(String, Arc<Store>)> = self
            .stores
            .lock()
            .unwrap()
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        for (name, store) in stores {
            for (p, want, usable) in store.group_points(group) {
                let (gp, _) = found.entry(p.group).or_insert_with(|| {
                    let gp = GroupPoint {
                        id: p.group,
                        unix_ms: p.unix_ms,
                        kind: p.kind,
                        usable: true,
                        volumes: Vec::new(),
                    };
                    (gp, want)
                });
                gp.unix_ms = gp.unix_ms.min(p.unix_ms);
                gp.usable &= usable;
                gp.volumes.push(GroupMember {
                    volume: name.clone(),
                    point: p.id,
                });
            }
        }
        found
            .into_values()
            .filter(|(gp, want)| {
                !want.is_empty()
                    && want
                        .iter()
                        .all(|w| gp.volumes.iter().any(|m| m.volume == *w))
            })
            .map(|(mut gp, _)| {
                gp.volumes.sort_by(|a, b| a.volume.cmp(&b.volume));
                gp
            })
            .collect()
    }

    /// Every store opened so far.
    pub fn open_stores(&self) -> Vec<Arc<Store>> {
        self.stores.lock().unwrap().values().cloned().collect()
    }

    /// The volume's slot for one connection, or Busy while another holds it.
    fn claim(&self, name: &str) -> Result<Claim, Refusal> {
        let slot = self.slot(name);
        if slot.busy.swap(true, Ordering::SeqCst) {
            return Err(Refusal::new(
                RefuseCode::Busy,
                format!("another shipper is connected for volume {name}"),
            ));
        }
        Ok(Claim(slot))
    }

    fn slot(&self, name: &str) -> Arc<Slot> {
        self.slots
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Every replica in the data directory, with live figures where a shipper connected.
    pub fn status(&self) -> Vec<TargetVolumeStatus> {
        let mut out: HashMap<String, TargetVolumeStatus> = HashMap::new();
        if let Ok(dir) = std::fs::read_dir(&self.data_dir) {
            for e in dir.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "state") {
                    let st = std::fs::read_to_string(&p)
                        .ok()
                        .and_then(|t| serde_json::from_str::<ReplicaState>(&t).ok());
                    if let Some(st) = st {
                        out.insert(
                            st.name.clone(),
                            TargetVolumeStatus {
                                name: st.name,
                                size: st.size,
                                generation: st.generation,
                                applied_seq: st.next_seq.saturating_sub(1),
                                sync: st.sync,
                                ..Default::default()
                            },
                        );
                    }
                }
            }
        }
        for (name, slot) in self.slots.lock().unwrap().iter() {
            let live = slot.status.lock().unwrap().clone();
            let e = out.entry(name.clone()).or_default();
            let on_disk = std::mem::take(e);
            *e = TargetVolumeStatus {
                size: if live.size > 0 {
                    live.size
                } else {
                    on_disk.size
                },
                generation: live.generation.max(on_disk.generation),
                applied_seq: live.applied_seq.max(on_disk.applied_seq),
                sync: on_disk.sync,
                ..live
            };
        }
        if let Some(b) = &self.bucket {
            self.bucket_status(b, &mut out);
        }
        let mut v: Vec<_> = out.into_values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        for st in &mut v {
            let source: Option<Arc<dyn Points>> = match &self.bucket {
                Some(b) => b.volume(&st.name).ok().flatten().map(|v| v as _),
                None => self
                    .stores
                    .lock()
                    .unwrap()
                    .get(&st.name)
                    .map(|s| s.clone() as _),
            };
            if let Some(source) = source {
                let points = source.points();
                st.points = points.iter().filter(|(_, ok)| *ok).count() as u64;
                st.latest_point = points.iter().rev().find(|(_, ok)| *ok).map(|(p, _)| *p);
            }
            st.test_failover = self.test_failover(&st.name).map(|o| o.info(&st.name));
            st.failed_over = self.promoted(&st.name).map(|(p, _)| p);
        }
        v
    }

    /// The volumes of the bucket, each with its size, generation, latest sequence number
    /// and synchronisation, or the reason it cannot be read.
    fn bucket_status(&self, b: &BucketReplicas, out: &mut HashMap<String, TargetVolumeStatus>) {
        let names = match b.names() {
            Ok(n) => n,
            Err(e) => {
                warn!("bucket={}: cannot list the volumes: {e}", b.url());
                return;
            }
        };
        for name in names {
            let mut st = TargetVolumeStatus {
                name: name.clone(),
                ..Default::default()
            };
            match b.volume(&name) {
                Ok(Some(v)) => {
                    let r = v.current();
                    let m = r.manifest();
                    st.size = m.store.size;
                    st.generation = m.store.generation;
                    st.applied_seq = m.latest();
                    st.sync = m.sync;
                }
                Ok(None) => continue,
                Err(e) => st.last_error = Some(e),
            }
            out.insert(name, st);
        }
    }

    /// Accepts shippers until `stop`.
    pub fn serve(self: &Arc<Self>, listener: TcpListener, stop: &AtomicBool) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        while !stop.load(Ordering::SeqCst) {
            let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(200u16)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => {
                    warn!("replication listener: poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            let (tcp, peer) = match listener.accept() {
                Ok(c) => c,
                Err(e) => {
                    warn!("replication listener: accept failed: {e}");
                    continue;
                }
            };
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("repl-conn".into())
                .spawn(move || me.connection(tcp, peer));
            if let Err(e) = spawned {
                warn!("peer={peer}: replication: cannot start a thread: {e}");
            }
        }
    }

    fn connection(&self, tcp: TcpStream, peer: SocketAddr) {
        let Some(tls) = self.tls.clone() else {
            warn!("peer={peer}: refused: this target reads its volumes from a bucket");
            return;
        };
        let _ = tcp.set_nodelay(true);
        let _ = tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
        let _ = tcp.set_write_timeout(Some(IDLE_TIMEOUT));
        let conn = match rustls::ServerConnection::new(tls) {
            Ok(c) => c,
            Err(e) => {
                warn!("peer={peer}: replication: TLS set-up failed: {e}");
                return;
            }
        };
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                warn!(
                    "peer={peer}: replication: refused: TLS handshake failed: {e} (a shipper needs a \
                     certificate signed by this target's CA)"
                );
                return;
            }
        }
        let who = tls
            .conn
            .peer_certificates()
            .map_or(0, <[rustls_pki_types::CertificateDer<'_>]>::len);
        debug!("replication: {peer} authenticated ({who} certificates)");
        let (hello, reverse) = match proto::read_frame(&mut tls) {
            Ok(Frame::Hello(h)) => (h, false),
            Ok(Frame::Reverse(h)) => (h, true),
            Ok(f) => {
                let r = Refusal::new(
                    RefuseCode::Protocol,
                    format!("expected HELLO, got {}", frame_name(&f)),
                );
                refuse(&mut tls, peer, &r);
                return;
            }
            Err(e) => {
                warn!("peer={peer}: replication: no HELLO: {e}");
                return;
            }
        };
        if hello.version != proto::VERSION {
            let r = Refusal::new(
                RefuseCode::Version,
                format!(
                    "protocol version {} is not supported (this target speaks {})",
                    hello.version,
                    proto::VERSION
                ),
            );
            refuse(&mut tls, peer, &r);
            return;
        }
        if let Err(r) = crate::replica::check_name(&hello.name) {
            refuse(&mut tls, peer, &r);
            return;
        }
        if reverse {
            let _ = tls.sock.set_read_timeout(Some(IDLE_TIMEOUT));
            if let Err(r) = self.reverse(&mut tls, peer, &hello) {
                refuse(&mut tls, peer, &r);
            }
            return;
        }
        if let Some(r) = self.refusal_if_promoted(&hello.name) {
            refuse(&mut tls, peer, &r);
            return;
        }
        let claim = match self.claim(&hello.name) {
            Ok(c) => c,
            Err(r) => {
                refuse(&mut tls, peer, &r);
                return;
            }
        };
        let mut replica = match self
            .store_for(&hello)
            .and_then(|s| Replica::attach(s, &hello))
        {
            Ok(r) => r,
            Err(r) => {
                claim.0.status.lock().unwrap().last_error = Some(r.message.clone());
                refuse(&mut tls, peer, &r);
                return;
            }
        };
        let st = replica.state().clone();
        {
            let mut s = claim.0.status.lock().unwrap();
            s.name = st.name.clone();
            s.size = st.size;
            s.generation = st.generation;
            s.applied_seq = st.next_seq.saturating_sub(1);
            s.connected = true;
            s.peer = Some(peer.to_string());
        }
        info!(
            "peer={peer} volume={} generation={} replica_seq={}: replication: shipping begins",
            st.name, st.generation, st.next_seq
        );
        let welcome = Frame::Welcome {
            next_seq: st.next_seq,
            generation: st.generation,
            sync_job: st.sync.map_or(0, |s| s.job),
            sync_cursor: st.sync.map_or(0, |s| s.cursor),
        };
        if let Err(e) = proto::write_frame(&mut tls, &welcome) {
            warn!("volume={} peer={peer}: replication: {e}", st.name);
            return;
        }
        let _ = tls.sock.set_read_timeout(Some(IDLE_TIMEOUT));
        if let Err(e) = self.stream(&mut tls, &mut replica, &claim.0) {
            match e {
                StreamEnd::Closed => {
                    info!("volume={} peer={peer}: replication: disconnected", st.name)
                }
                StreamEnd::Io(e) => warn!("volume={} peer={peer}: replication: {e}", st.name),
                StreamEnd::Refused(r) => {
                    warn!(
                        "volume={} peer={peer}: replication: refusing: {}",
                        st.name, r.message
                    );
                    claim.0.status.lock().unwrap().last_error = Some(r.message.clone());
                    refuse(&mut tls, peer, &r);
                }
            }
        }
    }

    /// Applies batches until the shipper leaves or something is refused. Batches that arrive
    /// back to back are committed together (one image sync, one state update), up to
    /// [`GROUP_BYTES`]; the ACK then covers them all. A group of less than [`SMALL_GROUP`]
    /// waits until [`COMMIT_GAP`] has passed since the previous commit for more batches to
    /// join it, so that a trickle of small batches costs a few commits a second, not one per
    /// batch (each is several syncs of a disk that may be shared with the protected
    /// application). A hash request is answered as of every record before it, committed or
    /// not, and does not end a group.
    fn stream(&self, tls: &mut Tls, replica: &mut Replica, slot: &Slot) -> Result<(), StreamEnd> {
        let mut decoder = proto::BatchDecoder::new().map_err(StreamEnd::Io)?;
        // Batches were received since the last ACK.
        let mut ack_owed = false;
        let mut last_commit: Option<Instant> = None;
        loop {
            match proto::read_frame(tls) {
                Ok(Frame::Batch(batch)) => {
                    let records = decoder.decode(&batch).map_err(|e| {
                        StreamEnd::Refused(Refusal::new(RefuseCode::Protocol, e.to_string()))
                    })?;
                    if let Some(r) = self.refusal_if_promoted(&replica.state().name) {
                        return Err(StreamEnd::Refused(r));
                    }
                    replica.apply(&records).map_err(StreamEnd::Refused)?;
                    let mut s = slot.status.lock().unwrap();
                    s.batches += 1;
                    s.bytes_received += batch.compressed.len() as u64;
                    s.bytes_applied += u64::from(batch.raw_len);
                    s.last_batch_unix = Some(now_unix());
                    ack_owed = true;
                }
                Ok(Frame::Ping) => {
                    // An idle stale primary is let go too (a failback needs the volume).
                    if let Some(r) = self.refusal_if_promoted(&replica.state().name) {
                        return Err(StreamEnd::Refused(r));
                    }
                    ack_owed = true;
                }
                Ok(Frame::HashRequest {
                    job,
                    offset,
                    length,
                    block,
                }) => {
                    let (as_of, hashes) = replica
                        .hashes(offset, length, block)
                        .map_err(StreamEnd::Refused)?;
                    let answer = Frame::Hashes {
                        job,
                        offset,
                        block,
                        as_of,
                        hashes,
                    };
                    proto::write_frame(tls, &answer).map_err(StreamEnd::Io)?;
                }
                Ok(f) => {
                    return Err(StreamEnd::Refused(Refusal::new(
                        RefuseCode::Protocol,
                        format!("expected a batch, got {}", frame_name(&f)),
                    )));
                }
                Err(e) => return Err(e.into()),
            }
            if !ack_owed {
                continue;
            }
            let group = replica.uncommitted();
            if group < GROUP_BYTES {
                let wait = match last_commit {
                    Some(t) if group > 0 && group < SMALL_GROUP => {
                        COMMIT_GAP.saturating_sub(t.elapsed())
                    }
                    _ => Duration::ZERO,
                };
                if input_within(tls, wait) {
                    continue;
                }
            }
            let through = replica.commit().map_err(StreamEnd::Refused)?;
            if group > 0 {
                last_commit = Some(Instant::now());
            }
            {
                let mut s = slot.status.lock().unwrap();
                s.applied_seq = through;
                s.last_error = None;
            }
            proto::write_frame(tls, &Frame::Ack { through }).map_err(StreamEnd::Io)?;
            ack_owed = false;
        }
    }
}

impl Target {
    /// A shipper of a volume failed over to this target is a stale primary.
    fn refusal_if_promoted(&self, volume: &str) -> Option<Refusal> {
        let p = self.promoted(volume)?.0;
        Some(Refusal::new(
            RefuseCode::GenerationMismatch,
            format!(
                "volume {volume} was failed over to the target at point {} (generation {}): \
                 this source is no longer the primary and may not write to the replica",
                p.point, p.generation
            ),
        ))
    }
}

pub(crate) type Tls = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

/// Applied bytes after which a commit is due even while batches keep coming.
const GROUP_BYTES: u64 = 64 << 20;

/// A group of fewer applied bytes than this waits for [`COMMIT_GAP`] (a full batch of the
/// shipper's default size is committed at once).
const SMALL_GROUP: u64 = 1 << 20;

/// How long after a commit a small group waits for more batches: at most this much is added
/// to the RPO, and a trickle costs at most 1 s / COMMIT_GAP commits a second.
const COMMIT_GAP: Duration = Duration::from_millis(50);

/// True when another frame has (begun to) arrive within `wait`: decrypted bytes wait in
/// rustls, or the socket becomes readable.
fn input_within(tls: &mut Tls, wait: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    if tls
        .conn
        .process_new_packets()
        .is_ok_and(|st| st.plaintext_bytes_to_read() > 0)
    {
        return true;
    }
    let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(tls.sock.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
}

/// Why a connection's stream (replication or failback) ended.
pub(super) enum StreamEnd {
    Closed,
    Io(io::Error),
    Refused(Refusal),
}

/// A frame that could not be read: the peer left, the socket failed, or it broke the
/// protocol.
impl From<ProtoError> for StreamEnd {
    fn from(e: ProtoError) -> StreamEnd {
        match e {
            ProtoError::Closed => StreamEnd::Closed,
            ProtoError::Io(e) => StreamEnd::Io(e),
            e => StreamEnd::Refused(Refusal::new(RefuseCode::Protocol, e.to_string())),
        }
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "HELLO",
        Frame::Welcome { .. } => "WELCOME",
        Frame::Refuse { .. } => "REFUSE",
        Frame::Batch(_) => "BATCH",
        Frame::Ack { .. } => "ACK",
        Frame::Ping => "PING",
        Frame::HashRequest { .. } => "HASH_REQUEST",
        Frame::Hashes { .. } => "HASHES",
        Frame::Reverse(_) => "REVERSE",
        Frame::Pass => "PASS",
        Frame::Ranges { .. } => "RANGES",
        Frame::Blocks { .. } => "BLOCKS",
        Frame::Done { .. } => "DONE",
    }
}

/// Sends a refusal and closes gracefully: what the shipper already sent is read and dropped
/// for a moment, so that closing does not reset the connection and destroy the refusal
/// before the shipper reads it.
fn refuse(tls: &mut Tls, peer: SocketAddr, r: &Refusal) {
    use std::io::Read;
    warn!("peer={peer}: replication: refused: {}", r.message);
    let _ = proto::write_frame(
        tls,
        &Frame::Refuse {
            code: r.code,
            message: r.message.clone(),
        },
    );
    tls.conn.send_close_notify();
    let _ = tls.conn.complete_io(&mut tls.sock);
    let _ = tls.sock.shutdown(std::net::Shutdown::Write);
    let _ = tls.sock.set_read_timeout(Some(Duration::from_millis(200)));
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut sink = [0u8; 64 * 1024];
    while std::time::Instant::now() < deadline {
        match tls.sock.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}
