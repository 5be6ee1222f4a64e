"""CMOS RTC: clock registers in BCD and binary, 12-hour mode, update-in-progress window, setting the clock,
register C flags, NVRAM memory-size bytes."""
from __future__ import annotations

import calendar

import pytest

from pyhv.devices.cmos_rtc import RTC_REG_A_UIP, CmosRtc

T0 = calendar.timegm((2026, 11, 25, 21, 7, 42, 0, 0, 0)) + 0.25   # a Wednesday


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def rd(rtc: CmosRtc, index: int) -> int:
    rtc.write(0, 1, index)
    return rtc.read(1, 1)


def wr(rtc: CmosRtc, index: int, value: int) -> None:
    rtc.write(0, 1, index)
    rtc.write(1, 1, value)


def test_bcd_time():
    rtc = CmosRtc(clock=Clock(T0))
    assert [rd(rtc, i) for i in (0, 2, 4, 6, 7, 8, 9, 0x32)] == [0x42, 0x07, 0x21, 4, 0x25, 0x11, 0x26, 0x20]


def test_binary_and_12_hour_mode():
    rtc = CmosRtc(clock=Clock(T0))
    wr(rtc, 0x0B, 0x04)                        # binary, 12-hour
    assert rd(rtc, 0) == 42
    assert rd(rtc, 4) == 0x80 | 9              # 21:07 is 9 PM


def test_update_in_progress_only_just_before_the_second_ends():
    clock = Clock(T0)
    rtc = CmosRtc(clock=clock)
    assert not rd(rtc, 0x0A) & RTC_REG_A_UIP
    clock.t = int(T0) + 0.9999
    assert rd(rtc, 0x0A) & RTC_REG_A_UIP
    wr(rtc, 0x0B, 0x82)                        # SET: updates stop, so does UIP
    assert not rd(rtc, 0x0A) & RTC_REG_A_UIP


def test_guest_sets_the_clock():
    clock = Clock(T0)
    rtc = CmosRtc(clock=clock)
    wr(rtc, 0x0B, 0x82)
    wr(rtc, 4, 0x08)                           # 08:07:42
    wr(rtc, 0x0B, 0x02)
    assert rd(rtc, 4) == 0x08
    clock.t += 3600
    assert rd(rtc, 4) == 0x09                  # and it keeps running from there


def test_register_c_flags_and_irq():
    clock = Clock(T0)
    levels = []
    from pyhv.devices.irq import CallbackIrqLine
    rtc = CmosRtc(irq=CallbackIrqLine(levels.append), clock=clock)
    rd(rtc, 0x0C)
    clock.t += 1.0
    wr(rtc, 0x0B, 0x12)                        # update-ended interrupt enabled
    assert rd(rtc, 0x0C) & 0x90 == 0x90        # UF and IRQF
    assert rd(rtc, 0x0C) & 0x10 == 0           # cleared by the read


def test_register_d_valid_ram_and_time():
    assert rd(CmosRtc(clock=Clock(T0)), 0x0D) == 0x80


@pytest.mark.parametrize("memory,above", [(128 << 20, 0), (3 << 30, 2 << 30)])
def test_memory_size_bytes(memory, above):
    rtc = CmosRtc(clock=Clock(T0))
    rtc.set_memory_size(memory, above)
    assert rd(rtc, 0x15) | rd(rtc, 0x16) << 8 == 640
    assert rd(rtc, 0x34) | rd(rtc, 0x35) << 8 == (memory - (16 << 20)) >> 16
    assert rd(rtc, 0x30) | rd(rtc, 0x31) << 8 == min((memory - (1 << 20)) >> 10, 0xFFFF)
    assert rd(rtc, 0x5B) | rd(rtc, 0x5C) << 8 | rd(rtc, 0x5D) << 16 == above >> 16


def test_cpu_count_and_nmi_bit():
    rtc = CmosRtc(clock=Clock(T0))
    rtc.set_cpu_count(4)
    rtc.write(0, 1, 0x80 | 0x5F)               # bit 7 masks NMI; the index is the low 7 bits
    assert rtc.read(1, 1) == 3
    assert rtc.state.nmi_masked
