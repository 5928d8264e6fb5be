//! Failback (docs/PROTOCOL.md, "Failback"): the old primary pulls the volume that was failed
//! over to this target back onto its own device. It asks for the ranges of a pass, sends the
//! checksums of its blocks there, and gets back the blocks that differ; passes repeat while
//! the promoted volume is in use. Once the promoted volume is fenced, the next pass is the
//! last; after it, DONE ends the promotion and the replica goes on at the next generation,
//! fed by the old primary again.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use log::{info, warn};
use redun_shipper::proto::{
    self, BatchEncoder, Frame, Hello, MAX_RANGES, RefuseCode, WireRecord, ZERO_HASH,
};
use redun_tracker::journal::format::Kind;
use serde::{Deserialize, Serialize};

use super::{Promotion, StreamEnd, Target, Tls, frame_name};
use crate::export::Overlay;
use crate::replica::{Refusal, Replica};
use crate::store::{self, Store, merge_ranges};

/// `DATA/NAME.failedback`: the generation the last failback of the volume ended at, so that
/// an old primary that lost the answer to DONE learns it by asking again.
#[derive(Debug, Serialize, Deserialize)]
struct FailedBack {
    generation: u64,
    uuid: String,
}

/// Most bytes one HASHES of a failback may cover.
const MAX_COMPARE: u64 = 32 << 20;
/// Neighbouring differing blocks travel as one record up to this size.
const MAX_RECORD: u32 = 1 << 20;

impl Target {
    fn failedback_path(&self, volume: &str) -> PathBuf {
        self.data_dir.join(format!("{volume}.failedback"))
    }

    /// Refuses writes to the promoted `volume` (waiting for those under way and making them
    /// durable), so that the failback's next pass is its last: the planned failover back
    /// home. Kept across restarts.
    pub fn fence_promoted(&self, volume: &str) -> Result<Promotion, String> {
        if let Some(b) = self.bucket() {
            return Err(format!(
                "volume {volume} is served from {}: failback from a bucket is not available yet",
                b.url()
            ));
        }
        let mut promoted = self.promoted.lock().unwrap();
        let (p, o) = promoted
            .get_mut(volume)
            .ok_or_else(|| format!("volume {volume} is not failed over to this target"))?;
        o.fence()
            .map_err(|e| format!("volume {volume}: cannot sync {}: {e}", o.path().display()))?;
        if !p.failback {
            self.update_promotion(volume, p, |n| n.failback = true)?;
            info!("volume={volume}: writes to the promoted volume refused: failing back");
        }
        Ok(p.clone())
    }

