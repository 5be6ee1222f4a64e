"""ACPI tables for firmware (SeaBIOS, OVMF) through fw_cfg: the `etc/table-loader` command list of QEMU's
BIOS linker/loader interface, and the two blobs it acts on, `etc/acpi/rsdp` and `etc/acpi/tables`.

The firmware reads `etc/table-loader` and runs its commands in order; each command is 128 bytes
(little endian: u32 command, then a 124-byte union), file names are NUL-padded to 56 bytes:

    1 ALLOCATE     file[56], u32 align, u8 zone (1 = HIGH: RAM below 4 GiB, 2 = FSEG: 0xE0000-0xFFFFF)
    2 ADD_POINTER  dest_file[56], src_file[56], u32 offset, u8 size: the `size`-byte little-endian value at
                   dest_file + offset (an offset inside src_file) gets src_file's allocated address added
    3 ADD_CHECKSUM file[56], u32 offset, u32 start, u32 length: the byte at file + offset has the byte sum of
                   file[start:start + length] subtracted from it

Inside the blobs every pointer holds the offset of its target within `etc/acpi/tables`, and every checksum is
already valid for those values, so ADD_CHECKSUM (a subtraction of the new sum) leaves each table summing to 0.
"""
from __future__ import annotations

import struct

from pyhv.arch.x86.acpi.builder import AcpiTables, assign_addresses
from pyhv.arch.x86.acpi.tables import (
    CHECKSUM_OFFSET, FADT_DSDT_OFFSET, FADT_FIRMWARE_CTRL_OFFSET, FADT_X_DSDT_OFFSET, HEADER_SIZE, RSDP_CHECKSUM_OFFSET,
    RSDP_EXT_CHECKSUM_OFFSET, RSDP_RSDT_OFFSET, RSDP_SIZE, RSDP_V1_SIZE, RSDP_XSDT_OFFSET, Rsdt, Xsdt,
)

COMMAND_ALLOCATE = 1
COMMAND_ADD_POINTER = 2
COMMAND_ADD_CHECKSUM = 3
ALLOC_ZONE_HIGH = 1
ALLOC_ZONE_FSEG = 2
ENTRY_SIZE = 128
FILE_NAME_SIZE = 56

FILE_RSDP = "etc/acpi/rsdp"
FILE_TABLES = "etc/acpi/tables"
FILE_LOADER = "etc/table-loader"
TABLES_ALIGN = 64                     # the FACS is first in the tables blob


def _file_name(name: str) -> bytes:
    raw = name.encode("ascii")
    if len(raw) >= FILE_NAME_SIZE:
        raise ValueError(f"table-loader file name {name!r} is longer than {FILE_NAME_SIZE - 1} bytes")
    return raw.ljust(FILE_NAME_SIZE, b"\0")


class TableLoader:
    """Builds an `etc/table-loader` command list."""

    def __init__(self) -> None:
        self.commands: list[bytes] = []

    def _add(self, command: int, body: bytes) -> None:
        entry = struct.pack("<I", command) + body
        assert len(entry) <= ENTRY_SIZE
        self.commands.append(entry.ljust(ENTRY_SIZE, b"\0"))

    def allocate(self, file: str, align: int, zone: int) -> None:
        if align <= 0 or align & (align - 1):
            raise ValueError(f"table-loader: alignment {align} of {file!r} is not a power of 2")
        if zone not in (ALLOC_ZONE_HIGH, ALLOC_ZONE_FSEG):
            raise ValueError(f"table-loader: zone {zone} of {file!r} is neither HIGH (1) nor FSEG (2)")
        self._add(COMMAND_ALLOCATE, _file_name(file) + struct.pack("<IB", align, zone))

    def add_pointer(self, dest_file: str, src_file: str, offset: int, size: int) -> None:
        if size not in (1, 2, 4, 8):
            raise ValueError(f"table-loader: pointer size {size} (1, 2, 4 or 8)")
        self._add(COMMAND_ADD_POINTER, _file_name(dest_file) + _file_name(src_file) + struct.pack("<IB", offset, size))

    def add_checksum(self, file: str, offset: int, start: int, length: int) -> None:
        self._add(COMMAND_ADD_CHECKSUM, _file_name(file) + struct.pack("<III", offset, start, length))

    def encode(self) -> bytes:
        return b"".join(self.commands)


