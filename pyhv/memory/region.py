"""`MemoryRegion`: the node of pyhv's memory tree, a Python-sized form of QEMU's memory API.

Kinds:
  ram        guest RAM backed by a `RamBlock`; becomes a KVM memslot.
  rom        like ram, read-only to the guest (KVM_MEM_READONLY); guest writes arrive as MMIO exits, are dropped.
  io         callbacks `read(offset, size) -> int` and `write(offset, size, value)`; every access is an exit.
  alias      a window [offset, offset+size) of another region, mapped elsewhere (PAM shadow RAM, RAM split
             around the PCI hole).
  container  holds subregions at addresses with priorities; a higher priority hides a lower one where they
             overlap, an equal priority lets the one added last win. Gaps are unassigned.

Changing the tree (adding, removing, moving, enabling) re-renders every `AddressSpace` that can see the change,
at the end of the outermost `memory_transaction()`.
"""
from __future__ import annotations

import enum
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

from pyhv.memory.ram import RamBlock

if TYPE_CHECKING:
    from pyhv.memory.address_space import AddressSpace

ReadFn = Callable[[int, int], int]
WriteFn = Callable[[int, int, int], None]


class RegionKind(enum.Enum):
    RAM = "ram"
    ROM = "rom"
    IO = "i/o"
    ALIAS = "alias"
    CONTAINER = "container"


class _Transaction(threading.local):
    depth = 0


_transaction = _Transaction()
_topology_lock = threading.RLock()
_dirty: set["AddressSpace"] = set()


@contextmanager
def memory_transaction() -> Iterator[None]:
    """Batch topology changes: address spaces re-render once, when the outermost transaction ends."""
    with _topology_lock:
        _transaction.depth += 1
        try:
            yield
        finally:
            _transaction.depth -= 1
            if _transaction.depth == 0:
                while _dirty:
                    _dirty.pop().commit()


class Subregion:
    __slots__ = ("region", "address", "priority", "order")

    def __init__(self, region: "MemoryRegion", address: int, priority: int, order: int) -> None:
        self.region, self.address, self.priority, self.order = region, address, priority, order


class MemoryRegion:
    def __init__(self, name: str, size: int, kind: RegionKind, *, owner: str | None = None) -> None:
        if size <= 0:
            raise ValueError(f"memory region {name!r}: size must be positive")
        self.name = name
        self.size = size
        self.kind = kind
        self.owner = owner or name        # what exit statistics group this region under (a device name)
        self.describe: Callable[[int], str] | None = None   # names the register at an offset (traces, stats)
        self.enabled = True
        self.readonly = kind is RegionKind.ROM
        self.parent: MemoryRegion | None = None
        self.address_spaces: list[AddressSpace] = []   # set on a region that is an address space's root
        self.aliased_by: list[MemoryRegion] = []
        # ram / rom
        self.block: RamBlock | None = None
        self.block_offset = 0
        # io
        self.read: ReadFn | None = None
        self.write: WriteFn | None = None
        # alias
        self.alias_target: MemoryRegion | None = None
        self.alias_offset = 0
        # container
        self.subregions: list[Subregion] = []
        self._order = 0

    # --- constructors ------------------------------------------------------------------------------------------
    @classmethod
    def ram(cls, name: str, size: int, block: RamBlock | None = None, block_offset: int = 0,
            shared: bool = False, owner: str | None = None) -> "MemoryRegion":
        region = cls(name, size, RegionKind.RAM, owner=owner)
        region.block = block or RamBlock(name, size, shared=shared)
        if block_offset + size > region.block.size:
            raise ValueError(f"memory region {name!r} does not fit its RAM block")
        region.block_offset = block_offset
        return region

    @classmethod
    def rom(cls, name: str, data: bytes | bytearray | memoryview, size: int | None = None,
            owner: str | None = None) -> "MemoryRegion":
        """A read-only region holding `data` (padded with zeros up to `size`, rounded up to a page)."""
        size = size or len(data)
        region = cls(name, size, RegionKind.ROM, owner=owner)
        region.block = RamBlock(name, -(-size // 4096) * 4096)
        region.block.view[:len(data)] = data
        return region

    @classmethod
    def io(cls, name: str, size: int, read: ReadFn, write: WriteFn, owner: str | None = None) -> "MemoryRegion":
        region = cls(name, size, RegionKind.IO, owner=owner)
        region.read, region.write = read, write
        return region

    @classmethod
    def alias(cls, name: str, target: "MemoryRegion", offset: int, size: int,
              owner: str | None = None) -> "MemoryRegion":
        if offset < 0 or offset + size > target.size:
            raise ValueError(f"alias {name!r} reaches outside {target.name!r}")
        region = cls(name, size, RegionKind.ALIAS, owner=owner)
        region.alias_target, region.alias_offset = target, offset
        target.aliased_by.append(region)
        return region

    @classmethod
    def container(cls, name: str, size: int, owner: str | None = None) -> "MemoryRegion":
        return cls(name, size, RegionKind.CONTAINER, owner=owner)

    # --- topology ----------------------------------------------------------------------------------------------
    def add_subregion(self, address: int, region: "MemoryRegion", priority: int = 0) -> "MemoryRegion":
        if self.kind is not RegionKind.CONTAINER:
            raise TypeError(f"{self.name!r} is not a container")
        if region.parent is not None:
            raise ValueError(f"region {region.name!r} is already mapped in {region.parent.name!r}")
        with memory_transaction():
            region.parent = self
            self._order += 1
            self.subregions.append(Subregion(region, address, priority, self._order))
            self._changed()
        return region

    def del_subregion(self, region: "MemoryRegion") -> None:
        with memory_transaction():
            self.subregions = [s for s in self.subregions if s.region is not region]
            region.parent = None
            self._changed()

    def subregion_of(self, region: "MemoryRegion") -> Subregion:
        for sub in self.subregions:
            if sub.region is region:
                return sub
        raise KeyError(region.name)

    def set_address(self, address: int) -> None:
        """Move this region within its container (a BAR the guest relocates)."""
        if self.parent is None:
            raise ValueError(f"{self.name!r} is not mapped")
        with memory_transaction():
            sub = self.parent.subregion_of(self)
            if sub.address != address:
                sub.address = address
                self._changed()

    @property
    def address(self) -> int:
        return self.parent.subregion_of(self).address if self.parent else 0

    def set_enabled(self, enabled: bool) -> None:
        with memory_transaction():
            if self.enabled != enabled:
                self.enabled = enabled
                self._changed()

    def set_readonly(self, readonly: bool) -> None:
        with memory_transaction():
            if self.readonly != readonly:
                self.readonly = readonly
                self._changed()

    def _changed(self) -> None:
        seen: set[int] = set()
        stack: list[MemoryRegion] = [self]
        while stack:
            region = stack.pop()
            if id(region) in seen:
                continue
            seen.add(id(region))
            for space in region.address_spaces:
                _dirty.add(space)
            if region.parent is not None:
                stack.append(region.parent)
            stack.extend(region.aliased_by)

    def __repr__(self) -> str:
        return f"MemoryRegion({self.name!r}, {self.kind.value}, size={self.size:#x})"
