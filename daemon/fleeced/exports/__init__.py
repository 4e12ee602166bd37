"""Exports: the operations behind an NBD export name, over the native data path.

A :class:`Disk` owns one source image.  Its :class:`ActiveExport` is the
read-write view every guest write goes through (copy-before-write runs in C
for every fleecing session of the disk).  Each :class:`Session` owns one
native fleecing session and serves its frozen view as a :class:`SnapshotExport`.

Every call that may block runs in the native I/O queue's workers, never on the
event loop (STYLE.md §2.14.4): reads, writes, block status, session open and
close.  Errors propagate as :class:`OSError`; policy refusals are
``OSError(EPERM)``.  This module must not import the NBD engine's internals
beyond :class:`~fleeced.nbd.ExportInfo`, nor asyncio servers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
from dataclasses import dataclass, field
from typing import Protocol

from fleeced import datapath
from fleeced.datapath import (
    NativeFile,
    NativeSession,
    NativeSock,
    SessionParams,
    SessionStats,
)
from fleeced.exports.aio import Done, IoQueue
from fleeced.nbd import ExportInfo

#: Largest read tried inline on the event loop from the page cache; larger
#: ones go to the thread pool, where two cores copy in parallel.
INLINE_READ_MAX = 128 * 1024

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
    """What the NBD server needs from an export."""

    @property
    def info(self) -> ExportInfo: ...

    @property
    def stats(self) -> ExportStats: ...

    async def read(self, offset: int, length: int) -> tuple[bytearray | memoryview, bool]: ...

    def read_now(self, offset: int, length: int) -> tuple[bytearray, bool] | None:
        """Serve a read without blocking (page cache only), or return None."""

    def start_read(self, offset: int, length: int) -> tuple[memoryview, asyncio.Future[Done]]:
        """Submit a read to the native queue (no task needed); result: is_hole."""

    def start_write(
        self, offset: int, data: bytes | memoryview, fua: bool
    ) -> asyncio.Future[Done] | None:
        """Submit a write to the native queue, or None to use :meth:`write`."""

    def start_read_send(self, offset: int, length: int, sock: NativeSock,
                        header: bytes) -> tuple[memoryview, asyncio.Future[Done]]:
        """Submit a read whose reply a worker writes to SOCK (see IoQueue)."""

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


def image_export_name(path: str) -> str:
    """The default export name of an image: its file name without extension."""
    base = os.path.basename(os.path.normpath(path))
    stem, _ext = os.path.splitext(base)
    return stem or base


@dataclass(eq=False)
class Disk:
    """A source image the daemon owns, with its fleecing sessions.

    :param name: disk name, also the active export's name.
    :param path: image path.
    :param file: the open native file.
    :param read_only: whether guest writes are refused.
    :param discard: ``"unmap"`` punches holes on TRIM; ``"ignore"`` drops TRIM.
    :param description: NBD export description.
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


class _ExportBase:
    """What every export has: its NBD description, its counters, and its
    metadata contexts (``base:allocation``, ``qemu:allocation-depth`` and
    one ``qemu:dirty-bitmap:NAME`` per bitmap, which may come and go)."""

    _info: ExportInfo
    _stats: ExportStats

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


