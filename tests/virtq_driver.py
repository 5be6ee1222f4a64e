"""A test-side virtio driver: lays out split rings in a bytearray-backed fake guest memory, adds descriptor chains
(also hostile ones, by writing raw descriptors) and reads the used ring back."""
from __future__ import annotations

import struct

from pyhv.memory.guest import GuestMemoryError
from pyhv.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VirtQueue


class FakeMemory:
    """Guest RAM [base, base + size) in a bytearray, with GuestMemory's view() contract (the driver works on a real
    `GuestMemory` too)."""

    def __init__(self, size: int = 1 << 20, base: int = 0) -> None:
        self.buf = bytearray(size)
        self.base = base

    def view(self, gpa: int, length: int, write: bool = False) -> memoryview:
        if gpa < self.base or length < 0 or gpa + length > self.base + len(self.buf):
            raise GuestMemoryError(f"{gpa:#x}+{length:#x} outside fake RAM")
        return memoryview(self.buf)[gpa - self.base:gpa - self.base + length]

    def span(self, gpa: int):
        if self.base <= gpa < self.base + len(self.buf):
            return self.base, self.base + len(self.buf), memoryview(self.buf), False
        return None

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = data


class RingDriver:
    def __init__(self, mem: FakeMemory, size: int = 16, desc: int = 0x1000, avail: int = 0x2000,
                 used: int = 0x3000, heap: int = 0x10000, start_idx: int = 0) -> None:
        self.mem, self.size = mem, size
        self.desc, self.avail, self.used = desc, avail, used
        self.heap = heap
        self.next_desc = 0
        self.avail_idx = start_idx & 0xFFFF
        self.used_seen = start_idx & 0xFFFF
        self._u16(avail + 2, self.avail_idx)
        self._u16(used + 2, self.used_seen)

    def _u16(self, addr: int, value: int) -> None:
        self.mem.write(addr, struct.pack("<H", value & 0xFFFF))

    def queue(self, event_idx: bool = False, indirect: bool = True, index: int = 0) -> VirtQueue:
        return VirtQueue(index, self.size, self.mem, self.desc, self.avail, self.used, event_idx=event_idx,
                         indirect=indirect, next_avail=self.avail_idx, next_used=self.used_seen)

    def alloc(self, data: bytes | int) -> tuple[int, int]:
        """Place data (or reserve n zero bytes) in the heap: (addr, length)."""
        n = data if isinstance(data, int) else len(data)
        addr = self.heap
        self.heap += (n + 15) // 16 * 16 or 16
        if not isinstance(data, int):
            self.mem.write(addr, data)
        return addr, n

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
                   table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def add(self, bufs: list[tuple[bytes | int, bool]]) -> int:
        """A direct chain: bufs are (data or length, device_writable); returns its head."""
        n = len(bufs)
        idx = [(self.next_desc + k) % self.size for k in range(n)]
        self.next_desc += n
        for k, (data, writable) in enumerate(bufs):
            addr, length = self.alloc(data)
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (VIRTQ_DESC_F_NEXT if k < n - 1 else 0)
            self.write_desc(idx[k], addr, length, flags, idx[k + 1] if k < n - 1 else 0)
        return idx[0]

    def add_indirect(self, bufs: list[tuple[bytes | int, bool]]) -> int:
        table, _ = self.alloc(16 * len(bufs))
        for k, (data, writable) in enumerate(bufs):
            addr, length = self.alloc(data)
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (VIRTQ_DESC_F_NEXT if k < len(bufs) - 1 else 0)
            self.write_desc(k, addr, length, flags, k + 1 if k < len(bufs) - 1 else 0, table=table)
        head = self.next_desc % self.size
        self.next_desc += 1
        self.write_desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
        return head

    def publish(self, *heads: int) -> None:
        for head in heads:
            self._u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._u16(self.avail + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self._u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self._u16(self.avail + 4 + 2 * self.size, value)

    def used_flags(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used, 2))[0]

    def avail_event(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 4 + 8 * self.size, 2))[0]

    def take_used(self) -> list[tuple[int, int]]:
        """New used elements (id, len) since the last call."""
        idx = struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]
        out = []
        while self.used_seen != idx:
            slot = self.used_seen % self.size
            out.append(struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out
