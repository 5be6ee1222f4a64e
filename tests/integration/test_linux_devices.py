"""Linux's own drivers against pyhv's PC devices: the project's small kernel, booted by pyhv with `--machine pc`,
binds virtio_blk and virtio_net to pyhv's virtio-pci devices (MSI-X through irqfd, notifications through
ioeventfd) and moves data through them; the host checks what arrived. The guest commands go through files rather
than pipelines: on PVM hosts a program exec'd while others are runnable intermittently dies of SIGSEGV
(pyhv/assets/init_script.py, PVM_NOTE)."""
from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys

import pytest

from net_helpers import NET_SERVER
from linux_guest import boot
from pyhv.assets.protocol import command_output, debug_exit_status

pytestmark = [pytest.mark.kvm, pytest.mark.slow]
MiB = 1 << 20


def boot_pc(assets, command: str, *extra: str, prefix: tuple[str, ...] = ()) -> tuple[int, str]:
    status, out, err = boot(assets, "--machine", "pc", *extra, command=command, prefix=prefix)
    return status, out + err


def values(output: str) -> dict[str, str]:
    """NAME=VALUE lines of the command's output; a sha256sum line ("HASH  FILE") gives just the hash."""
    lines = (command_output(output) or "").splitlines()
    return {k: v.split()[0] if v else v for k, v in (line.split("=", 1) for line in lines if "=" in line)}


def test_virtio_blk_driver_reads_writes_and_respects_read_only(linux_guest, tmp_path):
    disk, ro_disk = tmp_path / "disk.raw", tmp_path / "ro.raw"
    host_data = os.urandom(2 * MiB)
    with open(disk, "wb") as f:
        f.write(host_data)
        f.truncate(32 * MiB)
    with open(ro_disk, "wb") as f:
        f.write(b"R" * 4096)
        f.truncate(4 * MiB)
    status, out = boot_pc(linux_guest, "; ".join([
        "echo driver=$(basename $(readlink /sys/block/vda/device/driver))",
        "echo serial=$(cat /sys/block/vda/serial)",
        "echo sectors=$(cat /sys/block/vda/size)",
        "dd if=/dev/vda of=/tmp/r bs=64k count=32 2>/dev/null", "echo readsum=$(sha256sum /tmp/r)",
        "dd if=/dev/urandom of=/tmp/w bs=64k count=16 2>/dev/null", "echo wrotesum=$(sha256sum /tmp/w)",
        "dd if=/tmp/w of=/dev/vda bs=64k seek=160 conv=fsync 2>/dev/null; echo dd=$?",
        "echo ro=$(cat /sys/block/vdb/ro)",
        "dd if=/tmp/w of=/dev/vdb bs=4k count=1 conv=fsync 2>/dev/null; echo rodd=$?",
        "echo msi=$(grep -c 'PCI-MSI.*virtio' /proc/interrupts)",
    ]), "--drive", f"file={disk},serial=pyhv-disk-1", "--drive", f"file={ro_disk},readonly=on")
    assert status == debug_exit_status(0), out[-3000:]
    got = values(out)
    assert got["driver"] == "virtio_blk" and got["serial"] == "pyhv-disk-1"
    assert int(got["sectors"]) == 32 * MiB // 512
    assert got["readsum"] == hashlib.sha256(host_data).hexdigest()
    assert got["dd"] == "0"
    with open(disk, "rb") as f:
        f.seek(160 * 65536)
        assert hashlib.sha256(f.read(MiB)).hexdigest() == got["wrotesum"]
    assert got["ro"] == "1" and got["rodd"] != "0"
    with open(ro_disk, "rb") as f:
        assert f.read(4096) == b"R" * 4096                  # the read-only image is untouched
    assert int(got["msi"]) >= 2                             # config and request vectors of MSI-X, per disk


def test_virtio_net_driver_moves_tcp_both_ways(linux_guest, netns):
    n = 1 * MiB          # each way; on PVM hosts every guest system call costs ~1 ms
    tap = f"pv{random.randrange(1 << 24):x}"
    subprocess.run(["ip", "-n", netns, "tuntap", "add", "dev", tap, "mode", "tap"], check=True)
    subprocess.run(["ip", "-n", netns, "addr", "add", "10.213.1.1/24", "dev", tap], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", tap, "up"], check=True)
    server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", NET_SERVER, "10.213.1.1", str(n)],
                              stdout=subprocess.PIPE, text=True)
    try:
        status, out = boot_pc(linux_guest, "\n".join([
            "echo driver=$(basename $(readlink /sys/class/net/eth0/device/driver))",
            "echo mac=$(cat /sys/class/net/eth0/address)",
            "ip addr add 10.213.1.2/24 dev eth0", "ip link set eth0 up",
            "for i in $(seq 30); do ping -c1 -W1 10.213.1.1 >/dev/null 2>&1 && break; done",
            "nc 10.213.1.1 5001 > /tmp/rx", "echo rxsum=$(sha256sum /tmp/rx)",
            f"dd if=/dev/urandom of=/tmp/tx bs=64k count={n // 65536} 2>/dev/null", "echo txsum=$(sha256sum /tmp/tx)",
            "nc 10.213.1.1 5002 < /tmp/tx > /tmp/ack", "echo ack=$(cat /tmp/ack)",
        ]), "--nic", f"tap,ifname={tap},mac=52:54:00:12:34:56", prefix=("ip", "netns", "exec", netns))
        out_server = server.communicate(timeout=60)[0] if status == debug_exit_status(0) else ""
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert status == debug_exit_status(0), out[-3000:]
    got = values(out)
    assert got["driver"] == "virtio_net" and got["mac"] == "52:54:00:12:34:56"
    sent = dict(line.split("=", 1) for line in out_server.splitlines() if "=" in line)
    assert got["rxsum"] == sent["sentsum"]
    assert int(sent["recvlen"]) == n and sent["recvsum"] == got["txsum"] and got["ack"] == "received"


def test_virtio_rng_from_the_registry_feeds_dev_hwrng(linux_guest):
    """`--device virtio-rng-pci` (a registry device, no wiring of its own): Linux's virtio_rng binds and
    /dev/hwrng gives bytes that are not all the same."""
    status, out = boot_pc(linux_guest, "; ".join([
        "echo current=$(cat /sys/class/misc/hw_random/rng_current)",
        "dd if=/dev/hwrng of=/tmp/r bs=512 count=8 2>/dev/null; echo dd=$?",
        "echo size=$(wc -c < /tmp/r)",
        "echo distinct=$(od -An -v -tx1 /tmp/r | tr ' ' '\\n' | grep . | sort -u | wc -l)",
    ]), "--device", "virtio-rng-pci")
    assert status == debug_exit_status(0), out[-3000:]
    got = values(out)
    assert got["current"].startswith("virtio_rng"), got
    assert got["dd"] == "0" and got["size"] == "4096"
    assert int(got["distinct"]) > 200          # 4 KiB from getrandom(2) has nearly all 256 byte values
