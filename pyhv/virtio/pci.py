"""virtio over PCI, modern (virtio 1.2 §4.1): a PCI function (vendor 0x1AF4, device 0x1040 + device type,
revision 1) that exposes a `VirtioDevice` back end through vendor-specific capabilities.

BARs (as QEMU lays them out, so firmware and drivers see familiar addresses):
    BAR 1  4 KiB    MSI-X table (0x000) and PBA (0x800)
    BAR 4  16 KiB   64-bit prefetchable: common configuration (0x0000), ISR status (0x1000), device
                    configuration (0x2000), notifications (0x3000 + 4 * queue)
Capabilities: MSI-X, then virtio_pci_cap for COMMON, ISR, DEVICE, NOTIFY (notify_off_multiplier 4) and PCI_CFG
(the configuration-space window onto the BARs).

Notifications: with ioeventfd (the default) each queue's notify address is a KVM ioeventfd, so the driver's
write completes in the kernel and wakes the I/O thread, which runs the back end: no exit to Python. With
`ioeventfd=False` the write exits and the back end runs on the vCPU thread (`--no-ioeventfd`, for comparison).
Interrupts: the MSI-X vector the driver chose for the queue (an irqfd write), else INTx with the ISR bit (the
driver's ISR read clears both).
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from pyhv.devices.pci.constants import (
    PCI_CAP_ID_VNDR, PCI_CLASS_COMMUNICATION_OTHER, PCI_CLASS_NETWORK_ETHERNET, PCI_CLASS_OTHERS, PCI_CLASS_STORAGE_SCSI,
    PCI_VENDOR_ID_REDHAT_QUMRANET,
)
from pyhv.devices.pci.device import BAR_UNMAPPED, Bar, PciDevice
from pyhv.devices.pci.msix import MsiRoute, MsixCapability
from pyhv.devices.registers import Register, RegisterBank
from pyhv.memory import MemoryRegion
from pyhv.virtio.device import (
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_EVENT_IDX,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET, IoEventFdSink, VirtioDevice,
)
from pyhv.virtio.queue import VirtQueue, VirtQueueError

if TYPE_CHECKING:
    from pyhv.runtime.iothread import IoThread
    from pyhv.memory import GuestMemory

log = logging.getLogger(__name__)

VIRTIO_PCI_DEVICE_ID_BASE = 0x1040
VIRTIO_PCI_REVISION_MODERN = 1
VIRTIO_PCI_SUBSYSTEM_ID = 0x1100

# §4.1.4 virtio_pci_cap.cfg_type
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
VIRTIO_PCI_CAP_LEN = 16
VIRTIO_PCI_NOTIFY_CAP_LEN = 20
VIRTIO_PCI_CFG_CAP_LEN = 20
VIRTIO_MSI_NO_VECTOR = 0xFFFF
VIRTIO_PCI_ISR_QUEUE = 0x1
VIRTIO_PCI_ISR_CONFIG = 0x2

MSIX_BAR = 1
MSIX_BAR_SIZE = 0x1000
MSIX_TABLE_OFFSET = 0x000
MSIX_PBA_OFFSET = 0x800
MODERN_BAR = 4
MODERN_BAR_SIZE = 0x4000
COMMON_OFFSET, COMMON_SIZE = 0x0000, 0x1000
ISR_OFFSET, ISR_SIZE = 0x1000, 0x1000
DEVICE_OFFSET, DEVICE_SIZE = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_SIZE = 0x3000, 0x1000
NOTIFY_OFF_MULTIPLIER = 4

# The PCI class each virtio device type reports, as QEMU's virtio-*-pci do (by device ID, so that vhost-user front
# ends, whose device type is only a number, get the same class as pyhv's own back ends).
CLASS_BY_DEVICE = {VIRTIO_ID_BLOCK: PCI_CLASS_STORAGE_SCSI, VIRTIO_ID_NET: PCI_CLASS_NETWORK_ETHERNET,
                   VIRTIO_ID_CONSOLE: PCI_CLASS_COMMUNICATION_OTHER}


@dataclass
class VirtioPciQueue:
    size: int
    max_size: int
    msix_vector: int = VIRTIO_MSI_NO_VECTOR
    enable: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0


@dataclass
class VirtioPciState:
    """The common configuration structure's state (virtio 1.2 §4.1.4.3) and the ISR."""
    device_feature_select: int = 0
    driver_feature_select: int = 0
    driver_features: int = 0
    config_msix_vector: int = VIRTIO_MSI_NO_VECTOR
    device_status: int = 0
    config_generation: int = 0
    queue_select: int = 0
    isr: int = 0
    queues: list[VirtioPciQueue] = field(default_factory=list)
    notifies: list[int] = field(default_factory=list)        # per queue, notifications that reached Python
    interrupts_msix: int = 0
    interrupts_intx: int = 0


