//! Shipping a volume straight into a bucket (`--target-store`, docs/FORMAT.md "Bucket
//! layout"): records are gathered into segments, a batch of segments is uploaded in
//! parallel and listed by the next manifest version, and only then released from the
//! journal. Synchronisations (initial replication, resync) run as with a target, except
//! that the bucket cannot checksum its blocks: every block of a job's ranges that holds
//! data is sent, and zero blocks travel as ranges.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use log::{info, warn};
use redun_store::bucket::{Bucket, BucketError, Gc, Merged, VolumeWriter};
use redun_store::crypt::VolumeKey;
use redun_store::pack::{PIECE_FAST_WINDOW, Packer};
use redun_store::segment::{Identity, SegmentBuf};
use redun_tracker::journal::Record;
use redun_tracker::journal::format::{Kind, SyncInfo};

use crate::proto::{self, Frame, WireRecord};
use crate::ship::{InFlight, RateWindow, ShipError, VolumeShipper, journal_err};
use crate::sync::Sync;

/// What the bucket answers for a block it cannot checksum: matches no block, and is not
/// the zero hash (so a block that holds data on the source is always sent).
const UNKNOWN_HASH: u128 = u128::MAX;

/// Where and how volumes are shipped into a bucket.
#[derive(Debug)]
pub struct StoreTarget {
    pub bucket: Arc<Bucket>,
    /// `NAME.key` per volume.
    pub key_dir: PathBuf,
    /// A segment closes at this many bytes.
    pub segment_bytes: usize,
    /// Segments uploaded in parallel by one manifest version.
    pub uploads: usize,
    /// A batch is uploaded at the latest this long after its first record was read.
    pub flush_after: Duration,
    /// Retention in the bucket, applied every [`MAINTAIN_EVERY`].
    pub gc: Gc,
}

/// How often the writer applies retention in the bucket.
pub const MAINTAIN_EVERY: Duration = Duration::from_secs(5);

/// Segments being filled, not yet in the bucket.
#[derive(Debug, Default)]
struct Pending {
    segs: Vec<SegmentBuf>,
    /// Record bytes (as on the wire, before compression).
    bytes: u64,
    last_seq: u64,
    since: Option<Instant>,
}

fn bucket_err(e: &BucketError) -> ShipError {
    if e.is_transient() {
        ShipError::Retry(e.to_string())
    } else {
        ShipError::Fatal(e.to_string())
    }
}

impl VolumeShipper {
    /// One session of shipping into the bucket; like [`VolumeShipper::session`], it ends on
    /// `stop` (`Ok`) or on an error the caller retries or reports as critical.
    pub(crate) fn bucket_session(
        &self,
        st: &StoreTarget,
        stop: &AtomicBool,
        connected: &mut bool,
    ) -> Result<(), ShipError> {
        let r = self.bucket_session_inner(st, stop, connected);
        if let Err(ShipError::Fatal(_)) = &r {
            // A writer that was fenced or refused is not used again: `redun resume` opens
            // a new one, which reads the bucket afresh.
            *self.writer.lock().unwrap() = None;
        }
        r
    }

