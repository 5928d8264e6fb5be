//! The per-volume ring journal: every write the tracker acknowledges, in order, until the
//! shipper has it durable on the target. Format in [`format`] and docs/FORMAT.md.
//!
//! The tracker appends at the head; the space from the tail to the head holds unreleased
//! records and is never overwritten. Releasing moves the tail forward and is made durable in
//! the superblock before the space is reused, so that recovery, which scans from the durable
//! tail, always starts at a record of the current chain.
//!
//! Recovery ([`Journal::open`]) walks the chain from the tail: each record must sit in the
//! expected lap, carry the next sequence number, an epoch no older than its predecessor's,
//! and a matching checksum. The first record that fails ends the chain; why it failed
//! decides, under the [`Policy`], whether that is a normal end (zero-filled or stale space, a
//! torn record at the head) or corruption.

pub mod format;
pub mod inspect;
pub mod mark;
pub mod reader;

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use log::{info, warn};

use format::*;

/// Where the journal lives: a file or a raw partition, or a test double that can crash.
pub trait Store {
    /// Usable size in bytes.
    fn size(&self) -> io::Result<u64>;
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    fn write_at(&self, bufs: &[&[u8]], off: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
}

impl Store for File {
    fn size(&self) -> io::Result<u64> {
        use std::io::{Seek, SeekFrom};
        let mut f = self;
        f.seek(SeekFrom::End(0))
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.read_exact_at(buf, off)
    }

    fn write_at(&self, bufs: &[&[u8]], off: u64) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        let mut slices = &mut slices[..];
        let mut off = off;
        while !slices.is_empty() {
            let n = nix::sys::uio::pwritev(self, slices, i64::try_from(off).unwrap_or(i64::MAX))?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            off += n as u64;
            IoSlice::advance_slices(&mut slices, n);
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
}

/// How recovery treats a chain that ends in damage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Any damage (anything but zero-filled or stale space where the chain ends) refuses to
    /// open: for inspection tools and tests.
    Strict,
    /// A damaged record where the chain ends is treated as torn and cut off (logged). This is
    /// what the tracker uses: after a crash the last records may be half written.
    TolerateTornTail,
}

/// Journal errors. Corruption is told apart from I/O errors.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("Journal I/O error")]
    Io(#[from] io::Error),
    #[error("Journal corrupt at file offset {offset}: {reason}")]
    Corruption { offset: u64, reason: String },
    #[error("Journal full: {needed} bytes needed, {free} free of {capacity}")]
    Full {
        needed: u64,
        free: u64,
        capacity: u64,
    },
    /// The shipper released the space, but records in it are not yet applied to the backing
    /// device and checkpointed: wait for the next checkpoint.
    #[error("Journal space held for the checkpoint: {needed} bytes needed")]
    Unapplied { needed: u64 },
    #[error("Journal file too small: {size} bytes, at least {min} needed")]
    TooSmall { size: u64, min: u64 },
    #[error("Record too large: {0} bytes of payload")]
    TooLarge(usize),
}

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Logical position.
    pub pos: u64,
    pub header: RecordHeader,
    pub payload: Vec<u8>,
}

/// Where and why a chain ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainEnd {
    /// Logical position where the next record was expected.
    pub pos: u64,
    /// File offset of that position.
    pub file_offset: u64,
    /// Sequence number that was expected there.
    pub seq: u64,
    pub why: Invalid,
}

impl ChainEnd {
    /// Space that was never written in this lap or epoch: a normal end.
    pub fn is_clean(&self) -> bool {
        matches!(
            self.why,
            Invalid::Zeroed
                | Invalid::StaleLap { .. }
                | Invalid::StaleEpoch { .. }
                | Invalid::StaleSeq { .. }
        )
    }
}

/// What recovery found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The superblock said the journal was closed cleanly.
    pub was_clean: bool,
    pub records: u64,
    pub tail_seq: u64,
    /// Next sequence number to write.
    pub next_seq: u64,
    pub end: ChainEnd,
}

