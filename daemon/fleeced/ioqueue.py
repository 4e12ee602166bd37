"""asyncio adapter for the native I/O queue.

Each operation gets an id and a future; the queue's eventfd is watched with
``loop.add_reader`` and every readable event reaps a batch of completions.
No Python thread is involved on this path: C workers do the I/O and only
the eventfd wakes the loop.

This module is where the C completion bits (``DONE_HOLE``, ``DONE_SENT``,
``DONE_DEFER``) end: callers get plain results (:class:`ReadResult`, ``None``) or an
:class:`OSError` (:class:`ReplyTorn` for a worker-written reply that failed
part way).  The NBD server never sees the data path's names: it gets a
:class:`ReplySocket` from :func:`open_reply_socket` and hands it back with
a read whose reply a worker may write.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from fleeced.datapath import (
    DONE_DEFER,
    DONE_HOLE,
    DONE_SENT,
    OP_FLUSH,
    ConnRule,
    NativeBitmap,
    NativeConn,
    NativeFile,
    NativeQueue,
    NativeSession,
    NativeSock,
    SessionParams,
    error_from_rc,
)

__all__ = ["DEFAULT_THREADS", "IoQueue", "ReadResult", "ReplySocket", "ReplyTorn",
           "open_reply_socket"]

DEFAULT_THREADS: Final = 8

T = TypeVar("T")


# Not frozen: one is built per read on the hot path, and a frozen
# dataclass's __init__ costs three times as much.  Treat it as immutable.
@dataclass(slots=True)
class ReadResult:
    """What a read produced.

    :param data: the bytes read (zero-filled for a hole); when a worker
        wrote the reply, the same buffer (the rest of a partial reply is cut
        from it).
    :param hole: the range is a hole (nothing was sent by a worker).
    :param sent: bytes of the reply (header + data) a worker wrote to the
        socket: 0 when none (the caller replies), the reply's full length
        when all, anything between when the socket filled up -- it is then
        stalled for workers, and the caller writes the rest before anything
        else and resumes it (:meth:`ReplySocket.resume`).
    :param deferred: nothing was read or sent: the socket was stalled when
        the worker started (``data`` is garbage).  Submit the read again once
        the socket is resumed.
    """

    data: bytes | bytearray | memoryview
    hole: bool = False
    sent: int = 0
    deferred: bool = False


class ReplyTorn(OSError):
    """A worker-written reply failed part way: the connection's stream is torn."""


class ReplySocket:
    """A connection's socket as native workers see it: an opaque handle.

    Holds its own duplicate of the descriptor (C keeps it open while queued
    worker replies use it), so the loop closing its copy never lets a worker
    write into a reused descriptor number.
    """

    __slots__ = ("_native",)

    def __init__(self, fd: int) -> None:
        """Duplicate FD.

        :raise OSError: ``EINVAL`` for a negative fd, or the ``dup`` error.
        """
        self._native = NativeSock(fd)

    def resume(self) -> None:
        """Let workers write again after a partial reply stalled the socket
        (call it once the rest of that reply has left the loop's buffer)."""
        self._native.resume()

    def close(self) -> None:
        """Give up the handle (queued worker replies keep the duplicate).  Idempotent."""
        self._native.close()


def open_reply_socket(fd: int) -> ReplySocket:
    """A handle through which native workers may write replies to FD.

    :raise OSError: when the descriptor cannot be duplicated.
    """
    return ReplySocket(fd)


class _Pending:
    """An operation awaiting its completion.  One small class per result
    kind, no closures: this runs once per request on the hot path."""

    __slots__ = ()

    def complete(self, rc: int, done: int) -> None:
        raise NotImplementedError

    def fail(self, exc: OSError) -> None:
        raise NotImplementedError


def _settle_failure(fut: asyncio.Future[ReadResult] | asyncio.Future[int] | asyncio.Future[None],
                    rc: int, done: int) -> bool:
    """Fail FUT when RC is an error; return whether FUT needs no result."""
    if fut.done():  # cancelled waiter
        return True
    if rc >= 0:
        return False
    if done & DONE_SENT:
        fut.set_exception(ReplyTorn(-rc, f"reply write failed: {error_from_rc(rc)}"))
    else:
        fut.set_exception(error_from_rc(rc))
    return True


class _Void(_Pending):
    __slots__ = ("fut",)

    def __init__(self, fut: asyncio.Future[None]) -> None:
        self.fut = fut

    def complete(self, rc: int, done: int) -> None:
        if not _settle_failure(self.fut, rc, done):
            self.fut.set_result(None)

    def fail(self, exc: OSError) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)


