"""Device state to JSON and back into the live objects: what snapshots and live migration write for each device.

A device's mutable state is one dataclass (DESIGN.md); `encode` turns it into JSON-ready values (dataclasses,
bytes/bytearray, deque, tuple, set, dict with any keys, and plain scalars) and `decode` writes saved values back into the
device's own objects, so references other code holds (a register bank's state) stay valid. A field the live
dataclass does not have, or a type it cannot write, is a `StateError`.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

from pyhv.errors import PyhvError


class StateError(PyhvError):
    """State that cannot be saved or restored (the message says which, and why)."""


def encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__dataclass__": {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes__": bytes(value).hex()}
    if isinstance(value, deque):
        return {"__deque__": [encode(v) for v in value]}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {"__set__": [encode(v) for v in sorted(value, key=repr)]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {"__dict__": [[encode(k), encode(v)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise StateError(f"cannot save a {type(value).__name__} ({value!r:.60})")


def decode(data: Any, current: Any = None) -> Any:
    """The value `data` encodes; a dataclass is restored into `current` (the live object) and returned."""
    if isinstance(data, list):               # a list of dataclasses decodes into the live list's elements
        live = current if isinstance(current, list) and len(current) == len(data) else [None] * len(data)
        return [decode(v, c) for v, c in zip(data, live)]
    if not isinstance(data, dict):
        return data
    if "__dataclass__" in data:
        if current is None or not dataclasses.is_dataclass(current):
            raise StateError("saved state has a structure this pyhv's device does not")
        names = {f.name for f in dataclasses.fields(current)}
        for name, value in data["__dataclass__"].items():
            if name not in names:
                raise StateError(f"{type(current).__name__} has no field {name!r} (snapshot of another pyhv?)")
            setattr(current, name, decode(value, getattr(current, name)))
        return current
    if "__bytes__" in data:
        raw = bytes.fromhex(data["__bytes__"])
        return bytearray(raw) if isinstance(current, bytearray) else raw
    if "__deque__" in data:
        return deque(decode(v) for v in data["__deque__"])
    if "__tuple__" in data:
        return tuple(decode(v) for v in data["__tuple__"])
    if "__set__" in data:
        return set(decode(v) for v in data["__set__"])
    if "__dict__" in data:
        return {decode(k): decode(v) for k, v in data["__dict__"]}
    raise StateError(f"unknown value in the state file: {sorted(data)[:3]}")
