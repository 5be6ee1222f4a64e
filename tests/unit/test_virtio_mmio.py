"""virtio-mmio (version 2) transport without KVM: probed, negotiated and set up the way Linux's virtio_mmio driver
does it, against the real virtio-rng back end with pyhv's own guest memory (RAM region + address space +
GuestMemory); interrupts on a level line and through a resampling irqfd; ioeventfds; hostile accesses."""
from __future__ import annotations

import logging
import os
import time

import pytest

from pyhv.devices.device import Claim
from pyhv.devices.irq import CallbackIrqLine
from pyhv.runtime.iothread import IoThread
from pyhv.memory import AddressSpace, GuestMemory, MemoryRegion
from pyhv.virtio.device import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1, VIRTIO_ID_RNG,
)
from pyhv.virtio.mmio import (
    VIRTIO_MMIO_SIZE, VIRTIO_MMIO_SLOT_SIZE, VIRTIO_MMIO_VENDOR_ID_QEMU, VirtioMmioDevice, cmdline_entry,
)
from pyhv.virtio.rng import VirtioRng

from virtq_driver import RingDriver

BASE = 0xD0000000
RAM = 1 << 20

MAGIC, VERSION, DEVICE_ID, VENDOR_ID = 0x00, 0x04, 0x08, 0x0C
DEV_FEAT, DEV_FEAT_SEL, DRV_FEAT, DRV_FEAT_SEL = 0x10, 0x14, 0x20, 0x24
Q_SEL, Q_NUM_MAX, Q_NUM, Q_READY, Q_NOTIFY = 0x30, 0x34, 0x38, 0x44, 0x50
INT_STATUS, INT_ACK, STATUS = 0x60, 0x64, 0x70
Q_DESC_LO, Q_DESC_HI, Q_DRV_LO, Q_DRV_HI, Q_DEV_LO, Q_DEV_HI = 0x80, 0x84, 0x90, 0x94, 0xA0, 0xA4
SHM_SEL, SHM_LEN_LO, SHM_LEN_HI, CONFIG_GEN = 0xAC, 0xB0, 0xB4, 0xFC


class RamView:
    """The guest's RAM as RingDriver wants it (buf/base/write), on a RamBlock that GuestMemory also sees."""

    def __init__(self, region: MemoryRegion, guest: GuestMemory) -> None:
        self.buf = region.block.view
        self.base = 0
        self.guest = guest

    def write(self, gpa: int, data: bytes) -> None:
        self.guest.write(gpa, data)

    def read(self, gpa: int, length: int) -> bytes:
        return self.guest.read(gpa, length)


