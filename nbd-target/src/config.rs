//! The `[target]` section of the TOML config file (`--config FILE`, the file every redun
//! daemon reads; the other sections are the other daemons' business). Flags override it.

use std::path::{Path, PathBuf};

use redun_tracker::config::ConfigError;
use serde::Deserialize;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:9443";
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/redun/target.sock";

#[derive(Debug, Default, Deserialize)]
pub struct ConfigFile {
    #[serde(default)]
    pub target: TargetSection,
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
