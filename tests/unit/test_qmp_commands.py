"""QMP commands that report devices read them from the machine (`block_devices()`, `pci_devices()`), so the
device branches plug in by offering those; and the lifecycle events map onto QEMU's ShutdownCause values."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from pyhv.monitor.commands import COMMANDS, QmpCommandError, event_data
from pyhv.monitor.hmp import run_hmp


@dataclass
class FakePciFunction:
    bus: int
    slot: int
    function: int
    vendor_id: int
    device_id: int
    class_code: int
    subsystem_vendor_id: int = 0x1AF4
    subsystem_id: int = 0x1100
    name: str = ""
    desc: str | None = None
    irq: int | None = None
    bars: list = field(default_factory=list)


class FakeMachine:
    state = "running"

    def __init__(self):
        self.listeners = []

    def pci_devices(self):
        return [FakePciFunction(0, 0, 0, 0x8086, 0x1237, 0x060000, desc="Host bridge"),
                FakePciFunction(0, 3, 0, 0x1AF4, 0x1042, 0x010000, name="virtio-blk0", irq=11,
                                bars=[(4, "mem", 0xFEBF0000, 0x4000)])]

    def block_devices(self):
        return [{"name": "virtio0", "file": "/images/disk.img", "readonly": True, "format": "raw",
                 "size": 1 << 30, "cache": "none"}]


@pytest.fixture
def server():
    return SimpleNamespace(machine=FakeMachine())


def call(server, name, **arguments):
    return COMMANDS[name].call(server, arguments)


def test_query_pci_reports_the_machines_functions(server):
    buses = call(server, "query-pci")
    assert [b["bus"] for b in buses] == [0]
    host, blk = buses[0]["devices"]
    assert host["id"]["vendor"] == 0x8086 and host["class_info"] == {"class": 0x0600, "desc": "Host bridge"}
    assert (blk["slot"], blk["irq"], blk["qdev_id"]) == (3, 11, "virtio-blk0")
    assert blk["regions"] == [{"bar": 4, "type": "memory", "address": 0xFEBF0000, "size": 0x4000,
                               "prefetch": False, "mem_type_64": False}]


def test_query_pci_reads_the_pc_boards_bus_description():
    """The pc board's PciBus.describe() format: BARs and IRQ as dicts; unmapped BARs and the ROM left out."""
    described = [{"bus": 0, "slot": 4, "function": 0, "name": "virtio-blk0", "vendor_id": 0x1AF4,
                  "device_id": 0x1042, "subsystem_vendor_id": 0x1AF4, "subsystem_id": 0x1100, "revision": 1,
                  "class_code": 0x010000, "command": 7,
                  "bars": [{"bar": 1, "type": "mem", "address": 0xFEBF1000, "size": 0x1000, "region": "msix"},
                           {"bar": 4, "type": "prefmem64", "address": 0xFE000000, "size": 0x4000, "region": "v"},
                           {"bar": 0, "type": "io", "address": None, "size": 0x40, "region": "legacy"},
                           {"bar": 6, "type": "rom", "address": 0xFEB80000, "size": 0x40000, "region": "rom"}],
                  "irq": {"pin": "A", "line": 11, "pirq": "LNKD"}, "capabilities": []}]
    machine = SimpleNamespace(listeners=[], board=SimpleNamespace(bus=SimpleNamespace(describe=lambda: described)))
    (dev,) = call(SimpleNamespace(machine=machine), "query-pci")[0]["devices"]
    assert (dev["slot"], dev["irq"], dev["qdev_id"], dev["class_info"]["class"]) == (4, 11, "virtio-blk0", 0x0100)
    assert dev["regions"] == [
        {"bar": 1, "type": "memory", "address": 0xFEBF1000, "size": 0x1000, "prefetch": False, "mem_type_64": False},
        {"bar": 4, "type": "memory", "address": 0xFE000000, "size": 0x4000, "prefetch": True, "mem_type_64": True}]


def test_info_pci_formats_the_same_list(server):
    text = run_hmp(server, "info pci")
    assert "Bus  0, device   3, function 0:" in text
    assert "PCI device 1af4:1042" in text and "BAR4: Memory at 0xfebf0000 [0xfebf3fff]." in text


def test_query_block_reports_the_machines_disks(server):
    (disk,) = call(server, "query-block")
    assert disk["device"] == "virtio0"
    assert disk["inserted"]["file"] == "/images/disk.img" and disk["inserted"]["ro"] is True
    assert disk["inserted"]["cache"]["direct"] is True
    assert run_hmp(server, "info block") == "virtio0: /images/disk.img (raw (ro))\r\n"


def test_a_machine_without_providers_reports_empty_lists():
    bare = SimpleNamespace(machine=SimpleNamespace(listeners=[]))
    assert call(bare, "query-pci") == [] and call(bare, "query-block") == []


def test_cont_after_shutdown_is_an_error(server):
    server.machine.state = "shutdown"
    with pytest.raises(QmpCommandError, match="shut down"):
        call(server, "cont")


@pytest.mark.parametrize("reason,status,cause,guest", [
    ("host-qmp-quit", 0, "host-qmp-quit", False),
    ("guest powered off", 0, "guest-shutdown", True),
    ("debug-exit port written with 0x5", 11, "guest-shutdown", True),
    ("guest reset (use --on-reset restart to reboot instead)", 0, "guest-reset", True),
    ("triple fault (KVM_EXIT_SHUTDOWN)", 3, "guest-panic", True),
    ("terminated by SIGTERM", 143, "host-signal", False),
    ("interrupted", 130, "host-signal", False),
])
def test_shutdown_reasons_map_to_qemu_causes(reason, status, cause, guest):
    data = event_data("SHUTDOWN", {"guest": True, "reason": reason, "status": status})
    assert (data["reason"], data["guest"], data["pyhv-reason"]) == (cause, guest, reason)
