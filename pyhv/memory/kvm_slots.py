"""Keeps KVM's memslots equal to the RAM and ROM ranges of the system address space's flat view."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pyhv.memory.ram import PAGE_SIZE

if TYPE_CHECKING:
    from pyhv.kvm import Vm
    from pyhv.memory.address_space import FlatView

log = logging.getLogger(__name__)

Slot = tuple[int, int, int, bool]   # (guest_phys_addr, size, host_addr, readonly)


def slots_of(view: "FlatView") -> list[Slot]:
    """Page-aligned memslots for the view's RAM/ROM ranges, merging neighbours that are contiguous in host memory.

    The unaligned edges of a range (rare) stay out of KVM and are served by exits through the flat range."""
    slots: list[Slot] = []
    for r in view.ram_ranges():
        host = r.region.block.host_addr + r.host_offset()
        start = -(-r.start // PAGE_SIZE) * PAGE_SIZE
        end = r.end // PAGE_SIZE * PAGE_SIZE
        host += start - r.start
        if end <= start or host % PAGE_SIZE:
            continue
        if slots:
            gpa, size, h, ro = slots[-1]
            if gpa + size == start and h + size == host and ro == r.readonly:
                slots[-1] = (gpa, size + end - start, h, ro)
                continue
        slots.append((start, end - start, host, r.readonly))
    return slots


class KvmMemslots:
    """A flat-view listener that applies the difference between two views to KVM (delete first, then add)."""

    def __init__(self, vm: "Vm") -> None:
        self.vm = vm
        self.active: dict[Slot, int] = {}
        self.free_ids: list[int] = []
        self.next_id = 0
        self.log_dirty = False          # KVM_MEM_LOG_DIRTY_PAGES on every writable slot (live migration)
        self.generation = 0             # bumped whenever the slots change

    def __call__(self, new: "FlatView", old: "FlatView | None") -> None:
        wanted = set(slots_of(new))
        for slot in [s for s in self.active if s not in wanted]:
            slot_id = self.active.pop(slot)
            self.vm.set_user_memory_region(slot_id, slot[0], 0, slot[2], slot[3])
            self.free_ids.append(slot_id)
            self.generation += 1
        for slot in sorted(wanted - set(self.active)):
            slot_id = self.free_ids.pop() if self.free_ids else self._new_id()
            self.vm.set_user_memory_region(slot_id, slot[0], slot[1], slot[2], slot[3],
                                           log_dirty=self.log_dirty and not slot[3])
            self.active[slot] = slot_id
            self.generation += 1
            log.debug("memslot %d: %#x-%#x%s", slot_id, slot[0], slot[0] + slot[1] - 1, " ro" if slot[3] else "")

    def set_dirty_logging(self, enabled: bool) -> None:
        """Turn KVM's dirty-page logging on or off for every writable slot (re-registering them with the flag)."""
        self.log_dirty = enabled
        for slot, slot_id in self.active.items():
            if not slot[3]:
                self.vm.set_user_memory_region(slot_id, slot[0], slot[1], slot[2], False, log_dirty=enabled)

    def dirty_pages(self) -> list[int]:
        """Guest-physical addresses of the pages the guest wrote since the last call (dirty logging on)."""
        out: list[int] = []
        for (gpa, size, _host, readonly), slot_id in list(self.active.items()):
            if readonly:
                continue
            bitmap = self.vm.get_dirty_log(slot_id, size // PAGE_SIZE)
            for word_index in range(0, len(bitmap), 8):
                word = int.from_bytes(bitmap[word_index:word_index + 8], "little")
                while word:
                    low = word & -word
                    out.append(gpa + (word_index * 8 + low.bit_length() - 1) * PAGE_SIZE)
                    word ^= low
        return out

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1
