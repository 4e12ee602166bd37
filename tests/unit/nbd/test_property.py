"""Property: arbitrary request streams, split anywhere, never break the engine.

Every request yields exactly one Command or Rejected (with its own cookie, in order),
every Rejected has its error reply queued, and the only exception ever raised is
NbdProtocolError -- exactly at the first request that is fatal by the rules.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fleeced.nbd import (
    MAX_PAYLOAD,
    NEED_DATA,
    Command,
    Disconnect,
    NbdProtocolError,
    Rejected,
)
from tests.helpers import REQUEST_MAGIC, Reader, opened, request

SIZE = 1 << 20

requests = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 9), st.integers(0, 0xFFFF)),  # cmd (2 = DISC sometimes)
        st.one_of(st.integers(0, 31), st.integers(0, 0xFFFF)),  # flags
        st.one_of(
            st.sampled_from([0, 1, 512, SIZE - 512, SIZE - 1, SIZE, 2**64 - 1]),
            st.integers(0, 2**64 - 1),
        ),  # offset
        st.one_of(
            st.sampled_from([0, 1, 512, 4096, SIZE, MAX_PAYLOAD, MAX_PAYLOAD + 1, 2**32 - 1]),
            st.integers(0, 2**32 - 1),
        ),  # length
        st.booleans() | st.just(False) | st.just(False),  # corrupt the magic (rarely)
    ),
    max_size=12,
)


def encode(cmd: int, flags: int, offset: int, length: int, bad: bool, cookie: int) -> bytes:
    if cmd == 1 and length <= MAX_PAYLOAD:
        length %= 2048  # keep written payloads small
        return request(cmd, cookie, offset, length, flags, bytes([cookie & 0xFF]) * length)
    magic = REQUEST_MAGIC ^ 1 if bad else REQUEST_MAGIC
    return request(cmd, cookie, offset, length, flags, magic=magic)


@settings(max_examples=300, deadline=None)
@given(reqs=requests, cuts=st.lists(st.integers(0, 4096), max_size=20), shut=st.booleans(),
       structured=st.booleans())
def test_random_requests(
    reqs: list[tuple[int, int, int, int, bool]], cuts: list[int], shut: bool, structured: bool
) -> None:
    conn = opened(structured=structured)
    if shut:
        conn.shutting_down()
    wire = b""
    expected_fatal = None
    expected_disc = None
    for i, (cmd, flags, offset, length, bad) in enumerate(reqs):
        wire += encode(cmd, flags, offset, length, bad, i)
        if expected_fatal is None and expected_disc is None:
            if bad and not (cmd == 1 and length <= MAX_PAYLOAD):
                expected_fatal = i
            elif cmd == 2:
                expected_disc = i
            elif cmd == 1 and length > MAX_PAYLOAD:
                # Only a WRITE's payload is fatal; an oversized READ is rejected.
                expected_fatal = i

    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    events = []
    fatal = False
    try:
        for a, b in zip(points, points[1:], strict=False):
            conn.receive_data(wire[a:b])
            while (ev := conn.next_event()) is not NEED_DATA:
                events.append(ev)
                if isinstance(ev, Disconnect):
                    break
            if events and isinstance(events[-1], Disconnect):
                break
    except NbdProtocolError:
        fatal = True

    stop = expected_fatal if expected_fatal is not None else expected_disc
    n = len(reqs) if stop is None else stop
    assert fatal == (expected_fatal is not None)
    per_request = [e for e in events if not isinstance(e, Disconnect)]
    assert [e.cookie for e in per_request] == list(range(n))  # type: ignore[union-attr]
    assert all(isinstance(e, Command | Rejected) for e in per_request)
    if expected_disc is not None and expected_fatal is None:
        assert isinstance(events[-1], Disconnect)

    reader = Reader()
    reader.feed(conn.data_to_send())
    for ev in per_request:
        if isinstance(ev, Rejected):
            assert reader.reply_error() == (ev.cookie, ev.error)
            if shut:
                assert ev.error == 108
        else:
            assert isinstance(ev, Command) and not shut
            assert (ev.data is not None) == (ev.cmd == 1)
            assert ev.offset + ev.length <= SIZE
    assert reader.empty()
