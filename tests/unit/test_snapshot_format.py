"""The snapshot format without a VM: device state to JSON and back into live objects, and every way a state file
is refused."""
import json
from collections import deque
from dataclasses import dataclass, field

import pytest

from pyhv.devices.uart16550 import UartState
from pyhv.machine.snapshot import FORMAT, VERSION, SnapshotError, decode, encode, load_state


@dataclass
class Inner:
    level: bool = False
    data: bytes = b""


@dataclass
class Outer:
    count: int = 0
    ratio: float = 0.5
    name: str = "x"
    ram: bytearray = field(default_factory=lambda: bytearray(4))
    queue: deque = field(default_factory=deque)
    pairs: dict = field(default_factory=dict)
    seen: set = field(default_factory=set)
    inner: Inner = field(default_factory=Inner)
    last: int | None = None


def test_state_round_trips_into_the_live_object():
    saved = Outer(7, 0.25, "y", bytearray(b"\x01\x02\x03\x04"), deque([(1, True), (2, False)]), {3: "c"},
                  {5, 9}, Inner(True, b"\xff"), 9)
    text = json.dumps(encode(saved))
    live = Outer()
    inner, ram = live.inner, live.ram
    assert decode(json.loads(text), live) is live
    assert live == saved
    assert live.inner is inner and isinstance(live.ram, bytearray) and ram is not live.ram
    assert isinstance(live.queue, deque) and live.queue[0] == (1, True)


def test_a_real_device_state_round_trips():
    uart = UartState(lcr=0x83, rx_fifo=deque(b"abc"), tx_bytes=12)
    live = UartState()
    decode(json.loads(json.dumps(encode(uart))), live)
    assert live == uart


def test_unknown_fields_and_values_are_refused():
    with pytest.raises(SnapshotError, match="no field 'nope'"):
        decode({"__dataclass__": {"nope": 1}}, Outer())
    with pytest.raises(SnapshotError, match="cannot save a object"):
        encode(Outer(name=object()))  # type: ignore[arg-type]


def _write(tmp_path, outer) -> str:
    (tmp_path / "state.json").write_text(outer if isinstance(outer, str) else json.dumps(outer))
    return str(tmp_path)


def _good_body() -> dict:
    return {"format": FORMAT, "version": VERSION, "config": {}}


def _sealed(body: dict) -> dict:
    import hashlib
    return {"sha256": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest(), "body": body}


def test_a_good_state_file_loads(tmp_path):
    assert load_state(_write(tmp_path, _sealed(_good_body())))["version"] == VERSION


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    ('{"sha256": "ab", "body": {"form', "truncated"),
    ("[1, 2]", "not a pyhv snapshot state file"),
])
def test_unreadable_state_files_are_refused(tmp_path, content, message):
    if content is not None:
        _write(tmp_path, content)
    with pytest.raises(SnapshotError, match=message):
        load_state(str(tmp_path))


def test_a_corrupted_state_file_is_refused(tmp_path):
    outer = _sealed(_good_body())
    outer["body"]["config"] = {"memory": 1}
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        load_state(_write(tmp_path, outer))


def test_newer_versions_and_other_formats_are_refused(tmp_path):
    with pytest.raises(SnapshotError, match=f"version {VERSION + 1} .this pyhv reads {VERSION}"):
        load_state(_write(tmp_path, _sealed({**_good_body(), "version": VERSION + 1})))
    with pytest.raises(SnapshotError, match="not a pyhv snapshot .format 'qemu'"):
        load_state(_write(tmp_path, _sealed({**_good_body(), "format": "qemu"})))


def test_a_list_of_dataclasses_decodes_into_the_live_elements():
    live = [Inner(), Inner()]
    first = live[0]
    result = decode(json.loads(json.dumps(encode([Inner(True, b"a"), Inner(False, b"b")]))), live)
    assert result == [Inner(True, b"a"), Inner(False, b"b")] and result[0] is first
