"""Which KVM this host has: hardware-assisted (Intel VMX, AMD SVM) or PVM (kvm_pvm, no hardware virtualization).

On PVM, guest user-mode code runs natively but guest kernel-mode and real-mode code is emulated instruction by
instruction; see DESIGN.md, "The KVM on these machines". pyhv adapts (CPUID, kernel command line, emulation
fallbacks) and says so in `pyhv info` and `--stats`.
"""
from __future__ import annotations

import enum
import os


class KvmFlavour(enum.Enum):
    VMX = "vmx"
    SVM = "svm"
    PVM = "pvm"
    UNKNOWN = "unknown"

    @property
    def description(self) -> str:
        return {
            KvmFlavour.VMX: "hardware (Intel VMX)",
            KvmFlavour.SVM: "hardware (AMD SVM)",
            KvmFlavour.PVM: "PVM (kvm_pvm: no hardware virtualization; guest kernel and real-mode code is emulated)",
            KvmFlavour.UNKNOWN: "unknown",
        }[self]

    @property
    def is_pvm(self) -> bool:
        return self is KvmFlavour.PVM


def detect_flavour(sys_module: str = "/sys/module", cpuinfo: str = "/proc/cpuinfo") -> KvmFlavour:
    """PVM if the kvm_pvm module is loaded; otherwise the CPU's vmx/svm flag says which hardware KVM is in use."""
    if os.path.isdir(os.path.join(sys_module, "kvm_pvm")):
        return KvmFlavour.PVM
    if os.path.isdir(os.path.join(sys_module, "kvm_intel")):
        return KvmFlavour.VMX
    if os.path.isdir(os.path.join(sys_module, "kvm_amd")):
        return KvmFlavour.SVM
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    if "vmx" in flags:
                        return KvmFlavour.VMX
                    if "svm" in flags:
                        return KvmFlavour.SVM
                    break
    except OSError:
        pass
    return KvmFlavour.UNKNOWN
