"""Exit device, compatible with QEMU's isa-debug-exit (pyhv: port 0xf4, 4 ports): writing v ends the VM with
exit status (v << 1) | 1, so a test guest can report a result that no normal shutdown produces."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable
from pyhv.devices.device import Claim, device_region


@dataclass
class DebugExitState:
    value: int | None = None      # the last value written


class DebugExit:
    SNAPSHOT = True                  # `state` is all it keeps (pyhv/machine/snapshot.py)
    SIZE = 4
    PORT = 0xF4

    def __init__(self, name: str = "debug-exit", on_exit: Callable[[int, int], None] | None = None) -> None:
        self.name = name
        self.on_exit = on_exit or (lambda status, value: None)
        self.state = DebugExitState()

    def read(self, offset: int, size: int) -> int:
        return 0xFFFFFFFF & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self.state.value = value
        self.on_exit(((value << 1) | 1) & 0xFF, value)


    def claims(self) -> list[Claim]:
        return [Claim.port(self.PORT, device_region(self, self.SIZE))]

    def reset(self) -> None:
        pass