class _Read(_Pending):
    """A read; with TOTAL > 0, one whose reply a worker may have written
    (TOTAL bytes of header + data)."""

    __slots__ = ("buf", "fut", "total")

    def __init__(self, fut: asyncio.Future[ReadResult], buf: memoryview, total: int) -> None:
        self.fut = fut
        self.buf = buf
        self.total = total

    def complete(self, rc: int, done: int) -> None:
        if _settle_failure(self.fut, rc, done):
            return
        if done & DONE_SENT:  # rc > 0: only that much went out, else all
            self.fut.set_result(ReadResult(self.buf, False, rc or self.total))
        elif done & DONE_DEFER:
            self.fut.set_result(ReadResult(self.buf, deferred=True))
        else:
            self.fut.set_result(ReadResult(self.buf, bool(done & DONE_HOLE)))

    def fail(self, exc: OSError) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)


class _Write(_Pending):
    """A guest write; with TOTAL > 0, one whose reply (TOTAL header bytes)
    a worker may have written.  The result is the reply bytes sent."""

    __slots__ = ("fut", "total")

    def __init__(self, fut: asyncio.Future[int], total: int) -> None:
        self.fut = fut
        self.total = total

    def complete(self, rc: int, done: int) -> None:
        if not _settle_failure(self.fut, rc, done):
            self.fut.set_result((rc or self.total) if done & DONE_SENT else 0)

    def fail(self, exc: OSError) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)


class _WriteRun(_Pending):
    """A run of guest writes: the result is one rc per request (0 or
    ``-errno``; the operation's rc where a request never ran)."""

    __slots__ = ("fut", "rcs", "count")

    def __init__(self, fut: asyncio.Future[list[int]], rcs: Any, count: int) -> None:
        self.fut = fut
        self.rcs = rcs  # ours: the queue drops its reference when reaping
        self.count = count

    def complete(self, rc: int, done: int) -> None:
        if not self.fut.done():
            rcs = self.rcs
            self.fut.set_result([rc if (r := int(rcs[i])) == 1 else r
                                 for i in range(self.count)])

    def fail(self, exc: OSError) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)


