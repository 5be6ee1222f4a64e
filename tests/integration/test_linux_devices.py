"""Linux's own drivers against pyhv's devices: the project's small kernel, booted by pyhv on `--machine pc`
(virtio-pci: MSI-X through irqfd) and on `microvm` (virtio-mmio slots declared in pyhv's ACPI DSDT, an irqfd on
each slot's GSI), notifications through ioeventfd on both, binds virtio_blk, virtio_net, virtio_rng and
virtio_console and moves data through them; the host checks what arrived. The guest commands go through files rather
than pipelines: on PVM hosts a program exec'd while others are runnable intermittently dies of SIGSEGV
(pyhv/assets/init_script.py, PVM_NOTE)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest

from net_helpers import NET_SERVER
from linux_guest import BOOT_TIMEOUT, boot
from pyhv.assets.protocol import command_output, debug_exit_status

pytestmark = [pytest.mark.kvm, pytest.mark.slow]
MiB = 1 << 20


# microvm finds its virtio-mmio devices through ACPI (the default) or, with --acpi off, on the command line
MACHINES = ["pc", "microvm", "microvm-noacpi"]
MACHINE_OPTIONS = {"pc": ("--machine", "pc"), "microvm": ("--machine", "microvm"),
                   "microvm-noacpi": ("--machine", "microvm", "--acpi", "off")}


def boot_on(machine: str, assets, command: str, *extra: str, prefix: tuple[str, ...] = (),
            append: str = "") -> tuple[int, str]:
    status, out, err = boot(assets, *MACHINE_OPTIONS[machine], *extra, command=command, prefix=prefix,
                            append=append)
    return status, out + err


def boot_pc(assets, command: str, *extra: str, prefix: tuple[str, ...] = ()) -> tuple[int, str]:
    return boot_on("pc", assets, command, *extra, prefix=prefix)


def values(output: str) -> dict[str, str]:
    """NAME=VALUE lines of the command's output; a sha256sum line ("HASH  FILE") gives just the hash."""
    lines = (command_output(output) or "").splitlines()
    return {k: v.split()[0] if v else v for k, v in (line.split("=", 1) for line in lines if "=" in line)}


@pytest.mark.parametrize("machine", MACHINES)
def test_virtio_blk_driver_reads_writes_and_respects_read_only(linux_guest, tmp_path, machine):
    disk, ro_disk = tmp_path / "disk.raw", tmp_path / "ro.raw"
    host_data = os.urandom(2 * MiB)
    with open(disk, "wb") as f:
        f.write(host_data)
        f.truncate(32 * MiB)
    with open(ro_disk, "wb") as f:
        f.write(b"R" * 4096)
        f.truncate(4 * MiB)
    status, out = boot_on(machine, linux_guest, "; ".join([
        "echo driver=$(basename $(readlink /sys/block/vda/device/driver))",
        "echo path=$(readlink -f /sys/block/vda/device)",
        "echo serial=$(cat /sys/block/vda/serial)",
        "echo sectors=$(cat /sys/block/vda/size)",
        "dd if=/dev/vda of=/tmp/r bs=64k count=32 2>/dev/null", "echo readsum=$(sha256sum /tmp/r)",
        "dd if=/dev/urandom of=/tmp/w bs=64k count=16 2>/dev/null", "echo wrotesum=$(sha256sum /tmp/w)",
        "dd if=/tmp/w of=/dev/vda bs=64k seek=160 conv=fsync 2>/dev/null; echo dd=$?",
        "echo ro=$(cat /sys/block/vdb/ro)",
        "dd if=/tmp/w of=/dev/vdb bs=4k count=1 conv=fsync 2>/dev/null; echo rodd=$?",
        "echo msi=$(grep -c 'PCI-MSI.*virtio' /proc/interrupts)",
        "echo ioapic=$(grep -c 'IO-APIC.*virtio' /proc/interrupts)",
    ]), "--drive", f"file={disk},serial=pyhv-disk-1", "--drive", f"file={ro_disk},readonly=on",
        "--trace", r"virtio-blk\d\.queue_notify", "--log-level", "info")
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
    if machine == "pc":
        assert "/pci" in got["path"]
        assert int(got["msi"]) >= 2                         # config and request vectors of MSI-X, per disk
    else:
        # a virtio-mmio device the DSDT declares, or one virtio_mmio.device= on the command line names
        assert ("LNRO0005" if machine == "microvm" else "virtio-mmio") in got["path"] and got["msi"] == "0"
        assert "queue_notify" not in out                            # every notification went to an ioeventfd
        assert got["ioapic"] == "2"                         # one slot GSI per disk


NET_BYTES = 1 * MiB          # each way; on PVM hosts every guest system call costs ~1 ms


