"""Disk image locks that QEMU understands: two VMs (or a VM and a storage daemon) never write one image at once.

The layout is QEMU's (block/file-posix.c, read for the facts): open-file-description locks (`F_OFD_SETLK`, held by
the open file, so a second descriptor of the same process does not clash with the first, and closing the image
drops them) on single bytes of the image file itself. For permission bit i (consistent read 0, write 1, write
unchanged 2, resize 3) an opener holds a shared lock on byte 100 + i when it uses that permission, and on byte
200 + i when it does not let others use it. Opening checks, after taking its own bytes, that no other open file
holds byte 200 + i for a permission it wants nor byte 100 + i for one it refuses to share; taking before
checking means two openers racing may both fail but never both succeed.

pyhv takes what QEMU's virtio-blk takes: a read-write drive uses consistent read and write, a read-only drive
consistent read; both share consistent read and write-unchanged only. So readers share an image with readers,
and a writer has it alone, whether the other side is pyhv, QEMU or qemu-storage-daemon.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

from pyhv.errors import GuestImageError

PERM_CONSISTENT_READ = 1 << 0
PERM_WRITE = 1 << 1
PERM_WRITE_UNCHANGED = 1 << 2
PERM_RESIZE = 1 << 3
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")
PERM_BASE = 100         # byte PERM_BASE + i: held while the permission is used
SHARED_BASE = 200       # byte SHARED_BASE + i: held while the permission is refused to others

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = struct.Struct("hhxxxxqqixxxx")     # struct flock on x86-64: type, whence, start, len, pid


def _lock_byte(fd: int, offset: int, kind: int) -> None:
    fcntl.fcntl(fd, F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0))


def _held_by_other(fd: int, offset: int) -> bool:
    """Whether another open file holds a lock on the byte (our own open file's locks never conflict)."""
    out = fcntl.fcntl(fd, F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
    return _FLOCK.unpack(out)[0] != fcntl.F_UNLCK


class ImageLock:
    """The locks of one open image file; `acquire` raises GuestImageError with QEMU's wording when another
    process uses the image in a way that conflicts."""

    def __init__(self, fd: int, path: str, readonly: bool) -> None:
        self.fd, self.path = fd, path
        self.perm = PERM_CONSISTENT_READ | (0 if readonly else PERM_WRITE)
        self.shared = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED
        self.held = False

    def acquire(self) -> None:
        if self.held:
            return
        try:
            for i in range(len(PERM_NAMES)):
                bit = 1 << i
                _lock_byte(self.fd, PERM_BASE + i, fcntl.F_RDLCK if self.perm & bit else fcntl.F_UNLCK)
                _lock_byte(self.fd, SHARED_BASE + i, fcntl.F_UNLCK if self.shared & bit else fcntl.F_RDLCK)
            conflict = self._conflict()
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                self._unlock()
                raise GuestImageError(f"drive {self.path}: the file system does not support locks ({e.strerror})",
                                      "add locking=off to the drive if no other process can open it") from None
            conflict = f"Failed to get a lock ({e.strerror})"
        if conflict:
            self._unlock()
            raise GuestImageError(f"drive {self.path}: {conflict}",
                                  f"Is another process using the image [{self.path}]? locking=off skips this "
                                  "check, at the risk of corrupting the image")
        self.held = True

    def _conflict(self) -> str | None:
        for i, name in enumerate(PERM_NAMES):
            if self.perm & 1 << i and _held_by_other(self.fd, SHARED_BASE + i):
                return f'Failed to get "{name}" lock'
        for i, name in enumerate(PERM_NAMES):
            if not self.shared & 1 << i and _held_by_other(self.fd, PERM_BASE + i):
                return f'Failed to get shared "{name}" lock'
        return None

    def release(self) -> None:
        """Let another process take the image (a live migration's source hands it to the destination)."""
        if self.held:
            self._unlock()
            self.held = False

    def _unlock(self) -> None:
        for base in (PERM_BASE, SHARED_BASE):
            try:
                fcntl.fcntl(self.fd, F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, base, len(PERM_NAMES), 0))
            except OSError:
                pass
