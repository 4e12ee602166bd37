"""Byte-vector tests of request parsing and validation."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fleeced.nbd import (
    MAX_PAYLOAD,
    NEED_DATA,
    Command,
    Disconnect,
    ExportInfo,
    NbdCmd,
    NbdCmdFlag,
    NbdErrno,
    NbdProtocolError,
    Rejected,
)
from tests.helpers import (
    DISK,
    MakeEngine,
    Reader,
    assert_fatal,
    assert_parses,
    assert_rejects,
    drain_events,
    opened,
    request,
)

SIZE = DISK.size  # 1 MiB
R, W, D, F, T, C, Z, B = (
    NbdCmd.READ,
    NbdCmd.WRITE,
    NbdCmd.DISC,
    NbdCmd.FLUSH,
    NbdCmd.TRIM,
    NbdCmd.CACHE,
    NbdCmd.WRITE_ZEROES,
    NbdCmd.BLOCK_STATUS,
)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = (int(f) for f in NbdCmdFlag)


def with_export(**changes: object) -> MakeEngine:
    export = replace(DISK, **changes)  # type: ignore[arg-type]
    return lambda: opened(export)


STRUCT = lambda: opened()  # noqa: E731 - structured + base:allocation
SIMPLE = lambda: opened(structured=False)  # noqa: E731
NO_CTX = lambda: opened(meta=())  # noqa: E731 - structured, no contexts selected
RO = with_export(read_only=True)
NOWRITE = with_export(can_write=False)


# ------------------------------------------------------------------ valid requests

READ_VECTOR = bytes.fromhex(
    "25609513"  # magic
    "0000"  # flags
    "0000"  # type: READ
    "0102030405060708"  # cookie
    "0000000000001000"  # offset 4096
    "00000200"  # length 512
)


@pytest.mark.parametrize("make", [STRUCT, SIMPLE])
def test_read(make: MakeEngine) -> None:
    ev = Command(0x0102030405060708, R, NbdCmdFlag(0), 4096, 512)
    out = assert_parses(make, READ_VECTOR, [ev])
    assert out == b""


def test_write_with_payload() -> None:
    data = bytes.fromhex(
        "25609513"  # magic
        "0001"  # flags: FUA
        "0001"  # type: WRITE
        "00000000000000ff"  # cookie
        "00000000000ffffc"  # offset: last 4 bytes
        "00000004"  # length 4
        "deadbeef"  # payload
    )
    ev = Command(0xFF, W, NbdCmdFlag.FUA, SIZE - 4, 4, bytes.fromhex("deadbeef"))
    assert_parses(STRUCT, data, [ev])


@pytest.mark.parametrize(
    ("cmd", "flags", "offset", "length"),
    [
        (F, 0, 0, 0),
        (F, FUA, 0, 0),
        (T, FUA, 0, SIZE),
        (C, 0, 512, 512),
        (Z, NO_HOLE | FAST_ZERO | FUA, 0, SIZE),
        (B, REQ_ONE, 0, SIZE),
        (R, DF, 0, 65536),
        (R, FUA, 0, 1),  # proto.md: FUA is valid on all commands once advertised
        (R, 0, SIZE - 1, 1),
    ],
)
def test_valid_commands(cmd: NbdCmd, flags: int, offset: int, length: int) -> None:
    ev = Command(7, cmd, NbdCmdFlag(flags), offset, length)
    assert_parses(STRUCT, request(cmd, 7, offset, length, flags), [ev])


def test_trim_allowed_on_snapshot_style_export() -> None:
    assert_parses(NOWRITE, request(T, 1, 0, 512), [Command(1, T, NbdCmdFlag(0), 0, 512)])


def test_max_block_and_alignment_accepted_at_limits() -> None:
    make = with_export(min_block=512, max_block=65536)
    assert_parses(make, request(R, 1, 512, 65536), [Command(1, R, NbdCmdFlag(0), 512, 65536)])
    # TRIM is not subject to max_block (no payload).
    assert_parses(make, request(T, 1, 0, SIZE), [Command(1, T, NbdCmdFlag(0), 0, SIZE)])


# ------------------------------------------------------------------ disconnect & fatal


def test_disc() -> None:
    data = bytes.fromhex(
        "25609513" "0000" "0002" "0000000000000009" "0000000000000000" "00000000"
    )  # magic, flags, DISC, cookie 9, offset 0, length 0
    assert_parses(STRUCT, data, [Disconnect()])


def test_disc_with_garbage_fields_still_disconnects() -> None:
    # proto.md: NBD_CMD_DISC has no reply; a strange DISC is still a goodbye.
    assert_parses(STRUCT, request(D, 1, 5, 5, FUA), [Disconnect()])


def test_bad_request_magic_is_fatal() -> None:
    assert_fatal(STRUCT, request(R, 1, 0, 512, magic=0x25609514), match="magic")


@pytest.mark.parametrize("make", [STRUCT, SIMPLE, RO], ids=["structured", "simple", "ro"])
@pytest.mark.parametrize("length", [MAX_PAYLOAD + 1, 0xFFFFFFFF])
def test_write_payload_over_32mib_is_fatal_from_the_header(make: MakeEngine, length: int) -> None:
    # The spec's DoS allowance: the payload is neither drained nor waited for, even when the
    # WRITE would be refused anyway (read-only export).
    assert_fatal(make, request(W, 1, 0, length), match="WRITE payload of .* exceeds")


# ------------------------------------------------------------------ oversized READ
#
# A READ has a length but no payload: one over 2^25 (32 MiB) gets an error reply
# and the connection goes on (proto.md "Block size constraints").

BIG = ExportInfo(name="big", size=1 << 33)  # 8 GiB: a 4 GiB read is still in range
BIG_STRUCT = lambda: opened(BIG)  # noqa: E731
BIG_SIMPLE = lambda: opened(BIG, structured=False)  # noqa: E731
READ_VECTOR_EVENT = Command(0x0102030405060708, R, NbdCmdFlag(0), 4096, 512)

OVERSIZED_READ = bytes.fromhex(
    "25609513"  # magic
    "0000"  # flags
    "0000"  # type: READ
    "00000000000000a1"  # cookie
    "0000000000000000"  # offset 0
    "02000001"  # length 2^25 + 1
)
OVERSIZED_READ_DF = bytes.fromhex(
    "25609513"  # magic
    "0004"  # flags: DF
    "0000"  # type: READ
    "00000000000000a1"  # cookie
    "0000000000000000"  # offset 0
    "02000001"  # length 2^25 + 1
)


@pytest.mark.parametrize(
    ("make", "data", "errno"),
    [
        (BIG_SIMPLE, OVERSIZED_READ, NbdErrno.EINVAL),
        (BIG_STRUCT, OVERSIZED_READ, NbdErrno.EINVAL),
        (BIG_STRUCT, OVERSIZED_READ_DF, NbdErrno.EOVERFLOW),
        (BIG_SIMPLE, request(R, 0xA1, 0, 0xFFFFFFFF), NbdErrno.EINVAL),
        (BIG_STRUCT, request(R, 0xA1, 0, 0xFFFFFFFF), NbdErrno.EINVAL),
        (BIG_STRUCT, request(R, 0xA1, 0, 0xFFFFFFFF, DF), NbdErrno.EOVERFLOW),
        # Out of range comes first, DF or not.
        (STRUCT, OVERSIZED_READ_DF, NbdErrno.EINVAL),
        (SIMPLE, OVERSIZED_READ, NbdErrno.EINVAL),
        # DF is only valid with structured replies: a bad flag is EINVAL first.
        (BIG_SIMPLE, OVERSIZED_READ_DF, NbdErrno.EINVAL),
    ],
    ids=[
        "simple", "structured", "structured-DF", "u32-max-simple", "u32-max-structured",
        "u32-max-structured-DF", "past-end-DF", "past-end-simple", "DF-without-structured",
    ],
)
def test_oversized_read_is_rejected_not_fatal(
    make: MakeEngine, data: bytes, errno: NbdErrno
) -> None:
    assert_rejects(make, data, errno)


def test_oversized_read_simple_reply_vector_then_next_request_parses() -> None:
    out = assert_parses(
        BIG_SIMPLE,
        OVERSIZED_READ + READ_VECTOR,
        [Rejected(0xA1, R, NbdErrno.EINVAL), READ_VECTOR_EVENT],
    )
    assert out == bytes.fromhex(
        "67446698"  # simple reply magic
        "00000016"  # error: EINVAL (22)
        "00000000000000a1"  # cookie
    )


@pytest.mark.parametrize(
    ("data", "errno"),
    [(OVERSIZED_READ, NbdErrno.EINVAL), (OVERSIZED_READ_DF, NbdErrno.EOVERFLOW)],
    ids=["no-DF", "DF"],
)
def test_oversized_read_structured_error_chunk_then_next_request_parses(
    data: bytes, errno: NbdErrno
) -> None:
    out = assert_parses(
        BIG_STRUCT,
        data + READ_VECTOR,
        [Rejected(0xA1, R, errno), READ_VECTOR_EVENT],
    )
    chunk = Reader(out).chunk()
    assert out[:16] == bytes.fromhex(
        "668e33ef"  # structured reply magic
        "0001"  # flags: DONE
        "8001"  # type: NBD_REPLY_TYPE_ERROR
        "00000000000000a1"  # cookie
    )
    assert chunk.payload[:4] == errno.to_bytes(4, "big")
    message = chunk.payload[6:].decode()
    assert "READ" in message and "payload" not in message


def test_read_of_exactly_32mib_is_accepted() -> None:
    ev = Command(2, R, NbdCmdFlag.DF, 0, MAX_PAYLOAD)
    assert_parses(BIG_STRUCT, request(R, 2, 0, MAX_PAYLOAD, DF), [ev])


@pytest.mark.parametrize(
    "partial",
    [
        request(R, 1, 0, 512)[:27],  # mid header
        request(W, 1, 0, 4, data=b"ab"),  # mid payload
        request(W, 1, SIZE, 4, data=b"ab"),  # mid drain of a rejected write
    ],
)
def test_eof_mid_message_is_fatal(partial: bytes) -> None:
    conn = opened()
    conn.receive_data(partial)
    drain_events(conn)
    conn.receive_eof()
    with pytest.raises(NbdProtocolError, match="EOF"):
        drain_events(conn)


def test_eof_between_requests_is_disconnect() -> None:
    conn = opened()
    conn.receive_data(request(F, 1))
    conn.receive_eof()
    assert drain_events(conn) == [Command(1, F, NbdCmdFlag(0), 0, 0), Disconnect()]
    assert not conn.in_transmission


# ------------------------------------------------------------------ rejections

REJECTIONS = [
    # (id, engine, request bytes, errno)
    ("unknown command", STRUCT, request(8, 1, 0, 512), NbdErrno.EINVAL),
    ("unknown command 0xffff", STRUCT, request(0xFFFF, 1), NbdErrno.EINVAL),
    ("unknown flag bit", STRUCT, request(R, 1, 0, 512, 0x20), NbdErrno.EINVAL),
    ("high flag bit", STRUCT, request(R, 1, 0, 512, 0x8000), NbdErrno.EINVAL),
    ("NO_HOLE on WRITE", STRUCT, request(W, 1, 0, 1, NO_HOLE, b"x"), NbdErrno.EINVAL),
    ("NO_HOLE on TRIM", STRUCT, request(T, 1, 0, 1, NO_HOLE), NbdErrno.EINVAL),
    ("FAST_ZERO on TRIM", STRUCT, request(T, 1, 0, 1, FAST_ZERO), NbdErrno.EINVAL),
    ("DF on WRITE", STRUCT, request(W, 1, 0, 1, DF, b"x"), NbdErrno.EINVAL),
    ("DF on BLOCK_STATUS", STRUCT, request(B, 1, 0, 1, DF), NbdErrno.EINVAL),
    ("DF without structured", SIMPLE, request(R, 1, 0, 1, DF), NbdErrno.EINVAL),
    ("DF not advertised", with_export(can_df=False), request(R, 1, 0, 1, DF), NbdErrno.EINVAL),
    ("REQ_ONE on READ", STRUCT, request(R, 1, 0, 1, REQ_ONE), NbdErrno.EINVAL),
    ("FUA not advertised", with_export(can_fua=False), request(W, 1, 0, 1, FUA, b"x"),
     NbdErrno.EINVAL),
    ("FUA on read-only", RO, request(R, 1, 0, 1, FUA), NbdErrno.EINVAL),
    ("FAST_ZERO not advertised", with_export(can_fast_zero=False),
     request(Z, 1, 0, 1, FAST_ZERO), NbdErrno.EINVAL),
    ("WRITE on read-only", RO, request(W, 1, 0, 2, 0, b"xy"), NbdErrno.EPERM),
    ("WRITE_ZEROES on read-only", RO, request(Z, 1, 0, 2), NbdErrno.EPERM),
    ("TRIM on read-only", RO, request(T, 1, 0, 2), NbdErrno.EPERM),
    ("WRITE when not can_write", NOWRITE, request(W, 1, 0, 2, 0, b"xy"), NbdErrno.EPERM),
    ("WRITE_ZEROES when not can_write", NOWRITE, request(Z, 1, 0, 2), NbdErrno.EPERM),
    ("TRIM not supported", with_export(can_trim=False), request(T, 1, 0, 2), NbdErrno.EINVAL),
    ("WRITE_ZEROES not supported", with_export(can_write_zeroes=False), request(Z, 1, 0, 2),
     NbdErrno.EINVAL),
    ("FLUSH not supported", with_export(can_flush=False), request(F, 1), NbdErrno.EINVAL),
    ("CACHE not supported", with_export(can_cache=False), request(C, 1, 0, 2), NbdErrno.EINVAL),
    ("FLUSH with offset", STRUCT, request(F, 1, 512, 0), NbdErrno.EINVAL),
    ("FLUSH with length", STRUCT, request(F, 1, 0, 512), NbdErrno.EINVAL),
    ("zero-length READ", STRUCT, request(R, 1, 0, 0), NbdErrno.EINVAL),
    ("zero-length WRITE", STRUCT, request(W, 1, 0, 0), NbdErrno.EINVAL),
    ("zero-length TRIM", STRUCT, request(T, 1, 0, 0), NbdErrno.EINVAL),
    ("zero-length WRITE_ZEROES", STRUCT, request(Z, 1, 0, 0), NbdErrno.EINVAL),
    ("zero-length BLOCK_STATUS", STRUCT, request(B, 1, 0, 0), NbdErrno.EINVAL),
    ("zero-length CACHE", STRUCT, request(C, 1, 0, 0), NbdErrno.EINVAL),
    ("READ past end", STRUCT, request(R, 1, SIZE - 1, 2), NbdErrno.EINVAL),
    ("READ at end", STRUCT, request(R, 1, SIZE, 1), NbdErrno.EINVAL),
    ("TRIM past end", STRUCT, request(T, 1, SIZE, 1), NbdErrno.EINVAL),
    ("CACHE past end", STRUCT, request(C, 1, SIZE, 1), NbdErrno.EINVAL),
    ("BLOCK_STATUS past end", STRUCT, request(B, 1, SIZE, 1), NbdErrno.EINVAL),
    ("WRITE past end", STRUCT, request(W, 1, SIZE - 1, 2, 0, b"xy"), NbdErrno.ENOSPC),
    ("WRITE_ZEROES past end", STRUCT, request(Z, 1, SIZE, 1), NbdErrno.ENOSPC),
    ("offset+length overflows u64", STRUCT, request(R, 1, 2**64 - 1, 2), NbdErrno.EINVAL),
    ("BLOCK_STATUS without structured", SIMPLE, request(B, 1, 0, 512), NbdErrno.EINVAL),
    ("BLOCK_STATUS without contexts", NO_CTX, request(B, 1, 0, 512), NbdErrno.EINVAL),
    ("READ over max_block", with_export(max_block=65536), request(R, 1, 0, 65537),
     NbdErrno.EINVAL),
    ("WRITE over max_block", with_export(max_block=512), request(W, 1, 0, 513, 0, bytes(513)),
     NbdErrno.EINVAL),
    ("misaligned offset", with_export(min_block=512), request(R, 1, 1, 512), NbdErrno.EINVAL),
    ("misaligned length", with_export(min_block=512), request(T, 1, 0, 511), NbdErrno.EINVAL),
    ("misaligned write", with_export(min_block=512), request(W, 1, 0, 3, 0, b"abc"),
     NbdErrno.EINVAL),
]


@pytest.mark.parametrize(
    ("make", "data", "errno"), [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS]
)
def test_rejections(make: MakeEngine, data: bytes, errno: NbdErrno) -> None:
    assert_rejects(make, data, errno)


def test_rejected_write_payload_is_consumed_then_next_request_works() -> None:
    data = (
        bytes.fromhex(
            "25609513"  # magic
            "0000"  # flags
            "0001"  # type: WRITE
            "000000000000000a"  # cookie 10
            "0000000000100000"  # offset: the end of the 1 MiB export
            "00000006"  # length 6
        )
        + b"\x25\x60\x95\x13\x00\x00"  # payload that *looks* like a request header
        + READ_VECTOR
    )
    out = assert_parses(
        STRUCT,
        data,
        [
            Rejected(10, W, NbdErrno.ENOSPC),
            Command(0x0102030405060708, R, NbdCmdFlag(0), 4096, 512),
        ],
    )
    assert Reader(out).reply_error() == (10, NbdErrno.ENOSPC)


def test_simple_error_reply_vector() -> None:
    out = assert_parses(SIMPLE, request(T, 0x42, SIZE, 1), [Rejected(0x42, T, NbdErrno.EINVAL)])
    assert out == bytes.fromhex(
        "67446698"  # simple reply magic
        "00000016"  # error: EINVAL (22)
        "0000000000000042"  # cookie
    )


def test_structured_error_reply_carries_message() -> None:
    out = assert_parses(RO, request(T, 3, 0, 1), [Rejected(3, T, NbdErrno.EPERM)])
    chunk = Reader(out).chunk()
    assert (chunk.flags, chunk.type, chunk.cookie) == (1, 0x8001, 3)
    assert chunk.payload[:4] == bytes.fromhex("00000001")  # EPERM
    assert b"not permitted" in chunk.payload[6:]


# ------------------------------------------------------------------ shutdown


def shut() -> object:
    conn = opened()
    conn.shutting_down()
    return conn


SHUT: MakeEngine = shut  # type: ignore[assignment]


@pytest.mark.parametrize(
    "data",
    [
        request(R, 5, 0, 512),
        request(W, 5, 0, 3, 0, b"abc"),
        request(F, 5),
        request(8, 5),  # even unknown commands
        request(W, 5, SIZE, 3, 0, b"abc"),  # even otherwise-invalid ones
        request(R, 5, 0, MAX_PAYLOAD + 1),  # and oversized READs (no payload to skip)
    ],
)
def test_shutting_down_answers_eshutdown(data: bytes) -> None:
    assert_rejects(SHUT, data, NbdErrno.ESHUTDOWN)


def test_shutting_down_disc_still_disconnects() -> None:
    assert_parses(SHUT, request(D, 5), [Disconnect()])


def test_write_header_alone_waits_for_payload() -> None:
    conn = opened()
    conn.receive_data(request(W, 1, 0, 4))
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"abcd")
    assert conn.next_event() == Command(1, W, NbdCmdFlag(0), 0, 4, b"abcd")


def test_large_write_in_small_pieces_is_linear() -> None:
    # 4 MiB in 4 KiB pieces: would be far too slow with O(n^2) buffering.
    length = 4 * 1024 * 1024
    export = ExportInfo(name="big", size=length)
    conn = opened(export)
    payload = bytes(range(256)) * (length // 256)
    wire = request(W, 1, 0, length) + payload + request(R, 2, 0, 512)
    events = []
    for i in range(0, len(wire), 4096):
        conn.receive_data(wire[i : i + 4096])
        events.extend(drain_events(conn))
    assert len(events) == 2
    assert isinstance(events[0], Command) and events[0].data == payload
    assert events[1] == Command(2, R, NbdCmdFlag(0), 0, 512)
