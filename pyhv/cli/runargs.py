"""`pyhv run`'s command line and a `VmConfig`, both ways, and what `pyhv run` does around the machine.

- `apply_file`: `--config vm.json` / `--domain vm.xml` give the config; options given on the command line as
  well override the file's values (list options such as `--drive` add to the file's).
- `config_to_args`: the `pyhv run` options that build a given config (`pyhv domxml-to-args`), so that
  XML -> config -> args -> config is the identity.
- `RunHooks`: the QMP server (`--qmp`), the pid file (`--pidfile`) and SIGTERM handling of `pyhv run`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from dataclasses import fields
from typing import TYPE_CHECKING

from pyhv.config import VmConfig, format_size
from pyhv.errors import ConfigError

if TYPE_CHECKING:
    from pyhv.machine.machine import Machine
    from pyhv.monitor.qmp import QmpServer
    from pyhv.monitor.gdbstub import GdbStub

log = logging.getLogger(__name__)

EXIT_SIGTERM = 143

# `pyhv run` option dest -> VmConfig field, for the options that describe the VM
OPTION_FIELDS = {"machine": "machine", "memory": "memory", "cpus": "cpus", "memory_backend": "memory_backend",
                 "firmware": "firmware", "kernel": "kernel", "initrd": "initrd", "append": "append",
                 "serial": "serial", "debugcon": "debugcon", "on_reset": "on_reset", "device": "devices",
                 "log_post": "log_post", "no_accounting": "accounting", "name": "name", "uuid": "uuid",
                 "drive": "drives", "nic": "nets", "cpu": "cpu_model", "boot_entry": "boot_entry",
                 "no_pvm_workarounds": "pvm_workarounds", "pvm_syscall_fix": "pvm_syscall_fix",
                 "no_emulation_fallbacks": "emulation_fallbacks", "no_ioeventfd": "ioeventfd",
                 "no_msix": "msix", "acpi": "acpi", "sidecore": "sidecore", "iommu": "iommu",
                 "sandbox": "sandbox"}
LIST_FIELDS = ("devices", "drives", "nets")


def load_json_config(path: str) -> VmConfig:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path}: not JSON: line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of VmConfig fields")
    try:
        return VmConfig.from_dict(data)
    except TypeError as e:
        raise ConfigError(f"--config {path}: {e}") from None


RESTORE_OVERRIDES = {"serial", "debugcon", "on_reset", "log_post", "no_accounting", "sandbox"}   # what --restore lets change


def load_file_config(args: argparse.Namespace) -> VmConfig | None:
    if sum(bool(getattr(args, k, None)) for k in ("config", "domain", "restore")) > 1:
        raise ConfigError("--config, --domain and --restore each describe the whole VM", "give one of them")
    if getattr(args, "restore", None):
        from pyhv.machine.snapshot import load_state
        args.snapshot_body = load_state(args.restore)
        return VmConfig.from_dict(args.snapshot_body["config"])
    if args.config:
        return load_json_config(args.config)
    if args.domain:
        from pyhv.cli.domain_xml import load_domain_xml
        config, warnings = load_domain_xml(args.domain)
        if warnings:
            log.warning("%s", warnings)
        return config
    return None


def apply_file(flags: VmConfig, args: argparse.Namespace, explicit: set[str]) -> VmConfig:
    """The file's config with the options in `explicit` (the dests written on the command line) applied over
    it; `flags` when there is no file."""
    config = load_file_config(args)
    if config is None:
        return flags
    if getattr(args, "restore", None):
        changed = {dest for dest in explicit if dest in OPTION_FIELDS} - RESTORE_OVERRIDES
        if changed:
            raise ConfigError(f"--restore: the snapshot fixes the VM's hardware; {', '.join(sorted(changed))} "
                              "cannot change", "only consoles and diagnostics (--serial, --debugcon, --on-reset, "
                              "--log-post, --no-accounting, --sandbox) may be given with --restore")
    for dest in explicit:
        name = OPTION_FIELDS.get(dest)
        if name is None:
            continue
        value = getattr(flags, name)
        setattr(config, name, getattr(config, name) + value if name in LIST_FIELDS else value)
    return config


def config_to_args(config: VmConfig) -> list[str]:
    """The `pyhv run` options (after `run`) that build `config`; defaults are left out."""
    default = VmConfig()
    args: list[str] = []

    def opt(flag: str, value: object) -> None:
        args.extend([flag, str(value)])

    if config.name != default.name:
        opt("--name", config.name)
    if config.uuid:
        opt("--uuid", config.uuid)
    if config.machine != default.machine:
        opt("--machine", config.machine)
    if config.memory != default.memory:
        opt("--memory", format_size(config.memory))
    if config.cpus != default.cpus:
        opt("--cpus", config.cpus)
    if config.memory_backend != default.memory_backend:
        opt("--memory-backend", config.memory_backend)
    for flag, value in (("--firmware", config.firmware), ("--kernel", config.kernel), ("--initrd", config.initrd)):
        if value:
            opt(flag, value)
    if config.append:
        opt("--append", config.append)
    for drive in config.drives:
        opt("--drive", drive.to_arg())
    for net in config.nets:
        opt("--nic", net.to_arg())
    for device in config.devices:
        opt("--device", device)
    if config.serial != default.serial:
        opt("--serial", config.serial)
    if config.debugcon != default.debugcon:
        opt("--debugcon", config.debugcon)
    if config.on_reset != default.on_reset:
        opt("--on-reset", config.on_reset)
    if config.cpu_model != default.cpu_model:
        opt("--cpu", config.cpu_model)
    if config.boot_entry != default.boot_entry:
        opt("--boot-entry", config.boot_entry)
    if config.acpi != default.acpi:
        opt("--acpi", "on" if config.acpi else "off")
    if config.iommu is not None:
        opt("--iommu", config.iommu)
    if config.sandbox != default.sandbox:
        opt("--sandbox", "on" if config.sandbox else "off")
    if config.pvm_syscall_fix != default.pvm_syscall_fix:
        opt("--pvm-syscall-fix", config.pvm_syscall_fix)
    for flag, on in (("--log-post", config.log_post), ("--no-accounting", not config.accounting),
                     ("--no-pvm-workarounds", not config.pvm_workarounds),
                     ("--no-emulation-fallbacks", not config.emulation_fallbacks),
                     ("--no-ioeventfd", not config.ioeventfd), ("--no-msix", not config.msix),
                     ("--sidecore", config.sidecore)):
        if on:
            args.append(flag)
    known = {"name", "uuid", "machine", "memory", "cpus", "memory_backend", "firmware", "kernel", "initrd",
             "append", "drives", "nets", "devices", "serial", "debugcon", "on_reset", "log_post", "accounting",
             "cpu_model", "boot_entry", "pvm_workarounds", "pvm_syscall_fix", "emulation_fallbacks",
             "ioeventfd", "msix", "acpi", "sidecore", "iommu", "sandbox"}
    missed = {f.name for f in fields(VmConfig)} - known
    if missed:                          # a field added to VmConfig without a command-line form here
        raise ConfigError(f"cannot express config fields {', '.join(sorted(missed))} as pyhv run options")
    return args


class RunHooks:
    """What `pyhv run` adds around a machine: `--qmp`, `--pidfile`, and SIGTERM ending the VM cleanly."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.qmp: "QmpServer | None" = None
        self.gdb: "GdbStub | None" = None
        self.pidfile: str | None = None
        self.old_sigterm: object = None

    def open(self, machine: "Machine") -> None:
        if getattr(self.args, "qmp", None):
            from pyhv.monitor.qmp import QmpServer, parse_qmp_address
            self.qmp = QmpServer(machine, parse_qmp_address(self.args.qmp))
        if getattr(self.args, "gdb", None):
            from pyhv.monitor.gdbstub import GdbStub, parse_gdb_address
            self.gdb = GdbStub(machine, parse_gdb_address(self.args.gdb))
        machine.start_paused = bool(getattr(self.args, "start_paused", False))
        if getattr(self.args, "pidfile", None):
            write_pidfile(self.args.pidfile)
            self.pidfile = self.args.pidfile
        self.old_sigterm = signal.signal(
            signal.SIGTERM, lambda signum, frame: machine.shutdown(EXIT_SIGTERM, "terminated by SIGTERM"))

    def start(self) -> None:
        if self.qmp is not None:
            self.qmp.start()
        if self.gdb is not None:
            self.gdb.start()
            host, port = self.gdb.address
            print(f"pyhv: gdb stub on {host}:{port} (in gdb: target remote {host}:{port})", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.gdb is not None:
            self.gdb.close()
            self.gdb = None
        if self.pidfile:
            try:
                os.unlink(self.pidfile)
            except OSError:
                pass
            self.pidfile = None
        if self.old_sigterm is not None:
            signal.signal(signal.SIGTERM, self.old_sigterm)  # type: ignore[arg-type]
            self.old_sigterm = None


def write_pidfile(path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"--pidfile {path}: {e.strerror}") from None