class Rig:
    def __init__(self, iothread: IoThread | None = None, **kw) -> None:
        self.system = MemoryRegion.container("system", 1 << 64)
        self.ram = MemoryRegion.ram("ram", RAM)
        self.system.add_subregion(0, self.ram)
        self.space = AddressSpace("memory", self.system)
        self.guest = GuestMemory(self.space)
        self.ramview = RamView(self.ram, self.guest)
        self.levels: list[bool] = []
        self.line = CallbackIrqLine(self.levels.append)
        self.backend = VirtioRng()
        self.dev = VirtioMmioDevice("virtio-mmio0", self.backend, self.guest, iothread, base=BASE,
                                    irq=self.line, **kw)
        for claim in self.dev.claims():             # what a board's attach() does
            assert claim.space == "memory"
            self.system.add_subregion(claim.address, claim.region, claim.priority)

    def r(self, off: int, size: int = 4) -> int:
        return self.space.read(BASE + off, size)

    def w(self, off: int, value: int, size: int = 4) -> None:
        self.space.write(BASE + off, size, value)

    def status(self, value: int) -> None:
        self.w(STATUS, value)

    # --- Linux's virtio_mmio.c, in order -------------------------------------------------------------------
    def probe(self) -> None:
        assert self.r(MAGIC) == 0x74726976
        assert self.r(VERSION) == 2
        assert self.r(DEVICE_ID) == VIRTIO_ID_RNG
        assert self.r(VENDOR_ID) == VIRTIO_MMIO_VENDOR_ID_QEMU

    def features(self) -> int:
        self.w(DEV_FEAT_SEL, 1)
        high = self.r(DEV_FEAT)
        self.w(DEV_FEAT_SEL, 0)
        return high << 32 | self.r(DEV_FEAT)

    def finalize(self, features: int) -> None:
        self.w(DRV_FEAT_SEL, 1)
        self.w(DRV_FEAT, features >> 32)
        self.w(DRV_FEAT_SEL, 0)
        self.w(DRV_FEAT, features & 0xFFFFFFFF)

    def setup_vq(self, index: int, size: int = 16) -> RingDriver:
        self.w(Q_SEL, index)
        assert self.r(Q_READY) == 0
        assert self.r(Q_NUM_MAX) >= size
        drv = RingDriver(self.ramview, size=size)
        self.w(Q_NUM, size)
        self.w(Q_DESC_LO, drv.desc & 0xFFFFFFFF)
        self.w(Q_DESC_HI, drv.desc >> 32)
        self.w(Q_DRV_LO, drv.avail & 0xFFFFFFFF)
        self.w(Q_DRV_HI, drv.avail >> 32)
        self.w(Q_DEV_LO, drv.used & 0xFFFFFFFF)
        self.w(Q_DEV_HI, drv.used >> 32)
        self.w(Q_READY, 1)
        assert self.r(Q_READY) == 1
        return drv

    def bring_up(self, features: int | None = None) -> RingDriver:
        self.probe()
        self.status(0)
        assert self.r(STATUS) == 0
        self.status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
        self.status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
        offered = self.features()
        assert offered >> VIRTIO_F_VERSION_1 & 1
        self.finalize(offered if features is None else features)
        self.status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
        assert self.r(STATUS) & VIRTIO_CONFIG_S_FEATURES_OK
        drv = self.setup_vq(0)
        self.status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
                    | VIRTIO_CONFIG_S_DRIVER_OK)
        assert self.backend.active
        return drv

    def interrupt_handler(self) -> int:
        """vm_interrupt: read the status, acknowledge exactly those bits."""
        status = self.r(INT_STATUS)
        self.w(INT_ACK, status)
        return status


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.dev.close()


def test_identity_window_and_claims(rig):
    rig.probe()
    assert VIRTIO_MMIO_SIZE == 0x200 and VIRTIO_MMIO_SLOT_SIZE == 0x1000
    assert rig.dev.region.size == VIRTIO_MMIO_SIZE
    assert rig.dev.claims() == [Claim.mmio(BASE, rig.dev.region)]
    rig.w(Q_SEL, 0)
    assert rig.r(Q_NUM_MAX) == 256
    rig.w(Q_SEL, 1)                         # no second queue: Linux stops at QueueNumMax == 0
    assert rig.r(Q_NUM_MAX) == 0
    rig.w(SHM_SEL, 0)
    assert rig.r(SHM_LEN_LO) == rig.r(SHM_LEN_HI) == 0xFFFFFFFF   # no shared memory region
    assert rig.r(CONFIG_GEN) == 0
    assert rig.r(0x100) == 0                # virtio-rng has no configuration space


def test_cmdline_entry():
    assert cmdline_entry(0xD0000000, 5) == "virtio_mmio.device=4K@0xd0000000:5"
    assert VirtioMmioDevice.cmdline_entry(0xD0001000, 6, 0x200) == "virtio_mmio.device=512@0xd0001000:6"
    assert cmdline_entry(0xD0000000, 7, 1 << 20) == "virtio_mmio.device=1M@0xd0000000:7"


def test_rng_request_completes_with_interrupt(rig):
    drv = rig.bring_up()
    head = drv.add([(64, True)])
    addr = drv.heap - 64
    drv.publish(head)
    assert rig.guest.read(addr, 64) == bytes(64)
    rig.w(Q_NOTIFY, 0)                                         # vm_notify: the queue index
    assert drv.take_used() == [(head, 64)]
    assert rig.guest.read(addr, 64) != bytes(64)               # random bytes landed in guest RAM
    assert rig.r(INT_STATUS) == 1
    assert rig.line.level and rig.levels == [True]
    assert rig.dev.state.notifies == [1]
    assert rig.interrupt_handler() == 1
    assert not rig.line.level and rig.levels == [True, False]
    assert rig.r(INT_STATUS) == 0


def test_ack_of_some_bits_keeps_the_line_up(rig):
    drv = rig.bring_up()
    drv.publish(drv.add([(8, True)]))
    rig.w(Q_NOTIFY, 0)
    rig.dev.config_changed()
    assert rig.r(INT_STATUS) == 3 and rig.r(CONFIG_GEN) == 1
    rig.w(INT_ACK, 1)
    assert rig.line.level and rig.r(INT_STATUS) == 2
    assert rig.levels == [True, False, True]            # a fresh edge for the bit left over
    rig.w(INT_ACK, 2)
    assert not rig.line.level


