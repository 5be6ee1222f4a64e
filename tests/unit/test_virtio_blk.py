"""virtio-blk requests through a real virtqueue in fake guest memory, against a temporary raw image."""
from __future__ import annotations

import os
import struct

import pytest

from pyhv.errors import GuestImageError
from pyhv.virtio.blk import (VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR,
                             VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
                             VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
                             VirtioBlk)
from pyhv.virtio.device import VIRTIO_F_VERSION_1
from pyhv.virtio.queue import VIRTQ_DESC_F_NEXT
from virtq_driver import FakeMemory, RingDriver

SECTORS = 64


def make_image(path, sectors=SECTORS, fill=None):
    data = fill if fill is not None else bytes((i * 7 + i // 512) & 0xFF for i in range(sectors * 512))
    path.write_bytes(data)
    return data


class Harness:
    def __init__(self, dev: VirtioBlk):
        self.mem = FakeMemory(4 << 20)
        self.driver = RingDriver(self.mem, size=dev.queue_sizes[0])
        self.dev = dev
        self.interrupts = []
        self.resets = 0
        dev.on_needs_reset = self._needs_reset
        dev.activate(self.mem, [self.driver.queue(event_idx=True)], self.interrupts.append,
                     dev.device_features())

    def _needs_reset(self):
        self.resets += 1

    def request(self, rtype, sector=0, out=b"", in_len=0, indirect=False):
        """Returns (status, data read, used length)."""
        bufs = [(struct.pack("<IIQ", rtype, 0, sector), False)]
        if out:
            bufs.append((out, False))
        if in_len:
            bufs.append((in_len, True))
        bufs.append((1, True))
        head = (self.driver.add_indirect if indirect else self.driver.add)(bufs)
        self.driver.publish(head)
        self.dev.notify(0)
        used = self.driver.take_used()
        assert [u[0] for u in used] == [head]
        status_addr = self.driver.heap - 16
        data_addr = status_addr - ((in_len + 15) // 16 * 16) if in_len else None
        data = self.mem.read(data_addr, in_len) if in_len else b""
        return self.mem.read(status_addr, 1)[0], data, used[0][1]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    return path, make_image(path)


def test_read_write_roundtrip(image):
    path, data = image
    h = Harness(VirtioBlk(str(path)))
    status, got, used = h.request(VIRTIO_BLK_T_IN, sector=3, in_len=2048)
    assert (status, used) == (VIRTIO_BLK_S_OK, 2049) and got == data[3 * 512:3 * 512 + 2048]
    status, _, used = h.request(VIRTIO_BLK_T_OUT, sector=10, out=b"\xAB" * 1024, indirect=True)
    assert (status, used) == (VIRTIO_BLK_S_OK, 1)
    h.dev.close()
    disk = path.read_bytes()
    assert disk[10 * 512:11 * 512 + 512] == b"\xAB" * 1024
    assert disk[:10 * 512] == data[:10 * 512] and disk[12 * 512:] == data[12 * 512:]
    assert h.interrupts and h.resets == 0


def test_header_data_and_status_in_any_layout(image):
    """VERSION_1 implies any layout: header, data and status may share or split descriptors."""
    path, data = image
    h = Harness(VirtioBlk(str(path)))
    d = h.driver
    hdr = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 1)
    a, _ = d.alloc(hdr[:5])
    b, _ = d.alloc(hdr[5:])
    buf, _ = d.alloc(513)                  # 512 data bytes and the status byte in one descriptor
    d.write_desc(0, a, 5, VIRTQ_DESC_F_NEXT, 1)
    d.write_desc(1, b, 11, VIRTQ_DESC_F_NEXT, 2)
    d.write_desc(2, buf, 513, 2)
    d.publish(0)
    h.dev.notify(0)
    assert d.take_used() == [(0, 513)]
    assert h.mem.read(buf, 512) == data[512:1024] and h.mem.read(buf + 512, 1) == b"\0"


def test_flush_and_get_id(image):
    path, _ = image
    h = Harness(VirtioBlk(str(path), serial="pyhv-serial-1"))
    assert h.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
    status, got, used = h.request(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert status == VIRTIO_BLK_S_OK and got == b"pyhv-serial-1".ljust(20, b"\0") and used == 21
    assert h.dev.stats["flush"] == 1 and h.dev.stats["get_id"] == 1


def test_out_of_range_and_partial_sectors_fail_without_io(image):
    path, data = image
    h = Harness(VirtioBlk(str(path)))
    assert h.request(VIRTIO_BLK_T_IN, sector=SECTORS - 1, in_len=1024)[0] == VIRTIO_BLK_S_IOERR
    assert h.request(VIRTIO_BLK_T_OUT, sector=SECTORS, out=b"x" * 512)[0] == VIRTIO_BLK_S_IOERR
    assert h.request(VIRTIO_BLK_T_OUT, sector=(1 << 64) - 1, out=b"x" * 512)[0] == VIRTIO_BLK_S_IOERR
    assert h.request(VIRTIO_BLK_T_OUT, sector=0, out=b"x" * 100)[0] == VIRTIO_BLK_S_IOERR
    assert h.request(VIRTIO_BLK_T_IN, sector=0, in_len=100)[0] == VIRTIO_BLK_S_IOERR
    assert h.request(VIRTIO_BLK_T_IN, sector=SECTORS, in_len=0)[0] == VIRTIO_BLK_S_OK
    assert h.request(99)[0] == VIRTIO_BLK_S_UNSUPP
    h.dev.close()
    assert path.read_bytes() == data and os.path.getsize(path) == len(data)


def test_short_header_and_missing_status(image):
    path, data = image
    h = Harness(VirtioBlk(str(path)))
    d = h.driver
    d.publish(d.add([(b"\x01\x00", False), (1, True)]))
    h.dev.notify(0)
    assert d.take_used()[0][1] == 1 and h.mem.read(d.heap - 16, 1)[0] == VIRTIO_BLK_S_IOERR
    d.publish(d.add([(struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 0) + b"y" * 512, False)]))
    h.dev.notify(0)
    assert d.take_used()[0][1] == 0 and h.resets == 0     # nowhere to put a status: dropped, not written
    h.dev.close()
    assert path.read_bytes() == data


def test_read_only_drive(tmp_path):
    path = tmp_path / "ro.raw"
    data = make_image(path)
    os.chmod(path, 0o444)                  # a read-only drive never opens its file for writing
    dev = VirtioBlk(str(path), readonly=True)
    with open(f"/proc/self/fdinfo/{dev.image.fd}") as f:
        flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
    assert flags & os.O_ACCMODE == os.O_RDONLY
    assert dev.device_features() >> VIRTIO_BLK_F_RO & 1
    assert not dev.device_features() >> VIRTIO_BLK_F_DISCARD & 1
    h = Harness(dev)
    assert h.request(VIRTIO_BLK_T_OUT, sector=0, out=b"z" * 512)[0] == VIRTIO_BLK_S_IOERR
    seg = struct.pack("<QII", 0, 8, 0)
    assert h.request(VIRTIO_BLK_T_DISCARD, out=seg)[0] == VIRTIO_BLK_S_IOERR
    assert h.request(VIRTIO_BLK_T_WRITE_ZEROES, out=seg)[0] == VIRTIO_BLK_S_IOERR
    status, got, _ = h.request(VIRTIO_BLK_T_IN, sector=0, in_len=512)
    assert status == VIRTIO_BLK_S_OK and got == data[:512]
    assert h.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
    dev.close()
    assert path.read_bytes() == data


def _allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def test_discard_punches_holes(tmp_path):
    path = tmp_path / "big.raw"
    sectors = 2048
    make_image(path, sectors, fill=b"\x5A" * (sectors * 512))
    before = _allocated(path)
    h = Harness(VirtioBlk(str(path)))
    seg = struct.pack("<QII", 256, 1024, 0)
    assert h.request(VIRTIO_BLK_T_DISCARD, out=seg)[0] == VIRTIO_BLK_S_OK
    h.dev.close()
    assert _allocated(path) <= before - 1024 * 512
    disk = path.read_bytes()
    assert len(disk) == sectors * 512
    assert disk[256 * 512:1280 * 512] == bytes(1024 * 512)
    assert disk[:256 * 512] == b"\x5A" * (256 * 512) and disk[1280 * 512:] == b"\x5A" * (768 * 512)


def test_write_zeroes_with_and_without_unmap(image):
    path, data = image
    h = Harness(VirtioBlk(str(path)))
    segs = struct.pack("<QII", 2, 3, 0) + struct.pack("<QII", 20, 4, 1)
    assert h.request(VIRTIO_BLK_T_WRITE_ZEROES, out=segs)[0] == VIRTIO_BLK_S_OK
    h.dev.close()
    disk = path.read_bytes()
    expect = bytearray(data)
    expect[2 * 512:5 * 512] = bytes(3 * 512)
    expect[20 * 512:24 * 512] = bytes(4 * 512)
    assert disk == bytes(expect)


def test_discard_checks_every_segment_first(image):
    path, data = image
    h = Harness(VirtioBlk(str(path)))
    segs = struct.pack("<QII", 0, 8, 0) + struct.pack("<QII", SECTORS - 2, 8, 0)
    assert h.request(VIRTIO_BLK_T_DISCARD, out=segs)[0] == VIRTIO_BLK_S_IOERR
    assert h.request(VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 0, 8, 1))[0] == VIRTIO_BLK_S_UNSUPP
    assert h.request(VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", 0, 8, 6))[0] == VIRTIO_BLK_S_UNSUPP
    assert h.request(VIRTIO_BLK_T_DISCARD, out=b"short")[0] == VIRTIO_BLK_S_UNSUPP
    h.dev.close()
    assert path.read_bytes() == data


def test_config_space(image):
    path, _ = image
    dev = VirtioBlk(str(path), num_queues=4, queue_size=128)
    assert dev.config_read(0, 8) == SECTORS
    assert dev.config_read(12, 4) == 126                 # seg_max
    assert dev.config_read(20, 4) == 512                 # blk_size
    assert dev.config_read(34, 2) == 4                   # num_queues
    assert dev.config_read(4096, 4) == 0
    assert dev.queue_sizes == (128,) * 4
    assert dev.device_features() >> VIRTIO_BLK_F_MQ & 1 and dev.device_features() >> VIRTIO_F_VERSION_1 & 1
    dev.close()


@pytest.mark.parametrize("magic,fmt", [(b"QFI\xfb\0\0\0\3", "qcow2"), (b"KDMV", "vmdk"), (b"vhdxfile", "vhdx"),
                                       (b"QED\0", "qed"), (b"\0" * 0x40 + b"\x7f\x10\xda\xbe", "vdi")])
def test_non_raw_images_are_refused(tmp_path, magic, fmt):
    path = tmp_path / "img"
    path.write_bytes(magic + bytes(4096))
    with pytest.raises(GuestImageError, match=f"{fmt} image.*qemu-img convert -O raw"):
        VirtioBlk(str(path))


def test_cache_none_direct_or_fallback(tmp_path, image):
    path, data = image
    dev = VirtioBlk(str(path), cache="none")
    h = Harness(dev)
    # odd buffer alignment within fake memory forces the fallback path when O_DIRECT is in use
    h.driver.heap += 3
    status, got, _ = h.request(VIRTIO_BLK_T_IN, sector=5, in_len=512)
    assert status == VIRTIO_BLK_S_OK and got == data[5 * 512:6 * 512]
    assert h.request(VIRTIO_BLK_T_OUT, sector=6, out=b"\xEE" * 512)[0] == VIRTIO_BLK_S_OK
    dev.close()
    assert path.read_bytes()[6 * 512:7 * 512] == b"\xEE" * 512


def test_hostile_ring_sets_needs_reset_and_device_stays_quiet(image):
    path, data = image
    h = Harness(VirtioBlk(str(path)))
    h.driver.write_desc(0, 0x1000, 16, VIRTQ_DESC_F_NEXT, 0)       # a loop
    h.driver.publish(0)
    h.dev.notify(0)                                                  # must not raise
    assert h.resets == 1 and h.dev.broken
    h.dev.notify(0)
    assert h.resets == 1
    h.dev.notify(7)                                                  # a queue that does not exist
    h.dev.close()
    assert path.read_bytes() == data
