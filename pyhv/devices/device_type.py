"""`DeviceType`: how the CLI, the config, domain XML, the API and the boards know a kind of device.

A device file's class is the device; its `DeviceType` (one line in `pyhv/registry.py`) says what users call it
and how a board builds it:

    DeviceType("virtio-rng", "entropy source: the guest's /dev/hwrng reads the host's getrandom(2)",
               "pyhv.virtio.rng:VirtioRng.create", transports=VIRTIO)

- `name`: the name in `--device NAME[,KEY=VALUE...]`, QMP and domain XML. A virtio type is also reached as
  `NAME-pci` (virtio-pci, the `pc` machine) and `NAME-device` (virtio-mmio, QEMU's name for it); the bare name
  picks the machine's own transport.
- `factory`: `"module:callable"` (imported only when a VM uses the device, so the CLI starts fast) or a callable;
  called as `factory(context, options)`, it returns the device: a `VirtioDevice` back end for the `pci`/`mmio`
  transports (the board puts it behind the transport), or a `Device` with claims for `platform`.
- `options`: a dataclass of the device's KEY=VALUE options (`key-name=` for field `key_name`; int, bool
  (on/off), str), or None when it takes none. A dataclass with a `from_device_arg(name, text)` class method
  parses its options itself.
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass
from typing import Any, Callable

from pyhv.errors import ConfigError

PCI, MMIO, PLATFORM = "pci", "mmio", "platform"
VIRTIO = (PCI, MMIO)
TRANSPORT_SUFFIX = {PCI: "-pci", MMIO: "-device"}
MACHINE_TRANSPORT = {"pc": PCI, "microvm": MMIO}


@dataclass
class DeviceContext:
    """What a factory gets: the device's name in the machine, its position among devices of its type, and the
    machine (for `irq_line`, `iothread`, `guest_memory`) and the board building it."""
    name: str
    position: int
    machine: Any
    board: Any = None


@dataclass(frozen=True)
class DeviceType:
    name: str
    summary: str
    factory: str | Callable[[DeviceContext, Any], Any]
    options: type | None = None
    transports: tuple[str, ...] = (PLATFORM,)
    boot_index_base: int | None = None    # a default boot order (1000 + position) for bootable devices
    needs_shared_memory: bool = False     # vhost-user back ends map guest RAM: --memory-backend memfd

    def create(self, context: DeviceContext, options: Any) -> Any:
        factory = self.factory
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            factory = importlib.import_module(module)
            for part in attr.split("."):
                factory = getattr(factory, part)
        return factory(context, options)

    def parse_options(self, text: str, arg: str) -> Any:
        """The options dataclass from `KEY=VALUE,...` (`arg` is the whole --device argument, for errors)."""
        if self.options is None:
            if text:
                raise ConfigError(f"--device {arg!r}: {self.name} takes no options")
            return None
        custom = getattr(self.options, "from_device_arg", None)
        if custom is not None:
            return custom(self.name, text, arg)
        return parse_dataclass_options(self.options, text, arg)


@dataclass
class DeviceSpec:
    """One device a VM has: its type, the transport it sits behind, its parsed options, and the text it came
    from (what the config keeps, so JSON and domain XML round-trip)."""
    type: DeviceType
    transport: str
    options: Any = None
    text: str = ""
    position: int = 0          # among the VM's devices of this type: virtio-blk0, virtio-blk1, ...

    @property
    def device_name(self) -> str:
        """Its name in the machine: the type and position (virtio-blk0; e1000-0 when the type ends in a digit)."""
        sep = "-" if self.type.name[-1].isdigit() else ""
        return f"{self.type.name}{sep}{self.position}"

    def boot_index(self, position: int) -> int | None:
        explicit = getattr(self.options, "bootindex", None)
        if explicit is not None:
            return explicit
        return None if self.type.boot_index_base is None else self.type.boot_index_base + position


def parse_dataclass_options(cls: type, text: str, arg: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, eq, value = part.partition("=")
        attr = key.strip().replace("-", "_")
        if not eq or attr not in known:
            raise ConfigError(f"--device {arg!r}: unknown option {part!r}",
                              "options: " + (", ".join(n.replace("_", "-") + "=" for n in known) or "none"))
        kind = hints.get(attr)
        if kind in (int, int | None):
            try:
                values[attr] = int(value, 0)
            except ValueError:
                raise ConfigError(f"--device {arg!r}: {key}={value} is not a number") from None
        elif kind in (bool, bool | None):
            if value not in ("on", "off", "true", "false", "yes", "no"):
                raise ConfigError(f"--device {arg!r}: {key}={value}: write on or off")
            values[attr] = value in ("on", "true", "yes")
        else:
            values[attr] = value
    try:
        return cls(**values)
    except TypeError as e:
        missing = [n.replace("_", "-") for n, f in known.items() if n not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        raise ConfigError(f"--device {arg!r}: missing {', '.join(missing) or 'options'}") from e
