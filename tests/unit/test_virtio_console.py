"""virtio-console back end: transmitq output to the chardev, chardev input into receive buffers (held while
there are none, bounded), emergency write, resize; and the whole device behind the virtio-mmio transport."""
from __future__ import annotations

import logging

from pyhv.runtime.chardev import Chardev
from pyhv.devices.irq import CallbackIrqLine
from pyhv.virtio.console import (
    RX_QUEUE, TX_QUEUE, VIRTIO_CONSOLE_F_EMERG_WRITE, VIRTIO_CONSOLE_F_MULTIPORT, VIRTIO_CONSOLE_F_SIZE,
    VirtioConsole,
)
from pyhv.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_ID_CONSOLE
from pyhv.virtio.mmio import VirtioMmioDevice

from virtq_driver import FakeMemory, RingDriver


class FakeChardev(Chardev):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def type(self, data: bytes) -> None:
        """The host types: what an I/O-thread reader of a real chardev does."""
        self.receiver(data)


class FakeIoThread:
    pass


def make(**kw):
    chardev = FakeChardev()
    con = VirtioConsole(chardev, FakeIoThread(), **kw)          # attaches its receiver to the chardev
    assert chardev.receiver == con.receive
    mem = FakeMemory(1 << 20)
    rx = RingDriver(mem, size=8, desc=0x1000, avail=0x2000, used=0x3000, heap=0x10000)
    tx = RingDriver(mem, size=8, desc=0x4000, avail=0x5000, used=0x6000, heap=0x20000)
    irqs = []
    features = con.device_features()
    con.activate(mem, [rx.queue(index=RX_QUEUE), tx.queue(index=TX_QUEUE)], irqs.append, features)
    return con, chardev, mem, rx, tx, irqs


def test_identity_and_features():
    con = VirtioConsole()
    assert con.device_id == VIRTIO_ID_CONSOLE == 3
    assert len(con.queue_sizes) == 2
    f = con.device_features()
    assert f >> VIRTIO_CONSOLE_F_SIZE & 1 and f >> VIRTIO_CONSOLE_F_EMERG_WRITE & 1
    assert not f >> VIRTIO_CONSOLE_F_MULTIPORT & 1 and f >> VIRTIO_F_VERSION_1 & 1
    assert con.config_read(0, 2) == 80 and con.config_read(2, 2) == 25
    assert con.config_read(4, 4) == 0 and con.config_read(8, 4) == 0
    assert con.config_read(0, 4) == 25 << 16 | 80


def test_transmit_reaches_the_chardev():
    con, chardev, mem, rx, tx, irqs = make()
    h1 = tx.add([(b"hello, ", False)])
    h2 = tx.add([(b"wor", False), (b"ld\n", False)])
    tx.publish(h1, h2)
    con.notify(TX_QUEUE)
    assert bytes(chardev.out) == b"hello, world\n"
    assert tx.take_used() == [(h1, 0), (h2, 0)]
    assert irqs == [TX_QUEUE]
    assert con.state.tx_bytes == 13


def test_receive_into_posted_buffer():
    con, chardev, mem, rx, tx, irqs = make()
    head = rx.add([(16, True)])
    addr = rx.heap - 16
    rx.publish(head)
    con.notify(RX_QUEUE)                      # the driver posted a buffer: nothing to deliver yet
    assert rx.take_used() == [] and irqs == []
    chardev.type(b"ls\n")
    assert rx.take_used() == [(head, 3)]
    assert mem.read(addr, 3) == b"ls\n"
    assert irqs == [RX_QUEUE]
    assert con.state.rx_bytes == 3


def test_input_waits_for_buffers_and_spans_them():
    con, chardev, mem, rx, tx, irqs = make()
    chardev.type(b"0123456789")               # no buffers yet: held
    assert con.state.rx_pending == b"0123456789" and irqs == []
    h1 = rx.add([(4, True)])
    a1 = rx.heap - 16
    h2 = rx.add([(16, True)])
    a2 = rx.heap - 16
    rx.publish(h1, h2)
    con.notify(RX_QUEUE)                      # the driver's kick delivers what waited
    assert rx.take_used() == [(h1, 4), (h2, 6)]
    assert mem.read(a1, 4) == b"0123" and mem.read(a2, 6) == b"456789"
    assert irqs == [RX_QUEUE] and not con.state.rx_pending


def test_input_before_activation_is_held():
    chardev = FakeChardev()
    con = VirtioConsole(chardev, FakeIoThread())
    chardev.type(b"early")
    mem = FakeMemory(1 << 20)
    rx = RingDriver(mem, size=8)
    tx = RingDriver(mem, size=8, desc=0x4000, avail=0x5000, used=0x6000, heap=0x20000)
    irqs = []
    con.activate(mem, [rx.queue(index=0), tx.queue(index=1)], irqs.append, con.device_features())
    rx.publish(rx.add([(8, True)]))
    con.notify(RX_QUEUE)
    assert rx.take_used()[0][1] == 5 and irqs == [0]


