"""pyhv as a vhost-user front end: `--device vhost-user-blk-pci,socket=PATH` on the pc machine, with the disk
served by Debian's qemu-storage-daemon or by pyhv's own back end; SeaBIOS (third-party firmware with its own
virtio-blk driver) finds the disk over PCI and boots the project's boot sector from it, which reads 64 sectors
through int 13h and checks them (exit status 33 = checksum ok)."""
from __future__ import annotations

import mmap
import os
import select
import shutil
import socket
import struct
import sys
from pathlib import Path

import pytest

from pyhv.runtime.iothread import IoThread
from pyhv.vhost.frontend import VhostUserFrontend
from pyhv.virtio.blk import VIRTIO_BLK_T_OUT
from virtq_driver import FakeMemory, RingDriver

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "guests"))
from disks import BOOTSECTOR_OK, bootsector_disk  # noqa: E402
from vhost_helpers import UADDR_BASE, Backend, spawn_listener, unique_socket  # noqa: E402

SEABIOS = "/usr/share/seabios/bios.bin"
BOOT_OK_STATUS = (BOOTSECTOR_OK << 1) | 1


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "boot.img"
    shutil.copyfile(bootsector_disk(), path)
    return path


def boot(pyhv_run, socket_path: str, *extra: str):
    return pyhv_run("run", "--machine", "pc", "--memory-backend", "memfd", "--firmware", SEABIOS,
                    "--device", f"vhost-user-blk-pci,socket={socket_path}", "--serial", "none",
                    "--log-level", "info", *extra, timeout=300)


@pytest.mark.kvm
def test_seabios_boots_from_qemu_storage_daemon(pyhv_run, tmp_path, disk):
    sock = unique_socket(tmp_path, "qsd")
    with open(tmp_path / "qsd.log", "wb") as log:
        qsd = spawn_listener(["qemu-storage-daemon",
                              "--blockdev", f"driver=file,node-name=file0,filename={disk}",
                              "--blockdev", "driver=raw,node-name=disk0,file=file0",
                              "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                                          f"addr.path={sock},writable=on"], sock, log)
        try:
            result = boot(pyhv_run, sock)
        finally:
            qsd.terminate()
            qsd.wait(30)
    assert result.status == BOOT_OK_STATUS, result.stderr[-3000:]
    assert "rings started" in result.stderr


@pytest.mark.kvm
@pytest.mark.parametrize("extra", [(), ("--no-msix",), ("--no-ioeventfd",)], ids=["msix", "intx", "no-ioeventfd"])
def test_seabios_boots_from_pyhv_backend(pyhv_run, tmp_path, disk, extra):
    be = Backend(tmp_path, "--type", "blk", "--image", str(disk))
    try:
        result = boot(pyhv_run, be.socket, *extra)
    finally:
        be.stop()
    assert result.status == BOOT_OK_STATUS, result.stderr[-3000:] + be.log()
    assert "front end connected" in be.log()


@pytest.mark.parametrize("args,message", [
    (("--machine", "pc", "--memory-backend", "memfd"), "no socket at"),
    (("--machine", "pc"), "add --memory-backend memfd"),
    (("--memory-backend", "memfd"), "needs --machine pc"),
])
def test_front_end_configuration_errors(pyhv_run, tmp_path, args, message):
    sock = tmp_path / "nothing.sock"
    if "no socket at" not in message:
        sock.touch()
    result = pyhv_run("run", *args, "--firmware", SEABIOS, "--device", f"vhost-user-blk-pci,socket={sock}",
                      "--serial", "none")
    assert result.status == 2 and message in result.stderr, result.stderr


def test_front_end_refuses_a_socket_with_no_back_end(pyhv_run, tmp_path):
    sock = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))                       # bound, never listening: connections are refused
    try:
        result = pyhv_run("run", "--machine", "pc", "--memory-backend", "memfd", "--firmware", SEABIOS,
                          "--device", f"vhost-user-blk-pci,socket={sock}", "--serial", "none", timeout=120)
    finally:
        s.close()
    assert result.status == 2 and "vhost-user back end" in result.stderr, result.stderr


def test_front_end_hands_kick_and_call_eventfds_to_the_back_end(tmp_path):
    """Without KVM: the front end set up as the virtio-pci transport does (kick eventfds, a per-queue 'irqfd'),
    then a request goes from the ring through the back end to the image and the completion arrives on the
    queue's own eventfd, with no call into the front end's Python."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(64 * 512))
    be = Backend(tmp_path, "--type", "blk", "--image", str(image))
    io = IoThread("test-io")
    io.start()
    memfd = os.memfd_create("guest")
    os.ftruncate(memfd, 1 << 20)
    mm = mmap.mmap(memfd, 1 << 20)
    mem = FakeMemory.__new__(FakeMemory)
    mem.buf, mem.base = mm, 0
    kick, irqfd = os.eventfd(0), os.eventfd(0)
    relayed = []
    try:
        fe = VhostUserFrontend(be.socket, 2, lambda: [(0, 1 << 20, UADDR_BASE, 0, memfd)], io)
        assert fe.queue_sizes == (256,) and fe.config_read(0, 8) == 64
        fe.attach_notifiers([kick], lambda index: irqfd)
        d = RingDriver(mem, size=16)
        fe.activate(mem, [d.queue(event_idx=True)], relayed.append, fe.device_features())
        assert not fe.broken
        d.set_used_event(0)
        d.publish(d.add([(struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 3), False), (b"\x77" * 512, False),
                         (1, True)]))
        os.eventfd_write(kick, 1)                       # what KVM's ioeventfd does for the guest's notify
        assert select.select([irqfd], [], [], 30)[0], "no completion on the queue's irqfd"
        assert d.take_used()[0][1] == 1 and relayed == []
        fe.reset()                                      # stops the ring (GET_VRING_BASE)
        fe.close()
    finally:
        io.stop()
        be.stop()
        mem.buf = None
        mm.close()
        for fd in (memfd, kick, irqfd):
            os.close(fd)
    assert image.read_bytes()[3 * 512:4 * 512] == b"\x77" * 512
