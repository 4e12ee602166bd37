"""Carry dirty-bitmap coverage across the periods a VM's disk is not attached.

While a disk is attached, every guest write passes the daemon and lands in its
bitmaps.  While it is detached, writes go straight to the image, so before the
switch back the daemon asks QEMU to record them::

    vm-detach:  add_handoff_bitmap()   block-dirty-bitmap-add on the original node
                (then attach.switch_back)
    vm-attach:  (attach.switch first: the device no longer writes through the
                bitmap's node, or for method reopen we disable it right away)
                collect_handoff()      block-dirty-bitmap-disable
                                       nbd-server-start (private unix socket)
                                       block-export-add (read-only, bitmaps=[NAME])
                                       BLOCK_STATUS on qemu:dirty-bitmap:NAME
                                       block-export-del, nbd-server-stop,
                                       block-dirty-bitmap-remove

The node: method ``qom-set`` switches the device between our nbd node and
``Attachment.original``; method ``reopen`` keeps the device on the raw node
``Attachment.original`` and swaps its ``file`` child.  Either way the device
writes through ``Attachment.original`` once switched back, so that is where the
bitmap goes (measured on QEMU 7.2: a bitmap added there while the device points
elsewhere records the writes made after ``qom-set`` back).

QAPI forms, checked against QEMU 7.2's ``query-qmp-schema``:
``nbd-server-start`` takes ``addr`` as a SocketAddressLegacy
(``{"type": "unix", "data": {"path": ...}}``); ``block-export-add`` of type
``nbd`` takes ``bitmaps`` as a list of BlockDirtyBitmapOrStr (a plain name means
a bitmap of the exported node).

Rules: every QMP step is bounded by the monitor's timeout and every socket step
by the same value; whatever we started (server, export) is stopped again, and
on any failure the bitmap is left as it was (re-enabled); it is removed only
after its extents were read.  A hand-off that cannot be read is reported, never
guessed: :class:`HandoffLost` when the bitmap is gone (QEMU restarted) or
QEMU's NBD server is taken; the caller then marks the disk's bitmaps all-dirty
(and should do the same for any other error of :func:`collect_handoff`).

The caller owns the :class:`~fleeced.qmp.monitor.Monitor`: a VM's QMP socket
serves one client at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Iterable
from typing import Any, Final

from fleeced.errors import CommandError
from fleeced.nbd.client import (
    BlockStatus,
    ClientConnection,
    ClientEvent,
    NegotiationFailed,
    Ready,
    ReplyError,
    ServerProtocolError,
)
from fleeced.nbd.events import NEED_DATA
from fleeced.qmp.monitor import QmpFailed, VmMonitor

__all__ = [
    "HandoffLost",
    "add_handoff_bitmap",
    "collect_handoff",
    "remove_handoff_bitmap",
    "EXPORT_ID",
    "DIRTY",
]

log = logging.getLogger(__name__)

#: The id (and NBD export name) of our temporary export in the VM.
EXPORT_ID: Final = "fleeced-handoff"
#: ``qemu:dirty-bitmap:*`` extent flag: the range is dirty.
DIRTY: Final = 1
#: Largest BLOCK_STATUS request: 2 GiB keeps every power-of-two granularity
#: QEMU allows aligned, and fits NBD's 32-bit length.
_MAX_REQUEST: Final = 1 << 31
_READ_SIZE: Final = 256 * 1024
#: sun_path holds 108 bytes including the NUL.
_MAX_SOCKET_PATH: Final = 107
#: Interval of the bounded poll for a deleted export to disappear.
_POLL: Final = 0.02


class HandoffLost(CommandError):
    """The hand-off bitmap cannot be read: the writes of the detached period are
    unknown, so the disk's bitmaps must become all-dirty.

    :param reason: why, for ``query-bitmaps`` and the log.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"hand-off bitmap lost: {reason}", "HandoffLost")
        self.reason = reason


