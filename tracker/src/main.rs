//! `redun-tracker`: serves each protected volume over NBD.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use log::{error, info, warn};

use redun_tracker::admin::{
    AdminRequest, AdminResponse, AdminServer, PlacedPoint, TrackerStatus, VolumeStatus,
};
use redun_tracker::config::{self, ConfigFile};
use redun_tracker::group::GroupHooks;
use redun_tracker::hooks::Hooks;
use redun_tracker::io::{Engine, EngineChoice, FileBackend};
use redun_tracker::journal::format::PointKind;
use redun_tracker::nbd::{Export, Exports, Listener, Server};
use redun_tracker::track::volume::VolumeBackend;
use redun_tracker::track::{ChangeLog, OnFull, TrackState};

/// How long a stop waits for connections to finish their in-flight requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// redun tracker: serves protected volumes over NBD and (soon) records every write.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Serve PATH (regular file or block device) as export NAME; repeatable.
    #[arg(long = "volume", value_name = "NAME=PATH", value_parser = config::parse_volume_flag)]
    volumes: Vec<config::VolumeEntry>,
    /// Listen on HOST:PORT or unix:/path; repeatable [default: 127.0.0.1:10809].
    #[arg(long = "listen", value_name = "ADDR")]
    listen: Vec<String>,
    /// Admin socket path [default: /run/redun/tracker.sock].
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// I/O engine: uring, sync, or auto (uring when the kernel allows it) [default: auto].
    #[arg(long, value_name = "ENGINE")]
    backend: Option<EngineChoice>,
    /// TOML config file with the same settings ([tracker] and [[volume]] sections).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Journal every change of each volume in DIR/NAME.journal [default: /var/lib/redun/journal].
    #[arg(long, value_name = "DIR")]
    journal_dir: Option<PathBuf>,
    /// Size of each journal (created preallocated), e.g. 4G [default: 4G].
    #[arg(long, value_name = "SIZE", value_parser = redun_tracker::track::parse_size)]
    journal_size: Option<u64>,
    /// What a full journal does: bitmap (writes go on, dirty regions, resync) or block
    /// (writes wait for the shipper to release space) [default: bitmap].
    #[arg(long, value_name = "bitmap|block")]
    journal_on_full: Option<OnFull>,
    /// Percentage of the journal that may be unreleased before it counts as full [default: 100].
    #[arg(long, value_name = "1-100", value_parser = clap::value_parser!(u8).range(1..=100))]
    journal_full_percent: Option<u8>,
    /// Dirty-region size of new region maps (power of two, 4K to 4M) [default: 64K].
    #[arg(long, value_name = "SIZE", value_parser = parse_region)]
    region_size: Option<u64>,
    /// Do not journal (benchmarks only): changes are not tracked.
    #[arg(long)]
    no_journal: bool,
    /// Place a crash-consistent recovery point in each written volume's journal this often,
    /// e.g. 5s or 1s; 0 places points only on demand [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = config::parse_duration)]
    crash_interval: Option<u64>,
    /// The command that freezes volume NAME's application for an app-consistent point (run
    /// with `sh -c`), e.g. "db=fsfreeze -f /mnt/db"; repeatable.
    #[arg(long, value_name = "NAME=CMD")]
    pre_hook: Vec<String>,
    /// The command that thaws it again (runs even when the freeze or the point failed).
    #[arg(long, value_name = "NAME=CMD")]
    post_hook: Vec<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9750) [default: off].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
}

