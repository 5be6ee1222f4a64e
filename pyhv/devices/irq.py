"""Interrupt lines as devices see them: an object with `set_level`, never KVM itself."""
from __future__ import annotations

from typing import Callable, Protocol


class IrqLine(Protocol):
    def set_level(self, level: bool) -> None: ...


class CallbackIrqLine:
    """An interrupt line that calls `fn(level)` on every change (the machine passes a KVM_IRQ_LINE caller)."""

    __slots__ = ("fn", "level", "raised")

    def __init__(self, fn: Callable[[bool], None]) -> None:
        self.fn = fn
        self.level = False
        self.raised = 0      # rising edges, for statistics and tests

    def set_level(self, level: bool) -> None:
        level = bool(level)
        if level != self.level:
            self.level = level
            if level:
                self.raised += 1
            self.fn(level)

    def pulse(self) -> None:
        self.set_level(True)
        self.set_level(False)


class NullIrqLine(CallbackIrqLine):
    def __init__(self) -> None:
        super().__init__(lambda level: None)
