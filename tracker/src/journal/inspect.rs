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
    let orphans = find_orphans(store, &sb, head_pos, next_seq, scan.epoch)?;
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

/// Valid records (right lap and checksum, a sequence number past `next_seq`, and the epoch of
/// the chain's last record or later: leftovers from before a crash have older epochs) in the
/// part of the ring between the end of the chain and the tail.
fn find_orphans<S: Store>(
    store: &S,
    sb: &Superblock,
    from: u64,
    next_seq: u64,
    min_epoch: u32,
) -> io::Result<Vec<Orphan>> {
    const CHUNK: u64 = 1 << 20;
    let mut out = Vec::new();
    let limit = sb.tail_pos + sb.capacity;
    let mut pos = from + RECORD_ALIGN;
    let mut buf = Vec::new();
    while pos + RECORD_HEADER_LEN as u64 <= limit && out.len() < 16 {
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
                        out.push(Orphan {
                            seq: h.seq,
                            file_offset: RING_OFFSET + p % sb.capacity,
                        });
                    }
                }
            }
            i += RECORD_ALIGN_USIZE;
        }
        pos += n;
    }
    Ok(out)
}
