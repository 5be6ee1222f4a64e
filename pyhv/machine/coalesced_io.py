"""KVM coalesced I/O: guest writes to a registered port (or MMIO) range are queued by KVM in a ring shared with
pyhv instead of exiting, and pyhv replays them in order through the address space before it handles the next
exit (and from the I/O thread now and then, so output of a guest that stops exiting still appears).

For write-only output devices whose writes have no side effect the guest waits for: the debug console (SeaBIOS
writes its whole log there, one byte per OUT: ~2,900 of the ~3,900 exits of a SeaBIOS boot). Reads of such a
port still exit normally.

Ring (struct kvm_coalesced_mmio_ring, one page at KVM_CAP_COALESCED_MMIO pages into every vCPU's mmap, shared by
the VM): u32 first (pyhv's), u32 last (KVM's), then entries {u64 phys_addr; u32 len; u32 pio; u8 data[8]}.
"""
from __future__ import annotations

import logging
import struct
import threading
from typing import TYPE_CHECKING

from pyhv.kvm.constants import KVM_CAP_COALESCED_MMIO, KVM_CAP_COALESCED_PIO, KVM_REGISTER_COALESCED_MMIO
from pyhv.kvm.structs import kvm_coalesced_mmio_zone
from pyhv.kvm.system import ioctl

if TYPE_CHECKING:
    from pyhv.kvm import Kvm, Vm
    from pyhv.memory import AddressSpace

log = logging.getLogger(__name__)

PAGE = 4096
_HEAD = struct.Struct("=II")
_ENTRY = struct.Struct("=QII8s")
ENTRY_OFFSET = _HEAD.size
MAX_ENTRIES = (PAGE - ENTRY_OFFSET) // _ENTRY.size
DRAIN_INTERVAL = 0.05


class CoalescedIo:
    def __init__(self, vm: "Vm", ring_map, page_offset: int, io: "AddressSpace", memory: "AddressSpace") -> None:
        self.vm = vm
        self.ring = memoryview(ring_map)[page_offset * PAGE:(page_offset + 1) * PAGE]
        self.io, self.memory = io, memory
        self.lock = threading.Lock()
        self.replayed = 0
        self.zones: list[tuple[int, int, bool]] = []

    @classmethod
    def create(cls, kvm: "Kvm", vm: "Vm", ring_map, io: "AddressSpace", memory: "AddressSpace"
               ) -> "CoalescedIo | None":
        """None when this KVM has no coalesced PIO."""
        page_offset = kvm.check_extension(KVM_CAP_COALESCED_MMIO)
        if page_offset <= 0 or not kvm.check_extension(KVM_CAP_COALESCED_PIO) or len(ring_map) < (page_offset + 1) * PAGE:
            return None
        return cls(vm, ring_map, page_offset, io, memory)

    def add(self, addr: int, size: int, pio: bool = True) -> None:
        ioctl(self.vm.fd, KVM_REGISTER_COALESCED_MMIO, kvm_coalesced_mmio_zone(addr, size, int(pio)))
        self.zones.append((addr, size, pio))

    def pending(self) -> bool:
        first, last = _HEAD.unpack_from(self.ring, 0)
        return first != last

    def drain(self) -> None:
        """Replay every queued write (call before handling an exit, so device state keeps the guest's order)."""
        ring = self.ring
        if ring is None:
            return
        first, last = _HEAD.unpack_from(ring, 0)
        if first == last:
            return
        with self.lock:
            if self.ring is None:
                return
            first, last = _HEAD.unpack_from(ring, 0)
            while first != last:
                if first >= MAX_ENTRIES:              # a corrupt index: resynchronise rather than loop
                    first = last
                    break
                addr, length, pio, data = _ENTRY.unpack_from(ring, ENTRY_OFFSET + first * _ENTRY.size)
                length = min(length, 8)
                (self.io if pio else self.memory).write(addr, length, int.from_bytes(data[:length], "little"))
                self.replayed += 1
                first = (first + 1) % MAX_ENTRIES
                struct.pack_into("=I", ring, 0, first)
            struct.pack_into("=I", ring, 0, first)

    def close(self) -> None:
        """Drain and let go of the vCPU mapping (before the vCPU fd and its mmap are closed)."""
        self.drain()
        with self.lock:
            if self.ring is not None:
                self.ring.release()
                self.ring = None
