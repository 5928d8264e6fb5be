"""Writes COUNT blocks of SIZE bytes, block i filled with byte i+1 at offset i*STRIDE, one after
the other, then flushes.

Usage: /usr/bin/python3 write_blocks.py URI COUNT SIZE STRIDE
"""
import sys

import nbd

uri, count, size, stride = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.connect_uri(uri)
for i in range(count):
    h.pwrite(bytes([i % 255 + 1]) * size, i * stride)
h.flush()
h.shutdown()
