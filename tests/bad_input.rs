//! Misbehaving clients get the protocol's answer or a closed connection, and the server keeps
//! serving a well-behaved client throughout. Speaks the protocol by hand over the Unix socket.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::*;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const REQUEST_MAGIC: u32 = 0x2560_9513;

struct Raw {
    s: UnixStream,
}

impl Raw {
    fn connect(t: &Tracker) -> Raw {
        let s = UnixStream::connect(&t.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s }
    }

    /// Reads the greeting and sends the client flags.
    fn hello(t: &Tracker, client_flags: u32) -> Raw {
        let mut r = Raw::connect(t);
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).unwrap();
        assert_eq!(u64::from_be_bytes(g[0..8].try_into().unwrap()), NBDMAGIC);
        assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
        assert_eq!(u16::from_be_bytes([g[16], g[17]]) & 3, 3);
        r.s.write_all(&client_flags.to_be_bytes()).unwrap();
        r
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        self.option_len(opt, u32::try_from(data.len()).unwrap(), data);
    }

    fn option_len(&mut self, opt: u32, len: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// Reads one option reply: (option, type, data).
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (opt, ty, d)
    }

    /// LIST must answer with the export and an ACK.
    fn list_works(&mut self) {
        self.option(3, &[]);
        let (opt, ty, d) = self.reply();
        assert_eq!((opt, ty), (3, REP_SERVER));
        assert_eq!(&d[4..4 + EXPORT.len()], EXPORT.as_bytes());
        assert_eq!(self.reply().1, REP_ACK);
    }

    /// Enters transmission with EXPORT_NAME and returns the export size.
    fn export_name(&mut self, no_zeroes: bool) -> u64 {
        self.option(1, EXPORT.as_bytes());
        let mut b = vec![0u8; if no_zeroes { 10 } else { 134 }];
        self.s.read_exact(&mut b).unwrap();
        if !no_zeroes {
            assert!(b[10..].iter().all(|&x| x == 0));
        }
        u64::from_be_bytes(b[0..8].try_into().unwrap())
    }

    fn request(&mut self, flags: u16, ty: u16, cookie: u64, off: u64, len: u32) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&off.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&b).unwrap();
    }

    /// Reads a simple reply: (error, cookie).
    fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// True if the server closed the connection (EOF or reset) within the read timeout.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
    }
}

/// A well-behaved client: libnbd reads what was written.
fn healthy(t: &Tracker) {
    let out = run(Command::new("nbdinfo").arg("--size").arg(t.uri()));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (64u64 << 20).to_string()
    );
}

#[test]
fn garbage_and_bad_magic_close_the_connection() {
    require("nbdinfo");
    let t = Tracker::start("uring", 64 << 20);
    // Garbage instead of the client flags.
    let mut r = Raw::hello(&t, 0xdead_beef);
    assert!(r.closed(), "unknown client flags must close");
    healthy(&t);
    // Garbage right away, without reading the greeting.
    let mut r = Raw::connect(&t);
    r.s.write_all(&[0x55; 333]).unwrap();
    assert!(r.closed());
    // Wrong option magic.
    let mut r = Raw::hello(&t, 3);
    r.s.write_all(b"NOTMAGIC\0\0\0\x03\0\0\0\0").unwrap();
    assert!(r.closed(), "bad option magic must close");
    // Wrong request magic in transmission.
    let mut r = Raw::hello(&t, 3);
    r.export_name(true);
    r.s.write_all(&[0xAB; 28]).unwrap();
    assert!(r.closed(), "bad request magic must close");
    healthy(&t);
}

