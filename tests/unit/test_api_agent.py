"""`VM.run()`'s side of the console agent protocol (kernel command line pyhv.agent=1: the guest prints
PYHV-AGENT-READY, then for each command line its output and PYHV-EXIT-STATUS=<n>), against a scripted agent on a
socket pair. The real agent lives in the project's Debian guest; booting it needs direct Linux boot."""
from __future__ import annotations

import socket
import threading

from pyhv.api import VM, Console


def fake_agent(sock: socket.socket) -> None:
    sock.sendall(b"[    0.000000] Linux version ...\r\nPYHV-AGENT-READY\r\n")
    buf = b""
    while True:
        data = sock.recv(4096)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            sock.sendall(line + b"\r\n")                       # the terminal echoes the command
            if line == b"echo hi":
                sock.sendall(b"hi\r\nPYHV-EXIT-STATUS=0\r\n")
            elif line == b"false":
                sock.sendall(b"PYHV-EXIT-STATUS=1\r\n")
            else:
                sock.sendall(b"sh: " + line + b": not found\r\nPYHV-EXIT-STATUS=127\r\n")


def test_run_reads_output_and_exit_status():
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=fake_agent, args=(theirs,), daemon=True)
    thread.start()
    vm = VM(kernel="vmlinux", agent=True)
    assert "pyhv.agent=1" in vm.config.append.split()
    vm.console = Console(ours)
    try:
        assert (vm.run("echo hi").stdout, vm.run("echo hi").exit_status) == ("hi\n", 0)
        assert vm.run("false").exit_status == 1
        result = vm.run("nonsense")
        assert (result.stdout, result.exit_status) == ("sh: nonsense: not found\n", 127)
    finally:
        vm.console.close()
        theirs.close()
