"""Byte-vector tests of the fixed-newstyle handshake."""

from __future__ import annotations

import struct

import pytest

from fleeced.nbd import (
    NEED_DATA,
    Disconnect,
    ExportChosen,
    ExportInfo,
    LocalProtocolError,
    NbdInfo,
    NbdOpt,
    NbdRep,
    ServerConnection,
    TransmissionFlag,
)
from tests.helpers import (
    DISK,
    Reader,
    assert_fatal,
    assert_parses,
    client_flags,
    drain_events,
    make_server,
    meta_payload,
    name_info_payload,
    option,
)

SNAP = ExportInfo(
    name="snap",
    size=4096,
    read_only=True,
    meta_contexts=("base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"),
)

ACK_ABORT = bytes.fromhex(
    "0003e889045565a9"  # option reply magic
    "00000002"  # option: ABORT
    "00000001"  # reply type: ACK
    "00000000"  # length
)


def fresh(*exports: ExportInfo) -> ServerConnection:
    """A server whose greeting was already taken."""
    conn = make_server(*exports)
    conn.data_to_send()
    return conn


def after_flags(*exports: ExportInfo, structured: bool = False) -> ServerConnection:
    """A server that accepted client flags (NO_ZEROES) and maybe structured replies."""
    conn = fresh(*exports)
    conn.receive_data(client_flags())
    if structured:
        conn.receive_data(option(NbdOpt.STRUCTURED_REPLY))
    assert conn.next_event() is NEED_DATA
    conn.data_to_send()
    return conn


def replies(out: bytes) -> list[tuple[int, int, bytes]]:
    return [(r.option, r.type, r.data) for r in Reader(out).opt_replies()]


def types(out: bytes) -> list[int]:
    return [t for _, t, _ in replies(out)]


# ------------------------------------------------------------------ greeting, flags


def test_greeting() -> None:
    conn = make_server()
    assert b"".join(conn.data_to_send()) == bytes.fromhex(
        "4e42444d41474943"  # 'NBDMAGIC'
        "49484156454f5054"  # 'IHAVEOPT'
        "0003"  # handshake flags: FIXED_NEWSTYLE | NO_ZEROES
    )
    assert conn.data_to_send() == []
    assert not conn.in_transmission and conn.export is None


def test_client_flags_accepted() -> None:
    assert_parses(fresh, bytes.fromhex("00000003"), [])  # FIXED_NEWSTYLE | NO_ZEROES
    assert_parses(fresh, bytes.fromhex("00000001"), [])  # FIXED_NEWSTYLE


@pytest.mark.parametrize(
    "flags",
    [
        "00000000",  # no FIXED_NEWSTYLE
        "00000002",  # NO_ZEROES only
        "00000005",  # unknown bit 2
        "80000001",  # unknown bit 31
    ],
)
def test_client_flags_fatal(flags: str) -> None:
    assert_fatal(fresh, bytes.fromhex(flags))


def test_eof_before_client_flags_is_a_clean_disconnect() -> None:
    conn = fresh()
    conn.receive_eof()
    assert conn.next_event() == Disconnect()


def test_eof_mid_client_flags_is_fatal() -> None:
    conn = fresh()
    conn.receive_data(b"\x00\x00")
    conn.receive_eof()
    assert_raises_fatal(conn, "EOF")


def assert_raises_fatal(conn: ServerConnection, match: str) -> None:
    from fleeced.nbd import NbdProtocolError

    with pytest.raises(NbdProtocolError, match=match):
        drain_events(conn)


def test_receive_after_eof_is_a_local_error() -> None:
    conn = fresh()
    conn.receive_eof()
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")
    with pytest.raises(LocalProtocolError):
        conn.receive_eof()


def test_empty_data_is_not_eof() -> None:
    """EOF is receive_eof(), never an empty read in disguise."""
    conn = fresh()
    conn.receive_data(b"")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"\x00\x00\x00\x03")  # FIXED_NEWSTYLE | NO_ZEROES
    assert conn.next_event() is NEED_DATA  # waiting for options, not disconnected


# ------------------------------------------------------------------ EXPORT_NAME

EXPORT_NAME_DISK = bytes.fromhex(
    "49484156454f5054"  # IHAVEOPT
    "00000001"  # option: EXPORT_NAME
    "00000004"  # length
    "6469736b"  # "disk"
)


def test_export_name_no_zeroes() -> None:
    out = assert_parses(
        fresh, bytes.fromhex("00000003") + EXPORT_NAME_DISK, [ExportChosen(DISK)]
    )
    assert out == bytes.fromhex(
        "0000000000100000"  # size: 1 MiB
        "0c6d"  # HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES|SEND_CACHE|FAST_ZERO
    )


