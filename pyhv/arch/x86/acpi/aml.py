"""A small AML (ACPI Machine Language) encoder: Python objects that each know their byte encoding (`.encode()`).

Only what pyhv's DSDTs use: names and paths, integers, strings, buffers, packages, Name/Scope/Device/Method,
Return, the few expressions a Generic Event Device `_EVT` needs (Store, And, LEqual, If, Notify), an
OperationRegion with a Field, EISA ids, and ResourceTemplate with the descriptors of a PC or microvm.

Facts from the ACPI 6.x specification, chapter 20 (AML grammar) and section 6.4 (resource data types).
"""
from __future__ import annotations

import re
import struct
from typing import Iterable, Union

# Opcodes (ACPI 6.x, 20.3 "AML Byte Stream Byte Values")
ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
NAME_OP = 0x08
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
VAR_PACKAGE_OP = 0x13
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
ROOT_CHAR = 0x5C
PARENT_PREFIX_CHAR = 0x5E
NULL_NAME = 0x00
LOCAL0_OP = 0x60
ARG0_OP = 0x68
STORE_OP = 0x70
AND_OP = 0x7B
OR_OP = 0x7D
NOTIFY_OP = 0x86
LAND_OP = 0x90
LEQUAL_OP = 0x93
IF_OP = 0xA0
ELSE_OP = 0xA1
RETURN_OP = 0xA4
# after EXT_OP_PREFIX
EXT_OP_REGION_OP = 0x80
EXT_FIELD_OP = 0x81
EXT_DEVICE_OP = 0x82

# OperationRegion spaces (19.6.100)
REGION_SYSTEM_MEMORY = 0x00
REGION_SYSTEM_IO = 0x01
REGION_PCI_CONFIG = 0x02

# Field flags (20.2.5.2 FieldFlags)
FIELD_ANY_ACC = 0
FIELD_BYTE_ACC = 1
FIELD_WORD_ACC = 2
FIELD_DWORD_ACC = 3
FIELD_QWORD_ACC = 4
FIELD_LOCK = 1 << 4
FIELD_PRESERVE = 0 << 5
FIELD_WRITE_AS_ONES = 1 << 5
FIELD_WRITE_AS_ZEROS = 2 << 5

PKG_LENGTH_MAX = (1 << 28) - 1

_SEG_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,3}$")


class AmlObject:
    """Anything with an AML encoding."""

    def encode(self) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError


Term = Union[AmlObject, int, str, bytes]


def encode_pkg_length_value(value: int) -> bytes:
    """The PkgLength encoding of `value` (a length that already counts the PkgLength bytes themselves).

    1 byte holds 0..63; 2, 3, 4 bytes hold 12, 20, 28 bits: the lead byte's bits 7-6 give the count of
    following bytes, its bits 3-0 the low nibble, the following bytes the rest, least significant first.
    """
    if value < 0 or value > PKG_LENGTH_MAX:
        raise ValueError(f"AML package length {value} out of range 0..{PKG_LENGTH_MAX}")
    if value < 0x40:
        return bytes([value])
    if value < (1 << 12):
        extra = 1
    elif value < (1 << 20):
        extra = 2
    else:
        extra = 3
    lead = (extra << 6) | (value & 0x0F)
    rest = value >> 4
    return bytes([lead]) + rest.to_bytes(extra, "little")


def pkg_length(payload_len: int) -> bytes:
    """PkgLength for a payload of `payload_len` bytes following it (the encoded value includes itself)."""
    for size in (1, 2, 3, 4):
        total = payload_len + size
        if size == 1 and total < 0x40:
            return encode_pkg_length_value(total)
        if size == 2 and 0x40 <= total < (1 << 12):
            return encode_pkg_length_value(total)
        if size == 3 and (1 << 12) <= total < (1 << 20):
            return encode_pkg_length_value(total)
        if size == 4 and (1 << 20) <= total <= PKG_LENGTH_MAX:
            return encode_pkg_length_value(total)
    raise ValueError(f"AML package of {payload_len} bytes is too long (PkgLength holds at most {PKG_LENGTH_MAX})")


def with_pkg_length(payload: bytes) -> bytes:
    return pkg_length(len(payload)) + payload


