"""Disk image locks (pyhv/runtime/image_lock.py): QEMU's layout, so pyhv, QEMU and qemu-storage-daemon refuse each
other as QEMU refuses itself: readers share an image, a writer has it alone."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from pyhv.errors import GuestImageError
from pyhv.virtio.blk import BlkImage

OPEN_IN_CHILD = """
import sys
from pyhv.errors import PyhvError
from pyhv.virtio.blk import BlkImage
try:
    BlkImage(sys.argv[1], readonly=sys.argv[2] == "ro", locking=sys.argv[3] == "on")
    print("opened")
except PyhvError as e:
    print("refused:", e.args[0])
"""


def open_elsewhere(path, mode: str, locking: str = "on") -> str:
    """Open the image in another process (another open file, as another VM would) and say what happened."""
    return subprocess.run([sys.executable, "-c", OPEN_IN_CHILD, str(path), mode, locking], capture_output=True,
                          text=True, timeout=60, check=True).stdout.strip()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    return path


def test_a_writer_has_the_image_alone_and_readers_share_it(image):
    writer = BlkImage(str(image))
    try:
        assert open_elsewhere(image, "rw") == f'refused: drive {image}: Failed to get "write" lock'
        assert open_elsewhere(image, "ro") == f'refused: drive {image}: Failed to get shared "write" lock'
        assert open_elsewhere(image, "rw", locking="off") == "opened"      # the documented escape
    finally:
        writer.close()
    assert open_elsewhere(image, "rw") == "opened"                         # closing the image dropped its locks
    reader = BlkImage(str(image), readonly=True)
    try:
        assert open_elsewhere(image, "ro") == "opened"
        assert open_elsewhere(image, "rw") == f'refused: drive {image}: Failed to get "write" lock'
    finally:
        reader.close()


def test_the_refusal_names_the_image_and_the_escape(image):
    writer = BlkImage(str(image))
    try:
        with pytest.raises(GuestImageError) as caught:
            BlkImage(str(image))            # a second open file in this process is another user too
        assert caught.value.hint.startswith(f"Is another process using the image [{image}]?")
        assert "locking=off" in caught.value.hint
    finally:
        writer.close()


def test_release_hands_the_image_over_and_acquire_takes_it_back(image):
    source = BlkImage(str(image))
    destination = BlkImage(str(image), lock_now=False)       # a live migration's destination: opened, not locked
    try:
        with pytest.raises(GuestImageError):
            destination.lock.acquire()
        source.lock.release()
        destination.lock.acquire()
        with pytest.raises(GuestImageError):
            source.lock.acquire()
        assert not source.lock.held and destination.lock.held
    finally:
        source.close()
        destination.close()


def storage_daemon(image, tmp_path) -> subprocess.Popen:
    """qemu-storage-daemon exporting the image writable over NBD (it holds QEMU's write locks on it)."""
    if shutil.which("qemu-storage-daemon") is None:
        raise AssertionError("qemu-storage-daemon is missing: run scripts/install-deps (qemu-system-common)")
    sock = tmp_path / "qsd.sock"
    proc = subprocess.Popen(["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=disk,filename={image}",
                             "--nbd-server", f"addr.type=unix,addr.path={sock}",
                             "--export", "type=nbd,id=e,node-name=disk,writable=on"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


def test_qemu_storage_daemon_and_pyhv_refuse_each_other(image, tmp_path):
    daemon = storage_daemon(image, tmp_path)
    try:
        for readonly in (False, True):
            with pytest.raises(GuestImageError, match=r'Failed to get shared "write" lock'):
                BlkImage(str(image), readonly=readonly)
        assert daemon.poll() is None
    finally:
        daemon.terminate()
        daemon.communicate(timeout=30)
    held = BlkImage(str(image))
    try:
        r = subprocess.run(["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=disk,filename={image}",
                            "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'qsd2.sock'}",
                            "--export", "type=nbd,id=e,node-name=disk,writable=on"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and 'Failed to get "write" lock' in r.stderr, r.stderr
    finally:
        held.close()
