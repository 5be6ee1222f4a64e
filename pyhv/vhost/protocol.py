"""The vhost-user wire protocol (QEMU docs/interop/vhost-user.rst): message framing over a Unix stream socket with
file descriptors in SCM_RIGHTS ancillary data, request ids, payload layouts, feature bits.

A message is a 12-byte header (request u32, flags u32, size u32; native byte order) and `size` bytes of payload.
Flags: bits 0-1 the version (1), bit 2 REPLY (a back end's reply), bit 3 NEED_REPLY (REPLY_ACK).
Used by both halves: `pyhv.vhost.backend` (pyhv serves its virtio back ends) and the front end.
"""
from __future__ import annotations

import array
import os
import socket
import struct
from dataclasses import dataclass, field

from pyhv.errors import PyhvError

# --- requests from the front end (vhost-user.rst "Front-end message types") ---------------------------------------
VHOST_USER_GET_FEATURES = 1
VHOST_USER_SET_FEATURES = 2
VHOST_USER_SET_OWNER = 3
VHOST_USER_RESET_OWNER = 4
VHOST_USER_SET_MEM_TABLE = 5
VHOST_USER_SET_LOG_BASE = 6
VHOST_USER_SET_LOG_FD = 7
VHOST_USER_SET_VRING_NUM = 8
VHOST_USER_SET_VRING_ADDR = 9
VHOST_USER_SET_VRING_BASE = 10
VHOST_USER_GET_VRING_BASE = 11
VHOST_USER_SET_VRING_KICK = 12
VHOST_USER_SET_VRING_CALL = 13
VHOST_USER_SET_VRING_ERR = 14
VHOST_USER_GET_PROTOCOL_FEATURES = 15
VHOST_USER_SET_PROTOCOL_FEATURES = 16
VHOST_USER_GET_QUEUE_NUM = 17
VHOST_USER_SET_VRING_ENABLE = 18
VHOST_USER_SEND_RARP = 19
VHOST_USER_NET_SET_MTU = 20
VHOST_USER_SET_SLAVE_REQ_FD = 21
VHOST_USER_IOTLB_MSG = 22
VHOST_USER_SET_VRING_ENDIAN = 23
VHOST_USER_GET_CONFIG = 24
VHOST_USER_SET_CONFIG = 25
VHOST_USER_GET_INFLIGHT_FD = 31
VHOST_USER_SET_INFLIGHT_FD = 32
VHOST_USER_RESET_DEVICE = 34
VHOST_USER_VRING_KICK = 35
VHOST_USER_GET_MAX_MEM_SLOTS = 36
VHOST_USER_ADD_MEM_REG = 37
VHOST_USER_REM_MEM_REG = 38
VHOST_USER_SET_STATUS = 39
VHOST_USER_GET_STATUS = 40

REQUEST_NAMES = {v: k[len("VHOST_USER_"):] for k, v in dict(globals()).items()
                 if k.startswith("VHOST_USER_") and isinstance(v, int)}

# --- header flags ---------------------------------------------------------------------------------------------------
VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3

# --- feature bits ------------------------------------------------------------------------------------------------------
VHOST_USER_F_PROTOCOL_FEATURES = 30
VHOST_F_LOG_ALL = 26

VHOST_USER_PROTOCOL_F_MQ = 0
VHOST_USER_PROTOCOL_F_LOG_SHMFD = 1
VHOST_USER_PROTOCOL_F_RARP = 2
VHOST_USER_PROTOCOL_F_REPLY_ACK = 3
VHOST_USER_PROTOCOL_F_MTU = 4
VHOST_USER_PROTOCOL_F_SLAVE_REQ = 5
VHOST_USER_PROTOCOL_F_CONFIG = 9
VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD = 12
VHOST_USER_PROTOCOL_F_RESET_DEVICE = 13
VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS = 14
VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15
VHOST_USER_PROTOCOL_F_STATUS = 16

# --- payload layouts ------------------------------------------------------------------------------------------------
HEADER = struct.Struct("=III")                 # request, flags, size
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")             # index, num
VRING_ADDR = struct.Struct("=IIQQQQ")          # index, flags, desc, used, avail, log (front-end user addresses)
MEMORY_HEADER = struct.Struct("=II")           # nregions, padding
MEMORY_REGION = struct.Struct("=QQQQ")         # guest address, size, user address, mmap offset
SINGLE_REGION = struct.Struct("=QQQQQ")        # padding, then a region
CONFIG_HEADER = struct.Struct("=III")          # offset, size, flags

VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x1 << 8
VHOST_MEMORY_BASELINE_NREGIONS = 8
VHOST_USER_MAX_CONFIG_SIZE = 256
VHOST_USER_CONFIG_MIGRATION = 1
MAX_PAYLOAD = 4096
MAX_FDS = 8


class VhostUserError(PyhvError):
    """A vhost-user peer broke the protocol, or the connection failed."""


@dataclass
class Message:
    request: int
    flags: int = VHOST_USER_VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return REQUEST_NAMES.get(self.request, f"request {self.request}")

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []

    def u64(self) -> int:
        return self.unpack(U64)[0]

    def unpack(self, st: struct.Struct) -> tuple:
        if len(self.payload) < st.size:
            raise VhostUserError(f"{self.name}: payload of {len(self.payload)} bytes, expected {st.size}")
        return st.unpack_from(self.payload)


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk, anc, msg_flags, _ = sock.recvmsg(n - len(data), socket.CMSG_SPACE(MAX_FDS * 4))
        for level, ctype, cdata in anc:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(cdata[:len(cdata) - len(cdata) % a.itemsize])
                fds.extend(a)
        if msg_flags & socket.MSG_CTRUNC:
            raise VhostUserError(f"more than {MAX_FDS} file descriptors with one message")
        if not chunk:
            if data or n == 0:
                raise VhostUserError(f"connection closed in the middle of a message ({len(data)} of {n} bytes)")
            raise EOFError
        data += chunk
    return bytes(data)


def recv_message(sock: socket.socket) -> Message:
    """Read one message (blocking; a peer that sends a truncated message hits the socket's timeout).
    Raises EOFError on a clean end of the connection, VhostUserError on a malformed message."""
    fds: list[int] = []
    try:
        header = _recv_exact(sock, HEADER.size, fds)
        request, flags, size = HEADER.unpack(header)
        if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
            raise VhostUserError(f"message with version {flags & VHOST_USER_VERSION_MASK} (request {request}), "
                                 f"expected {VHOST_USER_VERSION}")
        if size > MAX_PAYLOAD:
            raise VhostUserError(f"message {REQUEST_NAMES.get(request, request)} with a {size}-byte payload")
        payload = _recv_exact(sock, size, fds) if size else b""
    except socket.timeout:
        _close_all(fds)
        raise VhostUserError("truncated message (the peer stopped sending in the middle of it)") from None
    except BaseException:
        _close_all(fds)
        raise
    return Message(request, flags, payload, fds)


def send_message(sock: socket.socket, msg: Message) -> None:
    data = HEADER.pack(msg.request, msg.flags, len(msg.payload)) + msg.payload
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", msg.fds).tobytes())] if msg.fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
