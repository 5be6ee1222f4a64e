"""The VT-d model without KVM: registers as Linux's intel-iommu driver programs them, legacy root/context tables,
second-level walks (3 and 4 levels, 4 KiB / 2 MiB / 1 GiB, R/W), the IOTLB and its invalidations (registers and
queue), fault recording and its interrupt, malformed tables, and virtqueues behind the unit."""
from __future__ import annotations

import struct

import pytest

from pyhv.devices.iommu import intel_vtd as vtd
from pyhv.devices.iommu.intel_vtd import IntelIommu
from pyhv.memory import GuestMemory, MemoryRegion
from pyhv.memory.dma import DmaFault
from pyhv.memory.guest import GuestMemoryError
from pyhv.virtio.queue import VirtQueue, VirtQueueError

from pci_helpers import Board
from virtq_driver import RingDriver

RAM = 16 << 20
SID = 0x0018                # 00:03.0
DID = 5
FE_ADDR, FE_DATA = 0xFEE00000, 0x4041
R, W, RW = vtd.PTE_R, vtd.PTE_W, vtd.PTE_R | vtd.PTE_W


class Rig:
    """A VT-d unit over 16 MiB of RAM and a page allocator for the tables (from 8 MiB up)."""

    def __init__(self, levels: int = 4) -> None:
        self.board = Board()
        self.board.system.add_subregion(0, MemoryRegion.ram("ram", RAM))
        self.mem = GuestMemory(self.board.memory)
        self.msis: list[tuple[int, int]] = []
        self.unit = IntelIommu("iommu", 0xFED90000, self.mem, send_msi=lambda a, d: self.msis.append((a, d)))
        self.space = self.unit.dma_space("dev", SID)
        self.next_page = 8 << 20
        self.levels = levels
        self.root = self.page()
        self.context_table = self.page()
        self.top = self.page()
        self.mem.write(self.root + 16 * (SID >> 8), struct.pack("<QQ", self.context_table | 1, 0))
        self.set_context(tt=0)
        self.reg(vtd.RTADDR, self.root, 8)
        self.reg(vtd.GCMD, vtd.GCMD_SRTP)
        self.reg(vtd.FEADDR, FE_ADDR)
        self.reg(vtd.FEDATA, FE_DATA)
        self.reg(vtd.FECTL, 0)

    def page(self) -> int:
        addr, self.next_page = self.next_page, self.next_page + 4096
        self.mem.write(addr, bytes(4096))
        return addr

    def set_context(self, tt: int = 0, aw: int | None = None, lo_extra: int = 0, hi_extra: int = 0) -> None:
        aw = {3: 1, 4: 2}[self.levels] if aw is None else aw
        lo = self.top | tt << 2 | 1 | lo_extra
        hi = DID << 8 | aw | hi_extra
        self.mem.write(self.context_table + 16 * (SID & 0xFF), struct.pack("<QQ", lo, hi))

    def reg(self, offset: int, value: int | None = None, size: int = 4) -> int:
        if value is None:
            return self.unit.bank.read(offset, size)
        self.unit.bank.write(offset, size, value)
        return value

    def enable(self) -> None:
        self.reg(vtd.GCMD, vtd.GCMD_TE)
        assert self.reg(vtd.GSTS) & vtd.GSTS_TES

    def map(self, iova: int, gpa: int, perm: int = RW, page_level: int = 1) -> int:
        """A mapping of the page of `page_level` (1: 4 KiB, 2: 2 MiB, 3: 1 GiB) at iova; returns the leaf's address."""
        table = self.top
        for level in range(self.levels, page_level, -1):
            slot = table + 8 * ((iova >> (12 + 9 * (level - 1))) & 0x1FF)
            entry = self.mem.read_int(slot, 8)
            if not entry & RW:
                entry = self.page() | RW
                self.mem.write(slot, struct.pack("<Q", entry))
            table = entry & vtd.ADDRESS_MASK
        leaf = table + 8 * ((iova >> (12 + 9 * (page_level - 1))) & 0x1FF)
        self.mem.write(leaf, struct.pack("<Q", gpa | perm | (vtd.PTE_PS if page_level > 1 else 0)))
        return leaf

    def fault_record(self, i: int = 0) -> tuple[int, int]:
        return self.reg(vtd.FRCD_OFFSET + 16 * i, size=8), self.reg(vtd.FRCD_OFFSET + 16 * i + 8, size=8)


