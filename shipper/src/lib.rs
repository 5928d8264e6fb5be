//! redun shipper: drains a volume's journal, compresses, checksums and sends it to a
//! target. The replication wire protocol lives here ([`proto`], docs/PROTOCOL.md), with the
//! TLS set-up ([`tls`]) and the certificate tooling ([`pki`]) that the target shares.

pub mod config;
pub mod heads;
pub mod pki;
pub mod proto;
pub mod reverse;
pub mod ship;
pub mod sync;
pub mod throttle;
pub mod to_bucket;
pub mod verify;

/// TLS set-up, shared with the tracker's consistency groups (it lives in the tracker crate).
pub use redun_tracker::tls;
