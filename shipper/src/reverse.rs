//! Failback (`redun reverse`): the old primary's shipper pulls the volume that was failed
//! over to the target back onto the old primary's device (docs/PROTOCOL.md, "Failback").
//!
//! The tracker's volume stays fenced throughout, so the application cannot write to it. Each
//! pass asks the target for its ranges (the first: everything written on either side since
//! the failover point; later ones: what the promoted volume took since the previous pass),
//! reads and checksums those blocks of the device, and gets back from the target the blocks
//! that differ. They are written to `NAME.failback` beside the journal and applied by the
//! tracker, which records them in the journal like any write. Passes repeat while the
//! promoted volume is in use; once the target fences it (`redun failover --planned`), the
//! next pass is the last. After it, the target ends the promotion, this volume's generation
//! moves on, the tracker takes writes again and shipping resumes towards the target.

use std::collections::VecDeque;
use std::fs::File;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use log::{info, warn};
use redun_tracker::admin::AdminRequest;
use redun_tracker::journal::format::{self, BlockExtent, Kind};
use redun_tracker::journal::reader::JournalReader;
use redun_tracker::track::map::DirtyView;
use redun_tracker::track::{failback_path, map_path};
use serde::{Deserialize, Serialize};

use crate::proto::{self, BatchDecoder, Frame};
use crate::ship::{ShipError, VolumeShipper, classify_io, proto_err, refused, unix_now};
use crate::sync::{Pool, ReadReq, Source, ask, block_ranges, device_path, next_chunk, read_chunk};

/// Failback compares 4 KiB blocks: what changed on either side is usually small and
/// scattered.
const BLOCK: u32 = 4096;
/// HASHES (of 8 MiB chunks, [`next_chunk`]) sent ahead of their answers.
const AHEAD: usize = 4;
/// `NAME.failback` is handed to the tracker at this size (and at the end of each pass).
const STAGE_BYTES: usize = 16 << 20;
/// Between passes while the promoted volume is in use.
const PASS_PAUSE: Duration = Duration::from_millis(500);

/// A pass: whether it is the last, the point, the replica's last record, and the ranges as
/// `(offset, length)`.
type PassRanges = (bool, u64, u64, Vec<(u64, u64)>);

/// What `status` says of a failback.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReverseStatus {
    /// `connecting`, `comparing`, `waiting` (for the next pass), `done`, `failed`.
    pub phase: String,
    /// The point the volume was failed over at.
    pub point: u64,
    /// Passes completed.
    pub passes: u64,
    /// The pass under way is the last (the promoted volume takes no more writes).
    pub last: bool,
    /// Bytes compared, and block bytes copied back (uncompressed) and received on the wire.
    pub compared_bytes: u64,
    pub copied_bytes: u64,
    pub wire_bytes: u64,
    pub started_unix: f64,
    /// Once done: the relationship's new generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `NAME.generation` beside the journal: the relationship's generation after a failback
/// (it wins over `shipper.generation` when higher).
pub fn generation_path(journal: &Path) -> PathBuf {
    journal.with_extension("generation")
}

