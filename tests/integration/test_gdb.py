"""The GDB stub driven by Debian's own gdb (`gdb -batch`): a real-mode project guest and the small Linux kernel with
its vmlinux symbols; and hostile clients on the stub's port, while the VM keeps running."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from pyhv.assets.protocol import encode_command
from pyhv.monitor.gdb_packets import checksum, frame

pytestmark = pytest.mark.kvm

GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="Debian's gdb is not installed (scripts/install-deps)")
COUNTER = 0x500                 # the counter guest increments this 32-bit word forever
COUNTER_LOOP = 0xF002B          # linear address of its `incl 0x500` (CS base 0xF0000)


class PyhvWithGdb:
    """`pyhv run ... --gdb tcp:127.0.0.1:0`, and the port its stub chose (from its stderr)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "pyhv.cli", "run", "--gdb", "tcp:127.0.0.1:0", *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stderr_head = b""
        while True:
            line = self.proc.stderr.readline()
            self.stderr_head += line
            match = re.search(rb"gdb stub on 127\.0\.0\.1:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                break
            if not line:
                raise AssertionError(f"pyhv did not start its gdb stub:\n{self.stderr_head.decode()}")

    def gdb(self, commands: str, symbols: str | None = None, timeout: float = 240) -> str:
        script = ["set pagination off", "set confirm off"]
        if symbols:
            script.append(f"file {symbols}")
        script.append(f"target remote 127.0.0.1:{self.port}")
        script += [line.strip() for line in commands.strip().splitlines()]
        args = [GDB, "-batch", "-nx"]
        for line in script:
            args += ["-ex", line]
        r = subprocess.run(args, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        return r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out.decode(errors="replace"), (self.stderr_head + err).decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@needs_gdb
def test_gdb_on_a_real_mode_guest(guest, tmp_path):
    serial = tmp_path / "serial.txt"
    vm = PyhvWithGdb("--firmware", guest("counter"), "--serial", f"file:{serial}")
    try:
        out = vm.gdb(f"""
            hbreak *{COUNTER_LOOP:#x}
            continue
            info registers rip
            set {{int}}{COUNTER:#x} = 0x11223344
            stepi
            info registers rip
            x/1xw {COUNTER:#x}
            delete
            break *{COUNTER_LOOP:#x}
            continue
            x/1xw {COUNTER:#x}
            continue
            x/1xw {COUNTER:#x}
            info threads
            kill
        """)
        status, _, err = vm.finish()
    finally:
        vm.kill()
    assert "Hardware assisted breakpoint 1 at 0xf002b" in out, out
    rips = re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.M)
    assert rips[:2] == ["0xf002b", "0xf0030"], out          # the breakpoint, then one instruction on (incl)
    words = re.findall(r"^0x500:\s+(0x[0-9a-f]+)", out, re.M)
    assert words[0] == "0x11223345", out                    # our write, incremented once by the stepped incl
    assert words[1] == "0x11223345", out                    # jmp back: stopped before the incl
    assert words[2] == "0x11223346", out                    # stepped over the breakpoint, round the loop once
    assert "Breakpoint 2, 0x00000000000f002b" in out, out
    assert "Thread 1 (vCPU 0)" in out, out
    assert "killed" in out and status == 0, err                # k ends the VM, as QEMU exits
    assert "counter: running" in serial.read_text()


@needs_gdb
def test_gdb_against_the_linux_kernel(linux_guest, tmp_path):
    """Software and hardware breakpoints in the syscall path, a watchpoint on jiffies_64, bt, x/s, stepi; the guest
    then finishes its command."""
    serial = tmp_path / "serial.txt"
    command = "echo gdb-ready; sleep 4; echo one; echo two; echo three; pyhv-exit 7"
    vm = PyhvWithGdb("--kernel", str(linux_guest.bzimage), "--initrd", str(linux_guest.initramfs_uncompressed),
                     "--memory", "128M", "--serial", f"file:{serial}",
                     "--append", f"console=ttyS0 reboot=k panic=-1 {encode_command(command)}")
    try:
        deadline = time.monotonic() + 300
        while "gdb-ready" not in (serial.read_text() if serial.exists() else ""):
            assert vm.proc.poll() is None and time.monotonic() < deadline, vm.finish(5)
            time.sleep(0.2)
        out = vm.gdb("""
            break *ksys_write
            continue
            bt
            info registers rip
            p/x &ksys_write
            x/s (char *)&linux_banner
            stepi
            info registers rip
            delete
            hbreak *ksys_write
            continue
            info registers rip
            delete
            watch *(long *)&jiffies_64
            continue
            delete
            continue
        """, symbols=str(linux_guest.vmlinux))
        status, _, err = vm.finish()
    finally:
        vm.kill()
    address = re.search(r"\$1 = (0x[0-9a-f]+)", out)
    assert address, out
    rips = re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.M)
    assert rips[0] == address.group(1), out                         # stopped on the function's first byte
    assert int(rips[1], 16) > int(address.group(1), 16), out         # stepi: the next instruction of ksys_write
    assert re.search(r"<ksys_write\+\d+>", out), out
    assert rips[2] == address.group(1), out                          # the hardware breakpoint
    assert "Breakpoint 1, " in out and "in ksys_write ()" in out, out
    assert "Hardware assisted breakpoint 2" in out, out
    assert re.search(r"#1 .* in (do_syscall_64|__x64_sys_write|entry_SYSCALL_64)", out), out  # a plausible stack
    assert "Linux version 6.1" in out, out                          # x/s linux_banner
    watch = re.search(r"Old value = (\d+)\s+New value = (\d+)", out)
    assert watch and int(watch.group(2)) == int(watch.group(1)) + 1, out   # the timer tick that wrote jiffies
    assert "exited with code 017" in out, out                       # the guest ran on to pyhv-exit 7
    assert status == (7 << 1) | 1, err
    text = serial.read_text()
    assert "one" in text and "two" in text and "three" in text, text


