"""Byte-vector tests of NBD_OPT_STARTTLS and the TLS option policy (proto.md "TLS support").

NOTLS (TlsMode.OFF), SELECTIVETLS without TLS-only exports (ON) and FORCEDTLS
(REQUIRE); every vector is fed whole, one byte at a time and with trailing data.
"""

from __future__ import annotations

import pytest

from fleeced.nbd import (
    NEED_DATA,
    Disconnect,
    ExportChosen,
    LocalProtocolError,
    NbdOpt,
    NbdProtocolError,
    NbdRep,
    ServerConnection,
    StartTls,
    TlsMode,
)
from tests.helpers import (
    DISK,
    Reader,
    assert_fatal,
    assert_parses,
    client_flags,
    drain_events,
    meta_payload,
    name_info_payload,
    option,
)

STARTTLS = bytes.fromhex(
    "49484156454f5054"  # IHAVEOPT
    "00000005"  # option: STARTTLS
    "00000000"  # length: no data
)
ACK_STARTTLS = bytes.fromhex(
    "0003e889045565a9"  # option reply magic
    "00000005"  # option: STARTTLS
    "00000001"  # reply type: ACK
    "00000000"  # length
)
GO_DISK = option(NbdOpt.GO, name_info_payload("disk"))


def engine(mode: TlsMode) -> ServerConnection:
    """A server in MODE that took the client flags (NO_ZEROES); greeting drained."""
    table = {DISK.name: DISK}
    conn = ServerConnection(table.get, lambda: list(table.values()), mode)
    conn.data_to_send()
    conn.receive_data(client_flags())
    assert conn.next_event() is NEED_DATA
    return conn


def upgraded(mode: TlsMode, before: bytes = b"") -> ServerConnection:
    """A server in MODE that answered BEFORE, then STARTTLS, and finished TLS."""
    conn = engine(mode)
    conn.receive_data(before + STARTTLS)
    assert drain_events(conn) == [StartTls()]
    conn.data_to_send()
    conn.tls_started()
    return conn


def opt_replies(out: bytes) -> list[tuple[int, int, bytes]]:
    return [(r.option, r.type, r.data) for r in Reader(out).opt_replies()]


def only_reply(out: bytes) -> tuple[int, int]:
    (got,) = opt_replies(out)
    return got[0], got[1]


# ------------------------------------------------------------------ NOTLS


def test_notls_starttls_is_refused_by_policy() -> None:
    # proto.md "NOTLS mode": NBD_REP_ERR_POLICY (qemu-nbd without tls-creds says so too).
    out = assert_parses(lambda: engine(TlsMode.OFF), STARTTLS, [])
    assert only_reply(out) == (NbdOpt.STARTTLS, NbdRep.ERR_POLICY)


def test_notls_session_goes_on_after_refused_starttls() -> None:
    out = assert_parses(lambda: engine(TlsMode.OFF), STARTTLS + GO_DISK, [ExportChosen(DISK)])
    types = [t for _, t, _ in opt_replies(out)]
    assert types[0] == NbdRep.ERR_POLICY and types[-1] == NbdRep.ACK


@pytest.mark.parametrize("mode", list(TlsMode))
def test_starttls_with_data_is_invalid(mode: TlsMode) -> None:
    data = bytes.fromhex(
        "49484156454f5054"  # IHAVEOPT
        "00000005"  # option: STARTTLS
        "00000002"  # length: 2 (the client MUST NOT send data)
        "abcd"
    )
    out = assert_parses(lambda: engine(mode), data, [])
    assert only_reply(out) == (NbdOpt.STARTTLS, NbdRep.ERR_INVALID)


# ------------------------------------------------------------------ the upgrade itself


@pytest.mark.parametrize("mode", [TlsMode.ON, TlsMode.REQUIRE])
def test_starttls_acknowledged_then_upgrade(mode: TlsMode) -> None:
    # Whole.
    conn = engine(mode)
    conn.receive_data(STARTTLS)
    assert drain_events(conn) == [StartTls()]
    assert b"".join(conn.data_to_send()) == ACK_STARTTLS
    assert conn.next_event() is NEED_DATA  # nothing until the handshake is done
    assert not conn.tls_active
    conn.tls_started()
    assert conn.tls_active
    conn.receive_data(GO_DISK)
    assert drain_events(conn) == [ExportChosen(DISK)]

    # One byte at a time: the event comes with the last byte only.
    conn = engine(mode)
    for i, byte in enumerate(STARTTLS):
        conn.receive_data(bytes([byte]))
        events = drain_events(conn)
        assert events == ([StartTls()] if i == len(STARTTLS) - 1 else [])
    assert b"".join(conn.data_to_send()) == ACK_STARTTLS


