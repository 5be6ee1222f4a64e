"""A vhost-user front end: a `VirtioDevice` whose data plane is an external back end (qemu-storage-daemon,
`pyhv vhost-user-backend`, any vhost-user device server).

pyhv keeps the transport (virtio-pci: configuration space, feature and status registers, queue registers, MSI-X)
and hands the back end everything it needs to run the rings without pyhv's Python code:

- guest RAM, which must be shared (`--memory-backend memfd`): SET_MEM_TABLE with the memfd and the RAM layout;
- each queue's ring addresses (as pyhv's user addresses, SET_VRING_ADDR), size and base;
- the transport's ioeventfds as kick fds (the guest's notify write completes in KVM and wakes the back end);
- the queue's MSI-X irqfd as call fd (the back end's eventfd write is a guest interrupt in KVM). Where there is
  no irqfd to give (INTx, no vector yet) pyhv relays a call eventfd to the transport's `interrupt`.

The device's features and configuration space are the back end's (GET_FEATURES, GET_CONFIG), less the feature
bits pyhv's transport does not implement. On reset every ring is stopped with GET_VRING_BASE; DRIVER_OK sends the
whole set-up again. If the back end goes away, the device asks for DEVICE_NEEDS_RESET and reconnects on the next
activation.
"""
from __future__ import annotations

import logging
import os
import struct
from typing import Callable

from pyhv.errors import ConfigError
from pyhv.vhost import protocol as P
from pyhv.vhost.client import VhostUserClient
from pyhv.vhost.protocol import VhostUserError
from pyhv.virtio.device import (VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK,
                                VIRTIO_ID_NET, VIRTIO_ID_RNG, VirtioDevice, bits)

log = logging.getLogger(__name__)

# the transport-independent bits pyhv's transport and rings implement, and every device-specific bit (0-23)
SUPPORTED_FEATURES = (1 << 24) - 1 | bits(VIRTIO_F_INDIRECT_DESC, VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1)
VIRTIO_BLK_F_MQ = 12
BLK_CONFIG_SIZE = 60
DEVICE_NAMES = {VIRTIO_ID_NET: "net", VIRTIO_ID_BLOCK: "blk", VIRTIO_ID_RNG: "rng"}

Region = tuple[int, int, int, int, int]          # gpa, size, user address, fd offset, fd


