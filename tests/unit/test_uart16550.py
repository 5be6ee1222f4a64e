"""16550A registers and interrupt logic, including the probes Linux's 8250 driver makes."""
from __future__ import annotations

from pyhv.devices.irq import CallbackIrqLine
from pyhv.devices.uart16550 import (UART_IER_MSI, UART_IER_RDI, UART_IER_RLSI, UART_IER_THRI, UART_IIR_CTI,
                                    UART_IIR_MSI, UART_IIR_NO_INT, UART_IIR_RDI, UART_IIR_RLSI, UART_IIR_THRI,
                                    UART_LSR_DR, UART_LSR_OE, UART_LSR_TEMT, UART_LSR_THRE, Uart16550)

RBR, IER, IIR, FCR, LCR, MCR, LSR, MSR, SCR = 0, 1, 2, 2, 3, 4, 5, 6, 7


def make():
    out = bytearray()
    levels: list[bool] = []
    uart = Uart16550("serial0", CallbackIrqLine(levels.append), out.extend)
    return uart, out, levels


def test_transmit_and_thr_empty():
    uart, out, _ = make()
    uart.write(RBR, 1, ord("A"))
    assert out == b"A"
    assert uart.read(LSR, 1) & (UART_LSR_THRE | UART_LSR_TEMT) == UART_LSR_THRE | UART_LSR_TEMT


def test_dlab_banks_divisor_latch():
    uart, out, _ = make()
    uart.write(LCR, 1, 0x83)
    uart.write(0, 1, 0x01)
    uart.write(1, 1, 0x02)
    assert (uart.read(0, 1), uart.read(1, 1)) == (1, 2)
    uart.write(LCR, 1, 0x03)
    assert uart.read(IER, 1) == 0
    assert out == b""          # the divisor write did not transmit


def test_scratch_register():
    uart, _, _ = make()
    uart.write(SCR, 1, 0x5A)
    assert uart.read(SCR, 1) == 0x5A


def test_receive_and_data_ready_interrupt():
    uart, _, levels = make()
    uart.write(IER, 1, UART_IER_RDI)
    uart.receive(b"hi")
    assert levels[-1] is True
    assert uart.read(IIR, 1) & 0x0F == UART_IIR_RDI
    assert uart.read(LSR, 1) & UART_LSR_DR
    assert uart.read(RBR, 1) == ord("h")        # non-FIFO mode: one byte at a time, the rest waits
    assert uart.read(RBR, 1) == ord("i")
    assert not uart.read(LSR, 1) & UART_LSR_DR
    assert levels[-1] is False


def test_fifo_trigger_level_and_character_timeout():
    uart, _, _ = make()
    uart.write(FCR, 1, 0x81)                    # FIFO on, trigger level 8
    uart.write(IER, 1, UART_IER_RDI)
    uart.receive(b"abc")
    assert uart.read(IIR, 1) == 0xC0 | UART_IIR_CTI
    uart.receive(b"defgh")
    assert uart.read(IIR, 1) == 0xC0 | UART_IIR_RDI


def test_input_beyond_the_fifo_is_kept_not_dropped():
    uart, _, _ = make()
    uart.write(FCR, 1, 0x01)
    data = bytes(range(40))
    uart.receive(data)
    got = bytes(uart.read(RBR, 1) for _ in range(40))
    assert got == data
    assert not uart.read(LSR, 1) & UART_LSR_OE


def test_thre_interrupt_on_enable_and_cleared_by_iir_read():
    uart, _, levels = make()
    uart.write(IER, 1, UART_IER_THRI)
    assert levels[-1] is True
    assert uart.read(IIR, 1) & 0x0F == UART_IIR_THRI
    assert uart.read(IIR, 1) & 0x0F == UART_IIR_NO_INT
    assert levels[-1] is False
    uart.write(RBR, 1, ord("x"))                # transmitting empties THR again: interrupt again
    assert uart.read(IIR, 1) & 0x0F == UART_IIR_THRI


def test_interrupt_priority_line_status_first():
    uart, _, _ = make()
    uart.write(FCR, 1, 0x01)
    uart.write(MCR, 1, 0x10)                    # loopback
    uart.write(IER, 1, UART_IER_RDI | UART_IER_THRI | UART_IER_RLSI)
    for i in range(17):                         # one more than the FIFO holds: overrun
        uart.write(RBR, 1, i)
    assert uart.read(IIR, 1) & 0x0F == UART_IIR_RLSI
    assert uart.read(LSR, 1) & UART_LSR_OE     # reading LSR clears the error ...
    assert uart.read(IIR, 1) & 0x0F == UART_IIR_RDI   # ... and the next source shows


def test_linux_8250_probe_sequence():
    """What drivers/tty/serial/8250/8250_port.c autoconfig checks: IER readback, FIFO type, loopback MSR."""
    uart, out, _ = make()
    uart.write(IER, 1, 0)
    assert uart.read(IER, 1) & 0x0F == 0
    uart.write(IER, 1, 0x0F)
    assert uart.read(IER, 1) & 0x0F == 0x0F
    uart.write(IER, 1, 0)
    uart.write(FCR, 1, 0x01)
    assert uart.read(IIR, 1) >> 6 == 3         # 16550A: both FIFO bits
    uart.write(MCR, 1, 0x10 | 0x0A)            # loopback with OUT2 and RTS
    assert uart.read(MSR, 1) & 0xF0 == 0x90    # DCD and CTS follow
    uart.write(RBR, 1, 0x55)
    assert uart.read(RBR, 1) == 0x55 and out == b""   # looped back, not sent


def test_modem_status_interrupt_on_delta():
    uart, _, _ = make()
    uart.write(IER, 1, UART_IER_MSI)
    uart.write(MCR, 1, 0x10)                   # loopback: CTS/DSR/DCD drop -> deltas
    assert uart.read(IIR, 1) & 0x0F == UART_IIR_MSI
    assert uart.read(MSR, 1) & 0x0F
    assert uart.read(IIR, 1) & 0x0F == UART_IIR_NO_INT


def test_reset():
    uart, _, _ = make()
    uart.write(SCR, 1, 9)
    uart.reset()
    assert uart.read(SCR, 1) == 0