def test_export_name_with_zeroes() -> None:
    out = assert_parses(
        fresh, bytes.fromhex("00000001") + EXPORT_NAME_DISK, [ExportChosen(DISK)]
    )
    assert out == bytes.fromhex("0000000000100000" "0c6d") + bytes(124)


def test_export_name_enters_transmission() -> None:
    conn = fresh()
    conn.receive_data(client_flags() + EXPORT_NAME_DISK)
    assert drain_events(conn) == [ExportChosen(DISK)]
    assert conn.in_transmission and conn.export is DISK
    assert conn.meta_contexts == {} and not conn.structured


def test_export_name_unknown_is_fatal() -> None:
    assert_fatal(after_flags, option(NbdOpt.EXPORT_NAME, b"nope"), match="unknown export")


@pytest.mark.parametrize("name", [b"a" * 4097, b"di\x00sk", b"\xff\xfe"])
def test_export_name_invalid_is_fatal(name: bytes) -> None:
    assert_fatal(after_flags, option(NbdOpt.EXPORT_NAME, name), match="invalid export name")


def test_export_name_max_length_ok() -> None:
    long = ExportInfo(name="a" * 4096, size=512)
    conn = after_flags(long)
    conn.receive_data(option(NbdOpt.EXPORT_NAME, b"a" * 4096))
    assert drain_events(conn) == [ExportChosen(long)]


# ------------------------------------------------------------------ option framing


def test_abort() -> None:
    data = bytes.fromhex(
        "49484156454f5054"  # IHAVEOPT
        "00000002"  # option: ABORT
        "00000000"  # length
    )
    out = assert_parses(after_flags, data, [Disconnect()])
    assert out == ACK_ABORT


def test_abort_signalled_by_export_none() -> None:
    conn = after_flags()
    conn.receive_data(option(NbdOpt.ABORT))
    assert conn.next_event() == Disconnect()
    assert conn.export is None and not conn.in_transmission
    assert conn.next_event() == Disconnect()  # idempotent


def test_unknown_option_then_go() -> None:
    data = bytes.fromhex(
        "49484156454f5054"  # IHAVEOPT
        "00001234"  # option: unknown
        "00000003"  # length
        "616263"  # payload, skipped
    ) + option(NbdOpt.GO, name_info_payload("disk"))
    out = assert_parses(after_flags, data, [ExportChosen(DISK)])
    got = replies(out)
    assert got[0][:2] == (0x1234, NbdRep.ERR_UNSUP)
    assert got[-1] == (NbdOpt.GO, NbdRep.ACK, b"")


# STARTTLS is known and refused with NBD_REP_ERR_POLICY without TLS: test_starttls.py.
@pytest.mark.parametrize("opt", [NbdOpt.PEEK_EXPORT, NbdOpt.EXTENDED_HEADERS])
def test_unsupported_known_options(opt: NbdOpt) -> None:
    out = assert_parses(after_flags, option(opt), [])
    assert types(out) == [NbdRep.ERR_UNSUP]


def test_option_bad_magic_is_fatal() -> None:
    data = bytes.fromhex("49484156454f5055" "00000003" "00000000")  # magic off by one
    assert_fatal(after_flags, data, match="magic")


def test_option_length_cap_is_fatal_without_waiting_for_payload() -> None:
    header = bytes.fromhex(
        "49484156454f5054"  # IHAVEOPT
        "00000003"  # option: LIST
        "00010001"  # length 64 KiB + 1: never waited for
    )
    assert_fatal(after_flags, header, match="length")


def test_option_length_at_cap_is_read() -> None:
    out = assert_parses(after_flags, option(0x99, bytes(64 * 1024)), [])
    assert types(out) == [NbdRep.ERR_UNSUP]


def test_too_many_options_is_fatal() -> None:
    assert_fatal(after_flags, option(0x99) * 129, match="too many")


def test_eof_between_options_is_disconnect() -> None:
    conn = after_flags()
    conn.receive_data(option(NbdOpt.LIST))
    conn.receive_eof()
    assert drain_events(conn) == [Disconnect()]


def test_eof_mid_option_is_fatal() -> None:
    conn = after_flags()
    conn.receive_data(option(NbdOpt.LIST, b"xy")[:-1])
    conn.receive_eof()
    assert_raises_fatal(conn, "EOF")


# ------------------------------------------------------------------ LIST