class ActiveExport(_ExportBase):
    """The read-write view of a disk; writes run copy-before-write in C."""

    def __init__(self, disk: Disk, io: IoQueue, name: str | None = None) -> None:
        self.disk = disk
        self._io = io
        self._stats = ExportStats()
        self._info = ExportInfo(
            name=name if name is not None else disk.name,
            size=disk.size,
            description=disk.description,
            read_only=disk.read_only,
            can_write=not disk.read_only,
            can_trim=not disk.read_only,
            can_write_zeroes=not disk.read_only,
            can_fast_zero=not disk.read_only,
            can_fua=not disk.read_only,
            # A plain file: a FLUSH on any connection fdatasyncs the one
            # shared descriptor, so it covers writes from every connection.
            can_multi_conn=True,
        )

    def _bitmaps(self) -> dict[str, DirtyBitmap]:
        return self.disk.bitmaps

    async def read(self, offset: int, length: int) -> tuple[bytearray | memoryview, bool]:
        return await self._io.read(self.disk.file, offset, length)

    def read_now(self, offset: int, length: int) -> tuple[bytearray, bool] | None:
        if length > INLINE_READ_MAX:
            return None
        return self.disk.file.read_nowait(offset, length)

    def start_read(self, offset: int, length: int) -> tuple[memoryview, asyncio.Future[Done]]:
        return self._io.start_read(self.disk.file, offset, length)

    def start_read_send(self, offset: int, length: int, sock: NativeSock,
                        header: bytes) -> tuple[memoryview, asyncio.Future[Done]]:
        return self._io.start_read_send(self.disk.file, offset, length, sock, header)

    def start_write(
        self, offset: int, data: bytes | memoryview, fua: bool
    ) -> asyncio.Future[Done] | None:
        return self._io.start_write(
            self.disk.file, offset, data, datapath.FLAG_FUA if fua else 0
        )

    async def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await self._io.write(self.disk.file, offset, data, datapath.FLAG_FUA if fua else 0)

    async def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        flags = (
            (datapath.FLAG_MAY_TRIM if may_trim and self.disk.discard == "unmap" else 0)
            | (datapath.FLAG_FAST if fast else 0)
            | (datapath.FLAG_FUA if fua else 0)
        )
        await self._io.op(datapath.OP_ZERO, self.disk.file, offset, length, flags)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        if self.disk.discard != "unmap":
            return  # --discard=ignore: TRIM is advisory (spec) and dropped
        await self._io.op(datapath.OP_TRIM, self.disk.file, offset, length,
                          datapath.FLAG_FUA if fua else 0)

    async def flush(self) -> None:
        await self._io.op(datapath.OP_FLUSH, self.disk.file)

    async def cache(self, offset: int, length: int) -> None:
        await self._io.op(datapath.OP_CACHE, self.disk.file, offset, length)

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return await self._io.extents(self.disk.file, offset, length)

    def error_message(self, exc: OSError) -> str:
        return exc.strerror or ""


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """The user-facing options of a fleecing session (``fleece-start``)."""

    name: str = "fleece"
    export: str | None = None
    cluster_size: int = 65536
    scope: tuple[tuple[int, int], ...] = ()
    break_guest_write: bool = False
    cbw_timeout: float = 45.0
    max_temp: int = 0
    cache: int = 0
    temp_dir: str | None = None
    read_only: bool = False


class Session:
    """A fleecing session: a native CBW session plus its snapshot export."""

    def __init__(self, disk: Disk, options: SessionOptions, native: NativeSession,
                 temp_dir: str, io: IoQueue) -> None:
        """Wrap a started native session; use :meth:`start`."""
        self.disk = disk
        self.options = options
        self.name = options.name
        self.export_name = options.export or f"{disk.name}@{options.name}"
        self.native = native
        self.temp_dir = temp_dir
        #: The frozen bitmaps a checkpointed session serves on its snapshot
        #: export (``--since OLD``: OLD's content at the snapshot instant).
        self.bitmaps: dict[str, DirtyBitmap] = {}
        self.export = SnapshotExport(self, io)
        self.broken_reported = False

    @classmethod
    async def start(cls, disk: Disk, options: SessionOptions, io: IoQueue, *,
                    checkpoint_since: datapath.NativeBitmap | None = None,
                    checkpoint_new: datapath.NativeBitmap | None = None) -> Session:
        """Start a session in a queue worker; the snapshot is the disk as of then.

        The native open waits for guest writes in flight (the snapshot point),
        so it never runs on the event loop.

        :param checkpoint_since: bitmap whose content becomes the session's
            scope and exported dirty bitmap (it stops recording).
        :param checkpoint_new: bitmap that starts recording at the snapshot.
        :raise TypeError: on wrongly typed options.
        :raise OSError: when the native session cannot be created
            (bad cluster size, unusable temp dir, ...).
        """
        temp_dir = options.temp_dir or default_temp_dir()
        params = SessionParams(
            cluster_size=options.cluster_size,
            temp_dir=temp_dir,
            cache_bytes=options.cache,
            max_temp=options.max_temp,
            cbw_timeout=options.cbw_timeout,
            break_guest_write=options.break_guest_write,
            scope=options.scope,
            # A checkpoint: between two guest writes, C freezes SINCE into
            # the session (its scope and its exported bitmap), stops it, and
            # starts NEW recording.
            checkpoint_since=checkpoint_since,
            checkpoint_new=checkpoint_new,
        )
        native = await io.open_session(disk.file, params)
        return cls(disk, options, native, temp_dir, io)

    def stats(self) -> SessionStats:
        return self.native.stats()


