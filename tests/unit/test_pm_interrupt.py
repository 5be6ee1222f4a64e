"""Protected-mode interrupt delivery and `iret` for PVM hosts (pyhv/arch/x86/pm_interrupt.py), on a fake 32-bit
guest laid out like iPXE's: code and data segments with a non-zero base, an IDT of 32-bit interrupt gates."""
from __future__ import annotations

import struct

import pytest

from pyhv.arch.x86 import pm_interrupt
from pyhv.arch.x86.emulate import InstructionCompleter, UnsupportedInstruction
from pyhv.kvm import structs as S

GDT, IDT, SEG_BASE = 0x1000, 0x2000, 0x10000
HANDLER, STACK = 0x500, 0x8000        # offsets in the segments (base SEG_BASE)


def descriptor(base: int, limit: int, access: int, flags: int = 0xC) -> bytes:
    raw = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40) | (((limit >> 16) & 0xF) << 48) \
        | (flags << 52) | ((base >> 24) << 56)
    return struct.pack("<Q", raw)


def gate(selector: int, offset: int, kind: int = 0xE, present: bool = True) -> bytes:
    return struct.pack("<HHBBH", offset & 0xFFFF, selector, 0, (0x80 if present else 0) | kind, offset >> 16)


class Guest:
    def __init__(self) -> None:
        self.memory = bytearray(0x20000)
        gdt = bytes(8) + descriptor(SEG_BASE, 0xFFFFF, 0x9B) + descriptor(SEG_BASE, 0xFFFFF, 0x93) \
            + descriptor(0, 0xFFFF, 0x9B, 0)                                   # 0x18: a 16-bit code segment
        self.memory[GDT:GDT + len(gdt)] = gdt
        for v in range(0x30):
            self.memory[IDT + 8 * v:IDT + 8 * v + 8] = gate(0x08, HANDLER + 8 * v)
        self.regs = S.kvm_regs(rip=0x1234, rsp=STACK, rflags=0x246)
        s = self.sregs = S.kvm_sregs(cr0=0x11)
        s.gdt.base, s.gdt.limit = GDT, len(gdt) - 1
        s.idt.base, s.idt.limit = IDT, 8 * 0x30 - 1
        for seg, sel in ((s.cs, 0x08), (s.ss, 0x10), (s.ds, 0x10)):
            seg.base, seg.limit, seg.selector, seg.present, seg.s, seg.db, seg.g = SEG_BASE, 0xFFFFFFFF, sel, 1, 1, 1, 1
        s.cs.type, s.ss.type = 0xB, 0x3

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.memory[addr:addr + n])

    def write(self, addr: int, data: bytes) -> None:
        self.memory[addr:addr + len(data)] = data

    # the vCPU interface InstructionCompleter uses
    def get_regs(self): return S.kvm_regs.from_buffer_copy(self.regs)
    def set_regs(self, r): self.regs = S.kvm_regs.from_buffer_copy(r)
    def get_sregs(self): return S.kvm_sregs.from_buffer_copy(self.sregs)
    def set_sregs(self, s): self.sregs = S.kvm_sregs.from_buffer_copy(s)


def pic(isr: int, base: int, rotate: int = 0) -> bytes:
    chip = bytearray(16)
    chip[pm_interrupt.PIC_ISR], chip[pm_interrupt.PIC_PRIORITY_ADD], chip[pm_interrupt.PIC_IRQ_BASE] = isr, rotate, base
    return bytes(chip)


def test_vector_from_the_pic_in_service_register():
    assert pm_interrupt.in_service_vector(pic(0b1, 0x08), pic(0, 0x70)) == 0x08             # IRQ 0, BIOS base
    assert pm_interrupt.in_service_vector(pic(0b1010, 0x20), pic(0, 0x28)) == 0x21          # highest priority
    assert pm_interrupt.in_service_vector(pic(0b1001, 0x20, rotate=3), pic(0, 0x28)) == 0x23
    assert pm_interrupt.in_service_vector(pic(0b100, 0x08), pic(0b10000, 0x70)) == 0x74     # through the cascade
    with pytest.raises(pm_interrupt.NotDeliverable):
        pm_interrupt.in_service_vector(pic(0, 0x08), pic(0, 0x70))


