#!/usr/bin/env python3
"""Writes the seed corpus of the fuse_requests fuzz target (see its header
for the input format): FUSE sessions as a Linux guest sends them, against
the share the target builds (file, dir/inner, symlinks abs, rel, procfd,
a fifo). Each input starts after an INIT: node ids are handed out from 2,
file handles from 1.
Usage: python3 make_fuse_seeds.py [DIR] (default seeds/fuse_requests)."""
import os
import struct
import sys

OP = dict(LOOKUP=1, FORGET=2, GETATTR=3, SETATTR=4, READLINK=5, SYMLINK=6, MKNOD=8, MKDIR=9,
          UNLINK=10, RMDIR=11, RENAME=12, LINK=13, OPEN=14, READ=15, WRITE=16, STATFS=17,
          RELEASE=18, FSYNC=20, SETXATTR=21, GETXATTR=22, LISTXATTR=23, REMOVEXATTR=24, FLUSH=25,
          INIT=26, OPENDIR=27, READDIR=28, RELEASEDIR=29, FSYNCDIR=30, GETLK=31, SETLK=32,
          SETLKW=33, ACCESS=34, CREATE=35, INTERRUPT=36, BMAP=37, DESTROY=38, IOCTL=39, POLL=40,
          BATCH_FORGET=42, FALLOCATE=43, READDIRPLUS=44, RENAME2=45, LSEEK=46,
          COPY_FILE_RANGE=47, SETUPMAPPING=48, REMOVEMAPPING=49)
O_RDONLY, O_WRONLY, O_RDWR, O_TRUNC = 0, 1, 2, 0o1000
S_IFIFO, S_IFREG, S_IFCHR = 0o010000, 0o100000, 0o020000


class Session:
    def __init__(self, mode=0):
        self.mode = mode
        self.records = b""
        self.unique = 10

    def req(self, op, node, args=b"", reply=0x1000, route=0, length=None):
        self.unique += 1
        body = struct.pack("<IIQQIIII", length if length is not None else 40 + len(args),
                           OP[op] if isinstance(op, str) else op, self.unique, node, 0, 0, 1, 0) + args
        self.records += struct.pack("<HHB", len(body), reply, route) + body
        return self

    def bytes(self):
        return bytes([self.mode]) + self.records


def name(*names):
    return b"".join(n.encode() + b"\0" for n in names)


def open_in(flags):
    return struct.pack("<II", flags, 0)


def read_in(fh, offset, size):
    return struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0)


def write_in(fh, offset, data):
    return struct.pack("<QQIIQII", fh, offset, len(data), 0, 0, 0, 0) + data


def release_in(fh):
    return struct.pack("<QIIQ", fh, 0, 0, 0)


def setattr_in(valid, size=0, mode=0):
    return struct.pack("<IIQQQQQQIIIIIIII", valid, 0, 0, size, 0, 0, 0, 0, 0, 0, 0, mode, 0, 0, 0, 0)


seeds = {}
s = Session().req("LOOKUP", 1, name("file")).req("OPEN", 2, open_in(O_RDONLY)) \
    .req("READ", 2, read_in(1, 0, 4096)).req("FLUSH", 2, struct.pack("<QIIQ", 1, 0, 0, 0)) \
    .req("RELEASE", 2, release_in(1))
seeds["lookup_open_read"] = s.bytes()
s = Session().req("LOOKUP", 1, name("dir")).req("LOOKUP", 2, name("inner")) \
    .req("OPEN", 3, open_in(O_RDONLY)).req("READ", 3, read_in(1, 4000, 8192), reply=0x3000) \
    .req("GETATTR", 3, struct.pack("<IIQ", 0, 0, 0)) \
    .req("FORGET", 3, struct.pack("<Q", 1), reply=0, route=0x80)
seeds["nested_read_forget"] = s.bytes()
s = Session().req("CREATE", 1, struct.pack("<IIII", O_RDWR, S_IFREG | 0o644, 0, 0) + name("new")) \
    .req("WRITE", 2, write_in(1, 0, b"written by the guest")).req("FSYNC", 2, struct.pack("<QII", 1, 0, 0)) \
    .req("RENAME2", 1, struct.pack("<QII", 1, 0, 0) + name("new", "moved")) \
    .req("READ", 2, read_in(1, 0, 100)).req("SETATTR", 2, setattr_in(1 << 3, size=4)) \
    .req("UNLINK", 1, name("moved")).req("RELEASE", 2, release_in(1))