class IoQueue:
    """Awaitable block operations over a :class:`NativeQueue`."""

    def __init__(self, threads: int = DEFAULT_THREADS) -> None:
        """Start the native workers.

        :raise OSError: when the queue cannot be created.
        """
        self._native = NativeQueue(threads)
        self._ops: dict[int, _Pending] = {}
        self._next = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def open_conn(self, fd: int, target: NativeFile | NativeSession, *,
                  rules: tuple[ConnRule, ...], structured: bool, min_block: int, trim: bool,
                  contexts: list[tuple[int, int, NativeBitmap | None]],
                  initial: bytes) -> NativeConn:
        """Hand the transmission phase of the connection on FD to C, its
        requests run in this queue's workers (see :class:`NativeConn`).

        :raise OSError: the native start's error.
        """
        return NativeConn(fd, self._native, target, rules=rules, structured=structured,
                          min_block=min_block, trim=trim, contexts=contexts, initial=initial)

    def start(self) -> None:
        """Watch the completion eventfd on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._native.fd, self._on_ready)

    def close(self) -> None:
        """Stop watching and close the queue (queued operations finish first)."""
        if self._loop is not None:
            self._loop.remove_reader(self._native.fd)
            self._loop = None
        self._native.close()
        for op in self._ops.values():
            op.fail(OSError(errno.ESHUTDOWN, "I/O queue closed"))
        self._ops.clear()

    def _on_ready(self) -> None:
        ops = self._ops
        for op_id, rc, done in self._native.reap():
            op = ops.pop(op_id, None)
            if op is not None:
                op.complete(rc, done)

    def _new_id(self) -> int:
        assert self._loop is not None, "IoQueue.start() was not called"
        self._next += 1
        return self._next

    def _started_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def _submit(self, submit: Callable[..., T], *args: object) -> tuple[T, asyncio.Future[None]]:
        """SUBMIT(op_id, *ARGS) under a fresh id; a future of its completion.

        The future is registered after the submission succeeded: completions
        are reaped on this (the loop's) thread, so none can be missed.

        :raise OSError: when the submission is refused (nothing stays pending).
        """
        op_id = self._new_id()
        result = submit(op_id, *args)
        fut: asyncio.Future[None] = self._started_loop().create_future()
        self._ops[op_id] = _Void(fut)
        return result, fut

    def submit_read(
        self, target: NativeFile | NativeSession, off: int, length: int,
        reply_to: ReplySocket | None = None, header: bytes = b"", *, piece: bool = False,
    ) -> asyncio.Future[ReadResult]:
        """Submit a read; with REPLY_TO, a worker may write HEADER + data to
        that socket itself (never waiting on it; see :class:`ReadResult` for
        what ``sent`` then says).

        :raise OSError: when the submission is refused (range, closed).
        :raise ReplyTorn: (from the future) when a worker's write failed part
            way.
        """
        op_id = self._new_id()
        if reply_to is None:
            buf = self._native.submit_read(op_id, target, off, length, piece=piece)
            total = 0
        else:
            buf = self._native.submit_read_send(op_id, target, off, length,
                                                reply_to._native, header, piece=piece)
            total = len(header) + length
        fut: asyncio.Future[ReadResult] = self._started_loop().create_future()
        self._ops[op_id] = _Read(fut, buf, total)
        return fut

    def submit_write(self, file: NativeFile, off: int, data: bytes | memoryview,
                     flags: int, reply_to: ReplySocket | None = None,
                     header: bytes = b"") -> asyncio.Future[int]:
        """Submit a guest write; with REPLY_TO, a worker writes HEADER (the
        whole reply) to that socket once the write succeeded, never waiting
        on it.  The future's result is the reply bytes the worker sent: 0
        (none: the caller replies), ``len(HEADER)``, or fewer -- the socket
        is then stalled, as for a read (:class:`ReadResult`).

        :raise OSError: when the submission is refused (range, read-only).
        :raise ReplyTorn: (from the future) when the worker's write failed
            part way.
        """
        op_id = self._new_id()
        sock = None if reply_to is None else reply_to._native
        self._native.submit_write(op_id, file, off, data, flags, sock, header)
        fut: asyncio.Future[int] = self._started_loop().create_future()
        self._ops[op_id] = _Write(fut, len(header) if sock is not None else 0)
        return fut

    def submit_write_run(self, file: NativeFile, req: bytes,
                         count: int) -> asyncio.Future[list[int]]:
        """Submit COUNT WRITE requests that :meth:`NativeFile.write_run_check`
        accepted (REQ: their headers and payloads); a worker writes them in
        order.  The future's result is one rc per request (0 or ``-errno``);
        it fails only when the queue closes.

        :raise OSError: when the submission is refused (read-only, closed).
        """
        op_id = self._new_id()
        rcs = self._native.submit_write_run(op_id, file, req, count)
        fut: asyncio.Future[list[int]] = self._started_loop().create_future()
        self._ops[op_id] = _WriteRun(fut, rcs, count)
        return fut

    async def read(self, target: NativeFile | NativeSession, off: int,
                   length: int) -> ReadResult:
        """Read from the image or a session's frozen view.

        :raise OSError: the operation's error.
        """
        return await self.submit_read(target, off, length)

    async def write(self, file: NativeFile, off: int, data: bytes | memoryview,
                    flags: int) -> None:
        """Guest write (CBW runs in the worker).

        :raise OSError: the operation's error.
        """
        await self.submit_write(file, off, data, flags)

    async def extents(self, target: NativeFile | NativeSession, off: int,
                      length: int) -> list[tuple[int, int]]:
        """Block status of the image or a session's frozen view.

        :raise OSError: the operation's error.
        """
        result, fut = self._submit(self._native.submit_extents, target, off, length)
        await fut
        return result()

    async def open_session(self, file: NativeFile, params: SessionParams) -> NativeSession:
        """Start a session on FILE in a worker (it waits for guest writes in flight).

        :raise OSError: the native open's error.
        """
        result, fut = self._submit(self._native.submit_open, file, params)
        await fut
        return result()

    async def close_session(self, session: NativeSession) -> None:
        """Close SESSION in a worker: detach (waits for guest writes in flight), release.

        Queued snapshot operations keep it alive in C and fail ``ESHUTDOWN``.
        """
        try:
            _, fut = self._submit(self._native.submit_close, session)
        except OSError:  # the queue is closing: closed synchronously already
            return
        await fut

    async def put_old(self, session: NativeSession, off: int, data: bytes | memoryview | None,
                      length: int = 0) -> None:
        """Hand SESSION the old contents of a range from a copy-before-write
        another process runs (DATA, or LENGTH zeros when None), on a
        guest-priority worker: that process's guest write waits for it.

        :raise OSError: the operation's error (the session's policy).
        """
        await self._submit(self._native.submit_put_old, session, off, data, length)[1]

    async def flush(self, file: NativeFile) -> None:
        """``fdatasync`` FILE in a worker.

        :raise OSError: the flush error.
        """
        await self.op(OP_FLUSH, file)

    def inject_delay(self, kind: int, ms: int) -> None:
        """Test hook: every operation of KIND sleeps MS milliseconds first."""
        self._native.inject_delay(kind, ms)

    async def op(self, kind: int, target: NativeFile | NativeSession, off: int = 0,
                 length: int = 0, flags: int = 0) -> None:
        """Zero / trim / flush / cache / discard.

        :raise OSError: the operation's error.
        """
        await self._submit(self._native.submit, kind, target, off, length, flags)[1]
