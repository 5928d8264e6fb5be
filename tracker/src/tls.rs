//! TLS 1.3 with mutual certificate authentication for replication and consistency groups
//! (rustls, ring provider).
//!
//! Both sides trust exactly one CA (`--tls-ca`, made by `redun pki init`) and present a
//! certificate it signed (`--tls-cert`, `--tls-key`). The shipper also checks that the
//! target's certificate carries the name it dialled (or `--target-name`). There is no
//! plaintext mode.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::ring::default_provider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Whether `addr` is `HOST:PORT` (an IPv6 host in brackets).
pub fn has_port(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && !h.ends_with(':') && p.parse::<u16>().is_ok())
}

/// The host of `HOST[:PORT]`, without IPv6 brackets: the name a peer's certificate must
/// carry unless one is given.
pub fn host_of(addr: &str) -> String {
    let h = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    h.trim_start_matches('[').trim_end_matches(']').to_string()
}

/// The three PEM files of one daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files from the flags, else from the config file's `SECTION.tls_ca`, `tls_cert`
    /// and `tls_key`: `[flag, key]` pairs, each `(flag value, config value)`. The error names
    /// the first one missing.
    pub fn from_flags_or_config(
        section: &str,
        ca: (Option<PathBuf>, Option<PathBuf>),
        cert: (Option<PathBuf>, Option<PathBuf>),
        key: (Option<PathBuf>, Option<PathBuf>),
    ) -> Result<TlsFiles, String> {
        let pick = |(flag, file): (Option<PathBuf>, Option<PathBuf>), name: &str| {
            flag.or(file).ok_or_else(|| {
                format!(
                    "--{} is required (or {section}.{name} in the config file given with \
                     --config)",
                    name.replace('_', "-")
                )
            })
        };
        Ok(TlsFiles {
            ca: pick(ca, "tls_ca")?,
            cert: pick(cert, "tls_cert")?,
            key: pick(key, "tls_key")?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason} (make the files with `redun pki init --dir DIR --name NAME`)")]
    File { path: PathBuf, reason: String },
    #[error("TLS set-up failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS set-up failed: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let v: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, e))?;
    if v.is_empty() {
        return Err(file_err(path, "no certificate in this file"));
    }
    Ok(v)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs(path)? {
        store
            .add(c)
            .map_err(|e| file_err(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(store))
}

impl TlsFiles {
    fn key_mismatch(&self, e: &rustls::Error) -> TlsError {
        file_err(
            &self.key,
            format!("does not match {}: {e}", self.cert.display()),
        )
    }

    /// The listening side (the target, a group member): requires a client certificate
    /// signed by the CA.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots(&self.ca)?, provider.clone())
                .build()?;
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&self.cert)?, key(&self.key)?)
            .map_err(|e| self.key_mismatch(&e))?;
        Ok(Arc::new(cfg))
    }

    /// The connecting side (the shipper, a group member): trusts only the CA and presents
    /// its own certificate.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let provider = Arc::new(default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots(&self.ca)?)
            .with_client_auth_cert(certs(&self.cert)?, key(&self.key)?)
            .map_err(|e| self.key_mismatch(&e))?;
        Ok(Arc::new(cfg))
    }
}
