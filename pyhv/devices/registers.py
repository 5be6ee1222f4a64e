"""Declared device registers, and the one piece of code that turns a register table into region callbacks.

A device lists its registers once:

    REGISTERS = (
        Register(0x00, "data", read="_read_data", write="_write_data"),
        Register(0x04, "status", width=4, reset=0x1, writable=0x0, w1c=0xF0),
        Register(0x08, "scratch", width=4),
    )

and `RegisterBank(device, REGISTERS, state)` gives `read(offset, size)` / `write(offset, size, value)` for a
`MemoryRegion.io`. A register either stores its value in a field of the device's state dataclass (named like the
register unless `field=` says otherwise), with read-only and write-1-to-clear masks applied, or has hooks: `read`
names a method returning the value, `write` a method taking the written value. Accesses narrower or wider than a
register are split or merged here, so devices only ever see whole registers. Unlisted offsets read as zero and
ignore writes. The bank also names registers for traces and exit statistics.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable

from pyhv import trace

if TYPE_CHECKING:
    from pyhv.memory import MemoryRegion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Register:
    offset: int
    name: str
    width: int = 1
    reset: int = 0
    writable: int | None = None   # bits the guest may change (default: all)
    w1c: int = 0                  # bits a guest write of 1 clears
    read: str | None = None       # device method returning the value
    write: str | None = None      # device method receiving the written value
    field: str | None = None      # state field holding the value (default: the register's name)


class RegisterBank:
    def __init__(self, device: Any, registers: Iterable[Register], state: Any = None, name: str | None = None):
        self.device = device
        self.state = state
        self.name = name or getattr(device, "name", type(device).__name__)
        self.registers = tuple(registers)
        self._at: dict[int, tuple[Register, Callable[[], int], Callable[[int], None]]] = {}
        self._byte: dict[int, Register] = {}
        state_fields = {f.name for f in fields(state)} if is_dataclass(state) else set()
        for reg in self.registers:
            if reg.offset in self._at:
                raise ValueError(f"{self.name}: two registers at offset {reg.offset:#x}")
            field = reg.field or reg.name
            if reg.read is None or reg.write is None:
                if field not in state_fields:
                    raise ValueError(f"{self.name}.{reg.name}: no hook and no state field {field!r}")
            reader = getattr(device, reg.read) if reg.read else self._field_reader(field)
            writer = getattr(device, reg.write) if reg.write else self._field_writer(reg, field)
            self._at[reg.offset] = (reg, reader, writer)
            for i in range(reg.width):
                self._byte[reg.offset + i] = reg
        self.tracing = trace.enabled(self.name)

    def _field_reader(self, field: str) -> Callable[[], int]:
        state = self.state
        return lambda: getattr(state, field)

    def _field_writer(self, reg: Register, field: str) -> Callable[[int], None]:
        state = self.state
        full = (1 << (8 * reg.width)) - 1
        writable = full if reg.writable is None else reg.writable
        w1c = reg.w1c
        keep = ~writable & ~w1c & full

        def write(value: int) -> None:
            old = getattr(state, field)
            setattr(state, field, (old & keep) | (value & writable & ~w1c) | (old & w1c & ~value))
        return write

    def reset(self) -> None:
        """Put every state-backed register back to its reset value."""
        for reg, _, _ in self._at.values():
            if reg.read is None or reg.write is None:
                setattr(self.state, reg.field or reg.name, reg.reset)

    def region(self, size: int, name: str | None = None, lock: ContextManager | None = None,
               owner: str | None = None) -> "MemoryRegion":
        """The I/O region of this bank (`size` bytes), named for traces and exit statistics; with `lock`, every
        access holds it (a device whose state an I/O thread changes too)."""
        from pyhv.memory import MemoryRegion
        read, write = self.read, self.write
        if lock is not None:
            def read(offset: int, size: int, _read=self.read) -> int:
                with lock:
                    return _read(offset, size)

            def write(offset: int, size: int, value: int, _write=self.write) -> None:
                with lock:
                    _write(offset, size, value)
        region = MemoryRegion.io(name or self.name, size, read, write, owner=owner or self.device_name)
        region.describe = self.register_name
        return region

    @property
    def device_name(self) -> str:
        return getattr(self.device, "name", self.name)

    def register_name(self, offset: int) -> str:
        reg = self._byte.get(offset)
        return f"{self.name}.{reg.name}" if reg else f"{self.name}+{offset:#x}"

    # --- region callbacks --------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        entry = self._at.get(offset)
        if entry is not None and entry[0].width == size:
            value = entry[1]()
        else:
            value = 0
            done: set[int] = set()
            for i in range(size):                 # gather the bytes of every register the access touches
                reg = self._byte.get(offset + i)
                if reg is None or reg.offset in done:
                    continue
                done.add(reg.offset)
                reg_value = self._at[reg.offset][1]()
                for j in range(reg.width):
                    k = reg.offset + j - offset
                    if 0 <= k < size:
                        value |= ((reg_value >> (8 * j)) & 0xFF) << (8 * k)
        if self.tracing:
            trace.log_access(self.register_name(offset), "read", size, value)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if self.tracing:
            trace.log_access(self.register_name(offset), "write", size, value)
        entry = self._at.get(offset)
        if entry is not None and entry[0].width == size:
            entry[2](value)
            return
        done: set[int] = set()
        for i in range(size):                     # split: merge the written bytes into each register touched
            reg = self._byte.get(offset + i)
            if reg is None or reg.offset in done:
                continue
            done.add(reg.offset)
            _, reader, writer = self._at[reg.offset]
            merged = reader() if (reg.read is None) else 0
            for j in range(reg.width):
                k = reg.offset + j - offset
                if 0 <= k < size:
                    merged = (merged & ~(0xFF << (8 * j))) | (((value >> (8 * k)) & 0xFF) << (8 * j))
            writer(merged)
