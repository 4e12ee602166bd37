"""NbdConnection with an in-memory transport and a fake export (aioquic
style): no daemon process, no socket, no native operation.

The client side is the byte encoders/decoders of :mod:`tests.helpers`; the
transport and the workers' socket handle are the fakes of
:mod:`tests.unit.test_replies`, which share one ``wire`` so every test sees
exactly what a client would read, in order.
"""

from __future__ import annotations

import asyncio
import errno
import struct
from collections.abc import Callable

import pytest

from fleeced.exports import ExportStats, ReadResult, ReplyTorn
from fleeced.nbd import ExportInfo, NbdCmd, NbdErrno, NbdOpt, NbdRep, RunRule
from fleeced.server.connection import (
    SEND_MIN,
    WORKER_ACK_MAX_IN_FLIGHT,
    WRITE_RUN_MAX,
    NbdConnection,
)
from fleeced.server.listener import NbdServer
from tests.helpers import Reader, client_flags, name_info_payload, option, request
from tests.unit.test_replies import FakeReplySocket, FakeTransport, Wire

pytestmark = pytest.mark.asyncio

MiB = 1 << 20
SIZE = 16 * MiB


class FakeExport:
    """An export in memory.  Reads and writes complete when the test says so
    (``hold``) or on the next loop iteration."""

    def __init__(self, size: int = SIZE, inline: bool = False, runs: bool = False) -> None:
        self._info = ExportInfo(name="disk", size=size)
        # runs: take runs of small READs and WRITEs itself, as the image does in C
        self.takes_runs = runs
        self.run_counts: list[int] = []
        self.write_runs: list[tuple[bytes, int, asyncio.Future[list[int]]]] = []
        self.write_rcs: dict[int, int] = {}  # offset -> rc of a write there
        self._stats = ExportStats()
        self.data = bytearray((bytes(range(251)) * (size // 251 + 1))[:size])
        self.inline = inline
        self.hold = False
        self.reads: list[tuple[int, int, object, bytes, asyncio.Future[ReadResult]]] = []
        self.log: list[str] = []
        self.gate: asyncio.Event | None = None  # writes wait for it when set
        self.fail: OSError | None = None
        # queue_writes: WRITEs are submitted (and held like reads) instead
        # of taking the task path; each entry: offset, data, socket, header.
        self.queue_writes = False
        self.writes: list[tuple[int, bytes, object, bytes, asyncio.Future[int]]] = []

    @property
    def info(self) -> ExportInfo:
        return self._info

    @property
    def stats(self) -> ExportStats:
        return self._stats

    def _result(self, offset: int, length: int) -> ReadResult:
        return ReadResult(bytes(self.data[offset:offset + length]))

    def check_read(self, offset: int, length: int) -> None:
        return None

    def read_now(self, offset: int, length: int) -> ReadResult | None:
        # like the image: only small reads are tried inline
        return self._result(offset, length) if self.inline and length < SEND_MIN else None

    def read_run(self, rule: RunRule, data: bytes | bytearray, pos: int,
                 max_count: int) -> tuple[int, int, int, memoryview] | None:
        """fl_file_read_run in short: simple replies, small READs only."""
        assert not rule.structured
        out, consumed, count, nbytes = bytearray(), 0, 0, 0
        while count < max_count and len(data) - pos - consumed >= 28:
            _magic, flags, cmd, cookie, offset, length = struct.unpack_from(
                ">IHHQQI", data, pos + consumed)
            if cmd != NbdCmd.READ or flags & ~rule.allowed_flags or not 0 < length < SEND_MIN \
                    or offset + length > rule.size:
                break
            out += struct.pack(">IIQ", 0x67446698, 0, cookie) + self.data[offset:offset + length]
            consumed += 28
            count += 1
            nbytes += length
        if not count:
            return None
        self.run_counts.append(count)
        return consumed, count, nbytes, memoryview(bytes(out))

    def write_run(self, rule: RunRule, data: bytes | bytearray, pos: int, max_count: int
                  ) -> tuple[int, int, int, bytes, bytes, asyncio.Future[list[int]]] | None:
        """fl_write_run_check + one queued op in short: WRITEs whose payload
        is here; they land (each rc from ``write_rcs``, 0 by default) when
        the op completes (next loop turn, or ``complete_write_run``)."""
        acks, consumed, count, nbytes = bytearray(), 0, 0, 0
        while count < max_count and len(data) - pos - consumed >= 28:
            _magic, flags, cmd, cookie, offset, length = struct.unpack_from(
                ">IHHQQI", data, pos + consumed)
            if cmd != NbdCmd.WRITE or flags & ~rule.allowed_flags or length == 0 \
                    or offset + length > rule.size \
                    or len(data) - pos - consumed - 28 < length:
                break
            acks += struct.pack(">IIQ", 0x67446698, 0, cookie)
            consumed += 28 + length
            count += 1
            nbytes += length
        if not count:
            return None
        req = bytes(data[pos:pos + consumed])
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self.write_runs.append((req, count, fut))
        if not self.hold:
            self.complete_write_run(len(self.write_runs) - 1)
        return consumed, count, nbytes, bytes(acks), req, fut

    def complete_write_run(self, i: int) -> None:
        req, count, fut = self.write_runs[i]
        rcs, pos = [], 0
        for _k in range(count):
            *_, offset, length = struct.unpack_from(">IHHQQI", req, pos)
            rc = self.write_rcs.get(offset, 0)
            if rc == 0:
                self.data[offset:offset + length] = req[pos + 28:pos + 28 + length]
            rcs.append(rc)
            pos += 28 + length
        fut.set_result(rcs)

    def submit_read(self, offset: int, length: int, reply_to: object = None,
                    header: bytes = b"", *, piece: bool = False) -> asyncio.Future[ReadResult]:
        fut: asyncio.Future[ReadResult] = asyncio.get_running_loop().create_future()
        self.reads.append((offset, length, reply_to, header, fut))
        if not self.hold:
            self.complete(len(self.reads) - 1)
        return fut

    def complete(self, i: int, sent: int | None = None, deferred: bool = False) -> None:
        """Finish read I; with a worker handle it writes SENT bytes (all by
        default), or with DEFERRED hands the read back unread (C found the
        socket stalled)."""
        offset, length, sock, header, fut = self.reads[i]
        if self.fail is not None:
            fut.set_exception(self.fail)
            return
        if deferred:
            assert isinstance(sock, FakeReplySocket)
            fut.set_result(ReadResult(bytearray(length), deferred=True))
            return
        result = self._result(offset, length)
        if isinstance(sock, FakeReplySocket):
            n = sock.worker_write(header, bytes(result.data), sent)
            result = ReadResult(result.data, False, n)
        fut.set_result(result)

    async def read(self, offset: int, length: int) -> ReadResult:
        return self._result(offset, length)

    def submit_write(self, offset: int, data: bytes | memoryview, fua: bool,
                     reply_to: object = None, header: bytes = b"",
                     ) -> asyncio.Future[int] | None:
        if not self.queue_writes:
            return None  # the task path: write()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.writes.append((offset, bytes(data), reply_to, header, fut))
        if not self.hold:
            self.complete_write(len(self.writes) - 1)
        return fut

    def complete_write(self, i: int, sent: int | None = None) -> None:
        """Finish write I; with a worker handle it writes SENT bytes of the
        reply (all by default)."""
        offset, data, sock, header, fut = self.writes[i]
        if self.fail is not None:
            fut.set_exception(self.fail)
            return
        self.data[offset:offset + len(data)] = data
        n = 0
        if isinstance(sock, FakeReplySocket):
            n = sock.worker_write(header, b"", sent)
        fut.set_result(n)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        self.log.append(f"write {offset}")
        if self.gate is not None:
            await self.gate.wait()
        self.data[offset:offset + len(data)] = data
        self.log.append(f"written {offset}")

    async def flush(self) -> None:
        self.log.append("flush")

    async def zero(self, offset: int, length: int, may_trim: bool, fast: bool,
                   fua: bool) -> None:
        self.data[offset:offset + length] = bytes(length)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        return None

    async def cache(self, offset: int, length: int) -> None:
        return None

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 0)]

    async def context_extents(self, context: str, offset: int,
                              length: int) -> list[tuple[int, int]]:
        return [(length, 0)]

    def extents_told(self, context: str, offset: int,
                     extents: list[tuple[int, int]]) -> None:
        return None

    def error_message(self, exc: OSError) -> str:
        return exc.strerror or ""

    def start_native(self, fd: int, rules: object, structured: bool,
                     contexts: object, initial: bytes) -> None:
        return None  # served by the loop: these tests are of the loop's path


class Peer:
    """One connection wired to an in-memory client."""

    def __init__(self, export: FakeExport | None = None, native: bool = False) -> None:
        self.export = export or FakeExport()
        self.server = NbdServer(shutdown_timeout=1.0, handshake_limit=5.0)
        self.server.add_export(self.export)  # type: ignore[arg-type]
        self.wire = Wire()
        self.socks: list[FakeReplySocket] = []
        opener: Callable[[int], FakeReplySocket] | None = self._open if native else None
        self.conn = NbdConnection(self.server, open_socket=opener)  # type: ignore[arg-type]
        self.transport = FakeTransport(self.wire)
        self.transport.protocol = self.conn
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]
        self.read_at = 0

    def _open(self, fd: int) -> FakeReplySocket:
        sock = FakeReplySocket(self.wire)
        self.socks.append(sock)
        return sock

    def reader(self) -> Reader:
        """The wire from where the last reader stopped."""
        r = Reader(bytes(self.wire.data[self.read_at:]))
        self.read_at = len(self.wire.data)
        return r

    def handshake(self) -> None:
        assert self.reader().greeting()
        self.send(client_flags() + option(NbdOpt.GO, name_info_payload("disk")))
        replies = self.reader().opt_replies()
        assert replies[-1].type == NbdRep.ACK
        assert self.conn.negotiated

    def send(self, data: bytes) -> None:
        self.conn.data_received(data)


