"""Host ends of the guest's character devices (serial, debug console): `stdio`, `file:PATH`, `socket:PATH`,
`pty`, `none`.

stdio on a terminal switches it to raw mode (restored on exit) with QEMU's escape key: `Ctrl-a x` quits,
`Ctrl-a s` prints exit statistics, `Ctrl-a h` lists the keys, `Ctrl-a Ctrl-a` sends a Ctrl-a to the guest.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import socket
import sys
import termios
import threading
from dataclasses import dataclass
from typing import Callable

from pyhv.errors import ConfigError
from pyhv.runtime.iothread import IoThread

log = logging.getLogger(__name__)

CTRL_A = 0x01
SOCKET_BACKLOG_BYTES = 64 * 1024


@dataclass(frozen=True)
class ChardevSpec:
    """A parsed `--serial`/`--debugcon` value."""
    kind: str                   # stdio | file | socket | pty | none
    path: str | None = None
    logfile: str | None = None  # also copy the guest's output to this file (QEMU's logfile=)

    KINDS = ("stdio", "file", "socket", "pty", "none")

    @classmethod
    def parse(cls, text: str, option: str = "--serial") -> "ChardevSpec":
        """`KIND[:PATH][,logfile=FILE]`."""
        text, _, log_opt = text.partition(",logfile=")
        if _ and not log_opt:
            raise ConfigError(f"{option}: logfile= needs a path")
        if log_opt:
            return dataclasses.replace(cls.parse(text, option), logfile=log_opt)
        kind, _, path = text.partition(":")
        if kind not in cls.KINDS:
            raise ConfigError(f"{option} {text!r}: unknown backend {kind!r}",
                              "use stdio, file:PATH, socket:PATH, pty or none")
        if kind in ("file", "socket") and not path:
            raise ConfigError(f"{option} {text!r}: {kind} needs a path", f"write {kind}:PATH")
        if kind not in ("file", "socket") and path:
            raise ConfigError(f"{option} {text!r}: {kind} takes no path")
        return cls(kind, path or None)

    def __str__(self) -> str:
        text = f"{self.kind}:{self.path}" if self.path else self.kind
        return f"{text},logfile={self.logfile}" if self.logfile else text


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            import select
            select.select([], [fd], [])
            continue
        view = view[n:]


class Chardev:
    """Guest output goes to `write`; host input is delivered to the receiver given to `attach`."""

    def __init__(self) -> None:
        self.receiver: Callable[[bytes], None] | None = None
        self.iothread: IoThread | None = None

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def attach(self, receiver: Callable[[bytes], None], iothread: IoThread) -> None:
        self.receiver, self.iothread = receiver, iothread

    def close(self) -> None:
        pass


class NullChardev(Chardev):
    def write(self, data: bytes) -> None:
        pass


class FileChardev(Chardev):
    def __init__(self, path: str) -> None:
        super().__init__()
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot open {path} for writing: {e.strerror}")
        self.path = path

    def write(self, data: bytes) -> None:
        _write_all(self.fd, data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StdioChardev(Chardev):
    HELP = (b"\r\nC-a h    print this help\r\nC-a x    exit pyhv\r\nC-a s    print exit statistics\r\n"
            b"C-a C-a  send C-a to the guest\r\n")

    def __init__(self, on_quit: Callable[[], None] | None = None,
                 on_stats: Callable[[], str] | None = None) -> None:
        super().__init__()
        self.on_quit = on_quit or (lambda: None)
        self.on_stats = on_stats
        self.out_fd = sys.stdout.fileno()
        self.in_fd = sys.stdin.fileno() if sys.stdin is not None else -1
        self.interactive = self.in_fd >= 0 and os.isatty(self.in_fd)
        self._saved_tty: list | None = None
        self._escape = False

    def write(self, data: bytes) -> None:
        _write_all(self.out_fd, data)

    def attach(self, receiver: Callable[[bytes], None], iothread: IoThread) -> None:
        super().attach(receiver, iothread)
        if self.in_fd < 0 or not _pollable(self.in_fd):
            return                 # /dev/null or a regular file: epoll cannot watch it, and it holds no typing
        if self.interactive:
            self._raw_mode()
        os.set_blocking(self.in_fd, False)
        iothread.add_reader(self.in_fd, self._on_input)

    def _raw_mode(self) -> None:
        self._saved_tty = termios.tcgetattr(self.in_fd)
        attrs = termios.tcgetattr(self.in_fd)
        attrs[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
                      | termios.IGNCR | termios.ICRNL | termios.IXON)
        attrs[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
        attrs[2] = (attrs[2] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
        attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0     # keep OPOST: "\n" still returns the carriage
        termios.tcsetattr(self.in_fd, termios.TCSANOW, attrs)
        atexit.register(self._restore)

    def _restore(self) -> None:
        if self._saved_tty is not None:
            termios.tcsetattr(self.in_fd, termios.TCSANOW, self._saved_tty)
            self._saved_tty = None

    def _on_input(self) -> None:
        try:
            data = os.read(self.in_fd, 4096)
        except BlockingIOError:
            return
        if not data:                       # end of input (a pipe closed): stop listening, keep running
            self.iothread.remove_reader(self.in_fd)
            return
        if self.interactive:
            data = self._escapes(data)
        if data and self.receiver:
            self.receiver(data)

    def _escapes(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            if self._escape:
                self._escape = False
                if byte == ord("x"):
                    self.write(b"\r\npyhv: terminated by C-a x\r\n")
                    self.on_quit()
                    return bytes(out)
                if byte == ord("h"):
                    self.write(self.HELP)
                elif byte == ord("s") and self.on_stats:
                    self.write(self.on_stats().replace("\n", "\r\n").encode() + b"\r\n")
                elif byte == CTRL_A:
                    out.append(CTRL_A)
                continue
            if byte == CTRL_A:
                self._escape = True
            else:
                out.append(byte)
        return bytes(out)

    def close(self) -> None:
        if self.iothread and self.in_fd >= 0:
            self.iothread.remove_reader(self.in_fd)
        self._restore()


class SocketChardev(Chardev):
    """A Unix socket server (mode 0600). One client at a time; output waiting for a client is kept (up to
    64 KiB, oldest dropped with a note) and delivered when one connects."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        try:
            if os.path.exists(path) and _is_socket(path):
                os.unlink(path)
            self.server = bind_private_socket(path)
        except OSError as e:
            raise ConfigError(f"cannot create socket {path}: {e.strerror}")
        self.server.listen(1)
        self.server.setblocking(False)
        self.client: socket.socket | None = None
        self.backlog = bytearray()
        self.dropped = 0
        self.lock = threading.Lock()

    def attach(self, receiver: Callable[[bytes], None], iothread: IoThread) -> None:
        super().attach(receiver, iothread)
        iothread.add_reader(self.server.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        try:
            client, _ = self.server.accept()
        except BlockingIOError:
            return
        with self.lock:
            if self.client is not None:     # one client at a time, as QEMU's socket chardev
                try:
                    client.send(b"pyhv: the console is in use by another client\r\n")
                except OSError:
                    pass
                client.close()
                return
            self.client = client
            backlog, self.backlog = bytes(self.backlog), bytearray()
            if self.dropped:
                backlog = f"[pyhv: {self.dropped} earlier bytes dropped]\n".encode() + backlog
                self.dropped = 0
        client.sendall(backlog)
        client.setblocking(False)
        self.iothread.add_reader(client.fileno(), self._on_input)

    def _on_input(self) -> None:
        client = self.client
        if client is None:
            return
        try:
            data = client.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_client()
            return
        if self.receiver:
            self.receiver(data)

    def _drop_client(self) -> None:
        with self.lock:
            client, self.client = self.client, None
        if client is not None:
            self.iothread.remove_reader(client.fileno())
            client.close()

    def write(self, data: bytes) -> None:
        with self.lock:
            client = self.client
            if client is None:
                self.backlog += data
                excess = len(self.backlog) - SOCKET_BACKLOG_BYTES
                if excess > 0:
                    del self.backlog[:excess]
                    self.dropped += excess
                return
        try:
            client.setblocking(True)
            client.sendall(data)
            client.setblocking(False)
        except OSError:
            self.iothread.call_soon(self._drop_client) if self.iothread else None

    def close(self) -> None:
        self._drop_client() if self.iothread else None
        self.server.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class PtyChardev(Chardev):
    def __init__(self) -> None:
        super().__init__()
        self.master, slave = os.openpty()
        self.slave_path = os.ttyname(slave)
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~(termios.ECHO | termios.ICANON)
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        self._slave = slave          # kept open so guest output is buffered until someone attaches
        os.set_blocking(self.master, False)
        log.warning("char device redirected to %s", self.slave_path)

    def attach(self, receiver: Callable[[bytes], None], iothread: IoThread) -> None:
        super().attach(receiver, iothread)
        iothread.add_reader(self.master, self._on_input)

    def _on_input(self) -> None:
        try:
            data = os.read(self.master, 4096)
        except (BlockingIOError, OSError):
            return
        if data and self.receiver:
            self.receiver(data)

    def write(self, data: bytes) -> None:
        try:
            os.write(self.master, data)
        except BlockingIOError:
            pass                     # nobody reads the pty and its buffer is full: like a real unplugged line

    def close(self) -> None:
        if self.iothread:
            self.iothread.remove_reader(self.master)
        os.close(self.master)
        os.close(self._slave)


def bind_private_socket(path: str) -> socket.socket:
    """A Unix stream socket bound at `path` with mode 0600 from the start (bound under a 0177 umask, so there
    is no moment when another user could connect). Raises OSError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    return sock


def _pollable(fd: int) -> bool:
    import select
    probe = select.epoll()
    try:
        probe.register(fd, select.EPOLLIN)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _is_socket(path: str) -> bool:
    import stat
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class TeeChardev(Chardev):
    """A chardev whose output is also appended to a log file (`,logfile=`); input comes from the inner one."""

    def __init__(self, inner: Chardev, logfile: str) -> None:
        super().__init__()
        self.inner = inner
        try:
            self.log_fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as e:
            inner.close()
            raise ConfigError(f"cannot open log file {logfile}: {e.strerror}")

    def write(self, data: bytes) -> None:
        if self.log_fd >= 0:
            _write_all(self.log_fd, data)
        self.inner.write(data)

    def attach(self, receiver: Callable[[bytes], None], iothread: IoThread) -> None:
        super().attach(receiver, iothread)
        self.inner.attach(receiver, iothread)

    def close(self) -> None:
        self.inner.close()
        if self.log_fd >= 0:
            os.close(self.log_fd)
            self.log_fd = -1


def open_chardev(spec: ChardevSpec, on_quit: Callable[[], None] | None = None,
                 on_stats: Callable[[], str] | None = None) -> Chardev:
    if spec.logfile:
        return TeeChardev(open_chardev(dataclasses.replace(spec, logfile=None), on_quit, on_stats), spec.logfile)
    if spec.kind == "stdio":
        return StdioChardev(on_quit, on_stats)
    if spec.kind == "file":
        return FileChardev(spec.path)
    if spec.kind == "socket":
        return SocketChardev(spec.path)
    if spec.kind == "pty":
        return PtyChardev()
    return NullChardev()
