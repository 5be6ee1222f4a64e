"""i8042: controller self-test, command byte, keyboard replies, and the CPU reset line."""
from __future__ import annotations

from pyhv.devices.i8042 import I8042


def make():
    resets = []
    return I8042(on_reset=lambda: resets.append(1)), resets


def test_self_test_and_command_byte():
    kbc, _ = make()
    kbc.write(4, 1, 0xAA)
    assert kbc.read(4, 1) & 1
    assert kbc.read(0, 1) == 0x55
    kbc.write(4, 1, 0x60)
    kbc.write(0, 1, 0x45)
    kbc.write(4, 1, 0x20)
    assert kbc.read(0, 1) == 0x45


def test_keyboard_reset_reply():
    kbc, _ = make()
    kbc.write(0, 1, 0xFF)
    assert [kbc.read(0, 1), kbc.read(0, 1)] == [0xFA, 0xAA]
    assert not kbc.read(4, 1) & 1


def test_pulse_reset_line():
    kbc, resets = make()
    kbc.write(4, 1, 0xFE)
    assert resets == [1]


def test_output_port_write_with_bit0_low_resets():
    kbc, resets = make()
    kbc.write(4, 1, 0xD1)
    kbc.write(0, 1, 0x02)
    assert resets == [1]
    kbc.write(4, 1, 0xD1)
    kbc.write(0, 1, 0x03)                      # bit 0 high: no reset
    assert resets == [1]