def test_list() -> None:
    data = bytes.fromhex("49484156454f5054" "00000003" "00000000")  # IHAVEOPT, LIST, len 0
    out = assert_parses(lambda: after_flags(DISK, SNAP), data, [])
    assert out == bytes.fromhex(
        "0003e889045565a9" "00000003" "00000002" "00000011"  # SERVER, length 17
        "00000004" "6469736b"  # name length 4, "disk"
        "74657374206469736b"  # description "test disk"
        "0003e889045565a9" "00000003" "00000002" "00000008"  # SERVER, length 8
        "00000004" "736e6170"  # "snap", no description
        "0003e889045565a9" "00000003" "00000001" "00000000"  # ACK
    )


def test_list_with_data_is_invalid() -> None:
    out = assert_parses(after_flags, option(NbdOpt.LIST, b"x"), [])
    assert types(out) == [NbdRep.ERR_INVALID]


# ------------------------------------------------------------------ INFO / GO


def test_info() -> None:
    data = bytes.fromhex(
        "49484156454f5054"  # IHAVEOPT
        "00000006"  # option: INFO
        "0000000e"  # length 14
        "00000004" "6469736b"  # name "disk"
        "0002" "0003" "0001"  # 2 requests: BLOCK_SIZE, NAME
    )
    out = assert_parses(after_flags, data, [])
    assert out == bytes.fromhex(
        "0003e889045565a9" "00000006" "00000003" "0000000c"  # INFO, length 12
        "0000" "0000000000100000" "0c6d"  # NBD_INFO_EXPORT, size, flags
        "0003e889045565a9" "00000006" "00000003" "00000006"  # INFO, length 6
        "0001" "6469736b"  # NBD_INFO_NAME "disk"
        "0003e889045565a9" "00000006" "00000003" "0000000b"  # INFO, length 11
        "0002" "74657374206469736b"  # NBD_INFO_DESCRIPTION "test disk"
        "0003e889045565a9" "00000006" "00000003" "0000000e"  # INFO, length 14
        "0003" "00000001" "00001000" "02000000"  # NBD_INFO_BLOCK_SIZE 1, 4096, 32 MiB
        "0003e889045565a9" "00000006" "00000001" "00000000"  # ACK
    )


def test_info_does_not_end_handshake() -> None:
    conn = after_flags()
    conn.receive_data(option(NbdOpt.INFO, name_info_payload("disk")))
    assert drain_events(conn) == []
    assert not conn.in_transmission


def test_go_structured_sets_df_and_omits_empty_description() -> None:
    conn = after_flags(SNAP, structured=True)
    conn.receive_data(option(NbdOpt.GO, name_info_payload("snap", [NbdInfo.BLOCK_SIZE])))
    assert drain_events(conn) == [ExportChosen(SNAP)]
    got = replies(b"".join(conn.data_to_send()))
    infos = [struct.unpack_from(">H", d)[0] for _, t, d in got if t == NbdRep.INFO]
    assert infos == [NbdInfo.EXPORT, NbdInfo.NAME, NbdInfo.BLOCK_SIZE]
    _, size, flags = struct.unpack(">HQH", got[0][2])
    assert size == 4096
    # read-only: no TRIM / WRITE_ZEROES / FAST_ZERO / FUA; DF because structured.
    assert TransmissionFlag(flags) == (
        TransmissionFlag.HAS_FLAGS
        | TransmissionFlag.READ_ONLY
        | TransmissionFlag.SEND_FLUSH
        | TransmissionFlag.SEND_DF
        | TransmissionFlag.SEND_CACHE
    )
    assert conn.structured and conn.in_transmission


def test_go_unknown_export_continues() -> None:
    data = option(NbdOpt.GO, name_info_payload("nope")) + option(
        NbdOpt.GO, name_info_payload("disk")
    )
    out = assert_parses(after_flags, data, [ExportChosen(DISK)])
    assert types(out)[0] == NbdRep.ERR_UNKNOWN


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # too short
        bytes.fromhex("00000004" "6469"),  # name length beyond the data
        bytes.fromhex("ffffffff" "0000"),  # huge name length (underflow-safe check)
        bytes.fromhex("00000004" "6469736b" "0001"),  # 1 request announced, none present
        bytes.fromhex("00000004" "6469736b" "0000" "00"),  # trailing garbage
        name_info_payload(b"d\x00sk"),  # embedded NUL
        name_info_payload(b"a" * 4097),  # name too long
        name_info_payload(b"\xc3\x28"),  # not UTF-8
    ],
)
@pytest.mark.parametrize("opt", [NbdOpt.INFO, NbdOpt.GO])
def test_info_go_malformed_is_invalid_and_continues(opt: NbdOpt, payload: bytes) -> None:
    out = assert_parses(after_flags, option(opt, payload) + option(NbdOpt.LIST), [])
    assert types(out) == [NbdRep.ERR_INVALID, NbdRep.SERVER, NbdRep.ACK]


