"""Writes 4 KiB blocks, 32 in flight at a time, never flushing; prints "acked N" for each block
whose write was acknowledged, and sends SIGKILL to the tracker, with writes in flight, once
LIMIT blocks (default 2000) are acknowledged. A kill -9 must lose none of them: the kernel
client and its filesystem go on believing they were written.

Usage: /usr/bin/python3 acked_then_kill.py URI PID [LIMIT]
"""
import os
import signal
import sys

import nbd

uri, pid = sys.argv[1], int(sys.argv[2])
limit = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
h = nbd.NBD()
h.connect_uri(uri)
blocks = h.get_size() // 4096
acked = []
killed = False


def written(i):
    def done(err):
        if err.value == 0 and not killed:
            acked.append(i)
        return 1
    return done


try:
    # A stride that is prime to the block count visits every block once, all over the volume.
    step = 7919
    for n in range(blocks):
        i = (n * step) % blocks
        h.aio_pwrite(bytes([i % 250 + 1]) * 4096, i * 4096, completion=written(i))
        while h.aio_in_flight() >= 32:
            h.poll(-1)
        if len(acked) >= limit and not killed:
            # Replies already read count; anything later may or may not have made it.
            os.kill(pid, signal.SIGKILL)
            killed = True
        if killed:
            break
    while h.aio_in_flight() > 0:
        h.poll(-1)
except nbd.Error:
    pass
for i in acked:
    print("acked", i)
