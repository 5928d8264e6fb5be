//! The replication wire protocol between shipper and target (docs/PROTOCOL.md,
//! "Replication"). One TLS connection per volume; every message is a frame:
//!
//! ```text
//! 0   4  magic "RDR1"
//! 4   1  type
//! 5   3  zero
//! 8   4  body length, little endian (at most MAX_BODY)
//! 12  8  xxh3-64 of bytes 0..12 and of the body
//! 20  .. body
//! ```
//!
//! Integers are little endian. Decoding never trusts a length before checking it against a
//! limit, and every frame is checked whole before any of it is used.

use std::io::{self, Read, Write};

use redun_store::pack::Packer;
use xxhash_rust::xxh3::Xxh3;

pub const MAGIC: [u8; 4] = *b"RDR1";
pub const VERSION: u16 = 2;
pub const DEFAULT_PORT: u16 = 9443;
pub const HEADER_LEN: usize = 20;
/// Largest frame body: a batch of compressed records.
pub const MAX_BODY: u32 = 48 << 20;
/// Largest uncompressed batch: a 32 MiB write and its record header, and more.
pub const MAX_RAW: u32 = 48 << 20;
/// Bytes of one record's header inside a batch.
pub const RECORD_LEN: usize = 25;
/// Longest volume name.
pub const MAX_NAME: usize = 255;
/// Longest refusal message.
pub const MAX_MESSAGE: usize = 4096;

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_REFUSE: u8 = 3;
const T_BATCH: u8 = 4;
const T_ACK: u8 = 5;
const T_PING: u8 = 6;
const T_HASH_REQUEST: u8 = 7;
const T_HASHES: u8 = 8;
const T_REVERSE: u8 = 9;
const T_PASS: u8 = 10;
const T_RANGES: u8 = 11;
const T_BLOCKS: u8 = 12;
const T_DONE: u8 = 13;

/// Most ranges one RANGES frame carries (the target merges neighbours to stay below).
pub const MAX_RANGES: usize = 1 << 20;

/// Most blocks one HASH_REQUEST may ask for.
pub const MAX_HASHES: u64 = 1 << 16;
/// The hash that stands for a block of zeroes (whose content is not hashed).
pub const ZERO_HASH: u128 = 0;

/// What the shipper says first: which volume, and what it knows about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub name: String,
    pub uuid: [u8; 16],
    pub size: u64,
    pub generation: u64,
    /// The oldest record the journal still holds.
    pub tail_seq: u64,
}

/// Why the target refuses, and whether trying again later can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum RefuseCode {
    /// A malformed frame or an unexpected message.
    Protocol = 1,
    Version = 2,
    /// The volume's size differs from the replica's.
    SizeMismatch = 3,
    /// The volume's uuid differs from the replica's: another volume of the same name.
    IdentityMismatch = 4,
    /// The shipper's generation is older than the replica's (a stale primary) or newer.
    GenerationMismatch = 5,
    /// The stream skips records the replica lacks: the replica needs a resync.
    Gap = 6,
    /// The target is out of disk space.
    NoSpace = 7,
    /// Another shipper is connected for this volume.
    Busy = 8,
    /// An I/O error on the target.
    Io = 9,
    /// The replica cannot take changes (for example it is inconsistent after a failure).
    InvalidState = 10,
    InvalidName = 11,
}

impl RefuseCode {
    pub fn from_u16(v: u16) -> Option<RefuseCode> {
        use RefuseCode::*;
        Some(match v {
            1 => Protocol,
            2 => Version,
            3 => SizeMismatch,
            4 => IdentityMismatch,
            5 => GenerationMismatch,
            6 => Gap,
            7 => NoSpace,
            8 => Busy,
            9 => Io,
            10 => InvalidState,
            11 => InvalidName,
            _ => return None,
        })
    }

    /// True when retrying later may succeed without an operator.
    pub fn recoverable(self) -> bool {
        matches!(
            self,
            RefuseCode::NoSpace | RefuseCode::Busy | RefuseCode::Io | RefuseCode::Protocol
        )
    }
}

