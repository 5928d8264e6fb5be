//! Fixed newstyle negotiation: greeting, options, and the hand-over to transmission.
//!
//! Generic over `BufRead` + `Write` so that tests and the fuzz target can drive it through
//! memory. Every option is read whole (bounded by [`MAX_OPTION_LEN`]) before it is parsed,
//! so a malformed option never loses the framing of the next one.

use std::io::{self, BufRead, Read, Write};
use std::sync::Arc;

use log::debug;

use super::backend::BlockBackend;
use super::proto::*;
use super::server::{Export, Exports};

/// Payloads up to this size are discarded and answered NBD_REP_ERR_TOO_BIG; above it the
/// connection is closed (a client does not legitimately send megabytes of option data).
const MAX_DISCARD_LEN: u32 = 1 << 20;

/// What the negotiation agreed on for the transmission phase.
#[derive(Debug)]
pub struct Negotiated<B: BlockBackend> {
    pub export: Arc<Export<B>>,
    pub structured: bool,
    pub base_allocation: bool,
    pub transmission_flags: u16,
}

/// Why the negotiation ended without a transmission phase.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("Client aborted the negotiation")]
    Aborted,
    #[error("Protocol violation during negotiation: {0}")]
    Protocol(String),
    #[error("Connection error during negotiation")]
    Io(#[source] io::Error),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

/// Transmission flags for `export` given what was negotiated.
pub fn transmission_flags<B: BlockBackend>(export: &Export<B>, structured: bool) -> u16 {
    let caps = export.backend.capabilities();
    let mut f = TFLAG_HAS_FLAGS;
    if caps.read_only {
        f |= TFLAG_READ_ONLY;
    }
    if caps.flush {
        f |= TFLAG_SEND_FLUSH;
    }
    if caps.fua {
        f |= TFLAG_SEND_FUA;
    }
    if caps.trim && !caps.read_only {
        f |= TFLAG_SEND_TRIM;
    }
    if caps.write_zeroes && !caps.read_only {
        f |= TFLAG_SEND_WRITE_ZEROES;
        if caps.fast_zero {
            f |= TFLAG_SEND_FAST_ZERO;
        }
    }
    if structured {
        // DF only means something when reads can be fragmented.
        f |= TFLAG_SEND_DF;
    }
    if caps.multi_conn {
        f |= TFLAG_CAN_MULTI_CONN;
    }
    if caps.cache {
        f |= TFLAG_SEND_CACHE;
    }
    f
}

#[derive(Debug, Default)]
struct State {
    no_zeroes: bool,
    structured: bool,
    /// Export whose `base:allocation` context was selected by SET_META_CONTEXT.
    meta_export: Option<String>,
}

/// Runs the negotiation. `Ok(Some)` enters transmission; `Ok(None)` means the client ended
/// the negotiation cleanly (ABORT or end of stream between options).
pub fn negotiate<B: BlockBackend, R: BufRead, W: Write>(
    exports: &Exports<B>,
    r: &mut R,
    w: &mut W,
) -> Result<Option<Negotiated<B>>, HandshakeError> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greeting)?;
    w.flush()?;

    let mut b4 = [0u8; 4];
    r.read_exact(&mut b4)?;
    let client_flags = u32::from_be_bytes(b4);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let mut st = State {
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        ..State::default()
    };

    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        match r.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let magic = be_u64(&hdr[0..8]);
        if magic != IHAVEOPT {
            return Err(HandshakeError::Protocol(format!(
                "bad option magic {magic:#x}"
            )));
        }
        let option = be_u32(&hdr[8..12]);
        let len = be_u32(&hdr[12..16]);
        if len > MAX_OPTION_LEN {
            let mut out = Vec::new();
            put_option_reply(&mut out, option, REP_ERR_TOO_BIG, b"option too large");
            if len > MAX_DISCARD_LEN || option == OPT_EXPORT_NAME {
                // Best effort: say why, then close.
                let _ = w.write_all(&out);
                return Err(HandshakeError::Protocol(format!(
                    "option {option} with length {len}"
                )));
            }
            io::copy(&mut r.by_ref().take(u64::from(len)), &mut io::sink())?;
            w.write_all(&out)?;
            w.flush()?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        debug!("nbd option={option} len={len}");

        let mut out = Vec::new();
        let next = handle_option(exports, &mut st, option, &data, &mut out);
        w.write_all(&out)?;
        w.flush()?;
        match next {
            Next::Continue => {}
            Next::Abort => return Err(HandshakeError::Aborted),
            Next::Close(why) => return Err(HandshakeError::Protocol(why)),
            Next::Transmit(export) => {
                let base_allocation =
                    st.structured && st.meta_export.as_deref() == Some(&export.name);
                let transmission_flags = transmission_flags(&export, st.structured);
                debug!(
                    "nbd client entered transmission export={} structured={} base_allocation={}",
                    export.name, st.structured, base_allocation
                );
                return Ok(Some(Negotiated {
                    export,
                    structured: st.structured,
                    base_allocation,
                    transmission_flags,
                }));
            }
        }
    }
}

enum Next<B: BlockBackend> {
    Continue,
    Abort,
    Close(String),
    Transmit(Arc<Export<B>>),
}

