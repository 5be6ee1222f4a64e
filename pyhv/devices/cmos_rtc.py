"""MC146818 CMOS real-time clock and NVRAM at ports 0x70 (index, bit 7 = NMI mask) / 0x71 (data).

The clock follows the host's time plus the offset the guest sets; the update-in-progress bit is set during the
last 244 µs before each second, as on the chip (a guest that waits for it to clear never spins for long); register
C's flags are derived from elapsed time, and IRQ 8 fires for periodic, alarm and update-ended events when enabled.
The NVRAM carries the memory-size bytes and CPU count that firmware reads.
"""
from __future__ import annotations

import calendar
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from pyhv.devices.irq import IrqLine, NullIrqLine
from pyhv.devices.registers import Register, RegisterBank
from pyhv.devices.device import Claim, device_region

RTC_SECONDS, RTC_SECONDS_ALARM, RTC_MINUTES, RTC_MINUTES_ALARM = 0x00, 0x01, 0x02, 0x03
RTC_HOURS, RTC_HOURS_ALARM, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH = 0x04, 0x05, 0x06, 0x07
RTC_MONTH, RTC_YEAR = 0x08, 0x09
RTC_REG_A, RTC_REG_B, RTC_REG_C, RTC_REG_D = 0x0A, 0x0B, 0x0C, 0x0D
RTC_CENTURY = 0x32

RTC_REG_A_UIP = 0x80
RTC_REG_B_SET = 0x80
RTC_REG_B_PIE = 0x40
RTC_REG_B_AIE = 0x20
RTC_REG_B_UIE = 0x10
RTC_REG_B_DM_BINARY = 0x04
RTC_REG_B_24H = 0x02
RTC_REG_C_IRQF = 0x80
RTC_REG_C_PF = 0x40
RTC_REG_C_AF = 0x20
RTC_REG_C_UF = 0x10
RTC_REG_D_VRT = 0x80

UIP_WINDOW = 244e-6

# NVRAM bytes firmware reads (the IBM PC/AT layout, plus the bytes QEMU's SeaBIOS reads)
CMOS_BASE_MEM_LO, CMOS_BASE_MEM_HI = 0x15, 0x16
CMOS_EXT_MEM_LO, CMOS_EXT_MEM_HI = 0x17, 0x18
CMOS_EXT_MEM2_LO, CMOS_EXT_MEM2_HI = 0x30, 0x31
CMOS_MEM_ABOVE_16M_LO, CMOS_MEM_ABOVE_16M_HI = 0x34, 0x35
CMOS_MEM_ABOVE_4G = 0x5B          # 3 bytes, 64 KiB units
CMOS_CPU_COUNT = 0x5F             # CPUs - 1


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


@dataclass
class CmosState:
    index: int = 0
    nmi_masked: bool = False
    nvram: bytearray = field(default_factory=lambda: bytearray(128))
    offset: float = 0.0           # guest time minus host time, in seconds
    last_c_read: float = 0.0      # host time register C was last read (its flags are derived from it)


