"""One thread per vCPU: KVM_RUN, decode the exit, dispatch it through the address spaces, account for it.

The loop body is the hottest Python in pyhv (one iteration per guest port or MMIO access), so it is written for
speed: locals instead of attribute lookups, `struct.unpack_from` on the kvm_run mmap, one precomputed table lookup
per port access, two clock reads per exit shared by every statistic, no allocation once warm, no logging.

Other threads control a vCPU by setting a request under its condition variable, setting kvm_run.immediate_exit
and sending it `KICK_SIGNAL`: KVM_RUN returns EINTR (at once if it was about to be entered), and the vCPU serves
the request (pause, stop, run a function on the vCPU thread) before it re-enters the guest.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import signal
import struct
import threading
import time
from typing import TYPE_CHECKING, Callable

from pyhv.kvm import constants as C
from pyhv.kvm.structs import KVM_RUN_EXIT_DATA, KVM_RUN_EXIT_REASON, KVM_RUN_IMMEDIATE_EXIT
from pyhv.kvm.system import Vcpu, libc_ioctl
from pyhv.memory.address_space import ALL_ONES
from pyhv.runtime.sandbox import confined
from pyhv.stats import ExitStats

if TYPE_CHECKING:
    from pyhv.machine.coalesced_io import CoalescedIo
    from pyhv.memory import AddressSpace

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1
_IO = struct.Struct("=BBHIQ")          # kvm_run.io: direction, size, port, count, data_offset
_MMIO = struct.Struct("=Q8sIB")        # kvm_run.mmio: phys_addr, data, len, is_write
_MMIO_DATA = KVM_RUN_EXIT_DATA + 8
_RING_HEAD = struct.Struct("=II")      # kvm_coalesced_mmio_ring: first, last

ExitHandler = Callable[["VcpuThread", int], bool]   # returns False to stop this vCPU


def install_kick_handler() -> None:
    """A no-op handler for KICK_SIGNAL, so a kick interrupts KVM_RUN instead of killing the process.
    Python only lets the main thread install it; embedders that create VMs elsewhere call this first."""
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("pyhv: call pyhv.machine.vcpu.install_kick_handler() from the main thread before starting "
                               "a VM from another thread")
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class VcpuThread:
    def __init__(self, vcpu: Vcpu, io: "AddressSpace", memory: "AddressSpace",
                 exit_handlers: dict[int, ExitHandler], accounting: bool = True,
                 on_first_run: Callable[[], None] | None = None) -> None:
        self.vcpu = vcpu
        self.id = vcpu.id
        self.io = io
        self.memory = memory
        self.exit_handlers = exit_handlers
        self.accounting = accounting
        self.pre_exit: Callable[[], None] | None = None   # replays coalesced I/O before an exit is handled
        self.coalesced: "CoalescedIo | None" = None          # whose ring the loop checks (set with pre_exit)
        self.stats = ExitStats()
        self.on_first_run = on_first_run
        self.thread: threading.Thread | None = None
        self.sandbox: str | None = None          # "vcpu": the thread enters runtime/sandbox.py's filter first
        self.cond = threading.Condition()
        self.pause_requested = False
        self.stop_requested = False
        self.paused = False
        self.finished = False
        self.calls: list[tuple[Callable[[], object], list]] = []
        self.error: BaseException | None = None

    # --- control from other threads -------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=confined(self.sandbox, self._main), name=f"vcpu{self.id}",
                                       daemon=True)
        self.thread.start()

    def _kick(self) -> None:
        """Call with self.cond held."""
        self.vcpu.run_map[KVM_RUN_IMMEDIATE_EXIT] = 1
        thread = self.thread
        if thread is not None and thread.ident is not None and not self.finished \
                and thread is not threading.current_thread():
            try:
                signal.pthread_kill(thread.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass
        self.cond.notify_all()

    def request_pause(self) -> None:
        with self.cond:
            self.pause_requested = True
            self._kick()

    def wait_paused(self, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.paused or self.finished or self.thread is None, timeout)

    def resume(self) -> None:
        with self.cond:
            self.pause_requested = False
            self.cond.notify_all()

    def request_stop(self) -> None:
        with self.cond:
            self.stop_requested = True
            self._kick()

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def call(self, fn: Callable[[], object], timeout: float = 10.0) -> object:
        """Run `fn` on this vCPU's thread while it is out of KVM_RUN (reading registers needs that)."""
        if self.thread is None or self.finished or threading.current_thread() is self.thread:
            return fn()
        box: list = []
        with self.cond:
            self.calls.append((fn, box))
            self._kick()
            if not self.cond.wait_for(lambda: box or self.finished, timeout):
                raise TimeoutError(f"vCPU {self.id} did not answer")
        if not box:
            return fn()        # the thread ended meanwhile: the vCPU is idle, call directly
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def _serve_requests(self) -> bool:
        """Called on the vCPU thread after KVM_RUN returned EINTR. False: leave the loop."""
        with self.cond:
            self.vcpu.run_map[KVM_RUN_IMMEDIATE_EXIT] = 0
            while True:
                while self.calls:
                    fn, box = self.calls.pop(0)
                    try:
                        box.append((True, fn()))
                    except BaseException as e:     # handed back to the caller
                        box.append((False, e))
                    self.cond.notify_all()
                if self.stop_requested:
                    return False
                if self.pause_requested:
                    if not self.paused:
                        self.paused = True
                        self.cond.notify_all()
                    self.cond.wait()
                    continue
                if self.paused:
                    self.paused = False
                    self.cond.notify_all()
                return True

    # --- the loop ---------------------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as e:   # reported by the machine; the VM must not hang on a dead vCPU
            self.error = e
            log.exception("vCPU %d failed", self.id)
            handler = self.exit_handlers.get(-1)
            if handler:
                handler(self, -1)
        finally:
            with self.cond:
                self.finished = True
                self.cond.notify_all()

    def _loop(self) -> None:
        fd = self.vcpu.fd
        run = self.vcpu.run_map
        ioctl = libc_ioctl
        get_errno = ctypes.get_errno
        KVM_RUN = C.KVM_RUN
        clock = time.perf_counter_ns
        unpack_io = _IO.unpack_from
        unpack_mmio = _MMIO.unpack_from
        io_space = self.io
        mem_space = self.memory
        all_ones = ALL_ONES
        stats = self.stats
        by_reason = stats.by_reason
        by_port = stats.by_port
        by_mmio = stats.by_mmio
        intr_cell = by_reason[C.KVM_EXIT_INTR]
        accounting = self.accounting
        handlers = self.exit_handlers
        reason_off = KVM_RUN_EXIT_REASON
        data_off = KVM_RUN_EXIT_DATA
        mmio_data = _MMIO_DATA
        io_view = io_space.view                                # the port table, refreshed when the view changes
        port_table = io_view.port_table
        mmio_view = mmio_range = None                          # one-entry cache of the last MMIO range
        mmio_start = mmio_end = 0
        pre_exit = self.pre_exit
        coalesced = self.coalesced
        ring = coalesced.ring if coalesced is not None else None
        unpack_head = _RING_HEAD.unpack_from
        if self.on_first_run is not None:
            self.on_first_run()
        t_done = t_exit = clock()
        # Accounting: each exit adds to one cell [count, ns handling it, ns inside KVM_RUN before it].
        while True:
            ret = ioctl(fd, KVM_RUN, 0)
            if accounting:
                t_exit = clock()
            if ring is not None:                               # coalesced writes queued by KVM: replay them first
                first, last = unpack_head(ring, 0)
                if first != last:
                    pre_exit()
            if ret < 0:
                err = get_errno()
                if err != errno.EINTR and err != errno.EAGAIN:
                    raise OSError(err, f"KVM_RUN: {errno.errorcode.get(err, err)}")
                keep_going = self._serve_requests()
                if accounting:
                    t = clock()
                    intr_cell[0] += 1
                    intr_cell[1] += t - t_exit
                    intr_cell[2] += t_exit - t_done
                    t_done = t
                if not keep_going:
                    return
                continue
            reason = run[reason_off]
            if reason == 2:                                    # KVM_EXIT_IO
                out, size, port, count, off = unpack_io(run, data_off)
                if io_space.view is not io_view:
                    io_view = io_space.view
                    port_table = io_view.port_table
                fr = port_table[port]
                if count == 1 and port + size <= fr.end:
                    if out:
                        fr.io_write(port + fr.delta, size,
                                    run[off] if size == 1 else int.from_bytes(run[off:off + size], "little"))
                    elif size == 1:
                        run[off] = fr.io_read(port + fr.delta, 1) & 0xFF
                    else:
                        run[off:off + size] = (fr.io_read(port + fr.delta, size) & all_ones[size]).to_bytes(
                            size, "little")
                else:
                    self._pio_general(out, size, port, count, off)
                if accounting:
                    t = clock()
                    cell = by_port.get(port)
                    if cell is None:
                        cell = by_port[port] = [0, 0, 0]
                    cell[0] += 1
                    cell[1] += t - t_exit
                    cell[2] += t_exit - t_done
                    t_done = t
            elif reason == 6:                                  # KVM_EXIT_MMIO
                addr, data, length, is_write = unpack_mmio(run, data_off)
                view = mem_space.view
                if view is mmio_view and mmio_start <= addr < mmio_end:
                    fr = mmio_range                            # same device as last time: no bisect
                else:
                    fr, mmio_start, mmio_end = view.span(addr)   # a device's range, or a gap (unassigned)
                    mmio_view, mmio_range = view, fr
                if addr + length <= mmio_end:
                    if is_write:
                        fr.io_write(addr + fr.delta, length, int.from_bytes(data[:length], "little"))
                    else:
                        run[mmio_data:mmio_data + length] = (fr.io_read(addr + fr.delta, length)
                                                             & all_ones[length]).to_bytes(length, "little")
                elif is_write:
                    mem_space.write(addr, length, int.from_bytes(data[:length], "little"))
                else:
                    run[mmio_data:mmio_data + length] = mem_space.read(addr, length).to_bytes(length, "little")
                if accounting:
                    t = clock()
                    cell = by_mmio.get(fr.region)
                    if cell is None:
                        cell = by_mmio[fr.region] = [0, 0, 0]
                    cell[0] += 1
                    cell[1] += t - t_exit
                    cell[2] += t_exit - t_done
                    t_done = t
            else:
                if reason == C.KVM_EXIT_INTR:
                    keep_going = self._serve_requests()
                else:
                    handler = handlers.get(reason) or handlers.get(None)
                    keep_going = handler(self, reason) if handler else False
                if accounting:
                    t = clock()
                    cell = by_reason[reason if reason < len(by_reason) else 0]
                    cell[0] += 1
                    cell[1] += t - t_exit
                    cell[2] += t_exit - t_done
                    t_done = t
                if not keep_going:
                    return

    def _pio_general(self, out: int, size: int, port: int, count: int, off: int) -> None:
        """String I/O (rep ins/outs: `count` items of `size` bytes) and accesses that straddle two devices."""
        run = self.vcpu.run_map
        space = self.io
        for i in range(count):
            at = off + i * size
            if out:
                space.write(port, size, int.from_bytes(run[at:at + size], "little"))
            else:
                run[at:at + size] = (space.read(port, size) & ALL_ONES[size]).to_bytes(size, "little")
