//! The `[shipper]` section of the TOML config file (`--config FILE`, the same file the tracker
//! reads; other sections are the other daemons' business). Flags override it.

use std::path::{Path, PathBuf};

use redun_tracker::config::ConfigError;
use serde::Deserialize;

use crate::throttle::{Schedule, Window, parse_rate};

#[derive(Debug, Default, Deserialize)]
pub struct ConfigFile {
    #[serde(default)]
    pub shipper: ShipperSection,
    #[serde(default)]
    pub resync: ResyncSection,
    /// `[bucket]`: endpoint and credentials of `shipper.target_store`.
    #[serde(default)]
    pub bucket: redun_store::bucket::BucketOptions,
    /// `[retention]`: the points kept in `shipper.target_store` (the target's keys).
    #[serde(default)]
    pub retention: redun_store::retention::RetentionSection,
}

/// `[resync]`: when synchronisations start by themselves.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncSection {
    /// `HH:MM-HH:MM`, local time: automatic resyncs (after an overflow or an unclean stop)
    /// wait for it; initial replications and `redun resync` do not.
    pub window: Option<String>,
    /// The block compared and sent, a power of two from 4K to 4M [default: 64K].
    pub block_size: Option<String>,
    /// Verify every volume online this often, e.g. "7d" [default: only by hand].
    pub verify_every: Option<String>,
}

impl ResyncSection {
    /// The block size, with `flag` (`--sync-block-size`) over the file.
    pub fn block_size(&self, path: &Path, flag: Option<&str>) -> Result<u64, ConfigError> {
        let (key, v) = match (flag, self.block_size.as_deref()) {
            (Some(f), _) => ("--sync-block-size", f),
            (None, Some(v)) => ("resync.block_size", v),
            (None, None) => return Ok(crate::sync::DEFAULT_BLOCK),
        };
        redun_tracker::track::parse_size(v)
            .and_then(|b| {
                if b.is_power_of_two() && (4096..=4 << 20).contains(&b) {
                    Ok(b)
                } else {
                    Err("expected a power of two from 4K to 4M, e.g. 64K".into())
                }
            })
            .map_err(|why| ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!("{key} = {v:?}: {why}"),
            })
    }

    /// How often every volume is verified online (`None`: only by hand).
    pub fn verify_every(&self, path: &Path) -> Result<Option<std::time::Duration>, ConfigError> {
        let Some(v) = self.verify_every.as_deref() else {
            return Ok(None);
        };
        match redun_tracker::config::parse_duration(v) {
            Ok(0) => Ok(None),
            Ok(ms) => Ok(Some(std::time::Duration::from_millis(ms))),
            Err(why) => Err(ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!("resync.verify_every = {v:?}: {why}"),
            }),
        }
    }

    /// The window, with `flag` (`--resync-window`) over the file.
    pub fn window(&self, path: &Path, flag: Option<&str>) -> Result<Option<Window>, ConfigError> {
        let (key, v) = match (flag, self.window.as_deref()) {
            (Some(f), _) => ("--resync-window", f),
            (None, Some(v)) => ("resync.window", v),
            (None, None) => return Ok(None),
        };
        Window::parse(v)
            .map(Some)
            .map_err(|why| ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!("{key} = {v:?}: {why}"),
            })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShipperSection {
    pub journal_dir: Option<PathBuf>,
    pub tracker_socket: Option<PathBuf>,
    pub target: Option<String>,
    /// A bucket instead of a target: `s3://BUCKET/PREFIX`, `az://CONTAINER/PREFIX`,
    /// `file:///DIR`.
    pub target_store: Option<String>,
    /// Where the volumes' key files are, `NAME.key` [default: /etc/redun/keys].
    pub key_dir: Option<PathBuf>,
    /// A bucket batch is uploaded at the latest this long after its first record, e.g.
    /// "2s" [default: 2s].
    pub store_flush: Option<String>,
    /// Segments before the oldest kept point are merged into base objects once they hold
    /// this much, e.g. "64M" [default: 64M].
    pub store_merge: Option<String>,
    /// Objects no manifest lists are deleted after this long, e.g. "1h" [default: 1h].
    pub store_grace: Option<String>,
    pub target_name: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub volumes: Option<Vec<String>>,
    pub admin_socket: Option<PathBuf>,
    pub compression_level: Option<i32>,
    pub batch_size: Option<String>,
    pub generation: Option<u64>,
    pub retry_unit_ms: Option<u64>,
    /// Bytes per second on the wire, e.g. "50MiB/s", outside the scheduled windows.
    pub bandwidth_limit: Option<String>,
    #[serde(default)]
    pub bandwidth_schedule: Vec<ScheduleEntry>,
    /// An RPO above this (e.g. "30s") is a warning in status, in the metrics and in the log.
    pub rpo_warning: Option<String>,
    /// `metrics.listen = "127.0.0.1:9751"` inside `[shipper]`.
    #[serde(default)]
    pub metrics: redun_tracker::config::MetricsSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleEntry {
    /// `HH:MM-HH:MM`, local time.
    pub window: String,
    /// A rate, or `unlimited`.
    pub limit: String,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        redun_tracker::config::load_toml(path)
    }
}

