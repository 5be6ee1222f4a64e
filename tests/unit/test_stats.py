"""Exit statistics: merging per-vCPU counters and naming ports in reports."""
from __future__ import annotations

from pyhv.kvm.constants import KVM_EXIT_IO, KVM_EXIT_MMIO
from pyhv.stats import ExitStats


class Region:
    def __init__(self, name):
        self.name = name


def test_merge_adds_counts_and_times():
    a, b = ExitStats(), ExitStats()
    r = Region("testdev")
    a.by_reason[KVM_EXIT_IO] = [3, 300]
    b.by_reason[KVM_EXIT_IO] = [2, 200]
    b.by_reason[KVM_EXIT_MMIO] = [1, 50]
    a.by_port[0x3F8] = [3, 300]
    b.by_port[0x3F8] = [1, 100]
    b.by_port[0x80] = [1, 100]
    a.by_mmio[r] = [4, 40]
    b.by_mmio[r] = [1, 10]
    a.run[:] = [10, 1000]
    b.run[:] = [5, 500]
    b.fallbacks["int3"] = 2
    m = ExitStats.merge([a, b])
    assert m.by_reason[KVM_EXIT_IO] == [5, 500] and m.by_reason[KVM_EXIT_MMIO] == [1, 50]
    assert m.by_port == {0x3F8: [4, 400], 0x80: [1, 100]}
    assert m.by_mmio == {r: [5, 50]}
    assert m.run == [15, 1500]
    assert m.exits == 6 and m.handling_ns == 550
    assert m.fallbacks == {"int3": 2}
    # the inputs are untouched
    assert a.by_port[0x3F8] == [3, 300]


def test_report_and_dict_name_devices():
    s = ExitStats()
    s.by_reason[KVM_EXIT_IO] = [2, 2000]
    s.by_port[0x3F8] = [2, 2000]
    s.by_mmio[None] = [1, 10]
    text = s.report(lambda p: "serial0.rbr_thr")
    assert "0x03f8 serial0.rbr_thr" in text and "IO" in text and "unassigned" in text
    d = s.as_dict(lambda p: "serial0.rbr_thr")
    assert d["by_port"]["0x03f8"] == {"count": 2, "ns": 2000, "device": "serial0.rbr_thr"}
    assert d["by_reason"]["IO"]["count"] == 2
