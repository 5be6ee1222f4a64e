"""Repairing SYSCALL on PVM hosts (`--pvm-syscall-fix`, on by default there).

PVM mishandles SYSCALL from guest user mode for kernels that are not PVM guests: the vCPU jumps to LSTAR but
stays at CPL 3, so the first system call of /init faults on the kernel's entry code (a user-mode fetch from a
supervisor page) and the kernel kills init. pyhv repairs it without touching the guest:

1. Once the guest kernel has set up SYSCALL (LSTAR is non-zero; polled from the I/O thread until then), pyhv
   reads the page-fault gate of the guest's IDT and puts a hardware breakpoint (KVM_SET_GUEST_DEBUG) on that
   handler. (A breakpoint on LSTAR itself never fires: PVM runs guest user mode natively. The page-fault
   handler is kernel code, which KVM's emulator runs and checks breakpoints for.)
2. On a hit, the exception frame on the guest's stack tells what faulted. RIP == LSTAR from CPL 3 is the broken
   SYSCALL: pyhv discards the frame and completes the SYSCALL as the CPU should have: CS/SS from STAR[47:32],
   RFLAGS = R11 & ~SFMASK, RSP as it was, RIP = LSTAR, CPL 0 (RCX and R11 were already saved by PVM).
3. Any other page fault is the guest's own: pyhv single-steps the handler's first instruction with the
   breakpoint off, then arms it again (KVM does not honour RFLAGS.RF for debugger breakpoints).
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Callable

from pyhv.kvm import Vcpu
from pyhv.kvm import structs as S

log = logging.getLogger(__name__)

MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_SYSCALL_MASK = 0xC0000084
RFLAGS_FIXED = 1 << 1
DB_VECTOR = 1
PF_VECTOR = 14
IDT_GATE_SIZE = 16


@dataclass
class _VcpuState:
    lstar: int
    handler: int            # the guest's page-fault handler (linear address)
    stepping: bool = False


class SyscallRepair:
    """`apply_debug(vcpu)` sets the vCPU's KVM_SET_GUEST_DEBUG from `debug_request()` (and whatever else uses the
    debug registers, e.g. a gdb session: pyhv/machine/guest_debug.py), so the repair owns DR0 and nothing more."""

    def __init__(self, read_phys: Callable[[int, int], bytes], apply_debug: Callable[[Vcpu], None]) -> None:
        self.read_phys = read_phys
        self.apply_debug = apply_debug
        self.vcpus: dict[int, _VcpuState] = {}
        self.repaired = 0
        self.page_faults = 0
        self.logged = False

    @property
    def armed(self) -> dict[int, _VcpuState]:
        return self.vcpus

    def _read_linear(self, vcpu: Vcpu, addr: int, size: int) -> bytes | None:
        out = bytearray()
        while len(out) < size:
            phys = vcpu.translate(addr + len(out))
            if phys is None:
                return None
            chunk = min(size - len(out), 4096 - ((addr + len(out)) & 0xFFF))
            out += self.read_phys(phys, chunk)
        return bytes(out)

    def debug_request(self, vcpu_id: int) -> tuple[int | None, bool]:
        """What this vCPU needs: (DR0's breakpoint address or None, single-step?)."""
        state = self.vcpus.get(vcpu_id)
        if state is None:
            return None, False
        return (None, True) if state.stepping else (state.handler, False)

    def try_arm(self, vcpu: Vcpu) -> bool:
        """Arm the breakpoint if the guest kernel has set up SYSCALL on this vCPU (call on the vCPU's thread)."""
        lstar = vcpu.get_msrs([MSR_LSTAR]).get(MSR_LSTAR, 0)
        if not lstar:
            return False
        sregs = vcpu.get_sregs()
        if sregs.idt.limit < (PF_VECTOR + 1) * IDT_GATE_SIZE - 1:
            return False
        gate = self._read_linear(vcpu, sregs.idt.base + PF_VECTOR * IDT_GATE_SIZE, IDT_GATE_SIZE)
        if gate is None:
            return False
        low, _selector, _ist, _attr, mid, high = struct.unpack_from("<HHBBHI", gate)
        handler = low | (mid << 16) | (high << 32)
        self.vcpus[vcpu.id] = _VcpuState(lstar, handler)
        self.apply_debug(vcpu)
        log.info("vCPU %d: SYSCALL repair armed (LSTAR %#x, page-fault handler %#x)", vcpu.id, lstar, handler)
        return True

    def disarm(self, vcpu: Vcpu) -> None:
        self.vcpus.pop(vcpu.id, None)
        self.apply_debug(vcpu)

    def on_debug_exit(self, vcpu: Vcpu) -> str | None:
        """Handle a KVM_EXIT_DEBUG: "syscall" (repaired), "fault" (the guest's own page fault, let through),
        "rearmed" (single step done), or None if the exit is not ours."""
        state = self.vcpus.get(vcpu.id)
        debug = vcpu.run.debug
        if state is None or debug.exception != DB_VECTOR:
            return None
        if state.stepping:
            state.stepping = False
            self.apply_debug(vcpu)
            return "rearmed"
        if debug.pc != state.handler:
            return None
        regs = vcpu.get_regs()
        frame = self._read_linear(vcpu, regs.rsp, 48)      # error code, RIP, CS, RFLAGS, RSP, SS
        if frame is not None:
            _error, rip, cs, _rflags, rsp, _ss = struct.unpack("<6Q", frame)
            if rip == state.lstar and cs & 3 == 3:
                self._complete_syscall(vcpu, regs, state.lstar, rsp)
                return "syscall"
        self.page_faults += 1
        state.stepping = True
        self.apply_debug(vcpu)
        return "fault"

    def _complete_syscall(self, vcpu: Vcpu, regs: S.kvm_regs, lstar: int, user_rsp: int) -> None:
        msrs = vcpu.get_msrs([MSR_STAR, MSR_SYSCALL_MASK])
        kernel_cs = (msrs[MSR_STAR] >> 32) & 0xFFFC
        sregs = vcpu.get_sregs()
        sregs.cs = S.kvm_segment(base=0, limit=0xFFFFFFFF, selector=kernel_cs, type=0xB, present=1, dpl=0,
                                 db=0, s=1, l=1, g=1)
        sregs.ss = S.kvm_segment(base=0, limit=0xFFFFFFFF, selector=kernel_cs + 8, type=0x3, present=1, dpl=0,
                                 db=1, s=1, l=0, g=1)
        vcpu.set_sregs(sregs)
        regs.rflags = (regs.r11 & ~msrs[MSR_SYSCALL_MASK] & 0xFFFFFFFF) | RFLAGS_FIXED
        regs.rsp = user_rsp
        regs.rip = lstar
        vcpu.set_regs(regs)
        self.repaired += 1
        if not self.logged:
            self.logged = True
            log.info("PVM SYSCALL repair: first system call from guest user mode completed by pyhv")
