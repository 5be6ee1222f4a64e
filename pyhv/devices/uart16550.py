"""16550A UART (National Semiconductor PC16550D data sheet): 8 byte registers, DLAB banking, 16-byte FIFOs,
the four interrupt sources with their priorities, modem control with loopback, scratch register.

Transmission is instantaneous (THR is empty again as soon as it is written); received bytes wait in a host-side
queue until the 16-byte receive FIFO has room, so nothing typed is ever dropped.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from pyhv.devices.irq import IrqLine, NullIrqLine
from pyhv.devices.registers import Register, RegisterBank
from pyhv.devices.device import Claim, device_region

# Line status register
UART_LSR_DR = 0x01
UART_LSR_OE = 0x02
UART_LSR_PE = 0x04
UART_LSR_FE = 0x08
UART_LSR_BI = 0x10
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40
UART_LSR_FIFOE = 0x80
UART_LSR_ERRORS = UART_LSR_OE | UART_LSR_PE | UART_LSR_FE | UART_LSR_BI
# Interrupt enable register
UART_IER_RDI = 0x01
UART_IER_THRI = 0x02
UART_IER_RLSI = 0x04
UART_IER_MSI = 0x08
# Interrupt identification register
UART_IIR_NO_INT = 0x01
UART_IIR_MSI = 0x00
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_RLSI = 0x06
UART_IIR_CTI = 0x0C
UART_IIR_FIFO_ENABLED = 0xC0
# FIFO control register
UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02
UART_FCR_CLEAR_XMIT = 0x04
UART_FCR_TRIGGER_MASK = 0xC0
FIFO_TRIGGER_LEVELS = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}
# Line control register
UART_LCR_DLAB = 0x80
# Modem control register
UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT1 = 0x04
UART_MCR_OUT2 = 0x08
UART_MCR_LOOP = 0x10
# Modem status register
UART_MSR_DCTS = 0x01
UART_MSR_DDSR = 0x02
UART_MSR_TERI = 0x04
UART_MSR_DDCD = 0x08
UART_MSR_CTS = 0x10
UART_MSR_DSR = 0x20
UART_MSR_RI = 0x40
UART_MSR_DCD = 0x80
UART_MSR_DELTAS = 0x0F

FIFO_SIZE = 16


@dataclass
class UartState:
    dll: int = 0x0C      # divisor 12: 9600 baud, as firmware leaves it
    dlm: int = 0
    ier: int = 0
    fcr: int = 0
    lcr: int = 0x03
    mcr: int = UART_MCR_OUT2
    lsr: int = UART_LSR_THRE | UART_LSR_TEMT
    msr: int = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
    scr: int = 0
    thr_interrupt: bool = False      # THR-empty interrupt pending (cleared by reading IIR or writing THR)
    rx_fifo: deque = field(default_factory=deque)
    tx_bytes: int = 0
    rx_bytes: int = 0


class Uart16550:
    SNAPSHOT = True                  # `state` is all it keeps; restored() re-derives the rest
    REGISTERS = (
        Register(0, "rbr_thr", read="_read_rbr", write="_write_thr"),     # DLL when LCR.DLAB
        Register(1, "ier", read="_read_ier", write="_write_ier"),         # DLM when LCR.DLAB
        Register(2, "iir_fcr", read="_read_iir", write="_write_fcr"),
        Register(3, "lcr", read="_read_lcr", write="_write_lcr"),
        Register(4, "mcr", read="_read_mcr", write="_write_mcr"),
        Register(5, "lsr", read="_read_lsr", write="_write_ignored"),
        Register(6, "msr", read="_read_msr", write="_write_ignored"),
        Register(7, "scr", reset=0),
    )
    SIZE = 8
    PORT = 0x3F8                # COM1

    def __init__(self, name: str = "serial0", irq: IrqLine | None = None,
                 output: Callable[[bytes], None] | None = None) -> None:
        self.name = name
        self.irq = irq or NullIrqLine()
        self.output = output or (lambda data: None)
        self.state = UartState()
        self.pending_input: deque[int] = deque()    # typed but not yet in the FIFO
        self.lock = threading.RLock()
        self.bank = RegisterBank(self, self.REGISTERS, self.state, name)

    # --- region callbacks (hold the lock: the I/O thread delivers input concurrently) -----------------------
    def read(self, offset: int, size: int) -> int:
        with self.lock:
            return self.bank.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            self.bank.write(offset, size, value)


    def claims(self) -> list[Claim]:
        return [Claim.port(self.PORT, device_region(self, self.SIZE))]

    def reset(self) -> None:
        with self.lock:
            self.state = UartState()
            self.bank.state = self.state
            self.bank = RegisterBank(self, self.REGISTERS, self.state, self.name)
            self._update_irq()

    # --- host side --------------------------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Bytes from the host (terminal, socket) for the guest."""
        with self.lock:
            self.pending_input.extend(data)
            self._refill_rx()
            self._update_irq()

    @property
    def fifo_enabled(self) -> bool:
        return bool(self.state.fcr & UART_FCR_ENABLE_FIFO)

    def _rx_capacity(self) -> int:
        return FIFO_SIZE if self.fifo_enabled else 1

    def _refill_rx(self) -> None:
        s = self.state
        if s.mcr & UART_MCR_LOOP:
            return                       # in loopback the receiver only hears the transmitter
        while self.pending_input and len(s.rx_fifo) < self._rx_capacity():
            s.rx_fifo.append(self.pending_input.popleft())
        if s.rx_fifo:
            s.lsr |= UART_LSR_DR

    def _push_rx(self, byte: int) -> None:
        s = self.state
        if len(s.rx_fifo) >= self._rx_capacity():
            s.lsr |= UART_LSR_OE        # loopback overrun, as the hardware does
            return
        s.rx_fifo.append(byte)
        s.lsr |= UART_LSR_DR

    # --- interrupt logic ------------------------------------------------------------------------------------
    def _pending_iir(self) -> int:
        s = self.state
        if (s.ier & UART_IER_RLSI) and (s.lsr & UART_LSR_ERRORS):
            return UART_IIR_RLSI
        if (s.ier & UART_IER_RDI) and s.rx_fifo:
            if not self.fifo_enabled or len(s.rx_fifo) >= FIFO_TRIGGER_LEVELS[s.fcr & UART_FCR_TRIGGER_MASK]:
                return UART_IIR_RDI
            return UART_IIR_CTI          # below the trigger level: the character timeout fires (at once here)
        if (s.ier & UART_IER_THRI) and s.thr_interrupt:
            return UART_IIR_THRI
        if (s.ier & UART_IER_MSI) and (s.msr & UART_MSR_DELTAS):
            return UART_IIR_MSI
        return UART_IIR_NO_INT

    def restored(self) -> None:
        """After a snapshot's state was loaded: drive the interrupt line to what the registers say."""
        with self.lock:
            self._update_irq()

    def _update_irq(self) -> None:
        self.irq.set_level(self._pending_iir() != UART_IIR_NO_INT)

    # --- registers ------------------------------------------------------------------------------------------
    def _read_rbr(self) -> int:
        s = self.state
        if s.lcr & UART_LCR_DLAB:
            return s.dll
        value = s.rx_fifo.popleft() if s.rx_fifo else 0
        if not s.rx_fifo:
            s.lsr &= ~UART_LSR_DR
        self._refill_rx()
        s.rx_bytes += 1
        self._update_irq()
        return value

    def _write_thr(self, value: int) -> None:
        s = self.state
        if s.lcr & UART_LCR_DLAB:
            s.dll = value & 0xFF
            return
        s.tx_bytes += 1
        if s.mcr & UART_MCR_LOOP:
            self._push_rx(value & 0xFF)
        else:
            self.output(bytes((value & 0xFF,)))
        s.lsr |= UART_LSR_THRE | UART_LSR_TEMT   # sent at once: THR is empty again
        s.thr_interrupt = True
        self._update_irq()

    def _read_ier(self) -> int:
        s = self.state
        return s.dlm if s.lcr & UART_LCR_DLAB else s.ier

    def _write_ier(self, value: int) -> None:
        s = self.state
        if s.lcr & UART_LCR_DLAB:
            s.dlm = value & 0xFF
            return
        old = s.ier
        s.ier = value & 0x0F
        if (s.ier & UART_IER_THRI) and not (old & UART_IER_THRI) and (s.lsr & UART_LSR_THRE):
            s.thr_interrupt = True       # enabling the THRE interrupt while THR is empty raises it
        self._update_irq()

    def _read_iir(self) -> int:
        iir = self._pending_iir()
        if iir == UART_IIR_THRI:
            self.state.thr_interrupt = False   # reading IIR acknowledges the THRE source
            self._update_irq()
        return iir | (UART_IIR_FIFO_ENABLED if self.fifo_enabled else 0)

    def _write_fcr(self, value: int) -> None:
        s = self.state
        if (value ^ s.fcr) & UART_FCR_ENABLE_FIFO:
            s.rx_fifo.clear()            # changing FIFO mode empties both FIFOs
        if value & UART_FCR_CLEAR_RCVR:
            s.rx_fifo.clear()
        s.fcr = value & (UART_FCR_ENABLE_FIFO | UART_FCR_TRIGGER_MASK)
        if not s.rx_fifo:
            s.lsr &= ~UART_LSR_DR
        self._refill_rx()
        self._update_irq()

    def _read_lcr(self) -> int:
        return self.state.lcr

    def _write_lcr(self, value: int) -> None:
        self.state.lcr = value & 0xFF

    def _read_mcr(self) -> int:
        return self.state.mcr

    def _write_mcr(self, value: int) -> None:
        s = self.state
        was_loop = s.mcr & UART_MCR_LOOP
        s.mcr = value & 0x1F
        old_msr = s.msr
        if s.mcr & UART_MCR_LOOP:        # loopback: modem inputs follow the modem outputs
            status = ((UART_MSR_CTS if s.mcr & UART_MCR_RTS else 0) | (UART_MSR_DSR if s.mcr & UART_MCR_DTR else 0)
                      | (UART_MSR_RI if s.mcr & UART_MCR_OUT1 else 0) | (UART_MSR_DCD if s.mcr & UART_MCR_OUT2 else 0))
        else:
            status = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
        deltas = 0
        changed = (old_msr ^ status) & 0xF0
        if changed & UART_MSR_CTS:
            deltas |= UART_MSR_DCTS
        if changed & UART_MSR_DSR:
            deltas |= UART_MSR_DDSR
        if changed & UART_MSR_DCD:
            deltas |= UART_MSR_DDCD
        if (old_msr & UART_MSR_RI) and not (status & UART_MSR_RI):
            deltas |= UART_MSR_TERI
        s.msr = status | (old_msr & UART_MSR_DELTAS) | deltas
        if was_loop and not (s.mcr & UART_MCR_LOOP):
            self._refill_rx()
        self._update_irq()

    def _read_lsr(self) -> int:
        s = self.state
        value = s.lsr
        s.lsr &= ~UART_LSR_ERRORS        # error bits clear on read
        if value & UART_LSR_ERRORS:
            self._update_irq()
        return value

    def _read_msr(self) -> int:
        s = self.state
        value = s.msr
        s.msr &= ~UART_MSR_DELTAS        # delta bits clear on read
        if value & UART_MSR_DELTAS:
            self._update_irq()
        return value

    def _write_ignored(self, value: int) -> None:
        pass
