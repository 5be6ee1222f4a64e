"""PVH boot (xen/include/public/arch-x86/hvm/start_info.h): the kernel's 32-bit entry from its
XEN_ELFNOTE_PHYS32_ENTRY note, with EBX pointing at `struct hvm_start_info` (version 1: with a memory map)."""
from __future__ import annotations

import struct

from pyhv.arch.x86.bootparams import E820Entry

XEN_HVM_START_MAGIC_VALUE = 0x336EC578
HVM_START_INFO_VERSION = 1
START_INFO_SIZE = 56
MODLIST_ENTRY_SIZE = 32
MEMMAP_ENTRY_SIZE = 24


def build_start_info(address: int, cmdline_addr: int, memmap: list[E820Entry],
                     initrd: tuple[int, int] | None = None, rsdp_addr: int = 0) -> bytes:
    """hvm_start_info at `address`, then the module list (the initrd) and the memory map; `rsdp_addr` is where
    the ACPI RSDP is (0: none given, the kernel scans the BIOS area)."""
    modlist_addr = address + START_INFO_SIZE
    nr_modules = 1 if initrd else 0
    memmap_addr = modlist_addr + MODLIST_ENTRY_SIZE * nr_modules
    info = struct.pack("<IIIIQQQQI4x", XEN_HVM_START_MAGIC_VALUE, HVM_START_INFO_VERSION, 0, nr_modules,
                       modlist_addr if initrd else 0, cmdline_addr, rsdp_addr, memmap_addr, len(memmap))
    modules = struct.pack("<QQQQ", initrd[0], initrd[1], 0, 0) if initrd else b""
    entries = b"".join(struct.pack("<QQII", e.addr, e.size, e.type, 0) for e in memmap)
    return info + modules + entries
