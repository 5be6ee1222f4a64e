"""pyhv's vhost-user back end (a subprocess) driven by a minimal Python front end: a virtio-blk request through
shared memory and eventfds, the configuration space, ring stop, and the fault cases: garbage and truncated
messages, wrong fd counts, a memory table that does not cover the rings, a front end vanishing mid-request.
After each fault the back end logs why, drops the connection, keeps running and serves the next front end."""
from __future__ import annotations

import os
import socket
import struct

import pytest

from pyhv.vhost import protocol as P
from pyhv.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from vhost_helpers import Backend, MiniFrontEnd, wait_closed
from virtq_driver import RingDriver

SECTORS = 256


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes((i * 31 + 7) & 0xFF for i in range(SECTORS * 512)))
    return path


@pytest.fixture
def backend(tmp_path, image):
    be = Backend(tmp_path, "--type", "blk", "--image", str(image), "--serial", "vhost-test")
    yield be
    be.stop()


def blk_request(fe: MiniFrontEnd, d: RingDriver, rtype: int, sector: int, data: bytes = b"",
                in_len: int = 0) -> tuple[int, bytes]:
    bufs = [(struct.pack("<IIQ", rtype, 0, sector), False)]
    if data:
        bufs.append((data, False))
    if in_len:
        bufs.append((in_len, True))
    bufs.append((1, True))
    d.set_used_event(d.used_seen)                     # EVENT_IDX: interrupt me for the next used buffer
    d.publish(d.add(bufs))
    fe.kick(0)
    assert fe.wait_call(0), "no completion signalled on the call eventfd"
    used = d.take_used()
    assert len(used) == 1
    status = fe.mem.read(d.heap - 16, 1)[0]
    got = fe.mem.read(d.heap - 16 - (in_len + 15) // 16 * 16, in_len) if in_len else b""
    return status, got


def session(backend: Backend) -> tuple[MiniFrontEnd, RingDriver]:
    fe = MiniFrontEnd(backend.socket)
    fe.negotiate()
    fe.share_memory()
    d = RingDriver(fe.mem, size=16)
    fe.start_ring(0, d)
    return fe, d


def test_blk_requests_over_vhost_user(backend, image):
    fe, d = session(backend)
    original = image.read_bytes()
    status, got = blk_request(fe, d, VIRTIO_BLK_T_IN, 4, in_len=1024)
    assert status == VIRTIO_BLK_S_OK and got == original[4 * 512:6 * 512]
    status, _ = blk_request(fe, d, VIRTIO_BLK_T_OUT, 10, data=b"\x42" * 512)
    assert status == VIRTIO_BLK_S_OK
    config = fe.client.get_config(0, 60)
    assert struct.unpack_from("<Q", config)[0] == SECTORS
    assert fe.client.get_queue_num() == 1
    assert fe.client.get_vring_base(0) == 2          # the ring stops at the next available index
    fe.close()
    disk = image.read_bytes()
    assert disk[10 * 512:11 * 512] == b"\x42" * 512
    assert disk[:10 * 512] == original[:10 * 512] and disk[11 * 512:] == original[11 * 512:]


def test_garbage_and_truncated_messages(backend, image):
    original = image.read_bytes()
    for junk in (os.urandom(64), struct.pack("=III", 1, 0x7, 0),              # bad version / flags
                 struct.pack("=III", P.VHOST_USER_GET_FEATURES, 1, 1 << 20),   # absurd payload size
                 struct.pack("=III", P.VHOST_USER_SET_FEATURES, 1, 40) + b"12345678"):   # truncated, then silence
        s = socket.socket(socket.AF_UNIX)
        s.connect(backend.socket)
        s.sendall(junk)
        assert wait_closed(s), f"back end kept a connection after {junk[:12].hex()}"
        s.close()
    # a short payload for its request, and a SET_FEATURES with bits never offered
    for request, payload in ((P.VHOST_USER_SET_VRING_NUM, b"\x00\x00"), (P.VHOST_USER_SET_FEATURES,
                                                                         struct.pack("=Q", 1 << 63))):
        s = socket.socket(socket.AF_UNIX)
        s.connect(backend.socket)
        P.send_message(s, P.Message(request, P.VHOST_USER_VERSION, payload))
        assert wait_closed(s)
        s.close()
    log = backend.log()
    assert "dropping the connection" in log and "truncated message" in log
    assert backend.alive()
    fe, d = session(backend)                          # and the next front end is served
    assert blk_request(fe, d, VIRTIO_BLK_T_IN, 0, in_len=512) == (VIRTIO_BLK_S_OK, original[:512])
    fe.close()


def test_wrong_fd_counts(backend):
    fe = MiniFrontEnd(backend.socket)
    fe.negotiate()
    extra = os.eventfd(0)
    payload = P.MEMORY_HEADER.pack(2, 0) + P.MEMORY_REGION.pack(0, 1 << 20, 0, 0) * 2
    P.send_message(fe.client.sock, P.Message(P.VHOST_USER_SET_MEM_TABLE, P.VHOST_USER_VERSION, payload,
                                             [fe.memfd]))
    assert wait_closed(fe.client.sock)
    fe.close()
    fe = MiniFrontEnd(backend.socket)
    fe.negotiate()
    P.send_message(fe.client.sock, P.Message(P.VHOST_USER_SET_VRING_CALL, P.VHOST_USER_VERSION,
                                             P.U64.pack(0), [extra, extra]))
    assert wait_closed(fe.client.sock)
    fe.close()
    os.close(extra)
    assert "file descriptors" in backend.log() and backend.alive()


def test_memory_table_not_covering_the_rings(backend):
    fe = MiniFrontEnd(backend.socket)
    fe.negotiate()
    fe.share_memory()
    d = RingDriver(fe.mem, size=16)
    with pytest.raises((P.VhostUserError, OSError)):
        fe.start_ring(0, d, uaddr_shift=1 << 30)     # ring addresses beyond the 1 MiB region
    assert wait_closed(fe.client.sock)
    fe.close()
    assert "not covered by the memory table" in backend.log() and backend.alive()
    fe, d = session(backend)
    assert blk_request(fe, d, VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK
    fe.close()


def test_front_end_vanishes_mid_request(backend, image):
    fe, d = session(backend)
    heads = [d.add([(struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 20 + k), False), (bytes([k]) * 512, False),
                    (1, True)]) for k in range(4)]
    d.publish(*heads)
    fe.kick(0)
    fe.client.sock.shutdown(socket.SHUT_RDWR)        # gone, with requests just submitted
    fe.close()
    fe, d = session(backend)                          # the back end cleaned up and serves the next one
    status, got = blk_request(fe, d, VIRTIO_BLK_T_IN, 0, in_len=512)
    assert status == VIRTIO_BLK_S_OK
    fe.close()
    assert backend.alive()
    assert "front end disconnected" in backend.log()
    assert os.path.getsize(image) == SECTORS * 512


def test_ring_restarts_from_vring_base(backend, image):
    fe, d = session(backend)
    blk_request(fe, d, VIRTIO_BLK_T_IN, 0, in_len=512)
    base = fe.client.get_vring_base(0)               # stops the ring
    assert base == 1
    fe.client.set_vring_base(0, base)
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    fe.client.set_vring_kick(0, kick)                # starts it again where it stopped
    os.close(fe.kicks[0])
    fe.kicks[0] = kick
    status, got = blk_request(fe, d, VIRTIO_BLK_T_IN, 1, in_len=512)
    assert status == VIRTIO_BLK_S_OK and got == image.read_bytes()[512:1024]
    fe.close()