def tcp_both_ways(assets, netns: str, machine: str, nic: str, after: list[str] = (),
                  extra: tuple[str, ...] = (), append: str = "") -> tuple[dict, dict, str]:
    """Boot `assets` with `--nic tap,ifname=TAP,<nic>` on a fresh tap in `netns` (10.213.1.1, the guest .2):
    the guest prints its NIC's driver and MAC, receives NET_BYTES over TCP from NET_SERVER and sends NET_BYTES
    back, then runs `after`. Checks both transfers; returns (guest values, the tap's counters, the console and
    pyhv's output)."""
    tap = f"pv{random.randrange(1 << 24):x}"
    subprocess.run(["ip", "-n", netns, "tuntap", "add", "dev", tap, "mode", "tap"], check=True)
    subprocess.run(["ip", "-n", netns, "addr", "add", "10.213.1.1/24", "dev", tap], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", tap, "up"], check=True)
    server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", NET_SERVER, "10.213.1.1",
                               str(NET_BYTES)], stdout=subprocess.PIPE, text=True)
    try:
        status, out = boot_on(machine, assets, "\n".join([
            "echo driver=$(basename $(readlink /sys/class/net/eth0/device/driver))",
            "echo mac=$(cat /sys/class/net/eth0/address)",
            "ip addr add 10.213.1.2/24 dev eth0", "ip link set eth0 up",
            "for i in $(seq 30); do ping -c1 -W1 10.213.1.1 >/dev/null 2>&1 && break; done",
            "nc 10.213.1.1 5001 > /tmp/rx", "echo rxsum=$(sha256sum /tmp/rx)",
            f"dd if=/dev/urandom of=/tmp/tx bs=64k count={NET_BYTES // 65536} 2>/dev/null",
            "echo txsum=$(sha256sum /tmp/tx)",
            "nc 10.213.1.1 5002 < /tmp/tx > /tmp/ack", "echo ack=$(cat /tmp/ack)", *after,
        ]), "--nic", f"tap,ifname={tap},{nic}", *extra, prefix=("ip", "netns", "exec", netns), append=append)
        out_server = server.communicate(timeout=60)[0] if status == debug_exit_status(0) else ""
        counters = {k: int(subprocess.run(["ip", "netns", "exec", netns, "cat", f"/sys/class/net/{tap}/statistics/{k}"],
                                          capture_output=True, text=True, check=True).stdout)
                    for k in ("rx_packets", "tx_packets")}
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert status == debug_exit_status(0), out[-3000:]
    got = values(out)
    sent = dict(line.split("=", 1) for line in out_server.splitlines() if "=" in line)
    assert got["rxsum"] == sent["sentsum"]
    assert int(sent["recvlen"]) == NET_BYTES and sent["recvsum"] == got["txsum"] and got["ack"] == "received"
    return got, counters, out


def test_virtio_mmio_notifications_exit_to_pyhv_only_without_ioeventfd(linux_guest, tmp_path):
    """The other side of the blk test's check: with --no-ioeventfd every QueueNotify write exits to pyhv (and is
    traced), so "no queue_notify in the trace" there means the ioeventfds took them all."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(MiB))
    status, out = boot_on("microvm", linux_guest, "dd if=/dev/vda of=/tmp/r bs=64k count=16 2>/dev/null",
                          "--drive", f"file={disk}", "--no-ioeventfd", "--trace", r"virtio-blk\d\.queue_notify",
                          "--log-level", "info")
    assert status == debug_exit_status(0), out[-3000:]
    assert out.count("virtio-blk0.queue_notify: queue 0 notified through an exit") >= 1


@pytest.mark.parametrize("machine", MACHINES)
def test_virtio_net_driver_moves_tcp_both_ways(linux_guest, netns, machine):
    got, _, _ = tcp_both_ways(linux_guest, netns, machine, "mac=52:54:00:12:34:56")
    assert got["driver"] == "virtio_net" and got["mac"] == "52:54:00:12:34:56"


def test_e1000_driver_gets_link_and_mac_and_moves_tcp_both_ways(linux_guest, netns):
    """`--nic tap,...,model=e1000` on pc: Linux's e1000 driver binds to pyhv's 82540EM, reads the MAC from its
    EEPROM, reports the link up, moves 1 MiB each way over TCP (checksums on both sides), and its frame counters
    agree with what the host's tap counted."""
    stats = "/sys/class/net/eth0/statistics"
    got, host, _ = tcp_both_ways(linux_guest, netns, "pc", "mac=52:54:00:ab:cd:ef,model=e1000", after=[
        "echo carrier=$(cat /sys/class/net/eth0/carrier)",
        "ip link set eth0 down",                      # the counters stop here, before the host reads its own
        f"echo tx_packets=$(cat {stats}/tx_packets)", f"echo rx_packets=$(cat {stats}/rx_packets)",
    ])
    assert got["driver"] == "e1000" and got["mac"] == "52:54:00:ab:cd:ef" and got["carrier"] == "1"
    assert int(got["tx_packets"]) > NET_BYTES // 1500 and int(got["rx_packets"]) > NET_BYTES // 1500
    assert host["rx_packets"] == int(got["tx_packets"]), (host, got)      # every frame the guest sent arrived
    # the host may send a few more after the guest took its link down (FIN and ACK retransmits): dropped
    assert 0 <= host["tx_packets"] - int(got["rx_packets"]) <= 32, (host, got)


