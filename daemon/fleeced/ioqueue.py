"""asyncio adapter for the native I/O queue.

Each operation gets an id and a future; the queue's eventfd is watched with
``loop.add_reader`` and every readable event reaps a batch of completions.
No Python thread is involved on this path: C workers do the I/O and only
the eventfd wakes the loop.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from typing import Final, TypeVar

from fleeced.datapath import (
    DONE_HOLE,
    DONE_SENT,
    OP_FLUSH,
    NativeFile,
    NativeQueue,
    NativeSession,
    NativeSock,
    SessionParams,
    error_from_rc,
)

DEFAULT_THREADS: Final = 8

T = TypeVar("T")


#: A completion: (``DONE_*`` bits, bytes sent when a worker-written reply
#: went out only in part, else 0).
Done = tuple[int, int]


class ReplyTorn(OSError):
    """A worker-written reply failed part way: the connection's stream is torn."""


class IoQueue:
    """Awaitable block operations over a :class:`NativeQueue`."""

    def __init__(self, threads: int = DEFAULT_THREADS) -> None:
        """Start the native workers.

        :raise OSError: when the queue cannot be created.
        """
        self._native = NativeQueue(threads)
        self._futures: dict[int, asyncio.Future[Done]] = {}
        self._next = 0
        self._loop: asyncio.AbstractEventLoop | None = None

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
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(OSError(errno.ESHUTDOWN, "I/O queue closed"))
        self._futures.clear()

    def _on_ready(self) -> None:
        futures = self._futures
        for op_id, rc, done in self._native.reap():
            fut = futures.pop(op_id, None)
            if fut is None or fut.done():  # cancelled waiter
                continue
            if rc < 0 and done & DONE_SENT:
                fut.set_exception(ReplyTorn(-rc, f"reply write failed: {error_from_rc(rc)}"))
            elif rc < 0:
                fut.set_exception(error_from_rc(rc))
            else:
                fut.set_result((done, rc))

    def _submit(self, submit: Callable[..., T], *args: object) -> tuple[T, asyncio.Future[Done]]:
        """Give the op an id and a future, then SUBMIT(op_id, *ARGS).

        :raise OSError: when the submission is refused (nothing stays pending).
        """
        assert self._loop is not None, "IoQueue.start() was not called"
        self._next += 1
        op_id = self._next
        fut: asyncio.Future[Done] = self._loop.create_future()
        self._futures[op_id] = fut
        try:
            return submit(op_id, *args), fut
        except BaseException:
            del self._futures[op_id]
            raise

    def start_read(self, target: NativeFile | NativeSession, off: int,
                   length: int) -> tuple[memoryview, asyncio.Future[Done]]:
        """Submit a read; the future's result has :data:`DONE_HOLE` for a hole.

        :raise OSError: when the submission is refused (range, closed).
        """
        return self._submit(self._native.submit_read, target, off, length)

    def start_read_send(
        self, target: NativeFile | NativeSession, off: int, length: int, sock: NativeSock,
        header: bytes,
    ) -> tuple[memoryview, asyncio.Future[Done]]:
        """Submit a read whose reply a worker writes to SOCK itself.

        See :meth:`NativeQueue.submit_read_send` for the outcomes; the future's
        result is ``(done bits, bytes sent if only part went out)``.

        :raise OSError: when the submission is refused.
        :raise ReplyTorn: (from the future) when the write failed part way.
        """
        return self._submit(self._native.submit_read_send, target, off, length, sock, header)

    def start_write(self, file: NativeFile, off: int, data: bytes | memoryview,
                    flags: int) -> asyncio.Future[Done]:
        """Submit a guest write.

        :raise OSError: when the submission is refused (range, read-only).
        """
        return self._submit(self._native.submit_write, file, off, data, flags)[1]

    async def read(self, target: NativeFile | NativeSession, off: int,
                   length: int) -> tuple[memoryview, bool]:
        """Read from the image or a session's frozen view.

        :raise OSError: the operation's error.
        """
        buf, fut = self.start_read(target, off, length)
        done, _ = await fut
        return buf, bool(done & DONE_HOLE)

    async def write(self, file: NativeFile, off: int, data: bytes | memoryview,
                    flags: int) -> None:
        """Guest write (CBW runs in the worker).

        :raise OSError: the operation's error.
        """
        await self.start_write(file, off, data, flags)

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
