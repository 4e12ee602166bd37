"""A disk: a source the daemon owns, with its fleecing sessions and dirty
bitmaps; its exports (:mod:`.active`, :mod:`.snapshot`) serve it."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from dataclasses import dataclass, field

from fleeced.datapath import NativeFile
from fleeced.exports.base import DirtyBitmap
from fleeced.exports.snapshot import Session
from fleeced.qsd import QsdChild
from fleeced.sources import Source, SourceError, probe


def stat_identity(st: os.stat_result) -> tuple[str, ...]:
    """What :attr:`Disk.identity` says of the file ST describes: a block
    device by its device number, a file by its filesystem and inode."""
    if stat.S_ISBLK(st.st_mode):
        return ("blk", str(st.st_rdev), "0")
    return ("file", str(st.st_dev), str(st.st_ino))


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
    #: Named dirty bitmaps (fleeced.bitmap_store.Bitmap), served on the active
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
