//! The `[target]` section of the TOML config file (`--config FILE`, the file every redun
//! daemon reads; the other sections are the other daemons' business). Flags override it.

use std::path::{Path, PathBuf};

use redun_tracker::config::ConfigError;

pub use redun_store::retention::RetentionSection;
use serde::Deserialize;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:9443";
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/redun/target.sock";
pub const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10810";

#[derive(Debug, Default, Deserialize)]
pub struct ConfigFile {
    #[serde(default)]
    pub target: TargetSection,
    #[serde(default)]
    pub retention: RetentionSection,
    /// `[bucket]`: endpoint and credentials of `target.store`.
    #[serde(default)]
    pub bucket: redun_store::bucket::BucketOptions,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSection {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub admin_socket: Option<PathBuf>,
    /// Where recovery points are served over NBD (`HOST:PORT`, `unix:/PATH` or `off`).
    pub nbd_listen: Option<String>,
    /// Size at which a segment is sealed, e.g. "64M".
    pub segment_size: Option<String>,
    /// Serve the volumes of this bucket (`s3://BUCKET/PREFIX`, `az://CONTAINER/PREFIX`,
    /// `file:///DIR`) instead of replica stores in the data directory.
    pub store: Option<String>,
    /// Where the bucket's volume keys are (`NAME.key`) [default: /etc/redun/keys].
    pub key_dir: Option<PathBuf>,
    /// Decrypted segment data kept in memory per bucket volume, e.g. "256M".
    pub cache_size: Option<String>,
    /// `metrics.listen = "127.0.0.1:9752"` inside `[target]`.
    #[serde(default)]
    pub metrics: redun_tracker::config::MetricsSection,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        redun_tracker::config::load_toml(path)
    }
}

impl TargetSection {
    /// Checks what can be checked without starting: the listen address parses.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        if let Some(l) = &self.listen {
            l.parse::<std::net::SocketAddr>()
                .map_err(|e| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: format!(
                        "target.listen = {l:?}: {e} (expected IP:PORT, e.g. 0.0.0.0:9443)"
                    ),
                })?;
        }
        if let Some(l) = self.nbd_listen.as_deref().filter(|l| *l != "off") {
            l.parse::<redun_tracker::nbd::ListenAddr>()
                .map_err(|e| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: format!("target.nbd_listen = {l:?}: {e}"),
                })?;
        }
        self.metrics
            .validate("target")
            .map_err(|message| ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            })?;
        if let Some(v) = &self.cache_size {
            redun_tracker::track::parse_size(v).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!("target.cache_size = {v:?}: {e}"),
            })?;
        }
        if let Some(v) = &self.segment_size {
            redun_tracker::track::parse_size(v).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!("target.segment_size = {v:?}: {e}"),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redun_store::retention::{Retention, Tier};

    #[test]
    fn retention_defaults_to_tiers_that_a_section_can_replace() {
        let p = Path::new("c.toml");
        let policy = |text: &str| {
            toml::from_str::<ConfigFile>(text)
                .unwrap()
                .retention
                .policy(p)
        };
        let d = policy("").unwrap();
        assert_eq!(d, Retention::default());
        assert_eq!(d.tiers.len(), 2);
        let r = policy("[retention]\nkeep_all = \"1h\"\n").unwrap();
        assert_eq!((r.keep_all_ms, r.tiers.len()), (3_600_000, 2));
        let r = policy("[retention]\ntiers = []\n").unwrap();
        assert!(r.tiers.is_empty());
        let r = policy("[retention]\ntiers = [{ every = \"1h\", for = \"2d\" }]\n").unwrap();
        assert_eq!(
            r.tiers,
            vec![Tier {
                every_ms: 3_600_000,
                for_ms: 172_800_000
            }]
        );
        let e = policy("[retention]\ntiers = [{ every = \"1h\", for = \"soon\" }]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("retention.tiers[0].for") && e.contains("soon"),
            "{e}"
        );
    }

    #[test]
    fn the_section_parses_and_names_bad_keys() {
        let f: ConfigFile = toml::from_str(
            "[shipper]\nx = 1\n[target]\ndata_dir = \"/d\"\nlisten = \"1.2.3.4:9\"\n",
        )
        .unwrap();
        assert_eq!(f.target.data_dir.as_deref(), Some(Path::new("/d")));
        f.target.validate(Path::new("c.toml")).unwrap();
        let e = toml::from_str::<ConfigFile>("[target]\ndatadir = \"/d\"\n").unwrap_err();
        assert!(e.to_string().contains("datadir"), "{e}");
        let bad = TargetSection {
            listen: Some("everywhere".into()),
            ..Default::default()
        };
        let e = bad.validate(Path::new("c.toml")).unwrap_err().to_string();
        assert!(
            e.contains("target.listen") && e.contains("everywhere"),
            "{e}"
        );
    }
}
