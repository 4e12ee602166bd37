"""What every export shares: the protocol the NBD server sees, counters, the
metadata contexts (``base:allocation``, ``qemu:allocation-depth``,
``qemu:dirty-bitmap:NAME``), and the :class:`Disk` behind them."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from fleeced import datapath
from fleeced.datapath import ConnRule, NativeBitmap, NativeConn, NativeFile, NativeSession
from fleeced.ioqueue import IoQueue, ReadResult, ReplySocket
from fleeced.nbd import ExportInfo, RunRule
from fleeced.qsd import QsdChild
from fleeced.sources import Source, SourceError, probe

if TYPE_CHECKING:
    from fleeced.exports.snapshot import Session

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
    """What an export needs from a dirty bitmap (see :mod:`fleeced.bitmaps`)."""

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]: ...


#: Metadata contexts every export offers besides its dirty bitmaps.
BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP = "qemu:dirty-bitmap:"


def allocation_depth(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``qemu:allocation-depth`` of a raw image from its ``base:allocation``
    extents: 0 for a hole, 1 for data (what ``qemu-nbd -A`` reports for a
    raw file), adjacent runs merged."""
    out: list[tuple[int, int]] = []
    for length, flags in extents:
        depth = 0 if flags & datapath.EXT_HOLE else 1
        if out and out[-1][1] == depth:
            out[-1] = (out[-1][0] + length, depth)
        else:
            out.append((length, depth))
    return out


def bitmap_extents(bitmap: DirtyBitmap, offset: int, length: int) -> list[tuple[int, int]]:
    """``qemu:dirty-bitmap:NAME`` extents: flag 1 = dirty (proto.md, QEMU's
    "qemu" namespace)."""
    return [(n, 1 if dirty else 0) for n, dirty in bitmap.extents(offset, length)]


@dataclass(eq=False)
class Disk:
    """A source the daemon owns, with its fleecing sessions.

    :param name: disk name, also the active export's name.
    :param path: the source as the user gave it (an image path, for a file).
    :param file: the open native file (a file, or an NBD upstream).
    :param read_only: whether guest writes are refused.
    :param discard: ``"unmap"`` punches holes on TRIM; ``"ignore"`` drops TRIM.
    :param description: NBD export description.
    :param source: what the source is (:mod:`fleeced.sources`).
    :param child: the qemu-storage-daemon serving an image or RBD source.
    """

    name: str
    path: str
    file: NativeFile
    read_only: bool = False
    discard: str = "ignore"
    description: str = ""
    sessions: dict[str, Session] = field(default_factory=dict)
    #: Named dirty bitmaps (fleeced.bitmaps.Bitmap), served on the active
    #: export as ``qemu:dirty-bitmap:NAME``.
    bitmaps: dict[str, DirtyBitmap] = field(default_factory=dict)
    source: Source | None = None
    child: QsdChild | None = None
    #: What the data is, when the source does not say (a VM node QEMU
    #: exports: the node's own file).
    ident: tuple[str, ...] | None = None
    #: The cache mode given (``none``, ``writeback``), None when not.
    cache: str | None = None

    @property
    def identity(self) -> tuple[str, ...]:
        """What makes two disks the same data (see :meth:`Source.identity`):
        one source may only be one disk."""
        if self.ident is not None:
            return self.ident
        theirs = self.source.identity() if self.source is not None else None
        if theirs is not None:
            return theirs
        kind, dev, ino = self.file.identity
        return (kind, str(dev), str(ino))

    @classmethod
    async def open_source(cls, name: str, src: Source, *, read_only: bool = False,
                          discard: str = "ignore", description: str = "",
                          cache: str | None = None) -> Disk:
        """Open SRC as a disk: a raw file or device directly; an image or RBD
        source through a qemu-storage-daemon child; either, or an NBD URI,
        as an upstream.  Opening runs in a thread (open(2) and a connect may
        block), the child as an asyncio subprocess.

        :param cache: ``none`` bypasses the host page cache (a file: O_DIRECT;
            an image: its child opens the file with cache.direct=on).
        :raise SourceError: when the source cannot be used (its reason, one line).
        """
        src = await probe(src)
        if cache == "none" and src.kind in ("nbd", "rbd"):
            raise SourceError(f"{src.text}: cache=none is for image files and devices "
                              "(the page cache of an NBD export or RBD image is not ours)")
        if src.kind == "file":
            assert src.path is not None
            try:
                disk = await asyncio.to_thread(cls.open, name, src.path, read_only=read_only,
                                               discard=discard, description=description)
            except OSError as exc:
                why = ("is read-only (serve it with -r)" if exc.errno == errno.EROFS
                       else exc.strerror or str(exc))
                raise SourceError(f"{src.path}: {why}") from None
            disk.source = src
            disk.cache = cache
            if cache == "none":
                try:
                    await asyncio.to_thread(disk.file.set_direct, True)
                except OSError as exc:
                    disk.close()
                    raise SourceError(f"{src.path}: cache=none needs O_DIRECT, which its "
                                      f"filesystem refuses ({exc.strerror})") from None
            return disk
        child = None
        uri = src.uri
        if src.needs_child:
            child = QsdChild(name, src, read_only, direct=cache == "none")
            await child.start()
            uri = child.uri
        assert uri is not None
        try:
            native = await asyncio.to_thread(NativeFile.open_nbd, uri, readonly=read_only)
        except OSError as exc:
            if child is not None:
                await child.stop()
            why = ("it is read-only (serve it with -r)" if exc.errno == errno.EROFS
                   else os.strerror(exc.errno or errno.EIO))
            raise SourceError(f"{src.text}: {why}") from None
        return cls(name, src.text, native, read_only, discard, description, source=src,
                   child=child, cache=cache)

    async def aclose(self) -> None:
        """:meth:`close`, then stop the child (after the file: its last
        flush went through the child)."""
        self.close()
        if self.child is not None:
            await self.child.stop()

    @classmethod
    def open(
        cls,
        name: str,
        path: str,
        *,
        read_only: bool = False,
        discard: str = "ignore",
        description: str = "",
    ) -> Disk:
        """Open PATH as a disk.

        :raise OSError: when the image cannot be opened (missing, directory, ...).
        """
        try:
            native = NativeFile.open(path, readonly=read_only)
        except OSError as exc:
            code = exc.errno or errno.EIO
            text = (
                "not a regular file or block device"
                if code == errno.EINVAL
                else os.strerror(code)
            )
            raise OSError(code, text, path) from None
        return cls(name, path, native, read_only, discard, description)

    @property
    def size(self) -> int:
        return self.file.size

    def close(self) -> None:
        """Give up the file (C keeps it open while queued operations use it).

        Sessions should be closed first through the I/O queue; any left are
        closed here synchronously.
        """
        self.sessions.clear()
        self.file.close()


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

    async def context_extents(self, context: str, offset: int,
                              length: int) -> list[tuple[int, int]]:
        """Block status of one metadata context.

        :raise OSError: EINVAL when the context went away since it was
            negotiated (its bitmap was removed).
        """
        if context == BASE_ALLOCATION:
            return await self.extents(offset, length)
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
