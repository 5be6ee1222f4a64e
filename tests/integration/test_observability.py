"""Seeing inside a running VM: QMP `query-stats` (QEMU's shape, through qemu.qmp), `x-pyhv-exits`, and `pyhv top`
(once as JSON, and live in a pseudo-terminal), against a project guest that exits all the time."""
from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
from qemu.qmp import ExecuteError, QMPClient

pytestmark = pytest.mark.kvm

LOOP_EXITS = 400_000            # port writes to 0x80 (the POST-code device): a few seconds under PVM


def _start(guest, tmp_path, *extra: str) -> tuple[subprocess.Popen, str, str]:
    qmp = str(tmp_path / "qmp.sock")
    stats = str(tmp_path / "stats.json")
    image = guest("exitloop", MODE=1, COUNT=LOOP_EXITS)
    proc = subprocess.Popen([sys.executable, "-m", "pyhv.cli", "run", "--firmware", image, "--qmp", f"unix:{qmp}",
                             "--stats-json", stats, *extra], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not os.path.exists(qmp):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc, qmp, stats


def test_query_stats_has_qemus_shape(guest, tmp_path):
    proc, qmp, _ = _start(guest, tmp_path)

    async def session() -> tuple:
        client = QMPClient("test")
        await client.connect(qmp)
        try:
            vcpu = await client.execute("query-stats", {"target": "vcpu"})
            vm = await client.execute("query-stats", {"target": "vm"})
            some = await client.execute("query-stats", {"target": "vcpu", "providers": [
                {"provider": "kvm", "names": ["exits", "io_exits"]}]})
            schemas = await client.execute("query-stats-schemas")
            exits = await client.execute("x-pyhv-exits")
            with pytest.raises(ExecuteError) as bad:
                await client.execute("query-stats", {"target": "gpu"})
            return vcpu, vm, some, schemas, exits, bad.value
        finally:
            await client.disconnect()
    try:
        vcpu, vm, some, schemas, exits, bad = asyncio.run(session())
    finally:
        proc.kill()
        proc.communicate()
    assert len(vcpu) == 1 and vcpu[0]["provider"] == "kvm"
    assert vcpu[0]["qom-path"] == "/machine/unattached/device[0]"
    values = {s["name"]: s["value"] for s in vcpu[0]["stats"]}
    assert values["exits"] > 0                                    # KVM's own counter (PVM leaves io_exits 0)
    assert isinstance(values["blocking"], bool)                   # a boolean statistic is a JSON boolean
    assert "qom-path" not in vm[0] and {s["name"] for s in vm[0]["stats"]} >= {"remote_tlb_flush"}
    assert [s["name"] for s in some[0]["stats"]] == ["exits", "io_exits"]
    targets = {s["target"]: s for s in schemas}
    assert set(targets) == {"vm", "vcpu"}
    kinds = {s["type"] for t in schemas for s in t["stats"]}
    assert kinds <= {"cumulative", "instant", "peak", "linear-histogram", "log2-histogram"}
    assert {s["name"] for s in targets["vcpu"]["stats"]} == set(values)
    assert bad.error_class == "GenericError" and "target" in bad.error.error.desc
    assert exits["total"]["by_device"]["post"]["count"] > 0
    assert exits["vcpus"][0]["state"] == "running"


def test_top_once_json_matches_the_end_of_run_statistics(guest, tmp_path):
    proc, qmp, stats = _start(guest, tmp_path)
    top = subprocess.run([sys.executable, "-m", "pyhv.cli", "top", qmp, "--once", "--json", "--interval", "1"],
                         capture_output=True, timeout=60)
    out, err = proc.communicate(timeout=120)
    assert top.returncode == 0, top.stderr.decode()
    view = json.loads(top.stdout)
    final = json.loads(open(stats).read())
    assert proc.returncode == 1, err.decode()                     # the loop ended: debug-exit with 0
    # the window saw the loop: its exits are port writes to the POST-code device, at the rate it reports
    post = view["by_device"]["post"]
    assert post["count"] > 1000 and abs(post["per_s"] * view["interval_s"] - post["count"]) < 1
    assert view["by_reason"]["IO"]["count"] >= post["count"]
    assert view["vcpus"][0]["exits_per_s"] > 1000
    # and agrees with what pyhv printed at the end: nothing counted in the window that the run did not count
    final_devices = {}
    for cell in final["by_port"].values():
        device = cell["device"].split(".")[0]
        final_devices[device] = final_devices.get(device, 0) + cell["count"]
    assert final_devices["post"] == LOOP_EXITS
    for device, total in view["totals"]["by_device"].items():
        assert total <= final_devices.get(device, 0), (device, total, final_devices)
    for reason, total in view["totals"]["by_reason"].items():
        assert total <= final["by_reason"][reason]["count"]
    assert view["totals"]["by_device"]["post"] - post["count"] >= 0


def test_top_live_view_in_a_terminal(guest, tmp_path):
    proc, qmp, _ = _start(guest, tmp_path)
    master, slave = pty.openpty()
    top = subprocess.Popen([sys.executable, "-m", "pyhv.cli", "top", qmp, "--interval", "0.3"],
                           stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    screen = b""
    try:
        deadline = time.monotonic() + 20
        while screen.count(b"pyhv top:") < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                screen += os.read(master, 65536)
        os.write(master, b"q")
        assert top.wait(timeout=10) == 0
    finally:
        if top.poll() is None:
            top.kill()
        proc.kill()
        proc.communicate()
        os.close(master)
    text = screen.decode(errors="replace")
    assert text.count("pyhv top:") >= 3, text                     # refreshed, each time from the top
    assert "\x1b[H\x1b[2J" in text
    last = text.rsplit("pyhv top:", 1)[1]
    assert "post" in last and "exits/s" in last and "I/O thread" in last and "refresh" in last, last
