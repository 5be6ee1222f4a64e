"""QMP commands: each is a function of the server (for its machine) and its checked arguments.

Every command reads or drives the machine through its public methods. Block devices and PCI functions come
from the machine when it offers them: `machine.block_devices()` and `machine.pci_devices()` return a list of
objects or dicts with the fields read by `_block_info` / `_pci_info` below (a machine without disks or a PCI bus
reports empty lists). Device branches plug in by adding those two methods, without touching the monitor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from pyhv.version import __version__

if TYPE_CHECKING:
    from pyhv.monitor.qmp import QmpServer

EXIT_GUEST_CRASHED = 3

QEMU_STATUS = {"created": "prelaunch", "running": "running", "paused": "paused", "debug": "debug",
               "shutdown": "shutdown"}
JSON_TYPES = {str: "string", int: "int", bool: "boolean", dict: "object", list: "array"}


class QmpCommandError(Exception):
    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass
class Command:
    name: str
    fn: Callable[..., object]
    args: dict[str, tuple[type, bool]]      # name -> (JSON type, required)

    def call(self, server: "QmpServer", arguments: dict) -> object:
        for key, value in arguments.items():
            if key not in self.args:
                raise QmpCommandError(f"Parameter '{key}' is unexpected")
            kind = self.args[key][0]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise QmpCommandError(f"Invalid parameter type for '{key}', expected: {JSON_TYPES[kind]}")
        for key, (_, required) in self.args.items():
            if required and key not in arguments:
                raise QmpCommandError(f"Parameter '{key}' is missing")
        return self.fn(server, **{k.replace("-", "_"): v for k, v in arguments.items()})


COMMANDS: dict[str, Command] = {}


def command(name: str, **args: tuple[type, bool]) -> Callable:
    def register(fn: Callable) -> Callable:
        COMMANDS[name] = Command(name, fn, {k.replace("_", "-"): v for k, v in args.items()})
        return fn
    return register


def version_info() -> dict:
    major, minor, micro = (int(x) for x in (__version__.split(".") + ["0", "0"])[:3])
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": f"pyhv {__version__}"}


# --- events ------------------------------------------------------------------------------------------------
def event_data(event: str, data: dict, reset_cause: str | None = None) -> dict | None:
    """The QMP `data` of a machine lifecycle event (QEMU's ShutdownCause values in `reason`)."""
    if event == "SHUTDOWN":
        reason = str(data.get("reason", ""))
        cause = _shutdown_cause(reason, data.get("status"))
        return {"guest": cause.startswith("guest"), "reason": cause, "pyhv-reason": reason}
    if event == "MIGRATION":
        return {"status": data.get("migration_status")}
    if event == "RESET":
        cause = reset_cause or "guest-reset"
        return {"guest": cause.startswith("guest"), "reason": cause}
    return None


def _shutdown_cause(reason: str, status: object) -> str:
    if reason.startswith("host-"):
        return reason
    if reason in ("interrupted", "closed") or reason.startswith("terminated"):
        return "host-signal"
    if reason.startswith("quit from"):
        return "host-ui"
    if status == EXIT_GUEST_CRASHED:
        return "guest-panic"
    if reason.startswith("guest reset"):
        return "guest-reset"
    return "guest-shutdown"


# --- commands ------------------------------------------------------------------------------------------------
@command("query-version")
def query_version(server: "QmpServer") -> dict:
    return version_info()


@command("query-commands")
def query_commands(server: "QmpServer") -> list:
    return [{"name": name} for name in ["qmp_capabilities", *COMMANDS]]


@command("query-name")
def query_name(server: "QmpServer") -> dict:
    return {"name": server.machine.config.name}


@command("query-uuid")
def query_uuid(server: "QmpServer") -> dict:
    return {"UUID": server.machine.config.uuid or "00000000-0000-0000-0000-000000000000"}


@command("query-kvm")
def query_kvm(server: "QmpServer") -> dict:
    return {"enabled": True, "present": True}


@command("query-status")
def query_status(server: "QmpServer") -> dict:
    machine = server.machine
    state = machine.state
    status = QEMU_STATUS.get(state, state)
    if state == "created" and machine.incoming is not None:
        status = "inmigrate"
    elif state == "paused" and machine.migrated:
        status = "postmigrate"
    return {"running": state == "running", "singlestep": False, "status": status}


@command("stop")
def stop(server: "QmpServer") -> dict:
    server.machine.pause()
    return {}


@command("cont")
def cont(server: "QmpServer") -> dict:
    if server.machine.state == "shutdown":
        raise QmpCommandError("The VM has shut down; it cannot be resumed")
    server.machine.resume()
    return {}


@command("system_reset")
def system_reset(server: "QmpServer") -> dict:
    server.system_reset()
    return {}


@command("system_powerdown")
def system_powerdown(server: "QmpServer") -> dict:
    """Ask the guest to power off: the machine presses its power button if it has one (ACPI); either way the
    POWERDOWN event says the request was made, and the guest decides."""
    server.broadcast("POWERDOWN")
    server.machine.powerdown()
    return {}


@command("quit")
def quit_(server: "QmpServer") -> dict:
    return {}                # the connection sends the reply, then ends the machine


@command("query-cpus-fast")
def query_cpus_fast(server: "QmpServer") -> list:
    out = []
    for v in server.machine.vcpus:
        thread = v.thread
        native = thread.native_id if thread is not None and thread.native_id is not None else 0
        out.append({"cpu-index": v.id, "qom-path": f"/machine/unattached/device[{v.id}]", "thread-id": native,
                    "target": "x86_64", "props": {"socket-id": v.id, "core-id": 0, "thread-id": 0}})
    return out


def _field(item: object, name: str, default: object = None) -> object:
    if isinstance(item, dict):
        return item.get(name, default)
    return getattr(item, name, default)


def _machine_list(server: "QmpServer", method: str) -> list:
    provider = getattr(server.machine, method, None)
    if provider is not None:
        return list(provider())
    if method == "pci_devices":                   # the pc board's bus describes its functions itself
        bus = getattr(getattr(server.machine, "board", None), "bus", None)
        if bus is not None and hasattr(bus, "describe"):
            return list(bus.describe())
    return []


def _block_info(item: object) -> dict:
    """QEMU's BlockInfo from a block device's `name`, `file`, `readonly`, `format`, `size`."""
    info: dict = {"device": _field(item, "name"), "qdev": _field(item, "qdev", _field(item, "name")),
                  "locked": False, "removable": False, "type": "unknown"}
    if _field(item, "file"):
        image = {"filename": _field(item, "file"), "format": _field(item, "format", "raw"),
                 "virtual-size": _field(item, "size", 0)}
        info["inserted"] = {"file": _field(item, "file"), "ro": bool(_field(item, "readonly", False)),
                            "drv": _field(item, "format", "raw"), "encrypted": False, "backing_file_depth": 0,
                            "image": image, "detect_zeroes": "off", "bps": 0, "bps_rd": 0, "bps_wr": 0,
                            "iops": 0, "iops_rd": 0, "iops_wr": 0, "write_threshold": 0,
                            "cache": {"writeback": _field(item, "cache", "writeback") == "writeback",
                                      "direct": _field(item, "cache", "writeback") == "none",
                                      "no-flush": False}}
    return info


@command("query-block")
def query_block(server: "QmpServer") -> list:
    return [_block_info(item) for item in _machine_list(server, "block_devices")]


def _pci_info(item: object) -> dict:
    """QEMU's PciDeviceInfo from a PCI function's `bus`, `slot`, `function`, `vendor_id`, `device_id`,
    `class_code` (24-bit), `subsystem_vendor_id`, `subsystem_id`, `irq` (a line number, or a dict with `line` and
    `pin`), `bars` (dicts with `bar`, `type` io/mem/mem64/prefmem/prefmem64/rom, `address` (None: unmapped),
    `size`; or (index, type, address, size) tuples) and `name`/`desc`: the pc board's `PciBus.describe()`."""
    class_code = int(_field(item, "class_code", 0))
    info: dict = {"bus": _field(item, "bus", 0), "slot": _field(item, "slot", 0),
                  "function": _field(item, "function", 0),
                  "class_info": {"class": class_code >> 8},
                  "id": {"vendor": _field(item, "vendor_id", 0), "device": _field(item, "device_id", 0),
                         "subsystem-vendor": _field(item, "subsystem_vendor_id", 0),
                         "subsystem": _field(item, "subsystem_id", 0)},
                  "qdev_id": _field(item, "name", "") or "", "regions": []}
    desc = _field(item, "desc")
    if desc:
        info["class_info"]["desc"] = desc
    irq = _field(item, "irq")
    if isinstance(irq, dict):
        irq = irq.get("line") if irq.get("pin") else None
    if irq is not None:
        info["irq"] = irq
    for bar in _field(item, "bars", []) or []:
        if isinstance(bar, dict):
            index, kind, address, size = bar["bar"], bar["type"], bar.get("address"), bar["size"]
        else:
            index, kind, address, size = bar
        if address is None or kind == "rom":      # not decoded now; the expansion ROM is not a BAR region
            continue
        region = {"bar": index, "type": "io" if kind == "io" else "memory", "address": address, "size": size}
        if kind != "io":
            region.update({"prefetch": kind.startswith("prefmem"), "mem_type_64": kind.endswith("64")})
        info["regions"].append(region)
    return info


@command("query-pci")
def query_pci(server: "QmpServer") -> list:
    buses: dict[int, list] = {}
    for item in _machine_list(server, "pci_devices"):
        info = _pci_info(item)
        buses.setdefault(info["bus"], []).append(info)
    return [{"bus": bus, "devices": devices} for bus, devices in sorted(buses.items())]


PMEMSAVE_MAX = 1 << 30


@command("pmemsave", val=(int, True), size=(int, True), filename=(str, True))
def pmemsave(server: "QmpServer", val: int, size: int, filename: str) -> dict:
    """QEMU's pmemsave: `size` bytes of guest-physical memory from `val` into `filename` (RAM only)."""
    from pyhv.memory.guest import GuestMemoryError
    if val < 0 or not 0 < size <= PMEMSAVE_MAX:
        raise QmpCommandError(f"pmemsave: bad range {val:#x}+{size:#x} (at most {PMEMSAVE_MAX:#x} bytes)")
    try:
        data = server.machine.guest_memory.read(val, size)
    except GuestMemoryError as e:
        raise QmpCommandError(f"pmemsave: {e}") from None
    try:
        with open(filename, "wb") as f:
            f.write(data)
    except OSError as e:
        raise QmpCommandError(f"pmemsave: {filename}: {e.strerror}") from None
    return {}


@command("query-iommu")
def query_iommu(server: "QmpServer") -> dict:
    """pyhv's: the VT-d unit's state and its counters per device (translations, IOTLB hits/misses, faults)."""
    stats = server.machine.iommu_stats()
    if stats is None:
        raise QmpCommandError("this VM has no IOMMU (start it with --iommu intel)")
    return stats


@command("query-exit-stats")
def query_exit_stats(server: "QmpServer") -> dict:
    machine = server.machine
    return machine.exit_stats().as_dict(machine.port_owner)


@command("x-pyhv-exits")
def x_pyhv_exits(server: "QmpServer") -> dict:
    """pyhv's: exits by reason, port, MMIO region and device, per vCPU and in total, with handling time, vCPU
    states and CPU time, the I/O thread's load and the virtqueues' depths (what `pyhv top` shows)."""
    return server.machine.exits_report()


STATS_TARGETS = ("vm", "vcpu", "cryptodev")


def _stats_target(target: str) -> None:
    if target not in STATS_TARGETS:
        raise QmpCommandError(f"Parameter 'target' does not accept value '{target}'")


def _wanted_names(providers: list | None) -> set[str] | None:
    """QEMU's `providers` filter: None means every KVM statistic; a provider other than kvm selects nothing."""
    if providers is None:
        return None
    names: set[str] = set()
    for p in providers:
        name = p.get("provider") if isinstance(p, dict) else p
        if name not in ("kvm", "cryptodev"):
            raise QmpCommandError(f"Parameter 'provider' does not accept value '{name}'")
        if name != "kvm":
            continue
        if "names" not in p:
            return None
        names.update(p["names"])
    return names


def _stats_readers(server: "QmpServer", target: str, vcpus: list | None) -> list[tuple[str | None, object]]:
    if target == "cryptodev":
        return []                               # no crypto devices
    try:
        vm, per_vcpu = server.machine.kvm_stats_readers()
    except OSError as e:
        raise QmpCommandError(f"KVM statistics are not available on this host: {e.strerror}") from None
    if target == "vm":
        return [(None, vm)]
    objects = [(f"/machine/unattached/device[{i}]", r) for i, r in enumerate(per_vcpu)]
    return [o for o in objects if vcpus is None or o[0] in vcpus]


@command("query-stats", target=(str, True), vcpus=(list, False), providers=(list, False))
def query_stats(server: "QmpServer", target: str, vcpus: list | None = None, providers: list | None = None) -> list:
    """QEMU's query-stats: KVM's binary statistics (KVM_GET_STATS_FD) of the VM or of each vCPU."""
    _stats_target(target)
    wanted = _wanted_names(providers)          # an empty set: only other providers were asked for
    out = []
    for qom_path, reader in _stats_readers(server, target, vcpus) if wanted != set() else []:
        values = reader.read()  # type: ignore[attr-defined]
        stats = []
        for desc in reader.schema:  # type: ignore[attr-defined]
            if wanted is not None and desc.name not in wanted:
                continue
            value = values[desc.name]
            stats.append({"name": desc.name, "value": bool(value) if desc.unit == "boolean" else value})
        result: dict = {"provider": "kvm", "stats": stats}
        if qom_path is not None:
            result["qom-path"] = qom_path
        out.append(result)
    return out


@command("query-stats-schemas", provider=(str, False))
def query_stats_schemas(server: "QmpServer", provider: str | None = None) -> list:
    """QEMU's query-stats-schemas: each KVM statistic's type, unit, base and exponent, per target."""
    if provider not in (None, "kvm", "cryptodev"):
        raise QmpCommandError(f"Parameter 'provider' does not accept value '{provider}'")
    if provider == "cryptodev":
        return []
    out = []
    for target in ("vm", "vcpu"):
        readers = _stats_readers(server, target, None)
        if not readers:
            continue
        stats = []
        for d in readers[0][1].schema:  # type: ignore[attr-defined]
            entry: dict = {"name": d.name, "type": d.type, "base": d.base, "exponent": d.exponent}
            if d.unit:
                entry["unit"] = d.unit
            if d.type == "linear-histogram":
                entry["bucket-size"] = d.bucket_size
            stats.append(entry)
        out.append({"provider": "kvm", "target": target, "stats": stats})
    return out


@command("x-pyhv-snapshot-create", path=(str, True))
def x_pyhv_snapshot_create(server: "QmpServer", path: str) -> dict:
    """pyhv's: pause the VM, write its snapshot to directory `path` (memory.raw, state.json), resume it. Returns
    the seconds it took (in all and paused) and the bytes written. `pyhv run --restore PATH` resumes it."""
    from pyhv.machine.snapshot import SnapshotError, save
    try:
        return save(server.machine, path)
    except SnapshotError as e:
        raise QmpCommandError(str(e)) from None
    except OSError as e:
        raise QmpCommandError(f"snapshot to {path}: {e.strerror or e}") from None


@command("migrate", uri=(str, True), detach=(bool, False), resume=(bool, False))
def migrate(server: "QmpServer", uri: str, detach: bool = True, resume: bool = False) -> dict:
    """QEMU's migrate: live-migrate to tcp:HOST:PORT, unix:PATH or exec:COMMAND (pyhv/machine/migration.py)."""
    from pyhv.errors import PyhvError
    if resume:
        raise QmpCommandError("migrate: resume is not supported")
    try:
        server.machine.migrate(uri)
    except (PyhvError, RuntimeError) as e:
        raise QmpCommandError(str(e)) from None
    return {}


@command("migrate_cancel")
def migrate_cancel(server: "QmpServer") -> dict:
    migration = server.machine.migration
    if migration is not None:
        migration.cancelled = True
    return {}


@command("query-migrate")
def query_migrate(server: "QmpServer") -> dict:
    machine = server.machine
    if machine.incoming is not None:
        return machine.incoming.info()
    return machine.migration.info() if machine.migration is not None else {}


@command("migrate-set-parameters", downtime_limit=(int, False), max_bandwidth=(int, False))
def migrate_set_parameters(server: "QmpServer", downtime_limit: int | None = None,
                           max_bandwidth: int | None = None) -> dict:
    params = server.machine.migration_parameters
    if downtime_limit is not None:
        if not 0 <= downtime_limit <= 2000000:
            raise QmpCommandError("Parameter 'downtime_limit' expects an integer in the range of 0 to 2000 seconds")
        params["downtime-limit"] = downtime_limit
    if max_bandwidth is not None:
        if max_bandwidth < 0:
            raise QmpCommandError("Parameter 'max_bandwidth' expects a non-negative size")
        params["max-bandwidth"] = max_bandwidth
    return {}


@command("query-migrate-parameters")
def query_migrate_parameters(server: "QmpServer") -> dict:
    return dict(server.machine.migration_parameters)


@command("migrate-incoming", uri=(str, True))
def migrate_incoming(server: "QmpServer", uri: str) -> dict:
    """QEMU's migrate-incoming, for a destination started with --incoming defer."""
    waiting = getattr(server.machine, "deferred_incoming", None)
    if waiting is None:
        raise QmpCommandError("The incoming migration has not been started with --incoming defer")
    waiting(uri)
    return {}
