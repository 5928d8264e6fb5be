//! The durable mark: a small file beside the journal, `NAME.journal.durable`, in which the
//! tracker publishes the sequence number through which every record is durable in the
//! journal. Readers (the shipper) take no record beyond it.
//!
//! Why: the tracker acknowledges a write once its record is in the page cache, and syncs the
//! journal later. A power loss before that sync takes the record away, and the tracker numbers
//! its next record after the last durable one. A replica that had received the lost record
//! would hold data the volume never kept, and would take the new record of the same number for
//! one it already has. Shipping only what is durable closes that gap.
//!
//! The file is written in place after each sync of the journal, without a sync of its own: after
//! a power loss it may say less than what is durable, never more (it is written only after the
//! sync it reports), and the tracker writes it again when it opens the journal, whose open
//! syncs every record it kept. A reader that finds it damaged (a write in progress) keeps the
//! value it had. Format in docs/FORMAT.md, "Durable mark".

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use super::Store;
use super::format::{SEQ_FILE_LEN, decode_seq_file, encode_seq_file};

const MAGIC: [u8; 8] = *b"RDNDUR1\0";

/// Where the durable mark of the journal at `journal` lives.
pub fn durable_path(journal: &Path) -> PathBuf {
    super::beside_journal(journal, ".durable")
}

/// The mark's bytes for `seq`.
pub fn encode(seq: u64) -> [u8; SEQ_FILE_LEN] {
    encode_seq_file(&MAGIC, seq)
}

/// The sequence number in a mark's bytes, or `None` when they are not a whole mark.
pub fn decode(b: &[u8]) -> Option<u64> {
    decode_seq_file(&MAGIC, b)
}

/// Reads the mark from `store` (an open file): `None` while it is empty or being written.
pub fn read<S: Store + ?Sized>(store: &S) -> io::Result<Option<u64>> {
    let mut b = [0u8; SEQ_FILE_LEN];
    match store.read_at(&mut b, 0) {
        Ok(()) => Ok(decode(&b)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// The tracker's side: publishes the durable sequence number. `S` is a file, or a test
/// double that can crash.
#[derive(Debug)]
pub struct DurableMark<S = File> {
    store: S,
    path: PathBuf,
}

impl DurableMark<File> {
    /// Opens (or creates) the mark of the journal at `journal`, leaving what it says.
    pub fn open(journal: &Path) -> io::Result<DurableMark> {
        let path = durable_path(journal);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        Ok(DurableMark { store: file, path })
    }
}

impl<S: Store> DurableMark<S> {
    /// A mark kept in `store`, reported as `path`.
    pub fn in_store(store: S, path: PathBuf) -> Self {
        DurableMark { store, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Says that every record through `seq` is durable. Call only after the sync that made
    /// them so.
    pub fn publish(&self, seq: u64) -> io::Result<()> {
        self.store.write_at(&[&encode(seq)], 0)
    }

    /// What the mark says now (`None` if never written, or being written).
    pub fn read(&self) -> io::Result<Option<u64>> {
        read(&self.store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_reads_back_and_a_damaged_one_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("v.journal");
        let m = DurableMark::open(&journal).unwrap();
        assert_eq!(m.path(), dir.path().join("v.journal.durable"));
        assert_eq!(m.read().unwrap(), None, "a new mark says nothing");
        m.publish(41).unwrap();
        m.publish(7_000_000_001).unwrap();
        assert_eq!(m.read().unwrap(), Some(7_000_000_001));
        // Reopening keeps what it said.
        assert_eq!(
            DurableMark::open(&journal).unwrap().read().unwrap(),
            Some(7_000_000_001)
        );
        let mut b = encode(5);
        assert_eq!(decode(&b), Some(5));
        b[9] ^= 1;
        assert_eq!(decode(&b), None, "a torn write is not a mark");
        assert_eq!(decode(&b[..20]), None);
        assert_eq!(decode(b"RDNREL1\0aaaaaaaabbbbbbbb"), None);
    }
}
