"""What every export shares: the protocol the NBD server sees, counters, the
metadata contexts (``base:allocation``, ``qemu:allocation-depth``,
``qemu:dirty-bitmap:NAME``), and what a session needs of its disk."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from fleeced import datapath
from fleeced.datapath import ConnRule, NativeBitmap, NativeConn, NativeFile, NativeSession
from fleeced.ioqueue import IoQueue, ReadResult, ReplySocket
from fleeced.nbd import ExportInfo, RunRule

#: Largest read tried inline on the event loop from the page cache; larger
#: ones go to the thread pool, where two cores copy in parallel.
INLINE_READ_MAX = 128 * 1024
#: Largest WRITE taken into a write run (Export.write_run copies the run's
#: requests at once); larger ones go alone, as the engine parses them.
RUN_WRITE_MAX = 128 * 1024

#: What :meth:`Export.read_run` answered: request bytes consumed, READs
#: answered, data bytes, and their replies in order.
ReadRun = tuple[int, int, int, memoryview]
#: What :meth:`Export.write_run` took: request bytes, count, payload bytes,
#: success replies, a copy of the requests, and a future of one rc each.
WriteRun = tuple[int, int, int, bytes, bytes, "asyncio.Future[list[int]]"]

#: Message sent with EPERM for snapshot reads outside the preserved set.
OUTSIDE_SCOPE = "outside the snapshot's scope or already discarded"


@dataclass(slots=True)
class ExportStats:
    """Counters of one export, reported by ``query-stats``."""

    connections: int = 0
    connections_total: int = 0
    requests: int = 0
    errors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


class Export(Protocol):
    """What the NBD server needs from an export: submit a command, get a result.

    Results are plain: a :class:`~fleeced.ioqueue.ReadResult`, ``None``, or an
    :class:`OSError` (raised, or set on the future).  Nothing of the native
    data path crosses this seam but the opaque
    :class:`~fleeced.ioqueue.ReplySocket` a connection hands back with a read
    whose reply a worker may write.
    """

    @property
    def info(self) -> ExportInfo: ...

    @property
    def stats(self) -> ExportStats: ...

    async def read(self, offset: int, length: int) -> ReadResult: ...

    def read_now(self, offset: int, length: int) -> ReadResult | None:
        """Serve a read without blocking (page cache only), or return None.

        :raise OSError: the read's error.
        """

    def check_read(self, offset: int, length: int) -> None:
        """Refuse now, without blocking, a read that cannot succeed as a
        whole (a large READ is sent a piece at a time, and once its first
        piece is out an error can no longer be answered on every wire form).

        :raise OSError: the error the read would get.
        """

    #: Whether :meth:`read_run` and :meth:`write_run` may take anything
    #: (else they always return None, and the server does not ask).
    takes_runs: bool

    def read_run(self, rule: RunRule, data: bytes | bytearray, pos: int,
                 max_count: int) -> ReadRun | None:
        """Answer up to MAX_COUNT consecutive READ requests of ``data[pos:]``
        that RULE accepts, without blocking (page cache only).

        :return: ``(consumed, count, data_bytes, replies)`` (see
            :meth:`~fleeced.datapath.NativeFile.read_run`), or None when none
            was answered: the engine's path takes the first request.
        :raise OSError: a bad rule.
        """

    def write_run(self, rule: RunRule, data: bytes | bytearray, pos: int,
                  max_count: int) -> WriteRun | None:
        """Submit up to MAX_COUNT consecutive WRITE requests of ``data[pos:]``
        (payloads complete) that RULE accepts, as one queue operation.

        :return: ``(consumed, count, data_bytes, acks, requests, future)``:
            request bytes taken, their count, payload bytes, their success
            replies in order, a copy of the requests, and a future of one
            rc per request (0 or ``-errno``); None when none was taken (the
            engine's path takes the first request).
        :raise OSError: a bad rule, or the submission was refused.
        """

    def submit_read(self, offset: int, length: int, reply_to: ReplySocket | None = None,
                    header: bytes = b"", *, piece: bool = False) -> asyncio.Future[ReadResult]:
        """Submit a read (no task needed).  With REPLY_TO a worker may write
        HEADER + data to that socket itself (``ReadResult.sent``).  PIECE:
        a later piece of one READ streamed in pieces (counted in the image's
        stats as bytes of the same request, not another one).

        :raise OSError: when the submission is refused; from the future, the
            read's error (:class:`~fleeced.ioqueue.ReplyTorn` when a worker's
            write failed part way).
        """

    def submit_write(
        self, offset: int, data: bytes | memoryview, fua: bool,
        reply_to: ReplySocket | None = None, header: bytes = b"",
    ) -> asyncio.Future[int] | None:
        """Submit a write (no task needed), or None to use :meth:`write`.
        With REPLY_TO a worker writes HEADER (the whole reply) to that
        socket once the write is done; the future's result is the bytes of
        it sent (0: none, the caller replies).

        :raise OSError: when the submission is refused; from the future, the
            write's error (:class:`~fleeced.ioqueue.ReplyTorn` when a
            worker's write failed part way).
        """

    async def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None: ...

    async def zero(
        self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool
    ) -> None: ...

    async def trim(self, offset: int, length: int, fua: bool) -> None: ...

    async def flush(self) -> None: ...

    async def cache(self, offset: int, length: int) -> None: ...

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]: ...

    async def context_extents(self, context: str, offset: int,
                              length: int) -> list[tuple[int, int]]: ...

    def extents_told(self, context: str, offset: int,
                     extents: list[tuple[int, int]]) -> None: ...

    def error_message(self, exc: OSError) -> str: ...

    def client_gone(self) -> None:
        """A client that had negotiated this export is gone, and its last
        operation completed."""

    def start_native(self, fd: int, rules: tuple[ConnRule, ...], structured: bool,
                     contexts: dict[int, str], initial: bytes) -> NativeConn | None:
        """Serve the rest of the connection on FD natively (its socket is
        then C's: the caller closes its own descriptor and only watches the
        returned handle), or None when this export has no native form.

        :param rules: the engine's rule table (``ServerConnection.hand_over``).
        :param contexts: the negotiated metadata contexts, id -> name.
        :param initial: request bytes received and not parsed yet.
        :raise OSError: the native start failed.
        """


class DirtyBitmap(Protocol):
    """What an export needs from a dirty bitmap (see :mod:`fleeced.bitmap_store`)."""

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]: ...


class DiskView(Protocol):
    """What a session and its snapshot export need of their disk
    (:class:`fleeced.exports.disk.Disk`), named here so that the snapshot
    module does not import the disk module, which imports it."""

    name: str
    file: NativeFile

    @property
    def size(self) -> int: ...


#: Metadata contexts every export offers besides its dirty bitmaps.
BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP = "qemu:dirty-bitmap:"


def allocation_depth(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``qemu:allocation-depth`` from the native extents of an image or a
    frozen view: 1 wherever a read returns the raw image's data, holes
    included (a raw file is one layer that owns all of its bytes: what
    ``qemu-nbd -A`` reports), 0 where nothing is there (outside a
    snapshot's scope, or discarded: reads fail EPERM); adjacent runs merged
    (native/src/conn_dispatch.c context_view does the same)."""
    return _merged((n, 0 if flags & datapath.EXT_UNREADABLE else 1) for n, flags in extents)


