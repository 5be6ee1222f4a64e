"""A vCPU's state printed the way QEMU prints it (`info registers`, and on a KVM internal error or triple fault)."""
from __future__ import annotations

from typing import Callable

from pyhv.kvm import structs as S

EFER_LMA = 1 << 10
CR0_PE = 1 << 0
CR0_PG = 1 << 31
CODE_BEFORE, CODE_LEN = 43, 64       # the bytes QEMU shows around RIP


def segment_flags(seg: S.kvm_segment) -> int:
    """The descriptor attribute bits in QEMU's layout (type, S, DPL, P, AVL, L, D/B, G)."""
    return ((seg.type << 8) | (seg.s << 12) | (seg.dpl << 13) | (seg.present << 15) | (seg.avl << 20)
            | (seg.l << 21) | (seg.db << 22) | (seg.g << 23))


def _seg_line(name: str, seg: S.kvm_segment, long_mode: bool) -> str:
    base = f"{seg.base:016x}" if long_mode else f"{seg.base:08x}"
    return f"{name:<3}={seg.selector:04x} {base} {seg.limit:08x} {segment_flags(seg):08x}"


def _flags(rflags: int) -> str:
    bits = ((10, "D"), (11, "O"), (7, "S"), (6, "Z"), (4, "A"), (2, "P"), (0, "C"))
    return "[" + "".join(c if rflags & (1 << b) else "-" for b, c in bits) + "]"


def format_cpu_state(regs: S.kvm_regs, sregs: S.kvm_sregs, code: bytes | None = None,
                     code_offset: int = CODE_BEFORE) -> str:
    long_mode = bool(sregs.efer & EFER_LMA)
    cpl = sregs.cs.dpl if sregs.cr0 & CR0_PE else 0
    lines = []
    if long_mode:
        names = [("RAX", regs.rax), ("RBX", regs.rbx), ("RCX", regs.rcx), ("RDX", regs.rdx),
                 ("RSI", regs.rsi), ("RDI", regs.rdi), ("RBP", regs.rbp), ("RSP", regs.rsp),
                 ("R8 ", regs.r8), ("R9 ", regs.r9), ("R10", regs.r10), ("R11", regs.r11),
                 ("R12", regs.r12), ("R13", regs.r13), ("R14", regs.r14), ("R15", regs.r15)]
        for i in range(0, 16, 4):
            lines.append(" ".join(f"{n}={v:016x}" for n, v in names[i:i + 4]))
        lines.append(f"RIP={regs.rip:016x} RFL={regs.rflags:08x} {_flags(regs.rflags)} CPL={cpl} II=0 A20=1 "
                     f"SMM=0 HLT=0")
    else:
        names = [("EAX", regs.rax), ("EBX", regs.rbx), ("ECX", regs.rcx), ("EDX", regs.rdx),
                 ("ESI", regs.rsi), ("EDI", regs.rdi), ("EBP", regs.rbp), ("ESP", regs.rsp)]
        for i in range(0, 8, 4):
            lines.append(" ".join(f"{n}={v & 0xFFFFFFFF:08x}" for n, v in names[i:i + 4]))
        lines.append(f"EIP={regs.rip & 0xFFFFFFFF:08x} EFL={regs.rflags:08x} {_flags(regs.rflags)} CPL={cpl} "
                     f"II=0 A20=1 SMM=0 HLT=0")
    for name in ("es", "cs", "ss", "ds", "fs", "gs"):
        lines.append(_seg_line(name.upper(), getattr(sregs, name), long_mode))
    lines.append(_seg_line("LDT", sregs.ldt, long_mode))
    lines.append(_seg_line("TR", sregs.tr, long_mode))
    width = 16 if long_mode else 8
    lines.append(f"GDT=     {sregs.gdt.base:0{width}x} {sregs.gdt.limit:08x}")
    lines.append(f"IDT=     {sregs.idt.base:0{width}x} {sregs.idt.limit:08x}")
    lines.append(f"CR0={sregs.cr0:08x} CR2={sregs.cr2:0{width}x} CR3={sregs.cr3:0{width}x} CR4={sregs.cr4:08x}")
    lines.append(f"EFER={sregs.efer:016x}")
    if code is not None:
        parts = []
        for i, b in enumerate(code):
            parts.append(f"<{b:02x}>" if i == code_offset else f"{b:02x}")
        lines.append("Code=" + " ".join(parts))
    return "\n".join(lines)


def read_code(sregs: S.kvm_sregs, rip: int, translate: Callable[[int], int | None],
              read_phys: Callable[[int, int], bytes]) -> tuple[bytes, int] | None:
    """The 64 bytes around RIP (43 before it) and RIP's index in them, as far as they are readable."""
    linear = (sregs.cs.base + rip) & 0xFFFFFFFFFFFFFFFF
    if not (sregs.efer & EFER_LMA):
        linear &= 0xFFFFFFFF
    start = max(linear - CODE_BEFORE, 0)
    out = bytearray()
    for addr in range(start, start + CODE_LEN):
        phys = translate(addr) if sregs.cr0 & CR0_PG else addr
        if phys is None:
            if addr < linear:
                out.clear()
                start = addr + 1
                continue
            break
        try:
            out += read_phys(phys, 1)
        except Exception:
            if addr < linear:
                out.clear()
                start = addr + 1
                continue
            break
    if linear - start >= len(out):
        return None
    return bytes(out), linear - start
