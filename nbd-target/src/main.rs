//! `redun-target`: the master target. Accepts shippers over mutual TLS and applies each
//! volume's stream to a replica image in the data directory.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use log::{debug, error, info, warn};
use redun_shipper::tls::TlsFiles;
use redun_target::config::{
    ConfigFile, DEFAULT_ADMIN_SOCKET, DEFAULT_LISTEN, DEFAULT_NBD_LISTEN, TargetSection,
};
use redun_target::export::PointExports;
use redun_target::server::{Choice, Target};
use redun_target::source::BucketReplicas;
use redun_target::store::Retention;
use redun_tracker::admin::{AdminServer, JsonHandler};
use redun_tracker::nbd::{Exports, ListenAddr, Listener, Server};
use redun_tracker::service;

/// redun target: receives replicated volumes and keeps their replicas.
///
/// Every setting can also come from the `[target]` section of `--config FILE`; flags win.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML config file (its `[target]` section; docs/CONFIG.md).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where the replicas live (NAME.img and NAME.state per volume).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address for shippers [default: 0.0.0.0:9443].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// The CA that signs every shipper's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// This target's certificate (PEM), signed by the CA, its DNS name the one shippers dial.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Admin socket path [default: /run/redun/target.sock].
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// Where recovery points are served over NBD, read-only, as NAME@latest and NAME@ID:
    /// HOST:PORT, unix:/PATH or off [default: 127.0.0.1:10810].
    #[arg(long, value_name = "ADDR")]
    nbd_listen: Option<String>,
    /// Size at which a replica's segment is sealed and becomes mergeable, e.g. 64M
    /// [default: 64M].
    #[arg(long, value_name = "SIZE", value_parser = redun_tracker::track::parse_size)]
    segment_size: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9752) [default: off].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Serve the volumes that shippers write into this bucket (s3://BUCKET/PREFIX,
    /// az://CONTAINER/PREFIX or file:///DIR; endpoint and credentials from the config file's
    /// [bucket] table, else the standard environment variables) instead of replica stores.
    /// No shipper connects then: the TLS flags and --listen are not used.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// With --store: where the volumes' key files are, NAME.key [default: /etc/redun/keys].
    #[arg(long, value_name = "DIR")]
    key_dir: Option<PathBuf>,
    /// With --store: decrypted segment data kept in memory per volume, e.g. 256M
    /// [default: 256M].
    #[arg(long, value_name = "SIZE", value_parser = redun_tracker::track::parse_size)]
    cache_size: Option<u64>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{}", redun_tracker::service::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let (file, retention, bucket_opts) = match &args.config {
        Some(p) => {
            let c = ConfigFile::load(p)?;
            c.target.validate(p)?;
            let r = c.retention.policy(p)?;
            (c.target, r, c.bucket)
        }
        None => (
            TargetSection::default(),
            Retention::default(),
            redun_store::bucket::BucketOptions::default(),
        ),
    };
    let missing = |flag: &str, key: &str| {
        anyhow::anyhow!(
            "{flag} is required (or target.{key} in the config file given with --config)"
        )
    };
    let data_dir = args
        .data_dir
        .or(file.data_dir.clone())
        .ok_or_else(|| missing("--data-dir", "data_dir"))?;
    let admin_socket = args
        .admin_socket
        .or(file.admin_socket.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET));
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let segment_size = match (args.segment_size, &file.segment_size) {
        (Some(s), _) => s,
        (None, Some(s)) => redun_tracker::track::parse_size(s)
            .map_err(|e| anyhow::anyhow!("target.segment_size = {s:?}: {e}"))?,
        (None, None) => redun_target::store::SEAL_BYTES,
    };
    let store_url = args.store.or(file.store.clone());
    // Shippers connect only when the target keeps the replicas itself.
    let (target, listener) = match store_url {
        None => {
            let tls = TlsFiles::from_flags_or_config(
                "target",
                (args.tls_ca, file.tls_ca.clone()),
                (args.tls_cert, file.tls_cert.clone()),
                (args.tls_key, file.tls_key.clone()),
            )
            .map_err(anyhow::Error::msg)?
            .server_config()?;
            let listen = args
                .listen
                .or(file.listen.clone())
                .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
            let listener = TcpListener::bind(&listen).with_context(|| {
                format!("cannot listen on {listen} (choose another address with --listen)")
            })?;
            (Target::new(data_dir.clone(), tls), Some(listener))
        }
        Some(url) => {
            let b = redun_store::bucket::Bucket::open(&url, &bucket_opts)
                .with_context(|| format!("cannot open the bucket {url} (--store)"))?;
            let key_dir = args
                .key_dir
                .or(file.key_dir.clone())
                .unwrap_or_else(|| PathBuf::from(redun_store::crypt::DEFAULT_KEY_DIR));
            let cache = match (args.cache_size, &file.cache_size) {
                (Some(s), _) => s,
                (None, Some(s)) => redun_tracker::track::parse_size(s)
                    .map_err(|e| anyhow::anyhow!("target.cache_size = {s:?}: {e}"))?,
                (None, None) => redun_store::bucket::CACHE_BYTES as u64,
            };
            let cache = usize::try_from(cache).unwrap_or(usize::MAX);
            let bucket = BucketReplicas::new(b, key_dir, cache);
            (Target::on_bucket(data_dir.clone(), bucket), None)
        }
    };
    let local = match &listener {
        Some(l) => Some(l.local_addr()?.to_string()),
        None => None,
    };
    let nbd_listen = args
        .nbd_listen
        .or(file.nbd_listen)
        .unwrap_or_else(|| DEFAULT_NBD_LISTEN.to_string());
    let nbd_listener = if nbd_listen == "off" {
        None
    } else {
        let addr: ListenAddr = nbd_listen
            .parse()
            .map_err(|e| anyhow::anyhow!("--nbd-listen {nbd_listen}: {e}"))?;
        Some(Listener::bind(&addr).with_context(|| {
            format!("cannot serve NBD on {addr} (choose another address with --nbd-listen, or off)")
        })?)
    };
    let nbd_local = nbd_listener.as_ref().map(Listener::local_addr);
    let signals = service::block_stop_signals().context("blocking SIGTERM/SIGINT")?;
    let target = Arc::new(target.with_segment_size(segment_size));
    // Every replica is opened now: damage shows at start, and retention covers them all.
    // Test failovers do not survive a restart: their overlays are scratch.
    for v in target.status() {
        let scratch = data_dir.join(format!("{}.test.img", v.name));
        if scratch.exists() {
            info!(
                "volume={}: discarding the test failover overlay {} of before the restart",
                v.name,
                scratch.display()
            );
            let _ = std::fs::remove_file(&scratch);
        }
        match target.volume(&v.name) {
            Ok(Some(s)) => info!(
                "replica={}: {} recovery points, latest seq {}",
                v.name,
                s.points().len(),
                s.latest()
            ),
            Ok(None) => {}
            Err(e) => warn!("replica={}: {e}", v.name),
        }
        if let Err(e) = target.load_promotion(&v.name) {
            warn!(
                "volume={}: cannot serve the failed-over volume: {e}",
                v.name
            );
        }
    }
    let started = Instant::now();
    let exports = Arc::new(PointExports::new(target.clone()));
    let handler: JsonHandler = {
        let target = target.clone();
        let exports = exports.clone();
        let local = local.clone();
        let nbd_local = nbd_local.clone();
        Arc::new(move |req| match req.get("cmd").and_then(|c| c.as_str()) {
            Some("status") => Ok(serde_json::json!({
                "status": {
                    "daemon": "redun-target",
                    "version": env!("CARGO_PKG_VERSION"),
                    "pid": std::process::id(),
                    "uptime_seconds": started.elapsed().as_secs(),
                    "listen": local.as_slice(),
                    "store": target.bucket().map(|b| b.url()),
                    "nbd_listen": nbd_local,
                    "volumes": target.status(),
                }
            })),
            Some("points") => match req.get("group").and_then(|g| g.as_str()) {
                Some(group) => Ok(serde_json::json!({
                    "group": group,
                    "points": target.group_points(group),
                })),
                None => points(&target, req),
            },
            Some("test-failover-start") => {
                let volume = volume_arg(req)?;
                let point = req.get("point").and_then(serde_json::Value::as_u64);
                let o = target.start_test_failover(volume, point)?;
                Ok(serde_json::json!({ "test_failover": o.info(volume) }))
            }
            Some("failover") => {
                let volume = volume_arg(req)?;
                let choice = match req.get("point") {
                    None | Some(serde_json::Value::Null) => Choice::Latest,
                    Some(serde_json::Value::String(s)) if s == "latest" => Choice::Latest,
                    Some(v) => Choice::Point(v.as_u64().ok_or_else(|| {
                        format!("point {v} is neither a point id nor \"latest\"")
                    })?),
                };
                let in_use = exports.connections(volume) > 0;
                let p = target.failover(volume, choice, in_use)?;
                Ok(serde_json::json!({ "failover": p, "export": volume }))
            }
            Some("failback-fence") => {
                let volume = volume_arg(req)?;
                let p = target.fence_promoted(volume)?;
                Ok(serde_json::json!({ "failover": p, "export": volume }))
            }
            Some("failover-commit") => {
                let volume = volume_arg(req)?;
                let p = target.failover_commit(volume)?;
                Ok(serde_json::json!({ "failover": p, "export": volume }))
            }
            Some("test-failover-cleanup") => {
                let volume = volume_arg(req)?;
                let export = format!("{volume}@test");
                let n = exports.connections(&export);
                if n > 0 {
                    return Err(format!(
                        "{n} client(s) still use {export}: disconnect them first (umount, then \
                         nbd-client -d or stop nbdfuse), then clean up"
                    ));
                }
                let o = target.end_test_failover(volume)?;
                Ok(serde_json::json!({ "test_failover": o.info(volume) }))
            }
            _ => Err(format!(
                "Unknown request {req}: the target answers status, points, \
                 test-failover-start, test-failover-cleanup, failover, failover-commit and \
                 failback-fence \
                 (docs/PROTOCOL.md)"
            )),
        })
    };
    let _admin = AdminServer::bind_json(&admin_socket, handler)?;
    let _metrics = match args.metrics_listen.or(file.metrics.listen.clone()) {
        Some(addr) => {
            let target = target.clone();
            let render: redun_tracker::metrics::Render = Arc::new(move || metrics(&target));
            let m = redun_tracker::metrics::MetricsServer::bind(&addr, render)?;
            info!("metrics on http://{}/metrics", m.addr());
            Some(m)
        }
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let nbd = Server::new(Exports::dynamic(Box::new(exports.clone())));
    let nbd_thread = match nbd_listener {
        Some(l) => Some(nbd.spawn_listener(l)?),
        None => None,
    };
    let maintenance = {
        let target = target.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("retention".into())
            .spawn(move || maintain(&target, &retention, &stop))?
    };
    let server = match listener {
        Some(listener) => {
            let target = target.clone();
            let stop = stop.clone();
            Some(
                std::thread::Builder::new()
                    .name("repl-accept".into())
                    .spawn(move || target.serve(listener, &stop))?,
            )
        }
        None => None,
    };
    let nbd_on = nbd_local.as_deref().unwrap_or("off");
    let what = match (target.bucket(), &local) {
        (Some(b), _) => format!(
            "volumes in {} (shippers write there), overlays in {}, NBD on {nbd_on}",
            b.url(),
            data_dir.display()
        ),
        (None, l) => format!(
            "replicas in {}, NBD on {nbd_on}, shippers on {}",
            data_dir.display(),
            l.as_deref().unwrap_or("-")
        ),
    };
    service::ready("redun-target", &what);
    service::wait_stop(&signals, "redun-target").context("waiting for a signal")?;
    stop.store(true, Ordering::SeqCst);
    nbd.shutdown(Duration::from_secs(5));
    if let Some(t) = nbd_thread {
        let _ = t.join();
    }
    if let Some(s) = server {
        let _ = s.join();
    }
    let _ = maintenance.join();
    Ok(())
}

