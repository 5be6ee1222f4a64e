"""A small synchronous QMP client (standard library only) for pyhv's own tools: the lifecycle commands and the
Python API. Any QMP client works with pyhv's server (the tests use QEMU's `qemu.qmp`); this one exists so that
pyhv needs nothing beyond Python itself."""
from __future__ import annotations

import json
import socket
import time
from collections import deque

from pyhv.errors import PyhvError


class QmpError(PyhvError):
    """A QMP command answered with an error (`error_class` is QMP's class, e.g. CommandNotFound)."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class QmpClient:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self._buf = b""
        self.events: deque[dict] = deque()
        self._next_id = 0
        self.greeting = self._read()
        if "QMP" not in self.greeting:
            raise QmpError("ProtocolError", f"unexpected greeting {self.greeting!r}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self._buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the QMP server closed the connection")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments: object) -> object:
        """Run a command; its `return` value, or `QmpError`. Arguments use QMP's names (`command-line` may be
        given as command_line)."""
        self._next_id += 1
        msg_id = f"pyhv-{self._next_id}"
        msg: dict = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = {k.replace("_", "-"): v for k, v in arguments.items()}
        self.sock.sendall(json.dumps(msg).encode())
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != msg_id:
                continue
            if "error" in reply:
                raise QmpError(reply["error"].get("class", "GenericError"), reply["error"].get("desc", ""))
            return reply.get("return")

    def wait_event(self, name: str, timeout: float = 10.0) -> dict:
        """The next event called `name` (earlier ones of other names are kept in `events`)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in list(self.events):
                if event["event"] == name:
                    self.events.remove(event)
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {name} event within {timeout} s")
            self.sock.settimeout(remaining)
            try:
                self.events.append(self._read())
            except socket.timeout:
                continue
            finally:
                self.sock.settimeout(self.timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "QmpClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