/// A batch as it travels: records `first_seq..=last_seq`, zstd-compressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub first_seq: u64,
    pub last_seq: u64,
    /// Bytes of the records once decompressed.
    pub raw_len: u32,
    pub compressed: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    /// The target's answer to HELLO: the first sequence number it has not applied (0: a new
    /// replica, which starts with the first batch it gets), and its generation.
    Welcome {
        next_seq: u64,
        generation: u64,
        /// The synchronisation under way on the replica (0: none) and how far its slots got:
        /// every dirty range below `sync_cursor` is synchronised.
        sync_job: u64,
        sync_cursor: u64,
    },
    Refuse {
        code: RefuseCode,
        message: String,
    },
    Batch(Batch),
    /// Every record up to `through` is durable on the target.
    Ack {
        through: u64,
    },
    /// Asks for an ACK (keeps an idle connection alive).
    Ping,
    /// Asks for the checksums of the replica's blocks of `[offset, offset + length)` as of
    /// every record sent before this frame (answered by [`Frame::Hashes`]).
    HashRequest {
        job: u64,
        offset: u64,
        length: u64,
        block: u32,
    },
    /// xxh3-128 of each block from `offset` on ([`ZERO_HASH`] for a block of zeroes), as of
    /// the record `as_of` (every record up to it applied).
    Hashes {
        job: u64,
        offset: u64,
        block: u32,
        as_of: u64,
        hashes: Vec<u128>,
    },
    /// Failback (docs/PROTOCOL.md, "Failback"): the old primary asks to pull the volume
    /// failed over to the target back onto its own device. Answered by RANGES.
    Reverse(Hello),
    /// Failback: asks which ranges the next comparison pass covers.
    Pass,
    /// Failback: the ranges of the next pass. With `last`, the promoted volume takes no more
    /// writes: once these ranges are copied, the old primary's device equals it.
    Ranges {
        last: bool,
        /// The point the promoted volume started from, the replica's last applied record,
        /// and the relationship's generation.
        point: u64,
        applied: u64,
        generation: u64,
        ranges: Vec<(u64, u64)>,
    },
    /// Failback: the answer to the old primary's HASHES: every block of `[offset, offset +
    /// length)` whose content differs, as write or zero records (none: `batch` is `None`).
    Blocks {
        offset: u64,
        length: u64,
        batch: Option<Batch>,
    },
    /// Failback: the last pass is on the old primary's device, durably, up to its journal's
    /// record `head`. Answered by WELCOME with the next generation.
    Done {
        head: u64,
    },
}

/// One journal record in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireRecord {
    pub seq: u64,
    /// The journal's record kind (write, trim, zero, marker).
    pub kind: u8,
    pub offset: u64,
    pub length: u32,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

fn bad(msg: impl Into<String>) -> ProtoError {
    ProtoError::Malformed(msg.into())
}

/// Cursor over a frame body.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.0.len() < n {
            return Err(bad("body too short"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn end(&self) -> Result<(), ProtoError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(bad("trailing bytes in body"))
        }
    }
}

/// The frame checksum over the first 12 header bytes and the body, given in `parts`.
fn checksum(parts: &[&[u8]]) -> u64 {
    let mut h = Xxh3::new();
    for p in parts {
        h.update(p);
    }
    h.digest()
}

