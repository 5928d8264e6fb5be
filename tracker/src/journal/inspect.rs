//! Read-only inspection of a journal, for `redun journal dump` and `redun journal check`.
//! Nothing here writes to the journal.

use std::io;

use serde::Serialize;

use super::format::*;
use super::{ChainEnd, JournalError, Scanner, Store, read_superblock};

const RECORD_ALIGN_USIZE: usize = 8;
const _: () = assert!(RECORD_ALIGN_USIZE as u64 == RECORD_ALIGN);

/// A record as the tools show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordInfo {
    pub seq: u64,
    pub kind: &'static str,
    pub offset: u64,
    pub length: u32,
    pub payload_len: u32,
    pub lap: u32,
    pub epoch: u32,
    /// Where it sits in the journal file.
    pub file_offset: u64,
}

/// A valid record found past the end of the chain: evidence that the end is damage in the
/// middle of the journal rather than its head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Orphan {
    pub seq: u64,
    pub file_offset: u64,
}

/// What inspection found.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub capacity: u64,
    pub volume_size: u64,
    pub volume_uuid: String,
    pub clean: bool,
    pub epoch: u32,
    pub tail_seq: u64,
    pub next_seq: u64,
    pub used_bytes: u64,
    pub records: Vec<RecordInfo>,
    pub end_file_offset: u64,
    pub end_seq: u64,
    pub end_reason: String,
    /// The chain ended as a chain should (zeroes, stale space, or the head of a cleanly
    /// closed journal).
    pub end_ok: bool,
    /// Valid records of this journal beyond the end, if any.
    pub orphans: Vec<Orphan>,
}

impl Inspection {
    /// No damage: the chain ends where it should and nothing valid lies beyond it.
    pub fn healthy(&self) -> bool {
        self.end_ok && self.orphans.is_empty()
    }
}

/// Reads the whole chain and looks for valid records beyond its end.
pub fn inspect<S: Store>(store: &S) -> Result<Inspection, JournalError> {
    let sb = read_superblock(store)?;
    let mut scan = Scanner::new(store, &sb, sb.tail_pos, sb.tail_seq);
    let mut records = Vec::new();
    while let Some(r) = scan.next_record() {
        let r = r?;
        let h = r.header;
        records.push(RecordInfo {
            seq: h.seq,
            kind: h.kind.name(),
            offset: h.offset,
            length: h.length,
            payload_len: h.payload_len,
            lap: h.lap,
            epoch: h.epoch,
            file_offset: RING_OFFSET + r.pos % sb.capacity,
        });
    }
    let end: ChainEnd = scan.end().cloned().expect("scan ended");
    let (head_pos, next_seq) = scan.position();
    let end_ok = if sb.clean {
        (sb.head_pos, sb.head_seq) == (head_pos, next_seq)
    } else {
        end.is_clean()
    };
    // Beyond the recorded head of a cleanly closed journal lie only leftovers (records cut
    // off by damage at an earlier start).
    let orphans = if sb.clean && end_ok {
        Vec::new()
    } else {
        records_beyond(store, &sb, head_pos, next_seq, scan.epoch, 16)?
    };
    let orphans = orphans
        .into_iter()
        .map(|(file_offset, h)| Orphan {
            seq: h.seq,
            file_offset,
        })
        .collect();
    Ok(Inspection {
        capacity: sb.capacity,
        volume_size: sb.volume_size,
        volume_uuid: sb.volume_uuid.iter().map(|b| format!("{b:02x}")).collect(),
        clean: sb.clean,
        epoch: sb.epoch,
        tail_seq: sb.tail_seq,
        next_seq,
        used_bytes: head_pos - sb.tail_pos,
        records,
        end_file_offset: end.file_offset,
        end_seq: end.seq,
        end_reason: end.why.to_string(),
        end_ok,
        orphans,
    })
}

/// Damage in the middle of a journal: its chain ends on a damaged record, yet records were
/// written after it (the journal was closed further on, or valid records follow).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Damage {
    /// The damaged record: where the chain ends.
    pub seq: u64,
    pub file_offset: u64,
    pub reason: String,
    /// Records lost from the chain: the damaged one and those after it.
    pub lost_records: u64,
    /// The volume ranges `(offset, length)` the lost records changed; `None` when they
    /// cannot all be known (a record is missing, or the damaged header is not plausible):
    /// then the whole volume must be taken as changed.
    pub ranges: Option<Vec<(u64, u64)>>,
}

