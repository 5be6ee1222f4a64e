"""Live migration between two pyhv processes, with QEMU's QMP surface (`migrate`, `-incoming`/`migrate-incoming`,
`query-migrate`, `migrate_cancel`, `migrate-set-parameters`, MIGRATION events).

Pre-copy: the source turns on KVM's dirty-page logging (KVM_MEM_LOG_DIRTY_PAGES), sends every page, then sends the
pages dirtied meanwhile (KVM_GET_DIRTY_LOG, plus what pyhv itself wrote through GuestMemory) pass after pass until
what is left would go within `downtime-limit` at the measured bandwidth; then it pauses the VM, sends the last dirty
pages and the CPU and device state (pyhv/machine/snapshot.py's), and waits for the destination to say it runs. The
source then stays paused (QEMU's `postmigrate`). If anything fails (the destination dies, the link drops, a
cancel), the source turns logging off and runs on: status `failed` or `cancelled`. Memory is streamed page by page
from guest RAM; the VMM never holds a copy of it.

`exec:COMMAND` runs COMMAND on either side: the source writes the stream to its stdin (and reads the reply from its
stdout), the destination reads the stream from its stdout (and writes the reply to its stdin).

Stream: b"PYHVMIG\\x01", then frames (type byte, u32 length, payload): HELLO (JSON: the config), PAGES (repeated
u64 guest-physical address + 4096 bytes), STATE (JSON), END. The destination answers b"OK\\n" once its vCPUs run,
or b"ERR message\\n". Both sides are built from the same config (QEMU's rule: start the destination with the same
options plus `--incoming`); the destination checks it against the source's.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable

from pyhv.errors import ConfigError, PyhvError
from pyhv.machine.snapshot import SnapshotError, capture_state, check_saveable, load_machine_state
from pyhv.memory.ram import PAGE_SIZE
from pyhv.runtime.chardev import bind_private_socket

if TYPE_CHECKING:
    from pyhv.machine.machine import Machine

log = logging.getLogger(__name__)

MAGIC = b"PYHVMIG\x01"
T_HELLO, T_PAGES, T_STATE, T_END = 1, 2, 3, 4
_FRAME = struct.Struct("<BI")
_GPA = struct.Struct("<Q")
PAGES_PER_FRAME = 256
MAX_FRAME = PAGES_PER_FRAME * (PAGE_SIZE + 8) + 64
MAX_PASSES = 30
# config fields the two sides may differ in (where their consoles go, diagnostics)
LOCAL_FIELDS = {"serial", "debugcon", "log_post", "accounting", "name", "uuid", "sandbox"}


class MigrationError(PyhvError):
    pass


def parse_uri(uri: str) -> tuple[str, object]:
    """QEMU's migration URIs: tcp:HOST:PORT, unix:PATH, exec:COMMAND (the stream on the command's stdin/stdout)."""
    kind, sep, rest = uri.partition(":")
    if not sep or not rest:
        raise ConfigError(f"migration URI {uri!r}: expected tcp:HOST:PORT, unix:PATH or exec:COMMAND")
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if not port.isdigit():
            raise ConfigError(f"migration URI {uri!r}: the port is not a number")
        return "tcp", (host or "127.0.0.1", int(port))
    if kind == "unix":
        return "unix", rest
    if kind == "exec":
        return "exec", rest
    raise ConfigError(f"migration URI {uri!r}: {kind} is not supported", "use tcp:, unix: or exec:")


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in LOCAL_FIELDS}


class _Stream:
    """Frames over a socket or a pipe pair."""

    def __init__(self, reader: Callable[[int], bytes], writer: Callable[[bytes], None]) -> None:
        self.read, self.write = reader, writer

    def read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.read(n - len(out))
            if not chunk:
                raise MigrationError("the migration stream ended early")
            out += chunk
        return bytes(out)

    def send(self, kind: int, payload: bytes) -> None:
        self.write(_FRAME.pack(kind, len(payload)) + payload)

    def receive(self) -> tuple[int, bytes]:
        kind, length = _FRAME.unpack(self.read_exact(_FRAME.size))
        if length > MAX_FRAME:
            raise MigrationError(f"a migration frame of {length} bytes (at most {MAX_FRAME})")
        return kind, self.read_exact(length)


def _exec_stream(command: str) -> tuple[_Stream, Callable[[], None]]:
    """exec: URIs: COMMAND run by the shell, the stream written to its stdin and read from its stdout."""
    proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    stdin, stdout = proc.stdin, proc.stdout
    assert stdin is not None and stdout is not None

    def write(data: bytes) -> None:
        stdin.write(data)
        stdin.flush()

    def close() -> None:
        proc.kill()
        proc.wait()
    return _Stream(stdout.read1, write), close


class Migration:
    """The source side: one outgoing migration, on its own thread; `info()` is QMP's query-migrate."""

    def __init__(self, machine: "Machine", uri: str, downtime_limit_ms: int, max_bandwidth: int,
                 on_status: Callable[[str], None]) -> None:
        self.machine = machine
        self.kind, self.target = parse_uri(uri)
        self.downtime_limit = downtime_limit_ms / 1000
        self.max_bandwidth = max_bandwidth
        self.on_status = on_status
        self.status = "setup"
        self.error: str | None = None
        self.cancelled = False
        self.started = time.monotonic()
        self.setup_time = self.total_time = 0.0
        self.downtime: float | None = None
        self.expected_downtime = 0.0
        self.transferred = 0
        self.pages_sent = 0
        self.remaining = 0
        self.total = 0
        self.dirty_rate = 0.0
        self.mbps = 0.0
        self.passes = 0
        self.thread = threading.Thread(target=self._run, name="migration", daemon=True)

    def start(self) -> None:
        check_saveable(self.machine, "migrate")
        self._set_status("setup")
        self.thread.start()

    def info(self) -> dict:
        out: dict = {"status": self.status}
        if self.status in ("setup", "active", "completed", "failed", "cancelled", "device"):
            elapsed = (self.total_time if self.status in ("completed", "failed", "cancelled")
                       else time.monotonic() - self.started)
            out.update({"total-time": int(elapsed * 1000), "setup-time": int(self.setup_time * 1000),
                        "expected-downtime": int(self.expected_downtime * 1000),
                        "ram": {"transferred": self.transferred, "remaining": self.remaining, "total": self.total,
                                "duplicate": 0, "normal": self.pages_sent, "normal-bytes": self.pages_sent * PAGE_SIZE,
                                "dirty-pages-rate": int(self.dirty_rate), "mbps": self.mbps,
                                "dirty-sync-count": self.passes, "page-size": PAGE_SIZE}})
            if self.downtime is not None:
                out["downtime"] = int(self.downtime * 1000)
        if self.error:
            out["error-desc"] = self.error
        return out

    def _set_status(self, status: str) -> None:
        self.status = status
        self.on_status(status)

    # --- the work --------------------------------------------------------------------------------------------
    def _connect(self) -> tuple[_Stream, Callable[[], None]]:
        if self.kind == "exec":
            return _exec_stream(str(self.target))
        family = socket.AF_INET if self.kind == "tcp" else socket.AF_UNIX
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self.target)  # type: ignore[arg-type]
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Stream(sock.recv, sock.sendall), sock.close

    def _run(self) -> None:
        machine, memslots = self.machine, self.machine.memslots
        stream, close = None, lambda: None
        paused = released = False
        try:
            stream, close = self._connect()
            stream.write(MAGIC)
            stream.send(T_HELLO, json.dumps({"config": machine.config.to_dict()}).encode())
            generation = memslots.generation
            memslots.set_dirty_logging(True)
            memslots.dirty_pages()                           # start the log from now
            machine.guest_memory.dirty = set()               # and what pyhv writes itself
            pages = [page for start, size, _host, _ro in list(memslots.active)
                     for page in range(start, start + size, PAGE_SIZE)]
            self.total = len(pages) * PAGE_SIZE
            self.setup_time = time.monotonic() - self.started
            self._set_status("active")
            while True:
                self.remaining = len(pages) * PAGE_SIZE
                began = time.monotonic()
                self._send_pages(stream, pages)
                spent = max(time.monotonic() - began, 1e-6)
                bandwidth = max(len(pages) * PAGE_SIZE / spent, 1.0)
                self.mbps = bandwidth * 8 / 1e6
                if memslots.generation != generation:
                    raise MigrationError("the guest's memory map changed during the migration")
                pages = self._dirty()
                self.passes += 1
                self.dirty_rate = len(pages) / spent
                self.remaining = len(pages) * PAGE_SIZE
                self.expected_downtime = self.remaining / bandwidth
                if self.expected_downtime <= self.downtime_limit or self.passes >= MAX_PASSES:
                    break
            self._set_status("device")
            pause_started = time.monotonic()
            if machine.state == "running":
                machine.pause()
                paused = True
            pages = sorted(set(pages) | set(self._dirty()))   # left from the last pass, and since
            self.remaining = len(pages) * PAGE_SIZE
            self._send_pages(stream, pages)
            state = json.dumps(capture_state(machine)).encode()
            machine.inactivate_images()     # the destination locks the disks before it runs (QEMU's hand-over)
            released = True
            stream.send(T_STATE, state)
            self.transferred += len(state)
            stream.send(T_END, b"")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = stream.read(256)
                if not chunk:
                    raise MigrationError("the destination closed the stream before it confirmed")
                reply += chunk
            if not reply.startswith(b"OK"):
                raise MigrationError(f"the destination failed: {reply.decode(errors='replace').strip()}")
            self.downtime = time.monotonic() - pause_started
            self.remaining = 0
            machine.migrated = True
            self.total_time = time.monotonic() - self.started
            self._set_status("completed")
            log.info("migration completed: %d bytes in %.2f s, downtime %.0f ms", self.transferred,
                     self.total_time, self.downtime * 1000)
        except (OSError, MigrationError, SnapshotError, ValueError) as e:
            self.error = str(e) if not isinstance(e, OSError) else f"{e.strerror or e}"
            self.total_time = time.monotonic() - self.started
            log.warning("migration failed: %s; the VM runs on here", self.error)
            memslots.set_dirty_logging(False)
            if released:
                try:
                    machine.activate_images()
                except PyhvError as lost:
                    log.error("migration failed and the disks cannot be taken back (%s): the VM stays paused",
                              lost)
                    paused = False
            if paused:
                machine.resume()
            self._set_status("cancelled" if self.cancelled else "failed")
        finally:
            machine.guest_memory.dirty = None
            if self.status == "completed":
                memslots.set_dirty_logging(False)
            close()

    def _dirty(self) -> list[int]:
        pages = set(self.machine.memslots.dirty_pages())
        written = self.machine.guest_memory.dirty
        if written:
            self.machine.guest_memory.dirty = set()
            pages |= written
        return sorted(pages)

    def _send_pages(self, stream: _Stream, pages: list[int]) -> None:
        read = self.machine.guest_memory.view
        for i in range(0, len(pages), PAGES_PER_FRAME):
            if self.cancelled:
                raise MigrationError("cancelled")
            batch = pages[i:i + PAGES_PER_FRAME]
            payload = b"".join(_GPA.pack(gpa) + bytes(read(gpa, PAGE_SIZE)) for gpa in batch)
            stream.send(T_PAGES, payload)
            self.transferred += len(payload) + _FRAME.size
            self.pages_sent += len(batch)
            self.remaining = max(self.remaining - len(batch) * PAGE_SIZE, 0)
            if self.max_bandwidth:
                elapsed = time.monotonic() - self.started
                ahead = self.transferred / self.max_bandwidth - elapsed
                if ahead > 0:
                    time.sleep(ahead)