def test_feature_negotiation_refused(rig):
    rig.probe()
    rig.status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    offered = rig.features()
    rig.finalize(offered & 0xFFFFFFFF)                              # no VERSION_1
    rig.status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
    assert not rig.r(STATUS) & VIRTIO_CONFIG_S_FEATURES_OK
    rig.finalize(offered | 1 << 63)                                 # a bit never offered
    rig.status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
    assert not rig.r(STATUS) & VIRTIO_CONFIG_S_FEATURES_OK
    rig.finalize(offered)
    rig.status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
    assert rig.r(STATUS) & VIRTIO_CONFIG_S_FEATURES_OK
    rig.w(DRV_FEAT, 0)                                              # after FEATURES_OK: ignored
    rig.w(DRV_FEAT_SEL, 0)
    assert rig.r(DRV_FEAT) == offered & 0xFFFFFFFF


def test_driver_ok_without_features_ok_stays_inactive(rig):
    rig.status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK)
    assert not rig.backend.active


def test_reset_clears_everything(rig):
    drv = rig.bring_up()
    drv.publish(drv.add([(8, True)]))
    rig.w(Q_NOTIFY, 0)
    assert rig.line.level
    rig.status(0)
    assert rig.r(STATUS) == 0 and rig.r(INT_STATUS) == 0 and not rig.line.level
    assert not rig.backend.active
    rig.w(Q_SEL, 0)
    assert rig.r(Q_READY) == 0 and rig.r(Q_NUM) == 256 and rig.r(Q_DESC_LO) == 0
    rig.bring_up()                                                  # and it comes up again
    rig.dev.reset()                                                 # the machine's reset
    assert not rig.backend.active and rig.r(STATUS) == 0


