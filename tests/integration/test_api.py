"""The Python API (`pyhv.VM`) booting the project's test guests: console, pause/resume, stats, QMP, exit status,
and that leaving the `with` block frees everything."""
from __future__ import annotations

import os
import threading

import pytest

import pyhv
from pyhv.api import Result
from pyhv.runtime.chardev import ChardevSpec
from pyhv.errors import GuestImageError

pytestmark = pytest.mark.kvm


def open_fds() -> set[tuple[str, str]]:
    """(fd, what it is) of this process's open files, leaving out the listing's own directory handle."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if not target.startswith("/proc/"):
            out.add((fd, target))
    return out


def test_boot_console_pause_resume_stats_and_exit_status(guest):
    with pyhv.VM(firmware=guest("echoloop", BUSY=0), memory="16M") as vm:
        vm.console.expect(r"echo guest ready\r\n")
        vm.console.write("hello")
        vm.console.expect("hello")
        vm.pause()
        assert vm.state == "paused" and vm.qmp("query-status")["status"] == "paused"
        vm.console.write("typed while paused")
        vm.resume()
        assert vm.qmp("query-status")["status"] == "running"
        vm.console.expect("typed while paused")
        stats = vm.stats()
        assert stats["exits"] > 0 and stats["by_port"]["0x03f8"]["count"] > 0
        assert vm.qmp("human-monitor-command", command_line="info registers").startswith("CPU#0")
        assert vm.wait(0) is None                          # still running
        vm.console.write("Q")                              # the guest exits through the debug-exit port
        assert vm.wait(60) == (5 << 1) | 1
        assert "hello" in vm.console.output


def test_leaving_the_block_stops_the_vm_and_frees_everything(guest):
    baseline_threads = set(threading.enumerate())
    baseline_fds = open_fds()
    with pyhv.VM(firmware=guest("echoloop", BUSY=1), memory="16M") as vm:   # a busy guest, left running
        vm.console.expect("ready")
        folder = os.path.dirname(vm.qmp_path)
        vm.qmp("query-status")
        machine = vm.machine
    assert machine.state == "shutdown"
    assert not os.path.exists(folder)
    assert set(threading.enumerate()) <= baseline_threads
    assert open_fds() <= baseline_fds


def test_a_bad_config_raises_and_leaves_nothing(tmp_path):
    baseline_fds = open_fds()
    with pytest.raises(GuestImageError, match="does not exist"):
        with pyhv.VM(firmware=str(tmp_path / "missing.bin")):
            pass
    assert open_fds() <= baseline_fds


def test_run_needs_the_agent(guest):
    with pyhv.VM(firmware=guest("echoloop", BUSY=0), memory="16M") as vm:
        with pytest.raises(RuntimeError, match="agent"):
            vm.run("true")


def test_quit_before_the_machine_starts_ends_it_cleanly(guest):
    """A QMP client may send quit between the QMP socket appearing and the vCPUs starting."""
    from pyhv.config import VmConfig
    from pyhv.machine.machine import Machine
    machine = Machine(VmConfig(firmware=guest("echoloop", BUSY=0), memory=16 << 20, serial=ChardevSpec("none")))
    try:
        machine.shutdown(0, "host-qmp-quit")
        assert machine.run() == 0
        assert machine.vcpus[0].thread is None                   # the guest never ran
    finally:
        machine.close()


@pytest.mark.slow
def test_run_commands_in_the_projects_linux_guest(request):
    """vm.run() through the console agent of the project's guest (pyhv.assets: small kernel + busybox
    initramfs whose /init speaks the agent protocol), booted directly by pyhv. Minutes on PVM hosts."""
    pytest.importorskip("pyhv.assets", reason="this tree has no guest assets (pyhv.assets) yet")
    assets = request.getfixturevalue("linux_guest")
    with pyhv.VM(kernel=str(assets.bzimage), initrd=str(assets.initramfs_uncompressed), agent=True) as vm:
        result = vm.run("echo hello from the guest", timeout=900)   # the first command waits for the boot
        assert result == Result("hello from the guest\n", 0)
        assert vm.run("uname -r").stdout.strip() == assets.kernel_release
        assert vm.run("sh -c 'exit 7'").exit_status == 7
        vm.pause()
        assert vm.qmp("query-status")["status"] == "paused"
        vm.resume()
        assert vm.run("true").exit_status == 0