/// A frame as its header, the start of its body, and the rest of the body borrowed from the
/// frame (a batch's compressed records, so that they are never copied to be sent).
fn parts(f: &Frame) -> ([u8; HEADER_LEN], Vec<u8>, &[u8]) {
    let mut body = Vec::new();
    let mut tail: &[u8] = &[];
    let ty = match f {
        Frame::Hello(h) => {
            hello_body(h, &mut body);
            T_HELLO
        }
        Frame::Welcome {
            next_seq,
            generation,
            sync_job,
            sync_cursor,
        } => {
            put_u64s(
                &mut body,
                &[*next_seq, *generation, *sync_job, *sync_cursor],
            );
            T_WELCOME
        }
        Frame::Refuse { code, message } => {
            body.extend_from_slice(&(*code as u16).to_le_bytes());
            let mut end = message.len().min(MAX_MESSAGE);
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            body.extend_from_slice(&message.as_bytes()[..end]);
            T_REFUSE
        }
        Frame::Batch(b) => {
            body.extend_from_slice(&batch_prefix(b));
            tail = &b.compressed;
            T_BATCH
        }
        Frame::Ack { through } => {
            body.extend_from_slice(&through.to_le_bytes());
            T_ACK
        }
        Frame::Ping => T_PING,
        Frame::HashRequest {
            job,
            offset,
            length,
            block,
        } => {
            put_u64s(&mut body, &[*job, *offset, *length]);
            body.extend_from_slice(&block.to_le_bytes());
            T_HASH_REQUEST
        }
        Frame::Hashes {
            job,
            offset,
            block,
            as_of,
            hashes,
        } => {
            put_u64s(&mut body, &[*job, *offset, *as_of]);
            body.extend_from_slice(&block.to_le_bytes());
            put_count(&mut body, hashes.len());
            for h in hashes {
                body.extend_from_slice(&h.to_le_bytes());
            }
            T_HASHES
        }
        Frame::Reverse(h) => {
            hello_body(h, &mut body);
            T_REVERSE
        }
        Frame::Pass => T_PASS,
        Frame::Ranges {
            last,
            point,
            applied,
            generation,
            ranges,
        } => {
            body.extend_from_slice(&u64::from(*last).to_le_bytes());
            put_u64s(&mut body, &[*point, *applied, *generation]);
            let n = ranges.len().min(MAX_RANGES);
            put_count(&mut body, n);
            for (a, l) in &ranges[..n] {
                body.extend_from_slice(&a.to_le_bytes());
                body.extend_from_slice(&l.to_le_bytes());
            }
            T_RANGES
        }
        Frame::Blocks {
            offset,
            length,
            batch,
        } => {
            body.extend_from_slice(&offset.to_le_bytes());
            body.extend_from_slice(&length.to_le_bytes());
            if let Some(b) = batch {
                body.extend_from_slice(&batch_prefix(b));
                tail = &b.compressed;
            }
            T_BLOCKS
        }
        Frame::Done { head } => {
            body.extend_from_slice(&head.to_le_bytes());
            T_DONE
        }
    };
    let mut head = [0u8; HEADER_LEN];
    head[..4].copy_from_slice(&MAGIC);
    head[4] = ty;
    let len = u32::try_from(body.len() + tail.len()).unwrap_or(u32::MAX);
    head[8..12].copy_from_slice(&len.to_le_bytes());
    let sum = checksum(&[&head[..12], &body, tail]);
    head[12..20].copy_from_slice(&sum.to_le_bytes());
    (head, body, tail)
}

fn put_u64s(body: &mut Vec<u8>, vs: &[u64]) {
    for v in vs {
        body.extend_from_slice(&v.to_le_bytes());
    }
}

