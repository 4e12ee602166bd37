"""Split a QMP byte stream into JSON messages (sans-IO).

QMP is not line-framed: clients such as ``qemu.qmp`` send one JSON object
with no trailing newline.  Like QEMU's json-streamer, this splitter tracks
bracket depth outside strings and cuts a message whenever the depth returns
to zero.  Text at depth zero (not inside any object) is cut at a newline, so
a garbage line still yields one message (which then fails to parse).
"""

from __future__ import annotations

from typing import Final

#: Longest accepted message, bytes.
MAX_MESSAGE: Final = 1024 * 1024

_OPEN = frozenset(b"{[")
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
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        """Consume DATA; return the messages it completed.

        :raise MessageTooLong: when a message grows past the limit.
        """
        out: list[bytes] = []
        for byte in data:
            self._buf.append(byte)
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
        if text:
            out.append(text)
