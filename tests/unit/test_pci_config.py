"""PCI configuration space through mechanism #1: masks at every size and offset, BAR sizing and relocation,
decode enables, the capability list, INTx routing through the PIIX3."""
from __future__ import annotations

import pytest

from pyhv.devices.pci.constants import (
    PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_IO, PCI_COMMAND_MEMORY, PCI_STATUS_CAP_LIST, PCI_STATUS_INTERRUPT,
    PCI_STATUS_REC_MASTER_ABORT, PCI_STATUS_SIG_TARGET_ABORT,
)
from pyhv.devices.pci.device import BAR_UNMAPPED, PciDevice
from pyhv.devices.piix3 import Piix3
from pyhv.memory import MemoryRegion

from pci_helpers import Board, FakeLine

DEVFN = 3 << 3


class Widget(PciDevice):
    VENDOR_ID = 0x1234
    DEVICE_ID = 0x5678
    REVISION = 0x42
    CLASS_CODE = 0xFF0000
    SUBSYSTEM_VENDOR_ID = 0xAAAA
    SUBSYSTEM_ID = 0xBBBB
    INTERRUPT_PIN = 1

    def __init__(self) -> None:
        super().__init__("widget")
        self.regs = bytearray(0x100)
        self.mem = MemoryRegion.io("widget-mmio", 0x1000, self._read, self._write)
        self.pio = MemoryRegion.io("widget-pio", 0x20, self._read, self._write)
        self.add_bar(0, self.mem)
        self.add_bar(2, self.pio, io=True)
        self.big = MemoryRegion.io("widget-64", 0x4000, self._read, self._write)
        self.add_bar(4, self.big, is64=True, prefetch=True)
        self.add_rom_bar(MemoryRegion.rom("widget-rom", b"\x55\xaa" + bytes(0x7FE)))
        self.cap = self.add_capability(0x09, 8)
        self.config.set_mask(self.cap + 4, 4, 0x0000FFFF)      # a half-writable vendor field

    def _read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.regs[offset % 0x100:offset % 0x100 + size], "little")

    def _write(self, offset: int, size: int, value: int) -> None:
        self.regs[offset % 0x100:offset % 0x100 + size] = value.to_bytes(size, "little")


@pytest.fixture
def board():
    b = Board()
    b.widget = Widget()
    b.bus.plug(b.widget, 3)
    return b


def expected_after_write(before: bytes, wmask: bytes, w1c: bytes, offset: int, size: int, value: int) -> bytes:
    out = bytearray(before)
    for i in range(size):
        o, v = offset + i, (value >> (8 * i)) & 0xFF
        out[o] = ((before[o] & ~wmask[o]) | (v & wmask[o])) & ~(v & w1c[o]) & 0xFF
    return bytes(out)


@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("value", [0xFFFFFFFF, 0x00000000, 0x5AA55AA5])
def test_every_offset_and_size_honours_the_masks(board, size, value):
    dev = board.widget
    for offset in range(0, 256, size):
        before = bytes(dev.config.data)
        board.cfg_write(DEVFN, offset, size, value)
        after = bytes(dev.config.data)
        assert after == expected_after_write(before, dev.config.wmask, dev.config.w1cmask, offset, size, value), \
            f"write of {size} bytes at {offset:#x}"
        assert board.cfg_read(DEVFN, offset, size) == int.from_bytes(after[offset:offset + size], "little")
        dev.reset()


def test_read_only_identity_survives_every_write(board):
    for offset in range(0, 0x40, 4):
        board.cfg_write(DEVFN, offset, 4, 0xFFFFFFFF)
    assert board.cfg_read(DEVFN, 0, 4) == 0x56781234
    assert board.cfg_read(DEVFN, 8, 4) == 0xFF000042
    assert board.cfg_read(DEVFN, 0x2C, 4) == 0xBBBBAAAA
    assert board.cfg_read(DEVFN, 0x3D, 1) == 1
    assert board.cfg_read(DEVFN, 0x06, 2) & PCI_STATUS_CAP_LIST


def test_sub_dword_reads_see_the_right_bytes(board):
    assert board.cfg_read(DEVFN, 0, 1) == 0x34
    assert board.cfg_read(DEVFN, 1, 1) == 0x12
    assert board.cfg_read(DEVFN, 2, 2) == 0x5678
    assert board.cfg_read(DEVFN, 3, 1) == 0x56
    assert board.cfg_read(DEVFN, 0x2E, 2) == 0xBBBB


