"""Fuzz targets: each takes one input (bytes), drives one parser or device with it as a hostile guest or client
would, and checks what must hold. Shared by the brief hypothesis runs in the test suite (test_fuzz.py) and the long
coverage-guided runs (bench/fuzz.py, `make fuzz`: atheris when it is installed).

What every target checks, besides its own invariants:
- no exception escapes but the documented error type of the interface (`Target.allowed`); anything else, and any
  AssertionError from an invariant, is a finding;
- nothing is logged at ERROR level (pyhv logs an internal error there when it catches a bug to stay up);
- no hang: the runners bound each input's time (SIGALRM here, atheris -timeout there).

Inputs are read through `Input`, which turns bytes into numbers and choices and reads zeros once it runs out, so
every byte string is a valid input and a mutation of one changes a few decisions.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import socket
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from pyhv.errors import PyhvError
from pyhv.virtio.queue import VirtQueueError

TESTS = Path(__file__).resolve().parents[1]
for _helpers in (TESTS, TESTS / "unit", TESTS / "guests"):  # virtq_driver, pci_helpers, the guests' build.py
    if str(_helpers) not in sys.path:
        sys.path.append(str(_helpers))

RAM = 1 << 16               # the fake guest RAM of the device targets


class Input:
    """Numbers and choices from fuzz bytes (little-endian, zeros past the end)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out.ljust(n, b"\0")

    def int(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes), "little")

    def below(self, n: int) -> int:
        return self.int(2 if n > 255 else 1) % n if n > 1 else 0

    def pick(self, choices):
        return choices[self.below(len(choices))]

    def bool(self) -> bool:
        return bool(self.int(1) & 1)

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out

    @property
    def left(self) -> int:
        return max(len(self.data) - self.pos, 0)


def mutate(seed: bytes, inp: Input, rounds: int = 8) -> bytes:
    """`seed` with up to `rounds` edits chosen by the input (replace, insert, delete, duplicate a span), so plain
    random inputs reach past the first format check of a parser."""
    out = bytearray(seed)
    for _ in range(inp.below(rounds + 1)):
        if not inp.left:
            break
        op, at = inp.below(4), inp.below(len(out) + 1)
        n = 1 + inp.below(16)
        if op == 0:
            out[at:at + n] = inp.take(n)
        elif op == 1:
            out[at:at] = inp.take(n)
        elif op == 2:
            del out[at:at + n]
        else:
            out[at:at] = out[at:at + n]
    return bytes(out)


