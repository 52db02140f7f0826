#!/usr/bin/env python3
"""Writes the seed corpus of the block_requests fuzz target (see its header
for the input format): one well-formed ring per request type, plus split
headers, several requests per ring, an indirect table and a read-only disk.
Usage: python3 make_block_seeds.py [DIR] (default seeds/block_requests)."""
import os
import struct
import sys

DATA = 0x1000
BUF = 0x2000
STATUS = 0x3000
NEXT, WRITE, INDIRECT = 1, 2, 4
IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES = 0, 1, 4, 8, 11, 13


def desc(addr, length, flags=0, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def header(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)


def seed(mode, heads, descs, rest):
    table = b"".join(descs).ljust(16 * 16, b"\0")
    return bytes([mode, len(heads)]) + bytes(heads) + table + rest


def chain(parts, first=0):
    """parts: (addr, len, flags); links them with NEXT from index `first`."""
    out = []
    for i, (addr, length, flags) in enumerate(parts):
        last = i == len(parts) - 1
        out.append(desc(addr, length, flags | (0 if last else NEXT), 0 if last else first + i + 1))
    return out


seeds = {
    "read": seed(0, [0], chain([(DATA, 16, 0), (BUF, 512, WRITE), (STATUS, 1, WRITE)]), header(IN, 1)),
    "write_split_header": seed(
        0, [0],
        chain([(DATA, 5, 0), (DATA + 5, 11, 0), (BUF, 700, 0), (BUF + 700, 324, 0), (STATUS, 1, WRITE)]),
        header(OUT, 2)),
    "flush": seed(0, [0], chain([(DATA, 16, 0), (STATUS, 1, WRITE)]), header(FLUSH, 0)),
    "get_id": seed(0, [0], chain([(DATA, 16, 0), (BUF, 20, WRITE), (STATUS, 1, WRITE)]), header(GET_ID, 0)),
    "discard": seed(
        2, [0], chain([(DATA, 16, 0), (DATA + 16, 32, 0), (STATUS, 1, WRITE)]),
        header(DISCARD, 0) + struct.pack("<QII", 8, 8, 0) + struct.pack("<QII", 40, 4, 0)),
    "write_zeroes": seed(
        2, [0], chain([(DATA, 32, 0), (STATUS, 1, WRITE)]),
        header(WRITE_ZEROES, 0) + struct.pack("<QII", 16, 8, 1)),
    "three_requests": seed(
        4, [0, 3, 5],
        chain([(DATA, 16, 0), (BUF, 1024, WRITE), (STATUS, 1, WRITE)], 0)
        + chain([(DATA + 16, 16, 0), (STATUS + 1, 1, WRITE)], 3)
        + chain([(DATA + 32, 16, 0), (BUF + 0x1000, 512, 0), (STATUS + 2, 1, WRITE)], 5),
        header(IN, 0) + header(FLUSH, 0) + header(OUT, 63)),
    "read_only_write": seed(1, [0], chain([(DATA, 16, 0), (BUF, 512, 0), (STATUS, 1, WRITE)]), header(OUT, 0)),
    "indirect": seed(
        0, [0], [desc(DATA + 0x100, 3 * 16, INDIRECT)],
        header(IN, 4).ljust(0x100, b"\0")
        + b"".join(chain([(DATA, 16, 0), (BUF, 512, WRITE), (STATUS, 1, WRITE)]))),
    # The read lands on the available ring and moves its index hundreds of
    # entries ahead: the device must fail the queue, not spin.
    "read_into_avail_ring": seed(
        0, [0], chain([(DATA, 16, 0), (0x100, 512, WRITE), (STATUS, 1, WRITE)]), header(IN, 0)),
    "out_of_range": seed(0, [0], chain([(DATA, 16, 0), (BUF, 1024, WRITE), (STATUS, 1, WRITE)]), header(IN, 63)),
}

out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "seeds", "block_requests")
os.makedirs(out_dir, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(out_dir, name), "wb") as f:
        f.write(data)
print(f"{len(seeds)} seeds in {out_dir}")
