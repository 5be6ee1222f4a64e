r"""Whole ACPI table sets for pyhv's two boards, from one plain description (`AcpiConfig`).

    tables = build_tables(AcpiConfig(machine="pc", vcpus=2, pci=PciHostConfig(), pm_base=0x600))
    blob, rsdp_addr, offsets = layout_in_memory(tables, 0xE0000)      # direct boot: copy blob to 0xE0000
    files = table_loader.fw_cfg_files(tables)                       # firmware boot: three fw_cfg files

pc: FADT (PIIX4 PM at `pm_base`: PM1a_EVT = pm_base, PM1a_CNT = +4, PM_TMR = +8, GPE0 = +0x0C; SCI 9),
FACS, MADT (PCAT_COMPAT, overrides IRQ0→GSI2 edge, IRQ9 and the PCI link GSIs level/active-high), DSDT with
\_SB.PCI0 (PNP0A03, _CRS, _PRT), COMn (PNP0501), PS2K (PNP0303) and PS2M (PNP0F13, IRQ 12) for the i8042,
RTC (PNP0B00) and \_S5 = {0, 0, 0, 0} (SLP_TYP 0 is S5 on pyhv's and QEMU's PIIX4 PM,
`devices.piix4_pm.SLP_TYP_S5`).

PCI interrupt routing: a device in slot S (1-31), pin P (0 = INTA .. 3 = INTD) reaches PIRQ[(S + P - 1) % 4]
(A-D), the PIIX3 rotation of `pci.bus.pirq_swizzle`; `_PRT` gives it `link_gsis[that PIRQ]` directly. QEMU's
DSDT writes the same wiring as link index (S + P) % 4 over links named D, A, B, C. The GSIs must be the ISA IRQs
the firmware programs into PIRQRC[A:D] (SeaBIOS: 10, 10, 11, 11).

microvm: hardware-reduced FADT, MADT, DSDT with \_SB.VRnn (LNRO0005 virtio-mmio), COMn, optional PS2K/RTC,
a Generic Event Device \_SB.GED_ (ACPI0013) and a power button \_SB.PWRB (PNP0C0C), \_S5 = {5, 0, 0, 0}.

GED register block (byte registers at `ged=(base, gsi)`; the device model must match):

    base + 0  GED_EVENT     event selector, read clears. bit 0 = power button. The device raises its GSI
                            (edge, active high) after setting a bit; _EVT reads the byte once and, for bit 0,
                            does Notify(\_SB.PWRB, 0x80).
    base + 1  SLEEP_CONTROL FADT SLEEP_CONTROL_REG: the OS writes SLP_TYP << 2 | SLP_EN (bit 5); SLP_TYP 5
                            (\_S5) with SLP_EN = power off (Linux writes 0x34).
    base + 2  SLEEP_STATUS  FADT SLEEP_STATUS_REG: bit 7 WAK_STS (write 1 to clear); reads 0 otherwise.
    base + 3  RESET         FADT RESET_REG: writing RESET_VALUE (0x42) resets the machine.
    (4 bytes; GED_SIZE)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pyhv.arch.x86.acpi import aml
from pyhv.arch.x86.acpi.tables import (
    FACS_ALIGN, GAS_ACCESS_BYTE, IAPC_BOOT_ARCH_8042, IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT,
    IAPC_BOOT_ARCH_LEGACY_DEVICES, IAPC_BOOT_ARCH_VGA_NOT_PRESENT, MAX_XAPIC_ID, MPS_INTI_POLARITY_ACTIVE_HIGH,
    MPS_INTI_TRIGGER_EDGE, MPS_INTI_TRIGGER_LEVEL, Dsdt, Facs, Fadt, Gas, InterruptOverride, Madt, Rsdp, Rsdt, Xsdt,
)

# GED block layout (see module docstring)
GED_EVENT = 0
GED_SLEEP_CONTROL = 1
GED_SLEEP_STATUS = 2
GED_RESET = 3
GED_SIZE = 4
GED_EVENT_PWR_DOWN = 1 << 0
GED_RESET_VALUE = 0x42
SLEEP_CONTROL_SLP_TYP_SHIFT = 2
SLEEP_CONTROL_SLP_TYP_MASK = 0x07 << 2
SLEEP_CONTROL_SLP_EN = 1 << 5
SLEEP_STATUS_WAK_STS = 1 << 7
GED_SLP_TYP_S5 = 5
PIIX4_SLP_TYP_S5 = 0            # pyhv.devices.piix4_pm.SLP_TYP_S5 (as QEMU's PIIX4)
NOTIFY_POWER_BUTTON = 0x80

PCI_SLOTS = range(1, 32)
PCI_PINS = 4


@dataclass
class PciHostConfig:
    """The i440FX host bridge as the DSDT describes it."""
    bus_range: tuple[int, int] = (0, 255)
    config_port: int = 0xCF8
    io_windows: list[tuple[int, int]] = field(default_factory=lambda: [(0x0000, 0x0CF7), (0x0D00, 0xFFFF)])
    mmio32: tuple[int, int] = (0xC0000000, 0x3EC00000)        # (base, size): up to below the I/O APIC
    mmio64: tuple[int, int] | None = None                    # (base, size)
    vga_window: bool = True                                   # 0xA0000-0xBFFFF
    link_gsis: tuple[int, int, int, int] = (10, 10, 11, 11)  # GSI of PIRQA..PIRQD
    slots: range = PCI_SLOTS


@dataclass
class AcpiConfig:
    machine: str = "pc"                                              # "pc" or "microvm"
    vcpus: int = 1
    virtio_mmio: list[tuple[int, int, int]] = field(default_factory=list)   # (base, size, gsi)
    virtio_mmio_edge: bool = False                                   # level, active high (as QEMU microvm)
    serial_ports: list[tuple[int, int]] = field(default_factory=lambda: [(0x3F8, 4)])   # (io base, irq)
    pci: PciHostConfig | None = None
    ged: tuple[int, int] | None = None                               # microvm: (mmio base, gsi)
    pm_base: int = 0x600                                             # pc: PIIX4 PMBASE
    sci_int: int = 9
    s5_slp_typ: int | None = None         # None: PIIX4_SLP_TYP_S5 on pc, GED_SLP_TYP_S5 on microvm
    i8042: bool = True
    rtc: bool = True
    pcat_compat: bool | None = None       # None: True on pc (8259 pair present), False on microvm
    io_apic_id: int | None = None         # None: vcpus (the first id after the local APICs)
    extra_tables: list = field(default_factory=list)   # objects with .signature/.encode(), listed in the XSDT

    def validate(self) -> None:
        if self.machine not in ("pc", "microvm"):
            raise ValueError(f"ACPI: machine {self.machine!r} is neither 'pc' nor 'microvm'")
        if not isinstance(self.vcpus, int) or self.vcpus < 1:
            raise ValueError(f"ACPI: {self.vcpus!r} vCPUs (at least 1)")
        if self.vcpus > MAX_XAPIC_ID + 1:
            raise ValueError(f"ACPI: {self.vcpus} vCPUs, but xAPIC ids are 8-bit (0xFF is broadcast), so at most "
                             f"{MAX_XAPIC_ID + 1} vCPUs are supported")
        if self.machine == "microvm" and self.pci is not None:
            raise ValueError("ACPI: microvm has no PCI host bridge (pci must be None)")
        if len(self.virtio_mmio) > 100:
            raise ValueError(f"ACPI: {len(self.virtio_mmio)} virtio-mmio devices (names VR00..VR99: at most 100)")
        if len(self.serial_ports) > 9:
            raise ValueError(f"ACPI: {len(self.serial_ports)} serial ports (COM1..COM9)")


@dataclass
class AcpiTables:
    """One machine's tables. Addresses between them are filled in by `layout_in_memory` or the firmware."""
    dsdt: Dsdt
    fadt: Fadt
    madt: Madt
    facs: Facs | None = None
    extra: list = field(default_factory=list)

    @property
    def xsdt_tables(self) -> list:
        """What the XSDT (and RSDT) list, in order: FADT first."""
        return [self.fadt, self.madt, *self.extra]

    @property
    def tables(self) -> list:
        """Every table, in the order they are laid out (FACS first: it needs 64-byte alignment)."""
        return ([self.facs] if self.facs is not None else []) + [self.dsdt, *self.xsdt_tables]

    def rsdp(self, xsdt_address: int, rsdt_address: int = 0) -> bytes:
        return Rsdp(xsdt_address=xsdt_address, rsdt_address=rsdt_address).encode()


