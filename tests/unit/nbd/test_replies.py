"""Exact encodings of the replies the server code queues."""

from __future__ import annotations

import pytest

from fleeced.nbd import ExportInfo, LocalProtocolError, NbdErrno
from tests.helpers import opened

SIMPLE = dict(structured=False)


def out(conn: object) -> bytes:
    return b"".join(conn.data_to_send())  # type: ignore[attr-defined]


def test_reply_ok_is_simple_even_when_structured() -> None:
    for kwargs in ({}, SIMPLE):
        conn = opened(**kwargs)  # type: ignore[arg-type]
        conn.reply_ok(0x1122334455667788)
        assert out(conn) == bytes.fromhex(
            "67446698"  # simple reply magic
            "00000000"  # error 0
            "1122334455667788"  # cookie
        )


def test_simple_error() -> None:
    conn = opened(structured=False)
    conn.reply_error(9, NbdErrno.EIO, "ignored without structured replies")
    assert out(conn) == bytes.fromhex("67446698" "00000005" "0000000000000009")


def test_structured_error_with_message() -> None:
    conn = opened()
    conn.reply_error(9, NbdErrno.ENOSPC, "full")
    assert out(conn) == bytes.fromhex(
        "668e33ef"  # structured reply magic
        "0001"  # flags: DONE
        "8001"  # type: ERROR
        "0000000000000009"  # cookie
        "0000000a"  # length 10
        "0000001c"  # error: ENOSPC (28)
        "0004"  # message length
        "66756c6c"  # "full"
    )


def test_error_ok_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        opened().reply_error(1, NbdErrno.OK)


def test_simple_read() -> None:
    conn = opened(structured=False)
    conn.reply_read(3, 4096, memoryview(b"abcd"))
    parts = conn.data_to_send()
    assert len(parts) == 2  # header, then the caller's buffer (zero-copy)
    assert b"".join(parts) == bytes.fromhex("67446698" "00000000" "0000000000000003" "61626364")


def test_structured_read_data() -> None:
    conn = opened()
    conn.reply_read(3, 4096, bytearray(b"abcd"))
    assert out(conn) == bytes.fromhex(
        "668e33ef"  # magic
        "0001"  # flags: DONE
        "0001"  # type: OFFSET_DATA
        "0000000000000003"  # cookie
        "0000000c"  # length: 8 + 4
        "0000000000001000"  # offset 4096
        "61626364"  # data
    )


def test_structured_read_hole() -> None:
    conn = opened()
    conn.reply_read(3, 4096, bytes(65536), is_hole=True)
    assert out(conn) == bytes.fromhex(
        "668e33ef"  # magic
        "0001"  # flags: DONE
        "0002"  # type: OFFSET_HOLE
        "0000000000000003"  # cookie
        "0000000c"  # length 12
        "0000000000001000"  # offset
        "00010000"  # hole size 65536
    )


def test_simple_read_hole_sends_the_zeros() -> None:
    conn = opened(structured=False)
    conn.reply_read(3, 0, bytes(4), is_hole=True)
    assert out(conn) == bytes.fromhex("67446698" "00000000" "0000000000000003" "00000000")


def test_empty_read_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        opened().reply_read(1, 0, b"")


def test_block_status_two_contexts() -> None:
    export = ExportInfo(name="d", size=1 << 20, meta_contexts=("base:allocation", "qemu:x:y"))
    conn = opened(export, meta=("base:allocation", "qemu:x:y"))
    assert conn.meta_contexts == {1: "base:allocation", 2: "qemu:x:y"}
    conn.reply_block_status(5, [(1, [(4096, 3), (8192, 0)]), (2, [(12288, 1)])])
    assert out(conn) == bytes.fromhex(
        "668e33ef" "0000" "0005" "0000000000000005" "00000014"  # BLOCK_STATUS, not DONE, 20
        "00000001"  # context id 1
        "00001000" "00000003"  # 4096 bytes HOLE|ZERO
        "00002000" "00000000"  # 8192 bytes data
        "668e33ef" "0001" "0005" "0000000000000005" "0000000c"  # BLOCK_STATUS, DONE, 12
        "00000002"  # context id 2
        "00003000" "00000001"  # 12288 bytes, flag 1
    )


@pytest.mark.parametrize("contexts", [[], [(1, [])]])
def test_block_status_misuse(contexts: list) -> None:  # type: ignore[type-arg]
    with pytest.raises(LocalProtocolError):
        opened().reply_block_status(1, contexts)


def test_block_status_needs_structured() -> None:
    with pytest.raises(LocalProtocolError):
        opened(structured=False).reply_block_status(1, [(1, [(512, 0)])])


