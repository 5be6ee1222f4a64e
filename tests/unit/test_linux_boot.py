"""Direct Linux boot pieces without KVM: setup header, zero page, hvm_start_info, e820, MP table, payload
decompression, ELF/PVH parsing, command-line limits, PVM command line."""
from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import struct
import subprocess

import pytest

from pyhv.arch.x86 import bootparams as bp
from pyhv.arch.x86.kernel_image import decompress_payload, load_kernel, parse_elf
from pyhv.arch.x86.linux_boot import LinuxBoot
from pyhv.arch.x86.mptable import build_floating_pointer, build_mptable, mptable_size
from pyhv.arch.x86.pvh import XEN_HVM_START_MAGIC_VALUE, build_start_info
from pyhv.arch.x86.pvm import PVM_CLEARCPUID, pvm_cmdline
from pyhv.errors import ConfigError, GuestImageError


def make_elf(segments: list[tuple[int, bytes, int]], entry: int, pvh: int | None = None) -> bytes:
    """A minimal x86-64 ELF with PT_LOAD segments (paddr, data, memsz) and optionally a Xen PVH note."""
    phnum = len(segments) + (1 if pvh is not None else 0)
    phoff = 64
    data_off = phoff + 56 * phnum
    body = bytearray()
    phdrs = bytearray()
    for paddr, data, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 7, data_off + len(body), 0xFFFFFFFF80000000 + paddr, paddr,
                             len(data), memsz, 0x1000)
        body += data
    if pvh is not None:
        note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", pvh)
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, data_off + len(body), 0, 0, len(note), len(note), 4)
        body += note
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, phoff, 0,
                                                                       0, 64, 56, phnum, 64, 0, 0)
    return header + phdrs + body


def make_bzimage(payload: bytes, version: int = 0x020F, xloadflags: int = 0x7F, setup_sects: int = 4,
                 cmdline_size: int = 2047) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = bytes([0xEB, 0x66])           # jmp over the header: it ends at 0x268
    struct.pack_into("<I", setup, 0x202, 0x53726448)
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = bp.LOADED_HIGH
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<I", setup, 0x230, 0x200000)
    setup[0x234] = 1
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<I", setup, 0x248, 0x100)
    struct.pack_into("<I", setup, 0x24C, len(payload))
    struct.pack_into("<Q", setup, 0x258, 0x1000000)
    struct.pack_into("<I", setup, 0x260, 0x2000000)
    return bytes(setup) + bytes(0x100) + payload


ELF = make_elf([(0x1000000, b"\x90" * 64, 0x2000), (0x1200000, b"data", 0x1000)], 0x1000000, pvh=0x1000040)


def test_setup_header_fields():
    img = make_bzimage(gzip.compress(ELF) + b"\0\0\0\0")
    hdr = bp.SetupHeader.parse(img)
    assert (hdr.version_text, hdr.kernel_offset, hdr.cmdline_size, hdr.pref_address) == ("2.15", 5 * 512, 2047,
                                                                                          0x1000000)
    assert len(hdr.raw) == 0x268 - 0x1F1


@pytest.mark.parametrize("mutate,message", [
    (lambda b: b[:0x100], "too short"),
    (lambda b: b[:0x1FE] + b"\0\0" + b[0x200:], "not a bzImage"),
    (lambda b: b[:0x206] + struct.pack("<H", 0x0204) + b[0x208:], "too old"),
    (lambda b: b[:0x236] + struct.pack("<H", 0) + b[0x238:], "no 64-bit entry"),
    (lambda b: b[:0x24C] + struct.pack("<I", 1 << 30) + b[0x250:], "past the end"),
])
def test_setup_header_rejects(mutate, message):
    img = make_bzimage(gzip.compress(ELF))
    with pytest.raises(GuestImageError, match=message):
        bp.SetupHeader.parse(mutate(img))


def test_zero_page_layout():
    header = make_bzimage(b"x" * 16)[0x1F1:0x268]
    e820 = bp.e820_map(256 << 20, 0)
    zp = bp.build_zero_page(header, e820, 0x20000, 30, 0x0FF00000, 0x100000)
    assert len(zp) == 4096
    assert zp[0x210] == 0xFF and zp[0x211] & bp.LOADED_HIGH and zp[0x1EF] == 0
    assert struct.unpack_from("<I", zp, 0x228)[0] == 0x20000
    assert struct.unpack_from("<II", zp, 0x218) == (0x0FF00000, 0x100000)
    assert struct.unpack_from("<I", zp, 0x202)[0] == 0x53726448           # the kernel's own header kept
    assert zp[0x1E8] == len(e820)
    assert struct.unpack_from("<QQI", zp, 0x2D0 + 20 * 2) == (0x100000, (256 << 20) - 0x100000, bp.E820_RAM)



def test_rng_seed_setup_data():
    header = make_bzimage(b"x" * 16)[0x1F1:0x268]
    zp = bp.build_zero_page(header, bp.e820_map(64 << 20, 0), 0x20000, 1, setup_data=0x8000)
    assert struct.unpack_from("<Q", zp, 0x250)[0] == 0x8000          # hdr.setup_data
    seed = bytes(range(32))
    data = bp.rng_seed_setup_data(seed)
    assert struct.unpack_from("<QII", data) == (0, 9, 32) and data[16:] == seed   # next, SETUP_RNG_SEED, len