class ErrorLog(logging.Handler):
    """Collects ERROR records of pyhv's loggers while a target runs: pyhv logs there when it swallowed a bug."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    allowed: tuple[type[BaseException], ...]    # the interface's documented errors; anything else is a finding
    needs_kvm: bool = False
    seeds: tuple[bytes, ...] = ()


def check(target: Target, data: bytes) -> None:
    """Run one input; raises on a finding."""
    logger = logging.getLogger("pyhv")
    errors = ErrorLog()
    logger.addHandler(errors)
    try:
        target.run(data)
    except target.allowed:
        pass
    finally:
        logger.removeHandler(errors)
    assert not errors.records, f"{target.name}: pyhv logged an error: {errors.records[0]}"


# --- virtqueues and virtio devices ------------------------------------------------------------------------------
DESC, AVAIL, USED, INDIRECT = 0x1000, 0x2000, 0x3000, 0x4000


def _address(inp: Input) -> int:
    """Mostly inside the fake RAM, sometimes at its edge, past it or anywhere."""
    kind = inp.below(8)
    if kind < 5:
        return 0x5000 + inp.below(RAM - 0x5000)
    if kind == 5:
        return RAM - inp.below(64)
    if kind == 6:
        return INDIRECT + 16 * inp.below(16)
    return inp.int(8)


def _length(inp: Input) -> int:
    kind = inp.below(6)
    if kind < 4:
        return inp.below(2048)
    return inp.pick([0, 1, 0xFFFFFFFF, 0x80000000, RAM, 16 * inp.below(18)])


def _flags(inp: Input) -> int:
    return inp.pick([0, 1, 2, 3, 4, 1, 3, 2, 0, 2]) if inp.below(8) else inp.int(2)


def hostile_rings(mem, inp: Input, size: int) -> int:
    """Descriptor table, an indirect table and the available ring as a hostile driver would write them; returns
    the ring position the device starts at."""
    # what decides most comes first: a short input leaves the rest zero
    start = inp.int(2)
    count = inp.pick([1 + inp.below(size), 1 + inp.below(size), inp.below(size + 1), inp.int(2)])
    mem.write(AVAIL, struct.pack("<HH", inp.int(2) & 1 if inp.bool() else inp.int(2), (start + count) & 0xFFFF))
    for i in range(size):
        mem.write(AVAIL + 4 + 2 * i, struct.pack("<H", inp.below(size + 1) if inp.below(8) else inp.int(2)))
    mem.write(AVAIL + 4 + 2 * size, struct.pack("<H", inp.int(2)))          # used_event
    mem.write(USED, struct.pack("<HH", 0, start))
    for i in range(size):
        mem.write(DESC + 16 * i, struct.pack("<QIHH", _address(inp), _length(inp), _flags(inp),
                                             inp.below(size + 1)))
    for i in range(16):
        mem.write(INDIRECT + 16 * i, struct.pack("<QIHH", _address(inp), _length(inp), _flags(inp) & 0x7,
                                                 inp.below(17)))
    return start


def writable_bytes(mem, size: int) -> bytearray:
    """1 for every guest byte a device may legitimately write: any descriptor marked WRITE (in the table or in an
    indirect table one points at), whatever chain it is in, and the used ring. A superset, computed without the
    walker under test."""
    allowed = bytearray(RAM)
    allowed[USED:USED + 6 + 8 * size] = b"\1" * (6 + 8 * size)

    def add(addr: int, length: int) -> None:
        lo, hi = max(addr, 0), min(addr + length, RAM)
        if lo < hi:
            allowed[lo:hi] = b"\1" * (hi - lo)
    for i in range(size):
        addr, length, flags, _ = struct.unpack_from("<QIHH", mem.buf, DESC + 16 * i)
        if flags & 4:
            if 0 <= addr and addr + length <= RAM:
                for j in range(length // 16):
                    a, n, f, _ = struct.unpack_from("<QIHH", mem.buf, addr + 16 * j)
                    if f & 2:
                        add(a, n)
        elif flags & 2:
            add(addr, length)
    return allowed


def _fake_memory():
    from virtq_driver import FakeMemory
    return FakeMemory(RAM)


def run_device(device, inp: Input, queues: int, size: int, extra: Callable[[], None] | None = None) -> None:
    from pyhv.virtio.queue import VirtQueue, VirtQueueError
    mem = _fake_memory()
    start = hostile_rings(mem, inp, size)
    event_idx, indirect = inp.bool(), inp.bool()
    try:
        vqs = [VirtQueue(i, size, mem, DESC, AVAIL, USED, event_idx=event_idx, indirect=indirect,
                         next_avail=start, next_used=start) if i == inp.below(queues) or inp.bool() else None
               for i in range(queues)]
    except VirtQueueError:
        return
    before = bytes(mem.buf)
    allowed = writable_bytes(mem, size)
    features = device.device_features() & inp.int(8)
    device.activate(mem, vqs, lambda index: None, features)
    try:
        for _ in range(1 + inp.below(4)):
            if extra is not None and inp.bool():
                extra()
            device.notify(inp.below(queues + 1))
        after = bytes(mem.buf)
        for page in range(0, RAM, 4096) if after != before else ():
            if after[page:page + 4096] != before[page:page + 4096]:
                outside = [i for i in range(page, page + 4096) if after[i] != before[i] and not allowed[i]]
                assert not outside, f"{device.name} wrote guest RAM outside the buffers offered: {outside[0]:#x}"
    finally:
        device.reset()


def virtqueue(data: bytes) -> None:
    """Pop every chain of a hostile ring: VirtQueueError or chains whose buffers lie in RAM and add up."""
    from pyhv.virtio.queue import VirtQueue
    inp = Input(data)
    size = inp.pick([1, 2, 4, 8, 16, 32])
    mem = _fake_memory()
    start = hostile_rings(mem, inp, size)
    q = VirtQueue(0, size, mem, DESC, AVAIL, USED, event_idx=inp.bool(), indirect=inp.bool(),
                  next_avail=start, next_used=start)
    for _ in range(size + 1):
        chain = q.pop()
        if chain is None:
            break
        assert chain.readable_len == sum(map(len, chain.readable))
        assert chain.writable_len == sum(map(len, chain.writable))
        assert 0 <= chain.head < size
        q.push(chain, inp.int(4))
    q.should_notify()
    q.enable_notification()


_IMAGE = bytes((i * 7 + 3) & 0xFF for i in range(64 * 512))
_image_dir: list = []


def _fresh_image() -> str:
    """One image file per process, given its original contents again for each input."""
    if not _image_dir:
        _image_dir.append(tempfile.TemporaryDirectory(prefix="pyhv-fuzz-"))
    path = os.path.join(_image_dir[0].name, "disk.img")
    with open(path, "wb") as f:
        f.write(_IMAGE)
    return path


def read_after_reset(device, sector: int) -> bytes:
    """What a well-behaved driver reads from `sector` after resetting the device (whatever came before)."""
    from pyhv.virtio.blk import VIRTIO_BLK_T_IN
    from virtq_driver import RingDriver
    device.reset()
    mem = _fake_memory()
    driver = RingDriver(mem, size=8, heap=0x8000)
    device.activate(mem, [driver.queue()] + [None] * (device.num_queues - 1), lambda index: None, 1 << 32)
    head = driver.add([(struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, sector), False), (512, True), (1, True)])
    driver.publish(head)
    device.notify(0)
    used = driver.take_used()
    assert used and used[0][0] == head, used
    data_addr = struct.unpack_from("<Q", mem.buf, driver.desc + 16 * ((head + 1) % 8))[0]
    status_addr = struct.unpack_from("<Q", mem.buf, driver.desc + 16 * ((head + 2) % 8))[0]
    assert mem.buf[status_addr] == 0, f"status {mem.buf[status_addr]}"
    return bytes(mem.buf[data_addr:data_addr + 512])


def virtio_blk(data: bytes) -> None:
    """Hostile requests on hostile rings: RAM outside the offered buffers unchanged, the image keeps its size, a
    read-only image keeps its bytes, and after a reset the device serves a good driver."""
    from pyhv.virtio.blk import VirtioBlk
    inp = Input(data)
    path = _fresh_image()
    readonly = inp.bool()
    device = VirtioBlk(path, readonly=readonly, num_queues=1 + inp.below(2), queue_size=16, locking=False)
    try:
        run_device(device, inp, device.num_queues, inp.pick([4, 8, 16]))
        with open(path, "rb") as f:
            sector = inp.below(64)
            f.seek(sector * 512)
            expected = f.read(512)
        assert read_after_reset(device, sector) == expected, "after a reset the device did not read right"
    finally:
        device.close()
    with open(path, "rb") as f:
        after = f.read()
    assert len(after) == len(_IMAGE), "the image changed size"
    assert not readonly or after == _IMAGE, "a read-only image changed"


def virtio_net(data: bytes) -> None:
    from pyhv.virtio.net import VirtioNet
    inp = Input(data)
    host, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    device = VirtioNet(tap_fd=os.dup(tap.fileno()), mac="52:54:00:12:34:56")
    tap.close()
    host.setblocking(False)

    def frames() -> None:                   # the tap side sends what the input says
        for _ in range(inp.below(4)):
            try:
                host.send(inp.take(inp.pick([0, 1, 11, 12, 14, 60, 1514, 4000, inp.below(9000)])))
            except OSError:
                pass
    try:
        run_device(device, inp, 2, inp.pick([4, 8, 16]), frames)
    finally:
        device.close()
        host.close()


def virtio_console(data: bytes) -> None:
    from pyhv.virtio.console import VirtioConsole
    inp = Input(data)
    device = VirtioConsole(rx_limit=1 + inp.below(8192))

    def typed() -> None:
        device.receive(inp.take(inp.below(300)))
    try:
        run_device(device, inp, 2, inp.pick([4, 8, 16]), typed)
        device.config_write(inp.below(16), inp.pick([1, 2, 4]), inp.int(4))
    finally:
        device.close()


def virtio_rng(data: bytes) -> None:
    from pyhv.virtio.rng import VirtioRng
    inp = Input(data)
    device = VirtioRng()
    try:
        run_device(device, inp, 1, inp.pick([4, 8, 16]))
    finally:
        device.close()


# --- PCI --------------------------------------------------------------------------------------------------------
class PciRig:
    """A PCI bus (no KVM) with a virtio-pci virtio-blk function at slot 2 and an e1000 at slot 3."""

    def __init__(self, inp: Input) -> None:
        from pci_helpers import Board, FakeLine, fake_routes
        from pyhv.devices.net.e1000 import E1000
        from pyhv.runtime.iothread import IoThread
        from pyhv.virtio.blk import VirtioBlk
        from pyhv.virtio.pci import VirtioPciDevice
        image = _fresh_image()
        self.board, self.mem, self.io = Board(), _fake_memory(), IoThread()
        self.blk = VirtioPciDevice("vblk", VirtioBlk(image, locking=False), self.mem, self.io,
                                   msi_routes=fake_routes, use_ioeventfd=False)
        self.board.bus.plug(self.blk, 2)
        self.blk.intx_out = FakeLine().set_level
        self.frames: list[bytes] = []
        self.nic = E1000("e1000", self.mem, mac="52:54:00:12:34:57", port=SimpleNamespace(send=self.frames.append))
        self.board.bus.plug(self.nic, 3)
        self.nic.intx_out = FakeLine().set_level
        hostile_rings(self.mem, inp, 16)

    def close(self) -> None:
        self.blk.close()
        self.nic.close()
        self.io.close()

    def caps_well_formed(self, devfn: int) -> None:
        """The capability list ends, stays in the device-specific area and keeps its IDs."""
        ptr, seen = self.board.cfg_read(devfn, 0x34, 1), set()
        if not self.board.cfg_read(devfn, 0x06, 2) & 0x10:
            return
        while ptr:
            assert 0x40 <= ptr <= 0xFC and ptr not in seen, f"capability pointer {ptr:#x} after {sorted(seen)}"
            seen.add(ptr)
            ptr = self.board.cfg_read(devfn, ptr + 1, 1)


def pci_config(data: bytes) -> None:
    """Config-space reads and writes at any offset and size (BAR sizing, capabilities, MSI-X enable, ROM), then
    accesses to whatever the BARs map (virtio common config, notify, ISR, MSI-X table and PBA, e1000 registers)."""
    inp = Input(data)
    rig = PciRig(inp)
    try:
        ids = {devfn: rig.board.cfg_read(devfn, 0, 4) for devfn in (2 << 3, 3 << 3)}
        for _ in range(inp.below(48)):
            devfn = inp.pick([2 << 3, 3 << 3, 2 << 3, inp.below(256)])
            size = inp.pick([1, 2, 4])
            offset = inp.pick([0x04, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x30, 0x3C, inp.below(256),
                               0x40 + inp.below(192)])
            offset -= offset % size
            if inp.bool():
                value = inp.pick([0xFFFFFFFF, 0, 0x6, 0x7, inp.int(4)]) & ((1 << 8 * size) - 1)
                rig.board.cfg_write(devfn, offset, size, value)
            else:
                assert 0 <= rig.board.cfg_read(devfn, offset, size) < 1 << 8 * size
            if inp.below(4) == 0:                                  # then touch memory the BARs may map
                addr = inp.pick([0xE0000000, 0xE0100000, 0xF0000000, 0]) + inp.below(0x4000)
                asize = inp.pick([1, 2, 4, 8])
                if inp.bool():
                    rig.board.memory.write(addr, asize, inp.int(8) & ((1 << 8 * asize) - 1))
                else:
                    rig.board.memory.read(addr, asize)
        for devfn, ident in ids.items():
            assert rig.board.cfg_read(devfn, 0, 4) == ident, "vendor/device ID changed"
            rig.caps_well_formed(devfn)
    finally:
        rig.close()


def virtio_pci(data: bytes) -> None:
    """virtio-pci common config, notify, ISR and device config written in any order (the BARs placed first)."""
    from pyhv.devices.pci.constants import PCI_COMMAND_MEMORY
    inp = Input(data)
    rig = PciRig(inp)
    devfn, bar1, bar4 = 2 << 3, 0xE0000000, 0xE0100000
    try:
        rig.board.cfg_write(devfn, 0x14, 4, bar1)
        rig.board.cfg_write(devfn, 0x20, 4, bar4)
        rig.board.cfg_write(devfn, 0x24, 4, 0)
        rig.board.cfg_write(devfn, 0x04, 2, PCI_COMMAND_MEMORY)
        if inp.bool():
            rig.board.cfg_write(devfn, 0x40 + inp.below(192) & ~1, 2, 0xC000 | inp.below(4))    # MSI-X on?
        common = [(0x00, 4), (0x04, 4), (0x08, 4), (0x0C, 4), (0x10, 2), (0x12, 2), (0x14, 1), (0x15, 1),
                  (0x16, 2), (0x18, 2), (0x1A, 2), (0x1C, 2), (0x1E, 2), (0x20, 4), (0x24, 4), (0x28, 4),
                  (0x2C, 4), (0x30, 4), (0x34, 4), (0x38, 2)]
        queue_addrs = {0x20: 0x1000, 0x28: 0x2000, 0x30: 0x3000}
        for _ in range(inp.below(64)):
            region = inp.below(6)
            if region < 3:
                offset, size = inp.pick(common)
                value = inp.int(size)
                if offset in queue_addrs and inp.below(4):
                    value = queue_addrs[offset]
                elif offset == 0x14 and inp.below(2):
                    value = inp.pick([0, 1, 3, 11, 15, 0x40, 0x80])
                elif offset == 0x18 and inp.below(2):
                    value = inp.pick([0, 1, 16, 3, 0xFFFF])
                addr = bar4 + offset
            elif region == 3:
                addr, size, value = bar4 + 0x3000 + inp.below(64), inp.pick([1, 2, 4]), inp.below(4)   # notify
            elif region == 4:
                addr, size, value = bar4 + 0x1000 + inp.below(8), 1, 0                              # ISR
            else:
                addr, size, value = bar1 + inp.below(0x1000), inp.pick([2, 4, 8]), inp.int(8)     # MSI-X
            if inp.bool():
                rig.board.memory.write(addr, size, value & ((1 << 8 * size) - 1))
            else:
                rig.board.memory.read(addr, size)
        rig.caps_well_formed(devfn)
    finally:
        rig.close()


# --- fw_cfg -----------------------------------------------------------------------------------------------------
def fw_cfg(data: bytes) -> None:
    """Selector/data ports and DMA descriptors (anywhere, any control bits); the read-only items never change."""
    from pyhv.devices.fw_cfg import E820_RAM, FW_CFG_NB_CPUS, FW_CFG_RAM_SIZE, FwCfg, e820_table
    from pyhv.memory import AddressSpace, GuestMemory, MemoryRegion
    inp = Input(data)
    system = MemoryRegion.container("system", 1 << 64)
    system.add_subregion(0, MemoryRegion.ram("ram", RAM))
    mem = GuestMemory(AddressSpace("memory", system))
    f = FwCfg("fw_cfg", mem)
    f.add_u64(FW_CFG_RAM_SIZE, 128 << 20)
    f.add_u16(FW_CFG_NB_CPUS, 2)
    e820 = e820_table([(0, 0x8000000, E820_RAM)])
    f.add_file("etc/e820", e820)
    f.add_file("bootorder", b"/pci@i0cf8/scsi@3/disk@0,0\n")
    for _ in range(inp.below(32)):
        op = inp.below(5)
        if op == 0:
            f.ctl_write(0, 2, inp.pick([0, 1, 0x19, 0x8000 | inp.below(0x30), inp.int(2), 0x20 + inp.below(4)]))
        elif op == 1:
            f.ctl_read(1, 1)
        elif op == 2:
            f.ctl_write(1, 1, inp.int(1))
        else:
            desc = inp.pick([0x1000, RAM - 8, RAM + 0x1000, inp.int(8)])
            if 0 <= desc and desc + 16 <= RAM:
                mem.write(desc, struct.pack(">IIQ", inp.int(4) if inp.bool() else inp.pick([2, 4, 8, 16]) |
                                            (inp.below(0x30) << 16), _length(inp), _address(inp)))
            be = desc.to_bytes(8, "big")
            if inp.bool():
                f.dma_write(0, 4, int.from_bytes(be[:4], "little"))
            f.dma_write(4, 4, int.from_bytes(be[4:], "little"))
            if op == 4:
                f.dma_read(inp.pick([0, 4]), 4)
    f.ctl_write(0, 2, 0x19)
    directory = bytes(f.ctl_read(1, 1) for _ in range(4 + 64 * 2))
    count = struct.unpack(">I", directory[:4])[0]
    assert count == 2, f"fw_cfg's file directory says {count} files"


# --- vhost-user -------------------------------------------------------------------------------------------------
def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def vhost_user(data: bytes) -> None:
    """Messages (any request, flags, size, payload, with memfds attached) to a back end: it answers, refuses or
    drops the connection, and every file descriptor it got is closed once the front end is gone."""
    from pyhv.runtime.iothread import IoThread
    from pyhv.vhost import protocol as P
    from pyhv.vhost.backend import VhostUserBackend
    from pyhv.virtio.rng import VirtioRng
    inp = Input(data)
    iothread = IoThread()
    baseline = _open_fds()
    backend = VhostUserBackend(VirtioRng(), "/nonexistent/fuzz.sock", iothread)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.settimeout(1)
    backend.conn = ours
    requests = sorted(set(P.REQUEST_NAMES))
    try:
        for _ in range(1 + inp.below(12)):
            request = inp.pick(requests) if inp.below(8) else inp.int(4)
            flags = P.VHOST_USER_VERSION | (inp.pick([0, P.VHOST_USER_NEED_REPLY_MASK]) if inp.below(8)
                                            else inp.int(4))
            payload = inp.take(inp.pick([0, 8, 8, 16, 24, 40, 72, inp.below(300)]))
            if request in (P.VHOST_USER_SET_MEM_TABLE,) and inp.bool():
                n = 1 + inp.below(2)
                payload = struct.pack("<II", n, 0) + b"".join(
                    struct.pack("<QQQQ", inp.pick([0, 0x1000, inp.int(8)]), inp.pick([0x10000, 0x1000, inp.int(8)]),
                                inp.int(8), inp.pick([0, 0x1000, inp.int(8)])) for _ in range(n))
            fds = []
            for _ in range(inp.pick([0, 0, 1, 1, 2, 9])):
                fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
                os.ftruncate(fd, 0x10000)
                fds.append(fd)
            size = len(payload) if inp.below(8) else inp.int(4)
            header = struct.pack("<III", request, flags, size)
            try:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
                theirs.sendmsg([header + payload[:max(size, 0)]], anc)
            except OSError:
                pass
            for fd in fds:
                os.close(fd)                       # the back end holds its own copies now
            while backend.conn is not None:
                ours.setblocking(False)
                try:
                    if not ours.recv(1, socket.MSG_PEEK):
                        break
                except BlockingIOError:
                    break
                except OSError:
                    break
                ours.settimeout(0.2)
                backend._readable()
                try:
                    theirs.setblocking(False)
                    while theirs.recv(65536):
                        pass
                except (BlockingIOError, OSError):
                    pass
            if backend.conn is None:
                break
        theirs.close()
        if backend.conn is not None:
            ours.settimeout(0.2)
            backend._readable()                    # end of file: the front end went away
        assert backend.conn is None, "the back end kept a closed connection"
    finally:
        theirs.close()
        if backend.conn is not None:
            backend.disconnect("fuzz end")
        backend.device.close()
        iothread.close()
    leaked = _open_fds() - baseline
    assert leaked <= 0, f"{leaked} file descriptors left open"


# --- QMP --------------------------------------------------------------------------------------------------------
UNSAFE_QMP = {"quit", "migrate", "migrate-incoming", "pmemsave", "x-pyhv-snapshot-create", "system_powerdown",
              "migrate_cancel"}    # they end the shared VM or write files: never run by the target
_qmp_machine: list = []


def close_shared() -> None:
    """Stop the VM the QMP target shares between inputs (the test suite calls this after the target)."""
    while _qmp_machine:
        server = _qmp_machine.pop()
        server.listener.close()
        server.machine.shutdown(0)
        server.machine.wait(10)
        server.machine.close()


def _qmp_connection():
    """A QMP connection (no socket: its output is collected) to one shared VM whose guest idles in hlt (the echo
    guest: no CPU spent between inputs)."""
    from pyhv.config import VmConfig
    from pyhv.machine.machine import Machine
    from pyhv.monitor.qmp import QmpConnection, QmpServer
    from pyhv.runtime.chardev import ChardevSpec
    if not _qmp_machine:
        import atexit
        import build as guest_build         # tests/guests/build.py
        guest = str(guest_build.build("echoloop", {"BUSY": 0}))
        machine = Machine(VmConfig(firmware=guest, memory=16 << 20, serial=ChardevSpec("none")))
        machine.start()
        where = tempfile.mkdtemp(prefix="pyhv-fuzz-qmp-")
        server = QmpServer(machine, os.path.join(where, "qmp.sock"))    # its thread never starts: no socket I/O
        _qmp_machine.append(server)
        atexit.register(close_shared)
    server = _qmp_machine[0]
    conn = QmpConnection.__new__(QmpConnection)
    QmpConnection.__init__(conn, server, None)              # type: ignore[arg-type]
    return conn


def _json_value(inp: Input, depth: int = 0):
    kind = inp.below(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return inp.bool()
    if kind == 2:
        return inp.pick([0, -1, 1 << 63, 1 << 64, inp.int(8) - (1 << 63), 0x500])
    if kind == 3:
        return inp.pick([0.5, 1e308, -0.0])
    if kind in (4, 5):
        return inp.pick(["", "vm", "kvm", "vcpu", "/dev/null", "\u0000", "x" * 300, inp.take(8).decode("latin-1")])
    if kind in (6, 7):
        return {inp.pick(["target", "vcpus", "providers", "downtime-limit", "max-bandwidth", "uri", "enable", "x"]):
                _json_value(inp, depth + 1) for _ in range(inp.below(4))}
    return [_json_value(inp, depth + 1) for _ in range(inp.below(4))]


def qmp(data: bytes) -> None:
    """Framing bytes and commands with arguments of any JSON type: every reply is a return or a QMP error, never
    an internal error, and the monitor answers after."""
    from pyhv.monitor.commands import COMMANDS
    inp = Input(data)
    conn = _qmp_connection()
    conn.handle_input(b'{"execute": "qmp_capabilities"}')
    names = sorted(COMMANDS)
    for _ in range(1 + inp.below(6)):
        if inp.below(4) == 0:
            raw = inp.take(inp.below(64))
            if b"execute" in raw or b"\\u" in raw:
                raw = raw.replace(b"execute", b"exe")     # raw bytes could still name an unsafe command
            conn.handle_input(raw)
            continue
        name = inp.pick(names) if inp.below(8) else inp.take(6).decode("latin-1")
        args = {}
        command = COMMANDS.get(name)
        if command is not None and command.args and inp.below(4):
            for key in command.args:
                if inp.below(3):
                    args[key] = _json_value(inp)
        elif inp.bool():
            args = _json_value(inp)
        message = {"execute": name, "arguments": args} if inp.below(8) else _json_value(inp)
        if isinstance(message, dict) and message.get("execute") in UNSAFE_QMP:
            message["execute"] = "query-status"     # would end the shared VM or write files
            message["arguments"] = {}
        conn.handle_input(json.dumps(message).encode() + inp.pick([b"", b"\n", b" ", b"}"]))
    replies = [json.loads(line) for line in bytes(conn.out).split(b"\r\n") if line]
    for reply in replies:
        assert "return" in reply or "error" in reply, reply
        desc = reply.get("error", {}).get("desc", "")
        assert not desc.startswith("internal error"), reply
    probe = _qmp_connection()             # the monitor still answers (a new client: this one may be mid-string)
    probe.handle_input(b'{"execute": "qmp_capabilities"}{"execute": "query-status", "id": "probe"}')
    last = json.loads(bytes(probe.out).split(b"\r\n")[-2])
    assert last.get("id") == "probe" and last["return"]["status"] in ("running", "paused"), last


def json_stream(data: bytes) -> None:
    """QMP's JSON framing alone: any bytes in any chunks give objects or framing errors, bounded in size."""
    from pyhv.monitor.jsonstream import JsonStream, JsonStreamError
    inp = Input(data)
    stream = JsonStream(max_size=4096, max_depth=16)
    body = inp.rest()
    at = 0
    while at < len(body):
        n = 1 + (body[at] % 64)
        for item in stream.feed(body[at:at + n]):
            assert isinstance(item, (dict, list, str, int, float, bool, type(None), JsonStreamError)), item
        at += n


