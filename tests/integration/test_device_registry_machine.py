"""Adding a device is one registration: a device type defined here, in the test, is attached by the machine
from `--device`-style config, decodes its port through the same dispatch a vCPU exit uses, and is reset with
the machine."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from pyhv import registry
from pyhv.runtime.chardev import ChardevSpec
from pyhv.config import VmConfig
from pyhv.devices.device import Claim, device_region
from pyhv.devices.device_type import DeviceType

pytestmark = pytest.mark.kvm


@dataclass
class LatchState:
    value: int = 0
    writes: int = 0


class Latch:
    SIZE = 4

    def __init__(self, name: str, port: int) -> None:
        self.name, self.port, self.state = name, port, LatchState()

    def read(self, offset: int, size: int) -> int:
        return (self.state.value >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self.state.value, self.state.writes = value, self.state.writes + 1

    def claims(self) -> list[Claim]:
        return [Claim.port(self.port, device_region(self, self.SIZE))]

    def reset(self) -> None:
        self.state = LatchState()


@dataclass
class LatchOptions:
    port: int = 0x700


def test_a_device_defined_in_a_test_joins_the_machine(guest):
    from pyhv.machine.machine import Machine

    registry.register(DeviceType("latch", "a test latch", lambda ctx, o: Latch(ctx.name, o.port),
                                 options=LatchOptions))
    machine = None
    try:
        machine = Machine(VmConfig(firmware=guest("hello"), serial=ChardevSpec("none"),
                                   devices=["latch,port=0x720", "latch,port=0x730"]))
        first, second = machine.devices["latch"], machine.devices["latch1"]
        machine.io.write(0x720, 4, 0x11223344)
        machine.io.write(0x730, 2, 0xBEEF)
        assert machine.io.read(0x721, 1) == 0x33 and second.state.value == 0xBEEF
        assert first.state.writes == 1 and machine.port_owner(0x722) == "latch"
        machine.reset()
        assert first.state == LatchState()
    finally:
        registry.unregister("latch")
        if machine is not None:
            machine.close()