/// Walks the chain of records from a known-good position.
#[derive(Debug)]
pub struct Scanner<'a, S: Store> {
    store: &'a S,
    capacity: u64,
    salt: u64,
    max_epoch: u32,
    pos: u64,
    seq: u64,
    epoch: u32,
    /// Stop before this logical position (the tail plus the capacity).
    limit: u64,
    end: Option<ChainEnd>,
}

/// The lap of a logical position. Laps wrap at 2^32: a record 2^32 laps old cannot still be
/// in the ring.
pub fn lap_of(pos: u64, capacity: u64) -> u32 {
    let [a, b, c, d, ..] = (pos / capacity).to_le_bytes();
    u32::from_le_bytes([a, b, c, d])
}

impl<'a, S: Store> Scanner<'a, S> {
    pub fn new(store: &'a S, sb: &Superblock, pos: u64, seq: u64) -> Self {
        Scanner {
            store,
            capacity: sb.capacity,
            salt: sb.salt,
            max_epoch: sb.epoch,
            pos,
            seq,
            epoch: 0,
            limit: pos + sb.capacity,
            end: None,
        }
    }

    /// Why and where the chain ended, once [`Scanner::next_record`] returned `None`.
    pub fn end(&self) -> Option<&ChainEnd> {
        self.end.as_ref()
    }

    /// Position and sequence number after the last record returned.
    pub fn position(&self) -> (u64, u64) {
        (self.pos, self.seq)
    }

    fn stop(&mut self, why: Invalid) -> Option<io::Result<Record>> {
        self.end = Some(ChainEnd {
            pos: self.pos,
            file_offset: RING_OFFSET + self.pos % self.capacity,
            seq: self.seq,
            why,
        });
        None
    }

    /// The next valid record, `None` at the end of the chain, `Some(Err)` on I/O errors.
    pub fn next_record(&mut self) -> Option<io::Result<Record>> {
        loop {
            if self.end.is_some() {
                return None;
            }
            let phys = self.pos % self.capacity;
            let room = self.capacity - phys;
            if room < RECORD_HEADER_LEN as u64 {
                self.pos += room;
                continue;
            }
            if self.pos + RECORD_HEADER_LEN as u64 > self.limit {
                return self.stop(Invalid::Zeroed);
            }
            let mut hb = [0u8; RECORD_HEADER_LEN];
            if let Err(e) = self.store.read_at(&mut hb, RING_OFFSET + phys) {
                return Some(Err(e));
            }
            let lap = lap_of(self.pos, self.capacity);
            let h = match RecordHeader::decode(&hb, lap, room) {
                Ok(h) => h,
                Err(why) => return self.stop(why),
            };
            if h.epoch < self.epoch || h.epoch > self.max_epoch {
                return self.stop(Invalid::StaleEpoch {
                    found: h.epoch,
                    expected: self.epoch,
                });
            }
            let mut payload = vec![0u8; h.payload_len as usize];
            if let Err(e) = self
                .store
                .read_at(&mut payload, RING_OFFSET + phys + RECORD_HEADER_LEN as u64)
            {
                return Some(Err(e));
            }
            if let Err(why) = h.verify(&payload, self.salt) {
                return self.stop(why);
            }
            if h.seq != self.seq {
                // A valid record of this lap and epoch with another number: left over from a
                // chain that was cut off and then partly overwritten.
                return self.stop(Invalid::StaleSeq {
                    found: h.seq,
                    expected: self.seq,
                });
            }
            let size = record_size(h.payload_len);
            if h.kind == Kind::Pad {
                if u64::from(h.length) != room {
                    return self.stop(Invalid::BadLength(h.length));
                }
                self.epoch = h.epoch;
                self.pos += room;
                continue;
            }
            if self.pos + size > self.limit {
                return self.stop(Invalid::BadLength(h.payload_len));
            }
            let rec = Record {
                pos: self.pos,
                header: h,
                payload,
            };
            self.epoch = h.epoch;
            self.pos += size;
            self.seq += 1;
            return Some(Ok(rec));
        }
    }
}