/// Looks for damage in the middle of the journal, read-only. A torn record at the head of a
/// journal that was not closed cleanly, with nothing valid after it, is the normal trace of a
/// crash, not damage.
pub fn find_damage<S: Store>(store: &S) -> Result<Option<Damage>, JournalError> {
    let sb = read_superblock(store)?;
    let mut scan = Scanner::new(store, &sb, sb.tail_pos, sb.tail_seq);
    while let Some(r) = scan.next_record() {
        r?;
    }
    let end: ChainEnd = scan.end().cloned().expect("scan ended");
    let (head_pos, next_seq) = scan.position();
    if sb.clean && (sb.head_pos, sb.head_seq) == (head_pos, next_seq) {
        return Ok(None);
    }
    if !sb.clean && end.is_clean() {
        return Ok(None);
    }
    let mut after = records_beyond(store, &sb, head_pos, next_seq, scan.epoch, usize::MAX)?;
    after.sort_by_key(|(_, h)| h.seq);
    after.dedup_by_key(|(_, h)| h.seq);
    let last = if sb.clean {
        sb.head_seq.saturating_sub(1)
    } else {
        match after.last() {
            Some((_, h)) => h.seq,
            None => return Ok(None),
        }
    };
    if last < next_seq {
        return Ok(None);
    }
    // Every lost record must be known: the damaged one by a plausible header, the others
    // valid and contiguous up to the last one written.
    let complete = after.iter().map(|(_, h)| h.seq).eq(next_seq + 1..=last);
    let damaged = plausible_header(store, &sb, &end)?;
    let ranges = match damaged {
        Some(d) if complete => Some(
            std::iter::once(d)
                .chain(after.iter().map(|(_, h)| *h))
                .filter(|h| matches!(h.kind, Kind::Write | Kind::Trim | Kind::Zero))
                .filter(|h| h.length > 0)
                .map(|h| (h.offset, u64::from(h.length)))
                .collect(),
        ),
        _ => None,
    };
    Ok(Some(Damage {
        seq: end.seq,
        file_offset: end.file_offset,
        reason: end.why.to_string(),
        lost_records: last + 1 - next_seq,
        ranges,
    }))
}

/// The header of the record where the chain ended, if it reads like the record that belongs
/// there (a change of the right sequence number inside the volume). Its checksum failed, so
/// this is a best guess: the caller only relies on it when the records after it are intact.
fn plausible_header<S: Store>(
    store: &S,
    sb: &Superblock,
    end: &ChainEnd,
) -> io::Result<Option<RecordHeader>> {
    let mut hb = [0u8; RECORD_HEADER_LEN];
    store.read_at(&mut hb, end.file_offset)?;
    let room = sb.capacity - end.pos % sb.capacity;
    let Ok(h) = RecordHeader::decode(&hb, super::lap_of(end.pos, sb.capacity), room) else {
        return Ok(None);
    };
    let inside = h
        .offset
        .checked_add(u64::from(h.length))
        .is_some_and(|e| e <= sb.volume_size);
    let payload_fits = match h.kind {
        Kind::Write => h.payload_len == h.length,
        Kind::Trim | Kind::Zero => h.payload_len == 0,
        Kind::Marker | Kind::Pad | Kind::Sync | Kind::Decision => false,
    };
    Ok((h.seq == end.seq && h.epoch <= sb.epoch && inside && payload_fits).then_some(h))
}

/// Valid records (right lap and checksum, a sequence number past `next_seq`, and the epoch of
/// the chain's last record or later: leftovers from before a crash have older epochs) in the
/// part of the ring between the end of the chain and the tail, at most `max`, with their file
/// offsets.
fn records_beyond<S: Store>(
    store: &S,
    sb: &Superblock,
    from: u64,
    next_seq: u64,
    min_epoch: u32,
    max: usize,
) -> io::Result<Vec<(u64, RecordHeader)>> {
    const CHUNK: u64 = 1 << 20;
    let mut out = Vec::new();
    let limit = sb.tail_pos + sb.capacity;
    let mut pos = from + RECORD_ALIGN;
    let mut buf = Vec::new();
    while pos + RECORD_HEADER_LEN as u64 <= limit && out.len() < max {
        let phys = pos % sb.capacity;
        let n = CHUNK.min(sb.capacity - phys).min(limit - pos);
        buf.resize(usize::try_from(n).expect("at most CHUNK"), 0);
        store.read_at(&mut buf, RING_OFFSET + phys)?;
        let mut i = 0usize;
        while i + RECORD_HEADER_LEN <= buf.len() {
            if buf[i..i + 4] == RECORD_MAGIC.to_le_bytes() {
                let p = pos + i as u64;
                let hb: [u8; RECORD_HEADER_LEN] = buf[i..i + RECORD_HEADER_LEN]
                    .try_into()
                    .expect("slice of header size");
                let lap = super::lap_of(p, sb.capacity);
                let room = sb.capacity - p % sb.capacity;
                if let Ok(h) = RecordHeader::decode(&hb, lap, room) {
                    let mut payload = vec![0u8; h.payload_len as usize];
                    store.read_at(
                        &mut payload,
                        RING_OFFSET + p % sb.capacity + RECORD_HEADER_LEN as u64,
                    )?;
                    if h.seq > next_seq
                        && h.epoch >= min_epoch
                        && h.epoch <= sb.epoch
                        && h.kind != Kind::Pad
                        && h.verify(&payload, sb.salt).is_ok()
                    {
                        out.push((RING_OFFSET + p % sb.capacity, h));
                    }
                }
            }
            i += RECORD_ALIGN_USIZE;
        }
        // `i` is the first position whose header did not fit in this chunk: the next chunk
        // starts there (at the ring's end or the limit, nothing can start in that tail).
        let cut_short = phys + n < sb.capacity && pos + n < limit;
        pos += if cut_short { i as u64 } else { n };
    }
    Ok(out)
}
