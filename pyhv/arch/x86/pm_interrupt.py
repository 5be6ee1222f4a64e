"""Delivering an external interrupt to a 32-bit protected-mode guest, for PVM hosts that cannot.

PVM delivers events only through its own per-vCPU structure (long-mode PVM guests) or, in real mode, through the
IVT. A guest that enables interrupts in legacy protected mode (iPXE does: it waits with `sti; hlt` on an IDT of
its own) gets a triple fault instead: the in-kernel PIC has acknowledged the interrupt (its ISR bit is set), the
vCPU's registers are untouched, and KVM reports `KVM_EXIT_SHUTDOWN`. pyhv then does what the CPU would have done
(Intel SDM vol. 3 §6.12.1, same privilege level, no error code):

    vector   from the PIC's in-service register (the highest priority bit, through the cascade on IRQ 2)
    gate     IDT[vector]: a present 32-bit interrupt or trap gate, its code segment from the GDT
    stack    push EFLAGS, CS, EIP on SS:ESP (SS's base; ESP or SP as SS's B bit says)
    enter    CS:EIP from the gate; IF cleared for an interrupt gate; TF, NT, RF cleared

and re-enters the guest. The handler's `iret` then fails in KVM's emulator (it performs only the real-mode one):
`return_from_interrupt` is the other half, called from the emulation-failure fallbacks (emulate.py). Only
non-paged protected mode at CPL 0 with IF set qualifies (so linear addresses are physical and no stack switch is
needed); anything else stays a triple fault.
"""
from __future__ import annotations

import struct
from typing import Callable

from pyhv.kvm import structs as S

CR0_PE, CR0_PG = 1 << 0, 1 << 31
EFER_LMA = 1 << 10
RFLAGS_TF, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_VM = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17
GATE_INTERRUPT32, GATE_TRAP32 = 0xE, 0xF
PIC_ISR, PIC_PRIORITY_ADD, PIC_IRQ_BASE = 3, 4, 5      # offsets in struct kvm_pic_state
CASCADE_IRQ = 2


class NotDeliverable(Exception):
    """The triple fault is not one this fallback explains (the message says why)."""


def in_service_vector(master: bytes, slave: bytes) -> int:
    """The vector of the interrupt the 8259 pair has acknowledged and not yet seen an EOI for."""
    def highest(chip: bytes) -> int | None:
        isr, rotate = chip[PIC_ISR], chip[PIC_PRIORITY_ADD]
        for i in range(8):
            irq = (i + rotate) & 7
            if isr & (1 << irq):
                return irq
        return None

    irq = highest(master)
    if irq is None:
        raise NotDeliverable("no interrupt in service at the PIC")
    if irq == CASCADE_IRQ:
        slave_irq = highest(slave)
        if slave_irq is not None:
            return (slave[PIC_IRQ_BASE] + slave_irq) & 0xFF
    return (master[PIC_IRQ_BASE] + irq) & 0xFF


def _segment_from_descriptor(selector: int, raw: int) -> S.kvm_segment:
    seg = S.kvm_segment()
    seg.selector = selector
    seg.base = ((raw >> 16) & 0xFFFFFF) | (((raw >> 56) & 0xFF) << 24)
    limit = (raw & 0xFFFF) | (((raw >> 48) & 0xF) << 16)
    seg.g = (raw >> 55) & 1
    seg.limit = (limit << 12) | 0xFFF if seg.g else limit
    seg.type = (raw >> 40) & 0xF
    seg.s = (raw >> 44) & 1
    seg.dpl = (raw >> 45) & 3
    seg.present = (raw >> 47) & 1
    seg.avl = (raw >> 52) & 1
    seg.l = (raw >> 53) & 1
    seg.db = (raw >> 54) & 1
    return seg


def _check_mode(regs: S.kvm_regs, sregs: S.kvm_sregs) -> None:
    if not sregs.cr0 & CR0_PE or sregs.cr0 & CR0_PG or sregs.efer & EFER_LMA:
        raise NotDeliverable("the vCPU is not in non-paged protected mode")
    if regs.rflags & RFLAGS_VM or sregs.cs.dpl != 0:
        raise NotDeliverable("not at CPL 0 of protected mode")