/// A list's length as u32 (the lists sent are far shorter).
fn put_count(body: &mut Vec<u8>, n: usize) {
    body.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

fn hello_body(h: &Hello, body: &mut Vec<u8>) {
    body.extend_from_slice(&h.version.to_le_bytes());
    body.extend_from_slice(&h.uuid);
    body.extend_from_slice(&h.size.to_le_bytes());
    body.extend_from_slice(&h.generation.to_le_bytes());
    body.extend_from_slice(&h.tail_seq.to_le_bytes());
    let name = &h.name.as_bytes()[..h.name.len().min(MAX_NAME)];
    body.push(u8::try_from(name.len()).expect("at most 255"));
    body.extend_from_slice(name);
}

fn decode_hello(b: &mut Body<'_>) -> Result<Hello, ProtoError> {
    let version = b.u16()?;
    let uuid: [u8; 16] = b.take(16)?.try_into().expect("16");
    let size = b.u64()?;
    let generation = b.u64()?;
    let tail_seq = b.u64()?;
    let n = b.u8()? as usize;
    let name = std::str::from_utf8(b.take(n)?)
        .map_err(|_| bad("volume name is not UTF-8"))?
        .to_string();
    Ok(Hello {
        version,
        name,
        uuid,
        size,
        generation,
        tail_seq,
    })
}

/// Encodes a frame (header and body).
pub fn encode(f: &Frame) -> Vec<u8> {
    let (head, body, tail) = parts(f);
    [&head[..], &body, tail].concat()
}

/// Writes a frame; a batch's compressed bytes go out without being copied into a frame
/// buffer first.
pub fn write_frame<W: Write>(w: &mut W, f: &Frame) -> io::Result<()> {
    let (head, body, tail) = parts(f);
    w.write_all(&[&head[..], &body].concat())?;
    if !tail.is_empty() {
        w.write_all(tail)?;
    }
    w.flush()
}

/// The fixed part of a BATCH body, before the compressed records.
const BATCH_PREFIX: usize = 20;

fn batch_prefix(b: &Batch) -> [u8; BATCH_PREFIX] {
    let mut p = [0u8; BATCH_PREFIX];
    p[..8].copy_from_slice(&b.first_seq.to_le_bytes());
    p[8..16].copy_from_slice(&b.last_seq.to_le_bytes());
    p[16..20].copy_from_slice(&b.raw_len.to_le_bytes());
    p
}

/// Checks a frame header; returns the type and the body length.
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<(u8, u32), ProtoError> {
    if h[..4] != MAGIC {
        return Err(bad("bad magic: the peer does not speak redun replication"));
    }
    if h[5..8] != [0, 0, 0] {
        return Err(bad("reserved header bytes are not zero"));
    }
    let len = u32::from_le_bytes(h[8..12].try_into().expect("4"));
    if len > MAX_BODY {
        return Err(bad(format!("body of {len} bytes exceeds {MAX_BODY}")));
    }
    Ok((h[4], len))
}

/// Decodes a whole frame from its header and body.
pub fn decode(h: &[u8; HEADER_LEN], body: &[u8]) -> Result<Frame, ProtoError> {
    let (ty, len) = decode_header(h)?;
    if body.len() != len as usize {
        return Err(bad("body length differs from the header's"));
    }
    let want = u64::from_le_bytes(h[12..20].try_into().expect("8"));
    if checksum(&[&h[..12], body]) != want {
        return Err(bad("checksum mismatch"));
    }
    let mut b = Body(body);
    let f = match ty {
        T_HELLO => Frame::Hello(decode_hello(&mut b)?),
        T_REVERSE => Frame::Reverse(decode_hello(&mut b)?),
        T_PASS => Frame::Pass,
        T_RANGES => {
            let last = match b.u64()? {
                0 => false,
                1 => true,
                v => return Err(bad(format!("RANGES flag {v}"))),
            };
            let (point, applied, generation) = (b.u64()?, b.u64()?, b.u64()?);
            let n = b.u32()? as usize;
            if n > MAX_RANGES {
                return Err(bad(format!("{n} ranges exceed {MAX_RANGES}")));
            }
            let mut ranges = Vec::with_capacity(n.min(b.0.len() / 16));
            for _ in 0..n {
                let (a, l) = (b.u64()?, b.u64()?);
                if l == 0 || a.checked_add(l).is_none() {
                    return Err(bad(format!("range {a}+{l}")));
                }
                ranges.push((a, l));
            }
            Frame::Ranges {
                last,
                point,
                applied,
                generation,
                ranges,
            }
        }
        T_BLOCKS => {
            let (offset, length) = (b.u64()?, b.u64()?);
            if offset.checked_add(length).is_none() {
                return Err(bad(format!("blocks range {offset}+{length}")));
            }
            let batch = if b.0.is_empty() {
                None
            } else {
                let (first_seq, last_seq, raw_len) = (b.u64()?, b.u64()?, b.u32()?);
                let compressed = b.take(b.0.len())?.to_vec();
                Some(check_batch(first_seq, last_seq, raw_len, compressed)?)
            };
            Frame::Blocks {
                offset,
                length,
                batch,
            }
        }
        T_DONE => Frame::Done { head: b.u64()? },
        T_WELCOME => Frame::Welcome {
            next_seq: b.u64()?,
            generation: b.u64()?,
            sync_job: b.u64()?,
            sync_cursor: b.u64()?,
        },
        T_REFUSE => {
            let raw = b.u16()?;
            let code =
                RefuseCode::from_u16(raw).ok_or_else(|| bad(format!("refusal code {raw}")))?;
            let rest = b.take(b.0.len())?;
            if rest.len() > MAX_MESSAGE {
                return Err(bad("refusal message too long"));
            }
            Frame::Refuse {
                code,
                message: String::from_utf8_lossy(rest).into_owned(),
            }
        }
        T_BATCH => {
            let first_seq = b.u64()?;
            let last_seq = b.u64()?;
            let raw_len = b.u32()?;
            let compressed = b.take(b.0.len())?.to_vec();
            Frame::Batch(check_batch(first_seq, last_seq, raw_len, compressed)?)
        }
        T_ACK => Frame::Ack { through: b.u64()? },
        T_PING => Frame::Ping,
        T_HASH_REQUEST => {
            let (job, offset, length, block) = (b.u64()?, b.u64()?, b.u64()?, b.u32()?);
            check_blocks(offset, length, block)?;
            Frame::HashRequest {
                job,
                offset,
                length,
                block,
            }
        }
        T_HASHES => {
            let (job, offset, as_of, block) = (b.u64()?, b.u64()?, b.u64()?, b.u32()?);
            let n = u64::from(b.u32()?);
            check_blocks(offset, n * u64::from(block), block)?;
            let raw = b.take(usize::try_from(n * 16).map_err(|_| bad("too many hashes"))?)?;
            let hashes = raw
                .chunks_exact(16)
                .map(|c| u128::from_le_bytes(c.try_into().expect("16")))
                .collect();
            Frame::Hashes {
                job,
                offset,
                block,
                as_of,
                hashes,
            }
        }
        t => return Err(bad(format!("unknown frame type {t}"))),
    };
    b.end()?;
    Ok(f)
}

/// Checks the block geometry of a hash request or answer: a power-of-two block from 4 KiB to
/// 4 MiB, an aligned range of at most [`MAX_HASHES`] blocks.
fn check_blocks(offset: u64, length: u64, block: u32) -> Result<(), ProtoError> {
    let b = u64::from(block);
    if !block.is_power_of_two() || !(4096..=4 << 20).contains(&b) {
        return Err(bad(format!(
            "block size {block}: expected a power of two from 4K to 4M"
        )));
    }
    if offset % b != 0 || length.div_ceil(b) > MAX_HASHES || offset.checked_add(length).is_none() {
        return Err(bad(format!(
            "hash range {offset}+{length} is not aligned to {block} or too long"
        )));
    }
    Ok(())
}

/// A block's checksum for synchronisation: [`ZERO_HASH`] for zeroes (checked without
/// hashing), else xxh3-128 (never [`ZERO_HASH`]).
pub fn block_hash(b: &[u8]) -> u128 {
    let (tail, words) = b.split_at(b.len() % 16);
    let zero = tail.iter().all(|&x| x == 0)
        && words
            .chunks_exact(16)
            .all(|c| u128::from_ne_bytes(c.try_into().expect("16")) == 0);
    if zero {
        ZERO_HASH
    } else {
        xxhash_rust::xxh3::xxh3_128(b).max(1)
    }
}

/// One block range a sync slot carries on the wire: data, or zeroes.
pub use redun_tracker::journal::format::BlockExtent as SyncBlock;

/// Flag of a filled slot: its blocks are every block of the slot's range that differed.
pub const SLOT_FILLED: u64 = 1;

/// The wire payload of a filled sync slot: the journal's sync payload, flags, then each block.
pub fn encode_slot(journal_payload: &[u8], blocks: &[SyncBlock<'_>], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(journal_payload);
    out.extend_from_slice(&SLOT_FILLED.to_le_bytes());
    redun_tracker::journal::format::encode_extents(blocks, out);
}

/// The blocks of a slot's wire payload (empty when the slot was not filled: its shipper is
/// gone, a later slot will cover the range). Each block must lie inside `[start, end)`.
pub fn decode_slot(
    payload: &[u8],
    start: u64,
    end: u64,
) -> Result<Option<Vec<SyncBlock<'_>>>, ProtoError> {
    use redun_tracker::journal::format::SYNC_LEN;
    if payload.len() == SYNC_LEN {
        return Ok(None);
    }
    let mut b = Body(
        payload
            .get(SYNC_LEN..)
            .ok_or_else(|| bad("short sync slot"))?,
    );
    if b.u64()? != SLOT_FILLED {
        return Err(bad("sync slot flags"));
    }
    redun_tracker::journal::format::decode_extents(b.0, start, end)
        .map(Some)
        .map_err(|e| bad(format!("sync slot: {e}")))
}

/// Reads one frame. A peer that closes between frames gives [`ProtoError::Closed`].
pub fn read_frame<R: Read>(r: &mut R) -> Result<Frame, ProtoError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Err(ProtoError::Closed),
            Ok(0) => return Err(bad("truncated frame header")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (ty, len) = decode_header(&h)?;
    let truncated = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            bad("truncated frame body")
        } else {
            e.into()
        }
    };
    if ty == T_BATCH && len as usize >= BATCH_PREFIX {
        // The compressed records are read straight into the batch's own buffer.
        let mut prefix = [0u8; BATCH_PREFIX];
        r.read_exact(&mut prefix).map_err(truncated)?;
        let mut compressed = vec![0u8; len as usize - BATCH_PREFIX];
        r.read_exact(&mut compressed).map_err(truncated)?;
        if checksum(&[&h[..12], &prefix, &compressed])
            != u64::from_le_bytes(h[12..20].try_into().expect("8"))
        {
            return Err(bad("checksum mismatch"));
        }
        let mut b = Body(&prefix);
        let (first_seq, last_seq, raw_len) = (b.u64()?, b.u64()?, b.u32()?);
        return check_batch(first_seq, last_seq, raw_len, compressed).map(Frame::Batch);
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).map_err(truncated)?;
    decode(&h, &body)
}