def test_registers_read_as_linux_expects():
    rig = Rig()
    cap, ecap = rig.reg(vtd.CAP, size=8), rig.reg(vtd.ECAP, size=8)
    assert rig.reg(vtd.VER) == 0x10
    assert (cap >> 8) & 0x1F == 0b110 and (cap >> 16) & 0x3F == 47              # SAGAW 39/48-bit, MGAW
    assert ((cap >> 24) & 0x3FF) * 16 == vtd.FRCD_OFFSET and ((cap >> 40) & 0xFF) + 1 == vtd.FAULT_RECORDS
    assert ((ecap >> 8) & 0x3FF) * 16 == vtd.IOTLB_OFFSET and ecap & vtd.ECAP_QI and not ecap & (1 << 3)  # no IR
    assert rig.reg(vtd.GSTS) & vtd.GSTS_RTPS and not rig.reg(vtd.GSTS) & vtd.GSTS_TES
    assert rig.reg(vtd.GCMD) == 0                       # write-only


def test_translation_off_is_identity():
    rig = Rig()
    rig.mem.write(0x5000, b"phys")
    assert rig.space.read(0x5000, 4) == b"phys"
    assert rig.unit.counters()["dev"]["translations"] == 1 and not rig.msis


@pytest.mark.parametrize("levels", [3, 4])
def test_4k_mapping_reads_and_writes_through_the_tables(levels):
    rig = Rig(levels)
    rig.map(0x7654_3000, 0x20000)
    rig.enable()
    rig.mem.write(0x20010, b"hello")
    assert rig.space.read(0x7654_3010, 5) == b"hello"
    rig.space.write(0x7654_3ffe, b"ab")
    assert rig.mem.read(0x20ffe, 2) == b"ab"
    c = rig.unit.counters()["dev"]
    assert c["iotlb-misses"] == 1 and c["iotlb-hits"] == 1


@pytest.mark.parametrize("page_level,size", [(2, 2 << 20), (3, 1 << 30)])
def test_large_pages(page_level, size):
    rig = Rig()
    gpa = 0 if page_level == 3 else 2 << 20
    rig.map(size * 3, gpa, page_level=page_level)
    rig.enable()
    rig.mem.write(gpa + 0x12345, b"big")
    assert rig.space.read(size * 3 + 0x12345, 3) == b"big"
    gpa_of, room = rig.unit.translate(SID, size * 3 + 0x1000, False)
    assert gpa_of == gpa + 0x1000 and room == 4096


def test_unmapped_read_faults_records_and_interrupts_once():
    rig = Rig()
    rig.map(0x1000, 0x20000)
    rig.enable()
    with pytest.raises(DmaFault) as e:
        rig.space.read(0x9000, 4)
    assert e.value.reason == vtd.FR_READ and e.value.addr == 0x9000
    lo, hi = rig.fault_record(0)
    assert lo == 0x9000 and hi & 0xFFFF == SID and (hi >> 32) & 0xFF == vtd.FR_READ
    assert hi >> 63 and hi >> 62 & 1                     # F, T = read
    assert rig.reg(vtd.FSTS) & vtd.FSTS_PPF
    assert rig.msis == [(FE_ADDR, FE_DATA)]
    with pytest.raises(DmaFault):
        rig.space.write(0xA000, b"x")                    # second fault while one is pending: no second interrupt
    assert len(rig.msis) == 1
    lo, hi = rig.fault_record(1)
    assert lo == 0xA000 and not hi >> 62 & 1             # a write
    # Linux's handler: clear F with a 4-byte write at +12, then FSTS
    for i in range(2):
        rig.reg(vtd.FRCD_OFFSET + 16 * i + 12, 1 << 31)
    rig.reg(vtd.FSTS, vtd.FSTS_PFO)
    assert not rig.reg(vtd.FSTS) & vtd.FSTS_PPF
    with pytest.raises(DmaFault):
        rig.space.read(0xB000, 1)
    assert len(rig.msis) == 2