impl ShipperSection {
    /// The bandwidth schedule, with `flag` (`--bandwidth-limit`) over `bandwidth_limit`.
    pub fn schedule(&self, path: &Path, flag: Option<&str>) -> Result<Schedule, ConfigError> {
        let bad = |key: &str, value: &str, why: String| ConfigError::Parse {
            path: path.to_path_buf(),
            message: format!("{key} = {value:?}: {why}"),
        };
        let default = match (flag, self.bandwidth_limit.as_deref()) {
            (Some(f), _) => parse_rate(f).map_err(|e| bad("--bandwidth-limit", f, e))?,
            (None, Some(v)) => parse_rate(v).map_err(|e| bad("shipper.bandwidth_limit", v, e))?,
            (None, None) => None,
        };
        let mut windows = Vec::new();
        for (i, e) in self.bandwidth_schedule.iter().enumerate() {
            let w = Window::parse(&e.window).map_err(|why| {
                bad(
                    &format!("shipper.bandwidth_schedule[{i}].window"),
                    &e.window,
                    why,
                )
            })?;
            let l = parse_rate(&e.limit).map_err(|why| {
                bad(
                    &format!("shipper.bandwidth_schedule[{i}].limit"),
                    &e.limit,
                    why,
                )
            })?;
            windows.push((w, l));
        }
        Ok(Schedule { default, windows })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_parses_and_names_bad_keys() {
        let f: ConfigFile = toml::from_str(
            "[tracker]\nlisten = [\"127.0.0.1:1\"]\n[shipper]\ntarget = \"dr:9443\"\n\
             bandwidth_limit = \"50MiB/s\"\n[[shipper.bandwidth_schedule]]\n\
             window = \"08:00-18:00\"\nlimit = \"10M\"\n",
        )
        .unwrap();
        let s = f.shipper.schedule(Path::new("x.toml"), None).unwrap();
        assert_eq!(s.default, Some(50 << 20));
        assert_eq!(s.limit_at(9 * 3600), Some(10 << 20));
        let s = f.shipper.schedule(Path::new("x.toml"), Some("1M")).unwrap();
        assert_eq!(s.default, Some(1 << 20));
        let f: ConfigFile = toml::from_str("[resync]\nwindow = \"22:00-06:00\"\n").unwrap();
        let w = f.resync.window(Path::new("x.toml"), None).unwrap().unwrap();
        assert!(w.contains(23 * 3600) && w.contains(3600) && !w.contains(12 * 3600));
        let f: ConfigFile = toml::from_str("[resync]\nwindow = \"late\"\n").unwrap();
        let e = f
            .resync
            .window(Path::new("x.toml"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("resync.window") && e.contains("late"), "{e}");
        let e = toml::from_str::<ConfigFile>("[shipper]\ntargett = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("targett"), "{e}");
        let f: ConfigFile =
            toml::from_str("[[shipper.bandwidth_schedule]]\nwindow = \"8-18\"\nlimit = \"1M\"\n")
                .unwrap();
        let e = f
            .shipper
            .schedule(Path::new("x.toml"), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bandwidth_schedule[0].window") && e.contains("x.toml"),
            "{e}"
        );
    }
}
