"""Every Unix socket pyhv listens on (QMP, vhost-user back ends, unix: migration, socket chardevs) and every
snapshot file is its owner's only (0600) from the moment it exists, whatever the umask: they carry guest RAM or
control of the VM. Tested under umask 0, where a plain bind or open would make them world-accessible."""
from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import pytest

from pyhv.machine.migration import Incoming
from pyhv.monitor.qmp import QmpServer
from pyhv.runtime.chardev import bind_private_socket
from pyhv.runtime.iothread import IoThread
from pyhv.vhost.backend import VhostUserBackend
from pyhv.virtio.rng import VirtioRng


@pytest.fixture
def open_umask():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_helper_binds_0600_and_restores_the_umask(tmp_path, open_umask):
    sock = bind_private_socket(str(tmp_path / "s"))
    try:
        assert mode(tmp_path / "s") == 0o600
        assert os.umask(0) == 0                     # the process's umask is what it was
    finally:
        sock.close()


def test_qmp_vhost_user_and_migration_sockets_are_0600(tmp_path, open_umask):
    qmp = QmpServer(SimpleNamespace(listeners=[]), str(tmp_path / "qmp.sock"))
    assert mode(tmp_path / "qmp.sock") == 0o600
    qmp.listener.close()
    iothread = IoThread()
    backend = VhostUserBackend(VirtioRng(), str(tmp_path / "vu.sock"), iothread)
    backend.start()
    try:
        assert mode(tmp_path / "vu.sock") == 0o600
    finally:
        backend.listener.close()
        iothread.close()
    incoming = Incoming(None, f"unix:{tmp_path / 'mig.sock'}", lambda status: None)
    try:
        assert mode(tmp_path / "mig.sock") == 0o600
    finally:
        incoming.listener.close()


def test_snapshot_files_are_0600_and_never_follow_a_planted_symlink(tmp_path, open_umask):
    from pyhv.machine.snapshot import _private_file
    target = tmp_path / "victim"
    target.write_text("keep")
    (tmp_path / "memory.raw.tmp").symlink_to(target)        # planted where a save writes
    with _private_file(str(tmp_path / "memory.raw.tmp"), "wb") as f:
        f.write(b"guest RAM")
    assert target.read_text() == "keep"
    assert not os.path.islink(tmp_path / "memory.raw.tmp")
    assert mode(tmp_path / "memory.raw.tmp") == 0o600