def test_masked_fault_interrupt_is_sent_when_unmasked():
    rig = Rig()
    rig.reg(vtd.FECTL, vtd.FECTL_IM)
    rig.enable()
    with pytest.raises(DmaFault):
        rig.space.read(0x1000, 1)
    assert not rig.msis and rig.reg(vtd.FECTL) & vtd.FECTL_IP
    rig.reg(vtd.FECTL, 0)
    assert rig.msis == [(FE_ADDR, FE_DATA)]


def test_read_only_mapping_refuses_writes_and_write_only_refuses_reads():
    rig = Rig()
    rig.map(0x1000, 0x20000, R)
    rig.map(0x2000, 0x21000, W)
    rig.enable()
    rig.mem.write(0x20000, b"keep")
    assert rig.space.read(0x1000, 4) == b"keep"
    with pytest.raises(DmaFault) as e:
        rig.space.write(0x1000, b"lost")
    assert e.value.reason == vtd.FR_WRITE and rig.mem.read(0x20000, 4) == b"keep"
    rig.space.write(0x2000, b"ok")
    with pytest.raises(DmaFault) as e:
        rig.space.read(0x2000, 2)
    assert e.value.reason == vtd.FR_READ


def test_permissions_of_upper_levels_count():
    rig = Rig(3)
    rig.map(0x1000, 0x20000, RW)
    top = rig.mem.read_int(rig.top, 8)
    rig.mem.write(rig.top, struct.pack("<Q", top & ~W))      # the level-3 entry: read-only
    rig.enable()
    with pytest.raises(DmaFault) as e:
        rig.space.write(0x1000, b"x")
    assert e.value.reason == vtd.FR_WRITE


def test_a_write_across_a_page_boundary_into_an_unmapped_page_writes_nothing():
    rig = Rig()
    rig.map(0x1000, 0x20000)
    rig.enable()
    with pytest.raises(DmaFault):
        rig.space.write(0x1ffc, b"12345678")
    assert rig.mem.read(0x20ffc, 4) == bytes(4)


def test_discontiguous_pages_come_as_several_views():
    rig = Rig()
    rig.map(0x1000, 0x30000)
    rig.map(0x2000, 0x20000)
    rig.enable()
    with pytest.raises(GuestMemoryError, match="not contiguous"):
        rig.space.view(0x1800, 0x1000)
    views = rig.space.views(0x1800, 0x1000, True)
    assert [len(v) for v in views] == [0x800, 0x800]
    rig.space.write(0x1800, b"A" * 0x800 + b"B" * 0x800)
    assert rig.mem.read(0x30800, 1) == b"A" and rig.mem.read(0x20000, 0x800) == b"B" * 0x800


