//! The replica store in object storage (docs/FORMAT.md, "Bucket layout"): the segments of
//! the file store, sealed and encrypted, as immutable objects, and a manifest that only one
//! writer can advance.
//!
//! ```text
//! PREFIX/NAME/manifest/VERSION.json.enc  manifest versions 1, 2, ... (20 digits, encrypted
//!                                      JSON), each created once with create-if-absent; the
//!                                      highest one is current
//! PREFIX/NAME/seg/FIRST-LAST-W-N.seg   an encrypted sealed segment (records FIRST..=LAST),
//!                                      uploaded by writer W as its Nth object
//! ```
//!
//! A writer uploads a batch's segments, then creates the next manifest version listing
//! them: the batch is durable (and may be released from the journal) once that put
//! succeeds. Two writers that read the same version race to create the next one; the store
//! lets exactly one succeed, and the other is fenced. Readers take the highest version and
//! fetch segment chunks on demand through a bounded cache.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};

use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};

use crate::crypt::{CryptError, ENC_HEADER_LEN, Header, VolumeKey};
use crate::extent::{ExtentMap, Src};
use crate::pack;
use crate::segment::{
    self, Decided, Entry, Identity, Manifest, Point, SegmentBuf, SegmentError, SegmentRef,
    SyncState, TRAILER_LEN,
};

mod gc;
pub use gc::{Gc, Maintained, MergeJob, Merged};

/// Objects above this size are uploaded in parts of [`PART_BYTES`].
pub const MULTIPART_BYTES: usize = 16 << 20;
pub const PART_BYTES: usize = 8 << 20;
/// Manifest versions kept below the current one (older ones are deleted).
const KEEP_MANIFESTS: u64 = 8;
const MANIFEST_SUFFIX: &str = ".json.enc";
/// Default bound of a reader's chunk cache.
pub const CACHE_BYTES: usize = 256 << 20;

/// How to reach a bucket, beside its URL: the `[bucket]` table of a config file. Unset
/// keys come from the standard environment variables (`AWS_*`, `AZURE_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketOptions {
    /// An S3-compatible server or Azure Blob endpoint (`http://127.0.0.1:9000`).
    pub endpoint: Option<String>,
    /// S3 region (default `us-east-1`).
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Azure storage account and its key.
    pub account: Option<String>,
    pub access_key: Option<String>,
    /// Allow plain HTTP endpoints (test servers on loopback).
    #[serde(default)]
    pub allow_http: bool,
}

/// Why a bucket operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("bucket URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("{what} {object} in {url}: {source}")]
    Store {
        what: &'static str,
        object: String,
        url: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error(
        "volume {volume}: object {object} in {url} is damaged: {reason} (it is not served; restore from another point, or replicate again)"
    )]
    Damaged {
        volume: String,
        object: String,
        url: String,
        reason: String,
    },
    #[error(
        "volume {volume}: {url} holds it encrypted under another key (key check {found}, the key file's is {ours}): use the key file the volume was replicated with"
    )]
    WrongKey {
        volume: String,
        url: String,
        found: String,
        ours: String,
    },
    #[error(
        "volume {volume}: another writer created manifest version {version} in {url} first: this writer is fenced and stops (a second shipper for the volume, or a failover took it over); what it did not commit is not listed"
    )]
    Fenced {
        volume: String,
        url: String,
        version: u64,
    },
    #[error("volume {volume}: not in {url} (no manifest under {prefix})")]
    NotFound {
        volume: String,
        url: String,
        prefix: String,
    },
    #[error("volume {volume} in {url}: {reason}")]
    Refused {
        volume: String,
        url: String,
        reason: String,
    },
}

impl BucketError {
    /// True when an object the caller expected does not exist (deleted after it was
    /// unlisted).
    pub fn is_gone(&self) -> bool {
        matches!(self, BucketError::Store { source, .. }
            if matches!(**source, object_store::Error::NotFound { .. }))
    }

    /// True when trying again later may succeed (the server or the network), false when
    /// the bucket's contents or the configuration are at fault.
    pub fn is_transient(&self) -> bool {
        use object_store::Error as E;
        match self {
            BucketError::Store { source, .. } => !matches!(
                **source,
                E::NotFound { .. }
                    | E::AlreadyExists { .. }
                    | E::Precondition { .. }
                    | E::NotSupported { .. }
                    | E::NotImplemented { .. }
                    | E::PermissionDenied { .. }
                    | E::Unauthenticated { .. }
                    | E::UnknownConfigurationKey { .. }
                    | E::InvalidPath { .. }
            ),
            _ => false,
        }
    }
}

/// One bucket (or container) and prefix, with the runtime its client runs on.
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    /// The prefix, without slashes at either end ("" for none).
    root: String,
    url: String,
    rt: tokio::runtime::Runtime,
}

impl fmt::Debug for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bucket({})", self.url)
    }
}

/// Splits `scheme://NAME/PREFIX` into NAME and PREFIX.
fn split_url(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    Some((scheme, name, prefix.trim_matches('/')))
}

