"""Just enough ELF64 (little-endian) reading for guest assets: section contents and notes."""
from __future__ import annotations

import struct
from typing import Iterator

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
SHT_NOTE = 7
# The PVH entry point note: name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY (xen/include/public/elfnote.h)
XEN_ELFNOTE_PHYS32_ENTRY = 18


def sections(elf: bytes) -> Iterator[tuple[str, int, bytes]]:
    """(name, sh_type, contents) of every section."""
    if elf[:4] != ELF_MAGIC or elf[4] != ELFCLASS64 or elf[5] != ELFDATA2LSB:
        raise ValueError("not a 64-bit little-endian ELF file")
    e_shoff, = struct.unpack_from("<Q", elf, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def header(index: int) -> tuple[int, int, int, int]:
        base = e_shoff + index * e_shentsize
        sh_name, sh_type = struct.unpack_from("<II", elf, base)
        sh_offset, sh_size = struct.unpack_from("<QQ", elf, base + 0x18)
        return sh_name, sh_type, sh_offset, sh_size

    _, _, str_offset, str_size = header(e_shstrndx)
    names = elf[str_offset:str_offset + str_size]
    for index in range(e_shnum):
        sh_name, sh_type, offset, size = header(index)
        name = names[sh_name:names.index(b"\0", sh_name)].decode()
        yield name, sh_type, b"" if sh_type == 8 else elf[offset:offset + size]   # 8: SHT_NOBITS


def section(elf: bytes, wanted: str) -> bytes | None:
    for name, _, data in sections(elf):
        if name == wanted:
            return data
    return None


def notes(elf: bytes) -> Iterator[tuple[str, int, bytes]]:
    """(name, type, descriptor) of every note in the SHT_NOTE sections."""
    for _, sh_type, data in sections(elf):
        if sh_type != SHT_NOTE:
            continue
        pos = 0
        while pos + 12 <= len(data):
            namesz, descsz, note_type = struct.unpack_from("<III", data, pos)
            pos += 12
            name = data[pos:pos + namesz].rstrip(b"\0").decode(errors="replace")
            pos += (namesz + 3) & ~3
            desc = data[pos:pos + descsz]
            pos += (descsz + 3) & ~3
            yield name, note_type, desc


def pvh_entry(elf: bytes) -> int | None:
    """The 32-bit PVH entry point the kernel's Xen note declares, or None without one."""
    for name, note_type, desc in notes(elf):
        if name == "Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) >= 4:
            return struct.unpack_from("<I", desc)[0]
    return None
