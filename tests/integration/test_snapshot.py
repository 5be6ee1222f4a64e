"""Snapshots under KVM: a project guest mid-computation and the small Linux kernel mid-loop saved by `pyhv snapshot
create` and resumed by `pyhv run --restore` in new processes (twice at once from one snapshot), and the refusals."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import pytest

from vm_process import COUNTER, TICK, Pyhv, disk_log, linux_disk_loop, wait_ticks

pytestmark = pytest.mark.kvm
LAST = 20                   # the Linux loop's last line


def snapshot(source: Pyhv, directory) -> dict:
    r = subprocess.run([sys.executable, "-m", "pyhv.cli", "snapshot", "create", str(directory), source.qmp_path,
                        "--json"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def test_a_guest_mid_computation_resumes_where_it_stopped_twice_at_once(guest, tmp_path):
    source = Pyhv(tmp_path, "source", "--firmware", guest("counter"))
    try:
        while "counter: running" not in source.text():
            time.sleep(0.05)
        source.qmp.execute("stop")
        saved = source.counter(tmp_path)
        figures = snapshot(source, tmp_path / "snap")
        assert source.counter(tmp_path) == saved                 # a paused VM stays paused through a snapshot
        source.qmp.execute("cont")
        time.sleep(0.2)
        assert source.counter(tmp_path) > saved                  # and the source runs on
    finally:
        source.kill()
    assert figures["memory_bytes"] >= 128 << 20
    memory = (tmp_path / "snap" / "memory.raw").read_bytes()
    assert int.from_bytes(memory[COUNTER:COUNTER + 4], "little") == saved
    digest = hashlib.sha256(memory).hexdigest()
    first = Pyhv(tmp_path, "first", "--restore", str(tmp_path / "snap"), "--paused")
    second = Pyhv(tmp_path, "second", "--restore", str(tmp_path / "snap"))
    try:
        assert first.qmp.execute("query-status")["status"] == "paused"
        assert first.counter(tmp_path) == saved                  # not one instruction ran: exactly where it was
        time.sleep(0.3)
        assert first.counter(tmp_path) == saved
        first.qmp.execute("cont")
        time.sleep(0.3)
        a, b = first.counter(tmp_path), second.counter(tmp_path)
        assert a > saved and b > saved                           # both run on from the saved count
        first.qmp.execute("stop")
        frozen = first.counter(tmp_path)
        time.sleep(0.2)
        assert first.counter(tmp_path) == frozen and second.counter(tmp_path) > b   # independently
    finally:
        first.kill()
        second.kill()
    assert hashlib.sha256((tmp_path / "snap" / "memory.raw").read_bytes()).hexdigest() == digest  # copy on write


def test_linux_mid_loop_continues_in_a_new_process_and_its_disk_stays_consistent(linux_guest, tmp_path):
    """The loop appends a counter and its uptime to a file on a virtio-blk disk and the serial port; snapshot it
    mid-loop, restore it in a new process: it goes on from the next number, time never goes backwards, and after
    its clean unmount and exit the file holds every line once, in order."""
    disk = tmp_path / "disk.img"
    source = Pyhv(tmp_path, "linux", *linux_disk_loop(linux_guest, disk, LAST))
    try:
        wait_ticks(source, 4)
        source.qmp.execute("stop")                              # what the serial port shows is what is saved
        before = TICK.findall(source.text())
        snapshot(source, tmp_path / "snap")
    finally:
        source.kill()                                           # nothing more reaches the disk from here
    last, last_up = int(before[-1][0]), float(before[-1][1])
    restored = Pyhv(tmp_path, "restored", "--restore", str(tmp_path / "snap"))
    status, err = restored.proc.wait(120), ""
    after = [(int(n), float(up)) for n, up in TICK.findall(restored.text())]
    restored.kill()
    assert status == 1, (err, restored.text()[-2000:])              # pyhv-exit 0: the loop finished
    numbers = [n for n, _ in after]
    assert numbers[0] in (last + 1, last + 2), (before[-3:], after[:3])   # +2 only if the pause split a line
    assert numbers == list(range(numbers[0], LAST + 1))                    # no gap, no repeat
    assert after[0][1] >= last_up                                          # guest time never goes backwards
    assert "Segmentation fault" not in restored.text()
    log = disk_log(disk)
    assert [n for n, _ in log] == list(range(1, LAST + 1)), log             # every line once, in order
    assert all(a[1] <= b[1] for a, b in zip(log, log[1:]))


def test_refusals_leave_the_vm_running_and_are_one_line(guest, tmp_path):
    vm = Pyhv(tmp_path, "rng", "--firmware", guest("counter"), "--device", "virtio-rng")
    try:
        r = subprocess.run([sys.executable, "-m", "pyhv.cli", "snapshot", "create", str(tmp_path / "no"),
                            vm.qmp_path], capture_output=True, timeout=60)
        assert r.returncode != 0 and "virtio-rng" in r.stderr.decode(), r.stderr.decode()   # names the device
        assert vm.qmp.execute("query-status")["status"] == "running"            # refused before any pause
        assert not (tmp_path / "no" / "state.json").exists()
    finally:
        vm.kill()
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    good = Pyhv(tmp_path, "good", "--firmware", guest("counter"), "--drive", f"file={disk},format=raw")
    try:
        snapshot(good, tmp_path / "snap")
    finally:
        good.kill()
    state = tmp_path / "snap" / "state.json"
    original = state.read_text()

    def restore_error() -> str:
        r = subprocess.run([sys.executable, "-m", "pyhv.cli", "run", "--restore", str(tmp_path / "snap")],
                           capture_output=True, timeout=60)
        assert r.returncode == 2, r.stderr.decode()
        lines = r.stderr.decode().strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]
    state.write_text(original.replace('"lcr": 3', '"lcr": 4', 1))
    assert "checksum mismatch" in restore_error()
    state.write_text(original[:len(original) // 2])
    assert "truncated" in restore_error()
    state.write_text(original)
    with open(tmp_path / "snap" / "memory.raw", "ab") as f:
        f.write(b"\0" * 4096)
    assert "bytes, the snapshot says" in restore_error()
    r = subprocess.run([sys.executable, "-m", "pyhv.cli", "run", "--restore", str(tmp_path / "snap"), "--memory",
                        "256M"], capture_output=True, timeout=60)
    assert r.returncode == 2 and "cannot change" in r.stderr.decode()
    with open(tmp_path / "snap" / "memory.raw", "r+b") as f:
        f.truncate(f.seek(0, 2) - 4096)
    copy = tmp_path / "copy.img"                                # another file where the disk was: refused
    copy.write_bytes(disk.read_bytes())
    copy.replace(disk)
    assert "not the image of the snapshot" in restore_error()


def test_a_vhost_user_device_is_refused_naming_the_missing_logging_feature(guest, tmp_path):
    from vhost_helpers import Backend
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    backend = Backend(tmp_path, "--type", "blk", "--image", str(disk))
    try:
        vm = Pyhv(tmp_path, "vhost", "--machine", "pc", "--memory-backend", "memfd", "--firmware", guest("counter"),
                  "--device", f"vhost-user-blk-pci,socket={backend.socket}")
        try:
            with pytest.raises(Exception) as refused:
                vm.qmp.execute("x-pyhv-snapshot-create", path=str(tmp_path / "snap"))
            assert "vhost-user" in str(refused.value) and "LOG_SHMFD" in str(refused.value), refused.value
            with pytest.raises(Exception) as refused:
                vm.qmp.execute("migrate", uri="tcp:127.0.0.1:9")
            assert "LOG_SHMFD" in str(refused.value)
            assert vm.qmp.execute("query-status")["status"] == "running"
        finally:
            vm.kill()
    finally:
        backend.stop()


SEABIOS = "/usr/share/seabios/bios.bin"


def _seabios_log(path, until: str = "No bootable device") -> list[str]:
    """The firmware's log up to `until` (that line cut there: the rest may not have reached the file yet)."""
    lines = [line for line in (path.read_text(errors="replace") if path.exists() else "").splitlines()
             if "unknown scancode" not in line]
    end = next((i for i, line in enumerate(lines) if until in line), None)
    return lines if end is None else lines[:end] + [until]


