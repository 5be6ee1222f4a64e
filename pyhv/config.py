"""`VmConfig`: the one validated description of a VM. CLI flags, JSON and domain XML all produce it."""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields

from pyhv.runtime.chardev import ChardevSpec
from pyhv.devices.options import (  # noqa: F401  (the device options, as config users know them)
    VHOST_USER_DEVICES, VIRTIO_TYPES, DriveConfig, NetConfig, VhostUserConfig,
)
from pyhv.devices.device_type import DeviceSpec
from pyhv.errors import ConfigError, GuestImageError
from pyhv.registry import lookup, parse_device

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4 * KiB
MIN_MEMORY = 2 * MiB
MAX_CPUS = 64
MAX_FIRMWARE = 16 * MiB
MACHINES = ("microvm", "pc")
CPU_MODELS = ("auto", "host", "nested-safe")
BOOT_ENTRIES = ("auto", "pvh", "linux64")
IOMMU_MODELS = ("intel",)
ON_RESET = ("exit", "restart")

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


NIC_DEVICE_TYPES = {"virtio": "virtio-net", "e1000": "e1000"}     # --nic model= -> registry device type

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
    acpi: bool = True               # pyhv's ACPI tables describe the machine (False: the MP table, as before)
    sidecore: bool = False          # a thread of its own polls the virtio-blk/net queues (virtio/poller.py)
    iommu: str | None = None        # "intel": a VT-d DMA remapping unit in front of every PCI device (pc)
    sandbox: bool = True            # vCPU and I/O threads under a seccomp deny list (runtime/sandbox.py)

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
        specs = self.device_specs()
        if self.iommu is not None:
            self._validate_iommu(specs)
        for spec in specs:
            if spec.type.needs_shared_memory and self.memory_backend != "memfd":
                raise ConfigError(f"{spec.text.split(',')[0]}: the back end needs shared guest memory",
                                  "add --memory-backend memfd")
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
        for spec in specs:
            validate = getattr(spec.options, "validate", None)
            if validate is not None:
                validate()
        if self.uuid is not None:
            self.uuid = _check_uuid(self.uuid)
        return self

    def _validate_iommu(self, specs: list[DeviceSpec]) -> None:
        if self.iommu not in IOMMU_MODELS:
            raise ConfigError(f"--iommu {self.iommu!r}: choose {', '.join(IOMMU_MODELS)}")
        if self.machine != "pc":
            raise ConfigError(f"--iommu {self.iommu} needs --machine pc", "the microvm machine has no PCI bus")
        if not self.acpi:
            raise ConfigError(f"--iommu {self.iommu} needs --acpi on", "the guest finds the IOMMU in ACPI's DMAR table")
        for spec in specs:
            if spec.type.needs_shared_memory:
                raise ConfigError(f"{spec.text.split(',')[0]} cannot sit behind --iommu {self.iommu}",
                                  "its vhost-user back end would need the IOTLB protocol, which pyhv does not have yet")

    def device_specs(self) -> list[DeviceSpec]:
        """Every device of this VM from the registry: the --drive disks, the --nic cards, then each --device."""
        specs = []
        for what, items in (("--drive", self.drives), ("--nic", self.nets)):
            for item in items:
                if what == "--nic" and item.model not in NIC_DEVICE_TYPES:
                    item.validate()                     # names the models there are
                name = "virtio-blk" if what == "--drive" else NIC_DEVICE_TYPES[item.model]
                try:
                    dtype, transport = lookup(name, self.machine)
                except ConfigError as e:
                    raise ConfigError(f"{what} {item.to_arg()} needs --machine pc", e.hint) from None
                specs.append(DeviceSpec(dtype, transport, item, f"{what} {item.to_arg()}"))
        specs += [parse_device(text, self.machine) for text in self.devices]
        counts: dict[str, int] = {}
        for spec in specs:
            spec.position = counts.get(spec.type.name, 0)
            counts[spec.type.name] = spec.position + 1
        return specs

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
