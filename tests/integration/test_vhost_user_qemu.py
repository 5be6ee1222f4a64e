"""QEMU (TCG, q35) boots the project's Linux guest with vhost-user devices served by pyhv's back end, so Linux's
own virtio_blk, virtio_rng and virtio_net drivers exercise pyhv's device code."""
from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time

import pytest

from qemu_guest import qemu_command, run_guest, vhost_user_blk
from net_helpers import NET_SERVER
from vhost_helpers import Backend

pytestmark = pytest.mark.slow
MiB = 1 << 20


@pytest.fixture(scope="session")
def vhost_guest(request):
    """The project's Linux test guest (kernel + busybox initramfs from `pyhv guest build`, the assets branch's
    `linux_guest` fixture in tests/conftest.py). Skipped, with the reason, only on a tree without pyhv.assets."""
    try:
        import pyhv.assets  # noqa: F401
    except ImportError:
        pytest.skip("pyhv.assets (pyhv guest build) is not in this tree yet")
    return request.getfixturevalue("linux_guest")


@pytest.fixture
def blk_image(tmp_path):
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    return path


def start_blk(tmp_path, image, *args):
    return Backend(tmp_path, "--type", "blk", "--image", str(image), *args)


def test_blk_binds_and_data_crosses_both_ways(vhost_guest, tmp_path, blk_image):
    host_data = os.urandom(3 * MiB)
    with open(blk_image, "r+b") as f:
        f.seek(5 * MiB)
        f.write(host_data)
    be = start_blk(tmp_path, blk_image, "--serial", "pyhv-vhost-0")
    try:
        run = run_guest(vhost_guest, "; ".join([
            "echo driver=$(basename $(readlink /sys/block/vda/device/driver))",
            "echo serial=$(cat /sys/block/vda/serial)",
            "echo size=$(cat /sys/block/vda/size)",
            "echo readsum=$(dd if=/dev/vda bs=1M skip=5 count=3 2>/dev/null | sha256sum | cut -d' ' -f1)",
            "dd if=/dev/urandom of=/tmp/w bs=1M count=2 2>/dev/null",
            "echo wrotesum=$(sha256sum /tmp/w | cut -d' ' -f1)",
            "dd if=/tmp/w of=/dev/vda bs=1M seek=20 2>/dev/null",
            "sync",
        ]), vhost_user_blk(be.socket))
    finally:
        be.stop()
    assert run.status == 0, run.console[-3000:]
    assert run.value("driver") == "virtio_blk"
    assert run.value("serial") == "pyhv-vhost-0"
    assert int(run.value("size")) == 64 * MiB // 512
    assert run.value("readsum") == hashlib.sha256(host_data).hexdigest()
    with open(blk_image, "rb") as f:
        f.seek(20 * MiB)
        assert hashlib.sha256(f.read(2 * MiB)).hexdigest() == run.value("wrotesum")


