"""A reference incremental backup client, for the demo and the tests.

Not a product feature: it shows what backup software does with fleeced's
``qemu:dirty-bitmap:NAME`` context.  It asks a snapshot export for the
extents its checkpoint bitmap marks dirty (flag 1), reads only those, and
writes them into a copy of the previous backup, which then equals the disk
at snapshot time.  It speaks NBD through the sans-IO client role
(:mod:`fleeced.nbd.client`), so it needs nothing but the standard library.
"""

from __future__ import annotations

import asyncio
import os
from typing import Final

from fleeced.nbd import NEED_DATA
from fleeced.nbd.client import (
    BlockStatus,
    ClientConnection,
    ClientEvent,
    ReadData,
    ReplyError,
)

#: Bytes asked for per BLOCK_STATUS request.
STATUS_SPAN: Final = 1 << 30
#: Bytes per READ request.
READ_SPAN: Final = 4 << 20
DIRTY: Final = 1


class _Link:
    """The client engine on a Unix socket."""

    def __init__(self, client: ClientConnection, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.client = client
        self._reader = reader
        self._writer = writer

    async def event(self) -> ClientEvent:
        while True:
            event = self.client.next_event()
            await self.flush()  # what the event (or an earlier call) queued
            if event is not NEED_DATA:
                assert not isinstance(event, type)
                return event
            data = await self._reader.read(1 << 20)
            if data:
                self.client.receive_data(data)
            else:
                self.client.receive_eof()

    async def flush(self) -> None:
        out = self.client.data_to_send()
        if out:
            self._writer.write(out)
            await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass


async def dirty_extents(socket_path: str, export: str, bitmap: str) -> list[tuple[int, int]]:
    """The ``(offset, length)`` ranges bitmap NAME marks dirty on EXPORT."""
    context = f"qemu:dirty-bitmap:{bitmap}"
    link = await _connect(socket_path, export, [context])
    try:
        return await _dirty(link, context)
    finally:
        await _disconnect(link)


async def apply_incremental(socket_path: str, export: str, bitmap: str, target: str) -> int:
    """Copy the dirty extents of EXPORT (a snapshot) into the file TARGET.

    :return: the bytes copied.
    :raise OSError: on an NBD error reply or a failed write.
    """
    context = f"qemu:dirty-bitmap:{bitmap}"
    link = await _connect(socket_path, export, [context])
    copied = 0
    try:
        ranges = await _dirty(link, context)
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        try:
            for offset, length in ranges:
                end = offset + length
                while offset < end:
                    n = min(READ_SPAN, end - offset)
                    cookie = link.client.read(offset, n)
                    event = await link.event()
                    if isinstance(event, ReplyError) or not isinstance(event, ReadData) \
                            or event.cookie != cookie:
                        raise OSError(f"READ {offset}+{n} failed: {event}")
                    os.pwrite(fd, event.data, offset)
                    copied += n
                    offset += n
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        await _disconnect(link)
    return copied


async def _connect(socket_path: str, export: str, contexts: list[str]) -> _Link:
    reader, writer = await asyncio.open_unix_connection(socket_path)
    link = _Link(ClientConnection(export, contexts), reader, writer)
    await link.event()  # Ready (anything else raised)
    return link


async def _dirty(link: _Link, context: str) -> list[tuple[int, int]]:
    size = link.client.size
    out: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        cookie = link.client.block_status(offset, min(STATUS_SPAN, size - offset))
        event = await link.event()
        if not isinstance(event, BlockStatus) or event.cookie != cookie:
            raise OSError(f"BLOCK_STATUS at {offset} failed: {event}")
        for length, flags in event.extents[context]:
            if flags & DIRTY:
                if out and out[-1][0] + out[-1][1] == offset:
                    out[-1] = (out[-1][0], out[-1][1] + length)
                else:
                    out.append((offset, length))
            offset += length
    return out


async def _disconnect(link: _Link) -> None:
    try:
        if link.client.in_transmission and not link.client.pending:
            link.client.disconnect()
            await link.flush()
    finally:
        await link.close()