def test_broken_ring_sets_needs_reset(rig):
    drv = rig.bring_up()
    drv.write_desc(0, RAM - 8, 64, 2)                               # buffer past the end of RAM
    drv.publish(0)
    rig.w(Q_NOTIFY, 0)
    assert rig.r(STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET
    assert rig.r(INT_STATUS) & 2 and rig.line.level
    rig.status(0)
    assert not rig.r(STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET


def test_ring_outside_ram_at_driver_ok(rig):
    rig.probe()
    rig.status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    rig.finalize(rig.features())
    rig.status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
    rig.w(Q_SEL, 0)
    rig.w(Q_NUM, 16)
    rig.w(Q_DESC_LO, 0)
    rig.w(Q_DESC_HI, 0x10)                                          # 64 GiB: no RAM there
    rig.w(Q_READY, 1)
    rig.status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
               | VIRTIO_CONFIG_S_DRIVER_OK)
    assert not rig.backend.active
    assert rig.r(STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET


def test_hostile_accesses_are_ignored(rig, caplog):
    caplog.set_level(logging.WARNING)
    rig.w(MAGIC, 0)                                                 # read-only
    rig.w(MAGIC, 0)
    assert rig.r(MAGIC) == 0x74726976
    assert sum("read-only" in r.message for r in caplog.records) == 1     # logged once
    assert rig.r(MAGIC, 1) == 0 and rig.r(MAGIC + 1, 2) == 0          # not 32-bit aligned
    rig.w(STATUS, 1, size=1)
    assert rig.r(STATUS) == 0
    rig.w(Q_SEL, 5)                                                 # no such queue
    rig.w(Q_NUM, 16)
    rig.w(Q_READY, 1)
    rig.w(Q_DESC_LO, 0x1000)
    assert rig.r(Q_READY) == 0 and rig.r(Q_NUM) == 0
    rig.w(Q_SEL, 0)
    rig.w(Q_NUM, 512)                                               # above QueueNumMax
    assert rig.r(Q_NUM) == 256
    rig.w(Q_NUM, 24)                                                # not a power of 2
    assert rig.r(Q_NUM) == 256
    rig.w(Q_NUM, 0)
    assert rig.r(Q_NUM) == 256
    rig.w(Q_NOTIFY, 7)                                              # no such queue, device not running
    rig.w(DEV_FEAT_SEL, 9)
    assert rig.r(DEV_FEAT) == 0
    rig.w(0x1F0, 0xFFFFFFFF)                                        # config space of a device without one
    assert rig.r(0x1F0) == 0


def test_live_queue_is_not_changed(rig):
    drv = rig.bring_up()
    rig.w(Q_SEL, 0)
    rig.w(Q_NUM, 8)
    rig.w(Q_DESC_LO, 0x8000)
    rig.w(Q_READY, 0)
    assert rig.r(Q_NUM) == 16 and rig.r(Q_DESC_LO) == drv.desc and rig.r(Q_READY) == 1


def test_back_end_exception_never_reaches_the_vcpu(rig, monkeypatch):
    rig.bring_up()

    def boom(index):
        raise RuntimeError("bug")
    monkeypatch.setattr(rig.backend, "notify", boom)
    rig.w(Q_NOTIFY, 0)                                              # logged, not raised


def wait_for(cond, timeout=2.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def test_ioeventfd_registration_and_kick():
    io = IoThread()
    io.start()
    r = Rig(iothread=io)
    try:
        calls = []
        assert r.dev.register_ioeventfds(lambda *a: calls.append(a))
        assert [(addr, length, dm, de) for _, addr, length, dm, de in calls] == [(BASE + 0x50, 4, 0, False)]
        assert r.dev.notify_address() == (BASE + 0x50, 4, 0)
        assert r.dev.notify_addresses(0xD0001000) == [(0xD0001050, 4, 0)]
        fd = calls[0][0]
        drv = r.bring_up()
        head = drv.add([(32, True)])
        drv.publish(head)
        os.eventfd_write(fd, 1)                     # what KVM does on the guest's QueueNotify write
        assert wait_for(lambda: r.line.level)
        assert drv.take_used() == [(head, 32)]
        assert r.dev.state.notifies == [0]          # no exit reached Python
        calls.clear()
        r.dev.register_ioeventfds(lambda *a: calls.append(a), 0xD0001000)   # moved: old removed, new added
        assert [(a[1], a[4]) for a in calls] == [(BASE + 0x50, True), (0xD0001050, False)]
    finally:
        r.dev.close()
        io.close()


def test_no_iothread_no_ioeventfds(rig):
    assert rig.dev.register_ioeventfds(lambda *a: None) is False


def test_irqfd_with_resample():
    io = IoThread()
    io.start()
    irqfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    resample = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    r = Rig(iothread=io, irqfd=irqfd, resamplefd=resample)
    try:
        assert r.dev.interrupt_eventfd == irqfd
        drv = r.bring_up()
        drv.publish(drv.add([(8, True)]))
        r.w(Q_NOTIFY, 0)
        assert os.eventfd_read(irqfd) == 1          # raised through the irqfd, not the line
        assert r.levels == []
        os.eventfd_write(resample, 1)               # KVM: EOI while InterruptStatus is still set
        assert wait_for(lambda: _readable(irqfd))
        assert os.eventfd_read(irqfd) == 1          # raised again
        r.interrupt_handler()
        os.eventfd_write(resample, 1)               # EOI after the ACK: stays low
        time.sleep(0.05)
        assert not _readable(irqfd)
    finally:
        r.dev.close()
        io.close()
        os.close(irqfd)
        os.close(resample)


def _readable(fd: int) -> bool:
    import select
    return bool(select.select([fd], [], [], 0)[0])


def test_config_change_before_driver_ok_raises_no_interrupt(rig):
    rig.status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    rig.dev.config_changed()
    assert rig.r(CONFIG_GEN) == 1
    assert rig.r(INT_STATUS) == 0 and not rig.line.level


def test_irqfd_without_resample_is_an_edge_per_write():
    irqfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    r = Rig(irqfd=irqfd)
    try:
        drv = r.bring_up()
        drv.publish(drv.add([(8, True)]))
        r.w(Q_NOTIFY, 0)
        assert os.eventfd_read(irqfd) == 1
        r.dev.config_changed()
        assert os.eventfd_read(irqfd) == 1
        r.w(INT_ACK, 1)                                 # bit 1 left: written again
        assert os.eventfd_read(irqfd) == 1
        r.w(INT_ACK, 2)
        assert not _readable(irqfd) and r.levels == []
    finally:
        r.dev.close()
        os.close(irqfd)


def test_resamplefd_needs_irqfd_and_iothread():
    with pytest.raises(ValueError):
        Rig(resamplefd=5)
    with pytest.raises(ValueError):
        Rig(irqfd=5, resamplefd=6)                      # no I/O thread to read the resample eventfd
