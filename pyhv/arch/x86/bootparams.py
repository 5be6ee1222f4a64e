"""The Linux x86 boot protocol (Documentation/arch/x86/boot.rst): the setup header of a bzImage, the zero page
(`struct boot_params`) a boot loader fills in, and the e820 memory map it carries."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from pyhv.errors import GuestImageError

# offsets in the bzImage file and in struct boot_params (the setup header sits at the same place in both)
SETUP_HEADER_OFFSET = 0x1F1
HDR_SETUP_SECTS = 0x1F1
HDR_BOOT_FLAG = 0x1FE
HDR_JUMP = 0x200
HDR_HEADER = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_CODE32_START = 0x214
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_INITRD_ADDR_MAX = 0x22C
HDR_KERNEL_ALIGNMENT = 0x230
HDR_RELOCATABLE_KERNEL = 0x234
HDR_MIN_ALIGNMENT = 0x235
HDR_XLOADFLAGS = 0x236
HDR_CMDLINE_SIZE = 0x238
HDR_PAYLOAD_OFFSET = 0x248
HDR_SETUP_DATA = 0x250
HDR_PAYLOAD_LENGTH = 0x24C
HDR_PREF_ADDRESS = 0x258
HDR_INIT_SIZE = 0x260

BP_ACPI_RSDP_ADDR = 0x070             # boot protocol 2.14: where the RSDP is (0: the kernel scans for it)
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SENTINEL = 0x1EF
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128
ZERO_PAGE_SIZE = 4096

BOOT_FLAG = 0xAA55
HDRS_MAGIC = 0x53726448          # "HdrS"
LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
LOADER_TYPE_UNDEFINED = 0xFF     # "no registered loader id"
MIN_PROTOCOL = 0x020C            # 2.12: xloadflags and the 64-bit entry point
SETUP_RNG_SEED = 9               # a setup_data type (arch/x86/include/uapi/asm/bootparam.h)
RNG_SEED_SIZE = 32

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


@dataclass
class SetupHeader:
    """The fields of a bzImage's setup header pyhv needs, validated."""
    raw: bytes                # the header bytes as found (0x1f1 up to the end given by the jump at 0x200)
    setup_sects: int
    version: int
    loadflags: int
    xloadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    cmdline_size: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int

    @property
    def kernel_offset(self) -> int:
        """File offset of the protected-mode kernel (after the real-mode setup sectors)."""
        return (self.setup_sects + 1) * 512

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    @classmethod
    def parse(cls, image: bytes, path: str = "kernel") -> "SetupHeader":
        if len(image) < 0x270:
            raise GuestImageError(f"{path}: too short to be a Linux kernel ({len(image)} bytes)")
        u8 = lambda off: image[off]                                   # noqa: E731
        u16 = lambda off: struct.unpack_from("<H", image, off)[0]    # noqa: E731
        u32 = lambda off: struct.unpack_from("<I", image, off)[0]    # noqa: E731
        if u16(HDR_BOOT_FLAG) != BOOT_FLAG or u32(HDR_HEADER) != HDRS_MAGIC:
            raise GuestImageError(f"{path}: not a bzImage (no 0xAA55 boot flag / HdrS setup header)")
        version = u16(HDR_VERSION)
        if version < MIN_PROTOCOL:
            raise GuestImageError(f"{path}: boot protocol {version >> 8}.{version & 0xFF:02d} is too old",
                                  "pyhv needs 2.12 or later (Linux 3.8+)")
        xloadflags = u16(HDR_XLOADFLAGS)
        if not xloadflags & XLF_KERNEL_64:
            raise GuestImageError(f"{path}: the kernel has no 64-bit entry point (a 32-bit kernel?)")
        loadflags = u8(HDR_LOADFLAGS)
        if not loadflags & LOADED_HIGH:
            raise GuestImageError(f"{path}: a zImage that loads at 0x10000 is not supported")
        alignment = u32(HDR_KERNEL_ALIGNMENT)
        if alignment == 0 or alignment & (alignment - 1):
            raise GuestImageError(f"{path}: kernel_alignment {alignment:#x} is not a power of two")
        header_end = HDR_HEADER + u8(HDR_JUMP + 1)        # `jmp short` at 0x200 jumps over the header
        setup_sects = u8(HDR_SETUP_SECTS) or 4
        hdr = cls(raw=bytes(image[SETUP_HEADER_OFFSET:header_end]), setup_sects=setup_sects, version=version,
                  loadflags=loadflags, xloadflags=xloadflags, initrd_addr_max=u32(HDR_INITRD_ADDR_MAX),
                  kernel_alignment=alignment, relocatable=bool(u8(HDR_RELOCATABLE_KERNEL)),
                  cmdline_size=u32(HDR_CMDLINE_SIZE), payload_offset=u32(HDR_PAYLOAD_OFFSET),
                  payload_length=u32(HDR_PAYLOAD_LENGTH), pref_address=struct.unpack_from("<Q", image,
                                                                                           HDR_PREF_ADDRESS)[0],
                  init_size=u32(HDR_INIT_SIZE))
        if hdr.kernel_offset >= len(image):
            raise GuestImageError(f"{path}: setup_sects ({setup_sects}) points past the end of the file")
        if hdr.payload_offset + hdr.payload_length > len(image) - hdr.kernel_offset:
            raise GuestImageError(f"{path}: the compressed payload reaches past the end of the file")
        return hdr


