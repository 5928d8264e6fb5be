//! The reader side of a journal, for another process (the shipper): follow the chain from a
//! sequence number, wait for new records without polling, and release what has been shipped.
//!
//! Releasing is a small file beside the journal, `NAME.journal.release`, replaced atomically
//! (write a temporary file, sync, rename, sync the directory). The tracker reads it when it
//! needs room and at start-up, and moves the journal's tail; both processes can restart at any
//! time without losing the position.
//!
//! The reader gives no record beyond the journal's durable mark ([`super::mark`]): what it
//! hands out is durable in the journal, so a power loss on the tracker's host never takes away
//! a record the shipper already sent. A journal without a mark (written by a tracker older
//! than this reader) is followed as it is written.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::format::{Superblock, decode_seq_file, encode_seq_file};
use super::mark::{self, durable_path};
use super::{JournalError, Record, Scanner, read_superblock};

const RELEASE_MAGIC: [u8; 8] = *b"RDNREL1\0";

/// Where the release position of the journal at `journal` lives.
pub fn release_path(journal: &Path) -> PathBuf {
    super::beside_journal(journal, ".release")
}

/// Reads the released sequence number (`None` if nothing was ever released). A damaged file
/// is an error: the caller must not guess a release position.
pub fn read_release(journal: &Path) -> io::Result<Option<u64>> {
    let path = release_path(journal);
    let b = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match decode_seq_file(&RELEASE_MAGIC, &b) {
        Some(seq) => Ok(Some(seq)),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("release file {} is damaged", path.display()),
        )),
    }
}

/// Durably records that every record up to `seq` may be released.
pub fn write_release(journal: &Path, seq: u64) -> io::Result<()> {
    replace_durably(
        &release_path(journal),
        &encode_seq_file(&RELEASE_MAGIC, seq),
    )
}

