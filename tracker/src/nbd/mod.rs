//! Our own NBD server: fixed newstyle negotiation, structured replies, `base:allocation`,
//! many requests in flight per connection with out-of-order replies, several connections per
//! export. Generic over [`BlockBackend`] so the master target can serve its replica store
//! through the same code.

pub mod backend;
pub mod handshake;
pub mod mem;
pub mod proto;
pub mod server;

pub use backend::{
    BlockBackend, Capabilities, CompletionSink, Extent, IoOp, IoQueue, IoRequest, Token,
};
pub use server::{Export, ExportStats, Exports, ListenAddr, Listener, Resolve, Server};
