"""The QMP input splitter: JSON values back to back, in any chunking, with errors that never stop the stream."""
from __future__ import annotations

import json

from hypothesis import given, strategies as st

from pyhv.monitor.jsonstream import JsonStream, JsonStreamError


def feed_all(chunks, **kw):
    stream = JsonStream(**kw)
    out = []
    for chunk in chunks:
        out.extend(stream.feed(chunk))
    return out


def test_objects_back_to_back_without_newlines():
    data = b'{"execute": "a"}{"execute": "b", "id": 1}  {"x": [1, {"y": "}"}]}'
    assert feed_all([data]) == [{"execute": "a"}, {"execute": "b", "id": 1}, {"x": [1, {"y": "}"}]}]


def test_an_object_split_at_every_byte():
    data = b'{"execute": "human-monitor-command", "arguments": {"command-line": "info \\"mtree\\" {"}}'
    assert feed_all([data[i:i + 1] for i in range(len(data))]) == [json.loads(data)]


def test_escaped_backslash_before_a_closing_quote_is_split_across_chunks():
    data = b'{"a": "x\\\\"}{"b": 2}'
    cut = data.index(b"\\\\") + 1
    assert feed_all([data[:cut], data[cut:]]) == [{"a": "x\\"}, {"b": 2}]


def test_malformed_value_is_one_error_and_the_next_value_still_parses():
    out = feed_all([b'{"execute": oops}{"execute": "ok"}'])
    assert isinstance(out[0], JsonStreamError) and "JSON parse error" in out[0].desc
    assert out[1] == {"execute": "ok"}


def test_stray_tokens_and_scalars_are_reported_not_fatal():
    out = feed_all([b'garbage ] 42 "str" {"execute": "ok"}'])
    assert [type(x) for x in out] == [JsonStreamError, JsonStreamError, int, str, dict]
    assert out[-1] == {"execute": "ok"}


def test_oversized_message_is_skipped_without_being_stored():
    big = b'{"execute": "' + b"x" * 5000 + b'"}'
    stream = JsonStream(max_size=1000)
    out = stream.feed(big[:3000]) + stream.feed(big[3000:]) + stream.feed(b'{"execute": "ok"}')
    assert isinstance(out[0], JsonStreamError) and "exceeds 1000 bytes" in out[0].desc
    assert out[1] == {"execute": "ok"}
    assert len(stream._value) == 0


def test_nesting_deeper_than_the_limit_is_an_error():
    out = feed_all([b"[" * 50 + b"]" * 50 + b'{"a": 1}'], max_depth=10)
    assert isinstance(out[0], JsonStreamError) and "nesting" in out[0].desc
    assert out[1] == {"a": 1}


def test_invalid_utf8_is_a_parse_error():
    out = feed_all([b'{"a": "\xff\xfe"}{"b": 1}'])
    assert isinstance(out[0], JsonStreamError)
    assert out[1] == {"b": 1}


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                           lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)


@given(st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), min_size=1, max_size=5),
       st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=20))
def test_any_objects_in_any_chunking_come_back_equal(objects, sizes):
    data = b"".join(json.dumps(o).encode() for o in objects)
    chunks, pos, i = [], 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        chunks.append(data[pos:pos + size])
        pos, i = pos + size, i + 1
    assert feed_all(chunks) == objects
