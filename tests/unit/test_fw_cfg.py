"""fw_cfg: items through the selector/data ports, the file directory, DMA (read, skip, select, write, errors)."""
from __future__ import annotations

import struct

import pytest

from pyhv.devices.fw_cfg import (
    E820_RAM, E820_RESERVED, FW_CFG_DMA_CTL_ERROR, FW_CFG_DMA_CTL_READ, FW_CFG_DMA_CTL_SELECT,
    FW_CFG_DMA_CTL_SKIP, FW_CFG_DMA_CTL_WRITE, FW_CFG_FILE_DIR, FW_CFG_ID, FW_CFG_NB_CPUS, FW_CFG_RAM_SIZE,
    FW_CFG_SIGNATURE, FwCfg, e820_table, pci_boot_path,
)
from pyhv.memory import AddressSpace, GuestMemory, MemoryRegion

RAM = 1 << 20
DESC = 0x1000
BUF = 0x2000


@pytest.fixture
def fw():
    system = MemoryRegion.container("system", 1 << 64)
    system.add_subregion(0, MemoryRegion.ram("ram", RAM))
    mem = GuestMemory(AddressSpace("memory", system))
    f = FwCfg("fw_cfg", mem)
    f.mem = mem
    f.add_u64(FW_CFG_RAM_SIZE, 128 << 20)
    f.add_u16(FW_CFG_NB_CPUS, 2)
    f.add_file("etc/e820", e820_table([(0, 0x8000000, E820_RAM), (0xFEFFC000, 0x4000, E820_RESERVED)]))
    f.add_file("bootorder", b"/pci@i0cf8/scsi@3/disk@0,0\n")
    return f


def port_read(f: FwCfg, key: int, n: int) -> bytes:
    f.ctl_write(0, 2, key)
    return bytes(f.ctl_read(1, 1) for _ in range(n))


def dma(f: FwCfg, control: int, length: int, address: int, high_first: bool = True) -> int:
    """Write a FWCfgDmaAccess at DESC and start it the way SeaBIOS does (big-endian halves, low half last)."""
    f.mem.write(DESC, struct.pack(">IIQ", control, length, address))
    be = DESC.to_bytes(8, "big")
    if high_first:
        f.dma_write(0, 4, int.from_bytes(be[:4], "little"))
    f.dma_write(4, 4, int.from_bytes(be[4:], "little"))
    return struct.unpack(">I", f.mem.read(DESC, 4))[0]


def test_signature_and_id_through_ports(fw):
    assert port_read(fw, FW_CFG_SIGNATURE, 4) == b"QEMU"
    assert struct.unpack("<I", port_read(fw, FW_CFG_ID, 4))[0] == 3          # traditional + DMA
    assert struct.unpack("<Q", port_read(fw, FW_CFG_RAM_SIZE, 8))[0] == 128 << 20
    assert port_read(fw, FW_CFG_NB_CPUS, 4) == b"\x02\x00\x00\x00"            # zeros past the end
    assert port_read(fw, 0x1234, 2) == b"\0\0"                                # unknown item


def test_dma_signature_register(fw):
    assert fw.dma_read(0, 4).to_bytes(4, "little") == b"QEMU"
    assert fw.dma_read(4, 4).to_bytes(4, "little") == b" CFG"


def test_file_directory(fw):
    raw = port_read(fw, FW_CFG_FILE_DIR, 4 + 2 * 64)
    assert struct.unpack(">I", raw[:4])[0] == 2
    entries = {}
    for i in range(2):
        size, select, _ = struct.unpack(">IHH", raw[4 + 64 * i:12 + 64 * i])
        name = raw[12 + 64 * i:68 + 64 * i].rstrip(b"\0").decode()
        entries[name] = (size, select)
    assert entries["etc/e820"][0] == 40 and entries["bootorder"][0] == 27
    e820 = port_read(fw, entries["etc/e820"][1], 40)
    assert struct.unpack("<QQI", e820[:20]) == (0, 0x8000000, E820_RAM)
    assert struct.unpack("<QQI", e820[20:]) == (0xFEFFC000, 0x4000, E820_RESERVED)


def test_dma_read_with_select(fw):
    status = dma(fw, (FW_CFG_SIGNATURE << 16) | FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_READ, 4, BUF)
    assert status == 0
    assert fw.mem.read(BUF, 4) == b"QEMU"


def test_dma_continues_at_the_offset_and_skips(fw):
    key = fw.files["bootorder"]
    assert dma(fw, (key << 16) | FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_SKIP, 5, 0) == 0
    assert dma(fw, FW_CFG_DMA_CTL_READ, 6, BUF, high_first=False) == 0
    assert fw.mem.read(BUF, 6) == b"i0cf8/"
    fw.ctl_write(0, 2, key)                                      # the port interface shares the offset
    assert fw.ctl_read(1, 1) == ord("/")


def test_dma_reads_zeros_past_the_end(fw):
    fw.mem.write(BUF, b"\xff" * 16)
    assert dma(fw, (FW_CFG_NB_CPUS << 16) | FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_READ, 16, BUF) == 0
    assert fw.mem.read(BUF, 16) == b"\x02" + bytes(15)


def test_dma_to_memory_outside_ram_fails_with_error(fw):
    status = dma(fw, (FW_CFG_SIGNATURE << 16) | FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_READ, 4, RAM - 2)
    assert status == FW_CFG_DMA_CTL_ERROR and fw.state.dma_errors == 1


def test_descriptor_outside_ram_is_ignored(fw):
    fw.dma_write(4, 4, int.from_bytes((RAM + 0x1000).to_bytes(4, "big"), "little"))
    assert fw.state.dma_errors == 1


def test_dma_write_needs_a_writable_item(fw):
    fw.mem.write(BUF, b"abcd")
    assert dma(fw, (FW_CFG_SIGNATURE << 16) | FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_WRITE, 4, BUF) \
        == FW_CFG_DMA_CTL_ERROR
    assert port_read(fw, FW_CFG_SIGNATURE, 4) == b"QEMU"
    seen = []
    key = fw.add_file("etc/writable", bytes(8), on_write=lambda off, data: seen.append((off, data)))
    assert dma(fw, (key << 16) | FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_WRITE, 4, BUF) == 0
    assert seen == [(0, b"abcd")] and fw.file("etc/writable") == b"abcd" + bytes(4)
    assert dma(fw, FW_CFG_DMA_CTL_WRITE, 8, BUF) == FW_CFG_DMA_CTL_ERROR        # past the end


def test_boot_paths():
    assert pci_boot_path(2) == "/pci@i0cf8/scsi@2/disk@0,0"
    assert pci_boot_path(0x1a, 1) == "/pci@i0cf8/scsi@1a,1/disk@0,0"