def fw_cfg_files(tables: AcpiTables, rsdt: bool = True) -> dict[str, bytes]:
    """{"etc/acpi/rsdp": ..., "etc/acpi/tables": ..., "etc/table-loader": ...} for the firmware to install."""
    where = assign_addresses(tables, 0)          # offsets inside the tables blob
    entries = [where[t.signature.decode()] for t in tables.xsdt_tables]
    blob = bytearray()
    loader = TableLoader()
    loader.allocate(FILE_RSDP, 16, ALLOC_ZONE_FSEG)
    loader.allocate(FILE_TABLES, TABLES_ALIGN, ALLOC_ZONE_HIGH)
    placed = [(t, where[t.signature.decode()], t.encode()) for t in tables.tables]
    xsdt = Xsdt(entries)
    placed.append((xsdt, where["XSDT"], xsdt.encode()))
    if rsdt:
        rsdt_table = Rsdt(entries)
        placed.append((rsdt_table, where["RSDT"], rsdt_table.encode()))
    checksums = []
    for table, off, data in placed:
        blob += bytes(off - len(blob))
        blob += data
        sig = table.signature
        if sig == b"FACP":
            if tables.facs is not None:
                loader.add_pointer(FILE_TABLES, FILE_TABLES, off + FADT_FIRMWARE_CTRL_OFFSET, 4)
            loader.add_pointer(FILE_TABLES, FILE_TABLES, off + FADT_DSDT_OFFSET, 4)
            loader.add_pointer(FILE_TABLES, FILE_TABLES, off + FADT_X_DSDT_OFFSET, 8)
        elif sig == b"XSDT":
            for i in range(len(entries)):
                loader.add_pointer(FILE_TABLES, FILE_TABLES, off + HEADER_SIZE + 8 * i, 8)
        elif sig == b"RSDT":
            for i in range(len(entries)):
                loader.add_pointer(FILE_TABLES, FILE_TABLES, off + HEADER_SIZE + 4 * i, 4)
        if sig != b"FACS":                      # the FACS has no checksum
            checksums.append((off + CHECKSUM_OFFSET, off, len(data)))
    for offset, start, length in checksums:
        loader.add_checksum(FILE_TABLES, offset, start, length)
    rsdp = tables.rsdp(where["XSDT"], where["RSDT"] if rsdt else 0)
    loader.add_pointer(FILE_RSDP, FILE_TABLES, RSDP_XSDT_OFFSET, 8)
    if rsdt:
        loader.add_pointer(FILE_RSDP, FILE_TABLES, RSDP_RSDT_OFFSET, 4)
    loader.add_checksum(FILE_RSDP, RSDP_CHECKSUM_OFFSET, 0, RSDP_V1_SIZE)
    loader.add_checksum(FILE_RSDP, RSDP_EXT_CHECKSUM_OFFSET, 0, RSDP_SIZE)
    return {FILE_RSDP: rsdp, FILE_TABLES: bytes(blob), FILE_LOADER: loader.encode()}


def run_loader(files: dict[str, bytes], addresses: dict[str, int]) -> dict[str, bytes]:
    """Execute `etc/table-loader` the way firmware does, with the given allocation addresses per file: a
    reference interpreter for tests and for checking a board's files. Returns the patched blobs."""
    loader = files[FILE_LOADER]
    out: dict[str, bytearray] = {}
    for i in range(0, len(loader), ENTRY_SIZE):
        entry = loader[i:i + ENTRY_SIZE]
        (command,) = struct.unpack_from("<I", entry)
        name = lambda at: entry[at:at + FILE_NAME_SIZE].rstrip(b"\0").decode()   # noqa: E731
        if command == COMMAND_ALLOCATE:
            f = name(4)
            align, zone = struct.unpack_from("<IB", entry, 4 + FILE_NAME_SIZE)
            if addresses[f] % align:
                raise ValueError(f"{f} at {addresses[f]:#x} is not {align}-aligned")
            out[f] = bytearray(files[f])
        elif command == COMMAND_ADD_POINTER:
            dest, src = name(4), name(4 + FILE_NAME_SIZE)
            offset, size = struct.unpack_from("<IB", entry, 4 + 2 * FILE_NAME_SIZE)
            value = int.from_bytes(out[dest][offset:offset + size], "little") + addresses[src]
            out[dest][offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        elif command == COMMAND_ADD_CHECKSUM:
            f = name(4)
            offset, start, length = struct.unpack_from("<III", entry, 4 + FILE_NAME_SIZE)
            data = out[f]
            data[offset] = (data[offset] - sum(data[start:start + length])) & 0xFF
        elif command != 0:
            raise ValueError(f"unknown table-loader command {command}")
    return {k: bytes(v) for k, v in out.items()}
