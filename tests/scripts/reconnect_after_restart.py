"""Writes 4 KiB blocks (block i holds byte i % 251 + 1) with up to 16 in flight until the
connection breaks (the tracker restarts under it), then reconnects as a client with -persist
would, retrying every 20 ms, and checks that every write that was acknowledged before the
break reads back. Prints "acked N", "reconnected after MS ms" and "verified N".

Usage: nbdsh -n -c "...", or /usr/bin/python3 reconnect_after_restart.py URI READY_FILE
READY_FILE is created once writes are flowing.
"""
import sys
import time

import nbd

uri, ready = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
blocks = h.get_size() // 4096
acked = []
pending = {}


def done(i):
    def cb(err):
        if err.value == 0:
            acked.append(i)
        return 1
    return cb


i = 0
try:
    while True:
        while h.aio_in_flight() < 16:
            b = i % blocks
            h.aio_pwrite(bytes([b % 251 + 1]) * 4096, b * 4096, completion=done(b))
            i += 1
            if i == 64:
                open(ready, "w").close()
        h.poll(-1)
except nbd.Error:
    pass
print("acked", len(acked))
broken = time.monotonic()
deadline = broken + 30
while True:
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        break
    except nbd.Error:
        if time.monotonic() > deadline:
            sys.exit("could not reconnect within 30 s")
        time.sleep(0.02)
print("reconnected after %d ms" % ((time.monotonic() - broken) * 1000))
for b in set(acked):
    got = h.pread(4096, b * 4096)
    if got != bytes([b % 251 + 1]) * 4096:
        sys.exit("acknowledged write of block %d is lost after the restart" % b)
print("verified", len(set(acked)))
