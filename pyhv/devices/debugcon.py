"""Debug console, compatible with QEMU's isa-debugcon: bytes written go to a host output; a read returns the
read-back value (0xe9), which is how SeaBIOS decides to print its log there. pyhv puts it at port 0x402."""
from __future__ import annotations

from typing import Callable

DEBUGCON_READBACK = 0xE9


class DebugCon:
    SIZE = 1

    def __init__(self, name: str = "debugcon", output: Callable[[bytes], None] | None = None) -> None:
        self.name = name
        self.output = output or (lambda data: None)
        self.bytes_written = 0

    def read(self, offset: int, size: int) -> int:
        return DEBUGCON_READBACK

    def write(self, offset: int, size: int, value: int) -> None:
        self.bytes_written += size
        self.output(value.to_bytes(size, "little"))

    def reset(self) -> None:
        pass