async def settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def simple(data: bytes, read_length: int = 0) -> tuple[int, int, bytes]:
    r = Reader(data).simple(read_length)
    return r.error, r.cookie, r.data


def replies(p: Peer, lengths: dict[int, int]) -> dict[int, tuple[int, bytes]]:
    """Decode simple replies for the cookies in LENGTHS (READ lengths, 0 else)."""
    r = p.reader()
    out = {}
    while not r.empty():
        (cookie,) = struct.unpack_from(">Q", r.buf, 8)
        reply = r.simple(lengths[cookie])
        assert cookie not in out, f"cookie {cookie} answered twice"
        out[cookie] = (reply.error, reply.data)
    return out


async def test_handshake_and_export_chosen() -> None:
    p = Peer()
    p.handshake()
    assert p.export.stats.connections == 1
    assert p.server.connection_count == 1


async def test_read_through_the_queue() -> None:
    p = Peer()
    p.handshake()
    p.send(request(NbdCmd.READ, 1, 4096, 512))
    assert p.conn.in_flight == 1
    await settle()
    assert replies(p, {1: 512}) == {1: (0, bytes(p.export.data[4096:4608]))}
    assert p.conn.in_flight == 0
    assert p.export.stats.bytes_read == 512


async def test_inline_read_needs_no_loop_turn() -> None:
    p = Peer(FakeExport(inline=True))
    p.handshake()
    p.send(request(NbdCmd.READ, 7, 0, 100))
    assert replies(p, {7: 100}) == {7: (0, bytes(p.export.data[:100]))}
    assert p.export.reads == []


