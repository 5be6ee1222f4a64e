"""CPUID for each vCPU: what KVM supports (KVM_GET_SUPPORTED_CPUID), with the vCPU's APIC id and topology."""
from __future__ import annotations

from pyhv.kvm import structs as S

CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_HTT = 1 << 28


def vcpu_cpuid(supported: list[S.kvm_cpuid_entry2], apic_id: int, cpus: int) -> list[S.kvm_cpuid_entry2]:
    entries = []
    for src in supported:
        e = S.kvm_cpuid_entry2.from_buffer_copy(src)
        if e.function == 1:
            e.ebx = (e.ebx & 0x0000FFFF) | (apic_id << 24) | (max(cpus, 1) << 16)
            e.ecx |= CPUID_1_ECX_HYPERVISOR
            e.edx = (e.edx | CPUID_1_EDX_HTT) if cpus > 1 else (e.edx & ~CPUID_1_EDX_HTT)
        elif e.function in (0xB, 0x1F):
            e.edx = apic_id               # x2APIC id, every level
        elif e.function == 0x8000001E:
            e.eax = apic_id               # AMD extended APIC id
        entries.append(e)
    return entries


def processor_signature(supported: list[S.kvm_cpuid_entry2]) -> int:
    for e in supported:
        if e.function == 1:
            return e.eax
    return 0x600
