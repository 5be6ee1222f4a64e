"""Host memory that backs guest RAM and ROM."""
from __future__ import annotations

import ctypes
import mmap
import os

PAGE_SIZE = 4096


class RamBlock:
    """A page-aligned block of host memory: anonymous private memory, or a memfd (`shared=True`) whose file
    descriptor can be handed to another process (vhost-user)."""

    def __init__(self, name: str, size: int, shared: bool = False) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"RAM block {name!r}: size {size:#x} is not a positive multiple of {PAGE_SIZE}")
        self.name = name
        self.size = size
        self.fd: int | None = None
        if shared:
            self.fd = os.memfd_create(f"pyhv:{name}", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
            self.mmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        else:
            self.mmap = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
            self.mmap.madvise(mmap.MADV_HUGEPAGE)
        self._anchor = ctypes.c_char.from_buffer(self.mmap)
        self.host_addr = ctypes.addressof(self._anchor)
        self.view = memoryview(self.mmap)

    def close(self) -> None:
        self.view.release()
        del self._anchor
        self.mmap.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __repr__(self) -> str:
        return f"RamBlock({self.name!r}, size={self.size:#x}, shared={self.fd is not None})"
