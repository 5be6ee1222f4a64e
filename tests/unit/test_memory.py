"""The memory API: priorities, aliases, containers, unassigned accesses, access sizes, ROM, memslots."""
from __future__ import annotations

import pytest

from pyhv.memory import AddressSpace, GuestMemory, GuestMemoryError, MemoryRegion, RamBlock, memory_transaction
from pyhv.memory.kvm_slots import KvmMemslots, slots_of


class Recorder:
    def __init__(self, value: int = 0x11223344):
        self.log: list[tuple] = []
        self.value = value

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


def space(size: int = 1 << 32) -> tuple[MemoryRegion, AddressSpace]:
    root = MemoryRegion.container("system", size)
    return root, AddressSpace("memory", root)


def names(sp: AddressSpace) -> list[tuple[int, int, str]]:
    return [(r.start, r.end, r.region.name) for r in sp.view.ranges]


def test_higher_priority_hides_lower_where_they_overlap():
    root, sp = space()
    root.add_subregion(0, MemoryRegion.ram("ram", 0x10000))
    dev = Recorder()
    root.add_subregion(0x4000, MemoryRegion.io("dev", 0x1000, dev.read, dev.write), priority=1)
    assert names(sp) == [(0, 0x4000, "ram"), (0x4000, 0x5000, "dev"), (0x5000, 0x10000, "ram")]
    assert sp.read(0x4010, 4) == 0x11223344
    assert dev.log == [("r", 0x10, 4)]
    # the RAM on the far side of the device keeps its own offsets
    assert sp.view.lookup(0x5000).offset == 0x5000


def test_lower_priority_is_only_seen_in_gaps():
    root, sp = space()
    dev = Recorder()
    root.add_subregion(0x4000, MemoryRegion.io("dev", 0x1000, dev.read, dev.write), priority=-1)
    root.add_subregion(0, MemoryRegion.ram("ram", 0x10000))
    assert names(sp) == [(0, 0x10000, "ram")]


def test_equal_priority_last_added_wins():
    root, sp = space()
    a, b = Recorder(1), Recorder(2)
    root.add_subregion(0, MemoryRegion.io("a", 0x100, a.read, a.write))
    root.add_subregion(0x80, MemoryRegion.io("b", 0x100, b.read, b.write))
    assert sp.read(0x90, 1) == 2
    assert sp.read(0x10, 1) == 1


def test_alias_maps_a_window_of_another_region():
    root, sp = space()
    ram = MemoryRegion.ram("ram", 0x20000)
    ram.block.view[0x18000:0x18004] = b"\xde\xad\xbe\xef"
    root.add_subregion(0x100000, MemoryRegion.alias("window", ram, 0x10000, 0x10000))
    assert sp.read(0x108000, 4) == 0xEFBEADDE
    r = sp.view.lookup(0x100000)
    assert r.region is ram and r.offset == 0x10000


def test_nested_containers_and_disabling():
    root, sp = space()
    inner = MemoryRegion.container("inner", 0x1000)
    dev = Recorder(7)
    inner.add_subregion(0x100, MemoryRegion.io("dev", 0x10, dev.read, dev.write))
    root.add_subregion(0x2000, inner)
    assert sp.read(0x2104, 1) == 7
    assert dev.log == [("r", 4, 1)]
    inner.set_enabled(False)
    assert sp.read(0x2104, 1) == 0xFF
    inner.set_enabled(True)
    assert sp.read(0x2104, 1) == 7


def test_moving_a_region_remaps_it():
    root, sp = space()
    dev = Recorder(9)
    region = MemoryRegion.io("bar", 0x1000, dev.read, dev.write)
    root.add_subregion(0xE0000000, region)
    region.set_address(0xF0000000)
    assert sp.read(0xE0000000, 4) == 0xFFFFFFFF
    assert sp.read(0xF0000010, 4) == 9


@pytest.mark.parametrize("size,ones", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF), (8, 0xFFFFFFFFFFFFFFFF)])
def test_unassigned_reads_all_ones_and_writes_are_dropped_and_counted(size, ones):
    root, sp = space()
    assert sp.read(0x1000, size) == ones
    sp.write(0x1000, size, 0)
    assert (sp.unassigned_reads, sp.unassigned_writes) == (1, 1)


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_access_sizes_reach_the_device_unchanged(size):
    root, sp = space()
    dev = Recorder()
    root.add_subregion(0x1000, MemoryRegion.io("dev", 0x100, dev.read, dev.write))
    sp.write(0x1008, size, 0x0102030405060708 & ((1 << (8 * size)) - 1))
    assert dev.log[-1] == ("w", 8, size, 0x0102030405060708 & ((1 << (8 * size)) - 1))