class VhostUserFrontend(VirtioDevice):
    external_data_plane = True

    @classmethod
    def create(cls, context, vu) -> "VhostUserFrontend":
        """From a `VhostUserConfig`, on a board with `vhost_memory_regions` (guest RAM in a shared memfd)."""
        from pyhv.runtime.tap import parse_mac
        return cls(vu.socket, vu.device_id, context.board.vhost_memory_regions, context.machine.iothread,
                   num_queues=vu.num_queues, queue_size=vu.queue_size, mac=parse_mac(vu.mac) if vu.mac else None)

    def __init__(self, socket_path: str, device_id: int, memory_regions: Callable[[], list[Region]],
                 iothread, num_queues: int | None = None, queue_size: int = 256, mac: bytes | None = None,
                 name: str | None = None, connect_wait: float = 10.0) -> None:
        super().__init__(name or f"vhost-user-{DEVICE_NAMES.get(device_id, device_id)}({socket_path})")
        self.device_id = device_id
        self.socket_path = socket_path
        self.memory_regions = memory_regions
        self.iothread = iothread
        self.connect_wait = connect_wait
        self.mac = mac
        self.client: VhostUserClient | None = None
        self.kick_fds: list[int] | None = None
        self.call_fd_for: Callable[[int], int | None] = lambda index: None
        self._own_kicks: list[int] = []
        self._relays: dict[int, int] = {}
        self._started: list[int] = []
        self._connect()
        if num_queues is None:
            num_queues = {VIRTIO_ID_NET: 2, VIRTIO_ID_BLOCK: self._blk_queues()}.get(device_id, 1)
        if self.protocol_features >> P.VHOST_USER_PROTOCOL_F_MQ & 1:
            offered = self.client.get_queue_num()
            if device_id != VIRTIO_ID_NET and num_queues > offered:
                raise ConfigError(f"vhost-user back end {socket_path} serves {offered} queues, not {num_queues}")
        self.queue_sizes = (queue_size,) * num_queues

    @property
    def snapshot_refusal(self) -> str:
        """Why a snapshot or migration cannot include this device (pyhv/machine/snapshot.py names it)."""
        if not self.offered_protocol_features >> P.VHOST_USER_PROTOCOL_F_LOG_SHMFD & 1:
            return ("a vhost-user device whose back end does not offer VHOST_USER_PROTOCOL_F_LOG_SHMFD, the dirty "
                    "log a migration needs")
        return "a vhost-user device: its back end offers LOG_SHMFD, but pyhv does not migrate vhost-user state yet"

    # --- connection ------------------------------------------------------------------------------------------
    def _connect(self) -> None:
        try:
            self.client = c = VhostUserClient(self.socket_path, connect_wait=self.connect_wait)
            self.backend_features = c.get_features()
            self.protocol_features = self.offered_protocol_features = 0
            if self.backend_features >> P.VHOST_USER_F_PROTOCOL_FEATURES & 1:
                wanted = bits(P.VHOST_USER_PROTOCOL_F_REPLY_ACK, P.VHOST_USER_PROTOCOL_F_CONFIG,
                              P.VHOST_USER_PROTOCOL_F_MQ)
                self.offered_protocol_features = c.get_protocol_features()
                c.set_protocol_features(self.offered_protocol_features & wanted)
                self.protocol_features = c.protocol_features
            c.set_owner()
            self._config = self._read_config()
        except (VhostUserError, OSError) as e:
            if self.client is not None:
                self.client.close()
                self.client = None
            raise ConfigError(f"vhost-user back end {self.socket_path}: {e}") from None

    def _read_config(self) -> bytes:
        if self.device_id == VIRTIO_ID_NET:     # the front end owns a vhost-user net device's configuration
            return (self.mac or b"\x52\x54\x00" + os.urandom(3)) + struct.pack("<HH", 1, 1)
        if self.protocol_features >> P.VHOST_USER_PROTOCOL_F_CONFIG & 1 and self.device_id == VIRTIO_ID_BLOCK:
            return self.client.get_config(0, BLK_CONFIG_SIZE)
        return b""

    def _blk_queues(self) -> int:
        if self.backend_features >> VIRTIO_BLK_F_MQ & 1 and len(self._config) >= 36:
            return max(1, struct.unpack_from("<H", self._config, 34)[0])
        return 1

    def attach_notifiers(self, kick_fds: list[int] | None, call_fd_for: Callable[[int], int | None]) -> None:
        """From the transport: its ioeventfds (None: notifications come through `notify`) and a function giving a
        queue's irqfd."""
        self.kick_fds = kick_fds
        self.call_fd_for = call_fd_for

    # --- identity and configuration ----------------------------------------------------------------------------
    def device_features(self) -> int:
        return self.backend_features & SUPPORTED_FEATURES

    def config_bytes(self) -> bytes:
        return self._config

    def config_write(self, offset: int, size: int, value: int) -> None:
        if not self.protocol_features >> P.VHOST_USER_PROTOCOL_F_CONFIG & 1 or self.client is None:
            return super().config_write(offset, size, value)
        try:
            self.client.set_config(offset, value.to_bytes(size, "little"))
            self._config = self._read_config()
        except (VhostUserError, OSError) as e:
            self._lost(e)

    # --- rings -------------------------------------------------------------------------------------------------
    def activated(self) -> None:
        try:
            if self.client is None:
                self._connect()
            self._start_rings()
        except (VhostUserError, OSError, ConfigError) as e:
            self._lost(e)

    def _start_rings(self) -> None:
        c = self.client
        regions = self.memory_regions()
        features = self.driver_features | (self.backend_features & bits(P.VHOST_USER_F_PROTOCOL_FEATURES))
        c.set_features(features)
        c.set_mem_table(regions)
        for i, q in enumerate(self.queues):
            if q is None:
                continue
            st = q.state
            c.set_vring_num(i, st.size)
            c.set_vring_addr(i, _uaddr(regions, st.desc_addr, 16 * st.size),
                             _uaddr(regions, st.used_addr, 6 + 8 * st.size),
                             _uaddr(regions, st.avail_addr, 6 + 2 * st.size))
            c.set_vring_base(i, st.next_avail)
            c.set_vring_call(i, self._call_fd(i))
            c.set_vring_kick(i, self._kick_fd(i))
            if features >> P.VHOST_USER_F_PROTOCOL_FEATURES & 1:
                c.set_vring_enable(i, True)
            self._started.append(i)
        log.info("%s: %d rings started, features %#x", self.name, len(self._started), features)

    def _kick_fd(self, index: int) -> int:
        if self.kick_fds is not None:
            return self.kick_fds[index]
        while len(self._own_kicks) <= index:
            self._own_kicks.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        return self._own_kicks[index]

    def _call_fd(self, index: int) -> int:
        fd = self.call_fd_for(index)
        if fd is not None:
            return fd
        relay = self._relays.get(index)
        if relay is None:
            relay = self._relays[index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.iothread.add_reader(relay, lambda: self._relay(index, relay))
        return relay

    def _relay(self, index: int, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        self.interrupt(index)

    def notify(self, queue_index: int) -> None:
        """A notification that reached pyhv (no ioeventfd): pass it on through the kick eventfd."""
        if self.active and queue_index in self._started:
            os.eventfd_write(self._kick_fd(queue_index), 1)

    def deactivated(self) -> None:
        started, self._started = self._started, []
        if self.client is not None:
            try:
                for i in started:
                    self.client.get_vring_base(i)           # stops the ring; in-flight requests complete
            except (VhostUserError, OSError) as e:
                log.warning("%s: stopping the rings: %s", self.name, e)
                self._disconnect()
        for fd in self._relays.values():
            self.iothread.remove_reader(fd)
            self.iothread.call_soon(os.close, fd)
        self._relays = {}

    def _lost(self, error: Exception) -> None:
        log.warning("%s: vhost-user back end lost: %s", self.name, error)
        self._disconnect()
        self.needs_reset(f"vhost-user back end lost: {error}")

    def _disconnect(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def close(self) -> None:
        super().close()
        self._disconnect()
        for fd in self._own_kicks:
            os.close(fd)
        self._own_kicks = []


def _uaddr(regions: list[Region], gpa: int, length: int) -> int:
    for start, size, uaddr, _, _ in regions:
        if start <= gpa and gpa + length <= start + size:
            return uaddr + gpa - start
    raise VhostUserError(f"ring at {gpa:#x}+{length:#x} is not in shared guest memory")