def default_temp_dir() -> str:
    """Where temp stores go by default: ``$TMPDIR``, else /var/tmp (disk, not tmpfs)."""
    tmp = os.environ.get("TMPDIR")
    if tmp:
        return tmp
    return "/var/tmp" if os.path.isdir("/var/tmp") else "/tmp"


class SnapshotExport(_ExportBase):
    """The frozen view of a session.

    Data is read-only (WRITE / WRITE_ZEROES get EPERM) but TRIM means
    "done with this range" and drops the preserved data, so the export is not
    flagged READ_ONLY unless the session was started read-only.
    """

    def __init__(self, session: Session, io: IoQueue) -> None:
        self.session = session
        self._io = io
        self._stats = ExportStats()
        ro = session.options.read_only
        self._info = ExportInfo(
            name=session.export_name,
            size=session.disk.size,
            description=f"snapshot {session.name} of {session.disk.name}",
            read_only=ro,
            can_write=False,
            can_trim=not ro,
            can_write_zeroes=False,
            can_fast_zero=False,
            can_fua=False,
            can_multi_conn=True,
        )

    def _bitmaps(self) -> dict[str, DirtyBitmap]:
        return self.session.bitmaps

    async def read(self, offset: int, length: int) -> tuple[bytearray | memoryview, bool]:
        return await self._io.read(self.session.native, offset, length)

    def read_now(self, offset: int, length: int) -> tuple[bytearray, bool] | None:
        return None  # snapshot reads take cluster locks: always off the loop

    def start_read(self, offset: int, length: int) -> tuple[memoryview, asyncio.Future[Done]]:
        return self._io.start_read(self.session.native, offset, length)

    def start_read_send(self, offset: int, length: int, sock: NativeSock,
                        header: bytes) -> tuple[memoryview, asyncio.Future[Done]]:
        return self._io.start_read_send(self.session.native, offset, length, sock, header)

    def start_write(
        self, offset: int, data: bytes | memoryview, fua: bool
    ) -> asyncio.Future[Done] | None:
        return None  # refused by write(): EPERM

    async def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        raise OSError(errno.EPERM, "snapshot export is read-only")

    async def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        raise OSError(errno.EPERM, "snapshot export is read-only")

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self._io.op(datapath.OP_SNAP_DISCARD, self.session.native, offset, length)

    async def flush(self) -> None:
        return None

    async def cache(self, offset: int, length: int) -> None:
        return None

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return await self._io.extents(self.session.native, offset, length)

    def error_message(self, exc: OSError) -> str:
        if exc.errno == errno.EPERM:
            return OUTSIDE_SCOPE
        if exc.errno == errno.EIO:
            st = self.session.stats()
            if st.broken:
                return f"snapshot is broken: {os.strerror(st.broken_errno or errno.EIO)}"
        return exc.strerror or ""