impl Bucket {
    /// Opens `s3://BUCKET/PREFIX`, `az://CONTAINER/PREFIX` or `file:///DIR` (a directory
    /// laid out like a bucket, which must exist).
    pub fn open(url: &str, o: &BucketOptions) -> Result<Bucket, BucketError> {
        let bad = |reason: String| BucketError::Url {
            url: url.to_string(),
            reason,
        };
        let (scheme, name, prefix) = split_url(url).ok_or_else(|| {
            bad("expected s3://BUCKET/PREFIX, az://CONTAINER/PREFIX or file:///DIR".into())
        })?;
        let store: Arc<dyn ObjectStore> = match scheme {
            "s3" => {
                let mut b = AmazonS3Builder::from_env().with_bucket_name(name);
                if let Some(e) = &o.endpoint {
                    b = b.with_endpoint(e);
                }
                if let Some(r) = &o.region {
                    b = b.with_region(r);
                }
                if let Some(k) = &o.access_key_id {
                    b = b.with_access_key_id(k);
                }
                if let Some(k) = &o.secret_access_key {
                    b = b.with_secret_access_key(k);
                }
                if o.allow_http {
                    b = b.with_allow_http(true);
                }
                Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
            }
            "az" => {
                let mut b = MicrosoftAzureBuilder::from_env().with_container_name(name);
                if let Some(a) = &o.account {
                    b = b.with_account(a);
                }
                if let Some(k) = &o.access_key {
                    b = b.with_access_key(k);
                }
                if let Some(e) = &o.endpoint {
                    b = b.with_endpoint(e.clone());
                }
                if o.allow_http {
                    b = b.with_allow_http(true);
                }
                Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
            }
            "file" => {
                let dir = format!("/{}", url["file://".len()..].trim_matches('/'));
                let fs = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad(format!("{e} (the directory must exist)")))?;
                return Ok(Bucket::with_store(Arc::new(fs), url, ""));
            }
            "memory" => return Ok(Bucket::with_store(Arc::new(InMemory::new()), url, prefix)),
            _ => {
                return Err(bad(format!(
                    "unknown scheme {scheme}:// (use s3://, az:// or file://)"
                )));
            }
        };
        if name.is_empty() {
            return Err(bad("no bucket or container name".into()));
        }
        Ok(Bucket::with_store(store, url, prefix))
    }

    /// A bucket on a store built elsewhere (tests: `object_store`'s in-memory and
    /// local-filesystem stores).
    pub fn with_store(store: Arc<dyn ObjectStore>, url: &str, prefix: &str) -> Bucket {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("redun-bucket")
            .enable_all()
            .build()
            .expect("a tokio runtime starts");
        Bucket {
            store,
            root: prefix.trim_matches('/').to_string(),
            url: url.to_string(),
            rt,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The store itself (tests reach objects directly).
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The path of `rel` below volume `name`'s directory.
    pub fn path(&self, name: &str, rel: &str) -> ObjPath {
        if self.root.is_empty() {
            ObjPath::from(format!("{name}/{rel}"))
        } else {
            ObjPath::from(format!("{}/{name}/{rel}", self.root))
        }
    }

    fn run<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Runs `f` (an [`ObjectStore`] call on [`Bucket::store`]) on the bucket's runtime:
    /// for tools and tests that reach objects directly.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.run(f)
    }

    /// Every object of volume `name`, as its name below the volume and its size, in no
    /// particular order.
    pub fn objects(&self, name: &str) -> Result<Vec<(String, u64)>, BucketError> {
        Ok(self
            .listing(name)?
            .into_iter()
            .map(|(rel, m)| (rel, m.size))
            .collect())
    }

    /// Every object of volume `name`, as its name below the volume and what the store
    /// says of it.
    fn listing(&self, name: &str) -> Result<Vec<(String, object_store::ObjectMeta)>, BucketError> {
        let dir = self.path(name, "");
        let listed: Vec<object_store::ObjectMeta> = self
            .run(self.store.list(Some(&dir)).try_collect())
            .map_err(self.err("cannot list", &dir))?;
        let skip = dir.as_ref().len() + 1;
        Ok(listed
            .into_iter()
            .map(|m| (m.location.as_ref()[skip..].to_string(), m))
            .collect())
    }

    fn err<'a>(
        &'a self,
        what: &'static str,
        object: &'a ObjPath,
    ) -> impl FnOnce(object_store::Error) -> BucketError + 'a {
        move |source| BucketError::Store {
            what,
            object: object.to_string(),
            url: self.url.clone(),
            source: Box::new(source),
        }
    }

    /// The volumes that have a manifest in the bucket.
    pub fn volumes(&self) -> Result<Vec<String>, BucketError> {
        let root = (!self.root.is_empty()).then(|| ObjPath::from(self.root.as_str()));
        let l = self
            .run(self.store.list_with_delimiter(root.as_ref()))
            .map_err(|e| BucketError::Store {
                what: "cannot list",
                object: self.root.clone(),
                url: self.url.clone(),
                source: Box::new(e),
            })?;
        let mut out = Vec::new();
        for p in l.common_prefixes {
            if let Some(name) = p.filename() {
                if self.newest_version(name)?.is_some() {
                    out.push(name.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The manifest versions of volume `name` in the bucket, in no order.
    pub fn versions(&self, name: &str) -> Result<Vec<u64>, BucketError> {
        let dir = self.path(name, "manifest");
        let metas: Vec<_> = self
            .run(self.store.list(Some(&dir)).try_collect::<Vec<_>>())
            .map_err(self.err("cannot list", &dir))?;
        Ok(metas
            .iter()
            .filter_map(|m| {
                m.location
                    .filename()?
                    .strip_suffix(MANIFEST_SUFFIX)?
                    .parse()
                    .ok()
            })
            .collect())
    }

    /// The highest manifest version of volume `name`, if any.
    pub fn newest_version(&self, name: &str) -> Result<Option<u64>, BucketError> {
        Ok(self.versions(name)?.into_iter().max())
    }

    /// A manifest version's object name below the volume.
    fn manifest_file(version: u64) -> String {
        format!("manifest/{version:020}{MANIFEST_SUFFIX}")
    }

    fn damaged(&self, name: &str, object: &ObjPath, reason: String) -> BucketError {
        BucketError::Damaged {
            volume: name.to_string(),
            object: object.to_string(),
            url: self.url.clone(),
            reason,
        }
    }

    fn crypt_err(&self, name: &str, object: &ObjPath, e: CryptError) -> BucketError {
        match e {
            CryptError::WrongKey { found, ours } => BucketError::WrongKey {
                volume: name.to_string(),
                url: self.url.clone(),
                found,
                ours,
            },
            e => self.damaged(name, object, e.to_string()),
        }
    }

    /// Manifest version `v` of volume `name`, checked; `None` if it does not exist.
    fn read_manifest(
        &self,
        name: &str,
        v: u64,
        key: &VolumeKey,
    ) -> Result<Option<BucketManifest>, BucketError> {
        let file = Self::manifest_file(v);
        let p = self.path(name, &file);
        let Some(plain) = self.read_sealed(name, &file, key)? else {
            return Ok(None);
        };
        let m: BucketManifest =
            serde_json::from_slice(&plain).map_err(|e| self.damaged(name, &p, e.to_string()))?;
        m.check(name, v).map_err(|e| self.damaged(name, &p, e))?;
        Ok(Some(m))
    }

    /// Object `file` of volume `name` (a manifest version or a base index), decrypted;
    /// `None` if it does not exist.
    fn read_sealed(
        &self,
        name: &str,
        file: &str,
        key: &VolumeKey,
    ) -> Result<Option<Vec<u8>>, BucketError> {
        let p = self.path(name, file);
        let body = match self.run(async { self.store.get(&p).await?.bytes().await }) {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err("cannot read", &p)(e)),
        };
        key.open(file, &body)
            .map(Some)
            .map_err(|e| self.crypt_err(name, &p, e))
    }

    /// The current manifest of volume `name`, if it has one; refuses a key that is not the
    /// volume's.
    pub fn manifest(
        &self,
        name: &str,
        key: &VolumeKey,
    ) -> Result<Option<BucketManifest>, BucketError> {
        // A version can be deleted between the listing and the read when newer ones exist.
        for _ in 0..3 {
            let Some(v) = self.newest_version(name)? else {
                return Ok(None);
            };
            if let Some(m) = self.read_manifest(name, v, key)? {
                return Ok(Some(m));
            }
        }
        Err(BucketError::Refused {
            volume: name.to_string(),
            url: self.url.clone(),
            reason: "its manifest kept changing while it was read; try again".into(),
        })
    }

    /// Creates manifest version `m.version`; `Ok(false)` when it exists already.
    fn create_manifest(&self, m: &BucketManifest, key: &VolumeKey) -> Result<bool, BucketError> {
        let file = Self::manifest_file(m.version);
        let p = self.path(&m.store.name, &file);
        let body = key.seal(&file, &serde_json::to_vec_pretty(m).expect("serializable"));
        match self.run(
            self.store
                .put_opts(&p, PutPayload::from(body), PutMode::Create.into()),
        ) {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err("cannot write", &p)(e)),
        }
    }

    /// Uploads one object, in parts when it is large. Returns the PUT requests it took (a
    /// multipart upload's parts, its creation and its completion).
    fn put(&self, p: &ObjPath, bytes: Vec<u8>) -> Result<u64, BucketError> {
        let requests = if bytes.len() <= MULTIPART_BYTES {
            1
        } else {
            bytes.len().div_ceil(PART_BYTES) as u64 + 2
        };
        let r = self.run(async {
            if bytes.len() <= MULTIPART_BYTES {
                return self.store.put(p, PutPayload::from(bytes)).await.map(|_| ());
            }
            let upload = self.store.put_multipart(p).await?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
            w.write(&bytes);
            w.finish().await.map(|_| ())
        });
        r.map(|()| requests).map_err(self.err("cannot upload", p))
    }

    fn get_range(&self, p: &ObjPath, r: std::ops::Range<u64>) -> Result<Vec<u8>, BucketError> {
        self.run(self.store.get_range(p, r))
            .map(|b| b.to_vec())
            .map_err(self.err("cannot read", p))
    }
}

fn unix_ms() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One version of a volume's manifest in a bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketManifest {
    /// This version's number (1, 2, ...), also its object's name.
    pub version: u64,
    /// The writer that created it (random, per writer session).
    pub writer: String,
    pub unix_ms: u64,
    /// The first sequence number not in the bucket (0: nothing yet).
    pub next_seq: u64,
    /// The synchronisation under way (its points and `latest` are not images of the
    /// volume), and the `[begin, end]` windows of finished ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncState>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inconsistent: Vec<[u64; 2]>,
    /// The base: the volume as of `base_seq`, in objects listed by a base index object
    /// (none while nothing was merged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseIndexRef>,
    /// Objects this manifest's predecessors listed and it does not: deleted once they have
    /// been unlisted for the writer's grace period.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub garbage: Vec<Garbage>,
    /// Base seq, segments (`file`: the object's name below the volume), points, decisions.
    #[serde(flatten)]
    pub store: Manifest,
}

/// A manifest's base index object (docs/FORMAT.md, "Base objects").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseIndexRef {
    /// `base/index-SEQ-W-N.json.enc`, below the volume.
    pub file: String,
    /// How many base objects it lists, and their plaintext bytes in all.
    pub objects: u64,
    pub bytes: u64,
}

