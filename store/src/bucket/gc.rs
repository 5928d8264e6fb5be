//! Retention in a bucket (docs/FORMAT.md, "Retention in a bucket"): the volume's writer
//! prunes points, merges the segments that no kept point needs into base objects, and
//! deletes the objects that no manifest has listed for a grace period.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use object_store::ObjectStoreExt;
use redun_tracker::journal::format::Kind;

use super::{
    BaseIndex, BaseIndexRef, BaseObject, BucketError, BucketManifest, Garbage, VolumeReader,
    VolumeWriter,
};
use crate::extent::{ExtentMap, Src};
use crate::pack::{PIECE_FAST_WINDOW, Packer};
use crate::retention::Retention;
use crate::segment::{SegmentBuf, SegmentRef};

/// Decrypted chunks a merge keeps in memory while it reads the objects it merges.
const MERGE_CACHE: usize = 64 << 20;
/// Volume bytes per entry of a base object.
const PIECE: u64 = 4 << 20;
/// Base objects a merge holds in memory and uploads at once.
const PARALLEL: usize = 4;

/// What a writer keeps in the bucket, and when it cleans up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gc {
    pub retention: Retention,
    /// The segments before the oldest kept point are merged into the base once they hold
    /// this many bytes and a quarter of the base's (so a merge rewrites at most four times
    /// what it merges).
    pub merge_bytes: u64,
    /// Volume bytes per base object, for a volume that has no base yet.
    pub region_bytes: u64,
    /// An object is deleted once no manifest has listed it for this long (readers of an
    /// older manifest move on meanwhile); an object no manifest ever listed (a fenced
    /// writer's, an upload whose manifest failed) once it is this old.
    pub grace_ms: u64,
    /// zstd level of base objects' payloads.
    pub level: i32,
}

impl Default for Gc {
    /// The default retention, merges from 64 MiB, 64 MiB regions, one hour of grace.
    fn default() -> Gc {
        Gc {
            retention: Retention::default(),
            merge_bytes: 64 << 20,
            region_bytes: 64 << 20,
            grace_ms: 3_600_000,
            level: 3,
        }
    }
}

/// What one maintenance pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Maintained {
    pub pruned: usize,
    pub merged_segments: usize,
    pub base_objects: usize,
    /// Segments between two kept points replaced by one.
    pub compacted_segments: usize,
    pub deleted: usize,
}

/// A merge prepared by [`VolumeWriter::tidy`]: builds and uploads the new base objects
/// from a snapshot of the manifest (immutable objects only), on any thread, while the writer
/// goes on appending; [`VolumeWriter::finish_merge`] then lists them.
#[derive(Debug)]
pub struct MergeJob {
    reader: VolumeReader,
    id: crate::segment::Identity,
    /// Names the job's objects (`base/...-TOKEN-N...`), so that the writer's deletions
    /// leave them alone while it runs.
    names: super::ObjectNames,
    work: Work,
    region_bytes: u64,
    level: i32,
}

/// What a [`MergeJob`] rewrites.
#[derive(Debug, Clone, Copy)]
enum Work {
    /// The snapshot's first `n` segments, into the base.
    Base { n: usize },
    /// The snapshot's segments `at..at + n`, which hold no kept point but at the end of
    /// their last, into one segment.
    Compact { at: usize, n: usize },
}

/// What a finished [`MergeJob`] uploaded.
#[derive(Debug)]
pub struct Merged {
    puts: u64,
    outcome: Outcome,
}

#[derive(Debug)]
enum Outcome {
    Base(NewBase),
    Compacted {
        /// The segments compacted, in order.
        run: Vec<String>,
        /// The segment that replaces them; `None` when that would not save a quarter of
        /// their data (the run is left as it is).
        into: Option<SegmentRef>,
    },
}

/// The base a merge uploaded.
#[derive(Debug)]
struct NewBase {
    through: u64,
    /// The base index the job's snapshot had (the manifest must still name it).
    old_base: Option<String>,
    base: BaseIndexRef,
    /// The snapshot's segments and base objects the new base replaces.
    unlisted: Vec<String>,
    merged_segments: usize,
    base_objects: usize,
}

