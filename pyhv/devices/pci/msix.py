"""MSI-X (PCI 3.0, 6.8.2): the capability in configuration space, the vector table and the pending bit array
(PBA) that a BAR exposes, per-vector and function masking, and delivery through a `MsiRoute` per vector.

The machine gives each vector a route (on KVM: a GSI whose routing entry holds the message, and an irqfd bound to
it), so raising a vector is one eventfd write from whatever thread completes the work, with no vCPU exit. A
masked vector sets its pending bit instead; unmasking it (vector or function mask) delivers the message then.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from pyhv.devices.pci.constants import (
    MSI_ADDRESS_BASE, MSI_ADDRESS_MASK, PCI_CAP_ID_MSIX, PCI_CAP_MSIX_SIZEOF, PCI_MSIX_ENTRY_CTRL_MASKBIT,
    PCI_MSIX_ENTRY_DATA, PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_VECTOR_CTRL, PCI_MSIX_FLAGS, PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_MASKALL, PCI_MSIX_PBA,
    PCI_MSIX_TABLE,
)
from pyhv.devices.pci.device import PciDevice
from pyhv.memory import MemoryRegion

log = logging.getLogger(__name__)

MSIX_MAX_VECTORS = 2048


class MsiRoute(Protocol):
    """Where one vector's message goes. The machine implements it with KVM (GSI routing + irqfd)."""

    def set_message(self, address: int, data: int) -> None: ...

    def fire(self) -> None: ...


MsiRouteFactory = Callable[[str, int], Sequence[MsiRoute]]    # (owner name, vector count) -> routes


@dataclass
class MsixState:
    table: bytearray
    pba: bytearray
    delivered: list[int] = field(default_factory=list)     # messages sent, per vector
    dropped_bad_address: int = 0