/// Applies the retention policy to every open store every few seconds, at a low priority.
fn maintain(target: &Target, retention: &Retention, stop: &AtomicBool) {
    yield_to_others();
    let mut last = Instant::now() - MAINTENANCE_EVERY;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
        if last.elapsed() < MAINTENANCE_EVERY {
            continue;
        }
        last = Instant::now();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        for store in target.open_stores() {
            if let Err(e) = store.maintain(retention, now_ms) {
                warn!("retention: {e}");
            }
        }
    }
}

const MAINTENANCE_EVERY: Duration = Duration::from_secs(2);

/// Lowers the calling thread's CPU priority (nice 10) and I/O priority (the lowest of the
/// best-effort class). Merging and compacting segments copies every replicated byte once
/// more; it is work that can wait, and it should not take the CPU or the disk from the
/// batches being applied or from an application sharing the machine.
fn yield_to_others() {
    use redun_tracker::sys;
    if let Err(e) = sys::set_thread_nice(10).and_then(|()| sys::set_thread_io_lowest()) {
        debug!("retention: cannot lower the maintenance thread's priority: {e}");
    }
}

/// The target's metrics (docs/OPERATIONS.md lists them).
fn metrics(target: &Target) -> String {
    use redun_tracker::metrics::{Scrape, volume};
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut m = Scrape::new();
    for v in target.status() {
        let l = || volume(&v.name);
        let g = |m: &mut Scrape, name, help, x: f64| m.gauge(name, help, l(), x);
        g(
            &mut m,
            "redun_replica_applied_seq",
            "Durable in the replica through this sequence number.",
            v.applied_seq as f64,
        );
        g(
            &mut m,
            "redun_replica_connected",
            "1 while a shipper is connected.",
            f64::from(u8::from(v.connected)),
        );
        g(
            &mut m,
            "redun_recovery_points",
            "Usable recovery points.",
            v.points as f64,
        );
        if let Some(p) = v.latest_point {
            g(
                &mut m,
                "redun_latest_point_age_seconds",
                "Age of the newest usable recovery point.",
                now_ms.saturating_sub(p.unix_ms) as f64 / 1000.0,
            );
        }
        g(
            &mut m,
            "redun_failed_over",
            "1 once the volume was failed over to this target.",
            f64::from(u8::from(v.failed_over.is_some())),
        );
        g(
            &mut m,
            "redun_test_failover",
            "1 while a test failover is under way.",
            f64::from(u8::from(v.test_failover.is_some())),
        );
        m.counter("redun_replica_batches", "Batches applied.", l(), v.batches);
        m.counter(
            "redun_replica_bytes_received",
            "Batch bytes received (compressed).",
            l(),
            v.bytes_received,
        );
        m.counter(
            "redun_replica_bytes_applied",
            "Record bytes applied.",
            l(),
            v.bytes_applied,
        );
    }
    m.render()
}

/// The request's `volume`, a valid name.
fn volume_arg(req: &serde_json::Value) -> Result<&str, String> {
    let name = req
        .get("volume")
        .and_then(|v| v.as_str())
        .ok_or_else(|| format!("{req} needs \"volume\": NAME"))?;
    redun_target::replica::check_name(name).map_err(|r| r.message)?;
    Ok(name)
}

/// `{"cmd":"points","volume":NAME}`: the volume's recovery points, oldest first.
fn points(target: &Target, req: &serde_json::Value) -> Result<serde_json::Value, String> {
    let name = volume_arg(req)?;
    let store = target
        .volume(name)?
        .ok_or_else(|| format!("this target holds no volume {name}"))?;
    let points: Vec<serde_json::Value> = store
        .points()
        .into_iter()
        .map(|(p, usable)| {
            serde_json::json!({
                "id": p.id,
                "unix_ms": p.unix_ms,
                "kind": p.kind,
                "usable": usable,
            })
        })
        .collect();
    Ok(serde_json::json!({ "volume": name, "latest_seq": store.latest(), "points": points }))
}
