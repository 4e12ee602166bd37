"""Dirty bitmaps of a disk: names, persistence, recovery.

The bits live in C (:class:`~fleeced.datapath.NativeBitmap`): every guest
write, write-zeroes and trim through the active export marks the enabled
bitmaps of its disk before it is acknowledged.  This module keeps the Python
side: which bitmaps a disk has, where their files are, why one is all dirty.

Rules:

- **Persistent** bitmaps are files in ``<state dir>/bitmaps``; the state
  document lists them.  C marks a file *in use* when it opens it and clears
  that only after a clean close (bits synced, checksum written), so a
  bitmap found in use at start-up belonged to a daemon that died: C sets
  every bit and :attr:`Bitmap.recovered` says why.  The next incremental is
  then a full read, never a silently wrong one.
- Bits are made durable without a sync per guest write: at every FLUSH
  (C), periodically, at detach and at shutdown.  At detach (and at the
  clean close at shutdown) the file is also marked clean: a crash while the
  disk is detached loses nothing.
- **All dirty, with a reason**, is also the answer when the daemon cannot
  know what changed: a VM wrote while detached and the hand-off bitmap is
  gone, or QEMU's NBD server was busy.  A file that cannot be trusted (not
  a bitmap, unknown flags, another granularity, unreadable) never makes a
  bitmap disappear: the bitmap comes back all dirty with the reason shown,
  and the bad file is kept beside it (``.bad``).  A disk resized while the
  daemon was down resizes its bitmaps: the area past the old end is dirty.
- Blocking calls (file creation, msync, attach/detach, which wait for guest
  writes in flight) run in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from fleeced import datapath
from fleeced.datapath import NativeBitmap
from fleeced.errors import CommandError

log = logging.getLogger(__name__)

DEFAULT_GRANULARITY: Final = 64 * 1024
MIN_GRANULARITY: Final = 512
MAX_GRANULARITY: Final = 1 << 30
#: Bitmap names become part of ``qemu:dirty-bitmap:NAME`` (at most 4096 bytes).
MAX_NAME: Final = 1023

RECOVERED_CRASH: Final = ("the daemon stopped uncleanly while the bitmap was in use: "
                          "every cluster is reported dirty")
RECOVERED_CORRUPT: Final = "the bitmap file failed its checksum: every cluster is reported dirty"
RECOVERED_RESIZED: Final = ("the disk's size changed while no daemon had the bitmap open: "
                            "it was resized, and the area past the old end is reported dirty")


@dataclass(eq=False)
class Bitmap:
    """One named dirty bitmap of a disk."""

    disk: str
    name: str
    granularity: int
    persistent: bool
    native: NativeBitmap
    #: Recording (attached to the disk's guest write path).
    enabled: bool = True
    path: str | None = None
    #: Why every bit is set (a crash, a lost hand-off, ...), until cleared.
    recovered: str | None = None

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        out: list[tuple[int, bool]] = self.native.extents(offset, length)
        return out

    def record(self) -> dict[str, Any]:
        """The state document's entry (persistent bitmaps only)."""
        return {"disk": self.disk, "name": self.name, "granularity": self.granularity,
                "enabled": self.enabled, "file": os.path.basename(self.path or "")}

    def describe(self) -> dict[str, Any]:
        """The ``query-bitmaps`` entry."""
        out: dict[str, Any] = {
            "disk": self.disk, "name": self.name, "granularity": self.granularity,
            "dirty-bytes": self.native.count(), "persistent": self.persistent,
            "recording": self.enabled, "in-use-recovered": self.recovered is not None,
        }
        if self.recovered is not None:
            out["reason"] = self.recovered
        return out


def check_name(name: str) -> str:
    """:raise CommandError: unless NAME can be a bitmap (and context) name."""
    if not name or "\0" in name or len(name.encode()) > MAX_NAME:
        raise CommandError(f"invalid bitmap name {name!r}")
    return name


