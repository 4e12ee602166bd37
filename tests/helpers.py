"""Test helpers: a tiny sans-IO NBD *client* and h11-style byte-vector assertions.

The client encodes options and requests and decodes the server's greeting, option
replies and simple/structured replies, so tests can drive a full handshake through
an in-memory pair (h11 ``ConnectionPair``, aioquic ``transfer()``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

from fleeced.nbd import (
    NEED_DATA,
    Command,
    Disconnect,
    Event,
    ExportChosen,
    ExportInfo,
    NbdCmd,
    NbdErrno,
    NbdOpt,
    NbdProtocolError,
    NbdRep,
    Rejected,
    ServerConnection,
)

IHAVEOPT = 0x49484156454F5054
NBDMAGIC = 0x4E42444D41474943
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

MakeEngine = Callable[[], ServerConnection]

# ---------------------------------------------------------------- encoders (client side)


def client_flags(no_zeroes: bool = True, fixed: bool = True) -> bytes:
    return struct.pack(">I", (1 if fixed else 0) | (2 if no_zeroes else 0))


def option(opt: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """IHAVEOPT, option, length (defaults to the real payload length), payload."""
    n = len(payload) if length is None else length
    return struct.pack(">QII", IHAVEOPT, opt, n) + payload


def name_info_payload(name: str | bytes, infos: Sequence[int] = ()) -> bytes:
    """NBD_OPT_INFO / NBD_OPT_GO data."""
    raw = name.encode() if isinstance(name, str) else name
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_payload(name: str | bytes, queries: Sequence[str | bytes]) -> bytes:
    """NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data."""
    raw = name.encode() if isinstance(name, str) else name
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        rq = q.encode() if isinstance(q, str) else q
        out += struct.pack(">I", len(rq)) + rq
    return out


def request(
    cmd: int,
    cookie: int = 1,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
    data: bytes = b"",
    magic: int = REQUEST_MAGIC,
) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + data


# ---------------------------------------------------------------- decoders (client side)


@dataclass(frozen=True)
class OptReply:
    option: int
    type: int
    data: bytes


@dataclass(frozen=True)
class SimpleReply:
    error: int
    cookie: int
    data: bytes = b""


@dataclass(frozen=True)
class Chunk:
    flags: int
    type: int
    cookie: int
    payload: bytes


class Reader:
    """Parses server bytes; methods raise AssertionError when data is short or wrong."""

    def __init__(self, data: bytes = b"") -> None:
        self.buf = bytearray(data)

    def feed(self, out: Sequence[bytes | memoryview]) -> None:
        for part in out:
            self.buf += part

    def _take(self, n: int) -> bytes:
        assert len(self.buf) >= n, f"need {n} bytes, have {len(self.buf)}"
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def empty(self) -> bool:
        return not self.buf

    def greeting(self) -> int:
        magic, ihaveopt, flags = struct.unpack(">QQH", self._take(18))
        assert (magic, ihaveopt) == (NBDMAGIC, IHAVEOPT)
        return int(flags)

    def opt_reply(self) -> OptReply:
        magic, opt, typ, length = struct.unpack(">QIII", self._take(20))
        assert magic == OPTION_REPLY_MAGIC
        return OptReply(opt, typ, self._take(length))

    def opt_replies(self) -> list[OptReply]:
        out = []
        while self.buf:
            out.append(self.opt_reply())
        return out

    def export_name_reply(self, zeroes: bool) -> tuple[int, int]:
        size, flags = struct.unpack(">QH", self._take(10))
        if zeroes:
            assert self._take(124) == bytes(124)
        return int(size), int(flags)

    def simple(self, read_length: int = 0) -> SimpleReply:
        magic, error, cookie = struct.unpack(">IIQ", self._take(16))
        assert magic == SIMPLE_REPLY_MAGIC
        data = self._take(read_length) if read_length and not error else b""
        return SimpleReply(int(error), int(cookie), data)

    def chunk(self) -> Chunk:
        magic, flags, typ, cookie, length = struct.unpack(">IHHQI", self._take(20))
        assert magic == STRUCTURED_REPLY_MAGIC
        return Chunk(int(flags), int(typ), int(cookie), self._take(length))

    def reply_error(self) -> tuple[int, int]:
        """Decode one error reply of either kind -> (cookie, error)."""
        (magic,) = struct.unpack_from(">I", self.buf)
        if magic == SIMPLE_REPLY_MAGIC:
            r = self.simple()
            return r.cookie, r.error
        c = self.chunk()
        assert c.type == 0x8001 and c.flags & 1
        error, msg_len = struct.unpack_from(">IH", c.payload)
        assert len(c.payload) == 6 + msg_len
        return c.cookie, int(error)


# ---------------------------------------------------------------- engines & handshakes

DISK = ExportInfo(name="disk", size=1 << 20, description="test disk")
EXPORTS = {"disk": DISK}


def make_server(*exports: ExportInfo) -> ServerConnection:
    table = {e.name: e for e in (exports or (DISK,))}
    return ServerConnection(table.get, lambda: list(table.values()))


def drain_events(conn: ServerConnection) -> list[Event]:
    """Collect events until NEED_DATA (or a repeated Disconnect)."""
    events: list[Event] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return events
        assert not isinstance(ev, type)
        events.append(ev)
        if isinstance(ev, Disconnect):
            return events


def opened(
    export: ExportInfo = DISK,
    structured: bool = True,
    meta: Sequence[str] = ("base:allocation",),
    others: Sequence[ExportInfo] = (),
) -> ServerConnection:
    """A server in transmission on *export*, after a GO-based handshake."""
    conn = make_server(export, *others)
    conn.data_to_send()
    wire = client_flags()
    if structured:
        wire += option(NbdOpt.STRUCTURED_REPLY)
        if meta:
            wire += option(NbdOpt.SET_META_CONTEXT, meta_payload(export.name, meta))
    wire += option(NbdOpt.GO, name_info_payload(export.name))
    conn.receive_data(wire)
    assert drain_events(conn) == [ExportChosen(export)]
    replies = Reader()
    replies.feed(conn.data_to_send())
    types = [r.type for r in replies.opt_replies()]
    assert types[-1] == NbdRep.ACK
    return conn


def opener(**kwargs: object) -> MakeEngine:
    return lambda: opened(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- h11-style assertions


def _feed_whole(make_engine: MakeEngine, data: bytes) -> tuple[list[Event], bytes]:
    conn = make_engine()
    conn.receive_data(data)
    events = drain_events(conn)
    return events, b"".join(conn.data_to_send())


def assert_parses(
    make_engine: MakeEngine, data: bytes, expected_events: Sequence[Event]
) -> bytes:
    """h11 ``tr()``: whole buffer; one byte at a time; with trailing data appended.

    Byte by byte, the last expected event must appear only with the final byte (and
    NEED_DATA before it).  Returns the reply bytes the engine queued, which must be
    the same whichever way the input was split.
    """
    events, out = _feed_whole(make_engine, data)
    assert events == list(expected_events)

    conn = make_engine()
    got: list[Event] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        new = drain_events(conn)
        if i < len(data) - 1 and len(expected_events) > 0:
            assert len(got) + len(new) < len(expected_events), f"event early at byte {i}"
        got.extend(new)
    assert got == list(expected_events)
    assert b"".join(conn.data_to_send()) == out

    conn = make_engine()
    conn.receive_data(data + b"trailing")
    assert drain_events(conn) == list(expected_events)
    assert conn.trailing_data == b"trailing"
    if not (expected_events and isinstance(expected_events[-1], Disconnect)):
        assert conn.next_event() is NEED_DATA
    return out


def assert_rejects(
    make_engine: MakeEngine, data: bytes, errno: NbdErrno, cmd: int | None = None
) -> None:
    """The request in *data* is refused with exactly *errno* and the error is on the wire."""
    (cookie,) = struct.unpack_from(">Q", data, 8)
    wire_cmd = struct.unpack_from(">H", data, 6)[0] if cmd is None else cmd
    out = assert_parses(make_engine, data, [Rejected(cookie, wire_cmd, errno)])
    reader = Reader(out)
    assert reader.reply_error() == (cookie, errno)
    assert reader.empty()


def assert_fatal(make_engine: MakeEngine, data: bytes, match: str | None = None) -> None:
    """The bytes make the engine raise NbdProtocolError, whole and byte by byte."""
    conn = make_engine()
    conn.receive_data(data)
    with pytest.raises(NbdProtocolError, match=match):
        drain_events(conn)
    # Sticky: raised again.
    with pytest.raises(NbdProtocolError):
        conn.next_event()

    conn = make_engine()
    with pytest.raises(NbdProtocolError, match=match):  # noqa: PT012 - loop is the point
        for i in range(len(data)):
            conn.receive_data(data[i : i + 1])
            drain_events(conn)


def command(
    cmd: NbdCmd, cookie: int = 1, offset: int = 0, length: int = 0, flags: int = 0, **kw: object
) -> Command:
    from fleeced.nbd import NbdCmdFlag

    data = kw.get("data")
    assert data is None or isinstance(data, bytes)
    return Command(cookie, cmd, NbdCmdFlag(flags), offset, length, data)
