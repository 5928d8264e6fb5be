//! The region map of a volume (`NAME.map` beside its journal): the persistent dirty-region
//! bitmap, and the hot-extent bitmap (the activity log) of the previous format. Format in
//! docs/FORMAT.md ("Region map").
//!
//! The write-ahead journal keeps invariant J without an activity log (docs/FORMAT.md, "The
//! write-ahead rule"): this tracker never sets a hot bit. It still reads them: a map left by an
//! unclean stop of the previous version turns its hot extents into dirty regions when opened.
//! A change that bypasses the journal (full or failed) has its regions made durably dirty
//! first ([`RegionMap::mark_dirty_durably`]).

use std::collections::BTreeSet;
use std::io;
use std::path::Path;

use log::warn;
use xxhash_rust::xxh3::xxh3_64;

use crate::journal::Store;

pub const MAP_MAGIC: [u8; 8] = *b"\x89RDM\r\n\x1a\n";
pub const MAP_VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
const HEADER_SLOT: u64 = 4096;
const PAGE: u64 = 4096;
/// Size of a hot extent (the activity log's unit).
pub const DEFAULT_EXTENT: u64 = 4 << 20;

const _: () = assert!(HEADER_LEN as u64 <= HEADER_SLOT);

/// Map geometry and flags, the first 64 bytes of the file:
///
/// | off | size | field |
/// | --- | --- | --- |
/// | 0 | 8 | magic `\x89RDM\r\n\x1a\n` |
/// | 8 | 4 | version (1) |
/// | 12 | 4 | flags: bit 0 = closed cleanly |
/// | 16 | 8 | volume size |
/// | 24 | 8 | region size (dirty bitmap unit) |
/// | 32 | 8 | extent size (activity log unit) |
/// | 40 | 16 | reserved (zero) |
/// | 56 | 8 | xxh3-64 of bytes 0..56 |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    clean: bool,
    volume_size: u64,
    region: u64,
    extent: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAP_MAGIC);
        b[8..12].copy_from_slice(&MAP_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&u32::from(self.clean).to_le_bytes());
        b[16..24].copy_from_slice(&self.volume_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.region.to_le_bytes());
        b[32..40].copy_from_slice(&self.extent.to_le_bytes());
        let sum = xxh3_64(&b[0..56]);
        b[56..64].copy_from_slice(&sum.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, String> {
        if b[0..8] != MAP_MAGIC {
            return Err("not a redun region map (bad magic)".into());
        }
        let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if version != MAP_VERSION {
            return Err(format!("unsupported region map version {version}"));
        }
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        if xxh3_64(&b[0..56]) != u64_at(56) {
            return Err("region map header checksum mismatch".into());
        }
        let h = Header {
            clean: b[12] & 1 != 0,
            volume_size: u64_at(16),
            region: u64_at(24),
            extent: u64_at(32),
        };
        if h.region == 0 || h.extent == 0 || h.extent % h.region != 0 {
            return Err("region map header has an impossible geometry".into());
        }
        Ok(h)
    }
}

/// A bitmap stored in whole pages of the map file.
#[derive(Debug, Clone)]
struct Bits {
    words: Vec<u64>,
    /// File offset of the first page.
    at: u64,
    count: u64,
}

impl Bits {
    fn new(bits: u64, at: u64) -> Bits {
        Bits {
            words: vec![0; usize::try_from(bits.div_ceil(64)).expect("bitmap fits in memory")],
            at,
            count: 0,
        }
    }

    fn bytes_on_disk(&self) -> u64 {
        (self.words.len() as u64 * 8).next_multiple_of(PAGE)
    }