@pytest.mark.parametrize("setup,reason", [
    (lambda rig: rig.mem.write(rig.root, bytes(16)), vtd.FR_ROOT_NOT_PRESENT),
    (lambda rig: rig.mem.write(rig.context_table + 16 * (SID & 0xFF), bytes(16)), vtd.FR_CONTEXT_NOT_PRESENT),
    (lambda rig: rig.set_context(aw=3), vtd.FR_CONTEXT_INVALID),
    (lambda rig: rig.set_context(tt=1), vtd.FR_CONTEXT_INVALID),
    (lambda rig: rig.set_context(hi_extra=1 << 40), vtd.FR_CONTEXT_RESERVED),
    (lambda rig: rig.mem.write(rig.root, struct.pack("<QQ", rig.context_table | 1 | 1 << 4, 0)),
     vtd.FR_ROOT_RESERVED),
    (lambda rig: rig.mem.write(rig.root, struct.pack("<QQ", 0x7FFF_F000_0000 | 1, 0)), vtd.FR_CONTEXT_TABLE_ACCESS),
    (lambda rig: rig.mem.write(rig.top, struct.pack("<Q", 0x7FFF_F000_0000 | RW)), vtd.FR_PAGING_ENTRY_ACCESS),
    (lambda rig: rig.mem.write(rig.map(0x1000, 0x20000) , struct.pack("<Q", 0x20000 | RW | 1 << 50)),
     vtd.FR_PAGING_ENTRY_RESERVED),
    (lambda rig: rig.map(0, 0x201000, page_level=2), vtd.FR_PAGING_ENTRY_RESERVED),    # 2 MiB page, low bits set
    (lambda rig: rig.mem.write(rig.top, struct.pack("<Q", 0x40000000 | RW | vtd.PTE_PS)),
     vtd.FR_PAGING_ENTRY_RESERVED),                                                    # PS in a PML4 entry
])
def test_malformed_tables_fault_with_the_reason(setup, reason):
    rig = Rig()
    setup(rig)
    rig.enable()
    with pytest.raises(DmaFault) as e:
        rig.space.read(0x1000, 1)
    assert e.value.reason == reason
    assert (rig.fault_record(0)[1] >> 32) & 0xFF == reason


def test_root_table_outside_ram_faults():
    rig = Rig()
    rig.reg(vtd.RTADDR, 0x7FFF_0000_0000, 8)
    rig.reg(vtd.GCMD, vtd.GCMD_SRTP)
    rig.enable()
    with pytest.raises(DmaFault) as e:
        rig.space.read(0, 1)
    assert e.value.reason == vtd.FR_ROOT_TABLE_ACCESS


def test_address_beyond_the_context_width_faults():
    rig = Rig(3)
    rig.enable()
    with pytest.raises(DmaFault) as e:
        rig.space.read(1 << 39, 1)
    assert e.value.reason == vtd.FR_ADDRESS_BEYOND_AW


def test_a_loop_of_table_pointers_ends():
    rig = Rig()
    rig.mem.write(rig.top, struct.pack("<Q", rig.top | RW))        # every level points back at the top table
    rig.enable()
    # the walk has one step per level, so the loop is just a strange mapping (of the table page itself)
    gpa, _ = rig.unit.translate(SID, 0, False)
    assert gpa == rig.top


def test_fault_processing_disabled_records_nothing():
    rig = Rig()
    rig.set_context(lo_extra=2)                                     # FPD
    rig.enable()
    with pytest.raises(DmaFault):
        rig.space.read(0x1000, 1)
    assert rig.fault_record(0) == (0, 0) and not rig.msis


def test_pass_through_context():
    rig = Rig()
    rig.set_context(tt=2)
    rig.enable()
    rig.mem.write(0x30000, b"pt")
    assert rig.space.read(0x30000, 2) == b"pt"


def test_iotlb_entry_stays_until_invalidated_by_register():
    rig = Rig()
    leaf = rig.map(0x1000, 0x20000)
    rig.enable()
    rig.mem.write(0x20000, b"A")
    rig.mem.write(0x21000, b"B")
    assert rig.space.read(0x1000, 1) == b"A"
    rig.mem.write(leaf, struct.pack("<Q", 0x21000 | RW))            # remap without invalidating: cached
    assert rig.space.read(0x1000, 1) == b"A"
    epoch = rig.space.epoch
    rig.reg(vtd.IVA, 0x1000, 8)                                     # page-selective, AM 0
    rig.reg(vtd.IOTLB + 4, (vtd.IOTLB_IVT | 3 << 60 | DID << 32) >> 32)   # upper half, as a 32-bit driver would
    assert not rig.reg(vtd.IOTLB, size=8) & vtd.IOTLB_IVT
    assert (rig.reg(vtd.IOTLB, size=8) >> 57) & 3 == 3              # actual granularity: page
    assert rig.space.read(0x1000, 1) == b"B"
    assert rig.space.epoch == epoch                                 # no long-lived view used that page


