"""A writer for the cpio "newc" format (SVR4 with no CRC), the format Linux unpacks as an initramfs.

Each member is a 110-byte ASCII header (magic `070701` and thirteen 8-digit hex fields), its NUL-terminated name,
padding to a multiple of 4, its data, padding to a multiple of 4; the archive ends with a member named
`TRAILER!!!`. See the kernel's Documentation/driver-api/early-userspace/buffer-format.rst.

Members are written in the order given; `Archive` adds missing parent directories and sorts, so a directory
always comes before what it holds (the kernel's unpacker creates nothing implicitly). Output is reproducible:
inode numbers count up from 1, owners are root and the modification time is fixed.
"""
from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable

NEWC_MAGIC = b"070701"
NEWC_HEADER_SIZE = 110
NEWC_TRAILER = "TRAILER!!!"
NEWC_ALIGN = 4


def _pad(length: int) -> bytes:
    return b"\0" * (-length % NEWC_ALIGN)


@dataclass
class CpioEntry:
    """One member. `mode` holds the file type bits (stat.S_IFREG, S_IFDIR, S_IFLNK, S_IFCHR, S_IFBLK) and the
    permission bits; a symlink's data is its target; a device node has rdev_major/rdev_minor."""
    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> "CpioEntry":
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> "CpioEntry":
        return cls(name, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, name: str, target: str) -> "CpioEntry":
        return cls(name, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def char_device(cls, name: str, major: int, minor: int, perm: int = 0o600) -> "CpioEntry":
        return cls(name, stat.S_IFCHR | perm, rdev_major=major, rdev_minor=minor)


def _header(entry: CpioEntry, ino: int, name: bytes, mtime: int) -> bytes:
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, entry.uid, entry.gid, nlink, mtime, len(entry.data), 0, 0,
              entry.rdev_major, entry.rdev_minor, len(name) + 1, 0)
    for value in fields:
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"cpio member {entry.name!r}: field value {value} does not fit in 32 bits")
    return NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)


def write_newc(entries: Iterable[CpioEntry], out: BinaryIO, mtime: int = 0) -> int:
    """Writes the members and the trailer to `out`; returns the number of bytes written."""
    written = 0
    ino = 0
    members = list(entries)
    if any(e.name.strip("/") == NEWC_TRAILER for e in members):
        raise ValueError(f"a member named {NEWC_TRAILER} would end the archive early")
    for entry in members + [CpioEntry(NEWC_TRAILER, 0)]:
        name = entry.name.lstrip("/").encode() or b"."
        ino += 1
        header = _header(entry, ino if entry.name != NEWC_TRAILER else 0, name,
                         mtime if entry.name != NEWC_TRAILER else 0)
        chunk = header + name + b"\0"
        chunk += _pad(len(chunk))
        out.write(chunk)
        out.write(entry.data + _pad(len(entry.data)))
        written += len(chunk) + len(entry.data) + len(_pad(len(entry.data)))
    return written


@dataclass
class Archive:
    """A set of members keyed by absolute path; `add` replaces an earlier member of the same path."""
    entries: dict[str, CpioEntry] = field(default_factory=dict)

    def add(self, entry: CpioEntry) -> None:
        path = "/" + entry.name.strip("/")
        if path == "/":
            raise ValueError("cannot add the root directory as a member")
        if path == "/" + NEWC_TRAILER:       # the kernel's unpacker would stop there and drop what follows
            raise ValueError(f"a member named {NEWC_TRAILER} would end the archive early")
        parent = path.rsplit("/", 1)[0]
        while parent and parent not in self.entries:
            self.entries[parent] = CpioEntry.directory(parent)
            parent = parent.rsplit("/", 1)[0]
        existing = self.entries.get(path)
        if existing is not None and stat.S_ISDIR(existing.mode) and not stat.S_ISDIR(entry.mode):
            raise ValueError(f"{path} is a directory in the archive; cannot replace it with a file")
        entry.name = path
        self.entries[path] = entry

    def members(self) -> list[CpioEntry]:
        """Members with each directory before its contents (sorted by path components)."""
        return [self.entries[p] for p in sorted(self.entries, key=lambda p: p.split("/"))]

    def write(self, out: BinaryIO, mtime: int = 0) -> int:
        return write_newc(self.members(), out, mtime)
