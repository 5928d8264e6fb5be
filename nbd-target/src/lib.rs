//! redun master target: applies replicated batches to a replica per volume ([`replica`]),
//! serving shippers over mutual TLS ([`server`]). Recovery points and NBD exports of them
//! come with the replica store.

pub mod config;
pub mod replica;
pub mod server;