#[test]
fn option_errors_keep_the_framing() {
    let t = Tracker::start("sync", 64 << 20);
    let mut r = Raw::hello(&t, 3);
    // Unknown option with a payload: ERR_UNSUP, then the next option works.
    r.option(99, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    assert_eq!(
        r.reply(),
        (99, REP_ERR_UNSUP, b"option not supported".to_vec())
    );
    r.list_works();
    // Withdrawn PEEK_EXPORT and unsupported EXTENDED_HEADERS.
    r.option(4, &[]);
    assert_eq!(r.reply().1, REP_ERR_UNSUP);
    r.option(11, &[]);
    assert_eq!(r.reply().1, REP_ERR_UNSUP);
    // STARTTLS is refused by policy.
    r.option(5, &[]);
    assert_eq!(r.reply().1, 0x8000_0002);
    // A big but bounded option is discarded and refused as too big.
    let big = vec![7u8; 200 * 1024];
    r.option(6, &big);
    assert_eq!(r.reply().1, REP_ERR_TOO_BIG);
    r.list_works();
    // INFO with a name length running past the option: ERR_INVALID.
    r.option(6, &[0, 0, 0, 200, b'd']);
    assert_eq!(r.reply().1, 0x8000_0003);
    // A huge length is answered and the connection closed.
    r.option_len(6, u32::MAX, &[]);
    assert_eq!(r.reply().1, REP_ERR_TOO_BIG);
    assert!(r.closed());
    // ABORT is acknowledged.
    let mut r = Raw::hello(&t, 3);
    r.option(2, &[]);
    assert_eq!(r.reply().1, REP_ACK);
    assert!(r.closed());
    // EXPORT_NAME of an unknown export closes: there is no way to say no.
    let mut r = Raw::hello(&t, 3);
    r.option(1, b"nope");
    assert!(r.closed());
}

#[test]
fn export_name_with_and_without_no_zeroes() {
    let t = Tracker::start("uring", 64 << 20);
    for (flags, no_zeroes) in [(1u32, false), (3, true)] {
        let mut r = Raw::hello(&t, flags);
        assert_eq!(r.export_name(no_zeroes), 64 << 20);
        r.request(0, 1, 7, 4096, 5);
        r.s.write_all(b"hello").unwrap();
        assert_eq!(r.simple_reply(), (0, 7));
        r.request(0, 0, 8, 4096, 5);
        assert_eq!(r.simple_reply(), (0, 8));
        let mut d = [0u8; 5];
        r.s.read_exact(&mut d).unwrap();
        assert_eq!(&d, b"hello");
        r.request(0, 2, 9, 0, 0); // DISC
        assert!(r.closed());
    }
}

#[test]
fn bad_requests_get_errors_and_the_connection_survives() {
    let t = Tracker::start("uring", 64 << 20);
    let mut r = Raw::hello(&t, 3);
    r.export_name(true);
    // Unknown command.
    r.request(0, 42, 1, 0, 512);
    assert_eq!(r.simple_reply(), (22, 1));
    // Unknown flag on a write: the payload is consumed, EINVAL.
    r.request(1 << 9, 1, 2, 0, 100);
    r.s.write_all(&[1u8; 100]).unwrap();
    assert_eq!(r.simple_reply(), (22, 2));
    // A write above the advertised maximum: payload discarded, EINVAL.
    let len = (32u32 << 20) + 4096;
    r.request(0, 1, 3, 0, len);
    r.s.write_all(&vec![0u8; len as usize]).unwrap();
    assert_eq!(r.simple_reply(), (22, 3));
    // A read above the maximum: EINVAL; past the end: EINVAL; a write past the end: ENOSPC.
    r.request(0, 0, 4, 0, 64 << 20);
    assert_eq!(r.simple_reply(), (22, 4));
    r.request(0, 0, 5, 64 << 20, 1);
    assert_eq!(r.simple_reply(), (22, 5));
    r.request(0, 1, 6, (64 << 20) - 1, 2);
    r.s.write_all(&[0u8; 2]).unwrap();
    assert_eq!(r.simple_reply(), (28, 6));
    // An offset that overflows u64.
    r.request(0, 0, 7, u64::MAX, 2);
    assert_eq!(r.simple_reply(), (22, 7));
    // DF without structured replies, block status without a context: EINVAL.
    r.request(4, 0, 8, 0, 512);
    assert_eq!(r.simple_reply(), (22, 8));
    r.request(0, 7, 9, 0, 512);
    assert_eq!(r.simple_reply(), (22, 9));
    // FLUSH with FUA is fine, and the connection still reads and writes.
    r.request(1, 3, 10, 0, 0);
    assert_eq!(r.simple_reply(), (0, 10));
    r.request(1, 1, 11, 0, 3);
    r.s.write_all(b"abc").unwrap();
    assert_eq!(r.simple_reply(), (0, 11));
    r.request(0, 0, 12, 0, 3);
    assert_eq!(r.simple_reply(), (0, 12));
    let mut d = [0u8; 3];
    r.s.read_exact(&mut d).unwrap();
    assert_eq!(&d, b"abc");
    let s = t.status_json();
    assert!(
        s["tracker"]["status"]["volumes"][0]["errors"]
            .as_u64()
            .unwrap()
            >= 9,
        "{s}"
    );
}

#[test]
fn a_write_whose_payload_never_arrives_blocks_only_its_connection() {
    require("nbdinfo");
    let mut t = Tracker::start("uring", 64 << 20);
    let mut stuck = Raw::hello(&t, 3);
    stuck.export_name(true);
    stuck.request(0, 1, 1, 0, 1 << 20);
    stuck.s.write_all(&[9u8; 1000]).unwrap();
    for _ in 0..3 {
        healthy(&t);
    }
    let st = t.stop();
    assert!(
        st.success(),
        "tracker must stop even with a stuck client: {st}"
    );
}

#[test]
fn a_thousand_connections_dropped_mid_handshake() {
    require("nbdinfo");
    let t = Tracker::start("uring", 64 << 20);
    for i in 0..1000 {
        let mut s = UnixStream::connect(&t.sock).unwrap();
        match i % 4 {
            0 => {}
            1 => {
                let mut g = [0u8; 10];
                let _ = s.read_exact(&mut g);
            }
            2 => {
                let mut g = [0u8; 18];
                let _ = s.read_exact(&mut g);
                let _ = s.write_all(&[0, 0]);
            }
            _ => {
                let mut g = [0u8; 18];
                let _ = s.read_exact(&mut g);
                let _ = s.write_all(&3u32.to_be_bytes());
                let _ = s.write_all(&IHAVEOPT.to_be_bytes());
            }
        }
        drop(s);
        if i % 100 == 0 {
            healthy(&t);
        }
    }
    healthy(&t);
    let s = t.status_json();
    assert_eq!(
        s["tracker"]["status"]["volumes"][0]["connections"], 0,
        "{s}"
    );
}
