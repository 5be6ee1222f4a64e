"""Shared pieces for the PCI unit tests: a bus on plain memory/I/O containers (no KVM), a config-mechanism #1
driver, fake MSI routes and interrupt lines."""
from __future__ import annotations

from pyhv.devices.pci.bus import PciBus, PciHostPorts
from pyhv.memory import AddressSpace, MemoryRegion


class FakeRoute:
    def __init__(self) -> None:
        self.messages: list[tuple[int, int]] = []
        self.fired = 0
        self.message: tuple[int, int] | None = None

    def set_message(self, address: int, data: int) -> None:
        self.message = (address, data)
        self.messages.append((address, data))

    def fire(self) -> None:
        self.fired += 1


def fake_routes(name: str, n: int) -> list[FakeRoute]:
    return [FakeRoute() for _ in range(n)]


class FakeLine:
    def __init__(self) -> None:
        self.level = False
        self.changes: list[bool] = []

    def set_level(self, level: bool) -> None:
        self.level = bool(level)
        self.changes.append(self.level)


class Board:
    """System memory + I/O containers with their address spaces, a PCI bus and the 0xCF8/0xCFC ports."""

    def __init__(self) -> None:
        self.system = MemoryRegion.container("system", 1 << 64)
        self.io = MemoryRegion.container("io", 0x10000)
        self.memory = AddressSpace("memory", self.system)
        self.ports = AddressSpace("I/O", self.io, is_port_space=True)
        self.bus = PciBus(self.system, self.io)
        self.host = PciHostPorts(self.bus)
        self.io.add_subregion(0xCF8, MemoryRegion.io("conf-addr", 4, self.host.address_read,
                                                     self.host.address_write))
        self.io.add_subregion(0xCFC, MemoryRegion.io("conf-data", 4, self.host.data_read, self.host.data_write))

    def cfg_read(self, devfn: int, offset: int, size: int) -> int:
        self.ports.write(0xCF8, 4, 0x80000000 | (devfn << 8) | (offset & 0xFC))
        return self.ports.read(0xCFC + (offset & 3), size)

    def cfg_write(self, devfn: int, offset: int, size: int, value: int) -> None:
        self.ports.write(0xCF8, 4, 0x80000000 | (devfn << 8) | (offset & 0xFC))
        self.ports.write(0xCFC + (offset & 3), size, value)
