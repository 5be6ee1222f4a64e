"""virtio-pci (modern) transport without KVM: capabilities, feature negotiation, queue setup, a virtio-blk request
notified through the notify region, INTx with the ISR, MSI-X vectors, reset, the PCI-config window."""
from __future__ import annotations

import struct

import pytest

from pyhv.devices.pci.constants import PCI_COMMAND_MEMORY, PCI_MSIX_FLAGS_ENABLE
from pyhv.memory.dma import DmaFault, TranslatedDma
from pyhv.runtime.iothread import IoThread
from pyhv.virtio.blk import VIRTIO_BLK_T_IN, VirtioBlk
from pyhv.virtio.device import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
)
from pyhv.virtio.pci import VIRTIO_MSI_NO_VECTOR, VirtioPciDevice

from pci_helpers import Board, FakeLine, fake_routes
from virtq_driver import FakeMemory, RingDriver

BAR1, BAR4 = 0xE0000000, 0xE0100000
COMMON, ISR, DEVCFG, NOTIFY = BAR4, BAR4 + 0x1000, BAR4 + 0x2000, BAR4 + 0x3000
DEVFN = 2 << 3


@pytest.fixture
def rig(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(range(256)) * 2 * 64)            # 64 sectors, each 0..255 twice
    board = Board()
    mem = FakeMemory(1 << 20)
    backend = VirtioBlk(str(img), serial="SER123")
    io = IoThread()
    dev = VirtioPciDevice("vblk", backend, mem, io, msi_routes=fake_routes, use_ioeventfd=False)
    board.bus.plug(dev, 2)
    line = FakeLine()
    dev.intx_out = line.set_level
    board.cfg_write(DEVFN, 0x14, 4, BAR1)
    board.cfg_write(DEVFN, 0x20, 4, BAR4)
    board.cfg_write(DEVFN, 0x24, 4, 0)
    board.cfg_write(DEVFN, 0x04, 2, PCI_COMMAND_MEMORY)
    yield board, dev, mem, line
    dev.close()
    io.close()


def caps(board):
    out, ptr = {}, board.cfg_read(DEVFN, 0x34, 1)
    while ptr:
        if board.cfg_read(DEVFN, ptr, 1) == 0x09:
            cfg_type = board.cfg_read(DEVFN, ptr + 3, 1)
            out[cfg_type] = (board.cfg_read(DEVFN, ptr + 4, 1), board.cfg_read(DEVFN, ptr + 8, 4),
                             board.cfg_read(DEVFN, ptr + 12, 4), ptr)
        ptr = board.cfg_read(DEVFN, ptr + 1, 1)
    return out


