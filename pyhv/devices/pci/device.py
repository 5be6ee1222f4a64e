"""`PciDevice`: one PCI function as the bus sees it: a type-0 configuration space with masks, BARs, an expansion ROM
BAR, a capability list and an INTx pin. What the function *does* lives in subclasses and in the regions its BARs
expose; this class only knows configuration space and address decoding.

Configuration space is 256 bytes with three per-byte masks, so every access of every size at every offset is
handled by one rule (PCI 3.0, 6.1):
    new = (old & ~writable) | (value & writable & ~w1c),  then bits set in both `value` and `w1c` are cleared.
The standard header registers are declared once (`HEADER_REGISTERS`) with their writable and write-1-to-clear
masks; BARs, the ROM BAR and capabilities set their own masks when they are added.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from pyhv.state_codec import StateError, decode, encode
from pyhv.devices.pci.constants import (
    PCI_BASE_ADDRESS_0, PCI_BASE_ADDRESS_MEM_PREFETCH, PCI_BASE_ADDRESS_MEM_TYPE_64, PCI_BASE_ADDRESS_SPACE_IO,
    PCI_CAPABILITY_LIST, PCI_CLASS_PROG, PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_IO, PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY, PCI_COMMAND_PARITY, PCI_COMMAND_SERR, PCI_CONFIG_SPACE_SIZE, PCI_DEVICE_ID,
    PCI_HEADER_TYPE, PCI_INTERRUPT_LINE, PCI_INTERRUPT_PIN, PCI_NUM_BARS, PCI_REVISION_ID, PCI_ROM_ADDRESS,
    PCI_ROM_ADDRESS_ENABLE, PCI_STATUS, PCI_STATUS_CAP_LIST, PCI_STATUS_INTERRUPT, PCI_STATUS_W1C,
    PCI_STD_HEADER_END, PCI_SUBSYSTEM_ID, PCI_SUBSYSTEM_VENDOR_ID, PCI_VENDOR_ID, PCI_CACHE_LINE_SIZE,
    PCI_LATENCY_TIMER,
)
from pyhv.devices.registers import Register
from pyhv.memory import MemoryRegion, memory_transaction

if TYPE_CHECKING:
    from pyhv.devices.pci.bus import PciBus

log = logging.getLogger(__name__)

# The type-0 header: offset, width, which bits the guest may write, which it clears by writing 1. Registers not
# listed (ids, class, header type, capability pointer, subsystem ids, interrupt pin) are read-only.
HEADER_REGISTERS = (
    Register(PCI_COMMAND, "command", width=2,
             writable=PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_PARITY
             | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE),
    Register(PCI_STATUS, "status", width=2, writable=0, w1c=PCI_STATUS_W1C),
    Register(PCI_CACHE_LINE_SIZE, "cache_line_size", width=1, writable=0xFF),
    Register(PCI_LATENCY_TIMER, "latency_timer", width=1, writable=0xFF),
    Register(PCI_INTERRUPT_LINE, "interrupt_line", width=1, writable=0xFF),
)
BAR_UNMAPPED = -1
UINT32_MAX = 0xFFFFFFFF
IO_SPACE_END = 0x10000


class PciConfigSpace:
    """256 bytes of configuration space plus writable and write-1-to-clear masks, byte by byte."""

    def __init__(self, size: int = PCI_CONFIG_SPACE_SIZE) -> None:
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def set(self, offset: int, size: int, value: int) -> None:
        """Set bytes regardless of masks (the device's own view)."""
        self.data[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def set_mask(self, offset: int, size: int, writable: int, w1c: int = 0) -> None:
        self.wmask[offset:offset + size] = (writable & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self.w1cmask[offset:offset + size] = (w1c & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def guest_write(self, offset: int, size: int, value: int) -> None:
        data, wmask, w1c = self.data, self.wmask, self.w1cmask
        for i in range(size):
            o = offset + i
            b = (value >> (8 * i)) & 0xFF
            data[o] = ((data[o] & ~wmask[o]) | (b & wmask[o])) & ~(b & w1c[o]) & 0xFF


@dataclass
class Bar:
    """One base address register and the region it decodes to."""
    index: int                       # 0-5, or 6 for the expansion ROM
    region: MemoryRegion
    io: bool = False
    is64: bool = False
    prefetch: bool = False
    address: int = BAR_UNMAPPED      # where the region is mapped now (BAR_UNMAPPED: not decoded)

    @property
    def size(self) -> int:
        return self.region.size

    @property
    def kind(self) -> str:
        if self.index == 6:
            return "rom"
        return "io" if self.io else ("prefmem" if self.prefetch else "mem") + ("64" if self.is64 else "")


@dataclass
class PciDeviceState:
    """Counters and what the bus assigned; everything else the guest sees is in the config space bytes."""
    intx_level: bool = False
    config_reads: int = 0
    config_writes: int = 0
    bad_config_accesses: int = 0


class PciDevice:
    """A PCI function. Subclasses set the class attributes below and add BARs and capabilities in __init__."""

    VENDOR_ID = 0xFFFF
    DEVICE_ID = 0xFFFF
    REVISION = 0
    CLASS_CODE = 0xFF0000
    SUBSYSTEM_VENDOR_ID = 0
    SUBSYSTEM_ID = 0
    HEADER_TYPE = 0
    INTERRUPT_PIN = 0                # 0: none, 1-4: INTA#-INTD#

    def __init__(self, name: str) -> None:
        self.name = name
        self.config = PciConfigSpace()
        self.state = PciDeviceState()
        self.bars: list[Bar | None] = [None] * (PCI_NUM_BARS + 1)     # [6] is the expansion ROM
        self.bus: PciBus | None = None
        self.devfn = -1
        self.intx_out: Callable[[bool], None] | None = None          # set by the bus: drives this pin's PIRQ
        self.lock = threading.RLock()
        self._cap_end = PCI_STD_HEADER_END
        self._last_cap = -1
        self._bad_logged = False
        c = self.config
        c.set(PCI_VENDOR_ID, 2, self.VENDOR_ID)
        c.set(PCI_DEVICE_ID, 2, self.DEVICE_ID)
        c.set(PCI_REVISION_ID, 1, self.REVISION)
        c.set(PCI_CLASS_PROG, 3, self.CLASS_CODE)
        c.set(PCI_HEADER_TYPE, 1, self.HEADER_TYPE)
        c.set(PCI_SUBSYSTEM_VENDOR_ID, 2, self.SUBSYSTEM_VENDOR_ID)
        c.set(PCI_SUBSYSTEM_ID, 2, self.SUBSYSTEM_ID)
        c.set(PCI_INTERRUPT_PIN, 1, self.INTERRUPT_PIN)
        for reg in HEADER_REGISTERS:
            c.set(reg.offset, reg.width, reg.reset)
            c.set_mask(reg.offset, reg.width, reg.writable if reg.writable is not None else -1, reg.w1c)
        self._reset_config = None   # snapshot taken when the device is plugged (after BARs/caps are added)

    # --- construction -------------------------------------------------------------------------------------------
    def add_bar(self, index: int, region: MemoryRegion, io: bool = False, is64: bool = False,
                prefetch: bool = False) -> Bar:
        if not 0 <= index < PCI_NUM_BARS or (is64 and index == PCI_NUM_BARS - 1):
            raise ValueError(f"{self.name}: BAR {index} out of range")
        size = region.size
        if size & (size - 1) or size < (4 if io else 16):
            raise ValueError(f"{self.name}: BAR {index} size {size:#x} is not a power of two >= {4 if io else 16}")
        bar = Bar(index, region, io=io, is64=is64 and not io, prefetch=prefetch and not io)
        self.bars[index] = bar
        off = PCI_BASE_ADDRESS_0 + 4 * index
        if io:
            flags = PCI_BASE_ADDRESS_SPACE_IO
            self.config.set_mask(off, 4, ~(size - 1) & 0xFFFFFFFC)
        else:
            flags = (PCI_BASE_ADDRESS_MEM_TYPE_64 if bar.is64 else 0) | (PCI_BASE_ADDRESS_MEM_PREFETCH if
                                                                         bar.prefetch else 0)
            self.config.set_mask(off, 4, ~(size - 1) & 0xFFFFFFF0)
            if bar.is64:
                self.config.set_mask(off + 4, 4, (~(size - 1) >> 32) & 0xFFFFFFFF)
        self.config.set(off, 4, flags)
        return bar

    def add_rom_bar(self, region: MemoryRegion) -> Bar:
        size = region.size
        if size & (size - 1) or size < 2048:
            raise ValueError(f"{self.name}: ROM size {size:#x} is not a power of two >= 2 KiB")
        bar = Bar(PCI_NUM_BARS, region)
        self.bars[PCI_NUM_BARS] = bar
        self.config.set_mask(PCI_ROM_ADDRESS, 4, (~(size - 1) & 0xFFFFF800) | PCI_ROM_ADDRESS_ENABLE)
        return bar

    def add_capability(self, cap_id: int, length: int, offset: int | None = None) -> int:
        """Append a capability of `length` bytes to the list; returns its offset. Its body is read-only unless
        the caller sets masks."""
        offset = offset if offset is not None else (self._cap_end + 3) & ~3
        if offset < PCI_STD_HEADER_END or offset + length > PCI_CONFIG_SPACE_SIZE:
            raise ValueError(f"{self.name}: no room for capability {cap_id:#x}")
        c = self.config
        c.set(offset, 1, cap_id)
        c.set(offset + 1, 1, 0)
        if self._last_cap < 0:
            c.set(PCI_CAPABILITY_LIST, 1, offset)
            c.set(PCI_STATUS, 2, c.get(PCI_STATUS, 2) | PCI_STATUS_CAP_LIST)
        else:
            c.set(self._last_cap + 1, 1, offset)
        self._last_cap = offset
        self._cap_end = max(self._cap_end, offset + length)
        return offset

    def capabilities(self) -> list[tuple[int, int]]:
        """(offset, id) of each capability, following the list as a guest would (bounded against loops)."""
        out, ptr, seen = [], self.config.get(PCI_CAPABILITY_LIST, 1) & ~3, set()
        while ptr and ptr not in seen and len(out) < 48:
            seen.add(ptr)
            out.append((ptr, self.config.get(ptr, 1)))
            ptr = self.config.get(ptr + 1, 1) & ~3
        return out

    # --- snapshots and migration (pyhv/machine/snapshot.py) ------------------------------------------------------
    SNAPSHOT = False                  # a subclass opts in once config space + `state` + SNAPSHOT_EXTRA is all it keeps
    SNAPSHOT_EXTRA: tuple[str, ...] = ()   # names of further state dataclasses (e.g. the PIIX3's PIRQ levels)

    def snapshot_state(self) -> dict:
        with self.lock:
            return {"config": bytes(self.config.data).hex(), "state": encode(self.state),
                    "extra": {name: encode(getattr(self, name)) for name in self.SNAPSHOT_EXTRA}}

    def restore_state(self, data: dict) -> None:
        """Config space and state back, then every side effect the registers imply (BAR mappings, INTx, and the
        subclass's own through config_written over the whole space: PAM, PIRQ routing, the PM I/O base...)."""
        raw = bytes.fromhex(data["config"])
        if len(raw) != self.config.size:
            raise StateError(f"{self.name}: configuration space of {len(raw)} bytes, {self.config.size} here")
        with self.lock:
            self.config.data[:] = raw
            decode(data["state"], self.state)
            for name, value in data.get("extra", {}).items():
                if name not in self.SNAPSHOT_EXTRA:
                    raise StateError(f"{self.name}: the saved state has {name!r}, which this device does not keep")
                decode(value, getattr(self, name))
            self.update_mappings()
            self._drive_intx()
            self.config_written(0, self.config.size, 0)

    # --- configuration access (from the host bridge) ----------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        if not self._valid(offset, size):
            return (1 << (8 * size)) - 1
        self.state.config_reads += 1
        return self.config.get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        if not self._valid(offset, size):
            return
        self.state.config_writes += 1
        with self.lock:
            old_command = self.config.get(PCI_COMMAND, 2)
            self.config.guest_write(offset, size, value)
            end = offset + size
            if offset < PCI_COMMAND + 2 and end > PCI_COMMAND:
                self._command_written(old_command)
            if (offset < PCI_BASE_ADDRESS_0 + 24 and end > PCI_BASE_ADDRESS_0) or \
                    (offset < PCI_ROM_ADDRESS + 4 and end > PCI_ROM_ADDRESS):
                self.update_mappings()
            self.config_written(offset, size, value)

    def _valid(self, offset: int, size: int) -> bool:
        if size in (1, 2, 4) and 0 <= offset and offset + size <= self.config.size and offset % size == 0:
            return True
        self.state.bad_config_accesses += 1
        if not self._bad_logged:
            self._bad_logged = True
            log.warning("%s: bad configuration access at %#x size %d ignored (logged once)", self.name, offset, size)
        return False

    def config_written(self, offset: int, size: int, value: int) -> None:
        """Hook for subclasses: a guest write to [offset, offset+size) landed (masks already applied)."""

    def _command_written(self, old: int) -> None:
        new = self.config.get(PCI_COMMAND, 2)
        if (old ^ new) & (PCI_COMMAND_IO | PCI_COMMAND_MEMORY):
            self.update_mappings()
        if (old ^ new) & PCI_COMMAND_INTX_DISABLE:
            self._drive_intx()

    # --- BAR decoding -----------------------------------------------------------------------------------------
    def bar_address(self, bar: Bar) -> int:
        """The address the guest programmed in `bar` if the function decodes it now, else BAR_UNMAPPED."""
        c = self.config
        command = c.get(PCI_COMMAND, 2)
        if bar.index == PCI_NUM_BARS:
            raw = c.get(PCI_ROM_ADDRESS, 4)
            if not (command & PCI_COMMAND_MEMORY) or not (raw & PCI_ROM_ADDRESS_ENABLE):
                return BAR_UNMAPPED
            addr = raw & ~(bar.size - 1) & 0xFFFFF800
            return addr if addr and addr + bar.size - 1 < UINT32_MAX else BAR_UNMAPPED
        off = PCI_BASE_ADDRESS_0 + 4 * bar.index
        if bar.io:
            if not command & PCI_COMMAND_IO:
                return BAR_UNMAPPED
            addr = c.get(off, 4) & ~(bar.size - 1) & 0xFFFFFFFC
            return addr if addr and addr + bar.size <= IO_SPACE_END else BAR_UNMAPPED
        if not command & PCI_COMMAND_MEMORY:
            return BAR_UNMAPPED
        addr = c.get(off, 8 if bar.is64 else 4) & ~(bar.size - 1) & ~0xF
        last = addr + bar.size - 1
        if not addr or (not bar.is64 and last >= UINT32_MAX) or last >= (1 << 64) - 1:
            return BAR_UNMAPPED
        return addr

    def update_mappings(self) -> None:
        """Map, move or unmap each BAR's region to follow what the guest programmed."""
        if self.bus is None:
            return
        with memory_transaction():
            for bar in self.bars:
                if bar is None:
                    continue
                addr = self.bar_address(bar)
                if addr == bar.address:
                    continue
                space, priority = self.bus.space_for(bar)
                if bar.address != BAR_UNMAPPED and addr == BAR_UNMAPPED:
                    space.del_subregion(bar.region)
                elif bar.address == BAR_UNMAPPED:
                    space.add_subregion(addr, bar.region, priority)
                else:
                    bar.region.set_address(addr)
                old, bar.address = bar.address, addr
                self.bar_moved(bar, old)

    def bar_moved(self, bar: Bar, old: int) -> None:
        """Hook: `bar` now decodes at bar.address (BAR_UNMAPPED: not at all); was at `old`."""

    # --- INTx -------------------------------------------------------------------------------------------------
    def set_intx(self, level: bool) -> None:
        """Assert or deassert this function's interrupt pin (the status bit follows even when disabled)."""
        with self.lock:
            level = bool(level)
            self.state.intx_level = level
            status = self.config.get(PCI_STATUS, 2)
            self.config.set(PCI_STATUS, 2, (status | PCI_STATUS_INTERRUPT) if level else
                            (status & ~PCI_STATUS_INTERRUPT))
            self._drive_intx()

    def _drive_intx(self) -> None:
        if self.intx_out is not None:
            disabled = self.config.get(PCI_COMMAND, 2) & PCI_COMMAND_INTX_DISABLE
            self.intx_out(self.state.intx_level and not disabled)

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def plugged(self) -> None:
        """Called by the bus when the device is attached: remembers the power-on configuration space."""
        self._reset_config = bytes(self.config.data)

    def reset(self) -> None:
        """Power-on state: configuration space as plugged, BARs unmapped, INTx deasserted."""
        with self.lock:
            if self._reset_config is not None:
                self.config.data[:] = self._reset_config
            self.state.intx_level = False
            self._drive_intx()
            self.update_mappings()

    # --- inspection ---------------------------------------------------------------------------------------------
    @property
    def slot(self) -> int:
        return self.devfn >> 3

    @property
    def function(self) -> int:
        return self.devfn & 7

    def describe(self) -> dict:
        """A structured description (QMP `query-pci`, `--dump-pci`)."""
        c = self.config
        bars = []
        for bar in self.bars:
            if bar is None:
                continue
            bars.append({"bar": bar.index, "type": bar.kind, "address": None if bar.address == BAR_UNMAPPED
                         else bar.address, "size": bar.size, "region": bar.region.name})
        pin = c.get(PCI_INTERRUPT_PIN, 1)
        return {
            "bus": self.bus.number if self.bus else 0, "slot": self.slot, "function": self.function,
            "name": self.name, "vendor_id": c.get(PCI_VENDOR_ID, 2), "device_id": c.get(PCI_DEVICE_ID, 2),
            "subsystem_vendor_id": c.get(PCI_SUBSYSTEM_VENDOR_ID, 2), "subsystem_id": c.get(PCI_SUBSYSTEM_ID, 2),
            "revision": c.get(PCI_REVISION_ID, 1), "class_code": c.get(PCI_CLASS_PROG, 3),
            "command": c.get(PCI_COMMAND, 2), "bars": bars,
            "irq": {"pin": "ABCD"[pin - 1] if 1 <= pin <= 4 else None, "line": c.get(PCI_INTERRUPT_LINE, 1),
                    "pirq": self.bus.pirq_of(self) if self.bus and pin else None},
            "capabilities": [{"offset": o, "id": i} for o, i in self.capabilities()],
        }