# ------------------------------------------------------------------ STRUCTURED_REPLY


def test_structured_reply() -> None:
    data = bytes.fromhex("49484156454f5054" "00000008" "00000000")  # STRUCTURED_REPLY
    out = assert_parses(after_flags, data, [])
    assert out == bytes.fromhex("0003e889045565a9" "00000008" "00000001" "00000000")  # ACK


def test_structured_reply_with_data_is_invalid() -> None:
    conn = after_flags()
    conn.receive_data(option(NbdOpt.STRUCTURED_REPLY, b"\x00"))
    assert drain_events(conn) == []
    assert types(b"".join(conn.data_to_send())) == [NbdRep.ERR_INVALID]
    assert not conn.structured


# ------------------------------------------------------------------ meta contexts


def meta(conn: ServerConnection, opt: NbdOpt, name: str, queries: list[str]) -> list:  # type: ignore[type-arg]
    conn.receive_data(option(opt, meta_payload(name, queries)))
    assert drain_events(conn) == []
    return [(t, d) for _, t, d in replies(b"".join(conn.data_to_send()))]


def ctx(context_id: int, name: str) -> tuple[int, bytes]:
    return NbdRep.META_CONTEXT, struct.pack(">I", context_id) + name.encode()


ACK = (NbdRep.ACK, b"")


@pytest.mark.parametrize("opt", [NbdOpt.LIST_META_CONTEXT, NbdOpt.SET_META_CONTEXT])
def test_meta_needs_structured(opt: NbdOpt) -> None:
    conn = after_flags()
    assert [t for t, _ in meta(conn, opt, "disk", ["base:allocation"])] == [NbdRep.ERR_INVALID]


def test_list_meta_vector() -> None:
    data = bytes.fromhex(
        "49484156454f5054"  # IHAVEOPT
        "00000009"  # option: LIST_META_CONTEXT
        "00000015"  # length 21
        "00000004" "6469736b"  # export name "disk"
        "00000001"  # one query
        "00000005" "626173653a"  # "base:"
    )
    out = assert_parses(lambda: after_flags(structured=True), data, [])
    assert out == bytes.fromhex(
        "0003e889045565a9" "00000009" "00000004" "00000013"  # META_CONTEXT, length 19
        "00000000" "626173653a616c6c6f636174696f6e"  # id 0, "base:allocation"
        "0003e889045565a9" "00000009" "00000001" "00000000"  # ACK
    )


def test_list_meta_queries() -> None:
    conn = after_flags(SNAP, structured=True)
    L = NbdOpt.LIST_META_CONTEXT
    assert meta(conn, L, "snap", []) == [
        ctx(0, "base:allocation"),
        ctx(0, "qemu:dirty-bitmap:b0"),
        ctx(0, "qemu:dirty-bitmap:b1"),
        ACK,
    ]
    assert meta(conn, L, "snap", ["qemu:dirty-bitmap:"]) == [
        ctx(0, "qemu:dirty-bitmap:b0"),
        ctx(0, "qemu:dirty-bitmap:b1"),
        ACK,
    ]
    assert meta(conn, L, "snap", ["qemu:dirty-bitmap:b1", "x-foo:bar"]) == [
        ctx(0, "qemu:dirty-bitmap:b1"),
        ACK,
    ]
    assert meta(conn, L, "snap", ["nbd-server:nothing"]) == [ACK]
    assert [t for t, _ in meta(conn, L, "nope", [])] == [NbdRep.ERR_UNKNOWN]


def test_set_meta_then_go() -> None:
    conn = after_flags(SNAP, structured=True)
    S = NbdOpt.SET_META_CONTEXT
    assert meta(conn, S, "snap", ["qemu:dirty-bitmap:b1", "base:allocation", "base:"]) == [
        ctx(1, "qemu:dirty-bitmap:b1"),
        ctx(2, "base:allocation"),
        ACK,
    ]
    conn.receive_data(option(NbdOpt.GO, name_info_payload("snap")))
    assert drain_events(conn) == [ExportChosen(SNAP)]
    assert conn.meta_contexts == {1: "qemu:dirty-bitmap:b1", 2: "base:allocation"}