async def test_reads_answered_in_runs_around_other_requests() -> None:
    p = Peer(FakeExport(inline=True, runs=True))
    p.handshake()
    reads = {1: (0, 512), 2: (4096, 100), 3: (8192, 4096), 5: (0, 7), 6: (100, 200)}
    wire = b"".join(request(NbdCmd.READ, c, o, n) for c, (o, n) in reads.items() if c < 4)
    wire += request(NbdCmd.FLUSH, 4)
    wire += b"".join(request(NbdCmd.READ, c, o, n) for c, (o, n) in reads.items() if c > 4)
    wire += request(NbdCmd.READ, 7, SIZE, 512)  # past the end: the engine's EINVAL
    p.send(wire)
    await settle()
    got = replies(p, {**{c: n for c, (_o, n) in reads.items()}, 4: 0, 7: 0})
    assert got == {**{c: (0, bytes(p.export.data[o:o + n])) for c, (o, n) in reads.items()},
                   4: (0, b""), 7: (NbdErrno.EINVAL, b"")}
    assert p.export.run_counts == [3, 2]
    assert p.export.reads == []
    assert p.export.stats.requests == 7 and p.export.stats.bytes_read == 512 + 100 + 4096 + 207
    assert p.conn.reply_bytes == 0 and p.conn.in_flight == 0


async def test_a_run_stops_at_the_reply_budget_like_any_read() -> None:
    # Runs are answered while parsing; parsing stops where the client stops
    # reading its replies (the write buffer is over the high-water mark).
    p = Peer(FakeExport(inline=True, runs=True))
    p.handshake()
    p.transport.held = True
    p.send(b"".join(request(NbdCmd.READ, c, 0, 60000) for c in range(1, 200)))
    assert sum(p.export.run_counts) < 199  # held: the rest stays unparsed
    held = sum(p.export.run_counts)
    p.transport.drain()
    p.conn.resume_writing()
    p.transport.held = False
    await settle()
    assert sum(p.export.run_counts) == 199 > held


async def test_replay_shutdown_drops_reads_a_run_would_answer() -> None:
    p = Peer(FakeExport(inline=True, runs=True))
    p.handshake()
    p.conn.shutdown(replay=True)
    p.send(request(NbdCmd.READ, 2, 0, 512) + request(NbdCmd.READ, 3, 512, 512))
    await settle()
    assert p.conn.dropped == 2
    assert replies(p, {}) == {}
    assert p.export.run_counts == []


