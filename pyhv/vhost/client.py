"""The front-end side of the vhost-user protocol: a connection to a back end and one method per message.

Used by pyhv's vhost-user devices (the data plane lives in the back end; pyhv hands it guest memory, kick and call
eventfds) and by tests that drive a back end directly.
"""
from __future__ import annotations

import socket
import time

from pyhv.vhost import protocol as P
from pyhv.vhost.protocol import Message, VhostUserError


class VhostUserClient:
    def __init__(self, path: str, timeout: float = 10.0, connect_wait: float = 0.0) -> None:
        """Connect to the back end's socket; retry for up to `connect_wait` seconds while it is not there yet."""
        self.path = path
        deadline = time.monotonic() + connect_wait
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if time.monotonic() >= deadline:
                    raise VhostUserError(f"cannot connect to vhost-user back end {path}: {e.strerror}",
                                         "is the back end running?") from None
                time.sleep(0.05)
        sock.settimeout(timeout)
        self.sock = sock
        self.protocol_features = 0

    def close(self) -> None:
        self.sock.close()

    # --- framing ---------------------------------------------------------------------------------------------
    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None, need_reply: bool = False) -> None:
        flags = P.VHOST_USER_VERSION | (P.VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
        P.send_message(self.sock, Message(request, flags, payload, list(fds or [])))

    def call(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> bytes:
        """Send a request that has a reply, and return the reply's payload."""
        self.send(request, payload, fds)
        return self._reply(request)

    def _reply(self, request: int) -> bytes:
        try:
            msg = P.recv_message(self.sock)
        except EOFError:
            raise VhostUserError(f"back end closed the connection instead of answering "
                                 f"{P.REQUEST_NAMES.get(request, request)}") from None
        msg.close_fds()
        if msg.request != request or not msg.flags & P.VHOST_USER_REPLY_MASK:
            raise VhostUserError(f"back end answered {msg.name} (flags {msg.flags:#x}) to "
                                 f"{P.REQUEST_NAMES.get(request, request)}")
        return msg.payload

    def request(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        """Send a request without a reply; with REPLY_ACK, wait for the back end's acknowledgement."""
        if self.protocol_features >> P.VHOST_USER_PROTOCOL_F_REPLY_ACK & 1:
            self.send(request, payload, fds, need_reply=True)
            status = P.U64.unpack(self._reply(request)[:8])[0]
            if status:
                raise VhostUserError(f"back end refused {P.REQUEST_NAMES.get(request, request)} ({status})")
        else:
            self.send(request, payload, fds)

    # --- messages ------------------------------------------------------------------------------------------
    def get_features(self) -> int:
        return P.U64.unpack(self.call(P.VHOST_USER_GET_FEATURES))[0]

    def set_features(self, features: int) -> None:
        self.request(P.VHOST_USER_SET_FEATURES, P.U64.pack(features))

    def get_protocol_features(self) -> int:
        return P.U64.unpack(self.call(P.VHOST_USER_GET_PROTOCOL_FEATURES))[0]

    def set_protocol_features(self, features: int) -> None:
        self.send(P.VHOST_USER_SET_PROTOCOL_FEATURES, P.U64.pack(features))
        self.protocol_features = features

    def set_owner(self) -> None:
        self.request(P.VHOST_USER_SET_OWNER)

    def get_queue_num(self) -> int:
        return P.U64.unpack(self.call(P.VHOST_USER_GET_QUEUE_NUM))[0]

    def get_max_mem_slots(self) -> int:
        return P.U64.unpack(self.call(P.VHOST_USER_GET_MAX_MEM_SLOTS))[0]

    def set_mem_table(self, regions: list[tuple[int, int, int, int, int]]) -> None:
        """regions: (gpa, size, uaddr, mmap_offset, fd)."""
        payload = P.MEMORY_HEADER.pack(len(regions), 0) + b"".join(
            P.MEMORY_REGION.pack(gpa, size, uaddr, off) for gpa, size, uaddr, off, _ in regions)
        self.request(P.VHOST_USER_SET_MEM_TABLE, payload, [r[4] for r in regions])

    def add_mem_reg(self, gpa: int, size: int, uaddr: int, mmap_offset: int, fd: int) -> None:
        self.request(P.VHOST_USER_ADD_MEM_REG, P.SINGLE_REGION.pack(0, gpa, size, uaddr, mmap_offset), [fd])

    def rem_mem_reg(self, gpa: int, size: int, uaddr: int) -> None:
        self.request(P.VHOST_USER_REM_MEM_REG, P.SINGLE_REGION.pack(0, gpa, size, uaddr, 0))

    def set_vring_num(self, index: int, num: int) -> None:
        self.request(P.VHOST_USER_SET_VRING_NUM, P.VRING_STATE.pack(index, num))

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int) -> None:
        self.request(P.VHOST_USER_SET_VRING_ADDR, P.VRING_ADDR.pack(index, 0, desc, used, avail, 0))

    def set_vring_base(self, index: int, base: int) -> None:
        self.request(P.VHOST_USER_SET_VRING_BASE, P.VRING_STATE.pack(index, base))

    def get_vring_base(self, index: int) -> int:
        return P.VRING_STATE.unpack(self.call(P.VHOST_USER_GET_VRING_BASE, P.VRING_STATE.pack(index, 0)))[1]

    def _vring_fd(self, request: int, index: int, fd: int | None) -> None:
        value = index | (P.VHOST_USER_VRING_NOFD_MASK if fd is None else 0)
        self.request(request, P.U64.pack(value), [] if fd is None else [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_fd(P.VHOST_USER_SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_fd(P.VHOST_USER_SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_fd(P.VHOST_USER_SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.request(P.VHOST_USER_SET_VRING_ENABLE, P.VRING_STATE.pack(index, int(enable)))

    def get_config(self, offset: int, size: int) -> bytes:
        reply = self.call(P.VHOST_USER_GET_CONFIG, P.CONFIG_HEADER.pack(offset, size, 0) + bytes(size))
        _, got, _ = P.CONFIG_HEADER.unpack_from(reply)
        if got != size:
            raise VhostUserError(f"back end answered GET_CONFIG for {size} bytes with {got}")
        return reply[P.CONFIG_HEADER.size:P.CONFIG_HEADER.size + size]

    def set_config(self, offset: int, data: bytes) -> None:
        self.request(P.VHOST_USER_SET_CONFIG, P.CONFIG_HEADER.pack(offset, len(data), 0) + data)

    def reset_device(self) -> None:
        self.request(P.VHOST_USER_RESET_DEVICE)
