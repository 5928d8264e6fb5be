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
use log::{error, info};
use nix::sys::signal::{SigSet, Signal};
use redun_shipper::tls::TlsFiles;
use redun_target::server::Target;
use redun_tracker::admin::{AdminServer, LineHandler};

/// redun target: receives replicated volumes and keeps their replicas.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Where the replicas live (NAME.img and NAME.state per volume).
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Address for shippers.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9443")]
    listen: String,
    /// The CA that signs every shipper's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    tls_ca: PathBuf,
    /// This target's certificate (PEM), signed by the CA, its DNS name the one shippers dial.
    #[arg(long, value_name = "FILE")]
    tls_cert: PathBuf,
    #[arg(long, value_name = "FILE")]
    tls_key: PathBuf,
    /// Admin socket path.
    #[arg(long, value_name = "PATH", default_value = "/run/redun/target.sock")]
    admin_socket: PathBuf,
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
    let tls = TlsFiles {
        ca: args.tls_ca,
        cert: args.tls_cert,
        key: args.tls_key,
    }
    .server_config()?;
    std::fs::create_dir_all(&args.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            args.data_dir.display()
        )
    })?;
    let listener = TcpListener::bind(&args.listen).with_context(|| {
        format!(
            "cannot listen on {} (choose another address with --listen)",
            args.listen
        )
    })?;
    let local = listener.local_addr()?.to_string();
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().context("blocking SIGTERM/SIGINT")?;
    let target = Arc::new(Target::new(args.data_dir.clone(), tls));
    let started = Instant::now();
    let handler: LineHandler = {
        let target = target.clone();
        let local = local.clone();
        Arc::new(move |line| {
            let req: serde_json::Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(e) => {
                    return serde_json::json!({"ok": false, "error": format!("Bad request {line:?}: {e}; send e.g. {{\"cmd\":\"status\"}}")}).to_string();
                }
            };
            match req.get("cmd").and_then(|c| c.as_str()) {
                Some("status") => serde_json::json!({
                    "ok": true,
                    "status": {
                        "daemon": "redun-target",
                        "version": env!("CARGO_PKG_VERSION"),
                        "pid": std::process::id(),
                        "uptime_seconds": started.elapsed().as_secs(),
                        "listen": [local],
                        "volumes": target.status(),
                    }
                })
                .to_string(),
                _ => serde_json::json!({"ok": false, "error": format!("Unknown request {line:?}: the target answers {{\"cmd\":\"status\"}}")}).to_string(),
            }
        })
    };
    let _admin = AdminServer::bind_lines(&args.admin_socket, handler)?;
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let target = target.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("repl-accept".into())
            .spawn(move || target.serve(listener, &stop))?
    };
    info!(
        "redun-target: replicas in {}, shippers on {local}",
        args.data_dir.display()
    );
    let sig = signals.wait().context("waiting for a signal")?;
    info!("redun-target: {sig:?}, stopping");
    stop.store(true, Ordering::SeqCst);
    let _ = server.join();
    Ok(())
}
