"""virtio-net queues against a packet socket standing in for the tap (SOCK_SEQPACKET keeps frame boundaries as a
tap does)."""
from __future__ import annotations

import socket
import struct

import pytest

from pyhv.virtio.device import bits
from pyhv.virtio.net import (VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_HDR_SIZE, VirtioNet,
                             parse_mac)
from pyhv.errors import PyhvError
from virtq_driver import FakeMemory, RingDriver


class FakeIoThread:
    def __init__(self):
        self.readers = {}

    def add_reader(self, fd, callback):
        self.readers[fd] = callback

    def remove_reader(self, fd):
        self.readers.pop(fd, None)


class NetHarness:
    def __init__(self, mergeable: bool):
        self.host, dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.io = FakeIoThread()
        self.dev = VirtioNet(mac="52:54:00:aa:bb:cc", iothread=self.io, tap_fd=dev_end.detach())
        self.mem = FakeMemory(1 << 20)
        self.rx = RingDriver(self.mem, size=16, desc=0x1000, avail=0x2000, used=0x3000, heap=0x10000)
        self.tx = RingDriver(self.mem, size=16, desc=0x4000, avail=0x5000, used=0x6000, heap=0x80000)
        self.interrupts = []
        features = self.dev.device_features()
        if not mergeable:
            features &= ~bits(VIRTIO_NET_F_MRG_RXBUF)
        self.dev.activate(self.mem, [self.rx.queue(event_idx=True), self.tx.queue(event_idx=True, index=1)],
                          self.interrupts.append, features)

    def close(self):
        self.dev.close()
        self.host.close()


@pytest.fixture(params=[True, False], ids=["mrg", "no-mrg"])
def net(request):
    h = NetHarness(request.param)
    yield h
    h.close()


def test_config_space_has_mac_and_link_up(net):
    assert bytes(net.dev.config_read(i, 1) for i in range(6)) == bytes.fromhex("525400aabbcc")
    assert net.dev.config_read(6, 2) == 1
    assert net.dev.device_features() >> VIRTIO_NET_F_MAC & 1


def test_transmit_goes_to_the_tap_in_one_write(net):
    hdr = bytes(VIRTIO_NET_HDR_SIZE)
    frame = bytes(range(256)) * 4
    net.tx.publish(net.tx.add([(hdr, False), (frame[:100], False), (frame[100:], False)]))
    net.dev.notify(1)
    assert net.host.recv(4096) == hdr + frame
    assert net.tx.take_used()[0][1] == 0
    assert net.dev.stats["tx_packets"] == 1 and net.interrupts == [1]


def test_receive_single_buffer(net):
    net.rx.publish(*[net.rx.add([(2048, True)]) for _ in range(4)])
    net.dev.notify(0)
    frame = bytes(VIRTIO_NET_HDR_SIZE) + b"\xAA" * 1000
    net.host.send(frame)
    net.io.readers[net.dev.tap_fd]()
    (head, length), = net.rx.take_used()
    assert length == len(frame)
    got = net.mem.read(0x10000, length)
    assert got[10:12] == struct.pack("<H", 1) and got[12:] == b"\xAA" * 1000


def test_receive_mergeable_spans_chains_or_drops_without_mrg(net):
    mergeable = net.dev.has_feature(VIRTIO_NET_F_MRG_RXBUF)
    heads = [net.rx.add([(1024, True)]) for _ in range(4)]
    net.rx.publish(*heads)
    net.dev.notify(0)
    frame = bytes(VIRTIO_NET_HDR_SIZE) + bytes(range(256)) * 10           # 2572 bytes: three 1 KiB buffers
    net.host.send(frame)
    net.io.readers[net.dev.tap_fd]()
    used = net.rx.take_used()
    if not mergeable:
        assert used == [] and net.dev.stats["rx_dropped"] == 1
        return
    assert [u[0] for u in used] == heads[:3] and [u[1] for u in used] == [1024, 1024, len(frame) - 2048]
    data = b"".join(net.mem.read(0x10000 + 1024 * i, u[1]) for i, u in enumerate(used))
    assert data[10:12] == struct.pack("<H", 3) and data[12:] == frame[12:]
    assert net.interrupts


def test_tap_not_polled_without_receive_buffers(net):
    net.dev.notify(0)
    assert net.dev.tap_fd not in net.io.readers        # no buffers: stop reading the tap
    net.host.send(bytes(VIRTIO_NET_HDR_SIZE) + b"x" * 60)
    net.rx.publish(net.rx.add([(2048, True)]), net.rx.add([(2048, True)]))
    net.dev.notify(0)                                   # the driver's kick brings polling back
    assert len(net.rx.take_used()) == 1
    assert net.dev.tap_fd in net.io.readers             # a buffer is left: keep reading the tap


def test_short_transmit_chain_dropped(net):
    net.tx.publish(net.tx.add([(b"tiny", False)]))
    net.dev.notify(1)
    assert net.dev.stats["tx_dropped"] == 1 and net.tx.take_used() == [(0, 0)]


@pytest.mark.parametrize("text", ["52:54:00:12:34", "zz:54:00:12:34:56", "01:00:5e:00:00:01", "525400123456"])
def test_bad_mac(text):
    with pytest.raises(PyhvError):
        parse_mac(text)


def test_frame_waits_for_enough_mergeable_buffers_instead_of_dropping():
    net = NetHarness(mergeable=True)
    try:
        heads = [net.rx.add([(1024, True)]) for _ in range(2)]
        net.rx.publish(*heads)
        net.dev.notify(0)
        frame = bytes(VIRTIO_NET_HDR_SIZE) + bytes(range(256)) * 10           # needs three 1 KiB buffers
        net.host.send(frame)
        net.io.readers[net.dev.tap_fd]()
        assert net.rx.take_used() == [] and net.dev.stats["rx_dropped"] == 0
        assert net.dev.tap_fd not in net.io.readers        # held until the driver adds buffers
        # the kick is asked for at the index the device saw (2), not its own position (0), which the driver's
        # index has already passed and so would never cross again
        avail_event = struct.unpack_from("<H", net.mem.read(0x3000 + 4 + 8 * 16, 2))[0]
        assert avail_event == 2
        heads.append(net.rx.add([(1024, True)]))
        net.rx.publish(heads[-1])
        net.dev.notify(0)
        used = net.rx.take_used()
        assert [u[0] for u in used] == heads and sum(u[1] for u in used) == len(frame)
        assert net.dev.stats == {**net.dev.stats, "rx_packets": 1, "rx_dropped": 0} and net.interrupts
    finally:
        net.close()
