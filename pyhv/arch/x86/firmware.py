"""Firmware boot, like QEMU's `-bios`: a flat ROM image mapped so that it ends at 4 GiB (the reset vector is its
last 16 bytes), with its last 128 KiB (or all of it, if smaller) also visible at 0xE0000-0xFFFFF, the legacy
"ISA BIOS" window that real-mode firmware runs from."""
from __future__ import annotations

from pyhv.memory import MemoryRegion
from pyhv.arch.x86.layout import FOUR_GIB, HIGH_MEMORY_START

ISA_BIOS_MAX = 128 * 1024
PAGE = 4096


def map_firmware(system: MemoryRegion, image: bytes, name: str = "bios") -> MemoryRegion:
    padded = -(-len(image) // PAGE) * PAGE
    data = bytes(padded - len(image)) + image          # pad at the front so the image still ends at 4 GiB
    rom = MemoryRegion.rom(name, data, owner=name)
    system.add_subregion(FOUR_GIB - padded, rom)
    isa_size = min(padded, ISA_BIOS_MAX)
    isa = MemoryRegion.alias("isa-bios", rom, padded - isa_size, isa_size, owner=name)
    isa.readonly = True
    system.add_subregion(HIGH_MEMORY_START - isa_size, isa, priority=1)
    return rom
