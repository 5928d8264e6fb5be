//! The replica store format of redun (docs/FORMAT.md, "Replica store" and "Bucket layout"),
//! shared by the target's file store, the shipper and the CLI: the segment codec, and the
//! object-storage backend that keeps the same segments in S3 or Azure Blob, encrypted.

pub mod bucket;
pub mod crypt;
pub mod extent;
pub mod pack;
pub mod retention;
pub mod segment;
