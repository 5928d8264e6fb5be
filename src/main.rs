//! `redun`: the admin command-line interface of redun.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use redun_tracker::admin::{self, AdminRequest, TrackerStatus};
use redun_tracker::config::DEFAULT_ADMIN_SOCKET;

const DEFAULT_SHIPPER_SOCKET: &str = "/run/redun/shipper.sock";
const DEFAULT_TARGET_SOCKET: &str = "/run/redun/target.sock";

mod ask;
mod config_check;
mod failover;
mod jobs;
mod journal;
mod points;
mod restore;

/// redun: continuous block replication and disaster recovery for Linux servers.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the state of the daemons and their volumes (tracker, shipper and target merged).
    Status {
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
        /// The tracker's admin socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_ADMIN_SOCKET)]
        tracker_socket: PathBuf,
        /// The shipper's admin socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_SHIPPER_SOCKET)]
        shipper_socket: PathBuf,
        /// The target's admin socket (when the target runs on this host).
        #[arg(long, value_name = "PATH", default_value = DEFAULT_TARGET_SOCKET)]
        target_socket: PathBuf,
    },
    /// Ship a volume again now: after it went critical (and the cause was fixed), or to cut a
    /// retry back-off short.
    Resume {
        volume: String,
        /// The shipper's admin socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_SHIPPER_SOCKET)]
        shipper_socket: PathBuf,
    },
    /// Synchronise a volume with its replica now: its dirty regions, or all of it with
    /// `--full` (block checksums on both sides; only blocks that differ travel).
    Resync {
        volume: String,
        /// Compare every block of the volume, not only the dirty regions.
        #[arg(long)]
        full: bool,
        /// The shipper's admin socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_SHIPPER_SOCKET)]
        shipper_socket: PathBuf,
    },
    /// Fail back: copy the volume failed over to the target back onto this (the old
    /// primary's) device, only the blocks that differ, and keep it current until `redun
    /// failover VOLUME --planned` moves the workload home. Run where the old primary's
    /// shipper runs; the tracker's volume stays fenced until the failback ends.
    Reverse {
        volume: String,
        /// Compare every block, not only what changed on either side since the failover.
        #[arg(long)]
        full: bool,
        /// The shipper's admin socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_SHIPPER_SOCKET)]
        shipper_socket: PathBuf,
    },
    /// Compare the volume's blocks with the replica's while replication runs, and report the
    /// ranges that differ (exit status 1 when some do).
    Verify {
        volume: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// The shipper's admin socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_SHIPPER_SOCKET)]
        shipper_socket: PathBuf,
    },
    /// Synchronisation jobs under way (initial replication, resync) and their progress.
    Jobs {
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
        /// Print the table again every second until no job is left.
        #[arg(long)]
        watch: bool,
        /// The shipper's admin socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_SHIPPER_SOCKET)]
        shipper_socket: PathBuf,
    },
    /// Recovery points: place one now.
    #[command(subcommand)]
    Point(PointCommand),
    /// List a volume's recovery points as the target holds them, or with --group a
    /// consistency group's points (each one a point of every member volume).
    Points {
        #[arg(required_unless_present = "group", conflicts_with = "group")]
        volume: Option<String>,
        /// The consistency group whose points to list.
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
        /// Read the points from a bucket instead of the target: s3://BUCKET/PREFIX,
        /// az://CONTAINER/PREFIX or file:///DIR.
        #[arg(long, value_name = "URL", conflicts_with = "group")]
        store: Option<String>,
        #[command(flatten)]
        bucket: BucketArgs,
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
        /// The target's admin socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_TARGET_SOCKET)]
        target_socket: PathBuf,
    },
    /// Test failover on the target: a point exported writable as VOLUME@test, replication
    /// going on underneath.
    #[command(subcommand)]
    TestFailover(TestFailoverCommand),
    /// Fail a volume over to the target: --planned (fence the source, ship everything,
    /// promote the final point: nothing lost) or --unplanned (the source is gone: promote a
    /// point the target holds). `redun failover commit VOLUME` makes it final.
    Failover(FailoverArgs),
    /// Let the source take writes again after a fence (an abandoned planned failover).
    Unfence {
        volume: String,
        /// The tracker's admin socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_ADMIN_SOCKET)]
        tracker_socket: PathBuf,
    },
    /// Write a recovery point of VOLUME from a bucket to a local file or block device.
    Restore {
        volume: String,
        /// The bucket: s3://BUCKET/PREFIX, az://CONTAINER/PREFIX or file:///DIR.
        #[arg(long, value_name = "URL")]
        store: String,
        /// The point's id (`redun points VOLUME --store URL`), or `latest`.
        #[arg(long, value_name = "ID", default_value = "latest")]
        point: String,
        /// The file (created, sparse) or block device to write.
        #[arg(long, value_name = "PATH")]
        to: PathBuf,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        #[command(flatten)]
        bucket: BucketArgs,
    },
    /// Volume encryption keys for buckets.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Inspect and replay journal files (read-only on the journal).
    #[command(subcommand)]
    Journal(JournalCommand),
    /// Certificates for replication's mutual TLS.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// The configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// How to read a volume in a bucket.
