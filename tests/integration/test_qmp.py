"""The QMP server, driven by QEMU's own client library (`qemu.qmp` from PyPI, unmodified) and `qmp-shell`,
against a real guest (tests/guests/echoloop.S: echoes its serial input, idles in hlt)."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

import pyhv

pytestmark = pytest.mark.kvm

REQUIRED = ["qmp_capabilities", "query-version", "query-commands", "query-status", "stop", "cont", "system_reset",
            "quit", "query-cpus-fast", "query-block", "query-pci", "human-monitor-command", "query-exit-stats",
            "system_powerdown"]


@pytest.fixture
def vm(guest):
    with pyhv.VM(firmware=guest("echoloop", BUSY=0), memory="16M") as vm:
        vm.console.expect("echo guest ready")
        yield vm


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def connect(vm) -> QMPClient:
    client = QMPClient("test")
    await client.connect(vm.qmp_path)
    return client


def raw_connect(path: str) -> tuple[socket.socket, object]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    return sock, sock.makefile("rb")


def read_msg(reader) -> dict:
    line = reader.readline()
    assert line.endswith(b"\n"), f"connection closed: {line!r}"
    return json.loads(line)


def test_greeting_and_capabilities_negotiation_on_the_wire(vm):
    sock, reader = raw_connect(vm.qmp_path)
    greeting = read_msg(reader)
    assert greeting["QMP"]["version"]["qemu"] == {"major": 0, "minor": 1, "micro": 0}
    assert greeting["QMP"]["version"]["package"].startswith("pyhv")
    assert greeting["QMP"]["capabilities"] == []
    sock.sendall(b'{"execute": "query-status", "id": 1}')          # no newline, as QEMU's clients send
    assert read_msg(reader) == {"error": {"class": "CommandNotFound",
                                          "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
                                "id": 1}
    sock.sendall(b'{"execute": "qmp_capabilities", "id": {"any": ["json", 1]}}')
    assert read_msg(reader) == {"return": {}, "id": {"any": ["json", 1]}}
    sock.sendall(b'{"execute": "qmp_capabilities"}')
    assert read_msg(reader)["error"]["class"] == "CommandNotFound"
    sock.sendall(b'{"execute": "query-status", "id": "x"}{"execute": "query-name", "id": "y"}')
    assert read_msg(reader) == {"return": {"running": True, "singlestep": False, "status": "running"}, "id": "x"}
    assert read_msg(reader) == {"return": {"name": "pyhv"}, "id": "y"}
    sock.close()


def test_every_command_through_qemu_qmp(vm):
    async def body():
        client = await connect(vm)
        assert (await client.execute("query-version"))["qemu"]["minor"] == 1
        names = {c["name"] for c in await client.execute("query-commands")}
        assert set(REQUIRED) <= names
        assert await client.execute("query-status") == {"running": True, "singlestep": False, "status": "running"}
        cpus = await client.execute("query-cpus-fast")
        assert [(c["cpu-index"], c["target"]) for c in cpus] == [(0, "x86_64")]
        assert cpus[0]["thread-id"] == vm.machine.vcpus[0].thread.native_id
        assert await client.execute("query-block") == []       # this machine has no disks (see the unit tests)
        assert await client.execute("query-pci") == []
        stats = await client.execute("query-exit-stats")
        assert stats["exits"] > 0 and stats["by_port"]["0x03f8"]["device"] == "serial0.rbr_thr"
        mtree = await client.execute("human-monitor-command", {"command-line": "info mtree"})
        assert "address-space: memory" in mtree and "serial0" in mtree
        regs = await client.execute("human-monitor-command", {"command-line": "info registers"})
        assert regs.startswith("CPU#0") and "CS =f000" in regs
        assert await client.execute("human-monitor-command", {"command-line": "info pci"}) == ""
        assert "unknown command" in await client.execute("human-monitor-command", {"command-line": "frobnicate"})
        await client.disconnect()
    run(body())


@pytest.mark.parametrize("command,arguments,error_class,desc", [
    ("no-such-command", None, "CommandNotFound", "The command no-such-command has not been found"),
    ("stop", {"force": True}, "GenericError", "Parameter 'force' is unexpected"),
    ("human-monitor-command", {}, "GenericError", "Parameter 'command-line' is missing"),
    ("human-monitor-command", {"command-line": 42}, "GenericError",
     "Invalid parameter type for 'command-line', expected: string"),
    ("human-monitor-command", {"command-line": "info registers", "cpu-index": "0"}, "GenericError",
     "Invalid parameter type for 'cpu-index', expected: int"),
])
def test_errors_have_qmp_classes(vm, command, arguments, error_class, desc):
    async def body():
        client = await connect(vm)
        with pytest.raises(ExecuteError) as e:
            await client.execute(command, arguments)
        assert (e.value.error_class, e.value.error.error.desc) == (error_class, desc)
        assert (await client.execute("query-status"))["running"]        # the connection and VM carry on
        await client.disconnect()
    run(body())


def test_events_on_stop_cont_reset_and_quit(vm):
    async def body():
        client = await connect(vm)
        listener = EventListener()
        with client.listen(listener):
            await client.execute("stop")
            stop = await listener.get()
            assert stop["event"] == "STOP" and set(stop["timestamp"]) == {"seconds", "microseconds"}
            assert (await client.execute("query-status"))["status"] == "paused"
            await client.execute("cont")
            assert (await listener.get())["event"] == "RESUME"
            await client.execute("system_reset")
            reset = await listener.get()                          # only RESET: no STOP/RESUME around it
            assert (reset["event"], reset["data"]) == ("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
            await client.execute("system_powerdown")
            assert (await listener.get())["event"] == "POWERDOWN"
            await client.execute("quit")
            shutdown = await listener.get()
            assert shutdown["event"] == "SHUTDOWN"
            assert (shutdown["data"]["guest"], shutdown["data"]["reason"]) == (False, "host-qmp-quit")
        await client.disconnect()
    run(body())
    assert vm.wait(30) == 0


def test_guest_shutdown_event(vm):
    async def body():
        client = await connect(vm)
        listener = EventListener()
        with client.listen(listener):
            vm.console.write("Q")                  # the guest writes the debug-exit port
            event = await listener.get()
        assert (event["event"], event["data"]["guest"], event["data"]["reason"]) == ("SHUTDOWN", True,
                                                                                     "guest-shutdown")
        await client.disconnect()
    run(body())
    assert vm.wait(30) == 11


def test_two_clients_both_get_events(vm):
    async def body():
        a, b = await connect(vm), await connect(vm)
        la, lb = EventListener(), EventListener()
        with a.listen(la), b.listen(lb):
            await a.execute("stop")
            assert (await la.get())["event"] == (await lb.get())["event"] == "STOP"
            assert (await b.execute("query-status"))["status"] == "paused"
            await b.execute("cont")
            assert (await la.get())["event"] == (await lb.get())["event"] == "RESUME"
        await a.disconnect()
        assert (await b.execute("query-status"))["running"]
        await b.disconnect()
    run(body())


def test_garbage_floods_and_abrupt_disconnects_leave_the_vm_alone(vm):
    path = vm.qmp_path
    sock, reader = raw_connect(path)                       # garbage, then a valid command, same connection
    read_msg(reader)
    sock.sendall(b'{"execute": "qmp_capabilities"} garbage {"execute": oops} [1, 2] 42 '
                 b'{"execute": "query-status", "id": 7}')
    replies = [read_msg(reader) for _ in range(6)]
    assert replies[0] == {"return": {}}
    assert [r["error"]["class"] for r in replies[1:5]] == ["GenericError"] * 4
    assert replies[5]["id"] == 7 and replies[5]["return"]["running"]
    sock.close()
    sock, reader = raw_connect(path)                       # a 4 MiB message with no end, then hang up
    read_msg(reader)
    chunk = b'{"execute": "' + b"A" * 65536
    for _ in range(64):
        sock.sendall(chunk)
    sock.close()
    sock, reader = raw_connect(path)                       # hang up in the middle of a message
    read_msg(reader)
    sock.sendall(b'{"execute": "qmp_capabilities"}{"execute": "stop", "argu')
    read_msg(reader)
    sock.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)   # connect and leave without a word
    sock.connect(path)
    sock.close()

    async def body():                                       # a new connection works, and so does the guest
        client = await connect(vm)
        assert (await client.execute("query-status"))["status"] == "running"
        await client.disconnect()
    run(body())
    vm.console.write("still alive")
    vm.console.expect("still alive")


def test_a_client_that_never_reads_does_not_hold_up_others_and_is_dropped(vm):
    flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flood.settimeout(60)
    flood.connect(vm.qmp_path)
    try:                                          # ~10 MB of replies that it never reads
        flood.sendall(b'{"execute": "qmp_capabilities"}' + b'{"execute": "query-commands"}' * 20000)
    except (BrokenPipeError, ConnectionResetError):
        pass                                      # already dropped while sending

    async def check():
        client = await connect(vm)
        assert (await client.execute("query-status"))["running"]
        await client.disconnect()
    run(check())                                  # served while the flooding client reads nothing
    received = 0
    while True:                                   # past the 4 MiB backlog the server hung up on it
        try:
            data = flood.recv(1 << 20)
        except ConnectionResetError:
            break
        if not data:
            break
        received += len(data)
    assert received < 20000 * 400
    flood.close()
    vm.console.write("ok")
    vm.console.expect("ok")


def test_qmp_shell_works_unmodified(vm):
    shell = shutil.which("qmp-shell") or os.path.join(os.path.dirname(sys.executable), "qmp-shell")
    proc = subprocess.run([shell, vm.qmp_path], input="query-status\nstop\nquery-status\ncont\n", text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert '"status": "running"' in proc.stdout and '"status": "paused"' in proc.stdout
    proc = subprocess.run([shell, "-H", vm.qmp_path], input="info status\ninfo cpus\n", text=True,
                          capture_output=True, timeout=60)
    assert "VM status: running" in proc.stdout and "CPU #0" in proc.stdout


def test_pyhv_run_qmp_socket_is_private_and_quit_ends_pyhv(guest, tmp_path):
    path = tmp_path / "qmp.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pyhv.cli", "run", "--firmware", guest("echoloop", BUSY=0),
                             "--serial", "none", "--qmp", f"unix:{path},server,nowait"],
                            stderr=subprocess.PIPE, text=True)
    try:
        async def body():
            client = QMPClient("test")
            for _ in range(600):
                try:
                    await client.connect(str(path))
                    break
                except Exception:
                    await asyncio.sleep(0.05)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            await client.execute("quit")
            try:
                await client.disconnect()
            except EOFError:        # pyhv closed the socket first (it is quitting): qemu.qmp reports that EOF
                pass
        run(body())
        assert proc.wait(30) == 0, proc.stderr.read()
        assert not path.exists()
    finally:
        proc.kill()
        proc.wait()


def test_query_block_lists_every_drive_through_qemu_qmp(guest, tmp_path):
    """query-block (QEMU's client) names each disk of a pc machine with its image, read-only flag and size."""
    disk, ro = tmp_path / "disk.raw", tmp_path / "ro.raw"
    disk.write_bytes(bytes(1 << 20))
    ro.write_bytes(bytes(64 << 10))
    with pyhv.VM(firmware=guest("echoloop", BUSY=0), memory="16M", machine="pc",
                 drives=[f"file={disk}", f"file={ro},readonly=on,cache=none"]) as vm:
        vm.console.expect("echo guest ready")

        async def body():
            client = await connect(vm)
            blocks = await client.execute("query-block")
            await client.disconnect()
            return blocks
        blocks = run(body())
    got = [(b["device"], b["inserted"]["file"], b["inserted"]["ro"], b["inserted"]["image"]["virtual-size"],
            b["inserted"]["cache"]["direct"]) for b in blocks]
    assert got == [("virtio-blk0", str(disk), False, 1 << 20, False), ("virtio-blk1", str(ro), True, 64 << 10, True)]
