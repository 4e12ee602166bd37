"""The sans-IO NBD client role (fleeced.nbd.client): byte vectors, and the client
driven against the project's own server engine in memory (aioquic-style pair).

Byte vectors are fed three ways (h11 ``tr()``): whole, one byte at a time, and
split at every message boundary; the client's output must be identical.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest

from fleeced.nbd import (
    NEED_DATA,
    Command,
    Disconnect,
    ExportChosen,
    ExportInfo,
    LocalProtocolError,
    NbdCmd,
    NbdCmdFlag,
    NbdErrno,
    NbdOpt,
    NbdRep,
    ServerConnection,
    TransmissionFlag,
)
from fleeced.nbd.client import (
    BlockStatus,
    ClientConnection,
    ClientEvent,
    Closed,
    NegotiationFailed,
    Ready,
    ReplyError,
    ServerProtocolError,
)
from tests.helpers import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    drain_events,
    make_server,
    meta_payload,
    option,
)

BITMAP = "qemu:dirty-bitmap:b"
ALLOC = "base:allocation"
SIZE = 1 << 20

# ---------------------------------------------------------------- server-side bytes


def greeting(flags: int = 3) -> bytes:
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags)


def rep(opt: int, typ: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", OPTION_REPLY_MAGIC, opt, typ, len(data)) + data


def meta_rep(context_id: int, name: str) -> bytes:
    return rep(NbdOpt.SET_META_CONTEXT, NbdRep.META_CONTEXT,
               struct.pack(">I", context_id) + name.encode())


def info_export(size: int = SIZE, flags: int = 1) -> bytes:
    return rep(NbdOpt.GO, NbdRep.INFO, struct.pack(">HQH", 0, size, flags))


def chunk(cookie: int, typ: int, payload: bytes, flags: int = 1) -> bytes:
    return struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, typ, cookie,
                       len(payload)) + payload


def status(cookie: int, context_id: int, extents: Sequence[tuple[int, int]],
           flags: int = 1) -> bytes:
    body = struct.pack(">I", context_id) + b"".join(struct.pack(">II", *e) for e in extents)
    return chunk(cookie, 5, body, flags)


def error_chunk(cookie: int, error: int, message: bytes = b"", flags: int = 1) -> bytes:
    return chunk(cookie, 0x8001, struct.pack(">IH", error, len(message)) + message, flags)


# The server's side of a whole handshake for ClientConnection("disk", [BITMAP]).
HANDSHAKE = [
    greeting(),
    rep(NbdOpt.STRUCTURED_REPLY, NbdRep.ACK),
    meta_rep(7, BITMAP),
    rep(NbdOpt.SET_META_CONTEXT, NbdRep.ACK),
    info_export(flags=0x3),
    rep(NbdOpt.GO, NbdRep.INFO, struct.pack(">H", 1) + b"disk"),  # NAME: ignored
    rep(NbdOpt.GO, NbdRep.INFO, struct.pack(">HIII", 3, 1, 4096, 1 << 25)),
    rep(NbdOpt.GO, NbdRep.ACK),
]

# What the client must send for it, byte for byte.
CLIENT_HANDSHAKE = (
    struct.pack(">I", 3)
    + option(NbdOpt.STRUCTURED_REPLY)
    + option(NbdOpt.SET_META_CONTEXT, meta_payload("disk", [BITMAP]))
    + option(NbdOpt.GO, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0))
)
READY = Ready(SIZE, TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY, {BITMAP: 7})


def events_of(client: ClientConnection) -> list[ClientEvent]:
    out: list[ClientEvent] = []
    while True:
        event = client.next_event()
        if event is NEED_DATA:
            return out
        assert not isinstance(event, type)
        out.append(event)
        if isinstance(event, Closed):
            return out


def feed_three_ways(parts: Sequence[bytes], expected: Sequence[ClientEvent]) -> bytes:
    """Feed the server's PARTS to a fresh client whole, byte by byte, and part by
    part: the same events each time (the last only with the last byte), and the
    same bytes sent back."""
    results = []
    data = b"".join(parts)
    for pieces in ([data], [data[i:i + 1] for i in range(len(data))], list(parts)):
        client = ClientConnection("disk", [BITMAP])
        out = client.data_to_send()
        got: list[ClientEvent] = []
        for index, piece in enumerate(pieces):
            client.receive_data(piece)
            got += events_of(client)
            if index < len(pieces) - 1:
                assert len(got) < len(expected), f"event early at piece {index}"
            out += client.data_to_send()
        assert got == list(expected)
        results.append(out)
    assert results[0] == results[1] == results[2]
    return results[0]


def _ready_client(contexts: Sequence[str] = (BITMAP,)) -> ClientConnection:
    client = ClientConnection("disk", contexts)
    client.receive_data(b"".join(HANDSHAKE))
    assert events_of(client) == [READY]
    client.data_to_send()
    return client


# ---------------------------------------------------------------- byte vectors


def test_handshake_bytes() -> None:
    out = feed_three_ways(HANDSHAKE, [READY])
    assert out == CLIENT_HANDSHAKE


def test_handshake_without_no_zeroes_and_without_contexts() -> None:
    client = ClientConnection("")
    client.receive_data(greeting(flags=1))
    assert client.next_event() is NEED_DATA
    assert client.data_to_send() == struct.pack(">I", 1) + option(NbdOpt.STRUCTURED_REPLY)
    client.receive_data(rep(NbdOpt.STRUCTURED_REPLY, NbdRep.ACK))
    assert client.next_event() is NEED_DATA
    assert client.data_to_send() == option(NbdOpt.GO, bytes(6))
    client.receive_data(info_export(size=5, flags=1) + rep(NbdOpt.GO, NbdRep.ACK))
    assert events_of(client) == [Ready(5, TransmissionFlag.HAS_FLAGS, {})]
    assert client.block_size is None
    with pytest.raises(LocalProtocolError, match="without metadata contexts"):
        client.block_status(0, 1)


def test_block_size_info_is_recorded() -> None:
    assert _ready_client().block_size == (1, 4096, 1 << 25)


def test_block_status_bytes_and_clipping() -> None:
    client = _ready_client()
    cookie = client.block_status(4096, 8192)
    assert client.data_to_send() == struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 7, cookie,
                                                4096, 8192)
    # The final extent runs past the request (allowed): clipped to the request.
    reply = status(cookie, 7, [(1024, 1), (1 << 20, 0)])
    client.receive_data(reply)
    [event] = events_of(client)
    assert event == BlockStatus(cookie, 4096, 8192, {BITMAP: ((1024, 1), (7168, 0))})
    assert isinstance(event, BlockStatus) and event.covered(BITMAP) == 8192


def test_short_reply_and_req_one() -> None:
    client = _ready_client()
    a = client.block_status(0, 65536, NbdCmdFlag.REQ_ONE)
    b = client.block_status(65536, 65536)
    assert client.pending == 2
    # Replies out of order, the second one covering less than asked (allowed).
    parts = [status(b, 7, [(512, 1)]), status(a, 7, [(4096, 0)])]
    client.receive_data(b"".join(parts))
    assert events_of(client) == [BlockStatus(b, 65536, 65536, {BITMAP: ((512, 1),)}),
                                 BlockStatus(a, 0, 65536, {BITMAP: ((4096, 0),)})]
    assert client.pending == 0


def test_error_replies() -> None:
    client = _ready_client()
    a = client.block_status(0, 512)
    b = client.block_status(0, 512)
    c = client.block_status(0, 512)
    client.receive_data(
        struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, NbdErrno.EINVAL, a)
        # an error chunk, then a status chunk, then NONE with DONE: the error wins
        + error_chunk(b, NbdErrno.EIO, b"disk on fire", flags=0)
        + status(b, 7, [(512, 0)], flags=0)
        + chunk(b, 0, b"")
        # an unknown error type (bit 15) with extra fields is still an error
        + chunk(c, 0x8009, struct.pack(">IH", 5, 2) + b"hi" + b"extra")
    )
    assert events_of(client) == [ReplyError(a, NbdErrno.EINVAL),
                                 ReplyError(b, NbdErrno.EIO, "disk on fire"),
                                 ReplyError(c, 5, "hi")]


def test_disconnect_then_eof() -> None:
    client = _ready_client()
    client.disconnect()
    assert client.data_to_send() == struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 2, 1, 0, 0)
    assert not client.in_transmission
    assert client.next_event() is NEED_DATA
    client.receive_eof()
    assert client.next_event() == Closed()
    assert client.next_event() == Closed()


# ---------------------------------------------------------------- negotiation failures


@pytest.mark.parametrize(("replies", "option_", "match"), [
    ([rep(NbdOpt.STRUCTURED_REPLY, NbdRep.ERR_UNSUP, b"old server")],
     NbdOpt.STRUCTURED_REPLY, "ERR_UNSUP .old server."),
    ([rep(NbdOpt.STRUCTURED_REPLY, NbdRep.ACK),
      rep(NbdOpt.SET_META_CONTEXT, NbdRep.ACK)],
     NbdOpt.SET_META_CONTEXT, "does not offer metadata context.*dirty-bitmap:b"),
    ([rep(NbdOpt.STRUCTURED_REPLY, NbdRep.ACK), meta_rep(1, BITMAP),
      rep(NbdOpt.SET_META_CONTEXT, NbdRep.ACK), rep(NbdOpt.GO, NbdRep.ERR_UNKNOWN)],
     NbdOpt.GO, "refused GO: ERR_UNKNOWN"),
    ([rep(NbdOpt.STRUCTURED_REPLY, NbdRep.ACK), meta_rep(1, BITMAP),
      rep(NbdOpt.SET_META_CONTEXT, NbdRep.ACK), rep(NbdOpt.GO, (1 << 31) | 77)],
     NbdOpt.GO, "0x8000004d"),
])
def test_negotiation_failed_aborts(replies: list[bytes], option_: NbdOpt, match: str) -> None:
    client = ClientConnection("disk", [BITMAP])
    client.receive_data(greeting() + b"".join(replies))
    with pytest.raises(NegotiationFailed, match=match) as info:
        events_of(client)
    assert info.value.option == option_
    # NBD_OPT_ABORT is the last thing queued (proto.md: soft disconnect).
    assert client.data_to_send().endswith(option(NbdOpt.ABORT))
    with pytest.raises(NegotiationFailed):  # sticky
        client.next_event()


# ---------------------------------------------------------------- protocol violations

_OK_TO_GO = [greeting(), rep(NbdOpt.STRUCTURED_REPLY, NbdRep.ACK), meta_rep(7, BITMAP),
             rep(NbdOpt.SET_META_CONTEXT, NbdRep.ACK)]

HANDSHAKE_VIOLATIONS = {
    "greeting magic": [struct.pack(">QQH", 1, IHAVEOPT, 3)],
    "oldstyle": [struct.pack(">QQH", NBDMAGIC, 0x00420281861253, 3)],
    "not fixed newstyle": [greeting(flags=2)],
    "reply magic": [greeting(), struct.pack(">QIII", 5, 8, 1, 0)],
    "reply for another option": [greeting(), rep(NbdOpt.GO, NbdRep.ACK)],
    "huge reply": [greeting(), struct.pack(">QIII", OPTION_REPLY_MAGIC, 8, 1, 1 << 20)],
    "ACK with data": [greeting(), rep(NbdOpt.STRUCTURED_REPLY, NbdRep.ACK, b"x")],
    "unexpected reply type": [greeting(), rep(NbdOpt.STRUCTURED_REPLY, NbdRep.SERVER)],
    "context not requested": [*_OK_TO_GO[:2], meta_rep(1, ALLOC)],
    "context twice": [*_OK_TO_GO[:3], meta_rep(8, BITMAP)],
    "context without name": [*_OK_TO_GO[:2],
                             rep(NbdOpt.SET_META_CONTEXT, NbdRep.META_CONTEXT, b"\0\0\0\1")],
    "context name not UTF-8": [*_OK_TO_GO[:2], rep(NbdOpt.SET_META_CONTEXT, NbdRep.META_CONTEXT,
                                                   b"\0\0\0\1\xff")],
    "GO ACK without INFO_EXPORT": [*_OK_TO_GO, rep(NbdOpt.GO, NbdRep.ACK)],
    "INFO_EXPORT length": [*_OK_TO_GO, rep(NbdOpt.GO, NbdRep.INFO, struct.pack(">HQ", 0, 5))],
    "INFO_EXPORT twice": [*_OK_TO_GO, info_export(), info_export()],
    "no HAS_FLAGS": [*_OK_TO_GO, info_export(flags=2)],
    "INFO without type": [*_OK_TO_GO, rep(NbdOpt.GO, NbdRep.INFO, b"\0")],
    "bad block sizes": [*_OK_TO_GO, rep(NbdOpt.GO, NbdRep.INFO,
                                        struct.pack(">HIII", 3, 3, 4096, 1 << 25))],
    "META_CONTEXT in GO": [*_OK_TO_GO, rep(NbdOpt.GO, NbdRep.META_CONTEXT, b"\0\0\0\1a:b")],
}


@pytest.mark.parametrize("name", HANDSHAKE_VIOLATIONS)
def test_handshake_violation(name: str) -> None:
    data = b"".join(HANDSHAKE_VIOLATIONS[name])
    for pieces in ([data], [data[i:i + 1] for i in range(len(data))]):
        client = ClientConnection("disk", [BITMAP])
        with pytest.raises(ServerProtocolError):  # noqa: PT012 - the loop is the point
            for piece in pieces:
                client.receive_data(piece)
                events_of(client)
        with pytest.raises(ServerProtocolError):  # sticky
            client.next_event()


def test_eof_during_handshake() -> None:
    client = ClientConnection("disk", [BITMAP])
    client.receive_data(greeting()[:5])
    client.receive_eof()
    with pytest.raises(ServerProtocolError, match="closed the connection during the handshake"):
        client.next_event()


TRANSMISSION_VIOLATIONS = {
    "reply magic": struct.pack(">IIQ", 0x12345678, 0, 1),
    "unknown cookie": status(99, 7, [(512, 0)]),
    "simple success to BLOCK_STATUS": struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 1),
    "simple reply inside structured": status(1, 7, [(512, 0)], flags=0)
    + struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 5, 1),
    "unknown chunk flags": status(1, 7, [(512, 0)], flags=3),
    "huge chunk": struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, 1, 5, 1, 1 << 30),
    "status chunk length": chunk(1, 5, struct.pack(">III", 7, 512, 0) + b"\0"),
    "status chunk without extents": chunk(1, 5, struct.pack(">I", 7)),
    "unknown context id": status(1, 8, [(512, 0)]),
    "context twice": status(1, 7, [(512, 0)], flags=0) + status(1, 7, [(512, 0)]),
    "zero-length extent": status(1, 7, [(0, 0)]),
    "extents past the request": status(1, 7, [(65536, 0), (512, 1)]),
    "context missing at DONE": chunk(1, 0, b""),
    "NONE without DONE": chunk(1, 0, b"", flags=0),
    "NONE with data": chunk(1, 0, b"x"),
    "OFFSET_DATA to BLOCK_STATUS": chunk(1, 1, bytes(8)),
    "error chunk too short": chunk(1, 0x8001, b"\0\0\0\5\0"),
    "error message too long": chunk(1, 0x8001, struct.pack(">IH", 5, 10) + b"abc"),
    "ERROR with trailing data": chunk(1, 0x8001, struct.pack(">IH", 5, 0) + b"x"),
    "error value 0": error_chunk(1, 0),
    "EOF with a request in flight": b"",
}


@pytest.mark.parametrize("name", TRANSMISSION_VIOLATIONS)
def test_transmission_violation(name: str) -> None:
    data = TRANSMISSION_VIOLATIONS[name]
    for pieces in ([data], [data[i:i + 1] for i in range(len(data))]):
        client = _ready_client()
        assert client.block_status(0, 65536) == 1
        with pytest.raises(ServerProtocolError):  # noqa: PT012 - the loop is the point
            for piece in pieces:
                client.receive_data(piece)
                events_of(client)
            if name.startswith("EOF"):
                client.receive_eof()
                events_of(client)
        with pytest.raises(ServerProtocolError):
            client.next_event()


def test_req_one_violations() -> None:
    for reply in (status(1, 7, [(512, 0), (512, 1)]), status(1, 7, [(65537, 0)])):
        client = _ready_client()
        client.block_status(0, 65536, NbdCmdFlag.REQ_ONE)
        client.receive_data(reply)
        with pytest.raises(ServerProtocolError, match="REQ_ONE"):
            events_of(client)


def test_bytes_after_disconnect() -> None:
    client = _ready_client()
    client.disconnect()
    client.receive_data(b"x")
    with pytest.raises(ServerProtocolError, match="after the client ended"):
        client.next_event()


def test_server_hangs_up_idle() -> None:
    client = _ready_client()
    client.receive_eof()
    with pytest.raises(ServerProtocolError, match="closed the connection during transmission"):
        client.next_event()


# ---------------------------------------------------------------- local misuse


def test_local_misuse() -> None:
    client = ClientConnection("disk", [BITMAP])
    with pytest.raises(LocalProtocolError):
        client.block_status(0, 1)
    with pytest.raises(LocalProtocolError):
        client.disconnect()
    with pytest.raises(LocalProtocolError):
        _ = client.size
    ready = _ready_client()
    assert ready.size == SIZE
    for offset, length, flags in [(0, 0, 0), (SIZE, 1, 0), (0, SIZE + 1, 0), (-1, 2, 0),
                                  (0, 1, NbdCmdFlag.FUA), (0, 1, 1 << 7)]:
        with pytest.raises(LocalProtocolError):
            ready.block_status(offset, length, NbdCmdFlag(flags))
    ready.block_status(0, 1)
    with pytest.raises(LocalProtocolError, match="in flight"):
        ready.disconnect()
    ready.receive_eof()
    with pytest.raises(LocalProtocolError):
        ready.receive_data(b"x")
    with pytest.raises(LocalProtocolError):
        ready.receive_eof()


@pytest.mark.parametrize("contexts", [["nocolon"], [BITMAP, BITMAP], ["a:\0"]])
def test_bad_context_names(contexts: list[str]) -> None:
    with pytest.raises(ValueError):
        ClientConnection("disk", contexts)


# ---------------------------------------------------------------- against our server engine


class Pair:
    """Our client and our server engine, wired together in memory."""

    def __init__(self, client: ClientConnection, server: ServerConnection) -> None:
        self.client = client
        self.server = server
        self.server_events: list[object] = []

    def pump(self) -> list[ClientEvent]:
        """Move bytes both ways until neither side has anything to say."""
        got: list[ClientEvent] = []
        while True:
            moved = False
            for part in self.server.data_to_send():
                if len(part):
                    self.client.receive_data(part)
                    moved = True
            got += events_of(self.client)
            data = self.client.data_to_send()
            if data:
                self.server.receive_data(data)
                moved = True
            for event in drain_events(self.server):
                self.server_events.append(event)
                if isinstance(event, Command) and event.cmd == NbdCmd.BLOCK_STATUS:
                    self.answer(event)
            if not moved:
                return got

    def answer(self, cmd: Command) -> None:
        """A fake export: the first 4 KiB of every request are flagged 1, the rest 0."""
        contexts = []
        for context_id in self.server.meta_contexts:
            if cmd.flags & NbdCmdFlag.REQ_ONE or cmd.length <= 4096:
                extents = [(min(cmd.length, 4096), 1)]
            else:
                extents = [(4096, 1), (cmd.length - 4096, 0)]
            contexts.append((context_id, extents))
        self.server.reply_block_status(cmd.cookie, contexts)


EXPORT = ExportInfo(name="disk", size=SIZE, read_only=True,
                    meta_contexts=(ALLOC, BITMAP))


def pair(contexts: Sequence[str], export: ExportInfo = EXPORT,
         name: str = "disk") -> Pair:
    return Pair(ClientConnection(name, contexts), make_server(export))


def test_against_server_two_contexts() -> None:
    p = pair([BITMAP, ALLOC])
    [ready] = p.pump()
    assert isinstance(ready, Ready)
    assert ready.size == SIZE and ready.flags & TransmissionFlag.READ_ONLY
    assert ready.contexts == {BITMAP: 1, ALLOC: 2}
    assert p.server_events == [ExportChosen(EXPORT)]
    assert p.server.meta_contexts == {1: BITMAP, 2: ALLOC}

    cookie = p.client.block_status(8192, 65536)
    [reply] = p.pump()
    assert reply == BlockStatus(cookie, 8192, 65536, {
        BITMAP: ((4096, 1), (61440, 0)), ALLOC: ((4096, 1), (61440, 0))})
    cookie = p.client.block_status(0, 65536, NbdCmdFlag.REQ_ONE)
    [reply] = p.pump()
    assert reply == BlockStatus(cookie, 0, 65536, {BITMAP: ((4096, 1),), ALLOC: ((4096, 1),)})

    p.client.disconnect()
    assert p.pump() == []
    assert isinstance(p.server_events[-1], Disconnect)
    p.client.receive_eof()
    assert p.client.next_event() == Closed()


def test_against_server_error_reply() -> None:
    p = pair([BITMAP])
    p.pump()
    cookie = p.client.block_status(0, 512)
    p.client.block_status(0, 512)
    # Answer the first with an error, the second normally.
    p.server.receive_data(p.client.data_to_send())
    first, second = drain_events(p.server)
    assert isinstance(first, Command) and isinstance(second, Command)
    p.server.reply_error(first.cookie, NbdErrno.EIO, "nope")
    p.server.reply_block_status(second.cookie, [(1, [(512, 0)])])
    assert p.pump() == [ReplyError(cookie, NbdErrno.EIO, "nope"),
                        BlockStatus(second.cookie, 0, 512, {BITMAP: ((512, 0),)})]


def test_against_server_context_not_offered() -> None:
    p = pair(["qemu:dirty-bitmap:other"])
    with pytest.raises(NegotiationFailed, match="does not offer"):
        p.pump()
    # The queued NBD_OPT_ABORT reaches the server, which ends the session.
    p.server.receive_data(p.client.data_to_send())
    assert drain_events(p.server) == [Disconnect()]


def test_against_server_unknown_export() -> None:
    p = pair([BITMAP], name="nosuch")
    with pytest.raises(NegotiationFailed) as info:
        p.pump()
    # Our server refuses SET_META_CONTEXT for an unknown export first.
    assert info.value.option == NbdOpt.SET_META_CONTEXT
    assert info.value.reply == NbdRep.ERR_UNKNOWN
    p = pair([], name="nosuch")
    with pytest.raises(NegotiationFailed, match="GO: ERR_UNKNOWN"):
        p.pump()


def test_against_server_whole_export_in_chunks() -> None:
    """The loop the hand-off runs: walk the export, continuing where each
    reply stopped."""
    p = pair([BITMAP])
    p.pump()
    pos, dirty = 0, []
    while pos < SIZE:
        p.client.block_status(pos, min(SIZE - pos, 3 * 65536))
        [reply] = p.pump()
        assert isinstance(reply, BlockStatus)
        for length, flags in reply.extents[BITMAP]:
            if flags & 1:
                dirty.append((pos, length))
            pos += length
    assert pos == SIZE
    assert dirty == [(i * 3 * 65536, 4096) for i in range(6)]
