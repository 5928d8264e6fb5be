//! The bucket backend against `object_store`'s in-memory and local-filesystem stores: what
//! a writer appends reads back at every point, only one of two racing writers advances the
//! manifest, damage and wrong keys are refused, and no plaintext reaches the bucket.
#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use futures::TryStreamExt;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use redun_store::bucket::{
    Bucket, BucketError, BucketOptions, Gc, Maintained, VolumeReader, VolumeWriter,
};
use redun_store::crypt::VolumeKey;
use redun_store::pack::Packer;
use redun_store::retention::Retention;
use redun_store::segment::{Identity, SegmentBuf};
use redun_tracker::journal::format::{Kind, MarkerInfo, PointKind};

const SIZE: u64 = 4 << 20;

fn id(generation: u64) -> Identity {
    Identity {
        name: "vol1".into(),
        uuid: "0123456789abcdef0123456789abcdef".into(),
        size: SIZE,
        generation,
    }
}

fn key(b: u8) -> Arc<VolumeKey> {
    Arc::new(VolumeKey::from_bytes(&[b; 32]))
}

/// The stores every test runs against: in memory, and a directory through
/// LocalFileSystem (which supports create-if-absent only, the one mode the format needs).
fn stores() -> Vec<(Arc<Bucket>, Option<tempfile::TempDir>)> {
    let d = tempfile::tempdir().unwrap();
    let fs = LocalFileSystem::new_with_prefix(d.path()).unwrap();
    vec![
        (
            Arc::new(Bucket::with_store(
                Arc::new(InMemory::new()),
                "memory://t",
                "pre/fix",
            )),
            None,
        ),
        (
            Arc::new(Bucket::with_store(Arc::new(fs), "file://t", "")),
            Some(d),
        ),
    ]
}

/// A tiny xorshift, so that runs repeat.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn marker(unix_ms: u64) -> Vec<u8> {
    MarkerInfo {
        kind: PointKind::Crash,
        unix_ms,
        group_point: 0,
    }
    .encode()
}

/// Appends `n` random records (writes of planted text, zeroes, trims) and a marker as one
/// segment, mirroring them in `model`; returns the marker's seq.
#[allow(clippy::cast_possible_truncation)]
fn batch(w: &VolumeWriter, rng: &mut Rng, model: &mut [u8], n: usize) -> (SegmentBuf, u64) {
    let first = w.next_seq();
    let mut seg = w.segment(first);
    let mut seq = first;
    let mut packer = Packer::new(3, 8).unwrap();
    for _ in 0..n {
        let off = (rng.next() % (SIZE / 512 - 64)) * 512;
        let len = ((rng.next() % 64) + 1) * 512;
        let (o, l) = (off as usize, len as usize);
        match rng.next() % 5 {
            0 => {
                seg.push(Kind::Zero, seq, off, len as u32, &[]);
                model[o..o + l].fill(0);
            }
            1 => {
                seg.push(Kind::Trim, seq, off, len as u32, &[]);
                model[o..o + l].fill(0);
            }
            _ => {
                let mut data: Vec<u8> = b"PLANTED-PLAINTEXT-"
                    .iter()
                    .cycle()
                    .take(l)
                    .copied()
                    .collect();
                data[0] = (seq & 0xff) as u8;
                // Plain entries, and compressed ones as the shipper writes them.
                if rng.next() % 2 == 0 {
                    seg.push(Kind::Write, seq, off, len as u32, &data);
                } else {
                    seg.push_write(seq, off, &data, &mut packer).unwrap();
                }
                model[o..o + l].copy_from_slice(&data);
            }
        }
        seq += 1;
    }
    seg.push(Kind::Marker, seq, 0, 0, &marker(seq));
    (seg, seq)
}

fn read_all(v: &redun_store::bucket::BucketView) -> Vec<u8> {
    let mut out = vec![0u8; SIZE as usize];
    let mut pos = 0usize;
    // Odd-sized pieces: reads start and end inside extents and chunks.
    while pos < out.len() {
        let n = (out.len() - pos).min(300_007);
        v.read_at(&mut out[pos..pos + n], pos as u64).unwrap();
        pos += n;
    }
    out
}

#[test]
fn points_read_back_as_written() {
    for (bucket, _dir) in stores() {
        let mut w = VolumeWriter::open(bucket.clone(), &id(1), key(1)).unwrap();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut model = vec![0u8; SIZE as usize];
        let mut images = Vec::new();
        for round in 0..6 {
            // Two segments per append, uploaded in parallel.
            let (a, pa) = batch(&w, &mut rng, &mut model, 40);
            images.push((pa, model.clone()));
            let mut w2 = w.segment(pa + 1);
            let next = pa + 1;
            let mut seq = next;
            for i in 0..30u64 {
                let off = ((round * 97 + i * 13) % (SIZE / 4096)) * 4096;
                let data = vec![(seq & 0xff) as u8; 8192];
                w2.push(Kind::Write, seq, off, 8192, &data);
                let o = off as usize;
                let end = (o + 8192).min(SIZE as usize);
                model[o..end].copy_from_slice(&data[..end - o]);
                seq += 1;
            }
            w2.push(Kind::Marker, seq, 0, 0, &marker(seq));
            images.push((seq, model.clone()));
            assert_eq!(w.append(vec![a, w2]).unwrap(), seq + 1);
        }
        assert_eq!(w.manifest().version, 7);
        let r = VolumeReader::open(bucket.clone(), "vol1", key(1), 1 << 20).unwrap();
        let points = r.manifest().points();
        assert_eq!(points.len(), images.len());
        for ((p, usable), (seq, image)) in points.iter().zip(&images) {
            assert_eq!(p.id, *seq);
            assert!(usable);
            assert!(read_all(&r.view(p.id).unwrap()) == *image, "point {seq}");
        }
        assert!(r.view(r.manifest().latest() + 1).is_err());
        assert_eq!(bucket.volumes().unwrap(), vec!["vol1".to_string()]);
        // A new writer takes over where the old one stopped.
        let w3 = VolumeWriter::open(bucket.clone(), &id(1), key(1)).unwrap();
        assert_eq!(w3.next_seq(), w.next_seq());
    }
}