def name_seg(seg: str) -> bytes:
    """One 4-character NameSeg: 1-4 chars [A-Z0-9_], first not a digit, padded with '_'."""
    if not isinstance(seg, str) or not _SEG_RE.match(seg):
        raise ValueError(f"invalid AML name segment {seg!r}: a name is 1-4 characters of A-Z, 0-9 and '_', "
                         f"not starting with a digit")
    return seg.ljust(4, "_").encode("ascii")


def encode_name_string(path: str) -> bytes:
    r"""NameString: optional root '\' or parent '^' prefixes, then segments separated by '.'."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"invalid AML name {path!r}: empty")
    i = 0
    prefix = b""
    if path[0] == "\\":
        prefix = bytes([ROOT_CHAR])
        i = 1
    else:
        while i < len(path) and path[i] == "^":
            i += 1
        prefix = bytes([PARENT_PREFIX_CHAR]) * i
    rest = path[i:]
    if not rest:
        return prefix + bytes([NULL_NAME])
    segs = [name_seg(s) for s in rest.split(".")] if all(rest.split(".")) else None
    if segs is None:
        raise ValueError(f"invalid AML name {path!r}: empty segment")
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + segs[0] + segs[1]
    if len(segs) > 255:
        raise ValueError(f"invalid AML name {path!r}: more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


class NameString(AmlObject):
    r"""A name or path used as a term: `NameString("_SB_.PCI0")`, `NameString("\\_SB.PWRB")`."""

    def __init__(self, path: str):
        self.path = path
        self._enc = encode_name_string(path)

    def encode(self) -> bytes:
        return self._enc

    def __repr__(self) -> str:
        return f"NameString({self.path!r})"


class Integer(AmlObject):
    """An integer constant with the shortest encoding: Zero, One, Ones (2**64-1), Byte/Word/DWord/QWord prefix."""

    def __init__(self, value: int):
        if value < 0:
            if value == -1:
                value = (1 << 64) - 1
            else:
                raise ValueError(f"AML integer {value} is negative")
        if value >= (1 << 64):
            raise ValueError(f"AML integer {value:#x} does not fit in 64 bits")
        self.value = value

    def encode(self) -> bytes:
        v = self.value
        if v == 0:
            return bytes([ZERO_OP])
        if v == 1:
            return bytes([ONE_OP])
        if v == (1 << 64) - 1:
            return bytes([ONES_OP])
        if v <= 0xFF:
            return bytes([BYTE_PREFIX, v])
        if v <= 0xFFFF:
            return bytes([WORD_PREFIX]) + struct.pack("<H", v)
        if v <= 0xFFFFFFFF:
            return bytes([DWORD_PREFIX]) + struct.pack("<I", v)
        return bytes([QWORD_PREFIX]) + struct.pack("<Q", v)


ZERO = Integer(0)
ONE = Integer(1)
ONES = Integer(-1)


class String(AmlObject):
    """A string constant (ASCII, no NUL inside)."""

    def __init__(self, value: str):
        raw = value.encode("ascii")
        if b"\0" in raw:
            raise ValueError(f"AML string {value!r} contains NUL")
        self.value = value
        self._raw = raw

    def encode(self) -> bytes:
        return bytes([STRING_PREFIX]) + self._raw + b"\0"


class RawBytes(AmlObject):
    """Already-encoded AML."""

    def __init__(self, data: bytes):
        self.data = bytes(data)

    def encode(self) -> bytes:
        return self.data


def to_term(value: Term) -> AmlObject:
    """Python value → AML object: int → Integer, str → String, bytes → Buffer."""
    if isinstance(value, AmlObject):
        return value
    if isinstance(value, bool):
        return Integer(int(value))
    if isinstance(value, int):
        return Integer(value)
    if isinstance(value, str):
        return String(value)
    if isinstance(value, (bytes, bytearray)):
        return Buffer(bytes(value))
    raise TypeError(f"cannot encode {value!r} as AML")


def _encode_all(terms: Iterable[Term]) -> bytes:
    return b"".join(to_term(t).encode() for t in terms)


def eisa_id(text: str) -> int:
    """EISA id compression (ACPI 6.x 19.6.35 EISAID): 'PNP0A03' → 0x030AD041, as the dword the AML stores."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper() \
            or any(c not in "0123456789ABCDEF" for c in text[3:]):
        raise ValueError(f"invalid EISA id {text!r}: three capital letters and four upper-case hex digits")
    vendor = ((ord(text[0]) - 0x40) << 10) | ((ord(text[1]) - 0x40) << 5) | (ord(text[2]) - 0x40)
    product = int(text[3:], 16)
    raw = struct.pack(">HH", vendor, product)        # big-endian in memory
    return struct.unpack("<I", raw)[0]


