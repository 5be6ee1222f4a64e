"""What a machine type adds to the common machine (RAM, ISA devices, boot), behind one narrow interface that
`Machine` and the device factories use:

    board.add_device(spec)          a registry device behind this board's transport (virtio-pci, virtio-mmio)
    board.kernel_cmdline(acpi)      options a directly booted kernel needs to find the board's devices
    board.acpi_config()             the board as its ACPI tables describe it (None: it has none to offer)
    board.press_power_button()      the host's power-button press (False: the board has no button)
    board.prepare_direct_boot()     what firmware would have set up, before a directly booted kernel runs
    board.vhost_memory_regions()    guest RAM as vhost-user regions, for vhost-user front ends
    board.ioeventfd(...)            a transport's KVM ioeventfd (`IoEventFdSink`)
    board.bus                       the PCI bus, or None
    board.close()                   host resources (transports, eventfds)

One file per board: `pc.py` (i440FX, PCI, firmware), `microvm.py` (virtio-mmio slots, direct boot only).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pyhv.arch.x86.layout import FOUR_GIB, VGA_END, VGA_START
from pyhv.devices.device_type import DeviceSpec
from pyhv.kvm.system import IoEventFd

if TYPE_CHECKING:
    from pyhv.arch.x86.acpi.builder import AcpiConfig
    from pyhv.machine.machine import Machine


class Board:
    bus = None

    def __init__(self, machine: "Machine") -> None:
        self.machine = machine
        self.transports: list = []            # the virtio transports the board built, closed with it

    def add_device(self, spec: DeviceSpec):
        raise NotImplementedError

    def add_devices(self, transport: str) -> None:
        """Every device of the config that sits behind `transport`."""
        for spec in self.machine.config.device_specs():
            if spec.transport == transport:
                self.add_device(spec)

    def kernel_cmdline(self, acpi: bool) -> list[str]:
        """What a directly booted kernel needs on its command line to find the board's devices (with `acpi`,
        the tables describe them instead)."""
        return []

    def acpi_config(self) -> "AcpiConfig | None":
        return None

    def press_power_button(self) -> bool:
        return False

    def prepare_direct_boot(self) -> None:
        """Set up what firmware would before a directly booted kernel runs (called at power-on and every reset)."""

    def vhost_memory_regions(self) -> list[tuple[int, int, int, int, int]]:
        """Guest RAM as vhost-user regions (gpa, size, user address, offset in the memfd, memfd)."""
        m = self.machine
        ram, fd = m.ram, m.ram.fd
        regions = [(0, min(m.below_4g, VGA_START), ram.host_addr, 0, fd)]
        if m.below_4g > VGA_END:
            regions.append((VGA_END, m.below_4g - VGA_END, ram.host_addr + VGA_END, VGA_END, fd))
        if m.above_4g:
            regions.append((FOUR_GIB, m.above_4g, ram.host_addr + m.below_4g, m.below_4g, fd))
        return regions

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None, deassign: bool) -> None:
        self.machine.vm.ioeventfd(IoEventFd(fd, addr, length, False, datamatch), deassign=deassign)

    def close(self) -> None:
        for transport in self.transports:
            transport.close()