# --- domain XML -------------------------------------------------------------------------------------------------
DOMAIN_SEED = b"""<domain type='kvm'>
  <name>fuzz</name><uuid>c7a5fdbd-cdaf-9455-926a-d65c16db1809</uuid>
  <memory unit='MiB'>128</memory><currentMemory unit='MiB'>128</currentMemory><vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>@FILE@</kernel><initrd>@FILE@</initrd>
    <cmdline>console=ttyS0</cmdline></os>
  <features><acpi/></features><cpu mode='host-passthrough'/>
  <on_reboot>restart</on_reboot>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw' cache='none' queues='2'/>
      <source file='/dev/null'/><target dev='vda' bus='virtio'/><readonly/><serial>S1</serial></disk>
    <interface type='ethernet'><mac address='52:54:00:12:34:56'/><target dev='tap0'/><model type='virtio'/>
    </interface>
    <serial type='pty'/><console type='pty'/><rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <iommu model='intel'/>
  </devices>
</domain>""".replace(b"@FILE@", __file__.encode())      # files that exist: validation reads them


def domain_xml(data: bytes) -> None:
    """Any document: a config or a PyhvError naming what is wrong (ConfigError, or GuestImageError for a file);
    a config pyhv accepted reads back equal from the XML pyhv writes for it."""
    from pyhv.cli.domain_xml import parse_domain_xml, config_to_domain_xml
    inp = Input(data)
    text = mutate(DOMAIN_SEED, inp, 12) if inp.below(8) else inp.rest()
    try:
        config, _ = parse_domain_xml(text, "fuzz.xml")
    except PyhvError:
        return
    written = config_to_domain_xml(config)
    try:
        again, _ = parse_domain_xml(written, "again.xml")
    except PyhvError as e:
        raise AssertionError(f"pyhv refused the XML it wrote: {e}\n{written}") from None
    assert again == config, "a config did not survive XML and back"


