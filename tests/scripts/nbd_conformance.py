"""NBD conformance checks with libnbd against a running redun export.

Usage: nbdsh -n -c "import sys; sys.argv = [...]; exec(...)", or /usr/bin/python3 nbd_conformance.py URI
Exits non-zero (AssertionError or nbd.Error) on the first violation.
"""
import errno
import os
import sys

import nbd

uri = sys.argv[1]
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
# Let requests libnbd would refuse itself (past EOF, unknown flags) reach the server.
h.set_strict_mode(0)
h.connect_uri(uri)
size = h.get_size()
MiB = 1 << 20
assert size >= 128 * MiB, size
assert h.get_structured_replies_negotiated()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
for can in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
            "can_df", "can_cache", "can_multi_conn"):
    assert getattr(h, can)(), can

# Write, read, compare.
data = os.urandom(65536)
h.pwrite(data, 1 * MiB)
assert h.pread(65536, 1 * MiB) == data

# FUA write, then flush.
h.pwrite(b"F" * 4096, 2 * MiB, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 2 * MiB) == b"F" * 4096
h.flush()

# Write zeroes: NO_HOLE, FAST_ZERO, both with FUA, and a plain one that may punch.
h.pwrite(b"\xaa" * (256 * 1024), 3 * MiB)
h.zero(65536, 3 * MiB, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(65536, 3 * MiB) == bytes(65536)
assert h.pread(65536, 3 * MiB + 65536) == b"\xaa" * 65536
h.zero(65536, 3 * MiB + 65536, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
assert h.pread(65536, 3 * MiB + 65536) == bytes(65536)
h.zero(65536, 3 * MiB + 131072, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
h.zero(65536, 3 * MiB + 196608)
assert h.pread(256 * 1024, 3 * MiB) == bytes(256 * 1024)

# Trim (content afterwards is unspecified; it must succeed, with and without FUA).
h.pwrite(b"T" * 65536, 4 * MiB)
h.trim(65536, 4 * MiB)
h.trim(4096, 5 * MiB, nbd.CMD_FLAG_FUA)

# Cache.
h.cache(MiB, MiB)

# Unaligned, odd-length I/O.
odd = os.urandom(999)
h.pwrite(odd, 12345)
assert h.pread(999, 12345) == odd
h.pwrite(b"x", size - 1)
assert h.pread(1, size - 1) == b"x"

# Block status: 1 MiB holds data, 700 MiB was never written (a hole reading as zero).
seen = []
def extents(metacontext, offset, entries, err):
    assert metacontext == nbd.CONTEXT_BASE_ALLOCATION, metacontext
    seen.append((offset, list(entries)))
    return 0
h.block_status(65536, 1 * MiB, extents)
off, ents = seen[-1]
assert off == 1 * MiB and ents[0] > 0 and ents[1] & nbd.STATE_HOLE == 0, seen
h.block_status(MiB, 700 * MiB, extents)
off, ents = seen[-1]
assert ents[1] == nbd.STATE_HOLE | nbd.STATE_ZERO, seen
h.block_status(8 * MiB, 0, extents, nbd.CMD_FLAG_REQ_ONE)
off, ents = seen[-1]
assert len(ents) == 2 and 0 < ents[0] <= 8 * MiB, seen

# Structured reads: a range of data and hole comes back in chunks, DF in one chunk.
h.pwrite(b"D" * 8192, 20 * MiB)
chunks = []
def chunk(buf, offset, status, err):
    chunks.append((offset, len(buf), status))
    return 0
buf = h.pread_structured(65536, 20 * MiB, chunk)
assert buf[:8192] == b"D" * 8192 and buf[8192:] == bytes(65536 - 8192)
assert any(s == nbd.READ_HOLE for _, _, s in chunks), chunks
assert sum(n for _, n, _ in chunks) == 65536, chunks
chunks.clear()
h.pread_structured(65536, 20 * MiB, chunk, nbd.CMD_FLAG_DF)
assert len(chunks) == 1 and chunks[0][2] == nbd.READ_DATA, chunks

# Many requests in flight on one connection.
cookies = [h.aio_pwrite(bytes([i]) * 4096, 30 * MiB + i * 4096) for i in range(64)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
bufs = [nbd.Buffer(4096) for _ in range(64)]
cookies = [h.aio_pread(bufs[i], 30 * MiB + i * 4096) for i in range(64)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, c in enumerate(cookies):
    assert h.aio_command_completed(c)
    assert bufs[i].to_bytearray() == bytes([i]) * 4096, i

# Errors: past-EOF read is EINVAL, past-EOF write and zero are ENOSPC, and the connection
# keeps working after each.
def expect_errno(fn, want):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum == want, (e, e.errnum, want)
        return
    raise AssertionError("expected errno %d" % want)

expect_errno(lambda: h.pread(4096, size - 2048), errno.EINVAL)
expect_errno(lambda: h.pread(1, size), errno.EINVAL)
expect_errno(lambda: h.pwrite(b"z" * 4096, size - 2048), errno.ENOSPC)
expect_errno(lambda: h.zero(4096, size), errno.ENOSPC)
expect_errno(lambda: h.trim(4096, size), errno.EINVAL)
expect_errno(lambda: h.block_status(4096, size, extents), errno.EINVAL)
# An unknown command flag on a read.
expect_errno(lambda: h.pread(4096, 0, 1 << 7), errno.EINVAL)
assert h.pread(65536, 1 * MiB) == data
assert h.pread(999, 12345) == odd

h.flush()
h.shutdown()
print("conformance ok")
