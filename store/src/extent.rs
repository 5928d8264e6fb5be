//! The extent index of a view (docs/FORMAT.md, "Replica store"): which segment bytes, or
//! zeroes, cover each range of the volume at one sequence number; the rest reads from the
//! base.

use std::collections::BTreeMap;

use redun_tracker::journal::format::Kind;

use crate::segment::Entry;

/// Where a piece of a view's bytes comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Src {
    Zero,
    /// `pos`: the offset of the piece's first byte in segment `file` of the view.
    Data {
        file: u32,
        pos: u64,
    },
    /// The piece starts `skip` bytes into the decompressed payload of the compressed entry
    /// whose payload starts at `data` in segment `file`.
    Packed {
        file: u32,
        data: u64,
        skip: u32,
    },
}

impl Src {
    pub fn advance(self, by: u64) -> Src {
        match self {
            Src::Zero => Src::Zero,
            Src::Data { file, pos } => Src::Data {
                file,
                pos: pos + by,
            },
            Src::Packed { file, data, skip } => Src::Packed {
                file,
                data,
                // Within one entry, whose length is a u32.
                skip: skip + u32::try_from(by).expect("within an entry"),
            },
        }
    }
}

/// A compaction is worth it when it keeps at most this share of a run's data, in quarters
/// (the bucket's and the target's stores follow the same rule).
pub const COMPACT_KEEPS: u64 = 3;

#[derive(Debug, Clone, Copy)]
pub struct Piece {
    pub end: u64,
    pub src: Src,
}

/// Non-overlapping pieces of the volume by start offset; bytes outside every piece come
/// from the base.
#[derive(Debug, Default)]
pub struct ExtentMap {
    pub pieces: BTreeMap<u64, Piece>,
}

impl ExtentMap {
    /// `[start, end)` now comes from `src`, over whatever was there.
    pub fn insert(&mut self, start: u64, end: u64, src: Src) {
        if let Some((&ps, p)) = self.pieces.range(..start).next_back() {
            let p = *p;
            if p.end > start {
                self.pieces.get_mut(&ps).expect("present").end = start;
                if p.end > end {
                    self.pieces.insert(
                        end,
                        Piece {
                            end: p.end,
                            src: p.src.advance(end - ps),
                        },
                    );
                }
            }
        }
        while let Some((&k, p)) = self.pieces.range(start..end).next() {
            let p = *p;
            self.pieces.remove(&k);
            if p.end > end {
                self.pieces.insert(
                    end,
                    Piece {
                        end: p.end,
                        src: p.src.advance(end - k),
                    },
                );
            }
        }
        self.pieces.insert(start, Piece { end, src });
    }

    /// Applies segment entry `e` of segment `file`: a write's bytes now come from its
    /// payload, a trim's or zeroes' read as zeroes; other kinds change no bytes.
    pub fn apply(&mut self, file: u32, e: &Entry) {
        let src = match e.kind {
            Kind::Write if e.packed > 0 => Src::Packed {
                file,
                data: e.data,
                skip: 0,
            },
            Kind::Write => Src::Data { file, pos: e.data },
            Kind::Trim | Kind::Zero => Src::Zero,
            Kind::Marker | Kind::Pad | Kind::Sync | Kind::Decision => return,
        };
        if e.length > 0 {
            self.insert(e.offset, e.offset + u64::from(e.length), src);
        }
    }

    /// The bytes of write data the map still reads from segments (zeroes hold none).
    pub fn data_bytes(&self) -> u64 {
        self.pieces
            .iter()
            .filter(|(_, p)| !matches!(p.src, Src::Zero))
            .map(|(&start, p)| p.end - start)
            .sum()
    }

    /// Whether compacting the run of segments this map was built from, which wrote
    /// `written` bytes of write data, is worth rewriting it: only when at most
    /// [`COMPACT_KEEPS`] quarters of that data survive. A run whose writes barely overlap
    /// would be copied whole to free almost nothing.
    pub fn worth_compacting(&self, written: u64) -> bool {
        self.data_bytes() * 4 <= written * COMPACT_KEEPS
    }

    /// Fills `buf`, the volume's bytes from `offset`, piece by piece: `f(out, start, src)`
    /// fills `out`, the bytes from volume offset `start` that `src` (or the base, `None`)
    /// holds. Stops at the first error.
    pub fn read<E>(
        &self,
        buf: &mut [u8],
        offset: u64,
        mut f: impl FnMut(&mut [u8], u64, Option<Src>) -> Result<(), E>,
    ) -> Result<(), E> {
        let end = offset + buf.len() as u64;
        let mut r = Ok(());
        self.walk(offset, end, |s, e, src| {
            if r.is_ok() {
                // Within `buf`, whose length is a usize.
                let at = |x: u64| usize::try_from(x - offset).unwrap_or(usize::MAX);
                r = f(&mut buf[at(s)..at(e)], s, src);
            }
        });
        r
    }

    /// The pieces that overlap `[start, end)`, clipped to it, with the gaps between them
    /// as `None` (base).
    pub fn walk(&self, start: u64, end: u64, mut f: impl FnMut(u64, u64, Option<Src>)) {
        let mut pos = start;
        let first = self
            .pieces
            .range(..=start)
            .next_back()
            .filter(|(_, p)| p.end > start);
        let rest = self.pieces.range((
            std::ops::Bound::Excluded(start),
            std::ops::Bound::Excluded(end),
        ));
        for (&ps, p) in first.into_iter().chain(rest) {
            if ps > pos {
                f(pos, ps, None);
                pos = ps;
            }
            let e = p.end.min(end);
            f(pos, e, Some(p.src.advance(pos - ps)));
            pos = e;
        }
        if pos < end {
            f(pos, end, None);
        }
    }
}