class EisaId(Integer):
    def __init__(self, text: str):
        super().__init__(eisa_id(text))
        self.text = text


class Buffer(AmlObject):
    def __init__(self, data: bytes):
        self.data = bytes(data)

    def encode(self) -> bytes:
        return bytes([BUFFER_OP]) + with_pkg_length(Integer(len(self.data)).encode() + self.data)


class Package(AmlObject):
    """Package(){...}: elements are ints, strings, names (NameString) or nested packages."""

    def __init__(self, elements: Iterable[Term]):
        self.elements = [to_term(e) for e in elements]

    def encode(self) -> bytes:
        body = b"".join(e.encode() for e in self.elements)
        n = len(self.elements)
        if n <= 255:
            return bytes([PACKAGE_OP]) + with_pkg_length(bytes([n]) + body)
        return bytes([VAR_PACKAGE_OP]) + with_pkg_length(Integer(n).encode() + body)


class Name(AmlObject):
    def __init__(self, name: str, value: Term):
        self.name = name
        self._name = encode_name_string(name)
        self.value = to_term(value)

    def encode(self) -> bytes:
        return bytes([NAME_OP]) + self._name + self.value.encode()


class _Container(AmlObject):
    def __init__(self, name: str, children: Iterable[AmlObject] = ()):
        self.name = name
        self._name = encode_name_string(name)
        self.children = list(children)

    def append(self, *children: AmlObject) -> "_Container":
        self.children.extend(children)
        return self

    def _body(self) -> bytes:
        return self._name + _encode_all(self.children)


class Scope(_Container):
    def encode(self) -> bytes:
        return bytes([SCOPE_OP]) + with_pkg_length(self._body())


class Device(_Container):
    def encode(self) -> bytes:
        return bytes([EXT_OP_PREFIX, EXT_DEVICE_OP]) + with_pkg_length(self._body())


class Method(_Container):
    def __init__(self, name: str, args: int = 0, serialized: bool = False, children: Iterable[AmlObject] = (),
                 sync_level: int = 0):
        if not 0 <= args <= 7:
            raise ValueError(f"AML method {name!r}: {args} arguments (at most 7)")
        if not 0 <= sync_level <= 15:
            raise ValueError(f"AML method {name!r}: sync level {sync_level} (0..15)")
        super().__init__(name, children)
        self.args = args
        self.serialized = serialized
        self.sync_level = sync_level

    def encode(self) -> bytes:
        flags = self.args | (0x08 if self.serialized else 0) | (self.sync_level << 4)
        return bytes([METHOD_OP]) + with_pkg_length(self._name + bytes([flags]) + _encode_all(self.children))


class Return(AmlObject):
    def __init__(self, value: Term):
        self.value = to_term(value)

    def encode(self) -> bytes:
        return bytes([RETURN_OP]) + self.value.encode()


class Arg(AmlObject):
    def __init__(self, n: int):
        if not 0 <= n <= 6:
            raise ValueError(f"AML Arg{n}: 0..6")
        self.n = n

    def encode(self) -> bytes:
        return bytes([ARG0_OP + self.n])


class Local(AmlObject):
    def __init__(self, n: int):
        if not 0 <= n <= 7:
            raise ValueError(f"AML Local{n}: 0..7")
        self.n = n

    def encode(self) -> bytes:
        return bytes([LOCAL0_OP + self.n])


def _target(target: AmlObject | str | None) -> bytes:
    if target is None:
        return bytes([NULL_NAME])
    if isinstance(target, str):
        return encode_name_string(target)
    return target.encode()