/// Replaces `path` with `bytes` atomically and durably: a temporary file beside it, synced,
/// renamed over it, and the directory synced.
pub fn replace_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = {
        let mut p = path.as_os_str().to_owned();
        p.push(".tmp");
        PathBuf::from(p)
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Follows a journal written by another process.
#[derive(Debug)]
pub struct JournalReader {
    path: PathBuf,
    file: File,
    sb: Superblock,
    pos: u64,
    seq: u64,
    inotify: Inotify,
    /// The durable mark, when the journal has one: records beyond `durable` are not given out.
    mark: Option<File>,
    durable: u64,
}

impl JournalReader {
    /// Opens the journal at `path`, positioned at its tail.
    pub fn open(path: &Path) -> Result<JournalReader, JournalError> {
        let file = File::open(path)?;
        let sb = read_superblock(&file)?;
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
            .map_err(io::Error::from)?;
        inotify
            .add_watch(path, AddWatchFlags::IN_MODIFY)
            .map_err(io::Error::from)?;
        let mark_path = durable_path(path);
        let mark = match File::open(&mark_path) {
            Ok(f) => {
                inotify
                    .add_watch(&mark_path, AddWatchFlags::IN_MODIFY)
                    .map_err(io::Error::from)?;
                Some(f)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let durable = match &mark {
            Some(f) => mark::read(f)?.unwrap_or(0),
            None => u64::MAX,
        };
        Ok(JournalReader {
            path: path.to_path_buf(),
            file,
            pos: sb.tail_pos,
            seq: sb.tail_seq,
            sb,
            inotify,
            mark,
            durable,
        })
    }

    /// True when the journal has a durable mark, so that only durable records are given out.
    pub fn follows_durable_mark(&self) -> bool {
        self.mark.is_some()
    }

    /// The sequence number of the next record [`JournalReader::next_record`] returns.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// Moves the cursor to `seq`, which must not be released yet.
    pub fn seek(&mut self, seq: u64) -> Result<(), JournalError> {
        self.sb = read_superblock(&self.file)?;
        if seq < self.sb.tail_seq {
            return Err(JournalError::Corruption {
                offset: 0,
                reason: format!(
                    "seq {seq} is already released (the journal starts at seq {})",
                    self.sb.tail_seq
                ),
            });
        }
        self.pos = self.sb.tail_pos;
        self.seq = self.sb.tail_seq;
        while self.seq < seq {
            if self.next_record()?.is_none() {
                return Err(JournalError::Corruption {
                    offset: 0,
                    reason: format!("seq {seq} is not in the journal yet"),
                });
            }
        }
        Ok(())
    }

    /// The next record, or `None` when the writer has not written it (completely) yet, or it
    /// is not durable yet.
    pub fn next_record(&mut self) -> Result<Option<Record>, JournalError> {
        if self.seq > self.durable {
            if let Some(f) = &self.mark {
                // A mark being written reads as damaged: keep the last one until it is whole.
                if let Some(d) = mark::read(f)? {
                    self.durable = d;
                }
            }
            if self.seq > self.durable {
                return Ok(None);
            }
        }
        for attempt in 0..2 {
            let mut scan = Scanner::new(&self.file, &self.sb, self.pos, self.seq);
            match scan.next_record() {
                Some(r) => {
                    let r = r?;
                    (self.pos, self.seq) = scan.position();
                    return Ok(Some(r));
                }
                None if attempt == 0 => {
                    // The writer may have reopened the journal with a newer epoch.
                    self.sb = read_superblock(&self.file)?;
                }
                None => {}
            }
        }
        Ok(None)
    }

    /// Waits until the journal file (or its durable mark) is written to, or `timeout` passes.
    /// True if written.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
        let n = match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        // Drain the events; which ones does not matter.
        while let Ok(ev) = self.inotify.read_events() {
            if ev.is_empty() {
                break;
            }
        }
        Ok(n > 0)
    }

    /// Releases every record up to `seq` (shipped and durable on the target).
    pub fn release(&self, seq: u64) -> io::Result<()> {
        write_release(&self.path, seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Journal;
    use crate::journal::format::{Kind, MIN_FILE_SIZE};
    use crate::journal::mark::DurableMark;

    /// A journal file of ten written (not synced) records, and its path.
    fn ten_records(dir: &Path) -> PathBuf {
        let path = dir.join("v.journal");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(MIN_FILE_SIZE).unwrap();
        let mut j = Journal::create(f, [9; 16], 1 << 30).unwrap();
        for i in 0..10u8 {
            j.append(Kind::Write, u64::from(i) * 4096, 4096, &[i; 4096])
                .unwrap();
        }
        j.write_out().unwrap();
        path
    }

    fn seqs(r: &mut JournalReader) -> Vec<u64> {
        std::iter::from_fn(|| r.next_record().unwrap().map(|rec| rec.header.seq)).collect()
    }

    #[test]
    fn records_beyond_the_durable_mark_are_not_given_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = ten_records(dir.path());
        let mark = DurableMark::open(&path).unwrap();
        mark.publish(4).unwrap();
        let mut r = JournalReader::open(&path).unwrap();
        assert!(r.follows_durable_mark());
        let first = r.next_seq();
        assert_eq!(seqs(&mut r), (first..=4).collect::<Vec<_>>());
        assert!(r.seek(6).is_err(), "seq 6 is not durable yet");
        // A mark being written (damaged) leaves the reader where it was.
        std::fs::write(durable_path(&path), b"RDNDUR1\0torn").unwrap();
        let mut r = JournalReader::open(&path).unwrap();
        assert_eq!(
            seqs(&mut r),
            Vec::<u64>::new(),
            "no whole mark: nothing is durable"
        );
        let mark = DurableMark::open(&path).unwrap();
        mark.publish(7).unwrap();
        assert_eq!(seqs(&mut r), (first..=7).collect::<Vec<_>>());
        mark.publish(10).unwrap();
        assert!(
            r.wait(Duration::from_millis(0)).unwrap(),
            "the mark's write wakes the reader"
        );
        assert_eq!(seqs(&mut r), vec![8, 9, 10]);
    }

    #[test]
    fn a_journal_without_a_mark_is_followed_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = ten_records(dir.path());
        let mut r = JournalReader::open(&path).unwrap();
        assert!(!r.follows_durable_mark());
        let first = r.next_seq();
        assert_eq!(seqs(&mut r), (first..=10).collect::<Vec<_>>());
    }
}
