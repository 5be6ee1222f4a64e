"""The embeddable Python API.

    import pyhv

    with pyhv.VM(firmware="guest.bin", memory="64M") as vm:     # or kernel=..., initrd=..., append=...
        vm.console.expect("ready")                              # wait for guest output (a regex)
        vm.console.write("hello\\n")
        vm.pause(); vm.resume()
        print(vm.stats()["exits"], vm.qmp("query-status"))
        status = vm.wait(timeout=10)                             # the guest's exit status (None: still running)

    with pyhv.VM(kernel=..., initrd=..., agent=True) as vm:    # the project's Debian guest and its agent
        result = vm.run("uname -r")                              # Result(stdout, exit_status)

The VM runs in this process (vCPU and I/O threads); leaving the `with` block (or `close()`) stops it and frees
everything. Create VMs from the main thread, or call `pyhv.machine.vcpu.install_kick_handler()` there first. The API is
a front end like the CLI: it builds a `VmConfig`, runs a `Machine` through its public methods, reads the serial
console from a private socket and talks QMP to its own QMP server (`vm.qmp_path`, usable by other clients too).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from pyhv.runtime.chardev import ChardevSpec
from pyhv.config import DriveConfig, NetConfig, VmConfig, parse_size

if TYPE_CHECKING:
    from pyhv.machine.machine import Machine
    from pyhv.monitor.client import QmpClient
    from pyhv.monitor.qmp import QmpServer

AGENT_CMDLINE = "pyhv.agent=1"
AGENT_READY = "PYHV-AGENT-READY"
AGENT_STATUS_RE = re.compile(r"PYHV-EXIT-STATUS=(-?\d+)\r?\n")


@dataclass
class Result:
    stdout: str
    exit_status: int


class Console:
    """The guest's serial port: everything it wrote is kept in `output`; `expect()` waits for a pattern after the
    last match, `write()` types into the guest."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._cond = threading.Condition()
        self._data = bytearray()
        self._pos = 0                     # where the next expect() starts looking
        self._closed = False
        self._thread = threading.Thread(target=self._reader, name="pyhv-api-console", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._closed = True
                    self._cond.notify_all()
                    return
                self._data += data
                self._cond.notify_all()

    @property
    def output(self) -> str:
        """Everything the guest has written so far."""
        with self._cond:
            return self._data.decode(errors="replace")

    def expect(self, pattern: str | re.Pattern, timeout: float = 30.0) -> re.Match:
        """Wait until the output after the previous match matches `pattern` (a regex); returns the match.
        TimeoutError (with the recent output) if it does not come in time, EOFError if the guest's console closed."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = self._data[self._pos:].decode(errors="replace")
                m = regex.search(text)
                if m:
                    self._pos += len(text[:m.end()].encode(errors="replace"))
                    return m
                if self._closed:
                    raise EOFError(f"console closed before {regex.pattern!r} appeared; output: {text[-500:]!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{regex.pattern!r} did not appear within {timeout} s; "
                                       f"output: {text[-500:]!r}")
                self._cond.wait(remaining)

    def read_new(self) -> str:
        """The output after the previous match (or read), without waiting; moves past it."""
        with self._cond:
            text = self._data[self._pos:].decode(errors="replace")
            self._pos = len(self._data)
            return text

    def write(self, data: str | bytes) -> None:
        self._sock.sendall(data.encode() if isinstance(data, str) else data)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)


class VM:
    def __init__(self, kernel: str | None = None, *, firmware: str | None = None, initrd: str | None = None,
                 append: str = "", memory: str | int = "128M", cpus: int = 1, machine: str | None = None,
                 drives: Iterable[str | DriveConfig] = (), nics: Iterable[str | NetConfig] = (),
                 agent: bool = False, name: str = "pyhv", config: VmConfig | None = None, **options: Any) -> None:
        """Describe a VM (started by `start()` or the `with` statement). `drives` take `DriveConfig`s or
        `--drive` strings ("file=disk.img,readonly=on"), `nics` `NetConfig`s or `--nic` strings; with a kernel,
        `console=ttyS0` is added to its command line unless it names a console; `agent=True` adds `pyhv.agent=1`
        for `run()`; other `VmConfig` fields may be given by name, or a whole `config`."""
        if config is None:
            if kernel and not any(word.startswith("console=") for word in append.split()):
                append = f"console=ttyS0 {append}".strip()      # vm.console is the first serial port
            if agent and AGENT_CMDLINE not in append.split():
                append = f"{append} {AGENT_CMDLINE}".strip()
            config = VmConfig(name=name, kernel=kernel, firmware=firmware, initrd=initrd, append=append,
                              memory=parse_size(memory), cpus=cpus,
                              drives=[d if isinstance(d, DriveConfig) else DriveConfig.parse(d) for d in drives],
                              nets=[n if isinstance(n, NetConfig) else NetConfig.parse(n) for n in nics],
                              **options)
            if machine:
                config.machine = machine
        self.config = config
        self.agent = agent or AGENT_CMDLINE in (config.append or "").split()
        self.machine: Machine | None = None
        self.console: Console | None = None
        self._qmp_server: QmpServer | None = None
        self._qmp_client: QmpClient | None = None
        self._dir: str | None = None
        self._agent_ready = False
        self._started = False

    @property
    def qmp_path(self) -> str | None:
        return os.path.join(self._dir, "qmp.sock") if self._dir else None

    def _qmp_socket(self) -> str:
        if self._dir is None:
            raise RuntimeError("the VM is not started")
        return os.path.join(self._dir, "qmp.sock")

    def start(self) -> "VM":
        from pyhv.machine.machine import Machine
        from pyhv.monitor.qmp import QmpServer

        if self._started:
            raise RuntimeError("the VM was already started")
        self._started = True
        self._dir = tempfile.mkdtemp(prefix="pyhv-vm-")
        console_path = os.path.join(self._dir, "console.sock")
        config = VmConfig.from_dict({**self.config.to_dict(), "serial": ChardevSpec("socket", console_path)})
        try:
            machine = self.machine = Machine(config)
            server = self._qmp_server = QmpServer(machine, self._qmp_socket())
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.connect(console_path)
            self.console = Console(sock)
            server.start()
            machine.start()
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> "VM":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require(self) -> "Machine":
        if self.machine is None:
            raise RuntimeError("the VM is not started")
        return self.machine

    @property
    def state(self) -> str:
        return self._require().state

    def pause(self) -> None:
        self._require().pause()

    def resume(self) -> None:
        self._require().resume()

    def reset(self) -> None:
        self._require().reset()

    def stats(self) -> dict:
        """Exit statistics (as QMP's query-exit-stats)."""
        machine = self._require()
        return machine.exit_stats().as_dict(machine.port_owner)

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command on this VM's QMP server (argument names may use _ for -)."""
        from pyhv.monitor.client import QmpClient
        self._require()
        if self._qmp_client is None:
            self._qmp_client = QmpClient(self._qmp_socket())
        return self._qmp_client.execute(command, **arguments)

    def wait(self, timeout: float | None = None) -> int | None:
        """The guest's exit status once the VM ends, or None if it is still running after `timeout` seconds."""
        return self._require().wait(timeout)

    def shutdown(self, status: int = 0, reason: str = "stopped from the Python API") -> None:
        self._require().shutdown(status, reason)

    def run(self, command: str, timeout: float = 300.0) -> Result:
        """Run a shell command in the guest through its console agent (a kernel command line with pyhv.agent=1:
        the guest prints PYHV-AGENT-READY, then for each command line its output and PYHV-EXIT-STATUS=<n>)."""
        if not self.agent:
            raise RuntimeError("vm.run() needs the guest's console agent: create the VM with agent=True")
        console = self.console
        if console is None:
            raise RuntimeError("the VM is not started")
        if not self._agent_ready:
            console.expect(re.escape(AGENT_READY) + r"\r?\n", timeout)
            self._agent_ready = True
        if "\n" in command or not command.strip():
            raise ValueError("an agent command is one non-empty line")
        console.read_new()
        console.write(command + "\n")
        m = console.expect(AGENT_STATUS_RE, timeout)
        text = m.string[:m.start()].replace("\r\n", "\n")
        if text.startswith(command + "\n"):          # the guest's terminal echoed the command
            text = text[len(command) + 1:]
        return Result(text, int(m.group(1)))

    def close(self) -> None:
        """Stop the VM (if it runs) and free everything: KVM objects, threads, sockets, the temporary folder."""
        if self._qmp_client is not None:
            self._qmp_client.close()
            self._qmp_client = None
        machine, self.machine = self.machine, None
        if machine is not None and machine.state in ("running", "paused"):
            machine.shutdown(0, "closed")
            machine.wait()
        if self._qmp_server is not None:
            self._qmp_server.close()
            self._qmp_server = None
        if machine is not None:
            machine.close()
        if self.console is not None:
            self.console.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
