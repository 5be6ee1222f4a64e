"""The options of the devices that have more than the generic KEY=VALUE parsing: a disk (`--drive`,
`--device virtio-blk`), a network card (`--nic`, `--device virtio-net`) and the vhost-user front ends."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from pyhv.errors import ConfigError


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
    locking: bool = True            # QEMU's image locks (a second writer is refused); off: no check at all

    @classmethod
    def parse(cls, text: str) -> "DriveConfig":
        """`file=PATH[,readonly=on][,cache=none|writeback][,serial=ID][,num-queues=N][,bootindex=N]
        [,locking=off]`; a bare PATH is `file=PATH`."""
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
            elif key in ("readonly", "locking", "file.locking"):
                name = key.removeprefix("file.")
                if value not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
                    raise ConfigError(f"--drive {text!r}: {name}={value} is not on or off")
                fields_[name] = value in ("on", "true", "1", "yes")
            elif key in ("cache", "serial", "format"):
                fields_[key] = value
            elif key in ("num_queues", "bootindex"):
                fields_[key] = _int_option("--drive", text, key, value)
            else:
                raise ConfigError(f"--drive {text!r}: unknown option {key.replace('_', '-')!r}",
                                  "use file, readonly, cache, serial, num-queues, bootindex, format, locking")
        if not fields_.get("file"):
            raise ConfigError(f"--drive {text!r}: no file", "write --drive file=PATH")
        return cls(**fields_)

    @classmethod
    def from_device_arg(cls, name: str, text: str, arg: str) -> "DriveConfig":
        """`--device virtio-blk[-pci],file=PATH,...`: the options of --drive."""
        return cls.parse(text)

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
        if not self.locking:
            parts.append("locking=off")
        return ",".join(parts)


_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
NET_MODELS = ("virtio", "e1000")       # --nic model=: the device type is virtio-net or e1000
MAX_OPTION_ROM = 16 << 20               # a ROM BAR's largest size we accept (iPXE's are 64-512 KiB)


@dataclass
class NetConfig:
    """A network interface: a virtio-net (or, with model e1000, an Intel 82540EM) device whose host end is the
    tap device `tap`."""
    tap: str
    mac: str | None = None          # None: pyhv picks one (52:54:00:...)
    model: str = "virtio"
    romfile: str | None = None      # e1000: an option ROM (iPXE's) in the card's expansion ROM BAR

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
        if self.romfile is not None:
            if self.model != "e1000":
                raise ConfigError(f"network interface {self.tap}: romfile= needs model=e1000",
                                  "virtio-net has no expansion ROM in pyhv")
            try:
                size = os.path.getsize(self.romfile)
            except OSError as e:
                raise ConfigError(f"network interface {self.tap}: option ROM {self.romfile}: {e.strerror}") from None
            if not 0 < size <= MAX_OPTION_ROM:
                raise ConfigError(f"network interface {self.tap}: option ROM {self.romfile} is {size} bytes",
                                  f"an expansion ROM holds 1 to {MAX_OPTION_ROM} bytes")

    @classmethod
    def parse(cls, text: str) -> "NetConfig":
        """`--nic tap,ifname=NAME[,mac=MAC][,model=virtio|e1000][,romfile=PATH]` (as QEMU's -nic)."""
        kind, _, rest = text.partition(",")
        if kind != "tap":
            raise ConfigError(f"--nic {text!r}: only tap networking is supported", "write --nic tap,ifname=NAME")
        opts = _parse_options(rest, "--nic", {"ifname", "mac", "model", "romfile"})
        if "ifname" not in opts:
            raise ConfigError(f"--nic {text!r}: ifname= is missing", "write --nic tap,ifname=NAME")
        return cls(opts["ifname"], opts.get("mac"), opts.get("model", "virtio"), opts.get("romfile"))

    @classmethod
    def from_device_arg(cls, name: str, text: str, arg: str) -> "NetConfig":
        """`--device virtio-net[-pci],ifname=TAP[,mac=MAC]`, `--device e1000,ifname=TAP[,mac=MAC][,romfile=PATH]`."""
        e1000 = name.startswith("e1000")
        opts = _parse_options(text, "--device", {"ifname", "mac"} | ({"romfile"} if e1000 else set()))
        if "ifname" not in opts:
            raise ConfigError(f"--device {arg!r}: ifname= is missing", f"write --device {name},ifname=TAP")
        return cls(opts["ifname"], opts.get("mac"), "e1000" if e1000 else "virtio", opts.get("romfile"))

    def to_arg(self) -> str:
        return ",".join(["tap", f"ifname={self.tap}"] + ([f"mac={self.mac}"] if self.mac else [])
                        + ([f"model={self.model}"] if self.model != "virtio" else [])
                        + ([f"romfile={self.romfile}"] if self.romfile else []))


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

    @classmethod
    def from_device_arg(cls, name: str, text: str, arg: str) -> "VhostUserConfig":
        return cls.parse(f"{name}-pci,{text}" if text else f"{name}-pci")

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
class ConsoleOptions:
    """`--device virtio-console,chardev=KIND[:PATH]`: the host end of the guest's hvc0 (stdio, file:PATH,
    socket:PATH, pty or none, as --serial takes)."""
    chardev: str

    @classmethod
    def from_device_arg(cls, name: str, text: str, arg: str) -> "ConsoleOptions":
        key, eq, value = text.partition("=")
        if key != "chardev" or not eq or not value:
            raise ConfigError(f"--device {arg!r}: {name} needs chardev=KIND[:PATH]",
                              "e.g. chardev=stdio, chardev=file:console.log, chardev=socket:/tmp/hvc.sock")
        from pyhv.runtime.chardev import ChardevSpec
        ChardevSpec.parse(value, f"--device {arg}: chardev=")          # its errors, at validation time
        return cls(value)
