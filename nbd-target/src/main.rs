//! `redun-target`: the master target. Accepts shippers over mutual TLS and applies each
//! volume's stream to a replica image in the data directory.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use log::error;
use redun_shipper::tls::TlsFiles;
use redun_target::config::{ConfigFile, DEFAULT_ADMIN_SOCKET, DEFAULT_LISTEN, TargetSection};
use redun_target::server::Target;
use redun_tracker::admin::{AdminServer, JsonHandler};
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
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(p) => {
            let f = ConfigFile::load(p)?.target;
            f.validate(p)?;
            f
        }
        None => TargetSection::default(),
    };
    let missing = |flag: &str, key: &str| {
        anyhow::anyhow!(
            "{flag} is required (or target.{key} in the config file given with --config)"
        )
    };
    let tls = TlsFiles {
        ca: args
            .tls_ca
            .or(file.tls_ca)
            .ok_or_else(|| missing("--tls-ca", "tls_ca"))?,
        cert: args
            .tls_cert
            .or(file.tls_cert)
            .ok_or_else(|| missing("--tls-cert", "tls_cert"))?,
        key: args
            .tls_key
            .or(file.tls_key)
            .ok_or_else(|| missing("--tls-key", "tls_key"))?,
    }
    .server_config()?;
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .ok_or_else(|| missing("--data-dir", "data_dir"))?;
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let admin_socket = args
        .admin_socket
        .or(file.admin_socket)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET));
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let listener = TcpListener::bind(&listen).with_context(|| {
        format!("cannot listen on {listen} (choose another address with --listen)")
    })?;
    let local = listener.local_addr()?.to_string();
    let signals = service::block_stop_signals().context("blocking SIGTERM/SIGINT")?;
    let target = Arc::new(Target::new(data_dir.clone(), tls));
    let started = Instant::now();
    let handler: JsonHandler = {
        let target = target.clone();
        let local = local.clone();
        Arc::new(move |req| match req.get("cmd").and_then(|c| c.as_str()) {
            Some("status") => Ok(serde_json::json!({
                "status": {
                    "daemon": "redun-target",
                    "version": env!("CARGO_PKG_VERSION"),
                    "pid": std::process::id(),
                    "uptime_seconds": started.elapsed().as_secs(),
                    "listen": [local],
                    "volumes": target.status(),
                }
            })),
            _ => Err(format!(
                "Unknown request {req}: the target answers {{\"cmd\":\"status\"}}"
            )),
        })
    };
    let _admin = AdminServer::bind_json(&admin_socket, handler)?;
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let target = target.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("repl-accept".into())
            .spawn(move || target.serve(listener, &stop))?
    };
    service::ready(
        "redun-target",
        &format!("replicas in {}, shippers on {local}", data_dir.display()),
    );
    service::wait_stop(&signals, "redun-target").context("waiting for a signal")?;
    stop.store(true, Ordering::SeqCst);
    let _ = server.join();
    Ok(())
}
