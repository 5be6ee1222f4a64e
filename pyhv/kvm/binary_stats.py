"""KVM's binary statistics (KVM_GET_STATS_FD, Linux 5.14+): the per-VM and per-vCPU counters KVM keeps, e.g.
`exits`, `io_exits`, `mmio_exits` and, on PVM where real-mode and kernel code is emulated, `insn_emulation`.
QEMU exposes the same counters as `query-stats`, so pyhv and QEMU can be compared on them."""
from __future__ import annotations

import os
import struct

from pyhv.kvm.system import ioctl

KVM_GET_STATS_FD = (0xAE << 8) | 0xCE          # _IO(KVMIO, 0xce)
_HEADER = struct.Struct("=IIIIII")             # flags, name_size, num_desc, id_offset, desc_offset, data_offset
_DESC = struct.Struct("=IhHII")                # flags, exponent, size, offset, bucket_size


def read_stats(fd: int) -> dict[str, int | list[int]]:
    """Every counter of the KVM object `fd` (a VM or vCPU fd): name -> value (a list for histograms)."""
    stats_fd = ioctl(fd, KVM_GET_STATS_FD)
    try:
        head = os.pread(stats_fd, _HEADER.size, 0)
        _, name_size, num_desc, _, desc_offset, data_offset = _HEADER.unpack(head)
        desc_size = _DESC.size + name_size
        descs = os.pread(stats_fd, desc_size * num_desc, desc_offset)
        out: dict[str, int | list[int]] = {}
        for i in range(num_desc):
            base = i * desc_size
            _, _, size, offset, _ = _DESC.unpack_from(descs, base)
            name = descs[base + _DESC.size:base + desc_size].split(b"\0", 1)[0].decode()
            raw = os.pread(stats_fd, 8 * size, data_offset + offset)
            values = list(struct.unpack(f"={size}Q", raw))
            out[name] = values[0] if size == 1 else values
        return out
    finally:
        os.close(stats_fd)