fn parse_region(s: &str) -> Result<u64, String> {
    redun_tracker::track::parse_size(s).and_then(redun_tracker::track::check_region)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            let line = redun_tracker::service::error_line(&e);
            error!("{line}");
            eprintln!("redun-tracker: {line}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let file = match &args.config {
        Some(p) => ConfigFile::load(p)?,
        None => ConfigFile::default(),
    };
    let journal = config::JournalFlags {
        dir: args.journal_dir,
        size: args.journal_size,
        on_full: args.journal_on_full,
        full_percent: args.journal_full_percent,
        region_size: args.region_size,
        disabled: args.no_journal,
    };
    let mut cfg = config::merge(
        file,
        args.volumes,
        args.listen,
        args.admin_socket,
        args.backend,
        journal,
    )?;
    if let Some(ms) = args.crash_interval {
        cfg.crash_interval_ms = ms;
    }
    for (flag, list, pre) in [
        ("--pre-hook", &args.pre_hook, true),
        ("--post-hook", &args.post_hook, false),
    ] {
        for h in list {
            let (name, cmd) = h.split_once('=').ok_or_else(|| {
                anyhow::anyhow!("{flag} {h:?}: expected NAME=CMD, e.g. db=\"fsfreeze -f /mnt/db\"")
            })?;
            let v = cfg
                .volumes
                .iter_mut()
                .find(|v| v.name == name)
                .ok_or_else(|| anyhow::anyhow!("{flag} {h:?}: there is no volume {name:?}"))?;
            if pre {
                v.pre_hook = Some(cmd.to_string());
            } else {
                v.post_hook = Some(cmd.to_string());
            }
        }
    }
    config::check_journal_space(&cfg).map_err(|e| anyhow::anyhow!(e))?;
    let engine = Engine::resolve(cfg.backend)?;

    let mut list = Vec::new();
    for v in &cfg.volumes {
        let b =
            FileBackend::open(&v.path, engine).with_context(|| format!("volume {:?}", v.name))?;
        let b = match &cfg.journal_dir {
            Some(dir) => {
                let log = ChangeLog::open_or_create(
                    dir,
                    &v.name,
                    b.shared_file(),
                    &cfg.log_options(&v.name),
                    &|| b.data_ranges(),
                )
                .with_context(|| format!("volume {:?}", v.name))?;
                VolumeBackend::tracked(b, Arc::new(log))
            }
            None => {
                warn!(
                    "volume={}: changes are not tracked (--no-journal): the replica cannot follow",
                    v.name
                );
                VolumeBackend::untracked(b)
            }
        };
        info!(
            "volume={} path={} size={} engine={}",
            v.name,
            v.path.display(),
            redun_tracker::nbd::BlockBackend::size(&b),
            engine.name()
        );
        list.push((v.name.clone(), b));
    }
    let server = Server::new(Exports::new(list));

    // Before any thread exists, so that every thread inherits the mask.
    let signals =
        redun_tracker::service::block_stop_signals().context("blocking SIGTERM/SIGINT")?;

    let mut listen_names = Vec::new();
    let mut accept_threads = Vec::new();
    for addr in &cfg.listen {
        let l = Listener::bind(addr).with_context(|| {
            format!(
                "cannot listen on {addr} (is another server using it? choose another with --listen)"
            )
        })?;
        listen_names.push(l.local_addr());
        accept_threads.push(server.spawn_listener(l)?);
    }

    let hooks: Arc<HashMap<String, Hooks>> = Arc::new(
        cfg.volumes
            .iter()
            .map(|v| {
                let h = Hooks {
                    pre: v.pre_hook.clone(),
                    post: v.post_hook.clone(),
                    timeout: Duration::from_millis(cfg.hook_timeout_ms),
                };
                (v.name.clone(), h)
            })
            .collect(),
    );
    let group = match &cfg.group {
        Some(g) => {
            let volumes =
                server
                    .exports()
                    .iter()
                    .filter(|e| g.includes(&e.name))
                    .map(|e| {
                        e.backend.log().cloned().map(|l| (e.name.clone(), l)).ok_or_else(|| {
                        anyhow::anyhow!(
                            "group {}: volume {} is not journaled (--no-journal), so it cannot \
                             take part in group points",
                            g.name,
                            e.name
                        )
                    })
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
            let group_hooks = GroupHooks::new(
                volumes
                    .iter()
                    .filter_map(|(name, _)| Some((name.clone(), hooks.get(name)?.clone())))
                    .collect(),
            );
            Some(redun_tracker::group::Group::start(
                g.clone(),
                volumes,
                group_hooks,
                Duration::from_millis(cfg.hook_timeout_ms),
            )?)
        }
        None => None,
    };

    let hooks_for_admin = hooks.clone();
    let started = Instant::now();
    let status_server = server.clone();
    let listen_for_status = listen_names.clone();
    let group_for_admin = group.clone();
    let handler = Arc::new(move |req: AdminRequest| match req {
        AdminRequest::Status => AdminResponse {
            status: Some(status(
                &status_server,
                &listen_for_status,
                started,
                group_for_admin.as_deref(),
            )),
            ..AdminResponse::ok()
        },
        AdminRequest::GroupPoint { kind, fence, group } => match &group_for_admin {
            None => AdminResponse::error(
                "this tracker is in no consistency group (configure [group] in the config file)",
            ),
            Some(g) if group.as_deref().is_some_and(|n| n != g.name()) => {
                AdminResponse::error(format!(
                    "this tracker is a member of group {}, not {}: run this on a member of \
                     that group (--tracker-socket)",
                    g.name(),
                    group.unwrap_or_default()
                ))
            }
            Some(g) => {
                let r = g.round_now(kind, fence);
                if r.committed {
                    info!(
                        "group={} point={} committed on demand volumes={} in {}us",
                        g.name(),
                        r.point,
                        r.volumes.len(),
                        r.elapsed.as_micros()
                    );
                    AdminResponse {
                        group_point: Some(r.point),
                        ..AdminResponse::ok()
                    }
                } else {
                    AdminResponse::error(format!(
                        "group point {} aborted: {} (redun status shows the members)",
                        r.point, r.error
                    ))
                }
            }
        },
        AdminRequest::Point { volume, kind } => {
            place_point(&status_server, &volume, kind, &hooks_for_admin)
        }
        AdminRequest::Fence { volume } => fence(&status_server, &volume, true),
        AdminRequest::Unfence { volume } => fence(&status_server, &volume, false),
        AdminRequest::FailbackApply { volume } => on_tracked(&status_server, &volume, |_, log| {
            let (seq, bytes) = log.apply_failback()?;
            log::debug!("volume {volume}: failback applied {bytes} bytes through seq {seq}");
            Ok(AdminResponse {
                seq: Some(seq),
                ..AdminResponse::ok()
            })
        }),
        AdminRequest::SyncBegin { volume, full } => {
            on_tracked(&status_server, &volume, |e, log| {
                let mut job = log.sync_begin(full)?;
                job.path = e.backend.backing().path().display().to_string();
                info!(
                    "volume={volume}: synchronisation {} of {} bytes begins at seq {}",
                    job.job,
                    job.ranges.iter().map(|r| r.1).sum::<u64>(),
                    job.begin_seq
                );
                Ok(AdminResponse {
                    sync: Some(job),
                    ..AdminResponse::ok()
                })
            })
        }
        AdminRequest::SyncRecord {
            volume,
            job,
            role,
            offset,
            length,
        } => on_tracked(&status_server, &volume, |_, log| {
            let seq = log.sync_record(job, role, offset, length)?;
            Ok(AdminResponse {
                seq: Some(seq),
                ..AdminResponse::ok()
            })
        }),
        AdminRequest::Head { volume } => on_tracked(&status_server, &volume, |_, log| {
            Ok(AdminResponse {
                seq: Some(log.head()?),
                ..AdminResponse::ok()
            })
        }),
        AdminRequest::SyncDone { volume, job } => on_tracked(&status_server, &volume, |_, log| {
            let left = log.sync_done(job)?;
            info!("volume={volume}: synchronisation {job} done; {left} dirty bytes left");
            Ok(AdminResponse {
                dirty_bytes: Some(left),
                ..AdminResponse::ok()
            })
        }),
    });
    let points_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let points_thread = (cfg.crash_interval_ms > 0)
        .then(|| {
            let server = server.clone();
            let stop = points_stop.clone();
            let every = Duration::from_millis(cfg.crash_interval_ms);
            std::thread::Builder::new()
                .name("points".into())
                .spawn(move || crash_points(&server, every, &stop))
        })
        .transpose()?;
    let app_thread = (cfg.app_interval_ms > 0)
        .then(|| {
            let server = server.clone();
            let stop = points_stop.clone();
            let every = Duration::from_millis(cfg.app_interval_ms);
            let hooks = hooks.clone();
            std::thread::Builder::new()
                .name("app-points".into())
                .spawn(move || app_points(&server, &hooks, every, &stop))
        })
        .transpose()?;
    let admin = AdminServer::bind(&cfg.admin_socket, handler)?;
    let metrics_listen = args.metrics_listen.or(cfg.metrics_listen.clone());
    let _metrics = match &metrics_listen {
        Some(addr) => {
            let server = server.clone();
            let listen = listen_names.clone();
            let group = group.clone();
            let render: redun_tracker::metrics::Render =
                Arc::new(move || metrics(&status(&server, &listen, started, group.as_deref())));
            let m = redun_tracker::metrics::MetricsServer::bind(addr, render)?;
            info!("metrics on http://{}/metrics", m.addr());
            Some(m)
        }
        None => None,
    };
    let ready = format!(
        "{} volume(s), listening on {}",
        cfg.volumes.len(),
        listen_names.join(", ")
    );
    redun_tracker::service::ready("redun-tracker", &ready);

    redun_tracker::service::wait_stop(&signals, "redun-tracker").context("waiting for a signal")?;
    info!("finishing in-flight requests");
    for e in server.exports().iter() {
        if let Some(log) = e.backend.log() {
            // Writes held by a full journal would wait for a shipper past the grace period.
            log.stop_waiting();
        }
    }
    points_stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in [points_thread, app_thread].into_iter().flatten() {
        let _ = t.join();
    }
    if let Some(g) = &group {
        // Before the connections finish: held replies are released.
        g.stop();
    }
    let clean = server.shutdown(SHUTDOWN_GRACE);
    for t in accept_threads {
        let _ = t.join();
    }
    drop(admin);
    for e in server.exports().iter() {
        if let Some(log) = e.backend.log() {
            log.close();
        }
    }
    if clean {
        info!("redun-tracker stopped");
        Ok(ExitCode::SUCCESS)
    } else {
        warn!("redun-tracker stopped with connections still busy after {SHUTDOWN_GRACE:?}");
        Ok(ExitCode::from(1))
    }
}

/// The export and change log of `volume`, or why there is none.
fn tracked<'a>(
    server: &'a Server<VolumeBackend>,
    volume: &str,
) -> Result<(&'a Arc<Export<VolumeBackend>>, &'a Arc<ChangeLog>), String> {
    let Some(e) = server.exports().iter().find(|e| e.name == volume) else {
        return Err(format!(
            "no volume named {volume:?} on this tracker (redun status lists them)"
        ));
    };
    let Some(log) = e.backend.log() else {
        return Err(format!(
            "volume {volume}: changes are not journaled (--no-journal), so it has no recovery \
             points and cannot fail over"
        ));
    };
    Ok((e, log))
}

/// Places a recovery point in `volume`'s journal.
fn place_point(
    server: &Server<VolumeBackend>,
    volume: &str,
    kind: PointKind,
    hooks: &HashMap<String, Hooks>,
) -> AdminResponse {
    let (_, log) = match tracked(server, volume) {
        Ok(t) => t,
        Err(e) => return AdminResponse::error(e),
    };
    let placed = match kind {
        PointKind::Crash => log
            .mark(kind, false)
            .map_err(|e| format!("volume {volume}: {e}"))
            .and_then(|id| id.ok_or_else(|| format!("volume {volume}: no point placed"))),
        PointKind::App => {
            let h = hooks.get(volume).cloned().unwrap_or_default();
            redun_tracker::hooks::app_point(log, volume, &h)
        }
    };
    match placed {
        Ok(id) => {
            info!(
                "volume={volume}: {} recovery point {id} placed",
                kind.name()
            );
            AdminResponse::placed(PlacedPoint {
                volume: volume.to_string(),
                id,
                kind,
            })
        }
        Err(err) => AdminResponse::error(err),
    }
}

/// Runs `f` on a tracked volume; errors name the volume.
fn on_tracked(
    server: &Server<VolumeBackend>,
    volume: &str,
    f: impl FnOnce(&Export<VolumeBackend>, &ChangeLog) -> std::io::Result<AdminResponse>,
) -> AdminResponse {
    match tracked(server, volume) {
        Ok((e, log)) => {
            f(e, log).unwrap_or_else(|e| AdminResponse::error(format!("volume {volume}: {e}")))
        }
        Err(e) => AdminResponse::error(e),
    }
}

/// Fences `volume` (refuses writes, flushes, places the final point) or takes writes again.
fn fence(server: &Server<VolumeBackend>, volume: &str, on: bool) -> AdminResponse {
    let (e, log) = match tracked(server, volume) {
        Ok(t) => t,
        Err(e) => return AdminResponse::error(e),
    };
    if !on {
        return match log.unfence() {
            Ok(()) => {
                info!("volume={volume}: writes are taken again");
                AdminResponse::ok()
            }
            Err(err) => AdminResponse::error(format!("volume {volume}: {err}")),
        };
    }
    // Fenced first, so that nothing is written after the final point; then what was
    // written before it is made durable.
    match log
        .fence()
        .and_then(|id| e.backend.backing().sync().map(|()| id))
    {
        Ok(id) => {
            info!("volume={volume} point={id}: fenced; this is the final point");
            AdminResponse::placed(PlacedPoint {
                volume: volume.to_string(),
                id,
                kind: PointKind::Crash,
            })
        }
        Err(err) => AdminResponse::error(format!("volume {volume}: cannot fence: {err}")),
    }
}

/// Takes an app-consistent point in every volume that has hooks and was written since its
/// last point, every `every`, until `stop`.
fn app_points(
    server: &Server<VolumeBackend>,
    hooks: &HashMap<String, Hooks>,
    every: Duration,
    stop: &std::sync::atomic::AtomicBool,
) {
    let mut next = Instant::now() + every;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(100)));
            continue;
        }
        next = now + every;
        for e in server.exports().iter() {
            let (Some(log), Some(h)) = (e.backend.log(), hooks.get(&e.name)) else {
                continue;
            };
            if (h.pre.is_some() || h.post.is_some()) && log.changed_since_mark() {
                // Failures are logged by app_point.
                let _ = redun_tracker::hooks::app_point(log, &e.name, h);
            }
        }
    }
}

