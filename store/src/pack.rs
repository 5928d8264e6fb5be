//! zstd compression with a fallback for data that does not compress: used for the shipper's
//! batches on the wire and for the write payloads of bucket segments (docs/FORMAT.md,
//! "Compressed entries").

use std::io;

/// zstd's negative levels trade ratio for speed; this one costs little on data that does not
/// compress, and still finds the easy redundancy (zeros) when there is some.
pub const FAST_LEVEL: i32 = -7;

/// The fast window for compressing segment entries of 64 KiB: 32 MiB.
pub const PIECE_FAST_WINDOW: u32 = 512;

/// Compresses buffer after buffer, keeping its zstd context.
///
/// Data that does not compress (already compressed or encrypted blocks) is not worth the
/// configured level's effort: after a buffer that shrinks by less than 3%, the next
/// `fast_window` buffers use [`FAST_LEVEL`], then the configured level is tried again (at
/// once when one of them compresses).
pub struct Packer {
    cctx: zstd::bulk::Compressor<'static>,
    level: i32,
    fast_window: u32,
    /// Buffers still to go at [`FAST_LEVEL`] (0: at `level`).
    fast_left: u32,
}

impl std::fmt::Debug for Packer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packer")
            .field("level", &self.level)
            .field("fast_left", &self.fast_left)
            .finish_non_exhaustive()
    }
}

impl Packer {
    pub fn new(level: i32, fast_window: u32) -> io::Result<Packer> {
        Ok(Packer {
            cctx: zstd::bulk::Compressor::new(level)?,
            level,
            fast_window,
            fast_left: 0,
        })
    }

    /// Replaces `out` with `raw` compressed (one zstd frame); true when that saves at least
    /// 3% of `raw`, false when `raw` is better kept as it is.
    pub fn compress(&mut self, raw: &[u8], out: &mut Vec<u8>) -> io::Result<bool> {
        out.clear();
        out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
        self.cctx.compress_to_buffer(raw, out)?;
        let incompressible = out.len() * 100 >= raw.len() * 97;
        if self.fast_left > 0 {
            self.fast_left -= 1;
            if self.fast_left == 0 || !incompressible {
                self.fast_left = 0;
                self.cctx.set_compression_level(self.level)?;
            }
        } else if incompressible && self.level > FAST_LEVEL && self.fast_window > 0 {
            self.fast_left = self.fast_window;
            self.cctx.set_compression_level(FAST_LEVEL)?;
        }
        Ok(!incompressible)
    }

    /// Buffers still to be compressed at [`FAST_LEVEL`].
    pub fn fast_left(&self) -> u32 {
        self.fast_left
    }
}

/// Decompresses one zstd frame that must hold exactly `length` bytes.
pub fn unpack(stored: &[u8], length: usize) -> Result<Vec<u8>, String> {
    let out = zstd::bulk::decompress(stored, length)
        .map_err(|e| format!("its zstd data does not decompress: {e}"))?;
    if out.len() != length {
        return Err(format!(
            "its zstd data holds {} bytes, not {length}",
            out.len()
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x1234_5678_9abc_def0u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect()
    }

    #[test]
    fn incompressible_data_switches_to_the_fast_level_and_back() {
        let mut p = Packer::new(3, 4).unwrap();
        let mut out = Vec::new();
        let n = noise(1 << 16);
        assert!(!p.compress(&n, &mut out).unwrap());
        assert_eq!(unpack(&out, n.len()).unwrap(), n);
        assert_eq!(p.fast_left(), 4);
        assert!(!p.compress(&n, &mut out).unwrap());
        assert_eq!(p.fast_left(), 3);
        // Compressible data brings the configured level back at once.
        assert!(p.compress(&[7u8; 1 << 16], &mut out).unwrap());
        assert!(out.len() < 1000);
        assert_eq!(p.fast_left(), 0);
        assert_eq!(unpack(&out, 1 << 16).unwrap(), vec![7u8; 1 << 16]);
    }

    #[test]
    fn a_frame_of_another_length_or_damaged_is_refused() {
        let mut p = Packer::new(3, 4).unwrap();
        let mut out = Vec::new();
        assert!(p.compress(&[1u8; 8192], &mut out).unwrap());
        let e = unpack(&out, 4096).unwrap_err();
        assert!(e.contains("does not decompress"), "{e}");
        let e = unpack(&out, 16384).unwrap_err();
        assert!(e.contains("holds 8192 bytes, not 16384"), "{e}");
        let mut bad = out.clone();
        bad[0] ^= 0xff;
        assert!(unpack(&bad, 8192).is_err());
    }
}
