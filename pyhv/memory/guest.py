"""`GuestMemory`: bounds-checked access to guest RAM by guest-physical address, for devices and loaders.

It follows the system address space's flat view, so RAM that firmware shadows or hides (PAM) is seen exactly as
the guest sees it. Every address and length a guest supplies is checked here: an access outside RAM raises
`GuestMemoryError`, which device models turn into a failed request.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyhv.memory.address_space import AddressSpace, FlatView


class GuestMemoryError(Exception):
    """A guest-physical access that is not entirely inside guest RAM."""


class GuestMemory:
    def __init__(self, space: "AddressSpace") -> None:
        self.dirty: set[int] | None = None     # during a live migration: pages pyhv wrote (KVM logs the guest's)
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, memoryview, bool]] = []   # (start, end, view, readonly)
        space.add_listener(self._update)

    def _update(self, view: "FlatView", old: "FlatView | None") -> None:
        ranges = []
        for r in view.ram_ranges():
            off = r.host_offset()
            ranges.append((r.start, r.end, r.region.block.view[off:off + (r.end - r.start)], r.readonly))
        self._ranges = ranges
        self._starts = [r[0] for r in ranges]

    def _find(self, gpa: int, length: int, write: bool) -> tuple[memoryview, int]:
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0 and length >= 0:
            start, end, view, readonly = self._ranges[i]
            if gpa + length <= end:
                if write and readonly:
                    raise GuestMemoryError(f"write to read-only memory at {gpa:#x}")
                return view, gpa - start
        raise GuestMemoryError(f"guest-physical range {gpa:#x}+{length:#x} is not in RAM")

    def view(self, gpa: int, length: int, write: bool = False) -> memoryview:
        """A zero-copy view of [gpa, gpa+length), which must lie in one contiguous RAM range."""
        view, off = self._find(gpa, length, write)
        return view[off:off + length]

    def span(self, gpa: int) -> tuple[int, int, memoryview, bool] | None:
        """The contiguous RAM range holding gpa: (start, end, its bytes, read-only?), or None (for callers that
        slice many buffers from one range, like the virtqueue)."""
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0:
            start, end, view, readonly = self._ranges[i]
            if gpa < end:
                return start, end, view, readonly
        return None

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._find(gpa, length, False)
            return True
        except GuestMemoryError:
            return False

    def read(self, gpa: int, length: int) -> bytes:
        try:
            return bytes(self.view(gpa, length))
        except GuestMemoryError:
            if length <= 1:
                raise
        out = bytearray()    # the range may span adjacent RAM ranges (e.g. low RAM and a shadow region)
        while length:
            view, off = self._find(gpa, 1, False)
            n = min(length, len(view) - off)
            out += view[off:off + n]
            gpa, length = gpa + n, length - n
        return bytes(out)

    def write(self, gpa: int, data: bytes | bytearray | memoryview, *, rom: bool = False) -> None:
        """Write guest RAM; `rom=True` also writes read-only memory (firmware), as a debugger patching code does."""
        data = memoryview(data).cast("B")
        if self.dirty is not None:
            self.dirty.update(range(gpa - gpa % 4096, gpa + len(data), 4096))
        while len(data):
            view, off = self._find(gpa, 1, not rom)
            n = min(len(data), len(view) - off)
            view[off:off + n] = data[:n]
            gpa, data = gpa + n, data[n:]

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.view(gpa, size), "little")

