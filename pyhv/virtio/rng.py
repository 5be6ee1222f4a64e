"""virtio-rng (virtio 1.2 §5.4): one request queue whose device-writable buffers the device fills with random
bytes from the host kernel (`os.urandom`, i.e. getrandom(2))."""
from __future__ import annotations

import os

from pyhv.virtio.device import VIRTIO_ID_RNG, VirtioDevice
from pyhv.virtio.queue import DescriptorChain, scatter

MAX_REQUEST = 64 * 1024          # bytes given per request at most; the driver asks again for more


class VirtioRng(VirtioDevice):
    device_id = VIRTIO_ID_RNG
    queue_sizes = (256,)
    name = "virtio-rng"

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.bytes_given = 0

    @classmethod
    def create(cls, context, options: None) -> "VirtioRng":
        return cls(context.name)

    def process(self, queue_index: int) -> None:
        self.serve(self.queues[queue_index], self._fill)

    def _fill(self, chain: DescriptorChain) -> int:
        if chain.readable_len:
            self.warn_once("readable", "request with %d device-readable bytes (ignored)", chain.readable_len)
        n = min(chain.writable_len, MAX_REQUEST)
        written = scatter(chain.writable, os.urandom(n)) if n else 0
        self.bytes_given += written
        return written
