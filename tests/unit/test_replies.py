"""ReplyWriter against a fake transport: the hand-off between loop-written and
worker-written replies, without sockets or native workers.

The fake transport and the fake worker socket share one ``wire``, so every
test asserts the exact bytes the client would see, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from fleeced.server.replies import WRITE_BUFFER_HIGH, ReplyWriter


class Wire:
    """What reached the client, in order."""

    def __init__(self) -> None:
        self.data = bytearray()


class FakeSock:
    """The object ``transport.get_extra_info("socket")`` returns."""

    def __init__(self, fd: int = -1) -> None:  # -1: no real descriptor to ask about
        self.fd = fd
        self.options: list[tuple[int, int, int]] = []

    def fileno(self) -> int:
        return self.fd

    def setsockopt(self, level: int, name: int, value: int) -> None:
        self.options.append((level, name, value))


class FakeTransport:
    """Records writes on a shared wire; can hold them (a client not reading),
    and can refuse them (closing)."""

    def __init__(self, wire: Wire, sock: FakeSock | None = None) -> None:
        self.wire = wire
        self.sock = sock if sock is not None else FakeSock()
        self.held = False  # writes stay in the buffer (socket full)
        self.buffer = bytearray()
        self.closing = False
        self.aborted = False
        self.limits: dict[str, Any] = {}
        self.protocol: Any = None
        self.reading = True
        self.lost = False
        self._paused = False

    # asyncio.Transport surface used by the server
    def writelines(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        assert not self.closing, "write on a closing transport"
        for part in parts:
            self.write(part)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.held or self.buffer:
            self.buffer += data
            self._check_high()
        else:
            self.wire.data += data

    def _check_high(self) -> None:
        high = self.limits.get("high")
        high = WRITE_BUFFER_HIGH if high is None else high
        if self.protocol is not None and not self._paused and len(self.buffer) > high:
            self._paused = True
            self.protocol.pause_writing()

    def drain(self) -> None:
        """The client read everything: the buffer goes out."""
        self.held = False
        self.wire.data += self.buffer
        self.buffer.clear()
        if self._paused and self.protocol is not None:
            self._paused = False
            self.protocol.resume_writing()
        if self.closing:
            self._lost()

    def _lost(self) -> None:
        """Tell the protocol the connection is gone (as a loop would, soon)."""
        if self.protocol is not None and not self.lost:
            self.lost = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = {"high": high, "low": low}
        self._check_high()  # as asyncio and uvloop do

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"socket": self.sock, "peername": None}.get(name, default)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        if not self.buffer:
            self._lost()

    def abort(self) -> None:
        self.closing = self.aborted = True
        self.buffer.clear()
        self._lost()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class FakeReplySocket:
    """The workers' handle: writes straight to the wire, can be stalled."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.resumed = 0
        self.closed = False

    def worker_write(self, header: bytes, data: bytes, limit: int | None = None) -> int:
        """What a worker does: write up to LIMIT bytes, return how many."""
        assert not self.closed
        whole = header + data
        part = whole if limit is None else whole[:limit]
        self.wire.data += part
        return len(part)

    def resume(self) -> None:
        self.resumed += 1

    def close(self) -> None:
        self.closed = True


