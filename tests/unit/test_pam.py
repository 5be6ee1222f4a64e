"""i440FX PAM: the 0xC0000-0xFFFFF segments read and write RAM or the ROM/PCI side, per register nibble."""
from __future__ import annotations

import pytest

from pyhv.devices.i440fx import I440FX_PAM0, I440fx, pam_segments
from pyhv.devices.pci.bus import PciBus
from pyhv.memory import AddressSpace, MemoryRegion

ROM = bytes((i * 7) & 0xFF for i in range(0x20000))


@pytest.fixture
def pc():
    system = MemoryRegion.container("system", 1 << 64)
    ram = MemoryRegion.ram("pc.ram", 2 << 20)
    system.add_subregion(0, MemoryRegion.alias("ram-low", ram, 0, 0xA0000))
    system.add_subregion(0xC0000, MemoryRegion.alias("ram-below-4g", ram, 0xC0000, (2 << 20) - 0xC0000))
    rom = MemoryRegion.rom("bios", ROM)
    system.add_subregion((1 << 32) - len(ROM), rom)
    isa = MemoryRegion.alias("isa-bios", rom, 0, len(ROM))
    isa.readonly = True
    system.add_subregion(0xE0000, isa, priority=1)
    space = AddressSpace("memory", system)

    def pci_read(addr: int, size: int) -> int:
        if addr >= 0xE0000:
            return int.from_bytes(ROM[addr - 0xE0000:addr - 0xE0000 + size], "little")
        return (1 << (8 * size)) - 1
    host = I440fx("i440fx", system, ram, pci_read)
    PciBus(system, MemoryRegion.container("io", 0x10000)).plug(host, 0)
    ram.block.view[0xF0000:0xF0004] = b"RAM!"
    ram.block.view[0xC4000:0xC4004] = b"opt!"
    return space, host, ram


def rom_word(addr: int) -> int:
    return int.from_bytes(ROM[addr - 0xE0000:addr - 0xE0000 + 4], "little")


def test_thirteen_segments_cover_the_shadow_area():
    segs = sorted(pam_segments())
    assert segs[0][0] == 0xC0000 and segs[-1][0] + segs[-1][1] == 0x100000
    assert sum(s[1] for s in segs) == 0x40000
    assert all(a[0] + a[1] == b[0] for a, b in zip(segs, segs[1:]))


def test_reset_reads_rom_and_the_hole(pc):
    space, host, ram = pc
    assert space.read(0xF0000, 4) == rom_word(0xF0000)
    assert space.read(0xC4000, 4) == 0xFFFFFFFF                    # PCI side below 0xE0000: nothing
    space.write(0xF0000, 4, 0x12345678)                              # goes to the ROM: dropped
    assert bytes(ram.block.view[0xF0000:0xF0004]) == b"RAM!"
    assert space.read(0x100000 - 16, 4) == rom_word(0xFFFF0)


def test_read_write_ram(pc):
    space, host, ram = pc
    host.config_write(I440FX_PAM0, 1, 0x30)
    assert space.read(0xF0000, 4) == int.from_bytes(b"RAM!", "little")
    space.write(0xF0000, 4, 0x11223344)
    assert bytes(ram.block.view[0xF0000:0xF0004]) == bytes.fromhex("44332211")
    assert host.pam_mode(0xF8000) == 3


def test_read_only_ram_drops_writes(pc):
    space, host, ram = pc
    host.config_write(I440FX_PAM0, 1, 0x10)
    space.write(0xF0000, 4, 0x11223344)
    assert space.read(0xF0000, 4) == int.from_bytes(b"RAM!", "little")
    assert space.rom_writes_dropped == 1


def test_write_only_ram_reads_the_rom(pc):
    space, host, ram = pc
    host.config_write(I440FX_PAM0, 1, 0x20)
    space.write(0xF0000, 4, 0x11223344)
    assert bytes(ram.block.view[0xF0000:0xF0004]) == bytes.fromhex("44332211")
    assert space.read(0xF0000, 4) == rom_word(0xF0000)


def test_nibbles_select_16k_halves(pc):
    space, host, ram = pc
    host.config_write(I440FX_PAM0 + 1, 1, 0x30)                     # PAM1 high nibble: 0xC4000-0xC7FFF
    assert space.read(0xC4000, 4) == int.from_bytes(b"opt!", "little")
    assert space.read(0xC0000, 4) == 0xFFFFFFFF
    host.config_write(I440FX_PAM0 + 1, 1, 0x03)
    assert space.read(0xC4000, 4) == 0xFFFFFFFF
    assert space.read(0xC0000, 4) == 0


def test_seabios_dword_sequence_and_reserved_bits(pc):
    """SeaBIOS rewrites PAM0-PAM6 with two dword writes at 0x58 and 0x5c."""
    space, host, ram = pc
    host.config_write(0x58, 4, 0x33333000 | 0x30 << 8)
    host.config_write(0x5C, 4, 0x33333333)
    assert all(host.pam_mode(s[0]) == 3 for s in pam_segments())
    host.config_write(0x59, 1, 0xFF)
    assert host.config_read(0x59, 1) == 0x30                        # PAM0's low nibble is reserved
    host.reset()
    assert all(host.pam_mode(s[0]) == 0 for s in pam_segments())
    assert space.read(0xF0000, 4) == rom_word(0xF0000)


def test_ids_seabios_looks_for(pc):
    _, host, _ = pc
    assert host.config_read(0, 4) == 0x12378086
    assert host.config_read(0x2C, 4) == 0x11001AF4