class CmosRtc:
    SNAPSHOT = True                  # `state` is all it keeps; restored() re-derives the rest
    REGISTERS = (
        Register(0, "index", read="_read_index", write="_write_index"),
        Register(1, "data", read="_read_data", write="_write_data"),
    )
    SIZE = 2
    PORT = 0x70

    def __init__(self, name: str = "rtc", irq: IrqLine | None = None, clock: Callable[[], float] = time.time,
                 call_later: Callable[[float, Callable[[], None]], object] | None = None) -> None:
        self.name = name
        self.irq = irq or NullIrqLine()
        self.clock = clock
        self.call_later = call_later
        self.state = CmosState()
        self.lock = threading.Lock()
        self.bank = RegisterBank(self, self.REGISTERS, self.state, name)
        self._timer = None
        nv = self.state.nvram
        nv[RTC_REG_A] = 0x26              # 32.768 kHz time base, 1024 Hz periodic rate
        nv[RTC_REG_B] = RTC_REG_B_24H
        nv[RTC_REG_D] = RTC_REG_D_VRT
        self.state.last_c_read = clock()

    def read(self, offset: int, size: int) -> int:
        with self.lock:
            return self.bank.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            self.bank.write(offset, size, value)


    def claims(self) -> list[Claim]:
        return [Claim.port(self.PORT, device_region(self, self.SIZE))]

    def reset(self) -> None:
        """The chip's RESET pin (a system reset): interrupt enables and flags clear; the time and the
        battery-backed NVRAM stay."""
        with self.lock:
            self.state.nvram[RTC_REG_B] &= ~(RTC_REG_B_PIE | RTC_REG_B_AIE | RTC_REG_B_UIE) & 0xFF
            self.state.last_c_read = self.clock()
            self.irq.set_level(False)

    # --- NVRAM the machine fills in -----------------------------------------------------------------------
    def set_memory_size(self, below_4g: int, above_4g: int) -> None:
        nv = self.state.nvram
        nv[CMOS_BASE_MEM_LO:CMOS_BASE_MEM_HI + 1] = (640).to_bytes(2, "little")
        ext_kb = min(max(below_4g - (1 << 20), 0) // 1024, 0xFFFF)
        nv[CMOS_EXT_MEM_LO:CMOS_EXT_MEM_HI + 1] = ext_kb.to_bytes(2, "little")
        nv[CMOS_EXT_MEM2_LO:CMOS_EXT_MEM2_HI + 1] = ext_kb.to_bytes(2, "little")
        above_16m = min(max(below_4g - (16 << 20), 0) // 65536, 0xFFFF)
        nv[CMOS_MEM_ABOVE_16M_LO:CMOS_MEM_ABOVE_16M_HI + 1] = above_16m.to_bytes(2, "little")
        nv[CMOS_MEM_ABOVE_4G:CMOS_MEM_ABOVE_4G + 3] = min(above_4g // 65536, 0xFFFFFF).to_bytes(3, "little")
        checksum = sum(nv[0x10:0x2E]) & 0xFFFF
        nv[0x2E:0x30] = checksum.to_bytes(2, "big")

    def set_cpu_count(self, cpus: int) -> None:
        self.state.nvram[CMOS_CPU_COUNT] = cpus - 1

    # --- registers ---------------------------------------------------------------------------------------
    def _read_index(self) -> int:
        return 0xFF                        # port 0x70 is write-only

    def _write_index(self, value: int) -> None:
        self.state.index = value & 0x7F
        self.state.nmi_masked = bool(value & 0x80)

    def _read_data(self) -> int:
        index = self.state.index
        nv = self.state.nvram
        if index <= RTC_YEAR or index == RTC_CENTURY:
            if not (nv[RTC_REG_B] & RTC_REG_B_SET):
                self._latch_time()
            return nv[index]
        if index == RTC_REG_A:
            uip = 0
            if not (nv[RTC_REG_B] & RTC_REG_B_SET):
                now = self.clock() + self.state.offset
                if now - int(now) >= 1.0 - UIP_WINDOW:
                    uip = RTC_REG_A_UIP
            return (nv[RTC_REG_A] & 0x7F) | uip
        if index == RTC_REG_C:
            value = self._flags()
            self.state.last_c_read = self.clock()
            self.irq.set_level(False)
            return value
        return nv[index]

    def _write_data(self, value: int) -> None:
        index = self.state.index
        nv = self.state.nvram
        if index in (RTC_REG_C, RTC_REG_D):
            return                          # read-only
        if index == RTC_REG_A:
            nv[index] = value & 0x7F        # UIP is read-only
            self._rearm()
            return
        if index == RTC_REG_B:
            was_set = nv[index] & RTC_REG_B_SET
            if value & RTC_REG_B_SET and not was_set:
                self._latch_time()          # freeze the registers the guest is about to set
            nv[index] = value & 0xFF
            if was_set and not (value & RTC_REG_B_SET):
                self._take_time()           # the guest set the clock: remember its offset from the host's
            self._rearm()
            return
        nv[index] = value & 0xFF

    # --- time -------------------------------------------------------------------------------------------
    def _encode(self, value: int) -> int:
        return value if self.state.nvram[RTC_REG_B] & RTC_REG_B_DM_BINARY else _bcd(value)

    def _decode(self, value: int) -> int:
        return value if self.state.nvram[RTC_REG_B] & RTC_REG_B_DM_BINARY else _from_bcd(value)

    def _latch_time(self) -> None:
        t = time.gmtime(self.clock() + self.state.offset)
        nv = self.state.nvram
        hour = t.tm_hour
        if not (nv[RTC_REG_B] & RTC_REG_B_24H):
            pm = hour >= 12
            hour = hour % 12 or 12
            nv[RTC_HOURS] = self._encode(hour) | (0x80 if pm else 0)
        else:
            nv[RTC_HOURS] = self._encode(hour)
        nv[RTC_SECONDS] = self._encode(t.tm_sec)
        nv[RTC_MINUTES] = self._encode(t.tm_min)
        nv[RTC_DAY_OF_WEEK] = self._encode((t.tm_wday + 1) % 7 + 1)   # Sunday = 1
        nv[RTC_DAY_OF_MONTH] = self._encode(t.tm_mday)
        nv[RTC_MONTH] = self._encode(t.tm_mon)
        nv[RTC_YEAR] = self._encode(t.tm_year % 100)
        nv[RTC_CENTURY] = self._encode(t.tm_year // 100)

    def _take_time(self) -> None:
        nv = self.state.nvram
        hour_reg = nv[RTC_HOURS]
        if nv[RTC_REG_B] & RTC_REG_B_24H:
            hour = self._decode(hour_reg)
        else:
            hour = self._decode(hour_reg & 0x7F) % 12 + (12 if hour_reg & 0x80 else 0)
        try:
            guest = calendar.timegm((self._decode(nv[RTC_CENTURY]) * 100 + self._decode(nv[RTC_YEAR]),
                                     self._decode(nv[RTC_MONTH]), self._decode(nv[RTC_DAY_OF_MONTH]), hour,
                                     self._decode(nv[RTC_MINUTES]), self._decode(nv[RTC_SECONDS]), 0, 0, 0))
        except (ValueError, OverflowError):
            return                          # nonsense date: keep the clock as it was
        self.state.offset = guest - int(self.clock())

    # --- interrupts ------------------------------------------------------------------------------------
    def _period(self) -> float | None:
        rate = self.state.nvram[RTC_REG_A] & 0x0F
        if rate == 0:
            return None
        if rate < 3:
            rate += 7
        return (1 << (rate - 1)) / 32768.0

    def _flags(self) -> int:
        nv = self.state.nvram
        now = self.clock()
        since = self.state.last_c_read
        flags = 0
        guest_now, guest_then = now + self.state.offset, since + self.state.offset
        if int(guest_now) != int(guest_then) and not (nv[RTC_REG_B] & RTC_REG_B_SET):
            flags |= RTC_REG_C_UF
            for second in range(int(guest_then) + 1, int(guest_now) + 1):
                if self._alarm_matches(second):
                    flags |= RTC_REG_C_AF
                    break
        period = self._period()
        if period and int(now / period) != int(since / period):
            flags |= RTC_REG_C_PF
        if flags & nv[RTC_REG_B] & (RTC_REG_B_PIE | RTC_REG_B_AIE | RTC_REG_B_UIE):   # PF/AF/UF line up with PIE/AIE/UIE
            flags |= RTC_REG_C_IRQF
        return flags

    def _alarm_matches(self, second: int) -> bool:
        t = time.gmtime(second)
        nv = self.state.nvram

        def match(alarm: int, value: int) -> bool:
            return (alarm & 0xC0) == 0xC0 or self._decode(alarm) == value
        return (match(nv[RTC_SECONDS_ALARM], t.tm_sec) and match(nv[RTC_MINUTES_ALARM], t.tm_min)
                and match(nv[RTC_HOURS_ALARM], t.tm_hour))

    def restored(self) -> None:
        """After a snapshot's state was loaded: run the interrupt timer again if the guest had enabled one."""
        with self.lock:
            self._rearm()

    def _rearm(self) -> None:
        """Run a timer while an interrupt source is enabled; it raises IRQ 8 when register C has a flag."""
        enabled = self.state.nvram[RTC_REG_B] & (RTC_REG_B_PIE | RTC_REG_B_AIE | RTC_REG_B_UIE)
        if not enabled or self.call_later is None or self._timer is not None:
            return
        period = self._period() if enabled & RTC_REG_B_PIE else None
        self._timer = self.call_later(min(period or 1.0, 1.0) if period else 0.05, self._tick)

    def _tick(self) -> None:
        with self.lock:
            self._timer = None
            if self._flags() & RTC_REG_C_IRQF:
                self.irq.set_level(True)
            self._rearm()
