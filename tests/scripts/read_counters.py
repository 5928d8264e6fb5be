"""Reads the counter (8 little-endian bytes at offset 0) of every export NAME through the NBD
server at Unix socket SOCKET; prints "NAME VALUE" per line.

Usage: /usr/bin/python3 read_counters.py SOCKET NAME...
"""
import struct
import sys

import nbd

socket = sys.argv[1]
for name in sys.argv[2:]:
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(socket)
    (value,) = struct.unpack("<Q", h.pread(8, 0))
    h.shutdown()
    print(name, value)
