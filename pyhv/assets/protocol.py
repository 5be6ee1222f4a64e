"""The console protocol of pyhv's guest initramfs (/init), as the host sees it.

Kernel command line (read by /init from /proc/cmdline):
    pyhv.cmd="COMMAND"     run COMMAND with `sh -c` (in the double quotes: spaces, `;`, `|`, `$` and every other
                           character except `"` and newlines; the kernel keeps quoted spaces together)
    pyhv.cmd=COMMAND       the same for a COMMAND with no spaces
    pyhv.cmd64=BASE64      the same for any COMMAND, base64-encoded (standard alphabet, with padding)
    pyhv.agent=1           agent mode (below)
    virtio_mmio.device=... passed to `insmod virtio_mmio` when virtio_mmio is a module (stock kernel)
`encode_command()` picks the form for a command.

Console output of /init, each marker on its own line (lines end in "\\r\\n" on a serial console):
    PYHV-INIT uptime=SECONDS start=S    set-up done (file systems mounted, modules loaded); SECONDS from
                                        /proc/uptime, S the uptime when /init had mounted its file systems
    PYHV-EXIT-STATUS=N                  after the command's output: its exit status (0-255)
    PYHV-AGENT-READY                    agent mode: ready for commands
A command's output that does not end in a newline is followed by the status marker on the same line, so find the
marker with `EXIT_STATUS_RE` (it ends a line).

Ending the VM: after pyhv.cmd, /init runs `pyhv-exit N` (also available to commands and the shell): it writes N
to I/O port 0xf4 through /dev/port, which pyhv's and QEMU's debug-exit device turn into the VMM's exit status
(N << 1) | 1; without that device it resets the machine (`reboot -f`), which ends pyhv and `qemu -no-reboot` with
status 0. Without pyhv.cmd or pyhv.agent, /init runs an interactive shell on the console and resets when it exits.

Before running pyhv.cmd or agent commands, /init sets the console log level to 4: kernel messages of level error
and worse still reach the console (and may interleave with command output), routine ones (a file system mounted,
a clock source switched) only the kernel log (`dmesg`). `ignore_loglevel` on the command line shows them all.

Agent mode (pyhv.agent=1): /init turns off the console's echo, prints PYHV-AGENT-READY and then reads commands,
one per line ("\\n"-terminated, at most 4095 bytes; empty lines are ignored). Each runs with `sh -c` and stdin
from /dev/null; its stdout and stderr go to the console, followed by PYHV-EXIT-STATUS=N.
`pyhv-exit N` as a command ends the VM. `GuestAgent` implements the host side.
"""
from __future__ import annotations

import base64
import os
import re
import selectors
import time
from dataclasses import dataclass
from typing import BinaryIO

INIT_MARKER = "PYHV-INIT"
EXIT_STATUS_MARKER = "PYHV-EXIT-STATUS="
AGENT_READY = "PYHV-AGENT-READY"
INIT_RE = re.compile(r"PYHV-INIT uptime=(\d+(?:\.\d+)?)(?: start=(\d+(?:\.\d+)?))?")
EXIT_STATUS_RE = re.compile(r"PYHV-EXIT-STATUS=(\d+)\r?$", re.MULTILINE)
DEBUG_EXIT_PORT = 0xF4

_PLAIN_SAFE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def encode_command(command: str) -> str:
    """The kernel command-line parameter that makes /init run `command`."""
    if not command:
        raise ValueError("empty command")
    if _PLAIN_SAFE.match(command):
        return f"pyhv.cmd={command}"
    if '"' not in command and command.isascii() and command.isprintable():
        return f'pyhv.cmd="{command}"'
    return "pyhv.cmd64=" + base64.b64encode(command.encode()).decode()


def debug_exit_status(guest_status: int) -> int:
    """The VMM's exit status after /init's `pyhv-exit guest_status` reached the debug-exit port."""
    return ((guest_status & 0xFF) << 1) | 1


def parse_init_uptime(console: str) -> float | None:
    """The guest's uptime at the PYHV-INIT marker, or None without one."""
    m = INIT_RE.search(console)
    return float(m.group(1)) if m else None


def parse_init_start(console: str) -> float | None:
    """The guest's uptime when /init started (had mounted /proc), or None."""
    m = INIT_RE.search(console)
    return float(m.group(2)) if m and m.group(2) else None


def parse_exit_status(console: str) -> int | None:
    """The status of the first PYHV-EXIT-STATUS marker in console output, or None."""
    m = EXIT_STATUS_RE.search(console)
    return int(m.group(1)) if m else None


def command_output(console: str) -> str | None:
    """What a pyhv.cmd printed: the console text between the PYHV-INIT line and the status marker, with the
    serial console's "\\r\\n" turned into "\\n"."""
    text = console.replace("\r\n", "\n")
    start = INIT_RE.search(text)
    end = EXIT_STATUS_RE.search(text, start.end() if start else 0)
    if not start or not end:
        return None
    body = text[start.end():end.start()]
    return body[1:] if body.startswith("\n") else body


@dataclass
class AgentResult:
    status: int
    output: str


class AgentTimeout(TimeoutError):
    """The guest did not answer within the timeout; `console` holds what it printed so far."""

    def __init__(self, message: str, console: str) -> None:
        super().__init__(message)
        self.console = console


class GuestAgent:
    """The host side of agent mode over a console byte stream (a pipe to `qemu -serial stdio`, a socket chardev,
    a pty): `wait_ready()`, then `run(command)` as often as needed, then `exit(status)`.

    `reader` and `writer` are binary file objects; reading uses the reader's file descriptor with a timeout.
    Everything the guest printed is kept in `console`."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO) -> None:
        self.reader = reader
        self.writer = writer
        self.console = ""
        self._pending = ""
        self._selector = selectors.DefaultSelector()
        self._selector.register(reader.fileno(), selectors.EVENT_READ)

    def read_until(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Reads the console until `pattern` matches what is not consumed yet (AgentTimeout if it does not)."""
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self._pending)
            if m:
                return m
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._selector.select(remaining):
                raise AgentTimeout(f"no {pattern.pattern!r} from the guest within {timeout} s", self.console)
            data = os.read(self.reader.fileno(), 65536)
            if not data:
                raise AgentTimeout(f"console closed before {pattern.pattern!r}", self.console)
            text = data.decode(errors="replace")
            self.console += text
            self._pending += text

    def wait_ready(self, timeout: float = 120.0) -> None:
        m = self.read_until(re.compile(AGENT_READY + r"\r?\n"), timeout)
        self._pending = self._pending[m.end():]

    def run(self, command: str, timeout: float = 60.0) -> AgentResult:
        if "\n" in command or not command.strip():
            raise ValueError("an agent command is one non-empty line")
        self.writer.write(command.encode() + b"\n")
        self.writer.flush()
        m = self.read_until(re.compile(EXIT_STATUS_MARKER + r"(\d+)\r?\n"), timeout)
        output = self._pending[:m.start()].replace("\r\n", "\n")
        self._pending = self._pending[m.end():]
        return AgentResult(int(m.group(1)), output)

    def exit(self, status: int = 0) -> None:
        """Asks the guest to end the VM (`pyhv-exit status`); does not wait."""
        self.writer.write(f"pyhv-exit {int(status)}\n".encode())
        self.writer.flush()

    def close(self) -> None:
        self._selector.close()