async def test_writes_queued_in_runs_and_acknowledged_together() -> None:
    p = Peer(FakeExport(runs=True))
    p.handshake()
    p.export.hold = True
    # Two in flight first: a shallow queue keeps the worker-acked path.
    first = request(NbdCmd.WRITE, 1, 0, 4, data=b"aaaa") + request(NbdCmd.WRITE, 2, 8, 4,
                                                                    data=b"bbbb")
    p.send(first)
    assert p.export.write_runs == [] and p.conn.in_flight == 2
    run = b"".join(request(NbdCmd.WRITE, c, 100 * c, 3, data=bytes([c]) * 3)
                   for c in range(3, 8))
    p.send(run + request(NbdCmd.READ, 9, 0, 4))  # then a READ run
    assert [count for _req, count, _fut in p.export.write_runs] == [WRITE_RUN_MAX, 1]
    assert p.conn.in_flight == 2 + 5
    assert replies(p, {9: 4}) == {9: (0, bytes(p.export.data[:4]))}
    await settle()
    assert replies(p, {1: 0, 2: 0}) == {1: (0, b""), 2: (0, b"")}  # the task path's
    assert p.conn.in_flight == 5  # the runs', until their operations complete
    p.export.complete_write_run(0)
    p.export.complete_write_run(1)
    await settle()
    got = replies(p, {c: 0 for c in range(3, 8)})
    assert got == {c: (0, b"") for c in range(3, 8)}
    assert all(p.export.data[100 * c:100 * c + 3] == bytes([c]) * 3 for c in range(3, 8))
    assert p.export.stats.bytes_written == 8 + 15
    assert p.conn.in_flight == 0


async def test_a_failed_write_in_a_run_fails_alone() -> None:
    p = Peer(FakeExport(runs=True))
    p.handshake()
    p.export.hold = True
    p.export.queue_writes = True
    p.send(request(NbdCmd.WRITE, 1, 0, 4, data=b"aaaa") * 2)  # two in flight
    p.export.write_rcs[300] = -errno.ENOSPC
    p.export.write_rcs[400] = -errno.EIO
    p.send(b"".join(request(NbdCmd.WRITE, c, 100 * c, 3, data=b"xyz") for c in range(3, 6)))
    p.export.complete_write_run(0)
    await settle()
    got = replies(p, {3: 0, 4: 0, 5: 0})
    assert got == {3: (NbdErrno.ENOSPC, b""), 4: (NbdErrno.EIO, b""), 5: (0, b"")}
    assert p.export.stats.errors == 2 and p.export.stats.bytes_written == 3
    assert p.export.data[500:503] == b"xyz" and p.export.data[300:303] != b"xyz"


async def test_write_then_flush() -> None:
    p = Peer()
    p.handshake()
    p.send(request(NbdCmd.WRITE, 1, 8192, 4, data=b"abcd"))
    await settle()
    assert replies(p, {1: 0}) == {1: (0, b"")}
    p.send(request(NbdCmd.FLUSH, 2))
    await settle()
    assert replies(p, {2: 0}) == {2: (0, b"")}
    assert p.export.data[8192:8196] == b"abcd"
    assert p.export.log == ["write 8192", "written 8192", "flush"]


async def test_write_reply_waits_for_the_write() -> None:
    p = Peer()
    p.export.gate = asyncio.Event()
    p.handshake()
    p.send(request(NbdCmd.WRITE, 1, 0, 4, data=b"wxyz") + request(NbdCmd.FLUSH, 2))
    await settle()
    # The flush was sent before the write was answered: it may complete
    # first (proto.md: FLUSH covers completed writes), the write may not.
    assert replies(p, {2: 0}) == {2: (0, b"")}
    p.export.gate.set()
    await settle()
    assert replies(p, {1: 0}) == {1: (0, b"")}


async def test_export_error_is_mapped_to_an_nbd_errno() -> None:
    p = Peer()
    p.export.fail = OSError(errno.EDQUOT, "quota")
    p.handshake()
    p.send(request(NbdCmd.READ, 3, 0, 512))
    await settle()
    assert replies(p, {3: 512}) == {3: (NbdErrno.ENOSPC, b"")}
    assert p.export.stats.errors == 1


async def test_big_read_written_whole_by_a_worker() -> None:
    p = Peer(native=True)
    p.handshake()
    p.export.hold = True
    p.send(request(NbdCmd.READ, 1, 0, SEND_MIN) + request(NbdCmd.WRITE, 2, 0, 2, data=b"zz"))
    assert len(p.socks) == 1 and p.export.reads[0][2] is p.socks[0]
    await settle()  # the write completed: its reply waits for the worker's
    assert p.wire.data[p.read_at:] == b""
    p.export.complete(0)
    await settle()
    got = replies(p, {1: SEND_MIN, 2: 0})
    assert got[2] == (0, b"") and got[1][0] == 0 and len(got[1][1]) == SEND_MIN