/// A compaction reads at most this many segment bytes (or twice `merge_bytes`): it builds
/// its segment in memory.
const COMPACT_MAX: u64 = 128 << 20;

impl VolumeWriter {
    /// One maintenance pass at `now_ms`, the merge done here and now (see
    /// [`VolumeWriter::tidy`] and [`MergeJob`] for the steps).
    pub fn maintain(&mut self, gc: &Gc, now_ms: u64) -> Result<Maintained, BucketError> {
        let (mut done, job) = self.tidy(gc, now_ms, None)?;
        if let Some(job) = job {
            match self.finish_merge(job.run()?, now_ms)?.outcome {
                Outcome::Base(b) => {
                    done.merged_segments = b.merged_segments;
                    done.base_objects = b.base_objects;
                }
                Outcome::Compacted { run, into } => {
                    done.compacted_segments = into.map_or(0, |_| run.len());
                }
            }
        }
        Ok(done)
    }

    /// The quick steps of a maintenance pass at `now_ms`, each leaving a readable volume if
    /// the writer stops there:
    /// 1. deletes the objects unlisted for `grace_ms` and orphans as old (not those of the
    ///    merge job named `merging`, still running);
    /// 2. prunes points by the retention policy, and creates the next manifest version if
    ///    1 or 2 changed it.
    ///
    /// Returns the merge to run when the segments before the oldest kept point hold enough
    /// bytes and no synchronisation is under way (its records are fresh, and points inside
    /// it are not images anyway); otherwise the compaction of a run of segments between two
    /// kept points that hold as many bytes ([`compaction_run`]).
    pub fn tidy(
        &mut self,
        gc: &Gc,
        now_ms: u64,
        merging: Option<&str>,
    ) -> Result<(Maintained, Option<MergeJob>), BucketError> {
        self.settle()?;
        let mut done = Maintained::default();
        let mut m = self.manifest.clone();
        self.delete_garbage(&mut m, gc.grace_ms, now_ms, merging, &mut done)?;
        let keep = gc.retention.keep(&m.store.points, now_ms);
        done.pruned = m.store.points.len() - keep.len();
        m.store.points.retain(|p| keep.iter().any(|k| k.id == p.id));
        m.store
            .decisions
            .retain(|d| keep.iter().any(|k| k.group == d.decision.point));
        if m != self.manifest {
            self.create_next(m)?;
        }
        if done != Maintained::default() {
            log::info!(
                "volume={} bucket={}: retention pruned {} points, deleted {} objects",
                self.id.name,
                self.bucket.url,
                done.pruned,
                done.deleted
            );
        }
        let listed: HashSet<&str> = (self.manifest.store.segments.iter())
            .map(|s| s.file.as_str())
            .collect();
        self.not_worth
            .retain(|run| run.iter().all(|f| listed.contains(f.as_str())));
        let m = &self.manifest;
        let limit = m.store.points.first().map_or(u64::MAX, |p| p.id);
        let n = m
            .store
            .segments
            .iter()
            .take_while(|s| s.last_seq <= limit)
            .count();
        let merging_bytes: u64 = m.store.segments[..n].iter().map(|s| s.bytes).sum();
        let base = m.base.as_ref().map_or(0, |b| b.bytes);
        let due = n > 0 && m.sync.is_none() && merging_bytes >= gc.merge_bytes.max(base / 4);
        let work = if due {
            Some(Work::Base { n })
        } else {
            let settled = now_ms.saturating_sub(gc.grace_ms);
            compaction_run(m, gc.merge_bytes, settled, &self.not_worth)
                .map(|(at, n)| Work::Compact { at, n })
        };
        let job = work.filter(|_| merging.is_none()).map(|work| MergeJob {
            reader: VolumeReader::at(
                self.bucket.clone(),
                self.key.clone(),
                m.clone(),
                MERGE_CACHE,
            ),
            id: self.id.clone(),
            names: super::ObjectNames {
                token: super::random_token(),
                uploads: 0,
            },
            work,
            region_bytes: gc.region_bytes,
            level: gc.level,
        });
        Ok((done, job))
    }

