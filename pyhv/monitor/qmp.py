"""The QMP server: QEMU's machine protocol on a Unix socket (`pyhv run --qmp unix:PATH`).

Wire protocol (QEMU's `docs/interop/qmp-spec.rst`): on connect the server sends a greeting
`{"QMP": {"version": ..., "capabilities": []}}`; the client must send `qmp_capabilities` before any other
command; each `{"execute": NAME, "arguments": {...}, "id": ID}` gets one `{"return": ...}` or
`{"error": {"class": ..., "desc": ...}}` carrying the same `id`; events (`STOP`, `RESUME`, `RESET`, `SHUTDOWN`,
`POWERDOWN`) go to every negotiated client as `{"event": ..., "data": ..., "timestamp": {...}}`. Input is a
JSON stream (no framing); output is one JSON object per line.

The server runs on its own thread with a `selectors` loop. Commands call the machine's public methods only.
A client that sends garbage, floods, stops reading or disconnects in the middle only loses its own connection;
the VM never notices.
"""
from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import threading
import time
from typing import TYPE_CHECKING

from pyhv.runtime.chardev import bind_private_socket
from pyhv.errors import ConfigError
from pyhv.monitor.commands import COMMANDS, QmpCommandError, event_data
from pyhv.monitor.hmp import run_hmp  # noqa: F401  (registers human-monitor-command)
from pyhv.monitor.jsonstream import JsonStream, JsonStreamError

if TYPE_CHECKING:
    from pyhv.machine.machine import Machine

log = logging.getLogger(__name__)

MAX_OUTPUT_BACKLOG = 4 << 20       # a client that reads nothing is dropped once this much output waits
SUN_PATH_MAX = 107


def parse_qmp_address(text: str) -> str:
    """`unix:PATH[,server][,nowait|wait=off]` (QEMU's -qmp syntax) -> PATH."""
    kind, _, rest = text.partition(":")
    if kind != "unix" or not rest:
        raise ConfigError(f"--qmp {text!r}: only unix:PATH is supported", "write --qmp unix:/path/to/qmp.sock")
    path, *options = rest.split(",")
    for option in options:
        if option in ("server", "nowait", "server=on", "wait=off"):
            continue
        raise ConfigError(f"--qmp {text!r}: option {option!r} is not supported",
                          "pyhv's QMP socket is always a server that does not wait")
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ConfigError(f"--qmp path {path} is longer than the {SUN_PATH_MAX} bytes a Unix socket allows",
                          "use a shorter path")
    return path


def _timestamp() -> dict:
    now = time.time()
    return {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(", ", ": ")).encode() + b"\r\n"