class Incoming:
    """The destination side: listen (or read stdin for exec:), load the stream, start the VM."""

    def __init__(self, machine: "Machine", uri: str, on_status: Callable[[str], None]) -> None:
        self.machine = machine
        self.kind, self.target = parse_uri(uri)
        self.on_status = on_status
        self.status = "setup"
        self.error: str | None = None
        self.received = 0
        self.listener: socket.socket | None = None
        if self.kind in ("tcp", "unix"):
            family = socket.AF_INET if self.kind == "tcp" else socket.AF_UNIX
            try:
                if family == socket.AF_INET:
                    self.listener = socket.socket(family, socket.SOCK_STREAM)
                    self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    self.listener.bind(self.target)  # type: ignore[arg-type]
                else:                               # 0600 from the start: guest RAM comes through it
                    self.listener = bind_private_socket(str(self.target))
            except OSError as e:
                raise ConfigError(f"--incoming {uri}: cannot listen: {e.strerror}") from None
            self.listener.listen(1)
            where = self.listener.getsockname()
            self.address = f"{where[0]}:{where[1]}" if family == socket.AF_INET else str(where)

    def info(self) -> dict:
        out: dict = {"status": self.status}
        if self.error:
            out["error-desc"] = self.error
        return out

    def run(self) -> None:
        """Receive the VM; raises MigrationError (the destination then exits) if the stream is bad or ends."""
        if self.listener is not None:
            print(f"pyhv: waiting for the migration on {self.kind}:{self.address}", file=sys.stderr, flush=True)
        self.status = "active"
        self.on_status("active")
        close: Callable[[], object] = lambda: None
        try:
            if self.listener is not None:
                conn, _ = self.listener.accept()
                conn.settimeout(60)
                stream, close = _Stream(conn.recv, conn.sendall), conn.close
            else:                                       # exec: the stream is the command's output
                stream, close = _exec_stream(str(self.target))
            reply = stream.write
            try:
                self._receive(stream)
            except (MigrationError, SnapshotError, ValueError, KeyError) as e:
                try:
                    reply(f"ERR {e}\n".encode())
                except OSError:
                    pass
                raise MigrationError(str(e)) from None
            try:
                self.machine.activate_images()
            except PyhvError as e:
                try:
                    reply(f"ERR {e}\n".encode())
                except OSError:
                    pass
                raise MigrationError(str(e)) from None
            self.machine.start()
            reply(b"OK\n")
            self.status = "completed"
            self.on_status("completed")
        except (OSError, MigrationError) as e:
            self.status, self.error = "failed", str(e)
            self.on_status("failed")
            raise MigrationError(f"incoming migration failed: {e}") from None
        finally:
            close()
            if self.listener is not None:
                self.listener.close()
                if self.kind == "unix":
                    try:
                        os.unlink(str(self.target))
                    except OSError:
                        pass

    def _receive(self, stream: _Stream) -> None:
        if stream.read_exact(len(MAGIC)) != MAGIC:
            raise MigrationError("not a pyhv migration stream (or another version)")
        memory = self.machine.guest_memory
        while True:
            kind, payload = stream.receive()
            self.received += len(payload) + _FRAME.size
            if kind == T_HELLO:
                theirs = _comparable(json.loads(payload)["config"])
                ours = _comparable(self.machine.config.to_dict())
                differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
                if differ:
                    raise MigrationError(f"the source's VM differs from this one in {', '.join(differ)}")
            elif kind == T_PAGES:
                if len(payload) % (PAGE_SIZE + 8):
                    raise MigrationError("a page frame of the wrong size")
                for at in range(0, len(payload), PAGE_SIZE + 8):
                    gpa = _GPA.unpack_from(payload, at)[0]
                    memory.write(gpa, payload[at + 8:at + 8 + PAGE_SIZE], rom=True)
            elif kind == T_STATE:
                load_machine_state(self.machine, json.loads(payload))
            elif kind == T_END:
                return
            else:
                raise MigrationError(f"unknown migration frame type {kind}")