    /// Lists what `job` uploaded: the next manifest version has the new base, without the
    /// merged segments, and records what the new base replaces as garbage from `now_ms`.
    /// A job whose snapshot no longer matches the manifest (another base was listed
    /// meanwhile) is dropped: its objects are orphans.
    pub fn finish_merge(&mut self, job: Merged, now_ms: u64) -> Result<Merged, BucketError> {
        self.settle()?;
        self.puts += job.puts;
        match &job.outcome {
            Outcome::Base(b) => self.finish_base(b, now_ms)?,
            Outcome::Compacted { run, into } => {
                self.finish_compaction(run, into.as_ref(), now_ms)?;
            }
        }
        Ok(job)
    }

    /// Lists the base `b` in the next manifest version, unless the manifest's first
    /// segments or base changed since the job's snapshot.
    fn finish_base(&mut self, b: &NewBase, now_ms: u64) -> Result<(), BucketError> {
        let NewBase {
            through,
            old_base,
            base,
            unlisted,
            merged_segments,
            base_objects,
        } = b;
        let mut m = self.manifest.clone();
        let n = m
            .store
            .segments
            .iter()
            .take_while(|s| s.last_seq <= *through)
            .count();
        let same_base = m.base.as_ref().map(|b| &b.file) == old_base.as_ref();
        if n != *merged_segments || !same_base {
            log::warn!(
                "volume={} bucket={}: the manifest changed under a merge through seq {through}: its objects are dropped",
                self.id.name,
                self.bucket.url,
            );
            return Ok(());
        }
        m.base = Some(base.clone());
        m.store.base_seq = *through;
        m.store.segments.drain(..n);
        unlist(&mut m, unlisted, now_ms);
        self.create_next(m)?;
        log::info!(
            "volume={} bucket={}: merged {merged_segments} segments into the base (seq {through}), {base_objects} new base objects",
            self.id.name,
            self.bucket.url,
        );
        Ok(())
    }

    /// Lists the segment a compaction built in place of `run` (still listed in order), the
    /// run as garbage from `now_ms`; or remembers a run not worth compacting.
    fn finish_compaction(
        &mut self,
        run: &[String],
        into: Option<&SegmentRef>,
        now_ms: u64,
    ) -> Result<(), BucketError> {
        let Some(into) = into else {
            self.not_worth.insert(run.to_vec());
            return Ok(());
        };
        let mut m = self.manifest.clone();
        let segs = &m.store.segments;
        let Some(at) = segs
            .iter()
            .position(|s| Some(&s.file) == run.first())
            .filter(|&at| {
                segs.len() >= at + run.len()
                    && segs[at..at + run.len()]
                        .iter()
                        .map(|s| &s.file)
                        .eq(run.iter())
            })
        else {
            log::warn!(
                "volume={} bucket={}: the manifest changed under a compaction into {}: it is dropped",
                self.id.name,
                self.bucket.url,
                into.file
            );
            return Ok(());
        };
        m.store.segments.splice(at..at + run.len(), [into.clone()]);
        unlist(&mut m, run, now_ms);
        self.create_next(m)?;
        log::info!(
            "volume={} bucket={}: compacted {} segments between kept points into {} (seq {})",
            self.id.name,
            self.bucket.url,
            run.len(),
            into.file,
            into.last_seq
        );
        Ok(())
    }
}

/// The first run of two or more segments, after the oldest kept point, whose records hold
/// no kept point but at the very end (no point in `[first_seq, last_seq)` of the run), that
/// a kept point taken at or before `settled_ms` ends or follows, and that holds `min_bytes`
/// (and at most [`COMPACT_MAX`] or twice that): (its first segment, its length). Runs found
/// not worth it before are skipped.
///
/// The seqs inside a compacted run can no longer be read: waiting until a kept point after
/// them is a grace old leaves a reader of such a seq (`latest` when it was opened) at least
/// two graces (compaction, then deletion) from the moment a point followed it.
fn compaction_run(
    m: &BucketManifest,
    min_bytes: u64,
    settled_ms: u64,
    not_worth: &HashSet<Vec<String>>,
) -> Option<(usize, usize)> {
    let points: Vec<u64> = m.store.points.iter().map(|p| p.id).collect();
    let oldest = *points.first()?;
    let newest = m
        .store
        .points
        .iter()
        .rev()
        .find(|p| p.unix_ms <= settled_ms)?
        .id;
    if m.sync.is_some() {
        return None;
    }
    let segs = &m.store.segments;
    let inside = |from: u64, to: u64| points.iter().any(|&p| from <= p && p < to);
    let max = COMPACT_MAX.max(min_bytes.saturating_mul(2));
    let mut at = segs.iter().position(|s| s.first_seq > oldest)?;
    while at < segs.len() {
        let mut end = at + 1;
        let mut bytes = segs[at].bytes;
        while end < segs.len()
            && segs[end].last_seq <= newest
            && bytes + segs[end].bytes <= max
            && !inside(segs[at].first_seq, segs[end].last_seq)
        {
            bytes += segs[end].bytes;
            end += 1;
        }
        let n = end - at;
        let files: Vec<String> = segs[at..end].iter().map(|s| s.file.clone()).collect();
        if n >= 2 && bytes >= min_bytes.max(1) && !not_worth.contains(&files) {
            return Some((at, n));
        }
        at = end;
    }
    None
}

