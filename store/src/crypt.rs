//! Encryption at rest of bucket objects (docs/FORMAT.md, "Encrypted objects"): every
//! segment and base object is XChaCha20-Poly1305 under the volume's key, in chunks, so a
//! reader fetches and authenticates only the chunks a read needs.
//!
//! ```text
//! header (64, plaintext)  magic RDENC001, version, chunk size, plaintext length,
//!                         object nonce (24, random), key check (16)
//! chunk 0..n              ciphertext of `chunk` plaintext bytes (the last one shorter), tag (16)
//! ```
//!
//! Chunk `i` is sealed with the object nonce whose last 8 bytes are XORed with `i`
//! (little-endian), and authenticates the header, the object's name and `i`: a chunk moved
//! to another place or object, a changed header and a cut-off object all fail.

use std::fmt;
use std::io::Write;
use std::ops::Range;
use std::path::Path;

use chacha20poly1305::aead::{Aead, Generate, Key, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::segment::hex;

pub const ENC_MAGIC: [u8; 8] = *b"RDENC001";
pub const ENC_HEADER_LEN: usize = 64;
pub const TAG_LEN: usize = 16;
/// Plaintext bytes per chunk: a 4 KiB read fetches at most two chunks.
pub const CHUNK: u32 = 64 << 10;
const KEY_CHECK_AAD: &[u8] = b"redun key check v1";
/// The largest plaintext an object header may claim (1 PiB): keeps offsets far from overflow.
const MAX_OBJECT: u64 = 1 << 50;

/// Why an object cannot be decrypted, or a key file used.
#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    #[error("{0}")]
    Damaged(String),
    #[error(
        "the object was encrypted with another key (key check {found}, this key's is {ours}): use the key file the volume was replicated with"
    )]
    WrongKey { found: String, ours: String },
    #[error("key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
}

fn damaged(reason: impl Into<String>) -> CryptError {
    CryptError::Damaged(reason.into())
}

/// Where volume keys are kept unless configured otherwise: `DIR/NAME.key`.
pub const DEFAULT_KEY_DIR: &str = "/etc/redun/keys";

/// A volume's encryption key.
pub struct VolumeKey {
    cipher: XChaCha20Poly1305,
    check: [u8; TAG_LEN],
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeKey(check {})", self.check_hex())
    }
}

