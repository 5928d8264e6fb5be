//! Recovery points straight from a bucket: `redun key new`, `redun points --store` and
//! `redun restore` (docs/FORMAT.md, "Bucket layout").

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redun_store::bucket::{Bucket, BucketOptions, VolumeReader};
use redun_store::crypt::{DEFAULT_KEY_DIR, VolumeKey};

/// Bytes restored per read and write.
const STEP: usize = 16 << 20;
/// Steps restored at once.
const WORKERS: usize = 4;

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("redun: {msg}");
    ExitCode::FAILURE
}

/// `redun key new PATH`.
pub fn key_new(path: &Path) -> ExitCode {
    match VolumeKey::create_file(path) {
        Ok(k) => {
            println!(
                "wrote a new volume key to {} (key check {}); copy it to the recovery site and keep a copy off this server: without it the bucket cannot be read",
                path.display(),
                k.check_hex()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!(
            "{e} (an existing key is never replaced: it may be the only way to read a bucket)"
        )),
    }
}

/// The `[bucket]` table of the config file, when the file exists.
pub fn options(config: &Path) -> Result<BucketOptions, String> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        bucket: BucketOptions,
    }
    if !config.exists() {
        return Ok(BucketOptions::default());
    }
    redun_tracker::config::load_toml::<File>(config)
        .map(|f| f.bucket)
        .map_err(|e| e.to_string())
}

/// Where and how to read a volume in a bucket.
#[derive(Debug)]
pub struct Source<'a> {
    pub volume: &'a str,
    pub store: &'a str,
    pub key: Option<&'a Path>,
    pub config: &'a Path,
}

impl Source<'_> {
    fn open(&self, cache: usize) -> Result<VolumeReader, String> {
        let o = options(self.config)?;
        let bucket = Bucket::open(self.store, &o).map_err(|e| e.to_string())?;
        let default_key = Path::new(DEFAULT_KEY_DIR).join(format!("{}.key", self.volume));
        let key_path = self.key.unwrap_or(&default_key);
        let key = VolumeKey::load(key_path).map_err(|e| format!("volume {}: {e}", self.volume))?;
        VolumeReader::open(Arc::new(bucket), self.volume, Arc::new(key), cache)
            .map_err(|e| e.to_string())
    }
}

/// `redun points VOLUME --store URL`.
pub fn list(src: &Source<'_>, json: bool) -> ExitCode {
    let r = match src.open(1 << 20) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let m = r.manifest();
    let points = m.points();
    if json {
        let v: Vec<_> = points
            .iter()
            .map(|(p, usable)| {
                serde_json::json!({"id": p.id, "unix_ms": p.unix_ms, "kind": p.kind, "usable": usable})
            })
            .collect();
        let out = serde_json::json!({
            "volume": src.volume, "store": src.store, "manifest_version": m.version,
            "latest": m.latest(), "points": v,
        });
        println!("{out}");
        return ExitCode::SUCCESS;
    }
    println!(
        "volume {} in {}: manifest version {}, {} segments, latest seq {}",
        src.volume,
        src.store,
        m.version,
        m.store.segments.len(),
        m.latest()
    );
    crate::points::print_table(points.into_iter(), &format!("volume {}", src.volume));
    ExitCode::SUCCESS
}

/// `redun restore VOLUME --store URL --point ID --to PATH`.
pub fn restore(src: &Source<'_>, point: &str, to: &Path, progress: bool) -> ExitCode {
    match restore_inner(src, point, to, progress) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn restore_inner(src: &Source<'_>, point: &str, to: &Path, progress: bool) -> Result<(), String> {
    let r = src.open(redun_store::bucket::CACHE_BYTES)?;
    let m = r.manifest();
    let seq = if point == "latest" {
        if !m.consistent_at(m.latest()) {
            return Err(format!(
                "volume {}: the latest image in {} is mid-synchronisation (initial replication or resync), not an image of the volume: restore a point (`redun points {} --store {}`), or wait until the synchronisation is done",
                src.volume, src.store, src.volume, src.store
            ));
        }
        m.latest()
    } else {
        let id: u64 = point
            .parse()
            .map_err(|_| format!("--point {point}: expected a point id or `latest`"))?;
        match m.points().into_iter().find(|(p, _)| p.id == id) {
            Some((_, true)) => id,
            Some((_, false)) => {
                return Err(format!(
                    "volume {}: point {id} is listed but cannot be read from {} (see `redun points {} --store {}`)",
                    src.volume, src.store, src.volume, src.store
                ));
            }
            None => {
                return Err(format!(
                    "volume {}: no point {id} in {} (list them with `redun points {} --store {}`)",
                    src.volume, src.store, src.volume, src.store
                ));
            }
        }
    };
    let view = r.view(seq).map_err(|e| e.to_string())?;
    let size = view.size();
    let device = std::fs::metadata(to).is_ok_and(|md| md.file_type().is_block_device());
    let out = OpenOptions::new()
        .write(true)
        .create(!device)
        .truncate(!device)
        .open(to)
        .map_err(|e| format!("cannot open {}: {e}", to.display()))?;
    let werr = |e: std::io::Error| format!("cannot write {}: {e}", to.display());
    if !device {
        out.set_len(size).map_err(werr)?;
    }
    let bar = if progress {
        let b = indicatif::ProgressBar::new(size);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        b.set_message(format!("restoring {} point {seq}", src.volume));
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    // WORKERS threads each restore one STEP at a time, the next one not taken yet: a step's
    // fetches wait on the object server, so several are under way at once.
    let next = AtomicU64::new(0);
    let failed: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| {
                let mut buf = vec![0u8; STEP];
                loop {
                    let pos = next.fetch_add(STEP as u64, Ordering::Relaxed);
                    if pos >= size || failed.lock().expect("lock").is_some() {
                        return;
                    }
                    let n = usize::try_from((size - pos).min(STEP as u64)).expect("at most STEP");
                    let r = view.read_at(&mut buf[..n], pos).map_err(|e| e.to_string());
                    // A new file is sparse: zeroes stay holes. A device gets every byte.
                    let r = r.and_then(|()| {
                        if device || buf[..n].iter().any(|&b| b != 0) {
                            out.write_all_at(&buf[..n], pos).map_err(werr)?;
                        }
                        Ok(())
                    });
                    if let Err(e) = r {
                        failed.lock().expect("lock").get_or_insert(e);
                        return;
                    }
                    bar.inc(n as u64);
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().expect("lock") {
        return Err(e);
    }
    out.sync_all().map_err(werr)?;
    bar.finish_and_clear();
    println!(
        "restored volume {} at point {seq} ({size} bytes) from {} to {}",
        src.volume,
        src.store,
        to.display()
    );
    Ok(())
}