#[test]
fn a_large_segment_goes_up_in_parts() {
    for (bucket, _dir) in stores() {
        let mut w = VolumeWriter::open(bucket.clone(), &id(1), key(2)).unwrap();
        let mut seg = w.segment(0);
        let mut model = vec![0u8; SIZE as usize];
        for seq in 0..5u64 {
            // 5 x 4 MiB: above the multipart threshold.
            let data: Vec<u8> = (0..SIZE)
                .map(|i| ((i / 4096) as u8) ^ (seq as u8))
                .collect();
            seg.push(Kind::Write, seq, 0, SIZE as u32, &data);
            model = data;
        }
        seg.push(Kind::Marker, 5, 0, 0, &marker(5));
        assert!(seg.len() > redun_store::bucket::MULTIPART_BYTES);
        w.append(vec![seg]).unwrap();
        let r = VolumeReader::open(bucket, "vol1", key(2), 8 << 20).unwrap();
        assert!(read_all(&r.view(5).unwrap()) == model);
    }
}

#[test]
fn compressible_writes_take_less_room_and_read_back() {
    for (bucket, _dir) in stores() {
        let mut w = VolumeWriter::open(bucket.clone(), &id(1), key(3)).unwrap();
        let mut packer = Packer::new(3, 8).unwrap();
        let mut rng = Rng(77);
        let noise: Vec<u8> = (0..1 << 20).map(|_| rng.next() as u8).collect();
        let text: Vec<u8> = (0..1u32 << 20)
            .map(|i| b"0123456789abcdef"[((i / 7) % 16) as usize])
            .collect();
        let mut seg = w.segment(0);
        seg.push_write(0, 0, &text, &mut packer).unwrap();
        // Odd offsets and lengths: pieces end inside the volume's blocks.
        seg.push_write(1, (1 << 20) + 333, &noise[..(1 << 20) - 1000], &mut packer)
            .unwrap();
        seg.push_write(2, 100_000, &text[..70_000], &mut packer)
            .unwrap();
        seg.push(Kind::Marker, 3, 0, 0, &marker(3));
        // 16 compressed pieces of text, 16 plain ones of noise, 2 more of text.
        assert!(seg.len() < (1 << 20) + (256 << 10), "{} bytes", seg.len());
        w.append(vec![seg]).unwrap();
        let stored: u64 = objects(&bucket)
            .iter()
            .filter(|m| m.location.as_ref().ends_with(".seg"))
            .map(|m| m.size)
            .sum();
        assert!(
            stored < (1 << 20) + (256 << 10),
            "{stored} bytes in the bucket"
        );
        let mut model = vec![0u8; SIZE as usize];
        model[..1 << 20].copy_from_slice(&text);
        model[(1 << 20) + 333..(2 << 20) - 667].copy_from_slice(&noise[..(1 << 20) - 1000]);
        model[100_000..170_000].copy_from_slice(&text[..70_000]);
        let r = VolumeReader::open(bucket, "vol1", key(3), 1 << 20).unwrap();
        let v = r.view(3).unwrap();
        assert!(read_all(&v) == model);
        // A read inside one compressed piece, and one across pieces.
        let mut b = vec![0u8; 10];
        v.read_at(&mut b, 65_530).unwrap();
        assert_eq!(b, model[65_530..65_540]);
        let mut b = vec![0u8; 200_000];
        v.read_at(&mut b, 1).unwrap();
        assert!(b == model[1..200_001]);
        assert_eq!(
            v.extents(0, 3 << 20),
            [
                (1 << 20, true),
                (333, false),
                ((1 << 20) - 1000, true),
                ((1 << 20) + 667, false)
            ]
        );
    }
}

fn one_write(w: &VolumeWriter, byte: u8) -> SegmentBuf {
    let seq = w.next_seq();
    let mut s = w.segment(seq);
    s.push(Kind::Write, seq, 0, 4096, &[byte; 4096]);
    s.push(Kind::Marker, seq + 1, 0, 0, &marker(seq + 1));
    s
}