    /// Ends the promotion of `volume` once the failback's last pass is on the old primary
    /// (its overlay [`Overlay::settled`]):
    /// the relationship moves to the next generation, the replica goes on from the records
    /// it holds, and the promoted volume's files are removed.
    fn end_promotion(&self, volume: &str, store: &Store) -> Result<u64, String> {
        let mut promoted = self.promoted.lock().unwrap();
        let p = promoted
            .get(volume)
            .map(|(p, _)| p.clone())
            .ok_or_else(|| format!("volume {volume} is not failed over to this target"))?;
        let next = p.generation + 1;
        let marker = FailedBack {
            generation: next,
            uuid: store.state().uuid,
        };
        store::write_json(&self.failedback_path(volume), &marker).map_err(|e| e.to_string())?;
        store.set_generation(next).map_err(|e| e.to_string())?;
        promoted.remove(volume);
        let (img, ranges) = self.overlay_paths(volume);
        for f in [self.promotion_path(volume), img, ranges] {
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!("volume={volume}: cannot remove {}: {e}", f.display()),
            }
        }
        info!(
            "volume={volume}: failed back to the original site (promoted at point {}); the \
             replica goes on at generation {next}",
            p.point
        );
        Ok(next)
    }

    /// Serves one failback connection, whose first frame was REVERSE `hello`. A refusal is
    /// returned for the caller to send.
    pub(super) fn reverse(
        &self,
        tls: &mut Tls,
        peer: SocketAddr,
        hello: &Hello,
    ) -> Result<(), Refusal> {
        let volume = hello.name.as_str();
        let store = self.store(volume)?.ok_or_else(|| {
            Refusal::new(
                RefuseCode::InvalidState,
                format!("this target holds no replica of volume {volume}: nothing to fail back"),
            )
        })?;
        let st = store.state();
        Replica::check_identity(&st, hello)?;
        let promoted = self.promoted(volume);
        match &promoted {
            Some((p, _)) if hello.generation >= p.generation => {
                return Err(Refusal::new(
                    RefuseCode::GenerationMismatch,
                    format!(
                        "volume {volume} was failed over at generation {}; the source at \
                         generation {} is not the old primary",
                        p.generation, hello.generation
                    ),
                ));
            }
            Some(_) => {}
            None => {
                // Done before: an old primary that lost the answer to DONE asks again.
                let done = store::read_json::<FailedBack>(&self.failedback_path(volume))
                    .ok()
                    .filter(|f| {
                        f.uuid == st.uuid
                            && f.generation == st.generation
                            && hello.generation < f.generation
                    });
                if done.is_none() {
                    return Err(Refusal::new(
                        RefuseCode::InvalidState,
                        format!(
                            "volume {volume} is not failed over to this target: there is \
                             nothing to fail back"
                        ),
                    ));
                }
            }
        }
        let _claim = self.claim(volume)?;
        info!("volume={volume} peer={peer}: failback: pulled back");
        let r = self.passes(tls, volume, &store, promoted.as_ref());
        match r {
            Ok(()) => Ok(()),
            Err(StreamEnd::Closed) => {
                info!("volume={volume} peer={peer}: failback: disconnected");
                Ok(())
            }
            Err(StreamEnd::Io(e)) => {
                warn!("volume={volume} peer={peer}: failback: {e}");
                Ok(())
            }
            Err(StreamEnd::Refused(r)) => Err(r),
        }
    }

    /// Answers PASS, HASHES and DONE until DONE or the end of the connection.
    fn passes(
        &self,
        tls: &mut Tls,
        volume: &str,
        store: &Store,
        promoted: Option<&(Promotion, Arc<Overlay>)>,
    ) -> Result<(), StreamEnd> {
        let mut first = true;
        let mut enc = BatchEncoder::new(3).map_err(StreamEnd::Io)?;
        loop {
            let answer = match proto::read_frame(tls) {
                Ok(Frame::Pass) => {
                    let (last, ranges, point, generation) = match promoted {
                        Some((p, o)) => {
                            let (last, mut ranges) = o.take_pass(first);
                            if first {
                                // What the old primary's replica got after the point.
                                ranges.extend(store.changed_after(p.point));
                            }
                            (last, ranges, p.point, p.generation)
                        }
                        None => (true, Vec::new(), 0, store.state().generation),
                    };
                    first = false;
                    Frame::Ranges {
                        last,
                        point,
                        applied: store.applied().saturating_sub(1),
                        generation,
                        ranges: at_most(merge_ranges(ranges), MAX_RANGES)
                            .into_iter()
                            .map(|(a, b)| (a, b - a))
                            .collect(),
                    }
                }
                Ok(Frame::Hashes {
                    offset,
                    block,
                    hashes,
                    ..
                }) => {
                    let Some((_, o)) = promoted else {
                        return Err(StreamEnd::Refused(Refusal::new(
                            RefuseCode::InvalidState,
                            format!("volume {volume} has failed back already: nothing to compare"),
                        )));
                    };
                    differing(o, volume, offset, u64::from(block), &hashes, &mut enc)?
                }
                Ok(Frame::Done { head }) => {
                    let generation = match promoted {
                        Some((_, o)) => {
                            if !o.settled() {
                                return Err(StreamEnd::Refused(Refusal::new(
                                    RefuseCode::InvalidState,
                                    format!(
                                        "volume {volume}: DONE before the last pass (the \
                                         promoted volume still takes writes)"
                                    ),
                                )));
                            }
                            self.end_promotion(volume, store)
                                .map_err(|m| StreamEnd::Refused(Refusal::new(RefuseCode::Io, m)))?
                        }
                        None => store.state().generation,
                    };
                    info!(
                        "volume={volume}: failback: the old primary holds the volume up to its \
                         record {head}; generation {generation}"
                    );
                    let welcome = Frame::Welcome {
                        next_seq: store.applied(),
                        generation,
                        sync_job: 0,
                        sync_cursor: 0,
                    };
                    proto::write_frame(tls, &welcome).map_err(StreamEnd::Io)?;
                    return Ok(());
                }
                Ok(f) => {
                    return Err(StreamEnd::Refused(Refusal::new(
                        RefuseCode::Protocol,
                        format!(
                            "expected PASS, HASHES or DONE during a failback, got {}",
                            frame_name(&f)
                        ),
                    )));
                }
                Err(e) => return Err(e.into()),
            };
            proto::write_frame(tls, &answer).map_err(StreamEnd::Io)?;
        }
    }
}

