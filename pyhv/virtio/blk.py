"""virtio-blk (virtio 1.2 §5.2) on a raw image file.

Requests: read, write, flush (`fdatasync`), get-id (the serial), discard (holes punched with
`fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`) and write-zeroes (holes when the driver allows unmap,
else `FALLOC_FL_ZERO_RANGE`, else written zeros). Data moves with `os.preadv`/`os.pwritev` straight between the
image and the guest's buffers. Every request is checked before any I/O: a request that reaches past the end of
the disk, a data length that is not whole sectors, a header or status byte missing, or a write to a read-only
drive fails with VIRTIO_BLK_S_IOERR (VIRTIO_BLK_S_UNSUPP for unknown types and flags) and never touches the
image. A read-only drive's file is opened O_RDONLY.

`cache="none"` opens the image with O_DIRECT where the file system allows it (else a log line and the page cache);
a request whose buffers or offset O_DIRECT refuses goes through a second, buffered descriptor.

Images in a format other than raw (recognised by their magic: qcow2, QED, VMDK, VDI, VHDX, VHD, LUKS) are refused
with a pointer to `qemu-img convert -O raw`: a guest must never see another format's metadata as its disk.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import struct

from pyhv.errors import GuestImageError
from pyhv.runtime.image_lock import ImageLock
from pyhv.virtio.device import COMMON_FEATURES, VIRTIO_ID_BLOCK, VirtioDevice, bits
from pyhv.virtio.queue import DescriptorChain, gather, scatter, split_views

log = logging.getLogger(__name__)

# §5.2.3 feature bits
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# §5.2.6 request types and status
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

VIRTIO_BLK_ID_BYTES = 20
SECTOR = 512
OUT_HDR = struct.Struct("<IIQ")             # type, reserved, sector
DISCARD_SEG = struct.Struct("<QII")         # sector, num_sectors, flags

DEFAULT_QUEUE_SIZE = 1024                   # seg_max 1022: a 1 MiB request of 4 KiB pages needs 256
SIZE_MAX = 1 << 22                          # largest single segment the driver may use
MAX_DISCARD_SECTORS = (1 << 32) // SECTOR - 1
MAX_DISCARD_SEG = 32
DISCARD_ALIGNMENT = 8                       # sectors (4 KiB): smaller holes are only zeroed by the host
IOV_MAX = 1024

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# magic -> format, for refusing non-raw images (offset, bytes, name)
IMAGE_MAGICS = (
    (0, b"QFI\xfb", "qcow2"),
    (0, b"QED\x00", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0, b"LUKS\xba\xbe", "luks"),
)


def probe_format(path: str) -> str | None:
    """The name of the non-raw image format whose magic `path` starts with, or None."""
    with open(path, "rb") as f:
        head = f.read(512)
    for offset, magic, name in IMAGE_MAGICS:
        if head[offset:offset + len(magic)] == magic:
            return name
    return None


class BlkImage:
    """A raw image file opened for a virtio-blk drive."""

    def __init__(self, path: str, readonly: bool = False, cache: str = "writeback", locking: bool = True,
                 lock_now: bool = True) -> None:
        self.path = path
        self.readonly = readonly
        self.cache = cache
        try:
            fmt = probe_format(path)
        except OSError as e:
            raise GuestImageError(f"drive {path}: {e.strerror}") from None
        if fmt is not None:
            raise GuestImageError(f"drive {path} is a {fmt} image, pyhv only uses raw images",
                                  f"convert it with `qemu-img convert -O raw {path} {path}.raw`")
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        self.direct = False
        if cache == "none":
            try:
                self.fd = os.open(path, flags | os.O_DIRECT)
                self.direct = True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise GuestImageError(f"drive {path}: {e.strerror}") from None
                log.warning("drive %s: the file system does not support O_DIRECT; cache=none falls back to the "
                            "page cache", path)
        if not self.direct:
            try:
                self.fd = os.open(path, flags)
            except OSError as e:
                raise GuestImageError(f"drive {path}: {e.strerror}",
                                      "make it writable or use readonly=on" if e.errno == errno.EACCES
                                      else None) from None
        # QEMU's image locks (runtime/image_lock.py); a live migration's destination takes them at switch-over
        self.lock = ImageLock(self.fd, path, readonly) if locking else None
        if self.lock is not None and lock_now:
            try:
                self.lock.acquire()
            except GuestImageError:
                os.close(self.fd)
                raise
        size = os.fstat(self.fd).st_size
        if size % SECTOR:
            log.warning("drive %s: size %d is not a multiple of %d; the last %d bytes are not visible",
                        path, size, SECTOR, size % SECTOR)
        self.sectors = size // SECTOR
        self._buffered_fd = -1

    def close(self) -> None:
        for fd in (self.fd, self._buffered_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self._buffered_fd = -1

    # --- data ----------------------------------------------------------------------------------------------
    def readv(self, views: list[memoryview], offset: int) -> None:
        self._transfer(os.preadv, views, offset)

    def writev(self, views: list[memoryview], offset: int) -> None:
        self._transfer(os.pwritev, views, offset)

    def _transfer(self, op, views: list[memoryview], offset: int) -> None:
        if self.direct:
            try:
                return self._rw_all(self.fd, op, views, offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
            # O_DIRECT refused the buffers' or the offset's alignment: this request goes through the page cache
            # (Linux keeps direct and buffered I/O of one file coherent)
            if self._buffered_fd < 0:
                self._buffered_fd = os.open(self.path, (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC)
            self._rw_all(self._buffered_fd, op, views, offset)
            if op is os.pwritev:
                os.fdatasync(self._buffered_fd)     # cache=none: written data leaves the page cache promptly
            return None
        self._rw_all(self.fd, op, views, offset)

    @staticmethod
    def _rw_all(fd: int, op, views: list[memoryview], offset: int) -> None:
        while views:
            batch = views if len(views) <= IOV_MAX else views[:IOV_MAX]
            n = op(fd, batch, offset)
            if n <= 0:
                raise OSError(errno.EIO, f"short transfer at offset {offset}")
            offset += n
            if batch is views and n == sum(map(len, views)):
                return                          # the usual case: all of it in one call
            views = split_views(views, n)[1]

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        modes = ([FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if unmap else []) + \
                [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        for mode in modes:
            try:
                return fallocate(self.fd, mode, offset, length)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        chunk = mmap.mmap(-1, min(length, 1 << 20))      # zero-filled and aligned
        with chunk:
            while length:
                n = min(length, len(chunk))
                self.writev([memoryview(chunk)[:n]], offset)
                offset, length = offset + n, length - n


class VirtioBlk(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK
    pollable = True
    name = "virtio-blk"
    HANDLES_DMA_FAULTS = True
    SNAPSHOT = True                 # requests finish within process(): nothing is in flight between them

    def __init__(self, path: str, readonly: bool = False, cache: str = "writeback", serial: str | None = None,
                 num_queues: int = 1, queue_size: int = DEFAULT_QUEUE_SIZE, name: str | None = None,
                 locking: bool = True, lock_now: bool = True) -> None:
        super().__init__(name or f"virtio-blk({os.path.basename(path)})")
        if serial is not None and len(serial.encode()) > VIRTIO_BLK_ID_BYTES:
            raise GuestImageError(f"drive {path}: serial {serial!r} is longer than {VIRTIO_BLK_ID_BYTES} bytes")
        self.image = BlkImage(path, readonly, cache, locking, lock_now)
        self.readonly = readonly
        self.serial = (serial or "").encode().ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self.num_queues = num_queues
        self.queue_sizes = (queue_size,) * num_queues
        self.seg_max = queue_size - 2
        self.stats = {"read": 0, "write": 0, "flush": 0, "discard": 0, "write_zeroes": 0, "get_id": 0,
                      "error": 0, "unsupported": 0, "bytes_read": 0, "bytes_written": 0, "dma-fault": 0}
        self._config = self._build_config()

    def snapshot_identity(self) -> dict:
        """The image a snapshot refers to: checked at restore (the same file, the same size)."""
        st = os.fstat(self.image.fd)
        return {"path": self.image.path, "size": st.st_size, "device": st.st_dev, "inode": st.st_ino}

    def check_identity(self, saved: dict) -> str | None:
        """Why the image opened now is not the one the snapshot used, or None."""
        now = self.snapshot_identity()
        if (now["size"], now["device"], now["inode"]) != (saved["size"], saved["device"], saved["inode"]):
            return (f"drive {self.image.path}: not the image of the snapshot ({saved['path']}, {saved['size']} "
                    f"bytes, inode {saved['inode']}; now {now['size']} bytes, inode {now['inode']})")
        return None

    @classmethod
    def from_config(cls, drive, **kwargs) -> "VirtioBlk":
        """From a `pyhv.config.DriveConfig` (or anything with its fields)."""
        return cls(drive.file, readonly=drive.readonly, cache=drive.cache, serial=drive.serial,
                   num_queues=drive.num_queues, locking=getattr(drive, "locking", True), **kwargs)

    @classmethod
    def create(cls, context, drive) -> "VirtioBlk":
        # a live migration's destination opens the image now and locks it when the VM moves (Machine.images)
        return cls.from_config(drive, lock_now=not getattr(context.machine, "images_inactive", False))

    @property
    def capacity(self) -> int:
        return self.image.sectors

    def device_features(self) -> int:
        f = COMMON_FEATURES | bits(VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE,
                                   VIRTIO_BLK_F_FLUSH)
        if self.readonly:
            f |= bits(VIRTIO_BLK_F_RO)
        else:
            f |= bits(VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES)
        if self.num_queues > 1:
            f |= bits(VIRTIO_BLK_F_MQ)
        return f

    def _build_config(self) -> bytes:
        # §5.2.4 struct virtio_blk_config, up to write_zeroes_may_unmap and its padding (60 bytes)
        return struct.pack("<QII HBB I BBHI BBH IIIIIB3x",
                           self.capacity, SIZE_MAX, self.seg_max,
                           0, 0, 0,                               # geometry (not offered)
                           SECTOR,                                # blk_size
                           0, 0, 0, 0,                            # topology (not offered)
                           0, 0, self.num_queues,                 # writeback, unused0, num_queues
                           MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, DISCARD_ALIGNMENT,
                           MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1)   # write zeroes; may unmap

    def config_bytes(self) -> bytes:
        return self._config

    def close(self) -> None:
        super().close()
        self.image.close()

    # --- requests ------------------------------------------------------------------------------------------
    def process(self, queue_index: int) -> None:
        self.serve(self.queues[queue_index], self.execute)

    def execute(self, chain: DescriptorChain) -> int:
        """Carry out one request; returns the number of bytes written into the chain (data and status)."""
        if chain.fault is not None:             # the IOMMU refused a buffer: fail the request, touch nothing else
            self.stats["dma-fault"] += 1
            if chain.fault_at_end or not chain.writable:
                return 0
            last = chain.writable[-1]
            last[len(last) - 1] = VIRTIO_BLK_S_IOERR
            return 1
        if chain.writable_len < 1:
            self.warn_once("no-status", "request without a device-writable status byte (dropped)")
            self.stats["error"] += 1
            return 0
        last = chain.writable[-1]
        status_view = last[len(last) - 1:]
        in_len = chain.writable_len - 1
        # the status byte usually has a descriptor of its own
        data_in = chain.writable[:-1] if len(last) == 1 else split_views(chain.writable, in_len)[0]
        if chain.readable_len < OUT_HDR.size:
            self.warn_once("short-header", "request with a %d-byte header", chain.readable_len)
            return self._status(status_view, VIRTIO_BLK_S_IOERR)
        rtype, _, sector = OUT_HDR.unpack(gather(chain.readable, OUT_HDR.size))
        first = chain.readable[0]
        data_out = chain.readable[1:] if len(first) == OUT_HDR.size else split_views(chain.readable, OUT_HDR.size)[1]
        out_len = chain.readable_len - OUT_HDR.size
        try:
            if rtype == VIRTIO_BLK_T_IN:
                if not self._check_range(sector, in_len, "read"):
                    return self._status(status_view, VIRTIO_BLK_S_IOERR)
                if in_len:
                    self.image.readv(data_in, sector * SECTOR)
                self.stats["read"] += 1
                self.stats["bytes_read"] += in_len
                status_view[0] = VIRTIO_BLK_S_OK
                return in_len + 1
            if rtype == VIRTIO_BLK_T_OUT:
                if self.readonly:
                    self.warn_once("ro-write", "write to a read-only drive refused")
                    return self._status(status_view, VIRTIO_BLK_S_IOERR)
                if not self._check_range(sector, out_len, "write"):
                    return self._status(status_view, VIRTIO_BLK_S_IOERR)
                if out_len:
                    self.image.writev(data_out, sector * SECTOR)
                self.stats["write"] += 1
                self.stats["bytes_written"] += out_len
                return self._status(status_view, VIRTIO_BLK_S_OK)
            if rtype == VIRTIO_BLK_T_FLUSH:
                if not self.readonly:
                    self.image.flush()
                self.stats["flush"] += 1
                return self._status(status_view, VIRTIO_BLK_S_OK)
            if rtype == VIRTIO_BLK_T_GET_ID:
                n = scatter(data_in, self.serial[:in_len])
                self.stats["get_id"] += 1
                status_view[0] = VIRTIO_BLK_S_OK
                return n + 1
            if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and not self.readonly:
                return self._status(status_view, self._discard(rtype, data_out, out_len))
        except OSError as e:
            self.stats["error"] += 1
            log.warning("%s: I/O error (request type %d, sector %d): %s", self.name, rtype, sector, e)
            return self._status(status_view, VIRTIO_BLK_S_IOERR)
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            self.warn_once("ro-discard", "discard/write-zeroes on a read-only drive refused")
            return self._status(status_view, VIRTIO_BLK_S_IOERR)
        self.warn_once(f"type-{rtype}", "unsupported request type %d", rtype)
        self.stats["unsupported"] += 1
        return self._status(status_view, VIRTIO_BLK_S_UNSUPP)

    def _status(self, status_view: memoryview, status: int) -> int:
        status_view[0] = status
        if status == VIRTIO_BLK_S_IOERR:
            self.stats["error"] += 1
        return 1

    def _check_range(self, sector: int, length: int, what: str) -> bool:
        if length % SECTOR:
            self.warn_once(f"{what}-len", "%s of %d bytes, not a multiple of %d", what, length, SECTOR)
            return False
        if sector + length // SECTOR > self.capacity:
            self.warn_once(f"{what}-range", "%s of %d sectors at sector %d, past the end of the disk (%d sectors)",
                           what, length // SECTOR, sector, self.capacity)
            return False
        return True

    def _discard(self, rtype: int, data_out: list[memoryview], out_len: int) -> int:
        what = "discard" if rtype == VIRTIO_BLK_T_DISCARD else "write-zeroes"
        if out_len == 0 or out_len % DISCARD_SEG.size or out_len // DISCARD_SEG.size > MAX_DISCARD_SEG:
            self.warn_once(f"{what}-segs", "%s with %d bytes of segments", what, out_len)
            return VIRTIO_BLK_S_IOERR if out_len % DISCARD_SEG.size == 0 and out_len else VIRTIO_BLK_S_UNSUPP
        raw = gather(data_out, out_len)
        segments = [DISCARD_SEG.unpack_from(raw, i) for i in range(0, out_len, DISCARD_SEG.size)]
        for sector, count, flags in segments:          # check every segment before touching the image
            allowed = 0 if rtype == VIRTIO_BLK_T_DISCARD else VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            if flags & ~allowed:
                self.warn_once(f"{what}-flags", "%s with flags %#x", what, flags)
                return VIRTIO_BLK_S_UNSUPP
            if count > MAX_DISCARD_SECTORS or sector + count > self.capacity:
                self.warn_once(f"{what}-range", "%s of %d sectors at sector %d, past the end of the disk",
                               what, count, sector)
                return VIRTIO_BLK_S_IOERR
        for sector, count, flags in segments:
            if not count:
                continue
            if rtype == VIRTIO_BLK_T_DISCARD:
                try:
                    self.image.discard(sector * SECTOR, count * SECTOR)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                        raise
                    self.warn_once("no-punch", "the image's file system cannot punch holes; discard ignored")
                self.stats["discard"] += 1
            else:
                self.image.write_zeroes(sector * SECTOR, count * SECTOR,
                                        bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
                self.stats["write_zeroes"] += 1
        return VIRTIO_BLK_S_OK
