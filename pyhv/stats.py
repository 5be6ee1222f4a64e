"""`ExitStats`: per-vCPU counts and handling time of exits, by reason, by port and by MMIO region.

The vCPU loop updates plain lists and dicts in place (no allocation after the first exit of a kind); reports
merge the vCPUs and name each port and region after the device that owns it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pyhv.kvm.constants import EXIT_REASON_NAMES

MAX_EXIT_REASON = 64


@dataclass
class ExitStats:
    by_reason: list[list[int]] = field(default_factory=lambda: [[0, 0] for _ in range(MAX_EXIT_REASON)])
    by_port: dict[int, list[int]] = field(default_factory=dict)       # port -> [count, ns]
    by_mmio: dict[object, list[int]] = field(default_factory=dict)    # MemoryRegion (None: unassigned) -> [count, ns]
    run: list[int] = field(default_factory=lambda: [0, 0])            # [KVM_RUN calls, ns inside KVM_RUN]
    fallbacks: dict[str, int] = field(default_factory=dict)           # instructions pyhv completed itself

    @property
    def exits(self) -> int:
        return sum(c for c, _ in self.by_reason)

    @property
    def handling_ns(self) -> int:
        return sum(ns for _, ns in self.by_reason)

    @classmethod
    def merge(cls, many: list["ExitStats"]) -> "ExitStats":
        total = cls()
        for s in many:
            for i, (c, ns) in enumerate(s.by_reason):
                total.by_reason[i][0] += c
                total.by_reason[i][1] += ns
            for table, out in ((s.by_port, total.by_port), (s.by_mmio, total.by_mmio)):
                for key, (c, ns) in list(table.items()):
                    cell = out.setdefault(key, [0, 0])
                    cell[0] += c
                    cell[1] += ns
            total.run[0] += s.run[0]
            total.run[1] += s.run[1]
            for key, n in s.fallbacks.items():
                total.fallbacks[key] = total.fallbacks.get(key, 0) + n
        return total

    def as_dict(self, port_owner: Callable[[int], str] = lambda p: "?") -> dict:
        """A JSON-friendly form (QMP `query-exit-stats`, the Python API)."""
        reasons = {EXIT_REASON_NAMES.get(i, str(i)): {"count": c, "ns": ns}
                   for i, (c, ns) in enumerate(self.by_reason) if c}
        ports = {f"{p:#06x}": {"count": c, "ns": ns, "device": port_owner(p)}
                 for p, (c, ns) in sorted(self.by_port.items())}
        mmio: dict[str, dict] = {}
        for region, (c, ns) in self.by_mmio.items():
            name = getattr(region, "name", "unassigned")
            cell = mmio.setdefault(name, {"count": 0, "ns": 0})
            cell["count"] += c
            cell["ns"] += ns
        return {"exits": self.exits, "kvm_run_calls": self.run[0], "kvm_run_ns": self.run[1],
                "handling_ns": self.handling_ns, "by_reason": reasons, "by_port": ports, "by_mmio": mmio,
                "fallbacks": dict(self.fallbacks)}

    def report(self, port_owner: Callable[[int], str] = lambda p: "?", header: str = "") -> str:
        lines = []
        if header:
            lines.append(header)
        total_ns = self.run[1] + self.handling_ns
        lines.append(f"exits: {self.exits}   time in KVM_RUN: {self.run[1] / 1e9:.3f} s   "
                     f"handling exits in pyhv: {self.handling_ns / 1e9:.3f} s"
                     + (f" ({100 * self.handling_ns / total_ns:.1f}%)" if total_ns else ""))
        lines.append(f"  {'by reason':<28}{'count':>12}{'total ms':>12}{'avg us':>10}")
        for i, (c, ns) in enumerate(self.by_reason):
            if c:
                lines.append(f"  {EXIT_REASON_NAMES.get(i, str(i)):<28}{c:>12}{ns / 1e6:>12.2f}{ns / c / 1e3:>10.2f}")
        if self.by_port:
            lines.append(f"  {'by port':<28}{'count':>12}{'total ms':>12}{'avg us':>10}")
            for port, (c, ns) in sorted(self.by_port.items(), key=lambda kv: -kv[1][0]):
                label = f"{port:#06x} {port_owner(port)}"
                lines.append(f"  {label:<28}{c:>12}{ns / 1e6:>12.2f}{ns / c / 1e3:>10.2f}")
        if self.by_mmio:
            merged: dict[str, list[int]] = {}
            for region, (c, ns) in self.by_mmio.items():
                cell = merged.setdefault(getattr(region, "name", "unassigned"), [0, 0])
                cell[0] += c
                cell[1] += ns
            lines.append(f"  {'by MMIO region':<28}{'count':>12}{'total ms':>12}{'avg us':>10}")
            for name, (c, ns) in sorted(merged.items(), key=lambda kv: -kv[1][0]):
                lines.append(f"  {name:<28}{c:>12}{ns / 1e6:>12.2f}{ns / c / 1e3:>10.2f}")
        if self.fallbacks:
            lines.append("  instructions completed by pyhv (KVM's emulator failed): "
                         + ", ".join(f"{k} {v}" for k, v in sorted(self.fallbacks.items())))
        return "\n".join(lines)
