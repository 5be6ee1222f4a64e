"""System control port A (port 0x92, "fast A20 and init"), as on PS/2-compatible chipsets and QEMU's PC:
bit 1 gates address line 20, bit 0 written as 1 resets the CPU. KVM has no A20 mask, so A20 reads back as set
and stays on whatever the guest writes (firmware only ever enables it). SeaBIOS reads this port on every switch
between 16- and 32-bit code."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pyhv.devices.device import Claim, device_region
from pyhv.devices.registers import Register, RegisterBank

PORT_A20 = 0x92
A20_ENABLE_BIT = 0x02
FAST_RESET_BIT = 0x01


@dataclass
class Port92State:
    value: int = A20_ENABLE_BIT


class Port92:
    SNAPSHOT = True                  # `state` is all it keeps (pyhv/machine/snapshot.py)
    SIZE = 1
    REGISTERS = (Register(0, "control_a", read="_read", write="_write"),)

    def __init__(self, name: str = "port92", on_reset: Callable[[], None] | None = None) -> None:
        self.name = name
        self.on_reset = on_reset
        self.state = Port92State()
        self.bank = RegisterBank(self, self.REGISTERS, self.state)
        self.read, self.write = self.bank.read, self.bank.write

    def _read(self) -> int:
        return self.state.value | A20_ENABLE_BIT

    def _write(self, value: int) -> None:
        self.state.value = (value & ~FAST_RESET_BIT) | A20_ENABLE_BIT
        if value & FAST_RESET_BIT and self.on_reset is not None:
            self.on_reset()

    def claims(self) -> list[Claim]:
        return [Claim.port(PORT_A20, device_region(self, self.SIZE))]

    def reset(self) -> None:
        self.state.value = A20_ENABLE_BIT
