"""The ACPI Generic Event Device of the `microvm` board: a 4-byte MMIO block that is the hardware-reduced
machine's power button, sleep control and reset register at once. Its layout is the one the DSDT and the FADT
describe (`pyhv.arch.x86.acpi.builder`, which owns the offsets):

    +0 event          pending events, read-to-clear; bit 0 = power button. Setting a bit pulses the GED's GSI
                      (edge); the DSDT's _EVT method reads the byte and notifies \\_SB.PWRB.
    +1 sleep control  FADT SLEEP_CONTROL_REG: SLP_TYP << 2 | SLP_EN; SLP_TYP 5 (\\_S5) with SLP_EN powers off
    +2 sleep status   FADT SLEEP_STATUS_REG: WAK_STS (bit 7), write 1 to clear
    +3 reset          FADT RESET_REG: writing 0x42 resets the machine

Accesses of other widths or offsets are ignored (reads return 0), as hardware-reduced ACPI allows.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from pyhv.arch.x86.acpi.builder import (
    GED_EVENT, GED_EVENT_PWR_DOWN, GED_RESET, GED_RESET_VALUE, GED_SIZE, GED_SLEEP_CONTROL, GED_SLEEP_STATUS,
    GED_SLP_TYP_S5, SLEEP_CONTROL_SLP_EN, SLEEP_CONTROL_SLP_TYP_MASK, SLEEP_CONTROL_SLP_TYP_SHIFT,
    SLEEP_STATUS_WAK_STS,
)
from pyhv.devices.device import Claim
from pyhv.devices.irq import CallbackIrqLine
from pyhv.devices.registers import Register, RegisterBank

log = logging.getLogger(__name__)


@dataclass
class GedState:
    event: int = 0             # events raised and not yet read by _EVT
    sleep_control: int = 0     # the last SLP_TYP written (SLP_EN is write-only)
    sleep_status: int = 0      # WAK_STS
    presses: int = 0           # power-button presses since power-on (statistics)


class AcpiGed:
    SNAPSHOT = True                  # `state` is all it keeps (pyhv/machine/snapshot.py)
    REGISTERS = (
        Register(GED_EVENT, "event", read="_read_event", write="_ignore"),
        Register(GED_SLEEP_CONTROL, "sleep_control", write="_write_sleep_control", read="_read_sleep_control"),
        Register(GED_SLEEP_STATUS, "sleep_status", writable=0, w1c=SLEEP_STATUS_WAK_STS),
        Register(GED_RESET, "reset", read="_read_zero", write="_write_reset"),
    )

    def __init__(self, name: str, base: int, irq: CallbackIrqLine, on_poweroff: Callable[[], None],
                 on_reset: Callable[[], None]) -> None:
        self.name = name
        self.base = base
        self.irq = irq
        self.on_poweroff = on_poweroff
        self.on_reset = on_reset
        self.state = GedState()
        self.lock = threading.RLock()         # the guest (vCPU threads) and QMP (the monitor's thread)
        self.bank = RegisterBank(self, self.REGISTERS, self.state, name)

    def claims(self) -> list[Claim]:
        return [Claim.mmio(self.base, self.bank.region(GED_SIZE, self.name, lock=self.lock))]

    def reset(self) -> None:
        with self.lock:
            self.state.event = self.state.sleep_control = self.state.sleep_status = 0

    def press_power_button(self) -> None:
        """The host's power-button press (QMP system_powerdown): an event bit and an edge on the GED's GSI."""
        with self.lock:
            self.state.event |= GED_EVENT_PWR_DOWN
            self.state.presses += 1
        self.irq.pulse()

    # --- registers (called with the lock held) -----------------------------------------------------------------
    def _read_event(self) -> int:
        event, self.state.event = self.state.event, 0
        return event

    def _read_sleep_control(self) -> int:
        return self.state.sleep_control

    def _write_sleep_control(self, value: int) -> None:
        slp_typ = (value & SLEEP_CONTROL_SLP_TYP_MASK) >> SLEEP_CONTROL_SLP_TYP_SHIFT
        self.state.sleep_control = value & SLEEP_CONTROL_SLP_TYP_MASK
        if not value & SLEEP_CONTROL_SLP_EN:
            return
        if slp_typ == GED_SLP_TYP_S5:
            self.on_poweroff()
        else:
            log.info("%s: sleep type %d requested; only S5 (power off) is supported, ignored", self.name, slp_typ)

    def _write_reset(self, value: int) -> None:
        if value == GED_RESET_VALUE:
            self.on_reset()

    def _read_zero(self) -> int:
        return 0

    def _ignore(self, value: int) -> None:
        pass