def _recv_until(sock: socket.socket, pattern: bytes, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while not re.search(pattern, data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_hostile_gdb_clients_leave_the_vm_running(guest):
    from pyhv.api import VM
    from pyhv.monitor.gdbstub import BUSY, GdbStub

    with VM(firmware=guest("counter")) as vm:
        stub = GdbStub(vm.machine, ("127.0.0.1", 0))
        stub.start()
        try:
            vm.console.expect("counter: running")
            counter = lambda: int.from_bytes(vm.machine.guest_memory.read(COUNTER, 4), "little")  # noqa: E731
            first = socket.create_connection(stub.address)
            first.sendall(frame(b"?"))
            assert b"T05thread:1;" in _recv_until(first, rb"T05thread:1;")
            assert vm.state == "debug"
            assert vm.qmp("query-status")["status"] == "debug"
            stopped = counter()
            time.sleep(0.2)
            assert counter() == stopped                               # gdb holds the VM
            first.sendall(frame(b"c"))                                # run, then Ctrl-C stops it again
            deadline = time.monotonic() + 10
            while vm.state != "running" and time.monotonic() < deadline:
                time.sleep(0.02)
            assert vm.state == "running"
            first.sendall(b"\x03")
            assert b"T02thread:1;" in _recv_until(first, rb"T02thread:1;")
            assert vm.state == "debug"
            first.sendall(b"$g#00")                                   # bad checksum: NAK
            assert _recv_until(first, rb"-") == b"-"
            first.sendall(b"$" + b"M0,1:" + b"0" * 100000 + b"#00")  # oversized: NAK, nothing buffered
            assert b"-" in _recv_until(first, rb"-")
            first.sendall(b"\xff\x00garbage" + frame(b"m500,4"))    # noise is skipped, the packet served
            assert re.search(rb"\$[0-9a-f]{8}#", _recv_until(first, rb"\$[0-9a-f]{8}#"))
            first.sendall(frame(b"Zz,zz,zz") + frame(b"p999") + frame(b"mffffffffffff0000,4"))
            replies = _recv_until(first, rb"E14#..")
            assert b"$E01#" in replies and b"$E00#" in replies and b"$E14#" in replies, replies
            second = socket.create_connection(stub.address)         # a second debugger is refused
            second.sendall(frame(b"qSupported"))
            assert frame(BUSY) in _recv_until(second, re.escape(frame(BUSY)))
            second.close()
            body = b"m500,4"
            first.sendall(b"$" + body + b"#%02x" % checksum(body) + b"$m5")   # then vanish half way
            first.close()
            deadline = time.monotonic() + 10
            while vm.state != "running" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert vm.state == "running"                              # the vanished debugger detached
            before = counter()
            time.sleep(0.3)
            assert counter() != before                                # and the guest runs on
            assert stub.refused == 1 and stub.bad_packets >= 2
            third = socket.create_connection(stub.address)          # attach again, then detach with D
            third.sendall(frame(b"?"))
            assert b"T05" in _recv_until(third, rb"T05")
            assert vm.state == "debug"
            third.sendall(frame(b"D"))
            assert b"$OK#9a" in _recv_until(third, rb"\$OK#9a")
            deadline = time.monotonic() + 10
            while vm.state != "running" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert vm.state == "running"
            third.close()
        finally:
            stub.close()
