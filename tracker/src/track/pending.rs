//! The changes a volume acknowledged that are not yet applied to its backing device
//! (docs/FORMAT.md, "The write-ahead rule"). A change is journaled, put here and acknowledged;
//! the volume's flusher syncs the journal, applies the changes in sequence order and only then
//! takes them out. Until then a read that overlaps one is answered from here.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// What a change does to its range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// These bytes (as many as the range).
    Data(Vec<u8>),
    /// Zeroes, written (`trim == false`) or by punching a hole (`trim`, or `may_trim`).
    Zero { trim: bool, may_trim: bool },
}

/// One acknowledged change.
#[derive(Debug, PartialEq, Eq)]
pub struct Change {
    /// Its journal record's sequence number.
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
    pub content: Content,
}

impl Change {
    /// Copies what this change makes of `[at, at + buf.len())` into `buf` where they overlap.
    pub fn overlay(&self, at: u64, buf: &mut [u8]) {
        let end = at + buf.len() as u64;
        let (lo, hi) = (self.offset.max(at), (self.offset + self.len).min(end));
        if lo >= hi {
            return;
        }
        let dst = &mut buf[usize_of(lo - at)..usize_of(hi - at)];
        match &self.content {
            Content::Data(d) => {
                dst.copy_from_slice(&d[usize_of(lo - self.offset)..usize_of(hi - self.offset)]);
            }
            Content::Zero { .. } => dst.fill(0),
        }
    }
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).expect("inside a request buffer")
}

/// The unapplied changes of a volume, in sequence order and by offset.
#[derive(Debug, Default)]
pub struct Pending {
    /// In sequence order (appended in that order).
    order: VecDeque<Arc<Change>>,
    /// By start offset, then sequence number.
    by_start: BTreeMap<(u64, u64), Arc<Change>>,
    /// Longest change held since the map was last empty: a change overlapping `[a, b)`
    /// starts after `a - longest`.
    longest: u64,
    /// Data bytes held.
    bytes: u64,
}

impl Pending {
    /// Adds a change; its sequence number is higher than any held.
    pub fn push(&mut self, c: Change) {
        debug_assert!(self.order.back().is_none_or(|b| b.seq < c.seq));
        if let Content::Data(d) = &c.content {
            self.bytes += d.len() as u64;
        }
        self.longest = self.longest.max(c.len);
        let c = Arc::new(c);
        self.by_start.insert((c.offset, c.seq), c.clone());
        self.order.push_back(c);
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The oldest change's sequence number.
    pub fn first_seq(&self) -> Option<u64> {
        self.order.front().map(|c| c.seq)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Data bytes held in memory.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The changes up to sequence number `seq`, oldest first (they stay held).
    pub fn up_to(&self, seq: u64) -> Vec<Arc<Change>> {
        self.order
            .iter()
            .take_while(|c| c.seq <= seq)
            .cloned()
            .collect()
    }

    /// Takes out the changes up to `seq`: they are applied.
    pub fn applied(&mut self, seq: u64) {
        while let Some(c) = self.order.front().filter(|c| c.seq <= seq) {
            self.by_start.remove(&(c.offset, c.seq));
            if let Content::Data(d) = &c.content {
                self.bytes -= d.len() as u64;
            }
            self.order.pop_front();
        }
        if self.order.is_empty() {
            self.longest = 0;
        }
    }

    /// The held changes that overlap `[offset, offset + len)`, oldest first.
    pub fn overlapping(&self, offset: u64, len: u64) -> Vec<Arc<Change>> {
        if self.order.is_empty() || len == 0 {
            return Vec::new();
        }
        let end = offset + len;
        let from = offset.saturating_sub(self.longest);
        let mut out: Vec<Arc<Change>> = self
            .by_start
            .range((from, 0)..(end, 0))
            .map(|(_, c)| c)
            .filter(|c| c.offset + c.len > offset)
            .cloned()
            .collect();
        out.sort_by_key(|c| c.seq);
        out
    }

    /// True when a held change overlaps `[offset, offset + len)`.
    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        if self.order.is_empty() || len == 0 {
            return false;
        }
        let from = offset.saturating_sub(self.longest);
        self.by_start
            .range((from, 0)..(offset + len, 0))
            .any(|(_, c)| c.offset + c.len > offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write(seq: u64, offset: u64, len: u64, b: u8) -> Change {
        Change {
            seq,
            offset,
            len,
            content: Content::Data(vec![b; usize_of(len)]),
        }
    }

    proptest! {
        /// Overlaying the held changes on the device's bytes gives what applying them would.
        #[test]
        fn overlay_matches_applying(changes in proptest::collection::vec(
            (0u64..4096, 1u64..600, any::<u8>(), any::<bool>()), 1..40),
            applied_upto in 0usize..40, at in 0u64..4096, len in 1u64..1024) {
            let mut p = Pending::default();
            let mut device = vec![9u8; 8192];
            for (i, &(off, l, b, zero)) in changes.iter().enumerate() {
                let seq = i as u64 + 1;
                let c = if zero {
                    Change { seq, offset: off, len: l, content: Content::Zero { trim: false, may_trim: false } }
                } else {
                    write(seq, off, l, b)
                };
                p.push(c);
            }
            // Some are applied already (in order), the rest are held.
            let upto = applied_upto.min(changes.len()) as u64;
            let mut model = device.clone();
            for c in p.up_to(u64::MAX) {
                c.overlay(0, &mut model);
            }
            for c in p.up_to(upto) {
                c.overlay(0, &mut device);
            }
            p.applied(upto);
            let mut buf = device[usize_of(at)..usize_of(at + len)].to_vec();
            for c in p.overlapping(at, len) {
                c.overlay(at, &mut buf);
            }
            prop_assert_eq!(&buf[..], &model[usize_of(at)..usize_of(at + len)]);
            prop_assert_eq!(p.overlaps(at, len), !p.overlapping(at, len).is_empty());
        }
    }

    #[test]
    fn bytes_and_order_follow_applies() {
        let mut p = Pending::default();
        p.push(write(1, 0, 4096, 1));
        p.push(write(2, 1 << 30, 4096, 2));
        assert_eq!(p.bytes(), 8192);
        assert!(p.overlaps(4095, 1) && !p.overlaps(4096, 1 << 20));
        p.applied(1);
        assert_eq!((p.len(), p.bytes()), (1, 4096));
        assert!(!p.overlaps(0, 4096));
        p.applied(5);
        assert!(p.is_empty());
    }
}
