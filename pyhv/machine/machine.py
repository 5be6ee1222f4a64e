"""`Machine`: a VM assembled from a `VmConfig`, and its lifecycle.

Memory map (both machine types; the addresses are in `arch/x86/layout.py`):
    0x00000000 - 0x0009ffff   RAM (alias ram-low of the RAM block)
    0x000a0000 - 0x000bffff   unassigned (legacy VGA window)
    0x000c0000 - below_4g     RAM (alias ram-below-4g); with firmware, the ISA BIOS window (0xe0000+) on top
    below_4g   - 4 GiB        MMIO hole (IOAPIC 0xfec00000, LAPIC 0xfee00000, firmware ROM at the top)
    4 GiB      - ...          RAM above the hole (alias ram-above-4g), when memory exceeds 3 GiB
Ports: serial0 0x3f8 (IRQ 4), i8042 0x60/0x64 (IRQ 1/12), RTC 0x70/0x71 (IRQ 8), POST 0x80, debugcon 0x402,
debug-exit 0xf4; the PIC, PIT (0x40-0x43, 0x61) and IOAPIC are KVM's in-kernel models.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable

from pyhv.arch.x86 import cpu_dump, pm_interrupt
from pyhv.arch.x86.cpuid import processor_signature, vcpu_cpuid
from pyhv.arch.x86.emulate import InstructionCompleter, UnsupportedInstruction
from pyhv.arch.x86.firmware import map_firmware
from pyhv.arch.x86.linux_boot import AcpiBlob, LinuxBoot
from pyhv.arch.x86.pvm import nested_safe_cpuid, pvm_cmdline
from pyhv.arch.x86.pvm_syscall import SyscallRepair
from pyhv.machine.guest_debug import GuestDebugger
from pyhv.arch.x86.reset import reset_state
from pyhv.runtime.chardev import Chardev, open_chardev
from pyhv.config import VmConfig
from pyhv.devices.cmos_rtc import CmosRtc
from pyhv.devices.debug_exit import DebugExit
from pyhv.machine.coalesced_io import DRAIN_INTERVAL, CoalescedIo
from pyhv.devices.debugcon import DebugCon
from pyhv.devices.device import Device
from pyhv.devices.device_type import PLATFORM, DeviceContext
from pyhv.devices.i8042 import I8042
from pyhv.devices.irq import CallbackIrqLine
from pyhv.devices.post_code import PostCode
from pyhv.devices.uart16550 import Uart16550
from pyhv.errors import ConfigError
from pyhv.runtime.iothread import IoThread
from pyhv.runtime import sandbox
from pyhv.kvm import Kvm
from pyhv.kvm import constants as C
from pyhv.memory import AddressSpace, GuestMemory, GuestMemoryError, MemoryRegion, RamBlock, memory_transaction
from pyhv.memory.kvm_slots import KvmMemslots
from pyhv.stats import ExitStats
from pyhv.machine.board import Board
from pyhv.machine.vcpu import VcpuThread, install_kick_handler
from pyhv.arch.x86.layout import (ACPI_TABLES_ADDR, BELOW_4G_LIMIT, FOUR_GIB, IDENTITY_MAP_ADDR, TSS_ADDR, VGA_END,
                                  VGA_START)

if TYPE_CHECKING:
    from pyhv.kvm.binary_stats import StatsReader
    from pyhv.machine.migration import Incoming, Migration

log = logging.getLogger(__name__)


DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1"
EXIT_GUEST_CRASHED = 3               # internal error, failed entry, triple fault


def thread_cpu_time(native_id: int) -> dict[str, float]:
    """User and system CPU seconds of one of this process's threads (/proc/self/task/TID/stat; {} if gone)."""
    try:
        with open(f"/proc/self/task/{native_id}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    return {"user": int(fields[11]) / ticks, "system": int(fields[12]) / ticks}


class Machine:
    def __init__(self, config: VmConfig, kvm: Kvm | None = None, images_inactive: bool = False) -> None:
        self.config = config.validate()
        # a live migration's destination: disk images are opened but not locked until the VM moves here
        self.images_inactive = images_inactive
        install_kick_handler()
        self._owns_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self.flavour = self.kvm.flavour
        self.vm = self.kvm.create_vm()
        self.exit_status: int | None = None
        self.exit_reason = ""
        self._done = threading.Event()
        self._lifecycle = threading.RLock()
        self.first_run_monotonic: float | None = None
        self.state = "created"            # created | running | paused | debug (stopped by gdb) | shutdown
        self._stats_readers: tuple | None = None
        self.migration: "Migration | None" = None      # the last outgoing live migration (QMP migrate)
        self.incoming: "Incoming | None" = None        # waiting for or receiving one (--incoming)
        self.deferred_incoming: Callable[[str], object] | None = None   # --incoming defer: QMP migrate-incoming
        self.migrated = False                            # it completed: this side stays paused (postmigrate)
        self.migration_parameters = {"downtime-limit": 300, "max-bandwidth": 0}   # ms; bytes/s, 0: unlimited
        self.start_paused = False         # start() leaves the vCPUs stopped before their first instruction
        self.listeners: list[Callable[[str, dict], None]] = []   # lifecycle events (QMP): (event, data)
        self.iothread = IoThread()
        # --sandbox: the threads serving the guest run under a seccomp filter (runtime/sandbox.py)
        self.sandboxed = config.sandbox and sandbox.supported()
        self.iothread.sandbox = "io" if self.sandboxed else None
        self.chardevs: list[Chardev] = []

        self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        self.vm.set_tss_addr(TSS_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2(speaker_dummy=True)   # KVM then also serves port 0x61 (PIT channel 2 gate/output)

        self._vcpu0 = self.vm.create_vcpu(0)
        try:
            tsc_khz = self._vcpu0.get_tsc_khz()
        except OSError:
            tsc_khz = None
        with memory_transaction():           # one flat view and one set of memslots for the whole board
            self._build_board(tsc_khz)

        supported = self.kvm.supported_cpuid()
        self.cpu_model = config.cpu_model if config.cpu_model != "auto" else (
            "nested-safe" if self.flavour.is_pvm else "host")
        if self.cpu_model == "nested-safe":
            supported = nested_safe_cpuid(supported)
        self.processor_signature = processor_signature(supported)
        self.cpu_features = next((e.edx for e in supported if e.function == 1), 0)
        self.vcpus: list[VcpuThread] = []
        handlers = self._exit_handlers()
        for i in range(config.cpus):
            vcpu = self._vcpu0 if i == 0 else self.vm.create_vcpu(i)
            vcpu.set_cpuid2(vcpu_cpuid(supported, i, config.cpus))
            self.vcpus.append(VcpuThread(vcpu, self.io, self.memory, handlers, accounting=config.accounting,
                                         on_first_run=self._first_run if i == 0 else None))
            self.vcpus[-1].sandbox = "vcpu" if self.sandboxed else None
        fix = config.pvm_syscall_fix
        self.syscall_repair = SyscallRepair(self.guest_memory.read, lambda v: self.debugger.apply(v)) \
            if self.linux is not None and (fix == "on" or (fix == "auto" and self.flavour.is_pvm)) else None
        self.debugger = GuestDebugger(self)
        self.coalesced = CoalescedIo.create(self.kvm, self.vm, self.vcpus[0].vcpu.run_map, self.io, self.memory)
        if self.coalesced is not None:
            self.coalesced.add(DebugCon.PORT, DebugCon.SIZE)     # SeaBIOS's log: no exit per byte
            for v in self.vcpus:
                v.pre_exit, v.coalesced = self.coalesced.drain, self.coalesced
        self._initial_lapics = [v.vcpu.get_lapic() for v in self.vcpus]
        self._initial_irqchips = [self.vm.get_irqchip(chip) for chip in range(3)]
        self._boot_state()

    def _kernel_cmdline(self, tsc_khz: int | None) -> str:
        cmdline = self.config.append or DEFAULT_CMDLINE
        if self.flavour.is_pvm and self.config.pvm_workarounds:
            cmdline, added = pvm_cmdline(cmdline, tsc_khz)
            if added:
                log.info("PVM host: added kernel options: %s", " ".join(added))
        return cmdline

    def _boot_state(self) -> None:
        """Every vCPU's state at power-on (and after a reset): the reset vector for firmware, the kernel's
        entry for direct Linux boot (with the kernel, initrd and tables written to RAM again)."""
        if self.linux is not None:
            self.board.prepare_direct_boot()
            self.linux.load(self.guest_memory, self.processor_signature, self.cpu_features)
        for v in self.vcpus:
            if self.linux is not None:
                self.linux.setup_vcpu(v.vcpu, self.guest_memory, bsp=v.id == 0)
                if v.id:
                    v.vcpu.set_mp_state(C.KVM_MP_STATE_UNINITIALIZED)
            else:
                reset_state(v.vcpu, self.processor_signature)
                v.vcpu.set_mp_state(C.KVM_MP_STATE_RUNNABLE if v.id == 0 else C.KVM_MP_STATE_UNINITIALIZED)

    # --- construction ------------------------------------------------------------------------------------
    def _build_board(self, tsc_khz: int | None) -> None:
        """Memory map, ISA devices, the board (`pc`: PCI and fw_cfg; `microvm`: virtio-mmio slots) and the
        firmware ROM or kernel (inside one memory transaction)."""
        config = self.config
        self._build_memory()
        self._build_isa_devices()
        self.board: Board = self._board_class(config.machine)(self)
        self.poller = None
        if config.sidecore:
            from pyhv.virtio.poller import QueuePoller
            polled = [t.backend for t in self.board.transports if getattr(getattr(t, "backend", None), "pollable", False)]
            self.poller = QueuePoller(polled)
            self.poller.sandbox = "io" if self.sandboxed else None
            log.info("sidecore: polling %s", ", ".join(d.name for d in polled) or "nothing (no virtio-blk/net)")
        self.boot_rom: MemoryRegion | None = None
        self.linux: LinuxBoot | None = None
        if config.firmware:
            with open(config.firmware, "rb") as f:
                self.boot_rom = map_firmware(self.system_memory, f.read())
        elif config.kernel:
            acpi = self._acpi_tables() if config.acpi else None
            cmdline = " ".join([self._kernel_cmdline(tsc_khz), *self.board.kernel_cmdline(acpi is not None)])
            self.linux = LinuxBoot.prepare(config.kernel, config.initrd, cmdline, self.below_4g, self.above_4g,
                                           config.cpus, config.boot_entry, acpi)
            log.info("booting %s", self.linux.describe())
        else:
            raise ConfigError("nothing to boot", "give --kernel FILE or --firmware FILE")

    @staticmethod
    def _board_class(machine: str) -> type[Board]:
        # imported here: a VM loads only its own board's devices (start-up time is one of pyhv's figures)
        if machine == "pc":
            from pyhv.machine.pc import PcBoard
            return PcBoard
        from pyhv.machine.microvm import MicrovmBoard
        return MicrovmBoard

    def _acpi_tables(self) -> AcpiBlob | None:
        """The board's ACPI tables for guest RAM at ACPI_TABLES_ADDR (direct boot), or None if it has none."""
        acpi_config = self.board.acpi_config()
        if acpi_config is None:
            log.info("%s: no ACPI tables for a directly booted kernel; the MP table describes the CPUs",
                     self.config.machine)
            return None
        from pyhv.arch.x86.acpi.builder import build_tables, layout_in_memory
        start = time.perf_counter()
        try:
            data, rsdp, where = layout_in_memory(build_tables(acpi_config), ACPI_TABLES_ADDR)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        blob = AcpiBlob(data, rsdp)
        log.info("ACPI: %d bytes of tables at %#x (%s), built in %.2f ms", len(data), ACPI_TABLES_ADDR,
                 ", ".join(f"{name} {addr:#x}" for name, addr in where.items()), (time.perf_counter() - start) * 1e3)
        return blob

    def _build_memory(self) -> None:
        cfg = self.config
        self.system_memory = MemoryRegion.container("system", 1 << 64)
        self.system_io = MemoryRegion.container("io", 0x10000)
        self.memory = AddressSpace("memory", self.system_memory)
        self.io = AddressSpace("I/O", self.system_io, is_port_space=True)
        self.memslots = KvmMemslots(self.vm)
        self.memory.add_listener(self.memslots)
        self.guest_memory = GuestMemory(self.memory)
        self.ram = RamBlock("pc.ram", cfg.memory, shared=cfg.memory_backend == "memfd")
        self.below_4g = min(cfg.memory, BELOW_4G_LIMIT)
        self.above_4g = cfg.memory - self.below_4g
        ram_region = MemoryRegion.ram("pc.ram", cfg.memory, block=self.ram)
        self.ram_region = ram_region
        low_end = min(self.below_4g, VGA_START)
        self.system_memory.add_subregion(0, MemoryRegion.alias("ram-low", ram_region, 0, low_end))
        if self.below_4g > VGA_END:
            self.system_memory.add_subregion(
                VGA_END, MemoryRegion.alias("ram-below-4g", ram_region, VGA_END, self.below_4g - VGA_END))
        if self.above_4g:
            self.system_memory.add_subregion(
                FOUR_GIB, MemoryRegion.alias("ram-above-4g", ram_region, self.below_4g, self.above_4g))

    def irq_line(self, gsi: int) -> CallbackIrqLine:
        vm = self.vm
        return CallbackIrqLine(lambda level: vm.irq_line(gsi, int(level)))

    def attach(self, device: Device) -> Device:
        """Map every region `device` claims into the port or memory space and keep it for reset, statistics and
        dumps (the one way a device joins the machine; PCI functions join through `PciBus.plug`)."""
        if device.name in self.devices:
            raise ValueError(f"two devices named {device.name!r}")
        for claim in device.claims():
            space = self.system_io if claim.space == "io" else self.system_memory
            space.add_subregion(claim.address, claim.region, claim.priority)
        self.devices[device.name] = device
        return device

    def open_chardev(self, spec) -> Chardev:
        """A character back end the machine closes at the end (the UART's, debugcon's, virtio-console's)."""
        chardev = open_chardev(spec, on_quit=lambda: self.shutdown(0, "quit from the console"),
                               on_stats=self.stats_report)
        self.chardevs.append(chardev)
        return chardev

    def _build_isa_devices(self) -> None:
        cfg = self.config
        self.devices: dict[str, Device] = {}
        serial_out = self.open_chardev(cfg.serial)
        uart = Uart16550("serial0", self.irq_line(4), serial_out.write)
        serial_out.attach(uart.receive, self.iothread)
        rtc = CmosRtc("rtc", self.irq_line(8), call_later=self.iothread.call_later)
        rtc.set_memory_size(self.below_4g, self.above_4g)
        rtc.set_cpu_count(cfg.cpus)
        debugcon_out = self.open_chardev(cfg.debugcon)
        for device in (uart, I8042("i8042", self.irq_line(1), self.irq_line(12), on_reset=self._guest_reset), rtc,
                       PostCode("post", log_codes=cfg.log_post), DebugCon("debugcon", debugcon_out.write),
                       DebugExit("debug-exit", on_exit=self._debug_exit)):
            self.attach(device)
        for spec in cfg.device_specs():
            if spec.transport == PLATFORM:
                name = spec.type.name + (str(spec.position) if spec.position else "")
                self.attach(spec.type.create(DeviceContext(name, spec.position, self), spec.options))

    # --- exits that are not port or MMIO accesses ------------------------------------------------------------
    def _exit_handlers(self) -> dict:
        return {
            C.KVM_EXIT_SHUTDOWN: self._on_triple_fault,
            C.KVM_EXIT_INTERNAL_ERROR: self._on_internal_error,
            C.KVM_EXIT_FAIL_ENTRY: lambda v, r: self.crash(v, "KVM: entry failed, hardware error "
                                                           f"{v.vcpu.run.fail_entry.hardware_entry_failure_reason:#x}"),
            C.KVM_EXIT_SYSTEM_EVENT: self._on_system_event,
            C.KVM_EXIT_DEBUG: self._on_debug,
            C.KVM_EXIT_HLT: lambda v, r: self.crash(v, "vCPU halted with no interrupt controller"),
            C.KVM_EXIT_IRQ_WINDOW_OPEN: lambda v, r: True,
            None: lambda v, r: self.crash(v, f"unexpected KVM exit {C.EXIT_REASON_NAMES.get(r, r)}"),
            -1: lambda v, r: self.crash(v, f"vCPU thread failed: {v.error!r}", dump=False),
        }

    def _on_triple_fault(self, vcpu: VcpuThread, reason: int) -> bool:
        if self.flavour.is_pvm and self.config.emulation_fallbacks and self._deliver_pm_interrupt(vcpu):
            return True
        if self.config.on_reset == "restart":
            log.warning("vCPU %d triple fault: resetting the machine", vcpu.id)
            self._guest_reset()
            return True
        return self.crash(vcpu, "triple fault (KVM_EXIT_SHUTDOWN)")

    def _deliver_pm_interrupt(self, vcpu: VcpuThread) -> bool:
        """PVM turns an interrupt for a legacy protected-mode guest into a triple fault: deliver it here instead
        (pyhv/arch/x86/pm_interrupt.py). False when the triple fault is something else."""
        v = vcpu.vcpu
        try:
            regs, sregs = v.get_regs(), v.get_sregs()
            vector = pm_interrupt.in_service_vector(
                bytes(self.vm.get_irqchip(C.KVM_IRQCHIP_PIC_MASTER).chip[:16]),
                bytes(self.vm.get_irqchip(C.KVM_IRQCHIP_PIC_SLAVE).chip[:16]))
            pm_interrupt.deliver(vector, regs, sregs, self.guest_memory.read, self.guest_memory.write)
        except (pm_interrupt.NotDeliverable, GuestMemoryError) as e:
            log.debug("vCPU %d triple fault is not an undeliverable interrupt: %s", vcpu.id, e)
            return False
        v.set_sregs(sregs)
        v.set_regs(regs)
        if self._count_fallback(vcpu, "pm-interrupt") == 1:
            log.info("vCPU %d: PVM cannot deliver interrupts in protected mode: vector %#x delivered by pyhv; "
                     "further ones are counted in --stats", vcpu.id, vector)
        return True

    @staticmethod
    def _count_fallback(vcpu: VcpuThread, key: str) -> int:
        """Count one piece of work pyhv did in KVM's place (--stats "fallbacks"); the new count."""
        count = vcpu.stats.fallbacks[key] = vcpu.stats.fallbacks.get(key, 0) + 1
        return count

    def _on_internal_error(self, vcpu: VcpuThread, reason: int) -> bool:
        internal = vcpu.vcpu.run.internal
        if internal.suberror == C.KVM_INTERNAL_ERROR_EMULATION and self.config.emulation_fallbacks:
            failure = vcpu.vcpu.run.emulation_failure
            if failure.flags & C.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
                code = bytes(failure.insn_bytes[:failure.insn_size])
                if code[:1] == b"\xcc" and self.debugger.on_int3(vcpu):
                    return True
                completer = InstructionCompleter(vcpu.vcpu, self.guest_memory.read, self.guest_memory.write)
                try:
                    name = completer.complete(code)
                except UnsupportedInstruction as e:
                    log.debug("cannot complete %s: %s", code.hex(" "), e)
                else:
                    if self._count_fallback(vcpu, name) == 1:
                        log.info("vCPU %d: KVM's emulator failed on %s: completed by pyhv; further ones are "
                                 "counted in --stats", vcpu.id, name)
                    return True
        lines = [f"KVM internal error. Suberror: {internal.suberror}"]
        for i in range(min(internal.ndata, 16)):
            lines.append(f"extra data[{i}]: {internal.data[i]:#018x}")
        if internal.suberror == C.KVM_INTERNAL_ERROR_EMULATION:
            lines.append("emulation failure")
        return self.crash(vcpu, "\n".join(lines))

    def _on_debug(self, vcpu: VcpuThread, reason: int) -> bool:
        done = self.syscall_repair.on_debug_exit(vcpu.vcpu) if self.syscall_repair else None
        if done is None:
            if self.debugger.on_debug_exit(vcpu):
                return True
            return self.crash(vcpu, f"unexpected debug exit at {vcpu.vcpu.run.debug.pc:#x}")
        if done in ("syscall", "fault"):
            self._count_fallback(vcpu, "syscall" if done == "syscall" else "page-fault pass-through")
        return True

    def _poll_syscall_repair(self) -> None:
        """Until the guest kernel has set LSTAR on every vCPU, look again every 100 ms (I/O thread)."""
        if self.state == "shutdown" or self.syscall_repair is None:
            return
        pending = False
        for v in self.vcpus:
            if v.id not in self.syscall_repair.armed:
                try:
                    pending |= not v.call(lambda v=v: self.syscall_repair.try_arm(v.vcpu))
                except (TimeoutError, OSError) as e:
                    log.debug("SYSCALL repair: vCPU %d not armed yet: %s", v.id, e)
                    pending = True
        if pending:
            self.iothread.call_later(0.1, self._poll_syscall_repair)

    def _on_system_event(self, vcpu: VcpuThread, reason: int) -> bool:
        kind = vcpu.vcpu.run.system_event.type
        if kind == C.KVM_SYSTEM_EVENT_SHUTDOWN:
            self.shutdown(0, "guest powered off")
            return False
        if kind == C.KVM_SYSTEM_EVENT_RESET:
            self._guest_reset()
            return True
        return self.crash(vcpu, f"guest crash event (system event {kind})")

    def _debug_exit(self, status: int, value: int) -> None:
        self.shutdown(status, f"debug-exit port written with {value:#x}")

    def _guest_reset(self) -> None:
        """The guest pulled the reset line (i8042, triple fault with --on-reset restart, KVM reset event)."""
        if self.config.on_reset == "restart":
            self.iothread.call_soon(self.reset)      # not on the vCPU thread: reset pauses every vCPU
        else:
            self.shutdown(0, "guest reset (use --on-reset restart to reboot instead)")

    def cpu_state(self, vcpu: VcpuThread) -> str:
        """QEMU-style register dump of a vCPU (on its own thread, or while it is paused)."""
        def dump() -> str:
            regs, sregs = vcpu.vcpu.get_regs(), vcpu.vcpu.get_sregs()
            code = cpu_dump.read_code(sregs, regs.rip, vcpu.vcpu.translate, self.guest_memory.read)
            return cpu_dump.format_cpu_state(regs, sregs, *(code or (None,)))
        return vcpu.call(dump)

    def crash(self, vcpu: VcpuThread, message: str, dump: bool = True) -> bool:
        text = f"pyhv: vCPU {vcpu.id}: {message}"
        if dump:
            try:
                text += "\n" + self.cpu_state(vcpu)
            except OSError as e:
                text += f"\n(registers unavailable: {e})"
        try:
            print(text, file=sys.stderr, flush=True)
        except OSError:
            pass               # stderr closed (a pipe whose reader left): the VM must still end
        finally:
            self.shutdown(EXIT_GUEST_CRASHED, message.splitlines()[0])
        return False

    # --- lifecycle -----------------------------------------------------------------------------------------
    def _first_run(self) -> None:
        self.first_run_monotonic = time.monotonic()

    def _emit(self, event: str, **data: object) -> None:
        for listener in list(self.listeners):
            try:
                listener(event, data)
            except Exception:
                log.exception("event listener failed")

    def start(self) -> None:
        with self._lifecycle:
            if self.state == "shutdown" and self.first_run_monotonic is None and self.exit_status is not None:
                return          # ended before it started (a QMP quit during start-up): wait() returns at once
            if self.state != "created":
                raise RuntimeError(f"machine already {self.state}")
            self.iothread.start()
            if self.poller is not None:
                self.poller.start()
            if self.coalesced is not None:
                self._schedule_drain()
            self.state = "running"
            if self.start_paused:              # QEMU's -S: the vCPUs wait before their first instruction
                for v in self.vcpus:
                    v.request_pause()
                self.state = "paused"
            for v in self.vcpus:
                v.start()
            if self.syscall_repair is not None:
                self.iothread.call_later(0.1, self._poll_syscall_repair)

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the VM ends (returns its exit status) or `timeout` passes (returns None)."""
        if not self._done.wait(timeout):
            return None
        self._teardown()
        return self.exit_status

    def run(self) -> int:
        """start() and wait(); SIGINT and SIGTERM (in the main thread) end the VM cleanly with 130 / 143."""
        import signal
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.shutdown(143, "terminated"))
        self.start()
        try:
            while True:
                try:
                    return self.wait()
                except KeyboardInterrupt:
                    self.shutdown(130, "interrupted")
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def shutdown(self, status: int, reason: str = "") -> None:
        """End the VM with `status` (the first caller's status wins). Safe from any thread, vCPUs included."""
        with self._lifecycle:
            if self.exit_status is not None:
                return
            self.exit_status, self.exit_reason = status, reason
            self.state = "shutdown"
            log.info("VM ends (status %d): %s", status, reason)
            for v in self.vcpus:
                v.resume()
                v.request_stop()
        self._emit("SHUTDOWN", guest=True, reason=reason)
        self._done.set()

    def _schedule_drain(self) -> None:
        """Coalesced writes also reach their device when the guest stops exiting (e.g. it halts)."""
        def tick() -> None:
            self.coalesced.drain()
            if self.state != "shutdown":
                self.iothread.call_later(DRAIN_INTERVAL, tick)
        self.iothread.call_later(DRAIN_INTERVAL, tick)

    def _teardown(self) -> None:
        for v in self.vcpus:
            v.request_stop()
        for v in self.vcpus:
            v.join(timeout=5)
        if self.coalesced is not None:
            self.coalesced.drain()
        if self.poller is not None:
            self.poller.stop()
        self.iothread.stop()
        for chardev in self.chardevs:
            chardev.close()

    def pause(self) -> None:
        with self._lifecycle:
            if self.state != "running":
                return
            self._pause_vcpus()
            if self.poller is not None:
                self.poller.pause()
        self._emit("STOP")

    def _pause_vcpus(self) -> None:
        for v in self.vcpus:
            v.request_pause()
        for v in self.vcpus:
            if not v.wait_paused():
                log.warning("vCPU %d did not pause within 5 s", v.id)
        self.state = "paused"

    def resume(self) -> None:
        with self._lifecycle:
            if self.state != "paused":
                return
            if self.poller is not None:
                self.poller.resume()
            self._resume_vcpus()
        self._emit("RESUME")

    def debug_stop(self) -> None:
        """Stop every vCPU for a debugger (state "debug", QEMU's RUN_STATE_DEBUG); a STOP event if it ran."""
        with self._lifecycle:
            if self.state not in ("running", "paused", "debug"):
                return
            was_running = self.state == "running"
            self._pause_vcpus()
            self.state = "debug"
        if was_running:
            self._emit("STOP")

    def debug_resume(self, vcpu_ids: set[int]) -> None:
        """Let the vCPUs in `vcpu_ids` run again after a debugger stop (the others stay stopped)."""
        with self._lifecycle:
            if self.state != "debug":
                return
            for v in self.vcpus:
                if v.id in vcpu_ids:
                    v.resume()
            self.state = "running"
        self._emit("RESUME")

    def migrate(self, uri: str) -> None:
        """Start a live migration to `uri` (QMP migrate); its progress is `self.migration.info()`."""
        from pyhv.machine.migration import Migration
        if self.migration is not None and self.migration.status in ("setup", "active", "device"):
            raise RuntimeError("a migration is already in progress")
        if self.state not in ("running", "paused"):
            raise RuntimeError(f"cannot migrate a VM that is {self.state}")
        self.migration = Migration(self, uri, self.migration_parameters["downtime-limit"],
                                   self.migration_parameters["max-bandwidth"],
                                   lambda status: self._emit("MIGRATION", migration_status=status))
        self.migration.start()

    def run_incoming(self, uri: str) -> int:
        """Receive a live migration on `uri`, then run the VM as run() does."""
        from pyhv.machine.migration import Incoming
        self.incoming = Incoming(self, uri, lambda status: self._emit("MIGRATION", migration_status=status))
        self.incoming.run()                              # raises MigrationError; on success the VM runs
        while True:
            try:
                return self.wait()  # type: ignore[return-value]
            except KeyboardInterrupt:
                self.shutdown(130, "interrupted")

    def image_locks(self) -> list:
        """The locks of the disk images this machine's devices opened (`ImageLock`, drives with locking on)."""
        locks = []
        for device in self.devices.values():
            for part in (device, getattr(device, "backend", None)):
                lock = getattr(getattr(part, "image", None), "lock", None)
                if lock is not None and lock not in locks:
                    locks.append(lock)
        return locks

    def activate_images(self) -> None:
        """Take the image locks (the destination of a live migration, at switch-over); GuestImageError if
        another process holds an image."""
        for lock in self.image_locks():
            lock.acquire()
        self.images_inactive = False

    def inactivate_images(self) -> None:
        """Drop the image locks (the source of a live migration, once the VM is paused for good)."""
        for lock in self.image_locks():
            lock.release()

    def vcpu_thread(self) -> VcpuThread | None:
        """The vCPU whose thread is calling, or None."""
        current = threading.current_thread()
        return next((v for v in self.vcpus if v.thread is current), None)

    def _resume_vcpus(self) -> None:
        for v in self.vcpus:
            v.resume()
        self.state = "running"

    def powerdown(self) -> bool:
        """Press the board's ACPI power button (QMP system_powerdown); the guest decides what to do. False when
        the machine has no button (--acpi off)."""
        pressed = self.board.press_power_button()
        if not pressed:
            log.warning("system_powerdown: this machine has no ACPI power button (--acpi off); nothing pressed")
        return pressed

    def reset(self) -> None:
        """System reset: devices, interrupt controllers and vCPUs to their power-on state; RAM is kept."""
        with self._lifecycle:
            if self.state == "shutdown":
                return
            was_running = self.state == "running"
            if was_running:
                self._pause_vcpus()         # no STOP/RESUME events: a reset is one RESET event, as in QEMU
            for device in self.devices.values():
                device.reset()
            for chip in self._initial_irqchips:
                self.vm.set_irqchip(chip)
            for v, lapic in zip(self.vcpus, self._initial_lapics):
                v.vcpu.set_lapic(lapic)
                if self.syscall_repair is not None:
                    self.syscall_repair.disarm(v.vcpu)
            self._boot_state()
            if self.syscall_repair is not None:
                self.iothread.call_later(0.1, self._poll_syscall_repair)
            if was_running:
                self._resume_vcpus()
        self._emit("RESET", guest=True)

    # --- statistics ----------------------------------------------------------------------------------------
    def exit_stats(self) -> ExitStats:
        return ExitStats.merge([v.stats for v in self.vcpus])

    KVM_STATS = ("exits", "io_exits", "mmio_exits", "halt_exits", "irq_window_exits", "signal_exits",
                 "insn_emulation")

    def kvm_stats(self) -> dict[str, int]:
        """KVM's own per-vCPU counters, summed (the ones QEMU's query-stats shows too); {} if unavailable."""
        total: dict[str, int] = {}
        try:
            readers = self.kvm_stats_readers()[1]
        except OSError:
            return {}
        for reader in readers:
            stats = reader.read()
            for name in self.KVM_STATS:
                if isinstance(stats.get(name), int):
                    total[name] = total.get(name, 0) + stats[name]
        return total

    def kvm_stats_readers(self) -> tuple["StatsReader", list["StatsReader"]]:
        """KVM's binary statistics files of the VM and of each vCPU (opened once, on the vCPU's thread: opening
        waits for KVM_RUN, reading does not). OSError where KVM has none (before Linux 5.14)."""
        from pyhv.kvm.binary_stats import StatsReader
        if self._stats_readers is None:
            vm = StatsReader(self.vm.fd)
            vcpus = [v.call(lambda v=v: StatsReader(v.vcpu.fd)) for v in self.vcpus]
            self._stats_readers = (vm, vcpus)  # type: ignore[assignment]
        return self._stats_readers  # type: ignore[return-value]

    def virtio_stats(self) -> dict:
        """Per virtio device: the driver's notifications per queue (kicks and exits alike) and whether the sidecore
        poller serves it; the poller's own counters under "sidecore"."""
        out: dict = {}
        for transport in self.board.transports:
            backend = getattr(transport, "backend", None)
            if backend is not None and hasattr(backend, "notifications"):
                out[transport.name] = {"notifications": list(backend.notifications), "polled": backend.polled}
        if self.poller is not None:
            out["sidecore"] = self.poller.describe()
        return out

    def exits_report(self) -> dict:
        """Everything `x-pyhv-exits` and `pyhv top` show: per vCPU its state, CPU time and exits (by reason, port,
        MMIO region and device), the totals, the I/O thread's load and the virtqueues' depths."""
        owner = self.port_owner
        vcpus = []
        for v in self.vcpus:
            data = v.stats.as_dict(owner)
            data["by_device"] = self._exits_by_device(v.stats)
            thread = v.thread
            native = thread.native_id if thread is not None and thread.native_id is not None else 0
            state = "stopped" if v.finished else "paused" if v.paused else "running" if thread else "created"
            vcpus.append({"cpu-index": v.id, "thread-id": native, "state": state,
                          "cpu-time": thread_cpu_time(native), **data})
        total = self.exit_stats()
        wakeups, callbacks, busy_ns = self.iothread.stats
        io_native = self.iothread.native_id
        return {"state": self.state, "monotonic": time.monotonic(), "accounting": self.config.accounting,
                "vcpus": vcpus, "total": {**total.as_dict(owner), "by_device": self._exits_by_device(total)},
                "iothread": {"wakeups": wakeups, "callbacks": callbacks, "busy_ns": busy_ns,
                             "thread-id": io_native, "cpu-time": thread_cpu_time(io_native)},
                "virtqueues": self._virtqueue_depths()}

    def _exits_by_device(self, stats: ExitStats) -> dict[str, dict[str, int]]:
        """Port and MMIO exits summed per device (the owner of the region that answered)."""
        out: dict[str, dict[str, int]] = {}

        def add(name: str, cell: list[int]) -> None:
            entry = out.setdefault(name, {"count": 0, "ns": 0})
            entry["count"] += cell[0]
            entry["ns"] += cell[1]
        table = self.io.view.port_table
        for port, cell in list(stats.by_port.items()):
            region = table[port].region
            add(region.owner if region is not None else "unassigned", cell)
        for region, cell in list(stats.by_mmio.items()):
            add(getattr(region, "owner", None) or "unassigned", cell)
        return out

    def _virtqueue_depths(self) -> dict[str, list[int | None]]:
        """Per virtio device, the chains each queue's driver made available that the device has not taken yet."""
        out: dict[str, list[int | None]] = {}
        for transport in self.board.transports:
            backend = getattr(transport, "backend", None)
            queues = getattr(backend, "queues", None)
            if queues is None:
                continue
            depths: list[int | None] = []
            for queue in list(queues):
                try:
                    depths.append(queue.pending() if queue is not None else None)
                except Exception:            # a ring the guest broke: reported as unknown, never raised
                    depths.append(None)
            out[transport.name] = depths
        return out

    def iommu_stats(self) -> dict | None:
        """The IOMMU's state and, per device behind it, translations, IOTLB hits and misses and faults (None: no
        IOMMU)."""
        iommu = getattr(self.board, "iommu", None)
        return iommu.describe() if iommu is not None else None

    def port_owner(self, port: int) -> str:
        fr = self.io.view.port_table[port]
        if fr.region is None:
            return "unassigned"
        describe = getattr(fr.region, "describe", None)
        return describe(port - fr.start + fr.offset) if describe else fr.region.name

    def stats_report(self) -> str:
        stats = self.exit_stats()
        header = (f"pyhv exit statistics ({self.config.cpus} vCPU{'s' if self.config.cpus > 1 else ''}; "
                  f"KVM: {self.flavour.description})")
        text = stats.report(self.port_owner, header)
        if len(self.vcpus) > 1:
            text += "\n  per vCPU: " + ", ".join(f"vCPU {v.id}: {v.stats.exits}" for v in self.vcpus)
        extra = [f"unassigned port accesses: {self.io.unassigned_reads} reads, {self.io.unassigned_writes} writes",
                 f"unassigned MMIO accesses: {self.memory.unassigned_reads} reads, "
                 f"{self.memory.unassigned_writes} writes; ROM writes dropped: {self.memory.rom_writes_dropped}"]
        kvm = self.kvm_stats()
        if kvm:
            extra.append("KVM counters: " + ", ".join(f"{k} {v}" for k, v in kvm.items()))
        virtio = self.virtio_stats()
        if virtio:
            extra.append("virtio notifications by queue: " + ", ".join(
                f"{name} {v['notifications']}{' (polled)' if v['polled'] else ''}"
                for name, v in virtio.items() if name != "sidecore"))
        if "sidecore" in virtio:
            s = virtio["sidecore"]
            extra.append(f"sidecore poller: {s['looks']} looks, {s['busy_looks']} with work, {s['sleeps']} sleeps")
        iommu = self.iommu_stats()
        if iommu is not None:
            extra.append(f"IOMMU: translation {'on' if iommu['translation'] else 'off'}, invalidations "
                         + (", ".join(f"{k} {v}" for k, v in iommu["invalidations"].items()) or "none"))
            for name, c in iommu["devices"].items():
                extra.append(f"IOMMU {name}: {c['translations']} translations, IOTLB {c['iotlb-hits']} hits "
                             f"{c['iotlb-misses']} misses, {c['faults']} faults")
        post = self.devices.get("post")
        if post is not None:
            extra.append(f"POST codes: {post.state.writes} writes, last {post.state.last:#04x}")
        return text + "\n  " + "\n  ".join(extra)

    def block_devices(self) -> list[dict]:
        """Every disk (QMP query-block): its device name, image file, read-only flag, cache mode and size."""
        disks = []
        for name, device in self.devices.items():
            image = getattr(getattr(device, "backend", None), "image", None)
            if image is not None:
                disks.append({"name": name, "file": image.path, "readonly": image.readonly, "format": "raw",
                              "size": image.sectors * 512, "cache": image.cache})
        return disks

    def dump_pci(self) -> str:
        return self.board.bus.dump() if self.board.bus is not None else "(no PCI bus on this machine type)"

    def dump_mtree(self) -> str:
        return self.memory.dump_tree() + "\n\n" + self.io.dump_tree()

    def close(self) -> None:
        """Free KVM and host resources (after wait(), or for a machine that never started)."""
        if self.state in ("running", "paused", "debug"):
            self.shutdown(0, "closed")
            self.wait()
        elif self.state == "created":
            for chardev in self.chardevs:
                chardev.close()
            self.iothread.stop()
        if self.coalesced is not None:
            self.coalesced.close()
        if self._stats_readers is not None:
            vm_reader, vcpu_readers = self._stats_readers
            for reader in (vm_reader, *vcpu_readers):
                reader.close()
            self._stats_readers = None
        for v in self.vcpus:
            v.vcpu.close()
        self.board.close()
        self.vm.close()
        self.iothread.close()
        if self._owns_kvm:
            self.kvm.close()            # the /dev/kvm handle this machine opened
