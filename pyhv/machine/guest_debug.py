"""Debugging a running guest: breakpoints, watchpoints, single-step, stopping and resuming vCPUs, and guest
memory by linear address. The GDB stub (pyhv/monitor/gdbstub.py) drives it; it knows nothing of gdb's packets.

How each facility is made:
- **Hardware breakpoints** and, on hardware KVM, **watchpoints**: the debug registers DR0-DR3/DR7 through
  `KVM_SET_GUEST_DEBUG` (KVM_GUESTDBG_USE_HW_BP); DR6 says which one fired. The PVM SYSCALL repair
  (pyhv/arch/x86/pvm_syscall.py) owns DR0 where it runs, so a debugger has DR1-DR3 there.
- **Software breakpoints**: `int3` (0xCC) written over the instruction (ROM included) with KVM_GUESTDBG_USE_SW_BP;
  the exit comes with RIP on the int3. On PVM, KVM's emulator cannot execute int3 in guest kernel or real mode and
  exits with an emulation failure instead: the machine hands those to `on_int3()`, which turns one at a debugger's
  breakpoint into the same stop. Guest int3s that are not ours are given back to the guest (KVM_GUESTDBG_INJECT_BP).
- **Single-step**: KVM_GUESTDBG_SINGLESTEP on the stepped vCPU only, the others stay stopped, and interrupts are
  held back during the step (KVM_GUESTDBG_BLOCKIRQ) so `stepi` goes to the next instruction, not into the timer
  interrupt's handler (QEMU's defaults).
- **Watchpoints on PVM**: PVM's emulator does not check data breakpoints, so the watched guest page is taken out
  of KVM's memory map (an I/O region over it, at a priority above RAM): every access to that page exits, is done on
  the page's RAM by pyhv, and one that touches the watched bytes stops the VM after the instruction completed
  (x86 watchpoints are traps). The page's RAM is unchanged throughout; pyhv's own DMA to it is refused while the
  watchpoint exists (a device request there fails; a kernel variable's page is not a DMA target).

Stops: the vCPU that hits something records a `StopEvent`, pauses itself before it would re-enter the guest and
calls `on_stop` (on its own thread); the stub's thread then calls `halt()`, which stops every vCPU. `resume()`
lets them run again (some stepping). The machine's state is "debug" while a debugger holds it stopped.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from pyhv.kvm import constants as C
from pyhv.memory.guest import GuestMemoryError
from pyhv.memory.region import MemoryRegion, memory_transaction

if TYPE_CHECKING:
    from pyhv.kvm.system import Vcpu
    from pyhv.machine.machine import Machine
    from pyhv.machine.vcpu import VcpuThread

log = logging.getLogger(__name__)

SIGINT, SIGTRAP = 2, 5
DB_VECTOR, BP_VECTOR = 1, 3
DR6_BS = 1 << 14
DR7_FIXED_1 = 1 << 10
PAGE = 4096
INT3 = 0xCC
WATCH_TRAP_PRIORITY = 1000          # above RAM and every device region
RW_BITS = {"exec": 0b00, "write": 0b01, "access": 0b11, "read": 0b11}   # x86 has no read-only data breakpoint
LEN_BITS = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
WATCH_STOP_KIND = {"write": "watch", "read": "rwatch", "access": "awatch"}    # gdb's stop-reply names


class DebugError(Exception):
    """A request the debugger cannot do (no free debug register, an unmapped address): the stub answers Exx."""


@dataclass(frozen=True)
class StopEvent:
    vcpu: int
    signal: int = SIGTRAP
    kind: str = ""                  # "" (step, interrupt) | "swbreak" | "hwbreak" | "watch" | "rwatch" | "awatch"
    address: int = 0                # the breakpoint's or watchpoint's address


@dataclass
class Watch:
    kind: str                       # "write" | "read" | "access"
    address: int                    # linear, as the debugger gave it
    length: int
    gpa: int = 0                    # guest-physical (page traps)


@dataclass
class HardwareSlot:
    kind: str                       # "exec" | "write" | "read" | "access"
    address: int
    length: int
    software: bool = False          # a Z0 breakpoint served by a debug register (real mode on PVM)


@dataclass
class _WatchTrap:
    """An I/O region over one watched guest page; its accesses go to `ram` (the page's bytes)."""
    gpa: int
    ram: memoryview
    region: MemoryRegion
    watches: list[Watch] = field(default_factory=list)


class GuestDebugger:
    def __init__(self, machine: "Machine") -> None:
        self.machine = machine
        self.lock = threading.RLock()
        self.on_stop: Callable[[StopEvent], None] | None = None
        self.sw_breakpoints: dict[int, tuple[int, int]] = {}      # linear -> (guest-physical, original byte)
        self.slots: list[HardwareSlot | None] = [None] * 4
        self.reserved_slots = 1 if machine.syscall_repair is not None else 0     # DR0 is the repair's
        self.page_traps = machine.flavour.is_pvm
        self.traps: dict[int, _WatchTrap] = {}
        self.trap_watches: list[Watch] = []
        self.stepping: set[int] = set()
        self.block_irq = True                  # step with interrupts held back (QEMU's SSTEP_NOIRQ)
        self.pending: list[StopEvent] = []
        self.stopped = False
        self.hits = 0

    # --- KVM_SET_GUEST_DEBUG ----------------------------------------------------------------------------------
    def apply(self, vcpu: "Vcpu", extra: int = 0) -> None:
        """Load this vCPU's guest-debug state: the SYSCALL repair's DR0 and single-step plus the debugger's. Call on
        the vCPU's thread (or while it is stopped)."""
        control, regs, dr7 = extra, [0] * 8, DR7_FIXED_1
        repair = self.machine.syscall_repair
        if repair is not None:
            address, step = repair.debug_request(vcpu.id)
            if address is not None:
                regs[0], dr7, control = address, dr7 | 1, control | C.KVM_GUESTDBG_USE_HW_BP
            if step:
                control |= C.KVM_GUESTDBG_SINGLESTEP
        with self.lock:
            for i, slot in enumerate(self.slots):
                if slot is not None:
                    regs[i] = slot.address
                    dr7 |= (1 << (2 * i)) | (RW_BITS[slot.kind] << (16 + 4 * i)) | (
                        (LEN_BITS[slot.length] if slot.kind != "exec" else 0) << (18 + 4 * i))
                    control |= C.KVM_GUESTDBG_USE_HW_BP
            if self.sw_breakpoints:
                control |= C.KVM_GUESTDBG_USE_SW_BP
            if vcpu.id in self.stepping:
                control |= C.KVM_GUESTDBG_SINGLESTEP | (C.KVM_GUESTDBG_BLOCKIRQ if self.block_irq else 0)
        regs[7] = dr7
        try:
            vcpu.set_guest_debug(control | C.KVM_GUESTDBG_ENABLE if control else 0, regs)
        except OSError:
            if not control & C.KVM_GUESTDBG_BLOCKIRQ:
                raise
            self.block_irq = False             # an older KVM: a step may then enter an interrupt handler
            vcpu.set_guest_debug(control & ~C.KVM_GUESTDBG_BLOCKIRQ | C.KVM_GUESTDBG_ENABLE, regs)

    def _apply_all(self) -> None:
        for v in self.machine.vcpus:
            v.call(lambda v=v: self.apply(v.vcpu))

    # --- stopping and resuming --------------------------------------------------------------------------------
    def _stop(self, thread: "VcpuThread", event: StopEvent) -> None:
        """On the vCPU thread: record the stop and pause before re-entering the guest."""
        with self.lock:
            self.pending.append(event)
            self.hits += 1
        thread.request_pause()
        callback = self.on_stop
        if callback is not None:
            callback(event)

    def halt(self) -> None:
        """Stop every vCPU (from any thread but a vCPU's)."""
        self.machine.debug_stop()
        self.stopped = True

    def take_event(self) -> StopEvent | None:
        with self.lock:
            return self.pending.pop(0) if self.pending else None

    def resume(self, step: set[int] = frozenset(), run: set[int] | None = None) -> None:
        """Let the vCPUs in `step` execute one instruction and those in `run` (default: all others) run."""
        ids = {v.id for v in self.machine.vcpus}
        run = (ids - set(step)) if run is None else set(run) - set(step)
        with self.lock:
            self.stepping = set(step) & ids
        self._apply_all()
        self.stopped = False
        self.machine.debug_resume(self.stepping | (run & ids))

    def detach(self) -> None:
        """Remove everything the debugger inserted and let the VM run."""
        with self.lock:
            for entry in self.sw_breakpoints.values():
                self._restore_byte(*entry)
            self.sw_breakpoints.clear()
            self.slots = [None] * 4
            watches = list(self.trap_watches)
            self.stepping = set()
            self.pending.clear()
        for watch in watches:
            self._remove_trap_watch(watch)
        self._apply_all()
        self.stopped = False
        self.machine.debug_resume({v.id for v in self.machine.vcpus})

    # --- exits the machine hands over -------------------------------------------------------------------------
    def on_debug_exit(self, thread: "VcpuThread") -> bool:
        """A KVM_EXIT_DEBUG the SYSCALL repair did not claim. False: not the debugger's either."""
        debug = thread.vcpu.run.debug
        if debug.exception == BP_VECTOR:
            if debug.pc in self.sw_breakpoints:
                self._stop(thread, StopEvent(thread.id, SIGTRAP, "swbreak", debug.pc))
            else:                                            # the guest's own int3: deliver it
                self.apply(thread.vcpu, C.KVM_GUESTDBG_INJECT_BP)
            return True
        if debug.exception != DB_VECTOR:
            return False
        dr6 = debug.dr6
        with self.lock:
            for i, slot in enumerate(self.slots):
                if slot is not None and dr6 & (1 << i):
                    kind = ("swbreak" if slot.software else "hwbreak") if slot.kind == "exec" else \
                        WATCH_STOP_KIND[slot.kind]
                    self._stop(thread, StopEvent(thread.id, SIGTRAP, kind, slot.address))
                    return True
            if thread.id in self.stepping:
                self.stepping.discard(thread.id)
                self.apply(thread.vcpu)
                self._stop(thread, StopEvent(thread.id))
                return True
        return False

    def on_int3(self, thread: "VcpuThread") -> bool:
        """KVM's emulator failed on an int3 (PVM): True if it is one of ours (the vCPU stops on it)."""
        if not self.sw_breakpoints:
            return False
        regs, sregs = thread.vcpu.get_regs(), thread.vcpu.get_sregs()
        linear = sregs.cs.base + regs.rip
        if linear not in self.sw_breakpoints:
            return False
        self._stop(thread, StopEvent(thread.id, SIGTRAP, "swbreak", linear))
        return True

    # --- guest memory by linear address -----------------------------------------------------------------------
    def translate(self, vcpu: "VcpuThread", linear: int) -> int:
        phys = vcpu.call(lambda: vcpu.vcpu.translate(linear))
        if phys is None:
            raise DebugError(f"linear address {linear:#x} is not mapped")
        return phys  # type: ignore[return-value]

    def read(self, vcpu: "VcpuThread", linear: int, length: int) -> bytes:
        out = bytearray()
        while len(out) < length:
            at = linear + len(out)
            n = min(length - len(out), PAGE - at % PAGE)
            out += self._read_phys(self.translate(vcpu, at), n)
        return bytes(out)

    def write(self, vcpu: "VcpuThread", linear: int, data: bytes) -> None:
        done = 0
        while done < len(data):
            at = linear + done
            n = min(len(data) - done, PAGE - at % PAGE)
            self._write_phys(self.translate(vcpu, at), data[done:done + n])
            done += n

    def _trap_for(self, gpa: int) -> _WatchTrap | None:
        return self.traps.get(gpa - gpa % PAGE)

    def _read_phys(self, gpa: int, length: int) -> bytes:
        trap = self._trap_for(gpa)
        if trap is not None:
            return bytes(trap.ram[gpa % PAGE:gpa % PAGE + length])
        try:
            return self.machine.guest_memory.read(gpa, length)
        except GuestMemoryError as e:
            raise DebugError(str(e)) from None

    def _write_phys(self, gpa: int, data: bytes) -> None:
        trap = self._trap_for(gpa)
        if trap is not None:
            trap.ram[gpa % PAGE:gpa % PAGE + len(data)] = data
            return
        try:
            self.machine.guest_memory.write(gpa, data, rom=True)
        except GuestMemoryError as e:
            raise DebugError(str(e)) from None

    # --- breakpoints ------------------------------------------------------------------------------------------
    def insert_sw_breakpoint(self, vcpu: "VcpuThread", address: int) -> None:
        if self.page_traps and vcpu.call(lambda: not vcpu.vcpu.get_sregs().cr0 & 1):
            # PVM's emulator runs a real-mode int3 itself (the guest gets #BP, KVM does not exit): use a debug
            # register instead
            self._insert_slots([HardwareSlot("exec", address, 1, software=True)])
            return
        gpa = self.translate(vcpu, address)
        with self.lock:
            if address in self.sw_breakpoints:
                return
            original = self._read_phys(gpa, 1)[0]
            self._write_phys(gpa, bytes((INT3,)))
            self.sw_breakpoints[address] = (gpa, original)
            first = len(self.sw_breakpoints) == 1
        if first:
            self._apply_all()

    def remove_sw_breakpoint(self, address: int) -> None:
        with self.lock:
            entry = self.sw_breakpoints.pop(address, None)
            if entry is not None:
                self._restore_byte(*entry)
                changed = not self.sw_breakpoints
        if entry is None:
            self._remove_slots(lambda slot: slot.software and slot.address == address)
        elif changed:
            self._apply_all()

    def _restore_byte(self, gpa: int, original: int) -> None:
        try:
            if self._read_phys(gpa, 1)[0] == INT3:          # the guest may have rewritten its code meanwhile
                self._write_phys(gpa, bytes((original,)))
        except DebugError as e:
            log.warning("gdb breakpoint at guest-physical %#x not restored: %s", gpa, e)

    def insert_hw(self, kind: str, address: int, length: int) -> None:
        """A hardware breakpoint ("exec") or a watchpoint ("write" | "read" | "access")."""
        if kind != "exec" and self.page_traps:
            self._insert_trap_watch(Watch(kind, address, length))
            return
        pieces = [(address, 1)] if kind == "exec" else _aligned_pieces(address, length)
        self._insert_slots([HardwareSlot(kind, at, n) for at, n in pieces])

    def _insert_slots(self, wanted: list[HardwareSlot]) -> None:
        with self.lock:
            free = [i for i in range(self.reserved_slots, 4) if self.slots[i] is None]
            if len(free) < len(wanted):
                raise DebugError(f"{len(wanted)} debug register(s) needed, {len(free)} free")
            for i, slot in zip(free, wanted):
                self.slots[i] = slot
        self._apply_all()

    def _remove_slots(self, match: Callable[[HardwareSlot], bool]) -> None:
        with self.lock:
            self.slots = [None if slot is not None and match(slot) else slot for slot in self.slots]
        self._apply_all()

    def remove_hw(self, kind: str, address: int, length: int) -> None:
        if kind != "exec" and self.page_traps:
            for watch in [w for w in self.trap_watches if (w.kind, w.address, w.length) == (kind, address, length)]:
                self._remove_trap_watch(watch)
            return
        pieces = [(address, 1)] if kind == "exec" else _aligned_pieces(address, length)
        self._remove_slots(lambda slot: not slot.software and slot.kind == kind and (slot.address, slot.length)
                           in pieces)

    # --- watchpoints by page trap (PVM) -----------------------------------------------------------------------
    def _insert_trap_watch(self, watch: Watch) -> None:
        vcpu = self.machine.vcpus[0]
        pages = []
        for page in range(watch.address - watch.address % PAGE, watch.address + watch.length, PAGE):
            pages.append(self.translate(vcpu, page))
        watch.gpa = pages[0] + watch.address % PAGE
        if any(pages[i] != pages[0] + i * PAGE for i in range(len(pages))):
            raise DebugError("a watchpoint across pages that are not contiguous in guest-physical memory")
        with self.lock, memory_transaction():
            for gpa in pages:
                trap = self.traps.get(gpa)
                if trap is None:
                    trap = self._make_trap(gpa)
                trap.watches.append(watch)
            self.trap_watches.append(watch)

    def _make_trap(self, gpa: int) -> _WatchTrap:
        span = self.machine.guest_memory.span(gpa)
        if span is None or span[1] < gpa + PAGE:
            raise DebugError(f"guest-physical {gpa:#x} is not RAM: cannot watch it")
        start, _end, view, readonly = span
        if readonly:
            raise DebugError(f"guest-physical {gpa:#x} is read-only memory: nothing writes it")
        ram = view[gpa - start:gpa - start + PAGE]
        holder: list[_WatchTrap] = []

        def read(offset: int, size: int) -> int:
            value = int.from_bytes(ram[offset:offset + size], "little")
            self._trap_access(holder[0], gpa + offset, size, False)
            return value

        def write(offset: int, size: int, value: int) -> None:
            ram[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self._trap_access(holder[0], gpa + offset, size, True)

        region = MemoryRegion.io(f"gdb-watch@{gpa:#x}", PAGE, read, write, owner="gdb-watch")
        trap = _WatchTrap(gpa, ram, region)
        holder.append(trap)
        self.machine.system_memory.add_subregion(gpa, region, priority=WATCH_TRAP_PRIORITY)
        self.traps[gpa] = trap
        return trap

    def _remove_trap_watch(self, watch: Watch) -> None:
        with self.lock, memory_transaction():
            if watch in self.trap_watches:
                self.trap_watches.remove(watch)
            for gpa, trap in list(self.traps.items()):
                if watch in trap.watches:
                    trap.watches.remove(watch)
                if not trap.watches:
                    self.machine.system_memory.del_subregion(trap.region)
                    del self.traps[gpa]

    def _trap_access(self, trap: _WatchTrap, gpa: int, size: int, is_write: bool) -> None:
        """On the vCPU thread that made the access (it arrives as an MMIO exit)."""
        for watch in trap.watches:
            if gpa < watch.gpa + watch.length and watch.gpa < gpa + size and (
                    watch.kind == "access" or (watch.kind == "write") == is_write):
                thread = self.machine.vcpu_thread()
                if thread is not None:
                    kind = WATCH_STOP_KIND[watch.kind]
                    self._stop(thread, StopEvent(thread.id, SIGTRAP, kind, watch.address))
                return


def _aligned_pieces(address: int, length: int) -> list[tuple[int, int]]:
    """[address, address+length) as naturally aligned pieces of 1, 2, 4 or 8 bytes (one debug register each)."""
    pieces = []
    end = address + max(length, 1)
    while address < end:
        size = 8
        while size > 1 and (address % size or address + size > end):
            size //= 2
        pieces.append((address, size))
        address += size
    return pieces
