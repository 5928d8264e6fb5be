//! What the tracker has written, as the shipper sees it through the tracker's admin socket:
//! each volume's head sequence number sampled every [`INTERVAL`], so that the RPO (the age of
//! the oldest write not yet durable on the target) and the lag can be told even while the
//! target is unreachable and nothing is being read or sent.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redun_tracker::admin::{self, AdminRequest};

/// How often the tracker is asked.
pub const INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
struct Volume {
    /// (when first seen, head seq), oldest first; heads strictly increase.
    samples: VecDeque<(Instant, u64)>,
    /// Unreleased journal bytes at the last sample.
    used_bytes: u64,
    /// Bytes in dirty regions at the last sample (a synchronisation is due).
    dirty_bytes: u64,
}

/// Head samples of every volume of one tracker.
#[derive(Debug)]
pub struct Heads {
    socket: PathBuf,
    volumes: Mutex<HashMap<String, Volume>>,
    /// The last query got an answer.
    reachable: AtomicBool,
}

/// What the samples say about a volume whose records up to `acked` are durable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Behind {
    /// Since when the oldest record beyond `acked` exists (at most one interval late).
    pub since: Instant,
    /// Unreleased journal bytes: an upper bound of the lag.
    pub used_bytes: u64,
}

impl Heads {
    pub fn new(socket: PathBuf) -> Heads {
        Heads {
            socket,
            volumes: Mutex::new(HashMap::new()),
            reachable: AtomicBool::new(false),
        }
    }

    /// Asks the tracker once and records new heads.
    pub fn sample(&self) {
        let st = match admin::request(&self.socket, &AdminRequest::Status) {
            Ok(r) => r.status,
            Err(_) => None,
        };
        let Some(st) = st else {
            self.reachable.store(false, Ordering::Relaxed);
            return;
        };
        self.reachable.store(true, Ordering::Relaxed);
        let now = Instant::now();
        let mut vols = self.volumes.lock().unwrap();
        for v in st.volumes {
            let Some(j) = v.journal else { continue };
            let e = vols.entry(v.name).or_default();
            e.used_bytes = j.used_bytes;
            e.dirty_bytes = v.dirty_bytes;
            if e.samples.back().is_none_or(|&(_, h)| j.head_seq > h) {
                e.samples.push_back((now, j.head_seq));
            } else if e.samples.back().is_some_and(|&(_, h)| j.head_seq < h) {
                // A new journal: start over.
                e.samples.clear();
                e.samples.push_back((now, j.head_seq));
            }
        }
    }

    /// The tracker's admin socket.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Bytes in the volume's dirty regions at the last sample (`None`: not known).
    pub fn dirty(&self, name: &str) -> Option<u64> {
        if !self.reachable.load(Ordering::Relaxed) {
            return None;
        }
        self.volumes
            .lock()
            .unwrap()
            .get(name)
            .map(|v| v.dirty_bytes)
    }

    /// Samples until `stop`.
    pub fn run(&self, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) {
            self.sample();
            std::thread::sleep(INTERVAL);
        }
    }

    /// `None` when the tracker is not reachable (nothing is known); `Some(None)` when every
    /// record the tracker wrote is durable (`acked` reached its head); else since when the
    /// volume is behind.
    pub fn behind(&self, name: &str, acked: u64) -> Option<Option<Behind>> {
        if !self.reachable.load(Ordering::Relaxed) {
            return None;
        }
        let mut vols = self.volumes.lock().unwrap();
        let v = vols.get_mut(name)?;
        // Samples at or below `acked` say nothing more, but the newest one is kept.
        while v.samples.len() > 1 && v.samples[0].1 <= acked {
            v.samples.pop_front();
        }
        Some(
            v.samples
                .iter()
                .find(|&&(_, h)| h > acked)
                .map(|&(t, _)| Behind {
                    since: t,
                    used_bytes: v.used_bytes,
                }),
        )
    }
}
