//! Feeds arbitrary bytes as a whole client conversation (handshake, then requests) to the
//! NBD server over an in-memory transport and an in-memory export.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redun_tracker::nbd::mem::MemBackend;
use redun_tracker::nbd::server::serve_in_memory;
use redun_tracker::nbd::Exports;

fuzz_target!(|input: &[u8]| {
    let exports = Exports::new(vec![("x".to_string(), MemBackend::new(64 * 1024))]);
    let _ = serve_in_memory(&exports, input, std::io::sink());
});