def check_granularity(value: int) -> int:
    """:raise CommandError: unless VALUE is a power of two in range."""
    if not MIN_GRANULARITY <= value <= MAX_GRANULARITY or value & (value - 1):
        raise CommandError(f"granularity {value} must be a power of two between "
                           f"{MIN_GRANULARITY} and {MAX_GRANULARITY}")
    return value


def file_name(disk: str, name: str) -> str:
    """``<disk>@<name>.fbm`` with both parts percent-encoded (no ``/``, no ``@``)."""
    return (f"{urllib.parse.quote(disk, safe='')}@{urllib.parse.quote(name, safe='')}"
            ".fbm")


async def create(directory: str | None, disk: str, name: str, size: int,
                 granularity: int, replace_stray: bool = False) -> Bitmap:
    """A new, clean bitmap: a file in DIRECTORY, or transient when None.

    :param replace_stray: a file already at the bitmap's path belongs to no
        bitmap (the caller checked the state): replace it.  It is left by
        a daemon that died between creating a bitmap and recording it.
    :raise CommandError: when the file cannot be created.
    """
    path = None
    if directory is not None:
        path = os.path.join(directory, file_name(disk, name))
    try:
        if directory is not None:
            await asyncio.to_thread(os.makedirs, directory, 0o700, True)
        try:
            native, _ = await asyncio.to_thread(NativeBitmap.open, path, size, granularity,
                                                True)
        except FileExistsError:
            if not replace_stray or path is None:
                raise
            log.warning("bitmap %s of %s: replacing %s, which no bitmap uses", name, disk,
                        path)
            await asyncio.to_thread(os.unlink, path)
            native, _ = await asyncio.to_thread(NativeBitmap.open, path, size, granularity,
                                                True)
    except OSError as exc:
        raise CommandError(f"cannot create bitmap {name!r}: {exc.strerror or exc}") from None
    return Bitmap(disk, name, granularity, path is not None, native, path=path)


async def load(directory: str, rec: dict[str, Any], size: int) -> Bitmap:
    """Reopen a persistent bitmap listed in the state document.

    Never fails and never loses the bitmap: whatever cannot be trusted
    comes back all dirty, with the reason (:attr:`Bitmap.recovered`).  A
    missing file is created again; a file that is not a bitmap of this
    disk is moved aside (``FILE.bad``) and replaced; one that cannot be
    opened at all leaves the bitmap in memory only (the next start tries
    the file again).  A disk resized since keeps its bits where it kept its
    data, the new area dirty.
    """
    disk, name = str(rec["disk"]), str(rec["name"])
    granularity = int(rec["granularity"])
    path = os.path.join(directory, str(rec.get("file") or file_name(disk, name)))
    enabled = bool(rec.get("enabled", True))
    reason = None
    try:
        check_granularity(granularity)
    except CommandError:
        reason = (f"its recorded granularity {granularity} is not valid: every cluster "
                  "is reported dirty")
        granularity = DEFAULT_GRANULARITY
    try:
        native, recovered = await asyncio.to_thread(NativeBitmap.open, path, size,
                                                    granularity, False)
    except FileNotFoundError as exc:
        native, reason = await _replace(path, size, granularity, exc)
        recovered = 0
    except OSError as exc:
        native, reason = await _replace(path, size, granularity, exc)
        recovered = 0
    if recovered == 1:
        reason = RECOVERED_CRASH  # C loaded it all dirty
    elif recovered == 2:
        reason = RECOVERED_CORRUPT  # the same
    elif reason is not None:
        await asyncio.to_thread(native.set_all)
    elif recovered == datapath.RECOVERED_RESIZED:
        reason = RECOVERED_RESIZED
    bm = Bitmap(disk, name, granularity, True, native, enabled=enabled, path=path,
                recovered=reason)
    if reason:
        log.warning("bitmap %s of %s: %s", name, disk, reason)
    return bm