#[derive(Debug, clap::Args)]
struct BucketArgs {
    /// The volume's key file (default /etc/redun/keys/VOLUME.key).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// The config file whose [bucket] table says how to reach the bucket (endpoint,
    /// credentials); unset keys come from the AWS_* / AZURE_* environment variables.
    #[arg(long, value_name = "FILE", default_value = "/etc/redun/redun.toml")]
    config: PathBuf,
}

impl BucketArgs {
    fn source<'a>(&'a self, volume: &'a str, store: &'a str) -> restore::Source<'a> {
        restore::Source {
            volume,
            store,
            key: self.key.as_deref(),
            config: &self.config,
        }
    }
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Write a new random volume key to PATH (never replaces a file).
    New { path: PathBuf },
}

#[derive(Debug, Subcommand)]
enum PointCommand {
    /// Place a crash-consistent recovery point in VOLUME's journal and print its id once the
    /// target holds it durably.
    Create {
        volume: String,
        /// App-consistent: run the configured freeze and thaw hooks around the point.
        #[arg(long)]
        app: bool,
        /// The tracker's admin socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_ADMIN_SOCKET)]
        tracker_socket: PathBuf,
        /// The shipper's admin socket (it tells when the target has the point).
        #[arg(long, value_name = "PATH", default_value = DEFAULT_SHIPPER_SOCKET)]
        shipper_socket: PathBuf,
        /// How long to wait for the target, in seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        timeout: u64,
    },
    /// Place a point of this tracker's consistency group now, in every member's volumes,
    /// and print its id (the target lists it once every member has shipped it).
    Group {
        /// App-consistent: every member runs its volumes' pre-hooks before the markers and
        /// post-hooks after the decision.
        #[arg(long)]
        app: bool,
        /// The tracker's admin socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_ADMIN_SOCKET)]
        tracker_socket: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct FailoverArgs {
    #[command(subcommand)]
    commit: Option<FailoverCommand>,
    /// The volume to fail over.
    volume: Option<String>,
    /// The source is alive: refuse its writes, ship everything, promote the final point.
    #[arg(long, conflicts_with = "unplanned")]
    planned: bool,
    /// The source is gone: promote a point the target holds.
    #[arg(long)]
    unplanned: bool,
    /// With --unplanned: the point to promote, or latest [default: latest].
    #[arg(long, value_name = "ID|latest", requires = "unplanned")]
    point: Option<String>,
    /// Fail over every member volume of consistency group NAME at one group point: with
    /// --planned, a final group point that fences every member (run it on a member, with the
    /// target's socket); with --unplanned, --point (a group point id, or latest: the newest
    /// usable group point).
    #[arg(long, value_name = "NAME", conflicts_with = "volume")]
    group: Option<String>,
    /// The tracker's admin socket (--planned).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_ADMIN_SOCKET)]
    tracker_socket: PathBuf,
    /// The shipper's admin socket (--planned).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SHIPPER_SOCKET)]
    shipper_socket: PathBuf,
    /// The target's admin socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_TARGET_SOCKET)]
    target_socket: PathBuf,
    /// --planned: how long to wait for the final point to reach the target, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    timeout: u64,
}

#[derive(Debug, Subcommand)]
enum FailoverCommand {
    /// Make the failover of VOLUME final: no other point can be chosen afterwards.
    Commit {
        volume: String,
        /// The target's admin socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_TARGET_SOCKET)]
        target_socket: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum TestFailoverCommand {
    /// Export VOLUME@test: the point, writable; its writes go to a scratch overlay. With
    /// --group, every member volume at the same group point.
    Start {
        #[arg(required_unless_present = "group", conflicts_with = "group")]
        volume: Option<String>,
        /// Test the group point (from `redun points --group`) of every member volume.
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
        /// The point to test (a group point with --group) [default: the newest usable one].
        #[arg(long, value_name = "ID")]
        point: Option<u64>,
        /// The target's admin socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_TARGET_SOCKET)]
        target_socket: PathBuf,
    },
    /// Remove VOLUME@test and discard what was written to it (every member volume's with
    /// --group).
    Cleanup {
        #[arg(required_unless_present = "group", conflicts_with = "group")]
        volume: Option<String>,
        /// The consistency group whose test failovers to clean up.
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
        /// The target's admin socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_TARGET_SOCKET)]
        target_socket: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate FILE as every daemon does at start (exit 1, naming key and value, if not).
    Check { file: PathBuf },
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
    redun_tracker::sys::default_sigpipe();
    let cli = Cli::parse();
    match cli.command {
        Command::Status {
            json,
            tracker_socket,
            shipper_socket,
            target_socket,
        } => status(json, &tracker_socket, &shipper_socket, &target_socket),
        Command::Resume {
            volume,
            shipper_socket,
        } => {
            let req = serde_json::json!({"cmd": "resume", "volume": volume});
            match ask::ask_or_exit("resume", ask::Daemon::Shipper, &shipper_socket, &req) {
                Ok(_) => {
                    println!("volume {volume}: shipping resumes");
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        Command::Resync {
            volume,
            full,
            shipper_socket,
        } => {
            let req = serde_json::json!({"cmd": "resync", "volume": volume, "full": full});
            match ask::ask_or_exit("resync", ask::Daemon::Shipper, &shipper_socket, &req) {
                Ok(_) => {
                    println!(
                        "volume {volume}: {} resync asked for; `redun jobs` shows its progress",
                        if full { "a full" } else { "a" }
                    );
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        Command::Reverse {
            volume,
            full,
            shipper_socket,
        } => failover::reverse(&volume, full, &shipper_socket),
        Command::Jobs {
            json,
            watch,
            shipper_socket,
        } => jobs::show(json, watch, &shipper_socket),
        Command::Verify {
            volume,
            json,
            shipper_socket,
        } => jobs::verify(&volume, json, &shipper_socket),
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
        Command::Config(ConfigCommand::Check { file }) => config_check::run(&file),
        Command::Key(KeyCommand::New { path }) => restore::key_new(&path),
        Command::Restore {
            volume,
            store,
            point,
            to,
            quiet,
            bucket,
        } => restore::restore(&bucket.source(&volume, &store), &point, &to, !quiet),
        Command::Point(PointCommand::Create {
            volume,
            app,
            tracker_socket,
            shipper_socket,
            timeout,
        }) => points::create(
            &volume,
            app,
            &tracker_socket,
            &shipper_socket,
            std::time::Duration::from_secs(timeout),
        ),
        Command::Point(PointCommand::Group {
            app,
            tracker_socket,
        }) => points::group(app, &tracker_socket),
        Command::Points {
            volume,
            group,
            store,
            bucket,
            json,
            target_socket,
        } => match (volume, group) {
            (Some(volume), None) if store.is_some() => restore::list(
                &bucket.source(&volume, store.as_deref().unwrap_or("")),
                json,
            ),
            (_, Some(group)) => points::list_group(&group, json, &target_socket),
            (Some(volume), None) => points::list(&volume, json, &target_socket),
            (None, None) => ExitCode::from(2),
        },
        Command::Failover(a) => match (a.commit, a.volume) {
            (
                Some(FailoverCommand::Commit {
                    volume,
                    target_socket,
                }),
                _,
            ) => failover::commit(&volume, &target_socket),
            (None, Some(volume)) if a.planned => failover::planned(
                &volume,
                &a.tracker_socket,
                &a.shipper_socket,
                &a.target_socket,
                std::time::Duration::from_secs(a.timeout),
            ),
            (None, None) if a.planned && a.group.is_some() => failover::planned_group(
                a.group.as_deref().unwrap_or_default(),
                &a.tracker_socket,
                &a.target_socket,
                std::time::Duration::from_secs(a.timeout),
            ),
            (None, None) if a.unplanned && a.group.is_some() => failover::unplanned_group(
                a.group.as_deref().unwrap_or_default(),
                a.point.as_deref().unwrap_or("latest"),
                &a.target_socket,
            ),
            (None, Some(volume)) if a.unplanned => failover::unplanned(
                &volume,
                a.point.as_deref().unwrap_or("latest"),
                &a.target_socket,
            ),
            (None, Some(volume)) => {
                eprintln!(
                    "redun failover {volume}: say --planned (the source is alive) or \
                     --unplanned (it is gone)"
                );
                ExitCode::from(2)
            }
            (None, None) if a.group.is_some() => {
                eprintln!(
                    "redun failover --group: say --planned (the members are alive) or \
                     --unplanned (they are gone)"
                );
                ExitCode::from(2)
            }
            (None, None) => {
                eprintln!("redun failover: name the volume (redun failover --help)");
                ExitCode::from(2)
            }
        },
        Command::Unfence {
            volume,
            tracker_socket,
        } => failover::unfence(&volume, &tracker_socket),
        Command::TestFailover(TestFailoverCommand::Start {
            volume,
            group,
            point,
            target_socket,
        }) => match (volume, group) {
            (_, Some(g)) => points::test_failover_group(&g, Some(point), &target_socket),
            (Some(v), None) => points::test_failover(&v, Some(point), &target_socket),
            (None, None) => ExitCode::from(2),
        },
        Command::TestFailover(TestFailoverCommand::Cleanup {
            volume,
            group,
            target_socket,
        }) => match (volume, group) {
            (_, Some(g)) => points::test_failover_group(&g, None, &target_socket),
            (Some(v), None) => points::test_failover(&v, None, &target_socket),
            (None, None) => ExitCode::from(2),
        },
        Command::Journal(cmd) => match journal::run(cmd) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("redun journal: {}", redun_tracker::service::error_line(&e));
                ExitCode::from(2)
            }
        },
    }
}

/// A daemon as the CLI sees it.
enum Daemon {
    /// It answered.
    Up(Box<TrackerStatus>),
    /// It answered with an error (e.g. permission denied).
    Refused(String),
    /// Nothing answered, or the socket could not be reached.
    Down(String),
}

fn tracker_status(socket: &Path) -> Daemon {
    match admin::request(socket, &AdminRequest::Status) {
        Ok(r) if r.ok => match r.status {
            Some(s) => Daemon::Up(Box::new(s)),
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

/// A daemon's status as JSON: `{"running":..,"status":..}` or `{"running":..,"error":..}`.
fn daemon_json(name: &str, socket: &Path) -> serde_json::Value {
    match admin::request_json(socket, &serde_json::json!({"cmd": "status"})) {
        Ok(r) if r["ok"] == true => serde_json::json!({"running": true, "status": r["status"]}),
        Ok(r) => serde_json::json!({"running": true, "error": r["error"]}),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            serde_json::json!({"running": false, "error": format!(
                "{name} not running (no daemon answers on {})", socket.display())})
        }
        Err(e) => serde_json::json!({"running": false, "error": format!(
            "cannot query {name} on {}: {e}", socket.display())}),
    }
}

/// One object per volume, from what each daemon knows of it (docs/OPERATIONS.md, "Status").
fn merged_volumes(
    tracker: &Daemon,
    shipper: &serde_json::Value,
    target: &serde_json::Value,
) -> Vec<serde_json::Value> {
    use serde_json::{Value, json};
    let list = |d: &Value| -> Vec<Value> {
        d["status"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let (ships, replicas) = (list(shipper), list(target));
    let find = |l: &[Value], name: &str| l.iter().find(|v| v["name"] == name).cloned();
    let mut names: Vec<String> = Vec::new();
    if let Daemon::Up(t) = tracker {
        names.extend(t.volumes.iter().map(|v| v.name.clone()));
    }
    for v in ships.iter().chain(&replicas) {
        if let Some(n) = v["name"].as_str() {
            if !names.iter().any(|x| x == n) {
                names.push(n.to_string());
            }
        }
    }
    names
        .iter()
        .map(|name| {
            let tv = match tracker {
                Daemon::Up(t) => t.volumes.iter().find(|v| &v.name == name),
                _ => None,
            };
            let sv = find(&ships, name);
            let rv = find(&replicas, name);
            let tracked = tv.map(|v| kebab(&v.state));
            let ship_state = sv
                .as_ref()
                .and_then(|v| v["state"].as_str().map(String::from));
            let job = sv.as_ref().map_or(Value::Null, |v| v["sync"].clone());
            let state = match (tracked.as_deref(), ship_state.as_deref()) {
                // A synchronisation under way says which one.
                _ if job["kind"].is_string() => job["kind"].as_str().unwrap_or("resync"),
                (Some("resync-required"), _) => "resync-required",
                (_, Some("critical")) => "critical",
                (Some("untracked"), _) => "untracked",
                (Some(_), _) | (None, Some(_)) => "protected",
                (None, None) => "unknown",
            };
            let num = |v: &Option<Value>, k: &str| v.as_ref().map_or(Value::Null, |v| v[k].clone());
            json!({
                "name": name,
                "state": state,
                "lag_bytes": num(&sv, "lag_bytes"),
                "rpo_seconds": num(&sv, "rpo_seconds"),
                "throughput_bytes_per_second": num(&sv, "throughput_bytes_per_second"),
                "compression_ratio": num(&sv, "compression_ratio"),
                "retries": num(&sv, "retries"),
                "next_retry_unix": num(&sv, "next_retry_unix"),
                "last_error": num(&sv, "last_error"),
                "head_seq": tv.and_then(|v| v.journal.as_ref()).map(|j| j.head_seq),
                "acked_seq": num(&sv, "acked_seq"),
                "replica_applied_seq": num(&rv, "applied_seq"),
                "dirty_bytes": tv.map(|v| v.dirty_bytes),
                "sync": job,
                "verify": num(&sv, "verify"),
            })
        })
        .collect()
}

fn status(json: bool, socket: &Path, shipper_socket: &Path, target_socket: &Path) -> ExitCode {
    let st = tracker_status(socket);
    let shipper = daemon_json("shipper", shipper_socket);
    let target = daemon_json("target", target_socket);
    let volumes = merged_volumes(&st, &shipper, &target);
    if json {
        let tracker = match &st {
            Daemon::Up(s) => serde_json::json!({ "running": true, "status": s }),
            Daemon::Refused(e) => serde_json::json!({ "running": true, "error": e }),
            Daemon::Down(e) => serde_json::json!({ "running": false, "error": e }),
        };
        let v = serde_json::json!({
            "volumes": volumes,
            "tracker": tracker,
            "shipper": shipper,
            "target": target,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    print_tracker(st);
    for (name, d) in [("shipper", &shipper), ("target", &target)] {
        match (&d["running"], d["error"].as_str()) {
            (serde_json::Value::Bool(true), None) => println!(
                "{name}: running pid={} uptime={}s",
                d["status"]["pid"], d["status"]["uptime_seconds"]
            ),
            (serde_json::Value::Bool(true), Some(e)) => {
                println!("{name}: running, but refused: {e}")
            }
            (_, e) => println!("{name}: {}", e.unwrap_or("not running")),
        }
    }
    if !volumes.is_empty() {
        println!(
            "{:<16} {:<16} {:>10} {:>8} {:>12} {:>6} {:>7}  LAST ERROR",
            "VOLUME", "STATE", "LAG", "RPO", "THROUGHPUT", "RATIO", "RETRIES"
        );
        for v in &volumes {
            let f = |k: &str| v[k].as_f64();
            println!(
                "{:<16} {:<16} {:>10} {:>8} {:>12} {:>6} {:>7}  {}",
                v["name"].as_str().unwrap_or(""),
                v["state"].as_str().unwrap_or(""),
                v["lag_bytes"].as_u64().map_or("-".into(), human),
                f("rpo_seconds").map_or("-".into(), |s| format!("{s:.1}s")),
                f("throughput_bytes_per_second").map_or("-".into(), |b| {
                    // Whole bytes per second are all a table shows.
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    let b = b.max(0.0) as u64;
                    format!("{}/s", human(b))
                }),
                f("compression_ratio").map_or("-".into(), |r| format!("{r:.2}")),
                v["retries"].as_u64().map_or("-".into(), |r| r.to_string()),
                v["last_error"].as_str().unwrap_or("")
            );
            let j = &v["sync"];
            if j.is_object() {
                println!(
                    "                 job: {} {} {:.1}%: {} of {} compared, {} sent{}",
                    j["kind"].as_str().unwrap_or("?"),
                    j["phase"].as_str().unwrap_or("?"),
                    j["percent"].as_f64().unwrap_or(0.0),
                    human(j["compared_bytes"].as_u64().unwrap_or(0)),
                    human(j["total_bytes"].as_u64().unwrap_or(0)),
                    human(j["sent_bytes"].as_u64().unwrap_or(0)),
                    j["eta_seconds"]
                        .as_f64()
                        .map_or(String::new(), |e| format!(", ETA {e:.0}s"))
                );
            }
        }
    }
    ExitCode::SUCCESS
}

fn print_tracker(st: Daemon) {
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
            if let Some(g) = &s.group {
                println!(
                    "group {}: state={} member={}{} committed={} aborted={} last_round={}us \
                     held_replies={} held_longest={}us{}",
                    g.name,
                    g.state,
                    g.id,
                    if g.coordinating { " (coordinator)" } else { "" },
                    g.committed,
                    g.aborted,
                    g.last_round_us,
                    g.held_replies,
                    g.held_longest_us,
                    if g.last_error.is_empty() {
                        String::new()
                    } else {
                        format!(" last_error={:?}", g.last_error)
                    }
                );
                for m in &g.members {
                    println!(
                        "  member {} {} {}{}",
                        m.id,
                        m.address,
                        if m.reachable {
                            "reachable"
                        } else {
                            "unreachable"
                        },
                        if m.error.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", m.error)
                        }
                    );
                }
            }
        }
    }
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
