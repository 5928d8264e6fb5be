//! The journal's on-disk format, mirroring docs/FORMAT.md ("Ring journal"). Little-endian.
//!
//! ```text
//! file:   [ superblock slot 0 | superblock slot 1 | ring ........................... ]
//!         0                  4096               8192                     8192 + capacity
//! record: [ header (48 bytes) | payload (payload_len bytes) | zero padding to 8 bytes ]
//! ```
//!
//! A record's position is a *logical* byte offset `L` that only grows: it lives at file offset
//! `RING_OFFSET + L % capacity`, in lap `L / capacity`. Three things keep old bytes from ever
//! passing for a current record, each stored in the header and mixed into the checksum seed:
//! - the lap: a record left over from an earlier lap of the ring;
//! - the epoch, raised after every unclean recovery: a record written before a crash, beyond the
//!   recovered head, that a shorter chain of new records happens to line up with;
//! - the journal's random salt: a record of an earlier journal in the same file.

use xxhash_rust::xxh3::Xxh3;

/// Size of one superblock slot; the two slots are written alternately.
pub const SUPERBLOCK_SLOT: u64 = 4096;
/// File offset of the ring.
pub const RING_OFFSET: u64 = 2 * SUPERBLOCK_SLOT;
/// The ring's capacity is a multiple of this.
pub const RING_ALIGN: u64 = 4096;
/// Records start at multiples of this (logical and physical).
pub const RECORD_ALIGN: u64 = 8;
/// Smallest journal file: both superblocks and a 1 MiB ring.
pub const MIN_FILE_SIZE: u64 = RING_OFFSET + (1 << 20);

/// `\x89RDJ\r\n\x1a\n`: PNG-style, catches text-mode and truncation damage.
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"\x89RDJ\r\n\x1a\n";
/// Version 2 adds the checkpoint (the write-ahead journal); version 1 is still read.
pub const SUPERBLOCK_VERSION: u32 = 2;
/// Bytes of a slot covered by the superblock encoding (the rest of the slot is zero).
pub const SUPERBLOCK_LEN: usize = 128;
const SUPERBLOCK_LEN_U32: u32 = 128;
/// The encoding of a version 1 superblock (no checkpoint).
const SUPERBLOCK_V1_LEN: u32 = 120;

/// `RJR1` as little-endian bytes on disk.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"RJR1");
pub const RECORD_VERSION: u8 = 1;
pub const RECORD_HEADER_LEN: usize = 48;
/// Largest payload of one record (the NBD layer's maximum request).
pub const MAX_PAYLOAD: u32 = 32 << 20;

const _: () = assert!(RING_OFFSET % RING_ALIGN == 0);
const _: () = assert!(RECORD_HEADER_LEN as u64 % RECORD_ALIGN == 0);
const _: () = assert!(SUPERBLOCK_LEN as u64 <= SUPERBLOCK_SLOT);

/// What a record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Data written to `[offset, offset + length)`; the payload is the data.
    Write = 1,
    /// `[offset, offset + length)` was trimmed (contents undefined, the target zeroes it).
    Trim = 2,
    /// `[offset, offset + length)` was zeroed.
    Zero = 3,
    /// A consistency point; the payload is the point's identity, `offset`/`length` are 0.
    Marker = 4,
    /// Filler up to the end of the ring; `length` is the filler's size. Carries the sequence
    /// number of the next real record and does not consume it.
    Pad = 5,
    /// A step of a block-checksum synchronisation ([`SyncInfo`]): its begin, a slot the
    /// shipper fills with the blocks of `[offset, offset + length)` that differ, or its end.
    Sync = 6,
    /// A consistency group's decision on one of its points ([`GroupDecision`], JSON):
    /// commit or abort. `offset`/`length` are 0.
    Decision = 7,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Write,
            2 => Kind::Trim,
            3 => Kind::Zero,
            4 => Kind::Marker,
            5 => Kind::Pad,
            6 => Kind::Sync,
            7 => Kind::Decision,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Write => "write",
            Kind::Trim => "trim",
            Kind::Zero => "zero",
            Kind::Marker => "marker",
            Kind::Pad => "pad",
            Kind::Sync => "sync",
            Kind::Decision => "decision",
        }
    }
}

