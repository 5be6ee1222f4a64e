"""The core VMM under KVM with the project's test guests: serial, dispatch, interrupts, modes, lifecycle."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.kvm


def test_serial_output_and_debug_exit_status(pyhv_run, guest):
    r = pyhv_run("run", "--firmware", guest("hello"))
    assert "pyhv test guest: hello from real mode" in r.stdout
    assert r.status == (0x10 << 1) | 1, r.stderr


def test_port_and_mmio_dispatch_reach_the_right_device(pyhv_run, guest, tmp_path):
    stats = tmp_path / "stats.json"
    r = pyhv_run("run", "--firmware", guest("dispatch"), "--device", "testdev", "--stats-json", str(stats))
    assert r.status == (0x2A << 1) | 1, f"check {r.status >> 1} failed\n{r.stdout}{r.stderr}"
    data = json.loads(stats.read_text())
    assert data["by_port"]["0x00e0"]["device"] == "testdev.port.port_scratch"
    assert data["by_port"]["0x00e1"]["device"] == "testdev.port.port_scratch"
    assert data["by_port"]["0x5555"]["device"] == "unassigned"
    assert data["by_port"]["0x0071"]["device"] == "rtc.data"
    assert data["by_mmio"]["testdev"]["count"] == 5          # magic, scratch write + read, counter, 16-bit read
    assert data["by_mmio"]["unassigned"]["count"] == 2       # VGA window write + read
    assert data["unassigned"] == {"port_reads": 1, "port_writes": 0, "mmio_reads": 1, "mmio_writes": 1}
    assert data["rom_writes_dropped"] == 2                   # both ROM windows ignored the guest's write
    assert data["by_reason"]["MMIO"]["count"] >= 9


def test_timer_interrupts_are_delivered(pyhv_run, guest):
    r = pyhv_run("run", "--firmware", guest("timer"))
    assert "timer: 10 interrupts taken" in r.stdout
    assert r.status == (10 << 1) | 1


def test_long_mode_guest(pyhv_run, guest):
    r = pyhv_run("run", "--firmware", guest("longmode"), "--device", "testdev")
    assert "longmode: running in 64-bit mode" in r.stdout
    assert r.status == (0x33 << 1) | 1, r.stderr


def test_serial_input_through_receive_interrupts(guest):
    proc = subprocess.Popen([sys.executable, "-m", "pyhv.cli", "run", "--firmware", guest("echo")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"echo: ready"
    out, err = proc.communicate(b"pyhv rocks q", timeout=60)
    assert b"PYHV ROCKS " in out
    assert proc.returncode == (11 << 1) | 1, err


def test_triple_fault_ends_with_a_register_dump(pyhv_run, guest):
    r = pyhv_run("run", "--firmware", guest("triplefault"))
    assert r.status == 3
    assert "triple fault (KVM_EXIT_SHUTDOWN)" in r.stderr
    assert "IDT=     00000000 00000000" in r.stderr
    code = [line for line in r.stderr.splitlines() if line.startswith("Code=")]
    assert code and "<0f> 0b" in code[0]                      # ud2 at RIP, as QEMU marks it


def test_i8042_reset_ends_the_vm_by_default(pyhv_run, guest):
    r = pyhv_run("run", "--firmware", guest("reboot"))
    assert r.stdout.count("reboot: boot") == 1
    assert r.status == 0


def test_on_reset_restart_reboots_the_machine(pyhv_run, guest):
    r = pyhv_run("run", "--firmware", guest("reboot"), "--on-reset", "restart")
    assert r.stdout.count("reboot: boot") == 3             # RAM survives; the guest counts its boots
    assert r.status == (3 << 1) | 1, r.stderr


def test_serial_to_file(pyhv_run, guest, tmp_path):
    log = tmp_path / "serial.log"
    r = pyhv_run("run", "--firmware", guest("hello"), "--serial", f"file:{log}")
    assert r.status == 0x21 and r.stdout == ""
    assert "hello from real mode" in log.read_text()


def test_serial_to_unix_socket_and_sigterm(guest, tmp_path):
    path = tmp_path / "serial.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pyhv.cli", "run", "--firmware", guest("counter"),
                             "--serial", f"socket:{path}"], stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if path.exists():
                break
            time.sleep(0.05)
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        client.settimeout(30)
        data = b""
        while b"counter: running" not in data:
            chunk = client.recv(100)
            assert chunk, "socket closed early"
            data += chunk
        client.close()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err


def test_pause_and_resume_stop_and_restart_the_guest(guest):
    from pyhv.runtime.chardev import ChardevSpec
    from pyhv.config import VmConfig
    from pyhv.machine.machine import Machine

    machine = Machine(VmConfig(firmware=guest("counter"), serial=ChardevSpec("none")))
    try:
        machine.start()
        count = lambda: machine.guest_memory.read_int(0x500, 4)  # noqa: E731
        deadline = time.monotonic() + 30
        while count() < 1000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert count() >= 1000, "the guest never started counting"
        machine.pause()
        assert machine.state == "paused"
        frozen = count()
        time.sleep(0.5)
        assert count() == frozen
        machine.resume()
        deadline = time.monotonic() + 30
        while count() <= frozen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert count() > frozen
    finally:
        machine.shutdown(0)
        machine.wait()
        machine.close()


def test_seabios_prints_its_banner_on_the_debug_console(guest, tmp_path):
    bios = "/usr/share/seabios/bios.bin"
    if not os.path.exists(bios):
        pytest.fail("Debian's seabios package is not installed (scripts/install-deps installs it)")
    log = tmp_path / "debugcon.log"
    proc = subprocess.Popen([sys.executable, "-m", "pyhv.cli", "run", "--firmware", bios, "--serial", "none",
                             "--debugcon", f"file:{log}"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "SeaBIOS (version" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert "SeaBIOS (version" in log.read_text()


def test_dump_mtree(pyhv_run, guest):
    r = pyhv_run("run", "--firmware", guest("hello"), "--device", "testdev", "--dump-mtree")
    assert r.status == 0
    lines = r.stdout.splitlines()
    assert "address-space: memory" in lines and "address-space: I/O" in lines
    assert any(l.strip() == "00000000ffff0000-00000000ffffffff (prio 0, rom): bios" for l in lines)
    assert any("alias isa-bios @bios" in l for l in lines)
    assert any(l.strip().startswith("00000000000003f8-00000000000003ff (prio 0, i/o): serial0") for l in lines)
    assert any(l.strip().startswith("00000000fe800000-00000000fe800fff (prio 0, i/o): testdev") for l in lines)


def test_info_reports_the_kvm_flavour(pyhv_run):
    from pyhv.kvm import detect_flavour

    r = pyhv_run("info", "--json")
    data = json.loads(r.stdout)
    assert data["kvm_flavour"] == detect_flavour().value
    assert data["api_version"] == 12
    assert data["capabilities"]["irqchip"] == 1


def test_stats_report_names_the_kvm_flavour(pyhv_run, guest):
    from pyhv.kvm import detect_flavour

    r = pyhv_run("run", "--firmware", guest("hello"), "--stats")
    assert f"KVM: {detect_flavour().description}" in r.stderr
    assert "0x03f8 serial0.rbr_thr" in r.stderr


def test_missing_kvm_device_is_one_clear_line(pyhv_run, guest):
    r = pyhv_run("run", "--firmware", guest("hello"), env={"PYHV_KVM_DEVICE": "/nonexistent/kvm"})
    assert r.status == 2
    assert r.stderr.strip().splitlines() == ["pyhv: error: /nonexistent/kvm does not exist "
                                             "(load the kvm module (modprobe kvm_intel / kvm_amd) or run on a "
                                             "host with KVM)"]
