"""Receive buffer with a read offset (wsproto ``Buffer`` idea, h11 ``ReceiveBuffer``).

Bytes are appended to one :class:`bytearray`; consuming only advances an offset, and
the consumed prefix is dropped on the next :meth:`feed`.  Parsers *peek* with
``unpack_from(buffer.data, buffer.pos)`` and only :meth:`consume` once a whole
message is present, so a partial message never changes state (commit/rollback
without copying).  Total work is linear in the bytes received.
"""

from __future__ import annotations

__all__ = ["ReceiveBuffer"]


class ReceiveBuffer:
    """Growable byte buffer with O(1) consumption."""

    __slots__ = ("data", "pos")

    def __init__(self) -> None:
        #: The underlying storage; valid bytes are ``data[pos:]``.  While the
        #: buffer holds exactly one received ``bytes`` chunk it *is* that chunk
        #: (no copy); it becomes a bytearray when more must be appended.
        self.data: bytes | bytearray = bytearray()
        #: Read offset into :attr:`data`.
        self.pos = 0

    def __len__(self) -> int:
        return len(self.data) - self.pos

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Append *chunk*, first dropping the consumed prefix (if any).

        The compaction copies only the unconsumed tail, which is shorter than one
        message, so each byte is moved at most a bounded number of times.
        """
        if self.pos == len(self.data):
            # Nothing unconsumed: adopt an immutable chunk as it is, so WRITE
            # payloads inside it can be handed out without copying.
            self.pos = 0
            self.data = chunk if isinstance(chunk, bytes) else bytearray(chunk)
            return
        if isinstance(self.data, bytes):
            with memoryview(self.data) as view:
                self.data = bytearray(view[self.pos :])  # copies only the tail
        elif self.pos:
            del self.data[: self.pos]
        self.pos = 0
        self.data += chunk

    def skip(self, n: int) -> None:
        """Consume *n* bytes without copying them.  Caller checked ``len(self) >= n``."""
        self.pos += n

    def take(self, n: int) -> bytes:
        """Consume and return *n* bytes (one copy).  Caller checked ``len(self) >= n``."""
        start = self.pos
        with memoryview(self.data) as view:
            out = bytes(view[start : start + n])
        self.pos = start + n
        return out

    def take_view(self, n: int) -> bytes | memoryview:
        """Consume *n* bytes; zero-copy (a view) when the storage is immutable.

        Caller checked ``len(self) >= n``.
        """
        if isinstance(self.data, bytes):
            start = self.pos
            self.pos = start + n
            return memoryview(self.data)[start : start + n]
        return self.take(n)

    def peek(self) -> bytes:
        """Return a copy of all unconsumed bytes without consuming them."""
        return bytes(self.data[self.pos :])
