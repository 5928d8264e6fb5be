//! redun master target: applies replicated batches, keeps recovery points and serves them
//! over NBD through the tracker's NBD server with a store-backed block backend.
//!
//! Not implemented yet: this crate holds the place the design gives it in the workspace.
