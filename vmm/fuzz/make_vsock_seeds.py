#!/usr/bin/env python3
"""Writes the seed corpus of the vsock_packets fuzz target (the format is
the program that fuzz_targets/vsock_packets.rs decodes)."""
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "vsock_packets")

REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = range(1, 8)


def rx(n, size_sel=5):
    return bytes([4, n] + [size_sel] * n)


def tx(op, src, dst, payload=b"", flags=0, buf_alloc=65536, fwd=0, sel=0, cuts=(), type_=None):
    if type_ is not None:
        sel |= 4
    out = bytes([0, sel])
    if type_ is not None:
        out += struct.pack("<H", type_)
    out += bytes([op, src, dst, flags]) + struct.pack("<II", buf_alloc, fwd)
    out += bytes([len(payload)]) + payload
    out += bytes([len(cuts)] + list(cuts))
    return out


def host_event():
    return bytes([6])


def accept():
    return bytes([9])


def host_connect(port):
    return bytes([7, 0, port])


def host_write(stream, sixteens):
    return bytes([8, stream, sixteens])


seeds = {
    # Guest connects to host port 1, data both ways with a split header, then closes.
    "guest_echo": rx(4) + tx(REQUEST, 0, 1) + accept()
    + tx(RW, 0, 1, b"hello", cuts=(10, 30)) + host_write(0, 1)
    + tx(CREDIT_REQUEST, 0, 1) + tx(SHUTDOWN, 0, 1, flags=3),
    # Guest connects to a port nobody listens on.
    "guest_refused": rx(1) + tx(REQUEST, 0, 3),
    # Host CONNECT to guest port 1, guest accepts, data, host closes.
    "host_connect": rx(4) + host_connect(1) + host_event()
    + tx(RESPONSE, 1, 0, sel=64) + host_write(0, 2)
    + tx(RW, 1, 0, b"pong", sel=64) + bytes([9, 0, 0]) + host_event(),
    # Credit: the guest advertises a tiny buffer, then updates it.
    "credit": rx(5) + tx(REQUEST, 0, 1, buf_alloc=10) + accept() + host_write(0, 4)
    + tx(CREDIT_UPDATE, 0, 1, buf_alloc=10, fwd=10) + host_event(),
    # Bad inputs: raw chain out of memory, bad type, bad op, short buffers.
    "bad": rx(2, 1) + bytes([5, 0, 1, 0]) + b"\xff" * 8 + bytes([0]) + b"\xff" * 4
    + b"\x01\x00\x00\x00" + tx(99 % 9, 0, 1) + tx(REQUEST, 0, 1, type_=2),
}

os.makedirs(OUT, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)
print(f"{len(seeds)} seeds in {OUT}")