# ---------------------------------------------------------------------------------------------------------------
# DSDT pieces

def _device(name: str, hid: str | int, uid: int | None = None, crs: aml.ResourceTemplate | None = None,
            *extra: aml.AmlObject) -> aml.Device:
    hid_term = aml.EisaId(hid) if isinstance(hid, str) and _is_eisa(hid) else aml.to_term(hid)
    children: list[aml.AmlObject] = [aml.Name("_HID", hid_term)]
    if uid is not None:
        children.append(aml.Name("_UID", uid))
    if crs is not None:
        children.append(aml.Name("_CRS", crs))
    children.extend(extra)
    return aml.Device(name, children)


def _is_eisa(hid: str) -> bool:
    try:
        aml.eisa_id(hid)
        return True
    except ValueError:
        return False


def serial_devices(ports: list[tuple[int, int]]) -> list[aml.Device]:
    return [_device(f"COM{i + 1}", "PNP0501", i + 1, aml.ResourceTemplate([aml.Io(base, base, 1, 8), aml.Irq(irq)]))
            for i, (base, irq) in enumerate(ports)]


def i8042_device() -> aml.Device:
    return _device("PS2K", "PNP0303", 0, aml.ResourceTemplate([aml.Io(0x60, 0x60, 1, 1), aml.Io(0x64, 0x64, 1, 1),
                                                               aml.Irq(1)]))


