"""Exit statistics: merging per-vCPU counters, deriving totals, naming ports in reports."""
from __future__ import annotations

from pyhv.kvm.constants import KVM_EXIT_HLT, KVM_EXIT_INTR, KVM_EXIT_IO, KVM_EXIT_MMIO
from pyhv.stats import ExitStats


class Region:
    def __init__(self, name):
        self.name = name


def test_merge_adds_cells_and_derives_totals():
    a, b = ExitStats(), ExitStats()
    r = Region("testdev")
    a.by_port[0x3F8] = [3, 300, 3000]
    b.by_port[0x3F8] = [1, 100, 1000]
    b.by_port[0x80] = [1, 100, 1000]
    a.by_mmio[r] = [4, 40, 400]
    b.by_mmio[r] = [1, 10, 100]
    a.by_reason[KVM_EXIT_HLT] = [2, 20, 200]
    b.by_reason[KVM_EXIT_INTR] = [7, 70, 700]
    b.fallbacks["int3"] = 2
    m = ExitStats.merge([a, b])
    assert m.by_port == {0x3F8: [4, 400, 4000], 0x80: [1, 100, 1000]}
    assert m.by_mmio == {r: [5, 50, 500]}
    totals = m.reason_totals()
    assert totals[KVM_EXIT_IO] == [5, 500, 5000] and totals[KVM_EXIT_MMIO] == [5, 50, 500]
    assert totals[KVM_EXIT_HLT] == [2, 20, 200]
    assert m.kvm_run_calls == 5 + 5 + 2 + 7
    assert m.exits == 5 + 5 + 2                     # interrupted KVM_RUN calls are not exits
    assert m.kvm_run_ns == 5000 + 500 + 200 + 700
    assert m.handling_ns == 500 + 50 + 20 + 70
    assert m.fallbacks == {"int3": 2}
    assert a.by_port[0x3F8] == [3, 300, 3000]       # the inputs are untouched


def test_report_and_dict_name_devices():
    s = ExitStats()
    s.by_port[0x3F8] = [2, 2000, 9000]
    s.by_mmio[None] = [1, 10, 100]
    text = s.report(lambda p: "serial0.rbr_thr")
    assert "0x03f8 serial0.rbr_thr" in text and "IO" in text and "unassigned" in text
    d = s.as_dict(lambda p: "serial0.rbr_thr")
    assert d["by_port"]["0x03f8"] == {"count": 2, "ns": 2000, "device": "serial0.rbr_thr"}
    assert d["by_reason"]["IO"] == {"count": 2, "ns": 2000, "kvm_run_ns": 9000}
    assert d["by_reason"]["MMIO"]["count"] == 1
    assert (d["exits"], d["kvm_run_ns"], d["handling_ns"]) == (3, 9100, 2010)
