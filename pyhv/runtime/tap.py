"""Host tap devices (/dev/net/tun) for the network back ends (virtio-net, e1000): open one with a vnet header,
and parse the MAC addresses the front doors give.

The tap is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, non-blocking, with a 12-byte vnet header
(TUNSETVNETHDRSZ): every frame read or written starts with virtio 1's `struct virtio_net_hdr` (flags, gso_type,
hdr_len, gso_size, csum_start, csum_offset, num_buffers).
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

from pyhv.errors import PyhvError

VNET_HDR_SIZE = 12

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08


class TapError(PyhvError):
    """The tap device cannot be opened or configured."""


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        mac = b""
    if len(parts) != 6 or len(mac) != 6 or any(len(p) != 2 for p in parts):
        raise PyhvError(f"MAC address {text!r} is not six hex bytes like 52:54:00:12:34:56")
    if mac[0] & 1:
        raise PyhvError(f"MAC address {text} is a multicast address")
    return mac


def open_tap(name: str) -> tuple[int, str]:
    """Open (or create) tap `name` with a 12-byte vnet header; returns (fd, actual name)."""
    if len(name.encode()) >= 16:
        raise TapError(f"tap name {name!r} is longer than 15 bytes")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise TapError(f"cannot open /dev/net/tun: {e.strerror}", "load the tun module, run as root") from None
    try:
        ifr = bytearray(struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, bytearray(struct.pack("i", VNET_HDR_SIZE)))
    except OSError as e:
        os.close(fd)
        hint = "is it in use by another process, or a tun (not tap) device?" if e.errno == errno.EBUSY else None
        raise TapError(f"cannot attach tap {name}: {e.strerror}", hint) from None
    return fd, ifr[:16].rstrip(b"\0").decode()