def _operand(value: Term) -> AmlObject:
    """Operands: a str is a name reference here (not a String), ints are integers."""
    if isinstance(value, str):
        return NameString(value)
    return to_term(value)


class Store(AmlObject):
    def __init__(self, value: Term, target: AmlObject | str):
        self.value = _operand(value)
        self.target = target

    def encode(self) -> bytes:
        return bytes([STORE_OP]) + self.value.encode() + _target(self.target)


class And(AmlObject):
    """And(a, b, target) — bitwise; target None is NullName (result only returned)."""
    OP = AND_OP

    def __init__(self, a: Term, b: Term, target: AmlObject | str | None = None):
        self.a, self.b, self.target = _operand(a), _operand(b), target

    def encode(self) -> bytes:
        return bytes([self.OP]) + self.a.encode() + self.b.encode() + _target(self.target)


class Or(And):
    OP = OR_OP


class LEqual(AmlObject):
    OP = LEQUAL_OP

    def __init__(self, a: Term, b: Term):
        self.a, self.b = _operand(a), _operand(b)

    def encode(self) -> bytes:
        return bytes([self.OP]) + self.a.encode() + self.b.encode()


class LAnd(LEqual):
    OP = LAND_OP


class If(AmlObject):
    def __init__(self, predicate: AmlObject, children: Iterable[AmlObject] = ()):
        self.predicate = predicate
        self.children = list(children)

    def encode(self) -> bytes:
        return bytes([IF_OP]) + with_pkg_length(self.predicate.encode() + _encode_all(self.children))


class Else(AmlObject):
    def __init__(self, children: Iterable[AmlObject] = ()):
        self.children = list(children)

    def encode(self) -> bytes:
        return bytes([ELSE_OP]) + with_pkg_length(_encode_all(self.children))


class Notify(AmlObject):
    def __init__(self, obj: str | AmlObject, value: Term):
        self.obj = obj
        self.value = to_term(value)

    def encode(self) -> bytes:
        return bytes([NOTIFY_OP]) + _target(self.obj) + self.value.encode()


class OperationRegion(AmlObject):
    def __init__(self, name: str, space: int, offset: Term, length: Term):
        self.name = name
        self._name = encode_name_string(name)
        self.space = space
        self.offset = to_term(offset)
        self.length = to_term(length)

    def encode(self) -> bytes:
        return (bytes([EXT_OP_PREFIX, EXT_OP_REGION_OP]) + self._name + bytes([self.space])
                + self.offset.encode() + self.length.encode())


class Field(AmlObject):
    """Field(region, flags){ name, bits; ... }: `fields` is a list of (name or None for reserved, bit width)."""

    def __init__(self, region: str, fields: Iterable[tuple[str | None, int]],
                 access: int = FIELD_BYTE_ACC, lock: bool = False, update: int = FIELD_PRESERVE):
        self.region = region
        self._region = encode_name_string(region)
        self.fields = list(fields)
        self.flags = access | (FIELD_LOCK if lock else 0) | update
        for name, bits in self.fields:
            if name is not None:
                name_seg(name)
            if bits <= 0:
                raise ValueError(f"AML field {name!r}: width {bits} bits")

    def encode(self) -> bytes:
        body = bytearray(self._region + bytes([self.flags]))
        for name, bits in self.fields:
            body += (bytes([0x00]) if name is None else name_seg(name)) + encode_pkg_length_value(bits)
        return bytes([EXT_OP_PREFIX, EXT_FIELD_OP]) + with_pkg_length(bytes(body))


# ---------------------------------------------------------------------------------------------------------------
# Resource descriptors (ACPI 6.x 6.4)

class ResourceDescriptor:
    def encode(self) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError


def _small(item: int, body: bytes) -> bytes:
    assert len(body) <= 7
    return bytes([(item << 3) | len(body)]) + body


def _large(item: int, body: bytes) -> bytes:
    return bytes([0x80 | item]) + struct.pack("<H", len(body)) + body


