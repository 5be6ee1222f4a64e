"""A vhost-user back end: one of pyhv's `VirtioDevice`s served over a Unix socket to a vhost-user front end (QEMU's
`vhost-user-blk-pci`, `vhost-user-rng-pci`, `-netdev vhost-user`, or pyhv's own front end).

The server listens on a socket path and serves one front end at a time, on an `IoThread`:

    front end                                   VhostUserBackend                       VirtioDevice
    GET_FEATURES / SET_FEATURES           ->    device_features() + PROTOCOL_FEATURES
    GET/SET_PROTOCOL_FEATURES             ->    MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS, RESET_DEVICE
    SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG ->  VhostMemoryMap (memfd regions mapped here)
    SET_VRING_NUM / ADDR / BASE           ->    remembered per ring
    SET_VRING_KICK                        ->    ring started: a VirtQueue built on the shared memory;
                                                the device is activated with the first one
    kick eventfd readable                 ->                                           notify(index)
    device.interrupt(index)               ->    write the ring's call eventfd
    SET_VRING_ENABLE                      ->    rings are processed only while enabled
    GET_VRING_BASE                        ->    ring stopped (device quiesced), reply with the avail index;
                                                the device is reset once every ring is stopped
    GET_CONFIG / SET_CONFIG               ->    config_read / config_write
    RESET_OWNER / RESET_DEVICE            ->    every ring stopped, device reset

Anything malformed (bad header, unknown flags, short payload, wrong number of file descriptors, a region that
cannot be mapped, ring addresses outside every region) gives one log line, and the back end drops the connection,
releases everything the front end gave it (memory maps, eventfds) and waits for the next one. A front end that
disappears is handled the same way; the device finishes in-flight requests first (`quiesce`).
"""
from __future__ import annotations

import logging
import os
import socket
import stat
from dataclasses import dataclass

from pyhv.runtime.chardev import bind_private_socket
from pyhv.runtime.iothread import IoThread
from pyhv.memory.guest import GuestMemoryError
from pyhv.vhost import protocol as P
from pyhv.vhost.memory import VhostMemoryMap, map_region
from pyhv.vhost.protocol import Message, VhostUserError
from pyhv.virtio.device import VirtioDevice, bits
from pyhv.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_ID_NET
from pyhv.virtio.queue import VirtQueue, VirtQueueError

log = logging.getLogger(__name__)

PROTOCOL_FEATURES = bits(P.VHOST_USER_PROTOCOL_F_MQ, P.VHOST_USER_PROTOCOL_F_REPLY_ACK,
                         P.VHOST_USER_PROTOCOL_F_CONFIG, P.VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS,
                         P.VHOST_USER_PROTOCOL_F_RESET_DEVICE)
MAX_MEM_SLOTS = 32
MESSAGE_TIMEOUT = 2.0             # seconds a front end may take to send the rest of a started message
MAX_QUEUE_SIZE = 32768


@dataclass
class Vring:
    index: int
    num: int = 0
    desc: int = 0                 # front-end user addresses
    used: int = 0
    avail: int = 0
    base: int = 0                 # next available index to use when the ring starts
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    started: bool = False
    enabled: bool = False
    queue: VirtQueue | None = None

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