    fn get(&self, i: u64) -> bool {
        usize::try_from(i / 64)
            .ok()
            .and_then(|w| self.words.get(w))
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Sets bit `i`; true if it was clear.
    fn set(&mut self, i: u64) -> bool {
        let Some(w) = usize::try_from(i / 64)
            .ok()
            .and_then(|w| self.words.get_mut(w))
        else {
            return false;
        };
        let was = *w & (1 << (i % 64)) != 0;
        *w |= 1 << (i % 64);
        if !was {
            self.count += 1;
        }
        !was
    }

    fn clear(&mut self, i: u64) {
        if let Some(w) = usize::try_from(i / 64)
            .ok()
            .and_then(|w| self.words.get_mut(w))
        {
            if *w & (1 << (i % 64)) != 0 {
                *w &= !(1 << (i % 64));
                self.count -= 1;
            }
        }
    }

    /// The page (index) holding bit `i`.
    fn page_of(i: u64) -> u64 {
        i / (PAGE * 8)
    }

    fn page_bytes(&self, page: u64) -> Vec<u8> {
        let words_per_page = usize::try_from(PAGE / 8).expect("small");
        let start = usize::try_from(page).expect("page index fits") * words_per_page;
        let mut out = vec![0u8; usize::try_from(PAGE).expect("small")];
        for (k, w) in self
            .words
            .iter()
            .skip(start)
            .take(words_per_page)
            .enumerate()
        {
            out[k * 8..k * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    fn write_page<S: Store>(&self, store: &S, page: u64) -> io::Result<()> {
        store.write_at(&[&self.page_bytes(page)], self.at + page * PAGE)
    }

    fn write_all<S: Store>(&self, store: &S) -> io::Result<()> {
        let pages = self.bytes_on_disk() / PAGE;
        for p in 0..pages {
            self.write_page(store, p)?;
        }
        Ok(())
    }

    fn read_all<S: Store>(&mut self, store: &S) -> io::Result<()> {
        let mut buf = vec![0u8; usize::try_from(self.bytes_on_disk()).expect("fits")];
        store.read_at(&mut buf, self.at)?;
        self.count = 0;
        for (k, w) in self.words.iter_mut().enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(&buf[k * 8..k * 8 + 8]);
            *w = u64::from_le_bytes(a);
            self.count += u64::from(w.count_ones());
        }
        Ok(())
    }
}

/// The activity log and dirty bitmap of one volume.
#[derive(Debug)]
pub struct RegionMap<S: Store> {
    store: S,
    header: Header,
    hot: Bits,
    dirty: Bits,
    /// Pages of the dirty bitmap changed in memory since they were last written.
    dirty_pages: BTreeSet<u64>,
    /// While a synchronisation runs: the regions marked dirty since it took its ranges.
    redirtied: Option<Bits>,
}

/// What opening a map found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapRecovery {
    pub was_clean: bool,
    /// Hot extents turned into dirty regions because the last stop was unclean.
    pub hot_extents: u64,
}

impl<S: Store> RegionMap<S> {
    /// Size of the map file for a volume.
    pub fn file_size(volume_size: u64, region: u64, extent: u64) -> u64 {
        let hot = Bits::new(volume_size.div_ceil(extent), 0).bytes_on_disk();
        let dirty = Bits::new(volume_size.div_ceil(region), 0).bytes_on_disk();
        HEADER_SLOT + hot + dirty
    }

    fn layout(header: Header) -> (Bits, Bits) {
        let hot = Bits::new(header.volume_size.div_ceil(header.extent), HEADER_SLOT);
        let dirty_at = HEADER_SLOT + hot.bytes_on_disk();
        let dirty = Bits::new(header.volume_size.div_ceil(header.region), dirty_at);
        (hot, dirty)
    }

    /// Writes an empty map (nothing hot, nothing dirty) on a store of
    /// [`RegionMap::file_size`] bytes.
    pub fn create(store: S, volume_size: u64, region: u64, extent: u64) -> io::Result<Self> {
        let header = Header {
            clean: false,
            volume_size,
            region,
            extent,
        };
        let (hot, dirty) = Self::layout(header);
        hot.write_all(&store)?;
        dirty.write_all(&store)?;
        store.write_at(&[&header.encode()], 0)?;
        store.sync()?;
        Ok(RegionMap {
            store,
            header,
            hot,
            dirty,
            dirty_pages: BTreeSet::new(),
            redirtied: None,
        })
    }

    /// Opens a map. After an unclean stop every hot extent becomes dirty (made durable
    /// before this returns), and the map is marked open.
    pub fn open(store: S, volume_size: u64) -> Result<(Self, MapRecovery), String> {
        let mut hb = [0u8; HEADER_LEN];
        store.read_at(&mut hb, 0).map_err(|e| e.to_string())?;
        let header = Header::decode(&hb)?;
        if header.volume_size != volume_size {
            return Err(format!(
                "region map is for a volume of {} bytes, not {volume_size}",
                header.volume_size
            ));
        }
        let (mut hot, mut dirty) = Self::layout(header);
        hot.read_all(&store).map_err(|e| e.to_string())?;
        dirty.read_all(&store).map_err(|e| e.to_string())?;
        let rec = MapRecovery {
            was_clean: header.clean,
            hot_extents: if header.clean { 0 } else { hot.count },
        };
        let mut map = RegionMap {
            store,
            header: Header {
                clean: false,
                ..header
            },
            hot,
            dirty,
            dirty_pages: BTreeSet::new(),
            redirtied: None,
        };
        if !header.clean && map.hot.count > 0 {
            warn!(
                "extents={}: region map: unclean stop, hot extents become dirty",
                map.hot.count
            );
            map.mark_hot_dirty();
        }
        // Persist the dirty regions, then forget the hot extents: from here on the map
        // describes this run.
        map.dirty.write_all(&map.store).map_err(|e| e.to_string())?;
        map.store.sync().map_err(|e| e.to_string())?;
        for e in 0..volume_size.div_ceil(header.extent) {
            map.hot.clear(e);
        }
        map.hot.write_all(&map.store).map_err(|e| e.to_string())?;
        map.store
            .write_at(&[&map.header.encode()], 0)
            .map_err(|e| e.to_string())?;
        map.store.sync().map_err(|e| e.to_string())?;
        Ok((map, rec))
    }

    pub fn hot_extents(&self) -> u64 {
        self.hot.count
    }

    /// Marks regions dirty and makes the new marks durable before it returns (one sync when
    /// a region was clean): what a change that bypasses the journal needs first.
    pub fn mark_dirty_durably(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.mark_dirty(offset, len) {
            self.write_dirty()?;
            self.store.sync()?;
        }
        Ok(())
    }

    /// Marks regions dirty in memory (written to the file within the flusher's next round,
    /// durable by [`RegionMap::persist_dirty`] or at close). Returns whether a region was
    /// clean.
    pub fn mark_dirty(&mut self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let mut new = false;
        let first = offset / self.header.region;
        let last =
            (offset + len - 1).min(self.header.volume_size.saturating_sub(1)) / self.header.region;
        for r in first..=last {
            if self.dirty.set(r) {
                self.dirty_pages.insert(Bits::page_of(r));
                new = true;
            }
            if let Some(again) = self.redirtied.as_mut() {
                again.set(r);
            }
        }
        new
    }

    /// A synchronisation took the dirty ranges: from now on, regions marked dirty are
    /// remembered, so that [`RegionMap::finish_sync`] leaves them dirty.
    pub fn start_sync(&mut self) {
        self.redirtied = Some(Bits::new(self.dirty.words.len() as u64 * 64, 0));
    }

    /// The synchronisation of `ranges` ended before a change could be lost: their regions
    /// are clean again, except those marked dirty since [`RegionMap::start_sync`]. Durable
    /// when this returns.
    pub fn finish_sync(&mut self, ranges: &[(u64, u64)]) -> io::Result<()> {
        let again = self.redirtied.take();
        let region = self.header.region;
        for &(offset, len) in ranges {
            if len == 0 {
                continue;
            }
            for r in offset / region..=(offset + len - 1) / region {
                if self.dirty.get(r) && !again.as_ref().is_some_and(|a| a.get(r)) {
                    self.dirty.clear(r);
                    self.dirty_pages.insert(Bits::page_of(r));
                }
            }
        }
        self.write_dirty()?;
        self.store.sync()
    }

    /// The synchronisation stopped short: its regions stay dirty.
    pub fn abort_sync(&mut self) {
        self.redirtied = None;
    }

    /// True when dirty bits were set in memory since [`RegionMap::write_dirty`].
    pub fn has_unwritten_dirty(&self) -> bool {
        !self.dirty_pages.is_empty()
    }

    /// Writes the dirty bitmap pages changed in memory to the file, not durably: enough for a
    /// reader in another process ([`DirtyView`]) to see them.
    pub fn write_dirty(&mut self) -> io::Result<()> {
        while let Some(&p) = self.dirty_pages.first() {
            self.dirty.write_page(&self.store, p)?;
            self.dirty_pages.remove(&p);
        }
        Ok(())
    }

    /// Marks every hot extent dirty: what the journal may not hold after it lost records.
    pub fn mark_hot_dirty(&mut self) {
        let extent = self.header.extent;
        for e in 0..self.header.volume_size.div_ceil(extent) {
            if self.hot.get(e) {
                self.mark_dirty(e * extent, extent);
            }
        }
    }

    /// Makes the dirty regions durable now (rather than when their extents cool).
    pub fn persist_dirty(&mut self) -> io::Result<()> {
        self.dirty.write_all(&self.store)?;
        self.dirty_pages.clear();
        self.store.sync()
    }

    pub fn mark_all_dirty(&mut self) {
        self.mark_dirty(0, self.header.volume_size);
    }

    pub fn is_dirty(&self, offset: u64) -> bool {
        self.dirty.get(offset / self.header.region)
    }

    pub fn dirty_bytes(&self) -> u64 {
        (self.dirty.count * self.header.region).min(self.header.volume_size)
    }

    /// Dirty ranges as (offset, length), merged.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let region = self.header.region;
        let size = self.header.volume_size;
        for (w, &word) in self.dirty.words.iter().enumerate() {
            if word == 0 {
                continue;
            }
            for b in 0..64u64 {
                if word & (1 << b) == 0 {
                    continue;
                }
                let start = (w as u64 * 64 + b) * region;
                if start >= size {
                    break;
                }
                let len = region.min(size - start);
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == start => last.1 += len,
                    _ => out.push((start, len)),
                }
            }
        }
        out
    }

