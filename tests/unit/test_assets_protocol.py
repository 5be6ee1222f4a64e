"""The guest console protocol: how pyhv.cmd is encoded on the kernel command line and parsed by /init (run here
with the host's sh, the same POSIX code busybox sh runs), and how the host reads markers and talks to the agent."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyhv.assets.init_script import CMDLINE_FUNCTIONS, render_init
from pyhv.assets.protocol import (AgentTimeout, GuestAgent, command_output, debug_exit_status, encode_command,
                                  parse_exit_status, parse_init_start, parse_init_uptime)

PARSE = CMDLINE_FUNCTIONS + r'''
pyhv_parse_cmdline "$1"
printf '%s\n--\n%s\n--\n%s' "$PYHV_CMD" "$PYHV_AGENT" "$PYHV_MMIO_ARGS"
'''


def parse(cmdline: str) -> tuple[str, str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(["sh", "-c", PARSE, "sh", cmdline], capture_output=True, check=True, cwd="/",
                             env={**os.environ, "TMPDIR": tmp}).stdout
    cmd, agent, mmio = out.decode().split("\n--\n")
    return cmd, agent, mmio


@pytest.mark.parametrize("command,form", [
    ("true", "pyhv.cmd=true"),
    ("cat /proc/meminfo", 'pyhv.cmd="cat /proc/meminfo"'),
    ("uname -r; nproc", 'pyhv.cmd="uname -r; nproc"'),
    ('echo "quoted" | wc -c', "pyhv.cmd64=ZWNobyAicXVvdGVkIiB8IHdjIC1j"),
    ("printf 'a\\nb'\necho two", None),
    ("echo trailing newline\n\n", None),
    ("grüße", None),
])
def test_encoded_commands_come_back_unchanged(command, form):
    encoded = encode_command(command)
    if form is not None:
        assert encoded == form
    line = f"console=ttyS0 {encoded} quiet virtio_mmio.device=4K@0xd0000000:5"
    assert parse(line)[0] == command


@settings(max_examples=30, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1, max_size=40))
def test_any_command_round_trips(command):
    assert parse(f"earlyprintk=ttyS0 {encode_command(command)} panic=-1")[0] == command


def test_agent_flag_and_virtio_mmio_arguments():
    cmd, agent, mmio = parse("console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 pyhv.agent=1 "
                             "virtio_mmio.device=512@0xd0001000:6 root=/dev/vda")
    assert (cmd, agent) == ("", "1")
    assert mmio.split() == ["device=4K@0xd0000000:5", "device=512@0xd0001000:6"]
    assert parse("console=ttyS0 pyhv.agent=10 xpyhv.cmd=no")[:2] == ("", "")


def test_init_script_is_valid_sh_and_loads_modules_in_the_given_order():
    script = render_init(["virtio_ring", "virtio", "virtio_mmio"])
    subprocess.run(["sh", "-n"], input=script.encode(), check=True)
    assert "for m in virtio_ring virtio virtio_mmio; do" in script
    assert "insmod /lib/modules/$m.ko $PYHV_MMIO_ARGS" in script


def test_encode_command_rejects_empty():
    with pytest.raises(ValueError):
        encode_command("")


CONSOLE = ("[    2.1] Run /init as init process\r\nPYHV-INIT uptime=2.41 start=2.38\r\n6.1.0-56-amd64\r\nline two\r\n"
           "PYHV-EXIT-STATUS=3\r\n")


def test_parse_console_output():
    assert parse_init_uptime(CONSOLE) == 2.41 and parse_init_start(CONSOLE) == 2.38
    assert parse_init_start("PYHV-INIT uptime=1.5\n") is None
    assert parse_exit_status(CONSOLE) == 3
    assert command_output(CONSOLE) == "6.1.0-56-amd64\nline two\n"
    assert parse_exit_status("no newline at the endPYHV-EXIT-STATUS=0\r\n") == 0
    assert parse_exit_status("PYHV-INIT uptime=1.0\r\n") is None
    assert debug_exit_status(3) == 7 and debug_exit_status(0) == 1


class FakeGuest(threading.Thread):
    """Plays /init's agent loop on the far end of two pipes."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        to_guest_r, self.to_guest_w = os.pipe()
        self.from_guest_r, from_guest_w = os.pipe()
        self.inp = os.fdopen(to_guest_r, "rb")
        self.out = os.fdopen(from_guest_w, "wb", buffering=0)
        self.host_reader = os.fdopen(self.from_guest_r, "rb", buffering=0)
        self.host_writer = os.fdopen(self.to_guest_w, "wb", buffering=0)

    def run(self) -> None:
        self.out.write(b"[ 1.0] kernel noise\r\nPYHV-INIT uptime=1.00\r\nPYHV-AGENT-READY\r\n")
        for line in self.inp:
            command = line.decode().rstrip("\n")
            if command.startswith("pyhv-exit"):
                break
            if command == "echo -n partial":
                self.out.write(b"partialPYHV-EXIT-STATUS=0\r\n")
            else:
                self.out.write(f"ran {command}\r\nPYHV-EXIT-STATUS={len(command)}\r\n".encode())
        self.out.close()


def test_guest_agent_runs_commands_over_a_byte_stream():
    guest = FakeGuest()
    guest.start()
    agent = GuestAgent(guest.host_reader, guest.host_writer)
    agent.wait_ready(timeout=10)
    first = agent.run("uname -r", timeout=10)
    assert (first.status, first.output) == (8, "ran uname -r\n")
    assert agent.run("echo -n partial", timeout=10).output == "partial"
    agent.exit(0)
    with pytest.raises(AgentTimeout, match="closed"):
        agent.run("true", timeout=10)
    assert "kernel noise" in agent.console
    with pytest.raises(ValueError):
        agent.run("two\nlines")
    agent.close()
    guest.join(timeout=10)


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
def test_pyhv_exit_script_writes_the_status_byte(tmp_path):
    """pyhv-exit's byte encoding, with /dev/port replaced by a file and reboot by a stub."""
    from pyhv.assets.init_script import PYHV_EXIT
    port = tmp_path / "port"
    port.write_bytes(b"\0" * 256)
    script = PYHV_EXIT.replace("[ -c /dev/port ]", "true").replace("/dev/port", str(port)).replace(
        "reboot -f", "echo rebooted; exit 0")
    for status, byte in ((0, 0), (3, 3), (255, 255), (256 + 7, 7)):
        proc = subprocess.run(["sh", "-c", script, "pyhv-exit", str(status)], capture_output=True, check=True)
        assert proc.stdout == b"rebooted\n"
        assert port.read_bytes()[0xF4] == byte