def i8042_mouse_device() -> aml.Device:
    """The i8042's AUX port: without it Linux's i8042 PnP probe disables the AUX port."""
    return _device("PS2M", "PNP0F13", 0, aml.ResourceTemplate([aml.Irq(12)]))


def rtc_device() -> aml.Device:
    return _device("RTC_", "PNP0B00", 0, aml.ResourceTemplate([aml.Io(0x70, 0x70, 1, 2), aml.Irq(8)]))


def pirq_of(slot: int, pin: int) -> int:
    """PIRQ (0-3 = A-D) for `slot`, `pin` (0 = INTA): the PIIX3 rotation."""
    return (slot + pin - 1) % 4


def prt_package(pci: PciHostConfig) -> aml.Package:
    entries = []
    for slot in pci.slots:
        for pin in range(PCI_PINS):
            entries.append(aml.Package([(slot << 16) | 0xFFFF, pin, 0, pci.link_gsis[pirq_of(slot, pin)]]))
    return aml.Package(entries)


def pci_host_device(pci: PciHostConfig) -> aml.Device:
    crs = aml.ResourceTemplate([aml.word_bus_number(*pci.bus_range),
                                aml.Io(pci.config_port, pci.config_port, 1, 8)])
    for lo, hi in pci.io_windows:
        crs.append(aml.word_io(lo, hi))
    if pci.vga_window:
        crs.append(aml.dword_memory(0xA0000, 0xBFFFF))
    base, size = pci.mmio32
    crs.append(aml.dword_memory(base, base + size - 1))
    if pci.mmio64 is not None:
        base, size = pci.mmio64
        crs.append(aml.qword_memory(base, base + size - 1))
    return _device("PCI0", "PNP0A03", 0, crs, aml.Name("_ADR", 0), aml.Name("_PRT", prt_package(pci)))


def virtio_mmio_devices(slots: list[tuple[int, int, int]], edge: bool = False) -> list[aml.Device]:
    return [_device(f"VR{i:02d}", "LNRO0005", i,
                    aml.ResourceTemplate([aml.Memory32Fixed(base, size), aml.ExtendedInterrupt(gsi, edge=edge)]),
                    aml.Name("_CCA", 1))
            for i, (base, size, gsi) in enumerate(slots)]


def ged_devices(base: int, gsi: int) -> list[aml.Device]:
    """The GED (its _EVT notifies the power button) and \\_SB.PWRB."""
    evt = aml.Method("_EVT", 1, serialized=True, children=[
        aml.Store("ESEL", aml.Local(0)),
        aml.If(aml.LEqual(aml.And(aml.Local(0), GED_EVENT_PWR_DOWN), GED_EVENT_PWR_DOWN),
               [aml.Notify("\\_SB_.PWRB", NOTIFY_POWER_BUTTON)]),
    ])
    ged = _device("GED_", "ACPI0013", 0, aml.ResourceTemplate([aml.ExtendedInterrupt(gsi, edge=True)]),
                  aml.OperationRegion("EREG", aml.REGION_SYSTEM_MEMORY, base + GED_EVENT, 1),
                  aml.Field("EREG", [("ESEL", 8)], access=aml.FIELD_BYTE_ACC, update=aml.FIELD_WRITE_AS_ZEROS),
                  evt)
    return [ged, _device("PWRB", "PNP0C0C", 0)]


def build_dsdt_aml(cfg: AcpiConfig) -> bytes:
    sb = aml.Scope("\\_SB_")
    if cfg.pci is not None:
        sb.append(pci_host_device(cfg.pci))
    sb.append(*serial_devices(cfg.serial_ports))
    if cfg.i8042:
        sb.append(i8042_device(), i8042_mouse_device())
    if cfg.rtc:
        sb.append(rtc_device())
    sb.append(*virtio_mmio_devices(cfg.virtio_mmio, cfg.virtio_mmio_edge))
    if cfg.ged is not None:
        sb.append(*ged_devices(*cfg.ged))
    slp_typ = cfg.s5_slp_typ
    if slp_typ is None:
        slp_typ = PIIX4_SLP_TYP_S5 if cfg.machine == "pc" else GED_SLP_TYP_S5
    s5 = aml.Name("\\_S5_", aml.Package([slp_typ, slp_typ if cfg.machine == "pc" else 0, 0, 0]))
    return sb.encode() + s5.encode()


# ---------------------------------------------------------------------------------------------------------------

