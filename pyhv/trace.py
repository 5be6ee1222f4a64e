"""`--trace REGEX`: log accesses to the device registers (and other named events) whose names match.

Names look like `serial0.lcr` or `fw_cfg.data`. Whether a name is traced is decided once, when the device is
built, so tracing costs nothing on the exit path when it is off.
"""
from __future__ import annotations

import logging
import re

log = logging.getLogger("pyhv.trace")
_pattern: re.Pattern[str] | None = None


def set_pattern(regex: str | None) -> None:
    global _pattern
    _pattern = re.compile(regex) if regex else None


def enabled(name: str) -> bool:
    """True if tracing is on at all: the device then checks each full name (`name.register`) with `matches`."""
    return _pattern is not None


def matches(name: str) -> bool:
    return _pattern is not None and bool(_pattern.search(name))


def log_access(name: str, kind: str, size: int, value: int) -> None:
    if matches(name):
        log.info("%s %s size=%d value=%#x", name, kind, size, value)


def event(name: str, message: str, *args: object) -> None:
    if matches(name):
        log.info("%s: " + message, name, *args)