class Engine:
    """Stands in for the engine's output queue."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def data_to_send(self) -> list[bytes]:
        out, self.out = self.out, []
        return out


class Rig:
    def __init__(self, native: bool = True, refuse_open: bool = False) -> None:
        self.wire = Wire()
        self.engine = Engine()
        self.transport = FakeTransport(self.wire)
        self.socks: list[FakeReplySocket] = []
        self.opened_fds: list[int] = []

        def open_socket(fd: int) -> FakeReplySocket:
            if refuse_open:
                raise OSError(24, "Too many open files")
            self.opened_fds.append(fd)
            sock = FakeReplySocket(self.wire)
            self.socks.append(sock)
            return sock

        self.writer = ReplyWriter(self.engine.data_to_send,
                                  open_socket if native else None)  # type: ignore[arg-type]
        self.writer.attach(self.transport)  # type: ignore[arg-type]


HDR = b"H" * 16


def test_attach_sets_limits_and_send_buffer() -> None:
    rig = Rig()
    assert rig.transport.limits["high"] == WRITE_BUFFER_HIGH
    assert len(rig.transport.sock.options) == 1


def test_loop_replies_go_out_in_order() -> None:
    rig = Rig()
    rig.engine.out = [b"a", b"bb"]
    rig.writer.flush()
    rig.engine.out = [b"ccc"]
    rig.writer.flush()
    assert rig.wire.data == b"abbccc"


def test_worker_socket_opened_once_from_the_transport_fd() -> None:
    rig = Rig()
    rig.transport.sock.fd = 7
    s1 = rig.writer.worker_socket()
    rig.writer.worker_started()
    s2 = rig.writer.worker_socket()
    assert s1 is s2 is rig.socks[0]
    assert rig.opened_fds == [7]


def test_no_worker_replies_without_native_or_when_refused() -> None:
    assert Rig(native=False).writer.worker_socket() is None
    assert Rig(refuse_open=True).writer.worker_socket() is None
    rig = Rig()
    rig.transport.sock = None  # type: ignore[assignment]
    assert rig.writer.worker_socket() is None


def test_loop_replies_wait_while_a_worker_reply_is_in_flight() -> None:
    rig = Rig()
    sock = rig.writer.worker_socket()
    assert isinstance(sock, FakeReplySocket)
    rig.writer.worker_started()
    # A small reply is encoded meanwhile: it must not go out mid worker reply.
    rig.engine.out = [b"<ok>"]
    rig.writer.flush()
    assert rig.wire.data == b""
    data = b"D" * 100
    sent = sock.worker_write(HDR, data)
    rig.writer.worker_done(HDR, data, sent)
    rig.writer.flush()
    assert rig.wire.data == HDR + data + b"<ok>"


def test_worker_socket_flushes_first_and_refuses_while_loop_bytes_are_buffered() -> None:
    rig = Rig()
    rig.transport.held = True  # the client does not read
    rig.engine.out = [b"<ok>"]
    assert rig.writer.worker_socket() is None  # flushed, but still buffered
    assert rig.transport.buffer == b"<ok>"
    rig.transport.drain()
    assert rig.writer.worker_socket() is not None
    assert rig.wire.data == b"<ok>"


@pytest.mark.parametrize("cut", [5, 16, 40])  # in the header, at its end, in the data
def test_partial_worker_reply_rest_goes_first(cut: int) -> None:
    rig = Rig()
    sock = rig.writer.worker_socket()
    assert isinstance(sock, FakeReplySocket)
    rig.writer.worker_started()
    data = bytes(range(100))
    sent = sock.worker_write(HDR, data, limit=cut)
    rig.engine.out = [b"<later>"]  # queued while the worker wrote
    rig.transport.held = True  # the socket is full
    rig.writer.worker_done(HDR, data, sent)
    rig.writer.flush()
    rig.transport.drain()
    assert rig.wire.data == HDR + data + b"<later>"


def test_stalled_socket_is_handed_back_only_once_the_rest_is_out() -> None:
    rig = Rig()
    sock = rig.writer.worker_socket()
    assert isinstance(sock, FakeReplySocket)
    rig.writer.worker_started()
    rig.writer.worker_started()  # a second worker reply in flight
    data = b"x" * 64
    rig.transport.held = True
    rig.writer.worker_done(HDR, data, sock.worker_write(HDR, data, limit=20))
    # Stalled: no new worker reply while the other one is still out...
    assert rig.writer.worker_socket() is None
    # ...which C refused to write (stalled): the loop answers it.
    rig.writer.worker_done(HDR, data, 0)
    rig.engine.out = [HDR, data]
    # Its rest is still buffered: loop replies queue behind it, no worker.
    assert rig.writer.worker_socket() is None
    assert sock.resumed == 0
    rig.transport.drain()
    assert rig.writer.worker_socket() is sock
    assert sock.resumed == 1
    assert rig.wire.data == (HDR + data) * 2
    # Not stalled any more: no second resume.
    rig.writer.worker_started()
    rig.writer.worker_done(HDR, data, sock.worker_write(HDR, data))
    assert rig.writer.worker_socket() is sock and sock.resumed == 1


def test_worker_reply_not_sent_leaves_the_reply_to_the_loop() -> None:
    rig = Rig()
    assert rig.writer.worker_socket() is not None
    rig.writer.worker_started()
    rig.writer.worker_done(HDR, b"data", 0)  # socket was full: nothing sent
    assert rig.wire.data == b""
    rig.engine.out = [HDR, b"data"]
    rig.writer.flush()
    assert rig.wire.data == HDR + b"data"


def test_close_while_a_worker_reply_is_in_flight() -> None:
    rig = Rig()
    sock = rig.writer.worker_socket()
    assert isinstance(sock, FakeReplySocket)
    rig.writer.worker_started()
    data = b"y" * 50
    sent = sock.worker_write(HDR, data, limit=30)
    rig.transport.abort()  # the client went away
    rig.writer.close()
    rig.writer.close()  # idempotent
    assert sock.closed
    # The completion still arrives: nothing is written to the dead transport.
    rig.writer.worker_done(HDR, data, sent)
    rig.engine.out = [b"<late>"]
    rig.writer.flush()
    assert rig.writer.worker_replies == 0
    assert rig.wire.data == (HDR + data)[:30]
    assert rig.writer.worker_socket() is None


def test_refusing_transport_gets_no_writes() -> None:
    rig = Rig()
    rig.transport.closing = True
    rig.engine.out = [b"x"]
    rig.writer.flush()
    assert rig.wire.data == b"" and rig.engine.out == []
    assert rig.writer.worker_socket() is None


def test_tls_means_no_worker_replies_for_good() -> None:
    rig = Rig()
    rig.engine.out = [b"<starttls ack>"]
    plain = rig.writer.start_tls()
    assert plain is rig.transport and rig.writer.transport is None
    assert rig.wire.data == b"<starttls ack>"
    tls = FakeTransport(rig.wire, FakeSock(9))
    rig.writer.attach(tls)  # type: ignore[arg-type]
    assert rig.writer.tls
    assert tls.sock.options == []  # the TLS transport's socket is left alone
    assert rig.writer.worker_socket() is None
    assert rig.opened_fds == []
    rig.engine.out = [b"<reply>"]
    rig.writer.flush()
    assert rig.wire.data == b"<starttls ack><reply>"


class Protocol:
    """Records the flow-control calls a transport makes."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause_writing(self) -> None:
        self.calls.append("pause")

    def resume_writing(self) -> None:
        self.calls.append("resume")


