//! Synchronous block operations on the backing file or device.
//!
//! The synchronous engine is made of these; the io_uring engine uses them for the rare
//! fallbacks (zeroing on a filesystem without `fallocate` support) and `block_status`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, PosixFadviseAdvice, fallocate, posix_fadvise};
use nix::unistd::{Whence, lseek};

use crate::nbd::Extent;
use crate::nbd::proto::{STATE_HOLE, STATE_ZERO};

/// Chunk size of the zero-writing fallback.
const ZERO_CHUNK: usize = 1 << 20;
/// Most extents returned by one block status call.
const MAX_EXTENTS: usize = 256;

fn off(v: u64) -> io::Result<i64> {
    i64::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

pub fn read_at(file: &File, offset: u64, len: u32) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::from_raw_os_error(libc::EIO)
        } else {
            e
        }
    })?;
    Ok(buf)
}

pub fn write_at(file: &File, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
    file.write_all_at(data, offset)?;
    if fua {
        file.sync_data()?;
    }
    Ok(())
}

pub fn flush(file: &File) -> io::Result<()> {
    file.sync_data()
}

/// Discards a range. Trim is a hint: a filesystem that cannot punch holes makes it a no-op.
pub fn trim(file: &File, offset: u64, len: u32, fua: bool) -> io::Result<()> {
    let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    match fallocate(file, mode, off(offset)?, i64::from(len)) {
        Ok(()) => {}
        Err(Errno::EOPNOTSUPP) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    if fua {
        file.sync_data()?;
    }
    Ok(())
}

/// Makes a range read as zeroes: punched if allowed, allocated zeroes otherwise. Without
/// a fast way (`fallocate`), fails with `EOPNOTSUPP` when `fast_only`, else writes zeroes.
pub fn write_zeroes(
    file: &File,
    offset: u64,
    len: u32,
    may_trim: bool,
    fast_only: bool,
    fua: bool,
) -> io::Result<()> {
    let o = off(offset)?;
    let l = i64::from(len);
    let keep = FallocateFlags::FALLOC_FL_KEEP_SIZE;
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | keep;
    let zero = FallocateFlags::FALLOC_FL_ZERO_RANGE | keep;
    let fast = if may_trim {
        fallocate(file, punch, o, l).or_else(|_| fallocate(file, zero, o, l))
    } else {
        // tmpfs has no ZERO_RANGE: punch, then allocate again, is just as good.
        fallocate(file, zero, o, l).or_else(|e| match e {
            Errno::EOPNOTSUPP => {
                fallocate(file, punch, o, l).and_then(|()| fallocate(file, keep, o, l))
            }
            e => Err(e),
        })
    };
    match fast {
        Ok(()) => {}
        Err(Errno::EOPNOTSUPP) | Err(Errno::ENODEV) if !fast_only => {
            let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
            let mut done = 0usize;
            while done < len as usize {
                let n = zeroes.len().min(len as usize - done);
                file.write_all_at(&zeroes[..n], offset + done as u64)?;
                done += n;
            }
        }
        Err(Errno::ENODEV) => return Err(Errno::EOPNOTSUPP.into()),
        Err(e) => return Err(e.into()),
    }
    if fua {
        file.sync_data()?;
    }
    Ok(())
}

/// Prefetch hint; failures are not the client's problem.
pub fn cache(file: &File, offset: u64, len: u32) -> io::Result<()> {
    let _ = posix_fadvise(
        file,
        off(offset)?,
        i64::from(len),
        PosixFadviseAdvice::POSIX_FADV_WILLNEED,
    );
    Ok(())
}

/// `base:allocation` extents of `[offset, offset+len)` from SEEK_DATA / SEEK_HOLE. Block
/// devices and filesystems without hole support report one allocated extent.
pub fn block_status(
    file: &File,
    is_regular: bool,
    offset: u64,
    len: u64,
) -> io::Result<Vec<Extent>> {
    let end = offset + len;
    if !is_regular {
        return Ok(vec![Extent {
            length: len,
            flags: 0,
        }]);
    }
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < MAX_EXTENTS {
        let data = match lseek(file, off(pos)?, Whence::SeekData) {
            Ok(d) => d.unsigned_abs(),
            Err(Errno::ENXIO) => end,
            Err(Errno::EINVAL) | Err(Errno::EOPNOTSUPP) => {
                out.push(Extent {
                    length: end - pos,
                    flags: 0,
                });
                break;
            }
            Err(e) => return Err(e.into()),
        };
        if data > pos {
            let hole_end = data.min(end);
            out.push(Extent {
                length: hole_end - pos,
                flags: STATE_HOLE | STATE_ZERO,
            });
            pos = hole_end;
            continue;
        }
        let hole = match lseek(file, off(pos)?, Whence::SeekHole) {
            Ok(h) => h.unsigned_abs(),
            Err(Errno::ENXIO) => end,
            Err(e) => return Err(e.into()),
        };
        let data_end = hole.min(end).max(pos + 1);
        out.push(Extent {
            length: data_end - pos,
            flags: 0,
        });
        pos = data_end;
    }
    Ok(out)
}

/// The ranges of `file` that may hold data (not holes), merged: the whole file for block
/// devices and filesystems without hole support.
pub fn data_ranges(file: &File, is_regular: bool, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let extents = block_status(file, is_regular, pos, size - pos)?;
        for e in extents {
            if e.flags & STATE_HOLE == 0 {
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == pos => last.1 += e.length,
                    _ => out.push((pos, e.length)),
                }
            }
            pos += e.length;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroes_and_block_status_on_a_sparse_file() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        write_at(&f, 64 * 1024, &[7u8; 4096], false).unwrap();
        let ext = block_status(&f, true, 0, 1 << 20).unwrap();
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 1 << 20);
        assert!(ext.iter().any(|e| e.flags == 0));
        assert!(ext.iter().any(|e| e.flags == STATE_HOLE | STATE_ZERO));
        write_zeroes(&f, 64 * 1024, 4096, false, false, true).unwrap();
        assert_eq!(read_at(&f, 64 * 1024, 4096).unwrap(), vec![0u8; 4096]);
        write_at(&f, 0, &[1u8; 8192], false).unwrap();
        write_zeroes(&f, 0, 8192, true, true, false).unwrap();
        assert_eq!(read_at(&f, 0, 8192).unwrap(), vec![0u8; 8192]);
        trim(&f, 0, 4096, true).unwrap();
        assert!(read_at(&f, (1 << 20) - 10, 11).is_err());
    }
}
