#!/usr/bin/env python3
"""Writes the seed corpus of the net_frames fuzz target (see its header for
the input format): well-formed tx frames (one descriptor, header split off,
scattered), a short and an oversize chain, rx buffers for frames from the
tap with and without mergeable buffers, a legacy driver, a reset.
Usage: python3 make_net_seeds.py [DIR] (default seeds/net_frames)."""
import os
import struct
import sys

DATA = 0x4000
RXBUF = 0x20000
NEXT, WRITE = 1, 2
MRG, EVENT_IDX, MODERN, RESET = 1, 2, 4, 8
QUEUE_SIZE = 16


def desc(addr, length, flags=0, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def ring(heads, descs):
    table = b"".join(descs).ljust(16 * QUEUE_SIZE, b"\0")
    return bytes([len(heads)]) + bytes(heads) + table


def frames(lengths):
    # The target scales a le16 value by 70000/65536.
    return bytes([len(lengths)]) + b"".join(
        struct.pack("<H", min(0xFFFF, (n * 65536 + 69999) // 70000)) for n in lengths
    )


def tx_frame(length, flags=0):
    header = bytes([flags]) + b"\0" * 11
    return header + bytes((i * 7) & 0xFF for i in range(length))


def seed(mode, tx, rx, tap, data=b""):
    return bytes([mode]) + tx + rx + frames(tap) + data


def rx_buffers(count, size):
    return ring(list(range(count)), [desc(RXBUF + i * 0x2000, size, WRITE) for i in range(count)])


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "seeds", "net_frames")
    os.makedirs(out, exist_ok=True)
    frame = tx_frame(60)
    no_rx = ring([], [])
    no_tx = ring([], [])
    seeds = {
        "tx_one_descriptor": seed(MODERN, ring([0], [desc(DATA, len(frame))]), no_rx, [], frame),
        "tx_header_split": seed(
            MODERN | EVENT_IDX,
            ring([0], [desc(DATA, 5, NEXT, 1), desc(DATA + 5, 7, NEXT, 2), desc(DATA + 12, 60)]),
            no_rx, [], frame),
        "tx_short_and_writable": seed(
            MODERN,
            ring([0, 1], [desc(DATA, 11), desc(DATA, 60, WRITE)]),
            no_rx, [], frame),
        "tx_legacy": seed(0, ring([0], [desc(DATA, 70)]), no_rx, [], tx_frame(60)[2:]),
        "tx_oversize": seed(
            MODERN,
            ring([0], [desc(DATA, 0x10000, NEXT, 1), desc(DATA, 0x100)]),
            no_rx, [], frame),
        "rx_plain": seed(MODERN, no_tx, rx_buffers(4, 2048), [1500, 60, 12]),
        "rx_mergeable": seed(MODERN | MRG, no_tx, rx_buffers(8, 1500), [4000, 9000, 100]),
        "rx_too_big_and_runt": seed(MODERN, no_tx, rx_buffers(2, 1000), [5, 2000, 500]),
        "rx_legacy": seed(0, no_tx, rx_buffers(2, 1524), [1512]),
        "rx_no_buffers_then_reset": seed(MODERN | MRG | RESET, no_tx, rx_buffers(1, 1500), [3000, 60]),
        "both": seed(MODERN | MRG | EVENT_IDX,
                     ring([0], [desc(DATA, len(frame))]), rx_buffers(3, 4096), [60, 1514], frame),
    }
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
