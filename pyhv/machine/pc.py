"""The `pc` board: what `--machine pc` adds to the common machine (RAM, ISA devices, firmware ROM) so that
unmodified firmware takes it for an i440FX PC (QEMU's `-M pc`):

    00:00.0  i440FX host bridge (PAM shadow RAM for 0xC0000-0xFFFFF), config mechanism #1 at 0xCF8/0xCFC
    00:01.0  PIIX3 ISA bridge (PIRQ A-D routing to ISA IRQs; ELCR in KVM's 8259s)
    00:01.3  PIIX4 ACPI PM (PM timer, PM1 control: power off)
    00:02.0+ virtio devices (one slot each), INTx through PIRQ (slot - 1 + pin - 1) % 4, or MSI-X
    VT-d     with --iommu intel: a DMA remapping unit at INTEL_IOMMU_ADDR (DMAR table, INCLUDE_PCI_ALL); every
             DMA-capable function gets a `TranslatedDma` for its source-id and virtio offers ACCESS_PLATFORM
    fw_cfg   ports 0x510/0x511 and DMA 0x514: signature, RAM size, e820, CPUs, boot order, files, and pyhv's
             ACPI tables as QEMU gives them (etc/acpi/rsdp, etc/acpi/tables, etc/table-loader), which the
             firmware installs itself: FADT with the PIIX4 PM block at FIRMWARE_PM_BASE, MADT, DSDT with
             \\_SB.PCI0 (_CRS windows, _PRT as PIIX3 routes), COM1, the i8042 and the RTC

SeaBIOS assigns BARs in the PCI hole (from 0xC0000000 here, up to the IOAPIC) and I/O BARs from 0xC000.
"""
from __future__ import annotations

import logging
import uuid as uuid_mod
from typing import TYPE_CHECKING

from pyhv.arch.x86.smbios import smbios_tables
from pyhv.devices.device_type import PCI, DeviceContext, DeviceSpec
from pyhv.devices.fw_cfg import (
    E820_RAM, E820_RESERVED, FW_CFG_BOOT_MENU, FW_CFG_MAX_CPUS, FW_CFG_NB_CPUS, FW_CFG_NOGRAPHIC, FW_CFG_RAM_SIZE,
    FW_CFG_UUID, FwCfg, e820_table, pci_boot_path,
)
from pyhv.devices.i440fx import I440FX_PAM0, I440fx
from pyhv.devices.pci.bus import PciBus, PciHostPorts
from pyhv.devices.pci.device import PciDevice
from pyhv.devices.piix3 import PIIX_PIRQRC, Piix3
from pyhv.devices.piix4_pm import SCI_IRQ, Piix4Pm
from pyhv.devices.port92 import Port92
from pyhv.machine.board import Board
from pyhv.machine.irq_routing import GsiRouter
from pyhv.virtio.device import VIRTIO_ID_BLOCK
from pyhv.arch.x86.layout import FOUR_GIB, INTEL_IOMMU_ADDR, KVM_RESERVED_SIZE, KVM_RESERVED_START

if TYPE_CHECKING:
    from pyhv.arch.x86.acpi.builder import AcpiConfig
    from pyhv.machine.machine import Machine

log = logging.getLogger(__name__)

PIIX3_SLOT = 1
PIIX4_PM_FUNCTION = 3
FIRST_DEVICE_SLOT = 2
KVM_PIC_STATE_ELCR = 14                 # offset of elcr in struct kvm_pic_state
LINK_GSIS = (10, 10, 11, 11)            # ISA IRQs of PIRQA-D: what SeaBIOS programs, and pyhv before a direct boot
FIRMWARE_PM_BASE = 0x600                # PIIX4 PMBASE when the ACPI tables come from fw_cfg: SeaBIOS "moves pm_base
                                        # to 0x600" then (with tables of its own it uses 0xb000), as QEMU expects


