"""KVM's binary statistics (KVM_GET_STATS_FD, Linux 5.14+): the per-VM and per-vCPU counters KVM keeps, e.g.
`exits`, `io_exits`, `mmio_exits` and, on PVM where real-mode and kernel code is emulated, `insn_emulation`.
QEMU exposes the same counters as `query-stats`, so pyhv and QEMU can be compared on them."""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from pyhv.kvm.system import ioctl

KVM_GET_STATS_FD = (0xAE << 8) | 0xCE          # _IO(KVMIO, 0xce)
_HEADER = struct.Struct("=IIIIII")             # flags, name_size, num_desc, id_offset, desc_offset, data_offset
_DESC = struct.Struct("=IhHII")                # flags, exponent, size, offset, bucket_size


# kvm_stats_desc.flags (include/uapi/linux/kvm.h): type in bits 0-3, unit in bits 4-7, base in bits 8-11
STAT_TYPES = ("cumulative", "instant", "peak", "linear-histogram", "log2-histogram")
STAT_UNITS = (None, "bytes", "seconds", "cycles", "boolean")
STAT_BASES = (10, 2)


@dataclass(frozen=True)
class StatDescriptor:
    name: str
    type: str
    unit: str | None
    base: int
    exponent: int
    size: int
    bucket_size: int


def _field(table: tuple, index: int, default: object) -> object:
    return table[index] if index < len(table) else default


class StatsReader:
    """The statistics file of one KVM object, opened once. Reading it (pread) does not take the vCPU's lock, so a
    running vCPU's counters can be read from any thread; only opening it (an ioctl on the vCPU) cannot."""

    def __init__(self, fd: int) -> None:
        self.fd = ioctl(fd, KVM_GET_STATS_FD)
        try:
            head = os.pread(self.fd, _HEADER.size, 0)
            _, name_size, num_desc, _, desc_offset, self._data_offset = _HEADER.unpack(head)
            desc_size = _DESC.size + name_size
            descs = os.pread(self.fd, desc_size * num_desc, desc_offset)
            self.schema: list[StatDescriptor] = []
            self._layout: list[tuple[str, int, int]] = []        # name, offset, size
            for i in range(num_desc):
                base = i * desc_size
                flags, exponent, size, offset, bucket = _DESC.unpack_from(descs, base)
                name = descs[base + _DESC.size:base + desc_size].split(b"\0", 1)[0].decode()
                self._layout.append((name, offset, size))
                self.schema.append(StatDescriptor(
                    name, str(_field(STAT_TYPES, flags & 0xF, "cumulative")),
                    _field(STAT_UNITS, (flags >> 4) & 0xF, None),  # type: ignore[arg-type]
                    int(_field(STAT_BASES, (flags >> 8) & 0xF, 10)), exponent, size, bucket))  # type: ignore[arg-type]
        except BaseException:
            os.close(self.fd)
            raise

    def read(self) -> dict[str, int | list[int]]:
        out: dict[str, int | list[int]] = {}
        for name, offset, size in self._layout:
            values = list(struct.unpack(f"={size}Q", os.pread(self.fd, 8 * size, self._data_offset + offset)))
            out[name] = values[0] if size == 1 else values
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_stats(fd: int) -> dict[str, int | list[int]]:
    """Every counter of the KVM object `fd` (a VM or vCPU fd): name -> value (a list for histograms)."""
    reader = StatsReader(fd)
    try:
        return reader.read()
    finally:
        reader.close()
