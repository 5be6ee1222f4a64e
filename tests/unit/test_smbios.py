"""SMBIOS 3.0 tables for fw_cfg: a valid entry point and structures a reader can walk."""
from __future__ import annotations

import struct

from pyhv.arch.x86.smbios import SMBIOS_30_ENTRY, parse_structures, smbios_tables


def test_entry_point_and_structures():
    anchor, tables = smbios_tables([(0, 0xC0000000), (1 << 32, 1 << 30)], cpus=2,
                                   uuid="12345678-1234-5678-9abc-def012345678", cpuid_1=(0x50654, 0x1F8BFBFF))
    fields = SMBIOS_30_ENTRY.unpack(anchor)
    assert fields[0] == b"_SM3_" and fields[2] == len(anchor) == 24 and fields[3:5] == (3, 0)
    assert sum(anchor) & 0xFF == 0
    assert fields[8] == len(tables)
    structs = parse_structures(tables)
    types = [s[0] for s in structs]
    assert types == [1, 3, 4, 4, 16, 17, 19, 19, 32, 127]
    assert len({s[1] for s in structs}) == len(structs)                # unique handles
    system = structs[0]
    assert system[3][:2] == ["pyhv", "pyhv pc (i440FX + PIIX, 1996)"] and len(system[2]) == 0x1B - 4
    cpu = structs[2]
    assert len(cpu[2]) == 0x30 - 4 and struct.unpack_from("<II", cpu[2], 4) == (0x50654, 0x1F8BFBFF)
    dev = structs[5]
    assert struct.unpack_from("<H", dev[2], 8)[0] == 4096                # 3 GiB + 1 GiB, in MiB
    low, high = structs[6][2], structs[7][2]
    assert struct.unpack_from("<II", low) == (0, (0xC0000000 - 1) >> 10)
    assert struct.unpack_from("<II", high) == ((1 << 32) >> 10, ((1 << 32) + (1 << 30) - 1) >> 10)
