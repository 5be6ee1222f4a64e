"""Intel 82441FX (i440FX PMC) host bridge, function 00:00.0, as far as firmware sees it: its ids (with the
subsystem ids by which SeaBIOS recognises a QEMU-compatible board), the PAM registers that decide whether the
0xC0000-0xFFFFF segments read and write RAM ("shadow RAM") or the ROM/PCI behind it, and the SMRAM register.

PAM (82441FX datasheet, 3.2.18): PAM0 bits 5:4 control 0xF0000-0xFFFFF; PAM1-PAM6 each control two 16 KiB
segments from 0xC0000 up (bits 1:0 the lower, 5:4 the upper). Per segment: bit 0 RE (reads from RAM), bit 1 WE
(writes to RAM); a cleared bit sends that access to the PCI side: the BIOS ROM (isa-bios) for 0xE0000-0xFFFFF,
nothing (all ones) below.

Modelled with the memory API: per segment one alias of guest RAM at priority 2, over the isa-bios ROM alias
(priority 1) and the RAM underneath (priority 0, hidden below 0xE0000 by a priority-1 "pci hole"):
    RE WE   alias               write-only window
    0  0    disabled            -
    1  0    enabled, read-only  -                  (a KVM read-only memslot: reads native, writes dropped)
    1  1    enabled             -                  (a normal memslot)
    0  1    disabled            enabled (priority 3): reads go to the PCI side, writes to RAM (exits; rare)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from pyhv.devices.pci.constants import PCI_CLASS_BRIDGE_HOST, PCI_VENDOR_ID_INTEL, PCI_VENDOR_ID_REDHAT_QUMRANET
from pyhv.devices.pci.device import PciDevice
from pyhv.memory import MemoryRegion, memory_transaction
from pyhv.arch.x86.layout import ISA_BIOS_START

log = logging.getLogger(__name__)

PCI_DEVICE_ID_INTEL_82441 = 0x1237
QEMU_SUBSYSTEM_ID = 0x1100              # "QEMU virtual machine": how SeaBIOS knows it runs on a QEMU-like board

I440FX_PAM0 = 0x59
I440FX_PAM_COUNT = 7
I440FX_DRB0 = 0x60                       # DRAM row boundary registers 0x60-0x67
I440FX_SMRAM = 0x72
I440FX_SMRAM_RESET = 0x02               # C_BASE_SEG = 010 (0xA0000)
I440FX_SMRAM_WRITABLE = 0x78            # D_OPEN, D_CLS, D_LCK, G_SMRAME
PAM_RE = 0x1
PAM_WE = 0x2
PAM_PRIORITY = 2
PAM_WRITE_WINDOW_PRIORITY = 3
PCI_HOLE_PRIORITY = 1
SHADOW_START, SHADOW_END = 0xC0000, 0x100000
BIOS_SEGMENT = 0xF0000


@dataclass
class PamSegment:
    start: int
    size: int
    register: int           # config offset of its PAM register
    shift: int              # 0 (low nibble) or 4 (high nibble)
    alias: MemoryRegion
    window: MemoryRegion
    mode: int = 0


def pam_segments() -> list[tuple[int, int, int, int]]:
    """(start, size, register, shift) of the 13 PAM segments."""
    out = [(BIOS_SEGMENT, 0x10000, I440FX_PAM0, 4)]
    for n in range(1, I440FX_PAM_COUNT):
        base = SHADOW_START + (n - 1) * 0x8000
        out.append((base, 0x4000, I440FX_PAM0 + n, 0))
        out.append((base + 0x4000, 0x4000, I440FX_PAM0 + n, 4))
    return out


class I440fx(PciDevice):
    SNAPSHOT = True                  # config space is all: PAM modes follow from it at restore
    VENDOR_ID = PCI_VENDOR_ID_INTEL
    DEVICE_ID = PCI_DEVICE_ID_INTEL_82441
    REVISION = 0x02
    CLASS_CODE = PCI_CLASS_BRIDGE_HOST
    SUBSYSTEM_VENDOR_ID = PCI_VENDOR_ID_REDHAT_QUMRANET
    SUBSYSTEM_ID = QEMU_SUBSYSTEM_ID

    def __init__(self, name: str, system: MemoryRegion, ram: MemoryRegion,
                 pci_read: Callable[[int, int], int] | None = None) -> None:
        """`system`: the system memory container; `ram`: the guest RAM region (offset = guest-physical address
        below 4 GiB); `pci_read(addr, size)`: what a read that PAM sends to the PCI side returns (the BIOS ROM)."""
        super().__init__(name)
        self.system = system
        self.pci_read = pci_read or (lambda addr, size: (1 << (8 * size)) - 1)
        c = self.config
        c.set_mask(I440FX_PAM0, 1, 0x30)                       # PAM0 low nibble is reserved
        for n in range(1, I440FX_PAM_COUNT):
            c.set_mask(I440FX_PAM0 + n, 1, 0x33)
        for n in range(8):
            c.set(I440FX_DRB0 + n, 1, 0x01)
            c.set_mask(I440FX_DRB0 + n, 1, 0xFF)
        c.set(I440FX_SMRAM, 1, I440FX_SMRAM_RESET)
        c.set_mask(I440FX_SMRAM, 1, I440FX_SMRAM_WRITABLE)
        self.writes_to_pci_side = 0
        self.segments: list[PamSegment] = []
        with memory_transaction():
            hole = MemoryRegion.io("pci-legacy-hole", ISA_BIOS_START - SHADOW_START,
                                   lambda off, size: self.pci_read(SHADOW_START + off, size),
                                   lambda off, size, value: None, owner=name)
            system.add_subregion(SHADOW_START, hole, PCI_HOLE_PRIORITY)
            for start, size, reg, shift in pam_segments():
                alias = MemoryRegion.alias(f"pam-{start:05x}", ram, start, size, owner=name)
                alias.enabled = False
                window = MemoryRegion.io(f"pam-{start:05x}-wo", size,
                                         lambda off, sz, s=start: self.pci_read(s + off, sz),
                                         lambda off, sz, v, a=alias: self._write_ram(a, off, sz, v), owner=name)
                window.enabled = False
                system.add_subregion(start, alias, PAM_PRIORITY)
                system.add_subregion(start, window, PAM_WRITE_WINDOW_PRIORITY)
                self.segments.append(PamSegment(start, size, reg, shift, alias, window))

    @staticmethod
    def _write_ram(alias: MemoryRegion, offset: int, size: int, value: int) -> None:
        view = alias.alias_target.block.view
        base = alias.alias_target.block_offset + alias.alias_offset + offset
        view[base:base + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def config_written(self, offset: int, size: int, value: int) -> None:
        if offset < I440FX_PAM0 + I440FX_PAM_COUNT and offset + size > I440FX_PAM0:
            self.update_pam()

    def update_pam(self) -> None:
        with memory_transaction():
            for seg in self.segments:
                mode = (self.config.get(seg.register, 1) >> seg.shift) & 3
                if mode == seg.mode:
                    continue
                seg.mode = mode
                seg.alias.set_readonly(mode == PAM_RE)
                seg.alias.set_enabled(bool(mode & PAM_RE))
                seg.window.set_enabled(mode == PAM_WE)

    def pam_mode(self, address: int) -> int:
        for seg in self.segments:
            if seg.start <= address < seg.start + seg.size:
                return seg.mode
        raise ValueError(f"{address:#x} is not in a PAM segment")

    def reset(self) -> None:
        super().reset()
        self.update_pam()