@pytest.mark.parametrize("memory,below,above", [(512 << 20, 512 << 20, 0), (4 << 30, 3 << 30, 1 << 30)])
def test_e820_around_the_32bit_hole(memory, below, above):
    e820 = bp.e820_map(below, above)
    ram = [e for e in e820 if e.type == bp.E820_RAM]
    assert sum(e.size for e in ram) == memory - (0x100000 - 0x9F000)
    assert all(not (e.addr < 1 << 32 < e.end) for e in e820)     # nothing spans the hole
    assert (ram[-1].addr, ram[-1].size) == ((1 << 32, above) if above else (0x100000, below - 0x100000))
    assert e820[1] == bp.E820Entry(0x9F000, 0x100000 - 0x9F000, bp.E820_RESERVED)


def test_hvm_start_info_layout():
    e820 = bp.e820_map(128 << 20, 0)
    info = build_start_info(0x6000, 0x20000, e820, (0x7000000, 0x1000))
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries = struct.unpack_from("<IIIIQQQQI",
                                                                                                     info)
    assert (magic, version, nr_modules, cmdline, rsdp, entries) == (XEN_HVM_START_MAGIC_VALUE, 1, 1, 0x20000, 0, 3)
    assert modlist == 0x6000 + 56 and memmap == modlist + 32
    assert struct.unpack_from("<QQ", info, modlist - 0x6000) == (0x7000000, 0x1000)
    assert struct.unpack_from("<QQI", info, memmap - 0x6000 + 24 * 2) == (0x100000, (128 << 20) - 0x100000, 1)


@pytest.mark.parametrize("cpus", [1, 2, 8, 64])
def test_mptable_checksums_and_entries(cpus):
    config = build_mptable(0x9F000, cpus, 0x00A20F10, 0x178BFBFF)
    assert len(config) == mptable_size(cpus) and len(config) <= 0x9FC00 - 0x9F000
    floating = build_floating_pointer(0x9F000)
    assert floating[:4] == b"_MP_" and len(floating) == 16 and sum(floating) % 256 == 0
    assert struct.unpack_from("<I", floating, 4)[0] == 0x9F000 and floating[8] == 1 and floating[9] == 4
    assert config[:4] == b"PCMP" and sum(config) % 256 == 0
    length, count, lapic = struct.unpack_from("<H", config, 4)[0], struct.unpack_from("<H", config, 34)[0], \
        struct.unpack_from("<I", config, 36)[0]
    assert length == len(config) and lapic == 0xFEE00000
    entries, off = [], 44
    for _ in range(count):
        kind = config[off]
        size = 20 if kind == 0 else 8
        entries.append(config[off:off + size])
        off += size
    assert off == len(config)
    cpus_found = [e for e in entries if e[0] == 0]
    assert [e[1] for e in cpus_found] == list(range(cpus))
    assert cpus_found[0][3] == 3 and all(e[3] == 1 for e in cpus_found[1:])          # BSP flag on CPU 0 only
    ioapic = [e for e in entries if e[0] == 2]
    assert len(ioapic) == 1 and ioapic[0][1] == cpus and struct.unpack_from("<I", ioapic[0], 4)[0] == 0xFEC00000
    irqs = {e[5]: e[7] for e in entries if e[0] == 3}
    assert irqs == {i: i for i in range(16) if i != 2}
    assert sorted((e[1], e[7]) for e in entries if e[0] == 4) == [(1, 1), (3, 0)]   # NMI on LINT1, ExtINT LINT0


FORMATS = {
    "gzip": lambda d: gzip.compress(d),
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
    "bzip2": lambda d: bz2.compress(d),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS) + ["zstd", "lz4"])
def test_decompress_each_payload_format(fmt):
    if fmt in FORMATS:
        payload = FORMATS[fmt](ELF)
    else:
        if shutil.which(fmt) is None:
            pytest.skip(f"Debian's {fmt} tool is not installed")
        args = ["zstd", "-q", "-c"] if fmt == "zstd" else ["lz4", "-l", "-q", "-c"]
        payload = subprocess.run(args, input=ELF, capture_output=True, check=True).stdout
    payload += struct.pack("<I", len(ELF))             # what mkpiggy appends
    out, found = decompress_payload(payload)
    assert (out, found) == (ELF, fmt)


def test_unknown_payload_format():
    with pytest.raises(GuestImageError, match="unknown compression"):
        decompress_payload(b"\x00\x11\x22\x33" * 10)


def test_elf_segments_and_pvh_note():
    segments, entry, pvh = parse_elf(ELF, "test")
    assert [(s.paddr, len(s.data), s.memsz) for s in segments] == [(0x1000000, 64, 0x2000), (0x1200000, 4, 0x1000)]
    assert (entry, pvh) == (0x1000000, 0x1000040)