fn check_batch(
    first_seq: u64,
    last_seq: u64,
    raw_len: u32,
    compressed: Vec<u8>,
) -> Result<Batch, ProtoError> {
    if first_seq == 0 || last_seq < first_seq {
        return Err(bad(format!("batch covers seq {first_seq}..={last_seq}")));
    }
    if raw_len > MAX_RAW {
        return Err(bad(format!("batch of {raw_len} bytes exceeds {MAX_RAW}")));
    }
    Ok(Batch {
        first_seq,
        last_seq,
        raw_len,
        compressed,
    })
}

/// A record of a decoded batch, its payload borrowed from the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub seq: u64,
    pub kind: u8,
    pub offset: u64,
    pub length: u32,
    pub payload: &'a [u8],
}

/// Packs records into batches, keeping its zstd context and buffers from one batch to the
/// next (a batch is megabytes: fresh buffers would cost page faults every time).
///
/// Data that does not compress (already compressed or encrypted blocks) is not worth the
/// configured level's effort: after a batch that shrinks by less than 3%, the next
/// [`FAST_BATCHES`] use zstd's fastest level ([`Packer`]).
pub struct BatchEncoder {
    packer: Packer,
    raw: Vec<u8>,
    spare: Vec<u8>,
}

const FAST_BATCHES: u32 = 32;

