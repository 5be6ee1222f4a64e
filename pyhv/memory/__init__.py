"""Guest RAM and the memory API: regions, address spaces and their flat views, bounds-checked guest memory."""
from pyhv.memory.address_space import ALL_ONES, AddressSpace, FlatRange, FlatView
from pyhv.memory.guest import GuestMemory, GuestMemoryError
from pyhv.memory.ram import PAGE_SIZE, RamBlock
from pyhv.memory.region import MemoryRegion, RegionKind, memory_transaction

__all__ = ["AddressSpace", "FlatRange", "FlatView", "ALL_ONES", "GuestMemory", "GuestMemoryError", "PAGE_SIZE",
           "RamBlock", "MemoryRegion", "RegionKind", "memory_transaction"]