/// A record header as stored (48 bytes):
///
/// | off | size | field |
/// | --- | --- | --- |
/// | 0 | 4 | magic `RJR1` |
/// | 4 | 1 | version (1) |
/// | 5 | 1 | kind |
/// | 6 | 2 | flags (0) |
/// | 8 | 8 | sequence number |
/// | 16 | 8 | volume offset |
/// | 24 | 4 | length (volume bytes covered) |
/// | 28 | 4 | payload length |
/// | 32 | 4 | lap |
/// | 36 | 4 | epoch |
/// | 40 | 8 | xxh3-64 of bytes 0..40 and the payload, seeded with `salt ^ (epoch << 32 | lap)` |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: Kind,
    pub flags: u16,
    pub seq: u64,
    pub offset: u64,
    pub length: u32,
    pub payload_len: u32,
    pub lap: u32,
    pub epoch: u32,
    pub checksum: u64,
}

/// Why bytes are not a valid record where one was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// All header bytes are zero: never written (or zero-filled).
    Zeroed,
    BadMagic(u32),
    UnknownVersion(u8),
    UnknownKind(u8),
    /// A valid-looking record of another lap: stale data from before the ring wrapped.
    StaleLap {
        found: u32,
        expected: u32,
    },
    /// A record of an older epoch after one of a newer epoch (or of an epoch from the future):
    /// written before a crash that the journal has since recovered from.
    StaleEpoch {
        found: u32,
        expected: u32,
    },
    /// A valid record with an unexpected sequence number: a leftover of a cut-off chain.
    StaleSeq {
        found: u64,
        expected: u64,
    },
    /// Payload length larger than allowed or than the room left in the ring.
    BadLength(u32),
    /// Header and payload do not match the checksum: torn or corrupt.
    Checksum {
        stored: u64,
        computed: u64,
    },
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::Zeroed => write!(f, "zero-filled"),
            Invalid::BadMagic(m) => write!(f, "bad magic {m:#010x}"),
            Invalid::UnknownVersion(v) => write!(f, "unknown record version {v}"),
            Invalid::UnknownKind(k) => write!(f, "unknown record kind {k}"),
            Invalid::StaleLap { found, expected } => {
                write!(
                    f,
                    "stale record of lap {found} where lap {expected} was expected"
                )
            }
            Invalid::StaleEpoch { found, expected } => write!(
                f,
                "stale record of epoch {found} where epoch {expected} or later was expected"
            ),
            Invalid::StaleSeq { found, expected } => {
                write!(
                    f,
                    "stale record seq {found} where seq {expected} was expected"
                )
            }
            Invalid::BadLength(l) => write!(f, "impossible payload length {l}"),
            Invalid::Checksum { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:#018x}, computed {computed:#018x})"
            ),
        }
    }
}

/// Total bytes a record with `payload_len` bytes of payload takes in the ring.
pub fn record_size(payload_len: u32) -> u64 {
    (RECORD_HEADER_LEN as u64 + u64::from(payload_len)).next_multiple_of(RECORD_ALIGN)
}

/// The checksum seed of a record.
pub fn seed(salt: u64, lap: u32, epoch: u32) -> u64 {
    salt ^ (u64::from(epoch) << 32 | u64::from(lap))
}

/// The record checksum: xxh3-64 over header bytes 0..40 and the payload.
pub fn record_checksum(header40: &[u8], payload: &[u8], seed: u64) -> u64 {
    let mut h = Xxh3::with_seed(seed);
    h.update(&header40[..40]);
    h.update(payload);
    h.digest()
}