#[test]
fn of_two_racing_writers_one_wins_and_the_other_is_fenced() {
    for (bucket, _dir) in stores() {
        // In turn: both read version 1, the first to append wins.
        let mut a = VolumeWriter::open(bucket.clone(), &id(1), key(3)).unwrap();
        let mut b = VolumeWriter::open(bucket.clone(), &id(1), key(3)).unwrap();
        a.append(vec![one_write(&a, 0xaa)]).unwrap();
        let e = b.append(vec![one_write(&b, 0xbb)]).unwrap_err();
        assert!(matches!(e, BucketError::Fenced { version: 2, .. }), "{e}");
        assert!(
            e.to_string().contains("vol1") && e.to_string().contains("fenced"),
            "{e}"
        );
        // At the same moment, many times: exactly one of each pair wins.
        for _ in 0..20 {
            let ws: Vec<_> = (0..2)
                .map(|_| VolumeWriter::open(bucket.clone(), &id(1), key(3)).unwrap())
                .collect();
            let go = Arc::new(Barrier::new(2));
            let results: Vec<_> = ws
                .into_iter()
                .enumerate()
                .map(|(i, mut w)| {
                    let go = go.clone();
                    std::thread::spawn(move || {
                        let s = one_write(&w, i as u8 + 1);
                        go.wait();
                        w.append(vec![s]).map(|_| w.manifest().version)
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect();
            let wins = results.iter().filter(|r| r.is_ok()).count();
            assert_eq!(wins, 1, "{results:?}");
            assert!(
                results
                    .iter()
                    .any(|r| matches!(r, Err(BucketError::Fenced { .. })))
            );
        }
        let r = VolumeReader::open(bucket.clone(), "vol1", key(3), 1 << 20).unwrap();
        assert_eq!(r.manifest().version, 22);
        assert_eq!(r.manifest().points().len(), 21);
        // A writer of an older generation (the old primary after a failover) is refused.
        let mut g2 = VolumeWriter::open(bucket.clone(), &id(2), key(3)).unwrap();
        g2.append(vec![one_write(&g2, 9)]).unwrap();
        let e = VolumeWriter::open(bucket.clone(), &id(1), key(3)).unwrap_err();
        assert!(e.to_string().contains("generation 2"), "{e}");
    }
}

fn objects(bucket: &Bucket) -> Vec<object_store::ObjectMeta> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(bucket.store().list(None).try_collect::<Vec<_>>())
        .unwrap()
}

fn segment_objects(bucket: &Bucket) -> Vec<object_store::path::Path> {
    let mut v: Vec<_> = objects(bucket)
        .into_iter()
        .map(|m| m.location)
        .filter(|p| p.as_ref().ends_with(".seg"))
        .collect();
    v.sort();
    v
}

fn rewrite(bucket: &Bucket, p: &object_store::path::Path, f: impl FnOnce(&mut Vec<u8>)) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut b = rt
        .block_on(async { bucket.store().get(p).await.unwrap().bytes().await })
        .unwrap()
        .to_vec();
    f(&mut b);
    rt.block_on(bucket.store().put(p, PutPayload::from(b)))
        .unwrap();
}

#[test]
fn damaged_and_cut_objects_are_named_and_never_served() {
    for (bucket, _dir) in stores() {
        let mut w = VolumeWriter::open(bucket.clone(), &id(1), key(4)).unwrap();
        // 256 KiB of data: the segment spans five chunks, its index is in the last.
        let mut big = w.segment(0);
        big.push(Kind::Write, 0, 0, 256 << 10, &[1u8; 256 << 10]);
        big.push(Kind::Marker, 1, 0, 0, &marker(1));
        w.append(vec![big]).unwrap();
        w.append(vec![one_write(&w, 2)]).unwrap();
        let segs = segment_objects(&bucket);
        assert_eq!(segs.len(), 2);
        // A flipped byte inside the first segment's first chunk.
        rewrite(&bucket, &segs[0], |b| b[64 + 64 + 40 + 100] ^= 1);
        let r = VolumeReader::open(bucket.clone(), "vol1", key(4), 1 << 20).unwrap();
        let view = r.view(1).unwrap();
        let mut buf = vec![0u8; 4096];
        let e = view.read_at(&mut buf, 0).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, BucketError::Damaged { .. }), "{msg}");
        assert!(
            msg.contains(segs[0].as_ref()) && msg.contains("fails authentication"),
            "{msg}"
        );
        // Bytes in other chunks are still served; the damaged ones never are.
        view.read_at(&mut buf, 200 << 10).unwrap();
        assert_eq!(buf, vec![1u8; 4096]);
        r.view(3).unwrap().read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![2u8; 4096]);
        assert!(r.view(3).unwrap().read_at(&mut buf, 4096).is_err());
        // Damage in the second (one-chunk) segment: its index cannot be read, so no view
        // that needs it opens.
        rewrite(&bucket, &segs[1], |b| b[100] ^= 1);
        let r = VolumeReader::open(bucket.clone(), "vol1", key(4), 1 << 20).unwrap();
        let msg = r.view(3).unwrap_err().to_string();
        assert!(
            msg.contains(segs[1].as_ref()) && msg.contains("fails authentication"),
            "{msg}"
        );
        rewrite(&bucket, &segs[1], |b| b[100] ^= 1);
        // A cut-off object is refused when a view opens it.
        rewrite(&bucket, &segs[1], |b| b.truncate(b.len() - 10));
        let r = VolumeReader::open(bucket.clone(), "vol1", key(4), 1 << 20).unwrap();
        let msg = r.view(3).unwrap_err().to_string();
        assert!(
            msg.contains(segs[1].as_ref()) && msg.contains("truncated"),
            "{msg}"
        );
        // A listed object that is gone.
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(bucket.store().delete(&segs[1])).unwrap();
        let r = VolumeReader::open(bucket.clone(), "vol1", key(4), 1 << 20).unwrap();
        let msg = r.view(3).unwrap_err().to_string();
        assert!(msg.contains("does not exist"), "{msg}");
    }
}

#[test]
fn no_plaintext_in_the_bucket_and_a_wrong_key_is_refused() {
    for (bucket, _dir) in stores() {
        let mut w = VolumeWriter::open(bucket.clone(), &id(1), key(5)).unwrap();
        let mut rng = Rng(7);
        let mut model = vec![0u8; SIZE as usize];
        let (s, _) = batch(&w, &mut rng, &mut model, 50);
        w.append(vec![s]).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let all = objects(&bucket);
        assert!(all.len() >= 3, "{all:?}");
        for m in &all {
            let b = rt
                .block_on(async { bucket.store().get(&m.location).await.unwrap().bytes().await })
                .unwrap();
            assert!(
                !b.windows(18).any(|x| x == b"PLANTED-PLAINTEXT-"),
                "{} holds plaintext",
                m.location
            );
        }
        let e = VolumeReader::open(bucket.clone(), "vol1", key(6), 1 << 20).unwrap_err();
        assert!(matches!(e, BucketError::WrongKey { .. }), "{e}");
        assert!(
            e.to_string().contains("vol1") && e.to_string().contains("key file"),
            "{e}"
        );
        let e = VolumeWriter::open(bucket.clone(), &id(1), key(6)).unwrap_err();
        assert!(matches!(e, BucketError::WrongKey { .. }), "{e}");
        let e = VolumeReader::open(bucket.clone(), "nope", key(5), 1 << 20).unwrap_err();
        assert!(
            e.to_string().contains("nope") && e.to_string().contains("no manifest"),
            "{e}"
        );
    }
}

