"""The `microvm` board (Firecracker's shape): no PCI, no firmware; each virtio device sits behind the virtio-mmio
transport in a 4 KiB slot of its own, announced to the directly booted kernel on its command line.

    slot n   VIRTIO_MMIO_BASE + n * 4 KiB (0xd0000000, 0xd0001000, ...), interrupt MICROVM_GSIS[n]
    notify   QueueNotify is a KVM ioeventfd per queue (datamatch = queue index): no exit to Python
    irq      a KVM irqfd on the slot's GSI, one edge per interrupt: the MP table declares ISA IRQs edge-triggered,
             and the transport makes a new edge when an ACK leaves bits set, so nothing is lost
    cmdline  virtio_mmio.device=4K@0xd0000000:5 per device (Linux's VIRTIO_MMIO_CMDLINE_DEVICES)
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from pyhv.arch.x86.layout import VIRTIO_MMIO_BASE, VIRTIO_MMIO_SLOT_SIZE
from pyhv.devices.device_type import MMIO, DeviceContext, DeviceSpec
from pyhv.errors import ConfigError
from pyhv.machine.board import Board
from pyhv.virtio.mmio import VirtioMmioDevice, cmdline_entry

if TYPE_CHECKING:
    from pyhv.machine.machine import Machine

log = logging.getLogger(__name__)

# ISA IRQs no pyhv device uses (1 keyboard, 4 serial0, 8 RTC, 12 mouse; 2 cascade, 3 serial1, 9 SCI)
MICROVM_GSIS = (5, 6, 7, 10, 11, 13, 14, 15)


class MicrovmBoard(Board):
    def __init__(self, machine: "Machine") -> None:
        super().__init__(machine)
        self.gsis: list[int] = []                        # slot n's GSI, for transports[n]
        self._irqfds: list[tuple[int, int]] = []        # (eventfd, gsi) registered with KVM_IRQFD
        self.add_devices(MMIO)

    def add_device(self, spec: DeviceSpec) -> VirtioMmioDevice:
        """A registry device behind virtio-mmio in the next free slot, named NAME<position> (virtio-blk0)."""
        slot = len(self.transports)
        if slot >= len(MICROVM_GSIS):
            raise ConfigError(f"{spec.text}: microvm has {len(MICROVM_GSIS)} virtio-mmio slots, all taken",
                              "use fewer virtio devices, or --machine pc")
        m = self.machine
        name = f"{spec.type.name}{spec.position}"
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

    def kernel_cmdline(self) -> list[str]:
        return [cmdline_entry(dev.base, gsi) for dev, gsi in zip(self.transports, self.gsis)]

    def close(self) -> None:
        super().close()
        for fd, gsi in self._irqfds:
            try:
                self.machine.vm.irqfd(fd, gsi, deassign=True)
            except OSError as e:
                log.warning("cannot remove the irqfd of GSI %d: %s", gsi, e)
            os.close(fd)
        self._irqfds = []
