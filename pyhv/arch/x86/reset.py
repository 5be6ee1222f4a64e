"""The architectural state of an x86 CPU after RESET (Intel SDM vol. 3, 9.1.1): real mode at the reset vector
F000:FFF0 with CS.base = 0xFFFF0000, so the first fetch is at 0xFFFFFFF0, the top of the firmware ROM."""
from __future__ import annotations

from pyhv.kvm import Vcpu
from pyhv.kvm import structs as S

RESET_CR0 = 0x60000010      # CD | NW | ET
RESET_RFLAGS = 0x2


def _segment(seg: S.kvm_segment, selector: int, base: int, type_: int, s: int = 1) -> None:
    seg.selector, seg.base, seg.limit, seg.type = selector, base, 0xFFFF, type_
    seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl, seg.unusable = 1, 0, 0, s, 0, 0, 0, 0


def reset_state(vcpu: Vcpu, processor_signature: int = 0x600) -> None:
    """Put `vcpu` in the RESET state; EDX holds the processor signature (CPUID.1:EAX) as on hardware."""
    sregs = vcpu.get_sregs()
    _segment(sregs.cs, 0xF000, 0xFFFF0000, 0xB)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _segment(getattr(sregs, name), 0, 0, 0x3)
    _segment(sregs.tr, 0, 0, 0xB, s=0)
    _segment(sregs.ldt, 0, 0, 0x2, s=0)
    sregs.gdt.base, sregs.gdt.limit = 0, 0xFFFF
    sregs.idt.base, sregs.idt.limit = 0, 0xFFFF
    sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.efer = RESET_CR0, 0, 0, 0, 0
    vcpu.set_sregs(sregs)
    regs = S.kvm_regs()
    regs.rip, regs.rflags, regs.rdx = 0xFFF0, RESET_RFLAGS, processor_signature
    vcpu.set_regs(regs)