def test_load_kernel_bzimage_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYHV_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "bzImage"
    path.write_bytes(make_bzimage(lzma.compress(ELF) + struct.pack("<I", len(ELF))))
    k = load_kernel(str(path))
    assert k.from_bzimage and k.decompressed_from == "xz" and k.entry64 == 0x1000000 and k.pvh_entry == 0x1000040
    assert len(list((tmp_path / "cache" / "vmlinux").glob("*.elf"))) == 1
    again = load_kernel(str(path))                    # now from the cache
    assert [s.data for s in again.segments] == [s.data for s in k.segments]


def test_neither_bzimage_nor_elf(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(GuestImageError, match="neither a bzImage nor an ELF"):
        load_kernel(str(path))


def test_command_line_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("PYHV_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "bzImage"
    path.write_bytes(make_bzimage(gzip.compress(ELF), cmdline_size=32))
    LinuxBoot.prepare(str(path), None, "x" * 32, 256 << 20, 0, 1)
    with pytest.raises(ConfigError, match="at most 32"):
        LinuxBoot.prepare(str(path), None, "x" * 33, 256 << 20, 0, 1)


def test_entry_choice_and_placement(tmp_path, monkeypatch):
    monkeypatch.setenv("PYHV_CACHE", str(tmp_path / "cache"))
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(ELF)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x07" * 5000)
    boot = LinuxBoot.prepare(str(vmlinux), str(initrd), "console=ttyS0", 256 << 20, 0, 1)
    assert boot.entry == "pvh"
    assert boot.initrd_addr == ((256 << 20) - 5000) // 4096 * 4096
    assert LinuxBoot.prepare(str(vmlinux), None, "", 256 << 20, 0, 1, entry="linux64").entry == "linux64"
    with pytest.raises(ConfigError, match="needs RAM"):
        LinuxBoot.prepare(str(vmlinux), None, "", 16 << 20, 0, 1)


def test_pvm_command_line_keeps_user_choices_and_stays_short():
    cmdline, added = pvm_cmdline("console=ttyS0 mitigations=auto", 2_000_000)
    assert "mitigations=auto" in cmdline and "mitigations=off" not in cmdline
    assert "noxsave" in added and f"clearcpuid={PVM_CLEARCPUID}" in added and "lpj=8000000" in added
    assert len(PVM_CLEARCPUID) < 128          # Linux 6.1 truncates clearcpuid= at 128 bytes


class FlatMemory:
    """Guest RAM as one bytearray, with the one method LinuxBoot.load writes through."""
    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def write(self, gpa: int, data: bytes) -> None:
        self.data[gpa:gpa + len(data)] = data


@pytest.mark.parametrize("entry", ["pvh", "linux64"])
def test_acpi_tables_replace_the_mp_table_and_the_kernel_is_told_where_the_rsdp_is(tmp_path, monkeypatch, entry):
    from pyhv.arch.x86.acpi.builder import AcpiConfig, build_tables, layout_in_memory
    from pyhv.arch.x86.layout import ACPI_TABLES_ADDR, MP_FLOATING_ADDR, START_INFO_ADDR, ZERO_PAGE_ADDR
    from pyhv.arch.x86.linux_boot import AcpiBlob

    monkeypatch.setenv("PYHV_CACHE", str(tmp_path / "cache"))
    path = tmp_path / ("vmlinux" if entry == "pvh" else "bzImage")
    path.write_bytes(ELF if entry == "pvh" else make_bzimage(gzip.compress(ELF)))
    blob, rsdp, _ = layout_in_memory(build_tables(AcpiConfig(machine="microvm", vcpus=2, ged=(0xFEA00000, 9))),
                                     ACPI_TABLES_ADDR)
    for acpi in (None, AcpiBlob(blob, rsdp)):
        boot = LinuxBoot.prepare(str(path), None, "console=ttyS0", 64 << 20, 0, 2, entry=entry, acpi=acpi)
        mem = FlatMemory(64 << 20)
        boot.load(mem, 0x00A20F10, 0x178BFBFF)
        told = (struct.unpack_from("<Q", mem.data, START_INFO_ADDR + 32)[0] if entry == "pvh"
                else struct.unpack_from("<Q", mem.data, ZERO_PAGE_ADDR + bp.BP_ACPI_RSDP_ADDR)[0])
        if acpi is None:
            assert told == 0 and mem.data[MP_FLOATING_ADDR:MP_FLOATING_ADDR + 4] == b"_MP_"
        else:
            assert told == rsdp and mem.data[rsdp:rsdp + 8] == b"RSD PTR "
            assert mem.data[ACPI_TABLES_ADDR:ACPI_TABLES_ADDR + len(blob)] == blob
            assert mem.data[MP_FLOATING_ADDR:MP_FLOATING_ADDR + 4] == bytes(4)     # no MP table besides


def test_acpi_tables_too_big_for_the_bios_area_are_refused():
    from pyhv.arch.x86.linux_boot import AcpiBlob
    with pytest.raises(ConfigError, match="ACPI tables take 131073 bytes"):
        AcpiBlob(bytes(0x20001), 0xE0000)
