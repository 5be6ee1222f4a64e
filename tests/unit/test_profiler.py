"""--profile-guest: folding samples into functions, and guessing callers from the kernel stack."""
from __future__ import annotations

import struct
from types import SimpleNamespace

from pyhv.profiler import GuestProfiler

SYMBOLS = [(0xFFFFFFFF81000000, "start_kernel"), (0xFFFFFFFF81000100, "setup_arch"),
           (0xFFFFFFFF81000200, "memset"), (0xFFFFFFFF81000300, "idle")]
RSP = 0xFFFF888000100FF0        # 16 bytes below a page boundary: the scan continues on the next page


class FakeMemory:
    def __init__(self, pages: dict[int, bytes]):
        self.pages = pages

    def contains(self, gpa: int, length: int) -> bool:
        return gpa & ~0xFFF in self.pages

    def read(self, gpa: int, length: int) -> bytes:
        page = self.pages[gpa & ~0xFFF]
        return page[gpa & 0xFFF:(gpa & 0xFFF) + length]


class FakeVcpu:
    def __init__(self, rip: int, cpl: int):
        self.regs = SimpleNamespace(rip=rip, rsp=RSP)
        self.sregs = SimpleNamespace(cr0=1, cs=SimpleNamespace(dpl=cpl))

    def get_regs(self):
        return self.regs

    def get_sregs(self):
        return self.sregs

    def translate(self, address: int) -> int | None:
        return address - 0xFFFF888000000000 if address < 0xFFFF888000102000 else None   # two pages mapped


def stack_pages() -> dict[int, bytes]:
    first = bytearray(4096)
    struct.pack_into("<QQ", first, 0xFF0, 0x1234, 0xFFFFFFFF81000150)        # data, then setup_arch+0x50
    second = bytearray(4096)
    struct.pack_into("<QQ", second, 0, 0xFFFFFFFF81000010, 0xFFFF888000000000)   # start_kernel+0x10, not text
    return {0x100000: bytes(first), 0x101000: bytes(second)}


def test_callers_are_guessed_from_stack_words_across_pages():
    machine = SimpleNamespace(guest_memory=FakeMemory(stack_pages()))
    profiler = GuestProfiler(machine, symbols=SYMBOLS)
    rip, cpl, words = profiler._read_vcpu(FakeVcpu(0xFFFFFFFF81000210, 0))
    assert (rip, cpl) == (0xFFFFFFFF81000210, 0)
    assert words == [0xFFFFFFFF81000150, 0xFFFFFFFF81000010]


def test_user_mode_samples_read_no_stack():
    machine = SimpleNamespace(guest_memory=FakeMemory(stack_pages()))
    assert GuestProfiler(machine, symbols=SYMBOLS)._read_vcpu(FakeVcpu(0x401000, 3)) == (0x401000, 3, [])


def test_stack_words_far_past_a_function_are_data():
    profiler = GuestProfiler(SimpleNamespace(), symbols=SYMBOLS)
    assert profiler._caller(0xFFFFFFFF81000150) == "setup_arch"
    assert profiler._caller(0xFFFFFFFF81000300 + 0x100000) is None      # 1 MiB past `idle`: kernel data
    assert profiler._caller(0xFFFFFFFF80000000) is None                 # below the first function


def test_report_has_flat_and_inclusive_lists():
    profiler = GuestProfiler(SimpleNamespace(), symbols=SYMBOLS)
    profiler.samples.update({(0, 0xFFFFFFFF81000210): 3, (0, 0xFFFFFFFF81000300): 1, (3, 0x401000): 1})
    profiler.inclusive.update({"memset": 3, "setup_arch": 3, "start_kernel": 3, "idle": 1})
    report = profiler.report()
    flat, inclusive = report.split("inclusive")
    assert "5 samples, 20.0% in user mode" in flat
    assert "60.0%       3  memset" in flat and "setup_arch" not in flat
    assert "60.0%       3  setup_arch" in inclusive
