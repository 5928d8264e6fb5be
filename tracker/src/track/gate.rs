//! Replies held for a consistency group's point (docs/PROTOCOL.md, "Consistency groups").
//!
//! From the moment a volume's group marker is appended (under the volume's lock) until the
//! group decides, every reply of that volume's connections that completes waits here. A
//! write recorded after the marker is therefore never acknowledged before every member has
//! placed its marker, and neither is a read that could return its data. Replies of requests
//! that were recorded before the marker may wait too: they are only late, by at most the
//! group's timeout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A reply waiting for the gate to open.
pub type HeldReply = Box<dyn FnOnce() + Send>;

#[derive(Default)]
pub struct Gate {
    /// Mirrors `!inner.holds.is_empty()` for the fast path. Set under the volume's lock
    /// before a write after the marker can be recorded, so a completion of such a write
    /// always sees it.
    holding: AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The group points whose decision is awaited.
    holds: Vec<u64>,
    held: Vec<HeldReply>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("Gate")
            .field("holds", &g.holds)
            .field("held", &g.held.len())
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

    /// Ends the hold of `point`; when no hold is left, sends every held reply. Returns how
    /// many were sent.
    pub fn release(&self, point: u64) -> usize {
        let held = {
            let mut g = self.lock();
            g.holds.retain(|&p| p != point);
            if !g.holds.is_empty() {
                return 0;
            }
            self.holding.store(false, Ordering::SeqCst);
            std::mem::take(&mut g.held)
        };
        let n = held.len();
        for reply in held {
            reply();
        }
        n
    }

    /// Sends `reply` now, or keeps it until the gate opens.
    pub fn pass(&self, reply: HeldReply) {
        if self.holding.load(Ordering::SeqCst) {
            let mut g = self.lock();
            if !g.holds.is_empty() {
                g.held.push(reply);
                return;
            }
        }
        reply();
    }

    /// The group points being held for.
    pub fn holds(&self) -> Vec<u64> {
        self.lock().holds.clone()
    }
}

/// Wraps a connection's completion sink so that its replies pass through `gate`.
pub struct GateSink {
    pub inner: Arc<dyn crate::nbd::CompletionSink>,
    pub gate: Arc<Gate>,
}

impl std::fmt::Debug for GateSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateSink").finish_non_exhaustive()
    }
}

impl crate::nbd::CompletionSink for GateSink {
    fn complete(&self, token: crate::nbd::Token, result: std::io::Result<Vec<u8>>) {
        if !self.gate.holding.load(Ordering::SeqCst) {
            self.inner.complete(token, result);
            return;
        }
        let inner = self.inner.clone();
        self.gate.pass(Box::new(move || {
            inner.complete(token, result);
            inner.flush();
        }));
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn replies_wait_for_every_hold() {
        let gate = Gate::default();
        let sent = Arc::new(AtomicUsize::new(0));
        let reply = || {
            let s = sent.clone();
            Box::new(move || {
                s.fetch_add(1, Ordering::SeqCst);
            }) as HeldReply
        };
        gate.pass(reply());
        assert_eq!(sent.load(Ordering::SeqCst), 1);
        gate.hold(1);
        gate.hold(2);
        gate.pass(reply());
        gate.pass(reply());
        assert_eq!(gate.release(1), 0);
        assert_eq!(sent.load(Ordering::SeqCst), 1);
        assert_eq!(gate.release(2), 2);
        assert_eq!(sent.load(Ordering::SeqCst), 3);
        // Releasing a point that holds nothing is harmless.
        assert_eq!(gate.release(2), 0);
        gate.pass(reply());
        assert_eq!(sent.load(Ordering::SeqCst), 4);
    }
}