async def test_big_read_sent_in_part_rest_goes_first() -> None:
    p = Peer(native=True)
    p.handshake()
    p.export.hold = True
    p.send(request(NbdCmd.READ, 1, 0, SEND_MIN) + request(NbdCmd.READ, 2, SEND_MIN, SEND_MIN))
    p.export.complete(0, sent=1000)  # the socket filled up
    p.export.complete(1, sent=0)  # C saw it stalled: nothing sent
    await settle()
    got = replies(p, {1: SEND_MIN, 2: SEND_MIN})
    assert got == {1: (0, bytes(p.export.data[:SEND_MIN])),
                   2: (0, bytes(p.export.data[SEND_MIN:2 * SEND_MIN]))}
    assert p.socks[0].resumed == 0
    # The next big read hands the (drained) socket back to workers.
    p.export.hold = False
    p.send(request(NbdCmd.READ, 3, 0, SEND_MIN))
    await settle()
    assert p.socks[0].resumed == 1
    assert replies(p, {3: SEND_MIN})[3][0] == 0


async def test_read_handed_back_unread_goes_to_a_worker_once_the_rest_is_out() -> None:
    # A worker that finds the socket stalled hands its read back unread
    # (no copy into memory only to wait there); it is submitted again, to
    # a worker, once the partial reply's rest has left the transport.
    p = Peer(native=True)
    p.handshake()
    p.export.hold = True
    p.send(request(NbdCmd.READ, 1, 0, SEND_MIN) + request(NbdCmd.READ, 2, SEND_MIN, SEND_MIN))
    p.transport.held = True  # the client is slow to read
    p.export.complete(0, sent=1000)  # the socket filled up: stalled
    p.export.complete(1, deferred=True)
    await settle()
    assert len(p.export.reads) == 2  # waits: nothing read, nothing sent
    assert p.conn.in_flight == 1 and p.conn.paused_since > 0  # parsing paused
    p.transport.drain()  # the rest of reply 1 is out
    await settle()
    assert len(p.export.reads) == 3 and p.export.reads[2][2] is p.socks[0]
    assert p.socks[0].resumed == 1 and p.conn.paused_since == 0
    p.export.complete(2)
    await settle()
    got = replies(p, {1: SEND_MIN, 2: SEND_MIN})
    assert got == {1: (0, bytes(p.export.data[:SEND_MIN])),
                   2: (0, bytes(p.export.data[SEND_MIN:2 * SEND_MIN]))}
    assert p.conn.in_flight == 0 and p.server.reply_bytes == 0
    assert p.transport.limits["high"] > 0  # normal limits again


async def test_big_read_waits_unread_while_loop_bytes_are_buffered() -> None:
    p = Peer(FakeExport(inline=True), native=True)
    p.handshake()
    p.transport.held = True
    p.send(request(NbdCmd.READ, 1, 0, 512))  # inline: the loop's bytes, buffered
    p.send(request(NbdCmd.READ, 2, 0, SEND_MIN) + request(NbdCmd.READ, 3, 0, 512))
    await settle()
    assert p.export.reads == []  # not read into memory to wait there
    assert not p.transport.reading and p.conn.paused_since > 0
    p.transport.drain()
    await settle()
    assert [r[2] for r in p.export.reads] == [p.socks[0]]  # a worker sends it
    got = replies(p, {1: 512, 2: SEND_MIN, 3: 512})
    assert set(got) == {1, 2, 3} and got[2] == (0, bytes(p.export.data[:SEND_MIN]))
    assert p.conn.in_flight == 0 and p.transport.reading


async def test_waiting_reads_are_answered_by_the_loop_when_workers_never_write() -> None:
    # The connection goes while reads wait for the socket: they take the
    # loop's path (nobody reads the replies) and `closed` waits for them.
    p = Peer(FakeExport(inline=True), native=True)
    p.handshake()
    p.transport.held = True
    p.send(request(NbdCmd.READ, 1, 0, 512) + request(NbdCmd.READ, 2, 0, SEND_MIN))
    await settle()
    assert p.export.reads == [] and p.conn.in_flight == 1
    p.export.hold = True
    p.transport.abort()
    await settle()
    assert [r[2] for r in p.export.reads] == [None]
    assert not p.conn.closed.done()
    p.export.complete(0)
    await asyncio.wait_for(p.conn.closed, 1)
    assert p.server.reply_bytes == 0


async def test_torn_worker_reply_drops_the_connection() -> None:
    p = Peer(native=True)
    p.handshake()
    p.export.fail = ReplyTorn(errno.EPIPE, "reply write failed")
    p.send(request(NbdCmd.READ, 1, 0, SEND_MIN))
    await settle()
    assert p.transport.closing
    await asyncio.wait_for(p.conn.closed, 1)
    assert p.socks[0].closed


async def test_client_eof_with_requests_in_flight() -> None:
    p = Peer()
    p.handshake()
    p.export.hold = True
    p.send(request(NbdCmd.READ, 1, 0, 512) + request(NbdCmd.READ, 2, 512, 512))
    assert p.conn.eof_received() is True  # half-close: replies still go out
    assert not p.transport.closing
    p.export.complete(1)
    await settle()
    assert not p.transport.closing
    p.export.complete(0)
    await settle()
    assert set(replies(p, {1: 512, 2: 512})) == {1, 2}
    assert p.transport.closing
    await asyncio.wait_for(p.conn.closed, 1)


