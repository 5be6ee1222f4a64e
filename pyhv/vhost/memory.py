"""The front end's guest memory as a vhost-user back end sees it: regions shared as file descriptors (memfd), each
mapped here, addressed by guest-physical address (descriptors) or front-end user address (ring addresses).

`VhostMemoryMap` has `GuestMemory`'s `view(gpa, length, write)` contract, so `VirtQueue` and the devices use it
unchanged. Regions are checked when they arrive (sizes, overlaps, overflow, mmap failure); an access outside every
region raises `GuestMemoryError`. Replaced regions are unmapped once the last view into them is gone.
"""
from __future__ import annotations

import logging
import mmap
import os
from bisect import bisect_right
from dataclasses import dataclass

from pyhv.memory.guest import GuestMemoryError
from pyhv.vhost.protocol import VhostUserError

log = logging.getLogger(__name__)

MAX_REGIONS = 32
ADDR_LIMIT = 1 << 64


@dataclass
class Region:
    gpa: int
    size: int
    uaddr: int
    mmap_offset: int
    mm: mmap.mmap
    view: memoryview            # the region's bytes

    @property
    def end(self) -> int:
        return self.gpa + self.size


def map_region(fd: int, gpa: int, size: int, uaddr: int, mmap_offset: int) -> Region:
    """mmap one region from its fd (which is closed here either way)."""
    try:
        if size == 0 or gpa + size > ADDR_LIMIT or uaddr + size > ADDR_LIMIT or mmap_offset + size > ADDR_LIMIT:
            raise VhostUserError(f"memory region gpa {gpa:#x} size {size:#x} uaddr {uaddr:#x} offset "
                                 f"{mmap_offset:#x} is empty or overflows")
        page_off = mmap_offset % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(fd, size + page_off, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=mmap_offset - page_off)
        except (OSError, ValueError, OverflowError) as e:
            raise VhostUserError(f"cannot map memory region gpa {gpa:#x} size {size:#x} at file offset "
                                 f"{mmap_offset:#x}: {e}") from None
        return Region(gpa, size, uaddr, mmap_offset, mm, memoryview(mm)[page_off:page_off + size])
    finally:
        os.close(fd)


class VhostMemoryMap:
    def __init__(self) -> None:
        self.regions: list[Region] = []
        self._starts: list[int] = []

    def _sort(self) -> None:
        self.regions.sort(key=lambda r: r.gpa)
        self._starts = [r.gpa for r in self.regions]
        for a, b in zip(self.regions, self.regions[1:]):
            if b.gpa < a.end:
                raise VhostUserError(f"memory regions overlap: {a.gpa:#x}+{a.size:#x} and {b.gpa:#x}+{b.size:#x}")

    def set_table(self, regions: list[Region]) -> None:
        self.clear()
        self.regions = list(regions)
        try:
            self._sort()
        except VhostUserError:
            self.clear()
            raise

    def add(self, region: Region) -> None:
        if len(self.regions) >= MAX_REGIONS:
            raise VhostUserError(f"more than {MAX_REGIONS} memory regions")
        self.regions.append(region)
        try:
            self._sort()
        except VhostUserError:
            self.regions.remove(region)
            self._sort()
            _release(region)
            raise

    def remove(self, gpa: int, size: int, uaddr: int) -> None:
        for r in self.regions:
            if (r.gpa, r.size, r.uaddr) == (gpa, size, uaddr):
                self.regions.remove(r)
                self._sort()
                _release(r)
                return
        raise VhostUserError(f"no memory region gpa {gpa:#x} size {size:#x} uaddr {uaddr:#x} to remove")

    def clear(self) -> None:
        for r in self.regions:
            _release(r)
        self.regions = []
        self._starts = []

    # --- access ------------------------------------------------------------------------------------------------
    def view(self, gpa: int, length: int, write: bool = False) -> memoryview:
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0 and length >= 0:
            r = self.regions[i]
            if gpa + length <= r.end:
                off = gpa - r.gpa
                return r.view[off:off + length]
        raise GuestMemoryError(f"guest-physical range {gpa:#x}+{length:#x} is not in the shared memory")

    def span(self, gpa: int) -> tuple[int, int, memoryview, bool] | None:
        """The region holding gpa: (start, end, its bytes, read-only?), or None."""
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0:
            r = self.regions[i]
            if gpa < r.end:
                return r.gpa, r.end, r.view, False
        return None

    def uaddr_to_gpa(self, uaddr: int, length: int) -> int:
        """Translate a front-end user address range (ring addresses) to a guest-physical address."""
        for r in self.regions:
            if r.uaddr <= uaddr and uaddr + length <= r.uaddr + r.size:
                return uaddr - r.uaddr + r.gpa
        raise GuestMemoryError(f"front-end address range {uaddr:#x}+{length:#x} is not in any memory region")

    def describe(self) -> str:
        return ", ".join(f"{r.gpa:#x}+{r.size:#x}@{r.uaddr:#x}" for r in self.regions) or "none"


def _release(region: Region) -> None:
    try:
        region.view.release()
        region.mm.close()
    except BufferError:
        pass     # views into it are still alive (a request in flight): unmapped when the last one goes
