"""Writes 4 KiB blocks in batches, each batch followed by a flush; prints "flushed N" for each
block whose flush completed, then sends SIGKILL to the tracker mid-stream, once LIMIT blocks
(default 160) are flushed.

Usage: nbdsh -n -c "...", or /usr/bin/python3 flushed_then_kill.py URI PID [LIMIT]
"""
import os
import signal
import sys

import nbd

uri, pid = sys.argv[1], int(sys.argv[2])
limit = int(sys.argv[3]) if len(sys.argv) > 3 else 160
h = nbd.NBD()
h.connect_uri(uri)
blocks = h.get_size() // 4096
done = []
try:
    for batch in range(0, blocks, 16):
        cookies = [h.aio_pwrite(bytes([i % 250 + 1]) * 4096, i * 4096)
                   for i in range(batch, min(batch + 16, blocks))]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        h.flush()
        done.extend(range(batch, min(batch + 16, blocks)))
        if len(done) >= limit:
            os.kill(pid, signal.SIGKILL)
            # Keep writing: these may or may not make it, and are not reported.
except nbd.Error:
    pass
for i in done:
    print("flushed", i)
