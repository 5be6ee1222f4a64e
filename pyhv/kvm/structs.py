"""ctypes mirrors of the KVM structs pyhv passes to ioctls (x86-64 layout, sizes asserted in tests)."""
from __future__ import annotations

import ctypes

u8, u16, u32, u64, s32 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32


class _Struct(ctypes.Structure):
    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name, *_ in self._fields_ if not name.startswith("pad"))
        return f"{type(self).__name__}({fields})"


class kvm_userspace_memory_region(_Struct):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
                ("userspace_addr", u64)]


class kvm_regs(_Struct):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(_Struct):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8), ("present", u8), ("dpl", u8),
                ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(_Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(_Struct):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
                ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64), ("efer", u64),
                ("apic_base", u64), ("interrupt_bitmap", u64 * 4)]


class kvm_fpu(_Struct):
    _fields_ = [("fpr", u8 * 128), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8), ("last_opcode", u16),
                ("last_ip", u64), ("last_dp", u64), ("xmm", u8 * 256), ("mxcsr", u32), ("pad2", u32)]


class kvm_msr_entry(_Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


def kvm_msrs(n: int) -> ctypes.Structure:
    """A kvm_msrs header followed by n entries (a flexible array member in C)."""

    class _kvm_msrs(_Struct):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]

    msrs = _kvm_msrs()
    msrs.nmsrs = n
    return msrs


class kvm_cpuid_entry2(_Struct):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32), ("ebx", u32), ("ecx", u32),
                ("edx", u32), ("padding", u32 * 3)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


def kvm_cpuid2(n: int) -> ctypes.Structure:
    class _kvm_cpuid2(_Struct):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * n)]

    cpuid = _kvm_cpuid2()
    cpuid.nent = n
    return cpuid


class kvm_irq_level(_Struct):
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_pit_config(_Struct):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_coalesced_mmio_zone(_Struct):
    _fields_ = [("addr", u64), ("size", u32), ("pio", u32)]


class kvm_ioeventfd(_Struct):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32), ("flags", u32), ("pad", u8 * 36)]


class kvm_irqfd(_Struct):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class kvm_irq_routing_irqchip(_Struct):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class kvm_irq_routing_msi(_Struct):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]


class _kvm_irq_routing_u(ctypes.Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi), ("pad", u32 * 8)]


class kvm_irq_routing_entry(_Struct):
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32), ("u", _kvm_irq_routing_u)]


def kvm_irq_routing(n: int) -> ctypes.Structure:
    class _kvm_irq_routing(_Struct):
        _fields_ = [("nr", u32), ("flags", u32), ("entries", kvm_irq_routing_entry * n)]

    routing = _kvm_irq_routing()
    routing.nr = n
    return routing


class kvm_msi(_Struct):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("flags", u32), ("devid", u32),
                ("pad", u8 * 12)]


class kvm_exception_event(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class kvm_interrupt_event(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class kvm_nmi_event(_Struct):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class kvm_smi_event(_Struct):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events(_Struct):
    _fields_ = [("exception", kvm_exception_event), ("interrupt", kvm_interrupt_event), ("nmi", kvm_nmi_event),
                ("sipi_vector", u32), ("flags", u32), ("smi", kvm_smi_event), ("triple_fault_pending", u8),
                ("reserved", u8 * 26), ("exception_has_payload", u8), ("exception_payload", u64)]


class kvm_guest_debug(_Struct):
    _fields_ = [("control", u32), ("pad", u32), ("debugreg", u64 * 8)]


class kvm_translation(_Struct):
    _fields_ = [("linear_address", u64), ("physical_address", u64), ("valid", u8), ("writeable", u8),
                ("usermode", u8), ("pad", u8 * 5)]


class kvm_clock_data(_Struct):
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64), ("host_tsc", u64),
                ("pad", u32 * 4)]


class kvm_enable_cap(_Struct):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_mp_state(_Struct):
    _fields_ = [("mp_state", u32)]


class kvm_lapic_state(_Struct):
    _fields_ = [("regs", u8 * 1024)]


class kvm_irqchip(_Struct):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", u8 * 512)]


class kvm_debugregs(_Struct):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


# --- kvm_run, the page shared with the kernel for each vCPU --------------------------------------------------

class kvm_run_io(_Struct):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class kvm_run_mmio(_Struct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_internal(_Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_emulation_failure(_Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("flags", u64), ("insn_size", u8), ("insn_bytes", u8 * 15)]


class kvm_run_fail_entry(_Struct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_debug_exit_arch(_Struct):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class kvm_run_system_event(_Struct):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _kvm_run_exit(ctypes.Union):
    _fields_ = [("io", kvm_run_io), ("mmio", kvm_run_mmio), ("internal", kvm_run_internal),
                ("emulation_failure", kvm_run_emulation_failure), ("fail_entry", kvm_run_fail_entry),
                ("debug", kvm_debug_exit_arch), ("system_event", kvm_run_system_event),
                ("hardware_exit_reason", u64), ("padding", u8 * 256)]


class kvm_run(_Struct):
    _anonymous_ = ("exit",)
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8), ("flags", u16),
                ("cr8", u64), ("apic_base", u64), ("exit", _kvm_run_exit),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64)]


# Offsets the vCPU hot loop reads with struct.unpack_from instead of ctypes attribute access.
KVM_RUN_IMMEDIATE_EXIT = kvm_run.immediate_exit.offset
KVM_RUN_EXIT_REASON = kvm_run.exit_reason.offset
KVM_RUN_EXIT_DATA = kvm_run.exit.offset
