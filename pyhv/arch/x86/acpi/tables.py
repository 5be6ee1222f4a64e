"""ACPI tables (ACPI 6.x chapter 5.2) as dataclasses, each with `.encode() -> bytes`.

Every system description table starts with the 36-byte header (signature, length, revision, checksum, OEMID
"PYHV  ", OEM table id, OEM revision, creator id "PYHV", creator revision) and its bytes sum to 0 mod 256.
Addresses between tables (XSDT entries, FADT → DSDT/FACS, RSDP → XSDT) are plain fields: whoever places the
tables in guest memory (`builder.layout_in_memory`) or the firmware (`table_loader`) fills them in.
"""
from __future__ import annotations

import struct
from pyhv.arch.x86.layout import IOAPIC_ADDR as IO_APIC_ADDRESS, LAPIC_ADDR as LOCAL_APIC_ADDRESS
from dataclasses import dataclass, field

OEM_ID = b"PYHV  "
OEM_TABLE_ID = b"PYHVVM  "
OEM_REVISION = 1
CREATOR_ID = b"PYHV"
CREATOR_REVISION = 1
HEADER = struct.Struct("<4sIBB6s8sI4sI")
HEADER_SIZE = HEADER.size            # 36
CHECKSUM_OFFSET = 9                  # in the header

# Generic Address Structure (5.2.3.2)
GAS = struct.Struct("<BBBBQ")
GAS_SYSTEM_MEMORY = 0
GAS_SYSTEM_IO = 1
GAS_ACCESS_UNDEFINED = 0
GAS_ACCESS_BYTE = 1
GAS_ACCESS_WORD = 2
GAS_ACCESS_DWORD = 3
GAS_ACCESS_QWORD = 4

# FADT flags (5.2.9, Table 5.10)
FADT_F_WBINVD = 1 << 0
FADT_F_WBINVD_FLUSH = 1 << 1
FADT_F_PROC_C1 = 1 << 2
FADT_F_P_LVL2_UP = 1 << 3
FADT_F_PWR_BUTTON = 1 << 4
FADT_F_SLP_BUTTON = 1 << 5
FADT_F_FIX_RTC = 1 << 6
FADT_F_RTC_S4 = 1 << 7
FADT_F_TMR_VAL_EXT = 1 << 8
FADT_F_DCK_CAP = 1 << 9
FADT_F_RESET_REG_SUP = 1 << 10
FADT_F_SEALED_CASE = 1 << 11
FADT_F_HEADLESS = 1 << 12
FADT_F_CPU_SW_SLP = 1 << 13
FADT_F_PCI_EXP_WAK = 1 << 14
FADT_F_USE_PLATFORM_CLOCK = 1 << 15
FADT_F_FORCE_APIC_PHYSICAL_DESTINATION_MODE = 1 << 19
FADT_F_HW_REDUCED_ACPI = 1 << 20
FADT_F_LOW_POWER_S0_IDLE_CAPABLE = 1 << 21
# IA-PC boot architecture flags (5.2.9.3)
IAPC_BOOT_ARCH_LEGACY_DEVICES = 1 << 0
IAPC_BOOT_ARCH_8042 = 1 << 1
IAPC_BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED = 1 << 3
IAPC_BOOT_ARCH_PCIE_ASPM_CONTROLS = 1 << 4
IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT = 1 << 5
PM_PROFILE_UNSPECIFIED = 0
PM_PROFILE_ENTERPRISE_SERVER = 4

FADT_REVISION = 6
FADT_MINOR_REVISION = 0
FADT_SIZE = 276
# field offsets inside the FADT that hold other tables' addresses
FADT_FIRMWARE_CTRL_OFFSET = 36
FADT_DSDT_OFFSET = 40
FADT_X_FIRMWARE_CTRL_OFFSET = 132
FADT_X_DSDT_OFFSET = 140

# MADT (5.2.12)
MADT_PCAT_COMPAT = 1 << 0
MADT_TYPE_LOCAL_APIC = 0
MADT_TYPE_IO_APIC = 1
MADT_TYPE_INTERRUPT_SOURCE_OVERRIDE = 2
MADT_TYPE_LOCAL_APIC_NMI = 4
MADT_LOCAL_APIC_ENABLED = 1 << 0
MPS_INTI_POLARITY_CONFORMS = 0
MPS_INTI_POLARITY_ACTIVE_HIGH = 1
MPS_INTI_POLARITY_ACTIVE_LOW = 3
MPS_INTI_TRIGGER_CONFORMS = 0 << 2
MPS_INTI_TRIGGER_EDGE = 1 << 2
MPS_INTI_TRIGGER_LEVEL = 3 << 2
MAX_XAPIC_ID = 254                   # 0xFF is the broadcast id

