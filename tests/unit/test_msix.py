"""MSI-X: table and PBA in a BAR, per-vector and function masking, pending delivery, bad messages."""
from __future__ import annotations

import pytest

from pyhv.devices.pci.constants import PCI_COMMAND_MEMORY, PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_MASKALL
from pyhv.devices.pci.device import PciDevice
from pyhv.devices.pci.msix import MsixCapability
from pyhv.memory import MemoryRegion

from pci_helpers import Board, fake_routes

DEVFN = 4 << 3
BAR_ADDR = 0xE0000000


class MsixWidget(PciDevice):
    VENDOR_ID, DEVICE_ID = 0x1234, 0x1111

    def __init__(self) -> None:
        super().__init__("msixw")
        bar = MemoryRegion.container("msixw-bar", 0x1000)
        self.msix = MsixCapability(self, 4, 1, 0x000, 0x800, fake_routes("msixw", 4))
        bar.add_subregion(0, self.msix.table_region)
        bar.add_subregion(0x800, self.msix.pba_region)
        self.add_bar(1, bar)

    def config_written(self, offset: int, size: int, value: int) -> None:
        self.msix.config_written(offset, size)


@pytest.fixture
def b():
    board = Board()
    board.dev = MsixWidget()
    board.bus.plug(board.dev, 4)
    board.cfg_write(DEVFN, 0x14, 4, BAR_ADDR)
    board.cfg_write(DEVFN, 0x04, 2, PCI_COMMAND_MEMORY)
    return board


def program(b, vector: int, addr: int, data: int, masked: bool) -> None:
    base = BAR_ADDR + 16 * vector
    b.memory.write(base, 4, addr & 0xFFFFFFFF)
    b.memory.write(base + 4, 4, addr >> 32)
    b.memory.write(base + 8, 4, data)
    b.memory.write(base + 12, 4, int(masked))


def set_flags(b, flags: int) -> None:
    cap = b.dev.msix.cap
    b.cfg_write(DEVFN, cap + 2, 2, flags)


def test_capability_layout(b):
    cap = b.dev.msix.cap
    assert b.cfg_read(DEVFN, cap, 1) == 0x11
    assert b.cfg_read(DEVFN, cap + 2, 2) == 3                     # table size - 1, disabled, unmasked
    assert b.cfg_read(DEVFN, cap + 4, 4) == 0x000 | 1             # table at BAR 1 + 0
    assert b.cfg_read(DEVFN, cap + 8, 4) == 0x800 | 1
    b.cfg_write(DEVFN, cap + 2, 2, 0xFFFF)
    assert b.cfg_read(DEVFN, cap + 2, 2) == 0xC003                 # only enable and function mask are writable


def test_vectors_start_masked_and_table_reads_back(b):
    for v in range(4):
        assert b.memory.read(BAR_ADDR + 16 * v + 12, 4) == 1
    program(b, 2, 0xFEE01000, 0x4041, masked=False)
    assert b.memory.read(BAR_ADDR + 32, 8) == 0xFEE01000
    assert b.memory.read(BAR_ADDR + 40, 4) == 0x4041
    b.memory.write(BAR_ADDR + 44, 4, 0xFFFFFFFF)
    assert b.memory.read(BAR_ADDR + 44, 4) == 1                    # reserved vector-control bits stay 0


def test_disabled_msix_does_not_deliver(b):
    program(b, 0, 0xFEE00000, 0x30, masked=False)
    assert b.dev.msix.notify(0) is False
    assert b.dev.msix.routes[0].fired == 0


def test_delivery_and_per_vector_mask(b):
    program(b, 1, 0xFEE00000, 0x31, masked=False)
    set_flags(b, PCI_MSIX_FLAGS_ENABLE)
    assert b.dev.msix.notify(1)
    route = b.dev.msix.routes[1]
    assert route.fired == 1 and route.message == (0xFEE00000, 0x31)
    b.memory.write(BAR_ADDR + 16 + 12, 4, 1)                       # mask vector 1
    assert b.dev.msix.notify(1)
    assert route.fired == 1
    assert b.memory.read(BAR_ADDR + 0x800, 8) == 0b10             # pending bit
    program(b, 1, 0xFEE00000, 0x32, masked=True)                    # new message while masked
    b.memory.write(BAR_ADDR + 16 + 12, 4, 0)                       # unmask: delivered now, with the new message
    assert route.fired == 2 and route.message == (0xFEE00000, 0x32)
    assert b.memory.read(BAR_ADDR + 0x800, 8) == 0


def test_function_mask_holds_every_vector(b):
    for v in range(4):
        program(b, v, 0xFEE00000, 0x40 + v, masked=False)
    set_flags(b, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
    for v in (0, 3):
        b.dev.msix.notify(v)
    assert [r.fired for r in b.dev.msix.routes] == [0, 0, 0, 0]
    assert b.memory.read(BAR_ADDR + 0x800, 8) == 0b1001
    b.memory.write(BAR_ADDR + 12, 4, 1)                            # vector 0 also masked on its own
    set_flags(b, PCI_MSIX_FLAGS_ENABLE)                            # function unmask: only vector 3 fires
    assert [r.fired for r in b.dev.msix.routes] == [0, 0, 0, 1]
    assert b.memory.read(BAR_ADDR + 0x800, 8) == 0b0001


def test_pba_is_read_only_and_bad_accesses_fail_quietly(b):
    set_flags(b, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
    b.dev.msix.notify(2)
    b.memory.write(BAR_ADDR + 0x800, 8, 0)
    assert b.memory.read(BAR_ADDR + 0x800, 8) == 0b100
    assert b.memory.read(BAR_ADDR + 1, 2) == 0xFFFF               # unaligned word: all ones
    b.memory.write(BAR_ADDR + 2, 2, 0x1234)                         # ignored
    assert b.memory.read(BAR_ADDR, 4) == 0


def test_message_outside_the_apic_window_is_dropped(b):
    program(b, 0, 0x12345678, 0x30, masked=False)
    set_flags(b, PCI_MSIX_FLAGS_ENABLE)
    assert b.dev.msix.notify(0)
    assert b.dev.msix.routes[0].fired == 0 and b.dev.msix.state.dropped_bad_address == 1


def test_reset_masks_everything_again(b):
    program(b, 0, 0xFEE00000, 0x30, masked=False)
    set_flags(b, PCI_MSIX_FLAGS_ENABLE)
    b.dev.msix.reset()
    b.dev.reset()
    assert not b.dev.msix.enabled and b.dev.msix.vector_masked(0)
