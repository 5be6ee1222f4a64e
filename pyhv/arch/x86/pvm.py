"""Booting Linux on PVM hosts (kvm_pvm: KVM without hardware virtualization). See DESIGN.md.

Guest kernel-mode code is emulated by KVM instruction by instruction, and the emulator lacks some instructions
a stock kernel uses. pyhv (1) hides from CPUID what it can (CX16, which the emulator cannot do, the KVM
paravirt leaves, whose hypercalls never complete on PVM, and the features the kernel command line clears below),
(2) adds kernel options that keep the kernel away from the emulator's gaps and from the worst emulated work, and
(3) completes a few instructions itself when the emulator still fails (`pyhv.arch.x86.emulate`).
"""
from __future__ import annotations

import shlex

from pyhv.kvm import structs as S

# Kernel options added on PVM hosts (measured with a prototype; see the direct-Linux-boot issue).
PVM_KERNEL_OPTIONS = (
    "noxsave", "nofsgsbase", "noinvpcid", "nopcid", "mitigations=off", "tsc=reliable", "no_timer_check",
    "rodata=off", "cryptomgr.notests", "8250.nr_uarts=1",
    "rcupdate.rcu_cpu_stall_suppress=1",   # emulated kernel code is slow enough to look like a stall
    "dis_ucode_ldr",                       # no microcode loading (impossible here) and no initrd scan for it
    # measured with --profile-guest on the small kernel (1 vCPU, 128M): patching every LOCK prefix to a NOP
    # (one text_poke, i.e. an mm switch and TLB flush, per site) took ~1.7 s; the 2 MiB-atom first per-CPU chunk,
    # zeroed with rep stos, ~0.8 s
    "noreplace-smp", "percpu_alloc=page",
)
# Linux 6.1 parses clearcpuid= into a 128-byte buffer and silently drops the rest: keep this under 128 bytes.
PVM_CLEARCPUID = ("erms,fsrm,popcnt,smap,rdpid,serialize,ssse3,sse4_1,sse4_2,aes,pclmulqdq,sha_ni,movbe,bmi1,bmi2,"
                  "adx,rdrand,rdseed,pku")
assert len(PVM_CLEARCPUID) < 128

# CPUID bits cleared by the nested-safe profile: (leaf, subleaf, register, bit)
_HIDE = [
    (1, 0, "ecx", 13),   # CX16: cmpxchg16b makes KVM's emulator fail
    (1, 0, "ecx", 26), (1, 0, "ecx", 27), (1, 0, "ecx", 28),   # XSAVE, OSXSAVE, AVX (xrstor fails)
    (1, 0, "ecx", 23), (1, 0, "ecx", 9), (1, 0, "ecx", 19), (1, 0, "ecx", 20),   # POPCNT SSSE3 SSE4.1 SSE4.2
    (1, 0, "ecx", 25), (1, 0, "ecx", 1), (1, 0, "ecx", 22), (1, 0, "ecx", 30),   # AES PCLMULQDQ MOVBE RDRAND
    (7, 0, "ebx", 0), (7, 0, "ebx", 3), (7, 0, "ebx", 8), (7, 0, "ebx", 9), (7, 0, "ebx", 10),  # FSGSBASE BMI1
    (7, 0, "ebx", 18), (7, 0, "ebx", 19), (7, 0, "ebx", 20), (7, 0, "ebx", 29),   # RDSEED ADX SMAP SHA
    (7, 0, "ecx", 3), (7, 0, "ecx", 22), (7, 0, "edx", 4), (7, 0, "edx", 14),      # PKU RDPID FSRM SERIALIZE
    (7, 0, "ebx", 5), (7, 0, "ebx", 16),  # AVX2, AVX512F
]
KVM_CPUID_SIGNATURE = 0x40000000


def nested_safe_cpuid(entries: list[S.kvm_cpuid_entry2]) -> list[S.kvm_cpuid_entry2]:
    """The `nested-safe` CPU profile: hide what a nested/PVM host cannot emulate, and KVM's paravirt leaves."""
    out = []
    for e in entries:
        if KVM_CPUID_SIGNATURE <= e.function < KVM_CPUID_SIGNATURE + 0x100:
            continue
        for leaf, sub, reg, bit in _HIDE:
            if e.function == leaf and e.index == sub:
                setattr(e, reg, getattr(e, reg) & ~(1 << bit))
        out.append(e)
    return out


def pvm_cmdline(cmdline: str, tsc_khz: int | None) -> tuple[str, list[str]]:
    """The command line with the PVM options added (those the user did not set already) and what was added."""
    words = shlex.split(cmdline) if cmdline else []
    keys = {w.split("=", 1)[0] for w in words}
    wanted = list(PVM_KERNEL_OPTIONS) + [f"clearcpuid={PVM_CLEARCPUID}"]
    if tsc_khz:
        # the TSC rate from KVM: no calibration against the PIT, which fails when emulated (TSC marked unstable)
        wanted.append(f"tsc_early_khz={tsc_khz}")
        wanted.append(f"lpj={tsc_khz * 1000 // 250}")   # skip the (emulated) delay-loop calibration; HZ=250
    added = [w for w in wanted if w.split("=", 1)[0] not in keys]
    return " ".join([cmdline] + added if cmdline else added), added
