"""pyhv's ctypes structs and ioctl numbers against the C compiler's view of <linux/kvm.h>."""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from pyhv.kvm import constants as C
from pyhv.kvm import structs as S

IOCTLS = ["KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE",
          "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_VCPU", "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR",
          "KVM_SET_IDENTITY_MAP_ADDR", "KVM_CREATE_IRQCHIP", "KVM_IRQ_LINE", "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP",
          "KVM_SET_GSI_ROUTING", "KVM_IRQFD", "KVM_CREATE_PIT2", "KVM_IOEVENTFD", "KVM_SIGNAL_MSI", "KVM_RUN",
          "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_TRANSLATE", "KVM_GET_MSRS",
          "KVM_SET_MSRS", "KVM_GET_FPU", "KVM_SET_FPU", "KVM_GET_LAPIC", "KVM_SET_LAPIC", "KVM_SET_CPUID2",
          "KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "KVM_SET_GUEST_DEBUG", "KVM_GET_VCPU_EVENTS",
          "KVM_SET_VCPU_EVENTS", "KVM_GET_DEBUGREGS", "KVM_GET_CLOCK", "KVM_ENABLE_CAP", "KVM_GET_MSR_INDEX_LIST",
          "KVM_SET_CLOCK", "KVM_GET_PIT2", "KVM_SET_PIT2", "KVM_GET_XCRS", "KVM_SET_XCRS", "KVM_GET_XSAVE",
          "KVM_SET_XSAVE", "KVM_SET_DEBUGREGS", "KVM_GET_DIRTY_LOG"]
STRUCTS = ["kvm_regs", "kvm_sregs", "kvm_fpu", "kvm_vcpu_events", "kvm_guest_debug", "kvm_ioeventfd", "kvm_irqfd",
           "kvm_irq_routing_entry", "kvm_msi", "kvm_enable_cap", "kvm_pit_config", "kvm_cpuid_entry2",
           "kvm_lapic_state", "kvm_irqchip", "kvm_clock_data", "kvm_debugregs", "kvm_translation",
           "kvm_userspace_memory_region", "kvm_segment", "kvm_dtable"]
OFFSETS = {"io": "io", "mmio": "mmio", "emulation_failure.insn_bytes": None, "kvm_valid_regs": None}


@pytest.fixture(scope="module")
def c_values(tmp_path_factory):
    if not shutil.which("gcc") or not shutil.os.path.exists("/usr/include/linux/kvm.h"):
        pytest.skip("gcc or <linux/kvm.h> missing (linux-libc-dev)")
    src = tmp_path_factory.mktemp("abi") / "abi.c"
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void){"]
    lines += [f'printf("{n} %lu\\n", (unsigned long){n});' for n in IOCTLS]
    lines += [f'printf("sizeof_{n} %zu\\n", sizeof(struct {n}));' for n in STRUCTS]
    lines += ['printf("off_exit %zu\\n", offsetof(struct kvm_run, io));',
              'printf("off_insn %zu\\n", offsetof(struct kvm_run, emulation_failure.insn_bytes));',
              'printf("off_valid %zu\\n", offsetof(struct kvm_run, kvm_valid_regs));',
              'printf("off_payload %zu\\n", offsetof(struct kvm_vcpu_events, exception_payload));', "}"]
    src.write_text("\n".join(lines))
    exe = src.with_suffix("")
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    return dict(line.split() for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                        check=True).stdout.splitlines())


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_numbers(c_values, name):
    assert getattr(C, name) == int(c_values[name])


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_sizes(c_values, name):
    assert ctypes.sizeof(getattr(S, name)) == int(c_values[f"sizeof_{name}"])


def test_kvm_run_offsets(c_values):
    assert S.KVM_RUN_EXIT_DATA == int(c_values["off_exit"])
    assert S.kvm_run.exit.offset + S.kvm_run_emulation_failure.insn_bytes.offset == int(c_values["off_insn"])
    assert S.kvm_run.kvm_valid_regs.offset == int(c_values["off_valid"])
    assert S.kvm_vcpu_events.exception_payload.offset == int(c_values["off_payload"])
