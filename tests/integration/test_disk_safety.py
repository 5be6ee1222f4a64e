"""Disk images under KVM: a second VM (or a storage daemon) cannot take a running VM's image, and a VM killed with
SIGKILL loses none of the writes its guest was told were durable (virtio-blk FLUSH reaches `fdatasync`)."""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import time

import pytest

from pyhv.assets.protocol import encode_command
from vm_process import Pyhv

pytestmark = pytest.mark.kvm

# Appends numbered records to a file on an ext4 disk, fsyncs each (busybox `sync FILE`: fsync(2), which makes ext4
# commit its journal and the driver send a FLUSH) and only then acknowledges it on the serial port.
RECORD_LOOP = ("mkdir -p /mnt; mount -t ext4 /dev/vda /mnt || pyhv-exit 3; echo mounted; i=0; while :; do "
               "i=$((i+1)); echo \"record $i\" >> /mnt/log; sync /mnt/log || pyhv-exit 4; echo ack $i; done")
ACK = re.compile(r"^ack (\d+)\r?$", re.M)
RUNS = int(os.environ.get("PYHV_CRASH_RUNS", "3"))      # `make crash-test` runs 20


def counter_vm(guest, tmp_path, tag: str, disk) -> Pyhv:
    vm = Pyhv(tmp_path, tag, "--firmware", guest("counter"), "--drive", f"file={disk},format=raw")
    deadline = time.monotonic() + 60
    while "counter: running" not in vm.text():
        assert vm.proc.poll() is None and time.monotonic() < deadline, vm.text()
        time.sleep(0.05)
    return vm


def test_a_second_vm_is_refused_the_image_and_the_first_runs_on(guest, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    first = counter_vm(guest, tmp_path, "first", disk)
    try:
        r = subprocess.run([sys.executable, "-m", "pyhv.cli", "run", "--firmware", guest("counter"),
                            "--drive", f"file={disk},format=raw", "--serial", "none"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == (f'pyhv: error: drive {disk}: Failed to get "write" lock (Is another process using '
                                    f'the image [{disk}]? locking=off skips this check, at the risk of corrupting '
                                    'the image)'), r.stderr
        r = subprocess.run([sys.executable, "-m", "pyhv.cli", "run", "--firmware", guest("counter"),
                            "--drive", f"file={disk},format=raw,readonly=on", "--serial", "none"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and 'Failed to get shared "write" lock' in r.stderr, r.stderr
        before = first.counter(tmp_path)
        time.sleep(0.2)
        assert first.counter(tmp_path) > before                 # the first VM never noticed
        assert first.qmp.execute("query-status")["status"] == "running"
    finally:
        first.kill()


def test_a_vm_is_refused_an_image_a_storage_daemon_exports(guest, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    sock = tmp_path / "qsd.sock"
    assert shutil.which("qemu-storage-daemon"), "qemu-storage-daemon is missing: run scripts/install-deps"
    daemon = subprocess.Popen(["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=d,filename={disk}",
                               "--nbd-server", f"addr.type=unix,addr.path={sock}",
                               "--export", "type=nbd,id=e,node-name=d,writable=on"])
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert daemon.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        r = subprocess.run([sys.executable, "-m", "pyhv.cli", "run", "--firmware", guest("counter"),
                            "--drive", f"file={disk},format=raw", "--serial", "none"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Failed to get shared \"write\" lock" in r.stderr, r.stderr
        assert f"Is another process using the image [{disk}]?" in r.stderr
        assert daemon.poll() is None
    finally:
        daemon.terminate()
        daemon.wait(30)


def records_on(disk, tmp_path) -> list[str]:
    """The record file as a freshly booted system would see it: journal replayed (e2fsck on a copy), then read."""
    copy = tmp_path / "check.img"
    shutil.copyfile(disk, copy)
    fsck = subprocess.run(["e2fsck", "-fy", str(copy)], capture_output=True, text=True)
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr      # 1: the journal replayed, nothing else
    out = subprocess.run(["debugfs", "-R", "cat /log", str(copy)], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("run", range(RUNS))
def test_sigkill_loses_no_acknowledged_record(linux_guest, tmp_path, run):
    disk = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "64M", str(disk)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(disk)], check=True)
    vm = Pyhv(tmp_path, "crash", "--kernel", str(linux_guest.bzimage), "--initrd",
              str(linux_guest.initramfs_uncompressed), "--memory", "128M", "--drive", f"file={disk},format=raw",
              "--append", f"console=ttyS0 reboot=k panic=-1 {encode_command(RECORD_LOOP)}")
    try:
        deadline = time.monotonic() + 300
        while not ACK.search(vm.text()):
            assert vm.proc.poll() is None and time.monotonic() < deadline, vm.text()[-2000:]
            time.sleep(0.05)
        time.sleep(random.uniform(0, 3))                    # a random moment: mid-write, mid-flush, between
        vm.proc.kill()
        vm.proc.wait(30)
    finally:
        vm.kill()
    acked = [int(n) for n in ACK.findall(vm.text())]
    assert acked == list(range(1, len(acked) + 1)), acked[:20]
    lines = records_on(disk, tmp_path)
    if lines and not re.fullmatch(r"record \d+", lines[-1]):
        lines.pop()                                          # a record cut short by the kill, never acknowledged
    numbers = [int(line.split()[1]) for line in lines]
    assert numbers == list(range(1, len(numbers) + 1)), lines[-5:]     # in order, no gap, no repeat
    assert len(numbers) >= acked[-1], (len(numbers), acked[-1])        # every acknowledged record is there
    print(f"killed after {acked[-1]} acknowledged records; {len(numbers)} on the image, none lost")