/// Records `files`, no longer listed by `m`, as garbage from `now_ms`.
fn unlist(m: &mut BucketManifest, files: &[String], now_ms: u64) {
    m.garbage.extend(files.iter().map(|file| Garbage {
        file: file.clone(),
        since_ms: now_ms,
    }));
}

/// A job's compression, started with zstd level `level`; its failures (zstd out of memory)
/// are refusals naming the volume.
struct Compress<'a> {
    packer: Packer,
    volume: &'a str,
    url: &'a str,
}

impl<'a> Compress<'a> {
    fn new(level: i32, volume: &'a str, url: &'a str) -> Result<Compress<'a>, BucketError> {
        let packer =
            Packer::new(level, PIECE_FAST_WINDOW).map_err(|e| zstd_err(volume, url, &e))?;
        Ok(Compress {
            packer,
            volume,
            url,
        })
    }

    fn err(&self, e: &std::io::Error) -> BucketError {
        zstd_err(self.volume, self.url, e)
    }

    /// Appends the volume's bytes `[start, end)`, as `read` reads them, to `seg` as writes
    /// at `seq`, [`PIECE`] at a time (one read fetches its chunks in parallel).
    fn copy_writes(
        &mut self,
        seg: &mut SegmentBuf,
        seq: u64,
        (start, end): (u64, u64),
        read: impl Fn(&mut [u8], u64) -> Result<(), BucketError>,
    ) -> Result<(), BucketError> {
        let mut at = start;
        while at < end {
            let l = PIECE.min(end - at);
            let mut buf = vec![0u8; usize::try_from(l).expect("a piece fits in memory")];
            read(&mut buf, at)?;
            seg.push_write(seq, at, &buf, &mut self.packer)
                .map_err(|e| self.err(&e))?;
            at += l;
        }
        Ok(())
    }
}

fn zstd_err(volume: &str, url: &str, e: &std::io::Error) -> BucketError {
    BucketError::Refused {
        volume: volume.to_string(),
        url: url.to_string(),
        reason: format!("cannot compress: {e}"),
    }
}

impl MergeJob {
    /// The token in the names of the objects this job uploads.
    pub fn token(&self) -> &str {
        &self.names.token
    }

    /// Runs the job: a merge into the base or a compaction.
    pub fn run(self) -> Result<Merged, BucketError> {
        match self.work {
            Work::Base { n } => self.merge(n),
            Work::Compact { at, n } => self.compact(at, n),
        }
    }

