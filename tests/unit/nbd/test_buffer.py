"""ReceiveBuffer: adopts a received bytes chunk without copying, copies only tails."""

from __future__ import annotations

from fleeced.nbd.buffer import ReceiveBuffer


def test_take_view_is_zero_copy_on_an_adopted_chunk() -> None:
    b = ReceiveBuffer()
    chunk = b"h" * 28 + b"p" * 100 + b"tail"
    b.feed(chunk)
    assert b.data is chunk
    b.skip(28)
    view = b.take_view(100)
    assert isinstance(view, memoryview) and view.obj is chunk
    assert bytes(view) == b"p" * 100
    # the unconsumed tail is copied once more bytes arrive; the view stays valid
    b.feed(b"-more")
    assert isinstance(b.data, bytearray)
    assert b.take(9) == b"tail-more"
    assert bytes(view) == b"p" * 100


def test_bytearray_and_memoryview_chunks_are_copied() -> None:
    for chunk in (bytearray(b"abcdef"), memoryview(b"abcdef")):
        b = ReceiveBuffer()
        b.feed(chunk)
        assert isinstance(b.data, bytearray)
        got = b.take_view(3)
        assert bytes(got) == b"abc" and not isinstance(got, memoryview)
        assert len(b) == 3


def test_split_payload_across_feeds() -> None:
    b = ReceiveBuffer()
    b.feed(b"x" * 10)
    b.feed(b"y" * 10)
    assert bytes(b.take_view(15)) == b"x" * 10 + b"y" * 5
    b.feed(b"z")
    assert b.take(6) == b"yyyyyz"
    assert len(b) == 0