class PcBoard(Board):
    def __init__(self, machine: "Machine") -> None:
        super().__init__(machine)
        self.gsi_router = GsiRouter(machine.vm)
        self.bus = PciBus(machine.system_memory, machine.system_io)
        self.host = machine.attach(PciHostPorts(self.bus, on_reset=machine._guest_reset))
        self.i440fx = I440fx("i440fx", machine.system_memory, machine.ram_region, pci_read=self._isa_bios_read)
        self.bus.plug(self.i440fx, 0, 0)
        self.piix3 = Piix3("piix3", machine.irq_line, read_elcr=self._read_elcr)
        self.bus.plug(self.piix3, PIIX3_SLOT, 0)
        self.bus.pirq_sink = self.piix3
        self.pm = Piix4Pm("piix4-pm", machine.system_io,
                          on_poweroff=lambda: machine.shutdown(0, "guest powered off (ACPI S5)"),
                          sci=machine.irq_line(SCI_IRQ))
        self.bus.plug(self.pm, PIIX3_SLOT, PIIX4_PM_FUNCTION)

        self.iommu = None
        if machine.config.iommu == "intel":
            from pyhv.devices.iommu.intel_vtd import IntelIommu
            self.iommu = machine.attach(IntelIommu("iommu", INTEL_IOMMU_ADDR, machine.guest_memory,
                                                   send_msi=machine.vm.signal_msi))
        self.fw_cfg = machine.attach(FwCfg("fw_cfg", machine.guest_memory))   # not behind the IOMMU (as QEMU)
        self.port92 = machine.attach(Port92("port92", on_reset=machine._guest_reset))
        self.boot_devices: list[tuple[int, PciDevice]] = []     # (boot index, device) for `bootorder`
        machine.devices["pci"] = self.bus
        self._fill_fw_cfg()
        self.add_devices(PCI)

    def add_device(self, spec: DeviceSpec) -> PciDevice:
        """A registry device, named as `spec.device_name` says: a virtio back end behind virtio-pci (in the
        firmware's boot order when it is a disk), or a PCI function of its own (e1000)."""
        name = spec.device_name
        backend = spec.type.create(DeviceContext(name, spec.position, self.machine, self), spec.options)
        if isinstance(backend, PciDevice):          # a PCI function of its own (e1000): on the bus as it is
            self.transports.append(backend)
            self.machine.devices[name] = backend
            return self.plug(backend)
        boot_index = spec.boot_index(spec.position) if backend.device_id == VIRTIO_ID_BLOCK else None
        return self.add_virtio(name, backend, boot_index)

    def add_virtio(self, name: str, backend, boot_index: int | None) -> PciDevice:
        """Plug a virtio back end behind a virtio-pci function."""
        from pyhv.virtio.pci import VirtioPciDevice

        m = self.machine
        dev = VirtioPciDevice(name, backend, m.guest_memory, m.iothread,
                              msi_routes=self.msi_routes if m.config.msix else None,
                              use_ioeventfd=m.config.ioeventfd, ioeventfd=self.ioeventfd)
        self.transports.append(dev)
        m.devices[name] = dev
        return self.plug(dev, boot_index=boot_index)

    # --- PCI devices ----------------------------------------------------------------------------------------------
    def plug(self, device: PciDevice, slot: int | None = None, boot_index: int | None = None) -> PciDevice:
        self.bus.plug(device, self.bus.free_slot(FIRST_DEVICE_SLOT) if slot is None else slot)
        if self.iommu is not None and hasattr(device, "attach_dma"):      # a function that does DMA
            device.attach_dma(self.iommu.dma_space(device.name, self.bus.number << 8 | device.devfn))
        if boot_index is not None:
            self.boot_devices.append((boot_index, device))
            self._write_bootorder()
        return device

    def _write_bootorder(self) -> None:
        paths = [pci_boot_path(d.slot, d.function) for _, d in sorted(self.boot_devices, key=lambda t: t[0])]
        self.fw_cfg.add_file("bootorder", ("\n".join(paths) + "\n").encode() if paths else b"")

    # --- fw_cfg -------------------------------------------------------------------------------------------------
    def _fill_fw_cfg(self) -> None:
        m, cfg = self.machine, self.machine.config
        fw = self.fw_cfg
        fw.add_u64(FW_CFG_RAM_SIZE, cfg.memory)
        fw.add_u16(FW_CFG_NB_CPUS, cfg.cpus)
        fw.add_u16(FW_CFG_MAX_CPUS, cfg.cpus)
        fw.add_u16(FW_CFG_NOGRAPHIC, 0 if cfg.serial.kind == "none" else 1)
        fw.add_u16(FW_CFG_BOOT_MENU, 0)
        fw.add_item(FW_CFG_UUID, uuid_mod.UUID(cfg.uuid).bytes if cfg.uuid else bytes(16))
        entries = [(0, m.below_4g, E820_RAM)]
        if m.above_4g:
            entries.append((FOUR_GIB, m.above_4g, E820_RAM))
        entries.append((KVM_RESERVED_START, KVM_RESERVED_SIZE, E820_RESERVED))
        fw.add_file("etc/e820", e820_table(entries))
        leaf1 = next(((e.eax, e.edx) for e in m.kvm.supported_cpuid() if e.function == 1), (0, 0))
        ram = [(a, n) for a, n, t in entries if t == E820_RAM]
        anchor, tables = smbios_tables(ram, cfg.cpus, cfg.uuid, leaf1)
        fw.add_file("etc/smbios/smbios-anchor", anchor)
        fw.add_file("etc/smbios/smbios-tables", tables)
        self._write_bootorder()
        if cfg.acpi and cfg.firmware:
            self._add_acpi_files()

    # --- ACPI ----------------------------------------------------------------------------------------------------
    def _acpi(self) -> "AcpiConfig":
        from pyhv.arch.x86.acpi.builder import AcpiConfig, PciHostConfig
        from pyhv.arch.x86.acpi.tables import Dmar
        from pyhv.devices.iommu.intel_vtd import HOST_ADDRESS_WIDTH
        extra = [Dmar(HOST_ADDRESS_WIDTH, [INTEL_IOMMU_ADDR])] if self.iommu is not None else []
        return AcpiConfig(machine="pc", vcpus=self.machine.config.cpus,
                          pci=PciHostConfig(link_gsis=LINK_GSIS), pm_base=FIRMWARE_PM_BASE, sci_int=SCI_IRQ,
                          serial_ports=[(0x3F8, 4)], extra_tables=extra)

    def acpi_config(self) -> "AcpiConfig | None":
        """The tables for a directly booted kernel (in RAM); `prepare_direct_boot` sets the board up as they say."""
        return self._acpi() if self.machine.config.acpi else None

    def prepare_direct_boot(self) -> None:
        """What the firmware would have done before the kernel runs (again after every reset): the PIIX4 PM block
        at FIRMWARE_PM_BASE, PIRQA-D routed to LINK_GSIS (what the DSDT's _PRT says), and RAM (PAM read/write)
        at 0xE0000-0xFFFFF, where the ACPI tables are."""
        if not self.machine.config.acpi:
            return
        self.pm.enable_pm_io(FIRMWARE_PM_BASE)
        for register in (I440FX_PAM0, I440FX_PAM0 + 5, I440FX_PAM0 + 6):   # 0xE0000-0xFFFFF: RAM, for the tables
            self.i440fx.config_write(register, 1, 0x33 if register != I440FX_PAM0 else 0x30)
        for pirq, irq in enumerate(LINK_GSIS):
            self.piix3.config_write(PIIX_PIRQRC + pirq, 1, irq)

    def press_power_button(self) -> bool:
        self.pm.press_power_button()
        return True

    def _add_acpi_files(self) -> None:
        """pyhv's ACPI tables for the firmware to install (QEMU's linker/loader files); without them SeaBIOS
        writes tables of its own."""
        from pyhv.arch.x86.acpi.builder import build_tables
        from pyhv.arch.x86.acpi.table_loader import fw_cfg_files

        files = fw_cfg_files(build_tables(self._acpi()))
        for name, data in files.items():
            self.fw_cfg.add_file(name, data)
        log.info("ACPI: %s for the firmware (%d bytes)", ", ".join(files), sum(map(len, files.values())))

    # --- helpers ------------------------------------------------------------------------------------------------
    def _isa_bios_read(self, addr: int, size: int) -> int:
        """What the PCI side answers at a legacy address PAM does not send to RAM: the BIOS ROM's last 128 KiB at
        0xE0000-0xFFFFF, nothing below."""
        rom = self.machine.boot_rom
        if rom is None or addr < 0xE0000:
            return (1 << (8 * size)) - 1
        isa_size = min(rom.size, 0x20000)
        off = rom.size - (0x100000 - addr)
        if off < rom.size - isa_size:
            return (1 << (8 * size)) - 1
        return int.from_bytes(rom.block.view[off:off + size], "little")

    def _read_elcr(self) -> tuple[int, int]:
        master, slave = self.machine.vm.get_irqchip(0), self.machine.vm.get_irqchip(1)
        return master.chip[KVM_PIC_STATE_ELCR], slave.chip[KVM_PIC_STATE_ELCR]

    def msi_routes(self, name: str, count: int):
        return self.gsi_router.msi_routes(name, count)

    def close(self) -> None:
        super().close()
        self.gsi_router.close()