    fn bucket_session_inner(
        &self,
        st: &StoreTarget,
        stop: &AtomicBool,
        connected: &mut bool,
    ) -> Result<(), ShipError> {
        let url = st.bucket.url().to_string();
        let mut reader = self.open_journal()?;
        let sb = *reader.superblock();
        let mut guard = self.writer.lock().unwrap();
        if guard.is_none() {
            let key_file = st.key_dir.join(format!("{}.key", self.name));
            let key = VolumeKey::load(&key_file)
                .map_err(|e| ShipError::Fatal(format!("volume {}: {e}", self.name)))?;
            let id = Identity {
                name: self.name.clone(),
                uuid: redun_store::segment::hex(&sb.volume_uuid),
                size: sb.volume_size,
                generation: self.generation(),
            };
            let w = VolumeWriter::open(st.bucket.clone(), &id, Arc::new(key))
                .map_err(|e| bucket_err(&e))?;
            *guard = Some(w);
        }
        let w = guard.as_mut().expect("opened above");
        // An append of the last session whose answer was lost is settled first.
        let next_seq = w.settle().map_err(|e| bucket_err(&e))?;
        let replica_job = w.manifest().sync.map_or((0, 0), |s| (s.job, s.cursor));
        let who = format!("volume {}: the bucket {url}", self.name);
        let start = self.start_at(&mut reader, next_seq, &who)?;
        info!(
            "volume={}: shipping to bucket {url} from seq {start} (manifest version {})",
            self.name,
            w.manifest().version
        );
        let mut rate = RateWindow::default();
        let mut pending = Pending::default();
        let mut packer = Packer::new(self.opts.level, PIECE_FAST_WINDOW)
            .map_err(|e| ShipError::Fatal(format!("volume {}: zstd: {e}", self.name)))?;
        let mut sync: Option<Sync> = None;
        let mut held: Option<Record> = None;
        let mut next_sync_try = Instant::now();
        let mut next_maintain = Instant::now() + MAINTAIN_EVERY;
        let mut merging: Option<Merging> = None;
        loop {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                // What is buffered was not released: the next session reads it again.
                return Ok(());
            }
            if Instant::now() >= next_maintain {
                next_maintain = Instant::now() + MAINTAIN_EVERY;
                self.maintain(w, &st.gc, &mut merging)?;
                self.status_mut().bucket_puts = Some(w.puts());
            }
            if let Some(s) = sync.as_mut() {
                if let Err(e) = pump_without_target(s) {
                    warn!("volume={}: synchronisation stopped: {}", self.name, e.0);
                    self.status_mut().last_error = Some(e.0);
                    sync = None;
                    next_sync_try = Instant::now() + Duration::from_secs(5);
                }
                self.note_sync(sync.as_ref());
            }
            let full = pending.segs.len() >= st.uploads
                && pending
                    .segs
                    .last()
                    .is_some_and(|s| s.len() >= st.segment_bytes);
            let records = if full {
                Vec::new()
            } else {
                self.read_batch(&mut reader, &mut held, sync.as_mut())?
            };
            let read_some = !records.is_empty();
            for r in records {
                add(w, &mut pending, (st.segment_bytes, &mut packer), r).map_err(|e| {
                    ShipError::Fatal(format!("volume {}: journal record: {e}", self.name))
                })?;
            }
            if read_some {
                let window: VecDeque<InFlight> = pending.in_flight().into_iter().collect();
                self.note_lag(&window);
            }
            let due = pending
                .since
                .is_some_and(|t| full || t.elapsed() >= st.flush_after);
            if due {
                let segs = std::mem::take(&mut pending.segs);
                let n = segs.len() as u64;
                let sent: u64 = segs.iter().map(|s| s.len() as u64).sum();
                if !self.opts.throttle.take(sent, stop) {
                    return Ok(());
                }
                let next = w.append(segs);
                self.status_mut().bucket_puts = Some(w.puts());
                let next = next.map_err(|e| bucket_err(&e))?;
                let through = next - 1;
                // Listed by a manifest in the bucket: durable.
                let bytes = std::mem::take(&mut pending.bytes);
                pending.since = None;
                self.durable(&mut reader, through, (n, bytes, sent), &mut rate)?;
                *connected = true;
                self.sync_acked(&mut sync, through, &mut next_sync_try);
                self.note_lag(&VecDeque::new());
                continue;
            }
            if read_some {
                continue;
            }
            self.status_mut().throughput_bytes_per_second = rate.per_second(0);
            // Caught up: a synchronisation starts only now, so that its records find room
            // in the journal.
            if sync.is_none() && pending.since.is_none() {
                sync = self.maybe_sync(replica_job, next_seq, sb.volume_size, &mut next_sync_try);
                if sync.is_some() {
                    continue;
                }
            }
            if let Some(s) = sync.as_mut().filter(|s| s.awaiting_source()) {
                s.poll_source(Some(Duration::from_millis(20)))
                    .map_err(|e| ShipError::Retry(e.0))?;
                continue;
            }
            let wait = pending.since.map_or(crate::ship::IDLE_WAIT, |t| {
                st.flush_after
                    .saturating_sub(t.elapsed())
                    .min(crate::ship::IDLE_WAIT)
            });
            reader
                .wait(wait)
                .map_err(|e| journal_err(&self.journal, e.into()))?;
        }
    }
}

