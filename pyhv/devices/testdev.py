"""`testdev`: a device for the project's test guests (`--device testdev`), in the spirit of QEMU's pc-testdev.

Ports 0xe0-0xe3: a 32-bit scratch register (reads return what was written). MMIO at 0xfe800000, 4 KiB:
offset 0x0 scratch (32-bit), 0x4 a counter of MMIO writes, 0x8 reads as the magic 'PYHV' (0x56485950). Tests
use it to prove that port and MMIO exits reach the right device with the right offset, size and value.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyhv.devices.device import Claim
from pyhv.devices.registers import Register, RegisterBank

TESTDEV_PORT = 0xE0
TESTDEV_MMIO = 0xFE800000
TESTDEV_MAGIC = 0x56485950


@dataclass
class TestDevState:
    port_scratch: int = 0
    mmio_scratch: int = 0
    mmio_writes: int = 0
    magic: int = TESTDEV_MAGIC


class TestDev:
    PORT_REGISTERS = (Register(0, "port_scratch", width=4),)
    MMIO_REGISTERS = (
        Register(0x0, "mmio_scratch", width=4, write="_write_scratch", read="_read_scratch"),
        Register(0x4, "mmio_writes", width=4, writable=0),
        Register(0x8, "magic", width=4, writable=0, reset=TESTDEV_MAGIC),
    )
    PORT_SIZE = 4
    MMIO_SIZE = 0x1000

    def __init__(self, name: str = "testdev") -> None:
        self.name = name
        self.state = TestDevState()
        self.ports = RegisterBank(self, self.PORT_REGISTERS, self.state, f"{name}.port")
        self.mmio = RegisterBank(self, self.MMIO_REGISTERS, self.state, f"{name}.mmio")

    @classmethod
    def create(cls, context, options: None) -> "TestDev":
        return cls(context.name)

    def _read_scratch(self) -> int:
        return self.state.mmio_scratch

    def _write_scratch(self, value: int) -> None:
        self.state.mmio_scratch = value & 0xFFFFFFFF
        self.state.mmio_writes += 1

    def claims(self) -> list[Claim]:
        return [Claim.port(TESTDEV_PORT, self.ports.region(self.PORT_SIZE, self.name)),
                Claim.mmio(TESTDEV_MMIO, self.mmio.region(self.MMIO_SIZE, self.name))]

    def reset(self) -> None:
        self.state.port_scratch = self.state.mmio_scratch = self.state.mmio_writes = 0
