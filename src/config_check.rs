//! `redun config check FILE`: the validation every daemon runs at start, without starting
//! anything. Each section is checked by its daemon's own code.

use std::path::Path;
use std::process::ExitCode;

use redun_tracker::config::{self as tracker_config, JournalFlags};

/// Nearest existing directory at or above `p`.
fn check_tracker(path: &Path, problems: &mut Vec<String>, notes: &mut Vec<String>) {
    let file = match tracker_config::ConfigFile::load(path) {
        Ok(f) => f,
        Err(e) => return problems.push(e.to_string()),
    };
    if file.volume.is_empty() {
        notes.push("tracker: no [[volume]] entries (fine on a host that runs no tracker)".into());
        return;
    }
    let cfg = match tracker_config::merge(file, vec![], vec![], None, None, JournalFlags::default())
    {
        Ok(c) => c,
        Err(e) => return problems.push(format!("config {}: {e}", path.display())),
    };
    for v in &cfg.volumes {
        if let Err(e) = std::fs::metadata(&v.path) {
            problems.push(format!(
                "config {}: volume {:?}: path {} cannot be used ({e}): give an existing file or \
                 block device in volume.path",
                path.display(),
                v.name,
                v.path.display()
            ));
        }
    }
    if let Err(e) = tracker_config::check_journal_space(&cfg) {
        problems.push(format!("config {}: {e}", path.display()));
    }
    notes.push(format!(
        "tracker: {} volume(s), journals in {}",
        cfg.volumes.len(),
        cfg.journal_dir
            .as_ref()
            .map_or("(none: untracked)".to_string(), |d| d.display().to_string())
    ));
}

fn check_files(
    path: &Path,
    section: &str,
    files: &[(&str, Option<&Path>)],
    problems: &mut Vec<String>,
) {
    for (key, f) in files {
        if let Some(f) = f {
            if let Err(e) = std::fs::metadata(f) {
                problems.push(format!(
                    "config {}: {section}.{key} = {:?}: {e}",
                    path.display(),
                    f.display()
                ));
            }
        }
    }
}

fn check_shipper(path: &Path, problems: &mut Vec<String>, notes: &mut Vec<String>) {
    let (s, resync) = match redun_shipper::config::ConfigFile::load(path) {
        Ok(f) => (f.shipper, f.resync),
        Err(e) => return problems.push(e.to_string()),
    };
    if let Err(e) = s.schedule(path, None) {
        problems.push(e.to_string());
    }
    if let Err(e) = resync.window(path, None) {
        problems.push(e.to_string());
    }
    if let Err(e) = resync.block_size(path, None) {
        problems.push(e.to_string());
    }
    if let Err(e) = resync.verify_every(path) {
        problems.push(e.to_string());
    }
    if let Some(b) = &s.batch_size {
        if let Err(e) = redun_tracker::track::parse_size(b) {
            problems.push(format!(
                "config {}: shipper.batch_size = {b:?}: {e}",
                path.display()
            ));
        }
    }
    if let Some(r) = &s.rpo_warning {
        if let Err(e) = redun_tracker::config::parse_duration(r) {
            problems.push(format!(
                "config {}: shipper.rpo_warning = {r:?}: {e}",
                path.display()
            ));
        }
    }
    if let Err(e) = s.metrics.validate("shipper") {
        problems.push(format!("config {}: {e}", path.display()));
    }
    if let Some(l) = s.compression_level.filter(|l| !(1..=19).contains(l)) {
        problems.push(format!(
            "config {}: shipper.compression_level = {l}: use 1 to 19",
            path.display()
        ));
    }
    check_files(
        path,
        "shipper",
        &[
            ("tls_ca", s.tls_ca.as_deref()),
            ("tls_cert", s.tls_cert.as_deref()),
            ("tls_key", s.tls_key.as_deref()),
        ],
        problems,
    );
    if s.target.is_some() {
        notes.push(format!(
            "shipper: ships to {}",
            s.target.as_deref().unwrap_or("")
        ));
    }
}

fn check_target(path: &Path, problems: &mut Vec<String>, notes: &mut Vec<String>) {
    let (t, retention) = match redun_target::config::ConfigFile::load(path) {
        Ok(f) => (f.target, f.retention),
        Err(e) => return problems.push(e.to_string()),
    };
    if let Err(e) = t.validate(path) {
        problems.push(e.to_string());
    }
    if let Err(e) = retention.policy(path) {
        problems.push(e.to_string());
    }
    check_files(
        path,
        "target",
        &[
            ("tls_ca", t.tls_ca.as_deref()),
            ("tls_cert", t.tls_cert.as_deref()),
            ("tls_key", t.tls_key.as_deref()),
        ],
        problems,
    );
    if let Some(d) = &t.data_dir {
        notes.push(format!("target: replicas in {}", d.display()));
    }
}

fn check_bucket(path: &Path, problems: &mut Vec<String>, notes: &mut Vec<String>) {
    match crate::restore::options(path) {
        Ok(o) if o != redun_store::bucket::BucketOptions::default() => notes.push(format!(
            "bucket: endpoint {}",
            o.endpoint.as_deref().unwrap_or("(the provider's)")
        )),
        Ok(_) => {}
        Err(e) => problems.push(e),
    }
}

/// Prints what each daemon would say of `path`; exit 1 when any section is wrong.
pub fn run(path: &Path) -> ExitCode {
    if let Err(e) = std::fs::read_to_string(path) {
        eprintln!("redun config check: cannot read {}: {e}", path.display());
        return ExitCode::from(2);
    }
    let (mut problems, mut notes) = (Vec::new(), Vec::new());
    check_tracker(path, &mut problems, &mut notes);
    check_shipper(path, &mut problems, &mut notes);
    check_bucket(path, &mut problems, &mut notes);
    check_target(path, &mut problems, &mut notes);
    // A file every daemon fails to parse is said once, not once per daemon.
    let mut seen = std::collections::HashSet::new();
    problems.retain(|p| seen.insert(p.clone()));
    for n in &notes {
        println!("{n}");
    }
    if problems.is_empty() {
        println!("{}: valid", path.display());
        return ExitCode::SUCCESS;
    }
    for p in &problems {
        eprintln!("error: {p}");
    }
    ExitCode::from(1)
}
