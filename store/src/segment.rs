//! The segment codec of the replica store (docs/FORMAT.md, "Segment file"): one header,
//! checksummed entries in sequence order, and for a sealed segment an index and a trailer.
//! The target's file store and the bucket backend hold the same bytes; this module reads
//! them through [`ReadAt`], from a file or from memory.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::pack::Packer;
use redun_tracker::journal::format::{
    BlockExtent, GroupDecision, Kind, MarkerInfo, PointKind, SyncInfo, SyncRole,
};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

pub const SEGMENT_MAGIC: [u8; 8] = *b"RDSEG001";
pub const SEGMENT_HEADER_LEN: usize = 64;
pub const ENTRY_MAGIC: u32 = u32::from_le_bytes(*b"RSE1");
pub const ENTRY_HEADER_LEN: usize = 40;
pub const INDEX_ENTRY_LEN: usize = 32;
pub const TRAILER_MAGIC: [u8; 8] = *b"RDSEGEND";
pub const TRAILER_LEN: usize = 32;
/// Entry and index flag: the payload is one zstd frame of the entry's `length` bytes.
pub const FLAG_PACKED: u8 = 1;
/// Bytes of a write that one compressed entry holds at most: a reader of a few bytes
/// fetches and decompresses at most this much.
pub const PACKED_PIECE: usize = 64 << 10;
/// 2: segments may hold compressed entries, and a bucket's manifest compacted gaps (a
/// reader that knows only 1 would misread both); readers refuse a newer format.
pub const MANIFEST_FORMAT: u32 = 2;

/// The identity a store is created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    /// The volume's uuid, hex.
    pub uuid: String,
    pub size: u64,
    pub generation: u64,
}

/// A recovery point: the volume as of the marker record with sequence number `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    pub id: u64,
    pub unix_ms: u64,
    pub kind: PointKind,
    /// The consistency group's point this marker belongs to (0: none). Such a point is
    /// listed only once a [`Decided`] commit for it is durable.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub group: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A consistency group's decision record, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decided {
    /// The decision record's sequence number.
    pub seq: u64,
    #[serde(flatten)]
    pub decision: GroupDecision,
}

/// A sealed segment as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRef {
    pub file: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub bytes: u64,
}

/// `NAME.store/manifest.json`, and the body of a bucket manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub uuid: String,
    pub size: u64,
    pub generation: u64,
    /// Every record up to this sequence number is in the base (0: none).
    pub base_seq: u64,
    pub segments: Vec<SegmentRef>,
    /// Points in sealed segments, oldest first (points in the open segment are found by
    /// reading it).
    pub points: Vec<Point>,
    /// Consistency-group decisions in sealed segments, for the group points still listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<Decided>,
}

impl Manifest {
    /// An empty manifest of a new store.
    pub fn new(id: &Identity) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            name: id.name.clone(),
            uuid: id.uuid.clone(),
            size: id.size,
            generation: id.generation,
            base_seq: 0,
            segments: Vec::new(),
            points: Vec::new(),
            decisions: Vec::new(),
        }
    }

    /// A reason when this redun cannot read the manifest's format (a newer one).
    pub fn check_format(&self) -> Result<(), String> {
        if self.format > MANIFEST_FORMAT {
            return Err(format!(
                "it is in format {}, this redun reads up to {MANIFEST_FORMAT}: use a newer redun",
                self.format
            ));
        }
        Ok(())
    }
}

/// One record of a segment, as the index keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub offset: u64,
    /// Where the payload starts in the segment.
    pub data: u64,
    pub length: u32,
    pub kind: Kind,
    /// The stored payload's length when it is compressed ([`FLAG_PACKED`]), else 0.
    pub packed: u32,
}

/// The records of one segment: its index, the points its markers place and its group
/// decisions.
pub type Scanned = (Vec<Entry>, Vec<Point>, Vec<Decided>);

/// Bytes as lowercase hex (volume uuids, key checks).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A synchronisation as the replica knows it (docs/PROTOCOL.md, "Synchronisation").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    /// The job that fills the slots (0: a begin no job claimed yet).
    pub job: u64,
    /// The first begin record: from here on the replica is inconsistent.
    pub since_seq: u64,
    /// Every range of the job below this offset is synchronised (from filled slots).
    pub cursor: u64,
}