# --- loaders ----------------------------------------------------------------------------------------------------
def _elf_seed() -> bytes:
    """A small x86-64 vmlinux-like ELF: two PT_LOAD segments and a PT_NOTE with the Xen PVH entry note."""
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x1000000)
    body = b"\x90" * 64
    phoff, phnum = 64, 3
    data_off = phoff + 56 * phnum
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x1000000, phoff, 0,
                                                                     0, 64, 56, phnum, 64, 0, 0)
    phdrs = struct.pack("<IIQQQQQQ", 1, 5, data_off, 0xFFFFFFFF81000000, 0x1000000, 64, 4096, 0x200000)
    phdrs += struct.pack("<IIQQQQQQ", 1, 6, data_off, 0xFFFFFFFF82000000, 0x2000000, 32, 64, 0x200000)
    phdrs += struct.pack("<IIQQQQQQ", 4, 4, data_off + 64, 0, 0, len(note), len(note), 4)
    return ehdr + phdrs + body + note


def _bzimage_seed() -> bytes:
    from pyhv.arch.x86.bootparams import synthetic_header
    setup = bytearray(5 * 512)
    hdr = synthetic_header()
    setup[0x1F1:0x1F1 + len(hdr)] = hdr
    payload = gzip.compress(_elf_seed()) + struct.pack("<I", len(_elf_seed()))
    struct.pack_into("<B", setup, 0x1F1, 4)                 # setup_sects
    struct.pack_into("<I", setup, 0x248, 0)                 # payload_offset
    struct.pack_into("<I", setup, 0x24C, len(payload))      # payload_length
    return bytes(setup) + payload