@pytest.mark.parametrize("machine,name", [("pc", "virtio-rng-pci"), ("microvm", "virtio-rng-device"),
                                          ("microvm-noacpi", "virtio-rng-device")])
def test_virtio_rng_from_the_registry_feeds_dev_hwrng(linux_guest, machine, name):
    """`--device virtio-rng-pci` / `virtio-rng-device` (a registry device, no wiring of its own): Linux's
    virtio_rng binds and /dev/hwrng gives bytes that are not all the same."""
    status, out = boot_on(machine, linux_guest, "; ".join([
        "echo current=$(cat /sys/class/misc/hw_random/rng_current)",
        "dd if=/dev/hwrng of=/tmp/r bs=512 count=8 2>/dev/null; echo dd=$?",
        "echo size=$(wc -c < /tmp/r)",
        "echo distinct=$(od -An -v -tx1 /tmp/r | tr ' ' '\\n' | grep . | sort -u | wc -l)",
    ]), "--device", name)
    assert status == debug_exit_status(0), out[-3000:]
    got = values(out)
    assert got["current"].startswith("virtio_rng"), got
    assert got["dd"] == "0" and got["size"] == "4096"
    assert int(got["distinct"]) > 200          # 4 KiB from getrandom(2) has nearly all 256 byte values


@pytest.mark.parametrize("machine", MACHINES)
def test_virtio_console_is_hvc0_both_ways(linux_guest, tmp_path, machine):
    """`--device virtio-console,chardev=socket:PATH`: Linux's virtio_console gives /dev/hvc0; what the guest
    writes there reaches the socket, and a line the host sends back is what the guest reads."""
    path = str(tmp_path / "hvc.sock")
    seen = bytearray()

    def host_side() -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.settimeout(BOOT_TIMEOUT)
            while b"hello-hvc" not in seen:
                data = s.recv(4096)
                if not data:
                    return
                seen.extend(data)
            s.sendall(b"ping-from-host\n")
            while data := s.recv(4096):          # until pyhv closes it at the end
                seen.extend(data)

    host = threading.Thread(target=host_side, daemon=True)
    host.start()
    status, out = boot_on(machine, linux_guest, "; ".join([
        "echo driver=$(basename $(readlink /sys/class/tty/hvc0/device/driver 2>/dev/null || "
        "readlink /sys/bus/virtio/drivers/virtio_console/virtio*/driver))",
        "for d in /sys/bus/pci/devices/*; do [ $(cat $d/device) = 0x1043 ] && echo class=$(cat $d/class); done",
        "exec 3<>/dev/hvc0",              # open once: a tty's last close drops input not read yet
        "echo hello-hvc >&3",
        "read -r line <&3; echo got=$line",
    ]), "--device", f"virtio-console,chardev=socket:{path}")
    host.join(10)
    assert status == debug_exit_status(0), out[-3000:]
    got = values(out)
    assert got["driver"] == "virtio_console"
    if machine == "pc":
        assert got["class"] == "0x078000"      # communication controller, as QEMU's virtio-serial-pci
    assert got["got"] == "ping-from-host"
    assert b"hello-hvc" in seen


@pytest.mark.parametrize("machine", ["pc", "microvm"])
def test_sidecore_serves_blk_and_net_with_no_notification_at_all(linux_guest, netns, tmp_path, machine):
    """--sidecore: the poller thread serves virtio-blk and virtio-net; Linux's drivers, told by the rings not to
    notify, never do (0 notifications on every queue, kicks and exits alike) while a disk is read and written and
    1 MiB crosses the tap each way."""
    disk = tmp_path / "disk.raw"
    host_data = os.urandom(MiB)
    with open(disk, "wb") as f:
        f.write(host_data)
        f.truncate(8 * MiB)
    stats = tmp_path / "stats.json"
    got, _, _ = tcp_both_ways(linux_guest, netns, machine, "mac=52:54:00:12:34:57", after=[
        "dd if=/dev/vda of=/tmp/r bs=64k count=16 2>/dev/null", "echo readsum=$(sha256sum /tmp/r)",
        "dd if=/tmp/tx of=/dev/vda bs=64k seek=32 conv=fsync 2>/dev/null; echo dd=$?",
    ], extra=("--sidecore", "--drive", f"file={disk}", "--stats-json", str(stats)))
    assert got["readsum"] == hashlib.sha256(host_data).hexdigest() and got["dd"] == "0"
    with open(disk, "rb") as f:
        f.seek(32 * 65536)
        assert hashlib.sha256(f.read(NET_BYTES)).hexdigest() == got["txsum"]
    virtio = json.loads(stats.read_text())["virtio"]
    assert virtio["virtio-blk0"] == {"notifications": [0], "polled": True}, virtio
    assert virtio["virtio-net0"] == {"notifications": [0, 0], "polled": True}, virtio
    assert virtio["sidecore"]["busy_looks"] > 0
