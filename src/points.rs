//! `redun point create` and `redun points`: recovery points through the tracker (which
//! places them), the shipper (which tells when the target holds them durably) and the
//! target (which lists them).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use redun_tracker::admin::{self, AdminRequest};
use redun_tracker::journal::format::PointKind;

use redun_store::segment::Point;
use redun_target::server::GroupPoint;

use crate::ask::{Daemon, ask_or_exit};

/// Sends `req` (a point or a fence) to the tracker and returns the point it placed; on
/// failure, says why (as `cmd`) and returns the exit code.
pub fn tracker_point(tracker: &Path, req: &AdminRequest, cmd: &str) -> Result<u64, ExitCode> {
    tracker_ask(tracker, req, cmd)?
        .point
        .map(|p| p.id)
        .ok_or_else(|| {
            eprintln!("{cmd}: the tracker answered without a point");
            ExitCode::from(1)
        })
}

/// Sends `req` to the tracker; on failure, says why (as `cmd`) and returns the exit code
/// (1: refused, 2: unreachable).
fn tracker_ask(
    tracker: &Path,
    req: &AdminRequest,
    cmd: &str,
) -> Result<admin::AdminResponse, ExitCode> {
    match admin::request(tracker, req) {
        Ok(r) if r.ok => Ok(r),
        Ok(r) => {
            eprintln!(
                "{cmd}: {}",
                r.error.as_deref().unwrap_or("the tracker refused")
            );
            Err(ExitCode::from(1))
        }
        Err(e) => {
            eprintln!(
                "{cmd}: cannot reach the tracker on {}: {e} (is redun-tracker running? \
                 --tracker-socket)",
                tracker.display()
            );
            Err(ExitCode::from(2))
        }
    }
}

