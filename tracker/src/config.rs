//! The tracker's settings: command-line flags over the `[tracker]` and `[[volume]]` sections
//! of the TOML config file (`/etc/redun/redun.toml` by convention, `--config FILE`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::io::EngineChoice;
use crate::nbd::ListenAddr;
use crate::track::{LogOptions, OnFull};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/redun/tracker.sock";
/// Crash-consistent points every 5 s unless configured.
pub const DEFAULT_CRASH_INTERVAL_MS: u64 = 5000;
/// Where journals live unless configured (changes are always tracked but with `--no-journal`).
pub const DEFAULT_JOURNAL_DIR: &str = "/var/lib/redun/journal";

/// The whole config file. Sections of the other daemons are accepted and ignored here.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub tracker: TrackerSection,
    #[serde(default)]
    pub volume: Vec<VolumeEntry>,
    #[serde(default)]
    pub shipper: Option<toml::Table>,
    #[serde(default)]
    pub target: Option<toml::Table>,
    #[serde(default)]
    pub points: PointsSection,
    /// The target's retention policy (redun-target reads it).
    #[serde(default)]
    pub retention: Option<toml::Table>,
    /// When automatic resyncs may run (redun-shipper reads it).
    #[serde(default)]
    pub resync: Option<toml::Table>,
    /// The consistency group this tracker's volumes belong to.
    #[serde(default)]
    pub group: Option<crate::group::GroupSection>,
    /// How to reach object storage (the shipper, the target and the CLI read it).
    #[serde(default)]
    pub bucket: Option<toml::Table>,
}

/// `[points]`: recovery points the tracker places.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointsSection {
    /// How often a crash-consistent marker is placed in each written volume's journal, e.g.
    /// "5s" [default: 5s]; "0" turns scheduled points off.
    pub crash_interval: Option<String>,
    /// How often an app-consistent point (with the volume's hooks) is taken in each volume
    /// that has hooks, e.g. "15m" [default: 0, only on demand].
    pub app_interval: Option<String>,
    /// How long a hook may run before it is killed [default: 30s].
    pub hook_timeout: Option<String>,
}

/// Parses a duration: a number followed by `ms`, `s`, `m`, `h` or `d` ("0" alone is zero).
/// Returns milliseconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(0);
    }
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit: write e.g. 500ms, 5s, 10m, 2h or 7d"))?;
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: write e.g. 500ms, 5s, 10m, 2h or 7d"))?;
    let per = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ));
        }
    };
    n.checked_mul(per)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackerSection {
    pub listen: Option<Vec<String>>,
    pub admin_socket: Option<PathBuf>,
    pub backend: Option<EngineChoice>,
    /// `[tracker.journal]`, or `journal.KEY = ...` inside `[tracker]`.
    #[serde(default)]
    pub journal: JournalSection,
    /// `metrics.listen = "127.0.0.1:9750"` inside `[tracker]`.
    #[serde(default)]
    pub metrics: MetricsSection,
}

/// `metrics.*` inside a daemon's section.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// `HOST:PORT` of the Prometheus listener (off when absent).
    pub listen: Option<String>,
}