impl VolumeKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> VolumeKey {
        let cipher = XChaCha20Poly1305::new(&Key::<XChaCha20Poly1305>::from(*bytes));
        let zero = XNonce::default();
        let tag = cipher
            .encrypt(
                &zero,
                Payload {
                    msg: &[],
                    aad: KEY_CHECK_AAD,
                },
            )
            .expect("an empty message encrypts");
        let mut check = [0u8; TAG_LEN];
        check.copy_from_slice(&tag);
        VolumeKey { cipher, check }
    }

    /// Writes a new random key to `path` (64 hex digits, mode 0600); refuses to replace a
    /// file that exists.
    pub fn create_file(path: &Path) -> Result<VolumeKey, CryptError> {
        use std::os::unix::fs::OpenOptionsExt;
        let key = Key::<XChaCha20Poly1305>::generate();
        let bytes: [u8; 32] = key.into();
        let err = |e: std::io::Error| CryptError::KeyFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        f.write_all(format!("{}\n", hex(&bytes)).as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(err)?;
        Ok(VolumeKey::from_bytes(&bytes))
    }

    /// Reads a key file: 64 hex digits (surrounding white space is ignored).
    pub fn load(path: &Path) -> Result<VolumeKey, CryptError> {
        let bad = |reason: String| CryptError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            bad(if e.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "does not exist: create it with `redun key new {}` and keep a copy away from this server (without it the bucket cannot be read)",
                    path.display()
                )
            } else {
                e.to_string()
            })
        })?;
        let t = text.trim();
        let mut bytes = [0u8; 32];
        if t.len() != 64 || !t.is_ascii() {
            return Err(bad(format!(
                "holds {} characters, a key is 64 hex digits",
                t.len()
            )));
        }
        if !t.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad("is not 64 hex digits".into()));
        }
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).expect("hex digits");
        }
        Ok(VolumeKey::from_bytes(&bytes))
    }

    /// The key's check value: stored in every object header and manifest, so that a wrong
    /// key is told apart from damage. It reveals nothing of the key.
    pub fn check_hex(&self) -> String {
        hex(&self.check)
    }

    fn chunk_nonce(nonce: &[u8; 24], i: u64) -> XNonce {
        let mut n = *nonce;
        for (b, x) in n[16..].iter_mut().zip(i.to_le_bytes()) {
            *b ^= x;
        }
        XNonce::from(n)
    }

    fn aad(header: &[u8], name: &str, i: u64) -> Vec<u8> {
        let mut aad = Vec::with_capacity(ENC_HEADER_LEN + name.len() + 8);
        aad.extend_from_slice(header);
        aad.extend_from_slice(name.as_bytes());
        aad.extend_from_slice(&i.to_le_bytes());
        aad
    }

    /// Encrypts `plain` as the object called `name` (its path below the volume's prefix).
    pub fn seal(&self, name: &str, plain: &[u8]) -> Vec<u8> {
        let nonce: [u8; 24] = XNonce::generate().into();
        let mut h = [0u8; ENC_HEADER_LEN];
        h[0..8].copy_from_slice(&ENC_MAGIC);
        h[8..12].copy_from_slice(&1u32.to_le_bytes());
        h[12..16].copy_from_slice(&CHUNK.to_le_bytes());
        h[16..24].copy_from_slice(&(plain.len() as u64).to_le_bytes());
        h[24..48].copy_from_slice(&nonce);
        h[48..64].copy_from_slice(&self.check);
        let header = Header::parse(&h).expect("a header we built");
        let mut out = Vec::with_capacity(usize::try_from(header.object_len()).unwrap_or(0));
        out.extend_from_slice(&h);
        // An empty object still has one (empty) chunk, so that its tag authenticates it.
        let chunks = plain.chunks(CHUNK as usize);
        let chunks: Vec<&[u8]> = if plain.is_empty() {
            vec![&[]]
        } else {
            chunks.collect()
        };
        for (i, chunk) in (0u64..).zip(chunks) {
            let aad = Self::aad(&h, name, i);
            let c = self
                .cipher
                .encrypt(
                    &Self::chunk_nonce(&nonce, i),
                    Payload {
                        msg: chunk,
                        aad: &aad,
                    },
                )
                .expect("chunks are far below the cipher's limit");
            out.extend_from_slice(&c);
        }
        out
    }

    /// Checks an object's header: its format, and that it was sealed with this key.
    pub fn header(&self, raw: &[u8]) -> Result<Header, CryptError> {
        let h = Header::parse(raw)?;
        if h.raw[48..64] != self.check {
            return Err(CryptError::WrongKey {
                found: hex(&h.raw[48..64]),
                ours: self.check_hex(),
            });
        }
        Ok(h)
    }

    /// Decrypts chunks `chunks` of object `name` from `bytes`, the object's bytes at
    /// [`Header::chunk_bytes`]`(chunks)` (whole chunks, back to back).
    pub fn open_chunks(
        &self,
        name: &str,
        h: &Header,
        chunks: Range<u64>,
        bytes: &[u8],
    ) -> Result<Vec<u8>, CryptError> {
        let at = h.chunk_bytes(chunks.clone());
        if chunks.end > h.chunks() || bytes.len() as u64 != at.end - at.start {
            return Err(damaged(format!(
                "object bytes {}..{} (chunks {}..{}) came back as {} bytes (the object is truncated or replaced)",
                at.start,
                at.end,
                chunks.start,
                chunks.end,
                bytes.len()
            )));
        }
        let mut out = Vec::with_capacity(bytes.len());
        let step = h.chunk as usize + TAG_LEN;
        for (i, c) in chunks.zip(bytes.chunks(step)) {
            let want = h.chunk_plain_len(i) + TAG_LEN as u64;
            if c.len() as u64 != want {
                return Err(damaged(format!(
                    "chunk {i} has {} bytes, {want} expected (the object is truncated)",
                    c.len()
                )));
            }
            let aad = Self::aad(&h.raw, name, i);
            let p = self
                .cipher
                .decrypt(
                    &Self::chunk_nonce(&h.nonce, i),
                    Payload { msg: c, aad: &aad },
                )
                .map_err(|_| {
                    damaged(format!(
                        "chunk {i} (object bytes {}..{}) fails authentication",
                        h.chunk_at(i),
                        h.chunk_at(i) + want
                    ))
                })?;
            out.extend_from_slice(&p);
        }
        Ok(out)
    }

    /// Decrypts a whole object.
    pub fn open(&self, name: &str, obj: &[u8]) -> Result<Vec<u8>, CryptError> {
        let raw = obj
            .get(..ENC_HEADER_LEN)
            .ok_or_else(|| damaged(format!("the object has only {} bytes", obj.len())))?;
        let h = self.header(raw)?;
        if obj.len() as u64 != h.object_len() {
            return Err(damaged(format!(
                "the object has {} bytes, its header says {} (truncated or extended)",
                obj.len(),
                h.object_len()
            )));
        }
        self.open_chunks(name, &h, 0..h.chunks(), &obj[ENC_HEADER_LEN..])
    }
}

