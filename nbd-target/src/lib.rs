//! redun master target: keeps a replica store per volume ([`store`]: base image, segments,
//! recovery points), applies replicated batches to it ([`replica`]) from shippers over mutual
//! TLS ([`server`]), and serves its points over NBD ([`export`]).

pub mod config;
pub mod export;
pub mod replica;
pub mod server;
pub mod source;
pub mod store;
