"""Direct Linux boot under KVM with the project's Debian guests (pyhv guest build).

On PVM hosts every guest kernel instruction is emulated, so each boot costs tens of seconds: each test packs
its checks into one boot. The guest's /init runs the command given with pyhv.cmd and ends the VM through the
debug-exit port with the command's status (pyhv.assets.protocol)."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from linux_guest import BOOT_TIMEOUT, boot
from pyhv.assets.protocol import command_output, debug_exit_status, parse_exit_status

pytestmark = [pytest.mark.kvm, pytest.mark.slow]


def fields(output: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line and line[0].isalpha())


def test_small_kernel_pvh_entry_runs_commands(linux_guest):
    status, out, err = boot(linux_guest, command="echo release=$(uname -r); echo cpus=$(nproc); "
                            "while read -r k v _; do [ $k = MemTotal: ] && echo memtotal=$v; done < /proc/meminfo; "
                            "echo guest_time=$(date +%s); exit 7", kernel=str(linux_guest.vmlinux))
    host_time = time.time()
    assert "PYHV-INIT uptime=" in out, err[-3000:]
    assert parse_exit_status(out) == 7
    assert status == debug_exit_status(7), err[-3000:]
    got = fields(command_output(out) or "")
    assert got["release"] == linux_guest.kernel_release
    assert got["cpus"] == "1"
    assert 100 * 1024 < int(got["memtotal"]) <= 128 * 1024          # KiB: 128M minus what the kernel keeps
    assert abs(int(got["guest_time"]) - host_time) < 30             # the RTC gave the guest the host's time


def test_small_kernel_bzimage_64bit_entry(linux_guest):
    status, out, err = boot(linux_guest, command="uname -r", kernel=str(linux_guest.bzimage))
    assert command_output(out).strip() == linux_guest.kernel_release, out[-2000:] + err[-2000:]
    assert status == debug_exit_status(0)
    # pyhv's setup_data RNG seed was credited: the kernel's RNG was ready before /init (without it, it is not:
    # RDRAND is hidden on PVM and the boot is too short for interrupt entropy)
    assert "crng init done" in out[:out.index("Run /init")], out[-3000:]


def test_memory_above_the_32bit_hole(linux_guest):
    # 3 GiB below the PCI hole and 64 MiB above 4 GiB
    status, out, err = boot(linux_guest, memory="3136M",
                            command="grep MemTotal /proc/meminfo; grep 'System RAM' /proc/iomem")
    assert status == debug_exit_status(0), out[-2000:] + err[-2000:]
    text = command_output(out)
    assert re.search(r"100000000-103ffffff : System RAM", text), text
    assert re.search(r"00100000-bfffffff : System RAM", text), text
    memtotal = int(re.search(r"MemTotal:\s+(\d+) kB", text).group(1))
    assert 3000 * 1024 < memtotal <= 3136 * 1024


def test_two_cpus(linux_guest):
    status, out, err = boot(linux_guest, "--cpus", "2", command="nproc; cat /sys/devices/system/cpu/online")
    text = command_output(out) or ""
    assert text.split() == ["2", "0-1"], out[-3000:] + err[-2000:]
    assert status == debug_exit_status(0)


def test_stock_debian_kernel_milestones(stock_guest):
    """The unmodified Debian kernel: version banner, our e820 map entry by entry, our command line, our ACPI tables
    (the MADT for the CPUs), and past the int3 self-test (which pyhv completes when KVM's emulator fails on it, as
    on PVM hosts), in bounded time. On hardware KVM it boots to /init and runs a command."""
    import selectors

    from pyhv.kvm import detect_flavour

    pvm = detect_flavour().is_pvm
    cmd = [sys.executable, "-m", "pyhv.cli", "run", "--kernel", str(stock_guest.bzimage),
           "--initrd", str(stock_guest.initramfs_uncompressed), "--memory", "128M", "--log-level", "info",
           "--append", "console=ttyS0 earlyprintk=serial reboot=k panic=-1 pyhv.cmd=true", "--stats"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    out = err = b""
    int3_done = None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    try:
        while time.monotonic() - start < (120 if pvm else BOOT_TIMEOUT) and proc.poll() is None:
            for key, _ in sel.select(timeout=1):
                chunk = key.fileobj.read1(65536)
                if key.data == "out":
                    out += chunk
                else:
                    err += chunk
            if int3_done is None and re.search(rb"emulator failed on int3: completed by pyhv", err):
                int3_done = time.monotonic() - start
                if pvm:
                    break              # the milestones a PVM host reaches in bounded time
    finally:
        proc.terminate()
        rest_out, rest_err = proc.communicate(timeout=30)
        out, err = out + rest_out, err + rest_err
    text, errors = out.decode(errors="replace"), err.decode(errors="replace")
    assert "Linux version " + stock_guest.kernel_release in text, text[-2000:] + errors[-2000:]
    e820 = re.findall(r"BIOS-e820: \[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\] (\w+)", text)
    assert e820 == [("0x0000000000000000", "0x000000000009efff", "usable"),
                    ("0x000000000009f000", "0x00000000000fffff", "reserved"),
                    ("0x0000000000100000", "0x0000000007ffffff", "usable")]
    assert re.search(r"Command line: console=ttyS0 earlyprintk=serial reboot=k panic=-1 pyhv.cmd=true", text)
    for table in ("RSDP", "XSDT", "FACP", "APIC", "DSDT"):     # pyhv's ACPI tables, found through boot_params
        assert re.search(rf"ACPI: {table} 0x00000000000E.*PYHV", text), text[-2000:]
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in text
    if pvm:
        assert int3_done is not None, "the int3 self-test was not reached: " + text[-1500:]
        print(f"stock kernel on PVM: int3 self-test completed by pyhv after {int3_done:.1f} s")
        assert re.search(r"instructions completed by pyhv .*int3 1", errors), errors[-2000:]
    else:
        assert parse_exit_status(text) == 0, text[-2000:]
