#!/usr/bin/env python3
"""Writes the seed corpus of the mmio_registers target (its input format
is described in fuzz_targets/mmio_registers.rs)."""
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "mmio_registers")

STATUS, QSEL, QNUM, QREADY, QNOTIFY = 0x70, 0x30, 0x38, 0x44, 0x50
DFSEL, DF, DRVSEL, DRV = 0x14, 0x10, 0x24, 0x20
ISTATUS, IACK = 0x60, 0x64
QDESC, QDRIVER, QDEVICE = 0x80, 0x90, 0xA0
DESC_F_NEXT, DESC_F_WRITE = 1, 2


def read(off, size_sel=2):
    return struct.pack("<BHB", 0, off, size_sel)


def write(off, value, size_sel=2):
    return struct.pack("<BHBQ", 1, off, size_sel, value)


def mem(addr, data):
    return struct.pack("<BHB", 2, addr, len(data)) + data


def kick(queue=0):
    return struct.pack("<BB", 3, queue)


def bring_up(size_exp, desc, avail, used):
    return struct.pack("<BBHHH", 4, size_exp, desc, avail, used)


def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def ring(idx, heads):
    return struct.pack("<HH", 0, idx) + b"".join(struct.pack("<H", h) for h in heads)


def linux_probe():
    s = read(0) + read(4) + read(8) + read(0xC)
    s += write(STATUS, 0) + write(STATUS, 1) + write(STATUS, 3)
    s += write(DFSEL, 1) + read(DF) + write(DFSEL, 0) + read(DF)
    s += write(DRVSEL, 1) + write(DRV, 1) + write(DRVSEL, 0) + write(DRV, 0)
    s += write(STATUS, 0xB) + read(STATUS)
    s += write(QSEL, 0) + read(0x34) + write(QNUM, 16)
    s += write(QDESC, 0x1000) + write(QDESC + 4, 0)
    s += write(QDRIVER, 0x2000) + write(QDRIVER + 4, 0)
    s += write(QDEVICE, 0x3000) + write(QDEVICE + 4, 0)
    s += write(QREADY, 1) + write(STATUS, 0xF) + read(0xFC)
    return s


def one_request():
    s = mem(0x1000, desc(0x8000, 64, DESC_F_WRITE, 0))
    s += mem(0x2000, ring(1, [0]))
    s += bring_up(4, 0x1000, 0x2000, 0x3000) + kick(0)
    s += read(ISTATUS) + write(IACK, 1) + read(0x3000)
    return s


def chained_and_looping_requests():
    table = desc(0x8000, 16, DESC_F_WRITE | DESC_F_NEXT, 1)
    table += desc(0x9000, 32, DESC_F_WRITE, 0)
    table += desc(0xA000, 8, 0, 0)  # readable only
    table += desc(0xB000, 8, DESC_F_WRITE | DESC_F_NEXT, 3)  # loops on itself
    table += desc(0xFFF0, 0x100, DESC_F_WRITE, 0)  # runs past the end of memory
    s = mem(0x1000, table) + mem(0x2000, ring(4, [0, 2, 3, 4]))
    s += bring_up(3, 0x1000, 0x2000, 0x3000) + kick(0) + kick(1)
    s += write(STATUS, 0) + bring_up(3, 0x1000, 0x2000, 0x3000) + kick(0)
    return s


def bad_orders_and_widths():
    s = write(STATUS, 4) + write(STATUS, 1) + write(STATUS, 0xB) + write(STATUS, 3)
    s += write(STATUS, 0xB)  # no VERSION_1 accepted
    s += write(QNUM, 12) + write(QNUM, 1 << 20) + read(0x3, 0) + read(0x100, 3)
    s += write(0x100, 0xFFFF, 1) + write(0x0, 1) + read(0x1FE, 1) + kick(1)
    s += bring_up(9, 0xFFF0, 0x1, 0x2) + read(STATUS) + write(STATUS, 0x8F)
    return s


def main():
    os.makedirs(OUT, exist_ok=True)
    seeds = {
        "linux_probe": linux_probe(),
        "one_request": one_request(),
        "chained_and_looping_requests": chained_and_looping_requests(),
        "bad_orders_and_widths": bad_orders_and_widths(),
    }
    for name, data in seeds.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