def setup_driver(board, mem, features: int, vector: int | None = None) -> RingDriver:
    m = board.memory
    m.write(COMMON + 0x14, 1, 0)
    m.write(COMMON + 0x14, 1, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    m.write(COMMON + 0x08, 4, 0)
    m.write(COMMON + 0x0C, 4, features & 0xFFFFFFFF)
    m.write(COMMON + 0x08, 4, 1)
    m.write(COMMON + 0x0C, 4, features >> 32)
    m.write(COMMON + 0x14, 1, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
    drv = RingDriver(mem, size=16)
    m.write(COMMON + 0x16, 2, 0)
    m.write(COMMON + 0x18, 2, 16)
    if vector is not None:
        m.write(COMMON + 0x1A, 2, vector)
    m.write(COMMON + 0x20, 8, drv.desc)                    # one 64-bit access: split into the two halves
    m.write(COMMON + 0x28, 4, drv.avail)
    m.write(COMMON + 0x2C, 4, 0)
    m.write(COMMON + 0x30, 4, drv.used)
    m.write(COMMON + 0x1C, 2, 1)
    return drv


def test_identity_and_capabilities(rig):
    board, dev, mem, line = rig
    assert board.cfg_read(DEVFN, 0, 4) == 0x10421AF4                 # virtio-blk, modern
    assert board.cfg_read(DEVFN, 8, 1) == 1
    assert board.cfg_read(DEVFN, 0x0B, 1) == 0x01                    # mass storage
    c = caps(board)
    assert c[1][:3] == (4, 0x0000, 0x40)
    assert c[3][:2] == (4, 0x1000) and c[4][:2] == (4, 0x2000)
    assert c[2][:2] == (4, 0x3000)
    assert board.cfg_read(DEVFN, c[2][3] + 16, 4) == 4                # notify_off_multiplier
    assert 5 in c


def test_feature_negotiation(rig):
    board, dev, mem, line = rig
    m = board.memory
    offered = dev.backend.device_features()
    m.write(COMMON, 4, 1)
    assert m.read(COMMON + 4, 4) == offered >> 32
    m.write(COMMON, 4, 0)
    assert m.read(COMMON + 4, 4) == offered & 0xFFFFFFFF
    m.write(COMMON + 0x14, 1, 3)
    m.write(COMMON + 0x08, 4, 0)
    m.write(COMMON + 0x0C, 4, offered & 0xFFFFFFFF)                   # VERSION_1 (bit 32) missing
    m.write(COMMON + 0x14, 1, 3 | VIRTIO_CONFIG_S_FEATURES_OK)
    assert not m.read(COMMON + 0x14, 1) & VIRTIO_CONFIG_S_FEATURES_OK
    m.write(COMMON + 0x08, 4, 1)
    m.write(COMMON + 0x0C, 4, (offered >> 32) | 0x80000000)          # a bit the device never offered
    m.write(COMMON + 0x14, 1, 3 | VIRTIO_CONFIG_S_FEATURES_OK)
    assert not m.read(COMMON + 0x14, 1) & VIRTIO_CONFIG_S_FEATURES_OK
    m.write(COMMON + 0x0C, 4, offered >> 32)
    m.write(COMMON + 0x14, 1, 3 | VIRTIO_CONFIG_S_FEATURES_OK)
    assert m.read(COMMON + 0x14, 1) & VIRTIO_CONFIG_S_FEATURES_OK
    assert m.read(COMMON + 0x12, 2) == 1
    assert m.read(DEVCFG, 8) == 64                                   # capacity in sectors


def read_request(drv: RingDriver, sector: int) -> tuple[int, int]:
    hdr = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, sector)
    head = drv.add([(hdr, False), (512, True), (1, True)])
    drv.publish(head)
    return head, drv.heap


def test_request_through_the_notify_region_and_intx(rig):
    board, dev, mem, line = rig
    drv = setup_driver(board, mem, 1 << 32)
    board.memory.write(COMMON + 0x14, 1, 0xF)
    head, _ = read_request(drv, 3)
    board.memory.write(NOTIFY, 2, 0)
    assert drv.take_used() == [(head, 513)]
    assert dev.vstate.notifies == [1]
    assert line.level                                                 # INTx: MSI-X is not enabled
    assert board.cfg_read(DEVFN, 0x06, 2) & 0x08
    assert board.memory.read(ISR, 1) == 1                             # read clears and deasserts
    assert not line.level and board.memory.read(ISR, 1) == 0


def test_request_with_msix_vector(rig):
    board, dev, mem, line = rig
    msix = dev.msix
    board.memory.write(BAR1 + 16 * 1, 4, 0xFEE00000)
    board.memory.write(BAR1 + 16 * 1 + 8, 4, 0x41)
    board.memory.write(BAR1 + 16 * 1 + 12, 4, 0)
    board.cfg_write(DEVFN, msix.cap + 2, 2, PCI_MSIX_FLAGS_ENABLE)
    drv = setup_driver(board, mem, 1 << 32, vector=1)
    assert board.memory.read(COMMON + 0x1A, 2) == 1
    board.memory.write(COMMON + 0x1A, 2, 7)                          # no such vector: reads back NO_VECTOR
    assert board.memory.read(COMMON + 0x1A, 2) == VIRTIO_MSI_NO_VECTOR
    board.memory.write(COMMON + 0x1A, 2, 1)
    board.memory.write(COMMON + 0x14, 1, 0xF)
    head, _ = read_request(drv, 0)
    board.memory.write(NOTIFY, 2, 0)
    assert drv.take_used() == [(head, 513)]
    assert msix.routes[1].fired == 1 and msix.routes[1].message == (0xFEE00000, 0x41)
    assert not line.level and dev.vstate.isr == 0


def test_queue_registers_are_frozen_after_driver_ok_and_status_zero_resets(rig):
    board, dev, mem, line = rig
    m = board.memory
    setup_driver(board, mem, 1 << 32)
    m.write(COMMON + 0x14, 1, 0xF)
    m.write(COMMON + 0x18, 2, 8)
    assert m.read(COMMON + 0x18, 2) == 16
    m.write(COMMON + 0x16, 2, 5)                                      # no queue 5: reads zero
    assert m.read(COMMON + 0x18, 2) == 0
    m.write(COMMON + 0x14, 1, 0)
    assert m.read(COMMON + 0x14, 1) == 0 and not dev.backend.active
    m.write(COMMON + 0x16, 2, 0)
    assert m.read(COMMON + 0x1C, 2) == 0 and m.read(COMMON + 0x20, 4) == 0


def test_bad_ring_sets_needs_reset(rig):
    board, dev, mem, line = rig
    setup_driver(board, mem, 1 << 32)
    board.memory.write(COMMON + 0x20, 8, (1 << 20) - 8)              # descriptor table past the end of RAM
    board.memory.write(COMMON + 0x14, 1, 0xF)
    assert board.memory.read(COMMON + 0x14, 1) & VIRTIO_CONFIG_S_NEEDS_RESET
    assert board.memory.read(ISR, 1) == 2 and dev.vstate.config_generation == 1


def test_pci_cfg_capability_window(rig):
    board, dev, mem, line = rig
    cap = caps(board)[5][3]
    board.cfg_write(DEVFN, cap + 4, 1, 4)
    board.cfg_write(DEVFN, cap + 8, 4, 0x2000)
    board.cfg_write(DEVFN, cap + 12, 4, 4)
    assert board.cfg_read(DEVFN, cap + 16, 4) == 64                   # capacity, low dword, through config space
    board.cfg_write(DEVFN, cap + 8, 4, 0x0016)
    board.cfg_write(DEVFN, cap + 12, 4, 2)
    board.cfg_write(DEVFN, cap + 16, 2, 0)                             # queue_select = 0 through the window
    assert board.cfg_read(DEVFN, cap + 16, 2) == 0


class PageTranslator:
    """An IOMMU stand-in: identity for the pages in `mapped`, a DmaFault for the rest."""

    def __init__(self, mapped: set[int]) -> None:
        self.mapped = mapped

    def translate(self, source_id: int, addr: int, write: bool, pin: bool = False) -> tuple[int, int]:
        if addr >> 12 not in self.mapped:
            raise DmaFault(f"{addr:#x} not mapped", addr, write, 6)
        return addr, 4096 - (addr & 0xFFF)


def test_behind_an_iommu_access_platform_is_required_and_faults_fail_requests(rig):
    """attach_dma (an IOMMU in front): VIRTIO_F_ACCESS_PLATFORM is offered and must be accepted; a request whose
    data buffer is not mapped completes with IOERR and leaves memory alone; rings in unmapped space reset the
    device."""
    board, dev, mem, line = rig
    pages = {p for p in range(0x1000 >> 12, 0x4000 >> 12)} | {0x10000 >> 12}   # rings and the first heap page
    dev.attach_dma(TranslatedDma("vblk", mem, PageTranslator(pages), DEVFN))
    m = board.memory
    m.write(COMMON, 4, 1)
    assert m.read(COMMON + 4, 4) & 2                                  # bit 33
    drv = setup_driver(board, mem, 1 << 32)                           # VERSION_1 only: refused
    assert not m.read(COMMON + 0x14, 1) & VIRTIO_CONFIG_S_FEATURES_OK
    drv = setup_driver(board, mem, 3 << 32)
    assert m.read(COMMON + 0x14, 1) & VIRTIO_CONFIG_S_FEATURES_OK
    m.write(COMMON + 0x14, 1, 0xF)
    hdr = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)
    head = drv.add([(hdr, False), (512, True), (1, True)])            # header at 0x10000, status at 0x10210
    mem.write(0x11000, b"\x5a" * 512)
    drv.write_desc(head + 1, 0x11000, 512, 3, head + 2)               # data: an unmapped page
    drv.publish(head)
    m.write(NOTIFY, 2, 0)
    assert drv.take_used() == [(head, 1)]
    assert mem.read(0x10210, 1) == b"\x01"                            # IOERR in the status byte
    assert mem.read(0x11000, 512) == b"\x5a" * 512
    m.write(COMMON + 0x14, 1, 0)
    pages.discard(0x3000 >> 12)                                       # the used ring's page unmapped
    setup_driver(board, mem, 3 << 32)
    m.write(COMMON + 0x14, 1, 0xF)
    assert m.read(COMMON + 0x14, 1) & VIRTIO_CONFIG_S_NEEDS_RESET