impl std::fmt::Debug for BatchEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchEncoder").finish_non_exhaustive()
    }
}

impl BatchEncoder {
    pub fn new(level: i32) -> io::Result<BatchEncoder> {
        Ok(BatchEncoder {
            packer: Packer::new(level, FAST_BATCHES)?,
            raw: Vec::new(),
            spare: Vec::new(),
        })
    }

    /// Packs records (consecutive sequence numbers) into a batch.
    pub fn encode(&mut self, records: &[WireRecord]) -> io::Result<Batch> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Err(io::Error::other("a batch needs at least one record"));
        };
        self.raw.clear();
        for r in records {
            self.raw.extend_from_slice(&r.seq.to_le_bytes());
            self.raw.push(r.kind);
            self.raw.extend_from_slice(&r.offset.to_le_bytes());
            self.raw.extend_from_slice(&r.length.to_le_bytes());
            self.raw.extend_from_slice(
                &u32::try_from(r.payload.len())
                    .unwrap_or(u32::MAX)
                    .to_le_bytes(),
            );
            self.raw.extend_from_slice(&r.payload);
        }
        let raw_len = u32::try_from(self.raw.len())
            .ok()
            .filter(|&n| n <= MAX_RAW)
            .ok_or_else(|| {
                io::Error::other(format!("batch of {} bytes is too large", self.raw.len()))
            })?;
        let mut out = std::mem::take(&mut self.spare);
        // A batch is always sent compressed, even when that did not save much.
        self.packer.compress(&self.raw, &mut out)?;
        Ok(Batch {
            first_seq: first.seq,
            last_seq: last.seq,
            raw_len,
            compressed: out,
        })
    }

    /// Takes a sent batch's buffer back for the next one.
    pub fn recycle(&mut self, b: Batch) {
        self.spare = b.compressed;
    }
}

/// Unpacks batches, keeping its zstd context and buffer.
pub struct BatchDecoder {
    dctx: zstd::bulk::Decompressor<'static>,
    raw: Vec<u8>,
}

impl std::fmt::Debug for BatchDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchDecoder").finish_non_exhaustive()
    }
}

impl BatchDecoder {
    pub fn new() -> io::Result<BatchDecoder> {
        Ok(BatchDecoder {
            dctx: zstd::bulk::Decompressor::new()?,
            raw: Vec::new(),
        })
    }

