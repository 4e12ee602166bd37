"""Control-socket framing (QMP streams JSON without newlines) and argument checks."""

from __future__ import annotations

import pytest

from fleeced.control.args import parse_size
from fleeced.control.framing import JsonSplitter, MessageTooLong

CASES = [
    # qemu.qmp sends objects with no trailing newline
    (b'{"execute": "qmp_capabilities", "arguments": {}}',
     [b'{"execute": "qmp_capabilities", "arguments": {}}']),
    # two messages back to back, braces inside strings, escaped quotes
    (b'{"a": "}{"}{"b": "\\"}"}\n', [b'{"a": "}{"}', b'{"b": "\\"}"}']),
    # garbage at depth zero is cut at the newline
    (b"not json\n{}", [b"not json", b"{}"]),
    (b"  \n\n", []),
]


@pytest.mark.parametrize(("data", "expected"), CASES)
def test_split_whole_and_byte_by_byte(data: bytes, expected: list[bytes]) -> None:
    assert JsonSplitter().feed(data) == expected
    s = JsonSplitter()
    out: list[bytes] = []
    for i in range(len(data)):
        out += s.feed(data[i:i + 1])
    assert out == expected


def test_trailing_partial_message_stays_buffered() -> None:
    s = JsonSplitter()
    assert s.feed(b'{"execute": "x"}{"exec') == [b'{"execute": "x"}']
    assert s.feed(b'ute": "y"}') == [b'{"execute": "y"}']


def test_too_long() -> None:
    s = JsonSplitter(limit=100)
    with pytest.raises(MessageTooLong):
        s.feed(b"{" + b" " * 200)
    with pytest.raises(MessageTooLong):
        JsonSplitter(limit=100).feed(b"x" * 101)


@pytest.mark.parametrize(("text", "value"), [
    ("65536", 65536), ("64K", 65536), ("64k", 65536), ("1M", 1 << 20), ("2MiB", 2 << 20),
    ("1.5G", 3 << 29), ("16MB", 16 << 20), ("0", 0),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "K", "12Q", "-1", "1..5M", "abc"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_pending_says_a_message_is_half_way() -> None:
    """What the control server times: a message begun and not finished."""
    sp = JsonSplitter()
    assert not sp.pending
    assert sp.feed(b"  \r\n") == [] and not sp.pending  # white space starts nothing
    assert sp.feed(b'{"execute": ') == [] and sp.pending
    assert sp.feed(b'"x"}') == [b'{"execute": "x"}'] and not sp.pending
    assert sp.feed(b'{"a": 1}{"b"') == [b'{"a": 1}'] and sp.pending
    assert sp.feed(b": 2}\n") == [b'{"b": 2}'] and not sp.pending
    assert sp.feed(b"garbage") == [] and sp.pending
    assert sp.feed(b"\n") == [b"garbage"] and not sp.pending
