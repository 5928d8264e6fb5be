//! Certificates for mutual TLS: `redun pki init` makes a certificate authority and one
//! certificate per host name, all PEM files in one directory.
//!
//! The CA signs every daemon's certificate; daemons trust exactly that CA (`--tls-ca`), so a
//! peer with a certificate from anywhere else is refused. Each name becomes the certificate's
//! DNS subject alternative name, which the shipper checks against the target it dials.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// What `init` did, file by file.
#[derive(Debug, Default)]
pub struct PkiReport {
    pub created: Vec<PathBuf>,
    /// Files that existed and were kept (an existing CA signs the new certificates).
    pub kept: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error("invalid name {name:?}: {reason}")]
    Name { name: String, reason: String },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `data` to a new file with `mode`; never replaces an existing file.
fn write_new(path: &Path, data: &str, mode: u32) -> Result<(), PkiError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(data.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// A name must be usable as a DNS name and as a file name.
fn check_name(name: &str) -> Result<(), PkiError> {
    let bad = |reason: &str| PkiError::Name {
        name: name.into(),
        reason: reason.into(),
    };
    if name.is_empty() || name.len() > 253 {
        return Err(bad("a host name has 1 to 253 characters"));
    }
    if name == "ca" {
        return Err(bad("\"ca\" is the certificate authority's own file name"));
    }
    let ok = name
        .split('.')
        .all(|l| !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-'))
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !ok {
        return Err(bad(
            "use a DNS name: letters, digits, '-' and '.', labels of 1 to 63 characters",
        ));
    }
    Ok(())
}

/// Creates `dir/ca.crt` and `dir/ca.key` (unless they exist: then that CA is used) and, for
/// every name, `dir/NAME.crt` and `dir/NAME.key` signed by the CA. Keys are mode 0600.
/// An existing certificate for a name is an error: remove it first to make a new one.
pub fn init(dir: &Path, names: &[String]) -> Result<PkiReport, PkiError> {
    for n in names {
        check_name(n)?;
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    for n in names {
        for ext in ["crt", "key"] {
            let p = dir.join(format!("{n}.{ext}"));
            if p.exists() {
                return Err(PkiError::Bad {
                    path: p,
                    reason: "already exists: remove it to issue a new certificate for this name"
                        .into(),
                });
            }
        }
    }
    let mut report = PkiReport::default();
    let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let (ca_params_pem, ca_key_pair) = if ca_crt.exists() || ca_key.exists() {
        let pem = fs::read_to_string(&ca_crt).map_err(io_err(&ca_crt))?;
        let key_pem = fs::read_to_string(&ca_key).map_err(io_err(&ca_key))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Bad {
            path: ca_key.clone(),
            reason: format!("not a private key in PEM: {e}"),
        })?;
        report.kept.extend([ca_crt.clone(), ca_key.clone()]);
        (pem, key)
    } else {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        // A name of its own, so that a certificate from another redun CA is told apart by
        // its issuer (unknown CA) rather than by a signature that does not verify.
        let id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        p.distinguished_name
            .push(DnType::CommonName, format!("redun CA {id:x}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = rcgen::date_time_ymd(2025, 1, 1);
        p.not_after = rcgen::date_time_ymd(2045, 1, 1);
        let cert = p.self_signed(&key)?;
        write_new(&ca_key, &key.serialize_pem(), 0o600)?;
        write_new(&ca_crt, &cert.pem(), 0o644)?;
        report.created.extend([ca_crt.clone(), ca_key.clone()]);
        (cert.pem(), key)
    };
    let issuer =
        Issuer::from_ca_cert_pem(&ca_params_pem, &ca_key_pair).map_err(|e| PkiError::Bad {
            path: ca_crt.clone(),
            reason: format!("not a CA certificate in PEM: {e}"),
        })?;
    for n in names {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![n.clone()])?;
        p.distinguished_name.push(DnType::CommonName, n.as_str());
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = rcgen::date_time_ymd(2025, 1, 1);
        p.not_after = rcgen::date_time_ymd(2045, 1, 1);
        let cert = p.signed_by(&key, &issuer)?;
        let (crt, kp) = (dir.join(format!("{n}.crt")), dir.join(format!("{n}.key")));
        write_new(&kp, &key.serialize_pem(), 0o600)?;
        write_new(&crt, &cert.pem(), 0o644)?;
        report.created.extend([crt, kp]);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for bad in ["", "ca", "a/b", "-x", "x..y", "host name"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["target", "dr-site.example.com", "host1"] {
            check_name(good).unwrap();
        }
    }

    #[test]
    fn init_creates_then_reuses_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let r = init(dir.path(), &["a".into(), "b".into()]).unwrap();
        assert_eq!(r.created.len(), 6);
        let ca = fs::read(dir.path().join("ca.crt")).unwrap();
        let mode = |p: &str| {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(dir.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("a.key"), 0o600);
        assert_eq!(mode("ca.key"), 0o600);
        // A second run adds a name with the same CA and refuses to reissue one.
        let r = init(dir.path(), &["c".into()]).unwrap();
        assert_eq!(r.kept.len(), 2);
        assert_eq!(fs::read(dir.path().join("ca.crt")).unwrap(), ca);
        let e = init(dir.path(), &["a".into()]).unwrap_err().to_string();
        assert!(e.contains("a.crt") && e.contains("already exists"), "{e}");
    }
}