seeds["create_write_rename"] = s.bytes()
s = Session().req("LOOKUP", 1, name("abs")).req("READLINK", 2).req("OPEN", 2, open_in(O_RDONLY)) \
    .req("LOOKUP", 1, name("procfd")).req("OPEN", 3, open_in(O_RDWR)) \
    .req("SETATTR", 2, setattr_in(1, mode=0o777)).req("LOOKUP", 1, name("..")) \
    .req("LOOKUP", 1, name("..", )) .req("LOOKUP", 1, b"rel\0/../../secret\0")
seeds["symlink_escape"] = s.bytes()
s = Session().req("OPENDIR", 1, open_in(O_RDONLY)).req("READDIRPLUS", 1, read_in(1, 0, 4096)) \
    .req("READDIR", 1, read_in(1, 0, 4096)).req("FSYNCDIR", 1, struct.pack("<QII", 1, 0, 0)) \
    .req("RELEASEDIR", 1, release_in(1))
seeds["readdir"] = s.bytes()
s = Session().req("MKDIR", 1, struct.pack("<II", 0o755, 0) + name("d")) \
    .req("MKNOD", 2, struct.pack("<IIII", S_IFIFO | 0o644, 0, 0, 0) + name("p")) \
    .req("MKNOD", 2, struct.pack("<IIII", S_IFCHR | 0o666, 0x103, 0, 0) + name("null")) \
    .req("OPEN", 3, open_in(O_RDONLY)) \
    .req("SYMLINK", 2, name("s", "/etc/passwd")).req("LOOKUP", 1, name("file")) \
    .req("LINK", 2, struct.pack("<Q", 5) + name("hard")).req("UNLINK", 2, name("hard")) \
    .req("RMDIR", 1, name("d"))
seeds["mkdir_mknod_link"] = s.bytes()
s = Session().req("LOOKUP", 1, name("file")).req("OPEN", 2, open_in(O_RDWR)) \
    .req("STATFS", 1).req("ACCESS", 2, struct.pack("<II", 6, 0)) \
    .req("LSEEK", 2, struct.pack("<QQII", 1, 3, 0, 0)) \
    .req("GETXATTR", 2, struct.pack("<II", 64, 0) + name("user.x")) \
    .req("LISTXATTR", 2, struct.pack("<II", 64, 0)) \
    .req("SETXATTR", 2, struct.pack("<II", 1, 0) + name("user.x") + b"v") \
    .req("FALLOCATE", 2, struct.pack("<QQQII", 1, 0, 4096, 0, 0)) \
    .req("GETLK", 2, bytes(48)).req("SETLKW", 2, bytes(48)).req("IOCTL", 2, bytes(32)) \
    .req("COPY_FILE_RANGE", 2, bytes(56)).req("SETUPMAPPING", 2, bytes(40)) \
    .req("BATCH_FORGET", 0, struct.pack("<II", 1, 0) + struct.pack("<QQ", 2, 1), reply=0, route=0x80) \
    .req("INTERRUPT", 0, struct.pack("<Q", 12), reply=0, route=0x80) \
    .req(9999, 1).req("DESTROY", 0).req("INIT", 0, struct.pack("<IIII", 7, 36, 0, 0x40000000))
seeds["misc_ops"] = s.bytes()
s = Session().req("LOOKUP", 1, name("file"), route=5).req("LOOKUP", 1, name("file"), length=4096) \
    .req("LOOKUP", 1, name("file"), length=20).req("READ", 2, read_in(1, 0, 0xffffffff), reply=16) \
    .req("WRITE", 2, write_in(7, 0, b"x" * 10)[:30]).req("GETATTR", 12345, reply=0) \
    .req("OPEN", 0xffffffffffffffff, open_in(O_RDONLY))
seeds["malformed"] = s.bytes()
ro = Session(mode=1).req("LOOKUP", 1, name("file")).req("OPEN", 2, open_in(O_RDWR | O_TRUNC)) \
    .req("OPEN", 2, open_in(O_RDONLY)).req("WRITE", 2, write_in(1, 0, b"nope")) \
    .req("CREATE", 1, struct.pack("<IIII", O_RDWR, S_IFREG | 0o644, 0, 0) + name("new")) \
    .req("UNLINK", 1, name("file")).req("SETATTR", 2, setattr_in(1 << 3))
seeds["read_only"] = ro.bytes()
seeds["event_idx"] = bytes([2]) + Session().req("LOOKUP", 1, name("file")).records

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "seeds", "fuse_requests")
os.makedirs(out, exist_ok=True)
for seed_name, data in seeds.items():
    with open(os.path.join(out, seed_name), "wb") as f:
        f.write(data)
print(f"{len(seeds)} seeds in {out}")