/// Places a point and waits until the shipper reports it acknowledged by the target.
pub fn create(
    volume: &str,
    app: bool,
    tracker: &Path,
    shipper: &Path,
    timeout: Duration,
) -> ExitCode {
    let kind = if app {
        PointKind::App
    } else {
        PointKind::Crash
    };
    let req = AdminRequest::Point {
        volume: volume.to_string(),
        kind,
    };
    let id = match tracker_point(tracker, &req, "redun point create") {
        Ok(id) => id,
        Err(code) => return code,
    };
    let deadline = Instant::now() + timeout;
    let mut last: String;
    loop {
        match admin::request_json(shipper, &serde_json::json!({"cmd": "status"})) {
            Ok(v) => {
                let vols = v["status"]["volumes"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                match vols.iter().find(|x| x["name"] == volume) {
                    Some(x) if x["acked_seq"].as_u64().is_some_and(|a| a >= id) => {
                        println!("{id}");
                        return ExitCode::SUCCESS;
                    }
                    Some(x) => {
                        last = format!(
                            "the shipper is {} (acknowledged through seq {})",
                            x["state"].as_str().unwrap_or("?"),
                            x["acked_seq"]
                        );
                    }
                    None => last = format!("the shipper does not ship volume {volume}"),
                }
            }
            Err(e) => {
                last = format!(
                    "cannot reach the shipper on {}: {e} (--shipper-socket)",
                    shipper.display()
                );
            }
        }
        if Instant::now() >= deadline {
            eprintln!(
                "redun point create: point {id} is in volume {volume}'s journal, but the target \
                 did not have it within {timeout:?}: {last}; it becomes usable once shipped"
            );
            return ExitCode::from(1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lists a volume's points as the target has them.
pub fn list(volume: &str, json: bool, target: &Path) -> ExitCode {
    let req = serde_json::json!({"cmd": "points", "volume": volume});
    let v = match ask_or_exit("points", Daemon::Target, target, &req) {
        Ok(v) => v,
        Err(code) => return code,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&v["points"]).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    // Each entry is a store point with `usable` beside it.
    let points = v["points"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let point = serde_json::from_value::<Point>(p.clone()).ok()?;
            Some((point, p["usable"] == true))
        });
    print_table(points, &format!("volume {volume}"));
    ExitCode::SUCCESS
}

/// The table of a volume's points, each with whether it can be read: the target's and a
/// bucket's alike.
pub(crate) fn print_table(points: impl Iterator<Item = (Point, bool)>, of: &str) {
    println!("{:>12}  {:<24}  {:<5}  USABLE", "ID", "TIME (UTC)", "KIND");
    let mut none = true;
    for (p, usable) in points {
        none = false;
        println!(
            "{:>12}  {:<24}  {:<5}  {}",
            p.id,
            utc(p.unix_ms),
            p.kind.name(),
            if usable { "yes" } else { "no" }
        );
    }
    if none {
        println!("(no recovery points yet for {of})");
    }
}

/// `redun point group`: a consistency-group round from the local tracker.
pub fn group(app: bool, tracker: &Path) -> ExitCode {
    let kind = if app {
        PointKind::App
    } else {
        PointKind::Crash
    };
    match group_round(tracker, None, kind, false, "redun point group") {
        Ok(id) => {
            println!("{id}");
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// Runs a group round from the tracker (as `cmd`): the committed group point's id. With
/// `group`, the tracker refuses unless it is a member of that group.
pub(crate) fn group_round(
    tracker: &Path,
    group: Option<&str>,
    kind: PointKind,
    fence: bool,
    cmd: &str,
) -> Result<u64, ExitCode> {
    let req = AdminRequest::GroupPoint {
        kind,
        fence,
        group: group.map(String::from),
    };
    tracker_ask(tracker, &req, cmd)?.group_point.ok_or_else(|| {
        eprintln!("{cmd}: the tracker answered without a group point");
        ExitCode::from(1)
    })
}

/// The group's complete points as the target lists them.
pub(crate) fn group_points(
    cmd: &str,
    group: &str,
    target: &Path,
) -> Result<Vec<GroupPoint>, ExitCode> {
    let req = serde_json::json!({"cmd": "points", "group": group});
    let mut v = ask_or_exit(cmd, Daemon::Target, target, &req)?;
    serde_json::from_value(v["points"].take()).map_err(|e| {
        eprintln!("redun {cmd}: the target's list of group {group}'s points is unreadable: {e}");
        ExitCode::from(1)
    })
}

/// Runs `f(volume, point)` for every member volume of group point `id` (the newest usable
/// one when `None`) of `group`; returns the group point's id, or the exit status of the
/// last member that failed (after trying them all).
pub(crate) fn on_group_point(
    cmd: &str,
    group: &str,
    id: Option<u64>,
    target: &Path,
    f: impl FnMut(&str, u64) -> ExitCode,
) -> Result<u64, ExitCode> {
    let points = group_points(cmd, group, target)?;
    let chosen = match id {
        Some(id) => points.iter().find(|p| p.id == id),
        None => points.iter().rev().find(|p| p.usable),
    };
    let Some(chosen) = chosen else {
        eprintln!(
            "redun {cmd}: group {group} has no {} on this target (redun points --group {group})",
            id.map_or_else(
                || "usable point".into(),
                |id| format!("complete point {id}")
            )
        );
        return Err(ExitCode::from(1));
    };
    on_members(chosen, f)
}

/// Runs `f(volume, point)` for every member volume of group point `p`; returns its id, or
/// the exit status of the last member that failed (after trying them all).
pub(crate) fn on_members(
    p: &GroupPoint,
    mut f: impl FnMut(&str, u64) -> ExitCode,
) -> Result<u64, ExitCode> {
    let mut code = ExitCode::SUCCESS;
    for m in &p.volumes {
        let r = f(&m.volume, m.point);
        if r != ExitCode::SUCCESS {
            code = r;
        }
    }
    if code == ExitCode::SUCCESS {
        Ok(p.id)
    } else {
        Err(code)
    }
}

/// Lists a consistency group's points: one line per point, its member volumes' points.
pub fn list_group(group: &str, json: bool, target: &Path) -> ExitCode {
    let points = match group_points("points", group, target) {
        Ok(p) => p,
        Err(code) => return code,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&points).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    println!(
        "{:>20}  {:<24}  {:<5}  {:<6}  VOLUMES (VOLUME:POINT)",
        "ID", "TIME (UTC)", "KIND", "USABLE"
    );
    for p in &points {
        let vols: Vec<String> = p
            .volumes
            .iter()
            .map(|m| format!("{}:{}", m.volume, m.point))
            .collect();
        println!(
            "{:>20}  {:<24}  {:<5}  {:<6}  {}",
            p.id,
            utc(p.unix_ms),
            p.kind.name(),
            if p.usable { "yes" } else { "no" },
            vols.join(" ")
        );
    }
    if points.is_empty() {
        println!("(no complete points yet for group {group})");
    }
    ExitCode::SUCCESS
}

/// `redun test-failover start|cleanup --group`: every member volume at one group point.
pub fn test_failover_group(group: &str, start: Option<Option<u64>>, target: &Path) -> ExitCode {
    let id = start.flatten();
    let r = on_group_point("test-failover", group, id, target, |volume, point| {
        test_failover(volume, start.map(|_| Some(point)), target)
    });
    match r {
        Ok(id) if start.is_some() => {
            println!("group {group}: every member volume serves group point {id}");
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

/// `YYYY-MM-DD HH:MM:SS.mmm` in UTC, from milliseconds since the epoch.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

/// `redun test-failover start|cleanup`: asks the target; prints what it did.
pub fn test_failover(volume: &str, start: Option<Option<u64>>, target: &Path) -> ExitCode {
    let req = match start {
        Some(point) => serde_json::json!({
            "cmd": "test-failover-start", "volume": volume, "point": point,
        }),
        None => serde_json::json!({"cmd": "test-failover-cleanup", "volume": volume}),
    };
    let t = Instant::now();
    match ask_or_exit("test-failover", Daemon::Target, target, &req) {
        Ok(v) => {
            let tf = &v["test_failover"];
            if start.is_some() {
                println!(
                    "{} serves point {} of volume {volume}, writable; writes go to a scratch \
                     overlay and never reach the replica (ready in {:.0?})",
                    tf["export"].as_str().unwrap_or("?"),
                    tf["point"],
                    t.elapsed()
                );
            } else {
                println!(
                    "test failover of volume {volume} cleaned up: {} bytes written to the \
                     overlay discarded",
                    tf["bytes_written"]
                );
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(super::utc(1_795_392_000_123), "2026-11-23 00:00:00.123");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00.000");
    }
}