async def test_shutdown_answers_new_requests_eshutdown() -> None:
    p = Peer()
    p.handshake()
    p.export.hold = True
    p.send(request(NbdCmd.READ, 1, 0, 512))
    p.conn.shutdown()
    p.send(request(NbdCmd.READ, 2, 0, 512))
    assert replies(p, {2: 512}) == {2: (NbdErrno.ESHUTDOWN, b"")}
    assert not p.transport.closing  # request 1 still runs
    p.export.complete(0)
    await settle()
    assert replies(p, {1: 512})[1][0] == 0
    assert p.transport.closing
    await asyncio.wait_for(p.conn.closed, 1)


async def test_shutdown_for_replay_drops_new_requests() -> None:
    p = Peer()
    p.handshake()
    p.conn.shutdown(replay=True)
    p.send(request(NbdCmd.READ, 2, 0, 512))
    await settle()
    assert p.conn.dropped == 1
    assert replies(p, {}) == {}
    await asyncio.wait_for(p.conn.closed, 1)


async def test_client_that_stops_reading_stops_being_read() -> None:
    p = Peer()
    p.handshake()
    p.transport.held = True  # the client reads nothing from now on
    p.send(b"".join(request(NbdCmd.READ, c, 0, MiB) for c in range(1, 7)))
    await settle()
    # Two replies buffered, over the high-water mark: reading pauses and
    # what arrives anyway stays unparsed.  A client that does not read
    # costs the daemon about 2 MiB, however much it asked for.
    assert p.conn.paused_since > 0 and not p.transport.reading
    assert 2 * MiB <= p.server.reply_bytes <= 3 * MiB  # held while the client stalls
    p.send(request(NbdCmd.READ, 7, 0, 512) + request(NbdCmd.READ, 8, 0, 512))
    await settle()
    assert len(p.export.reads) == 2
    p.transport.drain()  # the client reads again
    await settle()
    assert len(p.export.reads) == 8 and p.transport.reading
    lengths = {c: MiB for c in range(1, 7)} | {7: 512, 8: 512}
    assert set(replies(p, lengths)) == set(range(1, 9))
    assert p.server.reply_bytes == 0


async def test_protocol_error_drops_the_connection() -> None:
    p = Peer()
    p.handshake()
    p.send(request(NbdCmd.READ, 1, 0, 512, magic=0xDEADBEEF))
    assert p.transport.closing
    await asyncio.wait_for(p.conn.closed, 1)
    assert p.server.connection_count == 0


async def test_disconnect_closes_once_idle() -> None:
    p = Peer()
    p.handshake()
    p.export.hold = True
    p.send(request(NbdCmd.READ, 1, 0, 512) + request(NbdCmd.DISC, 2))
    assert not p.transport.closing
    p.export.complete(0)
    await settle()
    assert replies(p, {1: 512})[1][0] == 0
    assert p.transport.closing
    await asyncio.wait_for(p.conn.closed, 1)


async def test_write_acknowledged_by_the_worker_that_wrote() -> None:
    p = Peer(native=True)
    p.export.queue_writes = True
    p.handshake()
    p.send(request(NbdCmd.WRITE, 1, 4096, 3, data=b"abc"))
    assert p.export.writes[0][2] is p.socks[0]  # the reply went to a worker
    await settle()
    assert replies(p, {1: 0}) == {1: (0, b"")}  # once, by the worker
    assert p.export.data[4096:4099] == b"abc"
    assert p.export.stats.bytes_written == 3 and p.conn.in_flight == 0


async def test_write_reply_sent_in_part_rest_goes_first() -> None:
    p = Peer(native=True)
    p.export.queue_writes = True
    p.export.hold = True
    p.handshake()
    p.send(request(NbdCmd.WRITE, 1, 0, 2, data=b"xy")
           + request(NbdCmd.WRITE, 2, 2, 2, data=b"zw"))
    p.export.complete_write(0, sent=5)  # the socket filled up mid-header
    p.export.complete_write(1, sent=0)  # C saw it stalled: nothing sent
    await settle()
    assert replies(p, {1: 0, 2: 0}) == {1: (0, b""), 2: (0, b"")}


async def test_failed_write_is_answered_by_the_loop() -> None:
    p = Peer(native=True)
    p.export.queue_writes = True
    p.export.fail = OSError(errno.ENOSPC, "full")
    p.handshake()
    p.send(request(NbdCmd.WRITE, 1, 0, 2, data=b"xy"))
    await settle()
    assert replies(p, {1: 0}) == {1: (NbdErrno.ENOSPC, b"")}


