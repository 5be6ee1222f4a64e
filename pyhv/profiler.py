"""`--profile-guest`: where does the guest spend its time? A sampling profiler from the host side.

The I/O thread kicks each vCPU out of KVM_RUN at a fixed rate and records its RIP and CPL; at exit the
samples are folded into the kernel's functions (from the ELF symbol table of the `--kernel` vmlinux, or a
System.map). Costs one exit per sample; meant for finding what to cut when a boot is slow, e.g. on PVM hosts
where every guest kernel instruction is emulated.

Kernels built without frame pointers cannot be unwound from outside, so callers are guessed the way Linux's own
"guess" unwinder does: every word of the sampled kernel stack that points into kernel text counts for the function
it points into. The inclusive list that results has some stale entries, but it shows which paths the time is spent
under (which the leaf functions alone often do not).
"""
from __future__ import annotations

import bisect
import logging
import os
import struct
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyhv.machine.machine import Machine

log = logging.getLogger(__name__)

SHT_SYMTAB = 2
STT_FUNC = 2
PAGE = 4096
STACK_SCAN_BYTES = 1024      # how much of the kernel stack above RSP is searched for return addresses
MAX_FUNCTION_SIZE = 16384    # a stack word further than this past the function symbol before it is data, not code


def elf_symbols(path: str) -> list[tuple[int, str]]:
    """(address, name) of the function symbols in an ELF file's .symtab, sorted; empty if it has none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    if not data.startswith(b"\x7fELF") or data[4] != 2:
        return []
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)
    symbols: list[tuple[int, str]] = []
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    for (_, sh_type, _, _, sh_offset, sh_size, sh_link, _, _, sh_entsize) in sections:
        if sh_type != SHT_SYMTAB or not sh_entsize:
            continue
        strtab_off = sections[sh_link][4]
        for off in range(sh_offset, sh_offset + sh_size, sh_entsize):
            st_name, st_info, _, _, st_value, _ = struct.unpack_from("<IBBHQQ", data, off)
            if st_info & 0xF == STT_FUNC and st_value:
                end = data.index(b"\0", strtab_off + st_name)
                symbols.append((st_value, data[strtab_off + st_name:end].decode(errors="replace")))
    symbols.sort()
    return symbols


def system_map_symbols(path: str) -> list[tuple[int, str]]:
    symbols = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1] in "tTwW":
                symbols.append((int(parts[0], 16), parts[2]))
    symbols.sort()
    return symbols


def kernel_symbols(kernel: str) -> list[tuple[int, str]]:
    """Function symbols for a --kernel: its own ELF symbol table, or for a bzImage (whose payload is stripped) a
    `vmlinux` or `System.map` beside it, as `pyhv guest build` and a kernel build's top directory leave them."""
    symbols = elf_symbols(kernel)
    folder = os.path.dirname(os.path.abspath(kernel))
    if not symbols and os.path.exists(os.path.join(folder, "vmlinux")):
        symbols = elf_symbols(os.path.join(folder, "vmlinux"))
    if not symbols and os.path.exists(os.path.join(folder, "System.map")):
        symbols = system_map_symbols(os.path.join(folder, "System.map"))
    return symbols


class GuestProfiler:
    def __init__(self, machine: "Machine", hz: float = 100.0, symbols: list[tuple[int, str]] | None = None):
        self.machine = machine
        self.interval = 1.0 / hz
        self.samples: Counter[tuple[int, int]] = Counter()     # (cpl, rip) -> count
        self.inclusive: Counter[str] = Counter()              # function -> kernel samples it was on the stack of
        self.symbols = symbols or []
        self._addresses = [a for a, _ in self.symbols]

    def start(self) -> None:
        self.machine.iothread.call_later(self.interval, self._sample)

    def _sample(self) -> None:
        if self.machine.state == "shutdown":
            return
        if self.machine.state == "running":
            for v in self.machine.vcpus:
                try:
                    rip, cpl, stack = v.call(lambda v=v: self._read_vcpu(v.vcpu), timeout=1.0)
                except (TimeoutError, OSError):
                    continue
                self.samples[(cpl, rip)] += 1
                if cpl == 0 and self.symbols:
                    self.inclusive.update({self.symbolize(rip)} | {self.symbolize(w) for w in stack})
        self.machine.iothread.call_later(self.interval, self._sample)

    def _read_vcpu(self, vcpu) -> tuple[int, int, list[int]]:
        """RIP, CPL and, in kernel mode with symbols, the stack words that point into kernel functions (on the
        vCPU's thread, while it is out of KVM_RUN)."""
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
        cpl = sregs.cs.dpl if sregs.cr0 & 1 else 0
        if cpl != 0 or not self.symbols:
            return regs.rip, cpl, []
        words: list[int] = []
        address, remaining = regs.rsp & ~7, STACK_SCAN_BYTES
        while remaining > 0:
            chunk = min(remaining, PAGE - (address & (PAGE - 1)))
            gpa = vcpu.translate(address)
            if gpa is None or not self.machine.guest_memory.contains(gpa, chunk):
                break
            data = self.machine.guest_memory.read(gpa, chunk)
            words += [w for w in struct.unpack(f"<{chunk // 8}Q", data) if self._caller(w)]
            address += chunk
            remaining -= chunk
        return regs.rip, cpl, words

    def _caller(self, word: int) -> str | None:
        """The function a stack word points into, or None if it points past any function (kernel data)."""
        i = bisect.bisect_right(self._addresses, word) - 1
        return self.symbols[i][1] if i >= 0 and word - self._addresses[i] < MAX_FUNCTION_SIZE else None

    def symbolize(self, rip: int) -> str:
        i = bisect.bisect_right(self._addresses, rip) - 1
        return self.symbols[i][1] if i >= 0 else f"{rip:#x}"

    def report(self, top: int = 30) -> str:
        total = sum(self.samples.values())
        if not total:
            return "guest profile: no samples"
        by_function: Counter[str] = Counter()
        user = 0
        for (cpl, rip), n in self.samples.items():
            if cpl == 3:
                user += n
            else:
                by_function[self.symbolize(rip) if self.symbols else f"{rip:#x}"] += n
        lines = [f"guest profile: {total} samples, {100 * user / total:.1f}% in user mode"
                 + ("" if self.symbols else " (no kernel symbols: give an ELF vmlinux or --system-map)")]
        for name, n in by_function.most_common(top):
            lines.append(f"  {100 * n / total:5.1f}%  {n:6d}  {name}")
        if self.inclusive:
            lines.append("kernel functions on the sampled stacks (inclusive; callers guessed from stack words):")
            for name, n in self.inclusive.most_common(top):
                lines.append(f"  {100 * n / total:5.1f}%  {n:6d}  {name}")
        return "\n".join(lines)