impl MetricsSection {
    /// Checks the address, naming `section.metrics.listen` when it does not parse.
    pub fn validate(&self, section: &str) -> Result<(), String> {
        match &self.listen {
            Some(l) => l.parse::<std::net::SocketAddr>().map(|_| ()).map_err(|e| {
                format!(
                    "{section}.metrics.listen = {l:?}: {e} (expected IP:PORT, e.g. 127.0.0.1:9750)"
                )
            }),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalSection {
    /// One journal file per volume in this directory [default: /var/lib/redun/journal].
    pub dir: Option<PathBuf>,
    /// Size of each journal, e.g. "1G".
    pub size: Option<String>,
    /// What a full journal does: "bitmap" (default) or "block".
    pub on_full: Option<OnFull>,
    /// Unreleased share of the journal (percent) at which it counts as full [default: 100].
    pub full_percent: Option<u8>,
    /// Dirty-region size of a new region map, e.g. "64K".
    pub region_size: Option<String>,
    /// Most acknowledged write data held in memory until applied, e.g. "256M".
    pub memory: Option<String>,
    /// Longest a record waits for its journal sync while nobody waits for one, e.g. "100ms".
    pub sync_interval: Option<String>,
    /// Never journal (benchmarks only).
    pub disabled: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VolumeEntry {
    pub name: String,
    pub path: PathBuf,
    /// Freezes the application for an app-consistent point (`sh -c`), e.g.
    /// "fsfreeze -f /mnt/db".
    #[serde(default)]
    pub pre_hook: Option<String>,
    /// Thaws it again; runs even when the freeze or the point failed.
    #[serde(default)]
    pub post_hook: Option<String>,
}

/// Settings after merging flags and file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerConfig {
    pub volumes: Vec<VolumeEntry>,
    pub listen: Vec<ListenAddr>,
    pub admin_socket: PathBuf,
    pub backend: EngineChoice,
    /// Where journals live; `None` when changes are not tracked.
    pub journal_dir: Option<PathBuf>,
    pub journal_size: u64,
    pub on_full: OnFull,
    pub full_percent: u8,
    pub region_size: u64,
    /// `journal.memory`: most unapplied write data held in memory per volume.
    pub pending_max: u64,
    /// `journal.sync_interval`, in milliseconds.
    pub sync_interval_ms: u64,
    /// Crash-consistent markers every this many milliseconds (0: only on demand).
    pub crash_interval_ms: u64,
    /// App-consistent points every this many milliseconds (0: only on demand).
    pub app_interval_ms: u64,
    pub hook_timeout_ms: u64,
    /// Prometheus listener (`tracker.metrics.listen`).
    pub metrics_listen: Option<String>,
    /// `[group]`, validated.
    pub group: Option<crate::group::GroupConfig>,
}

impl TrackerConfig {
    /// The change-log settings of volume `name`.
    pub fn log_options(&self, name: &str) -> LogOptions {
        LogOptions {
            size: self.journal_size,
            on_full: self.on_full,
            region: self.region_size,
            full_percent: self.full_percent,
            grouped: self.group.as_ref().is_some_and(|g| g.includes(name)),
            pending_max: self.pending_max,
            sync_interval: std::time::Duration::from_millis(self.sync_interval_ms),
        }
    }
}

pub use crate::track::DEFAULT_JOURNAL_SIZE;

/// Journal flags, merged like the others.
#[derive(Debug, Clone, Default)]
pub struct JournalFlags {
    pub dir: Option<PathBuf>,
    pub size: Option<u64>,
    pub on_full: Option<OnFull>,
    pub full_percent: Option<u8>,
    pub region_size: Option<u64>,
    pub disabled: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        load_toml(path)
    }
}

/// Reads the config file at `path` as `T`: each daemon reads its own section of the one file
/// with this (the shipper and the target too), so every daemon reports a file it cannot read
/// or parse the same way.
pub fn load_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: toml_message(&text, &e),
    })
}

/// One line for a TOML error: where, the line as written (key and value), and what is
/// expected (toml's own message).
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let line = text.lines().nth(line_no - 1).unwrap_or("");
            // Comments are the reader's, not part of the value.
            let line = line.split(" #").next().unwrap_or(line).trim();
            format!("line {line_no}: {line}: {what}")
        }
        None => what,
    }
}

/// Parses `NAME=PATH` of `--volume`.
pub fn parse_volume_flag(s: &str) -> Result<VolumeEntry, String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("--volume {s:?}: expected NAME=PATH, e.g. db=/dev/sdb"))?;
    Ok(VolumeEntry {
        name: name.to_string(),
        path: PathBuf::from(path),
        pre_hook: None,
        post_hook: None,
    })
}

/// Checks a volume name: it names the journal, the region map and the target's replica files.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "volume name {name:?} is invalid: use 1 to 64 characters of A-Z a-z 0-9 - _ ."
        ))
    }
}