def base_allocation(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``base:allocation`` from native extents: the NBD flags only (HOLE,
    ZERO), adjacent runs merged."""
    nbd_flags = datapath.EXT_HOLE | datapath.EXT_ZERO
    return _merged((n, flags & nbd_flags) for n, flags in extents)


def _merged(extents: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for length, flags in extents:
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + length, flags)
        else:
            out.append((length, flags))
    return out


def bitmap_extents(bitmap: DirtyBitmap, offset: int, length: int) -> list[tuple[int, int]]:
    """``qemu:dirty-bitmap:NAME`` extents: flag 1 = dirty (proto.md, QEMU's
    "qemu" namespace)."""
    return [(n, 1 if dirty else 0) for n, dirty in bitmap.extents(offset, length)]


class ExportBase:
    """What every export has: its NBD description, its counters, and its
    metadata contexts (``base:allocation``, ``qemu:allocation-depth`` and
    one ``qemu:dirty-bitmap:NAME`` per bitmap, which may come and go)."""

    _info: ExportInfo
    _stats: ExportStats
    takes_runs = False

    def read_run(self, rule: RunRule, data: bytes | bytearray, pos: int,
                 max_count: int) -> ReadRun | None:
        return None

    def check_read(self, offset: int, length: int) -> None:
        return None  # the engine checked the range; nothing else is refused

    def client_gone(self) -> None:
        return None

    def write_run(self, rule: RunRule, data: bytes | bytearray, pos: int,
                  max_count: int) -> WriteRun | None:
        return None

    def start_native(self, fd: int, rules: tuple[ConnRule, ...], structured: bool,
                     contexts: dict[int, str], initial: bytes) -> NativeConn | None:
        return None

    def _native_conn(self, io: IoQueue, target: NativeFile | NativeSession, trim: bool,
                     fd: int, rules: tuple[ConnRule, ...], structured: bool,
                     contexts: dict[int, str], initial: bytes) -> NativeConn | None:
        """A native connection serving TARGET, or None when one of the
        negotiated contexts has no native form (the loop serves it then)."""
        ctxs: list[tuple[int, int, NativeBitmap | None]] = []
        for ctx_id, name in contexts.items():
            if name == BASE_ALLOCATION:
                ctxs.append((ctx_id, datapath.CTX_BASE_ALLOCATION, None))
            elif name == ALLOCATION_DEPTH:
                ctxs.append((ctx_id, datapath.CTX_ALLOCATION_DEPTH, None))
            elif name.startswith(DIRTY_BITMAP):
                bitmap = self._bitmaps().get(name[len(DIRTY_BITMAP):])
                native = getattr(bitmap, "native", bitmap)
                if not isinstance(native, NativeBitmap) or native.closed:
                    return None
                ctxs.append((ctx_id, datapath.CTX_DIRTY_BITMAP, native))
            else:
                return None
        if len(ctxs) > datapath.CONN_MAX_CTX or len(initial) > datapath.CONN_INITIAL_MAX:
            return None
        return io.open_conn(fd, target, rules=rules, structured=structured,
                            min_block=self._info.min_block, trim=trim, contexts=ctxs,
                            initial=initial)

    @property
    def info(self) -> ExportInfo:
        contexts = (BASE_ALLOCATION, ALLOCATION_DEPTH,
                    *(DIRTY_BITMAP + name for name in sorted(self._bitmaps())))
        if contexts != self._info.meta_contexts:
            self._info = dataclasses.replace(self._info, meta_contexts=contexts)
        return self._info

    def _bitmaps(self) -> dict[str, DirtyBitmap]:
        return {}

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        raise NotImplementedError

    def extents_told(self, context: str, offset: int,
                     extents: list[tuple[int, int]]) -> None:
        """EXTENTS of CONTEXT from OFFSET went out in a block status reply
        (a snapshot counts their zeros toward its progress)."""

    async def context_extents(self, context: str, offset: int,
                              length: int) -> list[tuple[int, int]]:
        """Block status of one metadata context.

        :raise OSError: EINVAL when the context went away since it was
            negotiated (its bitmap was removed).
        """
        if context == BASE_ALLOCATION:
            return base_allocation(await self.extents(offset, length))
        if context == ALLOCATION_DEPTH:
            return allocation_depth(await self.extents(offset, length))
        if context.startswith(DIRTY_BITMAP):
            bitmap = self._bitmaps().get(context[len(DIRTY_BITMAP):])
            if bitmap is not None:
                # A persistent bitmap is a mapped file: its pages may fault in,
                # so not on the event loop (the C object is pinned meanwhile).
                return await asyncio.to_thread(bitmap_extents, bitmap, offset, length)
        raise OSError(errno.EINVAL, f"metadata context {context} is gone")

    @property
    def stats(self) -> ExportStats:
        return self._stats
