//! Where the target finds a volume's recovery points: a replica store in its data directory
//! ([`Store`]), or a bucket the shippers write into ([`BucketReplicas`], `redun-target
//! --store URL`). Exports, test failover and failover read both through [`Points`] and
//! [`Image`].

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use redun_store::bucket::{Bucket, BucketError, BucketView, VolumeReader, VolumeWriter};
use redun_store::crypt::VolumeKey;
use redun_tracker::nbd::Extent;
use redun_tracker::nbd::proto::{STATE_HOLE, STATE_ZERO};

use crate::store::{Identity, Point, Store, SyncState, View};

/// A read-only image of a volume at one sequence number.
pub trait Image: fmt::Debug + Send + Sync {
    /// The sequence number the image is as of.
    fn seq(&self) -> u64;
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset` (within the volume).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Allocation extents of `[offset, offset + len)`.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>>;
}

/// A volume's recovery points and what failover changes.
pub trait Points: fmt::Debug + Send + Sync {
    /// Every point, oldest first, with whether it can be read.
    fn points(&self) -> Vec<(Point, bool)>;
    /// The synchronisation under way, if any: `latest` is then no image of the volume.
    fn syncing(&self) -> Option<SyncState>;
    /// The last sequence number held (0: none).
    fn latest(&self) -> u64;
    /// What `latest` reads at, or the synchronisation that makes it no image of the volume:
    /// both from one state of the source.
    fn latest_image(&self) -> Result<u64, SyncState>;
    fn generation(&self) -> u64;
    /// The volume as of `seq`; a reason when it cannot be read.
    fn image(&self, seq: u64) -> Result<Arc<dyn Image>, String>;
    /// Moves the relationship to generation `g` (a failover), durably: writers of an older
    /// generation are refused from now on.
    fn set_generation(&self, g: u64) -> Result<(), String>;
}

impl Image for View {
    fn seq(&self) -> u64 {
        View::seq(self)
    }
    fn size(&self) -> u64 {
        View::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        View::read_at(self, buf, offset)
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        View::block_status(self, offset, len)
    }
}

impl Points for Store {
    fn points(&self) -> Vec<(Point, bool)> {
        Store::points(self)
    }
    fn syncing(&self) -> Option<SyncState> {
        Store::syncing(self)
    }
    fn latest(&self) -> u64 {
        Store::latest(self)
    }
    fn latest_image(&self) -> Result<u64, SyncState> {
        let st = self.state();
        match st.sync {
            Some(s) => Err(s),
            None => Ok(st.next_seq.saturating_sub(1)),
        }
    }
    fn generation(&self) -> u64 {
        self.state().generation
    }
    fn image(&self, seq: u64) -> Result<Arc<dyn Image>, String> {
        match self.view(seq) {
            Some(v) => Ok(Arc::new(v)),
            None => Err(format!(
                "volume {} cannot be read at seq {seq} (not durable yet, or merged into the \
                 base)",
                self.state().name
            )),
        }
    }
    fn set_generation(&self, g: u64) -> Result<(), String> {
        Store::set_generation(self, g).map_err(|e| e.to_string())
    }
}

/// A point read from a bucket. A segment that fails authentication or is missing or short
/// fails the read (`EIO`, logged with the object's name): damaged data is never served.
#[derive(Debug)]
struct BucketImage(BucketView);

impl Image for BucketImage {
    fn seq(&self) -> u64 {
        self.0.seq()
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset).map_err(|e| {
            error!("volume={} seq={}: {e}", self.0.name(), self.0.seq());
            io::Error::other(e.to_string())
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(self
            .0
            .extents(offset, len)
            .into_iter()
            .map(|(length, data)| Extent {
                length,
                flags: if data { 0 } else { STATE_HOLE | STATE_ZERO },
            })
            .collect())
    }
}

/// How long a volume's manifest is trusted before the bucket is asked for a newer one.
const FRESH_FOR: Duration = Duration::from_secs(1);

/// The volumes in a bucket, read with their keys from a key directory.
#[derive(Debug)]
pub struct BucketReplicas {
    bucket: Arc<Bucket>,
    key_dir: PathBuf,
    cache_bytes: usize,
    volumes: Mutex<HashMap<String, Arc<BucketVolume>>>,
}

impl BucketReplicas {
    /// Volumes of `bucket`, keys in `key_dir/NAME.key`, each volume's decrypted chunks
    /// cached up to `cache_bytes`.
    pub fn new(bucket: Bucket, key_dir: PathBuf, cache_bytes: usize) -> BucketReplicas {
        BucketReplicas {
            bucket: Arc::new(bucket),
            key_dir,
            cache_bytes,
            volumes: Mutex::new(HashMap::new()),
        }
    }

    pub fn url(&self) -> &str {
        self.bucket.url()
    }

    /// The names of the volumes in the bucket.
    pub fn names(&self) -> Result<Vec<String>, String> {
        self.bucket.volumes().map_err(|e| e.to_string())
    }

    /// Volume `name`, opened on first use; `None` when the bucket holds no such volume.
    pub fn volume(&self, name: &str) -> Result<Option<Arc<BucketVolume>>, String> {
        if let Some(v) = self.volumes.lock().unwrap().get(name) {
            return Ok(Some(v.clone()));
        }
        if self
            .bucket
            .newest_version(name)
            .map_err(|e| e.to_string())?
            .is_none()
        {
            return Ok(None);
        }
        let key_file = self.key_dir.join(format!("{name}.key"));
        let key = VolumeKey::load(&key_file).map_err(|e| {
            format!(
                "volume {name}: {e} (copy the volume's key from the protected site: keys are \
                 kept outside the bucket)"
            )
        })?;
        let reader = VolumeReader::open(self.bucket.clone(), name, Arc::new(key), self.cache_bytes)
            .map_err(|e| e.to_string())?;
        info!(
            "volume={name}: in {} at manifest version {}, latest seq {}",
            self.bucket.url(),
            reader.manifest().version,
            reader.manifest().latest()
        );
        let v = Arc::new(BucketVolume {
            name: name.to_string(),
            reader: Mutex::new((reader, Instant::now())),
        });
        Ok(Some(
            self.volumes
                .lock()
                .unwrap()
                .entry(name.to_string())
                .or_insert(v)
                .clone(),
        ))
    }
}

/// One volume in a bucket: its newest manifest (asked for again once older than
/// [`FRESH_FOR`]) and the chunks read so far.
#[derive(Debug)]
pub struct BucketVolume {
    name: String,
    reader: Mutex<(VolumeReader, Instant)>,
}

impl BucketVolume {
    /// The reader on the newest manifest; the one before while the bucket cannot answer.
    fn reader(&self, force: bool) -> VolumeReader {
        let mut g = self.reader.lock().unwrap();
        if force || g.1.elapsed() >= FRESH_FOR {
            match g.0.refresh() {
                Ok(r) => *g = (r, Instant::now()),
                Err(e) => warn!(
                    "volume={}: cannot read its newest manifest, serving version {}: {e}",
                    self.name,
                    g.0.manifest().version
                ),
            }
        }
        g.0.clone()
    }

    /// The reader on the newest manifest (asked for again once older than [`FRESH_FOR`]).
    pub fn current(&self) -> VolumeReader {
        self.reader(false)
    }
}

impl Points for BucketVolume {
    fn points(&self) -> Vec<(Point, bool)> {
        self.reader(false).manifest().points()
    }
    fn syncing(&self) -> Option<SyncState> {
        self.reader(false).manifest().sync
    }
    fn latest(&self) -> u64 {
        self.reader(false).manifest().latest()
    }
    fn latest_image(&self) -> Result<u64, SyncState> {
        let r = self.reader(false);
        match r.manifest().sync {
            Some(s) => Err(s),
            None => Ok(r.manifest().latest()),
        }
    }
    fn generation(&self) -> u64 {
        self.reader(false).manifest().store.generation
    }
    fn image(&self, seq: u64) -> Result<Arc<dyn Image>, String> {
        let v = self.reader(false).view(seq).map_err(|e| e.to_string())?;
        Ok(Arc::new(BucketImage(v)))
    }
    fn set_generation(&self, g: u64) -> Result<(), String> {
        // The old primary may append between opening and claiming: then open again.
        let mut tries = 0;
        loop {
            tries += 1;
            let r = self.reader(true);
            let m = &r.manifest().store;
            let url = r.bucket().url();
            if m.generation >= g {
                return Err(format!(
                    "volume {} is at generation {} in {url} already: another target failed it \
                     over; use that one",
                    self.name, m.generation
                ));
            }
            let id = Identity {
                name: self.name.clone(),
                uuid: m.uuid.clone(),
                size: m.size,
                generation: g,
            };
            match VolumeWriter::open(r.bucket().clone(), &id, r.key().clone())
                .and_then(|mut w| w.claim())
            {
                Ok(_) => break,
                Err(BucketError::Fenced { .. }) if tries < 3 => {}
                Err(e) => {
                    return Err(format!(
                        "volume {}: the failover could not write generation {g} into {url}: \
                         {e}; the old primary may be fenced already: run the failover again",
                        self.name
                    ));
                }
            }
        }
        self.reader(true);
        Ok(())
    }
}
