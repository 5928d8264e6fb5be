//! Replies held for a consistency group's point (docs/PROTOCOL.md, "Consistency groups").
//!
//! From the moment a volume's group marker is appended (under the volume's lock) until the
//! group decides, every reply of that volume's connections that completes waits here. A
//! write recorded after the marker is therefore never acknowledged before every member has
//! placed its marker, and neither is a read that could return its data. Replies of requests
//! that were recorded before the marker may wait too: they are only late, by at most the
//! group's timeout.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::nbd::{CompletionSink, Token};

#[derive(Default)]
pub struct Gate {
    /// Mirrors `!inner.holds.is_empty()` for the fast path. Set under the volume's lock
    /// before a write after the marker can be recorded, so a completion of such a write
    /// always sees it.
    holding: AtomicBool,
    inner: Mutex<Inner>,
    /// What holding cost: replies held, their waits added up, the longest wait (µs).
    replies_held: AtomicU64,
    waited_us: AtomicU64,
    longest_us: AtomicU64,
}

/// What a gate's holds have cost its replies so far (`redun status`, metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldCost {
    /// Replies that waited at the gate.
    pub replies: u64,
    /// Their waits added up, and the longest, in microseconds.
    pub waited_us: u64,
    pub longest_us: u64,
}

/// A reply waiting for the gate to open since `at`.
struct Waiting {
    sink: Arc<dyn CompletionSink>,
    token: Token,
    result: io::Result<Vec<u8>>,
    at: Instant,
}

#[derive(Default)]
struct Inner {
    /// The group points whose decision is awaited.
    holds: Vec<u64>,
    waiting: Vec<Waiting>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("Gate")
            .field("holds", &g.holds)
            .field("waiting", &g.waiting.len())
            .finish()
    }
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the gate until [`Gate::release`] of `point`.
    pub fn hold(&self, point: u64) {
        let mut g = self.lock();
        if !g.holds.contains(&point) {
            g.holds.push(point);
        }
        self.holding.store(true, Ordering::SeqCst);
    }

    /// Ends the hold of `point`; when no hold is left, sends every held reply and flushes
    /// each connection once. Returns how many were sent.
    pub fn release(&self, point: u64) -> usize {
        let held = {
            let mut g = self.lock();
            g.holds.retain(|&p| p != point);
            if !g.holds.is_empty() {
                return 0;
            }
            self.holding.store(false, Ordering::SeqCst);
            std::mem::take(&mut g.waiting)
        };
        let mut sinks: Vec<Arc<dyn CompletionSink>> = Vec::new();
        let n = held.len();
        let now = Instant::now();
        let (mut waited, mut longest) = (0u64, 0u64);
        for h in held {
            let us = u64::try_from(now.duration_since(h.at).as_micros()).unwrap_or(u64::MAX);
            waited = waited.saturating_add(us);
            longest = longest.max(us);
            h.sink.complete(h.token, h.result);
            if !sinks.iter().any(|s| Arc::ptr_eq(s, &h.sink)) {
                sinks.push(h.sink);
            }
        }
        for s in sinks {
            s.flush();
        }
        self.replies_held.fetch_add(n as u64, Ordering::Relaxed);
        self.waited_us.fetch_add(waited, Ordering::Relaxed);
        self.longest_us.fetch_max(longest, Ordering::Relaxed);
        n
    }

    /// What holding has cost this gate's replies so far.
    pub fn cost(&self) -> HoldCost {
        HoldCost {
            replies: self.replies_held.load(Ordering::Relaxed),
            waited_us: self.waited_us.load(Ordering::Relaxed),
            longest_us: self.longest_us.load(Ordering::Relaxed),
        }
    }

    /// Sends a reply through `sink` now, or keeps it until the gate opens.
    fn pass(&self, sink: &Arc<dyn CompletionSink>, token: Token, result: io::Result<Vec<u8>>) {
        if self.holding.load(Ordering::SeqCst) {
            let mut g = self.lock();
            if !g.holds.is_empty() {
                g.waiting.push(Waiting {
                    sink: sink.clone(),
                    token,
                    result,
                    at: Instant::now(),
                });
                return;
            }
        }
        sink.complete(token, result);
    }
}

/// Wraps a connection's completion sink so that its replies pass through `gate`.
pub struct GateSink {
    pub inner: Arc<dyn CompletionSink>,
    pub gate: Arc<Gate>,
}

impl std::fmt::Debug for GateSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateSink").finish_non_exhaustive()
    }
}

impl CompletionSink for GateSink {
    fn complete(&self, token: Token, result: io::Result<Vec<u8>>) {
        self.gate.pass(&self.inner, token, result);
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts replies sent and flushes.
    #[derive(Default)]
    struct Count {
        sent: AtomicUsize,
        flushes: AtomicUsize,
    }

    impl CompletionSink for Count {
        fn complete(&self, _token: Token, _result: io::Result<Vec<u8>>) {
            self.sent.fetch_add(1, Ordering::SeqCst);
        }
        fn flush(&self) {
            self.flushes.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn replies_wait_for_every_hold() {
        let gate = Gate::default();
        let count = Arc::new(Count::default());
        let sink: Arc<dyn CompletionSink> = count.clone();
        let sent = || count.sent.load(Ordering::SeqCst);
        let token = Token {
            started: std::time::Instant::now(),
            cookie: 1,
            command: 1,
            flags: 0,
            offset: 0,
            length: 4096,
        };
        let reply = || gate.pass(&sink, token, Ok(Vec::new()));
        reply();
        assert_eq!(sent(), 1);
        gate.hold(1);
        gate.hold(2);
        reply();
        reply();
        assert_eq!(gate.release(1), 0);
        assert_eq!(sent(), 1);
        assert_eq!(gate.cost().replies, 0);
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(gate.release(2), 2);
        assert_eq!(sent(), 3);
        let held = gate.cost();
        assert_eq!(held.replies, 2);
        assert!(held.longest_us >= 2000, "{held:?}");
        assert!(held.waited_us >= 2 * held.longest_us.min(2000), "{held:?}");
        // Two replies of one connection, one flush.
        assert_eq!(count.flushes.load(Ordering::SeqCst), 1);
        // Releasing a point that holds nothing is harmless.
        assert_eq!(gate.release(2), 0);
        reply();
        assert_eq!(sent(), 4);
        assert_eq!(gate.cost().replies, 2);
    }
}
