"""QEMU's firmware configuration device (fw_cfg), I/O-port flavour, as QEMU's docs/specs/fw_cfg.rst describes it:
how firmware (SeaBIOS) learns the RAM size, e820 map, CPU count, boot order and named files of the board.

Ports:
    0x510  selector (16-bit write): picks an item and rewinds its offset
    0x511  data (8-bit read): the next byte of the selected item (zeros past its end)
    0x514  DMA address, 64-bit big-endian; the write of its low half (0x518) starts a transfer. A read returns
           the signature "QEMU CFG" (how firmware probes for DMA, besides the ID item).
A DMA transfer is described in guest memory by `FWCfgDmaAccess` {be32 control, be32 length, be64 address};
control bits: ERROR 0x01, READ 0x02, SKIP 0x04, SELECT 0x08 (item in bits 31:16), WRITE 0x10. The device
clears control (or leaves ERROR) when done. One DMA transfer is one exit, where byte I/O costs one per byte.

Items: 0x00 signature "QEMU", 0x01 id (traditional + DMA), 0x02 UUID, 0x03 RAM size, 0x04 nographic,
0x05 CPU count, 0x0e boot menu, 0x0f max CPUs, 0x19 file directory (be32 count, then per file be32 size,
be16 select, be16 reserved, char name[56]); files get selectors from 0x20 up.
"""
from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass
from typing import Callable

from pyhv.devices.device import Claim, device_region
from pyhv.memory import GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

FW_CFG_PORT_SEL = 0x510
FW_CFG_PORT_DATA = 0x511
FW_CFG_PORT_DMA = 0x514
FW_CFG_CTL_SIZE = 2
DMA_CHUNK = 1 << 20          # a DMA read moves at most this much through a host buffer at a time
FW_CFG_DMA_SIZE = 8

FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MACHINE_ID = 0x06
FW_CFG_KERNEL_ADDR = 0x07
FW_CFG_KERNEL_SIZE = 0x08
FW_CFG_KERNEL_CMDLINE = 0x09
FW_CFG_INITRD_ADDR = 0x0A
FW_CFG_INITRD_SIZE = 0x0B
FW_CFG_BOOT_DEVICE = 0x0C
FW_CFG_NUMA = 0x0D
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_KERNEL_ENTRY = 0x10
FW_CFG_KERNEL_DATA = 0x11
FW_CFG_INITRD_DATA = 0x12
FW_CFG_CMDLINE_ADDR = 0x13
FW_CFG_CMDLINE_SIZE = 0x14
FW_CFG_CMDLINE_DATA = 0x15
FW_CFG_SETUP_ADDR = 0x16
FW_CFG_SETUP_SIZE = 0x17
FW_CFG_SETUP_DATA = 0x18
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_FILE_SLOTS_DFLT = 0x20
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_E820_TABLE = FW_CFG_ARCH_LOCAL + 3
FW_CFG_INVALID = 0xFFFF
FW_CFG_MAX_FILE_PATH = 56

FW_CFG_VERSION = 0x01
FW_CFG_VERSION_DMA = 0x02
FW_CFG_DMA_CTL_ERROR = 0x01
FW_CFG_DMA_CTL_READ = 0x02
FW_CFG_DMA_CTL_SKIP = 0x04
FW_CFG_DMA_CTL_SELECT = 0x08
FW_CFG_DMA_CTL_WRITE = 0x10
FW_CFG_DMA_SIGNATURE = b"QEMU CFG"
FW_CFG_DMA_ACCESS = struct.Struct(">IIQ")

E820_RAM = 1
E820_RESERVED = 2
E820_ENTRY = struct.Struct("<QQI")          # struct e820_reservation { u64 address; u64 length; u32 type; }


@dataclass
class FwCfgItem:
    data: bytearray
    name: str = ""
    on_write: Callable[[int, bytes], None] | None = None     # writable items only (offset, data)