    /// Builds and uploads the segment that replaces segments `at..at + n` of the snapshot:
    /// what a view at their last record sees of what they wrote (write data, compressed
    /// again; trims and zeroes as zero entries), every entry at that seq. Markers and other
    /// records go: the manifest lists the points and decisions. Nothing is uploaded when
    /// that would keep more than [`COMPACT_KEEPS`](crate::extent::COMPACT_KEEPS) quarters of their data.
    fn compact(mut self, at: usize, n: usize) -> Result<Merged, BucketError> {
        let reader = self.reader.clone();
        let m = reader.manifest();
        let refs = &m.store.segments[at..at + n];
        let last = refs[n - 1].last_seq;
        let run: Vec<String> = refs.iter().map(|s| s.file.clone()).collect();
        let mut map = ExtentMap::default();
        let mut segs = Vec::with_capacity(n);
        let mut written = 0u64;
        for r in refs {
            let s = reader.segment(r)?;
            let file = u32::try_from(segs.len()).expect("a short run");
            for e in &s.entries {
                map.apply(file, e);
                if e.kind == Kind::Write {
                    written += u64::from(e.length);
                }
            }
            segs.push(s);
        }
        if !map.worth_compacting(written) {
            return Ok(Merged {
                puts: 0,
                outcome: Outcome::Compacted { run, into: None },
            });
        }
        let view = super::Resolved {
            reader: reader.clone(),
            map,
            segs,
        };
        let (bucket, key, name) = (reader.bucket(), reader.key(), &self.id.name.clone());
        let mut compress = Compress::new(self.level, name, bucket.url())?;
        let mut seg = SegmentBuf::new(&self.id, last);
        // Zero pieces as they are; adjacent data pieces read together.
        let mut spans: Vec<(u64, u64, bool)> = Vec::new();
        for (&start, p) in &view.map.pieces {
            let zero = matches!(p.src, Src::Zero);
            match spans.last_mut() {
                Some((_, end, false)) if !zero && *end == start => *end = p.end,
                _ => spans.push((start, p.end, zero)),
            }
        }
        for (start, end, zero) in spans {
            if zero {
                let len = u32::try_from(end - start).expect("pieces come from records");
                seg.push(Kind::Zero, last, start, len, &[]);
                continue;
            }
            compress.copy_writes(&mut seg, last, (start, end), |b, at| view.read_at(b, at))?;
        }
        if seg.is_empty() {
            // Only markers and other records: nothing to keep but what the manifest lists.
            return Ok(Merged {
                puts: 0,
                outcome: Outcome::Compacted { run, into: None },
            });
        }
        let file = self
            .names
            .next("seg", &format!("{last:020}-{last:020}"), ".seg");
        let (bytes, _) = seg.seal();
        let into = SegmentRef {
            file: file.clone(),
            first_seq: last,
            last_seq: last,
            bytes: bytes.len() as u64,
        };
        let (puts, r) = super::upload_all(bucket, key, name, vec![(file, bytes)]);
        r?;
        Ok(Merged {
            puts,
            outcome: Outcome::Compacted {
                run,
                into: Some(into),
            },
        })
    }

    /// Builds and uploads the new base: for every region the merged segments touch, an
    /// object holding the region's data as of their last record (the old base object's,
    /// then theirs), then a new base index listing them and the untouched regions' old
    /// objects.
    fn merge(mut self, n: usize) -> Result<Merged, BucketError> {
        let reader = self.reader.clone();
        let m = reader.manifest();
        let through = m.store.segments[n - 1].last_seq;
        let old = reader.base_index()?;
        let region = old
            .as_ref()
            .map_or(self.region_bytes.max(4096), |b| b.region_bytes);
        let mut touched = BTreeSet::new();
        for r in &m.store.segments[..n] {
            for e in &reader.segment(r)?.entries {
                if matches!(e.kind, Kind::Write | Kind::Trim | Kind::Zero) && e.length > 0 {
                    let end = e.offset + u64::from(e.length);
                    touched.extend(e.offset / region..=(end - 1) / region);
                }
            }
        }
        let mut regions: BTreeMap<u64, BaseObject> = old
            .iter()
            .flat_map(|b| b.regions.iter())
            .map(|o| (o.region, o.clone()))
            .collect();
        let mut unlisted: Vec<String> = m.store.segments[..n]
            .iter()
            .map(|s| s.file.clone())
            .collect();
        unlisted.extend(m.base.iter().map(|b| b.file.clone()));
        let view = reader.view(through)?;
        let size = m.store.size;
        let (bucket, key, name) = (reader.bucket(), reader.key(), &self.id.name.clone());
        let mut puts = 0;
        let mut upload = |batch: Vec<(String, Vec<u8>)>| {
            let (p, r) = super::upload_all(bucket, key, name, batch);
            puts += p;
            r
        };
        let mut batch = Vec::new();
        let mut base_objects = 0;
        let mut compress = Compress::new(self.level, name, bucket.url())?;
        let last = touched.last().copied();
        for g in touched {
            unlisted.extend(regions.remove(&g).map(|o| o.file));
            let (start, end) = (g * region, ((g + 1) * region).min(size));
            let mut seg = SegmentBuf::new(&self.id, through);
            let mut at = start;
            for (len, data) in view.extents(start, end - start) {
                if data {
                    compress.copy_writes(&mut seg, through, (at, at + len), |b, at| {
                        view.read_at(b, at)
                    })?;
                }
                at += len;
            }
            if !seg.is_empty() {
                let file = self
                    .names
                    .next("base", &format!("{g:012}-{through:020}"), ".seg");
                let (bytes, _) = seg.seal();
                regions.insert(
                    g,
                    BaseObject {
                        region: g,
                        file: file.clone(),
                        seq: through,
                        bytes: bytes.len() as u64,
                    },
                );
                batch.push((file, bytes));
            }
            if batch.len() >= PARALLEL || Some(g) == last {
                base_objects += batch.len();
                upload(std::mem::take(&mut batch))?;
            }
        }
        let index = BaseIndex {
            volume: self.id.name.clone(),
            base_seq: through,
            region_bytes: region,
            regions: regions.into_values().collect(),
        };
        let file = self
            .names
            .next("base", &format!("index-{through:020}"), ".json.enc");
        let body = serde_json::to_vec_pretty(&index).expect("serializable");
        upload(vec![(file.clone(), body)])?;
        Ok(Merged {
            puts,
            outcome: Outcome::Base(NewBase {
                through,
                old_base: m.base.as_ref().map(|b| b.file.clone()),
                base: BaseIndexRef {
                    file,
                    objects: index.regions.len() as u64,
                    bytes: index.regions.iter().map(|o| o.bytes).sum(),
                },
                unlisted,
                merged_segments: n,
                base_objects,
            }),
        })
    }
}