/// `journal`'s path with `suffix` appended: the files that go with a journal
/// (`NAME.journal.release`, `NAME.journal.durable`).
pub fn beside_journal(journal: &Path, suffix: &str) -> PathBuf {
    let mut p = journal.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Reads the newest valid superblock.
pub fn read_superblock<S: Store>(store: &S) -> Result<Superblock, JournalError> {
    let mut best: Option<Superblock> = None;
    let mut errors = Vec::new();
    for slot in 0..2u64 {
        let mut b = [0u8; SUPERBLOCK_LEN];
        store.read_at(&mut b, slot * SUPERBLOCK_SLOT)?;
        match Superblock::decode(&b) {
            Ok(sb) if best.is_none_or(|b| sb.update > b.update) => best = Some(sb),
            Ok(_) => {}
            Err(e) => errors.push(format!("slot {slot}: {e}")),
        }
    }
    best.ok_or_else(|| JournalError::Corruption {
        offset: 0,
        reason: format!("no valid superblock ({})", errors.join("; ")),
    })
}

/// Writes `sb` to its slot and syncs: a superblock from [`Journal::stage`], through any
/// handle on the journal's store.
pub fn write_superblock_to<S: Store>(store: &S, sb: &Superblock) -> io::Result<()> {
    let slot = sb.update % 2;
    store.write_at(&[&sb.encode()], slot * SUPERBLOCK_SLOT)?;
    store.sync()
}

/// Appended bytes are gathered in memory and reach the store in writes of at least this
/// many bytes (group commit), or earlier through [`Journal::write_out`].
pub const COMMIT_BYTES: usize = 256 << 10;

/// The store is only ever written in whole, aligned blocks of this size (but where the free
/// space ends), so that the page cache never has to zero or read the rest of a block.
const BLOCK: u64 = RING_ALIGN;

/// Zeros for padding and for the empty header slot after the head.
static ZEROS: [u8; ZEROS_LEN] = [0; ZEROS_LEN];
#[allow(clippy::cast_possible_truncation)] // 8 KiB.
const ZEROS_LEN: usize = 2 * RING_ALIGN as usize;

/// Record starts are remembered at least this far apart, so that the tail can move to a
/// released or checkpointed sequence number without reading the ring.
const INDEX_STRIDE: u64 = 64 << 10;

/// The writer side of a journal, owned by the tracker.
///
/// Records are encoded into a buffer that starts at the block holding the last bytes written
/// (`buf_pos`, block aligned) and ends at the head. The buffer is written out in whole blocks
/// when it reaches [`COMMIT_BYTES`] (a large record goes out from its own memory, without a
/// copy), on [`Journal::write_out`] and on [`Journal::sync`]; the partial block at its end
/// stays buffered, to be written again, whole, with the records that follow.
#[derive(Debug)]
pub struct Journal<S: Store> {
    store: S,
    sb: Superblock,
    head_pos: u64,
    next_seq: u64,
    /// Logical position of `buf[0]`, a multiple of [`BLOCK`].
    buf_pos: u64,
    /// The bytes from `buf_pos` to `head_pos`.
    buf: Vec<u8>,
    /// The store holds every byte before this logical position.
    written_pos: u64,
    /// Unreleased bytes at which the journal counts as full (its capacity unless told).
    full_limit: u64,
    /// Sequence numbers and positions of record starts from the tail on, at least
    /// [`INDEX_STRIDE`] apart (and the tail's own).
    starts: std::collections::VecDeque<(u64, u64)>,
    /// The first sequence number the shipper has not released.
    released_next: u64,
    /// The checkpoint of the last durable superblock.
    durable_sb_checkpoint: u64,
}

/// Fills `buf` from the kernel's random source (left as is if it cannot be read).
pub(crate) fn random_bytes(buf: &mut [u8]) {
    if let Ok(f) = File::open("/dev/urandom") {
        let _ = f.read_exact_at(buf, 0);
    }
}

fn random_salt() -> u64 {
    let mut b = [0u8; 8];
    random_bytes(&mut b);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() ^ u64::from(d.subsec_nanos()) << 20)
        .unwrap_or(0);
    u64::from_le_bytes(b) ^ t.rotate_left(17) ^ u64::from(std::process::id())
}

