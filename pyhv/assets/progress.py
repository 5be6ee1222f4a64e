"""Progress on stderr for long guest-asset steps, without flooding logs.

On a terminal, transient status (e.g. the kernel build's file count) rewrites one line; otherwise it is printed
at most once per `interval` seconds. Steps (`step`, `done`) are always printed, one line each.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

PREFIX = "pyhv guest: "


class Progress:
    def __init__(self, stream: TextIO | None = None, quiet: bool = False, interval: float = 30.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.interval = interval
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_status = 0.0
        self._status_shown = False

    def _clear(self) -> None:
        if self._status_shown and self.tty:
            self.stream.write("\r\033[K")
        self._status_shown = False

    def step(self, message: str) -> None:
        if self.quiet:
            return
        self._clear()
        self.stream.write(PREFIX + message + "\n")
        self.stream.flush()

    def status(self, message: str) -> None:
        """A transient line: rewritten in place on a terminal, rate-limited elsewhere."""
        if self.quiet:
            return
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\033[K" + PREFIX + message[:150])
            self._status_shown = True
        elif now - self._last_status >= self.interval:
            self.stream.write(PREFIX + message + "\n")
            self._last_status = now
        else:
            return
        self.stream.flush()

    def done(self, message: str, started: float) -> None:
        self.step(f"{message} ({time.monotonic() - started:.1f} s)")