/// Checks that the journals still to be created fit in their directory's filesystem, before
/// anything is created.
pub fn check_journal_space(cfg: &TrackerConfig) -> Result<(), String> {
    let Some(dir) = &cfg.journal_dir else {
        return Ok(());
    };
    let new = cfg
        .volumes
        .iter()
        .filter(|v| !dir.join(format!("{}.journal", v.name)).exists())
        .count() as u64;
    let need = new.saturating_mul(cfg.journal_size);
    let Some(base) = dir.ancestors().find(|a| a.is_dir()) else {
        return Ok(());
    };
    let Ok(st) = nix::sys::statvfs::statvfs(base) else {
        return Ok(());
    };
    let free = st.blocks_available().saturating_mul(st.fragment_size());
    if need > free {
        return Err(format!(
            "tracker.journal.size (--journal-size) = {}: {new} new journal(s) need {need} bytes \
             in {} but only {free} are free: lower tracker.journal.size or choose another \
             tracker.journal.dir",
            cfg.journal_size,
            dir.display()
        ));
    }
    Ok(())
}

/// Merges flags over the file: flag volumes add to the file's, other flags replace.
pub fn merge(
    file: ConfigFile,
    volumes: Vec<VolumeEntry>,
    listen: Vec<String>,
    admin_socket: Option<PathBuf>,
    backend: Option<EngineChoice>,
    journal: JournalFlags,
) -> Result<TrackerConfig, ConfigError> {
    let mut all = file.volume;
    all.extend(volumes);
    if all.is_empty() {
        return Err(ConfigError::Invalid(
            "no volumes: give --volume NAME=PATH or [[volume]] entries in the config file".into(),
        ));
    }
    let mut seen = HashSet::new();
    for v in &all {
        check_name(&v.name).map_err(ConfigError::Invalid)?;
        if !seen.insert(v.name.clone()) {
            return Err(ConfigError::Invalid(format!(
                "volume {:?} is defined twice",
                v.name
            )));
        }
    }
    let listen = if !listen.is_empty() {
        listen
    } else {
        file.tracker
            .listen
            .unwrap_or_else(|| vec![DEFAULT_LISTEN.to_string()])
    };
    let listen = listen
        .iter()
        .map(|l| {
            l.parse::<ListenAddr>()
                .map_err(|e| ConfigError::Invalid(format!("tracker.listen (--listen): {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let fj = file.tracker.journal;
    let journal_size = match (journal.size, &fj.size) {
        (Some(s), _) => s,
        (None, Some(s)) => crate::track::parse_size(s)
            .map_err(|e| ConfigError::Invalid(format!("tracker.journal.size: {e}")))?,
        (None, None) => DEFAULT_JOURNAL_SIZE,
    };
    let disabled = journal.disabled || fj.disabled.unwrap_or(false);
    let journal_dir = if disabled {
        None
    } else {
        Some(
            journal
                .dir
                .or(fj.dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_JOURNAL_DIR)),
        )
    };
    let duration = |key: &str, v: &Option<String>, default: u64| match v {
        Some(s) => parse_duration(s)
            .map_err(|e| ConfigError::Invalid(format!("points.{key} = {s:?}: {e}"))),
        None => Ok(default),
    };
    let crash_interval_ms = duration(
        "crash_interval",
        &file.points.crash_interval,
        DEFAULT_CRASH_INTERVAL_MS,
    )?;
    let app_interval_ms = duration("app_interval", &file.points.app_interval, 0)?;
    let hook_timeout_ms = duration("hook_timeout", &file.points.hook_timeout, 30_000)?;
    if hook_timeout_ms == 0 {
        return Err(ConfigError::Invalid(
            "points.hook_timeout = \"0\": a hook needs some time, e.g. \"30s\"".into(),
        ));
    }
    file.tracker
        .metrics
        .validate("tracker")
        .map_err(ConfigError::Invalid)?;
    let names: Vec<String> = all.iter().map(|v| v.name.clone()).collect();
    let group = file
        .group
        .as_ref()
        .map(|g| g.validate(&names))
        .transpose()
        .map_err(ConfigError::Invalid)?;
    Ok(TrackerConfig {
        group,
        metrics_listen: file.tracker.metrics.listen.clone(),
        crash_interval_ms,
        app_interval_ms,
        hook_timeout_ms,
        journal_dir,
        journal_size,
        on_full: journal.on_full.or(fj.on_full).unwrap_or_default(),
        full_percent: match journal.full_percent.or(fj.full_percent) {
            None => 100,
            Some(p @ 1..=100) => p,
            Some(p) => {
                return Err(ConfigError::Invalid(format!(
                    "tracker.journal.full_percent = {p}: expected a percentage from 1 to 100"
                )));
            }
        },
        region_size: match (journal.region_size, &fj.region_size) {
            (Some(r), _) => r,
            (None, Some(r)) => crate::track::parse_size(r)
                .and_then(crate::track::check_region)
                .map_err(|e| ConfigError::Invalid(format!("tracker.journal.region_size: {e}")))?,
            (None, None) => crate::track::DEFAULT_REGION,
        },
        pending_max: match &fj.memory {
            None => crate::track::DEFAULT_PENDING_MAX,
            Some(m) => crate::track::parse_size(m)
                .and_then(|m| {
                    if m >= 1 << 20 {
                        Ok(m)
                    } else {
                        Err(format!("{m} bytes: at least 1M"))
                    }
                })
                .map_err(|e| ConfigError::Invalid(format!("tracker.journal.memory: {e}")))?,
        },
        sync_interval_ms: match &fj.sync_interval {
            None => crate::track::DEFAULT_SYNC_INTERVAL_MS,
            Some(s) => parse_duration(s)
                .and_then(|ms| {
                    if ms <= 10_000 {
                        Ok(ms)
                    } else {
                        Err("at most 10s: the shipper and the applier wait that long".into())
                    }
                })
                .map_err(|e| {
                    ConfigError::Invalid(format!("tracker.journal.sync_interval = {s:?}: {e}"))
                })?,
        },
        volumes: all,
        listen,
        admin_socket: admin_socket
            .or(file.tracker.admin_socket)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET)),
        backend: backend
            .or(file.tracker.backend)
            .unwrap_or(EngineChoice::Auto),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("5s"), Ok(5000));
        assert_eq!(parse_duration("500ms"), Ok(500));
        assert_eq!(parse_duration("2h"), Ok(7_200_000));
        assert_eq!(parse_duration("7d"), Ok(604_800_000));
        assert_eq!(parse_duration("0"), Ok(0));
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(parse_duration("5w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("x5s").is_err());
    }

    #[test]
    fn file_and_flags_merge() {
        let f: ConfigFile = toml::from_str(
            r#"
            [tracker]
            listen = ["unix:/tmp/a.sock"]
            backend = "sync"
            journal.dir = "/srv/journal"
            journal.size = "256M"
            journal.on_full = "block"
            journal.full_percent = 80
            journal.region_size = "1M"
            [[volume]]
            name = "db"
            path = "/tmp/db.img"
            [shipper]
            anything = 1
            "#,
        )
        .unwrap();
        let c = merge(
            f,
            vec![parse_volume_flag("x=/tmp/x").unwrap()],
            vec![],
            None,
            None,
            JournalFlags::default(),
        )
        .unwrap();
        assert_eq!(c.volumes.len(), 2);
        assert_eq!(c.journal_dir, Some(PathBuf::from("/srv/journal")));
        assert_eq!(c.journal_size, 256 << 20);
        assert_eq!(c.on_full, OnFull::Block);
        assert_eq!((c.full_percent, c.region_size), (80, 1 << 20));
        let off = JournalFlags {
            disabled: true,
            ..JournalFlags::default()
        };
        let f2: ConfigFile = toml::from_str("[tracker.journal]\ndir = \"/j\"\n").unwrap();
        let c2 = merge(
            f2,
            vec![parse_volume_flag("x=/x").unwrap()],
            vec![],
            None,
            None,
            off,
        )
        .unwrap();
        assert_eq!(c2.journal_dir, None);
        assert_eq!(c2.on_full, OnFull::Bitmap);
        // Tracking is the default.
        let c3 = merge(
            ConfigFile::default(),
            vec![parse_volume_flag("x=/x").unwrap()],
            vec![],
            None,
            None,
            JournalFlags::default(),
        )
        .unwrap();
        assert_eq!(c3.journal_dir, Some(PathBuf::from(DEFAULT_JOURNAL_DIR)));
        assert_eq!(c3.journal_size, DEFAULT_JOURNAL_SIZE);
        assert_eq!(c3.log_options("db"), LogOptions::default());
        for (bad, what) in [
            ("journal.full_percent = 0", "full_percent = 0"),
            ("journal.full_percent = 150", "full_percent = 150"),
            ("journal.region_size = \"3K\"", "region size 3072"),
            ("journal.region_size = \"64X\"", "unknown unit"),
        ] {
            let f: ConfigFile = toml::from_str(&format!("[tracker]\n{bad}\n")).unwrap();
            let e = merge(
                f,
                vec![parse_volume_flag("x=/x").unwrap()],
                vec![],
                None,
                None,
                JournalFlags::default(),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(what), "{bad}: {e}");
        }
        assert_eq!(c.backend, EngineChoice::Sync);
        assert_eq!(c.listen, vec![ListenAddr::Unix("/tmp/a.sock".into())]);
        assert_eq!(c.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
    }

    #[test]
    fn errors_name_the_problem() {
        let e = toml::from_str::<ConfigFile>("[tracker]\nlisten_addr = 1\n").unwrap_err();
        assert!(e.to_string().contains("listen_addr"), "{e}");
        let e = toml::from_str::<ConfigFile>("[tracker]\nbackend = \"fast\"\n").unwrap_err();
        assert!(e.to_string().contains("fast"), "{e}");
        let e =
            toml::from_str::<ConfigFile>("[tracker]\njournal.on_full = \"drop\"\n").unwrap_err();
        assert!(e.to_string().contains("drop"), "{e}");
        let e = toml::from_str::<ConfigFile>("[tracker]\njournal.sise = \"1G\"\n").unwrap_err();
        assert!(e.to_string().contains("sise"), "{e}");
        let dup = vec![
            parse_volume_flag("a=/x").unwrap(),
            parse_volume_flag("a=/y").unwrap(),
        ];
        let e = merge(
            ConfigFile::default(),
            dup,
            vec![],
            None,
            None,
            JournalFlags::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"a\" is defined twice"), "{e}");
        assert!(parse_volume_flag("nopath").is_err());
        let e = merge(
            ConfigFile::default(),
            vec![],
            vec![],
            None,
            None,
            JournalFlags::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("--volume"), "{e}");
        let bad = vec![parse_volume_flag("a b=/x").unwrap()];
        assert!(
            merge(
                ConfigFile::default(),
                bad,
                vec![],
                None,
                None,
                JournalFlags::default()
            )
            .is_err()
        );
    }

    #[test]
    fn journal_sync_interval_is_a_bounded_duration() {
        let interval = |toml_text: &str| {
            let f: ConfigFile = toml::from_str(toml_text).unwrap();
            let vols = vec![parse_volume_flag("a=/x").unwrap()];
            merge(f, vols, vec![], None, None, JournalFlags::default())
                .map(|c| c.log_options("a").sync_interval)
        };
        assert_eq!(
            interval("").unwrap(),
            std::time::Duration::from_millis(crate::track::DEFAULT_SYNC_INTERVAL_MS)
        );
        let set = "[tracker.journal]\nsync_interval = ";
        assert_eq!(
            interval(&format!("{set}\"250ms\"")).unwrap(),
            std::time::Duration::from_millis(250)
        );
        assert!(interval(&format!("{set}\"0\"")).unwrap().is_zero());
        let e = interval(&format!("{set}\"100\"")).unwrap_err().to_string();
        assert!(
            e.contains("tracker.journal.sync_interval") && e.contains("no unit"),
            "{e}"
        );
        let e = interval(&format!("{set}\"1m\"")).unwrap_err().to_string();
        assert!(e.contains("at most 10s"), "{e}");
    }
}
