//! redun tracker: a userspace NBD server in front of each protected volume.
//!
//! - [`nbd`]: our NBD protocol implementation, generic over a block backend;
//! - [`io`]: the backing file / block device backend with its io_uring and synchronous
//!   engines (the only `unsafe` code is in [`io::uring`], and three system calls in [`sys`]);
//! - [`admin`]: the admin socket protocol, shared with the `redun` CLI;
//! - [`config`]: flags and the TOML config file.

#![deny(unsafe_code)]

pub mod admin;
pub mod config;
pub mod group;
pub mod hooks;
pub mod io;
pub mod journal;
pub mod metrics;
pub mod nbd;
pub mod service;
#[allow(unsafe_code)] // Three system calls: see the module.
pub mod sys;
pub mod tls;
pub mod track;