@pytest.mark.parametrize("mode", [TlsMode.ON, TlsMode.REQUIRE])
def test_plaintext_after_starttls_is_fatal_and_never_acknowledged(mode: TlsMode) -> None:
    # Bytes after STARTTLS that came before our ACK were sent in plaintext: they
    # must never be taken as part of the TLS session (STARTTLS injection).
    conn = engine(mode)
    conn.receive_data(STARTTLS + b"trailing")
    with pytest.raises(NbdProtocolError, match="plaintext after NBD_OPT_STARTTLS"):
        drain_events(conn)
    assert conn.data_to_send() == []  # no ACK went out
    conn = engine(mode)
    conn.receive_data(STARTTLS + GO_DISK)  # an injected option, say
    with pytest.raises(NbdProtocolError):
        drain_events(conn)
    assert conn.data_to_send() == []


def test_eof_right_after_starttls_is_fatal() -> None:
    conn = engine(TlsMode.ON)
    conn.receive_data(STARTTLS)
    conn.receive_eof()
    with pytest.raises(NbdProtocolError):
        drain_events(conn)
    assert conn.data_to_send() == []


def test_no_input_accepted_during_the_handshake() -> None:
    conn = engine(TlsMode.ON)
    conn.receive_data(STARTTLS)
    assert drain_events(conn) == [StartTls()]
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"\x16\x03\x01")  # a ClientHello must go to TLS, not to us


@pytest.mark.parametrize("mode", list(TlsMode))
def test_tls_started_only_after_starttls(mode: TlsMode) -> None:
    conn = engine(mode)
    with pytest.raises(LocalProtocolError):
        conn.tls_started()


@pytest.mark.parametrize("mode", [TlsMode.ON, TlsMode.REQUIRE])
def test_second_starttls_is_invalid(mode: TlsMode) -> None:
    # proto.md "FORCEDTLS mode": STARTTLS when TLS is up MUST get NBD_REP_ERR_INVALID.
    out = assert_parses(lambda: upgraded(mode), STARTTLS, [])
    assert only_reply(out) == (NbdOpt.STARTTLS, NbdRep.ERR_INVALID)
    assert upgraded(mode).tls_active


def test_starttls_resets_negotiated_state() -> None:
    # proto.md "NBD_OPT_STARTTLS": the server MUST NOT preserve negotiation state
    # (structured replies, meta contexts) from before it (nbdkit CVE-2021-3716).
    before = option(NbdOpt.STRUCTURED_REPLY) + option(
        NbdOpt.SET_META_CONTEXT, meta_payload("disk", ["base:allocation"])
    )
    conn = upgraded(TlsMode.ON, before)
    conn.receive_data(GO_DISK)
    assert drain_events(conn) == [ExportChosen(DISK)]
    assert not conn.structured
    assert conn.meta_contexts == {}
    # And a SET_META_CONTEXT after TLS needs structured replies again.
    conn = upgraded(TlsMode.ON, before)
    conn.receive_data(option(NbdOpt.SET_META_CONTEXT, meta_payload("disk", ["base:allocation"])))
    assert drain_events(conn) == []
    assert only_reply(b"".join(conn.data_to_send())) == (
        NbdOpt.SET_META_CONTEXT, NbdRep.ERR_INVALID
    )


def test_starttls_during_shutdown_is_refused() -> None:
    conn = engine(TlsMode.ON)
    conn.shutting_down()
    conn.receive_data(STARTTLS)
    assert drain_events(conn) == []
    assert only_reply(b"".join(conn.data_to_send())) == (NbdOpt.STARTTLS, NbdRep.ERR_SHUTDOWN)


# ------------------------------------------------------------------ SELECTIVETLS (on)


def test_on_mode_allows_plaintext_sessions() -> None:
    out = assert_parses(lambda: engine(TlsMode.ON), GO_DISK, [ExportChosen(DISK)])
    assert NbdRep.ERR_TLS_REQD not in [t for _, t, _ in opt_replies(out)]


# ------------------------------------------------------------------ FORCEDTLS (require)