SMALL_IRQ = 0x04
SMALL_IO = 0x08
SMALL_END_TAG = 0x0F
LARGE_MEMORY32_FIXED = 0x06
LARGE_DWORD_ADDRESS = 0x07
LARGE_WORD_ADDRESS = 0x08
LARGE_EXTENDED_IRQ = 0x09
LARGE_QWORD_ADDRESS = 0x0A

ADDR_SPACE_MEMORY = 0
ADDR_SPACE_IO = 1
ADDR_SPACE_BUS = 2
# general flags
ADDR_CONSUMER = 1 << 0
ADDR_SUB_DECODE = 1 << 1
ADDR_MIN_FIXED = 1 << 2
ADDR_MAX_FIXED = 1 << 3
# memory type-specific flags
MEM_READ_WRITE = 1 << 0
MEM_NON_CACHEABLE = 0 << 1
MEM_CACHEABLE = 1 << 1
MEM_WRITE_COMBINING = 2 << 1
MEM_PREFETCHABLE = 3 << 1
# I/O type-specific flags
IO_ENTIRE_RANGE = 3


class Irq(ResourceDescriptor):
    """Small IRQ descriptor (ISA IRQs 0-15). Edge/active-high without flags is the 2-byte-body form."""

    def __init__(self, irqs: int | Iterable[int], edge: bool = True, active_low: bool = False,
                 shared: bool = False, wake: bool = False):
        self.irqs = [irqs] if isinstance(irqs, int) else list(irqs)
        for irq in self.irqs:
            if not 0 <= irq <= 15:
                raise ValueError(f"IRQ descriptor: IRQ {irq} is not an ISA IRQ 0..15 (use ExtendedInterrupt)")
        self.edge, self.active_low, self.shared, self.wake = edge, active_low, shared, wake

    def encode(self) -> bytes:
        mask = 0
        for irq in self.irqs:
            mask |= 1 << irq
        flags = (1 if self.edge else 0) | (8 if self.active_low else 0) | (0x10 if self.shared else 0) \
            | (0x20 if self.wake else 0)
        if flags == 1:
            return _small(SMALL_IRQ, struct.pack("<H", mask))
        return _small(SMALL_IRQ, struct.pack("<HB", mask, flags))


class Io(ResourceDescriptor):
    """Small I/O port descriptor, 16-bit decode."""

    def __init__(self, minimum: int, maximum: int, alignment: int, length: int, decode16: bool = True):
        for v, what in ((minimum, "minimum"), (maximum, "maximum")):
            if not 0 <= v <= 0xFFFF:
                raise ValueError(f"IO descriptor: {what} {v:#x} is not a 16-bit port")
        if not 0 <= alignment <= 0xFF or not 0 <= length <= 0xFF:
            raise ValueError("IO descriptor: alignment and length are bytes")
        self.minimum, self.maximum, self.alignment, self.length, self.decode16 = \
            minimum, maximum, alignment, length, decode16

    def encode(self) -> bytes:
        return _small(SMALL_IO, struct.pack("<BHHBB", 1 if self.decode16 else 0, self.minimum, self.maximum,
                                            self.alignment, self.length))


class Memory32Fixed(ResourceDescriptor):
    def __init__(self, base: int, length: int, read_write: bool = True):
        if not 0 <= base <= 0xFFFFFFFF or not 0 <= length <= 0xFFFFFFFF:
            raise ValueError(f"Memory32Fixed({base:#x}, {length:#x}): 32-bit base and length")
        self.base, self.length, self.read_write = base, length, read_write

    def encode(self) -> bytes:
        return _large(LARGE_MEMORY32_FIXED, struct.pack("<BII", 1 if self.read_write else 0, self.base, self.length))