def _code_segment(selector: int, sregs: S.kvm_sregs, read: Callable[[int, int], bytes]) -> S.kvm_segment:
    """The ring-0 32-bit code segment `selector` names in the GDT, as KVM_SET_SREGS takes it."""
    if selector & 7 or selector < 8 or (selector | 7) > sregs.gdt.limit:
        raise NotDeliverable(f"selector {selector:#x} is not a ring-0 GDT selector within the GDT's limit")
    cs = _segment_from_descriptor(selector, struct.unpack("<Q", read(sregs.gdt.base + selector, 8))[0])
    if not (cs.present and cs.s and cs.type & 8) or cs.dpl != 0 or cs.l:
        raise NotDeliverable(f"selector {selector:#x} is not a present 32-bit ring-0 code segment")
    cs.type |= 1                                    # accessed, as the CPU marks a segment it loads
    return cs


def _stack_mask(sregs: S.kvm_sregs) -> int:
    return 0xFFFFFFFF if sregs.ss.db else 0xFFFF


def return_from_interrupt(regs: S.kvm_regs, sregs: S.kvm_sregs, read: Callable[[int, int], bytes]) -> None:
    """Perform a 32-bit `iret` to the same privilege level on `regs`/`sregs` (changed in place): pop EIP, CS and
    EFLAGS. NotDeliverable (nothing changed) for a task return, a return to another ring or to virtual-8086."""
    _check_mode(regs, sregs)
    if regs.rflags & RFLAGS_NT:
        raise NotDeliverable("a task return (EFLAGS.NT)")
    mask = _stack_mask(sregs)
    sp = regs.rsp & mask
    eip, selector, eflags = struct.unpack("<III", read(sregs.ss.base + sp, 12))
    selector &= 0xFFFF
    if eflags & RFLAGS_VM or selector & 3:
        raise NotDeliverable(f"a return to virtual-8086 mode or to ring {selector & 3}")
    cs = _code_segment(selector, sregs, read)
    regs.rip = eip
    regs.rflags = (eflags & 0x3F7FD7) | 2       # the flags a CPL-0 iret may set; bit 1 always one
    regs.rsp = (regs.rsp & ~mask) | ((sp + 12) & mask)
    sregs.cs = cs


def deliver(vector: int, regs: S.kvm_regs, sregs: S.kvm_sregs, read: Callable[[int, int], bytes],
            write: Callable[[int, bytes], None]) -> None:
    """Perform the delivery of `vector` on `regs`/`sregs` (changed in place) and guest memory; NotDeliverable
    (nothing changed) when the vCPU is not in a state this covers or the IDT/GDT entry is not usable."""
    _check_mode(regs, sregs)
    if not regs.rflags & RFLAGS_IF:
        raise NotDeliverable("interrupts are off")
    if 8 * vector + 7 > sregs.idt.limit:
        raise NotDeliverable(f"vector {vector:#x} is beyond the IDT's limit {sregs.idt.limit:#x}")
    gate = struct.unpack("<Q", read(sregs.idt.base + 8 * vector, 8))[0]
    kind, present = (gate >> 40) & 0xF, (gate >> 47) & 1
    if not present or kind not in (GATE_INTERRUPT32, GATE_TRAP32):
        raise NotDeliverable(f"IDT entry {vector:#x} is not a present 32-bit interrupt or trap gate")
    cs = _code_segment((gate >> 16) & 0xFFFF, sregs, read)
    offset = (gate & 0xFFFF) | ((gate >> 32) & 0xFFFF0000)
    mask = _stack_mask(sregs)
    sp = (regs.rsp - 12) & mask
    frame = struct.pack("<III", regs.rip & 0xFFFFFFFF, sregs.cs.selector, regs.rflags & 0xFFFFFFFF)
    write(sregs.ss.base + sp, frame)
    regs.rsp = (regs.rsp & ~mask) | sp
    regs.rip = offset
    regs.rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | (RFLAGS_IF if kind == GATE_INTERRUPT32 else 0))
    sregs.cs = cs