def test_replies_allowed_after_disc_for_inflight_requests() -> None:
    from tests.helpers import drain_events, request

    conn = opened()
    conn.receive_data(request(0, 1, 0, 4) + request(2, 2))
    drain_events(conn)
    conn.reply_read(1, 0, b"abcd")  # must not raise: DISC waits for in-flight replies
    assert len(out(conn)) == 20 + 8 + 4


def test_read_reply_header_matches_reply_read() -> None:
    """The header for a payload written elsewhere equals reply_read's bytes."""
    for structured in (False, True):
        conn = opened(structured=structured)
        conn.reply_read(7, 4096, b"\x01" * 512)
        queued = b"".join(bytes(x) for x in conn.data_to_send())
        assert conn.read_reply_header(7, 4096, 512) + b"\x01" * 512 == queued


def test_ok_reply_matches_reply_ok() -> None:
    """The success reply written elsewhere: a simple reply (proto.md allows
    it with structured replies for every command but READ and BLOCK_STATUS),
    byte for byte what reply_ok queues; nothing is queued by ok_reply."""
    for structured in (False, True):
        conn = opened(structured=structured)
        assert conn.ok_reply(0x0102030405060708) == (
            b"\x67\x44\x66\x98" + b"\x00" * 4 + b"\x01\x02\x03\x04\x05\x06\x07\x08")
        assert not conn.has_data_to_send()
        conn.reply_ok(0x0102030405060708)
        assert conn.has_data_to_send()
        assert b"".join(bytes(x) for x in conn.data_to_send()) == conn.ok_reply(
            0x0102030405060708)
        assert not conn.has_data_to_send()


# -- a READ reply sent a piece at a time -------------------------------------------


def test_piece_reply_simple() -> None:
    """The header before the first piece, raw data after; no error once begun."""
    r = opened(structured=False).piece_reply(7, 4096, 3 << 20, 0)
    assert r.header(0, 1 << 20) == bytes.fromhex("67446698" "00000000" "0000000000000007")
    assert r.header(1 << 20, 1 << 20) == b"" and r.header(2 << 20, 1 << 20) == b""
    assert r.hole(1 << 20, 1 << 20) is None  # zeros follow the header instead
    assert r.error(NbdErrno.EIO, "x") is None  # the header said success


def test_piece_reply_structured_chunks() -> None:
    """One OFFSET_DATA (or OFFSET_HOLE) chunk per piece, DONE on the last."""
    r = opened().piece_reply(7, 4096, 3 << 20, 0)
    assert r.header(0, 1 << 20) == bytes.fromhex(
        "668e33ef"  # magic
        "0000"  # flags: not the last piece
        "0001"  # type: OFFSET_DATA
        "0000000000000007"  # cookie
        "00100008"  # length: 8 + 1 MiB
        "0000000000001000"  # offset 4096
    )
    assert r.hole(1 << 20, 1 << 20) == bytes.fromhex(
        "668e33ef"  # magic
        "0000"  # flags: not the last piece
        "0002"  # type: OFFSET_HOLE
        "0000000000000007"  # cookie
        "0000000c"  # length 12
        "0000000000101000"  # offset 4096 + 1 MiB
        "00100000"  # hole size 1 MiB
    )
    assert r.header(2 << 20, 1 << 20) == bytes.fromhex(
        "668e33ef" "0001" "0001" "0000000000000007" "00100008" "0000000000201000")
    assert r.error(NbdErrno.EIO, "gone") == bytes.fromhex(
        "668e33ef"  # magic
        "0001"  # flags: DONE
        "8001"  # type: ERROR
        "0000000000000007"  # cookie
        "0000000a"  # length 10
        "00000005"  # error: EIO
        "0004"  # message length
        "676f6e65"  # "gone"
    )


def test_piece_reply_structured_df_is_one_chunk() -> None:
    """DF (don't fragment): one OFFSET_DATA chunk for the whole READ."""
    r = opened().piece_reply(7, 0, 2 << 20, 4)  # NBD_CMD_FLAG_DF
    assert r.header(0, 1 << 20) == bytes.fromhex(
        "668e33ef" "0001" "0001" "0000000000000007"
        "00200008"  # length: 8 + 2 MiB
        "0000000000000000")
    assert r.header(1 << 20, 1 << 20) == b""
    assert r.hole(1 << 20, 1 << 20) is None and r.error(NbdErrno.EIO) is None


def test_piece_reply_needs_data() -> None:
    with pytest.raises(LocalProtocolError):
        opened().piece_reply(1, 0, 0, 0)
