"""The vhost-user back end's map of front-end memory, and virtio-rng."""
from __future__ import annotations

import os

import pytest

from pyhv.memory.guest import GuestMemoryError
from pyhv.vhost.memory import VhostMemoryMap, map_region
from pyhv.vhost.protocol import VhostUserError
from pyhv.virtio.rng import VirtioRng
from virtq_driver import FakeMemory, RingDriver

PAGE = 4096


def memfd(size: int, fill: bytes = b"") -> int:
    fd = os.memfd_create("t")
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill, 0)
    return fd


def test_regions_translate_guest_and_user_addresses():
    m = VhostMemoryMap()
    fd = memfd(4 * PAGE, b"\x11" * PAGE + b"\x22" * PAGE + b"\x33" * PAGE)
    low = map_region(os.dup(fd), 0, 2 * PAGE, 0x7000_0000, 0)
    high = map_region(fd, 0x100000, PAGE, 0x7000_2000, 2 * PAGE)          # offset into the same memfd
    m.set_table([high, low])
    assert bytes(m.view(PAGE, 4)) == b"\x22" * 4
    assert bytes(m.view(0x100000, 2)) == b"\x33" * 2
    assert m.uaddr_to_gpa(0x7000_2010, 16) == 0x100010
    for gpa, length in ((2 * PAGE - 1, 2), (0x100000 + PAGE, 1), (0x50000, 1), (0, -1)):
        with pytest.raises(GuestMemoryError):
            m.view(gpa, length)
    with pytest.raises(GuestMemoryError):
        m.uaddr_to_gpa(0x7000_1FF0, 0x20)                                 # straddles the end of a region
    m.remove(0x100000, PAGE, 0x7000_2000)
    with pytest.raises(GuestMemoryError):
        m.view(0x100000, 1)
    with pytest.raises(VhostUserError):
        m.remove(0x100000, PAGE, 0x7000_2000)
    m.clear()


def test_overlapping_or_bad_regions_are_refused():
    m = VhostMemoryMap()
    m.add(map_region(memfd(2 * PAGE), 0, 2 * PAGE, 0, 0))
    with pytest.raises(VhostUserError, match="overlap"):
        m.add(map_region(memfd(PAGE), PAGE, PAGE, 0x10000, 0))
    assert len(m.regions) == 1
    with pytest.raises(VhostUserError, match="empty or overflows"):
        map_region(memfd(PAGE), 0, 0, 0, 0)
    with pytest.raises(VhostUserError, match="empty or overflows"):
        map_region(memfd(PAGE), (1 << 64) - PAGE, 2 * PAGE, 0, 0)
    with pytest.raises(VhostUserError, match="cannot map"):
        map_region(memfd(PAGE), 0, PAGE, 0, 1 << 50)                      # beyond what the fd can map
    m.clear()


def test_rng_fills_writable_buffers():
    mem = FakeMemory()
    d = RingDriver(mem)
    dev = VirtioRng()
    calls = []
    dev.activate(mem, [d.queue()], calls.append, dev.device_features())
    d.publish(d.add([(64, True)]), d.add([(16, True), (16, True)]))
    dev.notify(0)
    used = d.take_used()
    assert [u[1] for u in used] == [64, 32] and calls == [0]
    assert mem.read(0x10000, 64) != bytes(64)
    assert dev.bytes_given == 96
