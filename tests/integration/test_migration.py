"""Live migration between two pyhv processes, driven through QMP by qemu.qmp as a QEMU user would: the small Linux
kernel moved on loopback TCP while it writes, a destination killed mid-stream, exec: and unix: transports, and the
refusal of a VM whose devices cannot move yet."""
from __future__ import annotations

import asyncio
import sys
import time

import pytest
from qemu.qmp import QMPClient

from vm_process import TICK, Pyhv, disk_log, linux_disk_loop, wait_ticks

pytestmark = pytest.mark.kvm

LAST = 25                  # the Linux loop's last line
PORT = r"waiting for the migration on (?:tcp|unix):(\S+)"


async def _migrate(qmp_path: str, uri: str, parameters: dict | None = None, timeout: float = 120) -> tuple:
    """migrate through qemu.qmp; returns (final query-migrate, MIGRATION statuses seen, query-migrate-parameters)."""
    client = QMPClient("source")
    await client.connect(qmp_path)
    statuses: list[str] = []
    try:
        if parameters:
            await client.execute("migrate-set-parameters", parameters)
        params = await client.execute("query-migrate-parameters")
        with client.listener("MIGRATION") as listener:
            await client.execute("migrate", {"uri": uri})
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    event = await asyncio.wait_for(listener.get(), 1)
                except asyncio.TimeoutError:
                    continue
                if event["event"] == "MIGRATION":
                    statuses.append(event["data"]["status"])
                    if statuses[-1] in ("completed", "failed", "cancelled"):
                        break
        return await client.execute("query-migrate"), statuses, params
    finally:
        await client.disconnect()


def test_linux_moves_between_processes_while_it_writes(linux_guest, tmp_path):
    """The loop appends to a file on a virtio-blk disk (the same image on both sides, as shared storage) and the
    serial port; it moves while it writes, and finishes on the destination with every line once."""
    disk = tmp_path / "disk.img"
    options = linux_disk_loop(linux_guest, disk, LAST)
    source = Pyhv(tmp_path, "source", *options)
    destination = Pyhv(tmp_path, "destination", *options, "--incoming", "tcp:127.0.0.1:0")
    try:
        port = destination.stderr_line(PORT).group(1)
        assert destination.qmp.execute("query-status")["status"] == "inmigrate"
        wait_ticks(source, 4)
        info, statuses, params = asyncio.run(_migrate(source.qmp_path, f"tcp:{port}",
                                                      {"downtime-limit": 300}))
        assert params["downtime-limit"] == 300
        assert info["status"] == "completed", info
        assert statuses == ["setup", "active", "device", "completed"], statuses
        assert source.qmp.execute("query-status")["status"] == "postmigrate"
        ram = info["ram"]
        assert ram["total"] >= 120 << 20 and ram["transferred"] >= ram["total"] and ram["remaining"] == 0
        assert info["downtime"] >= 0 and info["total-time"] >= info["downtime"] and "setup-time" in info
        before = wait_ticks(source, 4)
        time.sleep(1)
        assert wait_ticks(source, 4) == before                   # the source stays paused
        assert destination.proc.wait(120) == 1, destination.text()[-2000:]   # the loop ended there: exit 0
        after = [(int(n), float(up)) for n, up in TICK.findall(destination.text())]
    finally:
        source.kill()
        destination.kill()
    assert [n for n, _ in before] == list(range(1, len(before) + 1)), before
    first = after[0][0]
    assert first in (before[-1][0] + 1, before[-1][0] + 2), (before[-3:], after[:3])   # +2: the pause split a line
    assert [n for n, _ in after] == list(range(first, LAST + 1)), after               # no gap, no repeat
    assert after[0][1] >= before[-1][1]                                               # time never goes back
    assert [n for n, _ in disk_log(disk)] == list(range(1, LAST + 1))                 # the disk, every line once


def test_killing_the_destination_leaves_the_source_running(guest, tmp_path):
    source = Pyhv(tmp_path, "source", "--firmware", guest("counter"))
    destination = Pyhv(tmp_path, "destination", "--firmware", guest("counter"), "--incoming", "tcp:127.0.0.1:0")
    try:
        port = destination.stderr_line(PORT).group(1)
        source.qmp.execute("migrate-set-parameters", max_bandwidth=8 << 20)     # 128 MiB: ~16 s
        source.qmp.execute("migrate", uri=f"tcp:{port}")
        deadline = time.monotonic() + 30
        while source.qmp.execute("query-migrate")["ram"]["transferred"] < 8 << 20:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        destination.kill()
        deadline = time.monotonic() + 30
        while (info := source.qmp.execute("query-migrate"))["status"] not in ("failed", "completed"):
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        assert info["status"] == "failed" and info.get("error-desc"), info
        assert source.qmp.execute("query-status")["status"] == "running"
        first = source.counter(tmp_path)
        time.sleep(0.2)
        assert source.counter(tmp_path) > first                  # still computing
    finally:
        source.kill()
        destination.kill()


RELAY = ("import socket,sys,threading; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
         "threading.Thread(target=lambda: [sys.stdout.buffer.write(d) or sys.stdout.flush() "
         "for d in iter(lambda: s.recv(65536), b'')], daemon=True).start(); "
         "[s.sendall(d) for d in iter(lambda: sys.stdin.buffer.read1(65536), b'')]; "
         "s.shutdown(socket.SHUT_WR); import time; time.sleep(2)")


def test_exec_and_unix_transports_incoming_defer_and_a_counter_that_goes_on(guest, tmp_path):
    sock = tmp_path / "incoming.sock"
    source = Pyhv(tmp_path, "source", "--firmware", guest("counter"))
    destination = Pyhv(tmp_path, "destination", "--firmware", guest("counter"), "--incoming", "defer")
    try:
        destination.stderr_line("waiting for QMP migrate-incoming")
        assert destination.qmp.execute("query-status")["status"] == "prelaunch"
        destination.qmp.execute("migrate-incoming", uri=f"unix:{sock}")
        destination.stderr_line(PORT)
        command = f"{sys.executable} -c \"{RELAY}\" {sock}"
        info, statuses, _ = asyncio.run(_migrate(source.qmp_path, f"exec:{command}"))
        assert info["status"] == "completed", info
        saved = source.counter(tmp_path)                          # where the source stopped
        time.sleep(0.2)
        assert source.counter(tmp_path) == saved
        assert destination.counter(tmp_path) > saved              # the destination counts on from there
    finally:
        source.kill()
        destination.kill()


def test_a_vm_whose_devices_cannot_move_is_refused_and_runs_on(guest, tmp_path):
    source = Pyhv(tmp_path, "source", "--firmware", guest("counter"), "--device", "virtio-rng")
    try:
        with pytest.raises(Exception) as refused:
            source.qmp.execute("migrate", uri="tcp:127.0.0.1:9")
        assert "virtio-rng" in str(refused.value)
        assert source.qmp.execute("query-status")["status"] == "running"
        first = source.counter(tmp_path)
        time.sleep(0.2)
        assert source.counter(tmp_path) > first
    finally:
        source.kill()