/// Places a crash-consistent point in every volume written since its last point, every
/// `every`, until `stop`.
fn crash_points(
    server: &Server<VolumeBackend>,
    every: Duration,
    stop: &std::sync::atomic::AtomicBool,
) {
    let mut next = Instant::now() + every;
    let mut failing = std::collections::HashSet::new();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(100)));
            continue;
        }
        next += every;
        if next < now {
            next = now + every;
        }
        for e in server.exports().iter() {
            let Some(log) = e.backend.log() else {
                continue;
            };
            match log.mark(PointKind::Crash, true) {
                Ok(_) => {
                    failing.remove(&e.name);
                }
                Err(err) => {
                    // Said once per episode, not every interval.
                    if failing.insert(e.name.clone()) {
                        warn!("volume={}: no scheduled recovery points: {err}", e.name);
                    }
                }
            }
        }
    }
}

/// The tracker's metrics (docs/OPERATIONS.md lists them).
fn metrics(st: &TrackerStatus) -> String {
    use redun_tracker::metrics::{Scrape, group, volume};
    let mut m = Scrape::new();
    for v in &st.volumes {
        let l = || volume(&v.name);
        let c = |m: &mut Scrape, name, help, x| m.counter(name, help, l(), x);
        c(&mut m, "redun_nbd_reads", "NBD reads answered.", v.reads);
        c(&mut m, "redun_nbd_writes", "NBD writes answered.", v.writes);
        c(
            &mut m,
            "redun_nbd_flushes",
            "NBD flushes answered.",
            v.flushes,
        );
        c(&mut m, "redun_nbd_trims", "NBD trims answered.", v.trims);
        c(
            &mut m,
            "redun_nbd_zeroes",
            "NBD write-zeroes answered.",
            v.zeroes,
        );
        c(
            &mut m,
            "redun_nbd_errors",
            "NBD requests that failed.",
            v.errors,
        );
        c(
            &mut m,
            "redun_bytes_read",
            "Bytes read by NBD clients.",
            v.bytes_read,
        );
        c(
            &mut m,
            "redun_bytes_written",
            "Bytes written by NBD clients.",
            v.bytes_written,
        );
        for (kind, n) in [("crash", v.points_crash), ("app", v.points_app)] {
            let mut labels = l();
            labels.push(("kind".into(), kind.into()));
            m.counter("redun_points_created", "Recovery points placed.", labels, n);
        }
        c(
            &mut m,
            "redun_points_failed",
            "App-consistent points that failed (hook or marker).",
            v.points_failed,
        );
        let g = |m: &mut Scrape, name, help, x: u64| m.gauge(name, help, l(), x as f64);
        g(
            &mut m,
            "redun_nbd_connections",
            "Connected NBD clients.",
            v.connections,
        );
        g(
            &mut m,
            "redun_dirty_bytes",
            "Bytes in dirty regions (need a resync).",
            v.dirty_bytes,
        );
        g(
            &mut m,
            "redun_fenced",
            "1 while writes are refused (failover).",
            u64::from(v.fenced),
        );
        let current = serde_json::to_value(v.state)
            .ok()
            .and_then(|s| s.as_str().map(String::from))
            .unwrap_or_default();
        m.state(
            "redun_volume_state",
            "1 for the volume's state.",
            &l(),
            &["protected", "resync-required", "untracked"],
            &current,
        );
        if let Some(j) = &v.journal {
            g(
                &mut m,
                "redun_journal_used_bytes",
                "Journal bytes unreleased or not yet checkpointed.",
                j.used_bytes,
            );
            g(
                &mut m,
                "redun_journal_capacity_bytes",
                "Journal capacity.",
                j.capacity,
            );
            g(
                &mut m,
                "redun_journal_head_seq",
                "Last sequence number written.",
                j.head_seq,
            );
            g(
                &mut m,
                "redun_journal_released_seq",
                "Released through this sequence number.",
                j.released_seq,
            );
            g(
                &mut m,
                "redun_journal_waiting_writes",
                "Writes waiting for journal space.",
                j.waiting_writes,
            );
            g(
                &mut m,
                "redun_journal_pending_bytes",
                "Acknowledged write data not yet applied to the backing device.",
                j.pending_bytes,
            );
            g(
                &mut m,
                "redun_journal_checkpoint_seq",
                "A start-up after a crash replays the records from this sequence number on.",
                j.checkpoint_seq,
            );
        }
    }
    if let Some(gs) = &st.group {
        let l = || group(&gs.name);
        let counts = [
            (
                "redun_group_points",
                "Group points this member decided, whoever coordinated.",
                gs.committed,
                gs.aborted,
            ),
            (
                "redun_group_rounds",
                "Group rounds this member ran as coordinator.",
                gs.rounds_committed,
                gs.rounds_aborted,
            ),
        ];
        for (name, help, committed, aborted) in counts {
            for (outcome, n) in [("committed", committed), ("aborted", aborted)] {
                let mut labels = l();
                labels.push(("outcome".into(), outcome.into()));
                m.counter(name, help, labels, n);
            }
        }
        m.counter(
            "redun_group_held_replies",
            "Replies that waited at a group volume's gate for a point's decision.",
            l(),
            gs.held_replies,
        );
        m.counter_seconds(
            "redun_group_held_wait_seconds",
            "The waits of the held replies, added up.",
            l(),
            gs.held_wait_us,
        );
        m.gauge(
            "redun_group_held_longest_seconds",
            "The longest wait of a held reply since the tracker started.",
            l(),
            gs.held_longest_us as f64 / 1e6,
        );
        m.gauge(
            "redun_group_last_round_seconds",
            "How long the last round this member coordinated took.",
            l(),
            gs.last_round_us as f64 / 1e6,
        );
        m.gauge(
            "redun_group_coordinating",
            "1 while this member runs the rounds.",
            l(),
            f64::from(u8::from(gs.coordinating)),
        );
        m.state(
            "redun_group_state",
            "1 for the group's state as this member sees it.",
            &l(),
            &["ok", "degraded"],
            &gs.state,
        );
        for member in &gs.members {
            let mut labels = l();
            labels.push(("member".into(), member.id.to_string()));
            m.gauge(
                "redun_group_member_reachable",
                "1 while the member is connected.",
                labels,
                f64::from(u8::from(member.reachable)),
            );
        }
    }
    m.histograms(
        "redun_nbd_request_duration_seconds",
        "NBD request durations, from reading the request to its completion.",
        redun_tracker::nbd::server::NBD_LATENCY.clone(),
    );
    m.render()
}

