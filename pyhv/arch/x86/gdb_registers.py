"""x86-64 registers as gdb sees them: the target description (qXfer:features:read:target.xml) and the
conversion between KVM's register structures and the `g`/`p` packets' little-endian hex.

The layout follows gdb's own amd64 features (gdb/features/i386/64bit-core.xml, 64bit-sse.xml,
64bit-segments.xml: the register names and sizes gdb's amd64 code checks), plus a pyhv feature with the
control registers and EFER, so `info registers cr3` works against a kernel. The order of `REGISTERS` is the
register number gdb uses in `p`/`P` and the order of the `g` packet.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyhv.kvm import structs as S


@dataclass(frozen=True)
class GdbRegister:
    name: str
    bits: int
    feature: str
    type: str = "int"        # the tdesc type
    group: str = ""


_CORE = "org.gnu.gdb.i386.core"
_SSE = "org.gnu.gdb.i386.sse"
_SEGMENTS = "org.gnu.gdb.i386.segments"
_SYSTEM = "org.pyhv.x86.system"

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")

REGISTERS: tuple[GdbRegister, ...] = (
    *(GdbRegister(n, 64, _CORE, "data_ptr" if n in ("rbp", "rsp") else "int64") for n in GPRS),
    GdbRegister("rip", 64, _CORE, "code_ptr"),
    GdbRegister("eflags", 32, _CORE, "i386_eflags"),
    *(GdbRegister(n, 32, _CORE, "int32") for n in SEGMENTS),
    *(GdbRegister(f"st{i}", 80, _CORE, "i387_ext", "float") for i in range(8)),
    *(GdbRegister(n, 32, _CORE, "int", "float") for n in X87_CONTROL),
    *(GdbRegister(f"xmm{i}", 128, _SSE, "vec128", "vector") for i in range(16)),
    GdbRegister("mxcsr", 32, _SSE, "i386_mxcsr", "vector"),
    GdbRegister("fs_base", 64, _SEGMENTS, "int"),
    GdbRegister("gs_base", 64, _SEGMENTS, "int"),
    *(GdbRegister(n, 64, _SYSTEM, "int64", "system") for n in CONTROL),
)
NUMBER = {r.name: i for i, r in enumerate(REGISTERS)}

_TYPES = {
    _CORE: """  <flags id="i386_eflags" size="4">
    <field name="CF" start="0" end="0"/><field name="" start="1" end="1"/><field name="PF" start="2" end="2"/>
    <field name="AF" start="4" end="4"/><field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/>
    <field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/><field name="DF" start="10" end="10"/>
    <field name="OF" start="11" end="11"/><field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/>
    <field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/><field name="VIF" start="19" end="19"/>
    <field name="VIP" start="20" end="20"/><field name="ID" start="21" end="21"/>
  </flags>
""",
    _SSE: """  <vector id="v4f" type="ieee_single" count="4"/>
  <vector id="v2d" type="ieee_double" count="2"/>
  <vector id="v16i8" type="int8" count="16"/>
  <vector id="v8i16" type="int16" count="8"/>
  <vector id="v4i32" type="int32" count="4"/>
  <vector id="v2i64" type="int64" count="2"/>
  <union id="vec128">
    <field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/><field name="v16_int8" type="v16i8"/>
    <field name="v8_int16" type="v8i16"/><field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>
    <field name="uint128" type="uint128"/>
  </union>
  <flags id="i386_mxcsr" size="4">
    <field name="IE" start="0" end="0"/><field name="DE" start="1" end="1"/><field name="ZE" start="2" end="2"/>
    <field name="OE" start="3" end="3"/><field name="UE" start="4" end="4"/><field name="PE" start="5" end="5"/>
    <field name="DAZ" start="6" end="6"/><field name="IM" start="7" end="7"/><field name="DM" start="8" end="8"/>
    <field name="ZM" start="9" end="9"/><field name="OM" start="10" end="10"/><field name="UM" start="11" end="11"/>
    <field name="PM" start="12" end="12"/><field name="FZ" start="15" end="15"/>
  </flags>
