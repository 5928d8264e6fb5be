//! `redun`: the admin command-line interface of redun.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use redun_tracker::admin::{self, AdminRequest, TrackerStatus};
use redun_tracker::config::DEFAULT_ADMIN_SOCKET;

mod journal;

/// redun: continuous block replication and disaster recovery for Linux servers.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the state of the daemons and their volumes.
    Status {
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
        /// The tracker's admin socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_ADMIN_SOCKET)]
        tracker_socket: PathBuf,
    },
    /// Inspect and replay journal files (read-only on the journal).
    #[command(subcommand)]
    Journal(JournalCommand),
    /// Certificates for replication's mutual TLS.
    #[command(subcommand)]
    Pki(PkiCommand),
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create a CA (ca.crt, ca.key) in DIR, or use the one there, and a certificate and key
    /// signed by it for every NAME (NAME.crt, NAME.key; NAME is the DNS name peers check).
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A host name (repeatable): the target's name as shippers dial it, and the shippers'.
        #[arg(long = "name", value_name = "NAME", required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum JournalCommand {
    /// List the superblock and every record of the chain.
    Dump {
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Verify the chain; exit 1 and name the offset and sequence number of any damage.
    Check {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Apply the journal's records, in order, onto a copy of an image.
    Replay {
        /// The image the journal's records apply to (not modified).
        #[arg(long)]
        base: PathBuf,
        #[arg(long)]
        journal: PathBuf,
        /// Where to write the result.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Status {
            json,
            tracker_socket,
        } => status(json, &tracker_socket),
        Command::Pki(PkiCommand::Init { dir, names }) => {
            match redun_shipper::pki::init(&dir, &names) {
                Ok(r) => {
                    for p in &r.kept {
                        println!("kept    {}", p.display());
                    }
                    for p in &r.created {
                        println!("created {}", p.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("redun pki init: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Journal(cmd) => match journal::run(cmd) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("redun journal: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}

/// A daemon as the CLI sees it.
enum Daemon {
    /// It answered.
    Up(TrackerStatus),
    /// It answered with an error (e.g. permission denied).
    Refused(String),
    /// Nothing answered, or the socket could not be reached.
    Down(String),
}

fn tracker_status(socket: &Path) -> Daemon {
    match admin::request(socket, &AdminRequest::Status) {
        Ok(r) if r.ok => match r.status {
            Some(s) => Daemon::Up(s),
            None => Daemon::Refused("the tracker answered without a status".into()),
        },
        Ok(r) => Daemon::Refused(r.error.unwrap_or_else(|| "unknown error".into())),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Daemon::Down(format!(
                "not running (no daemon answers on {})",
                socket.display()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Daemon::Down(format!(
            "cannot open {}: permission denied (the admin socket is for root or the daemon's user)",
            socket.display()
        )),
        Err(e) => Daemon::Down(format!("cannot query {}: {e}", socket.display())),
    }
}

fn status(json: bool, socket: &Path) -> ExitCode {
    let st = tracker_status(socket);
    if json {
        let v = match &st {
            Daemon::Up(s) => serde_json::json!({ "tracker": { "running": true, "status": s } }),
            Daemon::Refused(e) => serde_json::json!({ "tracker": { "running": true, "error": e } }),
            Daemon::Down(e) => serde_json::json!({ "tracker": { "running": false, "error": e } }),
        };
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    match st {
        Daemon::Down(e) => println!("tracker: {e}"),
        Daemon::Refused(e) => println!("tracker: running, but refused: {e}"),
        Daemon::Up(s) => {
            println!(
                "tracker: running pid={} version={} uptime={}s listen={}",
                s.pid,
                s.version,
                s.uptime_seconds,
                s.listen.join(",")
            );
            println!(
                "{:<16} {:>12} {:<6} {:>5} {:>10} {:>10} {:>12} {:>12} {:>7}",
                "VOLUME", "SIZE", "ENGINE", "CONNS", "READS", "WRITES", "READ", "WRITTEN", "ERRORS"
            );
            for v in &s.volumes {
                println!(
                    "{:<16} {:>12} {:<6} {:>5} {:>10} {:>10} {:>12} {:>12} {:>7}",
                    v.name,
                    human(v.size),
                    v.engine,
                    v.connections,
                    v.reads,
                    v.writes,
                    human(v.bytes_read),
                    human(v.bytes_written),
                    v.errors
                );
                let mut line = format!("{:<16} state={}", "", kebab(&v.state));
                if let Some(j) = &v.journal {
                    line += &format!(
                        " journal={}/{} head_seq={} released_seq={}",
                        human(j.used_bytes),
                        human(j.capacity),
                        j.head_seq,
                        j.released_seq
                    );
                    if j.waiting_writes > 0 {
                        line += &format!(" waiting_writes={} (journal full)", j.waiting_writes);
                    }
                }
                if v.dirty_bytes > 0 {
                    line += &format!(" dirty={}", human(v.dirty_bytes));
                }
                println!("{line}");
            }
        }
    }
    ExitCode::SUCCESS
}

/// A value's serde name (`resync-required`).
fn kebab<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