impl VolumeWriter {
    /// Deletes the segment and base objects that `m` does not use and that have been
    /// unlisted (by `m.garbage`) or, never listed, in the bucket for `grace_ms`, and drops
    /// them from `m.garbage`. Best effort: an object whose deletion fails is an orphan the
    /// next pass deletes.
    fn delete_garbage(
        &mut self,
        m: &mut BucketManifest,
        grace_ms: u64,
        now_ms: u64,
        merging: Option<&str>,
        done: &mut Maintained,
    ) -> Result<(), BucketError> {
        // A writer that another one overtook must not delete what the newer manifests use.
        let newest = self.bucket.newest_version(&self.id.name)?;
        if newest != Some(self.manifest.version) {
            let v = newest.unwrap_or(0).max(self.manifest.version);
            self.fenced = Some(v);
            return Err(self.fenced(v));
        }
        let due = |since: u64| since.saturating_add(grace_ms) <= now_ms;
        let running = |rel: &str| merging.is_some_and(|t| rel.contains(&format!("-{t}-")));
        let mut used: HashSet<String> = m.store.segments.iter().map(|s| s.file.clone()).collect();
        let reader = VolumeReader::at(self.bucket.clone(), self.key.clone(), m.clone(), 0);
        if let Some(b) = &m.base {
            used.insert(b.file.clone());
            let index = reader.base_index()?.expect("the manifest names a base");
            used.extend(index.regions.iter().map(|o| o.file.clone()));
        }
        let unlisted: HashMap<&str, u64> = m
            .garbage
            .iter()
            .map(|g| (g.file.as_str(), g.since_ms))
            .collect();
        let b = &self.bucket;
        for (rel, meta) in b.listing(&self.id.name)? {
            let ours = rel.starts_with("seg/") || rel.starts_with("base/");
            if !ours || used.contains(&rel) || running(&rel) {
                continue;
            }
            let since = unlisted.get(rel.as_str()).copied().unwrap_or_else(|| {
                u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0)
            });
            if !due(since) {
                continue;
            }
            match b.run(b.store.delete(&meta.location)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => done.deleted += 1,
                Err(e) => log::warn!(
                    "volume={} bucket={}: cannot delete {}: {e} (deleted at a later pass)",
                    self.id.name,
                    b.url,
                    meta.location
                ),
            }
        }
        m.garbage.retain(|g| !due(g.since_ms));
        Ok(())
    }
}