def test_only_losing_a_pinned_translation_bumps_the_epoch():
    rig = Rig()
    rig.map(0x1000, 0x20000)
    rig.map(0x2000, 0x21000)
    rig.enable()
    rig.space.pinned_view(0x1000, 16)                               # a ring
    rig.space.view(0x2000, 16)                                      # a request's buffer
    epoch = rig.space.epoch
    for page, bumped in ((0x2000, False), (0x1000, True)):
        rig.reg(vtd.IVA, page, 8)
        rig.reg(vtd.IOTLB, vtd.IOTLB_IVT | 3 << 60 | DID << 32, 8)
        assert (rig.space.epoch > epoch) == bumped


def test_invalidation_of_another_domain_leaves_the_entry():
    rig = Rig()
    leaf = rig.map(0x1000, 0x20000)
    rig.enable()
    rig.space.read(0x1000, 1)
    rig.mem.write(leaf, struct.pack("<Q", 0x21000 | RW))
    rig.reg(vtd.IOTLB, vtd.IOTLB_IVT | 2 << 60 | (DID + 1) << 32, 8)
    assert rig.unit.translate(SID, 0x1000, False)[0] == 0x20000
    rig.reg(vtd.IOTLB, vtd.IOTLB_IVT | 2 << 60 | DID << 32, 8)
    assert rig.unit.translate(SID, 0x1000, False)[0] == 0x21000


def test_context_cache_invalidation_by_register():
    rig = Rig()
    rig.map(0x1000, 0x20000)
    rig.enable()
    rig.space.read(0x1000, 1)
    rig.mem.write(rig.context_table + 16 * (SID & 0xFF), bytes(16))   # device removed from its domain
    rig.reg(vtd.CCMD, vtd.CCMD_ICC | 1 << 61, 8)                     # global
    rig.reg(vtd.IOTLB, vtd.IOTLB_IVT | 1 << 60, 8)
    assert not rig.reg(vtd.CCMD, size=8) & vtd.CCMD_ICC
    with pytest.raises(DmaFault) as e:
        rig.space.read(0x1000, 1)
    assert e.value.reason == vtd.FR_CONTEXT_NOT_PRESENT


class Queue:
    """A guest-side invalidation queue."""

    def __init__(self, rig: Rig) -> None:
        self.rig, self.base, self.tail = rig, rig.page(), 0
        rig.reg(vtd.IQT, 0, 8)
        rig.reg(vtd.IQA, self.base, 8)                                   # QS 0: 256 descriptors
        rig.reg(vtd.GCMD, vtd.GCMD_TE | vtd.GCMD_QIE)
        assert rig.reg(vtd.GSTS) & vtd.GSTS_QIES

    def submit(self, *descs: tuple[int, int]) -> None:
        for lo, hi in descs:
            self.rig.mem.write(self.base + 16 * self.tail, struct.pack("<QQ", lo, hi))
            self.tail = (self.tail + 1) % 256
        self.rig.reg(vtd.IQT, self.tail << 4, 8)


def test_queued_invalidation_with_wait_descriptor():
    rig = Rig()
    leaf = rig.map(0x1000, 0x20000)
    q = Queue(rig)
    rig.reg(vtd.IEADDR, FE_ADDR)
    rig.reg(vtd.IEDATA, 0x77)
    rig.reg(vtd.IECTL, 0)
    rig.mem.write(0x21000, b"B")
    rig.space.read(0x1000, 1)
    rig.mem.write(leaf, struct.pack("<Q", 0x21000 | RW))
    status = rig.page()
    q.submit((vtd.QI_IOTLB | 3 << 4 | DID << 16, 0x1000),
             (vtd.QI_WAIT | vtd.QI_WAIT_SW | vtd.QI_WAIT_IF | 0xC0FFEE << 32, status))
    assert rig.mem.read_int(status, 4) == 0xC0FFEE
    assert rig.reg(vtd.IQH, size=8) == rig.reg(vtd.IQT, size=8) == 2 << 4
    assert rig.reg(vtd.ICS) & vtd.ICS_IWC and (FE_ADDR, 0x77) in rig.msis
    assert rig.space.read(0x1000, 1) == b"B"
    assert rig.unit.invalidations["iotlb-page"] == 1 and rig.unit.invalidations["wait"] == 1