#[test]
fn urls_are_checked() {
    let o = BucketOptions::default();
    for (url, want) in [
        ("nothing", "expected s3://"),
        ("gs://b/p", "unknown scheme gs://"),
        ("file:///no/such/dir/at/all", "must exist"),
    ] {
        let e = Bucket::open(url, &o).unwrap_err().to_string();
        assert!(e.contains(url) && e.contains(want), "{e}");
    }
    let d = tempfile::tempdir().unwrap();
    let url = format!("file://{}", d.path().display());
    let b = Arc::new(Bucket::open(&url, &o).unwrap());
    let mut w = VolumeWriter::open(b.clone(), &id(1), key(7)).unwrap();
    w.append(vec![one_write(&w, 3)]).unwrap();
    assert!(
        d.path()
            .join("vol1/manifest/00000000000000000002.json.enc")
            .exists()
    );
}

/// An in-memory store whose server can be "down" (every request fails as a connection
/// error would), fail the next create-if-absent put, or lose the answer to it after doing it.
#[derive(Debug, Default)]
struct Flaky {
    inner: InMemory,
    down: AtomicBool,
    /// Puts of objects whose name contains this fail (a writer that stops there).
    fail_puts_of: std::sync::Mutex<Option<&'static str>>,
    fail_deletes: AtomicBool,
    fail_next_create: AtomicBool,
    lose_next_create: AtomicBool,
}

impl std::fmt::Display for Flaky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Flaky({})", self.inner)
    }
}

fn refused(what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "Flaky",
        source: format!("{what}: connection refused").into(),
    }
}