class QmpConnection:
    def __init__(self, server: "QmpServer", sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.stream = JsonStream()
        self.negotiated = False
        self.out = bytearray()
        self.lock = threading.Lock()
        self.closing = False         # read no more; close once the output is flushed
        self.dropped = False         # close now, unflushed (a client that does not read its messages)

    def send(self, message: dict) -> None:
        data = encode(message)
        with self.lock:
            if self.dropped:
                return
            if len(self.out) + len(data) > MAX_OUTPUT_BACKLOG:
                log.warning("QMP client is not reading its messages; dropping it")
                self.dropped = self.closing = True
                self.out.clear()
            else:
                self.out += data
        self.server.wake()

    def handle_input(self, data: bytes) -> None:
        for item in self.stream.feed(data):
            if self.dropped:
                return
            if isinstance(item, JsonStreamError):
                self.send({"error": {"class": "GenericError", "desc": item.desc}})
                continue
            self.handle_message(item)

    def handle_message(self, msg: object) -> None:
        if not isinstance(msg, dict):
            self.send({"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}})
            return
        reply_id = {"id": msg["id"]} if "id" in msg else {}
        try:
            name, arguments = self._check_message(msg)
            result = self.execute(name, arguments)
        except QmpCommandError as e:
            self.send({"error": {"class": e.error_class, "desc": e.desc}, **reply_id})
            return
        except Exception as e:            # a bug in a command must not take the monitor down
            log.exception("QMP command failed")
            self.send({"error": {"class": "GenericError", "desc": f"internal error: {e}"}, **reply_id})
            return
        self.send({"return": result, **reply_id})
        if name == "quit":
            self.server.machine.shutdown(0, "host-qmp-quit")

    def _check_message(self, msg: dict) -> tuple[str, dict]:
        for key in msg:
            if key not in ("execute", "arguments", "id", "exec-oob", "control"):
                raise QmpCommandError(f"QMP input member '{key}' is unexpected")
        if "exec-oob" in msg:
            raise QmpCommandError("QMP input member 'exec-oob' is unexpected: out-of-band execution is not "
                                  "enabled")
        if "execute" not in msg:
            raise QmpCommandError("QMP input lacks member 'execute'")
        name = msg["execute"]
        if not isinstance(name, str):
            raise QmpCommandError("QMP input member 'execute' must be a string")
        arguments = msg.get("arguments", {})
        if not isinstance(arguments, dict):
            raise QmpCommandError("QMP input member 'arguments' must be an object")
        return name, arguments

    def execute(self, name: str, arguments: dict) -> object:
        if name == "qmp_capabilities":
            if self.negotiated:
                raise QmpCommandError("Capabilities negotiation is already complete, command ignored",
                                      "CommandNotFound")
            enable = arguments.get("enable", [])
            if set(arguments) - {"enable"}:
                raise QmpCommandError(f"Parameter '{sorted(set(arguments) - {'enable'})[0]}' is unexpected")
            if not isinstance(enable, list) or enable:
                raise QmpCommandError(f"Capability '{enable[0] if isinstance(enable, list) else enable}' "
                                      "not available")
            self.negotiated = True
            return {}
        if not self.negotiated:
            raise QmpCommandError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
        command = COMMANDS.get(name)
        if command is None:
            raise QmpCommandError(f"The command {name} has not been found", "CommandNotFound")
        return command.call(self.server, arguments)


class QmpServer:
    """A QMP server for one machine on a Unix socket (mode 0600); `start()` opens it, `close()` removes it."""

    def __init__(self, machine: "Machine", path: str) -> None:
        self.machine = machine
        self.path = path
        try:
            if os.path.exists(path):
                if not _is_stale_socket(path):
                    raise ConfigError(f"--qmp {path}: the path exists and is not a stale socket",
                                      "remove it or choose another path")
                os.unlink(path)
            self.listener = bind_private_socket(path)
        except OSError as e:
            raise ConfigError(f"--qmp {path}: cannot create the socket: {e.strerror}")
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.connections: dict[int, QmpConnection] = {}
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._reset_cause: str | None = None     # set while a QMP system_reset runs, for its RESET event
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        machine.listeners.append(self._on_machine_event)

    # --- thread ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pyhv-qmp", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass                          # already woken

    def _drain_wake(self, key: selectors.SelectorKey, events: int) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _run(self) -> None:
        while not self._stopping:
            for key, events in self.selector.select():
                try:
                    key.data(key, events)
                except Exception:
                    log.exception("QMP server error")
            self._update_interest()
        self._flush_all()

    def _update_interest(self) -> None:
        for fd, conn in list(self.connections.items()):
            with conn.lock:
                want_write, closing, dropped = bool(conn.out), conn.closing, conn.dropped
            if dropped or (closing and not want_write):
                self._close(conn)
                continue
            mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            if self.selector.get_key(fd).events != mask:
                self.selector.modify(fd, mask, self._serve)

    def _accept(self, key: selectors.SelectorKey, events: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        conn = QmpConnection(self, sock)
        self.connections[sock.fileno()] = conn
        self.selector.register(sock, selectors.EVENT_READ, self._serve)
        conn.send(self.greeting())

    def greeting(self) -> dict:
        from pyhv.monitor.commands import version_info
        return {"QMP": {"version": version_info(), "capabilities": []}}

    def _serve(self, key: selectors.SelectorKey, events: int) -> None:
        conn = self.connections.get(key.fd)
        if conn is None:
            return
        if events & selectors.EVENT_WRITE:
            self._flush(conn)
        if events & selectors.EVENT_READ and not conn.closing:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._close(conn)
                return
            conn.handle_input(data)
            self._flush(conn)

    def _flush(self, conn: QmpConnection) -> None:
        with conn.lock:
            if not conn.out:
                return
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                conn.out.clear()
                conn.closing = True
                return
            del conn.out[:sent]

    def _flush_all(self) -> None:
        for conn in list(self.connections.values()):
            try:
                conn.sock.setblocking(True)
                conn.sock.settimeout(1.0)
                with conn.lock:
                    conn.sock.sendall(conn.out)
            except OSError:
                pass

    def _close(self, conn: QmpConnection) -> None:
        fd = conn.sock.fileno()
        self.connections.pop(fd, None)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    # --- events ----------------------------------------------------------------------------------------------
    def _on_machine_event(self, event: str, data: dict) -> None:
        qmp_data = event_data(event, {**data, "status": self.machine.exit_status}, self._reset_cause)
        self.broadcast(event, qmp_data)

    def broadcast(self, event: str, data: dict | None = None) -> None:
        message: dict = {"event": event}
        if data is not None:
            message["data"] = data
        message["timestamp"] = _timestamp()
        for conn in list(self.connections.values()):
            if conn.negotiated:
                conn.send(message)

    def system_reset(self) -> None:
        self._reset_cause = "host-qmp-system-reset"
        try:
            self.machine.reset()
        finally:
            self._reset_cause = None

    def close(self) -> None:
        """Send what is pending, close every connection and remove the socket."""
        try:
            self.machine.listeners.remove(self._on_machine_event)
        except ValueError:
            pass
        self._stopping = True
        self.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        for conn in list(self.connections.values()):
            self._close(conn)
        self.selector.close()
        self.listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _is_stale_socket(path: str) -> bool:
    """A socket file nobody listens on any more (left by a pyhv that was killed)."""
    import stat
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return True
    finally:
        probe.close()
    raise ConfigError(f"--qmp {path}: another process is listening on this socket", "choose another path")
