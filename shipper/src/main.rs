//! `redun-shipper`: drains each volume's journal to the target over mutual TLS.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use log::{error, info, warn};
use redun_shipper::config::{ConfigFile, ResyncSection, ShipperSection};
use redun_shipper::heads::Heads;
use redun_shipper::ship::{Destination, ShipOptions, ShipStatus, VolumeShipper};
use redun_shipper::throttle::Throttle;
use redun_shipper::tls::TlsFiles;
use redun_tracker::admin::{AdminServer, JsonHandler};
use redun_tracker::service;
use redun_tracker::track::parse_size;

/// redun shipper: replicates journaled volumes to a target.
///
/// Every setting can also come from the `[shipper]` section of `--config FILE`; flags win.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML config file (its `[shipper]` section; docs/OPERATIONS.md).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The tracker's journal directory (NAME.journal per volume) [default: /var/lib/redun/journal].
    #[arg(long, value_name = "DIR")]
    journal_dir: Option<PathBuf>,
    /// The tracker's admin socket: its heads give the RPO and lag in status (shipping works
    /// without it) [default: /run/redun/tracker.sock].
    #[arg(long, value_name = "PATH")]
    tracker_socket: Option<PathBuf>,
    /// The target, HOST:PORT (port 9443 when left out).
    #[arg(long, value_name = "HOST:PORT")]
    target: Option<String>,
    /// Ship into a bucket instead of a target: s3://BUCKET/PREFIX, az://CONTAINER/PREFIX or
    /// file:///DIR (endpoint and credentials from the config file's [bucket] table, else the
    /// AWS_* or AZURE_* environment variables).
    #[arg(long, value_name = "URL")]
    target_store: Option<String>,
    /// Where the volumes' key files for --target-store are, NAME.key (`redun key new`)
    /// [default: /etc/redun/keys].
    #[arg(long, value_name = "DIR")]
    key_dir: Option<PathBuf>,
    /// With --target-store: upload a batch at the latest this long after its first record,
    /// e.g. 2s (the RPO's floor) [default: 2s].
    #[arg(long, value_name = "DURATION", value_parser = redun_tracker::config::parse_duration)]
    store_flush: Option<u64>,
    /// The name the target's certificate must carry [default: the HOST of --target].
    #[arg(long, value_name = "NAME")]
    target_name: Option<String>,
    /// The CA that signs the target's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// This shipper's certificate (PEM), signed by the CA the target trusts.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Ship only this volume (repeatable) [default: every journal in --journal-dir].
    #[arg(long = "volume", value_name = "NAME")]
    volumes: Vec<String>,
    /// Admin socket path [default: /run/redun/shipper.sock].
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// zstd level for batches, 1-19 [default: 3].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=19))]
    compression_level: Option<i32>,
    /// Largest batch of records, e.g. 4M [default: 4M].
    #[arg(long, value_name = "SIZE")]
    batch_size: Option<String>,
    /// The replication relationship's generation (bumped by a failover) [default: 1].
    #[arg(long, value_name = "N")]
    generation: Option<u64>,
    /// The unit of the retry schedule (1, 2, 4, 8, 10, then every 30 units), in milliseconds
    /// [default: 1000].
    #[arg(long, value_name = "MS")]
    retry_unit_ms: Option<u64>,
    /// Bytes on the wire per second for all volumes together, e.g. 50MiB/s, or unlimited
    /// (outside the config file's bandwidth_schedule windows) [default: unlimited].
    #[arg(long, value_name = "RATE")]
    bandwidth_limit: Option<String>,
    /// Automatic resyncs (after an overflow or an unclean stop) wait for this window of local
    /// time, e.g. 22:00-06:00; initial replications and `redun resync` do not [default:
    /// any time].
    #[arg(long, value_name = "HH:MM-HH:MM")]
    resync_window: Option<String>,
    /// The block synchronisations compare and send, a power of two from 4K to 4M (blocks that
    /// differ are compared again in 4K blocks) [default: 64K].
    #[arg(long, value_name = "SIZE")]
    sync_block_size: Option<String>,
    /// Warn (status, metric, log) when a volume's RPO exceeds this, e.g. 30s [default: off].
    #[arg(long, value_name = "DURATION", value_parser = redun_tracker::config::parse_duration)]
    rpo_warning: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9751) [default: off].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{}", redun_tracker::service::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Adds the default port to a target without one.
