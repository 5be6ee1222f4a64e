"""Property test: virtio-blk driven with random requests, then random corruption of its descriptor table and
rings. Whatever the ring holds: no exception leaves the device, the image never changes outside the disk's
capacity (nor its size), a read-only image never changes at all, and an uncorrupted ring gives exactly the
result of a simple model of the requests."""
from __future__ import annotations

import os
import struct
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyhv.virtio import blk as blkmod
from pyhv.virtio.blk import (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
                             VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VirtioBlk)
from virtq_driver import FakeMemory, RingDriver

SECTORS = 32
QSIZE = 8
TYPES = [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD,
         VIRTIO_BLK_T_WRITE_ZEROES, 0xC3C3C3C3]
sector_st = st.one_of(st.sampled_from([0, SECTORS - 3, SECTORS - 2, SECTORS - 1, SECTORS, SECTORS + 1]),
                      st.integers(0, SECTORS + 2), st.sampled_from([2 ** 64 - 1, 2 ** 64 - 2, 2 ** 63]))
request_st = st.tuples(
    st.sampled_from(TYPES), sector_st,
    st.sampled_from([0, 512, 1024, 3 * 512, 100, 4096]),           # data length
    st.integers(0, 3),                                               # discard segment count
    st.integers(0, 3),                                               # discard flags
    st.booleans(),                                                   # indirect
)
mutation_st = st.tuples(st.one_of(st.integers(0, 16 * QSIZE - 1),                  # descriptor table
                                   st.integers(0x1000, 0x1000 + 6 + 2 * QSIZE - 1),  # available ring
                                   st.integers(0x2000, 0x2000 + 6 + 8 * QSIZE - 1)), # used ring
                        st.integers(0, 255))


def _model(image: bytearray, requests, readonly: bool) -> None:
    for rtype, sector, length, nseg, flags, _ in requests:
        if readonly:
            continue
        if rtype == VIRTIO_BLK_T_OUT and length % 512 == 0 and sector + length // 512 <= SECTORS:
            image[sector * 512:sector * 512 + length] = bytes([(sector + 1) & 0xFF]) * length
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and 1 <= nseg:
            allowed = 0 if rtype == VIRTIO_BLK_T_DISCARD else 1
            segs = [(sector + k, 2) for k in range(nseg)]
            if flags & ~allowed or any(s + n > SECTORS for s, n in segs):
                continue
            for s, n in segs:
                image[s * 512:(s + n) * 512] = bytes(n * 512)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(request_st, min_size=1, max_size=6), mutations=st.lists(mutation_st, max_size=4),
       readonly=st.booleans(), event_idx=st.booleans())
def test_random_rings_never_escape_or_write_outside(requests, mutations, readonly, event_idx):
    original = bytes((i * 13 + 5) & 0xFF for i in range(SECTORS * 512))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "disk.raw")
        with open(path, "wb") as f:
            f.write(original)
        writes: list[tuple[int, int]] = []
        real_rw_all = blkmod.BlkImage._rw_all

        def spy(fd, op, views, offset):
            if op is os.pwritev:
                writes.append((offset, sum(len(v) for v in views)))
            return real_rw_all(fd, op, views, offset)

        blkmod.BlkImage._rw_all = staticmethod(spy)
        try:
            dev = VirtioBlk(path, readonly=readonly, queue_size=QSIZE)
            mem = FakeMemory(1 << 18)
            mem.buf[:] = b"\xC3" * len(mem.buf)
            d = RingDriver(mem, size=QSIZE)
            mem.buf[0x1000:0x4000] = bytes(0x3000)
            resets = []
            dev.on_needs_reset = lambda: resets.append(1)
            dev.activate(mem, [d.queue(event_idx=event_idx)], lambda i: None, dev.device_features())
            heads = []
            for rtype, sector, length, nseg, flags, indirect in requests:
                hdr = struct.pack("<IIQ", rtype, 0, sector)
                bufs = [(hdr, False)]
                if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                    segs = b"".join(struct.pack("<QII", (sector + k) & (2 ** 64 - 1), 2, flags)
                                    for k in range(nseg))
                    if segs:
                        bufs.append((segs, False))
                elif rtype == VIRTIO_BLK_T_OUT and length:
                    bufs.append((bytes([(sector + 1) & 0xFF]) * length, False))
                elif length:
                    bufs.append((length, True))
                bufs.append((1, True))
                if d.next_desc + len(bufs) > QSIZE:       # the descriptor table is full: go indirect
                    indirect = True
                if d.next_desc + 1 > QSIZE:
                    break                                 # not even a slot for an indirect descriptor
                heads.append(d.add_indirect(bufs) if indirect else d.add(bufs))
            d.publish(*heads)
            for offset, value in mutations:
                mem.buf[0x1000 + offset] = value
            dev.notify(0)                       # must not raise, whatever the ring holds
            dev.notify(0)
            dev.close()
        finally:
            blkmod.BlkImage._rw_all = staticmethod(real_rw_all)
        with open(path, "rb") as f:
            final = f.read()
    assert len(final) == len(original)
    if readonly:
        assert final == original and writes == []
    for offset, length in writes:
        assert 0 <= offset and offset + length <= SECTORS * 512
    if not mutations:
        expected = bytearray(original)
        _model(expected, requests[:len(heads)], readonly)
        assert final == bytes(expected)
        assert not resets
