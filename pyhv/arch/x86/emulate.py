"""Completing instructions KVM's emulator fails on (PVM hosts emulate guest kernel code and lack a few).

On `KVM_EXIT_INTERNAL_ERROR` with suberror EMULATION, kvm_run carries the instruction bytes. pyhv decodes a
small, tested set and performs it on the vCPU's registers (and guest memory), then re-enters the guest:

    int3                  RIP += 1 and inject #BP (the kernel's int3 self-test, runtime text patching)
    fwait / wait          no-op (no x87 exceptions are ever pending)
    clac / stac           clear / set RFLAGS.AC
    popcnt r, r/m         population count, ZF from the source, other arithmetic flags cleared
    ldmxcsr / stmxcsr m32 load / store MXCSR (through KVM_GET/SET_FPU)
    iret (32-bit)         return from an interrupt in non-paged protected mode at CPL 0 (KVM's emulator knows
                          only the real-mode one; see pm_interrupt.py for the delivery it pairs with)

Anything else is left to the caller, which stops the VM with a register dump.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pyhv.arch.x86 import pm_interrupt
from pyhv.kvm import structs as S

RFLAGS_CF, RFLAGS_PF, RFLAGS_AF, RFLAGS_ZF, RFLAGS_SF, RFLAGS_OF = 1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 11
RFLAGS_AC = 1 << 18
BP_VECTOR = 3
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENT_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
LEGACY_PREFIXES = {0x66, 0x67, 0xF0, 0xF2, 0xF3, *SEGMENT_PREFIXES}


class UnsupportedInstruction(Exception):
    pass


@dataclass
class Instruction:
    """A decoded instruction: enough of it to perform the supported set."""
    name: str
    length: int
    opsize: int = 4             # operand size in bytes
    reg: int = 0                # ModRM.reg (with REX.R)
    rm_reg: int | None = None   # register operand (ModRM.mod == 3), with REX.B
    mem: tuple | None = None    # (base reg | None, index reg | None, scale, disp, rip_relative, segment)


def _modrm(code: bytes, pos: int, rex: int, addr64: bool, segment: str | None) -> tuple[int, int | None, tuple | None, int]:
    """Decode ModRM (+SIB, displacement) at code[pos]; returns (reg, rm_reg, mem, new_pos)."""
    if pos >= len(code):
        raise UnsupportedInstruction("truncated ModRM")
    modrm = code[pos]
    pos += 1
    mod, reg, rm = modrm >> 6, ((modrm >> 3) & 7) | ((rex & 4) << 1), modrm & 7
    if mod == 3:
        return reg, rm | ((rex & 1) << 3), None, pos
    if not addr64:
        raise UnsupportedInstruction("memory operands outside 64-bit mode")
    base: int | None = rm | ((rex & 1) << 3)
    index: int | None = None
    scale = 1
    rip_relative = False
    if rm == 4:                                   # SIB follows
        sib = code[pos]
        pos += 1
        scale = 1 << (sib >> 6)
        idx = ((sib >> 3) & 7) | ((rex & 2) << 2)
        index = None if idx == 4 else idx
        base = (sib & 7) | ((rex & 1) << 3)
        if (sib & 7) == 5 and mod == 0:
            base = None                           # disp32 with no base
            disp = int.from_bytes(code[pos:pos + 4], "little", signed=True)
            return reg, None, (base, index, scale, disp, False, segment), pos + 4
    elif rm == 5 and mod == 0:
        base, rip_relative = None, True
    if mod == 1:
        disp = int.from_bytes(code[pos:pos + 1], "little", signed=True)
        pos += 1
    elif mod == 2 or rip_relative:
        disp = int.from_bytes(code[pos:pos + 4], "little", signed=True)
        pos += 4
    else:
        disp = 0
    return reg, None, (base, index, scale, disp, rip_relative, segment), pos


def decode(code: bytes, long_mode: bool = True) -> Instruction:
    pos = 0
    opsize_override = False
    segment = None
    rep = None
    while pos < len(code) and code[pos] in LEGACY_PREFIXES:
        byte = code[pos]
        if byte == 0x66:
            opsize_override = True
        elif byte in (0xF2, 0xF3):
            rep = byte
        elif byte in SEGMENT_PREFIXES:
            segment = SEGMENT_PREFIXES[byte]
        pos += 1
    rex = 0
    if long_mode and pos < len(code) and 0x40 <= code[pos] <= 0x4F:
        rex = code[pos]
        pos += 1
    if pos >= len(code):
        raise UnsupportedInstruction("truncated instruction")
    opsize = 8 if rex & 8 else (2 if opsize_override else 4)
    op = code[pos]
    if op == 0xCC:
        return Instruction("int3", pos + 1)
    if op == 0x9B:
        return Instruction("fwait", pos + 1)
    if op == 0xCF and not rex:
        return Instruction("iret", pos + 1, opsize)
    if op == 0x0F and pos + 1 < len(code):
        op2 = code[pos + 1]
        if op2 == 0x01 and pos + 2 < len(code) and code[pos + 2] in (0xCA, 0xCB):
            return Instruction("clac" if code[pos + 2] == 0xCA else "stac", pos + 3)
        if op2 == 0xB8 and rep == 0xF3:
            reg, rm_reg, mem, end = _modrm(code, pos + 2, rex, long_mode, segment)
            return Instruction("popcnt", end, opsize, reg, rm_reg, mem)
        if op2 == 0xAE and pos + 2 < len(code):
            sub = (code[pos + 2] >> 3) & 7
            if sub in (2, 3) and code[pos + 2] >> 6 != 3:
                reg, rm_reg, mem, end = _modrm(code, pos + 2, rex, long_mode, segment)
                return Instruction("ldmxcsr" if sub == 2 else "stmxcsr", end, 4, reg, rm_reg, mem)
    raise UnsupportedInstruction(f"opcode {code[:pos + 3].hex(' ')}")


class InstructionCompleter:
    """Performs a decoded instruction on a vCPU. `translate(linear) -> physical | None` and guest memory access
    are passed in, so this is testable without KVM."""

    def __init__(self, vcpu, read_phys: Callable[[int, int], bytes], write_phys: Callable[[int, bytes], None]):
        self.vcpu = vcpu
        self.read_phys = read_phys
        self.write_phys = write_phys

    def complete(self, code: bytes) -> str:
        """Perform the instruction at RIP (whose bytes are `code`); returns its name, or raises
        UnsupportedInstruction."""
        sregs = self.vcpu.get_sregs()
        long_mode = bool(sregs.cs.l)
        insn = decode(code, long_mode)
        regs = self.vcpu.get_regs()
        next_rip = regs.rip + insn.length
        if insn.name == "int3":
            regs.rip = next_rip
            self.vcpu.set_regs(regs)
            events = self.vcpu.get_vcpu_events()
            events.exception.injected, events.exception.nr = 1, BP_VECTOR
            events.exception.has_error_code, events.exception.pending = 0, 0
            self.vcpu.set_vcpu_events(events)
            return insn.name
        if insn.name == "iret":
            if long_mode or bool(sregs.cs.db) == (insn.opsize == 2):
                raise UnsupportedInstruction("iret other than a 32-bit one in protected mode")
            try:
                pm_interrupt.return_from_interrupt(regs, sregs, self.read_phys)
            except pm_interrupt.NotDeliverable as e:
                raise UnsupportedInstruction(f"iret: {e}") from None
            self.vcpu.set_sregs(sregs)
            self.vcpu.set_regs(regs)
            return insn.name
        if insn.name == "fwait":
            pass
        elif insn.name in ("clac", "stac"):
            regs.rflags = (regs.rflags | RFLAGS_AC) if insn.name == "stac" else (regs.rflags & ~RFLAGS_AC)
        elif insn.name == "popcnt":
            mask = (1 << (8 * insn.opsize)) - 1
            if insn.rm_reg is not None:
                src = getattr(regs, GPR_NAMES[insn.rm_reg]) & mask
            else:
                src = int.from_bytes(self._read(regs, sregs, insn, next_rip, insn.opsize), "little")
            result = bin(src).count("1")
            old = getattr(regs, GPR_NAMES[insn.reg])
            if insn.opsize == 2:
                result |= old & ~0xFFFF                # 16-bit destinations keep their upper bits
            setattr(regs, GPR_NAMES[insn.reg], result)
            regs.rflags &= ~(RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF)
            if src == 0:
                regs.rflags |= RFLAGS_ZF
        elif insn.name in ("ldmxcsr", "stmxcsr"):
            fpu = self.vcpu.get_fpu()
            if insn.name == "ldmxcsr":
                fpu.mxcsr = int.from_bytes(self._read(regs, sregs, insn, next_rip, 4), "little")
                self.vcpu.set_fpu(fpu)
            else:
                self._write(regs, sregs, insn, next_rip, fpu.mxcsr.to_bytes(4, "little"))
        regs.rip = next_rip
        self.vcpu.set_regs(regs)
        return insn.name

    # --- memory operands -----------------------------------------------------------------------------------
    def _linear(self, regs: S.kvm_regs, sregs: S.kvm_sregs, insn: Instruction, next_rip: int) -> int:
        base, index, scale, disp, rip_relative, segment = insn.mem
        addr = disp + (next_rip if rip_relative else 0)
        if base is not None:
            addr += getattr(regs, GPR_NAMES[base])
        if index is not None:
            addr += getattr(regs, GPR_NAMES[index]) * scale
        if segment in ("fs", "gs"):
            addr += getattr(sregs, segment).base
        return addr & 0xFFFFFFFFFFFFFFFF

    def _phys(self, linear: int) -> int:
        phys = self.vcpu.translate(linear)
        if phys is None:
            raise UnsupportedInstruction(f"memory operand at {linear:#x} is not mapped")
        return phys

    def _read(self, regs, sregs, insn: Instruction, next_rip: int, size: int) -> bytes:
        linear = self._linear(regs, sregs, insn, next_rip)
        return b"".join(self.read_phys(self._phys(linear + i), 1) for i in range(size))

    def _write(self, regs, sregs, insn: Instruction, next_rip: int, data: bytes) -> None:
        linear = self._linear(regs, sregs, insn, next_rip)
        for i, byte in enumerate(data):
            self.write_phys(self._phys(linear + i), bytes((byte,)))
