"""A hostile guest (tests/guests/hostile.c) writes random and boundary values, with every access size, to every
port and MMIO range pyhv's devices claim on each machine type (read from `--dump-mtree` of the same VM; on pc it
also places every PCI BAR and walks what it maps, and writes every function's device-specific config space).
Afterwards the VMM still answers QMP and the guest's serial port still prints.

Only the bits that would reset or power off the VM are kept out of the writes (the guest's own request, not the
VMM failing): port 0x92 bit 0, the i8042 reset commands, ACPI sleep enable and the GED reset value; the
debug-exit port is only read."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

import build as guest_build  # tests/guests/build.py
from vm_process import Pyhv

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

LEAF = re.compile(r"^\s+([0-9a-f]{16})-([0-9a-f]{16}) \(prio -?\d+, i/o\): (\S+)(.*)$")
# what a write may set in each named range, byte lane by byte lane (a mask repeated); "read" for reads only
POLICY = {"debug-exit": "read", "pci-conf-addr": "read", "pci-conf-data": "read",   # pci=1 walks config space
          "port92": "fe" * 8, "i8042-cmd": "7f" * 8, "i8042-data": "7f" * 8,       # a multi-byte access spills
          "piix4-pm-pmio": "df" * 8, "ged": "9d" * 8}                               # SLP_EN; 0x42 reset


def ranges(args: list[str]) -> str:
    out = subprocess.run([sys.executable, "-m", "pyhv.cli", "run", *args, "--dump-mtree"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    found, space = [], None
    for line in out.splitlines():
        if line.startswith("address-space:"):
            space = "P" if "I/O" in line else "M"
            continue
        m = LEAF.match(line)
        if m is None or "[disabled]" in m.group(4) or m.group(3).startswith("pam-"):
            continue
        start, end, name = int(m.group(1), 16), int(m.group(2), 16), m.group(3)
        if space == "M" and start < 0x100000:
            continue                        # the legacy VGA/ROM hole: not a device
        rule = POLICY.get(name, "")
        suffix = "!" if rule == "read" else f"/{rule}" if rule else ""
        found.append(f"{space}{start:x}+{end - start + 1:x}{suffix}")
    assert found, out
    return ",".join(found)


@pytest.mark.parametrize("machine", ["microvm", "pc"])
def test_a_guest_attacking_every_device_leaves_the_vmm_serving(machine, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    kernel = str(guest_build.build_elf("hostile"))
    devices = ["--machine", machine, "--memory", "128M", "--kernel", kernel, "--drive", f"file={disk}",
               "--device", "virtio-rng", "--device", "testdev", "--device", "virtio-console,chardev=none"]
    walk = ranges(devices)
    seed = time.time_ns() & 0xFFFFFFFF
    print(f"hostile guest seed={seed:x} (a failure replays with it)")
    append = f"ranges={walk} seed={seed:x}" + (" pci=1" if machine == "pc" else "")
    vm = Pyhv(tmp_path, machine, *devices, "--append", append)
    try:
        deadline = time.monotonic() + 600
        while "HOSTILE done" not in vm.text():
            assert vm.proc.poll() is None, (vm.proc.communicate()[1].decode()[-3000:], vm.text()[-2000:])
            assert time.monotonic() < deadline, vm.text()[-2000:]
            time.sleep(0.2)
        accesses = int(re.search(r"HOSTILE done accesses=(\d+)", vm.text()).group(1))
        assert accesses > 1000
        status = vm.qmp.execute("query-status")
        assert status["status"] == "running", status
        assert vm.qmp.execute("query-version")["qemu"]
        alive = len(re.findall(r"HOSTILE alive \d+", vm.text()))
        deadline = time.monotonic() + 120
        while len(re.findall(r"HOSTILE alive \d+", vm.text())) < alive + 2:      # and the serial port prints on
            assert vm.proc.poll() is None and time.monotonic() < deadline, vm.text()[-2000:]
            time.sleep(0.2)
    finally:
        code, err = vm.stop()
    assert "Traceback" not in err, err[-3000:]
