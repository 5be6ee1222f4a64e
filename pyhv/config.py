"""`VmConfig`: the one validated description of a VM. CLI flags, JSON and domain XML all produce it."""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields

from pyhv.chardev import ChardevSpec
from pyhv.errors import ConfigError, GuestImageError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4 * KiB
MIN_MEMORY = 2 * MiB
MAX_CPUS = 64
MAX_FIRMWARE = 16 * MiB
MACHINES = ("microvm", "pc")
CPU_MODELS = ("auto", "host", "nested-safe")
BOOT_ENTRIES = ("auto", "pvh", "linux64")
ON_RESET = ("exit", "restart")
DEVICES = ("testdev",)

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")


def parse_size(text: str | int, default_unit: str = "M", what: str = "--memory") -> int:
    """'128M', '1G', '4096K', '2GiB' -> bytes. A bare number is in `default_unit` (MiB, as in QEMU)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"{what} {text!r}: not a size", "write a number with an optional K, M, G or T suffix")
    number, unit = int(m.group(1)), (m.group(2) or ("" if m.group(3) else default_unit)).upper()
    return number * {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}[unit]


def format_size(n: int) -> str:
    for unit, scale in (("G", GiB), ("M", MiB), ("K", KiB)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def _int_option(flag: str, text: str, key: str, value: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: {key.replace('_', '-')}={value} is not a number") from None


@dataclass
class DriveConfig:
    file: str
    readonly: bool = False
    cache: str = "writeback"        # writeback | none
    serial: str | None = None
    num_queues: int = 1
    format: str = "raw"
    bootindex: int | None = None    # firmware boot order (fw_cfg `bootorder`); lower boots first

    @classmethod
    def parse(cls, text: str) -> "DriveConfig":
        """`file=PATH[,readonly=on][,cache=none|writeback][,serial=ID][,num-queues=N][,bootindex=N]`; a bare
        PATH is `file=PATH`."""
        fields_: dict = {}
        for i, part in enumerate(text.split(",")):
            key, eq, value = part.partition("=")
            if not eq:
                if i == 0:
                    key, value = "file", part
                else:
                    raise ConfigError(f"--drive {text!r}: {part!r} is not KEY=VALUE")
            key = key.strip().replace("-", "_")
            if key == "file":
                fields_["file"] = value
            elif key == "readonly":
                if value not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
                    raise ConfigError(f"--drive {text!r}: readonly={value} is not on or off")
                fields_["readonly"] = value in ("on", "true", "1", "yes")
            elif key in ("cache", "serial", "format"):
                fields_[key] = value
            elif key in ("num_queues", "bootindex"):
                fields_[key] = _int_option("--drive", text, key, value)
            else:
                raise ConfigError(f"--drive {text!r}: unknown option {key.replace('_', '-')!r}",
                                  "use file, readonly, cache, serial, num-queues, bootindex, format")
        if not fields_.get("file"):
            raise ConfigError(f"--drive {text!r}: no file", "write --drive file=PATH")
        return cls(**fields_)

    def validate(self) -> None:
        if self.cache not in ("writeback", "none"):
            raise ConfigError(f"drive {self.file}: cache={self.cache} is not writeback or none")
        if not 1 <= self.num_queues <= 64:
            raise ConfigError(f"drive {self.file}: num-queues={self.num_queues} is not within 1-64")
        if self.format != "raw":
            raise ConfigError(f"drive {self.file}: format {self.format!r} is not supported",
                              "convert it with `qemu-img convert -O raw`")
        if self.serial is not None and len(self.serial.encode()) > 20:
            raise ConfigError(f"drive {self.file}: serial {self.serial!r} is longer than 20 bytes")
        if not os.path.exists(self.file):
            raise ConfigError(f"drive {self.file}: no such file")

    def to_arg(self) -> str:
        parts = [f"file={self.file}"]
        if self.readonly:
            parts.append("readonly=on")
        if self.cache != "writeback":
            parts.append(f"cache={self.cache}")
        if self.serial is not None:
            parts.append(f"serial={self.serial}")
        if self.num_queues != 1:
            parts.append(f"num-queues={self.num_queues}")
        if self.format != "raw":
            parts.append(f"format={self.format}")
        if self.bootindex is not None:
            parts.append(f"bootindex={self.bootindex}")
        return ",".join(parts)


_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
NET_MODELS = ("virtio",)


@dataclass
class NetConfig:
    """A network interface: a virtio-net device whose host end is the tap device `tap`."""
    tap: str
    mac: str | None = None          # None: pyhv picks one (52:54:00:...)
    model: str = "virtio"

    def validate(self) -> None:
        if not self.tap or len(self.tap.encode()) > 15 or "/" in self.tap or self.tap in (".", ".."):
            raise ConfigError(f"network interface: tap name {self.tap!r} is not a valid interface name",
                              "use at most 15 characters, no '/'")
        if self.mac is not None:
            if not _MAC_RE.match(self.mac):
                raise ConfigError(f"network interface {self.tap}: MAC address {self.mac!r} is not six "
                                  "colon-separated hex bytes")
            if int(self.mac[:2], 16) & 1:
                raise ConfigError(f"network interface {self.tap}: MAC address {self.mac} is a multicast address")
        if self.model not in NET_MODELS:
            raise ConfigError(f"network interface {self.tap}: model {self.model!r} is not supported",
                              f"use {', '.join(NET_MODELS)}")

    @classmethod
    def parse(cls, text: str) -> "NetConfig":
        """`--nic tap,ifname=NAME[,mac=MAC][,model=virtio]` (as QEMU's -nic)."""
        kind, _, rest = text.partition(",")
        if kind != "tap":
            raise ConfigError(f"--nic {text!r}: only tap networking is supported", "write --nic tap,ifname=NAME")
        opts = _parse_options(rest, "--nic", {"ifname", "mac", "model"})
        if "ifname" not in opts:
            raise ConfigError(f"--nic {text!r}: ifname= is missing", "write --nic tap,ifname=NAME")
        return cls(opts["ifname"], opts.get("mac"), opts.get("model", "virtio"))

    def to_arg(self) -> str:
        return ",".join(["tap", f"ifname={self.tap}"] + ([f"mac={self.mac}"] if self.mac else [])
                        + ([f"model={self.model}"] if self.model != "virtio" else []))


def _parse_options(text: str, option: str, known: set[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    for part in filter(None, text.split(",")):
        key, eq, value = part.partition("=")
        if not eq or key not in known:
            raise ConfigError(f"{option} {text!r}: unknown option {part!r}", f"known: {', '.join(sorted(known))}")
        opts[key] = value
    return opts


VHOST_USER_DEVICES = {"vhost-user-blk-pci": 2, "vhost-user-net-pci": 1, "vhost-user-rng-pci": 4,
                      "vhost-user-pci": None}
VIRTIO_TYPES = {"net": 1, "blk": 2, "console": 3, "rng": 4}


@dataclass
class VhostUserConfig:
    """`--device vhost-user-blk-pci,socket=PATH[,num-queues=N][,queue-size=N][,bootindex=N]` (also
    vhost-user-net-pci with mac=, vhost-user-rng-pci, and the generic vhost-user-pci,type=blk|net|rng|ID): a
    virtio-pci device whose data plane is an external vhost-user back end."""
    kind: str
    socket: str
    device_id: int
    num_queues: int | None = None
    queue_size: int = 256
    bootindex: int | None = None
    mac: str | None = None

    @classmethod
    def parse(cls, text: str) -> "VhostUserConfig":
        kind, *parts = text.split(",")
        if kind not in VHOST_USER_DEVICES:
            raise ConfigError(f"unknown device {kind!r}", f"vhost-user devices: {', '.join(VHOST_USER_DEVICES)}")
        opts: dict = {"kind": kind, "device_id": VHOST_USER_DEVICES[kind]}
        for part in parts:
            key, eq, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if not eq:
                raise ConfigError(f"--device {text!r}: {part!r} is not KEY=VALUE")
            if key in ("socket", "mac"):
                opts[key] = value
            elif key == "type" and kind == "vhost-user-pci":
                try:
                    opts["device_id"] = VIRTIO_TYPES[value] if value in VIRTIO_TYPES else int(value, 0)
                except ValueError:
                    raise ConfigError(f"--device {text!r}: type={value} is not blk, net, rng or a number") from None
            elif key in ("num_queues", "queue_size", "bootindex"):
                opts[key] = _int_option("--device", text, key, value)
            else:
                raise ConfigError(f"--device {text!r}: unknown option {key.replace('_', '-')!r}",
                                  "use socket, num-queues, queue-size, bootindex, mac, type (vhost-user-pci)")
        if not opts.get("socket"):
            raise ConfigError(f"--device {text!r}: no socket", f"write --device {kind},socket=PATH")
        if opts["device_id"] is None:
            raise ConfigError(f"--device {text!r}: no type", "write type=blk, net, rng or a virtio device ID")
        config = cls(**opts)
        config.validate()
        return config

    def validate(self) -> None:
        if not 1 <= self.device_id <= 63:
            raise ConfigError(f"{self.kind}: virtio device type {self.device_id} is not within 1-63")
        if self.num_queues is not None and not 1 <= self.num_queues <= 64:
            raise ConfigError(f"{self.kind}: num-queues={self.num_queues} is not within 1-64")
        if self.queue_size < 2 or self.queue_size > 32768 or self.queue_size & (self.queue_size - 1):
            raise ConfigError(f"{self.kind}: queue-size={self.queue_size} is not a power of 2 up to 32768")
        if not os.path.exists(self.socket):
            raise ConfigError(f"{self.kind}: no socket at {self.socket}", "start the vhost-user back end first")


@dataclass
class VmConfig:
    name: str = "pyhv"
    uuid: str | None = None
    machine: str = "microvm"
    memory: int = 128 * MiB
    memory_backend: str = "anon"    # anon | memfd (shared, for vhost-user)
    cpus: int = 1
    cpu_model: str = "auto"          # auto: nested-safe on PVM hosts, host elsewhere
    firmware: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    serial: ChardevSpec = field(default_factory=lambda: ChardevSpec("stdio"))
    debugcon: ChardevSpec = field(default_factory=lambda: ChardevSpec("none"))
    on_reset: str = "exit"
    devices: list[str] = field(default_factory=list)
    drives: list[DriveConfig] = field(default_factory=list)
    nets: list[NetConfig] = field(default_factory=list)
    log_post: bool = False
    accounting: bool = True
    boot_entry: str = "auto"        # auto | pvh | linux64 (direct kernel boot)
    pvm_workarounds: bool = True    # on PVM hosts: kernel options and CPUID that avoid the emulator's gaps
    emulation_fallbacks: bool = True   # complete int3/fwait/clac/stac/popcnt/ldmxcsr when KVM's emulator fails
    pvm_syscall_fix: str = "auto"   # auto (on PVM hosts) | on | off
    ioeventfd: bool = True          # virtio notifications handled in the kernel (False: they exit to pyhv)
    msix: bool = True               # PCI devices offer MSI-X (False: INTx only)

    def validate(self) -> "VmConfig":
        if self.machine not in MACHINES:
            raise ConfigError(f"unknown machine type {self.machine!r}", f"choose one of {', '.join(MACHINES)}")
        if self.memory < MIN_MEMORY:
            raise ConfigError(f"memory {format_size(self.memory)} is too small", "use at least 2M")
        if self.memory % PAGE:
            raise ConfigError(f"memory {self.memory} bytes is not a multiple of 4 KiB")
        if self.memory_backend not in ("anon", "memfd"):
            raise ConfigError(f"memory backend {self.memory_backend!r} is not anon or memfd")
        if not 1 <= self.cpus <= MAX_CPUS:
            raise ConfigError(f"--cpus {self.cpus}: must be between 1 and {MAX_CPUS}")
        if self.cpu_model not in CPU_MODELS:
            raise ConfigError(f"--cpu {self.cpu_model!r}: choose host or nested-safe")
        if self.boot_entry not in BOOT_ENTRIES:
            raise ConfigError(f"--boot-entry {self.boot_entry!r}: choose auto, pvh or linux64")
        if self.pvm_syscall_fix not in ("auto", "on", "off"):
            raise ConfigError(f"--pvm-syscall-fix {self.pvm_syscall_fix!r}: choose auto, on or off")
        if self.on_reset not in ON_RESET:
            raise ConfigError(f"--on-reset {self.on_reset!r}: choose exit or restart")
        for device in self.devices:
            if device.startswith("vhost-user"):
                VhostUserConfig.parse(device)
                if self.machine != "pc":
                    raise ConfigError(f"{device.split(',')[0]} needs --machine pc")
                if self.memory_backend != "memfd":
                    raise ConfigError(f"{device.split(',')[0]}: the back end needs shared guest memory",
                                      "add --memory-backend memfd")
            elif device not in DEVICES:
                raise ConfigError(f"unknown device {device!r}",
                                  f"known devices: {', '.join(DEVICES + tuple(VHOST_USER_DEVICES))}")
        if self.firmware is not None:
            check_firmware(self.firmware)
        for path, what in ((self.kernel, "kernel"), (self.initrd, "initrd")):
            if path is not None:
                _check_readable(path, what)
        if self.initrd and not self.kernel:
            raise ConfigError("--initrd needs --kernel")
        if self.append and not self.kernel:
            raise ConfigError("--append needs --kernel")
        if self.firmware and self.kernel and self.machine == "microvm":
            raise ConfigError("--firmware and --kernel together need --machine pc",
                              "microvm boots a kernel directly, without firmware")
        for drive in self.drives:
            drive.validate()
        for net in self.nets:
            net.validate()
        if self.uuid is not None:
            self.uuid = _check_uuid(self.uuid)
        if self.drives and self.machine != "pc":
            raise ConfigError("--drive needs --machine pc", "virtio disks are PCI devices of the pc machine")
        if self.nets and self.machine != "pc":
            raise ConfigError("--nic needs --machine pc", "virtio network cards are PCI devices of the pc machine")
        return self

    def vhost_user_devices(self) -> list[VhostUserConfig]:
        return [VhostUserConfig.parse(d) for d in self.devices if d.startswith("vhost-user")]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["serial"], d["debugcon"] = str(self.serial), str(self.debugcon)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "VmConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
        data = dict(data)
        for key in ("serial", "debugcon"):
            if isinstance(data.get(key), str):
                data[key] = ChardevSpec.parse(data[key], f"{key}")
        if "memory" in data:
            data["memory"] = parse_size(data["memory"])
        data["drives"] = [DriveConfig(**d) if isinstance(d, dict) else d for d in data.get("drives", [])]
        data["nets"] = [NetConfig(**d) if isinstance(d, dict) else d for d in data.get("nets", [])]
        return cls(**data)


def _check_uuid(text: str) -> str:
    import uuid
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise ConfigError(f"uuid {text!r} is not a UUID", "write 8-4-4-4-12 hex digits") from None


def _check_readable(path: str, what: str) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise GuestImageError(f"{what} file {path} does not exist")
    except OSError as e:
        raise GuestImageError(f"{what} file {path}: {e.strerror}")
    if not os.path.isfile(path):
        raise GuestImageError(f"{what} file {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise GuestImageError(f"{what} file {path} is not readable")
    return st.st_size


def check_firmware(path: str) -> int:
    size = _check_readable(path, "firmware")
    if size == 0:
        raise GuestImageError(f"firmware file {path} is empty")
    if size > MAX_FIRMWARE:
        raise GuestImageError(f"firmware file {path} is {size} bytes, more than the {MAX_FIRMWARE >> 20} MiB "
                              "that fit below 4 GiB")
    return size
