"""`VirtioDevice`: the transport-independent back end of a virtio device.

A transport (virtio-pci, virtio-mmio, or the vhost-user back-end server) drives a device through this contract,
and a device knows nothing of PCI, MMIO, KVM or vhost:

Class (or instance) attributes
    device_id      virtio 1.2 §5 device type: 1 net, 2 block, 3 console, 4 entropy
    queue_sizes    tuple: the maximum size of each queue (its length is the number of queues)
    name           for log lines

Called by the transport
    device_features() -> int           every offered feature bit, as a mask (VIRTIO_F_VERSION_1,
                                        VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC and the device's own)
    config_read(offset, size) -> int   device configuration space (little endian); outside it reads 0
    config_write(offset, size, value)  writable configuration fields (most devices ignore writes)
    activate(memory, queues, interrupt, driver_features)
                                        on DRIVER_OK: `memory` has view(gpa, length, write) raising
                                        GuestMemoryError; `queues` the VirtQueue objects (None for a queue the
                                        driver did not enable); `interrupt(queue_index)` asks the transport to
                                        signal used buffers of that queue (MSI-X vector, irqfd, INTx+ISR, or a
                                        vhost-user call eventfd); `driver_features` the negotiated mask
    notify(queue_index)                the driver kicked a queue (from the I/O thread)
    reset()                            back to the initial state; in-flight work is finished or dropped first
    quiesce()                          stop touching guest memory (finish in-flight I/O) but keep the state,
                                        e.g. before a vhost-user GET_VRING_BASE or a memory table change
    close()                            release host resources (files, taps, threads)

Set by the transport (hooks the device calls)
    on_needs_reset()                   the driver broke the rules: set DEVICE_NEEDS_RESET and notify a
                                        configuration change (the device has logged why, once)
    on_config_change()                 the configuration space changed (e.g. virtio-net link status)

Devices that need their own file descriptors watched (a tap, a completion eventfd) get the `IoThread` passed to
their constructor and register them in `activate`, unregister them in `reset`. All queue processing of a device
runs under its lock, so a kick on the I/O thread and a reset from a vCPU thread never interleave.

Two refinements for vhost-user:
- the vhost-user back-end server starts rings one at a time: it activates the device with `None` for every
  queue and then sets `device.queues[i]` (under `device.lock`) as each ring starts or stops;
- a device whose data plane is another process (`pyhv.vhost.frontend.VhostUserFrontend`) sets the class
  attribute `external_data_plane = True`; the transport then does not read its kick eventfds itself but calls
  `attach_notifiers(kick_fds or None, call_fd_for)` once, where `call_fd_for(queue_index)` returns the eventfd
  that interrupts the guest for that queue without Python (an MSI-X irqfd) or None.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, ClassVar, Sequence

from pyhv.virtio.queue import DescriptorChain, VirtQueue, VirtQueueError

log = logging.getLogger(__name__)

# virtio 1.2 §2.1 device status field
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 64
VIRTIO_CONFIG_S_FAILED = 128

# §6: reserved feature bits (bit numbers)
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35

# §5 device types
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4


def bits(*numbers: int) -> int:
    """Feature bit numbers -> mask."""
    mask = 0
    for n in numbers:
        mask |= 1 << n
    return mask


COMMON_FEATURES = bits(VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC)

MemoryLike = object       # anything with view(gpa, length, write=False) -> memoryview
Interrupt = Callable[[int], None]
# a board's KVM ioeventfd call for a transport: (fd, guest address, length, datamatch or None, deassign)
IoEventFdSink = Callable[[int, int, int, "int | None", bool], None]


class VirtioDevice:
    device_id: ClassVar[int] = 0
    queue_sizes: tuple[int, ...] = ()
    name: str = "virtio"
    pollable: ClassVar[bool] = False       # --sidecore may poll it (its `poll` serves every queue it has)

    HANDLES_DMA_FAULTS = False      # True: execute() sees chains with a buffer the IOMMU refused (`chain.fault`)

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name
        self.on_needs_reset: Callable[[], None] = lambda: None
        self.on_config_change: Callable[[], None] = lambda: None
        self.lock = threading.RLock()
        self.memory: MemoryLike | None = None
        self.queues: list[VirtQueue | None] = []
        self.interrupt: Interrupt = lambda index: None
        self.driver_features = 0
        self.active = False
        self.broken = False
        self.polled = False                         # sidecore: a QueuePoller serves the queues (virtio/poller.py)
        self.notifications: list[int] = []          # per queue: the driver's notifications (kicks, exits)
        self._warned: set[str] = set()

    # --- identity and configuration ----------------------------------------------------------------------
    def device_features(self) -> int:
        return COMMON_FEATURES

    def config_bytes(self) -> bytes:
        """The configuration space as bytes; devices override this (or config_read)."""
        return b""

    def config_read(self, offset: int, size: int) -> int:
        data = self.config_bytes()
        if offset < 0 or size <= 0 or offset + size > len(data):
            return 0
        return int.from_bytes(data[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.warn_once("config-write", "driver wrote %d bytes at configuration offset %#x, which is read-only",
                       size, offset)

    def has_feature(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1)

    # --- lifecycle -----------------------------------------------------------------------------------------
    def activate(self, memory: MemoryLike, queues: Sequence[VirtQueue | None], interrupt: Interrupt,
                 driver_features: int) -> None:
        with self.lock:
            self.memory = memory
            self.queues = list(queues)
            self.interrupt = interrupt
            self.driver_features = driver_features
            self.broken = False
            self.notifications = [0] * len(self.queues)
            for queue in self.queues:
                if queue is not None:
                    queue.faults_to_device = self.HANDLES_DMA_FAULTS
            if self.polled:                 # before the driver, told DRIVER_OK, posts its first buffers
                for queue in self.queues:
                    if queue is not None:
                        queue.disable_notification()
            self.active = True
            self.activated()

    def activated(self) -> None:
        """Hook: the device was activated (register host fds, start threads)."""

    def notify(self, queue_index: int) -> None:
        with self.lock:
            if not self.active or self.broken:
                return
            if not 0 <= queue_index < len(self.queues) or self.queues[queue_index] is None:
                self.warn_once("bad-notify", "driver notified queue %d, which is not set up", queue_index)
                return
            self.notifications[queue_index] += 1
            self._process_guarded(queue_index)

    def poll(self) -> bool:
        """Sidecore (the poller's thread): keep the driver's notifications off and serve every queue that has new
        buffers. True if there was work. Devices whose queues are not all request queues override this."""
        with self.lock:
            if not self.active or self.broken:
                return False
            work = False
            for index, queue in enumerate(self.queues):
                if queue is None:
                    continue
                queue.disable_notification()
                if queue.pending():
                    work = True
                    if not self._process_guarded(index):
                        break
            return work

    def _process_guarded(self, queue_index: int) -> bool:
        """process() with a broken ring turned into DEVICE_NEEDS_RESET; False then."""
        try:
            self.process(queue_index)
            return True
        except VirtQueueError as e:
            self.needs_reset(str(e))
            return False

    def process(self, queue_index: int) -> None:
        """Handle the available buffers of a queue (under the device lock). Raise VirtQueueError for a broken
        ring; the base class turns it into DEVICE_NEEDS_RESET."""

    def quiesce(self) -> None:
        """Finish in-flight requests; afterwards the device does not touch guest memory until notified again."""

    def reset(self) -> None:
        with self.lock:
            self.quiesce()
            if self.active:
                self.deactivated()
            self.active = False
            self.broken = False
            self.memory = None
            self.queues = []
            self.interrupt = lambda index: None
            self.driver_features = 0

    def deactivated(self) -> None:
        """Hook: the device is being reset (unregister host fds)."""

    def close(self) -> None:
        self.reset()

    # --- errors ----------------------------------------------------------------------------------------------
    def needs_reset(self, reason: str) -> None:
        """The driver broke the rules: stop using the queues and ask the transport for DEVICE_NEEDS_RESET."""
        self.broken = True
        self.warn_once("needs-reset", "device needs reset: %s", reason)
        self.on_needs_reset()

    def warn_once(self, key: str, message: str, *args: object) -> None:
        """Log a guest's misbehaviour once per device and kind."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: " + message, self.name, *args)

    def signal_used(self, queue: VirtQueue) -> None:
        if queue.should_notify():
            self.interrupt(queue.index)

    def serve(self, queue: VirtQueue, handle: Callable[[DescriptorChain], int]) -> None:
        """The usual request loop: pop every available chain, `handle(chain) -> bytes written`, push it, signal
        once per batch, and re-enable notifications without missing a chain added meanwhile."""
        while True:
            queue.disable_notification()
            while (chain := queue.pop()) is not None:
                queue.push(chain, handle(chain))
            self.signal_used(queue)
            if self.polled or not queue.enable_notification():     # polled: the poller looks again anyway
                return
