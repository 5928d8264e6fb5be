//! Arbitrary bytes as the records of a journal ring: record decoding, the chain scan and the
//! orphan search must never panic, and the scanner must never return a record whose
//! checksum does not verify. (Superblock decoding is covered by unit and property tests.)
#![no_main]

use std::io;
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use redun_tracker::journal::format::{
    MIN_FILE_SIZE, RING_OFFSET, SUPERBLOCK_LEN, SUPERBLOCK_VERSION, Superblock,
};
use redun_tracker::journal::inspect::inspect;
use redun_tracker::journal::{Scanner, Store, read_superblock};

struct Mem(Mutex<Vec<u8>>);

impl Store for Mem {
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.lock().unwrap().len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let d = self.0.lock().unwrap();
        let o = usize::try_from(off).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = d.get(o..o + buf.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&self, _: &[&[u8]], _: u64) -> io::Result<()> {
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    // A valid superblock built from the first bytes (tail, sequence, epoch), so that the
    // fuzzer spends its time on records; the rest of the input is the ring from the tail on.
    let capacity = MIN_FILE_SIZE - RING_OFFSET;
    let tail_pos = u64::from(u16::from_le_bytes([data[0], data[1]])) * 8 % capacity;
    let sb = Superblock {
        update: 1,
        volume_uuid: [0; 16],
        volume_size: 1 << 30,
        ring_offset: RING_OFFSET,
        capacity,
        tail_pos,
        tail_seq: u64::from(u16::from_le_bytes([data[2], data[3]])),
        head_pos: 0,
        head_seq: 0,
        clean: false,
        epoch: u32::from(data[4]),
        salt: 0,
        version: SUPERBLOCK_VERSION,
        checkpoint_seq: 0,
    };
    let mut img = vec![0u8; MIN_FILE_SIZE as usize];
    img[..SUPERBLOCK_LEN].copy_from_slice(&sb.encode());
    let ring = &data[5..];
    let start = (RING_OFFSET + tail_pos) as usize;
    let n = ring.len().min(img.len() - start);
    img[start..start + n].copy_from_slice(&ring[..n]);
    let store = Mem(Mutex::new(img));
    let Ok(sb) = read_superblock(&store) else {
        return;
    };
    let mut scan = Scanner::new(&store, &sb, sb.tail_pos, sb.tail_seq);
    for _ in 0..10_000 {
        match scan.next_record() {
            Some(Ok(r)) => assert!(r.header.verify(&r.payload, sb.salt).is_ok()),
            _ => break,
        }
    }
    let _ = inspect(&store);
});
