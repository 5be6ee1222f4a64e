"""`PciBus`: the functions on PCI bus 0, where their BARs decode, how their INTx pins reach the interrupt router,
and `PciHostPorts`: configuration mechanism #1 (PCI 3.0, 3.2.2.3.2), the CONFIG_ADDRESS register at 0xCF8 and
the CONFIG_DATA window at 0xCFC-0xCFF.

CONFIG_ADDRESS (dword accesses at 0xCF8 only; bytes and words there are ordinary I/O, which on a PIIX3 means the
reset control register at 0xCF9):
    bit 31 enable, 23:16 bus, 15:11 device, 10:8 function, 7:2 register
CONFIG_DATA: a 1, 2 or 4 byte access at 0xCFC + n reaches register (CONFIG_ADDRESS & 0xFC) + n of the addressed
function. No function there (or enable clear): reads return all ones, writes are dropped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol

from pyhv.state_codec import StateError
from pyhv.devices.device import Claim, device_region
from pyhv.devices.pci.constants import CLASS_NAMES, PCI_HEADER_TYPE, PCI_HEADER_TYPE_MULTI_FUNCTION
from pyhv.devices.pci.device import Bar, PciDevice
from pyhv.memory import MemoryRegion

log = logging.getLogger(__name__)

PCI_CONFIG_ADDRESS_PORT = 0xCF8
PCI_CONFIG_DATA_PORT = 0xCFC
PCI_RESET_CONTROL_PORT = 0xCF9            # PIIX3 RCR
CONFIG_ADDRESS_ENABLE = 1 << 31
CONFIG_ADDRESS_WRITABLE = 0x80FFFFFC
RCR_SYS_RST = 1 << 1
RCR_RST_CPU = 1 << 2
BAR_PRIORITY = -1       # RAM, firmware and board devices win where a guest puts a BAR over them


class PirqSink(Protocol):
    def set_pirq(self, pirq: int, source: object, level: bool) -> None: ...


def pirq_swizzle(slot: int, pin: int) -> int:
    """PIRQ (0-3 for A-D) that INTx pin `pin` (1-4) of a device in `slot` is wired to on an i440FX board: the
    rotation QEMU's PIIX and SeaBIOS's piix_pci_slot_get_irq both use."""
    return (pin - 1 + slot - 1) & 3


class PciBus:
    @property
    def SNAPSHOT(self) -> bool:  # noqa: N802  (the devices' opt-in flag: here, every function's)
        return all(fn.SNAPSHOT for fn in self.devices.values())

    @property
    def snapshot_refusal(self) -> str:
        return "PCI functions without saved state: " + ", ".join(
            f"{fn.name} ({devfn >> 3:02x}.{devfn & 7})" for devfn, fn in sorted(self.devices.items()) if not fn.SNAPSHOT)

    def snapshot_state(self) -> dict:
        return {f"{devfn:#x}": fn.snapshot_state() for devfn, fn in sorted(self.devices.items())}

    def restore_state(self, data: dict) -> None:
        if sorted(data) != sorted(f"{devfn:#x}" for devfn in self.devices):
            raise StateError(f"PCI functions {sorted(data)} saved, {sorted(f'{d:#x}' for d in self.devices)} here")
        for devfn, fn in sorted(self.devices.items()):
            fn.restore_state(data[f"{devfn:#x}"])

    def __init__(self, memory: MemoryRegion, io: MemoryRegion, number: int = 0) -> None:
        self.number = number
        self.memory = memory
        self.io = io
        self.devices: dict[int, PciDevice] = {}       # devfn -> function
        self.pirq_sink: PirqSink | None = None

    def space_for(self, bar: Bar) -> tuple[MemoryRegion, int]:
        return (self.io if bar.io else self.memory), BAR_PRIORITY

    def free_slot(self, first: int = 1) -> int:
        for slot in range(first, 32):
            if all(((slot << 3) | fn) not in self.devices for fn in range(8)):
                return slot
        raise ValueError("PCI bus 0 is full (32 slots)")

    def plug(self, device: PciDevice, slot: int | None = None, function: int = 0) -> PciDevice:
        slot = self.free_slot() if slot is None else slot
        if not (0 <= slot < 32 and 0 <= function < 8):
            raise ValueError(f"PCI address {slot:02x}.{function} out of range")
        devfn = (slot << 3) | function
        if devfn in self.devices:
            raise ValueError(f"PCI address 00:{slot:02x}.{function} already holds {self.devices[devfn].name}")
        device.bus, device.devfn = self, devfn
        self.devices[devfn] = device
        if device.config.get(0x3D, 1):
            pirq = pirq_swizzle(slot, device.config.get(0x3D, 1))
            device.intx_out = lambda level, d=device, p=pirq: self._intx(d, p, level)
        if function:
            head = self.devices.get(slot << 3)
            if head is not None:
                head.config.set(PCI_HEADER_TYPE, 1, head.config.get(PCI_HEADER_TYPE, 1) | PCI_HEADER_TYPE_MULTI_FUNCTION)
        device.plugged()
        return device

    def _intx(self, device: PciDevice, pirq: int, level: bool) -> None:
        if self.pirq_sink is not None:
            self.pirq_sink.set_pirq(pirq, device, level)

    def pirq_of(self, device: PciDevice) -> str | None:
        pin = device.config.get(0x3D, 1)
        return "ABCD"[pirq_swizzle(device.slot, pin)] if 1 <= pin <= 4 else None

    def find(self, bus: int, devfn: int) -> PciDevice | None:
        return self.devices.get(devfn) if bus == self.number else None

    def reset(self) -> None:
        for device in self.devices.values():
            device.reset()

    # --- inspection ---------------------------------------------------------------------------------------------
    def describe(self) -> list[dict]:
        """Every function on the bus as a dict (bus/slot/function, ids, class, BARs with address and size, IRQ):
        the data behind `--dump-pci` and a QMP `query-pci`."""
        return [self.devices[devfn].describe() for devfn in sorted(self.devices)]

    def dump(self) -> str:
        """`lspci -v`-style text."""
        lines = []
        for d in self.describe():
            cls = d["class_code"] >> 8
            lines.append(f"{d['bus']:02x}:{d['slot']:02x}.{d['function']} {CLASS_NAMES.get(cls, f'Class {cls:04x}')} "
                         f"[{cls:04x}]: {d['name']} [{d['vendor_id']:04x}:{d['device_id']:04x}] "
                         f"(rev {d['revision']:02x})")
            lines.append(f"\tSubsystem: [{d['subsystem_vendor_id']:04x}:{d['subsystem_id']:04x}]")
            irq = d["irq"]
            if irq["pin"]:
                lines.append(f"\tInterrupt: pin {irq['pin']} routed to PIRQ{irq['pirq']}, line {irq['line']}")
            for bar in d["bars"]:
                where = "unassigned" if bar["address"] is None else f"at {bar['address']:#x}"
                label = "Expansion ROM" if bar["type"] == "rom" else f"Region {bar['bar']}"
                kind = {"io": "I/O ports", "rom": "ROM"}.get(bar["type"], f"Memory ({bar['type']})")
                lines.append(f"\t{label}: {kind} {where} [size={_size(bar['size'])}]")
            if d["capabilities"]:
                lines.append("\tCapabilities: " + ", ".join(f"[{c['offset']:02x}] {CAP_NAMES.get(c['id'], hex(c['id']))}"
                                                           for c in d["capabilities"]))
        return "\n".join(lines)


CAP_NAMES = {0x01: "Power Management", 0x05: "MSI", 0x09: "Vendor Specific", 0x10: "Express", 0x11: "MSI-X"}


def _size(n: int) -> str:
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


@dataclass
class PciHostState:
    config_address: int = 0
    reset_control: int = 0


class PciHostPorts:
    """Configuration mechanism #1 in front of a `PciBus` (the i440FX's 0xCF8/0xCFC), plus the PIIX3 reset control
    register that shares the dword at 0xCF8."""
    SNAPSHOT = True                  # `state` is all it keeps (the functions are saved with the bus)

    ADDRESS_SIZE = 4
    DATA_SIZE = 4

    def __init__(self, bus: PciBus, on_reset: Callable[[], None] | None = None, name: str = "pci-host") -> None:
        self.name = name
        self.bus = bus
        self.state = PciHostState()
        self.on_reset = on_reset

    def claims(self) -> list[Claim]:
        return [Claim.port(PCI_CONFIG_ADDRESS_PORT, device_region(
                    self, self.ADDRESS_SIZE, "pci-conf-addr", read=self.address_read, write=self.address_write,
                    describe=self.address_describe)),
                Claim.port(PCI_CONFIG_DATA_PORT, device_region(
                    self, self.DATA_SIZE, "pci-conf-data", read=self.data_read, write=self.data_write,
                    describe=self.data_describe))]

    # 0xCF8-0xCFB
    def address_read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self.state.config_address
        if offset == 1 and size == 1:
            return self.state.reset_control
        return (1 << (8 * size)) - 1

    def address_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.state.config_address = value & CONFIG_ADDRESS_WRITABLE
        elif offset == 1 and size == 1:
            old, self.state.reset_control = self.state.reset_control, value & (RCR_SYS_RST | RCR_RST_CPU)
            if value & RCR_RST_CPU and not old & RCR_RST_CPU and self.on_reset is not None:
                self.state.reset_control = 0
                self.on_reset()

    def address_describe(self, offset: int) -> str:
        return "pci.reset_control" if offset == 1 else "pci.config_address"

    # 0xCFC-0xCFF
    def data_read(self, offset: int, size: int) -> int:
        addr = self.state.config_address
        if addr & CONFIG_ADDRESS_ENABLE:
            device = self.bus.find((addr >> 16) & 0xFF, (addr >> 8) & 0xFF)
            if device is not None:
                return device.config_read((addr & 0xFC) + offset, size)
        return (1 << (8 * size)) - 1

    def data_write(self, offset: int, size: int, value: int) -> None:
        addr = self.state.config_address
        if addr & CONFIG_ADDRESS_ENABLE:
            device = self.bus.find((addr >> 16) & 0xFF, (addr >> 8) & 0xFF)
            if device is not None:
                device.config_write((addr & 0xFC) + offset, size, value)

    def data_describe(self, offset: int) -> str:
        return "pci.config_data"

    def reset(self) -> None:
        self.state = PciHostState()