def test_notify_when_drained_pauses_now_and_resumes_once_empty() -> None:
    rig = Rig()
    proto = Protocol()
    rig.transport.protocol = proto
    rig.writer.notify_when_drained()  # nothing buffered: nothing to wait for
    assert proto.calls == [] and rig.transport.limits["high"] == WRITE_BUFFER_HIGH
    rig.transport.held = True
    rig.engine.out = [b"abc"]
    rig.writer.flush()
    rig.writer.notify_when_drained()
    assert proto.calls == ["pause"] and rig.transport.limits["high"] == 0
    rig.writer.notify_when_drained()  # once
    assert proto.calls == ["pause"]
    rig.transport.drain()
    assert proto.calls == ["pause", "resume"]
    rig.writer.drained()
    assert rig.transport.limits["high"] == WRITE_BUFFER_HIGH


def test_a_deferred_read_keeps_the_socket_from_workers_until_handed_back() -> None:
    rig = Rig()
    sock = rig.writer.worker_socket()
    assert sock is not None
    rig.writer.worker_started()
    rig.writer.worker_started()
    rig.writer.worker_deferred()  # C saw the socket stalled
    assert rig.writer.worker_socket() is None  # one still out: wait for it
    rig.writer.worker_done(HDR, b"", len(HDR))
    assert rig.writer.worker_socket() is sock and rig.socks[0].resumed == 1
    assert rig.writer.may_wait()


def test_may_wait_only_while_workers_may_write_again() -> None:
    assert not Rig(native=False).writer.may_wait()
    refused = Rig(refuse_open=True)
    assert refused.writer.worker_socket() is None
    assert not refused.writer.may_wait()
    closing = Rig()
    closing.transport.closing = True
    assert not closing.writer.may_wait()