/// The contents of a base index object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseIndex {
    pub volume: String,
    /// Every record up to this sequence number is in the base (the manifest's `base_seq`).
    pub base_seq: u64,
    /// Volume bytes per region: base object `region` holds `[region * R, (region + 1) * R)`.
    pub region_bytes: u64,
    /// One per region that holds data, by region; a region without one reads as zeroes.
    pub regions: Vec<BaseObject>,
}

/// A base object: a sealed segment whose entries are the data of one region as of `seq`
/// (each entry carries `seq`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseObject {
    pub region: u64,
    pub file: String,
    pub seq: u64,
    pub bytes: u64,
}

impl BaseObject {
    /// As a segment of the manifest's kind (what the segment reader checks it against).
    pub fn as_segment(&self) -> SegmentRef {
        SegmentRef {
            file: self.file.clone(),
            first_seq: self.seq,
            last_seq: self.seq,
            bytes: self.bytes,
        }
    }
}

/// An object that a manifest no longer lists, since `since_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Garbage {
    pub file: String,
    pub since_ms: u64,
}

impl BucketManifest {
    /// What a manifest read as version `v` of volume `name` must hold; a reason if it does
    /// not (a writer's bug, since manifests are authenticated).
    fn check(&self, name: &str, v: u64) -> Result<(), String> {
        self.store.check_format()?;
        if self.version != v || self.store.name != name {
            return Err(format!(
                "it says version {} of volume {}",
                self.version, self.store.name
            ));
        }
        let mut after = self.store.base_seq;
        for (i, s) in self.store.segments.iter().enumerate() {
            if s.first_seq > s.last_seq
                || (i > 0 && s.first_seq <= after)
                || s.first_seq < self.store.base_seq
                || s.bytes < TRAILER_LEN as u64
            {
                return Err(format!(
                    "its segment {} (seq {}..={}, {} bytes) is out of order or too short",
                    s.file, s.first_seq, s.last_seq, s.bytes
                ));
            }
            after = s.last_seq;
        }
        let next = self
            .store
            .segments
            .last()
            .map_or(self.next_seq, |s| s.last_seq.saturating_add(1));
        if next != self.next_seq {
            return Err(format!(
                "next_seq is {} but its last segment ends before seq {next}",
                self.next_seq,
            ));
        }
        if self.base.is_none() && self.store.base_seq > 0 {
            return Err(format!(
                "base_seq is {} but it names no base index",
                self.store.base_seq
            ));
        }
        Ok(())
    }

    /// The listed points, oldest first, each with whether it can be read.
    pub fn points(&self) -> Vec<(Point, bool)> {
        let decisions: Vec<&Decided> = self.store.decisions.iter().collect();
        segment::listed(self.store.points.iter(), &decisions, |p, _| {
            Some((p, self.holds(p.id) && self.consistent_at(p.id)))
        })
    }