def synthetic_header(cmdline_size: int = 2048, initrd_addr_max: int = 0x7FFFFFFF) -> bytes:
    """A setup header for a kernel that has none (an ELF vmlinux entered at startup_64)."""
    end = 0x268
    raw = bytearray(end - SETUP_HEADER_OFFSET)

    def put(fmt: str, offset: int, value: int) -> None:
        struct.pack_into(fmt, raw, offset - SETUP_HEADER_OFFSET, value)
    put("<H", HDR_BOOT_FLAG, BOOT_FLAG)
    put("<I", HDR_HEADER, HDRS_MAGIC)
    put("<H", HDR_VERSION, 0x020F)
    put("<B", HDR_LOADFLAGS, LOADED_HIGH)
    put("<I", HDR_INITRD_ADDR_MAX, initrd_addr_max)
    put("<I", HDR_CMDLINE_SIZE, cmdline_size)
    put("<H", HDR_XLOADFLAGS, XLF_KERNEL_64)
    return bytes(raw)


def build_zero_page(header: bytes, e820: list[E820Entry], cmdline_addr: int, cmdline_len: int,
                    initrd_addr: int = 0, initrd_size: int = 0, setup_data: int = 0,
                    acpi_rsdp_addr: int = 0) -> bytearray:
    """struct boot_params for the 64-bit boot protocol: the kernel's own setup header, completed by the loader."""
    if len(e820) > E820_MAX_ENTRIES:
        raise ValueError("too many e820 entries")
    zp = bytearray(ZERO_PAGE_SIZE)
    zp[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + len(header)] = header
    zp[BP_SENTINEL] = 0                    # non-zero would make the kernel distrust (and zero) our fields
    zp[HDR_TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    zp[HDR_LOADFLAGS] = (zp[HDR_LOADFLAGS] | LOADED_HIGH | CAN_USE_HEAP) & 0xFF
    struct.pack_into("<H", zp, HDR_HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", zp, HDR_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", zp, BP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    struct.pack_into("<I", zp, HDR_RAMDISK_IMAGE, initrd_addr & 0xFFFFFFFF)
    struct.pack_into("<I", zp, BP_EXT_RAMDISK_IMAGE, initrd_addr >> 32)
    struct.pack_into("<I", zp, HDR_RAMDISK_SIZE, initrd_size & 0xFFFFFFFF)
    struct.pack_into("<I", zp, BP_EXT_RAMDISK_SIZE, initrd_size >> 32)
    struct.pack_into("<Q", zp, HDR_SETUP_DATA, setup_data)
    struct.pack_into("<Q", zp, BP_ACPI_RSDP_ADDR, acpi_rsdp_addr)
    zp[BP_E820_ENTRIES] = len(e820)
    for i, entry in enumerate(e820):
        struct.pack_into("<QQI", zp, BP_E820_TABLE + 20 * i, entry.addr, entry.size, entry.type)
    return zp


def rng_seed_setup_data(seed: bytes) -> bytes:
    """A `struct setup_data` of type SETUP_RNG_SEED (next, type, len, data), as QEMU gives a `-kernel`: the kernel
    mixes the seed into its entropy pool at setup_arch and, where it trusts the boot loader
    (CONFIG_RANDOM_TRUST_BOOTLOADER), starts with its random number generator ready instead of waiting for
    interrupt entropy."""
    return struct.pack("<QII", 0, SETUP_RNG_SEED, len(seed)) + seed          # the only entry: next = 0


def e820_map(below_4g: int, above_4g: int, ebda_start: int = 0x9F000) -> list[E820Entry]:
    """RAM below 636 KiB (the MP tables live in the 4 KiB below 640 KiB), the rest up to 1 MiB reserved,
    RAM from 1 MiB to the PCI hole, and RAM above 4 GiB."""
    entries = [E820Entry(0, ebda_start, E820_RAM), E820Entry(ebda_start, 0x100000 - ebda_start, E820_RESERVED)]
    if below_4g > 0x100000:
        entries.append(E820Entry(0x100000, below_4g - 0x100000, E820_RAM))
    if above_4g:
        entries.append(E820Entry(1 << 32, above_4g, E820_RAM))
    return entries