def test_a_bad_queue_descriptor_stops_the_queue_with_iqe():
    rig = Rig()
    q = Queue(rig)
    q.submit((0xF, 0), (vtd.QI_WAIT | vtd.QI_WAIT_SW | 1 << 32, rig.page()))
    assert rig.reg(vtd.FSTS) & vtd.FSTS_IQE and rig.reg(vtd.IQH, size=8) == 0
    assert rig.msis == [(FE_ADDR, FE_DATA)]
    rig.reg(vtd.FSTS, vtd.FSTS_IQE)                                  # cleared: the queue runs again (the bad
    rig.mem.write(q.base, struct.pack("<QQ", vtd.QI_IEC, 0))          # descriptor fixed meanwhile)
    rig.reg(vtd.IQT, q.tail << 4, 8)
    assert rig.reg(vtd.IQH, size=8) == 2 << 4


def test_reset_turns_translation_off():
    rig = Rig()
    rig.enable()
    rig.unit.reset()
    assert not rig.reg(vtd.GSTS) & vtd.GSTS_TES and rig.reg(vtd.FECTL) & vtd.FECTL_IM


# --- virtqueues behind the unit ----------------------------------------------------------------------------------
def queue_rig(map_used: bool = True):
    rig = Rig()
    for page in range(0x1000, 0x4000, 0x1000):                       # rings at identity addresses
        if page != 0x3000 or map_used:
            rig.map(page, page)
    for page in range(0x10000, 0x12000, 0x1000):                     # the driver's heap: one page of two
        rig.map(page, page)
    rig.enable()
    return rig, RingDriver(rig.mem, heap=0x10000)


def device_queue(rig: Rig, d: RingDriver) -> VirtQueue:
    """The device's side of the driver's rings, through the device's DMA space."""
    return VirtQueue(0, d.size, rig.space, d.desc, d.avail, d.used)


def test_a_refused_buffer_fails_the_request_not_the_queue():
    rig, d = queue_rig()
    q = device_queue(rig, d)
    unmapped = 0x12000
    rig.mem.write(unmapped, b"untouched")
    head = d.add([(b"hdr", False), (8, True)])
    d.write_desc(head + 1, unmapped, 9, 2)                           # the writable buffer: not mapped
    d.publish(head)
    assert q.pop() is None                                          # returned to the driver with nothing written
    assert d.take_used() == [(head, 0)] and q.faulted == 1
    assert rig.mem.read(unmapped, 9) == b"untouched"
    q.faults_to_device = True
    head = d.add([(b"hdr", False), (8, True)])
    d.write_desc(head, unmapped, 3, 1, head + 1)
    d.publish(head)
    chain = q.pop()
    assert chain.fault and not chain.fault_at_end and chain.readable == [] and chain.writable_len == 8


def test_a_ring_behind_an_unmapped_page_is_a_queue_error():
    rig, d = queue_rig(map_used=False)
    with pytest.raises(VirtQueueError, match="ring"):
        device_queue(rig, d)


def test_rings_are_translated_again_after_an_invalidation():
    rig, d = queue_rig()
    q = device_queue(rig, d)
    leaf = rig.map(0x3000, 0x3000)
    rig.mem.write(leaf, bytes(8))                                   # the used ring unmapped ...
    rig.reg(vtd.IVA, 0x3000, 8)                                     # ... and its page invalidated
    rig.reg(vtd.IOTLB, vtd.IOTLB_IVT | 3 << 60 | DID << 32, 8)
    d.publish(d.add([(b"x", False)]))
    with pytest.raises(VirtQueueError, match="ring"):
        q.pop()