impl RecordHeader {
    /// Builds a header for `payload` and computes its checksum.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: Kind,
        seq: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
        lap: u32,
        epoch: u32,
        salt: u64,
    ) -> RecordHeader {
        let mut h = RecordHeader {
            kind,
            flags: 0,
            seq,
            offset,
            length,
            payload_len: u32::try_from(payload.len()).expect("payload fits the format"),
            lap,
            epoch,
            checksum: 0,
        };
        let b = h.encode();
        h.checksum = record_checksum(&b, payload, seed(salt, lap, epoch));
        h
    }

    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        b[4] = RECORD_VERSION;
        b[5] = self.kind as u8;
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.length.to_le_bytes());
        b[28..32].copy_from_slice(&self.payload_len.to_le_bytes());
        b[32..36].copy_from_slice(&self.lap.to_le_bytes());
        b[36..40].copy_from_slice(&self.epoch.to_le_bytes());
        b[40..48].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }

    /// Decodes a header found where a record of lap `expected_lap` should be, with at most
    /// `room` bytes left before the end of the ring. Epochs are checked by the caller, which
    /// knows the chain; the payload is checked with [`RecordHeader::verify`].
    pub fn decode(
        b: &[u8; RECORD_HEADER_LEN],
        expected_lap: u32,
        room: u64,
    ) -> Result<RecordHeader, Invalid> {
        if b.iter().all(|&x| x == 0) {
            return Err(Invalid::Zeroed);
        }
        let magic = le_u32(&b[0..4]);
        if magic != RECORD_MAGIC {
            return Err(Invalid::BadMagic(magic));
        }
        if b[4] != RECORD_VERSION {
            return Err(Invalid::UnknownVersion(b[4]));
        }
        let kind = Kind::from_u8(b[5]).ok_or(Invalid::UnknownKind(b[5]))?;
        let h = RecordHeader {
            kind,
            flags: le_u16(&b[6..8]),
            seq: le_u64(&b[8..16]),
            offset: le_u64(&b[16..24]),
            length: le_u32(&b[24..28]),
            payload_len: le_u32(&b[28..32]),
            lap: le_u32(&b[32..36]),
            epoch: le_u32(&b[36..40]),
            checksum: le_u64(&b[40..48]),
        };
        if h.lap != expected_lap {
            return Err(Invalid::StaleLap {
                found: h.lap,
                expected: expected_lap,
            });
        }
        if h.payload_len > MAX_PAYLOAD || record_size(h.payload_len) > room {
            return Err(Invalid::BadLength(h.payload_len));
        }
        Ok(h)
    }

    /// Checks the checksum against the header bytes and the payload.
    pub fn verify(&self, payload: &[u8], salt: u64) -> Result<(), Invalid> {
        let computed = record_checksum(&self.encode(), payload, seed(salt, self.lap, self.epoch));
        if computed == self.checksum {
            Ok(())
        } else {
            Err(Invalid::Checksum {
                stored: self.checksum,
                computed,
            })
        }
    }
}

/// The superblock (one per slot; the valid slot with the higher `update` wins):
///
/// | off | size | field |
/// | --- | --- | --- |
/// | 0 | 8 | magic `\x89RDJ\r\n\x1a\n` |
/// | 8 | 4 | version (2; 1 is read too) |
/// | 12 | 4 | length of this encoding (128; 120 in version 1) |
/// | 16 | 8 | update counter (slot = update % 2) |
/// | 24 | 16 | volume uuid |
/// | 40 | 8 | volume size |
/// | 48 | 8 | ring offset (8192) |
/// | 56 | 8 | ring capacity |
/// | 64 | 8 | tail position (logical offset of the oldest unreleased record) |
/// | 72 | 8 | tail sequence number (of that record) |
/// | 80 | 8 | head position when closed cleanly, else 0 |
/// | 88 | 8 | head sequence (next to write) when closed cleanly, else 0 |
/// | 96 | 4 | flags: bit 0 = closed cleanly |
/// | 100 | 4 | epoch of records written from now on |
/// | 104 | 8 | salt: random, chosen when the journal is created |
/// | 112 | 8 | checkpoint: every record before this sequence number is durable on the backing device (version 2) |
/// | 120 | 8 | xxh3-64 of bytes 0..120 (version 1: bytes 0..112, at 112) |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// The version this superblock was read in (written: always [`SUPERBLOCK_VERSION`]).
    pub version: u32,
    pub update: u64,
    pub volume_uuid: [u8; 16],
    pub volume_size: u64,
    pub ring_offset: u64,
    pub capacity: u64,
    pub tail_pos: u64,
    pub tail_seq: u64,
    pub head_pos: u64,
    pub head_seq: u64,
    pub clean: bool,
    pub epoch: u32,
    pub salt: u64,
    /// Records from this sequence number on may be missing from the backing device: start-up
    /// replays them (the write-ahead rule, docs/FORMAT.md). A version 1 journal, whose tracker
    /// applied every record before acknowledging it, reads as 0: nothing to replay.
    pub checkpoint_seq: u64,
}