/// An encrypted object's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    raw: [u8; ENC_HEADER_LEN],
    chunk: u32,
    /// Plaintext bytes.
    pub len: u64,
    nonce: [u8; 24],
}

impl Header {
    fn parse(raw: &[u8]) -> Result<Header, CryptError> {
        let raw: [u8; ENC_HEADER_LEN] = raw
            .try_into()
            .map_err(|_| damaged("the object's header is cut off"))?;
        if raw[0..8] != ENC_MAGIC {
            return Err(damaged(
                "the object is not an encrypted redun object (bad magic)",
            ));
        }
        let version = u32::from_le_bytes(raw[8..12].try_into().expect("4"));
        let chunk = u32::from_le_bytes(raw[12..16].try_into().expect("4"));
        if version != 1 || chunk == 0 || chunk > 16 << 20 {
            return Err(damaged(format!(
                "unsupported object version {version} or chunk size {chunk}"
            )));
        }
        let len = u64::from_le_bytes(raw[16..24].try_into().expect("8"));
        if len > MAX_OBJECT {
            return Err(damaged(format!(
                "its header says {len} bytes, more than any object holds"
            )));
        }
        Ok(Header {
            raw,
            chunk,
            len,
            nonce: raw[24..48].try_into().expect("24"),
        })
    }

    /// How many chunks the object has: at least one, so that an empty object has a tag.
    pub fn chunks(&self) -> u64 {
        self.len.div_ceil(u64::from(self.chunk)).max(1)
    }

    fn chunk_plain_len(&self, i: u64) -> u64 {
        let c = u64::from(self.chunk);
        self.len.saturating_sub(i * c).min(c)
    }

    fn chunk_at(&self, i: u64) -> u64 {
        ENC_HEADER_LEN as u64 + i * (u64::from(self.chunk) + TAG_LEN as u64)
    }

    /// The object's size in the bucket.
    pub fn object_len(&self) -> u64 {
        ENC_HEADER_LEN as u64 + self.len + self.chunks() * TAG_LEN as u64
    }

    /// Plaintext bytes per chunk.
    pub fn chunk_size(&self) -> u64 {
        u64::from(self.chunk)
    }

    /// The numbers of the chunks that hold plaintext bytes `r` (at least one).
    pub fn chunks_of(&self, r: Range<u64>) -> Range<u64> {
        let c = self.chunk_size();
        r.start / c..r.end.max(r.start + 1).div_ceil(c).min(self.chunks())
    }