class _AddressSpace(ResourceDescriptor):
    ITEM = 0
    FMT = ""
    MAXV = 0

    def __init__(self, space: int, minimum: int, maximum: int, *, general: int = ADDR_MIN_FIXED | ADDR_MAX_FIXED,
                 specific: int = 0, granularity: int = 0, translation: int = 0, length: int | None = None):
        if length is None:
            length = maximum - minimum + 1
        for v in (minimum, maximum, granularity, translation, length):
            if not 0 <= v <= self.MAXV:
                raise ValueError(f"{type(self).__name__}: value {v:#x} out of range (min {minimum:#x}, "
                                 f"max {maximum:#x})")
        if maximum < minimum:
            raise ValueError(f"{type(self).__name__}: maximum {maximum:#x} below minimum {minimum:#x}")
        self.space, self.minimum, self.maximum = space, minimum, maximum
        self.general, self.specific, self.granularity, self.translation, self.length = \
            general, specific, granularity, translation, length

    def encode(self) -> bytes:
        return _large(self.ITEM, struct.pack("<BBB" + self.FMT * 5, self.space, self.general, self.specific,
                                             self.granularity, self.minimum, self.maximum, self.translation,
                                             self.length))


class WordAddressSpace(_AddressSpace):
    ITEM, FMT, MAXV = LARGE_WORD_ADDRESS, "H", 0xFFFF


class DWordAddressSpace(_AddressSpace):
    ITEM, FMT, MAXV = LARGE_DWORD_ADDRESS, "I", 0xFFFFFFFF


class QWordAddressSpace(_AddressSpace):
    ITEM, FMT, MAXV = LARGE_QWORD_ADDRESS, "Q", (1 << 64) - 1


def word_bus_number(minimum: int, maximum: int) -> WordAddressSpace:
    return WordAddressSpace(ADDR_SPACE_BUS, minimum, maximum)


def word_io(minimum: int, maximum: int) -> WordAddressSpace:
    return WordAddressSpace(ADDR_SPACE_IO, minimum, maximum, specific=IO_ENTIRE_RANGE)


def dword_memory(minimum: int, maximum: int, cacheable: int = MEM_CACHEABLE, read_write: bool = True
                 ) -> DWordAddressSpace:
    return DWordAddressSpace(ADDR_SPACE_MEMORY, minimum, maximum,
                             specific=cacheable | (MEM_READ_WRITE if read_write else 0))


def qword_memory(minimum: int, maximum: int, cacheable: int = MEM_CACHEABLE, read_write: bool = True
                 ) -> QWordAddressSpace:
    return QWordAddressSpace(ADDR_SPACE_MEMORY, minimum, maximum,
                             specific=cacheable | (MEM_READ_WRITE if read_write else 0))


class ExtendedInterrupt(ResourceDescriptor):
    """Extended Interrupt descriptor (GSIs, any number): consumer by default."""

    def __init__(self, interrupts: int | Iterable[int], edge: bool = False, active_low: bool = False,
                 shared: bool = False, wake: bool = False, consumer: bool = True):
        self.interrupts = [interrupts] if isinstance(interrupts, int) else list(interrupts)
        if not 1 <= len(self.interrupts) <= 255:
            raise ValueError("ExtendedInterrupt: 1..255 interrupts")
        for gsi in self.interrupts:
            if not 0 <= gsi <= 0xFFFFFFFF:
                raise ValueError(f"ExtendedInterrupt: interrupt {gsi} out of range")
        self.edge, self.active_low, self.shared, self.wake, self.consumer = edge, active_low, shared, wake, consumer

    def encode(self) -> bytes:
        flags = (1 if self.consumer else 0) | (2 if self.edge else 0) | (4 if self.active_low else 0) \
            | (8 if self.shared else 0) | (0x10 if self.wake else 0)
        return _large(LARGE_EXTENDED_IRQ, bytes([flags, len(self.interrupts)])
                      + b"".join(struct.pack("<I", g) for g in self.interrupts))


class ResourceTemplate(AmlObject):
    """ResourceTemplate(){...}: a Buffer of descriptors closed by an End Tag whose checksum makes the
    descriptor bytes (end tag included) sum to zero."""

    def __init__(self, descriptors: Iterable[ResourceDescriptor] = ()):
        self.descriptors = list(descriptors)

    def append(self, *descriptors: ResourceDescriptor) -> "ResourceTemplate":
        self.descriptors.extend(descriptors)
        return self

    def data(self) -> bytes:
        body = b"".join(d.encode() for d in self.descriptors) + bytes([(SMALL_END_TAG << 3) | 1])
        return body + bytes([(-sum(body)) & 0xFF])

    def encode(self) -> bytes:
        return Buffer(self.data()).encode()
