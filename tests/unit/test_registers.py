"""Declared registers: masks, write-1-to-clear, hooks, narrow and wide accesses."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from pyhv.devices.registers import Register, RegisterBank


@dataclass
class State:
    ctrl: int = 0
    status: int = 0xF0
    data: int = 0


class Dev:
    REGISTERS = (
        Register(0x0, "ctrl", width=4, writable=0x0000FFFF),
        Register(0x4, "status", width=1, w1c=0xF0),
        Register(0x8, "data", width=2, read="_read_data", write="_write_data"),
    )

    def __init__(self):
        self.state = State()
        self.writes: list[int] = []
        self.bank = RegisterBank(self, self.REGISTERS, self.state, "dev")

    def _read_data(self) -> int:
        return 0xBEEF

    def _write_data(self, value: int) -> None:
        self.writes.append(value)


def test_writable_mask():
    d = Dev()
    d.bank.write(0, 4, 0xFFFFFFFF)
    assert d.state.ctrl == 0xFFFF


def test_write_one_to_clear():
    d = Dev()
    d.bank.write(4, 1, 0x30)
    assert d.state.status == 0xC0


def test_hooks():
    d = Dev()
    assert d.bank.read(8, 2) == 0xBEEF
    d.bank.write(8, 2, 0x1234)
    assert d.writes == [0x1234]


def test_narrow_read_extracts_bytes():
    d = Dev()
    d.bank.write(0, 4, 0xABCD)
    assert d.bank.read(1, 1) == 0xAB
    assert d.bank.read(9, 1) == 0xBE


def test_narrow_write_merges_into_register():
    d = Dev()
    d.bank.write(0, 4, 0x1234)
    d.bank.write(1, 1, 0x56)
    assert d.state.ctrl == 0x5634


def test_wide_access_spans_registers_and_gaps():
    d = Dev()
    d.bank.write(0, 4, 0x1111)
    # bytes 4..7: status (0xF0) then three unlisted bytes that read as zero
    assert d.bank.read(0, 8) == 0x000000F0_00001111


def test_unlisted_offset_reads_zero_and_ignores_writes():
    d = Dev()
    d.bank.write(0xC, 4, 0xFFFFFFFF)
    assert d.bank.read(0xC, 4) == 0


def test_register_names():
    d = Dev()
    assert d.bank.register_name(4) == "dev.status"
    assert d.bank.register_name(5) == "dev+0x5"
    assert d.bank.register_name(2) == "dev.ctrl"
    assert d.bank.register_name(0x20) == "dev+0x20"


def test_a_register_without_storage_or_hooks_is_rejected():
    class Bad:
        REGISTERS = (Register(0, "missing"),)

    with pytest.raises(ValueError):
        RegisterBank(Bad(), Bad.REGISTERS, State(), "bad")


def test_reset_restores_values():
    d = Dev()
    d.bank.write(0, 4, 0x55)
    d.bank.reset()
    assert d.state.ctrl == 0 and d.state.status == 0
