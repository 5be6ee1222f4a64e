"""`AddressSpace`: a region tree rendered into a `FlatView` of non-overlapping ranges, and access dispatch.

x86 has two: `system_memory` (MMIO, RAM, ROM) and `system_io` (the 64 KiB port space). The vCPU loop looks up a
`FlatRange` per exit (a list index for ports, a bisect for MMIO) and calls its `read`/`write`, which already hold
the region callback and the offset arithmetic: no allocation and no branching on region kinds per access.
"""
from __future__ import annotations

import logging
from bisect import bisect_right
from typing import Callable, Iterable

from pyhv.memory.region import MemoryRegion, RegionKind, _topology_lock, memory_transaction

log = logging.getLogger(__name__)

ALL_ONES = [0, 0xFF, 0xFFFF, 0xFFFFFF, 0xFFFFFFFF, 0xFF_FFFFFFFF, 0xFFFF_FFFFFFFF, 0xFFFFFF_FFFFFFFF,
            0xFFFFFFFF_FFFFFFFF]


class FlatRange:
    """A piece [start, end) of an address space that one leaf region (ram, rom or io) answers for.

    `read(addr, size)` and `write(addr, size, value)` take the *address-space* address."""

    __slots__ = ("start", "end", "region", "offset", "readonly", "owner", "read", "write", "space",
                 "delta", "io_read", "io_write")

    def __init__(self, start: int, end: int, region: MemoryRegion | None, offset: int, readonly: bool,
                 space: "AddressSpace") -> None:
        self.start, self.end, self.region, self.offset, self.readonly = start, end, region, offset, readonly
        self.space = space
        self.owner = region.owner if region is not None else "unassigned"
        delta = offset - start          # region offset = address + delta
        # The vCPU loop calls io_read(addr + delta, size) / io_write(addr + delta, size, value): for an I/O region
        # that is the device's own callback with the region offset, one Python call per exit instead of two.
        self.delta = 0
        if region is None:
            self.read, self.write = space._unassigned_read, space._unassigned_write
        elif region.kind is RegionKind.IO:
            rd, wr = region.read, region.write
            self.read = lambda addr, size: rd(addr + delta, size)
            self.write = lambda addr, size, value: wr(addr + delta, size, value)
            self.delta, self.io_read, self.io_write = delta, rd, wr
        else:  # ram or rom reached by an exit: a non-page-aligned edge, a ROM write, or a memslot update race
            view = region.block.view
            base = region.block_offset + delta

            def ram_read(addr: int, size: int) -> int:
                i = addr + base
                return int.from_bytes(view[i:i + size], "little")

            def ram_write(addr: int, size: int, value: int) -> None:
                if self.readonly:
                    space.rom_writes_dropped += 1
                    return
                i = addr + base
                view[i:i + size] = (value & ALL_ONES[size]).to_bytes(size, "little")

            self.read, self.write = ram_read, ram_write
        if region is None or region.kind is not RegionKind.IO:
            self.io_read, self.io_write = self.read, self.write

    @property
    def is_ram(self) -> bool:
        return self.region is not None and self.region.kind in (RegionKind.RAM, RegionKind.ROM)

    def host_offset(self) -> int:
        """Offset of `start` in the backing RamBlock (ram/rom ranges only)."""
        return self.region.block_offset + self.offset

    def __repr__(self) -> str:
        name = self.region.name if self.region else "unassigned"
        return f"FlatRange({self.start:#x}-{self.end - 1:#x} {name} +{self.offset:#x}{' ro' if self.readonly else ''})"


class FlatView:
    def __init__(self, space: "AddressSpace", ranges: list[FlatRange]) -> None:
        self.space = space
        self.ranges = ranges
        self.starts = [r.start for r in ranges]
        self.unassigned = FlatRange(0, space.size, None, 0, False, space)
        self.port_table: list[FlatRange] | None = None
        if space.is_port_space:
            table = [self.unassigned] * space.size
            for r in ranges:
                table[r.start:r.end] = [r] * (r.end - r.start)
            self.port_table = table

    def lookup(self, addr: int) -> FlatRange:
        """The range that answers for `addr` (the `unassigned` sentinel if none)."""
        i = bisect_right(self.starts, addr) - 1
        if i >= 0:
            r = self.ranges[i]
            if addr < r.end:
                return r
        return self.unassigned

    def span(self, addr: int) -> tuple[FlatRange, int, int]:
        """The range that answers for `addr` and the stretch [start, end) around addr that it answers for: its own
        bounds, or for the unassigned sentinel the gap between its neighbours (so callers can cache either)."""
        i = bisect_right(self.starts, addr) - 1
        if i >= 0:
            r = self.ranges[i]
            if addr < r.end:
                return r, r.start, r.end
        lo = self.ranges[i].end if i >= 0 else 0
        hi = self.ranges[i + 1].start if i + 1 < len(self.ranges) else self.space.size
        return self.unassigned, lo, hi

    def ram_ranges(self) -> Iterable[FlatRange]:
        return (r for r in self.ranges if r.is_ram)


