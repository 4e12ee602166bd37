"""Fleecing sessions and their snapshot exports (the frozen view)."""

from __future__ import annotations

import asyncio
import errno
import os

from fleeced import datapath
from fleeced.daemon_config import SessionOptions
from fleeced.datapath import (
    ConnRule,
    NativeConn,
    NativeSession,
    SessionParams,
    SessionStats,
)
from fleeced.exports.base import (
    BASE_ALLOCATION,
    OUTSIDE_SCOPE,
    DirtyBitmap,
    DiskView,
    ExportBase,
    ExportStats,
)
from fleeced.ioqueue import IoQueue, ReadResult, ReplySocket
from fleeced.nbd import ExportInfo
from fleeced.progress import ProgressEvents


class Session:
    """A fleecing session: a native CBW session plus its snapshot export."""

    def __init__(self, disk: DiskView, options: SessionOptions, native: NativeSession,
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
        #: Where QEMU's copy-before-write puts the old data, when QEMU runs
        #: it (a VM node the daemon does not write itself).
        self.target: CbwTargetExport | None = None
        self.broken_reported = False
        #: Its ``FLEECE_PROGRESS`` events while the daemon watches it.
        self.progress_events: ProgressEvents | None = None

    @classmethod
    async def start(cls, disk: DiskView, options: SessionOptions, io: IoQueue, *,
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

    def progress(self) -> tuple[int, int]:
        """``(read, total)`` bytes of the snapshot a client has read at least
        once (see :meth:`NativeSession.progress`); never blocks."""
        return self.native.progress()


def default_temp_dir() -> str:
    """Where temp stores go by default: ``$TMPDIR``, else /var/tmp (disk, not tmpfs)."""
    tmp = os.environ.get("TMPDIR")
    if tmp:
        return tmp
    return "/var/tmp" if os.path.isdir("/var/tmp") else "/tmp"


class SnapshotExport(ExportBase):
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

    async def read(self, offset: int, length: int) -> ReadResult:
        return await self._io.read(self.session.native, offset, length)

    def read_now(self, offset: int, length: int) -> ReadResult | None:
        return None  # snapshot reads take cluster locks: always off the loop

    def check_read(self, offset: int, length: int) -> None:
        self.session.native.check_read(offset, length)

    def submit_read(self, offset: int, length: int, reply_to: ReplySocket | None = None,
                    header: bytes = b"", *, piece: bool = False) -> asyncio.Future[ReadResult]:
        return self._io.submit_read(self.session.native, offset, length, reply_to, header)

    def submit_write(
        self, offset: int, data: bytes | memoryview, fua: bool,
        reply_to: ReplySocket | None = None, header: bytes = b"",
    ) -> asyncio.Future[int] | None:
        return None  # refused by write(): EPERM

    def start_native(self, fd: int, rules: tuple[ConnRule, ...], structured: bool,
                     contexts: dict[int, str], initial: bytes) -> NativeConn | None:
        return self._native_conn(self._io, self.session.native, True, fd, rules, structured,
                                 contexts, initial)

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

    def extents_told(self, context: str, offset: int,
                     extents: list[tuple[int, int]]) -> None:
        # A backup that follows the map skips what reads as zeros: those
        # clusters are backed up as much as read ones (the native data
        # plane does the same in C).
        if context != BASE_ALLOCATION:
            return
        for length, flags in extents:
            if flags & datapath.EXT_ZERO:
                try:
                    self.session.native.note_zero(offset, length)
                except OSError:
                    return  # the session closed: nothing left to count
            offset += length

    def error_message(self, exc: OSError) -> str:
        if exc.errno == errno.EPERM:
            return OUTSIDE_SCOPE
        if exc.errno == errno.EIO:
            st = self.session.stats()
            if st.broken:
                return f"snapshot is broken: {os.strerror(st.broken_errno or errno.EIO)}"
        return exc.strerror or ""


class CbwTargetExport(ExportBase):
    """Where a copy-before-write that QEMU runs puts the old data: the
    target of its ``copy-before-write`` filter, for a VM disk whose own
    writes never pass through fleeced (a qcow2 or rbd node).

    A WRITE (or WRITE_ZEROES) of a range is its contents at the snapshot
    instant; it is kept for the session (``fl_session_put_old``) before the
    reply, so QEMU overwrites the node only once fleeced has the old data.
    Nothing can be read back: it is not a view of anything.
    """

    def __init__(self, session: Session, io: IoQueue) -> None:
        self.session = session
        self._io = io
        self._stats = ExportStats()
        #: Set once the daemon takes QEMU's filter away: from then on a
        #: client going is expected.
        self.closing = False
        self._info = ExportInfo(
            name=f"{session.export_name}.cbw",
            size=session.disk.size,
            description=f"copy-before-write target of snapshot {session.name} "
                        f"of {session.disk.name}",
            can_trim=False,
            can_fast_zero=False,
            can_cache=False,
            # Nothing is durable here on purpose (the temp store dies with
            # the session): a FLUSH has nothing to wait for.
            can_fua=False,
        )

    def _bitmaps(self) -> dict[str, DirtyBitmap]:
        return {}

    async def read(self, offset: int, length: int) -> ReadResult:
        raise OSError(errno.EPERM, "a copy-before-write target is written only")

    def read_now(self, offset: int, length: int) -> ReadResult | None:
        raise OSError(errno.EPERM, "a copy-before-write target is written only")

    def submit_read(self, offset: int, length: int, reply_to: ReplySocket | None = None,
                    header: bytes = b"", *, piece: bool = False) -> asyncio.Future[ReadResult]:
        raise OSError(errno.EPERM, "a copy-before-write target is written only")

    def submit_write(
        self, offset: int, data: bytes | memoryview, fua: bool,
        reply_to: ReplySocket | None = None, header: bytes = b"",
    ) -> asyncio.Future[int] | None:
        return None  # write() below

    async def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await self._io.put_old(self.session.native, offset, data)

    async def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        await self._io.put_old(self.session.native, offset, None, length)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        raise OSError(errno.EPERM, "a copy-before-write target is written only")

    async def flush(self) -> None:
        return None

    async def cache(self, offset: int, length: int) -> None:
        return None

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        raise OSError(errno.EPERM, "a copy-before-write target is written only")

    def error_message(self, exc: OSError) -> str:
        return exc.strerror or ""

    def client_gone(self) -> None:
        """QEMU's target node went away while its filter may still copy: a
        copy it cannot deliver makes QEMU break *its* snapshot (or fail the
        guest write) without the daemon knowing, so the daemon's snapshot
        is broken now rather than silently missing data."""
        if not self.closing:
            try:
                self.session.native.break_(errno.ENOTCONN)
            except OSError:
                pass  # closed meanwhile: nothing left to break
