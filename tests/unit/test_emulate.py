"""The instruction completer for KVM emulator failures, on recorded byte sequences, against a fake vCPU."""
from __future__ import annotations

import pytest

from pyhv.arch.x86.emulate import InstructionCompleter, UnsupportedInstruction, decode
from pyhv.kvm import structs as S


class FakeVcpu:
    def __init__(self, long_mode: bool = True):
        self.regs = S.kvm_regs(rip=0xFFFFFFFF81000000, rflags=0x2)
        self.sregs = S.kvm_sregs()
        self.sregs.cs.l = int(long_mode)
        self.fpu = S.kvm_fpu(mxcsr=0x1F80)
        self.events = S.kvm_vcpu_events()
        self.memory = bytearray(0x10000)

    def get_regs(self): return S.kvm_regs.from_buffer_copy(self.regs)
    def set_regs(self, r): self.regs = S.kvm_regs.from_buffer_copy(r)
    def get_sregs(self): return S.kvm_sregs.from_buffer_copy(self.sregs)
    def get_fpu(self): return S.kvm_fpu.from_buffer_copy(self.fpu)
    def set_fpu(self, f): self.fpu = S.kvm_fpu.from_buffer_copy(f)
    def get_vcpu_events(self): return S.kvm_vcpu_events.from_buffer_copy(self.events)
    def set_vcpu_events(self, e): self.events = S.kvm_vcpu_events.from_buffer_copy(e)

    def translate(self, linear):           # a direct map: kernel addresses fold onto the 64 KiB buffer
        return linear & 0xFFFF


def completer(vcpu):
    return InstructionCompleter(vcpu, lambda p, n: bytes(vcpu.memory[p:p + n]),
                                lambda p, d: vcpu.memory.__setitem__(slice(p, p + len(d)), d))


# (bytes as recorded from kernel code, name, length)
RECORDED = [
    ("cc", "int3", 1),
    ("9b", "fwait", 1),
    ("0f 01 ca", "clac", 3),
    ("0f 01 cb", "stac", 3),
    ("f3 48 0f b8 c7", "popcnt", 5),            # popcnt %rdi,%rax
    ("f3 0f b8 c7", "popcnt", 4),               # popcnt %edi,%eax
    ("66 f3 0f b8 c7", "popcnt", 5),            # popcnt %di,%ax
    ("f3 48 0f b8 07", "popcnt", 5),            # popcnt (%rdi),%rax
    ("f3 4c 0f b8 44 24 08", "popcnt", 7),      # popcnt 0x8(%rsp),%r8
    ("0f ae 54 24 fc", "ldmxcsr", 5),           # ldmxcsr -0x4(%rsp)
    ("0f ae 5c 24 fc", "stmxcsr", 5),           # stmxcsr -0x4(%rsp)
    ("0f ae 15 00 10 00 00", "ldmxcsr", 7),     # ldmxcsr 0x1000(%rip)
]


@pytest.mark.parametrize("hexbytes,name,length", RECORDED)
def test_decode_recorded_sequences(hexbytes, name, length):
    insn = decode(bytes.fromhex(hexbytes) + b"\x90\x90")
    assert (insn.name, insn.length) == (name, length)


@pytest.mark.parametrize("hexbytes", ["0f 0b", "f4", "0f c7 0e", "0f ae e8", "0f ae d0"])
def test_unsupported_instructions_are_refused(hexbytes):
    with pytest.raises(UnsupportedInstruction):
        decode(bytes.fromhex(hexbytes))


def test_int3_advances_and_injects_breakpoint():
    v = FakeVcpu()
    assert completer(v).complete(b"\xcc") == "int3"
    assert v.regs.rip == 0xFFFFFFFF81000001
    assert (v.events.exception.injected, v.events.exception.nr) == (1, 3)


def test_clac_stac():
    v = FakeVcpu()
    completer(v).complete(bytes.fromhex("0f01cb"))
    assert v.regs.rflags & (1 << 18)
    completer(v).complete(bytes.fromhex("0f01ca"))
    assert not v.regs.rflags & (1 << 18) and v.regs.rip == 0xFFFFFFFF81000006


@pytest.mark.parametrize("hexbytes,src,expected_rax,zf", [
    ("f3480fb8c7", 0xF0F0_0000_0000_0001, 9, False),
    ("f3480fb8c7", 0, 0, True),
    ("f30fb8c7", 0xFFFF_FFFF_0000_0003, 2, False),
    ("66f30fb8c7", 0x0000_0000_0001_FFFF, 0xAAAA_0000_0000_0000 | 16, False),
])
def test_popcnt_register(hexbytes, src, expected_rax, zf):
    v = FakeVcpu()
    v.regs.rdi, v.regs.rax = src, 0xAAAA_0000_0000_0000
    v.regs.rflags = 0x2 | 0x1 | 0x800                # CF and OF set: popcnt clears them
    completer(v).complete(bytes.fromhex(hexbytes))
    assert v.regs.rax == expected_rax
    assert bool(v.regs.rflags & 0x40) == zf and not v.regs.rflags & 0x801


def test_popcnt_memory_operand_with_sib_and_displacement():
    v = FakeVcpu()
    v.regs.rsp = 0x2000
    v.memory[0x2008:0x2010] = (0b1011).to_bytes(8, "little")
    completer(v).complete(bytes.fromhex("f34c0fb8442408"))
    assert v.regs.r8 == 3


def test_ldmxcsr_and_stmxcsr():
    v = FakeVcpu()
    v.regs.rsp = 0x3000
    v.memory[0x2FFC:0x3000] = (0x1FA0).to_bytes(4, "little")
    completer(v).complete(bytes.fromhex("0fae5424fc"))
    assert v.fpu.mxcsr == 0x1FA0
    v.fpu.mxcsr = 0x1F81
    completer(v).complete(bytes.fromhex("0fae5c24fc"))
    assert int.from_bytes(v.memory[0x2FFC:0x3000], "little") == 0x1F81


def test_rip_relative_operand():
    v = FakeVcpu()
    v.regs.rip = 0x100
    v.memory[0x100 + 7 + 0x1000:0x100 + 7 + 0x1004] = (0x1FC0).to_bytes(4, "little")
    completer(v).complete(bytes.fromhex("0fae1500100000"))
    assert v.fpu.mxcsr == 0x1FC0
