"""The read-write view of a disk: every guest write goes through it (and
through copy-before-write in C for each fleecing session of the disk)."""

from __future__ import annotations

import asyncio

from fleeced import datapath
from fleeced.datapath import ConnRule, NativeConn
from fleeced.exports.base import (
    INLINE_READ_MAX,
    RUN_WRITE_MAX,
    DirtyBitmap,
    ExportBase,
    ExportStats,
    ReadRun,
    WriteRun,
)
from fleeced.exports.disk import Disk
from fleeced.ioqueue import IoQueue, ReadResult, ReplySocket
from fleeced.nbd import ExportInfo, RunRule


class ActiveExport(ExportBase):
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

    async def read(self, offset: int, length: int) -> ReadResult:
        return await self._io.read(self.disk.file, offset, length)

    def read_now(self, offset: int, length: int) -> ReadResult | None:
        if length > INLINE_READ_MAX:
            return None
        got = self.disk.file.read_nowait(offset, length)
        return None if got is None else ReadResult(got[0], got[1])

    takes_runs = True

    def read_run(self, rule: RunRule, data: bytes | bytearray, pos: int,
                 max_count: int) -> ReadRun | None:
        return self.disk.file.read_run(
            data, pos, size=rule.size, allowed_flags=rule.allowed_flags,
            max_length=min(rule.max_length, INLINE_READ_MAX), min_block=rule.min_block,
            structured=rule.structured, max_count=max_count,
        )

    def write_run(self, rule: RunRule, data: bytes | bytearray, pos: int,
                  max_count: int) -> WriteRun | None:
        file = self.disk.file
        got = file.write_run_check(data, pos, size=rule.size, allowed_flags=rule.allowed_flags,
                                   max_length=min(rule.max_length, RUN_WRITE_MAX),
                                   min_block=rule.min_block, max_count=max_count)
        if got is None:
            return None
        consumed, count, nbytes, acks = got
        with memoryview(data) as view:  # a copy: the receive buffer moves on
            req = bytes(view[pos:pos + consumed])
        fut = self._io.submit_write_run(file, req, count)
        return consumed, count, nbytes, acks, req, fut

    def start_native(self, fd: int, rules: tuple[ConnRule, ...], structured: bool,
                     contexts: dict[int, str], initial: bytes) -> NativeConn | None:
        return self._native_conn(self._io, self.disk.file, self.disk.discard == "unmap", fd,
                                 rules, structured, contexts, initial)

    def submit_read(self, offset: int, length: int, reply_to: ReplySocket | None = None,
                    header: bytes = b"", *, piece: bool = False) -> asyncio.Future[ReadResult]:
        return self._io.submit_read(self.disk.file, offset, length, reply_to, header,
                                    piece=piece)

    def submit_write(
        self, offset: int, data: bytes | memoryview, fua: bool,
        reply_to: ReplySocket | None = None, header: bytes = b"",
    ) -> asyncio.Future[int] | None:
        return self._io.submit_write(
            self.disk.file, offset, data, datapath.FLAG_FUA if fua else 0, reply_to, header
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