RSDP_SIGNATURE = b"RSD PTR "
RSDP = struct.Struct("<8sB6sBII Q B3s")
RSDP_SIZE = RSDP.size                # 36
RSDP_V1_SIZE = 20
RSDP_RSDT_OFFSET = 16
RSDP_XSDT_OFFSET = 24
RSDP_CHECKSUM_OFFSET = 8
RSDP_EXT_CHECKSUM_OFFSET = 32

FACS_SIZE = 64
FACS_ALIGN = 64


def checksum(data: bytes) -> int:
    """The byte that makes `data` (with that byte at 0) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes, oem_table_id: bytes = OEM_TABLE_ID) -> bytes:
    """Header + body with the checksum filled in."""
    if len(signature) != 4:
        raise ValueError(f"ACPI signature {signature!r} is not 4 bytes")
    length = HEADER_SIZE + len(body)
    head = HEADER.pack(signature, length, revision, 0, OEM_ID, oem_table_id.ljust(8, b" ")[:8], OEM_REVISION,
                       CREATOR_ID, CREATOR_REVISION)
    raw = bytearray(head + body)
    raw[CHECKSUM_OFFSET] = checksum(raw)
    return bytes(raw)


@dataclass(frozen=True)
class Gas:
    """Generic Address Structure. Zero (`Gas()`) means 'not present'."""
    space: int = GAS_SYSTEM_MEMORY
    bit_width: int = 0
    bit_offset: int = 0
    access_size: int = GAS_ACCESS_UNDEFINED
    address: int = 0

    @classmethod
    def io(cls, port: int, bit_width: int, access_size: int) -> "Gas":
        return cls(GAS_SYSTEM_IO, bit_width, 0, access_size, port)

    @classmethod
    def mem(cls, address: int, bit_width: int, access_size: int) -> "Gas":
        return cls(GAS_SYSTEM_MEMORY, bit_width, 0, access_size, address)

    def encode(self) -> bytes:
        return GAS.pack(self.space, self.bit_width, self.bit_offset, self.access_size, self.address)


@dataclass
class Rsdp:
    """Root System Description Pointer, revision 2 (ACPI 2.0+): 36 bytes, two checksums."""
    xsdt_address: int = 0
    rsdt_address: int = 0
    signature = RSDP_SIGNATURE
    size = RSDP_SIZE

    def encode(self) -> bytes:
        raw = bytearray(RSDP.pack(RSDP_SIGNATURE, 0, OEM_ID, 2, self.rsdt_address, RSDP_SIZE, self.xsdt_address,
                                  0, b"\0\0\0"))
        raw[RSDP_CHECKSUM_OFFSET] = checksum(raw[:RSDP_V1_SIZE])
        raw[RSDP_EXT_CHECKSUM_OFFSET] = checksum(raw)
        return bytes(raw)


@dataclass
class Xsdt:
    """Extended System Description Table: 64-bit addresses of the other tables (not the DSDT or FACS)."""
    entries: list[int] = field(default_factory=list)
    signature = b"XSDT"
    revision = 1

    @property
    def size(self) -> int:
        return HEADER_SIZE + 8 * len(self.entries)

    def encode(self) -> bytes:
        return sdt(self.signature, self.revision, b"".join(struct.pack("<Q", a) for a in self.entries))


@dataclass
class Rsdt:
    """Root System Description Table (32-bit entries), for firmware that reads only the RSDT (SeaBIOS)."""
    entries: list[int] = field(default_factory=list)
    signature = b"RSDT"
    revision = 1

    @property
    def size(self) -> int:
        return HEADER_SIZE + 4 * len(self.entries)

    def encode(self) -> bytes:
        for a in self.entries:
            if not 0 <= a <= 0xFFFFFFFF:
                raise ValueError(f"RSDT entry {a:#x} above 4 GiB")
        return sdt(self.signature, self.revision, b"".join(struct.pack("<I", a) for a in self.entries))


@dataclass
class Facs:
    """Firmware ACPI Control Structure (5.2.10): no header checksum, 64-byte aligned, required when not
    hardware-reduced (the OS's global lock and waking vector live here)."""
    hardware_signature: int = 0
    signature = b"FACS"
    size = FACS_SIZE
    align = FACS_ALIGN

    def encode(self) -> bytes:
        return struct.pack("<4sIIIIIQB3sI24s", b"FACS", FACS_SIZE, self.hardware_signature, 0, 0, 0, 0, 2,
                           b"\0\0\0", 0, bytes(24))


@dataclass
class Dsdt:
    """Differentiated System Description Table: header + AML. Revision 2 → 64-bit AML integers."""
    aml: bytes = b""
    signature = b"DSDT"
    revision = 2

    @property
    def size(self) -> int:
        return HEADER_SIZE + len(self.aml)

    def encode(self) -> bytes:
        return sdt(self.signature, self.revision, bytes(self.aml))


@dataclass
class Fadt:
    """Fixed ACPI Description Table, revision 6 (276 bytes).

    `hardware_reduced=True` (microvm): the HW_REDUCED_ACPI flag, no PM1/PM timer/GPE blocks, no FACS, SCI 0;
    sleep and reset through `sleep_control`/`sleep_status`/`reset_reg` registers.
    Otherwise (pc, PIIX4 PM at `pm_base`): PM1a_EVT_BLK = pm_base, PM1a_CNT_BLK = pm_base + 4,
    PM_TMR_BLK = pm_base + 8, GPE0_BLK = pm_base + 0x0C (4 bytes), SCI on `sci_int`, each with its X_ GAS.
    """
    hardware_reduced: bool = False
    pm_base: int = 0x600
    sci_int: int = 9
    smi_cmd: int = 0
    acpi_enable: int = 0
    acpi_disable: int = 0
    gpe0_blk_len: int = 4
    dsdt_address: int = 0
    facs_address: int = 0
    flags: int | None = None
    iapc_boot_arch: int = IAPC_BOOT_ARCH_LEGACY_DEVICES | IAPC_BOOT_ARCH_8042
    century: int = 0x32
    pm_profile: int = PM_PROFILE_UNSPECIFIED
    reset_reg: Gas = field(default_factory=Gas)
    reset_value: int = 0
    sleep_control: Gas = field(default_factory=Gas)
    sleep_status: Gas = field(default_factory=Gas)
    hypervisor_vendor: bytes = b"PYHV"
    signature = b"FACP"
    revision = FADT_REVISION
    size = FADT_SIZE

    def effective_flags(self) -> int:
        if self.flags is not None:
            flags = self.flags
        elif self.hardware_reduced:
            flags = FADT_F_HW_REDUCED_ACPI
        else:
            flags = FADT_F_WBINVD | FADT_F_PROC_C1 | FADT_F_SLP_BUTTON | FADT_F_RTC_S4 | FADT_F_USE_PLATFORM_CLOCK
        if self.hardware_reduced:
            flags |= FADT_F_HW_REDUCED_ACPI
        if self.reset_reg.address:
            flags |= FADT_F_RESET_REG_SUP
        return flags

    def encode(self) -> bytes:
        hw = self.hardware_reduced
        pm = 0 if hw else self.pm_base
        sci = 0 if hw else self.sci_int
        body = bytearray()
        facs = 0 if hw else self.facs_address
        body += struct.pack("<II", facs if facs <= 0xFFFFFFFF else 0,
                            self.dsdt_address if self.dsdt_address <= 0xFFFFFFFF else 0)
        body += struct.pack("<BBH I BBBB", 0, self.pm_profile, sci, 0 if hw else self.smi_cmd,
                            0 if hw else self.acpi_enable, 0 if hw else self.acpi_disable, 0, 0)
        pm1a_evt, pm1a_cnt, pm_tmr = (0, 0, 0) if hw else (pm, pm + 4, pm + 8)
        gpe0 = 0 if hw or not self.gpe0_blk_len else pm + 0x0C
        body += struct.pack("<IIIIIIII", pm1a_evt, 0, pm1a_cnt, 0, 0, pm_tmr, gpe0, 0)
        body += struct.pack("<BBBBBBBB", 0 if hw else 4, 0 if hw else 2, 0, 0 if hw else 4,
                            self.gpe0_blk_len if gpe0 else 0, 0, 0, 0)
        # P_LVL2_LAT > 100 and P_LVL3_LAT > 1000: no C2/C3
        body += struct.pack("<HHHH BBBBB H B I", 0 if hw else 0xFFF, 0 if hw else 0xFFFF, 0, 0,
                            0, 0, 0, 0, self.century, self.iapc_boot_arch, 0, self.effective_flags())
        body += self.reset_reg.encode()
        body += struct.pack("<BHB", self.reset_value, 0, FADT_MINOR_REVISION)
        # FACS: the 32-bit FIRMWARE_CTRL when it fits, then X_FIRMWARE_CTRL must be zero (5.2.9)
        body += struct.pack("<QQ", facs if facs > 0xFFFFFFFF else 0, self.dsdt_address)
        none = Gas()
        body += (none if hw else Gas.io(pm1a_evt, 32, GAS_ACCESS_WORD)).encode()
        body += none.encode()
        body += (none if hw else Gas.io(pm1a_cnt, 16, GAS_ACCESS_WORD)).encode()
        body += none.encode()
        body += none.encode()                                                   # X_PM2_CNT_BLK
        body += (none if hw else Gas.io(pm_tmr, 32, GAS_ACCESS_DWORD)).encode()
        body += (none if not gpe0 else Gas.io(gpe0, 8 * self.gpe0_blk_len, GAS_ACCESS_BYTE)).encode()
        body += none.encode()                                                   # X_GPE1_BLK
        body += self.sleep_control.encode()
        body += self.sleep_status.encode()
        body += self.hypervisor_vendor.ljust(8, b"\0")[:8]
        out = sdt(self.signature, self.revision, bytes(body))
        assert len(out) == FADT_SIZE, len(out)
        return out


@dataclass(frozen=True)
class InterruptOverride:
    source: int                      # ISA IRQ
    gsi: int
    flags: int = 0                   # MPS_INTI_* polarity | trigger
    bus: int = 0                     # ISA


@dataclass
class Madt:
    """Multiple APIC Description Table: local APICs (one per vCPU, APIC id = index), one I/O APIC,
    interrupt source overrides and a Local APIC NMI on LINT1 for all processors."""
    cpus: int = 1
    pcat_compat: bool = True
    io_apic_id: int | None = None    # default: one above the last APIC id
    io_apic_address: int = IO_APIC_ADDRESS
    io_apic_gsi_base: int = 0
    overrides: list[InterruptOverride] = field(default_factory=list)
    local_apic_address: int = LOCAL_APIC_ADDRESS
    nmi_lint: int = 1
    signature = b"APIC"
    revision = 4

    def __post_init__(self) -> None:
        if not 1 <= self.cpus <= MAX_XAPIC_ID + 1:
            raise ValueError(f"MADT: {self.cpus} vCPUs, but xAPIC ids are 8-bit (0xFF is broadcast): "
                             f"at most {MAX_XAPIC_ID + 1} vCPUs without x2APIC entries")

    @property
    def io_apic(self) -> int:
        return self.cpus if self.io_apic_id is None else self.io_apic_id

    @property
    def size(self) -> int:
        return HEADER_SIZE + 8 + 8 * self.cpus + 12 + 10 * len(self.overrides) + 6

    def encode(self) -> bytes:
        body = bytearray(struct.pack("<II", self.local_apic_address, MADT_PCAT_COMPAT if self.pcat_compat else 0))
        for cpu in range(self.cpus):
            body += struct.pack("<BBBBI", MADT_TYPE_LOCAL_APIC, 8, cpu, cpu, MADT_LOCAL_APIC_ENABLED)
        body += struct.pack("<BBBBII", MADT_TYPE_IO_APIC, 12, self.io_apic & 0xFF, 0, self.io_apic_address,
                            self.io_apic_gsi_base)
        for o in self.overrides:
            body += struct.pack("<BBBBIH", MADT_TYPE_INTERRUPT_SOURCE_OVERRIDE, 10, o.bus, o.source, o.gsi, o.flags)
        body += struct.pack("<BBBHB", MADT_TYPE_LOCAL_APIC_NMI, 6, 0xFF, 0, self.nmi_lint)
        return sdt(self.signature, self.revision, bytes(body))


DMAR_INTR_REMAP = 1 << 0                 # DMAR flags: interrupt remapping supported
DMAR_TYPE_DRHD = 0
DRHD_INCLUDE_PCI_ALL = 1 << 0
DRHD_LENGTH = 16                          # without device scopes


@dataclass
class Dmar:
    """DMA Remapping Reporting table (Intel VT-d specification §8): the host address width and one DMA remapping
    hardware unit (DRHD) per register block, each with INCLUDE_PCI_ALL (every PCI device of its segment, as QEMU
    reports its intel-iommu). No reserved memory regions (RMRR): no device needs DMA before the OS maps it."""
    host_address_width: int = 48          # bits; the table stores width - 1
    units: list[int] = field(default_factory=list)      # register base addresses (segment 0, all PCI devices)
    flags: int = 0
    signature = b"DMAR"
    revision = 1

    @property
    def size(self) -> int:
        return HEADER_SIZE + 12 + DRHD_LENGTH * len(self.units)

    def encode(self) -> bytes:
        body = bytearray(struct.pack("<BB10x", self.host_address_width - 1, self.flags))
        for base in self.units:
            body += struct.pack("<HHBBHQ", DMAR_TYPE_DRHD, DRHD_LENGTH, DRHD_INCLUDE_PCI_ALL, 0, 0, base)
        return sdt(self.signature, self.revision, bytes(body))