def test_set_meta_replaces_and_empty_selects_nothing() -> None:
    conn = after_flags(SNAP, structured=True)
    S = NbdOpt.SET_META_CONTEXT
    meta(conn, S, "snap", ["base:allocation"])
    assert meta(conn, S, "snap", []) == [ACK]
    conn.receive_data(option(NbdOpt.GO, name_info_payload("snap")))
    drain_events(conn)
    assert conn.meta_contexts == {}


def test_set_meta_for_other_export_is_dropped() -> None:
    conn = after_flags(DISK, SNAP, structured=True)
    meta(conn, NbdOpt.SET_META_CONTEXT, "snap", ["base:allocation"])
    conn.receive_data(option(NbdOpt.GO, name_info_payload("disk")))
    assert drain_events(conn) == [ExportChosen(DISK)]
    assert conn.meta_contexts == {}


def test_set_meta_error_clears_previous_selection() -> None:
    conn = after_flags(structured=True)
    meta(conn, NbdOpt.SET_META_CONTEXT, "disk", ["base:allocation"])
    assert [t for t, _ in meta(conn, NbdOpt.SET_META_CONTEXT, "nope", [])] == [
        NbdRep.ERR_UNKNOWN
    ]
    conn.receive_data(option(NbdOpt.GO, name_info_payload("disk")))
    drain_events(conn)
    assert conn.meta_contexts == {}


@pytest.mark.parametrize(
    "payload",
    [
        bytes.fromhex("00000004" "6469736b"),  # no query count
        bytes.fromhex("00000009" "6469736b" "00000000"),  # name length beyond data
        bytes.fromhex("00000004" "6469736b" "00000001"),  # 1 query announced, none present
        bytes.fromhex("00000004" "6469736b" "00000001" "00000009" "626173"),  # short query
        bytes.fromhex("00000004" "6469736b" "00000000" "00"),  # trailing byte
        bytes.fromhex("00000004" "6469736b" "ffffffff"),  # absurd query count
        meta_payload(b"d\x00sk", []),  # NUL in name
        meta_payload("disk", [b"base:\x00"]),  # NUL in query
        meta_payload("disk", [b"a" * 4097]),  # query too long
    ],
)
@pytest.mark.parametrize("opt", [NbdOpt.LIST_META_CONTEXT, NbdOpt.SET_META_CONTEXT])
def test_meta_malformed_is_invalid(opt: NbdOpt, payload: bytes) -> None:
    out = assert_parses(lambda: after_flags(structured=True), option(opt, payload), [])
    assert types(out) == [NbdRep.ERR_INVALID]


# ------------------------------------------------------------------ shutdown in handshake


def test_shutdown_during_handshake() -> None:
    conn = after_flags()
    conn.shutting_down()
    conn.receive_data(option(NbdOpt.GO, name_info_payload("disk")) + option(NbdOpt.LIST))
    assert drain_events(conn) == []
    assert types(b"".join(conn.data_to_send())) == [NbdRep.ERR_SHUTDOWN, NbdRep.ERR_SHUTDOWN]
    conn.receive_data(option(NbdOpt.ABORT))
    assert drain_events(conn) == [Disconnect()]


def test_shutdown_export_name_is_fatal() -> None:
    conn = after_flags()
    conn.shutting_down()
    conn.receive_data(EXPORT_NAME_DISK)
    assert_raises_fatal(conn, "shutting down")


def test_reply_before_transmission_is_local_error() -> None:
    conn = after_flags()
    with pytest.raises(LocalProtocolError):
        conn.reply_ok(1)


def test_full_handshake_byte_by_byte() -> None:
    data = (
        client_flags(no_zeroes=False)
        + option(NbdOpt.STRUCTURED_REPLY)
        + option(NbdOpt.LIST_META_CONTEXT, meta_payload("disk", []))
        + option(NbdOpt.SET_META_CONTEXT, meta_payload("disk", ["base:allocation"]))
        + option(NbdOpt.INFO, name_info_payload("disk"))
        + option(NbdOpt.GO, name_info_payload("disk", [NbdInfo.BLOCK_SIZE]))
    )
    out = assert_parses(fresh, data, [ExportChosen(DISK)])
    assert types(out) == [
        NbdRep.ACK,
        NbdRep.META_CONTEXT,
        NbdRep.ACK,
        NbdRep.META_CONTEXT,
        NbdRep.ACK,
        *[NbdRep.INFO] * 4,
        NbdRep.ACK,
        *[NbdRep.INFO] * 4,
        NbdRep.ACK,
    ]