impl Flaky {
    fn up(&self, what: &str) -> object_store::Result<()> {
        match self.down.load(Ordering::SeqCst) {
            true => Err(refused(what)),
            false => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for Flaky {
    async fn put_opts(
        &self,
        location: &ObjPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.up("put")?;
        if let Some(f) = *self.fail_puts_of.lock().unwrap() {
            if location.as_ref().contains(f) {
                return Err(refused("put"));
            }
        }
        let create = matches!(opts.mode, PutMode::Create);
        if create && self.fail_next_create.swap(false, Ordering::SeqCst) {
            return Err(refused("create"));
        }
        let r = self.inner.put_opts(location, payload, opts).await;
        if create && r.is_ok() && self.lose_next_create.swap(false, Ordering::SeqCst) {
            return Err(object_store::Error::Generic {
                store: "Flaky",
                source: "the connection broke before the answer".into(),
            });
        }
        r
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.up("multipart")?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &ObjPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.up("get")?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjPath>> {
        if self.fail_deletes.load(Ordering::SeqCst) {
            return Box::pin(
                locations
                    .map_ok(|_| ())
                    .and_then(|()| async { Err(refused("delete")) }),
            );
        }
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&ObjPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        match self.up("list") {
            Ok(()) => self.inner.list(prefix),
            Err(e) => Box::pin(futures::stream::once(async move { Err(e) })),
        }
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjPath>,
    ) -> object_store::Result<ListResult> {
        self.up("list")?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &ObjPath,
        to: &ObjPath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.up("copy")?;
        self.inner.copy_opts(from, to, options).await
    }
}

fn flaky() -> (Arc<Flaky>, Arc<Bucket>) {
    let f = Arc::new(Flaky::default());
    let b = Arc::new(Bucket::with_store(f.clone(), "memory://flaky", "p"));
    (f, b)
}

#[test]
fn a_lost_answer_or_a_down_server_loses_nothing_and_repeats_nothing() {
    let (f, bucket) = flaky();
    let mut w = VolumeWriter::open(bucket.clone(), &id(1), key(8)).unwrap();
    w.append(vec![one_write(&w, 1)]).unwrap();
    // The manifest put happens but its answer is lost: the append reports a transient
    // error, and settling finds the version is exactly ours.
    f.lose_next_create.store(true, Ordering::SeqCst);
    let e = w.append(vec![one_write(&w, 2)]).unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert_eq!(w.next_seq(), 2, "not known to be in the bucket yet");
    assert_eq!(w.settle().unwrap(), 4);
    assert_eq!(w.manifest().version, 3);
    // The server is down while segments go up: nothing is listed, and sending again works.
    f.down.store(true, Ordering::SeqCst);
    let e = w.append(vec![one_write(&w, 3)]).unwrap_err();
    assert!(
        e.is_transient() && e.to_string().contains("connection refused"),
        "{e}"
    );
    f.down.store(false, Ordering::SeqCst);
    assert_eq!(w.settle().unwrap(), 4);
    assert_eq!(w.append(vec![one_write(&w, 3)]).unwrap(), 6);
    // Down for the manifest only (after the uploads): the append stays pending through
    // failed settles and lands once the server is back.
    let s = one_write(&w, 4);
    f.lose_next_create.store(true, Ordering::SeqCst);
    assert!(w.append(vec![s]).unwrap_err().is_transient());
    f.down.store(true, Ordering::SeqCst);
    assert!(w.settle().unwrap_err().is_transient());
    f.down.store(false, Ordering::SeqCst);
    assert_eq!(w.settle().unwrap(), 8);
    let r = VolumeReader::open(bucket.clone(), "vol1", key(8), 1 << 20).unwrap();
    assert_eq!(r.manifest().version, 5);
    assert_eq!(r.manifest().points().len(), 4);
    let mut buf = vec![0u8; 4096];
    r.view(7).unwrap().read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![4u8; 4096]);
    // A pending version that another writer created meanwhile with other contents: fenced,
    // and it stays fenced.
    let mut other = VolumeWriter::open(bucket.clone(), &id(1), key(8)).unwrap();
    f.fail_next_create.store(true, Ordering::SeqCst);
    assert!(w.append(vec![one_write(&w, 5)]).unwrap_err().is_transient());
    other.append(vec![one_write(&other, 6)]).unwrap();
    let e = w.settle().unwrap_err();
    assert!(matches!(e, BucketError::Fenced { version: 6, .. }), "{e}");
    assert!(matches!(w.settle(), Err(BucketError::Fenced { .. })));
    let r = VolumeReader::open(bucket, "vol1", key(8), 1 << 20).unwrap();
    r.view(9).unwrap().read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![6u8; 4096]);
}

#[test]
fn a_writer_that_fell_behind_old_deleted_versions_is_still_fenced() {
    for (bucket, _dir) in stores() {
        let mut stale = VolumeWriter::open(bucket.clone(), &id(1), key(9)).unwrap();
        let mut w = VolumeWriter::open(bucket.clone(), &id(1), key(9)).unwrap();
        for i in 0..40 {
            w.append(vec![one_write(&w, i)]).unwrap();
        }
        let kept = objects(&bucket)
            .iter()
            .filter(|m| m.location.as_ref().contains("/manifest/"))
            .count();
        assert!(kept <= 16, "old versions are deleted, {kept} kept");
        // Version 2 no longer exists, so the stale writer's put of it succeeds: it must
        // still find out that it is not the newest, and stop.
        let e = stale.append(vec![one_write(&stale, 99)]).unwrap_err();
        assert!(matches!(e, BucketError::Fenced { version: 2, .. }), "{e}");
        let r = VolumeReader::open(bucket.clone(), "vol1", key(9), 1 << 20).unwrap();
        assert_eq!(r.manifest().version, 41);
        let mut buf = vec![0u8; 4096];
        r.view(r.manifest().latest())
            .unwrap()
            .read_at(&mut buf, 0)
            .unwrap();
        assert_eq!(buf, vec![39u8; 4096]);
    }
}

#[test]
fn a_changed_manifest_is_damage() {
    for (bucket, _dir) in stores() {
        let mut w = VolumeWriter::open(bucket.clone(), &id(1), key(10)).unwrap();
        w.append(vec![one_write(&w, 1)]).unwrap();
        let m = objects(&bucket)
            .into_iter()
            .map(|m| m.location)
            .filter(|p| p.as_ref().ends_with("00000000000000000002.json.enc"))
            .collect::<Vec<_>>();
        assert_eq!(m.len(), 1);
        rewrite(&bucket, &m[0], |b| b[100] ^= 1);
        let e = VolumeReader::open(bucket.clone(), "vol1", key(10), 1 << 20).unwrap_err();
        assert!(matches!(e, BucketError::Damaged { .. }), "{e}");
        assert!(e.to_string().contains(m[0].as_ref()), "{e}");
        // Version 1 moved into version 2's place fails too: the name is authenticated.
        let v1 = ObjPath::from(m[0].as_ref().replace("02.json", "01.json"));
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(bucket.store().copy(&v1, &m[0])).unwrap();
        let e = VolumeReader::open(bucket.clone(), "vol1", key(10), 1 << 20).unwrap_err();
        assert!(matches!(e, BucketError::Damaged { .. }), "{e}");
    }
}

#[test]
fn a_view_of_a_volume_replaced_in_the_bucket_refuses_to_read() {
    for (bucket, _dir) in stores() {
        let mut w = VolumeWriter::open(bucket.clone(), &id(1), key(3)).unwrap();
        let (mut rng, mut model) = (Rng(0x9e37_79b9_7f4a_7c15), vec![0u8; SIZE as usize]);
        let (seg, p) = batch(&w, &mut rng, &mut model, 40);
        w.append(vec![seg]).unwrap();
        let view = VolumeReader::open(bucket.clone(), "vol1", key(3), 1 << 20)
            .unwrap()
            .view(p)
            .unwrap();
        // The operator removes the volume's objects, and another volume of the same name
        // writes more versions (and the same seqs) there.
        let rt = tokio::runtime::Runtime::new().unwrap();
        for o in objects(&bucket) {
            rt.block_on(bucket.store().delete(&o.location)).unwrap();
        }
        let other = Identity {
            uuid: "fedcba9876543210fedcba9876543210".into(),
            ..id(1)
        };
        let mut w = VolumeWriter::open(bucket.clone(), &other, key(3)).unwrap();
        for _ in 0..3 {
            let (seg, _) = batch(&w, &mut rng, &mut vec![0u8; SIZE as usize], 40);
            w.append(vec![seg]).unwrap();
        }
        let mut buf = vec![0u8; SIZE as usize];
        let e = view.read_at(&mut buf, 0).unwrap_err();
        assert!(matches!(e, BucketError::Refused { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("replaced") && msg.contains(&other.uuid),
            "{msg}"
        );
    }
}

/// The objects of volume vol1 under `dir/` ("seg", "base").
fn names_under(bucket: &Bucket, dir: &str) -> Vec<String> {
    let mut v: Vec<String> = bucket
        .objects("vol1")
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with(&format!("{dir}/")))
        .collect();
    v.sort();
    v
}

/// Every segment and base object of vol1 that its newest manifest does not use.
fn unused(bucket: &Arc<Bucket>) -> Vec<String> {
    let r = VolumeReader::open(bucket.clone(), "vol1", key(1), 0).unwrap();
    let m = r.manifest();
    let mut used: Vec<String> = m.store.segments.iter().map(|s| s.file.clone()).collect();
    if let Some(b) = &m.base {
        used.push(b.file.clone());
        let i = r.base_index().unwrap().unwrap();
        used.extend(i.regions.iter().map(|o| o.file.clone()));
    }
    let mut all = names_under(bucket, "seg");
    all.extend(names_under(bucket, "base"));
    all.retain(|n| !used.contains(n));
    all
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Keeps the points whose marker's unix_ms (its seq, in these tests) is at least `from`.
fn keep_from(from: u64, now: u64) -> Retention {
    Retention {
        keep_all_ms: now - from,
        tiers: Vec::new(),
    }
}

#[test]
fn retention_merges_pruned_points_into_base_objects_and_deletes_after_grace() {
    for (bucket, _dir) in stores() {
        let mut w = VolumeWriter::open(bucket.clone(), &id(1), key(1)).unwrap();
        let mut rng = Rng(0x51_7cc1_b727_220a);
        let mut model = vec![0u8; SIZE as usize];
        let mut images = Vec::new();
        let mut round = |w: &mut VolumeWriter, images: &mut Vec<(u64, Vec<u8>)>| {
            for _ in 0..4 {
                let (seg, p) = batch(w, &mut rng, &mut model, 30);
                w.append(vec![seg]).unwrap();
                images.push((p, model.clone()));
            }
        };
        round(&mut w, &mut images);
        round(&mut w, &mut images);
        let grace = 60_000;
        // Points' unix_ms are their seqs: "now" is far after them, the grace in between.
        let t = images.last().unwrap().0 + 1_000_000;
        let mut gc = Gc {
            retention: keep_from(images[5].0, t),
            merge_bytes: 0,
            region_bytes: 1 << 20,
            grace_ms: grace,
            level: 3,
        };
        // A reader that opened before the merge, and a view on a point that stays.
        let before = VolumeReader::open(bucket.clone(), "vol1", key(1), 1 << 20).unwrap();
        let kept_view = before.view(images[6].0).unwrap();
        let done = w.maintain(&gc, t).unwrap();
        assert_eq!(
            (done.pruned, done.merged_segments, done.deleted),
            (5, 6, 0),
            "{done:?}"
        );
        assert!((1..=4).contains(&done.base_objects), "{done:?}");
        let r = VolumeReader::open(bucket.clone(), "vol1", key(1), 1 << 20).unwrap();
        assert_eq!(r.manifest().store.base_seq, images[5].0);
        let listed: Vec<u64> = r.manifest().points().iter().map(|(p, _)| p.id).collect();
        let want: Vec<u64> = images[5..].iter().map(|(s, _)| *s).collect();
        assert_eq!(listed, want);
        for (seq, image) in &images[5..] {
            assert!(read_all(&r.view(*seq).unwrap()) == *image, "point {seq}");
        }
        assert!(r.view(images[4].0).is_err(), "a pruned point is not served");
        // Unlisted, not deleted yet: the old reader's views still read.
        assert_eq!(unused(&bucket).len(), 6);
        assert!(read_all(&before.view(images[2].0).unwrap()) == images[2].1);
        // After the grace period the next pass deletes them; the view opened before the
        // merge finds its objects gone and reads the same bytes from the base objects.
        gc.retention = keep_from(images[5].0, t + grace);
        let done = w.maintain(&gc, t + grace).unwrap();
        assert_eq!(done.deleted, 6, "{done:?}");
        assert!(unused(&bucket).is_empty());
        assert!(read_all(&kept_view) == images[6].1);
        assert!(w.manifest().garbage.is_empty());
        // More rounds, then a second merge replaces the base objects of the regions it
        // touches; the first base's objects go after the grace.
        round(&mut w, &mut images);
        let t2 = t + 2 * grace;
        gc.retention = keep_from(images[10].0, t2);
        let done = w.maintain(&gc, t2).unwrap();
        assert_eq!((done.pruned, done.merged_segments), (5, 5), "{done:?}");
        let old_base = unused(&bucket);
        assert!(
            old_base.iter().any(|n| n.starts_with("base/")),
            "{old_base:?}"
        );
        gc.retention = keep_from(images[10].0, t2 + grace);
        let done = w.maintain(&gc, t2 + grace).unwrap();
        assert_eq!(done.deleted, old_base.len());
        let r = VolumeReader::open(bucket.clone(), "vol1", key(1), 1 << 20).unwrap();
        for (seq, image) in &images[10..] {
            assert!(read_all(&r.view(*seq).unwrap()) == *image, "point {seq}");
        }
        assert!(unused(&bucket).is_empty());
        // With nothing to prune and nothing new, a pass changes nothing.
        let v = w.manifest().version;
        assert_eq!(w.maintain(&gc, t2 + grace).unwrap(), Maintained::default());
        assert_eq!(w.manifest().version, v);
    }
}

#[test]
fn an_interrupted_merge_or_delete_leaves_a_readable_volume_and_is_finished_later() {
    let (f, bucket) = flaky();
    let mut w = VolumeWriter::open(bucket.clone(), &id(1), key(1)).unwrap();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut model = vec![0u8; SIZE as usize];
    let mut images = Vec::new();
    for _ in 0..6 {
        let (seg, p) = batch(&w, &mut rng, &mut model, 30);
        w.append(vec![seg]).unwrap();
        images.push((p, model.clone()));
    }
    let t = now_ms() + 1_000_000;
    let gc = |now: u64| Gc {
        retention: keep_from(images[3].0, now),
        merge_bytes: 0,
        region_bytes: 1 << 20,
        grace_ms: 1000,
        level: 3,
    };
    let check = |from: usize| {
        let r = VolumeReader::open(bucket.clone(), "vol1", key(1), 1 << 20).unwrap();
        for (seq, image) in &images[from..] {
            assert!(read_all(&r.view(*seq).unwrap()) == *image, "point {seq}");
        }
    };
    // The writer stops after uploading the base objects, before their index and the
    // manifest that lists them: only the pruning is listed, and the base objects are
    // orphans.
    *f.fail_puts_of.lock().unwrap() = Some("base/index");
    let v = w.manifest().version;
    assert!(w.maintain(&gc(t), t).unwrap_err().is_transient());
    assert_eq!(w.manifest().version, v + 1);
    assert_eq!(w.manifest().store.base_seq, 0);
    assert!(!names_under(&bucket, "base").is_empty());
    check(3);
    // The next pass, once the orphans are older than the grace, deletes them and merges
    // again.
    *f.fail_puts_of.lock().unwrap() = None;
    let orphans = names_under(&bucket, "base");
    let done = w.maintain(&gc(t), t).unwrap();
    assert_eq!((done.deleted, done.merged_segments), (orphans.len(), 4));
    for o in orphans {
        assert!(!names_under(&bucket, "base").contains(&o), "{o} deleted");
    }
    check(3);
    // Deletions fail: the pass still succeeds, forgets them, and a later pass deletes them
    // as orphans.
    f.fail_deletes.store(true, Ordering::SeqCst);
    w.maintain(&gc(t + 1000), t + 1000).unwrap();
    assert_eq!(unused(&bucket).len(), 4);
    assert!(w.manifest().garbage.is_empty());
    f.fail_deletes.store(false, Ordering::SeqCst);
    assert_eq!(w.maintain(&gc(t + 1000), t + 1000).unwrap().deleted, 4);
    assert!(unused(&bucket).is_empty());
    check(3);
    // A fenced writer's uploads are orphans too.
    let mut stale = VolumeWriter::open(bucket.clone(), &id(1), key(1)).unwrap();
    let mut idle = VolumeWriter::open(bucket.clone(), &id(1), key(1)).unwrap();
    w.append(vec![one_write(&w, 7)]).unwrap();
    assert!(matches!(
        stale.append(vec![one_write(&stale, 8)]),
        Err(BucketError::Fenced { .. })
    ));
    assert_eq!(unused(&bucket).len(), 1);
    // A writer that was overtaken and never wrote since deletes nothing: it finds out it is
    // fenced first.
    let objects = bucket.objects("vol1").unwrap().len();
    let e = idle
        .maintain(&gc(t + 1_000_000), t + 1_000_000)
        .unwrap_err();
    assert!(matches!(e, BucketError::Fenced { .. }), "{e}");
    assert_eq!(bucket.objects("vol1").unwrap().len(), objects);
    assert_eq!(w.maintain(&gc(t + 2000), t + 2000).unwrap().deleted, 1);
    assert!(unused(&bucket).is_empty());
}

/// One segment overwriting 256 KiB at `at` with compressible data of `byte`.
fn overwrite(w: &VolumeWriter, model: &mut [u8], byte: u8, at: usize) -> SegmentBuf {
    let seq = w.next_seq();
    let mut s = w.segment(seq);
    let data: Vec<u8> = (0..256u32 << 10)
        .map(|i| byte ^ ((i / 1000) as u8))
        .collect();
    let mut packer = Packer::new(3, 8).unwrap();
    s.push_write(seq, at as u64, &data, &mut packer).unwrap();
    model[at..at + data.len()].copy_from_slice(&data);
    s
}

#[test]
fn segments_between_kept_points_are_compacted_and_every_kept_point_reads_the_same() {
    for (bucket, _dir) in stores() {
        let mut w = VolumeWriter::open(bucket.clone(), &id(1), key(1)).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        let mut images: Vec<(u64, Vec<u8>)> = Vec::new();
        // Per round two segments and a point (its marker's unix_ms below). One point per
        // second of unix_ms is kept: the points of rounds 1 and 3 go. Rounds 0 to 5 write
        // the same 256 KiB over and over, round 6 two other places.
        let unix = [1000, 1500, 2000, 2500, 3000, 4000, 5000];
        for (r, ms) in unix.into_iter().enumerate() {
            let (a, b) = if r == 6 { (1 << 20, 2 << 20) } else { (0, 0) };
            let s = overwrite(&w, &mut model, (2 * r) as u8, a);
            w.append(vec![s]).unwrap();
            let s = overwrite(&w, &mut model, (2 * r + 1) as u8, b);
            w.append(vec![s]).unwrap();
            let seq = w.next_seq();
            let mut s = w.segment(seq);
            s.push(Kind::Marker, seq, 0, 0, &marker(ms));
            w.append(vec![s]).unwrap();
            images.push((seq, model.clone()));
        }
        let p = |r: usize| images[r].0;
        let before = VolumeReader::open(bucket.clone(), "vol1", key(1), 1 << 20).unwrap();
        let old_view = before.view(p(2)).unwrap();
        let gc = Gc {
            retention: Retention {
                keep_all_ms: 0,
                tiers: vec![redun_store::retention::Tier {
                    every_ms: 1000,
                    for_ms: u64::MAX,
                }],
            },
            merge_bytes: 0,
            region_bytes: 1 << 20,
            grace_ms: 0,
            level: 3,
        };
        // Until a kept point after a run is a grace old, the run stays: here only the
        // point of round 0 is (the merge goes ahead).
        let young = Gc {
            grace_ms: 999_000,
            ..gc.clone()
        };
        let mut passes = Vec::new();
        for _ in 0..2 {
            passes.push(w.maintain(&young, 1_000_000).unwrap());
        }
        assert_eq!(passes[0].merged_segments, 3, "{passes:?}");
        assert_eq!(w.manifest().store.segments.len(), 6 * 3, "{passes:?}");
        for _ in 0..8 {
            let done = w.maintain(&gc, 1_000_000).unwrap();
            if done == Maintained::default() {
                break;
            }
            passes.push(done);
        }
        // A merge of round 0, three compactions, then the deletions.
        let compacted: Vec<usize> = passes.iter().map(|d| d.compacted_segments).collect();
        assert_eq!(
            compacted.iter().filter(|&&n| n > 0).count(),
            3,
            "{passes:?}"
        );
        assert_eq!(compacted.iter().sum::<usize>(), 6 + 6 + 3, "{passes:?}");
        assert_eq!(passes.iter().map(|d| d.pruned).sum::<usize>(), 2);
        let r = VolumeReader::open(bucket.clone(), "vol1", key(1), 1 << 20).unwrap();
        let m = r.manifest();
        assert_eq!(m.store.base_seq, p(0));
        let segs: Vec<(u64, u64)> = m
            .store
            .segments
            .iter()
            .map(|s| (s.first_seq, s.last_seq))
            .collect();
        assert_eq!(
            segs,
            [
                (p(2), p(2)),
                (p(4), p(4)),
                (p(5), p(5)),
                (p(5) + 1, p(5) + 1),
                (p(5) + 2, p(5) + 2),
                (p(6), p(6)),
            ],
            "round 6 wrote different places: not worth compacting"
        );
        let ids: Vec<u64> = m.points().iter().map(|(p, _)| p.id).collect();
        assert_eq!(ids, [p(0), p(2), p(4), p(5), p(6)]);
        for &k in &[0, 2, 4, 5, 6] {
            assert!(
                read_all(&r.view(p(k)).unwrap()) == images[k].1,
                "point {}",
                p(k)
            );
        }
        // Seqs inside a compacted segment are gone, as are pruned points.
        for gone in [p(1), p(2) - 1, p(3), p(4) - 2] {
            let e = r.view(gone).unwrap_err();
            assert!(e.to_string().contains("not held"), "{e}");
        }
        assert!(!m.holds(p(1)) && m.holds(p(2)) && m.holds(p(5) + 1));
        // The view opened before: its objects are deleted, it reads the kept point anew.
        assert!(unused(&bucket).is_empty(), "{:?}", unused(&bucket));
        assert!(read_all(&old_view) == images[2].1);
        // Nothing left to do, and the run found not worth it is not tried again.
        assert_eq!(w.maintain(&gc, 1_000_000).unwrap(), Maintained::default());
    }
}

#[test]
fn an_interrupted_compaction_leaves_a_readable_volume_and_is_finished_later() {
    let (f, bucket) = flaky();
    let mut w = VolumeWriter::open(bucket.clone(), &id(1), key(1)).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut images = Vec::new();
    for r in 0..3usize {
        for k in 0..2 {
            let s = overwrite(&w, &mut model, (2 * r + k) as u8, 0);
            w.append(vec![s]).unwrap();
        }
        let seq = w.next_seq();
        let mut s = w.segment(seq);
        s.push(Kind::Marker, seq, 0, 0, &marker(1000 * (r as u64 + 1)));
        w.append(vec![s]).unwrap();
        images.push((seq, model.clone()));
    }
    let check = || {
        let r = VolumeReader::open(bucket.clone(), "vol1", key(1), 1 << 20).unwrap();
        for (seq, image) in &images {
            assert!(read_all(&r.view(*seq).unwrap()) == *image, "point {seq}");
        }
        r.manifest().clone()
    };
    // Every point is kept: round 0 merges into the base, rounds 1 and 2 compact.
    let gc = Gc {
        retention: Retention {
            keep_all_ms: u64::MAX,
            tiers: Vec::new(),
        },
        merge_bytes: 0,
        region_bytes: 1 << 20,
        grace_ms: 1000,
        level: 3,
    };
    let t = now_ms() + 1_000_000;
    assert_eq!(w.maintain(&gc, t).unwrap().merged_segments, 3);
    // The compacted segment is uploaded, the manifest that lists it is not: the volume
    // reads as before, the new object is not used.
    *f.fail_puts_of.lock().unwrap() = Some("manifest/");
    let v = w.manifest().version;
    assert!(w.maintain(&gc, t).unwrap_err().is_transient());
    *f.fail_puts_of.lock().unwrap() = None;
    assert_eq!(check().version, v);
    assert_eq!(
        unused(&bucket).len(),
        3 + 1,
        "round 0's garbage and the new segment"
    );
    // The next passes put that manifest again, compact round 2 and delete what is unused.
    let mut compacted = 0;
    for k in 1..6 {
        compacted += w.maintain(&gc, t + 1000 * k).unwrap().compacted_segments;
    }
    assert_eq!(
        compacted, 3,
        "round 2 (round 1's was listed by the settled manifest)"
    );
    let m = check();
    let segs: Vec<(u64, u64)> = (m.store.segments.iter())
        .map(|s| (s.first_seq, s.last_seq))
        .collect();
    assert_eq!(
        segs,
        [(images[1].0, images[1].0), (images[2].0, images[2].0)]
    );
    assert!(unused(&bucket).is_empty(), "{:?}", unused(&bucket));
}
