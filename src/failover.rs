//! `redun failover`: planned (fence the source, ship everything, promote the final point)
//! and unplanned (promote a point the target holds) failover, and `failover commit`.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use redun_tracker::admin::{self, AdminRequest};
use redun_tracker::journal::format::PointKind;

use crate::ask::{Daemon, ask, ask_or_exit, volumes};

fn target_request(target: &Path, req: &serde_json::Value) -> Result<serde_json::Value, String> {
    ask(Daemon::Target, target, req).map_err(|e| e.to_string())
}

fn promoted(volume: &str, v: &serde_json::Value, how: &str) {
    let f = &v["failover"];
    println!(
        "volume {volume} failed over ({how}) at point {} (generation {}): the target serves it \
         read-write as export {volume}; `redun failover commit {volume}` makes it final",
        f["point"], f["generation"]
    );
}

/// Planned: fence the volume on the tracker (no write after the final point), wait until the
/// shipper has the final point acknowledged by the target, then promote it there.
pub fn planned(
    volume: &str,
    tracker: &Path,
    shipper: &Path,
    target: &Path,
    timeout: Duration,
) -> ExitCode {
    if failed_over(volume, target) {
        return failback(volume, shipper, target, timeout);
    }
    let req = AdminRequest::Fence {
        volume: volume.to_string(),
    };
    let id = match crate::points::tracker_point(tracker, &req, "redun failover") {
        Ok(id) => id,
        Err(code) => return code,
    };
    println!("volume {volume}: writes refused on the source; final point {id}");
    let deadline = Instant::now() + timeout;
    loop {
        let acked = admin::request_json(shipper, &serde_json::json!({"cmd": "status"}))
            .ok()
            .and_then(|v| {
                v["status"]["volumes"]
                    .as_array()?
                    .iter()
                    .find(|x| x["name"] == volume)?["acked_seq"]
                    .as_u64()
            });
        if acked.is_some_and(|a| a >= id) {
            break;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "redun failover: the target did not acknowledge the final point {id} within \
                 {timeout:?} (acknowledged: {acked:?}); the source stays fenced: run this again \
                 once shipping works, or `redun unfence {volume}` to go back to the source"
            );
            return ExitCode::from(1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    promote(volume, &id.into(), "planned, nothing lost", target)
}

/// `redun failover --planned --group NAME`: a group point that fences every member volume
/// (no write after it is taken anywhere), then, once the target holds it from every member,
/// every member volume promoted at it.
pub fn planned_group(group: &str, tracker: &Path, target: &Path, timeout: Duration) -> ExitCode {
    // The tracker refuses unless it is a member of that group.
    let round = crate::points::group_round(
        tracker,
        Some(group),
        PointKind::Crash,
        true,
        "redun failover",
    );
    let id = match round {
        Ok(id) => id,
        Err(code) => return code,
    };
    println!("group {group}: writes refused on every member volume; final group point {id}");
    let deadline = Instant::now() + timeout;
    let point = loop {
        let points = match crate::points::group_points("failover", group, target) {
            Ok(p) => p,
            Err(code) => return code,
        };
        if let Some(p) = points.into_iter().find(|p| p.id == id && p.usable) {
            break p;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "redun failover: the target does not hold group point {id} from every member \
                 within {timeout:?} (redun points --group {group}); the member volumes stay \
                 fenced: run this again once shipping works, or `redun unfence VOLUME` on \
                 each member to go back to the sources"
            );
            return ExitCode::from(1);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    crate::points::on_members(&point, |volume, point| {
        promote(volume, &point.into(), "planned, nothing lost", target)
    })
    .map_or_else(
        |code| code,
        |id| {
            println!(
                "group {group}: every member volume failed over at group point {id}, nothing \
                 lost"
            );
            ExitCode::SUCCESS
        },
    )
}

/// True when the target (if it runs here) says `volume` is failed over to it.
fn failed_over(volume: &str, target: &Path) -> bool {
    volumes(Daemon::Target, target).is_ok_and(|vols| {
        vols.iter()
            .any(|x| x["name"] == volume && !x["failed_over"].is_null())
    })
}

/// The shipper's failback status of `volume`, if one ran.
fn reverse_status(volume: &str, shipper: &Path) -> Result<serde_json::Value, String> {
    let vols = volumes(Daemon::Shipper, shipper).map_err(|e| e.to_string())?;
    Ok(vols
        .into_iter()
        .find(|x| x["name"] == volume)
        .map_or(serde_json::Value::Null, |x| x["reverse"].clone()))
}

/// `redun reverse VOLUME`: starts the failback and waits until its first pass runs (or it
/// fails: then says why).
pub fn reverse(volume: &str, full: bool, shipper: &Path) -> ExitCode {
    let req = serde_json::json!({"cmd": "reverse", "volume": volume, "full": full});
    if let Err(code) = ask_or_exit("reverse", Daemon::Shipper, shipper, &req) {
        return code;
    }
    match wait_phase(
        volume,
        shipper,
        &["comparing", "waiting", "done"],
        Duration::from_secs(30),
    ) {
        Wait::Reached(r) => {
            println!(
                "volume {volume}: failback under way: the volume failed over at point {} comes \
                 back onto this device, which refuses other writes meanwhile; `redun failover \
                 {volume} --planned` moves the workload home",
                r["point"]
            );
            ExitCode::SUCCESS
        }
        Wait::Failed(r) => {
            eprintln!("redun reverse: {}", r["error"].as_str().unwrap_or("failed"));
            ExitCode::from(1)
        }
        Wait::TimedOut(r) => {
            eprintln!(
                "redun reverse: the failback of {volume} has not started within 30 s ({}); it \
                 keeps trying: `redun status --json` shows it",
                r["error"].as_str().unwrap_or("connecting")
            );
            ExitCode::from(1)
        }
    }
}

/// How waiting for a failback's phase ended, with its last status.
enum Wait {
    Reached(serde_json::Value),
    Failed(serde_json::Value),
    TimedOut(serde_json::Value),
}

/// Polls the shipper until the failback of `volume` is in one of `phases`, failed, or
/// `timeout` passed.
fn wait_phase(volume: &str, shipper: &Path, phases: &[&str], timeout: Duration) -> Wait {
    let deadline = Instant::now() + timeout;
    loop {
        let r = reverse_status(volume, shipper).unwrap_or(serde_json::Value::Null);
        match r["phase"].as_str() {
            Some(p) if phases.contains(&p) => return Wait::Reached(r),
            Some("failed") => return Wait::Failed(r),
            _ if Instant::now() >= deadline => return Wait::TimedOut(r),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Planned failover of a failed-over volume back home: the promoted volume stops taking
/// writes on the target, the failback's last pass copies what is left, and the old primary
/// takes writes again, shipping to the target at the next generation.
fn failback(volume: &str, shipper: &Path, target: &Path, timeout: Duration) -> ExitCode {
    let running = |r: &serde_json::Value| {
        matches!(
            r["phase"].as_str(),
            Some("connecting" | "comparing" | "waiting")
        )
    };
    match reverse_status(volume, shipper) {
        Ok(r) if running(&r) => {}
        Ok(_) => {
            eprintln!(
                "redun failover: volume {volume} is failed over to the target and no failback \
                 runs: run `redun reverse {volume}` where the old primary's shipper runs first"
            );
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("redun failover: {e}");
            return ExitCode::from(2);
        }
    }
    let req = serde_json::json!({"cmd": "failback-fence", "volume": volume});
    if let Err(e) = target_request(target, &req) {
        eprintln!("redun failover: {e}");
        return ExitCode::from(1);
    }
    println!("volume {volume}: writes refused on the target; the failback's last pass runs");
    match wait_phase(volume, shipper, &["done"], timeout) {
        Wait::Reached(r) => {
            println!(
                "volume {volume} failed back: {} bytes compared, {} bytes copied back in {} \
                 passes; the source takes writes again and ships at generation {}",
                r["compared_bytes"], r["copied_bytes"], r["passes"], r["generation"]
            );
            ExitCode::SUCCESS
        }
        Wait::Failed(r) => {
            eprintln!(
                "redun failover: the failback of {volume} failed: {}; the target keeps the \
                 volume (fenced): fix it and run `redun reverse {volume}` again",
                r["error"]
            );
            ExitCode::from(1)
        }
        Wait::TimedOut(r) => {
            eprintln!(
                "redun failover: the failback of {volume} did not finish within {timeout:?} \
                 ({}); it goes on: run this again to wait",
                r["error"].as_str().unwrap_or("no error reported")
            );
            ExitCode::from(1)
        }
    }
}

/// Promotes `point` (an id or "latest") of `volume` on the target; `how` for the message.
fn promote(volume: &str, point: &serde_json::Value, how: &str, target: &Path) -> ExitCode {
    let req = serde_json::json!({"cmd": "failover", "volume": volume, "point": point});
    match target_request(target, &req) {
        Ok(v) => {
            promoted(volume, &v, how);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("redun failover: {e}");
            ExitCode::from(1)
        }
    }
}

/// `--point ID|latest`: `None` for latest; a bad value is said (`list`: where the ids
/// are listed) and exits 2.
fn parse_point(point: &str, list: &str) -> Result<Option<u64>, ExitCode> {
    match point {
        "latest" => Ok(None),
        id => id.parse::<u64>().map(Some).map_err(|_| {
            eprintln!("redun failover: --point {id:?}: give a point id ({list}) or latest");
            ExitCode::from(2)
        }),
    }
}

/// Unplanned: promote `point` (an id, or `latest`: everything the target holds).
pub fn unplanned(volume: &str, point: &str, target: &Path) -> ExitCode {
    let point = match parse_point(point, &format!("redun points {volume}")) {
        Ok(Some(id)) => serde_json::json!(id),
        Ok(None) => serde_json::json!("latest"),
        Err(code) => return code,
    };
    promote(volume, &point, "unplanned", target)
}

/// `redun failover --unplanned --group NAME`: every member volume at one group point.
pub fn unplanned_group(group: &str, point: &str, target: &Path) -> ExitCode {
    let id = match parse_point(point, &format!("redun points --group {group}")) {
        Ok(id) => id,
        Err(code) => return code,
    };
    crate::points::on_group_point("failover", group, id, target, |volume, point| {
        promote(volume, &point.into(), "unplanned", target)
    })
    .map_or_else(
        |code| code,
        |id| {
            println!("group {group}: every member volume failed over at group point {id}");
            ExitCode::SUCCESS
        },
    )
}

pub fn commit(volume: &str, target: &Path) -> ExitCode {
    let req = serde_json::json!({"cmd": "failover-commit", "volume": volume});
    match target_request(target, &req) {
        Ok(v) => {
            println!(
                "volume {volume}: failover at point {} is final",
                v["failover"]["point"]
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("redun failover commit: {e}");
            ExitCode::from(1)
        }
    }
}

/// `redun unfence VOLUME`: the source takes writes again.
pub fn unfence(volume: &str, tracker: &Path) -> ExitCode {
    let req = AdminRequest::Unfence {
        volume: volume.to_string(),
    };
    match admin::request(tracker, &req) {
        Ok(r) if r.ok => {
            println!("volume {volume}: the tracker takes writes again");
            ExitCode::SUCCESS
        }
        Ok(r) => {
            eprintln!(
                "redun unfence: {}",
                r.error.as_deref().unwrap_or("the tracker refused")
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!(
                "redun unfence: cannot reach the tracker on {}: {e} (--tracker-socket)",
                tracker.display()
            );
            ExitCode::from(2)
        }
    }
}