    /// True when the volume as of `seq` can be read: `seq` is from `base_seq` to the latest
    /// record, and not inside a compacted segment (whose records all carry its last seq:
    /// the seqs from the previous segment's end to its own are gone).
    pub fn holds(&self, seq: u64) -> bool {
        let m = &self.store;
        seq >= m.base_seq && seq <= self.latest() && {
            let mut prev = (m.base_seq > 0).then_some(m.base_seq);
            m.segments.iter().all(|s| {
                let ok = prev.is_none_or(|p| seq <= p || seq >= s.first_seq);
                prev = Some(s.last_seq);
                ok
            })
        }
    }

    /// True when the image as of `seq` is one of the volume (no synchronisation was under
    /// way at it).
    pub fn consistent_at(&self, seq: u64) -> bool {
        segment::consistent_at(self.sync.as_ref(), &self.inconsistent, seq)
    }

    /// The last sequence number in the bucket (0: none).
    pub fn latest(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }
}

/// Encrypts and uploads `objects` (name below volume `name`, plaintext) in parallel;
/// returns the PUT requests made and the first error.
fn upload_all(
    bucket: &Bucket,
    key: &VolumeKey,
    name: &str,
    objects: Vec<(String, Vec<u8>)>,
) -> (u64, Result<(), BucketError>) {
    let results = std::thread::scope(|s| {
        let jobs: Vec<_> = objects
            .into_iter()
            .map(|(file, bytes)| {
                s.spawn(move || {
                    let sealed = key.seal(&file, &bytes);
                    bucket.put(&bucket.path(name, &file), sealed)
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| j.join().expect("an upload thread does not panic"))
            .collect::<Vec<Result<u64, _>>>()
    });
    let mut puts = 0;
    let mut first_err = None;
    for r in results {
        match r {
            Ok(n) => puts += n,
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    (puts, first_err.map_or(Ok(()), Err))
}

/// Names the objects one uploader (a writer session, a merge) writes: `DIR/STEM-TOKEN-N...`,
/// N counting from 1, so that no two uploads share a name.
#[derive(Debug)]
struct ObjectNames {
    token: String,
    uploads: u64,
}

impl ObjectNames {
    fn next(&mut self, dir: &str, stem: &str, suffix: &str) -> String {
        self.uploads += 1;
        format!("{dir}/{stem}-{}-{}{suffix}", self.token, self.uploads)
    }
}

fn random_token() -> String {
    use chacha20poly1305::XNonce;
    use chacha20poly1305::aead::Generate;
    let n: [u8; 24] = XNonce::generate().into();
    n[..6].iter().map(|x| format!("{x:02x}")).collect()
}

/// The only writer of a volume in a bucket, until another one creates a manifest version
/// first.
#[derive(Debug)]
pub struct VolumeWriter {
    bucket: Arc<Bucket>,
    key: Arc<VolumeKey>,
    id: Identity,
    names: ObjectNames,
    /// PUT requests this writer made (objects, parts, manifest versions).
    puts: u64,
    /// The newest version this writer knows is in the bucket.
    manifest: BucketManifest,
    /// The next version, its segments uploaded, whose creation had no clear answer.
    pending: Option<BucketManifest>,
    fenced: Option<u64>,
    /// Runs of segments a compaction found not worth rewriting (their files, in order).
    not_worth: std::collections::HashSet<Vec<String>>,
}

impl VolumeWriter {
    /// Opens volume `id.name` for writing: takes over its newest manifest, or creates the
    /// first one. Refuses a volume of another uuid, another key, or a newer generation (the
    /// volume failed over: this writer is the old primary).
    pub fn open(
        bucket: Arc<Bucket>,
        id: &Identity,
        key: Arc<VolumeKey>,
    ) -> Result<VolumeWriter, BucketError> {
        let token = random_token();
        let refused = |reason: String| BucketError::Refused {
            volume: id.name.clone(),
            url: bucket.url.clone(),
            reason,
        };
        let manifest = loop {
            if let Some(m) = bucket.manifest(&id.name, &key)? {
                break m;
            }
            let m = BucketManifest {
                version: 1,
                writer: token.clone(),
                unix_ms: unix_ms(),
                next_seq: 0,
                sync: None,
                inconsistent: Vec::new(),
                base: None,
                garbage: Vec::new(),
                store: Manifest::new(id),
            };
            // Another writer may create the first version at the same time: then take it.
            if bucket.create_manifest(&m, &key)? {
                break m;
            }
        };
        if manifest.store.uuid != id.uuid || manifest.store.size != id.size {
            return Err(refused(format!(
                "the bucket holds a volume of uuid {} and {} bytes, this one is {} with {} bytes: use another prefix, or remove the old volume's objects",
                manifest.store.uuid, manifest.store.size, id.uuid, id.size
            )));
        }
        if manifest.store.generation > id.generation {
            return Err(refused(format!(
                "the volume is at generation {} there (it failed over), this writer at {}: it must not write",
                manifest.store.generation, id.generation
            )));
        }
        Ok(VolumeWriter {
            bucket,
            key,
            id: id.clone(),
            names: ObjectNames { token, uploads: 0 },
            puts: 0,
            manifest,
            pending: None,
            fenced: None,
            not_worth: Default::default(),
        })
    }

    /// The first sequence number the bucket holds no record from (as far as this writer
    /// knows: see [`VolumeWriter::settle`]).
    pub fn next_seq(&self) -> u64 {
        self.manifest.next_seq
    }

    pub fn manifest(&self) -> &BucketManifest {
        &self.manifest
    }

    pub fn identity(&self) -> &Identity {
        &self.id
    }

    /// A new segment for records from `first_seq` on.
    pub fn segment(&self, first_seq: u64) -> SegmentBuf {
        SegmentBuf::new(&self.id, first_seq)
    }

    fn fenced(&self, version: u64) -> BucketError {
        BucketError::Fenced {
            volume: self.id.name.clone(),
            url: self.bucket.url.clone(),
            version,
        }
    }

    /// Uploads `segs` (in sequence order, each past the one before, the first at or past
    /// [`VolumeWriter::next_seq`]) in parallel, then creates the next manifest version
    /// listing them. When this returns `Ok`, their records are durable in the bucket.
    ///
    /// On a transient error the outcome may be unknown: call [`VolumeWriter::settle`] until
    /// it answers, then send again from [`VolumeWriter::next_seq`]. `append` settles first.
    pub fn append(&mut self, segs: Vec<SegmentBuf>) -> Result<u64, BucketError> {
        self.settle()?;
        let mut m = self.manifest.clone();
        let mut objects = Vec::new();
        for s in segs {
            let Some(last) = s.last_seq() else { continue };
            let first = s.first_seq();
            if first < m.next_seq {
                return Err(BucketError::Refused {
                    volume: self.id.name.clone(),
                    url: self.bucket.url.clone(),
                    reason: format!(
                        "a segment from seq {first} but the bucket holds records up to {}",
                        m.latest()
                    ),
                });
            }
            let file = self
                .names
                .next("seg", &format!("{first:020}-{last:020}"), ".seg");
            for n in s.syncs() {
                segment::follow_sync(&mut m.sync, &mut m.inconsistent, n);
            }
            let (bytes, (_, points, decisions)) = s.seal();
            m.store.segments.push(SegmentRef {
                file: file.clone(),
                first_seq: first,
                last_seq: last,
                bytes: bytes.len() as u64,
            });
            m.store.points.extend(points);
            m.store.decisions.extend(decisions);
            m.next_seq = last + 1;
            objects.push((file, bytes));
        }
        if objects.is_empty() {
            return Ok(m.next_seq);
        }
        let (puts, uploaded) = upload_all(&self.bucket, &self.key, &self.id.name, objects);
        self.puts += puts;
        uploaded?;
        self.create_next(m)
    }

    /// The PUT requests this writer made: objects (a multipart upload's parts, creation and
    /// completion), and manifest versions (each attempt).
    pub fn puts(&self) -> u64 {
        self.puts
    }

    /// Creates `m` (this writer's manifest plus what it adds) as the next version, with this
    /// writer's token and generation. Returns [`VolumeWriter::next_seq`].
    fn create_next(&mut self, mut m: BucketManifest) -> Result<u64, BucketError> {
        m.version += 1;
        m.writer = self.names.token.clone();
        m.store.generation = m.store.generation.max(self.id.generation);
        m.unix_ms = unix_ms();
        self.pending = Some(m);
        self.settle()
    }

    /// Makes this writer's generation the volume's: creates the next manifest version with
    /// it and no new records. From then on a writer of an older generation is fenced at its
    /// next append and refused when it opens the volume (the fencing of a failover).
    pub fn claim(&mut self) -> Result<u64, BucketError> {
        self.settle()?;
        self.create_next(self.manifest.clone())?;
        Ok(self.manifest.store.generation)
    }

    /// Finishes an append whose manifest put had no clear answer: puts exactly the same
    /// manifest again, and accepts the version only if it is byte for byte ours. Returns
    /// [`VolumeWriter::next_seq`]; a transient error leaves the append pending.
    pub fn settle(&mut self) -> Result<u64, BucketError> {
        if let Some(v) = self.fenced {
            return Err(self.fenced(v));
        }
        let Some(m) = self.pending.clone() else {
            return Ok(self.manifest.next_seq);
        };
        let name = &self.id.name;
        self.puts += 1;
        if !self.bucket.create_manifest(&m, &self.key)? {
            // Ours, from an attempt whose answer was lost? Otherwise another writer's.
            if self
                .bucket
                .read_manifest(name, m.version, &self.key)?
                .as_ref()
                != Some(&m)
            {
                self.pending = None;
                self.fenced = Some(m.version);
                return Err(self.fenced(m.version));
            }
        }
        // Old versions are deleted, so a number can be free again for a writer that fell
        // far behind: what it created counts only if no higher version exists.
        let newest = self.bucket.newest_version(name)?;
        if newest.is_some_and(|n| n > m.version) {
            self.pending = None;
            self.fenced = Some(m.version);
            return Err(self.fenced(m.version));
        }
        self.pending = None;
        self.manifest = m;
        self.prune_manifests();
        Ok(self.manifest.next_seq)
    }

    /// Deletes manifest versions more than [`KEEP_MANIFESTS`] below the current one, every
    /// [`KEEP_MANIFESTS`] versions (best effort: a failure leaves objects the next pass
    /// deletes).
    fn prune_manifests(&self) {
        let v = self.manifest.version;
        if v % KEEP_MANIFESTS != 0 {
            return;
        }
        let b = &self.bucket;
        let warn = |e: &dyn fmt::Display| {
            log::warn!(
                "volume={} bucket={}: cannot delete old manifest versions: {e}",
                self.id.name,
                b.url
            );
        };
        let all = match b.versions(&self.id.name) {
            Ok(all) => all,
            Err(e) => return warn(&e),
        };
        for old in all.into_iter().filter(|&o| o < v - KEEP_MANIFESTS) {
            let p = b.path(&self.id.name, &Bucket::manifest_file(old));
            match b.run(b.store.delete(&p)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => warn(&format_args!("{p}: {e}")),
            }
        }
    }
}

/// A sealed segment object, as a reader knows it.
#[derive(Debug)]
struct SegObject {
    path: ObjPath,
    /// Its name below the volume (also its chunks' key in the cache).
    file: Arc<str>,
    header: Header,
    entries: Vec<Entry>,
}

/// Decrypted chunks of segment objects and decompressed entries, least recently used first
/// out.
#[derive(Debug)]
struct ChunkCache {
    cap: usize,
    inner: Mutex<CacheInner>,
}

/// An object's chunk, or the decompressed payload of the entry whose stored payload starts
/// at a byte of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ChunkKey {
    Chunk(Arc<str>, u64),
    Unpacked(Arc<str>, u64),
}

#[derive(Debug, Default)]
struct CacheInner {
    map: HashMap<ChunkKey, (Arc<Vec<u8>>, u64)>,
    order: BTreeMap<u64, ChunkKey>,
    tick: u64,
    bytes: usize,
}

impl ChunkCache {
    fn contains(&self, k: &ChunkKey) -> bool {
        self.inner.lock().expect("cache lock").map.contains_key(k)
    }

    fn get(&self, k: &ChunkKey) -> Option<Arc<Vec<u8>>> {
        let mut g = self.inner.lock().expect("cache lock");
        let g = &mut *g;
        g.tick += 1;
        let tick = g.tick;
        let (c, t) = g.map.get_mut(k)?;
        g.order.remove(t);
        *t = tick;
        g.order.insert(tick, k.clone());
        Some(c.clone())
    }

    fn put(&self, k: ChunkKey, c: Arc<Vec<u8>>) {
        let mut g = self.inner.lock().expect("cache lock");
        let g = &mut *g;
        g.tick += 1;
        g.bytes += c.len();
        if let Some((old, t)) = g.map.insert(k.clone(), (c, g.tick)) {
            g.bytes -= old.len();
            g.order.remove(&t);
        }
        g.order.insert(g.tick, k);
        while g.bytes > self.cap {
            let Some((_, k)) = g.order.pop_first() else {
                break;
            };
            if let Some((c, _)) = g.map.remove(&k) {
                g.bytes -= c.len();
            }
        }
    }
}

/// Reads a volume's points out of a bucket. Cheap to clone: clones, views and
/// [`VolumeReader::refresh`]ed readers share the segment indexes and the chunk cache
/// (segment objects never change).
#[derive(Debug, Clone)]
pub struct VolumeReader {
    bucket: Arc<Bucket>,
    key: Arc<VolumeKey>,
    manifest: Arc<BucketManifest>,
    segs: Arc<Mutex<HashMap<String, Arc<SegObject>>>>,
    /// The base index objects read, by name.
    bases: Arc<Mutex<HashMap<String, Arc<BaseIndex>>>>,
    cache: Arc<ChunkCache>,
}

impl VolumeReader {
    /// Opens volume `name`'s newest manifest; refuses a key that is not the volume's.
    pub fn open(
        bucket: Arc<Bucket>,
        name: &str,
        key: Arc<VolumeKey>,
        cache_bytes: usize,
    ) -> Result<VolumeReader, BucketError> {
        let manifest = bucket
            .manifest(name, &key)?
            .ok_or_else(|| BucketError::NotFound {
                volume: name.to_string(),
                url: bucket.url.clone(),
                prefix: bucket.path(name, "manifest/").to_string(),
            })?;
        Ok(VolumeReader::at(bucket, key, manifest, cache_bytes))
    }

    /// A reader of manifest `manifest` (the writer's, for merging).
    fn at(
        bucket: Arc<Bucket>,
        key: Arc<VolumeKey>,
        manifest: BucketManifest,
        cache_bytes: usize,
    ) -> VolumeReader {
        VolumeReader {
            bucket,
            key,
            manifest: Arc::new(manifest),
            segs: Arc::default(),
            bases: Arc::default(),
            cache: Arc::new(ChunkCache {
                cap: cache_bytes,
                inner: Mutex::default(),
            }),
        }
    }

    /// The manifest's base index, checked (once per reader); `None` before the first merge.
    pub fn base_index(&self) -> Result<Option<Arc<BaseIndex>>, BucketError> {
        let Some(b) = &self.manifest.base else {
            return Ok(None);
        };
        if let Some(i) = self.bases.lock().expect("bases lock").get(&b.file) {
            return Ok(Some(i.clone()));
        }
        let name = self.name();
        let path = self.bucket.path(name, &b.file);
        let plain = self
            .bucket
            .read_sealed(name, &b.file, &self.key)?
            .ok_or_else(|| {
                self.damaged(&path, "the manifest lists it but it does not exist".into())
            })?;
        let i: BaseIndex =
            serde_json::from_slice(&plain).map_err(|e| self.damaged(&path, e.to_string()))?;
        let m = &self.manifest;
        let ordered = i.regions.windows(2).all(|w| w[0].region < w[1].region);
        let fits = i.regions.iter().all(|o| {
            o.seq <= i.base_seq
                && o.bytes >= TRAILER_LEN as u64
                && o.region
                    .checked_mul(i.region_bytes)
                    .is_some_and(|x| x < m.store.size)
        });
        if i.volume != name
            || i.base_seq != m.store.base_seq
            || i.region_bytes == 0
            || !ordered
            || !fits
            || i.regions.len() as u64 != b.objects
        {
            return Err(self.damaged(
                &path,
                format!(
                    "it does not match the manifest (volume {}, base seq {} for {}, {} objects for {}, or regions out of order)",
                    i.volume,
                    i.base_seq,
                    m.store.base_seq,
                    i.regions.len(),
                    b.objects
                ),
            ));
        }
        let i = Arc::new(i);
        self.bases
            .lock()
            .expect("bases lock")
            .insert(b.file.clone(), i.clone());
        Ok(Some(i))
    }

    /// This reader on the volume's newest manifest (the same reader when nothing changed),
    /// sharing what was fetched so far.
    pub fn refresh(&self) -> Result<VolumeReader, BucketError> {
        let name = self.name();
        let newest = self.bucket.newest_version(name)?;
        if newest == Some(self.manifest.version) {
            return Ok(self.clone());
        }
        let manifest =
            self.bucket
                .manifest(name, &self.key)?
                .ok_or_else(|| BucketError::NotFound {
                    volume: name.to_string(),
                    url: self.bucket.url.clone(),
                    prefix: self.bucket.path(name, "manifest/").to_string(),
                })?;
        Ok(VolumeReader {
            manifest: Arc::new(manifest),
            ..self.clone()
        })
    }

    /// Refuses `newer` (a [`VolumeReader::refresh`] of this one) when it is of another
    /// volume: the old one's objects were removed and a new volume of the same name written
    /// there, which numbers its records afresh, so a seq of the old one means nothing in it.
    fn same_volume(&self, newer: &VolumeReader) -> Result<(), BucketError> {
        let (was, now) = (&self.manifest.store, &newer.manifest.store);
        if (&now.uuid, now.size) == (&was.uuid, was.size) {
            return Ok(());
        }
        Err(BucketError::Refused {
            volume: self.name().to_string(),
            url: self.bucket.url.clone(),
            reason: format!(
                "the volume was replaced since it was opened (uuid {} of {} bytes, now uuid {} \
                 of {} bytes): what was opened is gone; open the volume again (stop and start \
                 the test failover, or run the restore again)",
                was.uuid, was.size, now.uuid, now.size
            ),
        })
    }

    pub fn manifest(&self) -> &BucketManifest {
        &self.manifest
    }

    pub fn bucket(&self) -> &Arc<Bucket> {
        &self.bucket
    }

    pub fn key(&self) -> &Arc<VolumeKey> {
        &self.key
    }

    fn name(&self) -> &str {
        &self.manifest.store.name
    }

    fn damaged(&self, object: &ObjPath, reason: String) -> BucketError {
        self.bucket.damaged(self.name(), object, reason)
    }

    fn crypt_err(&self, object: &ObjPath, e: CryptError) -> BucketError {
        self.bucket.crypt_err(self.name(), object, e)
    }

    /// Plaintext bytes `r` of a segment object, through the cache.
    fn read_plain(&self, s: &SegObject, r: std::ops::Range<u64>) -> Result<Vec<u8>, BucketError> {
        if r.end > s.header.len {
            return Err(self.damaged(
                &s.path,
                format!("bytes {r:?} are past its {} bytes", s.header.len),
            ));
        }
        let want = s.header.chunks_of(r.clone());
        let size = s.header.chunk_size();
        let tag = s.file.clone();
        let mut chunks: Vec<Arc<Vec<u8>>> = Vec::new();
        for i in want.clone() {
            match self.cache.get(&ChunkKey::Chunk(tag.clone(), i)) {
                Some(c) => chunks.push(c),
                None => break,
            }
        }
        let from = want.start + chunks.len() as u64;
        if from < want.end {
            let fetch = s.header.chunk_bytes(from..want.end);
            let raw = self.bucket.get_range(&s.path, fetch)?;
            chunks.extend(self.open_and_cache(s, from..want.end, &raw)?);
        }
        let skip = usize::try_from(r.start - want.start * size).expect("within a chunk");
        let n = usize::try_from(r.end - r.start).expect("a read fits in memory");
        let mut out = Vec::with_capacity(n + skip);
        for c in chunks {
            out.extend_from_slice(&c);
            if out.len() >= skip + n {
                break;
            }
        }
        out.drain(..skip);
        out.truncate(n);
        Ok(out)
    }

    /// Decrypts `raw`, the bytes of chunks `c` of `s`, and keeps each chunk in the cache.
    fn open_and_cache(
        &self,
        s: &SegObject,
        c: std::ops::Range<u64>,
        raw: &[u8],
    ) -> Result<Vec<Arc<Vec<u8>>>, BucketError> {
        let plain = self
            .key
            .open_chunks(&s.file, &s.header, c.clone(), raw)
            .map_err(|e| self.crypt_err(&s.path, e))?;
        let step = usize::try_from(s.header.chunk_size()).expect("chunks are small");
        Ok((c.start..)
            .zip(plain.chunks(step))
            .map(|(i, c)| {
                let c = Arc::new(c.to_vec());
                self.cache
                    .put(ChunkKey::Chunk(s.file.clone(), i), c.clone());
                c
            })
            .collect())
    }

    /// The decompressed payload of the compressed entry of `s` whose payload starts at byte
    /// `data`, through the cache.
    fn read_unpacked(&self, s: &SegObject, data: u64) -> Result<Arc<Vec<u8>>, BucketError> {
        let key = ChunkKey::Unpacked(s.file.clone(), data);
        if let Some(c) = self.cache.get(&key) {
            return Ok(c);
        }
        let e = s
            .entries
            .binary_search_by_key(&data, |e| e.data)
            .map(|i| s.entries[i])
            .map_err(|_| {
                self.damaged(&s.path, format!("no entry's payload starts at byte {data}"))
            })?;
        let stored = self.read_plain(s, data..data + u64::from(e.packed))?;
        let plain = pack::unpack(&stored, e.length as usize).map_err(|why| {
            self.damaged(
                &s.path,
                format!("the entry of seq {} at byte {data}: {why}", e.seq),
            )
        })?;
        let plain = Arc::new(plain);
        self.cache.put(key, plain.clone());
        Ok(plain)
    }

    /// Fetches a segment object's header and index (once per reader).
    fn segment(&self, r: &SegmentRef) -> Result<Arc<SegObject>, BucketError> {
        if let Some(s) = self.segs.lock().expect("segs lock").get(&r.file) {
            return Ok(s.clone());
        }
        let path = self.bucket.path(self.name(), &r.file);
        let raw = self
            .bucket
            .get_range(&path, 0..ENC_HEADER_LEN as u64)
            .map_err(|e| match e {
                BucketError::Store { source, .. }
                    if matches!(*source, object_store::Error::NotFound { .. }) =>
                {
                    self.damaged(&path, "the manifest lists it but it does not exist".into())
                }
                e => e,
            })?;
        let header = self
            .key
            .header(&raw)
            .map_err(|e| self.crypt_err(&path, e))?;
        let size = self
            .bucket
            .run(self.bucket.store.head(&path))
            .map_err(self.bucket.err("cannot read", &path))?
            .size;
        if size != header.object_len() || header.len != r.bytes {
            return Err(self.damaged(
                &path,
                format!(
                    "it has {size} bytes holding {} of segment, {} and {} expected (truncated or replaced)",
                    header.len,
                    header.object_len(),
                    r.bytes
                ),
            ));
        }
        let mut s = SegObject {
            path,
            file: Arc::from(r.file.as_str()),
            header,
            entries: Vec::new(),
        };
        let seg_err = |e: SegmentError| self.damaged(&s.path, e.to_string());
        let t = self.read_plain(&s, r.bytes - TRAILER_LEN as u64..r.bytes)?;
        let (at, _, sum) = segment::parse_trailer(&t, r.bytes).map_err(seg_err)?;
        let idx = self.read_plain(&s, at..r.bytes - TRAILER_LEN as u64)?;
        let entries = segment::parse_index(&idx, at, sum, r).map_err(seg_err)?;
        s.entries = entries;
        let s = Arc::new(s);
        self.segs
            .lock()
            .expect("segs lock")
            .insert(r.file.clone(), s.clone());
        Ok(s)
    }

    /// The volume as of sequence number `seq` (a listed point, or [`BucketManifest::latest`]).
    pub fn view(&self, seq: u64) -> Result<BucketView, BucketError> {
        let m = &self.manifest;
        Ok(BucketView {
            seq,
            name: self.name().to_string(),
            size: m.store.size,
            now: RwLock::new(Arc::new(self.resolve(seq)?)),
        })
    }

    /// The extent map of `seq`: the base objects, then the segments up to it. Refuses a
    /// seq the manifest does not hold (merged into the base, or not written yet).
    fn resolve(&self, seq: u64) -> Result<Resolved, BucketError> {
        let m = &self.manifest;
        if !m.holds(seq) {
            return Err(BucketError::Refused {
                volume: self.name().to_string(),
                url: self.bucket.url.clone(),
                reason: format!(
                    "seq {seq} is not held: manifest version {} holds {}..={} but the seqs that compacted segments cover (a pruned point's records were merged into the base or compacted): open a kept point",
                    m.version,
                    m.store.base_seq,
                    m.latest()
                ),
            });
        }
        let base: Vec<SegmentRef> = self
            .base_index()?
            .iter()
            .flat_map(|b| b.regions.iter().map(BaseObject::as_segment))
            .collect();
        let listed = self.manifest.store.segments.iter();
        let mut map = ExtentMap::default();
        let mut segs = Vec::new();
        for r in base.iter().chain(listed.filter(|r| r.first_seq <= seq)) {
            let s = self.segment(r)?;
            let file = u32::try_from(segs.len()).expect("fewer than 2^32 segments");
            for e in s.entries.iter().take_while(|e| e.seq <= seq) {
                map.apply(file, e);
            }
            segs.push(s);
        }
        Ok(Resolved {
            reader: self.clone(),
            map,
            segs,
        })
    }
}

/// A read-only image of a volume at one sequence number, read from a bucket.
///
/// The writer's retention may merge the objects it reads into base objects and delete them
/// after its grace period: a read that finds an object gone resolves the same sequence
/// number again from the newest manifest (the same bytes, in other objects).
#[derive(Debug)]
pub struct BucketView {
    seq: u64,
    name: String,
    size: u64,
    now: RwLock<Arc<Resolved>>,
}

/// Where a view's bytes are, under one manifest.
#[derive(Debug)]
struct Resolved {
    reader: VolumeReader,
    map: ExtentMap,
    segs: Vec<Arc<SegObject>>,
}

impl BucketView {
    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn resolved(&self) -> Arc<Resolved> {
        self.now.read().expect("view lock").clone()
    }

    /// The pieces of `[offset, offset + len)` in order, each `(length, data)`: `false` for
    /// what reads as zeroes without a fetch (zeroed, trimmed or never written).
    pub fn extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let mut out: Vec<(u64, bool)> = Vec::new();
        self.resolved().map.walk(offset, offset + len, |s, e, src| {
            let data = matches!(src, Some(Src::Data { .. } | Src::Packed { .. }));
            match out.last_mut() {
                Some((l, d)) if *d == data => *l += e - s,
                _ => out.push((e - s, data)),
            }
        });
        out
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads `buf.len()` bytes at `offset` (within the volume).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BucketError> {
        let r = self.resolved();
        match r.read_at(buf, offset) {
            Err(e) if e.is_gone() => {
                let newer = r.reader.refresh()?;
                r.reader.same_volume(&newer)?;
                let fresh = Arc::new(newer.resolve(self.seq)?);
                log::info!(
                    "volume={}: objects of the view at seq {} were merged and deleted: reading it from manifest version {}",
                    self.name,
                    self.seq,
                    fresh.reader.manifest.version
                );
                *self.now.write().expect("view lock") = fresh.clone();
                fresh.read_at(buf, offset)
            }
            r => r,
        }
    }
}

/// Requests a read has in flight at once.
const FETCH_PARALLEL: usize = 16;
/// Chunks one request fetches at most (4 MiB).
const FETCH_RUN: u64 = 64;

impl Resolved {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BucketError> {
        self.fetch_ahead(offset, buf.len() as u64)?;
        self.map.read(buf, offset, |out, _, src| match src {
            // Neither a base object nor a segment covers it: zeroes.
            None | Some(Src::Zero) => {
                out.fill(0);
                Ok(())
            }
            Some(Src::Data { file, pos }) => {
                let seg = &self.segs[file as usize];
                let d = self.reader.read_plain(seg, pos..pos + out.len() as u64)?;
                out.copy_from_slice(&d);
                Ok(())
            }
            Some(Src::Packed { file, data, skip }) => {
                let seg = &self.segs[file as usize];
                let d = self.reader.read_unpacked(seg, data)?;
                let skip = skip as usize;
                out.copy_from_slice(&d[skip..skip + out.len()]);
                Ok(())
            }
        })
    }

    /// Fetches the chunks that `[offset, offset + len)` reads and the cache lacks, before
    /// the read takes them piece by piece: adjacent chunks of an object in one request (up
    /// to [`FETCH_RUN`]), [`FETCH_PARALLEL`] requests at a time. A range whose object turns
    /// out damaged is left to the read, which names it.
    fn fetch_ahead(&self, offset: u64, len: u64) -> Result<(), BucketError> {
        let cache = &self.reader.cache;
        let mut want: Vec<(u32, u64)> = Vec::new();
        self.map.walk(offset, offset + len, |s, e, src| {
            let (file, r) = match src {
                Some(Src::Data { file, pos }) => (file, pos..pos + (e - s)),
                Some(Src::Packed { file, data, .. }) => {
                    let seg = &self.segs[file as usize];
                    let key = ChunkKey::Unpacked(seg.file.clone(), data);
                    match seg.entries.binary_search_by_key(&data, |e| e.data) {
                        Ok(i) if !cache.contains(&key) => {
                            (file, data..data + u64::from(seg.entries[i].packed))
                        }
                        _ => return,
                    }
                }
                None | Some(Src::Zero) => return,
            };
            let h = &self.segs[file as usize].header;
            if r.end <= h.len {
                want.extend(h.chunks_of(r).map(|c| (file, c)));
            }
        });
        want.sort_unstable();
        want.dedup();
        want.retain(|&(f, c)| {
            !cache.contains(&ChunkKey::Chunk(self.segs[f as usize].file.clone(), c))
        });
        let mut runs: Vec<(u32, std::ops::Range<u64>)> = Vec::new();
        for (f, c) in want {
            match runs.last_mut() {
                Some((lf, r)) if *lf == f && r.end == c && r.end - r.start < FETCH_RUN => {
                    r.end += 1;
                }
                _ => runs.push((f, c..c + 1)),
            }
        }
        if runs.len() < 2 {
            // One request: the read makes it.
            return Ok(());
        }
        let bucket = &self.reader.bucket;
        let fetched = bucket.run(
            futures::stream::iter(runs.iter().map(|(f, r)| {
                let seg = &self.segs[*f as usize];
                let at = seg.header.chunk_bytes(r.clone());
                async move {
                    let raw = bucket.store.get_range(&seg.path, at).await;
                    raw.map(|b| (seg, r.clone(), b))
                        .map_err(bucket.err("cannot read", &seg.path))
                }
            }))
            .buffer_unordered(FETCH_PARALLEL)
            .try_collect::<Vec<_>>(),
        )?;
        for (seg, r, raw) in fetched {
            // A chunk that does not decrypt is left to the read, which names it.
            let _ = self.reader.open_and_cache(seg, r, &raw);
        }
        Ok(())
    }
}