/// Why a superblock slot is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadSuperblock {
    #[error("not a redun journal (bad magic)")]
    Magic,
    #[error("unsupported journal version {0}")]
    Version(u32),
    #[error("superblock checksum mismatch")]
    Checksum,
    #[error("inconsistent superblock: {0}")]
    Inconsistent(&'static str),
}

/// Length of a sequence file beside the journal (the release file, the durable mark):
/// an 8-byte magic, a sequence number, and xxh3-64 of the first 16 bytes.
pub const SEQ_FILE_LEN: usize = 24;

/// The bytes of a sequence file saying `seq`.
pub fn encode_seq_file(magic: &[u8; 8], seq: u64) -> [u8; SEQ_FILE_LEN] {
    let mut b = [0u8; SEQ_FILE_LEN];
    b[0..8].copy_from_slice(magic);
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&b[0..16]);
    b[16..24].copy_from_slice(&sum.to_le_bytes());
    b
}

/// The sequence number in a sequence file's bytes, or `None` when they are not a whole one
/// with `magic` (damaged, or a write in progress).
pub fn decode_seq_file(magic: &[u8; 8], b: &[u8]) -> Option<u64> {
    if b.len() != SEQ_FILE_LEN || b[0..8] != magic[..] {
        return None;
    }
    let word = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    (xxhash_rust::xxh3::xxh3_64(&b[0..16]) == word(16)).then(|| word(8))
}

pub const FLAG_CLEAN: u32 = 1;