fn with_port(target: &str) -> String {
    if redun_shipper::tls::has_port(target) {
        target.to_string()
    } else {
        format!("{target}:{}", redun_shipper::proto::DEFAULT_PORT)
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let (file, resync, bucket_opts, retention, cfg_path) = match &args.config {
        Some(p) => {
            let f = ConfigFile::load(p)?;
            (f.shipper, f.resync, f.bucket, f.retention, p.clone())
        }
        None => (
            ShipperSection::default(),
            ResyncSection::default(),
            redun_store::bucket::BucketOptions::default(),
            redun_store::retention::RetentionSection::default(),
            PathBuf::from("(no config file)"),
        ),
    };
    let missing = |flag: &str, key: &str| {
        anyhow::anyhow!(
            "{flag} is required (or shipper.{key} in the config file given with --config)"
        )
    };
    let level = args
        .compression_level
        .or(file.compression_level)
        .unwrap_or(3);
    if !(1..=19).contains(&level) {
        anyhow::bail!(
            "config {}: shipper.compression_level = {level}: use 1 to 19",
            cfg_path.display()
        );
    }
    let store_url = args.target_store.or(file.target_store.clone());
    let target_addr = args.target.or(file.target.clone());
    let (dest, target) = match (store_url, target_addr) {
        (Some(url), Some(t)) => anyhow::bail!(
            "give a target ({t}) or a bucket ({url}), not both (--target, --target-store, or \
             shipper.target and shipper.target_store in the config file)"
        ),
        (Some(url), None) => {
            let flush = match (args.store_flush, &file.store_flush) {
                (Some(ms), _) => ms,
                (None, Some(v)) => redun_tracker::config::parse_duration(v).map_err(|e| {
                    anyhow::anyhow!(
                        "config {}: shipper.store_flush = {v:?}: {e}",
                        cfg_path.display()
                    )
                })?,
                (None, None) => 2000,
            };
            let bucket = redun_store::bucket::Bucket::open(&url, &bucket_opts)?;
            let bad = |key: &str, v: &str, e: String| {
                anyhow::anyhow!("config {}: shipper.{key} = {v:?}: {e}", cfg_path.display())
            };
            let mut gc = redun_store::bucket::Gc {
                retention: retention.policy(&cfg_path)?,
                level,
                ..Default::default()
            };
            if let Some(v) = &file.store_merge {
                gc.merge_bytes = redun_tracker::track::parse_size(v)
                    .map_err(|e| bad("store_merge", v, e.to_string()))?;
            }
            if let Some(v) = &file.store_grace {
                gc.grace_ms = redun_tracker::config::parse_duration(v)
                    .map_err(|e| bad("store_grace", v, e))?;
            }
            let st = redun_shipper::to_bucket::StoreTarget {
                bucket: Arc::new(bucket),
                key_dir: args
                    .key_dir
                    .or(file.key_dir.clone())
                    .unwrap_or_else(|| PathBuf::from(redun_store::crypt::DEFAULT_KEY_DIR)),
                segment_bytes: 8 << 20,
                uploads: 4,
                flush_after: Duration::from_millis(flush.max(1)),
                gc,
            };
            (Destination::Bucket(Arc::new(st)), url)
        }
        (None, t) => {
            let tls = TlsFiles::from_flags_or_config(
                "shipper",
                (args.tls_ca, file.tls_ca.clone()),
                (args.tls_cert, file.tls_cert.clone()),
                (args.tls_key, file.tls_key.clone()),
            )
            .map_err(anyhow::Error::msg)?
            .client_config()?;
            let t = t.ok_or_else(|| missing("--target (or --target-store)", "target"))?;
            (Destination::Target(tls), with_port(&t))
        }
    };
    let batch_size = match args.batch_size.or(file.batch_size.clone()) {
        Some(v) => parse_size(&v).map_err(|e| anyhow::anyhow!("batch size: {e}"))?,
        None => 4 << 20,
    };
    let schedule = file.schedule(&cfg_path, args.bandwidth_limit.as_deref())?;
    let resync_window = resync.window(&cfg_path, args.resync_window.as_deref())?;
    let sync_block = resync.block_size(&cfg_path, args.sync_block_size.as_deref())?;
    let verify_every = resync.verify_every(&cfg_path)?;
    let opts = ShipOptions {
        server_name: args
            .target_name
            .or(file.target_name.clone())
            .unwrap_or_else(|| redun_shipper::tls::host_of(&target)),
        target,
        dest,
        batch_bytes: usize::try_from(batch_size).unwrap_or(usize::MAX).max(4096),
        level,
        generation: args.generation.or(file.generation).unwrap_or(1),
        retry_unit: Duration::from_millis(
            args.retry_unit_ms
                .or(file.retry_unit_ms)
                .unwrap_or(1000)
                .max(1),
        ),
        throttle: Arc::new(Throttle::new(schedule)),
        resync_window,
        sync_block,
        verify_every,
    };
    let journal_dir = args
        .journal_dir
        .or(file.journal_dir.clone())
        .unwrap_or_else(|| PathBuf::from("/var/lib/redun/journal"));
    let tracker_socket = args
        .tracker_socket
        .or(file.tracker_socket.clone())
        .unwrap_or_else(|| PathBuf::from("/run/redun/tracker.sock"));
    let admin_socket = args
        .admin_socket
        .or(file.admin_socket.clone())
        .unwrap_or_else(|| PathBuf::from("/run/redun/shipper.sock"));
    let wanted = if args.volumes.is_empty() {
        file.volumes.clone().unwrap_or_default()
    } else {
        args.volumes.clone()
    };
    if !journal_dir.is_dir() {
        anyhow::bail!(
            "journal directory {} does not exist (give the tracker's --journal-dir)",
            journal_dir.display()
        );
    }
    let rpo_warning = match (args.rpo_warning, &file.rpo_warning) {
        (Some(ms), _) => Some(ms),
        (None, Some(v)) => Some(redun_tracker::config::parse_duration(v).map_err(|e| {
            anyhow::anyhow!(
                "config {}: shipper.rpo_warning = {v:?}: {e}",
                cfg_path.display()
            )
        })?),
        (None, None) => None,
    }
    .map(|ms| Duration::from_millis(ms).as_secs_f64());
    file.metrics
        .validate("shipper")
        .map_err(|e| anyhow::anyhow!("config {}: {e}", cfg_path.display()))?;
    let metrics_listen = args.metrics_listen.or(file.metrics.listen.clone());
    let signals = service::block_stop_signals().context("blocking SIGTERM/SIGINT")?;
    let stop = Arc::new(AtomicBool::new(false));
    let shippers: Arc<Mutex<HashMap<String, Arc<VolumeShipper>>>> = Arc::default();
    let started = Instant::now();
    let statuses = {
        let shippers = shippers.clone();
        move || volume_statuses(&shippers, rpo_warning)
    };
    let handler: JsonHandler = {
        let shippers = shippers.clone();
        let target = opts.target.clone();
        let statuses = statuses.clone();
        let (tracker, stop) = (tracker_socket.clone(), stop.clone());
        Arc::new(move |line| {
            let ctx = AdminContext {
                shippers: &shippers,
                statuses: &statuses,
                target: &target,
                tracker: &tracker,
                stop: &stop,
                started,
            };
            admin(line, &ctx)
        })
    };
    let _metrics = match &metrics_listen {
        Some(addr) => {
            let statuses = statuses.clone();
            let render: redun_tracker::metrics::Render = Arc::new(move || metrics(&statuses()));
            let m = redun_tracker::metrics::MetricsServer::bind(addr, render)?;
            info!("metrics on http://{}/metrics", m.addr());
            Some(m)
        }
        None => None,
    };
    let target_shown = opts.target.clone();
    let _admin = AdminServer::bind_json(&admin_socket, handler)?;
    let threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>> = Arc::default();
    if let Some(limit) = rpo_warning {
        let (statuses, stop) = (statuses.clone(), stop.clone());
        let t = std::thread::Builder::new()
            .name("rpo-watch".into())
            .spawn(move || watch_rpo(&statuses, limit, &stop))?;
        threads.lock().unwrap().push(t);
    }
    let heads = Arc::new(Heads::new(tracker_socket));
    {
        let (heads, stop) = (heads.clone(), stop.clone());
        let t = std::thread::Builder::new()
            .name("heads".into())
            .spawn(move || heads.run(&stop))?;
        threads.lock().unwrap().push(t);
    }
    let discover = {
        let (stop, shippers, threads) = (stop.clone(), shippers.clone(), threads.clone());
        let heads = heads.clone();
        let dir = journal_dir.clone();
        std::thread::Builder::new()
            .name("discover".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    for name in journals(&dir, &wanted) {
                        let mut map = shippers.lock().unwrap();
                        if map.contains_key(&name) {
                            continue;
                        }
                        let path = dir.join(format!("{name}.journal"));
                        let vs = Arc::new(
                            VolumeShipper::new(name.clone(), path, opts.clone())
                                .with_heads(heads.clone()),
                        );
                        map.insert(name.clone(), vs.clone());
                        let stop = stop.clone();
                        match std::thread::Builder::new()
                            .name(format!("ship-{name}"))
                            .spawn(move || vs.run(&stop))
                        {
                            Ok(t) => threads.lock().unwrap().push(t),
                            Err(e) => warn!("volume={name}: cannot start its shipper: {e}"),
                        }
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            })?
    };
    service::ready(
        "redun-shipper",
        &format!(
            "journals in {}, target {target_shown}",
            journal_dir.display()
        ),
    );
    service::wait_stop(&signals, "redun-shipper").context("waiting for a signal")?;
    stop.store(true, Ordering::SeqCst);
    let _ = discover.join();
    for t in std::mem::take(&mut *threads.lock().unwrap()) {
        let _ = t.join();
    }
    Ok(())
}

/// The volumes to ship: `wanted`, or every `NAME.journal` in `dir`.
fn journals(dir: &std::path::Path, wanted: &[String]) -> Vec<String> {
    if !wanted.is_empty() {
        return wanted.to_vec();
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            n.strip_suffix(".journal").map(str::to_string)
        })
        .collect();
    v.sort();
    v
}

