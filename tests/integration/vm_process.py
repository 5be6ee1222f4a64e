"""A `pyhv run` process with its QMP socket and serial file in a test's tmp_path (snapshot and migration tests)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from pyhv.assets.protocol import encode_command
from pyhv.monitor.client import QmpClient

COUNTER = 0x500            # the counter test guest increments this 32-bit word forever
TICK = re.compile(r"^tick (\d+) ([\d.]+)\r?$", re.M)
TICK_LOOP = "i=0; while :; do i=$((i+1)); read up idle < /proc/uptime; echo tick $i $up; sleep 0.2; done"
# the same, appending each line to a file on a virtio-blk disk too, until LAST; then a clean unmount and exit 0
DISK_LOOP = ("mkdir -p /mnt; mount -t ext4 /dev/vda /mnt || pyhv-exit 3; i=0; while [ $i -lt {last} ]; do "
             "i=$((i+1)); read up idle < /proc/uptime; echo \"$i $up\" >> /mnt/log; echo tick $i $up; sleep 0.2; "
             "done; umount /mnt; pyhv-exit 0")


class Pyhv:
    def __init__(self, tmp_path, tag: str, *args: str) -> None:
        self.qmp_path = str(tmp_path / f"{tag}.qmp")
        self.serial = tmp_path / f"{tag}.serial"
        self.proc = subprocess.Popen([sys.executable, "-m", "pyhv.cli", "run", "--qmp", f"unix:{self.qmp_path}",
                                      "--serial", f"file:{self.serial}", *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.qmp_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(self.proc.communicate()[1].decode())
            time.sleep(0.05)
        self.qmp = QmpClient(self.qmp_path)

    def stderr_line(self, pattern: str, timeout: float = 30) -> re.Match:
        """Read stderr until a line matches (e.g. the port a listener chose)."""
        deadline = time.monotonic() + timeout
        seen = b""
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            seen += line
            match = re.search(pattern, line.decode(errors="replace"))
            if match:
                return match
            if not line:
                break
        raise AssertionError(f"no {pattern!r} on stderr:\n{seen.decode(errors='replace')}")

    def counter(self, tmp_path) -> int:
        out = tmp_path / f"counter-{time.monotonic_ns()}.bin"
        self.qmp.execute("pmemsave", val=COUNTER, size=4, filename=str(out))
        return int.from_bytes(out.read_bytes(), "little")

    def text(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def stop(self) -> tuple[int, str]:
        try:
            self.qmp.execute("quit")
        except (ConnectionError, OSError):
            pass
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err.decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()




def linux_tick_loop(linux_guest) -> list[str]:
    """`pyhv run` options for the small Linux kernel running TICK_LOOP on its serial console."""
    return ["--kernel", str(linux_guest.bzimage), "--initrd", str(linux_guest.initramfs_uncompressed),
            "--memory", "128M", "--append", f"console=ttyS0 reboot=k panic=-1 {encode_command(TICK_LOOP)}"]


def linux_disk_loop(linux_guest, disk, last: int) -> list[str]:
    """The small Linux kernel running DISK_LOOP on an ext4 image made here (mkfs.ext4 from e2fsprogs)."""
    subprocess.run(["truncate", "-s", "64M", str(disk)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(disk)], check=True)
    return ["--kernel", str(linux_guest.bzimage), "--initrd", str(linux_guest.initramfs_uncompressed),
            "--memory", "128M", "--drive", f"file={disk},format=raw",
            "--append", f"console=ttyS0 reboot=k panic=-1 {encode_command(DISK_LOOP.format(last=last))}"]


def disk_log(disk) -> list[tuple[int, float]]:
    """The lines the guest's loop appended to /log on the image (debugfs from e2fsprogs reads it, not mounting)."""
    out = subprocess.run(["debugfs", "-R", "cat /log", str(disk)], capture_output=True, text=True, check=True).stdout
    return [(int(n), float(up)) for n, up in (line.split() for line in out.splitlines() if line.strip())]


def wait_ticks(vm: Pyhv, count: int, timeout: float = 300) -> list[tuple[int, float]]:
    deadline = time.monotonic() + timeout
    while len(TICK.findall(vm.text())) < count:
        assert vm.proc.poll() is None and time.monotonic() < deadline, vm.text()[-2000:]
        time.sleep(0.2)
    return [(int(n), float(up)) for n, up in TICK.findall(vm.text())]
