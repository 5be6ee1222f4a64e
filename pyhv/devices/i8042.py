"""i8042 keyboard controller: enough for firmware and Linux to probe it, and its CPU reset line.

Ports 0x60 (data) and 0x64 (status / command). Controller commands: read/write the command byte (0x20/0x60),
self-test (0xAA → 0x55), interface tests (0xAB/0xA9 → 0x00), enable/disable keyboard and aux (0xAD/0xAE/0xA7/0xA8),
read/write the output port (0xD0/0xD1, bit 0 low = reset), pulse the output lines (0xF0-0xFF, bit 0 = reset).
Keyboard commands get the replies a keyboard with no keys pressed gives (ACK, self-test passed, ID).
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from pyhv.devices.irq import IrqLine, NullIrqLine
from pyhv.devices.device import Claim, device_region
from pyhv.devices.registers import Register, RegisterBank

I8042_STR_OBF = 0x01
I8042_STR_IBF = 0x02
I8042_STR_SYSFLAG = 0x04
I8042_STR_CMDDAT = 0x08
I8042_STR_KEYLOCK = 0x10
I8042_STR_AUXDATA = 0x20

I8042_CMD_READ_CTR = 0x20
I8042_CMD_WRITE_CTR = 0x60
I8042_CMD_AUX_DISABLE = 0xA7
I8042_CMD_AUX_ENABLE = 0xA8
I8042_CMD_AUX_TEST = 0xA9
I8042_CMD_CTL_TEST = 0xAA
I8042_CMD_KBD_TEST = 0xAB
I8042_CMD_KBD_DISABLE = 0xAD
I8042_CMD_KBD_ENABLE = 0xAE
I8042_CMD_READ_INPUT = 0xC0
I8042_CMD_READ_OUTPUT = 0xD0
I8042_CMD_WRITE_OUTPUT = 0xD1
I8042_CMD_WRITE_KBD_OUT = 0xD2
I8042_CMD_WRITE_AUX_OUT = 0xD3
I8042_CMD_WRITE_AUX = 0xD4
I8042_CMD_PULSE_BASE = 0xF0

I8042_CTR_KBDINT = 0x01
I8042_CTR_AUXINT = 0x02
I8042_CTR_SYSFLAG = 0x04
I8042_CTR_KBDDIS = 0x10
I8042_CTR_AUXDIS = 0x20
I8042_CTR_XLATE = 0x40

KBD_ACK = 0xFA
KBD_SELFTEST_OK = 0xAA


@dataclass
class I8042State:
    status: int = I8042_STR_SYSFLAG
    ctr: int = I8042_CTR_KBDINT | I8042_CTR_SYSFLAG | I8042_CTR_XLATE
    output_port: int = 0x03          # bit 0: reset line (high = running), bit 1: A20
    pending_command: int = 0         # a controller command waiting for its data byte
    queue: deque = field(default_factory=deque)   # (byte, from_aux)
    resets: int = 0


class I8042:
    SNAPSHOT = True                  # `state` is all it keeps; restored() re-derives the rest
    REGISTERS = (
        Register(0, "data", read="_read_data", write="_write_data"),
        Register(4, "status_command", read="_read_status", write="_write_command"),
    )
    SIZE = 5
    DATA_PORT, COMMAND_PORT = 0x60, 0x64

    def __init__(self, name: str = "i8042", kbd_irq: IrqLine | None = None, aux_irq: IrqLine | None = None,
                 on_reset: Callable[[], None] | None = None) -> None:
        self.name = name
        self.kbd_irq = kbd_irq or NullIrqLine()
        self.aux_irq = aux_irq or NullIrqLine()
        self.on_reset = on_reset or (lambda: None)
        self.state = I8042State()
        self.lock = threading.Lock()
        self.bank = RegisterBank(self, self.REGISTERS, self.state, name)

    def read(self, offset: int, size: int) -> int:
        with self.lock:
            return self.bank.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        reset = False
        with self.lock:
            self.bank.write(offset, size, value)
            if not (self.state.output_port & 1):
                self.state.output_port |= 1
                self.state.resets += 1
                reset = True
        if reset:
            self.on_reset()          # outside the lock: the machine may reset this very device

    def claims(self) -> list[Claim]:
        return [Claim.port(self.DATA_PORT, device_region(self, 1, "i8042-data")),
                Claim.port(self.COMMAND_PORT, device_region(self, 1, "i8042-cmd", base=4))]

    def reset(self) -> None:
        with self.lock:
            resets = self.state.resets
            self.state = I8042State(resets=resets)
            self.bank.state = self.state
            self._update_irq()

    # --- output buffer ------------------------------------------------------------------------------------
    def _queue(self, byte: int, aux: bool = False) -> None:
        self.state.queue.append((byte & 0xFF, aux))
        self._update_irq()

    def restored(self) -> None:
        """After a snapshot's state was loaded: drive the interrupt lines to what the queue says."""
        with self.lock:
            self._update_irq()

    def _update_irq(self) -> None:
        s = self.state
        if s.queue:
            aux = s.queue[0][1]
            s.status = (s.status | I8042_STR_OBF) & ~I8042_STR_AUXDATA | (I8042_STR_AUXDATA if aux else 0)
        else:
            s.status &= ~(I8042_STR_OBF | I8042_STR_AUXDATA)
            aux = False
        has = bool(s.queue)
        self.kbd_irq.set_level(has and not aux and bool(s.ctr & I8042_CTR_KBDINT))
        self.aux_irq.set_level(has and aux and bool(s.ctr & I8042_CTR_AUXINT))

    def _read_status(self) -> int:
        return self.state.status

    def _read_data(self) -> int:
        s = self.state
        if not s.queue:
            return 0
        byte, _ = s.queue.popleft()
        self._update_irq()
        return byte

    # --- commands -----------------------------------------------------------------------------------------
    def _write_command(self, cmd: int) -> None:
        s = self.state
        s.status |= I8042_STR_CMDDAT
        s.pending_command = 0
        if cmd == I8042_CMD_READ_CTR:
            self._queue(s.ctr)
        elif cmd in (I8042_CMD_WRITE_CTR, I8042_CMD_WRITE_OUTPUT, I8042_CMD_WRITE_KBD_OUT,
                     I8042_CMD_WRITE_AUX_OUT, I8042_CMD_WRITE_AUX):
            s.pending_command = cmd
        elif cmd == I8042_CMD_CTL_TEST:
            self._queue(0x55)
        elif cmd in (I8042_CMD_KBD_TEST, I8042_CMD_AUX_TEST):
            self._queue(0x00)
        elif cmd == I8042_CMD_KBD_DISABLE:
            s.ctr |= I8042_CTR_KBDDIS
        elif cmd == I8042_CMD_KBD_ENABLE:
            s.ctr &= ~I8042_CTR_KBDDIS
        elif cmd == I8042_CMD_AUX_DISABLE:
            s.ctr |= I8042_CTR_AUXDIS
        elif cmd == I8042_CMD_AUX_ENABLE:
            s.ctr &= ~I8042_CTR_AUXDIS
        elif cmd == I8042_CMD_READ_INPUT:
            self._queue(0x80)                    # keyboard not inhibited
        elif cmd == I8042_CMD_READ_OUTPUT:
            self._queue(s.output_port)
        elif cmd >= I8042_CMD_PULSE_BASE:
            if not (cmd & 1):                    # pulse output bit 0 low: CPU reset
                s.output_port &= ~1

    def _write_data(self, value: int) -> None:
        s = self.state
        s.status &= ~I8042_STR_CMDDAT
        cmd, s.pending_command = s.pending_command, 0
        if cmd == I8042_CMD_WRITE_CTR:
            s.ctr = value
            s.status = (s.status & ~I8042_STR_SYSFLAG) | (I8042_STR_SYSFLAG if value & I8042_CTR_SYSFLAG else 0)
            self._update_irq()
        elif cmd == I8042_CMD_WRITE_OUTPUT:
            s.output_port = value            # bit 0 low resets the CPU (handled by write())
        elif cmd == I8042_CMD_WRITE_KBD_OUT:
            self._queue(value)
        elif cmd == I8042_CMD_WRITE_AUX_OUT:
            self._queue(value, aux=True)
        elif cmd == I8042_CMD_WRITE_AUX:
            self._queue(0xFE, aux=True)      # no mouse: resend
        else:
            self._keyboard_command(value)

    def _keyboard_command(self, value: int) -> None:
        if value == 0xFF:                    # reset
            self._queue(KBD_ACK)
            self._queue(KBD_SELFTEST_OK)
        elif value == 0xF2:                  # identify: MF2 keyboard
            self._queue(KBD_ACK)
            self._queue(0xAB)
            self._queue(0x83)
        elif value == 0xEE:                  # echo
            self._queue(0xEE)
        else:
            self._queue(KBD_ACK)