    /// Where chunks `c` are in the object.
    pub fn chunk_bytes(&self, c: Range<u64>) -> Range<u64> {
        self.chunk_at(c.start)..self.chunk_at(c.end).min(self.object_len())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn key(b: u8) -> VolumeKey {
        VolumeKey::from_bytes(&[b; 32])
    }

    #[test]
    fn objects_round_trip_whole_and_by_range() {
        let k = key(1);
        let plain: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let obj = k.seal("seg/a", &plain);
        assert_eq!(obj.len() as u64, 64 + 200_000 + 4 * 16);
        assert_eq!(k.open("seg/a", &obj).unwrap(), plain);
        let h = k.header(&obj[..64]).unwrap();
        assert_eq!(h.object_len(), obj.len() as u64);
        for r in [
            0..1,
            65_535..65_537,
            131_072..200_000,
            199_999..200_000,
            10..70_000,
        ] {
            let chunks = h.chunks_of(r.clone());
            let bytes = h.chunk_bytes(chunks.clone());
            let skip = (r.start - chunks.start * h.chunk_size()) as usize;
            let b = &obj[bytes.start as usize..bytes.end as usize];
            let p = k.open_chunks("seg/a", &h, chunks.clone(), b).unwrap();
            if chunks.end - chunks.start > 1 {
                let cut = &b[..b.len() - 16 - 65_536];
                let e = k.open_chunks("seg/a", &h, chunks, cut).unwrap_err();
                assert!(e.to_string().contains("truncated"), "{e}");
            }
            let n = (r.end - r.start) as usize;
            assert_eq!(&p[skip..skip + n], &plain[r.start as usize..r.end as usize]);
        }
        let empty = k.seal("e", &[]);
        assert_eq!(empty.len(), 64 + 16);
        assert_eq!(k.open("e", &empty).unwrap(), Vec::<u8>::new());
        assert!(
            k.open("f", &empty).is_err(),
            "an empty object is authenticated"
        );
        let mut huge = empty.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(k.header(&huge[..64]).is_err());
    }

    #[test]
    fn nonces_differ_and_no_plaintext_shows() {
        let k = key(2);
        let plain = b"PLANTED-PATTERN-".repeat(1000);
        let a = k.seal("x", &plain);
        let b = k.seal("x", &plain);
        assert_ne!(a[24..48], b[24..48]);
        assert_ne!(a[64..], b[64..]);
        assert!(!a.windows(16).any(|w| w == b"PLANTED-PATTERN-"));
    }

    #[test]
    fn damage_moves_and_wrong_keys_are_refused() {
        let k = key(3);
        let plain = vec![7u8; 100_000];
        let mut obj = k.seal("seg/a", &plain);
        let e = k.open("seg/b", &obj).unwrap_err().to_string();
        assert!(
            e.contains("chunk 0") && e.contains("fails authentication"),
            "{e}"
        );
        let e = key(4).open("seg/a", &obj).unwrap_err();
        assert!(matches!(e, CryptError::WrongKey { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("key file the volume was replicated with")
        );
        let e = k
            .open("seg/a", &obj[..obj.len() - 1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        obj[70_000] ^= 0x10;
        let e = k.open("seg/a", &obj).unwrap_err().to_string();
        assert!(
            e.contains("chunk 1") && e.contains("fails authentication"),
            "{e}"
        );
        obj[70_000] ^= 0x10;
        obj[20] ^= 1; // the plaintext length in the header
        assert!(k.open("seg/a", &obj).is_err());
    }

    #[test]
    fn key_files_are_created_once_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v.key");
        let k = VolumeKey::create_file(&p).unwrap();
        assert_eq!(VolumeKey::load(&p).unwrap().check_hex(), k.check_hex());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(VolumeKey::create_file(&p).is_err());
        let e = VolumeKey::load(&d.path().join("none.key"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.key") && e.contains("redun key new"), "{e}");
        std::fs::write(&p, format!("+{}\n", "a".repeat(63))).unwrap();
        let e = VolumeKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("64 hex digits"), "{e}");
        std::fs::write(&p, "abc\n").unwrap();
        let e = VolumeKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("v.key") && e.contains("64 hex digits"), "{e}");
    }
}
