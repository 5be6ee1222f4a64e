"""The `pyhv` command line.

Exit codes of `pyhv run`: the guest's status (0 when it powers off or resets; (v << 1) | 1 when it writes v to the
debug-exit port 0xf4), 2 for a usage or configuration error, 3 when the guest crashed (KVM internal error, failed
entry, triple fault), 130 when interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Sequence

from pyhv.version import __version__
from pyhv.errors import ConfigError, PyhvError

if TYPE_CHECKING:
    from pyhv.config import VmConfig
    from pyhv.machine.machine import Machine

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (with exit code 2) instead of usage text plus error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


RUN_EPILOG = """\
examples:
  pyhv run --firmware /usr/share/seabios/bios.bin --debugcon stdio --serial none
  pyhv run --firmware guest.bin --memory 64M --stats

console keys (--serial stdio on a terminal): C-a x quit, C-a s statistics, C-a h help.
exit status: the guest's (0 on power-off; (v<<1)|1 after writing v to port 0xf4), 2 usage error, 3 guest crash.
"""


def _add_run_options(p: argparse.ArgumentParser) -> None:
    boot = p.add_argument_group("what to boot")
    boot.add_argument("--firmware", "--bios", metavar="FILE",
                      help="flat firmware ROM (e.g. SeaBIOS bios.bin) mapped to end at 4 GiB; "
                           "the vCPU starts at its reset vector in real mode")
    boot.add_argument("--kernel", metavar="FILE", help="Linux kernel (bzImage or vmlinux) to boot directly")
    boot.add_argument("--initrd", metavar="FILE", help="initial ramdisk for --kernel")
    boot.add_argument("--append", metavar="CMDLINE", default="",
                      help="kernel command line for --kernel (default: console=ttyS0 reboot=k panic=-1)")
    boot.add_argument("--boot-entry", choices=("auto", "pvh", "linux64"), default="auto",
                      help="kernel entry: PVH (an ELF vmlinux's note) or the 64-bit boot protocol; auto: PVH for a "
                           "vmlinux that has the note, 64-bit for a bzImage (decompressed on the host)")
    hw = p.add_argument_group("hardware")
    hw.add_argument("--machine", "-M", default="microvm", choices=("microvm", "pc"),
                    help="machine type (default: microvm)")
    hw.add_argument("--memory", "-m", default="128M", metavar="SIZE",
                    help="guest RAM; K/M/G suffixes, a bare number is MiB (default: 128M)")
    hw.add_argument("--cpus", "--smp", type=int, default=1, metavar="N", help="number of vCPUs (default: 1)")
    hw.add_argument("--cpu", default="auto", choices=("auto", "host", "nested-safe"),
                    help="CPUID profile: host (what KVM supports), nested-safe (hides what nested/PVM hosts cannot "
                         "emulate, and KVM's paravirt leaves); auto: nested-safe on PVM hosts")
    hw.add_argument("--memory-backend", choices=("anon", "memfd"), default="anon",
                    help="anon: private memory; memfd: shareable with other processes (vhost-user)")
    hw.add_argument("--device", action="append", default=[], metavar="NAME[,OPTIONS]",
                    help="add a device, e.g. virtio-rng-pci, testdev, vhost-user-blk-pci,socket=PATH (vhost-user "
                         "needs --memory-backend memfd); `--device help` lists them all with their options")
    hw.add_argument("--drive", action="append", default=[], metavar="SPEC",
                    help="virtio-blk disk (virtio-pci on pc, virtio-mmio on microvm): file=PATH[,readonly=on]"
                         "[,cache=none|writeback][,serial=ID][,num-queues=N][,bootindex=N][,locking=off]; the "
                         "image is locked as QEMU locks it (another writer, or a writer beside readers, is refused; "
                         "locking=off skips the check); repeat for more disks")
    hw.add_argument("--no-ioeventfd", action="store_true",
                    help="virtio notifications exit to pyhv instead of being handled by KVM (for comparison)")
    hw.add_argument("--no-msix", action="store_true", help="PCI devices offer no MSI-X: interrupts are INTx only")
    hw.add_argument("--sidecore", action="store_true",
                    help="sidecore emulation: a thread of its own polls every virtio-blk and virtio-net queue and "
                         "the guest is asked never to notify them (default: samecore, notifications)")
    hw.add_argument("--sandbox", choices=("on", "off"), default="on",
                    help="on (default, as QEMU's -sandbox on): the vCPU and I/O threads run under a seccomp filter "
                         "refusing (EPERM) the system calls a running VMM never needs: execve, fork, ptrace, "
                         "mount, module loading, set*uid, ... and socket on vCPU threads (the list is in "
                         "pyhv/runtime/sandbox.py); off: no filter")
    hw.add_argument("--acpi", choices=("on", "off"), default="on",
                    help="ACPI tables written by pyhv (default: on, as QEMU): the CPUs (MADT), the devices (DSDT: "
                         "virtio-mmio on microvm, the PCI root bridge on pc) and a power button (QMP "
                         "system_powerdown); firmware gets them through fw_cfg. off: an MP table (and "
                         "virtio_mmio.device= on the kernel command line); SeaBIOS then writes its own")
    hw.add_argument("--iommu", choices=("intel",),
                    help="intel: a VT-d DMA remapping unit (DMAR table, registers at 0xfed90000) in front of every "
                         "PCI device, as QEMU's -device intel-iommu without interrupt remapping (pc only; Linux: "
                         "intel_iommu=on). virtio devices then offer VIRTIO_F_ACCESS_PLATFORM (QEMU's "
                         "iommu_platform=on) and must use it. Default: none, devices reach guest RAM directly")
    hw.add_argument("--nic", action="append", default=[], metavar="tap,ifname=NAME[,mac=MAC][,model=virtio|e1000]",
                    help="a network card on tap NAME (created if missing, which needs root): virtio-net (default), "
                         "or an e1000 on pc; repeat for more cards")
    hw.add_argument("--name", default="pyhv", help="the VM's name (default: pyhv)")
    hw.add_argument("--uuid", help="the VM's UUID")
    files = p.add_argument_group("the VM from a file (options given as well override the file's values)")
    files.add_argument("--config", metavar="FILE", help="a VM config in JSON (the fields of VmConfig)")
    files.add_argument("--domain", metavar="FILE", help="a libvirt domain XML file")
    files.add_argument("--restore", metavar="DIR",
                       help="resume the VM saved in a snapshot directory (pyhv snapshot create): its memory file is "
                            "mapped copy-on-write, so several VMs may start from one snapshot; only consoles and "
                            "diagnostics may be changed")
    files.add_argument("--incoming", metavar="URI",
                       help="receive a live migration (QEMU's -incoming): tcp:HOST:PORT, unix:PATH, exec:COMMAND, "
                            "or defer (wait for QMP migrate-incoming); start it with the source's options")
    files.add_argument("--paused", dest="start_paused", action="store_true",
                       help="with --restore (or not): leave the vCPUs stopped until QMP cont or gdb's continue")
    manage = p.add_argument_group("management")
    manage.add_argument("--qmp", metavar="unix:PATH", help="serve QMP (QEMU's machine protocol) on a Unix socket")
    manage.add_argument("--pidfile", metavar="FILE", help="write pyhv's process id to FILE (removed at exit)")
    manage.add_argument("--gdb", metavar="tcp:[HOST]:PORT",
                        help="serve GDB's remote protocol (QEMU's -gdb): `target remote HOST:PORT` in gdb; "
                             "vCPUs are threads, addresses are guest-virtual; the VM stops while gdb attaches")
    manage.add_argument("-s", dest="gdb", action="store_const", const="tcp::1234",
                        help="shorthand for --gdb tcp::1234 (as QEMU's -s)")
    manage.add_argument("-S", dest="start_paused", action="store_true",
                        help="do not start the vCPUs: wait for gdb's continue or QMP's cont (as QEMU's -S)")
    io = p.add_argument_group("consoles")
    io.add_argument("--serial", default="stdio", metavar="BACKEND",
                    help="serial port 0x3f8: stdio | file:PATH | socket:PATH | pty | none (default: stdio)")
    io.add_argument("--debugcon", default="none", metavar="BACKEND",
                    help="debug console port 0x402 (SeaBIOS's log): stdio | file:PATH | socket:PATH | none "
                         "(default: none)")
    behaviour = p.add_argument_group("behaviour and diagnostics")
    behaviour.add_argument("--on-reset", choices=("exit", "restart"), default="exit",
                           help="when the guest resets (i8042 reset line, triple fault): end pyhv (exit, the "
                                "default) or restart the machine")
    behaviour.add_argument("--stats", action="store_true",
                           help="print exit statistics (by reason, port and MMIO region) to stderr at exit")
    behaviour.add_argument("--stats-json", metavar="FILE", help="write exit statistics as JSON at exit")
    behaviour.add_argument("--no-accounting", action="store_true",
                           help="do not count exits (measures what accounting costs)")
    behaviour.add_argument("--dump-mtree", action="store_true",
                           help="print the memory and I/O region trees (like QEMU's 'info mtree') and exit")
    behaviour.add_argument("--dump-pci", action="store_true",
                           help="list the PCI devices (like lspci, with the BARs the firmware assigned) when the "
                                "VM ends")
    behaviour.add_argument("--log-post", action="store_true", help="log each POST code written to port 0x80")
    behaviour.add_argument("--profile-guest", metavar="HZ", type=float, nargs="?", const=100.0,
                           help="sample the vCPUs' instruction pointers (default 100 Hz) and print the guest "
                                "kernel functions they were in at exit, and those on the sampled stacks (symbols "
                                "from an ELF --kernel, a vmlinux or System.map beside a bzImage, or --system-map)")
    behaviour.add_argument("--system-map", metavar="FILE", help="kernel symbols for --profile-guest")
    behaviour.add_argument("--pvm-syscall-fix", choices=("auto", "on", "off"), default="auto",
                           help="repair SYSCALL from guest user mode, which PVM hosts leave at CPL 3 "
                                "(auto: on PVM hosts, for --kernel)")
    behaviour.add_argument("--no-emulation-fallbacks", action="store_true",
                           help="do not complete int3/fwait/clac/stac/popcnt/ldmxcsr when KVM's emulator fails")
    behaviour.add_argument("--no-pvm-workarounds", action="store_true",
                           help="on PVM hosts, do not add the kernel options that avoid KVM emulator gaps")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                   help="log verbosity on stderr (default: warning)")
    p.add_argument("--trace", metavar="REGEX", help="log accesses to device registers whose names match, "
                                                    "e.g. 'serial0|rtc' (implies --log-level info)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyhv", description="pyhv: a KVM virtual machine monitor in Python.")
    parser.add_argument("--version", action="version", version=f"pyhv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser("run", help="build a VM and run it in the foreground", epilog=RUN_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Build a VM from the options and run it until the guest ends.")
    _add_run_options(run)
    _add_common(run)
    info = sub.add_parser("info", help="what this host's KVM offers (flavour, API, capabilities)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    _add_common(info)
    from pyhv.cli import lifecycle
    lifecycle.add_parsers(sub, _add_common)
    from pyhv.vhost import cli as vhost_cli
    _add_common(vhost_cli.add_parser(sub))
    from pyhv.assets.cli import add_parser as add_guest_parser
    add_guest_parser(sub)
    from pyhv.cli.top import add_parser as add_top_parser
    _add_common(add_top_parser(sub))
    from pyhv.cli.snapshot import add_parser as add_snapshot_parser
    _add_common(add_snapshot_parser(sub))
    return parser


def explicit_options(argv: list[str]) -> set[str]:
    """The dests of the `pyhv run` options actually written in argv (not left at their defaults)."""
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    for action in run._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def config_from_args(args: argparse.Namespace) -> "VmConfig":
    from pyhv.runtime.chardev import ChardevSpec
    from pyhv.config import DriveConfig, NetConfig, VmConfig, parse_size
    from pyhv.cli.runargs import apply_file

    if "help" in args.device or "?" in args.device:
        from pyhv.registry import help_text
        print(help_text())
        raise SystemExit(0)
    config = VmConfig(
        machine=args.machine, memory=parse_size(args.memory), cpus=args.cpus, memory_backend=args.memory_backend,
        firmware=args.firmware, kernel=args.kernel, initrd=args.initrd, append=args.append,
        serial=ChardevSpec.parse(args.serial, "--serial"), debugcon=ChardevSpec.parse(args.debugcon, "--debugcon"),
        on_reset=args.on_reset, devices=list(args.device), log_post=args.log_post,
        accounting=not args.no_accounting, cpu_model=args.cpu, boot_entry=args.boot_entry,
        pvm_workarounds=not args.no_pvm_workarounds, pvm_syscall_fix=args.pvm_syscall_fix,
        emulation_fallbacks=not args.no_emulation_fallbacks, name=args.name, uuid=args.uuid,
        drives=[DriveConfig.parse(d) for d in args.drive], nets=[NetConfig.parse(n) for n in args.nic],
        ioeventfd=not args.no_ioeventfd, msix=not args.no_msix, acpi=args.acpi == "on", sidecore=args.sidecore,
        iommu=args.iommu, sandbox=args.sandbox == "on",
    )
    config = apply_file(config, args, explicit_options(getattr(args, "argv", [])))
    if config.kernel is None and config.firmware is None:
        if config.initrd:
            raise ConfigError("--initrd needs --kernel", "the default guest brings its own initramfs")
        use_default_guest(config)
    return config.validate()


def use_default_guest(config: "VmConfig") -> None:
    """No --kernel or --firmware: boot the Debian guest `pyhv guest build` made, to a shell on the console (the
    small kernel on PVM hosts, where the stock one takes minutes; Debian's stock kernel elsewhere)."""
    from pyhv.assets.guest import default_flavour, load_manifest
    from pyhv.errors import GuestImageError
    from pyhv.kvm import detect_flavour

    flavour = default_flavour()
    try:
        assets = load_manifest(flavour)
    except PyhvError as e:
        raise GuestImageError("nothing to boot: no --kernel or --firmware, and the default Debian guest is not "
                              "built yet", f"run `pyhv guest build` first ({e.hint or e})") from None
    config.kernel = str(assets.bzimage)        # the 64-bit boot protocol: it carries an RNG seed, PVH does not
    config.initrd = str(assets.initramfs_uncompressed)
    logging.getLogger("pyhv").info("booting the default guest: %s kernel %s", flavour, assets.kernel_release)
    if detect_flavour().is_pvm:
        print("pyhv: this host's KVM is PVM: the guest kernel runs emulated (about 1 ms per system call), so the "
              "shell is slow but real; user-mode programs run at native speed", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from pyhv.machine.machine import Machine
    from pyhv.cli.runargs import RunHooks

    config = config_from_args(args)
    machine = Machine(config, images_inactive=bool(getattr(args, "incoming", None)))
    if getattr(args, "restore", None):
        from pyhv.machine.snapshot import SnapshotError, restore
        try:
            begun = time.monotonic()
            restore(machine, args.restore, args.snapshot_body)
            machine.restore_seconds = time.monotonic() - begun
        except SnapshotError:
            machine.close()
            raise
    hooks = RunHooks(args)
    profiler = None
    try:
        hooks.open(machine)
        if args.dump_mtree:
            print(machine.dump_mtree())
            return 0
        if args.profile_guest:
            from pyhv.profiler import GuestProfiler, kernel_symbols, system_map_symbols
            symbols = (system_map_symbols(args.system_map) if args.system_map
                       else kernel_symbols(config.kernel) if config.kernel else [])
            profiler = GuestProfiler(machine, args.profile_guest, symbols)
            profiler.start()
        hooks.start()
        status = run_machine(machine, args)
        if profiler is not None:
            print(profiler.report(), file=sys.stderr)
        if args.dump_pci:
            print(machine.dump_pci())
        if args.stats:
            print(machine.stats_report(), file=sys.stderr)
        if args.stats_json:
            data = machine.exit_stats().as_dict(machine.port_owner)
            data.update(kvm_flavour=machine.flavour.value, exit_status=status, exit_reason=machine.exit_reason,
                        first_kvm_run_monotonic=machine.first_run_monotonic, kvm=machine.kvm_stats(),
                        virtio=machine.virtio_stats(), iommu=machine.iommu_stats(),
                        restore_seconds=getattr(machine, "restore_seconds", None),
                        unassigned={"port_reads": machine.io.unassigned_reads,
                                    "port_writes": machine.io.unassigned_writes,
                                    "mmio_reads": machine.memory.unassigned_reads,
                                    "mmio_writes": machine.memory.unassigned_writes},
                        rom_writes_dropped=machine.memory.rom_writes_dropped)
            with open(args.stats_json, "w") as f:
                json.dump(data, f, indent=1)
        return status
    finally:
        hooks.close()
        machine.close()


def run_machine(machine: "Machine", args: argparse.Namespace) -> int:
    """Run the VM, or first receive it from a live migration (--incoming)."""
    uri = getattr(args, "incoming", None)
    if not uri:
        return machine.run()
    if uri == "defer":
        import threading
        chosen: list[str] = []
        ready = threading.Event()
        machine.deferred_incoming = lambda value: (chosen.append(value), ready.set())
        print("pyhv: waiting for QMP migrate-incoming", file=sys.stderr, flush=True)
        while not ready.wait(0.5):
            if machine.state == "shutdown":
                return machine.exit_status or 0
        machine.deferred_incoming = None
        uri = chosen[0]
    from pyhv.machine.migration import MigrationError
    try:
        return machine.run_incoming(uri)
    except MigrationError:
        machine.shutdown(1, "incoming migration failed")
        raise


def cmd_info(args: argparse.Namespace) -> int:
    from pyhv.kvm import Kvm
    from pyhv.kvm import constants as C

    kvm = Kvm()
    caps = {name[len("KVM_CAP_"):].lower(): kvm.check_extension(value)
            for name, value in vars(C).items() if name.startswith("KVM_CAP_")}
    info = {"pyhv": __version__, "kvm_flavour": kvm.flavour.value, "kvm_description": kvm.flavour.description,
            "api_version": kvm.api_version, "vcpu_mmap_size": kvm.vcpu_mmap_size, "capabilities": caps}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"pyhv {__version__}")
    print(f"KVM: {kvm.flavour.description}, API version {kvm.api_version}")
    if kvm.flavour.is_pvm:
        print("note: on PVM, guest kernel-mode and real-mode code is emulated (~500x slower than native); "
              "user-mode code runs natively")
    print("capabilities: " + ", ".join(f"{k}={v}" for k, v in sorted(caps.items())))
    return 0


def _setup_logging(args: argparse.Namespace) -> None:
    level = getattr(logging, getattr(args, "log_level", "warning").upper())
    if getattr(args, "trace", None):
        from pyhv import trace
        trace.set_pattern(args.trace)
        level = min(level, logging.INFO)
    logging.basicConfig(level=level, format="pyhv: %(message)s" if level > logging.DEBUG
                        else "pyhv: %(threadName)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging(args)
    try:
        from pyhv.vhost.cli import cmd_vhost_user_backend
        handler = {"run": cmd_run, "info": cmd_info,
                   "vhost-user-backend": cmd_vhost_user_backend}.get(args.command) or args.handler
        return handler(args)
    except PyhvError as e:
        print(f"pyhv: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
