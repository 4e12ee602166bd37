"""Exports: the operations behind an NBD export name, over the native data path.

A :class:`Disk` owns one source image.  Its :class:`ActiveExport` is the
read-write view every guest write goes through (copy-before-write runs in C
for every fleecing session of the disk).  Each :class:`Session` owns one
native fleecing session and serves its frozen view as a :class:`SnapshotExport`.

Rooms: :mod:`.base` (the export protocol, counters, contexts), :mod:`.disk`
(the disk), :mod:`.active`, :mod:`.snapshot` (sessions and their exports,
also the target of a copy-before-write that QEMU runs).

Every call that may block runs in the native I/O queue's workers, never on the
event loop: reads, writes, block status, session open and
close.  Errors propagate as :class:`OSError`; policy refusals are
``OSError(EPERM)``.  This package must not import the NBD engine's internals
beyond :class:`~fleeced.nbd.ExportInfo`, nor asyncio servers.  The seam
the server sees (:class:`Export`, :class:`ReadResult`, :class:`ReplySocket`,
:class:`ReplyTorn`, :func:`open_reply_socket`) is re-exported here, so
:mod:`fleeced.server` never imports the data path or the queue.
"""

from fleeced.daemon_config import SessionOptions, image_export_name
from fleeced.exports.active import ActiveExport
from fleeced.exports.base import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    DIRTY_BITMAP,
    INLINE_READ_MAX,
    OUTSIDE_SCOPE,
    DirtyBitmap,
    Export,
    ExportStats,
    allocation_depth,
    base_allocation,
    bitmap_extents,
)
from fleeced.exports.disk import Disk, stat_identity
from fleeced.exports.snapshot import CbwTargetExport, Session, SnapshotExport, default_temp_dir
from fleeced.ioqueue import ReadResult, ReplySocket, ReplyTorn, open_reply_socket

__all__ = [
    "ALLOCATION_DEPTH", "BASE_ALLOCATION", "DIRTY_BITMAP", "INLINE_READ_MAX",
    "CbwTargetExport",
    "OUTSIDE_SCOPE", "ActiveExport", "DirtyBitmap", "Disk", "Export", "ExportStats",
    "ReadResult", "ReplySocket", "ReplyTorn", "Session", "SessionOptions", "SnapshotExport",
    "allocation_depth", "base_allocation", "bitmap_extents", "default_temp_dir",
    "image_export_name",
    "open_reply_socket", "stat_identity",
]