/// A sync record as a replica follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncNote {
    pub seq: u64,
    pub info: SyncInfo,
    /// The slot's range.
    pub offset: u64,
    pub length: u32,
    /// A slot that carries its blocks (not one its shipper left unfilled).
    pub filled: bool,
}

/// Follows a synchronisation through its records: a begin opens it (from then on the
/// replica is inconsistent), a filled slot moves its cursor, its end closes it and adds the
/// window it covered to `inconsistent`.
pub fn follow_sync(sync: &mut Option<SyncState>, inconsistent: &mut Vec<[u64; 2]>, n: &SyncNote) {
    match (n.info.role, sync.as_mut()) {
        (SyncRole::Begin, None) => {
            *sync = Some(SyncState {
                job: n.info.job,
                since_seq: n.seq,
                cursor: 0,
            });
        }
        (SyncRole::Begin, Some(s)) if n.info.job != 0 && n.info.job != s.job => {
            s.job = n.info.job;
            s.cursor = 0;
        }
        (SyncRole::Slot, Some(s)) if s.job == n.info.job && n.filled => {
            s.cursor = s.cursor.max(n.offset + u64::from(n.length));
        }
        (SyncRole::End, Some(s)) if s.job == n.info.job => {
            inconsistent.push([s.since_seq, n.seq]);
            *sync = None;
        }
        _ => {}
    }
}

/// True when the point placed by marker `id` is a consistent image: no synchronisation
/// was under way at it.
pub fn consistent_at(sync: Option<&SyncState>, inconsistent: &[[u64; 2]], id: u64) -> bool {
    sync.is_none_or(|s| id < s.since_seq) && !inconsistent.iter().any(|w| w[0] <= id && id <= w[1])
}

/// Why segment bytes cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("{0}")]
    Damaged(String),
}

fn damaged(reason: impl Into<String>) -> SegmentError {
    SegmentError::Damaged(reason.into())
}

/// Positioned reads of a segment's bytes.
pub trait ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

pub fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

pub fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

/// The 64-byte header of a segment whose first record is `first_seq`.
pub fn segment_header(id: &Identity, first_seq: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    let uuid = u128::from_str_radix(&id.uuid, 16).unwrap_or(0);
    h[16..32].copy_from_slice(&uuid.to_be_bytes());
    h[32..40].copy_from_slice(&id.generation.to_le_bytes());
    h[40..48].copy_from_slice(&first_seq.to_le_bytes());
    let sum = xxh3_64(&h[..56]);
    h[56..64].copy_from_slice(&sum.to_le_bytes());
    h
}

/// The checksum of an entry: its header's first 32 bytes and its payload, seeded with the
/// segment's first sequence number (an entry copied into another segment does not verify).
fn entry_checksum(head: &[u8], payload: &[u8], first_seq: u64) -> u64 {
    let mut h = Xxh3::with_seed(first_seq);
    h.update(&head[..32]);
    h.update(payload);
    h.digest()
}

/// Appends one entry to `out`, for a segment whose first record is `first_seq`.
pub fn encode_entry(
    out: &mut Vec<u8>,
    first_seq: u64,
    kind: Kind,
    seq: u64,
    offset: u64,
    length: u32,
    payload: &[u8],
) {
    encode_flagged(out, first_seq, (kind, 0), seq, offset, length, payload);
}