async def add_handoff_bitmap(mon: VmMonitor, node: str, name: str, granularity: int) -> None:
    """Start recording the writes that will bypass the daemon (at ``vm-detach``,
    before the switch back).

    A transient bitmap (raw images cannot persist one) on NODE.  If one of that
    name is already there (a hand-off never collected), it is kept and enabled:
    it already covers more than the new period, which is safe.

    :param node: the VM's original node (``Attachment.original``).
    :param granularity: bytes per bit, a power of two from 512 to 2 GiB (QEMU's
        limits); use the finest granularity of the disk's bitmaps.
    :raise ValueError: on a bad granularity.
    :raise CommandError: when NODE is gone, the existing bitmap is busy, or QEMU
        refuses (QmpFailed) or does not answer.
    """
    if granularity < 512 or granularity > 1 << 31 or granularity & (granularity - 1):
        raise ValueError(f"granularity must be a power of two from 512 to 2 GiB: {granularity}")
    info = await _bitmap_info(mon, node, name)
    if info is None:
        await mon.execute("block-dirty-bitmap-add", {
            "node": node, "name": name, "granularity": granularity, "persistent": False,
        })
        return
    if info.get("busy"):
        raise CommandError(f"bitmap {name!r} on node {node!r} is in use by another "
                           "operation; cannot record the detached period")
    log.info("hand-off bitmap %r on %r already exists (not collected); keeping it", name, node)
    if not info.get("recording"):
        await mon.execute("block-dirty-bitmap-enable", {"node": node, "name": name})


async def remove_handoff_bitmap(mon: VmMonitor, node: str, name: str) -> bool:
    """Remove the hand-off bitmap if it is there (after the caller gave up on it).

    :return: whether a bitmap was removed.
    :raise CommandError: when QEMU refuses (e.g. the bitmap is busy) or does not
        answer.
    """
    try:
        info = await _bitmap_info(mon, node, name)
    except HandoffLost:
        return False
    if info is None:
        return False
    await mon.execute("block-dirty-bitmap-remove", {"node": node, "name": name})
    return True