def test_status_bits_are_write_one_to_clear(board):
    dev = board.widget
    dev.config.set(0x06, 2, dev.config.get(0x06, 2) | PCI_STATUS_REC_MASTER_ABORT | PCI_STATUS_SIG_TARGET_ABORT)
    board.cfg_write(DEVFN, 0x06, 2, 0)
    assert board.cfg_read(DEVFN, 0x06, 2) & PCI_STATUS_REC_MASTER_ABORT
    board.cfg_write(DEVFN, 0x06, 2, PCI_STATUS_REC_MASTER_ABORT)
    status = board.cfg_read(DEVFN, 0x06, 2)
    assert not status & PCI_STATUS_REC_MASTER_ABORT
    assert status & PCI_STATUS_SIG_TARGET_ABORT and status & PCI_STATUS_CAP_LIST


def test_unaligned_and_absent_accesses(board):
    assert board.widget.config_read(1, 2) == 0xFFFF          # misaligned word: all ones, counted
    board.widget.config_write(3, 4, 0)
    assert board.widget.state.bad_config_accesses == 2
    assert board.cfg_read(5 << 3, 0, 4) == 0xFFFFFFFF        # empty slot
    board.ports.write(0xCF8, 4, 3 << 11)                     # enable bit clear
    assert board.ports.read(0xCFC, 4) == 0xFFFFFFFF


def test_config_address_register_only_answers_dword_accesses(board):
    board.ports.write(0xCF8, 4, 0x80001234)
    assert board.ports.read(0xCF8, 4) == 0x80001234
    board.ports.write(0xCF8, 2, 0)                          # not CONFIG_ADDRESS
    assert board.ports.read(0xCF8, 4) == 0x80001234


def test_bar_sizing(board):
    board.cfg_write(DEVFN, 0x10, 4, 0xFFFFFFFF)
    assert board.cfg_read(DEVFN, 0x10, 4) == 0xFFFFF000                  # 4 KiB, 32-bit memory
    board.cfg_write(DEVFN, 0x18, 4, 0xFFFFFFFF)
    assert board.cfg_read(DEVFN, 0x18, 4) == 0xFFFFFFE1
    board.cfg_write(DEVFN, 0x20, 4, 0xFFFFFFFF)
    board.cfg_write(DEVFN, 0x24, 4, 0xFFFFFFFF)
    assert board.cfg_read(DEVFN, 0x20, 4) == 0xFFFFC00C                  # 16 KiB, 64-bit, prefetchable
    assert board.cfg_read(DEVFN, 0x24, 4) == 0xFFFFFFFF
    board.cfg_write(DEVFN, 0x30, 4, 0xFFFFFFFE)
    assert board.cfg_read(DEVFN, 0x30, 4) == 0xFFFFF800                  # 2 KiB ROM, enable bit clear
    assert board.cfg_read(DEVFN, 0x14, 4) == 0                           # no BAR 1: reads zero


def test_bar_relocation_and_decode_enables(board):
    w = board.widget
    board.cfg_write(DEVFN, 0x10, 4, 0xE0000000)
    board.cfg_write(DEVFN, 0x18, 4, 0xC040)
    board.memory.write(0xE0000010, 4, 0x11223344)
    assert w.regs[0x10] == 0                                  # memory decode off: unassigned
    board.cfg_write(DEVFN, 0x04, 2, PCI_COMMAND_MEMORY)
    board.memory.write(0xE0000010, 4, 0x11223344)
    assert w.regs[0x10:0x14] == bytes.fromhex("44332211")
    assert board.memory.read(0xE0000010, 4) == 0x11223344
    assert w.bars[2].address == BAR_UNMAPPED                  # I/O decode still off
    board.cfg_write(DEVFN, 0x04, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_IO)
    board.ports.write(0xC044, 1, 0x99)
    assert w.regs[0x04] == 0x99
    board.cfg_write(DEVFN, 0x10, 4, 0xE0100000)              # move
    assert board.memory.read(0xE0000010, 4) == 0xFFFFFFFF
    assert board.memory.read(0xE0100010, 4) == 0x11223344
    board.cfg_write(DEVFN, 0x20, 4, 0x0)
    board.cfg_write(DEVFN, 0x24, 4, 0x1)                     # 64-bit BAR above 4 GiB
    assert w.bars[4].address == 0x1_0000_0000
    board.memory.write(0x1_0000_0020, 2, 0xBEEF)
    assert w.regs[0x20:0x22] == bytes.fromhex("efbe")
    board.cfg_write(DEVFN, 0x10, 4, 0xFFFFFFFF)              # sizing: the last byte would be 0xffffffff
    assert w.bars[0].address == BAR_UNMAPPED
    board.cfg_write(DEVFN, 0x04, 2, 0)
    assert all(b is None or b.address == BAR_UNMAPPED for b in w.bars)