def test_access_straddling_two_regions_is_split_into_bytes():
    root, sp = space()
    a, b = Recorder(0xAA), Recorder(0xBB)
    root.add_subregion(0, MemoryRegion.io("a", 0x10, a.read, a.write))
    root.add_subregion(0x10, MemoryRegion.io("b", 0x10, b.read, b.write))
    assert sp.read(0xE, 4) == 0xBBBBAAAA
    sp.write(0xF, 2, 0x1234)
    assert a.log[-1] == ("w", 0xF, 1, 0x34) and b.log[-1] == ("w", 0, 1, 0x12)


def test_rom_reads_its_data_and_drops_writes():
    root, sp = space()
    rom = MemoryRegion.rom("bios", b"\x55\xaa" * 0x800)
    root.add_subregion(0xFFFFF000, rom)
    sp.write(0xFFFFF000, 2, 0)
    assert sp.read(0xFFFFF000, 2) == 0xAA55
    assert sp.rom_writes_dropped == 1
    assert sp.view.lookup(0xFFFFF000).readonly


def test_readonly_alias_of_ram():
    root, sp = space()
    ram = MemoryRegion.ram("ram", 0x10000)
    alias = MemoryRegion.alias("shadow", ram, 0, 0x1000)
    alias.set_readonly(True)
    root.add_subregion(0xF0000, alias)
    sp.write(0xF0000, 1, 0x42)
    assert ram.block.view[0] == 0
    assert slots_of(sp.view) == [(0xF0000, 0x1000, ram.block.host_addr, True)]


def test_transaction_renders_once():
    root, sp = space()
    views = []
    sp.add_listener(lambda new, old: views.append(new))
    with memory_transaction():
        for i in range(5):
            root.add_subregion(i * 0x1000, MemoryRegion.ram(f"r{i}", 0x1000))
    assert len(views) == 2      # the initial call, then one commit


def test_region_cannot_be_mapped_twice():
    root, sp = space()
    ram = MemoryRegion.ram("ram", 0x1000)
    root.add_subregion(0, ram)
    with pytest.raises(ValueError):
        root.add_subregion(0x1000, ram)


def test_mtree_dump_looks_like_qemu():
    root, sp = space()
    ram = MemoryRegion.ram("pc.ram", 0x100000)
    root.add_subregion(0, MemoryRegion.alias("ram-below-4g", ram, 0, 0x100000))
    text = sp.dump_tree()
    assert text.splitlines()[0] == "address-space: memory"
    assert "0000000000000000-00000000000fffff (prio 0, alias): alias ram-below-4g @pc.ram " \
           "0000000000000000-00000000000fffff" in text


class FakeVm:
    def __init__(self):
        self.calls: list[tuple] = []
        self.slots: dict[int, tuple] = {}

    def set_user_memory_region(self, slot, gpa, size, host, readonly=False, log_dirty=False):
        self.calls.append((slot, gpa, size, readonly))
        self.logging = getattr(self, "logging", {})
        self.logging[slot] = log_dirty
        if size:
            for other, (g, s, _, _) in self.slots.items():
                assert other == slot or g + s <= gpa or gpa + size <= g, "overlapping memslots"
            self.slots[slot] = (gpa, size, host, readonly)
        else:
            del self.slots[slot]


def test_memslots_follow_the_flat_view_and_merge_contiguous_ranges():
    root, sp = space()
    vm = FakeVm()
    sp.add_listener(KvmMemslots(vm))
    block = RamBlock("ram", 0x200000)
    ram = MemoryRegion.ram("ram", 0x200000, block=block)
    root.add_subregion(0, MemoryRegion.alias("low", ram, 0, 0x100000))
    root.add_subregion(0x100000, MemoryRegion.alias("high", ram, 0x100000, 0x100000))
    assert list(vm.slots.values()) == [(0, 0x200000, block.host_addr, False)]
    # a device punched into the middle splits the slot; removing it joins them again
    dev = Recorder()
    hole = MemoryRegion.io("dev", 0x1000, dev.read, dev.write)
    root.add_subregion(0x80000, hole, priority=1)
    assert sorted(vm.slots.values()) == [(0, 0x80000, block.host_addr, False),
                                        (0x81000, 0x17F000, block.host_addr + 0x81000, False)]
    root.del_subregion(hole)
    assert list(vm.slots.values()) == [(0, 0x200000, block.host_addr, False)]