/// Merges neighbours (smallest gaps first would be better; nearest in order is enough)
/// until at most `max` ranges remain.
fn at_most(mut v: Vec<(u64, u64)>, max: usize) -> Vec<(u64, u64)> {
    while v.len() > max {
        v = v.chunks(2).map(|c| (c[0].0, c[c.len() - 1].1)).collect();
    }
    v
}

/// The answer to the old primary's checksums of the blocks from `offset`: the blocks of the
/// promoted volume that differ, as records (neighbours merged, zeroes without data).
fn differing(
    o: &Overlay,
    volume: &str,
    offset: u64,
    block: u64,
    theirs: &[u128],
    enc: &mut BatchEncoder,
) -> Result<Frame, StreamEnd> {
    let size = o.view().size();
    let span = theirs.len() as u64 * block;
    if offset >= size || span > MAX_COMPARE {
        return Err(StreamEnd::Refused(Refusal::new(
            RefuseCode::Protocol,
            format!(
                "volume {volume}: checksums of {offset}+{span} are beyond the volume's {size} \
                 bytes or cover more than {MAX_COMPARE}"
            ),
        )));
    }
    let length = span.min(size - offset);
    let mut buf = vec![0u8; usize::try_from(length).expect("at most 32 MiB")];
    o.read_at(&mut buf, offset).map_err(|e| {
        StreamEnd::Refused(Refusal::new(
            RefuseCode::Io,
            format!("volume {volume}: cannot read the promoted volume: {e}"),
        ))
    })?;
    let mut records: Vec<WireRecord> = Vec::new();
    let step = usize::try_from(block).expect("at most 4 MiB");
    for (i, data) in buf.chunks(step).enumerate() {
        let mine = proto::block_hash(data);
        if mine == theirs[i] {
            continue;
        }
        let at = offset + i as u64 * block;
        let kind = if mine == ZERO_HASH {
            Kind::Zero
        } else {
            Kind::Write
        } as u8;
        let len = u32::try_from(data.len()).expect("at most 4 MiB");
        match records.last_mut() {
            Some(r)
                if r.kind == kind
                    && r.offset + u64::from(r.length) == at
                    && r.length + len <= MAX_RECORD =>
            {
                r.length += len;
                if kind == Kind::Write as u8 {
                    r.payload.extend_from_slice(data);
                }
            }
            _ => records.push(WireRecord {
                seq: records.len() as u64 + 1,
                kind,
                offset: at,
                length: len,
                payload: if kind == Kind::Write as u8 {
                    data.to_vec()
                } else {
                    Vec::new()
                },
            }),
        }
    }
    let batch = if records.is_empty() {
        None
    } else {
        Some(enc.encode(&records).map_err(StreamEnd::Io)?)
    };
    Ok(Frame::Blocks {
        offset,
        length,
        batch,
    })
}

#[cfg(test)]
mod tests {
    use super::at_most;

    #[test]
    fn at_most_merges_neighbours_until_few_enough() {
        let v: Vec<(u64, u64)> = (0..10).map(|i| (i * 10, i * 10 + 1)).collect();
        let w = at_most(v.clone(), 3);
        assert!(w.len() <= 3);
        assert_eq!(w.first().unwrap().0, 0);
        assert_eq!(w.last().unwrap().1, 91);
        assert_eq!(at_most(v.clone(), 10), v);
    }
}
