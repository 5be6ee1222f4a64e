"""`ExitStats`: per-vCPU counts and times of exits, by port, by MMIO region and by exit reason.

Each exit updates exactly one cell, `[count, handling ns, KVM_RUN ns]`: the number of such exits, the time pyhv
spent handling them, and the time spent inside KVM_RUN before them (guest execution plus the kernel's share of
the round trip). Port exits are kept by port, MMIO exits by region, all other exits by reason; the totals by
reason, the time inside KVM_RUN and the number of KVM_RUN calls are derived when a report is made. This keeps
the vCPU loop's accounting to two clock reads and three additions per exit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from pyhv.kvm.constants import EXIT_REASON_NAMES, KVM_EXIT_IO, KVM_EXIT_MMIO

MAX_EXIT_REASON = 64


def _new_cells() -> list[list[int]]:
    return [[0, 0, 0] for _ in range(MAX_EXIT_REASON)]


def _add(cell: list[int], other: Iterable[int]) -> None:
    for i, value in enumerate(other):
        cell[i] += value


@dataclass
class ExitStats:
    by_reason: list[list[int]] = field(default_factory=_new_cells)    # exits other than port and MMIO
    by_port: dict[int, list[int]] = field(default_factory=dict)       # port -> cell
    by_mmio: dict[object, list[int]] = field(default_factory=dict)    # MemoryRegion (None: unassigned) -> cell
    fallbacks: dict[str, int] = field(default_factory=dict)           # instructions pyhv completed itself

    def _cells(self) -> Iterable[list[int]]:
        yield from self.by_reason
        yield from list(self.by_port.values())
        yield from list(self.by_mmio.values())

    def reason_totals(self) -> dict[int, list[int]]:
        """[count, handling ns, KVM_RUN ns] per exit reason, port and MMIO exits included."""
        totals = {i: list(cell) for i, cell in enumerate(self.by_reason) if cell[0]}
        for reason, table in ((KVM_EXIT_IO, self.by_port), (KVM_EXIT_MMIO, self.by_mmio)):
            if table:
                cell = totals.setdefault(reason, [0, 0, 0])
                for other in list(table.values()):
                    _add(cell, other)
        return totals

    @property
    def kvm_run_calls(self) -> int:
        return sum(cell[0] for cell in self._cells())

    @property
    def kvm_run_ns(self) -> int:
        return sum(cell[2] for cell in self._cells())

    @property
    def exits(self) -> int:
        """Exits handled, not counting KVM_RUN calls that a kick interrupted."""
        from pyhv.kvm.constants import KVM_EXIT_INTR
        return self.kvm_run_calls - self.by_reason[KVM_EXIT_INTR][0]

    @property
    def handling_ns(self) -> int:
        return sum(cell[1] for cell in self._cells())

    @classmethod
    def merge(cls, many: list["ExitStats"]) -> "ExitStats":
        total = cls()
        for s in many:
            for mine, other in zip(total.by_reason, s.by_reason):
                _add(mine, other)
            for table, out in ((s.by_port, total.by_port), (s.by_mmio, total.by_mmio)):
                for key, cell in list(table.items()):
                    _add(out.setdefault(key, [0, 0, 0]), cell)
            for key, n in s.fallbacks.items():
                total.fallbacks[key] = total.fallbacks.get(key, 0) + n
        return total

    def _mmio_by_name(self) -> dict[str, list[int]]:
        merged: dict[str, list[int]] = {}
        for region, cell in list(self.by_mmio.items()):
            _add(merged.setdefault(getattr(region, "name", "unassigned"), [0, 0, 0]), cell)
        return merged

    def as_dict(self, port_owner: Callable[[int], str] = lambda p: "?") -> dict:
        """A JSON-friendly form (QMP `query-exit-stats`, the Python API)."""
        reasons = {EXIT_REASON_NAMES.get(i, str(i)): {"count": c, "ns": ns, "kvm_run_ns": run}
                   for i, (c, ns, run) in sorted(self.reason_totals().items())}
        ports = {f"{p:#06x}": {"count": c, "ns": ns, "device": port_owner(p)}
                 for p, (c, ns, _) in sorted(self.by_port.items())}
        mmio = {name: {"count": c, "ns": ns} for name, (c, ns, _) in self._mmio_by_name().items()}
        return {"exits": self.exits, "kvm_run_calls": self.kvm_run_calls, "kvm_run_ns": self.kvm_run_ns,
                "handling_ns": self.handling_ns, "by_reason": reasons, "by_port": ports, "by_mmio": mmio,
                "fallbacks": dict(self.fallbacks)}

    def report(self, port_owner: Callable[[int], str] = lambda p: "?", header: str = "") -> str:
        lines = [header] if header else []
        run_ns, handling = self.kvm_run_ns, self.handling_ns
        total_ns = run_ns + handling
        lines.append(f"exits: {self.exits}   time in KVM_RUN: {run_ns / 1e9:.3f} s   "
                     f"handling exits in pyhv: {handling / 1e9:.3f} s"
                     + (f" ({100 * handling / total_ns:.1f}%)" if total_ns else ""))
        row = "  {:<28}{:>12}{:>12}{:>10}"
        lines.append(row.format("by reason", "count", "total ms", "avg us"))
        for i, (c, ns, _) in sorted(self.reason_totals().items()):
            lines.append(f"  {EXIT_REASON_NAMES.get(i, str(i)):<28}{c:>12}{ns / 1e6:>12.2f}{ns / c / 1e3:>10.2f}")
        if self.by_port:
            lines.append(row.format("by port", "count", "total ms", "avg us"))
            for port, (c, ns, _) in sorted(self.by_port.items(), key=lambda kv: -kv[1][0]):
                label = f"{port:#06x} {port_owner(port)}"
                lines.append(f"  {label:<28}{c:>12}{ns / 1e6:>12.2f}{ns / c / 1e3:>10.2f}")
        if self.by_mmio:
            lines.append(row.format("by MMIO region", "count", "total ms", "avg us"))
            for name, (c, ns, _) in sorted(self._mmio_by_name().items(), key=lambda kv: -kv[1][0]):
                lines.append(f"  {name:<28}{c:>12}{ns / 1e6:>12.2f}{ns / c / 1e3:>10.2f}")
        if self.fallbacks:
            lines.append("  instructions completed by pyhv (KVM's emulator failed): "
                         + ", ".join(f"{k} {v}" for k, v in sorted(self.fallbacks.items())))
        return "\n".join(lines)