impl Superblock {
    pub fn encode(&self) -> [u8; SUPERBLOCK_LEN] {
        let mut b = [0u8; SUPERBLOCK_LEN];
        b[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        b[8..12].copy_from_slice(&SUPERBLOCK_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&SUPERBLOCK_LEN_U32.to_le_bytes());
        b[16..24].copy_from_slice(&self.update.to_le_bytes());
        b[24..40].copy_from_slice(&self.volume_uuid);
        b[40..48].copy_from_slice(&self.volume_size.to_le_bytes());
        b[48..56].copy_from_slice(&self.ring_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.capacity.to_le_bytes());
        b[64..72].copy_from_slice(&self.tail_pos.to_le_bytes());
        b[72..80].copy_from_slice(&self.tail_seq.to_le_bytes());
        b[80..88].copy_from_slice(&self.head_pos.to_le_bytes());
        b[88..96].copy_from_slice(&self.head_seq.to_le_bytes());
        let flags = if self.clean { FLAG_CLEAN } else { 0 };
        b[96..100].copy_from_slice(&flags.to_le_bytes());
        b[100..104].copy_from_slice(&self.epoch.to_le_bytes());
        b[104..112].copy_from_slice(&self.salt.to_le_bytes());
        b[112..120].copy_from_slice(&self.checkpoint_seq.to_le_bytes());
        let sum = xxhash_rust::xxh3::xxh3_64(&b[0..120]);
        b[120..128].copy_from_slice(&sum.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Superblock, BadSuperblock> {
        if b.len() < SUPERBLOCK_LEN || b[0..8] != SUPERBLOCK_MAGIC {
            return Err(BadSuperblock::Magic);
        }
        let version = le_u32(&b[8..12]);
        let (len, sum_at) = match version {
            1 => (SUPERBLOCK_V1_LEN, 112),
            SUPERBLOCK_VERSION => (SUPERBLOCK_LEN_U32, 120),
            v => return Err(BadSuperblock::Version(v)),
        };
        if le_u32(&b[12..16]) != len {
            return Err(BadSuperblock::Inconsistent("encoding length"));
        }
        if xxhash_rust::xxh3::xxh3_64(&b[0..sum_at]) != le_u64(&b[sum_at..sum_at + 8]) {
            return Err(BadSuperblock::Checksum);
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[24..40]);
        let sb = Superblock {
            version,
            update: le_u64(&b[16..24]),
            volume_uuid: uuid,
            volume_size: le_u64(&b[40..48]),
            ring_offset: le_u64(&b[48..56]),
            capacity: le_u64(&b[56..64]),
            tail_pos: le_u64(&b[64..72]),
            tail_seq: le_u64(&b[72..80]),
            head_pos: le_u64(&b[80..88]),
            head_seq: le_u64(&b[88..96]),
            clean: le_u32(&b[96..100]) & FLAG_CLEAN != 0,
            epoch: le_u32(&b[100..104]),
            salt: le_u64(&b[104..112]),
            checkpoint_seq: if version == 1 {
                0
            } else {
                le_u64(&b[112..120])
            },
        };
        if sb.ring_offset != RING_OFFSET {
            return Err(BadSuperblock::Inconsistent("ring offset"));
        }
        if sb.capacity == 0 || sb.capacity % RING_ALIGN != 0 {
            return Err(BadSuperblock::Inconsistent("ring capacity"));
        }
        if sb.tail_pos % RECORD_ALIGN != 0 {
            return Err(BadSuperblock::Inconsistent("tail position"));
        }
        if sb.clean && (sb.head_pos < sb.tail_pos || sb.head_pos - sb.tail_pos > sb.capacity) {
            return Err(BadSuperblock::Inconsistent("head position"));
        }
        Ok(sb)
    }
}

fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// What kind of recovery point a marker places.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PointKind {
    /// Placed on a schedule or on demand: the volume as a power cut would have left it.
    Crash = 1,
    /// Placed between the application's freeze and thaw hooks.
    App = 2,
}

impl PointKind {
    pub fn name(self) -> &'static str {
        match self {
            PointKind::Crash => "crash",
            PointKind::App => "app",
        }
    }
}

/// Length of a marker record's payload (version 1); a group marker (version 2) has
/// [`GROUP_MARKER_LEN`].
pub const MARKER_LEN: usize = 16;
pub const GROUP_MARKER_LEN: usize = 24;

/// The payload of a [`Kind::Marker`] record (little-endian): version (1, or 2 for a
/// consistency group's marker), kind (1 crash, 2 app), six zero bytes, the wall-clock time
/// of placement in milliseconds since the Unix epoch; version 2 adds the group point's id
/// (8 bytes). The point's identity in the volume is the record's sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkerInfo {
    pub kind: PointKind,
    pub unix_ms: u64,
    /// The consistency group's point this marker belongs to (0: a point of this volume
    /// alone). A group marker places no point until a [`GroupDecision`] commits it.
    pub group_point: u64,
}

impl MarkerInfo {
    pub fn encode(&self) -> Vec<u8> {
        let group = self.group_point != 0;
        let mut b = vec![0u8; if group { GROUP_MARKER_LEN } else { MARKER_LEN }];
        b[0] = if group { 2 } else { 1 };
        b[1] = self.kind as u8;
        b[8..16].copy_from_slice(&self.unix_ms.to_le_bytes());
        if group {
            b[16..24].copy_from_slice(&self.group_point.to_le_bytes());
        }
        b
    }

    /// `None` for a payload that is not a version-1 or version-2 marker.
    pub fn decode(b: &[u8]) -> Option<MarkerInfo> {
        let len = match b.first() {
            Some(1) => MARKER_LEN,
            Some(2) => GROUP_MARKER_LEN,
            _ => return None,
        };
        if b.len() != len || b[2..8].iter().any(|&x| x != 0) {
            return None;
        }
        let kind = match b[1] {
            1 => PointKind::Crash,
            2 => PointKind::App,
            _ => return None,
        };
        let unix_ms = u64::from_le_bytes(b[8..16].try_into().ok()?);
        let group_point = match len {
            GROUP_MARKER_LEN => u64::from_le_bytes(b[16..24].try_into().ok()?),
            _ => 0,
        };
        if len == GROUP_MARKER_LEN && group_point == 0 {
            return None;
        }
        Some(MarkerInfo {
            kind,
            unix_ms,
            group_point,
        })
    }
}

