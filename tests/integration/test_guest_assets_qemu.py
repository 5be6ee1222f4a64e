"""The Linux test guests (`pyhv guest build`) under QEMU TCG: both kernels reach /init, run pyhv.cmd, report the
status through the debug-exit port, and drive virtio devices (PCI on q35; MMIO through insmod arguments on the
stock kernel). No KVM needed; QEMU's timeout guards against a hang, nothing asserts on durations."""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess

import pytest

from pyhv.assets.protocol import (GuestAgent, command_output, debug_exit_status, encode_command, parse_exit_status,
                                  parse_init_uptime)

QEMU = "qemu-system-x86_64"
TIMEOUT = 300

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} not installed (scripts/install-deps)")]


def qemu_args(guest, append: str, machine: str = "q35", extra: list[str] = ()) -> list[str]:
    return [QEMU, "-accel", "tcg", "-M", machine, "-m", "256", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel", str(guest.bzimage), "-initrd", str(guest.initramfs),
            "-append", f"console=ttyS0 panic=-1 {append}", *extra]


def boot(guest, command: str, machine: str = "q35", extra: list[str] = ()) -> tuple[int, str]:
    proc = subprocess.run(qemu_args(guest, encode_command(command), machine, extra), capture_output=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


def disk_image(path, size: int = 1 << 20) -> tuple[str, str]:
    """A raw disk with recognisable contents; returns its path and the SHA-256 of its first 64 KiB."""
    data = bytes((i * 7 + i // 4096) & 0xFF for i in range(size))
    path.write_bytes(data)
    return str(path), hashlib.sha256(data[:65536]).hexdigest()


def test_mini_kernel_runs_a_command_and_exits_through_the_debug_port(linux_guest):
    status, console = boot(linux_guest, "uname -r; cat /proc/cmdline >/dev/null; exit 3")
    assert parse_init_uptime(console) is not None, console
    assert command_output(console).strip() == linux_guest.kernel_release
    assert linux_guest.kernel_release.endswith("-pyhv-mini")
    assert parse_exit_status(console) == 3
    assert status == debug_exit_status(3), console


def test_mini_kernel_virtio_pci_devices_on_q35(linux_guest, tmp_path):
    disk, first_64k = disk_image(tmp_path / "disk.img", 8 << 20)
    extra = ["-drive", f"file={disk},if=none,id=d0,format=raw,discard=unmap",
             "-device", "virtio-blk-pci,drive=d0,discard=on,write-zeroes=on",
             "-netdev", "user,id=n0,guestfwd=tcp:10.0.2.100:1234-cmd:echo hello-over-tcp",
             "-device", "virtio-net-pci,netdev=n0",
             "-device", "virtio-rng-pci"]
    command = ("dd if=/dev/vda bs=4096 count=16 2>/dev/null | sha256sum; "
               "cat /sys/block/vda/queue/discard_max_bytes /sys/block/vda/queue/write_zeroes_max_bytes; "
               "ls /sys/class/net; "
               "timeout 60 udhcpc -i eth0 -n -q -t 5 >/dev/null 2>&1; ip -4 addr show eth0 | grep -o 'inet [0-9.]*'; "
               "echo | nc 10.0.2.100 1234; "
               "dd if=/dev/hwrng bs=16 count=1 2>/dev/null | wc -c; "
               "mkfs.ext2 -q /dev/vda && mount /dev/vda /mnt && echo hello > /mnt/f && umount /mnt && "
               "mount /dev/vda /mnt && cat /mnt/f && fstrim /mnt >/dev/null 2>&1; echo fstrim=$?")
    status, console = boot(linux_guest, command, extra=extra)
    assert parse_exit_status(console) == 0, console
    lines = command_output(console).split()
    assert lines[0] == first_64k
    assert int(lines[2]) > 0 and int(lines[3]) > 0, "virtio-blk discard / write-zeroes not offered"
    assert "eth0" in lines and "lo" in lines
    assert "10.0.2.15" in lines, "no DHCP lease on virtio-net"
    assert "hello-over-tcp" in lines, "no TCP over virtio-net"
    assert "16" in lines, "no 16 bytes from /dev/hwrng"
    assert "hello" in lines and "fstrim=0" in lines, console


def test_mini_kernel_agent_mode(linux_guest):
    proc = subprocess.Popen(qemu_args(linux_guest, "pyhv.agent=1"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    agent = GuestAgent(proc.stdout, proc.stdin)
    try:
        agent.wait_ready(timeout=TIMEOUT)
        assert agent.run("uname -r").output.strip() == linux_guest.kernel_release
        result = agent.run("echo one; echo two >&2; false")
        assert (result.status, result.output) == (1, "one\ntwo\n")
        assert agent.run("cat").output == ""                 # stdin is /dev/null, not the console
        agent.exit(5)
        assert proc.wait(timeout=TIMEOUT) == debug_exit_status(5)
    finally:
        agent.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_mini_kernel_interactive_shell(linux_guest):
    """Without pyhv.cmd, /init starts a shell on the console with job control; pyhv-exit ends the VM."""
    proc = subprocess.Popen(qemu_args(linux_guest, ""), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    agent = GuestAgent(proc.stdout, proc.stdin)       # here only to read the console
    try:
        agent.read_until(re.compile("pyhv guest shell"), TIMEOUT)
        proc.stdin.write(b"echo job control: $(set -o | grep -c 'monitor *on'); tty; pyhv-exit 6\n")
        proc.stdin.flush()
        assert proc.wait(timeout=TIMEOUT) == debug_exit_status(6)
        rest = agent.console + proc.stdout.read().decode(errors="replace")
        assert "job control: 1" in rest and "/dev/ttyS0" in rest, rest
    finally:
        agent.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stock_kernel_loads_virtio_modules_and_reads_the_disk(stock_guest, tmp_path):
    disk, first_64k = disk_image(tmp_path / "disk.img")
    extra = ["-drive", f"file={disk},if=none,id=d0,format=raw,readonly=on", "-device", "virtio-blk-pci,drive=d0",
             "-device", "virtio-rng-pci"]
    command = ("uname -r; cut -d' ' -f1 /proc/modules | sort | tr '\\n' ' '; echo; "
               "dd if=/dev/vda bs=4096 count=16 2>/dev/null | sha256sum; "
               "dd if=/dev/hwrng bs=16 count=1 2>/dev/null | wc -c")
    status, console = boot(stock_guest, command, extra=extra)
    assert "insmod" not in console, console                 # no "pyhv-init: insmod X failed"
    release, modules, digest, rng_bytes = command_output(console).splitlines()
    assert release == stock_guest.kernel_release
    assert {"virtio_blk", "virtio_pci", "virtio_rng", "virtio_net", "virtio_mmio", "e1000"} <= set(modules.split())
    assert digest.split()[0] == first_64k
    assert rng_bytes.strip() == "16"
    assert status == debug_exit_status(0), console


def test_mini_kernel_virtio_mmio_devices_from_the_command_line(linux_guest, tmp_path):
    """QEMU's microvm without ACPI names its virtio-mmio devices with virtio_mmio.device= on the kernel command
    line, as pyhv's microvm does; the mini kernel has that parser built in. (Debian's kernel does not: its
    virtio_mmio module lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, so it finds virtio-mmio devices only via ACPI.)"""
    disk, first_64k = disk_image(tmp_path / "disk.img")
    extra = ["-global", "virtio-mmio.force-legacy=false",
             "-drive", f"file={disk},if=none,id=d0,format=raw,readonly=on", "-device", "virtio-blk-device,drive=d0"]
    status, console = boot(linux_guest, "dd if=/dev/vda bs=4096 count=16 2>/dev/null | sha256sum",
                           machine="microvm,acpi=off,rtc=on", extra=extra)
    assert "virtio_mmio.device=" in console or "virtio-mmio: Registering device" in console, console
    assert command_output(console).split()[0] == first_64k, console
    assert status == debug_exit_status(0), console


def test_added_files_reach_the_guest(linux_guest, tmp_path):
    from pyhv.assets import build_guest
    from pyhv.assets.progress import Progress

    tool = tmp_path / "hello-tool"
    tool.write_text("#!/bin/sh\necho \"hello from an added file: $1\"\nexit 4\n")
    tool.chmod(0o755)
    guest = build_guest("mini", add=[f"{tool}:/usr/local/bin/hello-tool"], progress=Progress(quiet=True))
    assert guest.bzimage == linux_guest.bzimage and guest.initramfs != linux_guest.initramfs
    status, console = boot(guest, "/usr/local/bin/hello-tool 'a b'")
    assert command_output(console) == "hello from an added file: a b\n", console
    assert status == debug_exit_status(4)
    assert guest.manifest != linux_guest.manifest, "a build with --add must not replace the default manifest"
