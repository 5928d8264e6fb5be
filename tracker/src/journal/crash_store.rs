//! A store for crash tests: keeps what was written apart from what is durable.

#![allow(clippy::cast_possible_truncation)] // Test images are small.

use std::io;
use std::sync::{Arc, Mutex};

use super::Store;

/// A store that keeps what was written apart from what is durable, and can produce the
/// image a crash would leave: the durable image plus any subset of the writes since the last
/// sync, some of them torn at a 512-byte boundary.
#[derive(Debug)]
pub struct CrashStore {
    st: Arc<Mutex<CrashState>>,
}

#[derive(Debug, Clone)]
struct CrashState {
    written: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
}

impl CrashStore {
    pub fn new(size: usize) -> Self {
        CrashStore {
            st: Arc::new(Mutex::new(CrashState {
                written: vec![0; size],
                durable: vec![0; size],
                pending: Vec::new(),
            })),
        }
    }

    pub fn from_image(img: Vec<u8>) -> Self {
        CrashStore {
            st: Arc::new(Mutex::new(CrashState {
                written: img.clone(),
                durable: img,
                pending: Vec::new(),
            })),
        }
    }

    /// What was synced: the image a power loss now would leave.
    pub fn durable_image(&self) -> Vec<u8> {
        self.st.lock().unwrap().durable.clone()
    }

    /// The image after a crash, chosen by `rng`.
    pub fn crash(&self, rng: &mut Rng) -> CrashStore {
        let st = self.st.lock().unwrap();
        let mut img = st.durable.clone();
        for (off, data) in &st.pending {
            let off = *off as usize;
            match rng.next() % 4 {
                0 => {}
                1 => {
                    // Torn: only some 512-byte sectors made it.
                    for (i, chunk) in data.chunks(512).enumerate() {
                        if rng.next() % 2 == 0 {
                            let o = off + i * 512;
                            img[o..o + chunk.len()].copy_from_slice(chunk);
                        }
                    }
                }
                _ => img[off..off + data.len()].copy_from_slice(data),
            }
        }
        CrashStore::from_image(img)
    }

    /// Puts back `len` bytes at `off` from `img`: a write that did not reach the disk.
    pub fn restore(&self, img: &[u8], off: u64, len: usize) {
        let mut st = self.st.lock().unwrap();
        let o = off as usize;
        st.written[o..o + len].copy_from_slice(&img[o..o + len]);
        st.durable[o..o + len].copy_from_slice(&img[o..o + len]);
    }

    /// Another handle on the same simulated disk (like a second file descriptor).
    pub fn share(&self) -> CrashStore {
        CrashStore {
            st: self.st.clone(),
        }
    }

    /// What has been written (durable or not).
    pub fn image(&self) -> Vec<u8> {
        self.st.lock().unwrap().written.clone()
    }

    pub fn corrupt(&self, off: u64) {
        let mut st = self.st.lock().unwrap();
        st.written[off as usize] ^= 0x40;
        st.durable[off as usize] ^= 0x40;
    }
}

impl Store for CrashStore {
    fn size(&self) -> io::Result<u64> {
        Ok(self.st.lock().unwrap().written.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let st = self.st.lock().unwrap();
        let o = off as usize;
        buf.copy_from_slice(&st.written[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, bufs: &[&[u8]], off: u64) -> io::Result<()> {
        let mut st = self.st.lock().unwrap();
        let data: Vec<u8> = bufs.concat();
        let o = off as usize;
        st.written[o..o + data.len()].copy_from_slice(&data);
        st.pending.push((off, data));
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut st = self.st.lock().unwrap();
        let st = &mut *st;
        for (off, data) in st.pending.drain(..) {
            let o = off as usize;
            st.durable[o..o + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }
}

/// xorshift64*, enough for schedules.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}