/// The payload of a [`Kind::Decision`] record (JSON): what a consistency group decided about
/// point `point`, whose marker this volume's journal holds earlier. `volumes` names every
/// volume of every member that placed the marker: the target shows the group point only
/// when each of them has its marker and a committing decision.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupDecision {
    pub group: String,
    pub point: u64,
    pub commit: bool,
    #[serde(default)]
    pub volumes: Vec<String>,
}

impl GroupDecision {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a decision serialises")
    }

    pub fn decode(b: &[u8]) -> Option<GroupDecision> {
        serde_json::from_slice(b).ok()
    }
}

/// Payload length of a sync record.
pub const SYNC_LEN: usize = 16;

/// What a sync record is (docs/FORMAT.md, "Sync payload").
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncRole {
    /// From here on the replica lacks changes that only dirty regions know of (after an
    /// overflow, an unclean stop, or for a new volume): it is inconsistent until an end.
    Begin = 1,
    /// A place in the stream for the blocks of `[offset, offset + length)` that differ: every
    /// record before it was applied to the backing device before the shipper read them.
    Slot = 2,
    /// Every dirty region of the job was synchronised before this record was appended.
    End = 3,
}

/// The payload of a [`Kind::Sync`] record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncInfo {
    pub role: SyncRole,
    /// The job the record belongs to (0: a begin that no job has claimed yet).
    pub job: u64,
}

impl SyncInfo {
    pub fn encode(&self) -> [u8; SYNC_LEN] {
        let mut b = [0u8; SYNC_LEN];
        b[0] = 1;
        b[1] = self.role as u8;
        b[8..16].copy_from_slice(&self.job.to_le_bytes());
        b
    }

    /// `None` for bytes that do not start with a version-1 sync payload. Bytes after the
    /// first [`SYNC_LEN`] are ignored (the replication protocol appends blocks to slots).
    pub fn decode(b: &[u8]) -> Option<SyncInfo> {
        if b.len() < SYNC_LEN || b[0] != 1 || b[2..8].iter().any(|&x| x != 0) {
            return None;
        }
        let role = match b[1] {
            1 => SyncRole::Begin,
            2 => SyncRole::Slot,
            3 => SyncRole::End,
            _ => return None,
        };
        let job = u64::from_le_bytes(b[8..16].try_into().ok()?);
        Some(SyncInfo { role, job })
    }
}

/// A block range copied whole: data, or zeroes. The layout of a synchronisation slot's
/// blocks on the wire and of a failback's `NAME.failback` file (docs/FORMAT.md): offset u64,
/// length u32, kind u8 (1 data, 3 zeroes), 3 zero bytes, then a data range's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockExtent<'a> {
    pub offset: u64,
    pub length: u32,
    /// `None`: the range is zeroes.
    pub data: Option<&'a [u8]>,
}

/// Header of one [`BlockExtent`].
pub const EXTENT_LEN: usize = 16;

