//! redun shipper: drains a volume's journal, compresses, checksums and sends it to a
//! target or to object storage.
//!
//! Not implemented yet: this crate holds the place the design gives it in the workspace
//! (`tracker` <- `shipper` <- `nbd-target`). The replication wire protocol will live here.