fn status(
    server: &Server<VolumeBackend>,
    listen: &[String],
    started: Instant,
    group: Option<&redun_tracker::group::Group>,
) -> TrackerStatus {
    use std::sync::atomic::Ordering::Relaxed;
    let volumes = server
        .exports()
        .iter()
        .map(|e| {
            let s = &e.stats;
            VolumeStatus {
                name: e.name.clone(),
                path: e.backend.backing().path().display().to_string(),
                size: redun_tracker::nbd::BlockBackend::size(&e.backend),
                engine: e.backend.backing().engine().name().to_string(),
                connections: s.connections.load(Relaxed),
                total_connections: s.total_connections.load(Relaxed),
                reads: s.reads.load(Relaxed),
                writes: s.writes.load(Relaxed),
                bytes_read: s.bytes_read.load(Relaxed),
                bytes_written: s.bytes_written.load(Relaxed),
                flushes: s.flushes.load(Relaxed),
                trims: s.trims.load(Relaxed),
                zeroes: s.zeroes.load(Relaxed),
                errors: s.errors.load(Relaxed),
                state: e.backend.log().map_or(TrackState::Untracked, |l| l.state()),
                dirty_bytes: e.backend.log().map_or(0, |l| l.dirty_bytes()),
                dirty_ranges: e.backend.log().map_or(Vec::new(), |l| {
                    let mut r = l.dirty_ranges();
                    r.truncate(256);
                    r
                }),
                journal: e.backend.log().and_then(|l| l.status()),
                fenced: e.backend.log().is_some_and(|l| l.fenced()),
                points_crash: e.backend.log().map_or(0, |l| l.point_counts().0),
                points_app: e.backend.log().map_or(0, |l| l.point_counts().1),
                points_failed: e.backend.log().map_or(0, |l| l.point_counts().2),
            }
        })
        .collect();
    TrackerStatus {
        daemon: "tracker".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        uptime_seconds: started.elapsed().as_secs(),
        listen: listen.to_vec(),
        volumes,
        group: group.map(redun_tracker::group::Group::status),
    }
}