impl<S: Store> Journal<S> {
    /// Formats `store` as an empty journal for a volume.
    pub fn create(
        store: S,
        volume_uuid: [u8; 16],
        volume_size: u64,
    ) -> Result<Journal<S>, JournalError> {
        let size = store.size()?;
        if size < MIN_FILE_SIZE {
            return Err(JournalError::TooSmall {
                size,
                min: MIN_FILE_SIZE,
            });
        }
        let capacity = (size - RING_OFFSET) / RING_ALIGN * RING_ALIGN;
        let sb = Superblock {
            update: 0,
            volume_uuid,
            volume_size,
            ring_offset: RING_OFFSET,
            capacity,
            tail_pos: 0,
            tail_seq: 1,
            head_pos: 0,
            head_seq: 1,
            // Open for writing from the start: only `close` marks it clean.
            clean: false,
            epoch: 0,
            salt: random_salt(),
            version: SUPERBLOCK_VERSION,
            checkpoint_seq: 1,
        };
        let mut j = Journal {
            store,
            sb,
            head_pos: 0,
            next_seq: 1,
            buf_pos: 0,
            buf: Vec::with_capacity(COMMIT_BYTES),
            written_pos: 0,
            full_limit: u64::MAX,
            starts: [(1, 0)].into(),
            released_next: 1,
            durable_sb_checkpoint: 1,
        };
        // Both slots, so that no superblock of an earlier journal in this file survives.
        j.write_superblock()?;
        j.write_superblock()?;
        Ok(j)
    }

    /// Opens a journal, recovering its chain of records.
    pub fn open(store: S, policy: Policy) -> Result<(Journal<S>, Recovery), JournalError> {
        let sb = read_superblock(&store)?;
        let mut scan = Scanner::new(&store, &sb, sb.tail_pos, sb.tail_seq);
        let mut records = 0u64;
        let mut starts = std::collections::VecDeque::from([(sb.tail_seq, sb.tail_pos)]);
        loop {
            // Where a scanner would start for this record: before a pad, if one precedes it.
            let (at, seq) = scan.position();
            let Some(r) = scan.next_record() else {
                break;
            };
            r?;
            if starts.back().is_none_or(|&(_, p)| at >= p + INDEX_STRIDE) {
                starts.push_back((seq, at));
            }
            records += 1;
        }
        let end = scan.end().cloned().expect("scan ended");
        let (head_pos, next_seq) = scan.position();
        let expected_head = sb.clean.then_some((sb.head_pos, sb.head_seq));
        let consistent = expected_head.is_none_or(|h| h == (head_pos, next_seq));
        // After a clean close the head is known and whatever follows it does not matter.
        let fine = if sb.clean { consistent } else { end.is_clean() };
        if !fine {
            let reason = if consistent {
                format!("record seq {} {}", end.seq, end.why)
            } else {
                format!(
                    "closed cleanly at seq {} but the chain ends at seq {}: {}",
                    sb.head_seq, next_seq, end.why
                )
            };
            if policy == Policy::Strict {
                return Err(JournalError::Corruption {
                    offset: end.file_offset,
                    reason,
                });
            }
            warn!(
                "seq={} off={}: journal: cutting the chain: {}",
                end.seq, end.file_offset, end.why
            );
        }
        let recovery = Recovery {
            was_clean: sb.clean,
            records,
            tail_seq: sb.tail_seq,
            next_seq,
            end,
        };
        // The block holding the head is written again, whole, with the next records.
        let buf_pos = head_pos / BLOCK * BLOCK;
        let mut buf = Vec::with_capacity(COMMIT_BYTES);
        buf.resize(
            usize::try_from(head_pos - buf_pos).expect("less than a block"),
            0,
        );
        store.read_at(&mut buf, RING_OFFSET + buf_pos % sb.capacity)?;
        let mut j = Journal {
            store,
            sb,
            head_pos,
            next_seq,
            buf_pos,
            buf,
            written_pos: head_pos,
            full_limit: u64::MAX,
            starts,
            released_next: sb.tail_seq,
            durable_sb_checkpoint: 0,
        };
        if j.sb.version == 1 {
            // The previous format's tracker applied every record before acknowledging it
            // (and its region map covers what a crash left): nothing to replay.
            j.sb.checkpoint_seq = next_seq;
            info!(
                "journal: format version 1 opened; written as version {SUPERBLOCK_VERSION} from now on"
            );
        }
        j.sb.checkpoint_seq = j.sb.checkpoint_seq.clamp(j.sb.tail_seq, next_seq);
        // From now on the journal is open: a crash must be seen as one. After an unclean
        // stop, records beyond the recovered head may be valid leftovers: a new epoch makes
        // sure none of them is ever taken for a successor of what we write next.
        j.sb.clean = false;
        // So do records beyond a cut made in a cleanly closed journal (damage in the middle).
        if !recovery.was_clean || !fine {
            j.sb.epoch += 1;
        }
        j.write_superblock()?;
        info!(
            "journal: opened tail_seq={} next_seq={} records={} clean={} epoch={}",
            recovery.tail_seq, next_seq, records, recovery.was_clean, j.sb.epoch
        );
        Ok((j, recovery))
    }

