"""The device contract: what every pyhv device is, as the boards, snapshots, `--dump` and QMP see it.

    class Port92:
        name: str                      # unique in the machine: "serial0", "virtio-blk0", "fw_cfg"
        state: Port92State             # one dataclass: everything guest-visible that changes
        def claims(self) -> list[Claim]    # the regions it decodes, in which address space, where
        def reset(self) -> None            # back to power-on state (the machine's reset calls it)

A board calls `attach(device)`: the board maps each `Claim` (`Claim.port(0x92, region)`, `Claim.mmio(addr, region)`)
into the machine's port or memory space and remembers the device for reset, statistics and dumps. Nothing else
is wired by hand: no per-device lambdas in the machine. A device never touches KVM; it is given what it needs
(an `IrqLine`, a DMA view of guest memory, the `IoThread`) when it is built.

`RegisterBank.region(...)` builds the `MemoryRegion` of a declared register table (with the device's lock held on
every access, and register names for traces and exit statistics). PCI functions claim nothing themselves: the bus
maps their BARs; `PciBus.plug` is their `attach`.

Optional: `close()` (host resources: files, taps, fds) and `describe() -> dict` (for `info` commands).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from pyhv.memory import MemoryRegion

Space = Literal["io", "memory"]


@dataclass(frozen=True)
class Claim:
    """One region a device decodes: in the port (`io`) or memory space, at `address`, with a priority over
    regions it overlaps (higher hides lower)."""
    space: Space
    address: int
    region: "MemoryRegion"
    priority: int = 0

    @classmethod
    def port(cls, address: int, region: "MemoryRegion") -> "Claim":
        return cls("io", address, region)

    @classmethod
    def mmio(cls, address: int, region: "MemoryRegion", priority: int = 0) -> "Claim":
        return cls("memory", address, region, priority)


@runtime_checkable
class Device(Protocol):
    name: str
    state: Any

    def claims(self) -> Sequence[Claim]: ...

    def reset(self) -> None: ...


def device_region(device: Any, size: int, name: str | None = None, base: int = 0,
                  read: Callable[[int, int], int] | None = None,
                  write: Callable[[int, int, int], None] | None = None,
                  describe: Callable[[int], str] | None = None) -> "MemoryRegion":
    """The region of `size` bytes through which the guest reaches `device`: accesses call `read(offset, size)` and
    `write(offset, size, value)` (the device's own `read`/`write` by default) with `base` added to the offset, so
    one register file can be claimed in pieces (the i8042's 0x60 and 0x64). Exit statistics and traces name the
    register through `describe`, or the device's `RegisterBank` when it has one."""
    from pyhv.memory import MemoryRegion
    read = read or device.read
    write = write or device.write
    if base:
        read = (lambda offset, size, _r=read: _r(base + offset, size))
        write = (lambda offset, size, value, _w=write: _w(base + offset, size, value))
    region = MemoryRegion.io(name or device.name, size, read, write, owner=device.name)
    if describe is None and getattr(device, "bank", None) is not None:
        describe = (lambda offset: device.bank.register_name(base + offset))
    region.describe = describe
    return region