    /// Unpacks a batch: the records must cover `first_seq..=last_seq` exactly, in order.
    pub fn decode(&mut self, b: &Batch) -> Result<Vec<RecordRef<'_>>, ProtoError> {
        if b.raw_len > MAX_RAW {
            return Err(bad("batch too large"));
        }
        self.raw.clear();
        self.raw.reserve(b.raw_len as usize);
        let n = self
            .dctx
            .decompress_to_buffer(&b.compressed, &mut self.raw)
            .map_err(|e| bad(format!("batch does not decompress: {e}")))?;
        if n != b.raw_len as usize || self.raw.len() != n {
            return Err(bad("batch decompresses to another length than announced"));
        }
        let mut body = Body(&self.raw);
        let mut out = Vec::new();
        let mut expect = b.first_seq;
        while !body.0.is_empty() {
            let seq = body.u64()?;
            if seq != expect || seq > b.last_seq {
                return Err(bad(format!("record seq {seq} where {expect} was expected")));
            }
            let kind = body.u8()?;
            let offset = body.u64()?;
            let length = body.u32()?;
            let n = body.u32()? as usize;
            let payload = body.take(n)?;
            out.push(RecordRef {
                seq,
                kind,
                offset,
                length,
                payload,
            });
            expect += 1;
        }
        if expect != b.last_seq + 1 {
            return Err(bad(format!(
                "batch announces seq {}..={} but holds records up to {}",
                b.first_seq,
                b.last_seq,
                expect - 1
            )));
        }
        Ok(out)
    }
}

/// Packs records into a batch compressed at `level` (a one-off [`BatchEncoder`]).
pub fn encode_batch(records: &[WireRecord], level: i32) -> io::Result<Batch> {
    BatchEncoder::new(level)?.encode(records)
}

