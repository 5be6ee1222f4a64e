"""KVM GSI routing for a machine: KVM's default table (GSI 0-15 to the 8259 pair and the IOAPIC, 16-23 to the
IOAPIC) plus one MSI route per device vector, each with an irqfd, so a device raises an MSI by writing an eventfd
(from any thread, no vCPU exit) and KVM injects the message.

KVM_SET_GSI_ROUTING replaces the whole table, so the default entries are always written again with the MSI ones.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from pyhv.kvm import constants as C
from pyhv.kvm import structs as S

if TYPE_CHECKING:
    from pyhv.kvm import Vm

log = logging.getLogger(__name__)

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
IOAPIC_PINS = 24
FIRST_MSI_GSI = IOAPIC_PINS


def default_routing() -> list[S.kvm_irq_routing_entry]:
    """The table KVM installs with KVM_CREATE_IRQCHIP (virt/kvm/irqchip default_routing)."""
    entries = []
    for gsi in range(IOAPIC_PINS):
        e = S.kvm_irq_routing_entry(gsi=gsi, type=C.KVM_IRQ_ROUTING_IRQCHIP)
        e.u.irqchip.irqchip, e.u.irqchip.pin = KVM_IRQCHIP_IOAPIC, gsi
        entries.append(e)
        if gsi < 16:
            e = S.kvm_irq_routing_entry(gsi=gsi, type=C.KVM_IRQ_ROUTING_IRQCHIP)
            e.u.irqchip.irqchip = KVM_IRQCHIP_PIC_MASTER if gsi < 8 else KVM_IRQCHIP_PIC_SLAVE
            e.u.irqchip.pin = gsi % 8
            entries.append(e)
    return entries


class KvmMsiRoute:
    """One MSI vector: a GSI routed to the last message the device programmed, and an irqfd on it."""

    def __init__(self, router: "GsiRouter", gsi: int, name: str) -> None:
        self.router, self.gsi, self.name = router, gsi, name
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.message: tuple[int, int] | None = None
        self.bound = False
        self.fired = 0

    def set_message(self, address: int, data: int) -> None:
        self.message = (address, data)
        self.router.commit()
        if not self.bound:
            self.router.vm.irqfd(self.fd, self.gsi)
            self.bound = True

    def fire(self) -> None:
        self.fired += 1
        os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        if self.bound:
            try:
                self.router.vm.irqfd(self.fd, self.gsi, deassign=True)
            except OSError:
                pass
            self.bound = False
        os.close(self.fd)


class GsiRouter:
    def __init__(self, vm: "Vm") -> None:
        self.vm = vm
        self.routes: list[KvmMsiRoute] = []
        self.lock = threading.Lock()
        self.commits = 0

    def msi_routes(self, name: str, count: int) -> list[KvmMsiRoute]:
        with self.lock:
            first = FIRST_MSI_GSI + len(self.routes)
            new = [KvmMsiRoute(self, first + i, f"{name}#{i}") for i in range(count)]
            self.routes.extend(new)
            return new

    def commit(self) -> None:
        with self.lock:
            entries = default_routing()
            for r in self.routes:
                if r.message is None:
                    continue
                e = S.kvm_irq_routing_entry(gsi=r.gsi, type=C.KVM_IRQ_ROUTING_MSI)
                e.u.msi.address_lo, e.u.msi.address_hi = r.message[0] & 0xFFFFFFFF, r.message[0] >> 32
                e.u.msi.data = r.message[1]
                entries.append(e)
            self.vm.set_gsi_routing(entries)
            self.commits += 1

    def close(self) -> None:
        for r in self.routes:
            r.close()
        self.routes.clear()