async def collect_handoff(mon: VmMonitor, node: str, name: str, size: int,
                          socket_dir: str) -> list[tuple[int, int]]:
    """Read the hand-off bitmap through QEMU's NBD server, then remove it (at
    ``vm-attach``, after the switch to the daemon).

    :param node: the node :func:`add_handoff_bitmap` was given.
    :param size: the disk size; QEMU's export must have the same.
    :param socket_dir: a directory both QEMU and the daemon can reach; the
        private socket is created (by QEMU) and removed there.
    :return: the dirty ranges ``(offset, length)``, sorted, merged, aligned to
        the bitmap's granularity (the last one may end at SIZE).
    :raise HandoffLost: the bitmap (or its node) is gone or inconsistent, or
        QEMU's NBD server is already running; nothing was changed.
    :raise CommandError: any other failure (QEMU refused or timed out, the NBD
        exchange failed, a size mismatch, or the cleanup failed); what could be
        undone was, and the bitmap is still there, enabled.
    """
    path = os.path.join(socket_dir, f"handoff-{secrets.token_hex(6)}.sock")
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise CommandError(f"socket path {path!r} is too long for a unix socket")
    info = await _bitmap_info(mon, node, name)
    if info is None:
        raise HandoffLost(f"no bitmap {name!r} on node {node!r} (the VM was restarted?)")
    if info.get("inconsistent"):
        raise HandoffLost(f"bitmap {name!r} on node {node!r} is inconsistent")
    if info.get("busy"):
        raise CommandError(f"bitmap {name!r} on node {node!r} is in use by another operation")

    undo: list[tuple[str, dict[str, Any]]] = []  # QMP commands that undo what we did
    extents: list[tuple[int, int]] | None = None
    conn: _NbdReader | None = None
    try:
        if info.get("recording"):
            # After the switch to the daemon the bitmap must stop changing (method
            # reopen: the device still writes through NODE, and those writes reach
            # the daemon too), so what we read is final.
            await mon.execute("block-dirty-bitmap-disable", {"node": node, "name": name})
            undo.append(("block-dirty-bitmap-enable", {"node": node, "name": name}))
        try:
            await mon.execute("nbd-server-start", {
                "addr": {"type": "unix", "data": {"path": path}},
            })
        except QmpFailed as exc:
            # QEMU has one NBD server; someone else's (libvirt's backup, an
            # operator's) is not ours to use or stop.
            raise HandoffLost(f"QEMU's NBD server is not available ({exc.qemu_desc})") from None
        undo.append(("nbd-server-stop", {}))
        await mon.execute("block-export-add", {
            "type": "nbd", "id": EXPORT_ID, "node-name": node, "name": EXPORT_ID,
            "writable": False, "bitmaps": [name],
        })
        # mode hard: QEMU drops our connection itself (see _NbdReader).
        undo.append(("block-export-del", {"id": EXPORT_ID, "mode": "hard"}))
        context = f"qemu:dirty-bitmap:{name}"
        conn = await _NbdReader.open(path, context, mon.timeout)
        extents = await conn.dirty_extents(context, size)
    finally:
        # Undo in reverse order; on success the bitmap is removed instead of
        # re-enabled.  A failing step does not stop the others.
        if extents is not None and undo and undo[0][0] == "block-dirty-bitmap-enable":
            undo[0] = ("block-dirty-bitmap-remove", {"node": node, "name": name})
        elif extents is not None:
            undo.insert(0, ("block-dirty-bitmap-remove", {"node": node, "name": name}))
        failed = await _undo(mon, reversed(undo))
        if conn is not None:
            await conn.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if failed:
        raise CommandError(f"hand-off cleanup failed: {'; '.join(failed)}")
    assert extents is not None
    return extents


async def _undo(mon: VmMonitor, steps: Iterable[tuple[str, dict[str, Any]]]) -> list[str]:
    """Run the undo STEPS; return what failed (already logged)."""
    failed: list[str] = []
    for cmd, args in steps:
        try:
            await mon.execute(cmd, args)
            if cmd == "block-export-del":
                await _wait_export_gone(mon, args["id"])
        except CommandError as exc:
            log.warning("hand-off cleanup: %s", exc.desc)
            failed.append(exc.desc)
    return failed