async def test_loop_replies_are_not_held_back_by_a_stream_of_worker_replies() -> None:
    # While workers own the socket the loop's replies wait; new requests
    # must then stop going to workers, or a client that keeps writes in
    # flight would never see the loop's replies (here an inline read).
    p = Peer(FakeExport(inline=True), native=True)
    p.export.queue_writes = True
    p.export.hold = True
    p.handshake()
    p.send(request(NbdCmd.WRITE, 1, 0, 2, data=b"xy"))
    p.send(request(NbdCmd.READ, 2, 0, 8))  # answered inline: queued behind 1
    p.send(request(NbdCmd.WRITE, 3, 2, 2, data=b"zw"))
    assert p.export.writes[0][2] is p.socks[0]
    assert p.export.writes[1][2] is None  # the loop answers it
    p.export.complete_write(0)
    await settle()
    got = replies(p, {1: 0, 2: 8})
    assert got[1] == (0, b"") and got[2][0] == 0
    p.export.complete_write(1)
    await settle()
    assert replies(p, {3: 0}) == {3: (0, b"")}


async def test_deep_write_queues_are_acknowledged_by_the_loop() -> None:
    # Worker acknowledgements pay off at queue depth 1; with requests in
    # flight the loop's batched replies are faster (WORKER_ACK_MAX_IN_FLIGHT).
    p = Peer(native=True)
    p.export.queue_writes = True
    p.export.hold = True
    p.handshake()
    p.send(b"".join(request(NbdCmd.WRITE, i, 2 * i, 2, data=b"ab") for i in range(4)))
    socks = [w[2] for w in p.export.writes]
    assert socks[:WORKER_ACK_MAX_IN_FLIGHT] == [p.socks[0]] * WORKER_ACK_MAX_IN_FLIGHT
    assert socks[WORKER_ACK_MAX_IN_FLIGHT:] == [None] * (4 - WORKER_ACK_MAX_IN_FLIGHT)
    for i in range(4):
        p.export.complete_write(i)
    await settle()
    assert replies(p, dict.fromkeys(range(4), 0)) == dict.fromkeys(range(4), (0, b""))


# -- READs larger than a piece: streamed ------------------------------------------

from fleeced.server.connection import CONN_REPLY_BUDGET, STREAM_PIECE  # noqa: E402


def structured_peer(export: FakeExport | None = None, native: bool = False) -> Peer:
    p = Peer(export, native=native)
    assert p.reader().greeting()
    p.send(client_flags() + option(NbdOpt.STRUCTURED_REPLY)
           + option(NbdOpt.GO, name_info_payload("disk")))
    assert p.reader().opt_replies()[-1].type == NbdRep.ACK
    return p


def chunks(p: Peer) -> list[tuple[int, int, int, bytes]]:
    """(flags, type, cookie, payload) of every chunk on the wire since last time."""
    r = p.reader()
    out = []
    while not r.empty():
        c = r.chunk()
        out.append((c.flags, c.type, c.cookie, c.payload))
    return out


@pytest.mark.parametrize("native", [False, True])
async def test_a_large_read_is_sent_a_piece_at_a_time(native: bool) -> None:
    """Simple replies: one header, then the data, read and sent a piece at a
    time (through a worker's socket when there is one): the same bytes as one
    whole reply, and never more than a piece read at once."""
    p = Peer(native=native)
    p.handshake()
    p.export.hold = True
    length = 3 * STREAM_PIECE + 1000
    p.send(request(NbdCmd.READ, 9, 4096, length))
    for i in range(4):
        await settle()
        assert len(p.export.reads) == i + 1  # one piece at a time
        offset, n, sock, header, _ = p.export.reads[i]
        assert offset == 4096 + i * STREAM_PIECE
        assert n == min(STREAM_PIECE, length - i * STREAM_PIECE)
        assert (sock is not None) == native
        assert p.server.reply_bytes == n and p.conn.reply_bytes == 0
        p.export.complete(i)
    await settle()
    assert replies(p, {9: length}) == {9: (0, bytes(p.export.data[4096:4096 + length]))}
    assert p.conn.in_flight == 0 and p.conn.reply_bytes == 0
    assert p.export.stats.requests == 1 and p.export.stats.bytes_read == length


async def test_structured_pieces_are_chunks_holes_included() -> None:
    p = structured_peer()
    p.export.hold = True
    p.send(request(NbdCmd.READ, 5, 0, 2 * STREAM_PIECE + 10))
    await settle()
    p.export.complete(0)
    await settle()
    offset, n, _, _, fut = p.export.reads[1]
    fut.set_result(ReadResult(bytearray(n), hole=True))  # a hole: described, not sent
    await settle()
    p.export.complete(2)
    await settle()
    got = chunks(p)
    data = bytes(p.export.data)
    assert got == [
        (0, 1, 5, struct.pack(">Q", 0) + data[:STREAM_PIECE]),  # OFFSET_DATA
        (0, 2, 5, struct.pack(">QI", STREAM_PIECE, STREAM_PIECE)),  # OFFSET_HOLE
        (1, 1, 5, struct.pack(">Q", 2 * STREAM_PIECE)  # OFFSET_DATA, DONE
         + data[2 * STREAM_PIECE:2 * STREAM_PIECE + 10]),
    ]


