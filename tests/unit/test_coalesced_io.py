"""Coalesced I/O replay: queued writes reach their device in the guest's order, the ring index wraps."""
from __future__ import annotations

import struct

from pyhv.machine.coalesced_io import ENTRY_OFFSET, MAX_ENTRIES, PAGE, CoalescedIo
from pyhv.memory import AddressSpace, MemoryRegion


def make():
    seen = []
    io = MemoryRegion.container("io", 0x10000)
    io.add_subregion(0x402, MemoryRegion.io("debugcon", 1, lambda o, s: 0xE9,
                                            lambda o, s, v: seen.append(("io", v))))
    mem = MemoryRegion.container("mem", 1 << 32)
    mem.add_subregion(0x1000, MemoryRegion.io("dev", 16, lambda o, s: 0, lambda o, s, v: seen.append(("mmio", o, v))))
    ring = bytearray(3 * PAGE)
    c = CoalescedIo(vm=None, ring_map=ring, page_offset=2,
                    io=AddressSpace("io", io, is_port_space=True), memory=AddressSpace("mem", mem))
    return c, ring, seen


def push(ring, index: int, addr: int, data: bytes, pio: bool) -> None:
    base = 2 * PAGE
    struct.pack_into("=QII8s", ring, base + ENTRY_OFFSET + 24 * index, addr, len(data), int(pio), data)


def test_replay_in_order_and_wrap():
    c, ring, seen = make()
    base = 2 * PAGE
    start = MAX_ENTRIES - 2
    for i, ch in enumerate(b"abc"):
        push(ring, (start + i) % MAX_ENTRIES, 0x402, bytes([ch]), True)
    push(ring, (start + 3) % MAX_ENTRIES, 0x1004, b"\x34\x12", False)
    struct.pack_into("=II", ring, base, start, (start + 4) % MAX_ENTRIES)
    assert c.pending()
    c.drain()
    assert seen == [("io", ord("a")), ("io", ord("b")), ("io", ord("c")), ("mmio", 4, 0x1234)]
    assert struct.unpack_from("=II", ring, base) == ((start + 4) % MAX_ENTRIES,) * 2
    assert not c.pending() and c.replayed == 4
    c.drain()
    assert len(seen) == 4


def test_corrupt_index_does_not_loop():
    c, ring, seen = make()
    struct.pack_into("=II", ring, 2 * PAGE, MAX_ENTRIES + 5, 3)
    c.drain()
    assert not c.pending() and seen == []