TLS_REQD_LIST = bytes.fromhex(
    "0003e889045565a9"  # option reply magic
    "00000003"  # option: LIST
    "80000005"  # reply type: ERR_TLS_REQD
    "00000023"  # length: 35, the message (qemu-nbd's words)
) + b"Option 0x3 not permitted before TLS"


def test_require_list_before_tls_vector() -> None:
    out = assert_parses(lambda: engine(TlsMode.REQUIRE), option(NbdOpt.LIST), [])
    assert out == TLS_REQD_LIST


BEFORE_TLS_OPTIONS = [
    option(NbdOpt.LIST),
    option(NbdOpt.INFO, name_info_payload("disk")),
    option(NbdOpt.GO, name_info_payload("disk")),
    option(NbdOpt.STRUCTURED_REPLY),
    option(NbdOpt.LIST_META_CONTEXT, meta_payload("disk", [])),
    option(NbdOpt.SET_META_CONTEXT, meta_payload("disk", ["base:allocation"])),
    option(NbdOpt.PEEK_EXPORT),
    option(NbdOpt.EXTENDED_HEADERS),
    option(0x1234, b"abc"),  # unknown options too (nbdkit does the same)
    option(NbdOpt.LIST, b"junk"),  # malformed ones too: TLS comes first
]


@pytest.mark.parametrize("data", BEFORE_TLS_OPTIONS)
def test_require_every_option_before_tls_gets_tls_reqd(data: bytes) -> None:
    # proto.md "FORCEDTLS mode": any option but STARTTLS and ABORT MUST get
    # NBD_REP_ERR_TLS_REQD before TLS; haggling goes on.
    opt = int.from_bytes(data[8:12], "big")
    out = assert_parses(lambda: engine(TlsMode.REQUIRE), data, [])
    assert only_reply(out) == (opt, NbdRep.ERR_TLS_REQD)


@pytest.mark.parametrize("data", BEFORE_TLS_OPTIONS)
def test_require_never_tls_reqd_after_tls(data: bytes) -> None:
    # proto.md: "The server MUST NOT send NBD_REP_ERR_TLS_REQD ... if TLS has
    # already been initiated."
    conn = upgraded(TlsMode.REQUIRE)
    conn.receive_data(data)
    drain_events(conn)
    types = [t for _, t, _ in opt_replies(b"".join(conn.data_to_send()))]
    assert types and NbdRep.ERR_TLS_REQD not in types


def test_require_then_starttls_then_go() -> None:
    conn = engine(TlsMode.REQUIRE)
    conn.receive_data(option(NbdOpt.LIST))
    assert drain_events(conn) == []
    assert only_reply(b"".join(conn.data_to_send())) == (NbdOpt.LIST, NbdRep.ERR_TLS_REQD)
    conn.receive_data(STARTTLS)
    assert drain_events(conn) == [StartTls()]
    assert b"".join(conn.data_to_send()) == ACK_STARTTLS
    conn.tls_started()
    conn.receive_data(option(NbdOpt.STRUCTURED_REPLY) + GO_DISK)
    assert drain_events(conn) == [ExportChosen(DISK)]
    assert conn.structured


def test_require_export_name_before_tls_hangs_up() -> None:
    # proto.md "FORCEDTLS mode": EXPORT_NAME cannot error, so the server MUST
    # terminate the session; in particular it sends no export data.
    data = bytes.fromhex(
        "49484156454f5054"  # IHAVEOPT
        "00000001"  # option: EXPORT_NAME
        "00000004"  # length
        "6469736b"  # "disk"
    )
    assert_fatal(lambda: engine(TlsMode.REQUIRE), data, match="before TLS")
    conn = engine(TlsMode.REQUIRE)
    conn.receive_data(data)
    with pytest.raises(NbdProtocolError):
        drain_events(conn)
    assert conn.data_to_send() == []
    assert conn.export is None


def test_require_export_name_after_tls_works() -> None:
    conn = upgraded(TlsMode.REQUIRE)
    conn.receive_data(option(NbdOpt.EXPORT_NAME, b"disk"))
    assert drain_events(conn) == [ExportChosen(DISK)]


def test_require_abort_before_tls_is_acknowledged() -> None:
    out = assert_parses(lambda: engine(TlsMode.REQUIRE), option(NbdOpt.ABORT), [Disconnect()])
    assert only_reply(out) == (NbdOpt.ABORT, NbdRep.ACK)


def test_tls_mode_spellings_match_the_cli() -> None:
    assert [m.value for m in TlsMode] == ["off", "on", "require"]
