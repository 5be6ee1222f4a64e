"""virtio over MMIO (virtio 1.2 §4.2.2), version 2 ("modern") register layout only: a 0x200-byte register window
(control registers at 0x000-0x0FF, the device configuration space from 0x100) in front of a `VirtioDevice` back
end, the same back ends virtio-pci drives.

A board places each device in its own 4 KiB slot, gives it a level-triggered interrupt line and tells Linux where
it is on the kernel command line (no discovery on MMIO):

    dev = VirtioMmioDevice("virtio-rng0", VirtioRng(), machine.guest_memory, machine.iothread,
                           base=0xD0000000, irq=machine.irq_line(5))
    board.attach(dev)                                  # dev.claims(): [Claim.mmio(base, dev.region)]
    dev.register_ioeventfds(board.ioeventfd)           # QueueNotify completes in KVM, wakes the I/O thread
    cmdline += " " + VirtioMmioDevice.cmdline_entry(0xD0000000, 5)   # virtio_mmio.device=4K@0xd0000000:5

Notifications: QueueNotify (0x50) is one address for every queue; the driver writes the queue index. With
ioeventfds registered there is one KVM ioeventfd per queue on (base + 0x50, 4 bytes, datamatch = queue index),
each read by the I/O thread, which runs the back end: no exit to Python. Without them the write exits and the
back end runs on the vCPU thread.

Interrupts: InterruptStatus bit 0 (used buffers) and bit 1 (configuration change). The level-triggered line is
high while InterruptStatus is not zero; the driver's InterruptACK clears the bits it writes and the line drops
when none is left. With `irqfd` (a KVM irqfd registered with KVM_IRQFD_FLAG_RESAMPLE for the line's GSI) and its
`resamplefd`, raising the line is an eventfd write (no ioctl), KVM lowers it at the guest's EOI and signals the
resample eventfd, and the I/O thread raises it again if InterruptStatus is still not zero (`irqfd` alone, without
resampling, is an edge per write). An ACK that leaves bits set makes a new edge, so a pin the guest programmed
edge-triggered (the MP table's ISA default) loses nothing either.

Guest mistakes (an access that is not 32-bit and aligned to a control register, a write to a read-only register,
a queue register for a queue that does not exist, a queue size above the maximum or not a power of 2, queue
changes while the queue is live) are logged once per kind and ignored.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyhv import trace
from pyhv.devices.device import Claim
from pyhv.devices.irq import IrqLine, NullIrqLine
from pyhv.devices.registers import Register, RegisterBank
from pyhv.memory import MemoryRegion
from pyhv.virtio.device import (
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, IoEventFdSink, VirtioDevice,
)
from pyhv.state_codec import StateError, decode, encode
from pyhv.virtio.queue import VirtQueue, VirtQueueError

if TYPE_CHECKING:
    from pyhv.runtime.iothread import IoThread

log = logging.getLogger(__name__)

VIRTIO_MMIO_MAGIC_VALUE = 0x74726976          # "virt"
VIRTIO_MMIO_VERSION = 2                       # modern; version 1 (legacy) is not offered
VIRTIO_MMIO_VENDOR_ID_QEMU = 0x554D4551       # "QEMU": what QEMU reports; Linux does not look at it
VIRTIO_MMIO_SIZE = 0x200                      # the register window
VIRTIO_MMIO_SLOT_SIZE = 0x1000                # what a board reserves per device (and tells Linux)

# §4.2.2 table 4.1: register offsets
VIRTIO_MMIO_MAGIC = 0x000
VIRTIO_MMIO_VERSION_REG = 0x004
VIRTIO_MMIO_DEVICE_ID = 0x008
VIRTIO_MMIO_VENDOR_ID = 0x00C
VIRTIO_MMIO_DEVICE_FEATURES = 0x010
VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014
VIRTIO_MMIO_DRIVER_FEATURES = 0x020
VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024
VIRTIO_MMIO_QUEUE_SEL = 0x030
VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034
VIRTIO_MMIO_QUEUE_NUM = 0x038
VIRTIO_MMIO_QUEUE_READY = 0x044
VIRTIO_MMIO_QUEUE_NOTIFY = 0x050
VIRTIO_MMIO_INTERRUPT_STATUS = 0x060
VIRTIO_MMIO_INTERRUPT_ACK = 0x064
VIRTIO_MMIO_STATUS = 0x070
VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080
VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084
VIRTIO_MMIO_QUEUE_DRIVER_LOW = 0x090
VIRTIO_MMIO_QUEUE_DRIVER_HIGH = 0x094
VIRTIO_MMIO_QUEUE_DEVICE_LOW = 0x0A0
VIRTIO_MMIO_QUEUE_DEVICE_HIGH = 0x0A4
VIRTIO_MMIO_SHM_SEL = 0x0AC
VIRTIO_MMIO_SHM_LEN_LOW = 0x0B0
VIRTIO_MMIO_SHM_LEN_HIGH = 0x0B4
VIRTIO_MMIO_SHM_BASE_LOW = 0x0B8
VIRTIO_MMIO_SHM_BASE_HIGH = 0x0BC
VIRTIO_MMIO_QUEUE_RESET = 0x0C0
VIRTIO_MMIO_CONFIG_GENERATION = 0x0FC
VIRTIO_MMIO_CONFIG = 0x100

# InterruptStatus bits
VIRTIO_MMIO_INT_VRING = 0x1
VIRTIO_MMIO_INT_CONFIG = 0x2

SHM_ABSENT = 0xFFFFFFFF                       # SHMLen/SHMBase of a region that does not exist read as -1


def cmdline_entry(base: int, gsi: int, size: int = VIRTIO_MMIO_SLOT_SIZE) -> str:
    """The Linux command-line parameter announcing a virtio-mmio device: `virtio_mmio.device=4K@0xd0000000:5`
    (size as `memparse` reads it, base, interrupt)."""
    if size % (1 << 20) == 0:
        text = f"{size >> 20}M"
    elif size % 1024 == 0:
        text = f"{size >> 10}K"
    else:
        text = str(size)
    return f"virtio_mmio.device={text}@{base:#x}:{gsi}"


@dataclass
class VirtioMmioQueue:
    num: int                   # QueueNum: the size the driver will use
    max_size: int              # QueueNumMax
    ready: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0


@dataclass
class VirtioMmioState:
    """Every guest-visible register of the transport, and counters."""
    device_features_sel: int = 0
    driver_features_sel: int = 0
    driver_features: int = 0
    queue_sel: int = 0
    interrupt_status: int = 0
    status: int = 0
    config_generation: int = 0
    shm_sel: int = 0
    queues: list[VirtioMmioQueue] = field(default_factory=list)
    notifies: list[int] = field(default_factory=list)   # per queue, notifications that reached Python
    interrupts: int = 0                                 # times the line was raised (or the irqfd written)


class VirtioMmioDevice:
    REGISTERS = (
        Register(VIRTIO_MMIO_MAGIC, "magic_value", width=4, read="_read_magic", write="_write_ignored"),
        Register(VIRTIO_MMIO_VERSION_REG, "version", width=4, read="_read_version", write="_write_ignored"),
        Register(VIRTIO_MMIO_DEVICE_ID, "device_id", width=4, read="_read_device_id", write="_write_ignored"),
        Register(VIRTIO_MMIO_VENDOR_ID, "vendor_id", width=4, read="_read_vendor_id", write="_write_ignored"),
        Register(VIRTIO_MMIO_DEVICE_FEATURES, "device_features", width=4, read="_read_device_features",
                 write="_write_ignored"),
        Register(VIRTIO_MMIO_DEVICE_FEATURES_SEL, "device_features_sel", width=4),
        Register(VIRTIO_MMIO_DRIVER_FEATURES, "driver_features", width=4, read="_read_driver_features",
                 write="_write_driver_features"),
        Register(VIRTIO_MMIO_DRIVER_FEATURES_SEL, "driver_features_sel", width=4),
        Register(VIRTIO_MMIO_QUEUE_SEL, "queue_sel", width=4),
        Register(VIRTIO_MMIO_QUEUE_NUM_MAX, "queue_num_max", width=4, read="_read_q_num_max",
                 write="_write_ignored"),
        Register(VIRTIO_MMIO_QUEUE_NUM, "queue_num", width=4, read="_read_q_num", write="_write_q_num"),
        Register(VIRTIO_MMIO_QUEUE_READY, "queue_ready", width=4, read="_read_q_ready", write="_write_q_ready"),
        Register(VIRTIO_MMIO_QUEUE_NOTIFY, "queue_notify", width=4, read="_read_zero", write="_write_notify"),
        Register(VIRTIO_MMIO_INTERRUPT_STATUS, "interrupt_status", width=4, read="_read_interrupt_status",
                 write="_write_ignored"),
        Register(VIRTIO_MMIO_INTERRUPT_ACK, "interrupt_ack", width=4, read="_read_zero", write="_write_ack"),
        Register(VIRTIO_MMIO_STATUS, "status", width=4, read="_read_status", write="_write_status"),
        Register(VIRTIO_MMIO_QUEUE_DESC_LOW, "queue_desc_low", width=4, read="_read_q_desc_lo",
                 write="_write_q_desc_lo"),
        Register(VIRTIO_MMIO_QUEUE_DESC_HIGH, "queue_desc_high", width=4, read="_read_q_desc_hi",
                 write="_write_q_desc_hi"),
        Register(VIRTIO_MMIO_QUEUE_DRIVER_LOW, "queue_driver_low", width=4, read="_read_q_driver_lo",
                 write="_write_q_driver_lo"),
        Register(VIRTIO_MMIO_QUEUE_DRIVER_HIGH, "queue_driver_high", width=4, read="_read_q_driver_hi",
                 write="_write_q_driver_hi"),
        Register(VIRTIO_MMIO_QUEUE_DEVICE_LOW, "queue_device_low", width=4, read="_read_q_device_lo",
                 write="_write_q_device_lo"),
        Register(VIRTIO_MMIO_QUEUE_DEVICE_HIGH, "queue_device_high", width=4, read="_read_q_device_hi",
                 write="_write_q_device_hi"),
        Register(VIRTIO_MMIO_SHM_SEL, "shm_sel", width=4),
        Register(VIRTIO_MMIO_SHM_LEN_LOW, "shm_len_low", width=4, read="_read_shm", write="_write_ignored"),
        Register(VIRTIO_MMIO_SHM_LEN_HIGH, "shm_len_high", width=4, read="_read_shm", write="_write_ignored"),
        Register(VIRTIO_MMIO_SHM_BASE_LOW, "shm_base_low", width=4, read="_read_shm", write="_write_ignored"),
        Register(VIRTIO_MMIO_SHM_BASE_HIGH, "shm_base_high", width=4, read="_read_shm", write="_write_ignored"),
        Register(VIRTIO_MMIO_QUEUE_RESET, "queue_reset", width=4, read="_read_zero", write="_write_ignored"),
        Register(VIRTIO_MMIO_CONFIG_GENERATION, "config_generation", width=4, read="_read_config_generation",
                 write="_write_ignored"),
    )
    READ_ONLY = frozenset({VIRTIO_MMIO_MAGIC, VIRTIO_MMIO_VERSION_REG, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_VENDOR_ID,
                           VIRTIO_MMIO_DEVICE_FEATURES, VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_INTERRUPT_STATUS,
                           VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_SHM_LEN_HIGH, VIRTIO_MMIO_SHM_BASE_LOW,
                           VIRTIO_MMIO_SHM_BASE_HIGH, VIRTIO_MMIO_CONFIG_GENERATION})

    SIZE = VIRTIO_MMIO_SIZE
    SLOT_SIZE = VIRTIO_MMIO_SLOT_SIZE
    cmdline_entry = staticmethod(cmdline_entry)

    def __init__(self, name: str, backend: VirtioDevice, memory: Any, iothread: "IoThread | None" = None,
                 base: int = 0, irq: IrqLine | None = None, irqfd: int | None = None,
                 resamplefd: int | None = None, vendor_id: int = VIRTIO_MMIO_VENDOR_ID_QEMU) -> None:
        """`memory`: guest memory for the back end (`GuestMemory`); `iothread`: runs ioeventfd kicks and the
        irqfd resample (None: no ioeventfds, no irqfd); `base`: the guest-physical address `claims()` maps the
        window at; `irq`: the level-triggered line (used unless `irqfd` is given); `irqfd`/`resamplefd`: an
        eventfd pair registered with KVM_IRQFD + KVM_IRQFD_FLAG_RESAMPLE on the line's GSI (level), or `irqfd`
        alone registered without resampling (each write is an edge: for a pin programmed edge-triggered)."""
        self.name = name
        self.backend = backend
        self.memory = memory
        self.iothread = iothread
        self.base = base
        self.irq = irq or NullIrqLine()
        self.vendor_id = vendor_id
        self.tlock = threading.RLock()          # register accesses (vCPU threads); taken before backend.lock
        self._irq_lock = threading.Lock()       # interrupt_status, status bits set by the back end: innermost
        self._warned: set[str] = set()
        nq = len(backend.queue_sizes)
        self.state = VirtioMmioState(queues=[VirtioMmioQueue(s, s) for s in backend.queue_sizes],
                                     notifies=[0] * nq)
        backend.on_needs_reset = self._needs_reset
        backend.on_config_change = self.config_changed
        self.bank = RegisterBank(self, self.REGISTERS, self.state, name=name)
        self.region = MemoryRegion.io(name, VIRTIO_MMIO_SIZE, self.read, self.write, owner=name)
        self.region.describe = self._describe_offset

        # interrupts: the line, or a resampling irqfd
        if resamplefd is not None and irqfd is None:
            raise ValueError(f"{name}: a resamplefd without an irqfd")
        if resamplefd is not None and iothread is None:
            raise ValueError(f"{name}: a resampling irqfd needs the I/O thread")
        self.irqfd = irqfd
        self.resamplefd = resamplefd
        if resamplefd is not None:
            iothread.add_reader(resamplefd, self._resample)

        # notifications: one eventfd per queue, registered as ioeventfds by `register_ioeventfds`
        self._kick_fds: list[int] = []
        self._ioeventfd_sink: IoEventFdSink | None = None
        self._registered_at: int | None = None
        self.external = bool(getattr(backend, "external_data_plane", False))
        if iothread is not None:
            for q in range(nq):
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._kick_fds.append(fd)
                if not self.external:
                    iothread.add_reader(fd, lambda fd=fd, q=q: self._kicked(fd, q))
        if self.external:
            # no per-queue irqfd on MMIO: InterruptStatus must be set for the driver, so completions come
            # through `interrupt`
            backend.attach_notifiers(self._kick_fds or None, lambda q: None)

    # --- the device contract ------------------------------------------------------------------------------------
    def claims(self) -> list[Claim]:
        return [Claim.mmio(self.base, self.region)]

    def reset(self) -> None:
        """Machine reset: the transport and the back end back to their initial state, the line low."""
        self.reset_transport()

    def close(self) -> None:
        self.backend.close()
        self.unregister_ioeventfds()
        fds, self._kick_fds = list(self._kick_fds), []
        if self.iothread is None:
            for fd in fds:
                os.close(fd)
            return
        for fd in ([] if self.external else fds) + ([self.resamplefd] if self.resamplefd is not None else []):
            self.iothread.remove_reader(fd)
        if self.iothread._thread is None:           # stopped: nothing selects on them any more
            for fd in fds:
                os.close(fd)
        else:                                       # closed after the I/O thread has dropped them
            self.iothread.call_soon(lambda: [os.close(fd) for fd in fds])

    def describe(self) -> dict:
        return {"name": self.name, "base": self.base, "size": VIRTIO_MMIO_SIZE,
                "virtio": {"device_id": self.backend.device_id, "status": self.state.status,
                           "interrupt_status": self.state.interrupt_status,
                           "ioeventfd": self._registered_at is not None, "irqfd": self.irqfd is not None,
                           "notifies_in_python": list(self.state.notifies)}}

    # --- board wiring -------------------------------------------------------------------------------------------
    def notify_address(self, base: int | None = None, queue_index: int = 0) -> tuple[int, int, int]:
        """(gpa, length, datamatch) of queue `queue_index`'s notification: QueueNotify, 4 bytes, the index."""
        return ((self.base if base is None else base) + VIRTIO_MMIO_QUEUE_NOTIFY, 4, queue_index)

    def notify_addresses(self, base: int | None = None) -> list[tuple[int, int, int]]:
        return [self.notify_address(base, q) for q in range(len(self.state.queues))]

    def register_ioeventfds(self, sink: IoEventFdSink, base: int | None = None) -> bool:
        """Make QueueNotify writes complete in KVM: one ioeventfd per queue at (base + 0x50, 4, datamatch =
        index), each given to `sink(fd, addr, length, datamatch, deassign)` (the board's KVM ioeventfd call).
        Moves them when called again with another base. False when there is nothing to register (the device was
        built without an I/O thread)."""
        if not self._kick_fds:
            return False
        base = self.base if base is None else base
        if self._registered_at == base and self._ioeventfd_sink is not None:
            return True
        self.unregister_ioeventfds()
        for q, fd in enumerate(self._kick_fds):
            addr, length, datamatch = self.notify_address(base, q)
            sink(fd, addr, length, datamatch, False)
        self._ioeventfd_sink, self._registered_at = sink, base
        return True

    def unregister_ioeventfds(self) -> None:
        sink, at = self._ioeventfd_sink, self._registered_at
        if sink is None or at is None:
            return
        for q, fd in enumerate(self._kick_fds):
            addr, length, datamatch = self.notify_address(at, q)
            try:
                sink(fd, addr, length, datamatch, True)
            except OSError as e:
                log.warning("%s: cannot remove the ioeventfd of queue %d: %s", self.name, q, e)
        self._ioeventfd_sink = self._registered_at = None

    @property
    def interrupt_eventfd(self) -> int | None:
        """The irqfd the line is raised through (None: the IrqLine)."""
        return self.irqfd

    # --- region callbacks ---------------------------------------------------------------------------------------
    def _describe_offset(self, offset: int) -> str:
        if offset >= VIRTIO_MMIO_CONFIG:
            return f"{self.name}.config+{offset - VIRTIO_MMIO_CONFIG:#x}"
        return self.bank.register_name(offset)

    def read(self, offset: int, size: int) -> int:
        try:
            if offset >= VIRTIO_MMIO_CONFIG:
                return self.backend.config_read(offset - VIRTIO_MMIO_CONFIG, size)
            if size != 4 or offset % 4:
                self.warn_once("odd-read", "%d-byte read at %#x: control registers are 32-bit and aligned",
                               size, offset)
                return 0
            with self.tlock:
                return self.bank.read(offset, size)
        except Exception:                       # never into the vCPU loop
            self._bug("read", offset)
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        try:
            if offset >= VIRTIO_MMIO_CONFIG:
                self.backend.config_write(offset - VIRTIO_MMIO_CONFIG, size, value)
                return
            if size != 4 or offset % 4:
                self.warn_once("odd-write", "%d-byte write at %#x: control registers are 32-bit and aligned",
                               size, offset)
                return
            if offset in self.READ_ONLY:
                self.warn_once(f"ro-{offset:#x}", "write %#x to read-only register %s", value,
                               self.bank.register_name(offset))
                return
            if offset == VIRTIO_MMIO_QUEUE_NOTIFY:     # not under tlock: the back end runs here
                self._write_notify(value)
                return
            with self.tlock:
                self.bank.write(offset, size, value & 0xFFFFFFFF)
        except Exception:
            self._bug("write", offset)

    def _bug(self, what: str, offset: int) -> None:
        key = f"bug-{what}-{offset:#x}"
        if key not in self._warned:
            self._warned.add(key)
            log.exception("%s: %s at %#x failed (ignored; logged once)", self.name, what, offset)

    def warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: " + message, self.name, *args)

    # --- registers ----------------------------------------------------------------------------------------------
    def _write_ignored(self, value: int) -> None:
        pass

    def _read_zero(self) -> int:
        return 0

    def _read_magic(self) -> int:
        return VIRTIO_MMIO_MAGIC_VALUE

    def _read_version(self) -> int:
        return VIRTIO_MMIO_VERSION

    def _read_device_id(self) -> int:
        return self.backend.device_id

    def _read_vendor_id(self) -> int:
        return self.vendor_id

    def _read_device_features(self) -> int:
        sel = self.state.device_features_sel
        return (self.backend.device_features() >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0

    def _read_driver_features(self) -> int:
        sel = self.state.driver_features_sel
        return (self.state.driver_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0

    def _write_driver_features(self, value: int) -> None:
        st = self.state
        if st.status & VIRTIO_CONFIG_S_FEATURES_OK:
            self.warn_once("features-late", "driver features written after FEATURES_OK (ignored)")
            return
        if st.driver_features_sel >= 2:
            if value:
                self.warn_once("features-sel", "driver features %#x for bank %d, which offers none (ignored)",
                               value, st.driver_features_sel)
            return
        shift = 32 * st.driver_features_sel
        st.driver_features = (st.driver_features & ~(0xFFFFFFFF << shift)) | ((value & 0xFFFFFFFF) << shift)

    def _read_shm(self) -> int:
        return SHM_ABSENT                  # no shared memory regions: every SHMSel reads as absent

    def _read_config_generation(self) -> int:
        return self.state.config_generation & 0xFFFFFFFF

    def _read_interrupt_status(self) -> int:
        return self.state.interrupt_status

    def _read_status(self) -> int:
        return self.state.status

    def _write_status(self, value: int) -> None:
        st = self.state
        value &= 0xFF
        if value == 0:
            self.reset_transport()
            return
        old = st.status
        if value & VIRTIO_CONFIG_S_FEATURES_OK and not old & VIRTIO_CONFIG_S_FEATURES_OK:
            offered = self.backend.device_features()
            if st.driver_features & ~offered or not st.driver_features >> VIRTIO_F_VERSION_1 & 1:
                self.warn_once("features", "driver features %#x refused (offered %#x, VERSION_1 required)",
                               st.driver_features, offered)
                value &= ~VIRTIO_CONFIG_S_FEATURES_OK      # the driver reads it back and gives up
        activate = value & VIRTIO_CONFIG_S_DRIVER_OK and not old & VIRTIO_CONFIG_S_DRIVER_OK
        if activate and not value & VIRTIO_CONFIG_S_FEATURES_OK:
            self.warn_once("driver-ok", "DRIVER_OK without FEATURES_OK: the device stays inactive")
            activate = False
        with self._irq_lock:
            st.status = value | (st.status & VIRTIO_CONFIG_S_NEEDS_RESET)
        if activate:
            self._activate()

    def _activate(self) -> None:
        st = self.state
        queues: list[VirtQueue | None] = []
        try:
            for i, q in enumerate(st.queues):
                queues.append(VirtQueue(i, q.num, self.memory, q.desc, q.driver, q.device,
                                        event_idx=bool(st.driver_features >> VIRTIO_F_EVENT_IDX & 1),
                                        indirect=bool(st.driver_features >> VIRTIO_F_INDIRECT_DESC & 1))
                              if q.ready else None)
        except VirtQueueError as e:
            self.backend.warn_once("activate", "cannot activate: %s", e)
            self._needs_reset()
            return
        self.backend.activate(self.memory, queues, self.interrupt, st.driver_features)

    # --- snapshots and migration (pyhv/machine/snapshot.py) ----------------------------------------------------
    @property
    def SNAPSHOT(self) -> bool:  # noqa: N802  (the devices' opt-in flag; here it is the back end's)
        return bool(getattr(self.backend, "SNAPSHOT", False))

    def snapshot_state(self) -> dict:
        """The registers and each live queue's position, taken with the back end's lock (no request half done)."""
        with self.tlock, self.backend.lock:
            queues = [encode(q.state) if q is not None else None for q in self.backend.queues] \
                if self.backend.active else []
            identity = getattr(self.backend, "snapshot_identity", None)
            return {"transport": encode(self.state), "queues": queues, "broken": self.backend.broken,
                    "backend": identity() if identity else None}

    def restore_state(self, data: dict) -> None:
        """Into a transport that has not run: registers, then (if the driver had started it) the queues where they
        were; then the requests the driver had posted that the source had not taken yet."""
        check = getattr(self.backend, "check_identity", None)
        problem = check(data["backend"]) if check and data.get("backend") else None
        if problem:
            raise StateError(problem)
        with self.tlock:
            decode(data["transport"], self.state)
            if self.state.status & VIRTIO_CONFIG_S_DRIVER_OK:
                self._activate()
                with self.backend.lock:
                    for queue, saved in zip(self.backend.queues, data["queues"]):
                        if queue is not None and saved is not None:
                            decode(saved, queue.state)
                    self.backend.broken = bool(data.get("broken"))
            with self._irq_lock:
                self._update_line()
        for index, queue in enumerate(list(self.backend.queues)):
            if queue is not None and queue.pending():
                self.backend.notify(index)

    def reset_transport(self) -> None:
        with self.tlock:
            self.backend.reset()
            st = self.state
            st.driver_features = 0
            st.device_features_sel = st.driver_features_sel = st.queue_sel = st.shm_sel = 0
            for q in st.queues:
                q.num, q.ready, q.desc, q.driver, q.device = q.max_size, 0, 0, 0, 0
            with self._irq_lock:
                st.status = 0
                st.interrupt_status = 0
                self._update_line()

    # queue registers
    def _queue(self, write: bool = False) -> VirtioMmioQueue | None:
        sel = self.state.queue_sel
        if sel < len(self.state.queues):
            return self.state.queues[sel]
        if write:
            self.warn_once("queue-sel", "queue register written for queue %d; the device has %d", sel,
                           len(self.state.queues))
        return None

    def _live(self, q: VirtioMmioQueue, what: str) -> bool:
        """Whether the queue may no longer be changed (ready, or the device running): log once."""
        if q.ready or self.state.status & VIRTIO_CONFIG_S_DRIVER_OK:
            self.warn_once(f"live-{what}", "%s of queue %d changed while the queue is live (ignored)", what,
                           self.state.queue_sel)
            return True
        return False

    def _read_q_num_max(self) -> int:
        q = self._queue()
        return q.max_size if q is not None else 0        # 0: no such queue (Linux stops looking there)

    def _read_q_num(self) -> int:
        q = self._queue()
        return q.num if q is not None else 0

    def _write_q_num(self, value: int) -> None:
        q = self._queue(write=True)
        if q is None or self._live(q, "size"):
            return
        if not 0 < value <= q.max_size or value & (value - 1):
            self.warn_once("queue-num", "queue %d size %d is not a power of 2 up to %d (ignored)",
                           self.state.queue_sel, value, q.max_size)
            return
        q.num = value

    def _read_q_ready(self) -> int:
        q = self._queue()
        return q.ready if q is not None else 0

    def _write_q_ready(self, value: int) -> None:
        q = self._queue(write=True)
        if q is None:
            return
        if self.state.status & VIRTIO_CONFIG_S_DRIVER_OK:
            if (value & 1) != q.ready:
                self.warn_once("live-ready", "QueueReady of queue %d changed while the device runs (ignored)",
                               self.state.queue_sel)
            return
        q.ready = value & 1

    def _half(name: str, high: bool):  # noqa: N805  (builds accessors below)
        shift = 32 if high else 0

        def read(self) -> int:
            q = self._queue()
            return (getattr(q, name) >> shift) & 0xFFFFFFFF if q is not None else 0

        def write(self, value: int) -> None:
            q = self._queue(write=True)
            if q is None or self._live(q, name):
                return
            old = getattr(q, name)
            setattr(q, name, (old & ~(0xFFFFFFFF << shift)) | ((value & 0xFFFFFFFF) << shift))
        return read, write

    _read_q_desc_lo, _write_q_desc_lo = _half("desc", False)
    _read_q_desc_hi, _write_q_desc_hi = _half("desc", True)
    _read_q_driver_lo, _write_q_driver_lo = _half("driver", False)
    _read_q_driver_hi, _write_q_driver_hi = _half("driver", True)
    _read_q_device_lo, _write_q_device_lo = _half("device", False)
    _read_q_device_hi, _write_q_device_hi = _half("device", True)
    del _half

    # --- notifications ------------------------------------------------------------------------------------------
    def _write_notify(self, value: int) -> None:
        """A notification that exited (no ioeventfd): run the back end here, on the vCPU thread."""
        q = value & 0xFFFF                 # VIRTIO_F_NOTIFICATION_DATA is not offered: the value is the index
        if q >= len(self.state.queues):
            self.warn_once("notify", "notification for queue %d; the device has %d", q, len(self.state.queues))
            return
        self.state.notifies[q] += 1
        trace.event(f"{self.name}.queue_notify", "queue %d notified through an exit", q)
        self.backend.notify(q)

    def _kicked(self, fd: int, q: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        self.backend.notify(q)

    # --- interrupts ---------------------------------------------------------------------------------------------
    def interrupt(self, queue_index: int) -> None:
        """The back end used buffers of a queue: InterruptStatus bit 0 and the line."""
        with self._irq_lock:
            self._raise(VIRTIO_MMIO_INT_VRING)

    def config_changed(self) -> None:
        """The configuration changed: a new ConfigGeneration, and (once the driver is running: before that it
        may have no handler for a level interrupt that would stay high) InterruptStatus bit 1."""
        with self._irq_lock:
            self.state.config_generation += 1
            if self.state.status & VIRTIO_CONFIG_S_DRIVER_OK:
                self._raise(VIRTIO_MMIO_INT_CONFIG)

    def _needs_reset(self) -> None:
        with self._irq_lock:
            self.state.status |= VIRTIO_CONFIG_S_NEEDS_RESET
        self.config_changed()

    def _write_ack(self, value: int) -> None:
        with self._irq_lock:
            st = self.state
            old = st.interrupt_status
            st.interrupt_status &= ~value & 0xFFFFFFFF
            if st.interrupt_status and st.interrupt_status != old:
                # bits the driver did not see are left: a new edge, so a pin programmed edge-triggered (or an
                # irqfd without resampling) does not lose them
                if self.irqfd is not None:
                    self._write_irqfd()
                else:
                    self.irq.set_level(False)
                    self.irq.set_level(True)
            else:
                self._update_line()

    def _raise(self, bit: int) -> None:
        """Under _irq_lock."""
        st = self.state
        st.interrupt_status |= bit
        st.interrupts += 1
        if self.irqfd is not None:
            self._write_irqfd()
        else:
            self.irq.set_level(True)

    def _update_line(self) -> None:
        """Under _irq_lock: the line follows InterruptStatus (with an irqfd KVM lowers it at the EOI)."""
        if self.irqfd is None:
            self.irq.set_level(self.state.interrupt_status != 0)

    def _write_irqfd(self) -> None:
        try:
            os.eventfd_write(self.irqfd, 1)
        except OSError as e:
            self.warn_once("irqfd", "cannot signal the irqfd: %s", e)

    def _resample(self) -> None:
        """KVM lowered the line at the guest's EOI: raise it again while bits are still pending."""
        try:
            os.eventfd_read(self.resamplefd)
        except BlockingIOError:
            return
        with self._irq_lock:
            if self.state.interrupt_status:
                self._write_irqfd()