def loaders(data: bytes) -> None:
    """ELF program headers and notes, the bzImage setup header, the payload's decompression: GuestImageError or
    segments inside the file's bytes."""
    from pyhv.arch.x86.bootparams import SetupHeader
    from pyhv.arch.x86.kernel_image import decompress_payload, parse_elf, payload_format
    from pyhv.errors import GuestImageError
    inp = Input(data)
    if inp.bool():
        elf = mutate(_elf_seed(), inp, 10)
        try:
            segments, _entry, _pvh = parse_elf(elf, "fuzz")
        except GuestImageError:
            return
        for seg in segments:
            assert 0 < len(seg.data) <= seg.memsz or not seg.data, "a segment with more file than memory bytes"
            assert seg.data in elf, "a segment's bytes are not the file's"
        return
    image = mutate(_bzimage_seed(), inp, 10)
    try:
        hdr = SetupHeader.parse(image, "fuzz")
    except GuestImageError:
        return
    kernel = image[hdr.kernel_offset:]
    payload = kernel[hdr.payload_offset:hdr.payload_offset + hdr.payload_length]
    if payload_format(payload) in ("zstd", "lz4", "lzo", "bzip2"):
        return                                  # external tools: their own fuzzing, not pyhv's
    try:
        vmlinux, _ = decompress_payload(payload)
        parse_elf(vmlinux, "fuzz payload")
    except GuestImageError:
        pass


