"""virtio-net (virtio 1.2 §5.1) with a tap back end.

Queues: 0 receive, 1 transmit (no control queue). The tap is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and a
12-byte vnet header (TUNSETVNETHDRSZ), which is exactly virtio 1's `struct virtio_net_hdr` (flags, gso_type,
hdr_len, gso_size, csum_start, csum_offset, num_buffers). So:

- transmit: a chain's device-readable buffers (header + frame) go to the tap in one `os.writev`, zero-copy; the
  kernel checks the header (a bad one is refused and the packet dropped);
- receive: one frame is read from the tap (header included), then copied into as many receive chains as it needs
  (VIRTIO_NET_F_MRG_RXBUF; num_buffers set in the header), or into one chain without mergeable buffers.

Checksum and segmentation offloads pass straight through in the header: the guest may send partially-checksummed
and TSO frames (CSUM, HOST_TSO4/6, HOST_ECN), and the tap is told with TUNSETOFFLOAD which ones the guest accepts
(GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN), so large segments cross in one piece each way. When the receive queue has
no buffers the tap is not read (the kernel queues or drops), until the driver kicks the receive queue.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct

from pyhv.runtime.tap import (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUNSETOFFLOAD, VNET_HDR_SIZE,
                              TapError, open_tap, parse_mac)
from pyhv.virtio.device import COMMON_FEATURES, VIRTIO_ID_NET, VirtioDevice, bits
from pyhv.virtio.queue import DescriptorChain, VirtQueue, VirtQueueError, scatter

log = logging.getLogger(__name__)

# §5.1.3 feature bits
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_S_LINK_UP = 1

VIRTIO_NET_HDR_SIZE = VNET_HDR_SIZE     # the tap's vnet header is virtio 1's struct virtio_net_hdr
RX_QUEUE, TX_QUEUE = 0, 1
RX_BATCH = 256
_DELIVERED, _DROPPED, _NO_ROOM = object(), object(), object()     # what _deliver did with a frame
MAX_FRAME = 65536 + VIRTIO_NET_HDR_SIZE + 14 + 4     # a 64 KiB GSO segment, its header, Ethernet and VLAN

OFFERED = COMMON_FEATURES | bits(
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS)


class VirtioNet(VirtioDevice):
    device_id = VIRTIO_ID_NET
    pollable = True
    queue_sizes = (256, 256)
    name = "virtio-net"

    @classmethod
    def create(cls, context, net) -> "VirtioNet":
        return cls(tap=net.tap, mac=net.mac, iothread=context.machine.iothread, name=context.name)

    def __init__(self, tap: str | None = None, mac: str | None = None, iothread=None, name: str | None = None,
                 tap_fd: int | None = None) -> None:
        """`tap` names the tap to open (created if missing); or `tap_fd` is an already open one (ownership
        passes to the device), as a management layer would hand over."""
        super().__init__(name or f"virtio-net({tap or tap_fd})")
        self.mac = parse_mac(mac) if mac else b"\x52\x54\x00" + os.urandom(3)
        self.iothread = iothread
        if tap_fd is not None:
            self.tap_fd, self.tap_name = tap_fd, f"fd{tap_fd}"
            os.set_blocking(tap_fd, False)
        elif tap:
            self.tap_fd, self.tap_name = open_tap(tap)
        else:
            raise TapError("virtio-net needs a tap (a name or an open file descriptor)")
        self._rxbuf = bytearray(MAX_FRAME)
        self._rx_held = 0          # length of a frame read from the tap that waits in _rxbuf for receive buffers
        self._rx_wait: int | None = None   # polled: receive waits for the avail index to move past this
        self._polling = False
        self.stats = {"rx_packets": 0, "rx_bytes": 0, "rx_dropped": 0, "tx_packets": 0, "tx_bytes": 0,
                      "tx_dropped": 0}

    def device_features(self) -> int:
        return OFFERED

    def config_bytes(self) -> bytes:
        # §5.1.4: mac, status, max_virtqueue_pairs
        return self.mac + struct.pack("<HH", VIRTIO_NET_S_LINK_UP, 1)

    def close(self) -> None:
        super().close()
        if self.tap_fd >= 0:
            os.close(self.tap_fd)
            self.tap_fd = -1

    # --- lifecycle -----------------------------------------------------------------------------------------
    def activated(self) -> None:
        offloads = 0
        if self.has_feature(VIRTIO_NET_F_GUEST_CSUM):
            offloads |= TUN_F_CSUM
            if self.has_feature(VIRTIO_NET_F_GUEST_TSO4):
                offloads |= TUN_F_TSO4
            if self.has_feature(VIRTIO_NET_F_GUEST_TSO6):
                offloads |= TUN_F_TSO6
            if self.has_feature(VIRTIO_NET_F_GUEST_ECN) and offloads & (TUN_F_TSO4 | TUN_F_TSO6):
                offloads |= TUN_F_TSO_ECN
        self._set_offload(offloads)
        self._poll_tap(True)

    def deactivated(self) -> None:
        self._poll_tap(False)
        self._rx_held = 0
        self._rx_wait = None
        self._set_offload(0)

    def _set_offload(self, flags: int) -> None:
        try:
            fcntl.ioctl(self.tap_fd, TUNSETOFFLOAD, flags)
        except OSError as e:
            log.warning("%s: cannot set tap offloads %#x: %s", self.name, flags, e.strerror)

    def _poll_tap(self, on: bool) -> None:
        if on != self._polling and self.iothread is not None:
            self._polling = on
            if on:
                self.iothread.add_reader(self.tap_fd, self._tap_readable)
            else:
                self.iothread.remove_reader(self.tap_fd)

    # --- queues --------------------------------------------------------------------------------------------
    def poll(self) -> bool:
        """Sidecore: transmit what the driver queued; for receive, look only when the tap side is waiting for
        buffers (frames themselves arrive through the tap's reader on the I/O thread)."""
        with self.lock:
            if not self.active or self.broken or len(self.queues) <= TX_QUEUE:
                return False
            work = False
            rx, tx = self.queues[RX_QUEUE], self.queues[TX_QUEUE]
            if tx is not None:
                tx.disable_notification()
                if tx.pending():
                    work = True
                    self._process_guarded(TX_QUEUE)
            if rx is not None and not self.broken:
                rx.disable_notification()
                if self._rx_wait is not None and rx.avail_idx() != self._rx_wait:
                    self._rx_wait = None
                    work = True
                    self._process_guarded(RX_QUEUE)
            return work

    def process(self, queue_index: int) -> None:
        if queue_index == TX_QUEUE:
            self.serve(self.queues[TX_QUEUE], self._transmit)
        elif queue_index == RX_QUEUE:
            self._poll_tap(True)
            self._receive()

    def _transmit(self, chain: DescriptorChain) -> int:
        if chain.readable_len < VIRTIO_NET_HDR_SIZE:
            self.warn_once("tx-short", "transmit chain of %d bytes, shorter than the header", chain.readable_len)
            self.stats["tx_dropped"] += 1
            return 0
        try:
            os.writev(self.tap_fd, chain.readable)
            self.stats["tx_packets"] += 1
            self.stats["tx_bytes"] += chain.readable_len - VIRTIO_NET_HDR_SIZE
        except OSError as e:
            self.stats["tx_dropped"] += 1
            if e.errno not in (errno.EAGAIN, errno.EIO):
                self.warn_once(f"tx-{e.errno}", "tap write failed: %s", e.strerror)
        return 0

    def _tap_readable(self) -> None:
        with self.lock:
            if not self.active or self.broken:
                self._poll_tap(False)
                return
            try:
                self._receive()
            except VirtQueueError as e:
                self.needs_reset(str(e))

    def _receive(self) -> None:
        q = self.queues[RX_QUEUE] if len(self.queues) > RX_QUEUE else None
        if q is None:
            self._poll_tap(False)
            return
        mergeable = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        delivered = False
        for _ in range(RX_BATCH):           # then let other work run; the tap stays readable
            if not self._rx_held:
                if not q.pending():
                    if self.polled:
                        self._rx_wait = q.state.next_avail  # the poller comes back when buffers are posted
                    elif q.enable_notification():
                        continue
                    self._poll_tap(False)      # no receive buffers: wait for the driver's kick (or the poller)
                    break
                try:
                    n = os.readv(self.tap_fd, [self._rxbuf])
                except BlockingIOError:
                    break
                except OSError as e:
                    self.warn_once(f"rx-{e.errno}", "tap read failed: %s", e.strerror)
                    break
                if n < VIRTIO_NET_HDR_SIZE:
                    continue
                self._rx_held = n
            while True:
                seen = q.avail_idx()
                outcome = self._deliver(q, self._rx_held, mergeable)
                # The frame needs more buffers than the driver has posted so far? Hold it, as QEMU and vhost-net
                # do, rather than drop it: Linux refills its ring only in batches, and a dropped TCP segment
                # makes the sender back off (seconds, then minutes) while the ring stays short. Retry at once
                # if buffers came meanwhile: the frame held may be the tap's last, so nothing else would.
                if outcome is not _NO_ROOM:
                    break
                if self.polled:
                    self._rx_wait = seen
                    break
                if not q.enable_notification(after=seen):
                    break
            if outcome is _NO_ROOM:
                self._poll_tap(False)
                break
            self._rx_held = 0
            delivered |= outcome is _DELIVERED
        if delivered:
            self.signal_used(q)

    def _deliver(self, q: VirtQueue, n: int, mergeable: bool) -> object:
        """Put the n-byte frame in _rxbuf into receive buffers: _DELIVERED, _DROPPED (no buffer can ever hold it)
        or _NO_ROOM (not yet: wait for more buffers)."""
        chains = []
        room = 0
        while room < n:
            chain = q.pop()
            if chain is None:
                break
            chains.append(chain)
            room += chain.writable_len
            if not mergeable:
                break
        if room < n:
            for _ in chains:
                q.undo_pop()
            if not chains or (mergeable and len(chains) < q.size):
                return _NO_ROOM
            # a buffer too small for the frame without VIRTIO_NET_F_MRG_RXBUF, or the whole ring too small
            self.stats["rx_dropped"] += 1
            self.warn_once("rx-small", "receive buffers of %d bytes for a %d-byte frame; frame dropped", room, n)
            return _DROPPED
        frame = memoryview(self._rxbuf)
        struct.pack_into("<H", self._rxbuf, 10, len(chains))       # num_buffers
        offset = 0
        for i, chain in enumerate(chains):
            k = scatter(chain.writable, frame[offset:n])
            q.fill(chain.head, k, i)
            offset += k
        q.flush(len(chains))
        self.stats["rx_packets"] += 1
        self.stats["rx_bytes"] += n - VIRTIO_NET_HDR_SIZE
        return _DELIVERED