class VhostUserBackend:
    def __init__(self, device: VirtioDevice, socket_path: str, iothread: IoThread) -> None:
        self.device = device
        self.socket_path = socket_path
        self.iothread = iothread
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.memory = VhostMemoryMap()
        self.rings = [Vring(i) for i in range(len(device.queue_sizes))]
        self.features = 0
        self.protocol_features = 0
        self.connections = 0
        self.disconnect_reasons: list[str] = []
        device.on_needs_reset = self._device_error
        self._handlers = {
            P.VHOST_USER_GET_FEATURES: self._get_features,
            P.VHOST_USER_SET_FEATURES: self._set_features,
            P.VHOST_USER_SET_OWNER: self._nothing,
            P.VHOST_USER_RESET_OWNER: self._reset_owner,
            P.VHOST_USER_SET_MEM_TABLE: self._set_mem_table,
            P.VHOST_USER_SET_VRING_NUM: self._set_vring_num,
            P.VHOST_USER_SET_VRING_ADDR: self._set_vring_addr,
            P.VHOST_USER_SET_VRING_BASE: self._set_vring_base,
            P.VHOST_USER_GET_VRING_BASE: self._get_vring_base,
            P.VHOST_USER_SET_VRING_KICK: self._set_vring_kick,
            P.VHOST_USER_SET_VRING_CALL: self._set_vring_call,
            P.VHOST_USER_SET_VRING_ERR: self._set_vring_err,
            P.VHOST_USER_GET_PROTOCOL_FEATURES: self._get_protocol_features,
            P.VHOST_USER_SET_PROTOCOL_FEATURES: self._set_protocol_features,
            P.VHOST_USER_GET_QUEUE_NUM: self._get_queue_num,
            P.VHOST_USER_SET_VRING_ENABLE: self._set_vring_enable,
            P.VHOST_USER_GET_CONFIG: self._get_config,
            P.VHOST_USER_SET_CONFIG: self._set_config,
            P.VHOST_USER_RESET_DEVICE: self._reset_device,
            P.VHOST_USER_GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            P.VHOST_USER_ADD_MEM_REG: self._add_mem_reg,
            P.VHOST_USER_REM_MEM_REG: self._rem_mem_reg,
        }
        self._expected_fds = {P.VHOST_USER_SET_VRING_KICK: None, P.VHOST_USER_SET_VRING_CALL: None,
                              P.VHOST_USER_SET_VRING_ERR: None, P.VHOST_USER_SET_MEM_TABLE: None,
                              P.VHOST_USER_ADD_MEM_REG: 1, P.VHOST_USER_REM_MEM_REG: None}

    # --- listening -------------------------------------------------------------------------------------------
    def start(self) -> None:
        path = self.socket_path
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)               # a stale socket from an earlier run
        except FileNotFoundError:
            pass
        except OSError as e:
            raise P.VhostUserError(f"socket path {path}: {e.strerror}") from None
        try:
            sock = bind_private_socket(path)        # 0600 from the start: the front end maps guest RAM through it
        except OSError as e:
            raise P.VhostUserError(f"cannot listen on {path}: {e.strerror}",
                                   "is the path an existing file, or its directory missing?") from None
        sock.listen(1)
        self.listener = sock
        self.iothread.add_reader(sock.fileno(), self._accept)
        log.info("vhost-user %s back end listening on %s", self.device.name, path)

    def close(self) -> None:
        self.iothread.call_soon(self._close)

    def _close(self) -> None:
        if self.conn is not None:
            self.disconnect("back end shutting down")
        if self.listener is not None:
            self.iothread.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        self.device.close()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.conn is not None:        # one front end at a time
            conn.close()
            return
        conn.settimeout(MESSAGE_TIMEOUT)
        self.conn = conn
        self.connections += 1
        self.iothread.remove_reader(self.listener.fileno())
        self.iothread.add_reader(conn.fileno(), self._readable)
        log.info("vhost-user: front end connected (connection %d)", self.connections)

    def disconnect(self, reason: str) -> None:
        """Drop the front end: stop every ring, reset the device, release its memory and fds, listen again."""
        if self.conn is None:
            return
        self.disconnect_reasons.append(reason)
        for ring in self.rings:                  # what a hung guest's driver and the device last saw, for the log
            if ring.queue is not None:
                log.info("vhost-user: at disconnect, %s", ring.queue.describe())
        if getattr(self.device, "stats", None):
            log.info("vhost-user: device counters %s", self.device.stats)
        self._stop_all_rings()
        self.device.reset()
        for ring in self.rings:
            ring.close_fds()
            ring.__init__(ring.index)
        self.memory.clear()
        self.features = self.protocol_features = 0
        self.iothread.remove_reader(self.conn.fileno())
        self.conn.close()
        self.conn = None
        if self.listener is not None:
            self.iothread.add_reader(self.listener.fileno(), self._accept)

    # --- messages --------------------------------------------------------------------------------------------
    def _readable(self) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            msg = P.recv_message(conn)
        except EOFError:
            log.info("vhost-user: front end disconnected")
            self.disconnect("front end disconnected")
            return
        except (VhostUserError, OSError) as e:
            log.warning("vhost-user: %s; dropping the connection", e)
            self.disconnect(str(e))
            return
        try:
            self._dispatch(msg)
        except VhostUserError as e:
            msg.close_fds()
            log.warning("vhost-user: %s; dropping the connection", e)
            self.disconnect(str(e))
        except OSError as e:
            msg.close_fds()
            log.warning("vhost-user: %s: %s; dropping the connection", msg.name, e)
            self.disconnect(str(e))
        except Exception:
            msg.close_fds()
            log.exception("vhost-user: %s failed; dropping the connection", msg.name)
            self.disconnect("internal error")

    def _dispatch(self, msg: Message) -> None:
        if msg.flags & ~(P.VHOST_USER_VERSION_MASK | P.VHOST_USER_NEED_REPLY_MASK):
            raise VhostUserError(f"{msg.name} with unexpected flags {msg.flags:#x}")
        handler = self._handlers.get(msg.request)
        if handler is None:
            msg.close_fds()
            log.warning("vhost-user: unsupported request %s", msg.name)
            if msg.need_reply:
                self._reply(msg, P.U64.pack(1))
            return
        expected = self._expected_fds.get(msg.request, 0)
        if expected is not None and len(msg.fds) != expected:
            raise VhostUserError(f"{msg.name} with {len(msg.fds)} file descriptors, expected {expected}")
        log.debug("vhost-user: %s %s fds=%s", msg.name, msg.payload.hex(), msg.fds)
        reply = handler(msg)
        if reply is not None:
            self._reply(msg, reply)
        elif msg.need_reply and self.protocol_features >> P.VHOST_USER_PROTOCOL_F_REPLY_ACK & 1:
            self._reply(msg, P.U64.pack(0))

    def _reply(self, msg: Message, payload: bytes) -> None:
        P.send_message(self.conn, Message(msg.request, P.VHOST_USER_VERSION | P.VHOST_USER_REPLY_MASK, payload))

    def _ring(self, index: int, what: str) -> Vring:
        if not 0 <= index < len(self.rings):
            raise VhostUserError(f"{what} for ring {index}; the device has {len(self.rings)}")
        return self.rings[index]

    # --- features --------------------------------------------------------------------------------------------
    def offered_features(self) -> int:
        return self.device.device_features() | bits(P.VHOST_USER_F_PROTOCOL_FEATURES)

    def _nothing(self, msg: Message) -> None:
        return None

    def _get_features(self, msg: Message) -> bytes:
        return P.U64.pack(self.offered_features())

    def _set_features(self, msg: Message) -> None:
        features = msg.u64()
        if features & ~self.offered_features():
            raise VhostUserError(f"front end acked features {features & ~self.offered_features():#x} that were "
                                 "not offered")
        self.features = features

    def offered_protocol_features(self) -> int:
        if self.device.device_id == VIRTIO_ID_NET:
            # a vhost-user net front end keeps the configuration space (MAC, status) itself (QEMU warns when a
            # net back end offers VHOST_USER_PROTOCOL_F_CONFIG)
            return PROTOCOL_FEATURES & ~bits(P.VHOST_USER_PROTOCOL_F_CONFIG)
        return PROTOCOL_FEATURES

    def _get_protocol_features(self, msg: Message) -> bytes:
        return P.U64.pack(self.offered_protocol_features())

    def _set_protocol_features(self, msg: Message) -> None:
        features = msg.u64()
        extra = features & ~self.offered_protocol_features()
        if extra:
            raise VhostUserError(f"front end set protocol features {extra:#x} that were not offered")
        self.protocol_features = features

    def _get_queue_num(self, msg: Message) -> bytes:
        return P.U64.pack(len(self.rings))

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return P.U64.pack(MAX_MEM_SLOTS)

    # --- memory ------------------------------------------------------------------------------------------------
    def _set_mem_table(self, msg: Message) -> None:
        nregions, _ = msg.unpack(P.MEMORY_HEADER)
        if not 1 <= nregions <= P.VHOST_MEMORY_BASELINE_NREGIONS:
            raise VhostUserError(f"SET_MEM_TABLE with {nregions} regions")
        if len(msg.fds) != nregions:
            raise VhostUserError(f"SET_MEM_TABLE with {nregions} regions but {len(msg.fds)} file descriptors")
        if len(msg.payload) < P.MEMORY_HEADER.size + nregions * P.MEMORY_REGION.size:
            raise VhostUserError(f"SET_MEM_TABLE payload of {len(msg.payload)} bytes for {nregions} regions")
        fds, msg.fds = msg.fds, []
        regions = []
        try:
            for i in range(nregions):
                gpa, size, uaddr, offset = P.MEMORY_REGION.unpack_from(msg.payload,
                                                                       P.MEMORY_HEADER.size + i * P.MEMORY_REGION.size)
                regions.append(map_region(fds[i], gpa, size, uaddr, offset))
                fds[i] = -1
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
        with self.device.lock:
            self.device.quiesce()
            self.memory.set_table(regions)
            self._rebuild_queues()
        log.info("vhost-user: memory table %s", self.memory.describe())

    def _add_mem_reg(self, msg: Message) -> None:
        _, gpa, size, uaddr, offset = msg.unpack(P.SINGLE_REGION)
        fd, msg.fds = msg.fds[0], []
        region = map_region(fd, gpa, size, uaddr, offset)
        with self.device.lock:
            self.device.quiesce()
            self.memory.add(region)
            self._rebuild_queues()
        log.info("vhost-user: memory regions %s", self.memory.describe())

    def _rem_mem_reg(self, msg: Message) -> None:
        msg.close_fds()                 # the spec allows (and says to close) one stray fd here
        _, gpa, size, uaddr, _ = msg.unpack(P.SINGLE_REGION)
        with self.device.lock:
            self.device.quiesce()
            self.memory.remove(gpa, size, uaddr)
            self._rebuild_queues()

    # --- rings -----------------------------------------------------------------------------------------------
    def _set_vring_num(self, msg: Message) -> None:
        index, num = msg.unpack(P.VRING_STATE)
        ring = self._ring(index, "SET_VRING_NUM")
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise VhostUserError(f"SET_VRING_NUM {num} for ring {index} is not a power of 2 up to {MAX_QUEUE_SIZE}")
        ring.num = num

    def _set_vring_addr(self, msg: Message) -> None:
        index, _flags, desc, used, avail, _log = msg.unpack(P.VRING_ADDR)
        ring = self._ring(index, "SET_VRING_ADDR")
        ring.desc, ring.used, ring.avail = desc, used, avail
        if ring.started:
            with self.device.lock:
                self.device.quiesce()
                self._rebuild_queues()

    def _set_vring_base(self, msg: Message) -> None:
        index, num = msg.unpack(P.VRING_STATE)
        ring = self._ring(index, "SET_VRING_BASE")
        if ring.started:
            raise VhostUserError(f"SET_VRING_BASE for ring {index}, which is running")
        ring.base = num & 0xFFFF
        log.info("vhost-user: ring %d base %d", index, ring.base)     # rare: start, stop, migration

    def _get_vring_base(self, msg: Message) -> bytes:
        index, _ = msg.unpack(P.VRING_STATE)
        ring = self._ring(index, "GET_VRING_BASE")
        self._stop_ring(ring)
        log.info("vhost-user: ring %d stopped at %d", index, ring.base)
        if not any(r.started for r in self.rings):
            self.device.reset()
        return P.VRING_STATE.pack(index, ring.base)

    def _vring_fd(self, msg: Message, what: str) -> tuple[Vring, int]:
        value = msg.u64()
        ring = self._ring(value & P.VHOST_USER_VRING_IDX_MASK, what)
        nofd = bool(value & P.VHOST_USER_VRING_NOFD_MASK)
        if nofd != (not msg.fds) or len(msg.fds) > 1:
            raise VhostUserError(f"{what} for ring {ring.index} with {len(msg.fds)} file descriptors and the "
                                 f"no-fd flag {'set' if nofd else 'clear'}")
        fd = msg.fds[0] if msg.fds else -1
        msg.fds = []
        return ring, fd

    def _set_vring_kick(self, msg: Message) -> None:
        ring, fd = self._vring_fd(msg, "SET_VRING_KICK")
        if fd < 0:
            raise VhostUserError(f"SET_VRING_KICK for ring {ring.index} without a file descriptor (polling is not "
                                 "supported)")
        if ring.started:
            self.iothread.remove_reader(ring.kick_fd)
        if ring.kick_fd >= 0:
            os.close(ring.kick_fd)
        ring.kick_fd = fd
        os.set_blocking(fd, False)
        self._start_ring(ring)

    def _set_vring_call(self, msg: Message) -> None:
        ring, fd = self._vring_fd(msg, "SET_VRING_CALL")
        old, ring.call_fd = ring.call_fd, fd
        if old >= 0:
            os.close(old)

    def _set_vring_err(self, msg: Message) -> None:
        ring, fd = self._vring_fd(msg, "SET_VRING_ERR")
        old, ring.err_fd = ring.err_fd, fd
        if old >= 0:
            os.close(old)

    def _set_vring_enable(self, msg: Message) -> None:
        index, num = msg.unpack(P.VRING_STATE)
        ring = self._ring(index, "SET_VRING_ENABLE")
        if num not in (0, 1):
            raise VhostUserError(f"SET_VRING_ENABLE {num} for ring {index}")
        ring.enabled = bool(num)
        log.info("vhost-user: ring %d %s", index, "enabled" if ring.enabled else "disabled")
        with self.device.lock:
            self._publish(ring)
        if ring.enabled and ring.started:
            self.device.notify(index)       # buffers may have been made available while it was disabled

    def _reset_owner(self, msg: Message) -> None:
        self._stop_all_rings()
        self.device.reset()

    def _reset_device(self, msg: Message) -> None:
        self._stop_all_rings()
        self.device.reset()
        self.features = 0
        for ring in self.rings:
            ring.enabled = False
            ring.base = 0

    def _stop_all_rings(self) -> None:
        for ring in self.rings:
            self._stop_ring(ring)

    def _make_queue(self, ring: Vring) -> VirtQueue:
        if not ring.num:
            raise VhostUserError(f"ring {ring.index} started without SET_VRING_NUM")
        n = ring.num
        try:
            desc = self.memory.uaddr_to_gpa(ring.desc, 16 * n)
            avail = self.memory.uaddr_to_gpa(ring.avail, 6 + 2 * n)
            used = self.memory.uaddr_to_gpa(ring.used, 6 + 8 * n)
        except GuestMemoryError as e:
            raise VhostUserError(f"ring {ring.index} is not covered by the memory table ({e}; regions: "
                                 f"{self.memory.describe()})") from None
        old = ring.queue
        next_avail = old.state.next_avail if old is not None else ring.base
        try:
            if old is not None:
                next_used = old.state.next_used
            else:
                next_used = int.from_bytes(self.memory.view(used + 2, 2), "little")
            return VirtQueue(ring.index, n, self.memory, desc, avail, used,
                             event_idx=bool(self.features >> VIRTIO_F_EVENT_IDX & 1),
                             indirect=bool(self.features >> VIRTIO_F_INDIRECT_DESC & 1),
                             next_avail=next_avail, next_used=next_used)
        except (VirtQueueError, GuestMemoryError) as e:
            raise VhostUserError(f"ring {ring.index}: {e}") from None

    def _start_ring(self, ring: Vring) -> None:
        device = self.device
        with device.lock:
            ring.queue = self._make_queue(ring)
            ring.started = True
            log.info("vhost-user: ring %d started: %s", ring.index, ring.queue.describe())
            if not device.active:
                device.activate(self.memory, [None] * len(self.rings), self._interrupt,
                                self.features & ~bits(P.VHOST_USER_F_PROTOCOL_FEATURES))
            if not self.features >> P.VHOST_USER_F_PROTOCOL_FEATURES & 1:
                ring.enabled = True          # without protocol features rings start enabled
            self._publish(ring)
        self.iothread.add_reader(ring.kick_fd, lambda: self._kick(ring))
        if ring.enabled:
            device.notify(ring.index)

    def _publish(self, ring: Vring) -> None:
        """Show the device the queue of a started and enabled ring (under the device lock)."""
        queues = self.device.queues
        if ring.index < len(queues):
            queues[ring.index] = ring.queue if ring.started and ring.enabled else None

    def _stop_ring(self, ring: Vring) -> None:
        if not ring.started:
            return
        self.iothread.remove_reader(ring.kick_fd)
        with self.device.lock:
            self.device.quiesce()
            if ring.queue is not None:
                ring.base = ring.queue.state.next_avail
            ring.started = False
            self._publish(ring)
            ring.queue = None

    def _rebuild_queues(self) -> None:
        """The memory table or ring addresses changed under running rings: new views, same indices."""
        for ring in self.rings:
            if ring.started:
                ring.queue = self._make_queue(ring)
                self._publish(ring)

    def _kick(self, ring: Vring) -> None:
        try:
            os.eventfd_read(ring.kick_fd)
        except (BlockingIOError, OSError):
            pass
        if ring.started and ring.enabled:
            self.device.notify(ring.index)

    def _interrupt(self, index: int) -> None:
        fd = self.rings[index].call_fd if 0 <= index < len(self.rings) else -1
        if fd >= 0:
            try:
                os.eventfd_write(fd, 1)
            except OSError as e:
                log.warning("vhost-user: cannot signal ring %d: %s", index, e)

    def _device_error(self) -> None:
        for ring in self.rings:
            if ring.err_fd >= 0:
                try:
                    os.eventfd_write(ring.err_fd, 1)
                except OSError:
                    pass

    # --- configuration space ---------------------------------------------------------------------------------
    def _get_config(self, msg: Message) -> bytes:
        offset, size, flags = msg.unpack(P.CONFIG_HEADER)
        if size > P.VHOST_USER_MAX_CONFIG_SIZE or offset > P.VHOST_USER_MAX_CONFIG_SIZE:
            log.warning("vhost-user: GET_CONFIG of %d bytes at %d refused", size, offset)
            return P.CONFIG_HEADER.pack(offset, 0, flags)
        data = bytes(self.device.config_read(offset + i, 1) for i in range(size))
        return P.CONFIG_HEADER.pack(offset, size, flags) + data

    def _set_config(self, msg: Message) -> None:
        offset, size, flags = msg.unpack(P.CONFIG_HEADER)
        data = msg.payload[P.CONFIG_HEADER.size:P.CONFIG_HEADER.size + size]
        if size > P.VHOST_USER_MAX_CONFIG_SIZE or len(data) != size:
            raise VhostUserError(f"SET_CONFIG of {size} bytes with {len(data)} bytes of data")
        if size:
            self.device.config_write(offset, size, int.from_bytes(data, "little"))
