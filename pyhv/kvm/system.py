"""`Kvm`, `Vm` and `Vcpu`: one method per ioctl, typed arguments, errors as OSError with the ioctl's name.

All ioctls go through libc's ioctl via ctypes: it releases the GIL (KVM_RUN blocks for as long as the guest runs),
it takes 64-bit arguments (fcntl.ioctl's int argument is 32-bit signed), and it never retries on EINTR, which is
how a kicked vCPU leaves KVM_RUN.
"""
from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from typing import Iterable

from pyhv.errors import KvmUnavailableError
from pyhv.kvm import constants as C
from pyhv.kvm import structs as S
from pyhv.kvm.flavour import KvmFlavour, detect_flavour

_libc = ctypes.CDLL(None, use_errno=True)
libc_ioctl = _libc.ioctl
libc_ioctl.restype = ctypes.c_int

_IOCTL_NAMES = {v: k for k, v in vars(C).items() if k.startswith("KVM_") and not k.startswith(("KVM_CAP", "KVM_EXIT"))}


def _ioctl_size(request: int) -> int:
    return (request >> 16) & 0x3FFF


def get_raw(fd: int, request: int) -> bytes:
    """An _IOR ioctl whose struct pyhv keeps as opaque bytes (the size comes from the request number)."""
    buf = ctypes.create_string_buffer(_ioctl_size(request))
    ioctl(fd, request, buf)
    return buf.raw


def set_raw(fd: int, request: int, data: bytes) -> None:
    size = _ioctl_size(request)
    if len(data) != size:
        raise ValueError(f"ioctl {request:#x} takes {size} bytes, got {len(data)}")
    ioctl(fd, request, ctypes.create_string_buffer(data, size))


def ioctl(fd: int, request: int, arg: int | ctypes.Structure | ctypes.Array = 0) -> int:
    """Issue an ioctl; an int argument is passed as unsigned long, a ctypes object by reference."""
    if isinstance(arg, int):
        ret = libc_ioctl(fd, ctypes.c_ulong(request), ctypes.c_ulong(arg))
    else:
        ret = libc_ioctl(fd, ctypes.c_ulong(request), ctypes.byref(arg))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{_IOCTL_NAMES.get(request, hex(request))}: {os.strerror(err)}")
    return ret