def test_ext2_made_in_the_guest_checks_clean_on_the_host(vhost_guest, tmp_path, blk_image):
    be = start_blk(tmp_path, blk_image)
    try:
        run = run_guest(vhost_guest, "; ".join([
            "set -e", "mke2fs -q /dev/vda", "mkdir -p /mnt", "mount -t ext2 /dev/vda /mnt",
            "for i in 1 2 3 4 5 6 7 8; do dd if=/dev/urandom of=/mnt/f$i bs=64k count=$i 2>/dev/null; done",
            "mkdir /mnt/dir", "echo hello > /mnt/dir/hello", "sha256sum /mnt/f8 | cut -d' ' -f1 > /tmp/s",
            "umount /mnt", "sync", "echo f8sum=$(cat /tmp/s)",
        ]), vhost_user_blk(be.socket))
    finally:
        be.stop()
    assert run.status == 0, run.console[-3000:]
    fsck = subprocess.run(["e2fsck", "-fn", str(blk_image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    dump = subprocess.run(["debugfs", "-R", "cat /dir/hello", str(blk_image)], capture_output=True, text=True)
    assert dump.stdout == "hello\n"
    data = subprocess.run(["debugfs", "-R", "cat /f8", str(blk_image)], capture_output=True).stdout
    assert hashlib.sha256(data).hexdigest() == run.value("f8sum")


def test_read_only_export_refuses_writes(vhost_guest, tmp_path, blk_image):
    with open(blk_image, "r+b") as f:
        f.write(b"KEEP" * 1024)
    before = blk_image.read_bytes()
    os.chmod(blk_image, 0o444)
    be = start_blk(tmp_path, blk_image, "--read-only")
    try:
        run = run_guest(vhost_guest, "; ".join([
            "echo ro=$(cat /sys/block/vda/ro)",
            "dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; echo ddstatus=$?",
            "echo head=$(head -c 8 /dev/vda)",
        ]), vhost_user_blk(be.socket))
    finally:
        be.stop()
    assert run.status == 0, run.console[-3000:]
    assert run.value("ro") == "1"
    assert run.value("ddstatus") != "0"
    assert run.value("head") == "KEEPKEEP"
    assert blk_image.read_bytes() == before


def test_discard_punches_holes(vhost_guest, tmp_path, blk_image):
    with open(blk_image, "wb") as f:
        f.write(b"\xA5" * (64 * MiB))
        os.fsync(f.fileno())
    allocated = os.stat(blk_image).st_blocks * 512
    be = start_blk(tmp_path, blk_image)
    try:
        run = run_guest(vhost_guest, "; ".join([
            "echo gran=$(cat /sys/block/vda/queue/discard_granularity)",
            "blkdiscard -o 8388608 -l 33554432 /dev/vda; echo discard=$?", "sync",
        ]), vhost_user_blk(be.socket))
    finally:
        be.stop()
    assert run.status == 0, run.console[-3000:]
    assert run.value("discard") == "0" and int(run.value("gran")) > 0
    assert os.stat(blk_image).st_blocks * 512 <= allocated - 32 * MiB
    with open(blk_image, "rb") as f:
        data = f.read()
    assert data[8 * MiB:40 * MiB] == bytes(32 * MiB)
    assert data[:8 * MiB] == b"\xA5" * (8 * MiB) and data[40 * MiB:] == b"\xA5" * (24 * MiB)


def test_front_end_killed_mid_io_then_reconnects(vhost_guest, tmp_path, blk_image):
    """QEMU is SIGKILLed while its guest streams writes; the back end logs the disconnect, cleans up and serves
    the next QEMU, which reads back what the host wrote meanwhile."""
    be = start_blk(tmp_path, blk_image)
    try:
        qemu = subprocess.Popen(qemu_command(vhost_guest, "echo WRITING; dd if=/dev/zero of=/dev/vda bs=1M "
                                             "count=100000 oflag=direct", vhost_user_blk(be.socket)),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            for line in qemu.stdout:                  # the guest has started writing
                if b"WRITING" in line:
                    break
            for _ in range(600):                      # until its writes reach the (sparse) image
                if os.stat(blk_image).st_blocks:
                    break
                time.sleep(0.2)
            assert os.stat(blk_image).st_blocks, "the guest's writes never reached the image"
        finally:
            qemu.kill()                               # mid-I/O: dd is still running
            qemu.wait()
        marker = os.urandom(4096)
        with open(blk_image, "r+b") as f:             # the host changes the disk between the two front ends
            f.seek(60 * MiB)
            f.write(marker)
        run = run_guest(vhost_guest, "echo sum=$(dd if=/dev/vda bs=4096 skip=15360 count=1 2>/dev/null | "
                                     "sha256sum | cut -d' ' -f1)", vhost_user_blk(be.socket))
        assert be.alive()
    finally:
        be.stop()
    assert run.status == 0, run.console[-3000:]
    assert run.value("sum") == hashlib.sha256(marker).hexdigest()
    log = be.log()
    assert log.count("front end connected") == 2 and "front end disconnected" in log


def test_rng_gives_bytes(vhost_guest, tmp_path):
    be = Backend(tmp_path, "--type", "rng")
    try:
        run = run_guest(vhost_guest, "; ".join([
            "echo current=$(cat /sys/class/misc/hw_random/rng_current)",
            "echo count=$(head -c 4096 /dev/hwrng | wc -c)",
            "echo distinct=$(head -c 4096 /dev/hwrng | od -An -v -tx1 | tr ' ' '\\n' | sort -u | grep -c .)",
        ]), ["-chardev", f"socket,id=vurng,path={be.socket}", "-device", "vhost-user-rng-pci,chardev=vurng"])
    finally:
        be.stop()
    assert run.status == 0, run.console[-3000:]
    assert run.value("current").startswith("virtio_rng")
    assert run.value("count") == "4096"
    assert int(run.value("distinct")) > 200          # 4 KiB of random bytes use almost every byte value


def test_net_100mib_tcp_both_ways(vhost_guest, tmp_path, netns):
    n = 100 * MiB
    tap = f"pt{random.randrange(1 << 24):x}"
    be = Backend(tmp_path, "--type", "net", "--tap", tap, prefix=["ip", "netns", "exec", netns])
    server = None
    try:
        subprocess.run(["ip", "-n", netns, "addr", "add", "10.213.0.1/24", "dev", tap], check=True)
        subprocess.run(["ip", "-n", netns, "link", "set", tap, "up"], check=True)
        server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", NET_SERVER, "10.213.0.1",
                                   str(n)], stdout=subprocess.PIPE, text=True)
        run = run_guest(vhost_guest, "\n".join([
            "echo driver=$(basename $(readlink /sys/class/net/eth0/device/driver))",
            "ip addr add 10.213.0.2/24 dev eth0", "ip link set eth0 up",
            "for i in $(seq 100); do ping -c1 -W1 10.213.0.1 >/dev/null 2>&1 && break; done",
            "echo rxsum=$(nc 10.213.0.1 5001 | sha256sum | cut -d' ' -f1)",
            "mkfifo /tmp/f", "sha256sum /tmp/f | cut -d' ' -f1 > /tmp/sum &",
            f"head -c {n} /dev/urandom | tee /tmp/f | nc 10.213.0.1 5002 > /tmp/ack", "wait",
            "echo txsum=$(cat /tmp/sum)", "echo ack=$(cat /tmp/ack)",
        ]), ["-chardev", f"socket,id=vunet,path={be.socket}", "-netdev", "vhost-user,id=net0,chardev=vunet",
             # vectors=0 (INTx): QEMU 7.2 under TCG crashes in msix_set_vector_notifiers when vhost-user net
             # starts with MSI-X, whatever the back end
             "-device", "virtio-net-pci,netdev=net0,vectors=0"], timeout=300)   # ~40 s here
        out = server.communicate(timeout=120)[0] if run.status == 0 else ""
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
        be.stop()
    assert run.status == 0, run.console[-3000:] + "\nback end log:\n" + be.log()[-3000:]
    assert run.value("driver") == "virtio_net"
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert run.value("rxsum") == values["sentsum"]
    assert int(values["recvlen"]) == n and values["recvsum"] == run.value("txsum")
    assert run.value("ack") == "received"