class AddressSpace:
    """A root region plus its current flat view; listeners hear about every new view (KVM memslots, DMA)."""

    def __init__(self, name: str, root: MemoryRegion, is_port_space: bool = False) -> None:
        self.name = name
        self.root = root
        self.size = root.size
        self.is_port_space = is_port_space
        self.unassigned_reads = 0
        self.unassigned_writes = 0
        self.rom_writes_dropped = 0
        self.listeners: list[Callable[[FlatView, FlatView | None], None]] = []
        root.address_spaces.append(self)
        self.view: FlatView = FlatView(self, render(root, self))

    def add_listener(self, listener: Callable[[FlatView, FlatView | None], None]) -> None:
        """`listener(new_view, old_view)` now and on every change (old_view is None the first time)."""
        with _topology_lock:
            self.listeners.append(listener)
            listener(self.view, None)

    def commit(self) -> None:
        with _topology_lock:
            old, new = self.view, FlatView(self, render(self.root, self))
            for listener in self.listeners:
                listener(new, old)
            self.view = new

    # --- access (the general path; the vCPU loop inlines the common case) -----------------------------------
    def read(self, addr: int, size: int) -> int:
        r = self.view.lookup(addr)
        if addr + size <= r.end:
            return r.read(addr, size)
        value = 0  # the access straddles ranges: split it into bytes, little-endian
        for i in range(size):
            value |= self.read(addr + i, 1) << (8 * i)
        return value

    def write(self, addr: int, size: int, value: int) -> None:
        r = self.view.lookup(addr)
        if addr + size <= r.end:
            r.write(addr, size, value)
            return
        for i in range(size):
            self.write(addr + i, 1, (value >> (8 * i)) & 0xFF)

    def _unassigned_read(self, addr: int, size: int) -> int:
        self.unassigned_reads += 1
        return ALL_ONES[size]

    def _unassigned_write(self, addr: int, size: int, value: int) -> None:
        self.unassigned_writes += 1

    # --- inspection ----------------------------------------------------------------------------------------
    def dump_tree(self) -> str:
        """The region tree, formatted like QEMU's `info mtree`."""
        width = 16
        lines = [f"address-space: {self.name}"]

        def walk(region: MemoryRegion, base: int, priority: int, depth: int) -> None:
            end = base + region.size - 1
            kind = region.kind.value
            if region.kind is RegionKind.ROM or (region.kind is RegionKind.RAM and region.readonly):
                kind = "rom"
            text = f"{'  ' * depth}{base:0{width}x}-{end:0{width}x} (prio {priority}, {kind}): "
            if region.kind is RegionKind.ALIAS:
                t = region.alias_target
                text += (f"alias {region.name} @{t.name} {region.alias_offset:0{width}x}-"
                         f"{region.alias_offset + region.size - 1:0{width}x}")
            else:
                text += region.name
            if not region.enabled:
                text += " [disabled]"
            lines.append(text)
            for sub in sorted(region.subregions, key=lambda s: (s.address, -s.priority)):
                walk(sub.region, base + sub.address, sub.priority, depth + 1)

        walk(self.root, 0, 0, 1)
        return "\n".join(lines)


def render(root: MemoryRegion, space: AddressSpace) -> list[FlatRange]:
    """Flatten a region tree: higher priority first; a region only fills what is still free."""
    covered: list[tuple[int, int, MemoryRegion, int, bool]] = []   # sorted, non-overlapping

    def insert(lo: int, hi: int, region: MemoryRegion, region_base: int, readonly: bool) -> None:
        # fill the gaps of [lo, hi) that no earlier (higher-priority) range claimed
        pieces = []
        cursor = lo
        for (s, e, *_rest) in covered:
            if e <= cursor:
                continue
            if s >= hi:
                break
            if s > cursor:
                pieces.append((cursor, s))
            cursor = max(cursor, e)
            if cursor >= hi:
                break
        if cursor < hi:
            pieces.append((cursor, hi))
        for s, e in pieces:
            covered.append((s, e, region, s - region_base, readonly))
        covered.sort(key=lambda t: t[0])

    def walk(region: MemoryRegion, base: int, lo: int, hi: int, readonly: bool) -> None:
        if not region.enabled:
            return
        lo, hi = max(lo, base), min(hi, base + region.size)
        if lo >= hi:
            return
        readonly = readonly or region.readonly
        if region.kind is RegionKind.ALIAS:
            walk(region.alias_target, base - region.alias_offset, lo, hi, readonly)
        elif region.kind is RegionKind.CONTAINER:
            for sub in sorted(region.subregions, key=lambda s: (-s.priority, -s.order)):
                walk(sub.region, base + sub.address, lo, hi, readonly)
        else:
            insert(lo, hi, region, base, readonly)

    walk(root, 0, 0, root.size, False)
    ranges: list[FlatRange] = []
    for s, e, region, offset, readonly in covered:
        prev = ranges[-1] if ranges else None
        if (prev is not None and prev.region is region and prev.end == s and prev.readonly == readonly
                and prev.offset + (s - prev.start) == offset):
            ranges[-1] = FlatRange(prev.start, e, region, prev.offset, readonly, space)   # merge neighbours
        else:
            ranges.append(FlatRange(s, e, region, offset, readonly, space))
    return ranges


__all__ = ["AddressSpace", "FlatView", "FlatRange", "ALL_ONES", "memory_transaction"]