""",
}


def target_xml() -> bytes:
    """The whole target description, one document (no xi:include, so one qXfer object serves it)."""
    parts = ['<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n<target version="1.0">\n',
             "  <architecture>i386:x86-64</architecture>\n"]
    feature = None
    for number, reg in enumerate(REGISTERS):
        if reg.feature != feature:
            if feature is not None:
                parts.append(" </feature>\n")
            feature = reg.feature
            parts.append(f' <feature name="{feature}">\n')
            parts.append(_TYPES.get(feature, ""))
        group = f' group="{reg.group}"' if reg.group else ""
        parts.append(f'  <reg name="{reg.name}" bitsize="{reg.bits}" type="{reg.type}" regnum="{number}"{group}/>\n')
    parts.append(" </feature>\n</target>\n")
    return "".join(parts).encode()


@dataclass
class RegisterFile:
    """One vCPU's registers, as read from KVM; `value(n)` in gdb's form, `update(n, data)` writes one back."""
    regs: S.kvm_regs
    sregs: S.kvm_sregs
    fpu: S.kvm_fpu

    @property
    def real_mode(self) -> bool:
        """In real mode gdb is shown `rip` as the linear address CS.base + IP (and a written rip is turned back
        into IP), so breakpoints, `x/i $pc` and memory addresses all speak linear addresses."""
        return not self.sregs.cr0 & 1

    def value(self, number: int) -> bytes:
        reg = REGISTERS[number]
        name, size = reg.name, reg.bits // 8
        if name == "rip":
            return (self.regs.rip + (self.sregs.cs.base if self.real_mode else 0)).to_bytes(8, "little")
        if name in GPRS:
            return getattr(self.regs, name).to_bytes(8, "little")
        if name == "eflags":
            return (self.regs.rflags & 0xFFFFFFFF).to_bytes(4, "little")
        if name in SEGMENTS:
            return getattr(self.sregs, name).selector.to_bytes(4, "little")
        if name.startswith("st"):
            i = int(name[2:])
            return bytes(self.fpu.fpr[i * 16:i * 16 + 10])
        if name.startswith("xmm"):
            i = int(name[3:])
            return bytes(self.fpu.xmm[i * 16:i * 16 + 16])
        if name in CONTROL:
            return getattr(self.sregs, name).to_bytes(8, "little")
        if name in ("fs_base", "gs_base"):
            return getattr(self.sregs, name[:2]).base.to_bytes(8, "little")
        return _x87_control(self.fpu, name).to_bytes(size, "little")

    def all_values(self) -> bytes:
        return b"".join(self.value(i) for i in range(len(REGISTERS)))

    def update(self, number: int, data: bytes) -> set[str]:
        """Set register `number` from its little-endian bytes; returns which structures changed
        ({"regs", "sregs", "fpu"}). Raises ValueError for a wrong size."""
        reg = REGISTERS[number]
        name = reg.name
        if len(data) != reg.bits // 8:
            raise ValueError(f"{name} is {reg.bits // 8} bytes, got {len(data)}")
        value = int.from_bytes(data, "little")
        if name == "rip" and self.real_mode:
            self.regs.rip = (value - self.sregs.cs.base) & 0xFFFF
            return {"regs"}
        if name in GPRS or name == "rip":
            setattr(self.regs, name, value)
            return {"regs"}
        if name == "eflags":
            self.regs.rflags = (self.regs.rflags & ~0xFFFFFFFF) | value | 0x2
            return {"regs"}
        if name in SEGMENTS:
            seg = getattr(self.sregs, name)
            seg.selector = value & 0xFFFF
            if not self.sregs.cr0 & 1:               # real mode: the base follows the selector
                seg.base = seg.selector << 4
            return {"sregs"}
        if name in CONTROL:
            setattr(self.sregs, name, value)
            return {"sregs"}
        if name in ("fs_base", "gs_base"):
            getattr(self.sregs, name[:2]).base = value
            return {"sregs"}
        if name.startswith("st"):
            i = int(name[2:])
            self.fpu.fpr[i * 16:i * 16 + 10] = list(data)
        elif name.startswith("xmm"):
            i = int(name[3:])
            self.fpu.xmm[i * 16:i * 16 + 16] = list(data)
        else:
            _set_x87_control(self.fpu, name, value)
        return {"fpu"}

    def update_all(self, data: bytes) -> set[str]:
        """A `G` packet: every register in order. A shorter packet sets the registers it covers."""
        changed: set[str] = set()
        offset = 0
        for number, reg in enumerate(REGISTERS):
            size = reg.bits // 8
            if offset + size > len(data):
                break
            changed |= self.update(number, data[offset:offset + size])
            offset += size
        return changed


def _x87_control(fpu: S.kvm_fpu, name: str) -> int:
    if name == "fctrl":
        return fpu.fcw
    if name == "fstat":
        return fpu.fsw
    if name == "ftag":                   # KVM keeps the abridged tag (1 bit per register): empty = 0b11
        return sum((0 if fpu.ftwx >> i & 1 else 3) << (2 * i) for i in range(8))
    if name == "fioff":
        return fpu.last_ip & 0xFFFFFFFF
    if name == "fooff":
        return fpu.last_dp & 0xFFFFFFFF
    if name == "fop":
        return fpu.last_opcode
    if name == "mxcsr":
        return fpu.mxcsr
    return 0                             # fiseg, foseg: not kept by KVM_GET_FPU


def _set_x87_control(fpu: S.kvm_fpu, name: str, value: int) -> None:
    if name == "fctrl":
        fpu.fcw = value & 0xFFFF
    elif name == "fstat":
        fpu.fsw = value & 0xFFFF
    elif name == "ftag":
        fpu.ftwx = sum(1 << i for i in range(8) if (value >> (2 * i)) & 3 != 3)
    elif name == "fioff":
        fpu.last_ip = value
    elif name == "fooff":
        fpu.last_dp = value
    elif name == "fop":
        fpu.last_opcode = value & 0x7FF
    elif name == "mxcsr":
        fpu.mxcsr = value

