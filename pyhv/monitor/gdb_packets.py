"""The framing of GDB's remote serial protocol (gdb's manual, "Remote Protocol" / "Overview").

A packet is `$DATA#CS`: CS is the sum of DATA's bytes modulo 256 in two hex digits. Inside DATA the bytes
`#`, `$`, `}` and `*` travel escaped as `}` followed by the byte XOR 0x20. The receiver answers `+` (good) or
`-` (bad checksum: send it again), unless both sides switched acknowledgements off (QStartNoAckMode). A lone
0x03 between packets is an interrupt request (gdb's Ctrl-C).

`PacketReader` is fed whatever the socket gave and returns what it found, so a client that sends garbage, splits
packets at any byte or vanishes half way never confuses the stub: garbage outside a packet is skipped, a bad
checksum or an oversized packet is reported (the stub NAKs it), and the reader starts over at the next `$`.
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_PACKET = 0x4000            # what the stub advertises (PacketSize); longer input is refused, not buffered
INTERRUPT = 0x03
_ESCAPED = frozenset(b"#$}*")


@dataclass(frozen=True)
class Event:
    kind: str                  # "packet" | "bad" | "interrupt" | "ack" | "nak"
    data: bytes = b""          # the packet's unescaped data; for "bad", why


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    if not any(b in _ESCAPED for b in data):
        return data
    out = bytearray()
    for b in data:
        if b in _ESCAPED:
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """The binary data of an `X` or `vFile` packet: `}` escapes the next byte. A trailing lone `}` is dropped."""
    if b"}" not in data:
        return data
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == 0x7D:
            nxt = next(it, None)
            if nxt is None:
                break
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def frame(data: bytes) -> bytes:
    """`$DATA#CS` with DATA escaped, ready to send."""
    body = escape(data)
    return b"$" + body + b"#%02x" % checksum(body)


class PacketReader:
    """An incremental parser of the byte stream from gdb."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._body: bytearray | None = None      # inside a packet: its (still escaped) data so far
        self._sum: bytearray | None = None       # after '#': the checksum digits so far
        self._overflow = False

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for b in data:
            if self._sum is not None:
                self._sum.append(b)
                if len(self._sum) == 2:
                    events.append(self._finish())
            elif self._body is not None:
                if b == 0x23:                     # '#'
                    self._sum = bytearray()
                elif b == 0x24:                   # '$' inside a packet: the client restarted; so do we
                    events.append(Event("bad", b"packet restarted before its end"))
                    self._start()
                elif len(self._body) >= self.max_packet:
                    self._overflow = True
                else:
                    self._body.append(b)
            elif b == 0x24:
                self._start()
            elif b == 0x2B:                       # '+'
                events.append(Event("ack"))
            elif b == 0x2D:                       # '-'
                events.append(Event("nak"))
            elif b == INTERRUPT:
                events.append(Event("interrupt"))
            # anything else between packets is line noise: skipped
        return events

    def _start(self) -> None:
        self._body, self._sum, self._overflow = bytearray(), None, False

    def _finish(self) -> Event:
        body, digits, overflow = bytes(self._body or b""), bytes(self._sum or b""), self._overflow
        self._body = self._sum = None
        self._overflow = False
        if overflow:
            return Event("bad", b"packet longer than %d bytes" % self.max_packet)
        try:
            expected = int(digits, 16)
        except ValueError:
            return Event("bad", b"checksum is not hex")
        if expected != checksum(body):
            return Event("bad", b"checksum mismatch")
        return Event("packet", unescape(body))