/// Appends `extents` to `out`.
pub fn encode_extents(extents: &[BlockExtent<'_>], out: &mut Vec<u8>) {
    for b in extents {
        out.extend_from_slice(&b.offset.to_le_bytes());
        out.extend_from_slice(&b.length.to_le_bytes());
        out.extend_from_slice(&[if b.data.is_some() { 1 } else { 3 }, 0, 0, 0]);
        if let Some(d) = b.data {
            out.extend_from_slice(d);
        }
    }
}

/// The extents encoded in `bytes`; each must lie inside `[start, end)`.
pub fn decode_extents(bytes: &[u8], start: u64, end: u64) -> Result<Vec<BlockExtent<'_>>, String> {
    let mut rest = bytes;
    let mut out = Vec::new();
    while !rest.is_empty() {
        if rest.len() < EXTENT_LEN {
            return Err("truncated extent header".into());
        }
        let offset = le_u64(&rest[..8]);
        let length = le_u32(&rest[8..12]);
        let kind = rest[12];
        if rest[13..16] != [0, 0, 0] {
            return Err("extent reserved bytes are not zero".into());
        }
        rest = &rest[EXTENT_LEN..];
        if offset < start
            || offset
                .checked_add(u64::from(length))
                .is_none_or(|e| e > end)
        {
            return Err(format!("extent {offset}+{length} outside {start}..{end}"));
        }
        let data = match kind {
            1 => {
                let n = length as usize;
                if rest.len() < n {
                    return Err(format!("extent {offset}+{length}: truncated data"));
                }
                let (d, r) = rest.split_at(n);
                rest = r;
                Some(d)
            }
            3 => None,
            k => return Err(format!("extent kind {k}")),
        };
        out.push(BlockExtent {
            offset,
            length,
            data,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sync_payloads_round_trip_and_reject_other_bytes() {
        for role in [SyncRole::Begin, SyncRole::Slot, SyncRole::End] {
            let s = SyncInfo {
                role,
                job: 0xfeed_0000_0001,
            };
            assert_eq!(SyncInfo::decode(&s.encode()), Some(s));
        }
        let mut b = SyncInfo {
            role: SyncRole::Slot,
            job: 3,
        }
        .encode();
        b[1] = 4;
        assert_eq!(SyncInfo::decode(&b), None);
        assert_eq!(SyncInfo::decode(&b[..8]), None);
    }

    const SALT: u64 = 0x5eed_1234_abcd_0001;

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::Write),
            Just(Kind::Trim),
            Just(Kind::Zero),
            Just(Kind::Marker),
            Just(Kind::Pad),
            Just(Kind::Sync),
            Just(Kind::Decision)
        ]
    }

    #[test]
    fn markers_round_trip_and_reject_other_bytes() {
        let m = MarkerInfo {
            kind: PointKind::App,
            unix_ms: 1_795_392_000_123,
            group_point: 0,
        };
        assert_eq!(m.encode().len(), MARKER_LEN);
        assert_eq!(MarkerInfo::decode(&m.encode()), Some(m));
        let mut b = m.encode();
        b[1] = 9;
        assert_eq!(MarkerInfo::decode(&b), None);
        assert_eq!(MarkerInfo::decode(&b"after"[..]), None);
        let g = MarkerInfo {
            group_point: 7 << 12 | 3,
            ..m
        };
        assert_eq!(g.encode().len(), GROUP_MARKER_LEN);
        assert_eq!(MarkerInfo::decode(&g.encode()), Some(g));
        // A version-2 payload without its group point, or of the wrong length, is no marker.
        let mut b = g.encode();
        b[16..24].fill(0);
        assert_eq!(MarkerInfo::decode(&b), None);
        assert_eq!(MarkerInfo::decode(&g.encode()[..MARKER_LEN]), None);
        let d = GroupDecision {
            group: "payments".into(),
            point: 9,
            commit: true,
            volumes: vec!["db".into(), "logs".into()],
        };
        assert_eq!(GroupDecision::decode(&d.encode()), Some(d));
        assert_eq!(GroupDecision::decode(b"{"), None);
    }

    proptest! {
        #[test]
        fn record_round_trip(kind in kind(), seq: u64, offset: u64, length: u32, lap in 0u32..1000,
                             epoch in 0u32..10,
                             payload in proptest::collection::vec(any::<u8>(), 0..600)) {
            let h = RecordHeader::new(kind, seq, offset, length, &payload, lap, epoch, SALT);
            let b = h.encode();
            let d = RecordHeader::decode(&b, lap, u64::MAX).unwrap();
            prop_assert_eq!(d, h);
            prop_assert!(d.verify(&payload, SALT).is_ok());
            prop_assert!(d.verify(&payload, SALT ^ 1).is_err());
        }

        #[test]
        fn any_flipped_bit_is_caught(payload in proptest::collection::vec(any::<u8>(), 1..300),
                                     bit in 0usize..(8 * (48 + 300))) {
            let h = RecordHeader::new(Kind::Write, 7, 4096, 512, &payload, 3, 1, SALT);
            let mut rec = h.encode().to_vec();
            rec.extend_from_slice(&payload);
            let bit = bit % (8 * rec.len());
            rec[bit / 8] ^= 1 << (bit % 8);
            let hb: [u8; RECORD_HEADER_LEN] = rec[..RECORD_HEADER_LEN].try_into().unwrap();
            let ok = RecordHeader::decode(&hb, 3, u64::MAX)
                .and_then(|d| d.verify(&rec[RECORD_HEADER_LEN..], SALT).map(|()| d));
            prop_assert!(ok.is_err());
        }

        #[test]
        fn superblock_round_trip(update: u64, uuid: [u8; 16], size: u64, cap in 1u64..1_000_000,
                                 tail in 0u64..1_000_000, clean: bool, epoch: u32, salt: u64,
                                 checkpoint: u64) {
            let sb = Superblock {
                version: SUPERBLOCK_VERSION,
                update, volume_uuid: uuid, volume_size: size, ring_offset: RING_OFFSET,
                capacity: cap * RING_ALIGN, tail_pos: tail * RECORD_ALIGN, tail_seq: tail,
                head_pos: tail * RECORD_ALIGN, head_seq: tail, clean, epoch, salt,
                checkpoint_seq: checkpoint,
            };
            prop_assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
        }
    }

    #[test]
    fn stale_lap_and_zeroes_are_rejected() {
        let h = RecordHeader::new(Kind::Trim, 1, 0, 4096, &[], 4, 0, SALT);
        assert_eq!(
            RecordHeader::decode(&h.encode(), 5, u64::MAX),
            Err(Invalid::StaleLap {
                found: 4,
                expected: 5
            })
        );
        assert_eq!(
            RecordHeader::decode(&[0u8; RECORD_HEADER_LEN], 0, u64::MAX),
            Err(Invalid::Zeroed)
        );
        let big = RecordHeader::new(Kind::Write, 1, 0, 4096, &[1u8; 4096], 0, 0, SALT);
        assert_eq!(
            RecordHeader::decode(&big.encode(), 0, 1000),
            Err(Invalid::BadLength(4096))
        );
    }

    #[test]
    fn superblock_damage_is_detected() {
        let sb = Superblock {
            version: SUPERBLOCK_VERSION,
            update: 1,
            volume_uuid: [7; 16],
            volume_size: 1 << 30,
            ring_offset: RING_OFFSET,
            capacity: 1 << 20,
            tail_pos: 0,
            tail_seq: 1,
            head_pos: 0,
            head_seq: 1,
            clean: true,
            epoch: 0,
            salt: SALT,
            checkpoint_seq: 1,
        };
        let mut b = sb.encode();
        b[50] ^= 1;
        assert_eq!(Superblock::decode(&b), Err(BadSuperblock::Checksum));
        let mut b = sb.encode();
        b[8] = 9;
        assert_eq!(Superblock::decode(&b), Err(BadSuperblock::Version(9)));
        assert_eq!(Superblock::decode(&[0u8; 120]), Err(BadSuperblock::Magic));
    }

    #[test]
    fn version_1_superblocks_are_read_with_nothing_to_replay() {
        // What the previous release wrote: 120 bytes, the checksum at 112.
        let mut b = [0u8; SUPERBLOCK_LEN];
        b[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[12..16].copy_from_slice(&120u32.to_le_bytes());
        b[16..24].copy_from_slice(&5u64.to_le_bytes());
        b[56..64].copy_from_slice(&(1u64 << 20).to_le_bytes());
        b[48..56].copy_from_slice(&RING_OFFSET.to_le_bytes());
        b[72..80].copy_from_slice(&9u64.to_le_bytes());
        b[104..112].copy_from_slice(&SALT.to_le_bytes());
        let sum = xxhash_rust::xxh3::xxh3_64(&b[0..112]);
        b[112..120].copy_from_slice(&sum.to_le_bytes());
        let sb = Superblock::decode(&b).unwrap();
        assert_eq!((sb.version, sb.update, sb.tail_seq), (1, 5, 9));
        assert_eq!(sb.checkpoint_seq, 0);
        // Written back, it is version 2.
        let again = Superblock::decode(&sb.encode()).unwrap();
        assert_eq!(again.version, SUPERBLOCK_VERSION);
    }
}
