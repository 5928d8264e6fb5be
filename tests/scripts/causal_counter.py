"""A causality workload across volumes: for k = 1, 2, ... writes counter k to the first volume,
waits for the reply, then to the second, then the third, until SECONDS have passed. Each write
is a 4 KiB block at offset 0 holding k as 8 little-endian bytes. Prints the last k and the
longest wait for one reply in milliseconds.

Usage: /usr/bin/python3 causal_counter.py SECONDS URI...
"""
import struct
import sys
import time

import nbd

seconds = float(sys.argv[1])
handles = []
for uri in sys.argv[2:]:
    h = nbd.NBD()
    h.connect_uri(uri)
    handles.append(h)
end = time.monotonic() + seconds
k = 0
longest = 0.0
while time.monotonic() < end:
    k += 1
    block = struct.pack("<Q", k) * 512
    for h in handles:
        t = time.monotonic()
        h.pwrite(block, 0)
        longest = max(longest, time.monotonic() - t)
for h in handles:
    h.flush()
    h.shutdown()
print(k, "%.1f" % (longest * 1000))