class DirtyVm(FakeVm):
    def __init__(self):
        super().__init__()
        self.written: dict[int, set[int]] = {}       # slot -> page numbers the "guest" wrote

    def get_dirty_log(self, slot, pages):
        bits = 0
        for page in self.written.pop(slot, set()):
            bits |= 1 << page
        return bits.to_bytes(-(-pages // 64) * 8, "little")


def test_dirty_logging_covers_writable_slots_and_reports_pages():
    root, sp = space()
    vm = DirtyVm()
    slots = KvmMemslots(vm)
    sp.add_listener(slots)
    root.add_subregion(0, MemoryRegion.ram("ram", 0x100000))
    root.add_subregion(0xF0000000, MemoryRegion.rom("rom", b"\x90" * 0x1000))
    slots.set_dirty_logging(True)
    ram_slot = next(i for (gpa, *_), i in slots.active.items() if gpa == 0)
    rom_slot = next(i for (gpa, *_), i in slots.active.items() if gpa == 0xF0000000)
    assert vm.logging[ram_slot] is True and vm.logging.get(rom_slot) is False     # ROM is never logged
    vm.written[ram_slot] = {0, 3, 64, 255}
    assert slots.dirty_pages() == [0, 0x3000, 0x40000, 0xFF000]
    assert slots.dirty_pages() == []                                            # reading clears
    generation = slots.generation
    root.add_subregion(0x80000, MemoryRegion.io("dev", 0x1000, Recorder().read, Recorder().write), priority=1)
    assert slots.generation > generation                                        # migration notices a new map
    assert all(vm.logging[i] for (gpa, size, h, ro), i in slots.active.items() if not ro)   # new slots logged too


def test_unaligned_ram_edges_stay_out_of_memslots():
    root, sp = space()
    ram = MemoryRegion.ram("ram", 0x3000)
    root.add_subregion(0x800, MemoryRegion.alias("odd", ram, 0x800, 0x2000))
    assert slots_of(sp.view) == [(0x1000, 0x1000, ram.block.host_addr + 0x1000, False)]
    sp.write(0x900, 1, 0x5A)                 # served through the flat range instead
    assert ram.block.view[0x900] == 0x5A


def test_guest_memory_bounds():
    root, sp = space()
    ram = MemoryRegion.ram("ram", 0x10000)
    root.add_subregion(0x10000, ram)
    mem = GuestMemory(sp)
    mem.write(0x10010, b"hello")
    assert mem.read(0x10010, 5) == b"hello"
    assert bytes(mem.view(0x1FFFF, 1)) == b"\0"
    for gpa, length in ((0xFFFF, 2), (0x1FFFF, 2), (0x30000, 1), (0x10000, -1)):
        with pytest.raises(GuestMemoryError):
            mem.view(gpa, length)
    rom = MemoryRegion.rom("rom", b"\1" * 0x1000)
    root.add_subregion(0x40000, rom)
    assert mem.read(0x40000, 1) == b"\1"
    with pytest.raises(GuestMemoryError):
        mem.write(0x40000, b"\0")


def test_span_gives_a_device_its_bounds_and_a_gap_its_own():
    root, sp = space(0x10000)
    dev = Recorder()
    root.add_subregion(0x1000, MemoryRegion.io("a", 0x100, dev.read, dev.write))
    root.add_subregion(0x3000, MemoryRegion.io("b", 0x100, dev.read, dev.write))
    fr, lo, hi = sp.view.span(0x1010)
    assert (fr.region.name, lo, hi) == ("a", 0x1000, 0x1100)
    assert sp.view.span(0x2000)[1:] == (0x1100, 0x3000)          # the gap between a and b
    assert sp.view.span(0x2000)[0] is sp.view.unassigned
    assert sp.view.span(0x10)[1:] == (0, 0x1000)
    assert sp.view.span(0x8000)[1:] == (0x3100, 0x10000)
    fr = sp.view.span(0x3004)[0]
    fr.io_write(0x3004 + fr.delta, 2, 0xBEEF)                     # the device's own callback, region offset
    assert dev.log[-1] == ("w", 4, 2, 0xBEEF)