def _wait_log(vm: Pyhv, path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text(errors="replace") if path.exists() else ""):
        assert vm.proc.poll() is None and time.monotonic() < deadline, vm.proc.communicate()[1][-2000:]
        time.sleep(0.05)


def test_seabios_paused_mid_boot_goes_on_in_a_new_process(tmp_path):
    """Real firmware on the pc machine (PCI config space, PAM shadowing, fw_cfg, PIC/PIT/RTC): its log from before
    the snapshot and from the restored process together are exactly the log of an uninterrupted boot."""
    common = ["--machine", "pc", "--firmware", SEABIOS]
    reference_log = tmp_path / "reference.log"
    reference = Pyhv(tmp_path, "reference", *common, "--debugcon", f"file:{reference_log}")
    try:
        _wait_log(reference, reference_log, "No bootable device")
    finally:
        reference.kill()
    before_log, after_log = tmp_path / "before.log", tmp_path / "after.log"
    source = Pyhv(tmp_path, "source", *common, "--debugcon", f"file:{before_log}")
    try:
        _wait_log(source, before_log, "Found QEMU fw_cfg")
        source.qmp.execute("stop")
        snapshot(source, tmp_path / "snap")
    finally:
        source.kill()
    before = _seabios_log(before_log)
    assert before and not any("No bootable device" in line for line in before)     # it was mid-boot
    restored = Pyhv(tmp_path, "restored", "--restore", str(tmp_path / "snap"), "--debugcon", f"file:{after_log}")
    try:
        _wait_log(restored, after_log, "No bootable device")
    finally:
        restored.kill()
    after = _seabios_log(after_log)
    assert before + after == _seabios_log(reference_log)     # nothing lost, nothing repeated (no reboot)
