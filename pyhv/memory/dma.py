"""Device DMA address spaces: what a device reaches when it reads or writes "memory".

Every device that does DMA is given a DMA space when it is built (or plugged) and never another way into guest
RAM. A DMA space has `GuestMemory`'s access contract:

    view(addr, length, write=False) -> memoryview     one zero-copy piece (contiguous in guest RAM)
    read(addr, length) -> bytes,  write(addr, data),  read_int(addr, size)

and raises `GuestMemoryError` for what it cannot reach. There are two kinds:

- identity: with no IOMMU in front of the device, the device's addresses are guest-physical and its DMA space is
  the machine's `GuestMemory` itself (the same object, so nothing is added to any access);
- `TranslatedDma`: a device behind an IOMMU (`pyhv.devices.iommu`). Its addresses are I/O virtual addresses that
  the IOMMU translates page by page for the device's PCI source-id; every access is checked (present, readable,
  writable) and a refused one raises `DmaFault` after the IOMMU has recorded the fault. It also has
  `views(addr, length, write) -> list[memoryview]` for a buffer whose pages are not contiguous in guest RAM, and
  `pinned_view()` for long-lived views (a virtqueue's rings): the IOMMU marks their IOTLB entries, and when one of
  them goes (invalidated, evicted, the context changed) it bumps the space's `epoch`, so the holder knows to
  translate its views again. Short-lived views (one request's buffers) need nothing of the kind.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from pyhv.memory.guest import GuestMemoryError

if TYPE_CHECKING:
    from pyhv.memory.guest import GuestMemory


class DmaFault(GuestMemoryError):
    """A DMA access the IOMMU refused (already recorded as a fault by the IOMMU)."""

    def __init__(self, message: str, addr: int, write: bool, reason: int) -> None:
        super().__init__(message)
        self.addr = addr
        self.write = write
        self.reason = reason


class Translator(Protocol):
    """What `TranslatedDma` needs of an IOMMU."""

    def translate(self, source_id: int, addr: int, write: bool, pin: bool = False) -> tuple[int, int]:
        """The guest-physical address of `addr` for the device `source_id` and how many bytes from there on lie in
        the same translated page; raises `DmaFault` (after recording the fault) when the access is refused.
        `pin`: the translation backs a long-lived view (bump the space's epoch when it goes)."""
        ...


class TranslatedDma:
    """The DMA space of one device (`source_id` = bus << 8 | device << 3 | function) behind an IOMMU."""

    def __init__(self, name: str, memory: "GuestMemory", iommu: Translator, source_id: int) -> None:
        self.name = name
        self.memory = memory
        self.iommu = iommu
        self.source_id = source_id
        self.epoch = 0                  # bumped by the IOMMU when it invalidates translations of this device

    def pieces(self, addr: int, length: int, write: bool, pin: bool = False,
               first: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """[addr, addr+length) as guest-physical (address, length) pieces, adjacent pages merged (`first`: the
        translation of addr, when the caller has it already)."""
        if addr < 0 or length < 0 or addr + length > 1 << 64:
            raise GuestMemoryError(f"DMA range {addr:#x}+{length:#x} is not addressable")
        out: list[tuple[int, int]] = []
        translate, sid = self.iommu.translate, self.source_id
        while True:
            if first is not None:
                (gpa, room), first = first, None
            else:
                gpa, room = translate(sid, addr, write, pin)
            n = min(room, length)
            if out and out[-1][0] + out[-1][1] == gpa:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((gpa, n))
            length -= n
            if length <= 0:
                return out
            addr += n

    def views(self, addr: int, length: int, write: bool = False) -> list[memoryview]:
        return [self.memory.view(gpa, n, write) for gpa, n in self.pieces(addr, length, write)]

    def view(self, addr: int, length: int, write: bool = False, pin: bool = False) -> memoryview:
        first = None
        if 0 <= addr and 0 <= length:
            first = self.iommu.translate(self.source_id, addr, write, pin)
            if length <= first[1]:                      # within one page: the common descriptor or ring
                return self.memory.view(first[0], length, write)
        pieces = self.pieces(addr, length, write, pin, first)
        if len(pieces) != 1:
            raise GuestMemoryError(f"DMA range {addr:#x}+{length:#x} is not contiguous in guest memory "
                                   f"({len(pieces)} pieces)")
        return self.memory.view(pieces[0][0], length, write)

    def pinned_view(self, addr: int, length: int, write: bool = False) -> memoryview:
        return self.view(addr, length, write, pin=True)

    def read(self, addr: int, length: int) -> bytes:
        return b"".join(bytes(self.memory.view(gpa, n)) for gpa, n in self.pieces(addr, length, False))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        done = 0
        for gpa, n in self.pieces(addr, len(data), True):
            self.memory.view(gpa, n, True)[:] = data[done:done + n]
            done += n

    def read_int(self, addr: int, size: int) -> int:
        return int.from_bytes(self.read(addr, size), "little")

    def __repr__(self) -> str:
        return f"TranslatedDma({self.name!r}, source_id={self.source_id:#06x})"