async def test_structured_df_is_one_chunk() -> None:
    p = structured_peer()
    p.send(request(NbdCmd.READ, 5, 0, 2 * STREAM_PIECE, 4))  # NBD_CMD_FLAG_DF
    await settle(10)
    assert chunks(p) == [(1, 1, 5, struct.pack(">Q", 0) + bytes(p.export.data[:2 * STREAM_PIECE]))]


async def test_a_stalled_client_costs_a_piece_or_two() -> None:
    """A client asks for 64 x 32 MiB and reads nothing: the connection reads
    about two pieces and stops; nothing else is parsed meanwhile."""
    p = Peer(FakeExport(size=64 * MiB), native=True)
    p.handshake()
    p.transport.held = True
    p.export.hold = True
    p.send(b"".join(request(NbdCmd.READ, c, (c % 2) * 32 * MiB, 32 * MiB) for c in range(64)))
    for i in range(8):
        await settle()
        if i < len(p.export.reads):
            p.export.complete(i, sent=0)  # the socket is full: nothing went out
    await settle()
    assert len(p.export.reads) <= 2
    assert p.conn.reply_bytes + p.conn.paused_bytes <= 2 * STREAM_PIECE + 4096
    assert not p.transport.reading


async def test_replies_wait_behind_a_stream_and_are_bounded() -> None:
    """While a stream owns the socket, other replies wait, held and counted:
    past the connection's budget, parsing stops."""
    p = Peer()
    p.handshake()
    p.export.hold = True
    p.send(request(NbdCmd.READ, 1, 0, 2 * STREAM_PIECE))
    await settle()
    p.export.complete(0)  # the first piece goes out
    await settle()
    first = len(p.wire.data)
    assert first == p.read_at + 16 + STREAM_PIECE
    # 60000-byte READs (loop-replied) arrive while the second piece is read.
    p.send(b"".join(request(NbdCmd.READ, c, 0, 60000) for c in range(2, 40)))
    done = 2
    while done < len(p.export.reads):
        p.export.complete(done)
        done += 1
        await settle()
    assert len(p.wire.data) == first  # nothing may cut into the stream's reply
    held = p.conn._replies.held_bytes
    assert CONN_REPLY_BUDGET <= held <= CONN_REPLY_BUDGET + 60016
    assert len(p.export.reads) < 39  # parsing stopped at the budget
    p.export.hold = False
    p.export.complete(1)
    await settle(20)
    lengths = {1: 2 * STREAM_PIECE, **{c: 60000 for c in range(2, 40)}}
    got = replies(p, lengths)
    assert set(got) == set(range(1, 40))
    assert got[1] == (0, bytes(p.export.data[:2 * STREAM_PIECE]))
    assert p.conn._replies.held_bytes == 0 and p.conn.in_flight == 0


@pytest.mark.parametrize("structured", [False, True])
async def test_a_failing_piece(structured: bool) -> None:
    """The first piece fails: a plain error reply.  A later one: an error
    chunk with structured replies; with simple ones, after a success header,
    the connection must end."""
    for failing in (0, 1):
        p = structured_peer() if structured else Peer()
        if not structured:
            p.handshake()
        p.export.hold = True
        p.send(request(NbdCmd.READ, 3, 0, 2 * STREAM_PIECE))
        await settle()
        if failing == 1:
            p.export.complete(0)
            await settle()
        p.export.reads[failing][4].set_exception(OSError(errno.EIO, "disk gone"))
        await settle()
        if failing == 0:
            if structured:
                assert chunks(p) == [(1, 0x8001, 3, struct.pack(">IH", 5, 9) + b"disk gone")]
            else:
                assert replies(p, {3: 0}) == {3: (NbdErrno.EIO, b"")}
            assert not p.transport.closing
        elif structured:
            got = chunks(p)
            assert [c[:3] for c in got] == [(0, 1, 3), (1, 0x8001, 3)]
            assert not p.transport.closing
        else:
            assert p.transport.closing  # the header said success
        assert p.conn.in_flight == 0


async def test_a_read_the_export_refuses_is_answered_before_any_piece() -> None:
    p = Peer()
    p.handshake()

    def refuse(offset: int, length: int) -> None:
        raise OSError(errno.EPERM, "outside the scope")

    p.export.check_read = refuse  # type: ignore[method-assign]
    p.send(request(NbdCmd.READ, 4, 0, 4 * STREAM_PIECE))
    await settle()
    assert replies(p, {4: 0}) == {4: (NbdErrno.EPERM, b"")}
    assert p.export.reads == []
