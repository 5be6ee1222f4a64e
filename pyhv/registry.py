"""The device registry: every kind of device a pyhv VM can have, one line each.

The CLI's `--device` (and `--device help`), `VmConfig.validate`, domain XML, the Python API and the boards all
read this table; a new device is its own file plus one line here (see `pyhv.devices.device_type`). `--drive`
and `--nic` are the QEMU-style spellings of `virtio-blk` and `virtio-net`.
"""
from __future__ import annotations

from pyhv.devices.device_type import (
    MACHINE_TRANSPORT, PCI, PLATFORM, TRANSPORT_SUFFIX, VIRTIO, DeviceSpec, DeviceType,
)
from pyhv.devices.options import ConsoleOptions, DriveConfig, NetConfig, VhostUserConfig
from pyhv.errors import ConfigError

DEVICE_TYPES: dict[str, DeviceType] = {t.name: t for t in (
    DeviceType("testdev", "scratch registers at ports 0xe0-0xe3 and MMIO 0xfe800000 for the project's test guests",
               "pyhv.devices.testdev:TestDev.create"),
    DeviceType("virtio-rng", "entropy source: the guest's /dev/hwrng reads the host's getrandom(2)",
               "pyhv.virtio.rng:VirtioRng.create", transports=VIRTIO),
    DeviceType("virtio-blk", "disk on a raw image: file=PATH[,readonly=on][,cache=none][,serial=S][,num-queues=N]"
               "[,bootindex=N] (also --drive)", "pyhv.virtio.blk:VirtioBlk.create", options=DriveConfig,
               transports=VIRTIO, boot_index_base=1000),
    DeviceType("virtio-net", "network card on a host tap: ifname=TAP[,mac=MAC] (also --nic tap,ifname=TAP)",
               "pyhv.virtio.net:VirtioNet.create", options=NetConfig, transports=VIRTIO),
    DeviceType("e1000", "Intel 82540EM network card (Linux's e1000, iPXE) on a host tap: ifname=TAP[,mac=MAC]"
               "[,romfile=PATH] (an option ROM, e.g. iPXE's /usr/lib/ipxe/qemu/efi-e1000.rom, for firmware to "
               "network-boot from; also --nic tap,ifname=TAP,model=e1000)", "pyhv.devices.net.e1000:E1000.create",
               options=NetConfig, transports=(PCI,)),
    DeviceType("virtio-console", "the guest's hvc0 on a host character device: chardev=stdio|file:PATH|"
               "socket:PATH|pty|none", "pyhv.virtio.console:VirtioConsole.create", options=ConsoleOptions,
               transports=VIRTIO),
    DeviceType("vhost-user-blk", "disk served by a vhost-user back end: socket=PATH[,num-queues=N][,queue-size=N]"
               "[,bootindex=N]", "pyhv.vhost.frontend:VhostUserFrontend.create", options=VhostUserConfig,
               transports=(PCI,), boot_index_base=2000, needs_shared_memory=True),
    DeviceType("vhost-user-net", "network card served by a vhost-user back end: socket=PATH[,mac=MAC]",
               "pyhv.vhost.frontend:VhostUserFrontend.create", options=VhostUserConfig, transports=(PCI,),
               needs_shared_memory=True),
    DeviceType("vhost-user-rng", "entropy source served by a vhost-user back end: socket=PATH",
               "pyhv.vhost.frontend:VhostUserFrontend.create", options=VhostUserConfig, transports=(PCI,),
               needs_shared_memory=True),
    DeviceType("vhost-user", "any virtio device served by a vhost-user back end: type=blk|net|rng|ID,socket=PATH",
               "pyhv.vhost.frontend:VhostUserFrontend.create", options=VhostUserConfig, transports=(PCI,),
               boot_index_base=2000, needs_shared_memory=True),
)}


def register(device_type: DeviceType) -> DeviceType:
    """Add a device type (for devices defined outside pyhv, and tests); its name must be new."""
    if device_type.name in DEVICE_TYPES:
        raise ValueError(f"device type {device_type.name!r} is already registered")
    DEVICE_TYPES[device_type.name] = device_type
    return device_type


def unregister(name: str) -> None:
    DEVICE_TYPES.pop(name, None)


def lookup(name: str, machine: str) -> tuple[DeviceType, str]:
    """The type and transport a `--device` name means on `machine`: NAME, NAME-pci or NAME-device."""
    if name in DEVICE_TYPES:
        dtype = DEVICE_TYPES[name]
        if dtype.transports == (PLATFORM,):
            return dtype, PLATFORM
        transport = MACHINE_TRANSPORT[machine] if MACHINE_TRANSPORT[machine] in dtype.transports \
            else dtype.transports[0]
    else:
        for transport, suffix in TRANSPORT_SUFFIX.items():
            base = name[:-len(suffix)]
            if name.endswith(suffix) and base in DEVICE_TYPES and transport in DEVICE_TYPES[base].transports:
                dtype = DEVICE_TYPES[base]
                break
        else:
            raise ConfigError(f"unknown device {name!r}", "--device help lists the devices")
    if transport != MACHINE_TRANSPORT[machine]:
        kind = "PCI" if transport == PCI else "virtio-mmio"
        other = next(m for m, t in MACHINE_TRANSPORT.items() if t == transport)
        raise ConfigError(f"{name} needs --machine {other}: it is a {kind} device",
                          f"the {machine} machine has {'no PCI bus' if transport == PCI else 'no virtio-mmio slots'}")
    return dtype, transport


def parse_device(text: str, machine: str) -> DeviceSpec:
    """`--device NAME[,KEY=VALUE...]` as a `DeviceSpec`, or a `ConfigError` naming what is wrong."""
    name, _, rest = text.partition(",")
    dtype, transport = lookup(name.strip(), machine)
    return DeviceSpec(dtype, transport, dtype.parse_options(rest, text), text)


def help_text() -> str:
    lines = ["Devices for --device NAME[,OPTIONS] (a virtio device is also NAME-pci on pc, NAME-device on microvm):"]
    for dtype in DEVICE_TYPES.values():
        where = "/".join({PCI: "pc", "mmio": "microvm", PLATFORM: "any machine"}[t] for t in dtype.transports)
        lines.append(f"  {dtype.name:<16} {dtype.summary} [{where}]")
    return "\n".join(lines)
