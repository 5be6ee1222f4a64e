"""iPXE, Debian's `ipxe-qemu` e1000 option ROM, network-boots `--machine pc` under SeaBIOS: SeaBIOS finds the ROM
behind pyhv's e1000 expansion ROM BAR and runs it, iPXE drives the card with its own `intel` driver, gets a DHCP
lease from a dnsmasq in the test's network namespace, TFTP-loads tests/guests/pxeboot.S and runs it; the program
prints the token this test wrote into it and ends pyhv through the debug-exit port.

iPXE waits for its timers with interrupts on in protected mode, which PVM cannot deliver (a triple fault instead):
pyhv delivers them and completes the handlers' `iret` itself (pyhv/arch/x86/pm_interrupt.py), and counts both
in the stats."""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "guests"))
import disks  # noqa: E402

pytestmark = pytest.mark.kvm
BIOS = "/usr/share/seabios/bios.bin"
IPXE_ROM = "/usr/lib/ipxe/qemu/efi-e1000.rom"
ROOT = Path(__file__).resolve().parent.parent.parent
OK = (0x10 << 1) | 1
BOOT_TIMEOUT = 400          # SeaBIOS, iPXE's init, DHCP and TFTP under PVM emulation: ~60 s here


@pytest.fixture(autouse=True)
def _need_packages():
    missing = [p for p in (BIOS, IPXE_ROM) if not os.path.exists(p)] + \
        ([] if shutil.which("dnsmasq") else ["dnsmasq"])
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (scripts/install-deps)")


def test_ipxe_dhcp_and_tftp_boot_through_e1000(tmp_path, netns):
    tap = f"px{random.randrange(1 << 24):x}"
    token = secrets.token_hex(8)
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    (tftp / "pxeboot.0").write_bytes(disks.pxe_program(token.encode()))
    for cmd in (["tuntap", "add", "dev", tap, "mode", "tap"], ["addr", "add", "10.214.0.1/24", "dev", tap],
                ["link", "set", tap, "up"]):
        subprocess.run(["ip", "-n", netns, *cmd], check=True)
    dnsmasq_log = tmp_path / "dnsmasq.log"
    dnsmasq = subprocess.Popen(
        ["ip", "netns", "exec", netns, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
         "--user=root", f"--interface={tap}", "--bind-interfaces", "--dhcp-range=10.214.0.10,10.214.0.20,1h",
         f"--dhcp-leasefile={tmp_path / 'leases'}", f"--pid-file={tmp_path / 'dnsmasq.pid'}",
         "--dhcp-boot=pxeboot.0", "--enable-tftp", f"--tftp-root={tftp}", "--log-dhcp",
         f"--log-facility={dnsmasq_log}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stats = tmp_path / "stats.json"
    try:
        proc = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "pyhv.cli", "run", "-M", "pc", "--firmware", BIOS,
             "--serial", "stdio", "--stats-json", str(stats), "--device",
             f"e1000,ifname={tap},mac=52:54:00:12:34:77,romfile={IPXE_ROM}"],
            capture_output=True, timeout=BOOT_TIMEOUT, cwd=ROOT, input=b"")
    finally:
        dnsmasq.terminate()
        dnsmasq.wait(timeout=10)
    console = proc.stdout.decode(errors="replace")
    log = dnsmasq_log.read_text(errors="replace") if dnsmasq_log.exists() else dnsmasq.stderr.read().decode()
    detail = f"console:\n{console[-3000:]}\nstderr:\n{proc.stderr.decode(errors='replace')[-2000:]}\ndnsmasq:\n{log[-2000:]}"
    assert proc.returncode == OK, detail
    assert "iPXE" in console and "82540em" in console, detail       # iPXE's own driver took the card
    assert f"pxeboot: token {token}" in console, detail
    assert "DHCPACK" in log and "52:54:00:12:34:77" in log, detail
    assert "pxeboot.0" in log and "sent" in log, detail                # dnsmasq's TFTP served it
    counts = json.loads(stats.read_text())
    fallbacks = counts["fallbacks"]
    if "pvm" in counts["kvm_flavour"].lower():         # on hardware KVM the CPU delivers them itself
        assert fallbacks.get("pm-interrupt", 0) > 0 and fallbacks.get("iret", 0) > 0, counts
