//! `redun failover`: planned (fence the source, ship everything, promote the final point)
//! and unplanned (promote a point the target holds) failover, and `failover commit`.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use redun_tracker::admin::{self, AdminRequest};

use crate::ask::{Daemon, ask};

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
    let req = serde_json::json!({"cmd": "failover", "volume": volume, "point": id});
    match target_request(target, &req) {
        Ok(v) => {
            promoted(volume, &v, "planned, nothing lost");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("redun failover: {e}");
            ExitCode::from(1)
        }
    }
}

/// Unplanned: promote `point` (an id, or `latest`: everything the target holds).
pub fn unplanned(volume: &str, point: &str, target: &Path) -> ExitCode {
    let point = if point == "latest" {
        serde_json::json!("latest")
    } else {
        match point.parse::<u64>() {
            Ok(id) => serde_json::json!(id),
            Err(_) => {
                eprintln!(
                    "redun failover: --point {point:?}: give a point id (redun points \
                     {volume}) or latest"
                );
                return ExitCode::from(2);
            }
        }
    };
    let req = serde_json::json!({"cmd": "failover", "volume": volume, "point": point});
    match target_request(target, &req) {
        Ok(v) => {
            promoted(volume, &v, "unplanned");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("redun failover: {e}");
            ExitCode::from(1)
        }
    }
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