def test_deliver_then_iret_round_trip():
    g = Guest()
    pm_interrupt.deliver(0x08, g.regs, g.sregs, g.read, g.write)
    assert g.regs.rip == HANDLER + 0x40 and g.sregs.cs.selector == 0x08 and g.sregs.cs.base == SEG_BASE
    assert g.regs.rsp == STACK - 12 and not g.regs.rflags & pm_interrupt.RFLAGS_IF
    assert struct.unpack("<III", g.read(SEG_BASE + STACK - 12, 12)) == (0x1234, 0x08, 0x246)
    assert g.sregs.cs.limit == 0xFFFFFFFF and g.sregs.cs.db == 1 and g.sregs.cs.type == 0xB

    g.regs.rip = 0x600                                   # the handler's iret (KVM's emulator fails on it)
    g.write(SEG_BASE + 0x600, b"\xcf")
    assert InstructionCompleter(g, g.read, g.write).complete(b"\xcf\x90") == "iret"
    assert (g.regs.rip, g.regs.rsp, g.regs.rflags) == (0x1234, STACK, 0x246)


def test_trap_gate_keeps_interrupts_on():
    g = Guest()
    g.write(IDT + 8 * 0x21, gate(0x08, 0x700, kind=0xF))
    pm_interrupt.deliver(0x21, g.regs, g.sregs, g.read, g.write)
    assert g.regs.rip == 0x700 and g.regs.rflags & pm_interrupt.RFLAGS_IF


def test_sixteen_bit_stack_wraps_in_sp():
    g = Guest()
    g.sregs.ss.db, g.regs.rsp = 0, 0xABCD0008
    pm_interrupt.deliver(0x08, g.regs, g.sregs, g.read, g.write)
    assert g.regs.rsp == 0xABCDFFFC                      # SP wrapped, the upper half of ESP kept
    assert struct.unpack("<I", g.read(SEG_BASE + 0xFFFC, 4))[0] == 0x1234


@pytest.mark.parametrize("change,reason", [
    (lambda g: setattr(g.regs, "rflags", 0x46), "interrupts are off"),
    (lambda g: setattr(g.sregs, "cr0", 0x80000011), "paged"),
    (lambda g: setattr(g.sregs, "cr0", 0x10), "real mode"),
    (lambda g: g.write(IDT + 8 * 8, gate(0x08, 0x500, present=False)), "gate not present"),
    (lambda g: g.write(IDT + 8 * 8, gate(0x08, 0x500, kind=0x6)), "16-bit gate"),
    (lambda g: g.write(IDT + 8 * 8, gate(0x40, 0x500)), "selector past the GDT"),
    (lambda g: g.write(IDT + 8 * 8, gate(0x10, 0x500)), "a data segment"),
    (lambda g: setattr(g.sregs.idt, "limit", 0x3F), "vector past the IDT limit"),
])
def test_what_it_does_not_cover_changes_nothing(change, reason):
    g = Guest()
    change(g)
    before = (bytes(g.memory), bytes(g.regs), bytes(g.sregs))
    with pytest.raises(pm_interrupt.NotDeliverable):
        pm_interrupt.deliver(0x08, g.regs, g.sregs, g.read, g.write)
    assert (bytes(g.memory), bytes(g.regs), bytes(g.sregs)) == before, reason


def test_iret_it_cannot_do_is_refused():
    g = Guest()
    g.write(SEG_BASE + STACK, struct.pack("<III", 0x1234, 0x1B, 0x246))        # to ring 3
    with pytest.raises(UnsupportedInstruction):
        InstructionCompleter(g, g.read, g.write).complete(b"\xcf")
    g.write(SEG_BASE + STACK, struct.pack("<III", 0x1234, 0x08, 0x20246))      # to virtual-8086 mode
    with pytest.raises(UnsupportedInstruction):
        InstructionCompleter(g, g.read, g.write).complete(b"\xcf")
    with pytest.raises(UnsupportedInstruction):
        InstructionCompleter(g, g.read, g.write).complete(b"\x66\xcf")         # a 16-bit iret
    g.regs.rflags |= pm_interrupt.RFLAGS_NT
    with pytest.raises(UnsupportedInstruction):
        InstructionCompleter(g, g.read, g.write).complete(b"\xcf")             # a task return
    assert g.regs.rip == 0x1234 and g.regs.rsp == STACK
