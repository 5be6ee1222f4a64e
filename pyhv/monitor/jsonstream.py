"""Split a byte stream into JSON values, as a QMP server must: clients send objects back to back with no
separator and no trailing newline, so a message ends where its outermost brace closes, never at a newline.

The splitter only tracks strings and bracket depth (cheaply, with one regex search per interesting character);
`json.loads` does the real parsing of each complete value. Errors never stop the stream: a malformed value, a
stray token, a value larger than `max_size` or nested deeper than `max_depth` yields one `JsonStreamError` and
the splitter carries on with the next value (an oversized value is skipped without being stored).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

MAX_MESSAGE = 1 << 20          # bytes in one message
MAX_DEPTH = 1024               # nesting of objects and arrays

_WS = b" \t\r\n"
_STRUCT_RE = re.compile(rb'[{}\[\]"]')     # what matters inside an object or array
_STRING_RE = re.compile(rb'["\\]')        # what matters inside a string
_TOKEN_END_RE = re.compile(rb'[\s{}\[\]"]')


@dataclass
class JsonStreamError:
    """One input value that could not be used; `desc` is for the client (QMP GenericError text)."""
    desc: str


class JsonStream:
    def __init__(self, max_size: int = MAX_MESSAGE, max_depth: int = MAX_DEPTH) -> None:
        self.max_size = max_size
        self.max_depth = max_depth
        self._pending = b""            # unscanned input
        self._value = bytearray()      # the value being collected (dropped once it is too large)
        self._depth = 0
        self._max_seen_depth = 0
        self._in_string = False
        self._escape = False
        self._token = False            # collecting a top-level scalar (a number, keyword or garbage)
        self._oversized = False

    def feed(self, data: bytes) -> list[object]:
        """Consume `data`; returns the complete values (parsed objects or `JsonStreamError`s) in order."""
        out: list[object] = []
        buf = self._pending + data if self._pending else data
        self._pending = b""
        pos, end = 0, len(buf)
        while pos < end:
            if self._in_string:
                pos = self._scan_string(buf, pos)
                if not self._in_string and self._depth == 0:
                    self._finish(out)              # a top-level string
            elif self._depth:
                m = _STRUCT_RE.search(buf, pos)
                stop = m.start() if m else end
                self._collect(buf[pos:stop])
                if not m:
                    pos = end
                    break
                ch = buf[stop]
                self._collect(buf[stop:stop + 1])
                pos = stop + 1
                if ch == 0x22:                     # '"'
                    self._in_string = True
                elif ch in b"{[":
                    self._depth += 1
                    self._max_seen_depth = max(self._max_seen_depth, self._depth)
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        self._finish(out)
            elif self._token:
                m = _TOKEN_END_RE.search(buf, pos)
                if not m:
                    self._collect(buf[pos:])
                    pos = end
                    break
                self._collect(buf[pos:m.start()])
                pos = m.start()
                self._finish(out)
            else:
                ch = buf[pos]
                if ch in _WS:
                    pos += 1
                    continue
                self._collect(buf[pos:pos + 1])
                pos += 1
                if ch in b"{[":
                    self._depth = self._max_seen_depth = 1
                elif ch == 0x22:
                    self._in_string = True
                elif ch in b"}]":
                    self._finish(out)              # a stray closing bracket: an error of its own
                else:
                    self._token = True
        return out

    def _scan_string(self, buf: bytes, pos: int) -> int:
        if self._escape:                          # the escaped character came in this chunk
            self._collect(buf[pos:pos + 1])
            self._escape = False
            return pos + 1
        m = _STRING_RE.search(buf, pos)
        if not m:
            self._collect(buf[pos:])
            return len(buf)
        stop = m.end()
        self._collect(buf[pos:stop])
        if buf[m.start()] == 0x5C:                # backslash: the next character is part of the string
            if stop < len(buf):
                self._collect(buf[stop:stop + 1])
                return stop + 1
            self._escape = True
            return stop
        self._in_string = False
        return stop

    def _collect(self, chunk: bytes) -> None:
        if self._oversized:
            return
        if len(self._value) + len(chunk) > self.max_size:
            self._oversized = True
            self._value = bytearray()
            return
        self._value += chunk

    def _finish(self, out: list[object]) -> None:
        text, oversized, depth = bytes(self._value), self._oversized, self._max_seen_depth
        self._value = bytearray()
        self._oversized = self._token = False
        self._max_seen_depth = 0
        if oversized:
            out.append(JsonStreamError(f"JSON parse error, message exceeds {self.max_size} bytes"))
            return
        if depth > self.max_depth:
            out.append(JsonStreamError(f"JSON parse error, nesting deeper than {self.max_depth}"))
            return
        try:
            out.append(json.loads(text))
        except (ValueError, RecursionError) as e:
            shown = text[:40].decode("utf-8", "replace")
            out.append(JsonStreamError(f"JSON parse error, {getattr(e, 'msg', str(e))} in {shown!r}"))