@dataclass
class FwCfgState:
    selector: int = FW_CFG_INVALID
    offset: int = 0
    dma_high: int = 0
    dma_transfers: int = 0
    dma_errors: int = 0
    bytes_read: int = 0


class FwCfg:
    SNAPSHOT = True                  # `state` is all it keeps (items are built from the config; DMA is synchronous)
    def __init__(self, name: str = "fw_cfg", memory: GuestMemory | None = None) -> None:
        self.name = name
        self.memory = memory
        self.items: dict[int, FwCfgItem] = {}
        self.files: dict[str, int] = {}
        self.state = FwCfgState()
        self.lock = threading.Lock()
        self._bad_logged = False
        self.add_item(FW_CFG_SIGNATURE, b"QEMU")
        self.add_item(FW_CFG_ID, struct.pack("<I", FW_CFG_VERSION | (FW_CFG_VERSION_DMA if memory else 0)))
        self._rebuild_dir()

    # --- content ------------------------------------------------------------------------------------------------
    def add_item(self, key: int, data: bytes, on_write: Callable[[int, bytes], None] | None = None) -> None:
        self.items[key] = FwCfgItem(bytearray(data), on_write=on_write)

    def add_u16(self, key: int, value: int) -> None:
        self.add_item(key, struct.pack("<H", value))

    def add_u64(self, key: int, value: int) -> None:
        self.add_item(key, struct.pack("<Q", value))

    def add_file(self, name: str, data: bytes, on_write: Callable[[int, bytes], None] | None = None) -> int:
        """Add (or replace) a named file; returns its selector."""
        if len(name.encode()) >= FW_CFG_MAX_FILE_PATH:
            raise ValueError(f"fw_cfg file name {name!r} is too long")
        key = self.files.get(name)
        if key is None:
            key = FW_CFG_FILE_FIRST + len(self.files)
            self.files[name] = key
        self.items[key] = FwCfgItem(bytearray(data), name=name, on_write=on_write)
        self._rebuild_dir()
        return key

    def file(self, name: str) -> bytes | None:
        key = self.files.get(name)
        return bytes(self.items[key].data) if key is not None else None

    def _rebuild_dir(self) -> None:
        out = bytearray(struct.pack(">I", len(self.files)))
        for name, key in sorted(self.files.items(), key=lambda kv: kv[0]):
            out += struct.pack(">IHH", len(self.items[key].data), key, 0)
            out += name.encode().ljust(FW_CFG_MAX_FILE_PATH, b"\0")
        self.items[FW_CFG_FILE_DIR] = FwCfgItem(out)

    # --- port interface ----------------------------------------------------------------------------------------
    def select(self, key: int) -> None:
        self.state.selector = key & 0xFFFF
        self.state.offset = 0

    def _read_bytes(self, n: int) -> bytes:
        item = self.items.get(self.state.selector)
        start = self.state.offset
        data = bytes(item.data[start:start + n]) if item is not None else b""
        self.state.offset = start + n
        self.state.bytes_read += n
        return data + bytes(n - len(data))

    def ctl_read(self, offset: int, size: int) -> int:
        """0x510-0x511: the selector reads as all ones; 0x511 is the data port."""
        if offset == 1:
            with self.lock:
                return int.from_bytes(self._read_bytes(size), "little")
        return (1 << (8 * size)) - 1

    def ctl_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 2:
            with self.lock:
                self.select(value)
        # writes to the data port are ignored (since QEMU 2.4; writable items go through DMA)

    def ctl_describe(self, offset: int) -> str:
        return f"{self.name}.{'data' if offset == 1 else 'selector'}"

    def dma_read(self, offset: int, size: int) -> int:
        return int.from_bytes(FW_CFG_DMA_SIGNATURE[offset:offset + size].ljust(size, b"\xff"), "little")

    def dma_write(self, offset: int, size: int, value: int) -> None:
        be = value.to_bytes(size, "little")          # the bytes as the guest stored them: big-endian
        if offset == 0 and size == 4:
            self.state.dma_high = int.from_bytes(be, "big")
        elif offset == 4 and size == 4:
            addr = (self.state.dma_high << 32) | int.from_bytes(be, "big")
            self.state.dma_high = 0
            self.dma_transfer(addr)
        elif offset == 0 and size == 8:
            self.dma_transfer(int.from_bytes(be, "big"))
        else:
            self._log_bad(f"DMA register write of {size} bytes at +{offset}")

    def dma_describe(self, offset: int) -> str:
        return f"{self.name}.dma_{'high' if offset < 4 else 'low'}"

    def claims(self) -> list[Claim]:
        return [Claim.port(FW_CFG_PORT_SEL, device_region(self, FW_CFG_CTL_SIZE, read=self.ctl_read,
                                                          write=self.ctl_write, describe=self.ctl_describe)),
                Claim.port(FW_CFG_PORT_DMA, device_region(self, FW_CFG_DMA_SIZE, f"{self.name}-dma",
                                                          read=self.dma_read, write=self.dma_write,
                                                          describe=self.dma_describe))]

    # --- DMA ---------------------------------------------------------------------------------------------------
    def dma_transfer(self, access_addr: int) -> None:
        mem = self.memory
        if mem is None:
            return
        with self.lock:
            self.state.dma_transfers += 1
            try:
                control, length, address = FW_CFG_DMA_ACCESS.unpack(mem.read(access_addr, FW_CFG_DMA_ACCESS.size))
            except GuestMemoryError as e:
                self.state.dma_errors += 1
                self._log_bad(f"DMA descriptor at {access_addr:#x}: {e}")
                return
            status = 0
            try:
                if control & FW_CFG_DMA_CTL_SELECT:
                    self.select(control >> 16)
                if control & FW_CFG_DMA_CTL_READ:
                    mem.view(address, length, write=True)   # the whole target checked before any byte moves
                    for at in range(0, length, DMA_CHUNK):   # and no host buffer as big as the guest asked
                        n = min(DMA_CHUNK, length - at)
                        mem.write(address + at, self._read_bytes(n))
                elif control & FW_CFG_DMA_CTL_WRITE:
                    item = self.items.get(self.state.selector)
                    if item is None or item.on_write is None:
                        status = FW_CFG_DMA_CTL_ERROR
                    elif self.state.offset + length > len(item.data):
                        status = FW_CFG_DMA_CTL_ERROR
                    else:                                    # checked against the item before reading
                        data = mem.read(address, length)
                        start = self.state.offset
                        item.data[start:start + length] = data
                        item.on_write(start, data)
                        self.state.offset += length
                elif control & FW_CFG_DMA_CTL_SKIP:
                    self.state.offset += length
            except GuestMemoryError as e:
                status = FW_CFG_DMA_CTL_ERROR
                self._log_bad(f"DMA to {address:#x}+{length:#x}: {e}")
            if status:
                self.state.dma_errors += 1
            try:
                mem.write(access_addr, struct.pack(">I", status))
            except GuestMemoryError:
                pass

    def _log_bad(self, what: str) -> None:
        if not self._bad_logged:
            self._bad_logged = True
            log.warning("%s: bad %s; failed (logged once)", self.name, what)

    def reset(self) -> None:
        self.state.selector, self.state.offset, self.state.dma_high = FW_CFG_INVALID, 0, 0


def e820_table(entries: list[tuple[int, int, int]]) -> bytes:
    """The `etc/e820` file: (address, length, type) entries."""
    return b"".join(E820_ENTRY.pack(a, n, t) for a, n, t in entries)


def pci_boot_path(slot: int, function: int = 0) -> str:
    """OpenFirmware path of a virtio-blk disk on the i440FX root bus, as QEMU writes it in `bootorder` and as
    SeaBIOS matches it (it searches for the prefix /pci@i0cf8/*@SLOT[,FN])."""
    dev = f"{slot:x}" if function == 0 else f"{slot:x},{function:x}"
    return f"/pci@i0cf8/scsi@{dev}/disk@0,0"