def build_tables(cfg: AcpiConfig) -> AcpiTables:
    """The table set for `cfg` (addresses still zero)."""
    cfg.validate()
    pc = cfg.machine == "pc"
    dsdt = Dsdt(build_dsdt_aml(cfg))
    overrides = [InterruptOverride(0, 2, MPS_INTI_POLARITY_ACTIVE_HIGH | MPS_INTI_TRIGGER_EDGE)]
    level_high = MPS_INTI_POLARITY_ACTIVE_HIGH | MPS_INTI_TRIGGER_LEVEL
    if pc:
        level = [cfg.sci_int] + (sorted(set(cfg.pci.link_gsis)) if cfg.pci is not None else [])
        for irq in dict.fromkeys(level):
            if irq < 16:
                overrides.append(InterruptOverride(irq, irq, level_high))
    madt = Madt(cpus=cfg.vcpus, pcat_compat=pc if cfg.pcat_compat is None else cfg.pcat_compat,
                io_apic_id=cfg.io_apic_id, overrides=overrides)
    boot_arch = IAPC_BOOT_ARCH_8042 if cfg.i8042 else 0
    if pc:
        fadt = Fadt(hardware_reduced=False, pm_base=cfg.pm_base, sci_int=cfg.sci_int,
                    iapc_boot_arch=boot_arch | IAPC_BOOT_ARCH_LEGACY_DEVICES,
                    century=0x32 if cfg.rtc else 0)
        facs = Facs()
    else:
        if cfg.ged is None:
            raise ValueError("ACPI: microvm needs a GED (ged=(mmio base, gsi)) for its sleep and reset registers")
        base = cfg.ged[0]
        boot_arch |= IAPC_BOOT_ARCH_VGA_NOT_PRESENT | (0 if cfg.rtc else IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT)
        fadt = Fadt(hardware_reduced=True, iapc_boot_arch=boot_arch, century=0x32 if cfg.rtc else 0,
                    sleep_control=Gas.mem(base + GED_SLEEP_CONTROL, 8, GAS_ACCESS_BYTE),
                    sleep_status=Gas.mem(base + GED_SLEEP_STATUS, 8, GAS_ACCESS_BYTE),
                    reset_reg=Gas.mem(base + GED_RESET, 8, GAS_ACCESS_BYTE), reset_value=GED_RESET_VALUE)
        facs = None
    return AcpiTables(dsdt=dsdt, fadt=fadt, madt=madt, facs=facs, extra=list(cfg.extra_tables))


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & -alignment


def assign_addresses(tables: AcpiTables, base: int) -> dict[str, int]:
    """Place every table from `base` on (FACS 64-aligned, others 8-aligned; RSDT and XSDT last), fill in the
    FADT's FACS/DSDT fields, and return {signature: address} including "XSDT" and "RSDT" (without the RSDP)."""
    addr = base
    where: dict[str, int] = {}
    for t in tables.tables:
        addr = _align(addr, FACS_ALIGN if isinstance(t, Facs) else 8)
        where[t.signature.decode()] = addr
        addr += t.size
    tables.fadt.dsdt_address = where["DSDT"]
    tables.fadt.facs_address = where.get("FACS", 0)
    entries = [where[t.signature.decode()] for t in tables.xsdt_tables]
    addr = _align(addr, 8)
    where["XSDT"] = addr
    addr += Xsdt(entries).size
    if addr <= 0xFFFFFFFF:
        addr = _align(addr, 8)
        where["RSDT"] = addr
    return where


def layout_in_memory(tables: AcpiTables, base: int, rsdt: bool = True) -> tuple[bytes, int, dict[str, int]]:
    """Lay the RSDP (16-aligned, first) and every table out contiguously from guest-physical `base`, pointers and
    checksums final. Returns (blob to copy to `base`, RSDP address, {signature: address} incl. "RSDP")."""
    rsdp_addr = _align(base, 16)
    where = assign_addresses(tables, rsdp_addr + Rsdp.size)
    entries = [where[t.signature.decode()] for t in tables.xsdt_tables]
    rsdt_addr = where.get("RSDT", 0) if rsdt and all(a <= 0xFFFFFFFF for a in entries) else 0
    if not rsdt_addr:
        where.pop("RSDT", None)
    blob = bytearray(rsdp_addr - base)
    blob += tables.rsdp(where["XSDT"], rsdt_addr)
    placed = [(where[t.signature.decode()], t.encode()) for t in tables.tables]
    placed.append((where["XSDT"], Xsdt(entries).encode()))
    if rsdt_addr:
        placed.append((rsdt_addr, Rsdt(entries).encode()))
    for addr, data in placed:
        off = addr - base
        if len(blob) < off:
            blob += bytes(off - len(blob))
        assert len(blob) == off, (hex(addr), len(blob), off)
        blob += data
    where["RSDP"] = rsdp_addr
    return bytes(blob), rsdp_addr, where