class MsixCapability:
    """MSI-X for `device`: `nvectors` vectors, table at `table_offset` and PBA at `pba_offset` of BAR `bar_index`.

    The caller maps `table_region` and `pba_region` into that BAR (usually a container holding other registers
    too) and forwards configuration writes with `config_written` (PciDevice subclasses do it in their hook)."""

    def __init__(self, device: PciDevice, nvectors: int, bar_index: int, table_offset: int, pba_offset: int,
                 routes: Sequence[MsiRoute]) -> None:
        if not 1 <= nvectors <= MSIX_MAX_VECTORS:
            raise ValueError(f"MSI-X: {nvectors} vectors")
        if table_offset % 8 or pba_offset % 8:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
        self.device = device
        self.nvectors = nvectors
        self.routes = list(routes)
        if len(self.routes) != nvectors:
            raise ValueError("MSI-X: one route per vector")
        self.lock = threading.RLock()
        table = bytearray(nvectors * PCI_MSIX_ENTRY_SIZE)
        for v in range(nvectors):
            table[v * 16 + PCI_MSIX_ENTRY_VECTOR_CTRL] = PCI_MSIX_ENTRY_CTRL_MASKBIT   # masked at reset
        self.state = MsixState(table=table, pba=bytearray((nvectors + 63) // 64 * 8), delivered=[0] * nvectors)
        self._reset_table = bytes(table)
        self._routed: list[tuple[int, int] | None] = [None] * nvectors
        self._bad_logged = False
        self.cap = cap = device.add_capability(PCI_CAP_ID_MSIX, PCI_CAP_MSIX_SIZEOF)
        c = device.config
        c.set(cap + PCI_MSIX_FLAGS, 2, nvectors - 1)
        c.set_mask(cap + PCI_MSIX_FLAGS, 2, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
        c.set(cap + PCI_MSIX_TABLE, 4, table_offset | bar_index)
        c.set(cap + PCI_MSIX_PBA, 4, pba_offset | bar_index)
        self.table_region = MemoryRegion.io(f"{device.name}-msix-table", len(table), self.table_read,
                                            self.table_write, owner=device.name)
        self.table_region.describe = lambda off: f"{device.name}.msix_table[{off // 16}]"
        self.pba_region = MemoryRegion.io(f"{device.name}-msix-pba", len(self.state.pba), self.pba_read,
                                          self.pba_write, owner=device.name)

    # --- capability flags ------------------------------------------------------------------------------------------
    @property
    def flags(self) -> int:
        return self.device.config.get(self.cap + PCI_MSIX_FLAGS, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.flags & PCI_MSIX_FLAGS_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.flags & PCI_MSIX_FLAGS_MASKALL)

    def config_written(self, offset: int, size: int) -> None:
        """Forwarded configuration write: after an enable or function-mask change, pending vectors may fire."""
        if offset < self.cap + PCI_MSIX_FLAGS + 2 and offset + size > self.cap + PCI_MSIX_FLAGS:
            with self.lock:
                self._deliver_pending()

    # --- vectors -------------------------------------------------------------------------------------------------
    def vector_masked(self, vector: int) -> bool:
        return bool(self.state.table[vector * 16 + PCI_MSIX_ENTRY_VECTOR_CTRL] & PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def message(self, vector: int) -> tuple[int, int]:
        t, base = self.state.table, vector * 16
        addr = int.from_bytes(t[base:base + 8], "little")
        data = int.from_bytes(t[base + PCI_MSIX_ENTRY_DATA:base + PCI_MSIX_ENTRY_DATA + 4], "little")
        return addr, data

    def is_pending(self, vector: int) -> bool:
        return bool(self.state.pba[vector // 8] & (1 << (vector % 8)))

    def _set_pending(self, vector: int, pending: bool) -> None:
        if pending:
            self.state.pba[vector // 8] |= 1 << (vector % 8)
        else:
            self.state.pba[vector // 8] &= ~(1 << (vector % 8)) & 0xFF

    def notify(self, vector: int) -> bool:
        """Raise `vector`. False if MSI-X is disabled or the vector does not exist (the caller may fall back to
        INTx); True if it was delivered or left pending under a mask."""
        with self.lock:
            if not self.enabled or not 0 <= vector < self.nvectors:
                return False
            if self.function_masked or self.vector_masked(vector):
                self._set_pending(vector, True)
                return True
            self._deliver(vector)
            return True

    def direct_fd(self, vector: int) -> int | None:
        """An eventfd that raises `vector` with no Python on the way (its route's irqfd), programmed with the
        vector's current message, for completions signalled by another process (vhost-user call fds). None when
        MSI-X is off, the vector is masked or invalid, or the route has no eventfd. Mask and message changes
        made after this are not seen by such a writer."""
        with self.lock:
            if not self.enabled or not 0 <= vector < self.nvectors or self.function_masked \
                    or self.vector_masked(vector):
                return None
            addr, data = self.message(vector)
            route = self.routes[vector]
            fd = getattr(route, "fd", None)
            if fd is None or (addr & MSI_ADDRESS_MASK) != MSI_ADDRESS_BASE or addr >> 32:
                return None
            if self._routed[vector] != (addr, data):
                route.set_message(addr, data)
                self._routed[vector] = (addr, data)
            return fd

    def _deliver(self, vector: int) -> None:
        addr, data = self.message(vector)
        if (addr & MSI_ADDRESS_MASK) != MSI_ADDRESS_BASE or addr >> 32:
            self.state.dropped_bad_address += 1
            if not self._bad_logged:
                self._bad_logged = True
                log.warning("%s: MSI-X vector %d has address %#x outside the APIC window; dropped (logged once)",
                            self.device.name, vector, addr)
            return
        route = self.routes[vector]
        if self._routed[vector] != (addr, data):
            route.set_message(addr, data)
            self._routed[vector] = (addr, data)
        self.state.delivered[vector] += 1
        route.fire()

    def _deliver_pending(self) -> None:
        if not self.enabled or self.function_masked:
            return
        for v in range(self.nvectors):
            if self.is_pending(v) and not self.vector_masked(v):
                self._set_pending(v, False)
                self._deliver(v)

    # --- table and PBA (BAR accesses) ----------------------------------------------------------------------------
    def table_read(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset % size or offset + size > len(self.state.table):
            return self._bad(offset, size, (1 << (8 * size)) - 1)
        return int.from_bytes(self.state.table[offset:offset + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        if size not in (4, 8) or offset % size or offset + size > len(self.state.table):
            self._bad(offset, size, 0)
            return
        with self.lock:
            t = self.state.table
            for i in range(size):
                o = offset + i
                b = (value >> (8 * i)) & 0xFF
                if o % 16 == PCI_MSIX_ENTRY_VECTOR_CTRL:
                    b &= PCI_MSIX_ENTRY_CTRL_MASKBIT         # the rest of vector control is reserved
                elif o % 16 > PCI_MSIX_ENTRY_VECTOR_CTRL:
                    b = 0
                t[o] = b
            vector = offset // 16
            if not self.vector_masked(vector) and self.is_pending(vector):
                self._deliver_pending()

    def pba_read(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset % size or offset + size > len(self.state.pba):
            return self._bad(offset, size, (1 << (8 * size)) - 1)
        return int.from_bytes(self.state.pba[offset:offset + size], "little")

    def pba_write(self, offset: int, size: int, value: int) -> None:
        pass                                              # read-only (PCI 3.0, 6.8.2.10)

    def _bad(self, offset: int, size: int, value: int) -> int:
        if not self._bad_logged:
            self._bad_logged = True
            log.warning("%s: MSI-X access of %d bytes at %#x is not an aligned dword/qword; ignored (logged once)",
                        self.device.name, size, offset)
        return value

    def reset(self) -> None:
        with self.lock:
            self.state.table[:] = self._reset_table
            self.state.pba[:] = bytes(len(self.state.pba))
