"""Test helpers for vhost-user: start pyhv's back end as a subprocess, and a minimal front end that shares a memfd
as guest memory and drives rings in it with `RingDriver`."""
from __future__ import annotations

import mmap
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from pyhv.vhost import protocol as P
from pyhv.vhost.client import VhostUserClient
from pyhv.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, bits
from virtq_driver import FakeMemory, RingDriver

ROOT = Path(__file__).resolve().parent.parent
UADDR_BASE = 0x7F00_0000_0000         # the "front-end user address" of guest address 0


def unique_socket(directory: Path, name: str) -> str:
    return str(directory / f"{name}-{os.getpid()}-{time.monotonic_ns() % 10 ** 6}.sock")


def spawn_listener(cmd: list[str], socket_path: str, log) -> subprocess.Popen:
    """Start a server process and wait (bounded) until its Unix socket exists."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 30
    while not os.path.exists(socket_path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{cmd[0]} did not start listening on {socket_path}")
        time.sleep(0.05)
    return proc


class Backend:
    """`pyhv vhost-user-backend` in a subprocess, its log in a file."""

    def __init__(self, tmp_path: Path, *args: str, prefix: list[str] | None = None, name: str = "be") -> None:
        self.socket = unique_socket(tmp_path, name)
        self.log_path = tmp_path / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = spawn_listener([*(prefix or []), sys.executable, "-m", "pyhv.cli", "vhost-user-backend",
                                    "--socket", self.socket, "--log-level", "info", *args], self.socket, self._log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class MiniFrontEnd:
    """A vhost-user front end with `size` bytes of memfd 'guest memory' at guest address 0."""

    def __init__(self, socket_path: str, size: int = 1 << 20) -> None:
        self.client = VhostUserClient(socket_path, connect_wait=10)
        self.memfd = os.memfd_create("test-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, size)
        self.mm = mmap.mmap(self.memfd, size)
        self.mem = FakeMemory.__new__(FakeMemory)
        self.mem.buf, self.mem.base = self.mm, 0
        self.size = size
        self.kicks: dict[int, int] = {}
        self.calls: dict[int, int] = {}

    def negotiate(self, extra_features: int = 0) -> int:
        c = self.client
        offered = c.get_features()
        assert offered >> P.VHOST_USER_F_PROTOCOL_FEATURES & 1
        c.set_protocol_features(c.get_protocol_features() & bits(P.VHOST_USER_PROTOCOL_F_REPLY_ACK,
                                                                  P.VHOST_USER_PROTOCOL_F_CONFIG,
                                                                  P.VHOST_USER_PROTOCOL_F_MQ))
        c.set_owner()
        features = offered & (bits(VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC,
                                   P.VHOST_USER_F_PROTOCOL_FEATURES) | extra_features)
        c.set_features(features)
        return features

    def share_memory(self) -> None:
        self.client.set_mem_table([(0, self.size, UADDR_BASE, 0, self.memfd)])

    def start_ring(self, index: int, driver: RingDriver, uaddr_shift: int = 0) -> None:
        c = self.client
        c.set_vring_num(index, driver.size)
        c.set_vring_addr(index, UADDR_BASE + driver.desc + uaddr_shift, UADDR_BASE + driver.used + uaddr_shift,
                         UADDR_BASE + driver.avail + uaddr_shift)
        c.set_vring_base(index, driver.avail_idx)
        self.calls[index] = os.eventfd(0, os.EFD_CLOEXEC)
        self.kicks[index] = os.eventfd(0, os.EFD_CLOEXEC)
        c.set_vring_call(index, self.calls[index])
        c.set_vring_kick(index, self.kicks[index])
        c.set_vring_enable(index, True)

    def kick(self, index: int) -> None:
        os.eventfd_write(self.kicks[index], 1)

    def wait_call(self, index: int, timeout: float = 30) -> bool:
        r, _, _ = select.select([self.calls[index]], [], [], timeout)
        if r:
            os.eventfd_read(self.calls[index])
        return bool(r)

    def close(self) -> None:
        self.client.close()
        for fd in [*self.kicks.values(), *self.calls.values()]:
            os.close(fd)
        self.kicks.clear()
        self.calls.clear()
        self.mem.buf = None
        self.mm.close()
        os.close(self.memfd)


def wait_closed(sock, timeout: float = 30) -> bool:
    """True once the peer has closed the connection."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