/// Every volume's figures, with the RPO warning applied.
fn volume_statuses(
    shippers: &Mutex<HashMap<String, Arc<VolumeShipper>>>,
    rpo_warning: Option<f64>,
) -> Vec<ShipStatus> {
    let mut vols: Vec<ShipStatus> = shippers
        .lock()
        .unwrap()
        .values()
        .map(|s| s.status())
        .collect();
    vols.sort_by(|a, b| a.name.cmp(&b.name));
    for v in &mut vols {
        v.rpo_warning = rpo_warning.is_some_and(|limit| v.rpo_seconds > limit);
    }
    vols
}

/// Logs each volume's RPO crossing `limit` (seconds), once per crossing.
fn watch_rpo(statuses: &dyn Fn() -> Vec<ShipStatus>, limit: f64, stop: &AtomicBool) {
    let mut over = std::collections::HashSet::new();
    while !stop.load(Ordering::SeqCst) {
        for v in statuses() {
            if v.rpo_warning && over.insert(v.name.clone()) {
                warn!(
                    "volume={}: RPO {:.1}s exceeds shipper.rpo_warning ({limit}s); state={:?} \
                     lag_bytes={}",
                    v.name, v.rpo_seconds, v.state, v.lag_bytes
                );
            } else if !v.rpo_warning && over.remove(&v.name) {
                info!(
                    "volume={}: RPO {:.1}s is back within shipper.rpo_warning ({limit}s)",
                    v.name, v.rpo_seconds
                );
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The shipper's metrics (docs/OPERATIONS.md lists them).
fn metrics(vols: &[ShipStatus]) -> String {
    use redun_tracker::metrics::{Scrape, volume};
    let mut m = Scrape::new();
    for v in vols {
        let l = || volume(&v.name);
        m.gauge(
            "redun_rpo_seconds",
            "Age of the oldest change not yet durable on the target.",
            l(),
            v.rpo_seconds,
        );
        m.gauge(
            "redun_rpo_warning",
            "1 while the RPO exceeds shipper.rpo_warning.",
            l(),
            f64::from(u8::from(v.rpo_warning)),
        );
        m.gauge(
            "redun_lag_bytes",
            "Journal bytes not yet durable on the target.",
            l(),
            v.lag_bytes as f64,
        );
        m.gauge(
            "redun_acked_seq",
            "Durable on the target through this sequence number.",
            l(),
            v.acked_seq as f64,
        );
        m.gauge(
            "redun_throughput_bytes_per_second",
            "Record bytes acknowledged per second.",
            l(),
            v.throughput_bytes_per_second,
        );
        m.counter(
            "redun_bytes_shipped",
            "Record bytes shipped.",
            l(),
            v.bytes_shipped,
        );
        m.counter(
            "redun_bytes_on_wire",
            "Bytes on the wire for them (compressed).",
            l(),
            v.bytes_sent,
        );
        m.counter("redun_batches", "Batches shipped.", l(), v.batches);
        m.counter(
            "redun_sync_bytes_sent",
            "Block bytes synchronisation jobs sent (uncompressed).",
            l(),
            v.sync_bytes_sent,
        );
        let job = v.sync.as_ref();
        m.gauge(
            "redun_sync_running",
            "1 while a synchronisation (initial replication, resync) runs.",
            l(),
            f64::from(u8::from(job.is_some())),
        );
        m.gauge(
            "redun_sync_total_bytes",
            "Bytes the running synchronisation covers (0 when none runs).",
            l(),
            job.map_or(0.0, |j| j.total_bytes as f64),
        );
        m.gauge(
            "redun_sync_compared_bytes",
            "Bytes the running synchronisation compared so far.",
            l(),
            job.map_or(0.0, |j| j.compared_bytes as f64),
        );
        m.gauge(
            "redun_sync_progress_ratio",
            "Share of the running synchronisation done, 0 to 1.",
            l(),
            job.map_or(0.0, |j| j.percent / 100.0),
        );
        m.gauge(
            "redun_verify_differing_bytes",
            "Bytes the last online verify found different from the source.",
            l(),
            v.verify
                .as_ref()
                .map_or(0.0, |r| r.differing.iter().map(|d| d.1).sum::<u64>() as f64),
        );
        m.counter(
            "redun_retries",
            "Connection attempts that failed and were retried.",
            l(),
            v.retries,
        );
        let current = serde_json::to_value(v.state)
            .ok()
            .and_then(|s| s.as_str().map(String::from))
            .unwrap_or_default();
        m.state(
            "redun_ship_state",
            "1 for the volume's shipping state.",
            &l(),
            &["connecting", "shipping", "retrying", "critical"],
            &current,
        );
    }
    m.render()
}

/// The shipper of the volume that request `cmd` names.
fn shipper_for(
    req: &serde_json::Value,
    cmd: &str,
    shippers: &Mutex<HashMap<String, Arc<VolumeShipper>>>,
) -> Result<Arc<VolumeShipper>, String> {
    let Some(name) = req.get("volume").and_then(|v| v.as_str()) else {
        return Err(format!(
            "{cmd} needs a volume: {{\"cmd\":\"{cmd}\",\"volume\":\"NAME\"}}"
        ));
    };
    shippers
        .lock()
        .unwrap()
        .get(name)
        .cloned()
        .ok_or_else(|| format!("No volume {name:?} is shipped here"))
}

/// A request's boolean `key` (false when absent).
fn flag(req: &serde_json::Value, key: &str) -> bool {
    req.get(key)
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false)
}

/// `{"cmd":"reverse","volume":"NAME","full":false}`: starts the failback of a volume that
/// was failed over to the target (docs/PROTOCOL.md, "Failback").
fn reverse(
    req: &serde_json::Value,
    shippers: &Mutex<HashMap<String, Arc<VolumeShipper>>>,
    tracker: &std::path::Path,
    stop: &Arc<AtomicBool>,
) -> Result<serde_json::Value, String> {
    let vs = shipper_for(req, "reverse", shippers)?;
    let (name, full) = (vs.name.clone(), flag(req, "full"));
    if !vs.begin_reverse() {
        return Err(format!("volume {name}: a failback is under way already"));
    }
    info!("volume={name}: failback begins (full: {full})");
    let (tracker, stop) = (tracker.to_path_buf(), stop.clone());
    let t = vs.clone();
    std::thread::Builder::new()
        .name(format!("reverse-{name}"))
        .spawn(move || {
            t.run_reverse(&tracker, full, &stop);
            t.end_reverse();
        })
        .map_err(|e| {
            vs.end_reverse();
            format!("volume {name}: cannot start the failback: {e}")
        })?;
    Ok(serde_json::json!({}))
}

/// What the admin requests work on.
struct AdminContext<'a> {
    shippers: &'a Mutex<HashMap<String, Arc<VolumeShipper>>>,
    /// Every volume's status, computed when a request needs it.
    statuses: &'a dyn Fn() -> Vec<ShipStatus>,
    target: &'a str,
    tracker: &'a std::path::Path,
    stop: &'a Arc<AtomicBool>,
    started: Instant,
}

fn admin(req: &serde_json::Value, ctx: &AdminContext<'_>) -> Result<serde_json::Value, String> {
    let AdminContext {
        shippers,
        statuses,
        target,
        tracker,
        stop,
        started,
    } = *ctx;
    match req.get("cmd").and_then(|c| c.as_str()) {
        Some("reverse") => reverse(req, shippers, tracker, stop),
        Some("status") => Ok(serde_json::json!({
            "status": {
                "daemon": "redun-shipper",
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "uptime_seconds": started.elapsed().as_secs(),
                "target": target,
                "volumes": statuses(),
            }
        })),
        Some("resume") => {
            shipper_for(req, "resume", shippers)?.resume();
            Ok(serde_json::json!({}))
        }
        Some("resync") => {
            let s = shipper_for(req, "resync", shippers)?;
            s.request_resync(flag(req, "full"))?;
            s.resume();
            Ok(serde_json::json!({}))
        }
        Some("verify") => {
            let s = shipper_for(req, "verify", shippers)?;
            let id = s.request_verify()?;
            s.resume();
            Ok(serde_json::json!({ "verify": id }))
        }
        _ => Err(format!(
            "Unknown request {req}: the shipper answers status, resume, resync, verify and \
             reverse (docs/PROTOCOL.md, \"Admin socket\")"
        )),
    }
}