/// [`encode_entry`] with the entry's flags.
fn encode_flagged(
    out: &mut Vec<u8>,
    first_seq: u64,
    (kind, flags): (Kind, u8),
    seq: u64,
    offset: u64,
    length: u32,
    payload: &[u8],
) {
    let mut head = [0u8; ENTRY_HEADER_LEN];
    head[0..4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
    head[4] = kind as u8;
    head[5] = flags;
    head[8..16].copy_from_slice(&seq.to_le_bytes());
    head[16..24].copy_from_slice(&offset.to_le_bytes());
    head[24..28].copy_from_slice(&length.to_le_bytes());
    let plen = u32::try_from(payload.len()).expect("payloads are at most 32 MiB");
    head[28..32].copy_from_slice(&plen.to_le_bytes());
    let sum = entry_checksum(&head, payload, first_seq);
    head[32..40].copy_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
}

/// The index and trailer that seal a segment whose entries end at byte `at`.
pub fn encode_index(entries: &[Entry], at: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * INDEX_ENTRY_LEN + TRAILER_LEN);
    for e in entries {
        out.extend_from_slice(&e.seq.to_le_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.data.to_le_bytes());
        out.extend_from_slice(&e.length.to_le_bytes());
        let flags = if e.packed > 0 { FLAG_PACKED } else { 0 };
        out.extend_from_slice(&[e.kind as u8, flags, 0, 0]);
    }
    let sum = xxh3_64(&out);
    out.extend_from_slice(&TRAILER_MAGIC);
    out.extend_from_slice(&at.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// What a marker or decision record adds to a segment's points and decisions.
pub fn note_record(
    kind: Kind,
    seq: u64,
    payload: &[u8],
    points: &mut Vec<Point>,
    decisions: &mut Vec<Decided>,
) {
    match kind {
        Kind::Marker => {
            if let Some(m) = MarkerInfo::decode(payload) {
                points.push(Point {
                    id: seq,
                    unix_ms: m.unix_ms,
                    kind: m.kind,
                    group: m.group_point,
                });
            }
        }
        Kind::Decision => {
            if let Some(decision) = GroupDecision::decode(payload) {
                decisions.push(Decided { seq, decision });
            }
        }
        _ => {}
    }
}

/// `f` of every listed point among `points` (oldest first), where `f` says `Some`: a plain
/// point always, a consistency group's point only once a decision after its marker (among
/// `decisions`, the durable ones) commits it, passed to `f`.
pub fn listed<'a, T>(
    points: impl Iterator<Item = &'a Point>,
    decisions: &[&Decided],
    mut f: impl FnMut(Point, Option<&GroupDecision>) -> Option<T>,
) -> Vec<T> {
    points
        .filter_map(|p| {
            if p.group == 0 {
                return f(*p, None);
            }
            let d = decisions
                .iter()
                .find(|d| d.decision.point == p.group && d.seq > p.id)?;
            d.decision
                .commit
                .then(|| f(*p, Some(&d.decision)))
                .flatten()
        })
        .collect()
}

/// Reads the entries of a segment from its first record to `len` (an open segment, or a
/// sealed one whose index is damaged), checking every checksum.
pub fn scan_segment<R: ReadAt + ?Sized>(
    src: &R,
    first_seq: u64,
    len: u64,
) -> Result<Scanned, SegmentError> {
    let mut head = [0u8; SEGMENT_HEADER_LEN];
    src.read_exact_at(&mut head, 0)?;
    if head[0..8] != SEGMENT_MAGIC || le64(&head[56..]) != xxh3_64(&head[..56]) {
        return Err(damaged("the segment header is not valid"));
    }
    if le64(&head[40..]) != first_seq {
        return Err(damaged(format!(
            "the segment starts at seq {}, not {first_seq}",
            le64(&head[40..])
        )));
    }
    let mut entries = Vec::new();
    let mut points = Vec::new();
    let mut decisions = Vec::new();
    let mut pos = SEGMENT_HEADER_LEN as u64;
    let mut next = first_seq;
    let mut eh = [0u8; ENTRY_HEADER_LEN];
    while pos < len {
        let bad = |why: String| damaged(format!("entry at byte {pos}: {why}"));
        if pos + ENTRY_HEADER_LEN as u64 > len {
            return Err(bad("truncated header".into()));
        }
        src.read_exact_at(&mut eh, pos)?;
        if le32(&eh[0..]) != ENTRY_MAGIC {
            return Err(bad("bad magic".into()));
        }
        let kind = Kind::from_u8(eh[4]).ok_or_else(|| bad(format!("unknown kind {}", eh[4])))?;
        let seq = le64(&eh[8..]);
        let offset = le64(&eh[16..]);
        let length = le32(&eh[24..]);
        let plen = u64::from(le32(&eh[28..]));
        let packed = check_flags(eh[5], kind, le32(&eh[28..])).map_err(bad)?;
        // Entries of a sync slot share its sequence number; otherwise numbers are
        // consecutive.
        if seq != next && seq + 1 != next && !(entries.is_empty() && seq >= next) {
            return Err(bad(format!("seq {seq} where {next} was expected")));
        }
        let data = pos + ENTRY_HEADER_LEN as u64;
        if data + plen > len {
            return Err(bad("truncated payload".into()));
        }
        let mut payload = vec![0u8; usize::try_from(plen).unwrap_or(usize::MAX)];
        src.read_exact_at(&mut payload, data)?;
        if entry_checksum(&eh, &payload, first_seq) != le64(&eh[32..]) {
            return Err(bad(format!("checksum mismatch (seq {seq})")));
        }
        note_record(kind, seq, &payload, &mut points, &mut decisions);
        entries.push(Entry {
            seq,
            offset,
            data,
            length,
            kind,
            packed,
        });
        next = seq + 1;
        pos = data + plen;
    }
    Ok((entries, points, decisions))
}

/// The stored length of a compressed payload (0: a plain one), from an entry's flags; only
/// a write's payload of at least one byte can be compressed.
fn check_flags(flags: u8, kind: Kind, stored: u32) -> Result<u32, String> {
    match flags {
        0 => Ok(0),
        FLAG_PACKED if kind == Kind::Write && stored > 0 => Ok(stored),
        FLAG_PACKED => Err(format!(
            "a {kind:?} entry of {stored} bytes marked compressed"
        )),
        f => Err(format!("unknown flags {f:#x}")),
    }
}

/// Where a sealed segment of `len` bytes keeps its index: (byte offset, entry count), from
/// its trailer (the last [`TRAILER_LEN`] bytes).
pub fn parse_trailer(t: &[u8], len: u64) -> Result<(u64, u64, u64), SegmentError> {
    if t.len() != TRAILER_LEN || t[0..8] != TRAILER_MAGIC {
        return Err(damaged("the segment has no trailer"));
    }
    let at = le64(&t[8..]);
    let count = le64(&t[16..]);
    count
        .checked_mul(INDEX_ENTRY_LEN as u64)
        .filter(|b| at.checked_add(*b) == Some(len - TRAILER_LEN as u64))
        .ok_or_else(|| damaged("the segment's trailer is not valid"))?;
    Ok((at, count, le64(&t[24..])))
}

/// Decodes a sealed segment's index (`idx`, at byte `at`, whose checksum the trailer gave
/// as `sum`) and checks that it covers `first_seq..=last_seq`. A compressed payload's
/// stored length is the gap to the next entry's header (to the index for the last entry).
pub fn parse_index(
    idx: &[u8],
    at: u64,
    sum: u64,
    r: &SegmentRef,
) -> Result<Vec<Entry>, SegmentError> {
    if xxh3_64(idx) != sum {
        return Err(damaged("the segment's index checksum does not match"));
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(idx.len() / INDEX_ENTRY_LEN);
    let mut ends = idx
        .chunks_exact(INDEX_ENTRY_LEN)
        .skip(1)
        .map(|e| le64(&e[16..]).checked_sub(ENTRY_HEADER_LEN as u64))
        .chain(std::iter::once(Some(at)));
    for e in idx.chunks_exact(INDEX_ENTRY_LEN) {
        let kind = Kind::from_u8(e[28]).ok_or_else(|| damaged("unknown kind in index"))?;
        let data = le64(&e[16..]);
        let end = ends.next().flatten();
        let stored = end
            .and_then(|end| end.checked_sub(data))
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);
        let packed = check_flags(e[29], kind, stored)
            .map_err(|why| damaged(format!("index entry at payload byte {data}: {why}")))?;
        entries.push(Entry {
            seq: le64(&e[0..]),
            offset: le64(&e[8..]),
            data,
            length: le32(&e[24..]),
            kind,
            packed,
        });
    }
    let first = entries.first().map(|e| e.seq);
    let last = entries.last().map(|e| e.seq);
    if first != Some(r.first_seq) || last != Some(r.last_seq) {
        return Err(damaged(format!(
            "the index covers seq {first:?}..={last:?}, the manifest {}..={}",
            r.first_seq, r.last_seq
        )));
    }
    Ok(entries)
}

/// Reads a sealed segment's index through its trailer; `len` is the segment's size.
pub fn read_index<R: ReadAt + ?Sized>(
    src: &R,
    len: u64,
    r: &SegmentRef,
) -> Result<Vec<Entry>, SegmentError> {
    if len != r.bytes || len < (SEGMENT_HEADER_LEN + TRAILER_LEN) as u64 {
        return Err(damaged(format!(
            "the segment has {len} bytes, the manifest says {}",
            r.bytes
        )));
    }
    let mut t = [0u8; TRAILER_LEN];
    src.read_exact_at(&mut t, len - TRAILER_LEN as u64)?;
    let (at, count, sum) = parse_trailer(&t, len)?;
    let mut idx = vec![0u8; usize::try_from(count).unwrap_or(usize::MAX) * INDEX_ENTRY_LEN];
    src.read_exact_at(&mut idx, at)?;
    parse_index(&idx, at, sum, r)
}

/// A sealed segment built in memory (the form a bucket holds): records are pushed in
/// sequence order, then [`SegmentBuf::seal`] appends the index and trailer.
#[derive(Debug)]
pub struct SegmentBuf {
    first_seq: u64,
    bytes: Vec<u8>,
    entries: Vec<Entry>,
    points: Vec<Point>,
    decisions: Vec<Decided>,
    syncs: Vec<SyncNote>,
    /// A compressed piece, before it is appended.
    scratch: Vec<u8>,
}

impl SegmentBuf {
    pub fn new(id: &Identity, first_seq: u64) -> SegmentBuf {
        SegmentBuf {
            first_seq,
            bytes: segment_header(id, first_seq).to_vec(),
            entries: Vec::new(),
            points: Vec::new(),
            decisions: Vec::new(),
            syncs: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Appends a sync record: a slot's blocks (data or zeroes) as entries of its sequence
    /// number (data compressed as [`SegmentBuf::push_write`] does), then the record itself,
    /// as the target's store does.
    pub fn push_sync(
        &mut self,
        seq: u64,
        info: SyncInfo,
        range: (u64, u32),
        blocks: Option<&[BlockExtent<'_>]>,
        packer: &mut Packer,
    ) -> io::Result<()> {
        for b in blocks.unwrap_or_default() {
            match b.data {
                Some(d) => self.push_write(seq, b.offset, d, packer)?,
                None => self.push(Kind::Zero, seq, b.offset, b.length, &[]),
            }
        }
        self.push(Kind::Sync, seq, range.0, range.1, &info.encode());
        self.syncs.push(SyncNote {
            seq,
            info,
            offset: range.0,
            length: range.1,
            filled: blocks.is_some(),
        });
        Ok(())
    }

    /// Appends a write of `data` at volume offset `offset` as entries of at most
    /// [`PACKED_PIECE`] bytes each, every one compressed by `packer` when that saves space.
    pub fn push_write(
        &mut self,
        seq: u64,
        offset: u64,
        data: &[u8],
        packer: &mut Packer,
    ) -> io::Result<()> {
        if data.is_empty() {
            self.push(Kind::Write, seq, offset, 0, &[]);
            return Ok(());
        }
        let mut at = offset;
        for piece in data.chunks(PACKED_PIECE) {
            let len = u32::try_from(piece.len()).expect("a piece is small");
            if packer.compress(piece, &mut self.scratch)? {
                let stored = std::mem::take(&mut self.scratch);
                self.push_entry((Kind::Write, FLAG_PACKED), seq, at, len, &stored);
                self.scratch = stored;
            } else {
                self.push(Kind::Write, seq, at, len, piece);
            }
            at += u64::from(len);
        }
        Ok(())
    }

    /// The sync records pushed, in order.
    pub fn syncs(&self) -> &[SyncNote] {
        &self.syncs
    }

    pub fn push(&mut self, kind: Kind, seq: u64, offset: u64, length: u32, payload: &[u8]) {
        self.push_entry((kind, 0), seq, offset, length, payload);
    }

    /// Appends one entry with `flags` ([`FLAG_PACKED`]: `payload` is compressed).
    fn push_entry(
        &mut self,
        (kind, flags): (Kind, u8),
        seq: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let data = (self.bytes.len() + ENTRY_HEADER_LEN) as u64;
        encode_flagged(
            &mut self.bytes,
            self.first_seq,
            (kind, flags),
            seq,
            offset,
            length,
            payload,
        );
        let packed = if flags & FLAG_PACKED != 0 {
            u32::try_from(payload.len()).expect("payloads are at most 32 MiB")
        } else {
            note_record(kind, seq, payload, &mut self.points, &mut self.decisions);
            0
        };
        self.entries.push(Entry {
            seq,
            offset,
            data,
            length,
            kind,
            packed,
        });
    }

    /// Bytes so far (header and entries).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// The last record's sequence number, if any.
    pub fn last_seq(&self) -> Option<u64> {
        self.entries.last().map(|e| e.seq)
    }

    /// The sealed bytes, the index, and the points and decisions the records place.
    pub fn seal(mut self) -> (Vec<u8>, Scanned) {
        let at = self.bytes.len() as u64;
        self.bytes
            .extend_from_slice(&encode_index(&self.entries, at));
        (self.bytes, (self.entries, self.points, self.decisions))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            name: "v".into(),
            uuid: "00112233445566778899aabbccddeeff".into(),
            size: 1 << 20,
            generation: 1,
        }
    }

    #[test]
    fn a_built_segment_scans_and_indexes_the_same() {
        let mut b = SegmentBuf::new(&id(), 7);
        b.push(Kind::Write, 7, 4096, 4, b"abcd");
        b.push(Kind::Zero, 8, 0, 4096, &[]);
        b.push(Kind::Trim, 9, 8192, 512, &[]);
        let (bytes, (entries, ..)) = b.seal();
        let r = SegmentRef {
            file: "s".into(),
            first_seq: 7,
            last_seq: 9,
            bytes: bytes.len() as u64,
        };
        assert_eq!(read_index(&bytes[..], r.bytes, &r).unwrap(), entries);
        let at = parse_trailer(&bytes[bytes.len() - TRAILER_LEN..], r.bytes)
            .unwrap()
            .0;
        let (scanned, ..) = scan_segment(&bytes[..], 7, at).unwrap();
        assert_eq!(scanned, entries);
        let mut d = [0u8; 4];
        bytes[..].read_exact_at(&mut d, entries[0].data).unwrap();
        assert_eq!(&d, b"abcd");
    }

    #[test]
    fn the_entries_of_a_sync_slot_share_its_sequence_number() {
        let mut b = SegmentBuf::new(&id(), 5);
        b.push(Kind::Write, 5, 0, 4, b"abcd");
        b.push(Kind::Zero, 5, 4096, 4096, &[]);
        b.push(Kind::Sync, 5, 0, 8192, &[0; 16]);
        b.push(Kind::Write, 6, 0, 4, b"efgh");
        let (bytes, (entries, ..)) = b.seal();
        let at = parse_trailer(&bytes[bytes.len() - TRAILER_LEN..], bytes.len() as u64)
            .unwrap()
            .0;
        assert_eq!(scan_segment(&bytes[..], 5, at).unwrap().0, entries);
        let mut skip = SegmentBuf::new(&id(), 5);
        skip.push(Kind::Write, 5, 0, 4, b"abcd");
        skip.push(Kind::Write, 7, 0, 4, b"abcd");
        let (bytes, _) = skip.seal();
        let e = scan_segment(&bytes[..], 5, bytes.len() as u64).unwrap_err();
        assert!(e.to_string().contains("seq 7 where 6 was expected"), "{e}");
    }

    #[test]
    fn a_write_is_stored_in_compressed_pieces_that_read_back() {
        let mut packer = Packer::new(3, 8).unwrap();
        let mut x = 1u64;
        let noise: Vec<u8> = (0..PACKED_PIECE)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        // 150 KiB of text-like data then 64 KiB of noise: three compressed pieces and a
        // plain one.
        let mut data: Vec<u8> = b"redun ".iter().cycle().take(150 << 10).copied().collect();
        data.extend_from_slice(&noise);
        let mut b = SegmentBuf::new(&id(), 3);
        b.push(Kind::Zero, 3, 0, 4096, &[]);
        b.push_write(4, 8192, &data, &mut packer).unwrap();
        b.push(Kind::Marker, 5, 0, 0, &[]);
        assert!(b.len() < 100 << 10, "{} bytes", b.len());
        let (bytes, (entries, ..)) = b.seal();
        let r = SegmentRef {
            file: "s".into(),
            first_seq: 3,
            last_seq: 5,
            bytes: bytes.len() as u64,
        };
        assert_eq!(read_index(&bytes[..], r.bytes, &r).unwrap(), entries);
        let at = parse_trailer(&bytes[bytes.len() - TRAILER_LEN..], r.bytes)
            .unwrap()
            .0;
        assert_eq!(scan_segment(&bytes[..], 3, at).unwrap().0, entries);
        let writes: Vec<&Entry> = entries.iter().filter(|e| e.kind == Kind::Write).collect();
        let packed: Vec<bool> = writes.iter().map(|e| e.packed > 0).collect();
        assert_eq!(packed, [true, true, true, false]);
        let mut back = Vec::new();
        for e in &writes {
            assert_eq!(e.seq, 4);
            assert_eq!(e.offset, 8192 + back.len() as u64);
            let stored = if e.packed > 0 { e.packed } else { e.length };
            let mut p = vec![0u8; stored as usize];
            bytes[..].read_exact_at(&mut p, e.data).unwrap();
            if e.packed > 0 {
                p = crate::pack::unpack(&p, e.length as usize).unwrap();
            }
            back.extend_from_slice(&p);
        }
        assert_eq!(back, data);
    }

    #[test]
    fn an_empty_write_keeps_its_entry() {
        let mut packer = Packer::new(3, 8).unwrap();
        let mut b = SegmentBuf::new(&id(), 9);
        b.push_write(9, 4096, &[], &mut packer).unwrap();
        let (_, (entries, ..)) = b.seal();
        assert_eq!(entries.len(), 1);
        assert_eq!(
            (entries[0].seq, entries[0].length, entries[0].packed),
            (9, 0, 0)
        );
    }

    #[test]
    fn compression_flags_outside_a_write_are_damage() {
        assert_eq!(check_flags(0, Kind::Marker, 9), Ok(0));
        assert_eq!(check_flags(FLAG_PACKED, Kind::Write, 9), Ok(9));
        let e = check_flags(FLAG_PACKED, Kind::Trim, 0).unwrap_err();
        assert!(e.contains("Trim entry of 0 bytes marked compressed"), "{e}");
        assert!(check_flags(FLAG_PACKED, Kind::Write, 0).is_err());
        let e = check_flags(4, Kind::Write, 9).unwrap_err();
        assert!(e.contains("unknown flags 0x4"), "{e}");
    }

    #[test]
    fn a_flipped_byte_is_damage_not_data() {
        let mut b = SegmentBuf::new(&id(), 1);
        b.push(Kind::Write, 1, 0, 4, b"abcd");
        let (mut bytes, (entries, ..)) = b.seal();
        let at = usize::try_from(entries[0].data).unwrap();
        bytes[at] ^= 1;
        let e = scan_segment(&bytes[..], 1, (at + 4) as u64).unwrap_err();
        assert!(e.to_string().contains("checksum mismatch (seq 1)"), "{e}");
        let r = SegmentRef {
            file: "s".into(),
            first_seq: 1,
            last_seq: 1,
            bytes: bytes.len() as u64 - 1,
        };
        let e = read_index(&bytes[..bytes.len() - 1], r.bytes, &r).unwrap_err();
        assert!(e.to_string().contains("trailer"), "{e}");
    }
}
