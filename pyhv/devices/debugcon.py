"""Debug console, compatible with QEMU's isa-debugcon: bytes written go to a host output; a read returns the
read-back value (0xe9), which is how SeaBIOS decides to print its log there. pyhv puts it at port 0x402."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pyhv.devices.device import Claim, device_region

DEBUGCON_READBACK = 0xE9


@dataclass
class DebugConState:
    bytes_written: int = 0


class DebugCon:
    SNAPSHOT = True                  # `state` is all it keeps (pyhv/machine/snapshot.py)
    SIZE = 1
    PORT = 0x402

    def __init__(self, name: str = "debugcon", output: Callable[[bytes], None] | None = None) -> None:
        self.name = name
        self.output = output or (lambda data: None)
        self.state = DebugConState()

    def read(self, offset: int, size: int) -> int:
        return DEBUGCON_READBACK

    def write(self, offset: int, size: int, value: int) -> None:
        self.state.bytes_written += size
        self.output(value.to_bytes(size, "little"))

    def claims(self) -> list[Claim]:
        return [Claim.port(self.PORT, device_region(self, self.SIZE))]

    def reset(self) -> None:
        pass
