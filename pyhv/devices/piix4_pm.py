"""The power-management function of an Intel 82371AB (PIIX4), 00:01.3, as QEMU's i440FX board has it: the ACPI
PM I/O block (PM1 status/enable/control, the 24-bit PM timer at 3.579545 MHz) at the base the firmware writes to
PMBASE, and the SMBus base register. SeaBIOS programs PMBASE, enables the block (PMREGMISC) and may use the PM
timer as its clock; a guest powers off by writing SLP_EN with SLP_TYP 0 (S5, as QEMU) to PM1_CNT. The host's
power-button press sets PWRBTN_STS in PM1_STS; while a status bit is set whose enable bit is too, the SCI
(ISA IRQ 9, level, as the FADT and MADT say) is asserted, until the OS writes the status bit back to clear it.

There is no SMM here: DEVACTB reports the APMC SMI enable as already set, which tells SeaBIOS that SMM was
initialised, so it never raises an SMI.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from pyhv.devices.irq import IrqLine
from pyhv.devices.pci.constants import PCI_CLASS_BRIDGE_OTHER, PCI_VENDOR_ID_INTEL
from pyhv.devices.pci.device import PciDevice
from pyhv.devices.registers import Register, RegisterBank
from pyhv.memory import MemoryRegion, memory_transaction

log = logging.getLogger(__name__)

PCI_DEVICE_ID_INTEL_82371AB_3 = 0x7113
PIIX_DEVACTB = 0x58
PIIX_DEVACTB_APMC_EN = 1 << 25
PIIX_PMBASE = 0x40
PIIX_PMREGMISC = 0x80
PIIX_PMREGMISC_PMIOSE = 0x01
PIIX_SMBHSTBASE = 0x90
PIIX_SMBHSTCFG = 0xD2
PM_IO_SIZE = 64
PMTIMER_HZ = 3579545
PM1_CNT_SCI_EN = 1 << 0
PM1_CNT_SLP_TYP_SHIFT = 10
PM1_CNT_SLP_EN = 1 << 13
PM1_STS_TMR = 1 << 0
PM1_STS_PWRBTN = 1 << 8
PM1_STS_WAK = 1 << 15
PM1_STS_W1C = 0x8D31
PM1_EN_WRITABLE = 0x0521            # TMR_EN, GBL_EN, PWRBTN_EN, RTC_EN
SCI_IRQ = 9
SLP_TYP_S5 = 0


@dataclass
class PmState:
    pm1_sts: int = 0
    pm1_en: int = 0
    pm1_cnt: int = 0
    gpe0_sts: int = 0
    gpe0_en: int = 0
    glbctl: int = 0


class Piix4Pm(PciDevice):
    SNAPSHOT = True
    SNAPSHOT_EXTRA = ("pm",)
    VENDOR_ID = PCI_VENDOR_ID_INTEL
    DEVICE_ID = PCI_DEVICE_ID_INTEL_82371AB_3
    REVISION = 0x03
    CLASS_CODE = PCI_CLASS_BRIDGE_OTHER
    INTERRUPT_PIN = 1

    REGISTERS = (
        Register(0x00, "pm1_sts", width=2, read="_read_pm1_sts", write="_write_pm1_sts"),
        Register(0x02, "pm1_en", width=2, read="_read_pm1_en", write="_write_pm1_en"),
        Register(0x04, "pm1_cnt", width=2, write="_write_pm1_cnt", read="_read_pm1_cnt"),
        Register(0x08, "pm_tmr", width=4, read="_read_timer", write="_ignore"),
        Register(0x0C, "gpe0_sts", width=2, writable=0, w1c=0xFFFF),
        Register(0x0E, "gpe0_en", width=2),
        Register(0x28, "glbctl", width=4),
    )

    def __init__(self, name: str, system_io: MemoryRegion, on_poweroff: Callable[[], None] | None = None,
                 clock: Callable[[], int] = time.monotonic_ns, sci: IrqLine | None = None) -> None:
        super().__init__(name)
        self.system_io = system_io
        self.on_poweroff = on_poweroff
        self.sci = sci
        self.clock = clock
        self.pm = PmState()
        self.bank = RegisterBank(self, self.REGISTERS, self.pm, name=f"{name}.pmio")
        # locked: the QMP thread's power-button press and the vCPUs' accesses both change PM1_STS
        self.pm_region = self.bank.region(PM_IO_SIZE, f"{name}-pmio", lock=self.lock, owner=name)
        self.pm_region.enabled = False
        self._pm_base = 0
        system_io.add_subregion(0, self.pm_region, -1)
        c = self.config
        c.set(PIIX_DEVACTB, 4, PIIX_DEVACTB_APMC_EN)
        c.set_mask(PIIX_DEVACTB, 4, 0xFFFFFFFF & ~PIIX_DEVACTB_APMC_EN)
        c.set(PIIX_PMBASE, 4, 0x1)
        c.set_mask(PIIX_PMBASE, 4, 0xFFC0)
        c.set_mask(PIIX_PMREGMISC, 1, PIIX_PMREGMISC_PMIOSE)
        c.set(PIIX_SMBHSTBASE, 4, 0x1)
        c.set_mask(PIIX_SMBHSTBASE, 4, 0xFFF0)
        c.set_mask(PIIX_SMBHSTCFG, 1, 0x0F)

    def restore_state(self, data: dict) -> None:
        super().restore_state(data)
        with self.lock:
            self._update_sci()

    def config_written(self, offset: int, size: int, value: int) -> None:
        if (offset < PIIX_PMBASE + 4 and offset + size > PIIX_PMBASE) or offset <= PIIX_PMREGMISC < offset + size:
            self._map_pm()

    def _map_pm(self) -> None:
        base = self.config.get(PIIX_PMBASE, 4) & 0xFFC0
        enabled = bool(self.config.get(PIIX_PMREGMISC, 1) & PIIX_PMREGMISC_PMIOSE) and base != 0
        with memory_transaction():
            if base != self._pm_base:
                self.pm_region.set_address(base)
                self._pm_base = base
            self.pm_region.set_enabled(enabled)

    @property
    def pm_base(self) -> int | None:
        return self._pm_base if self.pm_region.enabled else None

    def _read_timer(self) -> int:
        return (self.clock() * PMTIMER_HZ // 1_000_000_000) & 0xFFFFFF

    def _ignore(self, value: int) -> None:
        pass

    # --- PM1 events and the SCI ------------------------------------------------------------------------------------
    def press_power_button(self) -> None:
        """The host's power-button press (QMP system_powerdown): PWRBTN_STS, and the SCI if the OS enabled it."""
        with self.lock:
            self.pm.pm1_sts |= PM1_STS_PWRBTN
            self._update_sci()

    def _read_pm1_sts(self) -> int:
        return self.pm.pm1_sts

    def _write_pm1_sts(self, value: int) -> None:
        self.pm.pm1_sts &= ~(value & PM1_STS_W1C) & 0xFFFF
        self._update_sci()

    def _read_pm1_en(self) -> int:
        return self.pm.pm1_en

    def _write_pm1_en(self, value: int) -> None:
        self.pm.pm1_en = value & PM1_EN_WRITABLE
        self._update_sci()

    def _update_sci(self) -> None:
        if self.sci is not None:
            self.sci.set_level(bool(self.pm.pm1_sts & self.pm.pm1_en & PM1_EN_WRITABLE))

    def _read_pm1_cnt(self) -> int:
        return self.pm.pm1_cnt

    def _write_pm1_cnt(self, value: int) -> None:
        self.pm.pm1_cnt = value & ~PM1_CNT_SLP_EN & 0xFFFF
        if value & PM1_CNT_SLP_EN:
            slp_typ = (value >> PM1_CNT_SLP_TYP_SHIFT) & 7
            if slp_typ == SLP_TYP_S5 and self.on_poweroff is not None:
                self.on_poweroff()
            else:
                log.info("%s: sleep type %d requested; ignored", self.name, slp_typ)

    def reset(self) -> None:
        super().reset()
        self.bank.reset()
        self.pm.pm1_sts = self.pm.pm1_en = 0
        self._update_sci()
        self._map_pm()

    def enable_pm_io(self, base: int) -> None:
        """What firmware does before a directly booted kernel runs: PMBASE = `base`, the PM I/O block on."""
        self.config_write(PIIX_PMBASE, 4, base | 1)
        self.config_write(PIIX_PMREGMISC, 1, PIIX_PMREGMISC_PMIOSE)
