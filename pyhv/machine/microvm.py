"""The `microvm` board (Firecracker's shape): no PCI, no firmware; each virtio device sits behind the virtio-mmio
transport in a 4 KiB slot of its own, announced to the directly booted kernel by ACPI (QEMU microvm's shape) or,
with `--acpi off`, on its command line.

    slot n   VIRTIO_MMIO_BASE + n * 4 KiB (0xd0000000, 0xd0001000, ...), interrupt MICROVM_GSIS[n]
    notify   QueueNotify is a KVM ioeventfd per queue (datamatch = queue index): no exit to Python
    irq      a KVM irqfd on the slot's GSI, one edge per interrupt: the MP table declares ISA IRQs edge-triggered,
             and the transport makes a new edge when an ACK leaves bits set, so nothing is lost
    ACPI     hardware-reduced tables: MADT (the CPUs and the I/O APIC), DSDT with each slot as LNRO0005 (its window
             and edge interrupt), COM1, the i8042, the RTC and a Generic Event Device at MICROVM_GED_ADDR (GSI 9):
             the power button, the sleep (power-off) and reset registers the FADT points at
    cmdline  --acpi off: virtio_mmio.device=4K@0xd0000000:5 per device (Linux's VIRTIO_MMIO_CMDLINE_DEVICES), and
             the MP table for the CPUs
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from pyhv.arch.x86.layout import MICROVM_GED_ADDR, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SLOT_SIZE
from pyhv.devices.device_type import MMIO, DeviceContext, DeviceSpec
from pyhv.errors import ConfigError
from pyhv.machine.board import Board

if TYPE_CHECKING:
    from pyhv.arch.x86.acpi.builder import AcpiConfig
    from pyhv.devices.acpi_ged import AcpiGed
    from pyhv.machine.machine import Machine
    from pyhv.virtio.mmio import VirtioMmioDevice

log = logging.getLogger(__name__)

# ISA IRQs no pyhv device uses (1 keyboard, 4 serial0, 8 RTC, 12 mouse; 2 cascade, 3 serial1, 9 SCI)
MICROVM_GSIS = (5, 6, 7, 10, 11, 13, 14, 15)
MICROVM_GED_GSI = 9                     # the SCI's usual IRQ: hardware-reduced ACPI has no SCI of its own


class MicrovmBoard(Board):
    def __init__(self, machine: "Machine") -> None:
        super().__init__(machine)
        self.gsis: list[int] = []                        # slot n's GSI, for transports[n]
        self._irqfds: list[tuple[int, int]] = []        # (eventfd, gsi) registered with KVM_IRQFD
        self.ged: AcpiGed | None = None
        if machine.config.acpi and machine.config.kernel:     # (firmware on microvm gets no tables)
            from pyhv.devices.acpi_ged import AcpiGed
            self.ged = AcpiGed("ged", MICROVM_GED_ADDR, machine.irq_line(MICROVM_GED_GSI),
                               on_poweroff=lambda: machine.shutdown(0, "guest powered off (ACPI S5)"),
                               on_reset=machine._guest_reset)
            machine.attach(self.ged)
        self.add_devices(MMIO)

    def add_device(self, spec: DeviceSpec) -> VirtioMmioDevice:
        """A registry device behind virtio-mmio in the next free slot, named NAME<position> (virtio-blk0)."""
        from pyhv.virtio.mmio import VirtioMmioDevice      # here: a VM without virtio devices does not load it
        slot = len(self.transports)
        if slot >= len(MICROVM_GSIS):
            raise ConfigError(f"{spec.text}: microvm has {len(MICROVM_GSIS)} virtio-mmio slots, all taken",
                              "use fewer virtio devices, or --machine pc")
        m = self.machine
        name = spec.device_name
        backend = spec.type.create(DeviceContext(name, spec.position, m, self), spec.options)
        gsi = MICROVM_GSIS[slot]
        irqfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        m.vm.irqfd(irqfd, gsi)
        self._irqfds.append((irqfd, gsi))
        dev = VirtioMmioDevice(name, backend, m.guest_memory, m.iothread,
                               base=VIRTIO_MMIO_BASE + slot * VIRTIO_MMIO_SLOT_SIZE, irq=m.irq_line(gsi), irqfd=irqfd)
        self.transports.append(dev)
        self.gsis.append(gsi)
        m.attach(dev)
        if m.config.ioeventfd:
            dev.register_ioeventfds(self.ioeventfd)
        return dev

    def kernel_cmdline(self, acpi: bool) -> list[str]:
        if acpi:
            return []
        return [dev.cmdline_entry(dev.base, gsi) for dev, gsi in zip(self.transports, self.gsis)]

    def acpi_config(self) -> AcpiConfig | None:
        if self.ged is None:
            return None
        from pyhv.arch.x86.acpi.builder import AcpiConfig
        return AcpiConfig(machine="microvm", vcpus=self.machine.config.cpus,
                          virtio_mmio=[(dev.base, VIRTIO_MMIO_SLOT_SIZE, gsi)
                                       for dev, gsi in zip(self.transports, self.gsis)],
                          virtio_mmio_edge=True, serial_ports=[(0x3F8, 4)],
                          ged=(MICROVM_GED_ADDR, MICROVM_GED_GSI))

    def press_power_button(self) -> bool:
        if self.ged is None:
            return False
        self.ged.press_power_button()
        return True

    def close(self) -> None:
        super().close()
        for fd, gsi in self._irqfds:
            try:
                self.machine.vm.irqfd(fd, gsi, deassign=True)
            except OSError as e:
                log.warning("cannot remove the irqfd of GSI %d: %s", gsi, e)
            os.close(fd)
        self._irqfds = []