    fn write_superblock(&mut self) -> Result<(), JournalError> {
        let mut sb = self.sb;
        sb.update += 1;
        write_superblock_to(&self.store, &sb)?;
        self.sb.update = sb.update;
        self.durable_sb_checkpoint = sb.checkpoint_seq;
        Ok(())
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn capacity(&self) -> u64 {
        self.sb.capacity
    }

    /// Bytes held by records that are unreleased or not yet checkpointed.
    pub fn used(&self) -> u64 {
        self.head_pos - self.sb.tail_pos
    }

    /// Bytes held by records the shipper has not released (at most a few [`INDEX_STRIDE`]s
    /// more).
    pub fn unreleased(&self) -> u64 {
        self.head_pos - self.start_at_or_before(self.released_next).1
    }

    /// Bytes of records from the checkpoint on: what a start-up would replay (at most a few
    /// [`INDEX_STRIDE`]s more).
    pub fn unchecked(&self) -> u64 {
        self.head_pos - self.start_at_or_before(self.sb.checkpoint_seq).1
    }

    /// Bytes the next superblock write ([`Journal::stage`]) would free.
    pub fn reclaimable(&self) -> u64 {
        let keep = self.released_next.min(self.sb.checkpoint_seq);
        self.start_at_or_before(keep).1 - self.sb.tail_pos
    }

    /// Where record `seq` starts (or the head, for the next one): from the last remembered
    /// start before it, the chain is read up to it (at most [`INDEX_STRIDE`] and a record).
    fn exact_start(&mut self, seq: u64) -> Result<(u64, u64), JournalError> {
        let (s0, p0) = self.start_at_or_before(seq);
        if s0 == seq {
            return Ok((s0, p0));
        }
        if seq >= self.next_seq {
            return Ok((self.next_seq, self.head_pos));
        }
        self.write_out()?;
        let mut scan = Scanner::new(&self.store, &self.sb, p0, s0);
        while scan.position().1 < seq {
            match scan.next_record() {
                Some(r) => {
                    r?;
                }
                None => break,
            }
        }
        Ok((scan.position().1, scan.position().0))
    }

    /// The last remembered record start with a sequence number up to `seq`.
    pub fn start_at_or_before(&self, seq: u64) -> (u64, u64) {
        let i = self.starts.partition_point(|&(s, _)| s <= seq);
        self.starts
            .get(i.saturating_sub(1))
            .copied()
            .unwrap_or((self.sb.tail_seq, self.sb.tail_pos))
    }

    /// The shipper released every record up to `seq` (in memory: the tail moves with the
    /// next superblock write, [`Journal::stage`]).
    pub fn set_released(&mut self, seq: u64) {
        self.released_next = self
            .released_next
            .max(seq.saturating_add(1).min(self.next_seq));
    }

    /// Every record before `seq` is applied to the backing device and the device synced:
    /// they need no replay (in memory, until the next [`Journal::stage`]).
    pub fn set_checkpoint(&mut self, seq: u64) {
        self.sb.checkpoint_seq = self.sb.checkpoint_seq.max(seq.min(self.next_seq));
    }

    /// The last sequence number the shipper released (0: none).
    pub fn released_seq(&self) -> u64 {
        self.released_next - 1
    }

    /// The first sequence number a start-up would replay.
    pub fn checkpoint_seq(&self) -> u64 {
        self.sb.checkpoint_seq
    }

    /// The superblock that would record the released and checkpointed positions, with the
    /// tail moved to the older of the two; `None` when nothing changed since the last one.
    /// Write it with [`write_superblock_to`] (from any handle on the store, without holding
    /// the journal), then [`Journal::commit`] it: only then is the freed space reused.
    pub fn stage(&mut self) -> Option<Superblock> {
        let keep = self.released_next.min(self.sb.checkpoint_seq);
        let (seq, pos) = match self.exact_start(keep) {
            Ok(s) => s,
            Err(e) => {
                warn!("seq={keep}: journal: cannot find the record to move the tail to: {e}");
                self.start_at_or_before(keep)
            }
        };
        let durable = self.durable_sb_checkpoint;
        if seq <= self.sb.tail_seq && self.sb.checkpoint_seq == durable {
            return None;
        }
        let mut sb = self.sb;
        if seq > sb.tail_seq {
            sb.tail_pos = pos;
            sb.tail_seq = seq;
        }
        sb.update += 1;
        Some(sb)
    }

    /// A superblock from [`Journal::stage`] is durable: its tail takes effect.
    pub fn commit(&mut self, sb: Superblock) {
        self.durable_sb_checkpoint = sb.checkpoint_seq;
        self.sb.update = self.sb.update.max(sb.update);
        self.sb.tail_pos = sb.tail_pos;
        self.sb.tail_seq = sb.tail_seq;
        while self.starts.len() > 1 && self.starts[1].0 <= sb.tail_seq {
            self.starts.pop_front();
        }
        if self.starts.front().is_some_and(|&(s, _)| s < sb.tail_seq) {
            self.starts[0] = (sb.tail_seq, sb.tail_pos);
        }
    }

    /// Makes the journal count as full once `bytes` are unreleased (`journal.full_percent`),
    /// before its capacity is reached.
    pub fn set_full_limit(&mut self, bytes: u64) {
        self.full_limit = bytes;
    }

    /// Unreleased bytes at which the journal counts as full.
    pub fn full_limit(&self) -> u64 {
        self.full_limit.min(self.sb.capacity)
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn tail_seq(&self) -> u64 {
        self.sb.tail_seq
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Appends a record and returns its sequence number. The record is durable after the
    /// next [`Journal::sync`].
    pub fn append(
        &mut self,
        kind: Kind,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<u64, JournalError> {
        assert!(kind != Kind::Pad, "pads are the journal's own business");
        let payload_len =
            u32::try_from(payload.len()).map_err(|_| JournalError::TooLarge(payload.len()))?;
        if payload_len > MAX_PAYLOAD {
            return Err(JournalError::TooLarge(payload.len()));
        }
        let cap = self.sb.capacity;
        let (skip, size) = self.placement(payload_len);
        let free = self.full_limit().saturating_sub(self.unreleased());
        if skip + size > free {
            return Err(JournalError::Full {
                needed: skip + size,
                free,
                capacity: self.full_limit(),
            });
        }
        if skip + size > cap - self.used() {
            return Err(JournalError::Unapplied {
                needed: skip + size,
            });
        }
        let epoch = self.sb.epoch;
        let salt = self.sb.salt;
        // Remembered where a scanner starts for this record: before its pad, if any.
        if self
            .starts
            .back()
            .is_none_or(|&(_, p)| self.head_pos >= p + INDEX_STRIDE)
        {
            self.starts.push_back((self.next_seq, self.head_pos));
        }
        if skip > 0 {
            // The record does not fit before the ring's end: a pad (when a header fits) tells
            // readers to go on at the start of the next lap.
            // Nothing changes unless the write succeeds.
            let pad = (skip >= RECORD_HEADER_LEN as u64).then(|| {
                let lap = lap_of(self.head_pos, cap);
                let len = u32::try_from(skip).expect("room fits in u32 when a record does not");
                RecordHeader::new(Kind::Pad, self.next_seq, 0, len, &[], lap, epoch, salt).encode()
            });
            let pad: &[u8] = pad.as_ref().map_or(&[], |p| &p[..]);
            let end = self.buf_pos + (self.buf.len() + pad.len()) as u64;
            self.write_buffer(&[pad], end, false)?;
            self.head_pos += skip;
            self.buf_pos = self.head_pos;
            self.buf.clear();
            self.written_pos = self.head_pos;
        }
        let lap = lap_of(self.head_pos, cap);
        let h = RecordHeader::new(
            kind,
            self.next_seq,
            offset,
            length,
            payload,
            lap,
            epoch,
            salt,
        );
        // At most 7 bytes of padding.
        let fill = usize::try_from(size).expect("record fits in memory")
            - RECORD_HEADER_LEN
            - payload.len();
        let header = h.encode();
        let seq = self.next_seq;
        if self.buf.len() + payload.len() >= COMMIT_BYTES {
            // Group commit: the buffered records and this one in one write, the payload
            // straight from the caller's memory. The journal only moves on once it is written.
            let parts: [&[u8]; 3] = [&header, payload, &ZEROS[..fill]];
            self.write_buffer(&parts, self.head_pos + size, true)?;
            self.head_pos += size;
            self.next_seq += 1;
            self.keep_partial_block(&parts);
        } else {
            self.buf.extend_from_slice(&header);
            self.buf.extend_from_slice(payload);
            self.buf.extend_from_slice(&ZEROS[..fill]);
            self.head_pos += size;
            self.next_seq += 1;
            if self.head_pos % cap == 0 {
                // The buffer never spans the ring's end. The record is appended either way;
                // an error here means it may not reach the file.
                self.write_out()?;
            }
        }
        Ok(seq)
    }

    /// Where a record with `payload_len` bytes would go: the bytes skipped before it (to the
    /// end of the ring, when it does not fit there) and its size.
    fn placement(&self, payload_len: u32) -> (u64, u64) {
        let cap = self.sb.capacity;
        let size = record_size(payload_len);
        let room = cap - self.head_pos % cap;
        (if size > room { room } else { 0 }, size)
    }

    /// Writes the buffer, then `extra` (which ends at logical position `end`), then zeros to
    /// the end of the block, in one write. With `trailer`, the zeros also cover the header
    /// slot after `end`, so that a reader finds the chain ending on zeros rather than on
    /// leftovers of an earlier lap. Zeros never go past the free space or the ring's end.
    fn write_buffer(&mut self, extra: &[&[u8]], end: u64, trailer: bool) -> io::Result<()> {
        let cap = self.sb.capacity;
        let lap_end = (self.buf_pos / cap + 1) * cap;
        let want = if trailer {
            end + RECORD_HEADER_LEN as u64
        } else {
            end
        };
        let fill_end = want
            .div_ceil(BLOCK)
            .saturating_mul(BLOCK)
            .min(lap_end)
            .min(self.sb.tail_pos + cap)
            .max(end);
        let zeros = usize::try_from(fill_end - end).expect("at most two blocks");
        let total = self.buf.len() + extra.iter().map(|p| p.len()).sum::<usize>() + zeros;
        if total == 0 {
            self.written_pos = end;
            return Ok(());
        }
        let mut parts: Vec<&[u8]> = Vec::with_capacity(extra.len() + 2);
        parts.push(&self.buf);
        parts.extend_from_slice(extra);
        parts.push(&ZEROS[..zeros]);
        self.store
            .write_at(&parts, RING_OFFSET + self.buf_pos % cap)?;
        self.written_pos = end;
        Ok(())
    }

    /// After a write that ended at the head: keeps the partial block at the head (from the
    /// buffer and `extra`, which were just written) as the new buffer.
    fn keep_partial_block(&mut self, extra: &[&[u8]]) {
        let new_pos = self.head_pos / BLOCK * BLOCK;
        let mut skip = new_pos - self.buf_pos;
        let old = std::mem::take(&mut self.buf);
        let mut kept = Vec::with_capacity(COMMIT_BYTES);
        for part in std::iter::once(&old[..]).chain(extra.iter().copied()) {
            let n = part.len() as u64;
            if skip >= n {
                skip -= n;
                continue;
            }
            kept.extend_from_slice(&part[usize::try_from(skip).expect("inside a part")..]);
            skip = 0;
        }
        self.buf = kept;
        self.buf_pos = new_pos;
    }

    /// Writes every appended record to the store (not yet durably): what a reader in another
    /// process can see. Called after at most a few milliseconds by the tracker.
    pub fn write_out(&mut self) -> Result<(), JournalError> {
        if self.written_pos == self.head_pos {
            return Ok(());
        }
        self.write_buffer(&[], self.head_pos, true)?;
        self.keep_partial_block(&[]);
        Ok(())
    }

    /// True when appended records are waiting in memory.
    pub fn has_unwritten(&self) -> bool {
        self.written_pos != self.head_pos
    }

    /// Makes every appended record durable.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        self.write_out()?;
        self.store.sync()?;
        Ok(())
    }

    /// Releases every record with a sequence number up to `seq`, for the shipper and for
    /// the checkpoint (a caller that applies records itself, and tests): their space may be
    /// reused. The new tail is durable when this returns.
    pub fn release(&mut self, seq: u64) -> Result<(), JournalError> {
        if seq < self.sb.tail_seq {
            return Ok(());
        }
        let upto = seq.min(self.next_seq - 1);
        self.set_released(upto);
        self.set_checkpoint(upto + 1);
        // The records being released must be durable before the superblock says they are
        // gone, or a crash could leave a tail pointing past records that never hit the disk.
        self.sync()?;
        self.move_tail()
    }

    /// Stages, writes and commits the superblock through this journal's own store (the
    /// caller holds it; the tracker's checkpointer writes through a second handle instead).
    pub fn move_tail(&mut self) -> Result<(), JournalError> {
        if let Some(sb) = self.stage() {
            write_superblock_to(&self.store, &sb)?;
            self.commit(sb);
        }
        Ok(())
    }

    /// Records from `seq` (at least the tail) to the head.
    pub fn read_from(&mut self, seq: u64) -> Result<Vec<Record>, JournalError> {
        self.write_out()?;
        let mut scan = Scanner::new(&self.store, &self.sb, self.sb.tail_pos, self.sb.tail_seq);
        let mut out = Vec::new();
        while let Some(r) = scan.next_record() {
            let r = r?;
            if r.header.seq >= seq {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Syncs, marks the journal closed cleanly, and hands back its store.
    pub fn close(mut self) -> Result<S, JournalError> {
        self.sync()?;
        // The tail moves to what is released and checkpointed, in this last write.
        if let Some(sb) = self.stage() {
            self.sb.tail_pos = sb.tail_pos;
            self.sb.tail_seq = sb.tail_seq;
        }
        self.sb.clean = true;
        self.sb.head_pos = self.head_pos;
        self.sb.head_seq = self.next_seq;
        self.write_superblock()?;
        Ok(self.store)
    }
}

#[cfg(test)]
pub(crate) mod crash_store;
#[cfg(test)]
mod tests;