/// Unpacks a batch into owned records (a one-off [`BatchDecoder`]).
pub fn decode_batch(b: &Batch) -> Result<Vec<WireRecord>, ProtoError> {
    let mut d = BatchDecoder::new().map_err(ProtoError::Io)?;
    let recs = d.decode(b)?;
    Ok(recs
        .into_iter()
        .map(|r| WireRecord {
            seq: r.seq,
            kind: r.kind,
            offset: r.offset,
            length: r.length,
            payload: r.payload.to_vec(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames() -> Vec<Frame> {
        let recs = vec![
            WireRecord {
                seq: 7,
                kind: 1,
                offset: 4096,
                length: 5,
                payload: b"hello".to_vec(),
            },
            WireRecord {
                seq: 8,
                kind: 2,
                offset: 0,
                length: 1 << 20,
                payload: vec![],
            },
        ];
        vec![
            Frame::Hello(Hello {
                version: VERSION,
                name: "vol-é".into(),
                uuid: [9; 16],
                size: 1 << 30,
                generation: 3,
                tail_seq: 7,
            }),
            Frame::Welcome {
                next_seq: 7,
                generation: 3,
                sync_job: 11,
                sync_cursor: 1 << 20,
            },
            Frame::Refuse {
                code: RefuseCode::Gap,
                message: "needs a resync".into(),
            },
            Frame::Batch(encode_batch(&recs, 3).unwrap()),
            Frame::Ack { through: 8 },
            Frame::Ping,
            Frame::HashRequest {
                job: 11,
                offset: 1 << 20,
                length: 8 << 20,
                block: 65536,
            },
            Frame::Hashes {
                job: 11,
                offset: 1 << 20,
                block: 65536,
                as_of: 8,
                hashes: vec![ZERO_HASH, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210],
            },
            Frame::Reverse(Hello {
                version: VERSION,
                name: "db".into(),
                uuid: [3; 16],
                size: 1 << 30,
                generation: 1,
                tail_seq: 1,
            }),
            Frame::Pass,
            Frame::Ranges {
                last: true,
                point: 9,
                applied: 12,
                generation: 2,
                ranges: vec![(0, 4096), (1 << 20, 65536)],
            },
            Frame::Blocks {
                offset: 0,
                length: 8 << 20,
                batch: Some(encode_batch(&recs, 3).unwrap()),
            },
            Frame::Blocks {
                offset: 8 << 20,
                length: 8 << 20,
                batch: None,
            },
            Frame::Done { head: 40 },
        ]
    }

    #[test]
    fn frames_round_trip() {
        for f in frames() {
            let bytes = encode(&f);
            let got = read_frame(&mut &bytes[..]).unwrap();
            assert_eq!(got, f);
        }
        let Frame::Batch(b) = &frames()[3] else {
            unreachable!()
        };
        let recs = decode_batch(b).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].payload, b"hello");
    }

    #[test]
    fn slots_round_trip_and_stay_inside_their_range() {
        use redun_tracker::journal::format::{SyncInfo, SyncRole};
        let head = SyncInfo {
            role: SyncRole::Slot,
            job: 4,
        }
        .encode();
        let data = [7u8; 4096];
        let blocks = [
            SyncBlock {
                offset: 65536,
                length: 4096,
                data: Some(&data),
            },
            SyncBlock {
                offset: 131072,
                length: 65536,
                data: None,
            },
        ];
        let mut out = Vec::new();
        encode_slot(&head, &blocks, &mut out);
        assert_eq!(decode_slot(&out, 65536, 196608).unwrap().unwrap(), blocks);
        assert!(decode_slot(&out, 65536, 196607).is_err());
        assert_eq!(decode_slot(&head, 0, 1).unwrap(), None);
        assert!(decode_slot(&out[..out.len() - 1], 65536, 196608).is_err());
    }

    #[test]
    fn ranges_must_be_non_empty_and_inside_u64() {
        for r in [(0, 0), (u64::MAX, 2)] {
            let f = Frame::Ranges {
                last: false,
                point: 1,
                applied: 1,
                generation: 2,
                ranges: vec![r],
            };
            assert!(read_frame(&mut &encode(&f)[..]).is_err(), "{f:?}");
        }
    }

    #[test]
    fn hash_requests_need_aligned_power_of_two_blocks() {
        for (offset, length, block) in [(1, 65536, 65536), (0, 65536, 3000), (0, 1 << 40, 65536)] {
            let f = Frame::HashRequest {
                job: 1,
                offset,
                length,
                block,
            };
            assert!(read_frame(&mut &encode(&f)[..]).is_err(), "{f:?}");
        }
    }

    #[test]
    fn every_flipped_byte_and_every_cut_is_refused() {
        for f in frames() {
            let bytes = encode(&f);
            for i in 0..bytes.len() {
                let mut b = bytes.clone();
                b[i] ^= 0x40;
                assert!(read_frame(&mut &b[..]).is_err(), "flip at {i} of {f:?}");
            }
            for cut in 1..bytes.len() {
                assert!(read_frame(&mut &bytes[..cut]).is_err(), "cut at {cut}");
            }
        }
        assert!(matches!(read_frame(&mut &[][..]), Err(ProtoError::Closed)));
    }

    #[test]
    fn batches_must_hold_what_they_announce() {
        let recs: Vec<_> = (5..9)
            .map(|s| WireRecord {
                seq: s,
                kind: 1,
                offset: s * 512,
                length: 3,
                payload: vec![u8::try_from(s).unwrap(); 3],
            })
            .collect();
        let good = encode_batch(&recs, 1).unwrap();
        let mut b = good.clone();
        b.last_seq = 9;
        assert!(decode_batch(&b).is_err());
        let mut b = good.clone();
        b.first_seq = 4;
        assert!(decode_batch(&b).is_err());
        let mut b = good.clone();
        b.raw_len -= 1;
        assert!(decode_batch(&b).is_err());
        let mut b = good;
        b.compressed.truncate(b.compressed.len() / 2);
        assert!(decode_batch(&b).is_err());
        // Non-consecutive records never make a valid batch.
        let mut gap = recs.clone();
        gap[2].seq = 10;
        gap[3].seq = 11;
        let b = encode_batch(&gap, 1).unwrap();
        assert!(decode_batch(&b).is_err());
    }

    #[test]
    fn incompressible_data_switches_to_the_fast_level_and_back() {
        let mut e = BatchEncoder::new(3).unwrap();
        let mut x = 0x1234_5678_9abc_def0u64;
        let noise: Vec<u8> = (0..1 << 16)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect();
        let rec = |seq, payload: &[u8]| WireRecord {
            seq,
            kind: 1,
            offset: 0,
            length: u32::try_from(payload.len()).unwrap(),
            payload: payload.to_vec(),
        };
        let b = e.encode(&[rec(1, &noise)]).unwrap();
        assert_eq!(decode_batch(&b).unwrap()[0].payload, noise);
        assert_eq!(e.packer.fast_left(), FAST_BATCHES);
        // Compressible data brings the configured level back at once.
        let b = e.encode(&[rec(2, &vec![7u8; 1 << 16])]).unwrap();
        assert!(b.compressed.len() < 1000);
        assert_eq!(e.packer.fast_left(), 0);
        assert_eq!(decode_batch(&b).unwrap()[0].payload, vec![7u8; 1 << 16]);
    }

    #[test]
    fn oversized_lengths_are_refused_before_allocating() {
        let mut bytes = encode(&Frame::Ping);
        bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = read_frame(&mut &bytes[..]).unwrap_err().to_string();
        assert!(e.contains("exceeds"), "{e}");
    }
}