class VirtioPciDevice(PciDevice):
    VENDOR_ID = PCI_VENDOR_ID_REDHAT_QUMRANET
    REVISION = VIRTIO_PCI_REVISION_MODERN
    SUBSYSTEM_VENDOR_ID = PCI_VENDOR_ID_REDHAT_QUMRANET
    SUBSYSTEM_ID = VIRTIO_PCI_SUBSYSTEM_ID
    INTERRUPT_PIN = 1

    COMMON_REGISTERS = (
        Register(0x00, "device_feature_select", width=4),
        Register(0x04, "device_feature", width=4, read="_read_device_feature", write="_write_ignored"),
        Register(0x08, "driver_feature_select", width=4),
        Register(0x0C, "driver_feature", width=4, read="_read_driver_feature", write="_write_driver_feature"),
        Register(0x10, "config_msix_vector", width=2, read="_read_config_msix_vector",
                 write="_write_config_msix_vector"),
        Register(0x12, "num_queues", width=2, read="_read_num_queues", write="_write_ignored"),
        Register(0x14, "device_status", width=1, read="_read_device_status", write="_write_device_status"),
        Register(0x15, "config_generation", width=1, read="_read_config_generation", write="_write_ignored"),
        Register(0x16, "queue_select", width=2),
        Register(0x18, "queue_size", width=2, read="_read_q_size", write="_write_q_size"),
        Register(0x1A, "queue_msix_vector", width=2, read="_read_q_msix_vector", write="_write_q_msix_vector"),
        Register(0x1C, "queue_enable", width=2, read="_read_q_enable", write="_write_q_enable"),
        Register(0x1E, "queue_notify_off", width=2, read="_read_q_notify_off", write="_write_ignored"),
        Register(0x20, "queue_desc_lo", width=4, read="_read_q_desc_lo", write="_write_q_desc_lo"),
        Register(0x24, "queue_desc_hi", width=4, read="_read_q_desc_hi", write="_write_q_desc_hi"),
        Register(0x28, "queue_driver_lo", width=4, read="_read_q_driver_lo", write="_write_q_driver_lo"),
        Register(0x2C, "queue_driver_hi", width=4, read="_read_q_driver_hi", write="_write_q_driver_hi"),
        Register(0x30, "queue_device_lo", width=4, read="_read_q_device_lo", write="_write_q_device_lo"),
        Register(0x34, "queue_device_hi", width=4, read="_read_q_device_hi", write="_write_q_device_hi"),
        Register(0x38, "queue_notify_data", width=2, read="_read_q_notify_off", write="_write_ignored"),
        Register(0x3A, "queue_reset", width=2, read="_read_zero", write="_write_ignored"),
    )

    def __init__(self, name: str, backend: VirtioDevice, memory: "GuestMemory", iothread: "IoThread",
                 msi_routes: Callable[[str, int], list[MsiRoute]] | None = None, use_ioeventfd: bool = True,
                 ioeventfd: IoEventFdSink | None = None, msix: bool = True) -> None:
        """`msi_routes(name, n)`: n MSI routes (None: no MSI-X, INTx only). `ioeventfd(fd, addr, length,
        datamatch, deassign)`: registers a KVM ioeventfd (None or use_ioeventfd=False: notifications exit)."""
        self.DEVICE_ID = VIRTIO_PCI_DEVICE_ID_BASE + backend.device_id
        self.CLASS_CODE = CLASS_BY_DEVICE.get(backend.device_id, PCI_CLASS_OTHERS)
        super().__init__(name)
        self.backend = backend
        self.memory = memory
        self.access_platform = False            # behind an IOMMU: VIRTIO_F_ACCESS_PLATFORM offered and required
        self.iothread = iothread
        self.tlock = threading.RLock()
        nq = len(backend.queue_sizes)
        self.vstate = VirtioPciState(queues=[VirtioPciQueue(s, s) for s in backend.queue_sizes],
                                     notifies=[0] * nq)
        backend.on_needs_reset = self._needs_reset
        backend.on_config_change = self.config_changed
        self.common = RegisterBank(self, self.COMMON_REGISTERS, self.vstate, name=f"{name}.common")

        # BAR 4: the four virtio structures
        bar4 = MemoryRegion.container(f"{name}-modern", MODERN_BAR_SIZE, owner=name)
        common = MemoryRegion.io(f"{name}-common", COMMON_SIZE, self.common.read, self.common.write, owner=name)
        common.describe = self.common.register_name
        isr = MemoryRegion.io(f"{name}-isr", ISR_SIZE, self._isr_read, lambda o, s, v: None, owner=name)
        isr.describe = lambda off: f"{name}.isr"
        devcfg = MemoryRegion.io(f"{name}-device-cfg", DEVICE_SIZE, self._devcfg_read, self._devcfg_write,
                                 owner=name)
        devcfg.describe = lambda off: f"{name}.device_config+{off:#x}"
        notify = MemoryRegion.io(f"{name}-notify", NOTIFY_SIZE, self._notify_read, self._notify_write, owner=name)
        notify.describe = lambda off: f"{name}.notify[{off // NOTIFY_OFF_MULTIPLIER}]"
        self.notify_region = notify
        for off, region in ((COMMON_OFFSET, common), (ISR_OFFSET, isr), (DEVICE_OFFSET, devcfg),
                            (NOTIFY_OFFSET, notify)):
            bar4.add_subregion(off, region)
        self._bar4_parts = ((COMMON_OFFSET, common), (ISR_OFFSET, isr), (DEVICE_OFFSET, devcfg),
                            (NOTIFY_OFFSET, notify))

        self.msix: MsixCapability | None = None
        if msix and msi_routes is not None:
            nvec = nq + 1
            bar1 = MemoryRegion.container(f"{name}-msix", MSIX_BAR_SIZE, owner=name)
            self.msix = MsixCapability(self, nvec, MSIX_BAR, MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET,
                                       msi_routes(name, nvec))
            bar1.add_subregion(MSIX_TABLE_OFFSET, self.msix.table_region)
            bar1.add_subregion(MSIX_PBA_OFFSET, self.msix.pba_region)
            self.add_bar(MSIX_BAR, bar1)
        self.add_bar(MODERN_BAR, bar4, is64=True, prefetch=True)

        self._add_virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, 0x40)
        self._add_virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1)
        self._add_virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, DEVICE_SIZE)
        cap = self._add_virtio_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER * nq,
                                   VIRTIO_PCI_NOTIFY_CAP_LEN)
        self.config.set(cap + 16, 4, NOTIFY_OFF_MULTIPLIER)
        self.pci_cfg_cap = self._add_virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, VIRTIO_PCI_CFG_CAP_LEN, bar=0)
        c = self.config
        c.set_mask(self.pci_cfg_cap + 4, 1, 0xFF)                 # bar
        c.set_mask(self.pci_cfg_cap + 8, 4, 0xFFFFFFFF)           # offset
        c.set_mask(self.pci_cfg_cap + 12, 4, 0xFFFFFFFF)          # length

        # notifications
        self.use_ioeventfd = use_ioeventfd and ioeventfd is not None
        self._ioeventfd = ioeventfd
        self._kick_fds: list[int] = []
        self._registered_at: int = BAR_UNMAPPED
        # a back end whose data plane is another process (vhost-user) reads the kick eventfds itself and is
        # given each queue's irqfd as its completion eventfd
        self.external = bool(getattr(backend, "external_data_plane", False))
        if self.use_ioeventfd:
            for q in range(nq):
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._kick_fds.append(fd)
                if not self.external:
                    iothread.add_reader(fd, lambda fd=fd, q=q: self._kicked(fd, q))
        if self.external:
            backend.attach_notifiers(self._kick_fds or None, self._queue_irqfd)

    def _add_virtio_cap(self, cfg_type: int, offset: int, length: int, cap_len: int = VIRTIO_PCI_CAP_LEN,
                        bar: int = MODERN_BAR) -> int:
        cap = self.add_capability(PCI_CAP_ID_VNDR, cap_len)
        c = self.config
        c.set(cap + 2, 1, cap_len)
        c.set(cap + 3, 1, cfg_type)
        c.set(cap + 4, 1, bar)
        c.set(cap + 8, 4, offset)
        c.set(cap + 12, 4, length)
        return cap

    # --- configuration space hooks ---------------------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        data_off = self.pci_cfg_cap + 16
        if offset >= data_off and offset + size <= data_off + 4 and size in (1, 2, 4):
            return self._pci_cfg_access(offset - data_off, size, None)
        return super().config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        data_off = self.pci_cfg_cap + 16
        if offset >= data_off and offset + size <= data_off + 4 and size in (1, 2, 4):
            self._pci_cfg_access(offset - data_off, size, value)
            return
        super().config_write(offset, size, value)

    def config_written(self, offset: int, size: int, value: int) -> None:
        if self.msix is not None:
            self.msix.config_written(offset, size)

    def _pci_cfg_access(self, shift: int, size: int, value: int | None) -> int:
        """VIRTIO_PCI_CAP_PCI_CFG: pci_cfg_data reaches `length` bytes at `offset` of BAR `bar` (§4.1.4.9)."""
        c, cap = self.config, self.pci_cfg_cap
        bar, off, length = c.get(cap + 4, 1), c.get(cap + 8, 4), c.get(cap + 12, 4)
        if bar != MODERN_BAR or length not in (1, 2, 4) or off % length or off + length > MODERN_BAR_SIZE:
            return 0
        for base, region in self._bar4_parts:
            if base <= off < base + region.size:
                if value is None:
                    return (region.read(off - base, length) << (8 * shift)) & ((1 << (8 * size)) - 1)
                region.write(off - base, length, (value >> (8 * shift)) & ((1 << (8 * length)) - 1))
                return 0
        return 0

    def bar_moved(self, bar: Bar, old: int) -> None:
        if bar.index == MODERN_BAR and self.use_ioeventfd:
            self._register_ioeventfds(bar.address)

    def _register_ioeventfds(self, bar_addr: int) -> None:
        if self._registered_at == bar_addr:
            return
        for q, fd in enumerate(self._kick_fds):
            at = NOTIFY_OFFSET + q * NOTIFY_OFF_MULTIPLIER
            if self._registered_at != BAR_UNMAPPED:
                self._ioeventfd(fd, self._registered_at + at, 2, None, True)
            if bar_addr != BAR_UNMAPPED:
                self._ioeventfd(fd, bar_addr + at, 2, None, False)
        self._registered_at = bar_addr

    # --- common configuration registers ------------------------------------------------------------------------
    def _write_ignored(self, value: int) -> None:
        pass

    def _read_zero(self) -> int:
        return 0

    def attach_dma(self, space) -> None:
        """Put the device behind an IOMMU: its DMA goes through `space` (a `TranslatedDma`), and it offers
        VIRTIO_F_ACCESS_PLATFORM so that the driver gives it I/O virtual addresses (the DMA API in Linux)."""
        self.memory = space
        self.access_platform = True

    def device_features(self) -> int:
        return self.backend.device_features() | (1 << VIRTIO_F_ACCESS_PLATFORM if self.access_platform else 0)

    def _read_device_feature(self) -> int:
        sel = self.vstate.device_feature_select
        return (self.device_features() >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0

    def _read_driver_feature(self) -> int:
        sel = self.vstate.driver_feature_select
        return (self.vstate.driver_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0

    def _write_driver_feature(self, value: int) -> None:
        st = self.vstate
        if st.device_status & VIRTIO_CONFIG_S_FEATURES_OK or st.driver_feature_select >= 2:
            return
        shift = 32 * st.driver_feature_select
        st.driver_features = (st.driver_features & ~(0xFFFFFFFF << shift)) | ((value & 0xFFFFFFFF) << shift)

    def _read_config_msix_vector(self) -> int:
        return self.vstate.config_msix_vector

    def _write_config_msix_vector(self, value: int) -> None:
        self.vstate.config_msix_vector = self._valid_vector(value)

    def _valid_vector(self, value: int) -> int:
        """A vector number the driver may use, or NO_VECTOR (reads back so; §4.1.4.3 / §4.1.5.1.2)."""
        if self.msix is None or value >= self.msix.nvectors:
            return VIRTIO_MSI_NO_VECTOR
        return value

    def _read_num_queues(self) -> int:
        return len(self.vstate.queues)

    def _read_device_status(self) -> int:
        return self.vstate.device_status

    def _read_config_generation(self) -> int:
        return self.vstate.config_generation & 0xFF

    def _write_device_status(self, value: int) -> None:
        with self.tlock:
            st = self.vstate
            value &= 0xFF
            if value == 0:
                self.reset_transport()
                return
            old = st.device_status
            if value & VIRTIO_CONFIG_S_FEATURES_OK and not old & VIRTIO_CONFIG_S_FEATURES_OK:
                offered = self.device_features()
                if st.driver_features & ~offered or not st.driver_features >> VIRTIO_F_VERSION_1 & 1:
                    value &= ~VIRTIO_CONFIG_S_FEATURES_OK       # the driver reads it back and gives up
                elif self.access_platform and not st.driver_features >> VIRTIO_F_ACCESS_PLATFORM & 1:
                    # a driver that would hand out guest-physical addresses past the IOMMU (§6.1): refused
                    self.backend.warn_once("access-platform", "driver did not accept VIRTIO_F_ACCESS_PLATFORM "
                                           "behind the IOMMU: FEATURES_OK refused")
                    value &= ~VIRTIO_CONFIG_S_FEATURES_OK
            st.device_status = value | (old & VIRTIO_CONFIG_S_NEEDS_RESET)
            if value & VIRTIO_CONFIG_S_DRIVER_OK and not old & VIRTIO_CONFIG_S_DRIVER_OK:
                self._activate()

    def _activate(self) -> None:
        queues: list[VirtQueue | None] = []
        try:
            for i, q in enumerate(self.vstate.queues):
                queues.append(VirtQueue(i, q.size, self.memory, q.desc, q.driver, q.device,
                                        event_idx=bool(self.vstate.driver_features >> VIRTIO_F_EVENT_IDX & 1),
                                        indirect=bool(self.vstate.driver_features >> VIRTIO_F_INDIRECT_DESC & 1))
                              if q.enable else None)
        except VirtQueueError as e:
            self.backend.warn_once("activate", "cannot activate: %s", e)
            self._needs_reset()
            return
        self.backend.activate(self.memory, queues, self.interrupt, self.vstate.driver_features)

    def reset_transport(self) -> None:
        with self.tlock:
            self.backend.reset()
            st = self.vstate
            st.device_status = 0
            st.driver_features = 0
            st.device_feature_select = st.driver_feature_select = st.queue_select = 0
            st.config_msix_vector = VIRTIO_MSI_NO_VECTOR
            for q in st.queues:
                q.size, q.msix_vector, q.enable, q.desc, q.driver, q.device = \
                    q.max_size, VIRTIO_MSI_NO_VECTOR, 0, 0, 0, 0
            if st.isr:
                st.isr = 0
                self.set_intx(False)

    def _queue(self) -> VirtioPciQueue | None:
        sel = self.vstate.queue_select
        return self.vstate.queues[sel] if sel < len(self.vstate.queues) else None

    def _q_get(self, name: str) -> int:
        q = self._queue()
        return getattr(q, name) if q is not None else 0

    def _q_set(self, name: str, value: int) -> None:
        q = self._queue()
        if q is None or self.vstate.device_status & VIRTIO_CONFIG_S_DRIVER_OK:
            return        # no such queue, or the queue is live: ignore (§4.1.4.3.2)
        setattr(q, name, value)

    def _read_q_size(self) -> int:
        return self._q_get("size")

    def _write_q_size(self, value: int) -> None:
        q = self._queue()
        if q is not None and 0 < value <= q.max_size:
            self._q_set("size", value)

    def _read_q_msix_vector(self) -> int:
        q = self._queue()
        return q.msix_vector if q is not None else VIRTIO_MSI_NO_VECTOR

    def _write_q_msix_vector(self, value: int) -> None:
        q = self._queue()
        if q is not None:
            q.msix_vector = self._valid_vector(value)

    def _read_q_enable(self) -> int:
        return self._q_get("enable")

    def _write_q_enable(self, value: int) -> None:
        if value == 1:
            self._q_set("enable", 1)

    def _read_q_notify_off(self) -> int:
        return self.vstate.queue_select if self._queue() is not None else 0

    def _half(name: str, high: bool):  # noqa: N805  (builds accessors below)
        shift = 32 if high else 0

        def read(self) -> int:
            return (self._q_get(name) >> shift) & 0xFFFFFFFF

        def write(self, value: int) -> None:
            q = self._queue()
            if q is not None:
                old = getattr(q, name)
                self._q_set(name, (old & ~(0xFFFFFFFF << shift)) | ((value & 0xFFFFFFFF) << shift))
        return read, write

    _read_q_desc_lo, _write_q_desc_lo = _half("desc", False)
    _read_q_desc_hi, _write_q_desc_hi = _half("desc", True)
    _read_q_driver_lo, _write_q_driver_lo = _half("driver", False)
    _read_q_driver_hi, _write_q_driver_hi = _half("driver", True)
    _read_q_device_lo, _write_q_device_lo = _half("device", False)
    _read_q_device_hi, _write_q_device_hi = _half("device", True)
    del _half

    # --- ISR, device configuration, notifications ----------------------------------------------------------------
    def _isr_read(self, offset: int, size: int) -> int:
        with self.tlock:
            value, self.vstate.isr = self.vstate.isr, 0
            if value:
                self.set_intx(False)
            return value if offset == 0 else 0

    def _devcfg_read(self, offset: int, size: int) -> int:
        return self.backend.config_read(offset, size)

    def _devcfg_write(self, offset: int, size: int, value: int) -> None:
        self.backend.config_write(offset, size, value)

    def _notify_read(self, offset: int, size: int) -> int:
        return 0

    def _notify_write(self, offset: int, size: int, value: int) -> None:
        """A notification that exited (no ioeventfd): run the back end here, on the vCPU thread."""
        q = offset // NOTIFY_OFF_MULTIPLIER
        if 0 <= q < len(self.vstate.queues):
            self.vstate.notifies[q] += 1
            self.backend.notify(q)

    def _kicked(self, fd: int, q: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        self.backend.notify(q)

    # --- interrupts -----------------------------------------------------------------------------------------------
    def interrupt(self, queue_index: int) -> None:
        """The back end used buffers of `queue_index`: MSI-X vector of the queue, else INTx + ISR bit 0."""
        q = self.vstate.queues[queue_index] if 0 <= queue_index < len(self.vstate.queues) else None
        if q is None:
            return
        self._signal(q.msix_vector, VIRTIO_PCI_ISR_QUEUE)

    def _queue_irqfd(self, queue_index: int) -> int | None:
        """The eventfd that raises the queue's MSI-X vector in KVM directly, or None (then the back end's
        completions come through `interrupt`)."""
        q = self.vstate.queues[queue_index] if 0 <= queue_index < len(self.vstate.queues) else None
        if q is None or self.msix is None or q.msix_vector == VIRTIO_MSI_NO_VECTOR:
            return None
        return self.msix.direct_fd(q.msix_vector)

    def config_changed(self) -> None:
        with self.tlock:
            self.vstate.config_generation += 1
        self._signal(self.vstate.config_msix_vector, VIRTIO_PCI_ISR_CONFIG)

    def _needs_reset(self) -> None:
        with self.tlock:
            self.vstate.device_status |= VIRTIO_CONFIG_S_NEEDS_RESET
        self.config_changed()

    def _signal(self, vector: int, isr_bit: int) -> None:
        if self.msix is not None and self.msix.enabled:
            if vector != VIRTIO_MSI_NO_VECTOR:
                self.vstate.interrupts_msix += 1
                self.msix.notify(vector)
            return
        with self.tlock:
            self.vstate.isr |= isr_bit
            self.vstate.interrupts_intx += 1
            self.set_intx(True)

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.reset_transport()
        if self.msix is not None:
            self.msix.reset()
        super().reset()

    def close(self) -> None:
        self.backend.close()
        for fd in self._kick_fds:
            if not self.external:
                self.iothread.remove_reader(fd)
        if self.use_ioeventfd and self._registered_at != BAR_UNMAPPED:
            self._register_ioeventfds(BAR_UNMAPPED)
        fds, self._kick_fds = self._kick_fds, []
        if self.iothread._thread is None:           # stopped: nothing selects on them any more
            for fd in fds:
                os.close(fd)
        else:                                       # closed after the I/O thread has dropped them
            self.iothread.call_soon(lambda: [os.close(fd) for fd in fds])

    def describe(self) -> dict:
        d = super().describe()
        d["virtio"] = {"device_id": self.backend.device_id, "status": self.vstate.device_status,
                       "ioeventfd": self.use_ioeventfd, "msix": self.msix is not None and self.msix.enabled,
                       "notifies_in_python": list(self.vstate.notifies)}
        return d
