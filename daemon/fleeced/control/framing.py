"""Split a QMP byte stream into JSON messages (sans-IO).

QMP is not line-framed: clients such as ``qemu.qmp`` send one JSON object
with no trailing newline.  Like QEMU's json-streamer, this splitter tracks
bracket depth outside strings and cuts a message whenever the depth returns
to zero.  Text at depth zero (not inside any object) is cut at a newline, so
a garbage line still yields one message (which then fails to parse).

:func:`nesting_depth` lets the server refuse a message nested deeper than
:data:`MAX_DEPTH` before ``json.loads`` recurses into it.  Pure bytes in and
out: no I/O, no asyncio, no json.
"""

from __future__ import annotations

import itertools
import re
from typing import Final

#: Longest accepted message, bytes.
MAX_MESSAGE: Final = 1024 * 1024

#: Deepest accepted nesting of arrays and objects.  QEMU allows 1024
#: (json-streamer MAX_NESTING), but Python's json, repr and the traceback
#: machinery recurse once per level against a limit of 1000, and no command
#: needs more than a handful of levels.
MAX_DEPTH: Final = 64

# A JSON string, possibly unterminated: brackets inside it do not nest.  The
# unrolled form keeps the match linear.
_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET: Final = bytes(b for b in range(256) if b not in b"[]{}")
_STEP: Final = [1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256)]

_OPEN = frozenset(b"{[")
_SPACE = frozenset(b" \t\r\n")
_CLOSE = frozenset(b"}]")


class MessageTooLong(Exception):
    """A message exceeded :data:`MAX_MESSAGE`; the peer must be disconnected."""


class JsonSplitter:
    """Feed bytes, get complete top-level JSON texts back."""

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._started = False  # a byte other than white space is buffered
        self._limit = limit

    @property
    def pending(self) -> bool:
        """Whether part of a message is buffered (more bytes must finish it)."""
        return self._started

    def feed(self, data: bytes) -> list[bytes]:
        """Consume DATA; return the messages it completed.

        :raise MessageTooLong: when a message grows past the limit.
        """
        out: list[bytes] = []
        for byte in data:
            self._buf.append(byte)
            if not self._started and byte not in _SPACE:
                self._started = True
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif byte == 0x5C:  # backslash
                    self._escape = True
                elif byte == 0x22:  # quote
                    self._in_string = False
            elif byte == 0x22:
                self._in_string = True
            elif byte in _OPEN:
                self._depth += 1
            elif byte in _CLOSE:
                self._depth -= 1
                if self._depth <= 0:
                    self._emit(out)
            elif byte == 0x0A and self._depth == 0:
                self._emit(out)
            if len(self._buf) > self._limit:
                raise MessageTooLong(f"message longer than {self._limit} bytes")
        return out

    def _emit(self, out: list[bytes]) -> None:
        text = bytes(self._buf).strip()
        self._buf.clear()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._started = False
        if text:
            out.append(text)


def nesting_depth(text: bytes) -> int:
    """The deepest nesting of ``[]``/``{}`` in TEXT, outside strings.

    Runs at C speed (a regex, a translate and an accumulate), so checking a
    1 MiB message costs little next to parsing it.
    """
    brackets = _STRING.sub(b"", text).translate(None, _NOT_BRACKET)
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)
