"""Keeps up to 64 writes in flight, sends SIGTERM to the tracker, and keeps polling until
the server closes. Prints "acked N" for every write acknowledged, fails if any write was
answered with an error reply (a stopping tracker may close, never fail a write).

Usage: nbdsh -n -c "import sys; sys.argv = [...]; exec(...)", or /usr/bin/python3 inflight_sigterm.py URI PID IMAGE
"""
import errno
import os
import signal
import sys

import nbd

uri, pid = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
blocks = h.get_size() // 4096
acked = []
errors = []

def done(i):
    def cb(err):
        if err.value != 0:
            errors.append((i, err.value))
        else:
            acked.append(i)
        return 1
    return cb

issued = 0
signalled = False
try:
    while True:
        while h.aio_in_flight() < 64 and issued < blocks:
            data = bytes([issued % 251 + 1]) * 4096
            h.aio_pwrite(data, issued * 4096, completion=done(issued))
            issued += 1
        if issued >= 256 and not signalled:
            os.kill(pid, signal.SIGTERM)
            signalled = True
        if issued >= blocks and h.aio_in_flight() == 0:
            break
        h.poll(1000)
except nbd.Error:
    pass  # the server closed the connection: expected after SIGTERM

assert signalled, "never got to 256 writes"
# ENOTCONN is libnbd retiring requests the server never read before it closed; any other
# error was a reply from the server, which must not fail writes while stopping.
replied_errors = [(i, e) for i, e in errors if e != errno.ENOTCONN]
assert not replied_errors, replied_errors
for i in acked:
    print("acked", i)