fn handle_option<B: BlockBackend>(
    exports: &Exports<B>,
    st: &mut State,
    option: u32,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Next<B> {
    match option {
        OPT_EXPORT_NAME => {
            let Some(export) = std::str::from_utf8(data).ok().and_then(|n| exports.find(n)) else {
                // The spec leaves nothing to say here but closing.
                return Next::Close(format!(
                    "EXPORT_NAME for unknown export {:?}",
                    String::from_utf8_lossy(data)
                ));
            };
            let flags = transmission_flags(&export, false);
            out.extend_from_slice(&export.backend.size().to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            if !st.no_zeroes {
                out.extend_from_slice(&[0u8; 124]);
            }
            // EXPORT_NAME never gets structured replies: they must be negotiated with GO.
            st.structured = false;
            Next::Transmit(export)
        }
        OPT_ABORT => {
            put_option_reply(out, option, REP_ACK, &[]);
            Next::Abort
        }
        OPT_LIST => {
            if !data.is_empty() {
                put_option_reply(out, option, REP_ERR_INVALID, b"LIST takes no data");
                return Next::Continue;
            }
            for (name, description) in exports.list() {
                let mut d = Vec::new();
                d.extend_from_slice(&u32::try_from(name.len()).unwrap_or(0).to_be_bytes());
                d.extend_from_slice(name.as_bytes());
                d.extend_from_slice(description.as_bytes());
                put_option_reply(out, option, REP_SERVER, &d);
            }
            put_option_reply(out, option, REP_ACK, &[]);
            Next::Continue
        }
        OPT_STARTTLS => {
            if !data.is_empty() {
                put_option_reply(out, option, REP_ERR_INVALID, b"STARTTLS takes no data");
            } else {
                put_option_reply(out, option, REP_ERR_POLICY, b"TLS is not supported yet");
            }
            Next::Continue
        }
        OPT_INFO | OPT_GO => info_or_go(exports, st, option, data, out),
        OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                put_option_reply(
                    out,
                    option,
                    REP_ERR_INVALID,
                    b"STRUCTURED_REPLY takes no data",
                );
            } else {
                st.structured = true;
                put_option_reply(out, option, REP_ACK, &[]);
            }
            Next::Continue
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            meta_context(exports, st, option, data, out);
            Next::Continue
        }
        _ => {
            put_option_reply(out, option, REP_ERR_UNSUP, b"option not supported");
            Next::Continue
        }
    }
}

fn info_or_go<B: BlockBackend>(
    exports: &Exports<B>,
    st: &mut State,
    option: u32,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Next<B> {
    let mut rd = OptReader::new(data);
    let parsed = (|| {
        let name = rd.string()?;
        let n = rd.u16()?;
        let mut infos = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            infos.push(rd.u16()?);
        }
        rd.is_empty().then_some((name, infos))
    })();
    let Some((name, infos)) = parsed else {
        put_option_reply(out, option, REP_ERR_INVALID, b"malformed INFO/GO request");
        return Next::Continue;
    };
    let Some(export) = exports.find(name) else {
        let msg = format!("no export named {name:?}; NBD_OPT_LIST shows the exports");
        put_option_reply(out, option, REP_ERR_UNKNOWN, msg.as_bytes());
        return Next::Continue;
    };
    let flags = transmission_flags(&export, st.structured);
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&export.backend.size().to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    put_option_reply(out, option, REP_INFO, &d);
    if infos.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(export.name.as_bytes());
        put_option_reply(out, option, REP_INFO, &d);
    }
    if infos.contains(&INFO_DESCRIPTION) {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(export.backend.description().as_bytes());
        put_option_reply(out, option, REP_INFO, &d);
    }
    // Block sizes are sent whether asked or not; our minimum is 1, so a client that did not
    // ask breaks no constraint.
    let caps = export.backend.capabilities();
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&caps.min_block.to_be_bytes());
    d.extend_from_slice(&caps.preferred_block.to_be_bytes());
    d.extend_from_slice(&caps.max_block.to_be_bytes());
    put_option_reply(out, option, REP_INFO, &d);
    put_option_reply(out, option, REP_ACK, &[]);
    if option == OPT_GO {
        Next::Transmit(export)
    } else {
        Next::Continue
    }
}

fn meta_context<B: BlockBackend>(
    exports: &Exports<B>,
    st: &mut State,
    option: u32,
    data: &[u8],
    out: &mut Vec<u8>,
) {
    let set = option == OPT_SET_META_CONTEXT;
    let mut rd = OptReader::new(data);
    let parsed = (|| {
        let name = rd.string()?;
        let n = rd.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(rd.string()?);
        }
        rd.is_empty().then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        put_option_reply(
            out,
            option,
            REP_ERR_INVALID,
            b"malformed META_CONTEXT request",
        );
        return;
    };
    if set && !st.structured {
        put_option_reply(
            out,
            option,
            REP_ERR_INVALID,
            b"SET_META_CONTEXT needs STRUCTURED_REPLY first",
        );
        return;
    }
    let Some(export) = exports.find(name) else {
        let msg = format!("no export named {name:?}");
        put_option_reply(out, option, REP_ERR_UNKNOWN, msg.as_bytes());
        return;
    };
    let matches = |q: &str| q == META_BASE_ALLOCATION || (!set && q == "base:");
    let selected = if queries.is_empty() {
        !set
    } else {
        queries.iter().any(|q| matches(q))
    };
    if set {
        st.meta_export = selected.then(|| export.name.clone());
    }
    if selected {
        // LIST replies carry id 0; only SET hands out a usable id.
        let id = if set { META_BASE_ALLOCATION_ID } else { 0 };
        let mut d = id.to_be_bytes().to_vec();
        d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
        put_option_reply(out, option, REP_META_CONTEXT, &d);
    }
    put_option_reply(out, option, REP_ACK, &[]);
}