async def _replace(path: str, size: int, granularity: int,
                   exc: OSError) -> tuple[NativeBitmap, str]:
    """A new, all-dirty bitmap for the file at PATH that could not be
    loaded (EXC): the file moves to ``PATH.bad`` and a new one takes its
    place; when even that fails, the bitmap lives in memory only."""
    missing = isinstance(exc, FileNotFoundError)
    why = ("it is missing" if missing
           else "not a bitmap file of this disk (header, flags or granularity)"
           if exc.errno == errno.EINVAL else exc.strerror or str(exc))
    bad = path + ".bad"
    try:
        if not missing:
            await asyncio.to_thread(os.replace, path, bad)
        native, _ = await asyncio.to_thread(NativeBitmap.open, path, size, granularity, True)
    except OSError as again:
        native, _ = await asyncio.to_thread(NativeBitmap.open, None, size, granularity, True)
        return native, (f"the bitmap file could not be loaded ({why}) nor replaced "
                        f"({again.strerror or again}): every cluster is reported dirty, and "
                        "the bitmap is kept in memory only until a restart can write it")
    if missing:
        return native, "the bitmap file was missing: every cluster is reported dirty"
    return native, (f"the bitmap file could not be loaded ({why}); it was kept as {bad}, "
                    "and every cluster is reported dirty")


async def sync(bitmaps: list[Bitmap]) -> None:
    """msync the persistent ones (bits only; the in-use flag stays)."""
    for bm in bitmaps:
        if bm.persistent:
            try:
                await asyncio.to_thread(bm.native.sync)
            except OSError as exc:
                log.error("bitmap %s of %s: sync failed: %s", bm.name, bm.disk,
                          exc.strerror or exc)


async def mark_clean(bitmaps: list[Bitmap]) -> None:
    """Sync the persistent ones and clear their in-use flag while they stay
    open (at detach: no write comes through until the next attach; the next
    one that does marks the file in use again before it is acknowledged)."""
    for bm in bitmaps:
        if bm.persistent:
            try:
                await asyncio.to_thread(bm.native.mark_clean)
            except OSError as exc:
                log.error("bitmap %s of %s: clean mark failed (it stays in use): %s",
                          bm.name, bm.disk, exc.strerror or exc)


async def remove_file(bm: Bitmap) -> None:
    if bm.path is not None:
        try:
            await asyncio.to_thread(os.unlink, bm.path)
        except FileNotFoundError:
            pass


def check_required(disks: Mapping[str, Any], specs: Iterable[Any]) -> None:
    """Refuse to serve a disk without a bitmap its spec requires (``serve
    -B NAME``, a ``[[disk]]``'s ``bitmaps``), as qemu-nbd refuses a
    ``--bitmap`` its image lacks: a backup tool that counts on
    ``qemu:dirty-bitmap:NAME`` must not get an export without it.

    :param disks: served disks by name (:class:`fleeced.exports.Disk`).
    :param specs: their :class:`fleeced.daemon_config.DiskSpec`.
    :raise ValueError: naming the disk and the missing bitmap.
    """
    for spec in specs:
        disk = disks.get(spec.name)
        if disk is None:
            continue
        for name in spec.bitmaps:
            if name not in disk.bitmaps:
                have = ", ".join(sorted(disk.bitmaps)) or "none"
                raise ValueError(f"disk {spec.name} has no dirty bitmap {name!r} "
                                 f"(it has: {have}); add it with `fleeced bitmap add` "
                                 "on a daemon with a state dir")


def check_removable(disk: str, name: str, specs: Iterable[Any]) -> None:
    """Refuse to remove a bitmap the daemon was started to serve (``-B``),
    as QEMU refuses to remove a bitmap an export uses: its clients would
    lose the context, and the next start would fail for want of it.

    :raise CommandError: when a spec of DISK requires NAME.
    """
    for spec in specs:
        if spec.name == disk and name in spec.bitmaps:
            raise CommandError(f"bitmap '{name}' of '{disk}' is served as the daemon was "
                               "started to (serve -B, [[disk]] bitmaps); restart without it "
                               "first")
