"""Errors a user can cause. The CLI prints them as one line (with the fix) and exits with code 2.

Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations


class PyhvError(Exception):
    """A problem the user can fix: a bad path, option, config or an unusable host."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(PyhvError):
    """An invalid VM configuration (CLI flag, JSON, XML)."""


class KvmUnavailableError(PyhvError):
    """/dev/kvm cannot be used."""


class GuestImageError(PyhvError):
    """A firmware, kernel, initrd or disk image that cannot be used."""