class Kvm:
    """The /dev/kvm system handle."""

    def __init__(self, path: str | None = None) -> None:
        path = path or os.environ.get("PYHV_KVM_DEVICE", "/dev/kvm")   # the variable lets tests point elsewhere
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(f"{path} does not exist",
                                      "load the kvm module (modprobe kvm_intel / kvm_amd) or run on a host with KVM")
        except PermissionError:
            raise KvmUnavailableError(f"no permission to open {path}",
                                      "add your user to the 'kvm' group or run as root")
        except OSError as e:
            raise KvmUnavailableError(f"cannot open {path}: {e.strerror}")
        version = ioctl(self.fd, C.KVM_GET_API_VERSION)
        if version != C.KVM_API_VERSION:
            raise KvmUnavailableError(f"{path} speaks KVM API {version}, pyhv needs {C.KVM_API_VERSION}")
        self.api_version = version
        self.vcpu_mmap_size = ioctl(self.fd, C.KVM_GET_VCPU_MMAP_SIZE)
        self.flavour: KvmFlavour = detect_flavour()

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, C.KVM_CHECK_EXTENSION, cap)

    def supported_cpuid(self) -> list[S.kvm_cpuid_entry2]:
        n = 64
        while True:
            cpuid = S.kvm_cpuid2(n)
            try:
                ioctl(self.fd, C.KVM_GET_SUPPORTED_CPUID, cpuid)
            except OSError as e:
                if e.errno == 7 and n < 4096:  # E2BIG: the table is larger
                    n *= 2
                    continue
                raise
            return [S.kvm_cpuid_entry2.from_buffer_copy(cpuid.entries[i]) for i in range(cpuid.nent)]

    def msr_index_list(self) -> list[int]:
        n = 512
        buf = (ctypes.c_uint32 * (n + 1))()
        buf[0] = n
        ioctl(self.fd, C.KVM_GET_MSR_INDEX_LIST, buf)
        return list(buf[1:1 + buf[0]])

    def create_vm(self) -> "Vm":
        return Vm(self, ioctl(self.fd, C.KVM_CREATE_VM, 0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class IoEventFd:
    """A registered KVM ioeventfd: a guest write to (addr, length[, datamatch]) signals `fd` in the kernel."""
    fd: int
    addr: int
    length: int
    pio: bool
    datamatch: int | None


class Vm:
    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, C.KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, size: int, userspace_addr: int,
                               readonly: bool = False, log_dirty: bool = False) -> None:
        flags = (C.KVM_MEM_READONLY if readonly else 0) | (C.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0)
        region = S.kvm_userspace_memory_region(slot, flags, guest_phys_addr, size, userspace_addr)
        ioctl(self.fd, C.KVM_SET_USER_MEMORY_REGION, region)

    def get_dirty_log(self, slot: int, pages: int) -> bytes:
        """The slot's dirty-page bitmap since the last call (one bit per page, KVM_MEM_LOG_DIRTY_PAGES slots);
        reading it clears it."""
        bitmap = ctypes.create_string_buffer(-(-pages // 64) * 8)
        arg = (ctypes.c_uint64 * 2)(slot, ctypes.addressof(bitmap))
        ioctl(self.fd, C.KVM_GET_DIRTY_LOG, arg)
        return bitmap.raw

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, C.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, C.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        ioctl(self.fd, C.KVM_CREATE_IRQCHIP)

    def create_pit2(self, speaker_dummy: bool = False) -> None:
        ioctl(self.fd, C.KVM_CREATE_PIT2, S.kvm_pit_config(flags=C.KVM_PIT_SPEAKER_DUMMY if speaker_dummy else 0))

    def irq_line(self, irq: int, level: int) -> None:
        ioctl(self.fd, C.KVM_IRQ_LINE, S.kvm_irq_level(irq, level))

    def set_gsi_routing(self, entries: Iterable[S.kvm_irq_routing_entry]) -> None:
        entries = list(entries)
        routing = S.kvm_irq_routing(len(entries))
        for i, entry in enumerate(entries):
            routing.entries[i] = entry
        ioctl(self.fd, C.KVM_SET_GSI_ROUTING, routing)

    def signal_msi(self, address: int, data: int) -> int:
        return ioctl(self.fd, C.KVM_SIGNAL_MSI, S.kvm_msi(address & 0xFFFFFFFF, address >> 32, data))

    def irqfd(self, fd: int, gsi: int, deassign: bool = False, resamplefd: int | None = None) -> None:
        flags = C.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        if resamplefd is not None:
            flags |= C.KVM_IRQFD_FLAG_RESAMPLE
        ioctl(self.fd, C.KVM_IRQFD, S.kvm_irqfd(fd=fd, gsi=gsi, flags=flags, resamplefd=resamplefd or 0))

    def ioeventfd(self, event: IoEventFd, deassign: bool = False) -> None:
        flags = (C.KVM_IOEVENTFD_FLAG_PIO if event.pio else 0) | (C.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if event.datamatch is not None:
            flags |= C.KVM_IOEVENTFD_FLAG_DATAMATCH
        ioctl(self.fd, C.KVM_IOEVENTFD, S.kvm_ioeventfd(datamatch=event.datamatch or 0, addr=event.addr,
                                                        len=event.length, fd=event.fd, flags=flags))

    def get_clock(self) -> S.kvm_clock_data:
        data = S.kvm_clock_data()
        ioctl(self.fd, C.KVM_GET_CLOCK, data)
        return data

    def set_clock(self, data: S.kvm_clock_data) -> None:
        ioctl(self.fd, C.KVM_SET_CLOCK, data)

    def get_pit2(self) -> bytes:
        """struct kvm_pit_state2, as bytes (saved and restored whole)."""
        return get_raw(self.fd, C.KVM_GET_PIT2)

    def set_pit2(self, state: bytes) -> None:
        set_raw(self.fd, C.KVM_SET_PIT2, state)

    def get_irqchip(self, chip_id: int) -> S.kvm_irqchip:
        chip = S.kvm_irqchip(chip_id=chip_id)
        ioctl(self.fd, C.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: S.kvm_irqchip) -> None:
        ioctl(self.fd, C.KVM_SET_IRQCHIP, chip)

    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        return Vcpu(self, vcpu_id, ioctl(self.fd, C.KVM_CREATE_VCPU, vcpu_id))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vcpu:
    """A KVM vCPU fd and its shared kvm_run page (`run`, a ctypes view; `run_map`, the raw mmap)."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self.run_map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run = S.kvm_run.from_buffer(self.run_map)

    def kvm_run(self) -> int:
        """One KVM_RUN; returns 0, or -errno (EINTR when kicked) instead of raising, as the run loop expects."""
        if libc_ioctl(self.fd, C.KVM_RUN, 0) < 0:
            return -ctypes.get_errno()
        return 0

    def _get(self, request: int, struct: type) -> object:
        value = struct()
        ioctl(self.fd, request, value)
        return value

    def get_regs(self) -> S.kvm_regs:
        return self._get(C.KVM_GET_REGS, S.kvm_regs)

    def set_regs(self, regs: S.kvm_regs) -> None:
        ioctl(self.fd, C.KVM_SET_REGS, regs)

    def get_sregs(self) -> S.kvm_sregs:
        return self._get(C.KVM_GET_SREGS, S.kvm_sregs)

    def set_sregs(self, sregs: S.kvm_sregs) -> None:
        ioctl(self.fd, C.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> S.kvm_fpu:
        return self._get(C.KVM_GET_FPU, S.kvm_fpu)

    def set_fpu(self, fpu: S.kvm_fpu) -> None:
        ioctl(self.fd, C.KVM_SET_FPU, fpu)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        indices = list(indices)
        msrs = S.kvm_msrs(len(indices))
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        n = ioctl(self.fd, C.KVM_GET_MSRS, msrs)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        msrs = S.kvm_msrs(len(values))
        for i, (index, data) in enumerate(values.items()):
            msrs.entries[i].index, msrs.entries[i].data = index, data
        return ioctl(self.fd, C.KVM_SET_MSRS, msrs)

    def set_cpuid2(self, entries: list[S.kvm_cpuid_entry2]) -> None:
        cpuid = S.kvm_cpuid2(len(entries))
        for i, entry in enumerate(entries):
            cpuid.entries[i] = entry
        ioctl(self.fd, C.KVM_SET_CPUID2, cpuid)

    def get_vcpu_events(self) -> S.kvm_vcpu_events:
        return self._get(C.KVM_GET_VCPU_EVENTS, S.kvm_vcpu_events)

    def set_vcpu_events(self, events: S.kvm_vcpu_events) -> None:
        ioctl(self.fd, C.KVM_SET_VCPU_EVENTS, events)

    def get_mp_state(self) -> int:
        return self._get(C.KVM_GET_MP_STATE, S.kvm_mp_state).mp_state

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, C.KVM_SET_MP_STATE, S.kvm_mp_state(state))

    def get_lapic(self) -> S.kvm_lapic_state:
        return self._get(C.KVM_GET_LAPIC, S.kvm_lapic_state)

    def set_lapic(self, lapic: S.kvm_lapic_state) -> None:
        ioctl(self.fd, C.KVM_SET_LAPIC, lapic)

    def set_guest_debug(self, control: int, debugregs: Iterable[int] = ()) -> None:
        dbg = S.kvm_guest_debug(control=control)
        for i, value in enumerate(debugregs):
            dbg.debugreg[i] = value
        ioctl(self.fd, C.KVM_SET_GUEST_DEBUG, dbg)

    def translate(self, linear_address: int) -> int | None:
        """Guest-linear to guest-physical with the vCPU's current paging, or None if unmapped."""
        tr = S.kvm_translation(linear_address=linear_address)
        ioctl(self.fd, C.KVM_TRANSLATE, tr)
        return tr.physical_address if tr.valid else None

    def get_debugregs(self) -> S.kvm_debugregs:
        return self._get(C.KVM_GET_DEBUGREGS, S.kvm_debugregs)

    def set_debugregs(self, regs: S.kvm_debugregs) -> None:
        ioctl(self.fd, C.KVM_SET_DEBUGREGS, regs)

    def get_xsave(self) -> bytes:
        """struct kvm_xsave (4 KiB: the legacy region, XSAVE header and extended state), as bytes."""
        return get_raw(self.fd, C.KVM_GET_XSAVE)

    def set_xsave(self, state: bytes) -> None:
        set_raw(self.fd, C.KVM_SET_XSAVE, state)

    def get_xcrs(self) -> bytes:
        return get_raw(self.fd, C.KVM_GET_XCRS)

    def set_xcrs(self, state: bytes) -> None:
        set_raw(self.fd, C.KVM_SET_XCRS, state)

    def readable_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """The MSRs among `indices` that KVM lets this vCPU read (KVM_GET_MSRS stops at the first it refuses:
        that one is skipped and the rest read on)."""
        pending, out = list(indices), {}
        while pending:
            values = self.get_msrs(pending)
            out.update(values)
            pending = pending[len(values) + 1:]
        return out

    def get_tsc_khz(self) -> int:
        return ioctl(self.fd, C.KVM_GET_TSC_KHZ)

    def close(self) -> None:
        if self.fd >= 0:
            del self.run
            self.run_map.close()
            os.close(self.fd)
            self.fd = -1