def test_rom_bar_maps_when_enabled(board):
    board.cfg_write(DEVFN, 0x30, 4, 0xD0000000)
    board.cfg_write(DEVFN, 0x04, 2, PCI_COMMAND_MEMORY)
    assert board.memory.read(0xD0000000, 2) == 0xFFFF         # enable bit clear
    board.cfg_write(DEVFN, 0x30, 4, 0xD0000001)
    assert board.memory.read(0xD0000000, 2) == 0xAA55


def test_capability_list(board):
    w = board.widget
    assert board.cfg_read(DEVFN, 0x34, 1) == w.cap
    assert board.cfg_read(DEVFN, w.cap, 1) == 0x09
    assert board.cfg_read(DEVFN, w.cap + 1, 1) == 0
    board.cfg_write(DEVFN, w.cap + 4, 4, 0xFFFFFFFF)
    assert board.cfg_read(DEVFN, w.cap + 4, 4) == 0x0000FFFF
    assert w.capabilities() == [(w.cap, 0x09)]


def test_intx_through_piix3_pirq_routing():
    b = Board()
    lines: dict[int, FakeLine] = {}
    piix3 = Piix3("piix3", lambda irq: lines.setdefault(irq, FakeLine()))
    b.bus.plug(piix3, 1)
    b.bus.pirq_sink = piix3
    w1, w2 = Widget(), Widget()
    b.bus.plug(w1, 3)          # INTA of slot 3 -> PIRQ (3 - 1 + 0) % 4 = C
    b.bus.plug(w2, 7)          # slot 7 -> PIRQ (7 - 1) % 4 = C as well: shared
    assert b.bus.pirq_of(w1) == "C" and b.bus.pirq_of(w2) == "C"
    w1.set_intx(True)
    assert lines == {}                                        # PIRQC not routed yet (IRQEN# set)
    b.cfg_write(1 << 3, 0x62, 1, 11)
    assert lines[11].level
    assert b.cfg_read(3 << 3, 0x06, 2) & PCI_STATUS_INTERRUPT
    w2.set_intx(True)
    w1.set_intx(False)
    assert lines[11].level                                    # w2 still asserts
    w2.set_intx(False)
    assert not lines[11].level
    w1.set_intx(True)
    b.cfg_write(3 << 3, 0x04, 2, PCI_COMMAND_INTX_DISABLE)
    assert not lines[11].level
    b.cfg_write(3 << 3, 0x04, 2, 0)
    assert lines[11].level
    b.cfg_write(1 << 3, 0x62, 1, 10)                         # re-route: old line drops, new one rises
    assert not lines[11].level and lines[10].level
    b.cfg_write(1 << 3, 0x62, 1, 13)                         # reserved IRQ: disconnected
    assert not lines[10].level and piix3.pirq_state.bad_routes


def test_describe_lists_bars_and_irq(board):
    board.cfg_write(DEVFN, 0x10, 4, 0xE0000000)
    board.cfg_write(DEVFN, 0x04, 2, PCI_COMMAND_MEMORY)
    (d,) = board.bus.describe()
    assert (d["slot"], d["function"], d["vendor_id"], d["device_id"]) == (3, 0, 0x1234, 0x5678)
    bar0 = next(b for b in d["bars"] if b["bar"] == 0)
    assert bar0 == {"bar": 0, "type": "mem", "address": 0xE0000000, "size": 0x1000, "region": "widget-mmio"}
    assert d["irq"]["pin"] == "A" and d["irq"]["pirq"] == "C"
    assert "00:03.0" in board.bus.dump() and "Region 0: Memory (mem) at 0xe0000000 [size=4K]" in board.bus.dump()