# --- the cpio writer --------------------------------------------------------------------------------------------
def _read_newc(blob: bytes) -> list[tuple[str, int, bytes]]:
    """(name, mode, data) of each member of a newc archive, up to TRAILER!!! (an independent reader)."""
    out, at = [], 0
    while True:
        assert blob[at:at + 6] == b"070701", f"bad magic at {at}"
        fields = [int(blob[at + 6 + 8 * i:at + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name = blob[at + 110:at + 110 + namesize - 1].decode()
        at = (at + 110 + namesize + 3) & ~3
        body = blob[at:at + filesize]
        at = (at + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out.append((name, mode, body))


def cpio(data: bytes) -> None:
    """Entries with any names, modes, targets and contents: refused with ValueError/PyhvError, or written so that
    an independent reader gets every member back."""
    from pyhv.assets.cpio import Archive, CpioEntry
    inp = Input(data)
    archive = Archive()
    for _ in range(inp.below(8)):
        name = inp.take(inp.below(40)).decode("latin-1") if inp.below(3) == 0 else \
            "/".join(inp.pick(["bin", "..", ".", "", "etc", "a" * 200, "x\0y", "init"]) for _ in range(1 + inp.below(3)))
        kind = inp.below(4)
        if kind == 0:
            entry = CpioEntry.directory(name, inp.int(2))
        elif kind == 1:
            entry = CpioEntry.file(name, inp.take(inp.below(64)), inp.int(2))
        elif kind == 2:
            entry = CpioEntry.symlink(name, inp.take(inp.below(20)).decode("latin-1"))
        else:
            entry = CpioEntry.char_device(name, inp.int(2), inp.int(3), inp.int(2))
        archive.add(entry)
    out = io.BytesIO()
    archive.write(out)
    members = _read_newc(out.getvalue())
    expected = [(e.name.lstrip("/"), e.mode, e.data) for e in archive.members()]
    assert members == expected, (members[:3], expected[:3])


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("virtqueue", virtqueue, (VirtQueueError,)),
    Target("virtio_blk", virtio_blk, ()),
    Target("virtio_net", virtio_net, ()),
    Target("virtio_console", virtio_console, ()),
    Target("virtio_rng", virtio_rng, ()),
    Target("pci_config", pci_config, ()),
    Target("virtio_pci", virtio_pci, ()),
    Target("fw_cfg", fw_cfg, ()),
    Target("vhost_user", vhost_user, ()),
    Target("qmp", qmp, (), needs_kvm=True),
    Target("json_stream", json_stream, ()),
    Target("domain_xml", domain_xml, ()),
    Target("loaders", loaders, ()),
    Target("cpio", cpio, (ValueError, PyhvError)),
]}
