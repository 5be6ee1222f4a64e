"""CPU state at a kernel's entry point, for direct kernel boot (no firmware):

- 64-bit boot protocol: long mode, paging on with the low 4 GiB identity-mapped by 2 MiB pages, a GDT with
  the flat __BOOT_CS (0x10) and __BOOT_DS (0x18) descriptors, interrupts off, RSI = zero page.
- PVH: 32-bit protected mode, paging off, flat segments, EBX = hvm_start_info.
Plus what firmware would otherwise have done: MTRRs on with write-back default, fast strings, FPU/SSE
defaults, and the local APIC's LINT0 as ExtINT and LINT1 as NMI (as the MP table describes them).
"""
from __future__ import annotations

import struct

from pyhv.kvm import Vcpu
from pyhv.kvm import structs as S
from pyhv.memory import GuestMemory
from pyhv.arch.x86.layout import GDT_ADDR, PD_ADDR, PDPT_ADDR, PML4_ADDR

BOOT_CS, BOOT_DS, BOOT_TSS = 0x10, 0x18, 0x20
PVH_CS, PVH_DS, PVH_TSS = 0x08, 0x10, 0x18

CR0_PE, CR0_ET, CR0_PG = 1 << 0, 1 << 4, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10

MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE, MTRR_TYPE_WRBACK = 1 << 11, 6
APIC_LVT_LINT0, APIC_LVT_LINT1 = 0x350, 0x360
APIC_MODE_EXTINT, APIC_MODE_NMI = 0x7 << 8, 0x4 << 8

GDT = [0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00808B000000FFFF]   # null, null, code64, data, TSS
PVH_GDT = [0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF, 0x00808B000000FFFF]   # null, code32, data, TSS


def _seg(selector: int, type_: int, *, l: int = 0, db: int = 1, s: int = 1, limit: int = 0xFFFFFFFF,
         g: int = 1) -> S.kvm_segment:
    return S.kvm_segment(base=0, limit=limit, selector=selector, type=type_, present=1, dpl=0, db=db, s=s, l=l,
                         g=g, avl=0, unusable=0)


def write_identity_page_tables(memory: GuestMemory) -> None:
    """PML4 -> one PDPT -> four page directories of 2 MiB pages: 0-4 GiB identity-mapped."""
    memory.write(PML4_ADDR, struct.pack("<Q", PDPT_ADDR | 0x3) + bytes(4088))
    memory.write(PDPT_ADDR, b"".join(struct.pack("<Q", (PD_ADDR + 0x1000 * i) | 0x3) for i in range(4))
                 + bytes(4096 - 32))
    memory.write(PD_ADDR, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(2048)))


def _common_sregs(vcpu: Vcpu, gdt: list[int]) -> S.kvm_sregs:
    sregs = vcpu.get_sregs()
    sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, 8 * len(gdt) - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.ldt = S.kvm_segment(selector=0, type=2, present=1, s=0, limit=0xFFFF)
    return sregs


def enter_long_mode(vcpu: Vcpu, memory: GuestMemory, entry: int, zero_page: int) -> None:
    memory.write(GDT_ADDR, b"".join(struct.pack("<Q", d) for d in GDT))
    write_identity_page_tables(memory)
    sregs = _common_sregs(vcpu, GDT)
    sregs.cs = _seg(BOOT_CS, 0xB, l=1, db=0)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _seg(BOOT_DS, 0x3))
    sregs.tr = _seg(BOOT_TSS, 0xB, db=0, s=0, limit=0x67, g=0)
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG
    sregs.cr3 = PML4_ADDR
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    vcpu.set_regs(S.kvm_regs(rip=entry, rsi=zero_page, rflags=0x2, rsp=0x8FF0))


def enter_pvh(vcpu: Vcpu, memory: GuestMemory, entry: int, start_info: int) -> None:
    memory.write(GDT_ADDR, b"".join(struct.pack("<Q", d) for d in PVH_GDT))
    sregs = _common_sregs(vcpu, PVH_GDT)
    sregs.cs = _seg(PVH_CS, 0xB)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _seg(PVH_DS, 0x3))
    sregs.tr = _seg(PVH_TSS, 0xB, s=0, limit=0x67, g=0)
    sregs.cr0 = CR0_PE | CR0_ET
    sregs.cr3 = sregs.cr4 = sregs.efer = 0
    vcpu.set_sregs(sregs)
    vcpu.set_regs(S.kvm_regs(rip=entry, rbx=start_info, rflags=0x2))


def firmware_defaults(vcpu: Vcpu, bsp: bool) -> None:
    """What a BIOS leaves behind that a directly booted kernel relies on."""
    vcpu.set_msrs({MSR_IA32_MISC_ENABLE: MSR_IA32_MISC_ENABLE_FAST_STRING,
                   MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRBACK})
    fpu = S.kvm_fpu()
    fpu.fcw, fpu.mxcsr = 0x37F, 0x1F80
    vcpu.set_fpu(fpu)
    if bsp:
        lapic = vcpu.get_lapic()
        regs = bytearray(lapic.regs)
        for offset, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
            value = struct.unpack_from("<I", regs, offset)[0]
            struct.pack_into("<I", regs, offset, (value & ~0x700 & ~(1 << 16)) | mode)
        lapic.regs[:] = regs
        vcpu.set_lapic(lapic)
