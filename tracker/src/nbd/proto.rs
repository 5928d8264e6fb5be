//! NBD wire constants and the pure encode/decode functions of the protocol.
//!
//! Everything here is big-endian ("network byte order") as the specification requires
//! (NetworkBlockDevice/nbd `doc/proto.md`). Nothing in this module does I/O: the handshake
//! and the transmission loop call these functions on bytes they read or are about to write,
//! which is what lets the fuzz target drive them through an in-memory transport.

use std::io;

/// `NBDMAGIC`, first 8 bytes of the server greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: greeting magic of the newstyle negotiation, and the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// Info types of NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

// base:allocation status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The only metadata context we serve.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// Context id we hand out for `base:allocation`.
pub const META_BASE_ALLOCATION_ID: u32 = 1;

/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Size of an option request header after the `IHAVEOPT` magic (option + length).
pub const OPTION_HEADER_LEN: usize = 16;

/// Largest option payload we read. Names and queries are at most 4 KiB each by the
/// spec; anything bigger than this is refused with `NBD_REP_ERR_TOO_BIG` after being
/// discarded, or the connection is closed when it is absurd.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest string the spec allows (export names, queries).
pub const MAX_STRING_LEN: usize = 4096;

const _: () = assert!(REQUEST_LEN == 4 + 2 + 2 + 8 + 8 + 4);
const _: () = assert!(SIMPLE_REPLY_LEN == 4 + 4 + 8);
const _: () = assert!(STRUCTURED_HEADER_LEN == 4 + 2 + 2 + 8 + 4);

/// The error numbers the protocol allows on the wire. Host errno values never cross the wire:
/// [`Errno::from_io`] is the one place that maps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl Errno {
    /// Maps a host I/O error onto the protocol's errno values.
    pub fn from_io(err: &io::Error) -> Errno {
        match err.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => Errno::Perm,
            Some(libc::ENOMEM) => Errno::NoMem,
            Some(libc::EINVAL) => Errno::Inval,
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => Errno::NoSpc,
            Some(libc::EOVERFLOW) => Errno::Overflow,
            Some(libc::EOPNOTSUPP) => Errno::NotSup,
            Some(libc::ESHUTDOWN) => Errno::Shutdown,
            _ => match err.kind() {
                io::ErrorKind::Unsupported => Errno::NotSup,
                io::ErrorKind::OutOfMemory => Errno::NoMem,
                io::ErrorKind::InvalidInput => Errno::Inval,
                io::ErrorKind::StorageFull => Errno::NoSpc,
                _ => Errno::Io,
            },
        }
    }

    pub fn code(self) -> u32 {
        self as u32
    }
}

/// A decoded transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// A request header that cannot be parsed: the connection's framing is lost.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

impl Request {
    /// Decodes a request header. Only the magic is checked here; the command, its flags and
    /// its range are validated by the transmission loop, which can still answer them.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, BadMagic> {
        let magic = be_u32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(Request {
            flags: be_u16(&b[4..6]),
            kind: be_u16(&b[6..8]),
            cookie: be_u64(&b[8..16]),
            offset: be_u64(&b[16..24]),
            length: be_u32(&b[24..28]),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Appends a simple reply to `out`.
pub fn put_simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured reply chunk header to `out`; `length` is that of the payload which
/// the caller appends (or writes) right after.
pub fn put_chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, length: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// Appends an `NBD_REPLY_TYPE_ERROR` chunk carrying `error` and a human message.
pub fn put_error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let msg = truncate_utf8(message, MAX_STRING_LEN);
    let len = 4 + 2 + msg.len();
    put_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        u32::try_from(len).unwrap_or(u32::MAX),
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// Appends an option reply header and payload.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A cursor over an option's payload that turns every short read into `None`, which the
/// handshake answers with `NBD_REP_ERR_INVALID`.
#[derive(Debug)]
pub struct OptReader<'a> {
    data: &'a [u8],
}

impl<'a> OptReader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        OptReader { data }
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(be_u16)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(be_u32)
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Some(head)
    }

    /// A string prefixed by its u32 length. Rejects strings longer than the spec allows and
    /// invalid UTF-8.
    pub fn string(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.u32()?).ok()?;
        if len > MAX_STRING_LEN {
            return None;
        }
        std::str::from_utf8(self.bytes(len)?).ok()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0xdead_beef_0102_0304,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn request_bad_magic() {
        let mut b = Request {
            flags: 0,
            kind: 0,
            cookie: 1,
            offset: 0,
            length: 1,
        }
        .encode();
        b[0] ^= 0xff;
        assert!(Request::decode(&b).is_err());
    }

    #[test]
    fn errno_mapping_keeps_host_values_off_the_wire() {
        for raw in 0..200 {
            let e = Errno::from_io(&io::Error::from_raw_os_error(raw));
            assert!(
                matches!(e.code(), 1 | 5 | 12 | 22 | 28 | 75 | 95 | 108),
                "{raw}"
            );
        }
        assert_eq!(
            Errno::from_io(&io::Error::from_raw_os_error(libc::ENOSPC)),
            Errno::NoSpc
        );
        assert_eq!(
            Errno::from_io(&io::Error::from_raw_os_error(libc::EBADF)),
            Errno::Io
        );
    }

    #[test]
    fn opt_reader_rejects_short_and_long_strings() {
        let mut data = 3u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"ab");
        assert_eq!(OptReader::new(&data).string(), None);
        let data = (MAX_STRING_LEN as u32 + 1).to_be_bytes();
        assert_eq!(OptReader::new(&data).string(), None);
        let mut data = 2u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"ok");
        assert_eq!(OptReader::new(&data).string(), Some("ok"));
    }
}