impl VolumeShipper {
    /// Applies retention in the bucket. A transient failure is logged and tried again at
    /// the next pass (shipping goes on); fencing stops the session.
    ///
    /// A merge runs on its own thread (it reads and uploads whole regions) while records
    /// keep being shipped; a later pass lists what it uploaded.
    fn maintain(
        &self,
        w: &mut VolumeWriter,
        gc: &Gc,
        merging: &mut Option<Merging>,
    ) -> Result<(), ShipError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let now_ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
        // Fencing and refusals stop the session; anything else (the server, a damaged
        // object) is reported and tried again while records keep being shipped.
        let failed = |e: BucketError| match e {
            BucketError::Fenced { .. } | BucketError::Refused { .. } => Err(bucket_err(&e)),
            e => {
                warn!(
                    "volume={}: retention in the bucket: {e} (tried again in {}s)",
                    self.name,
                    MAINTAIN_EVERY.as_secs()
                );
                if !e.is_transient() {
                    self.status_mut().last_error = Some(format!("retention in the bucket: {e}"));
                }
                Ok(())
            }
        };
        if merging.as_ref().is_some_and(|m| m.thread.is_finished()) {
            let m = merging.take().expect("checked above");
            match m.thread.join().expect("a merge thread does not panic") {
                Ok(done) => {
                    if let Err(e) = w.finish_merge(done, now_ms) {
                        return failed(e);
                    }
                }
                // The job's uploads are orphans, deleted after the grace.
                Err(e) => warn!(
                    "volume={}: merging into the bucket's base: {e} (tried again later)",
                    self.name
                ),
            }
        }
        let token = merging.as_ref().map(|m| m.token.clone());
        match w.tidy(gc, now_ms, token.as_deref()) {
            Ok((_, Some(job))) => {
                let token = job.token().to_string();
                let thread = std::thread::Builder::new()
                    .name(format!("merge-{}", self.name))
                    .spawn(move || job.run())
                    .map_err(|e| ShipError::Retry(format!("cannot start a merge thread: {e}")))?;
                *merging = Some(Merging { token, thread });
                Ok(())
            }
            Ok((_, None)) => Ok(()),
            Err(e) => failed(e),
        }
    }
}

/// A merge into the bucket's base running on its own thread.
#[derive(Debug)]
struct Merging {
    token: String,
    thread: std::thread::JoinHandle<Result<Merged, BucketError>>,
}

impl Pending {
    /// The buffered records as one batch in flight (lag and RPO in status).
    fn in_flight(&self) -> Option<InFlight> {
        Some(InFlight {
            last_seq: self.last_seq,
            bytes: self.bytes,
            sent: 0,
            read_at: self.since?,
        })
    }
}

/// Adds a record read from the journal to the segment being filled (a new one when it is
/// full).
fn add(
    w: &VolumeWriter,
    p: &mut Pending,
    (segment_bytes, packer): (usize, &mut Packer),
    r: WireRecord,
) -> Result<(), String> {
    if p.segs.last().is_none_or(|s| s.len() >= segment_bytes) {
        p.segs.push(w.segment(r.seq));
    }
    let seg = p.segs.last_mut().expect("pushed above");
    p.bytes += (proto::RECORD_LEN + r.payload.len()) as u64;
    p.last_seq = r.seq;
    p.since.get_or_insert_with(Instant::now);
    match Kind::from_u8(r.kind) {
        Some(Kind::Sync) => {
            let info = SyncInfo::decode(&r.payload)
                .ok_or_else(|| format!("seq {}: not a sync record", r.seq))?;
            let end = r.offset + u64::from(r.length);
            let blocks = proto::decode_slot(&r.payload, r.offset, end)
                .map_err(|e| format!("seq {}: {e}", r.seq))?;
            seg.push_sync(r.seq, info, (r.offset, r.length), blocks.as_deref(), packer)
                .map_err(|e| format!("seq {}: cannot compress: {e}", r.seq))?;
        }
        Some(Kind::Write) => seg
            .push_write(r.seq, r.offset, &r.payload, packer)
            .map_err(|e| format!("seq {}: cannot compress: {e}", r.seq))?,
        Some(k @ (Kind::Marker | Kind::Decision)) => {
            seg.push(k, r.seq, r.offset, r.length, &r.payload);
        }
        Some(k @ (Kind::Trim | Kind::Zero)) => seg.push(k, r.seq, r.offset, r.length, &[]),
        Some(Kind::Pad) | None => {
            return Err(format!("seq {}: kind {} cannot be shipped", r.seq, r.kind));
        }
    }
    Ok(())
}

/// Drives a synchronisation with nobody to checksum the replica's blocks: every hash
/// request is answered at once with [`UNKNOWN_HASH`] for each block.
fn pump_without_target(s: &mut Sync) -> Result<(), crate::sync::SyncError> {
    s.poll_source(None)?;
    loop {
        let mut asks = Vec::new();
        s.pump(&mut |f| {
            if let Frame::HashRequest {
                job,
                offset,
                length,
                block,
            } = f
            {
                asks.push((*job, *offset, *length, *block));
            }
            Ok(())
        })?;
        if asks.is_empty() {
            return Ok(());
        }
        for (job, offset, length, block) in asks {
            let n = usize::try_from(length.div_ceil(u64::from(block))).expect("small");
            s.on_hashes(job, offset, block, vec![UNKNOWN_HASH; n])?;
        }
    }
}