async def _wait_export_gone(mon: VmMonitor, export_id: str) -> None:
    """``block-export-del`` only starts the removal; wait until QEMU no longer
    lists the export (bounded by the monitor timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + mon.timeout
    while True:
        exports = await mon.execute("query-block-exports")
        if not any(isinstance(e, dict) and e.get("id") == export_id for e in exports):
            return
        if loop.time() > deadline:
            raise CommandError(f"export {export_id!r} still in QEMU {mon.timeout:g}s "
                               "after block-export-del")
        await asyncio.sleep(_POLL)


async def _bitmap_info(mon: VmMonitor, node: str, name: str) -> dict[str, Any] | None:
    """The ``dirty-bitmaps`` entry of NAME on NODE, or None.

    :raise HandoffLost: when QEMU has no node NODE.
    """
    nodes = await mon.execute("query-named-block-nodes", {"flat": True})
    for entry in nodes:
        if isinstance(entry, dict) and entry.get("node-name") == node:
            for bitmap in entry.get("dirty-bitmaps") or []:
                if isinstance(bitmap, dict) and bitmap.get("name") == name:
                    return bitmap
            return None
    raise HandoffLost(f"QEMU has no node {node!r} (the VM was restarted?)")


class _NbdReader:
    """Our client connection to QEMU's NBD server (asyncio shell around
    :class:`~fleeced.nbd.client.ClientConnection`).

    QEMU 7.2 aborts (``nbd_blockdev_client_closed: Assertion
    `qemu_in_main_thread() && nbd_server' failed``) when a client connection
    of an export whose node lives in an iothread ends from the iothread's side:
    after NBD_CMD_DISC or when the client hangs up first.  So after the
    handshake we never send NBD_CMD_DISC nor close first: ``block-export-del``
    with mode ``hard`` drops the connection from QEMU's main thread, and only
    then is our socket closed (:meth:`close`).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 client: ClientConnection, limit: float) -> None:
        self._reader = reader
        self._writer = writer
        self._client = client
        self._limit = limit

    @classmethod
    async def open(cls, path: str, context: str, limit: float) -> _NbdReader:
        """:raise CommandError: when the connection cannot be made in time."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), limit)
        except (OSError, TimeoutError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "timeout"
            raise CommandError(f"cannot connect to QEMU's NBD server at {path}: {why}") from None
        return cls(reader, writer, ClientConnection(EXPORT_ID, [context]), limit)

    async def dirty_extents(self, context: str, size: int) -> list[tuple[int, int]]:
        """Handshake, then BLOCK_STATUS over the whole export.

        :raise CommandError: on any failure of the NBD exchange.
        """
        client = self._client
        try:
            ready = await self._next()
            if not isinstance(ready, Ready):
                raise CommandError(f"NBD handshake with QEMU: unexpected {ready!r}")
            if ready.size != size:
                raise CommandError(f"QEMU exports {ready.size} bytes, the disk has {size}")
            dirty: list[tuple[int, int]] = []
            pos = 0
            while pos < size:
                client.block_status(pos, min(size - pos, _MAX_REQUEST))
                event = await self._next()
                if isinstance(event, ReplyError):
                    raise CommandError(f"QEMU's NBD server refused BLOCK_STATUS at {pos}: "
                                       f"error {event.error} {event.message}".rstrip())
                if not isinstance(event, BlockStatus):
                    raise CommandError(f"NBD with QEMU: unexpected {event!r}")
                for length, flags in event.extents[context]:
                    if flags & DIRTY:
                        if dirty and dirty[-1][0] + dirty[-1][1] == pos:
                            dirty[-1] = (dirty[-1][0], dirty[-1][1] + length)
                        else:
                            dirty.append((pos, length))
                    pos += length
            return dirty
        except NegotiationFailed as exc:
            # Still in the handshake (QEMU's main thread): NBD_OPT_ABORT is queued.
            with contextlib.suppress(OSError, TimeoutError):
                await self._write()
            raise CommandError(f"NBD with QEMU's server: {exc}") from None
        except ServerProtocolError as exc:
            raise CommandError(f"NBD with QEMU's server: {exc}") from None

    async def close(self) -> None:
        """Close our end (after QEMU dropped the connection, see the class doc)."""
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), self._limit)

    async def _write(self) -> None:
        data = self._client.data_to_send()
        if data:
            self._writer.write(data)
            await asyncio.wait_for(self._writer.drain(), self._limit)

    async def _next(self) -> ClientEvent:
        """Send what the client queued, then read until it has an event.

        :raise CommandError: on a timeout or a socket error.
        :raise ServerProtocolError, NegotiationFailed: from the client.
        """
        client = self._client
        try:
            while True:
                await self._write()
                event = client.next_event()
                if event is not NEED_DATA:
                    assert not isinstance(event, type)
                    return event
                await self._write()  # what parsing queued (client flags, options)
                data = await asyncio.wait_for(self._reader.read(_READ_SIZE), self._limit)
                if data:
                    client.receive_data(data)
                else:
                    client.receive_eof()
        except TimeoutError:
            raise CommandError(f"QEMU's NBD server did not answer within "
                               f"{self._limit:g}s") from None
        except OSError as exc:
            raise CommandError(f"NBD connection to QEMU: {exc.strerror or exc}") from None