def test_input_bound_logs_once_and_counts(caplog):
    caplog.set_level(logging.WARNING)
    con, chardev, mem, rx, tx, irqs = make(rx_limit=8)
    chardev.type(b"abcdef")
    chardev.type(b"ghijkl")
    chardev.type(b"mn")
    assert con.state.rx_pending == b"abcdefgh"
    assert con.state.rx_dropped == 6
    assert sum("dropped" in r.message for r in caplog.records) == 1


def test_emergency_write():
    con = VirtioConsole(FakeChardev())
    con.config_write(8, 4, ord("!"))          # works without queues or features (§5.3.6)
    con.config_write(8, 4, 0x100 | ord("\n"))
    assert bytes(con.chardev.out) == b"!\n"
    assert con.state.emerg_bytes == 2
    con.config_write(0, 2, 132)               # cols is read-only
    assert con.config_read(0, 2) == 80


def test_resize_updates_config_and_signals():
    con, chardev, mem, rx, tx, irqs = make()
    changes = []
    con.on_config_change = lambda: changes.append((con.config_read(0, 2), con.config_read(2, 2)))
    con.resize(132, 43)
    assert changes == [(132, 43)]
    con.resize(132, 43)                       # no change, no notification
    assert len(changes) == 1


def test_broken_receive_ring_needs_reset():
    con, chardev, mem, rx, tx, irqs = make()
    resets = []
    con.on_needs_reset = lambda: resets.append(True)
    rx.write_desc(0, (1 << 20) - 4, 64, 2)    # past the end of RAM
    rx.publish(0)
    chardev.type(b"x")
    assert resets == [True] and con.broken


def test_reset_drops_pending_input():
    con, chardev, mem, rx, tx, irqs = make()
    chardev.type(b"abc")
    con.reset()
    assert not con.active and not con.state.rx_pending


def test_console_over_mmio_end_to_end():
    """The whole device as a guest sees it: virtio-mmio registers, config space at 0x100, both queues."""
    from pyhv.virtio.mmio import VIRTIO_MMIO_CONFIG
    chardev = FakeChardev()
    con = VirtioConsole(chardev, FakeIoThread())
    mem = FakeMemory(1 << 20)
    levels = []
    dev = VirtioMmioDevice("virtio-console0", con, mem, base=0xD0000000, irq=CallbackIrqLine(levels.append))
    r, w = dev.read, dev.write
    assert r(0x08, 4) == 3
    w(0x70, 4, 3)
    w(0x14, 4, 1)
    high = r(0x10, 4)
    w(0x14, 4, 0)
    features = high << 32 | r(0x10, 4)
    w(0x24, 4, 1)
    w(0x20, 4, features >> 32)
    w(0x24, 4, 0)
    w(0x20, 4, features & 0xFFFFFFFF)
    w(0x70, 4, 0xB)
    assert r(0x70, 4) & 8
    drivers = []
    for q, base in ((0, 0x1000), (1, 0x4000)):
        drv = RingDriver(mem, size=8, desc=base, avail=base + 0x1000, used=base + 0x2000, heap=0x10000 * (q + 1))
        w(0x30, 4, q)
        w(0x38, 4, 8)
        w(0x80, 4, drv.desc)
        w(0x90, 4, drv.avail)
        w(0xA0, 4, drv.used)
        w(0x44, 4, 1)
        drivers.append(drv)
    w(0x70, 4, 0xF)
    assert con.active
    rx, tx = drivers
    assert r(VIRTIO_MMIO_CONFIG, 2) == 80 and r(VIRTIO_MMIO_CONFIG + 2, 2) == 25
    w(VIRTIO_MMIO_CONFIG + 8, 4, ord("E"))                      # emerg_wr through the transport
    tx.publish(tx.add([(b"out", False)]))
    w(0x50, 4, 1)
    assert bytes(chardev.out) == b"Eout"
    assert r(0x60, 4) == 1 and levels == [True]
    w(0x64, 4, 1)
    rx.publish(rx.add([(8, True)]))
    w(0x50, 4, 0)
    chardev.type(b"in")
    assert rx.take_used()[0][1] == 2 and r(0x60, 4) == 1
    w(0x64, 4, 1)
    gen = r(0xFC, 4)
    con.resize(100, 30)                                         # config interrupt, new generation
    assert r(0x60, 4) == 2 and r(0xFC, 4) == gen + 1
    assert r(VIRTIO_MMIO_CONFIG, 4) == 30 << 16 | 100
    w(0x64, 4, 2)
    assert levels == [True, False, True, False, True, False]
    dev.close()
