"""Intel VT-d DMA remapping (Intel VT-d specification 4.x, chapters 3, 6, 7, 10): one remapping unit (DRHD) for
every PCI device of the `pc` machine, as QEMU's `-device intel-iommu` (without interrupt remapping).

The guest's driver (Linux `intel_iommu=on`, or a test guest) builds legacy-mode tables in its RAM:

    RTADDR -> root table (256 x 16 B, by bus): P, context-table pointer
           -> context table (256 x 16 B, by devfn): P, FPD, TT (0 translate, 2 pass-through), second-level page
              table pointer, AW (1 = 39-bit 3-level, 2 = 48-bit 4-level), domain id
           -> second-level page tables (512 x 8 B): R, W, PS (2 MiB at level 2, 1 GiB at level 3), address

and turns translation on through GCMD. `translate(source_id, addr, write)` walks them for each page a device
touches (`pyhv.memory.dma.TranslatedDma`), caching the context entry by source-id and the leaf by
(source-id, page) with its domain in an IOTLB: only present entries are cached (CAP.CM = 0), so the guest must
invalidate after changing or removing a mapping, by register (CCMD, IOTLB_REG with IVA) or through the
invalidation queue (IQA/IQH/IQT: context-cache, IOTLB, device-TLB and interrupt-entry-cache descriptors,
invalidation wait with status write and completion interrupt). A refused access is recorded in a fault
recording register (source-id, address, read/write, reason), FSTS says so, and the fault event MSI
(FEDATA/FEADDR) is sent unless FECTL masks it; the device sees a `DmaFault` and fails the request.

Everything else the unit has is there in its register set and reads as the spec says for a unit without it:
no interrupt remapping (ECAP.IR = 0), no protected memory regions, no advanced fault logging, no scalable mode,
no PASID, no device-TLB. The unit's own accesses (tables, status writes) are guest-physical.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Callable

from pyhv.devices.device import Claim
from pyhv.devices.registers import Register, RegisterBank
from pyhv.memory.dma import DmaFault, TranslatedDma
from pyhv.memory.guest import GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

REGISTER_BLOCK_SIZE = 0x1000

# --- registers (§10.4) -----------------------------------------------------------------------------------------
VER, CAP, ECAP, GCMD, GSTS, RTADDR, CCMD = 0x00, 0x08, 0x10, 0x18, 0x1C, 0x20, 0x28
FSTS, FECTL, FEDATA, FEADDR, FEUADDR = 0x34, 0x38, 0x3C, 0x40, 0x44
AFLOG, PMEN, PLMBASE, PLMLIMIT, PHMBASE, PHMLIMIT = 0x58, 0x64, 0x68, 0x6C, 0x70, 0x78
IQH, IQT, IQA, ICS, IECTL, IEDATA, IEADDR, IEUADDR, IRTA = 0x80, 0x88, 0x90, 0x9C, 0xA0, 0xA4, 0xA8, 0xAC, 0xB8
IOTLB_OFFSET = 0xF0                  # IVA_REG here, IOTLB_REG at +8 (ECAP.IRO = 0xF0 / 16)
IVA, IOTLB = IOTLB_OFFSET, IOTLB_OFFSET + 8
FRCD_OFFSET = 0x220                  # fault recording registers, 16 bytes each (CAP.FRO = 0x220 / 16)
FAULT_RECORDS = 4

VERSION = 0x10                       # 1.0, as QEMU's model
HOST_ADDRESS_WIDTH = 48              # DMAR table's HAW + 1 and CAP.MGAW + 1
SAGAW_39 = 1 << 1                    # 3-level tables
SAGAW_48 = 1 << 2                    # 4-level tables
CAP_VALUE = (6                                   # ND: 16-bit domain ids
             | (SAGAW_39 | SAGAW_48) << 8        # SAGAW
             | (HOST_ADDRESS_WIDTH - 1) << 16    # MGAW
             | (FRCD_OFFSET // 16) << 24         # FRO
             | 0b11 << 34                        # SLLPS: 2 MiB and 1 GiB pages
             | 1 << 39                           # PSI: page-selective invalidation
             | (FAULT_RECORDS - 1) << 40         # NFR
             | 18 << 48                          # MAMV
             | 1 << 54 | 1 << 55)                # DWD, DRD: drains (nothing to drain here)
ECAP_C = 1 << 0                      # page walks are coherent: the guest need not flush caches after table writes
ECAP_QI = 1 << 1
ECAP_PT = 1 << 6
ECAP_VALUE = ECAP_C | ECAP_QI | ECAP_PT | (IOTLB_OFFSET // 16) << 8

GCMD_TE, GCMD_SRTP, GCMD_SFL, GCMD_EAFL, GCMD_WBF = 1 << 31, 1 << 30, 1 << 29, 1 << 28, 1 << 27
GCMD_QIE, GCMD_IRE, GCMD_SIRTP, GCMD_CFI = 1 << 26, 1 << 25, 1 << 24, 1 << 23
GSTS_TES, GSTS_RTPS, GSTS_QIES = GCMD_TE, GCMD_SRTP, GCMD_QIE
RTADDR_TTM = 0b11 << 10              # translation table mode: 00 legacy (the only one here)

CCMD_ICC = 1 << 63
IOTLB_IVT = 1 << 63
GRANULARITY_GLOBAL, GRANULARITY_DOMAIN, GRANULARITY_DEVICE_OR_PAGE = 1, 2, 3

FSTS_PFO, FSTS_PPF, FSTS_IQE, FSTS_ICE, FSTS_ITE = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 6
FSTS_W1C = FSTS_PFO | 1 << 2 | FSTS_IQE | FSTS_ICE | FSTS_ITE
FECTL_IM, FECTL_IP = 1 << 31, 1 << 30
ICS_IWC = 1
FRCD_F = 1 << 127
FRCD_T_READ = 1 << 126

# --- invalidation queue descriptors (§6.5.2) -------------------------------------------------------------------
QI_CONTEXT, QI_IOTLB, QI_DEVICE_TLB, QI_IEC, QI_WAIT = 1, 2, 3, 4, 5
QI_WAIT_IF, QI_WAIT_SW, QI_WAIT_FN = 1 << 4, 1 << 5, 1 << 6
QI_DESC_SIZE = 16
IQA_DW = 1 << 11

# --- fault reasons (appendix A) --------------------------------------------------------------------------------
FR_ROOT_NOT_PRESENT = 0x1
FR_CONTEXT_NOT_PRESENT = 0x2
FR_CONTEXT_INVALID = 0x3
FR_ADDRESS_BEYOND_AW = 0x4
FR_WRITE = 0x5
FR_READ = 0x6
FR_PAGING_ENTRY_ACCESS = 0x7
FR_ROOT_TABLE_ACCESS = 0x8
FR_CONTEXT_TABLE_ACCESS = 0x9
FR_ROOT_RESERVED = 0xA
FR_CONTEXT_RESERVED = 0xB
FR_PAGING_ENTRY_RESERVED = 0xC
FAULT_REASONS = {
    FR_ROOT_NOT_PRESENT: "root entry not present", FR_CONTEXT_NOT_PRESENT: "context entry not present",
    FR_CONTEXT_INVALID: "invalid context entry", FR_ADDRESS_BEYOND_AW: "address beyond the address width",
    FR_WRITE: "write to a page without W", FR_READ: "read of a page without R",
    FR_PAGING_ENTRY_ACCESS: "page-table entry outside RAM", FR_ROOT_TABLE_ACCESS: "root table outside RAM",
    FR_CONTEXT_TABLE_ACCESS: "context table outside RAM", FR_ROOT_RESERVED: "reserved bits in a root entry",
    FR_CONTEXT_RESERVED: "reserved bits in a context entry", FR_PAGING_ENTRY_RESERVED: "reserved bits in a "
    "page-table entry",
}

# --- table entries (§9) ----------------------------------------------------------------------------------------
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
ADDRESS_MASK = ((1 << HOST_ADDRESS_WIDTH) - 1) & ~(PAGE_SIZE - 1)
RESERVED_HIGH = ((1 << 52) - 1) & ~((1 << HOST_ADDRESS_WIDTH) - 1)      # address bits above the host width
ROOT_RESERVED_LO = 0xFFE | RESERVED_HIGH
CONTEXT_TT_TRANSLATE, CONTEXT_TT_PASS_THROUGH = 0, 2
CONTEXT_RESERVED_LO = 0xFF0 | RESERVED_HIGH
CONTEXT_RESERVED_HI = ~((0xFFFF << 8) | 0x7F) & ((1 << 64) - 1)        # all but DID, AW and the ignored bits
LEVELS_BY_AW = {1: 3, 2: 4}
PTE_R, PTE_W, PTE_PS = 1, 2, 1 << 7
IOTLB_CAPACITY = 8192


@dataclass
class ContextEntry:
    did: int
    pass_through: bool
    table: int          # second-level page table (guest-physical)
    levels: int         # 3 or 4
    fpd: bool           # fault processing disabled


@dataclass
class IotlbEntry:
    did: int
    gpa: int            # guest-physical address of the 4 KiB page
    size: int           # the page size of the mapping (4 KiB, 2 MiB, 1 GiB): for page-selective invalidation
    iova_base: int      # the mapping's first I/O virtual address
    readable: bool
    writable: bool
    pinned: bool = False    # backs a long-lived view: its removal bumps the device's DMA space epoch


@dataclass(slots=True)
class DeviceCounters:
    translations: int = 0
    iotlb_hits: int = 0
    iotlb_misses: int = 0
    faults: int = 0


def _key(source_id: int, addr: int) -> int:
    """The IOTLB key of the 4 KiB page holding addr for source_id (an int: cheaper to hash than a tuple)."""
    return source_id << 52 | addr >> PAGE_SHIFT


@dataclass
class IntelIommuState:
    """The guest-visible registers (everything else is a cache the guest must invalidate)."""
    gcmd: int = 0                   # the persistent command bits last written (TE, QIE)
    gsts: int = 0
    rtaddr: int = 0                 # as written
    root: int = 0                   # as latched by GCMD.SRTP
    ccmd: int = 0
    fsts: int = 0
    fectl: int = FECTL_IM
    fedata: int = 0
    feaddr: int = 0
    feuaddr: int = 0
    aflog: int = 0
    pmen: int = 0
    plmbase: int = 0
    plmlimit: int = 0
    phmbase: int = 0
    phmlimit: int = 0
    iqh: int = 0
    iqt: int = 0
    iqa: int = 0
    ics: int = 0
    iectl: int = FECTL_IM
    iedata: int = 0
    ieaddr: int = 0
    ieuaddr: int = 0
    irta: int = 0
    iva: int = 0
    iotlb: int = 0
    frcd: list[int] = field(default_factory=lambda: [0] * FAULT_RECORDS)   # 128-bit records
    next_fault: int = 0             # FSTS.FRI: the record the next fault goes into


class IntelIommu:
    """The VT-d remapping unit at `base` (its DRHD in the DMAR table). `send_msi(address, data)` delivers the fault
    and invalidation-completion interrupts."""

    def __init__(self, name: str, base: int, memory: GuestMemory, send_msi: Callable[[int, int], None]) -> None:
        self.name = name
        self.base = base
        self.memory = memory
        self.send_msi = send_msi
        self.state = IntelIommuState()
        self.lock = threading.Lock()           # registers (vCPUs) and translations (vCPUs, the I/O thread)
        for i in range(FAULT_RECORDS):          # the fault recording registers' hooks, by name for the bank
            setattr(self, f"_read_frcd{i}_lo", lambda i=i: self.state.frcd[i] & ((1 << 64) - 1))
            setattr(self, f"_read_frcd{i}_hi", lambda i=i: self.state.frcd[i] >> 64)
            setattr(self, f"_write_frcd{i}_hi", lambda value, i=i: self._write_frcd_hi(i, value))
        self.bank = RegisterBank(self, self._registers(), self.state, name)
        self._contexts: dict[int, ContextEntry] = {}
        self._iotlb: dict[int, IotlbEntry] = {}          # _key(source-id, page) -> leaf
        self.spaces: dict[int, TranslatedDma] = {}        # source-id -> its device's DMA space
        self.stats: dict[int, DeviceCounters] = {}        # source-id -> its counters
        self.invalidations: Counter = Counter()
        self._warned: set[tuple[int, int]] = set()

    def _registers(self) -> list[Register]:
        regs = [
            Register(VER, "ver", width=4, reset=VERSION, read="_read_ver", write="_ignore"),
            Register(CAP, "cap", width=8, read="_read_cap", write="_ignore"),
            Register(ECAP, "ecap", width=8, read="_read_ecap", write="_ignore"),
            Register(GCMD, "gcmd", width=4, read="_read_zero", write="_write_gcmd"),
            Register(GSTS, "gsts", width=4, writable=0),
            Register(RTADDR, "rtaddr", width=8, writable=ADDRESS_MASK | RTADDR_TTM),
            Register(CCMD, "ccmd", width=8, write="_write_ccmd"),
            Register(FSTS, "fsts", width=4, read="_read_fsts", write="_write_fsts"),
            Register(FECTL, "fectl", width=4, write="_write_fectl"),
            Register(FEDATA, "fedata", width=4),
            Register(FEADDR, "feaddr", width=4, writable=0xFFFFFFFC),
            Register(FEUADDR, "feuaddr", width=4),
            Register(AFLOG, "aflog", width=8, writable=0),
            Register(PMEN, "pmen", width=4, writable=0),
            Register(PLMBASE, "plmbase", width=4, writable=0),
            Register(PLMLIMIT, "plmlimit", width=4, writable=0),
            Register(PHMBASE, "phmbase", width=8, writable=0),
            Register(PHMLIMIT, "phmlimit", width=8, writable=0),
            Register(IQH, "iqh", width=8, writable=0),
            Register(IQT, "iqt", width=8, write="_write_iqt"),
            Register(IQA, "iqa", width=8, writable=ADDRESS_MASK | IQA_DW | 0x7),
            Register(ICS, "ics", width=4, write="_write_ics"),
            Register(IECTL, "iectl", width=4, write="_write_iectl"),
            Register(IEDATA, "iedata", width=4),
            Register(IEADDR, "ieaddr", width=4, writable=0xFFFFFFFC),
            Register(IEUADDR, "ieuaddr", width=4),
            Register(IRTA, "irta", width=8),
            Register(IVA, "iva", width=8, writable=ADDRESS_MASK | 0x7F),
            Register(IOTLB, "iotlb", width=8, write="_write_iotlb"),
        ]
        for i in range(FAULT_RECORDS):
            regs.append(Register(FRCD_OFFSET + 16 * i, f"frcd{i}_lo", width=8, read=f"_read_frcd{i}_lo",
                                 write="_ignore"))
            regs.append(Register(FRCD_OFFSET + 16 * i + 8, f"frcd{i}_hi", width=8, read=f"_read_frcd{i}_hi",
                                 write=f"_write_frcd{i}_hi"))
        return regs

    # --- the device contract -------------------------------------------------------------------------------------
    def claims(self) -> list[Claim]:
        return [Claim.mmio(self.base, self.bank.region(REGISTER_BLOCK_SIZE, self.name, lock=self.lock))]

    def reset(self) -> None:
        with self.lock:
            fresh = IntelIommuState()
            for f in fields(fresh):             # in place: the register bank reads and writes this object
                setattr(self.state, f.name, getattr(fresh, f.name))
            self._flush(None, None)

    def describe(self) -> dict:
        st = self.state
        return {"translation": bool(st.gsts & GSTS_TES), "queued-invalidation": bool(st.gsts & GSTS_QIES),
                "root-table": st.root, "fault-status": st.fsts, "iotlb-entries": len(self._iotlb),
                "invalidations": dict(self.invalidations), "devices": self.counters()}

    # --- DMA spaces ----------------------------------------------------------------------------------------------
    def dma_space(self, name: str, source_id: int) -> TranslatedDma:
        """The DMA space of the device `name` at `source_id` (bus << 8 | devfn)."""
        space = TranslatedDma(name, self.memory, self, source_id)
        self.spaces[source_id] = space
        self.stats[source_id] = DeviceCounters()
        return space

    def counters(self) -> dict[str, dict[str, int]]:
        """Per device: translations, IOTLB hits and misses, faults."""
        return {(self.spaces[sid].name if sid in self.spaces else f"{sid:#06x}"):
                {"translations": c.translations, "iotlb-hits": c.iotlb_hits, "iotlb-misses": c.iotlb_misses,
                 "faults": c.faults} for sid, c in self.stats.items()}

    # --- translation ---------------------------------------------------------------------------------------------
    def translate(self, source_id: int, addr: int, write: bool, pin: bool = False) -> tuple[int, int]:
        with self.lock:
            stats = self.stats.get(source_id)
            if stats is None:
                stats = self.stats[source_id] = DeviceCounters()
            stats.translations += 1
            if not self.state.gsts & GSTS_TES:
                return addr, PAGE_SIZE - (addr & (PAGE_SIZE - 1))       # translation off: addresses are physical
            key = source_id << 52 | addr >> PAGE_SHIFT
            entry = self._iotlb.get(key)
            if entry is None:
                stats.iotlb_misses += 1
                try:
                    entry = self._walk(source_id, addr, write)
                except _Fault as f:
                    raise self._fault(source_id, addr, write, f.reason, f.fpd) from None
                if entry is None:                                   # pass-through
                    return addr, PAGE_SIZE - (addr & (PAGE_SIZE - 1))
                if len(self._iotlb) >= IOTLB_CAPACITY:
                    oldest = next(iter(self._iotlb))
                    if self._iotlb.pop(oldest).pinned:
                        self._bump({oldest >> 52})
                self._iotlb[key] = entry
            else:
                stats.iotlb_hits += 1
            if not (entry.writable if write else entry.readable):
                raise self._fault(source_id, addr, write, FR_WRITE if write else FR_READ,
                                  self._contexts[source_id].fpd if source_id in self._contexts else False)
            if pin:
                entry.pinned = True
            offset = addr & (PAGE_SIZE - 1)
            return entry.gpa + offset, PAGE_SIZE - offset

    def _read_entry(self, addr: int, reason: int) -> int:
        try:
            return self.memory.read_int(addr, 8)
        except GuestMemoryError:
            raise _Fault(reason) from None

    def context(self, source_id: int) -> ContextEntry:
        """The context entry of `source_id` (from the context cache, else the tables); raises `_Fault`."""
        ctx = self._contexts.get(source_id)
        if ctx is not None:
            return ctx
        bus, devfn = source_id >> 8, source_id & 0xFF
        root = self.state.root & ADDRESS_MASK
        root_lo = self._read_entry(root + 16 * bus, FR_ROOT_TABLE_ACCESS)
        root_hi = self._read_entry(root + 16 * bus + 8, FR_ROOT_TABLE_ACCESS)
        if not root_lo & 1:
            raise _Fault(FR_ROOT_NOT_PRESENT)
        if root_lo & ROOT_RESERVED_LO or root_hi:
            raise _Fault(FR_ROOT_RESERVED)
        table = root_lo & ADDRESS_MASK
        lo = self._read_entry(table + 16 * devfn, FR_CONTEXT_TABLE_ACCESS)
        hi = self._read_entry(table + 16 * devfn + 8, FR_CONTEXT_TABLE_ACCESS)
        if not lo & 1:
            raise _Fault(FR_CONTEXT_NOT_PRESENT)
        fpd = bool(lo & 2)
        if lo & CONTEXT_RESERVED_LO or hi & CONTEXT_RESERVED_HI:
            raise _Fault(FR_CONTEXT_RESERVED, fpd)
        tt, aw = (lo >> 2) & 3, hi & 7
        if tt == CONTEXT_TT_PASS_THROUGH:
            ctx = ContextEntry((hi >> 8) & 0xFFFF, True, 0, 0, fpd)
        elif tt == CONTEXT_TT_TRANSLATE and aw in LEVELS_BY_AW:
            ctx = ContextEntry((hi >> 8) & 0xFFFF, False, lo & ADDRESS_MASK, LEVELS_BY_AW[aw], fpd)
        else:
            raise _Fault(FR_CONTEXT_INVALID, fpd)
        self._contexts[source_id] = ctx
        return ctx

    def _walk(self, source_id: int, addr: int, write: bool) -> IotlbEntry | None:
        """The second-level walk for `addr` (None: the context passes addresses through); raises `_Fault`, for a
        page that is not present too (nothing is cached for it)."""
        ctx = self.context(source_id)
        if ctx.pass_through:
            return None
        width = PAGE_SHIFT + 9 * ctx.levels
        if addr >> width:
            raise _Fault(FR_ADDRESS_BEYOND_AW, ctx.fpd)
        table, readable, writable = ctx.table, True, True
        for level in range(ctx.levels, 0, -1):
            shift = PAGE_SHIFT + 9 * (level - 1)
            pte = self._read_entry(table + 8 * ((addr >> shift) & 0x1FF), FR_PAGING_ENTRY_ACCESS)
            readable, writable = readable and bool(pte & PTE_R), writable and bool(pte & PTE_W)
            if not pte & (PTE_R | PTE_W):
                raise _Fault(FR_WRITE if write else FR_READ, ctx.fpd)
            large = level > 1 and pte & PTE_PS
            if pte & RESERVED_HIGH or (level == 4 and pte & PTE_PS) \
                    or (large and pte & ((1 << shift) - 1) & ~0xFFF):
                raise _Fault(FR_PAGING_ENTRY_RESERVED, ctx.fpd)
            if level == 1 or large:
                base = pte & ADDRESS_MASK & ~((1 << shift) - 1)
                page = addr & ((1 << shift) - 1) & ~(PAGE_SIZE - 1)
                return IotlbEntry(ctx.did, base + page, 1 << shift, addr & ~((1 << shift) - 1), readable, writable)
            table = pte & ADDRESS_MASK
        raise AssertionError("unreachable")

    # --- faults (§7.2) -------------------------------------------------------------------------------------------
    def _fault(self, source_id: int, addr: int, write: bool, reason: int, fpd: bool = False) -> DmaFault:
        """Record a refused access (unless the context disabled fault processing) and describe it for the device."""
        gone = self._iotlb.pop(_key(source_id, addr), None)      # never keep an entry that refused an access
        if gone is not None and gone.pinned:
            self._bump({source_id})
        self.stats[source_id].faults += 1
        name = self.spaces[source_id].name if source_id in self.spaces else f"{source_id:#06x}"
        what = f"{'write' if write else 'read'} of {addr:#x}"
        message = (f"{self.name}: DMA {what} by {name} ({source_id >> 8:02x}:{(source_id >> 3) & 0x1F:02x}."
                   f"{source_id & 7}) refused: {FAULT_REASONS.get(reason, reason)} (fault reason {reason:#x})")
        if (source_id, reason) not in self._warned:
            self._warned.add((source_id, reason))
            log.warning("%s", message)
        if not fpd:
            self._record_fault(source_id, addr, write, reason)
        return DmaFault(message, addr, write, reason)

    def _record_fault(self, source_id: int, addr: int, write: bool, reason: int) -> None:
        """Into the next fault recording register (§7.2.1); overflow (PFO) when that one is still full. The fault
        event is for the transition to "a fault is pending": software clears every record it finds per event."""
        st = self.state
        if st.fsts & FSTS_PFO:
            return
        pending = self._fault_pending()
        i = st.next_fault
        if st.frcd[i] & FRCD_F:
            st.fsts |= FSTS_PFO
        else:
            st.frcd[i] = (FRCD_F | (0 if write else FRCD_T_READ) | reason << 96 | source_id << 64
                          | (addr & ~(PAGE_SIZE - 1)))
            st.next_fault = (i + 1) % FAULT_RECORDS
        if not pending:
            self._fault_event()

    def _fault_pending(self) -> bool:
        return any(r & FRCD_F for r in self.state.frcd)

    def _fault_event(self) -> None:
        """The fault event interrupt: sent now, or left pending (FECTL.IP) while FECTL.IM masks it."""
        st = self.state
        st.fectl |= FECTL_IP
        if not st.fectl & FECTL_IM:
            self._send_fault_msi()

    def _send_fault_msi(self) -> None:
        st = self.state
        st.fectl &= ~FECTL_IP
        self.send_msi(st.feuaddr << 32 | st.feaddr, st.fedata)

    def _read_fsts(self) -> int:
        st = self.state
        return (st.fsts & ~(0xFF << 8) & ~FSTS_PPF) | (FSTS_PPF if self._fault_pending() else 0) | st.next_fault << 8

    def _write_fsts(self, value: int) -> None:
        st = self.state
        st.fsts &= ~(value & FSTS_W1C)
        if not (st.fsts & (FSTS_PFO | FSTS_IQE | FSTS_ICE | FSTS_ITE) or self._fault_pending()):
            st.fectl &= ~FECTL_IP

    def _write_fectl(self, value: int) -> None:
        st = self.state
        st.fectl = (st.fectl & FECTL_IP) | (value & FECTL_IM)
        if not value & FECTL_IM and st.fectl & FECTL_IP:
            self._send_fault_msi()

    def _write_frcd_hi(self, i: int, value: int) -> None:
        st = self.state
        if value & (1 << 63):                   # F is write-1-to-clear
            st.frcd[i] &= ~FRCD_F
        if not (st.fsts & (FSTS_PFO | FSTS_IQE | FSTS_ICE | FSTS_ITE) or self._fault_pending()):
            st.fectl &= ~FECTL_IP

    # --- commands ------------------------------------------------------------------------------------------------
    def _write_gcmd(self, value: int) -> None:
        st = self.state
        if value & GCMD_SRTP:
            if st.rtaddr & RTADDR_TTM:
                log.warning("%s: RTADDR asks for a translation table mode other than legacy (%#x): not supported",
                            self.name, st.rtaddr)
            st.root = st.rtaddr
            st.gsts |= GSTS_RTPS
            self._flush(None, None)
        if (value ^ st.gsts) & GCMD_TE:
            st.gsts ^= GSTS_TES
            self._flush(None, None)
            log.info("%s: DMA remapping %s", self.name, "on" if value & GCMD_TE else "off")
        if (value ^ st.gsts) & GCMD_QIE:
            if value & GCMD_QIE:
                st.iqh = 0
            st.gsts ^= GSTS_QIES
        if value & (GCMD_IRE | GCMD_SIRTP | GCMD_EAFL | GCMD_SFL) and (self.name, -1) not in self._warned:
            self._warned.add((self.name, -1))
            log.warning("%s: GCMD %#x asks for interrupt remapping or fault logging, which this unit does not have",
                        self.name, value)
        st.gcmd = value & (GCMD_TE | GCMD_QIE)

    def _write_ccmd(self, value: int) -> None:
        if value & CCMD_ICC:
            granularity = (value >> 61) & 3
            self._invalidate_context(granularity, value & 0xFFFF, (value >> 16) & 0xFFFF, (value >> 32) & 3)
            value = (value & ~CCMD_ICC & ~(3 << 59)) | (granularity or GRANULARITY_GLOBAL) << 59
        self.state.ccmd = value

    def _write_iotlb(self, value: int) -> None:
        if value & IOTLB_IVT:
            granularity = (value >> 60) & 3
            iva = self.state.iva
            self._invalidate_iotlb(granularity, (value >> 32) & 0xFFFF, iva & ADDRESS_MASK, iva & 0x3F)
            value = (value & ~IOTLB_IVT & ~(3 << 57)) | (granularity or GRANULARITY_GLOBAL) << 57
        self.state.iotlb = value

    def _invalidate_context(self, granularity: int, did: int, source_id: int, function_mask: int) -> None:
        self.invalidations["context"] += 1
        if granularity == GRANULARITY_DEVICE_OR_PAGE:
            mask = ~(0b111 & (0b111 << (3 - function_mask)))      # FM 1/2/3 masks function bits 2, 2:1, 2:0
            sids = [s for s in self._contexts if s & mask == source_id & mask]
            for sid in sids:
                del self._contexts[sid]
            # a context entry change makes its IOTLB entries stale too (§6.5.1.1: software then does a domain
            # IOTLB invalidation, but nothing is lost by dropping them here)
            self._flush(None, set(sids))
        elif granularity == GRANULARITY_DOMAIN:
            sids = {s for s, c in self._contexts.items() if c.did == did}
            for sid in sids:
                del self._contexts[sid]
            self._flush(did, sids)
        else:
            self._contexts.clear()
            self._flush(None, None)

    def _invalidate_iotlb(self, granularity: int, did: int, addr: int, mask: int) -> None:
        self.invalidations["iotlb"] += 1
        if granularity == GRANULARITY_DEVICE_OR_PAGE:
            self.invalidations["iotlb-page"] += 1
            size = PAGE_SIZE << min(mask, 52)
            start = addr & ~(size - 1)
            stale = [k for k, e in self._iotlb.items() if e.did == did
                     and e.iova_base < start + size and start < e.iova_base + e.size]
            self._drop(stale)
        elif granularity == GRANULARITY_DOMAIN:
            self._flush(did, None)
        else:
            self._flush(None, None)

    def _flush(self, did: int | None, sids: set[int] | None) -> None:
        """Drop IOTLB entries (all, or of domain `did`, or of the source-ids `sids`) and tell the devices whose
        long-lived views depended on them."""
        if did is None and sids is None:
            self._iotlb.clear()
            self._contexts.clear()
            self._bump(set(self.spaces))
        else:
            self._drop([k for k, e in self._iotlb.items() if (did is not None and e.did == did)
                        or (sids is not None and k >> 52 in sids)])
            self._bump(sids or set())           # a changed context: every view of those devices

    def _drop(self, keys: list[int]) -> None:
        """Remove IOTLB entries; devices that held long-lived views through one of them translate again."""
        self._bump({k >> 52 for k in keys if self._iotlb.pop(k).pinned})

    def _bump(self, sids: set[int]) -> None:
        for sid in sids:
            space = self.spaces.get(sid)
            if space is not None:
                space.epoch += 1

    # --- the invalidation queue (§6.5.2) -------------------------------------------------------------------------
    def _write_iqt(self, value: int) -> None:
        st = self.state
        st.iqt = value & 0x7FFF0
        if st.gsts & GSTS_QIES:
            self._process_queue()

    def _process_queue(self) -> None:
        st = self.state
        if st.fsts & FSTS_IQE:
            return                              # stopped at a bad descriptor until software clears IQE
        if st.iqa & IQA_DW:
            self._queue_error("256-bit descriptors (IQA.DW) are for scalable mode, which this unit does not have")
            return
        entries = 256 << (st.iqa & 7)
        base = st.iqa & ADDRESS_MASK
        while st.iqh != st.iqt:
            index = (st.iqh >> 4) % entries
            try:
                desc = self.memory.read(base + QI_DESC_SIZE * index, QI_DESC_SIZE)
            except GuestMemoryError:
                self._queue_error(f"descriptor {index} at {base + QI_DESC_SIZE * index:#x} is outside RAM")
                return
            lo, hi = int.from_bytes(desc[:8], "little"), int.from_bytes(desc[8:], "little")
            if not self._queue_descriptor(lo, hi):
                self._queue_error(f"descriptor {index} ({lo:#018x} {hi:#018x}) is not one this unit knows")
                return
            st.iqh = ((index + 1) % entries) << 4

    def _queue_descriptor(self, lo: int, hi: int) -> bool:
        kind = lo & 0xF
        granularity = (lo >> 4) & 3
        if lo >> 9 & 0x7 or kind > QI_WAIT:                    # bits 11:9 are the descriptor type's high bits
            return False
        if kind == QI_CONTEXT:
            self._invalidate_context(granularity, (lo >> 16) & 0xFFFF, (lo >> 32) & 0xFFFF, (lo >> 48) & 3)
        elif kind == QI_IOTLB:
            self._invalidate_iotlb(granularity, (lo >> 16) & 0xFFFF, hi & ADDRESS_MASK, hi & 0x3F)
        elif kind in (QI_DEVICE_TLB, QI_IEC):
            self.invalidations["device-tlb" if kind == QI_DEVICE_TLB else "interrupt-entry"] += 1
        elif kind == QI_WAIT:
            self.invalidations["wait"] += 1
            if lo & QI_WAIT_SW:
                try:
                    self.memory.write(hi & ~3, (lo >> 32).to_bytes(4, "little"))
                except GuestMemoryError:
                    return False
            if lo & QI_WAIT_IF:
                self.state.ics |= ICS_IWC
                self._completion_event()
        else:
            return False
        return True

    def _queue_error(self, why: str) -> None:
        log.warning("%s: invalidation queue stopped: %s", self.name, why)
        self.state.fsts |= FSTS_IQE
        self._fault_event()

    def _completion_event(self) -> None:
        st = self.state
        if st.iectl & FECTL_IP:
            return
        st.iectl |= FECTL_IP
        if not st.iectl & FECTL_IM:
            st.iectl &= ~FECTL_IP
            self.send_msi(st.ieuaddr << 32 | st.ieaddr, st.iedata)

    def _write_ics(self, value: int) -> None:
        st = self.state
        st.ics &= ~(value & ICS_IWC)
        if not st.ics & ICS_IWC:
            st.iectl &= ~FECTL_IP

    def _write_iectl(self, value: int) -> None:
        st = self.state
        st.iectl = (st.iectl & FECTL_IP) | (value & FECTL_IM)
        if not value & FECTL_IM and st.iectl & FECTL_IP:
            st.iectl &= ~FECTL_IP
            self.send_msi(st.ieuaddr << 32 | st.ieaddr, st.iedata)

    # --- constant registers --------------------------------------------------------------------------------------
    def _read_ver(self) -> int:
        return VERSION

    def _read_cap(self) -> int:
        return CAP_VALUE

    def _read_ecap(self) -> int:
        return ECAP_VALUE

    def _read_zero(self) -> int:
        return 0

    def _ignore(self, value: int) -> None:
        pass


class _Fault(Exception):
    def __init__(self, reason: int, fpd: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fpd = fpd
