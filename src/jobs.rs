//! `redun jobs`: the synchronisation jobs the shipper runs (initial replication, resync) and
//! their progress, from the shipper's status.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::ask::{Daemon, ask, ask_or_exit, volumes};

/// One job per volume that has one: (volume, job status); else says why, and the exit
/// status to end with.
fn jobs(shipper: &Path) -> Result<Vec<(String, serde_json::Value)>, ExitCode> {
    let vols = volumes(Daemon::Shipper, shipper).map_err(|e| {
        eprintln!("redun jobs: {e}");
        ExitCode::from(2)
    })?;
    Ok(vols
        .into_iter()
        .filter(|v| !v["sync"].is_null())
        .map(|v| {
            (
                v["name"].as_str().unwrap_or("?").to_string(),
                v["sync"].clone(),
            )
        })
        .collect())
}

fn mib(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0) / (1 << 20) as f64
}

fn print_table(list: &[(String, serde_json::Value)]) {
    println!(
        "{:<16} {:<20} {:<10} {:>7} {:>11} {:>11} {:>11} {:>9} {:>7}",
        "VOLUME", "JOB", "PHASE", "DONE", "COMPARED", "TOTAL", "SENT", "RATE", "ETA"
    );
    for (name, j) in list {
        let bar_len = 20usize;
        let pct = j["percent"].as_f64().unwrap_or(0.0);
        // Whole twentieths of the job: 0 to 20.
        let filled = (0..=bar_len)
            .rev()
            .find(|&k| k as f64 <= pct / 100.0 * bar_len as f64)
            .unwrap_or(0);
        println!(
            "{:<16} {:<20} {:<10} {:>6.1}% {:>7.1} MiB {:>7.1} MiB {:>7.1} MiB {:>5.0} MiB/s {:>6}  [{}{}]",
            name,
            j["kind"].as_str().unwrap_or("?"),
            j["phase"].as_str().unwrap_or("?"),
            pct,
            mib(&j["compared_bytes"]),
            mib(&j["total_bytes"]),
            mib(&j["sent_bytes"]),
            mib(&j["rate_bytes_per_second"]),
            j["eta_seconds"]
                .as_f64()
                .map_or_else(|| "-".to_string(), |s| format!("{s:.0}s")),
            "#".repeat(filled.min(bar_len)),
            "-".repeat(bar_len - filled.min(bar_len)),
        );
    }
}

pub fn show(json: bool, watch: bool, shipper: &Path) -> ExitCode {
    if watch && !json {
        return watch_bars(shipper);
    }
    loop {
        let list = match jobs(shipper) {
            Ok(l) => l,
            Err(code) => return code,
        };
        if json {
            let v: serde_json::Map<String, serde_json::Value> = list.iter().cloned().collect();
            println!("{}", serde_json::Value::Object(v));
        } else if list.is_empty() {
            println!("no synchronisation job is running: every volume's replica is in step");
        } else {
            print_table(&list);
        }
        if !watch || list.is_empty() {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `redun jobs --watch`: a live progress bar per job until every job is over.
fn watch_bars(shipper: &Path) -> ExitCode {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    use std::collections::HashMap;
    let style = ProgressStyle::with_template(
        "{prefix:<16} {msg:<32} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    )
    .expect("a valid template")
    .progress_chars("#>-");
    let multi = MultiProgress::new();
    let mut bars: HashMap<String, (u64, ProgressBar)> = HashMap::new();
    let mut seen_any = false;
    loop {
        let list = match jobs(shipper) {
            Ok(l) => l,
            Err(code) => return code,
        };
        for (name, j) in &list {
            let id = j["job"].as_u64().unwrap_or(0);
            let bar = &bars
                .entry(name.clone())
                .and_modify(|(old, b)| {
                    if *old != id {
                        b.finish();
                        *b = multi.add(ProgressBar::new(0).with_style(style.clone()));
                        *old = id;
                    }
                })
                .or_insert_with(|| (id, multi.add(ProgressBar::new(0).with_style(style.clone()))))
                .1;
            bar.set_prefix(name.clone());
            bar.set_length(j["total_bytes"].as_u64().unwrap_or(0));
            bar.set_position(j["compared_bytes"].as_u64().unwrap_or(0));
            bar.set_message(format!(
                "{} {} sent {:.1} MiB",
                j["kind"].as_str().unwrap_or("?"),
                j["phase"].as_str().unwrap_or("?"),
                mib(&j["sent_bytes"])
            ));
        }
        bars.retain(|name, (_, b)| {
            let running = list.iter().any(|(n, _)| n == name);
            if !running {
                b.finish_with_message("done");
            }
            running
        });
        if list.is_empty() {
            if !seen_any {
                println!("no synchronisation job is running: every volume's replica is in step");
            }
            return ExitCode::SUCCESS;
        }
        seen_any = true;
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `redun verify VOLUME`: asks the shipper for an online verify and waits for its result.
pub fn verify(volume: &str, json: bool, shipper: &Path) -> ExitCode {
    let req = serde_json::json!({"cmd": "verify", "volume": volume});
    let id = match ask_or_exit("verify", Daemon::Shipper, shipper, &req) {
        Ok(r) => r["verify"].as_u64().unwrap_or(0),
        Err(code) => return code,
    };
    let result = loop {
        let status = ask(
            Daemon::Shipper,
            shipper,
            &serde_json::json!({"cmd": "status"}),
        );
        let v = status.ok().and_then(|r| {
            r["status"]["volumes"]
                .as_array()?
                .iter()
                .find(|v| v["name"] == volume)
                .map(|v| v["verify"].clone())
        });
        if let Some(v) = v.filter(|v| v["id"].as_u64() == Some(id) && v["done"] == true) {
            break v;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let differing = result["differing"].as_array().cloned().unwrap_or_default();
    if json {
        println!("{result}");
    } else if differing.is_empty() {
        println!(
            "volume {volume}: {} bytes compared: the replica matches the source{}",
            result["compared_bytes"],
            match result["unsettled_bytes"].as_u64() {
                Some(n) if n > 0 => format!(" ({n} bytes kept changing and were not verified)"),
                _ => String::new(),
            }
        );
    } else {
        println!("volume {volume}: the replica differs from the source in:");
        for r in &differing {
            println!("  offset {} length {}", r[0], r[1]);
        }
        println!("repair it with `redun resync {volume} --full`");
    }
    if differing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