    /// Durable dirty bits and an empty activity log, then the clean flag. The caller must
    /// have made the journal durable first.
    pub fn close(mut self) -> io::Result<S> {
        self.dirty.write_all(&self.store)?;
        self.hot.write_all(&self.store)?;
        self.store.sync()?;
        self.header.clean = true;
        self.store.write_at(&[&self.header.encode()], 0)?;
        self.store.sync()?;
        Ok(self.store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::crash_store::CrashStore;

    const VOL: u64 = 64 << 20;

    fn new_map() -> RegionMap<CrashStore> {
        let size = RegionMap::<CrashStore>::file_size(VOL, 64 << 10, 4 << 20);
        let size = usize::try_from(size).unwrap();
        RegionMap::create(CrashStore::new(size), VOL, 64 << 10, 4 << 20).unwrap()
    }

    #[test]
    fn hot_extents_of_the_previous_format_become_dirty_after_an_unclean_stop_only() {
        let mut m = new_map();
        // What a tracker of the previous version left: two extents hot, durably.
        m.hot.set(1);
        m.hot.set(2);
        m.hot.write_all(&m.store).unwrap();
        m.store.sync().unwrap();
        // Unclean: reopen what is on disk now.
        let (m2, rec) = RegionMap::open(CrashStore::from_image(m.store.image()), VOL).unwrap();
        assert_eq!(rec.hot_extents, 2);
        assert_eq!(m2.dirty_ranges(), vec![(4 << 20, 8 << 20)]);
        assert_eq!(m2.hot_extents(), 0);
        // Clean: nothing dirty.
        let store = m.close().unwrap();
        let (m3, rec) = RegionMap::open(store, VOL).unwrap();
        assert!(rec.was_clean && m3.dirty_bytes() == 0);
    }

    #[test]
    fn durable_marks_survive_a_crash() {
        let mut m = new_map();
        m.mark_dirty_durably(100, 1).unwrap();
        let (m2, _) =
            RegionMap::open(CrashStore::from_image(m.store.durable_image()), VOL).unwrap();
        assert_eq!(m2.dirty_ranges(), vec![(0, 64 << 10)]);
    }

    #[test]
    fn a_finished_sync_cleans_its_regions_but_not_those_dirtied_again() {
        let mut m = new_map();
        let r = 64 << 10;
        m.mark_dirty(0, 2 * r);
        m.mark_dirty(10 * r, r);
        let job = m.dirty_ranges();
        m.start_sync();
        // Written again while the job runs (the journal overflowed again), and a new region.
        m.mark_dirty(r, 10);
        m.mark_dirty(20 * r, r);
        m.finish_sync(&job).unwrap();
        assert_eq!(m.dirty_ranges(), vec![(r, r), (20 * r, r)]);
        // Durable: what is on disk says the same.
        let (m2, _) =
            RegionMap::open(CrashStore::from_image(m.store.durable_image()), VOL).unwrap();
        assert_eq!(m2.dirty_ranges(), vec![(r, r), (20 * r, r)]);
        // An aborted job leaves everything dirty.
        let mut m = new_map();
        m.mark_dirty(0, r);
        m.start_sync();
        m.abort_sync();
        assert_eq!(m.dirty_bytes(), r);
    }

    #[test]
    fn damaged_or_foreign_maps_are_refused() {
        let m = new_map();
        let img = m.store.image();
        let mut bad = img.clone();
        bad[20] ^= 1;
        let e = RegionMap::open(CrashStore::from_image(bad), VOL).unwrap_err();
        assert!(e.contains("checksum"), "{e}");
        let e = RegionMap::open(CrashStore::from_image(img), VOL * 2).unwrap_err();
        assert!(e.contains("volume of"), "{e}");
    }
}

/// The dirty regions of a volume as its map file shows them, read from another process (the
/// shipper) while the tracker runs: the tracker writes newly dirty bits to the file within
/// [`crate::track::COMMIT_INTERVAL`] (not durably; that happens before their extent cools).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyView {
    pub volume_size: u64,
    /// Size of a region, the bitmap's unit.
    pub region: u64,
    pub dirty_bytes: u64,
    /// Dirty ranges as `(offset, length)`, merged.
    pub ranges: Vec<(u64, u64)>,
}

impl DirtyView {
    /// Reads `NAME.map`, read-only.
    pub fn read(path: &Path) -> Result<DirtyView, String> {
        let what = |e: &dyn std::fmt::Display| format!("region map {}: {e}", path.display());
        let f = std::fs::File::open(path).map_err(|e| what(&e))?;
        let mut hb = [0u8; HEADER_LEN];
        f.read_at(&mut hb, 0).map_err(|e| what(&e))?;
        let header = Header::decode(&hb).map_err(|e| what(&e))?;
        let (_, mut dirty) = RegionMap::<std::fs::File>::layout(header);
        dirty.read_all(&f).map_err(|e| what(&e))?;
        let map = RegionMap {
            store: f,
            header,
            hot: Bits::new(0, 0),
            dirty,
            dirty_pages: BTreeSet::new(),
            redirtied: None,
        };
        Ok(DirtyView {
            volume_size: header.volume_size,
            region: header.region,
            dirty_bytes: map.dirty_bytes(),
            ranges: map.dirty_ranges(),
        })
    }
}
