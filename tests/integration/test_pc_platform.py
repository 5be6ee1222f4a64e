"""The pc board under KVM, below the firmware: GSI routing with MSI routes keeps KVM's legacy routing, and the
board's devices answer at their ports with a real vCPU doing the accesses."""
from __future__ import annotations

import os

import pytest

from pyhv.runtime.chardev import ChardevSpec
from pyhv.config import VmConfig
from pyhv.machine.irq_routing import GsiRouter, default_routing
from pyhv.machine.machine import Machine

pytestmark = pytest.mark.kvm


def test_default_routing_matches_kvm():
    entries = default_routing()
    assert len(entries) == 24 + 16                         # IOAPIC pins 0-23, 8259 pins for GSI 0-15
    assert {(e.gsi, e.u.irqchip.irqchip, e.u.irqchip.pin) for e in entries} >= {(0, 2, 0), (0, 0, 0), (9, 1, 1),
                                                                                (19, 2, 19)}


def test_msi_routes_keep_legacy_interrupts_working(guest):
    """Adding MSI routes rewrites KVM's whole GSI table: the timer guest (PIT on GSI 0 through the 8259) must still
    take its interrupts afterwards, and irqfds bind to the new GSIs."""
    config = VmConfig(firmware=guest("timer"), serial=ChardevSpec("none"))
    machine = Machine(config)
    try:
        router = GsiRouter(machine.vm)
        routes = router.msi_routes("test", 3)
        routes[0].set_message(0xFEE00000, 0x4041)
        routes[2].set_message(0xFEE01000, 0x4042)
        assert [r.gsi for r in routes] == [24, 25, 26] and routes[0].bound and not routes[1].bound
        assert router.commits == 2
        machine.start()
        status = machine.wait(timeout=120)
        if status is None:
            machine.shutdown(1, "test timeout")
            machine.wait()
        assert status == (10 << 1) | 1                     # 10 timer interrupts taken (None: they never came)
    finally:
        router.close()
        machine.close()


def test_msi_through_gsi_routing_and_irqfd(guest):
    """An MSI raised by writing a route's eventfd (what MSI-X delivery does) reaches the guest's local APIC with
    the programmed vector, with no vCPU exit: the msi guest exits from its vector-0x41 handler."""
    machine = Machine(VmConfig(firmware=guest("msi"), serial=ChardevSpec("none")))
    router = GsiRouter(machine.vm)
    try:
        (route,) = router.msi_routes("test", 1)
        route.set_message(0xFEE00000, 0x41)              # fixed delivery, vector 0x41, destination APIC 0
        machine.start()
        status = None
        for _ in range(400):                             # the guest drops MSIs until its APIC is enabled
            route.fire()
            status = machine.wait(timeout=0.05)
            if status is not None:
                break
        if status is None:
            machine.shutdown(1, "test timeout")
            machine.wait()
        assert status == (0x41 << 1) | 1
    finally:
        router.close()
        machine.close()


@pytest.mark.skipif(not os.path.exists("/usr/share/seabios/bios.bin"), reason="seabios is not installed")
def test_pc_machine_layout_and_describe():
    machine = Machine(VmConfig(machine="pc", firmware="/usr/share/seabios/bios.bin", serial=ChardevSpec("none")))
    try:
        tree = machine.dump_mtree()
        assert "pam-f0000" in tree and "pci-legacy-hole" in tree and "piix4-pm-pmio" in tree
        devices = machine.board.bus.describe()
        assert [(d["slot"], d["function"], d["vendor_id"], d["device_id"]) for d in devices] == \
            [(0, 0, 0x8086, 0x1237), (1, 0, 0x8086, 0x7000), (1, 3, 0x8086, 0x7113)]
        assert devices[1]["class_code"] >> 8 == 0x0601
        fw = machine.board.fw_cfg
        assert fw.file("bootorder") == b"" and fw.file("etc/e820")[:20] == \
            (0).to_bytes(8, "little") + (128 << 20).to_bytes(8, "little") + (1).to_bytes(4, "little")
    finally:
        machine.close()