pub fn stored_generation(journal: &Path) -> Option<u64> {
    std::fs::read_to_string(generation_path(journal))
        .ok()
        .and_then(|t| t.trim().parse().ok())
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

impl VolumeShipper {
    /// Runs a failback of this volume to its end (or until `stop`), with retries after a
    /// lost connection; `full` compares every block instead of the changed ranges.
    pub fn run_reverse(&self, tracker: &Path, full: bool, stop: &AtomicBool) {
        let mut failures = 0u32;
        while !stop.load(Ordering::SeqCst) {
            match self.reverse(tracker, full, stop) {
                Ok(()) => return,
                Err(ShipError::Fatal(m)) => {
                    warn!("volume={}: failback stopped: {m}", self.name);
                    self.update_reverse(|r| {
                        r.phase = "failed".into();
                        r.error = Some(m.clone());
                    });
                    return;
                }
                Err(ShipError::Retry(m)) => {
                    let delay = crate::ship::retry_delay(failures, self.retry_unit());
                    failures = failures.saturating_add(1);
                    warn!(
                        "volume={}: failback: {m}; retry {failures} in {:.1}s",
                        self.name,
                        delay.as_secs_f64()
                    );
                    self.update_reverse(|r| {
                        r.phase = "connecting".into();
                        r.error = Some(m.clone());
                    });
                    let until = std::time::Instant::now() + delay;
                    while std::time::Instant::now() < until && !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
    }

    fn reverse(&self, tracker: &Path, full: bool, stop: &AtomicBool) -> Result<(), ShipError> {
        let volume = self.name.clone();
        let fatal = |e: crate::sync::SyncError| ShipError::Fatal(e.0);
        let path = device_path(tracker, &volume).map_err(fatal)?;
        let device = File::open(&path).map_err(|e| {
            ShipError::Fatal(format!(
                "volume {volume}: cannot read its device {path}: {e}"
            ))
        })?;
        let mut reader = JournalReader::open(&self.journal).map_err(|e| {
            ShipError::Fatal(format!(
                "cannot open journal {}: {e}",
                self.journal.display()
            ))
        })?;
        let sb = *reader.superblock();
        let size = sb.volume_size;
        let target = self.target().to_string();
        let mut tls = self.connect()?;
        proto::write_frame(&mut tls, &Frame::Reverse(self.hello(&sb)))
            .map_err(|e| classify_io(&target, &e))?;
        let mut decoder = BatchDecoder::new().map_err(|e| ShipError::Fatal(e.to_string()))?;
        let mut first = true;
        loop {
            let (last, point, applied, mut ranges) = self.ask_pass(&mut tls)?;
            if first && point == 0 {
                // The target ended the failback already (the answer to DONE was lost).
                break;
            }
            if first {
                // The target agreed: no application write may reach the device from here on.
                ask(
                    tracker,
                    &volume,
                    &AdminRequest::Fence {
                        volume: volume.clone(),
                    },
                )
                .map_err(fatal)?;
                if full {
                    ranges = vec![(0, size)];
                } else {
                    // What the old primary changed that the replica never got.
                    ranges.extend(local_changes(&mut reader, applied, &self.journal)?);
                }
                self.update_reverse(|r| r.point = point);
                first = false;
            }
            self.update_reverse(|r| {
                r.phase = "comparing".into();
                r.last = last;
                r.error = None;
            });
            self.pass(&mut tls, &mut decoder, &device, tracker, &ranges, size)?;
            self.update_reverse(|r| r.passes += 1);
            if last {
                break;
            }
            self.update_reverse(|r| r.phase = "waiting".into());
            std::thread::sleep(PASS_PAUSE);
            if stop.load(Ordering::SeqCst) {
                return Err(ShipError::Retry("stopping".into()));
            }
        }
        let head = crate::sync::head(tracker, &volume).map_err(fatal)?;
        proto::write_frame(&mut tls, &Frame::Done { head })
            .map_err(|e| classify_io(&target, &e))?;
        let generation = match proto::read_frame(&mut tls).map_err(|e| proto_err(&target, e))? {
            Frame::Welcome { generation, .. } => generation,
            Frame::Refuse { code, message } => return Err(refused(&target, code, &message)),
            _ => {
                return Err(ShipError::Retry(format!(
                    "target {target}: unexpected answer to DONE"
                )));
            }
        };
        let gpath = generation_path(&self.journal);
        redun_tracker::journal::reader::replace_durably(
            &gpath,
            format!("{generation}\n").as_bytes(),
        )
        .map_err(|e| {
            ShipError::Fatal(format!(
                "volume {volume}: failed back, but cannot write {}: {e}; write {generation} \
                 into it (or set shipper.generation = {generation}) and run `redun unfence \
                 {volume}`",
                gpath.display()
            ))
        })?;
        self.set_generation(generation);
        ask(
            tracker,
            &volume,
            &AdminRequest::Unfence {
                volume: volume.clone(),
            },
        )
        .map_err(fatal)?;
        let _ = std::fs::remove_file(failback_path(&self.journal));
        let s = self.update_reverse(|r| {
            r.phase = "done".into();
            r.generation = Some(generation);
        });
        info!(
            "volume={volume}: failed back: {} passes, {} bytes compared, {} bytes copied ({} on \
             the wire); the volume takes writes again and ships at generation {generation}",
            s.passes, s.compared_bytes, s.copied_bytes, s.wire_bytes
        );
        self.resume();
        Ok(())
    }

    /// Asks for the next pass.
    fn ask_pass(&self, tls: &mut Tls) -> Result<PassRanges, ShipError> {
        let target = self.target().to_string();
        proto::write_frame(tls, &Frame::Pass).map_err(|e| classify_io(&target, &e))?;
        match proto::read_frame(tls).map_err(|e| proto_err(&target, e))? {
            Frame::Ranges {
                last,
                point,
                applied,
                ranges,
                ..
            } => Ok((last, point, applied, ranges)),
            Frame::Refuse { code, message } => Err(refused(&target, code, &message)),
            _ => Err(ShipError::Retry(format!(
                "target {target}: unexpected answer to PASS"
            ))),
        }
    }

    /// One pass over `ranges`: checksums of the device's blocks out, the differing blocks
    /// back, staged and applied by the tracker.
    fn pass(
        &self,
        tls: &mut Tls,
        decoder: &mut BatchDecoder,
        device: &File,
        tracker: &Path,
        ranges: &[(u64, u64)],
        size: u64,
    ) -> Result<(), ShipError> {
        let target = self.target().to_string();
        let io = |e: std::io::Error| classify_io(&target, &e);
        let mut todo: VecDeque<(u64, u64)> = block_ranges(ranges, u64::from(BLOCK), size, 0).into();
        let regular = device.metadata().is_ok_and(|m| m.is_file());
        let pool = Pool::default();
        let mut waiting: VecDeque<(u64, u64)> = VecDeque::new();
        let mut stage: Vec<u8> = Vec::new();
        loop {
            while waiting.len() < AHEAD {
                let Some((a, l)) = next_chunk(&mut todo) else {
                    break;
                };
                let req = ReadReq { offset: a, len: l };
                let Source { hashes, data } =
                    read_chunk(device, regular, u64::from(BLOCK), &req, &pool).map_err(|e| {
                        ShipError::Fatal(format!(
                            "volume {}: cannot read its device: {e}",
                            self.name
                        ))
                    })?;
                pool.lock().unwrap().push(data);
                let f = Frame::Hashes {
                    job: 0,
                    offset: a,
                    block: BLOCK,
                    as_of: 0,
                    hashes,
                };
                proto::write_frame(tls, &f).map_err(io)?;
                waiting.push_back((a, l));
            }
            let Some((a, l)) = waiting.pop_front() else {
                break;
            };
            let batch = match proto::read_frame(tls).map_err(|e| proto_err(&target, e))? {
                Frame::Blocks { offset, batch, .. } if offset == a => batch,
                Frame::Refuse { code, message } => return Err(refused(&target, code, &message)),
                _ => {
                    return Err(ShipError::Retry(format!(
                        "target {target}: unexpected answer to HASHES"
                    )));
                }
            };
            let (mut copied, mut wire) = (0, 0);
            if let Some(b) = batch {
                wire = b.compressed.len() as u64;
                let records = decoder
                    .decode(&b)
                    .map_err(|e| ShipError::Retry(format!("target {target}: {e}")))?;
                for r in &records {
                    let end = r.offset + u64::from(r.length);
                    if r.offset < a || end > a + l {
                        return Err(ShipError::Retry(format!(
                            "target {target}: block {}+{} outside {a}+{l}",
                            r.offset, r.length
                        )));
                    }
                    let data = (r.kind == Kind::Write as u8).then_some(r.payload);
                    format::encode_extents(
                        &[BlockExtent {
                            offset: r.offset,
                            length: r.length,
                            data,
                        }],
                        &mut stage,
                    );
                    copied += u64::from(r.length);
                }
            }
            self.update_reverse(|r| {
                r.compared_bytes += l;
                r.copied_bytes += copied;
                r.wire_bytes += wire;
            });
            if stage.len() >= STAGE_BYTES {
                self.apply_stage(tracker, &mut stage)?;
            }
        }
        self.apply_stage(tracker, &mut stage)
    }

    /// Hands the staged blocks to the tracker, which writes and records them durably.
    fn apply_stage(&self, tracker: &Path, stage: &mut Vec<u8>) -> Result<(), ShipError> {
        if stage.is_empty() {
            return Ok(());
        }
        let path = failback_path(&self.journal);
        std::fs::write(&path, &stage).map_err(|e| {
            ShipError::Fatal(format!(
                "volume {}: cannot write {}: {e}",
                self.name,
                path.display()
            ))
        })?;
        ask(
            tracker,
            &self.name,
            &AdminRequest::FailbackApply {
                volume: self.name.clone(),
            },
        )
        .map_err(|e| ShipError::Fatal(e.0))?;
        stage.clear();
        Ok(())
    }
}

/// The ranges (`(offset, length)`) the journal's records after `applied` changed, and the
/// dirty ranges of the region map: what the old primary wrote that the replica lacks.
fn local_changes(
    reader: &mut JournalReader,
    applied: u64,
    journal: &Path,
) -> Result<Vec<(u64, u64)>, ShipError> {
    let mut out = Vec::new();
    let tail = reader.superblock().tail_seq;
    if applied + 1 < tail {
        return Err(ShipError::Fatal(format!(
            "journal {} starts at seq {tail} but the replica holds records up to {applied}: \
             the changes in between cannot be known; run `redun reverse --full`",
            journal.display()
        )));
    }
    if reader.seek(applied + 1).is_ok() {
        while let Some(r) = reader
            .next_record()
            .map_err(|e| ShipError::Fatal(format!("journal {}: {e}", journal.display())))?
        {
            let h = r.header;
            if matches!(h.kind, Kind::Write | Kind::Trim | Kind::Zero) && h.length > 0 {
                out.push((h.offset, u64::from(h.length)));
            }
        }
    }
    let map = map_path(journal);
    if map.exists() {
        let dirty = DirtyView::read(&map).map_err(ShipError::Fatal)?;
        out.extend(dirty.ranges);
    }
    out.sort_unstable();
    Ok(out)
}

impl VolumeShipper {
    /// Changes the failback's status and returns a copy.
    pub fn update_reverse(&self, f: impl FnOnce(&mut ReverseStatus)) -> ReverseStatus {
        let mut s = self.status_mut();
        let r = s.reverse.get_or_insert_with(|| ReverseStatus {
            phase: "connecting".into(),
            started_unix: unix_now(),
            ..Default::default()
        });
        f(r);
        r.clone()
    }
}
