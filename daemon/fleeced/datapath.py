"""Typed, policed access to the native data path (``fleeced._native``).

This is the only module that imports the cffi module (``ffi``/``lib``); everything
else goes through :class:`NativeFile`, :class:`NativeSession` and
:class:`NativeBitmap`.  Every input is
checked here before the C call (types, non-negative, within the image), and C
return codes (``0`` or ``-errno``) become :class:`OSError` with that errno.  C
re-checks everything anyway.

The methods of :class:`NativeFile` and :class:`NativeSession` are synchronous and
may block on disk I/O; they serve tests and tools.  The daemon goes through
:class:`NativeQueue` for everything that may block (reads, writes, block status,
session open and close): C worker threads run the calls and signal an eventfd,
so no Python thread is involved and the event loop never waits.  Only
``read_nowait`` and ``stats`` run on the loop: they never block on I/O or on a
lock held across I/O.

Lifetimes are C's business: files, sessions, bitmaps and sockets are reference
counted in C, every queued operation holds a reference on its object (a queued
session open pins its checkpoint bitmaps with references taken here), and
``close()`` only gives up the owner's reference.  So a close may come at any time; the
operations still queued keep the object alive and fail ``ESHUTDOWN``.

Buffers are passed zero-copy with ``ffi.from_buffer``.  C never calls back into
Python (no cffi callbacks) and keeps no pointer after returning, except the
queue, which holds each buffer until its operation is reaped; the queue keeps
the Python buffer alive for exactly that long.

Must not import asyncio or any other fleeced module.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Final, Self

from fleeced._native import ffi, lib

__all__ = [
    "COPIED",
    "COPYING",
    "EXT_DIRTY",
    "EXT_HOLE",
    "EXT_ZERO",
    "EXT_UNREADABLE",
    "NEEDED",
    "NOT_NEEDED",
    "RECOVERED_CORRUPT",
    "RECOVERED_IN_USE",
    "RECOVERED_RESIZED",
    "ZERO",
    "NativeBitmap",
    "NativeFile",
    "NativeSession",
    "SessionParams",
    "SessionStats",
]

NOT_NEEDED: Final[int] = int(lib.FL_NOT_NEEDED)
NEEDED: Final[int] = int(lib.FL_NEEDED)
COPYING: Final[int] = int(lib.FL_COPYING)
COPIED: Final[int] = int(lib.FL_COPIED)
ZERO: Final[int] = int(lib.FL_ZERO)
EXT_HOLE: Final[int] = int(lib.FL_EXT_HOLE)
EXT_ZERO: Final[int] = int(lib.FL_EXT_ZERO)
#: Outside a snapshot's scope or discarded (with EXT_HOLE); not an NBD flag.
EXT_UNREADABLE: Final[int] = int(lib.FL_EXT_UNREADABLE)
EXT_DIRTY: Final[int] = int(lib.FL_EXT_DIRTY)
#: The commands ``struct fl_file_stats`` counts, by index (NBD's names).
FILE_COMMANDS: Final[tuple[str, ...]] = (
    "read", "write", "write_zeroes", "trim", "flush", "cache", "block_status")
assert len(FILE_COMMANDS) == int(lib.FL_CMDS)
assert int(lib.FL_CMD_BLOCK_STATUS) == FILE_COMMANDS.index("block_status")

#: ``recovered`` values of :meth:`NativeBitmap.open` (both load all dirty):
#: the file was left in use (the daemon died with it open), or its checksum or
#: length was wrong.
RECOVERED_IN_USE: Final[int] = 1
RECOVERED_CORRUPT: Final[int] = 2
#: ``recovered`` of a file made for a disk of another size: resized, the bits
#: of the common part kept and the granules past the old end dirty.
RECOVERED_RESIZED: Final[int] = 3

#: Upper bound on one extents() answer, so allocation never follows the caller.
MAX_EXTENTS: Final[int] = 1 << 20
#: Session cluster size limits, from fleeced.h (a power of two in between).
CLUSTER_MIN: Final[int] = int(lib.FL_CLUSTER_MIN)
CLUSTER_MAX: Final[int] = int(lib.FL_CLUSTER_MAX)
_GRANULARITY_MIN: Final[int] = 512
_GRANULARITY_MAX: Final[int] = 1 << 30
_I64_MAX: Final[int] = (1 << 63) - 1
_U64_MAX: Final[int] = (1 << 64) - 1

Buffer = bytes | bytearray | memoryview


def _check(rc: int) -> None:
    """Turn a C return code into an exception.

    :param rc: ``0`` or ``-errno`` from a ``fl_*`` call.
    :raise OSError: with ``errno == -rc`` when ``rc < 0``.
    """
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))


def _einval(what: str) -> OSError:
    return OSError(errno.EINVAL, f"{os.strerror(errno.EINVAL)}: {what}")


def _check_header(header: bytes, empty_ok: bool = False) -> None:
    """A reply header a worker may send: 1..32 bytes (C copies it), or none
    (EMPTY_OK) for a piece of a READ reply whose header went out before."""
    if not isinstance(header, bytes) or not (0 if empty_ok else 1) <= len(header) <= 32:
        raise _einval("header must be 1..32 bytes" + (" or none" if empty_ok else ""))


def _uint(name: str, value: object) -> int:
    """Police one integer argument: a real int (not bool), ``0 <= value < 2**64``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")
    if value < 0 or value > _U64_MAX:
        raise _einval(f"{name}={value}")
    return value


def _range(off: object, length: object, size: int) -> tuple[int, int]:
    """Police an (offset, length) pair against an object of SIZE bytes."""
    # Every request passes here: the common case in one test (exact ints,
    # so no bool; SIZE < 2**64 bounds both), the rest for its error.
    if type(off) is int and type(length) is int and 0 <= off and 0 <= length \
            and off + length <= size:
        return off, length
    o = _uint("off", off)
    n = _uint("length", length)
    if o + n > size:
        raise _einval(f"range {o}+{n} beyond size {size}")
    return o, n


def _read(
    fn: Any, handle: Any, off: object, length: object, size: int, *, holes: bool = True
) -> tuple[int, bytearray, bool]:
    """Police the range, then FN(handle, buf, n, off, &hole) into a new buffer.

    :param holes: ask C for hole detection (else it gets NULL and does none).
    :raise OSError: ``EINVAL`` for a bad range (before any C call).
    :return: ``(rc, data, is_hole)``; the caller checks ``rc``.
    """
    o, n = _range(off, length, size)
    buf = bytearray(n)
    hole = ffi.new("int *") if holes else ffi.NULL
    rc = int(fn(handle, ffi.from_buffer("uint8_t[]", buf, require_writable=True), n, o, hole))
    return rc, buf, bool(holes and hole[0])


def _fault(err: int, n: int) -> tuple[int, int]:
    """Police a test hook's (errno, count): ``err > 0`` unless ``n == 0``, both int32."""
    e = _uint("err", err)
    k = _uint("n", n)
    if k > 0x7FFFFFFF or e > 0x7FFFFFFF or (k > 0 and e == 0):
        raise _einval(f"err={e} n={k}")
    return e, k


def _closed() -> OSError:
    return OSError(errno.EBADF, "native object is closed")


def _extents(
    fn: Any, handle: Any, off: int, length: int, max_extents: int
) -> list[tuple[int, int]]:
    m = _uint("max_extents", max_extents)
    if m < 1 or m > MAX_EXTENTS:
        raise _einval(f"max_extents={m}")
    lens = ffi.new("uint64_t[]", m)
    flags = ffi.new("uint32_t[]", m)
    n = ffi.new("size_t *")
    _check(fn(handle, off, length, lens, flags, m, n))
    return [(int(lens[i]), int(flags[i])) for i in range(n[0])]


class _Handle:
    """A C object behind a cffi pointer; ``_h`` is ``None`` once closed."""

    __slots__ = ("_h",)

    _h: Any

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (a session also closes with its file)."""
        return self._h is None

    def _handle(self) -> Any:
        """The pointer, or OSError(EBADF) once closed."""
        if self._h is None:
            raise _closed()
        return self._h

    def close(self) -> None:
        """Give up the object (each kind says what that means)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit(failed=exc_type is not None)

    def _exit(self, failed: bool) -> None:
        """Leaving a ``with`` block (FAILED: by an exception): close."""
        self.close()


class NativeFile(_Handle):
    """A raw image (regular file or block device) behind the C data path.

    Guest writes through this object run copy-before-write for every open
    :class:`NativeSession` on it before touching the image.
    """

    __slots__ = ("_size", "_readonly", "_sessions", "_rules", "_run", "__weakref__")

    def __init__(self, handle: Any, readonly: bool) -> None:
        """Wrap an ``fl_file *``; use :meth:`open` instead."""
        self._h: Any = handle
        self._size: int = int(lib.fl_file_size(handle))
        self._readonly = readonly
        self._sessions: weakref.WeakSet[NativeSession] = weakref.WeakSet()
        # the NBD rules of read_run/write_run_check as C reads them, and
        # their result struct
        self._rules: dict[tuple[int, int, int, int, bool], Any] = {}
        self._run: Any = ffi.new("struct fl_run *")

    @classmethod
    def open(cls, path: str, *, readonly: bool) -> NativeFile:
        """Open PATH (read-only or read-write).

        :param path: a regular file or a block device.
        :param readonly: open ``O_RDONLY``; writes then fail with ``EROFS``.
        :raise TypeError: when PATH is not a str.
        :raise OSError: ``EISDIR`` for a directory, ``EINVAL`` for anything but
            a regular file or block device, or the ``open(2)`` error.
        :return: the open file.
        """
        if not isinstance(path, str):
            raise TypeError(f"path must be str, not {type(path).__name__}")
        out = ffi.new("fl_file **")
        _check(lib.fl_file_open(os.fsencode(path), int(bool(readonly)), out))
        return cls(ffi.gc(out[0], lib.fl_file_close), bool(readonly))

    @classmethod
    def open_nbd(cls, uri: str, *, readonly: bool) -> NativeFile:
        """Open the NBD export at URI as a disk's source (an *upstream*):
        every operation goes to it over libnbd, each bounded in time.

        :param uri: ``nbd+unix:///EXPORT?socket=PATH`` or ``nbd://HOST[:PORT]/EXPORT``.
        :raise TypeError: when URI is not a str.
        :raise OSError: ``EROFS`` when the export is read-only and READONLY
            is false, ``EINVAL`` for a URI libnbd does not take, or the
            connect's error (``ECONNREFUSED``, ``ENOENT``, ``ETIMEDOUT``...).
        """
        if not isinstance(uri, str):
            raise TypeError(f"uri must be str, not {type(uri).__name__}")
        if "\0" in uri:
            raise _einval("uri has a NUL byte")
        out = ffi.new("fl_file **")
        _check(lib.fl_file_open_nbd(uri.encode(), int(bool(readonly)), out))
        return cls(ffi.gc(out[0], lib.fl_file_close), bool(readonly))

    @classmethod
    def open_nbd_lazy(cls, uri: str, size: int, *, readonly: bool) -> NativeFile:
        """:meth:`open_nbd` for an export that is not there yet: nothing is
        connected now; the first request connects (and fails ``EIO`` while
        nothing listens at URI, or the export there is not SIZE bytes).

        :raise TypeError: on wrongly typed arguments.
        :raise OSError: ``EINVAL`` for a NUL in URI or a size out of range.
        """
        if not isinstance(uri, str):
            raise TypeError(f"uri must be str, not {type(uri).__name__}")
        if "\0" in uri:
            raise _einval("uri has a NUL byte")
        n = _uint("size", size)
        if n > _I64_MAX:
            raise _einval(f"size={n}")
        out = ffi.new("fl_file **")
        _check(lib.fl_file_open_nbd_lazy(uri.encode(), n, int(bool(readonly)), out))
        return cls(ffi.gc(out[0], lib.fl_file_close), bool(readonly))

    def set_direct(self, on: bool) -> None:
        """cache=none (ON) or writeback: whether whole 4096-byte blocks are
        read and written around the host page cache (O_DIRECT).

        :raise OSError: ``EINVAL`` for an NBD upstream or a filesystem
            without O_DIRECT, ``EBADF`` closed.
        """
        _check(lib.fl_file_set_direct(self._handle(), int(bool(on))))

    @property
    def direct(self) -> bool:
        """Whether cache=none applies now."""
        return bool(lib.fl_file_is_direct(self._handle()))

    @property
    def size(self) -> int:
        """Size in bytes, fixed at open."""
        return self._size

    @property
    def readonly(self) -> bool:
        """Whether the file was opened read-only."""
        return self._readonly

    @property
    def upstream(self) -> bool:
        """Whether the source is an NBD upstream (no page cache, no sendfile)."""
        return bool(lib.fl_file_is_upstream(self._handle()))

    @property
    def source_error(self) -> int:
        """The errno of the upstream's last lost connection or timed-out
        command, 0 while it answers (always 0 for a file)."""
        return int(lib.fl_file_source_error(self._handle()))

    def stats(self) -> FileStats:
        """What was asked of the image so far, by every caller (both data
        planes count in C).  Atomic loads only: safe on the event loop.

        :raise OSError: ``EBADF`` when closed.
        """
        st = ffi.new("struct fl_file_stats *")
        lib.fl_file_stats(self._handle(), st)
        return FileStats(
            requests={name: int(st.requests[i]) for i, name in enumerate(FILE_COMMANDS)},
            bytes={name: int(st.bytes[i]) for i, name in enumerate(FILE_COMMANDS)},
            errors={e: int(st.errors[e]) for e in range(int(lib.FL_ERRNO_SLOTS))
                    if st.errors[e]},
            write_latency=_latency(st.write_latency),
            flush_latency=_latency(st.flush_latency),
        )

    @property
    def identity(self) -> tuple[str, int, int]:
        """What was opened, as fstat saw it at open: ``("blk", st_rdev, 0)``
        for a block device, ``("file", st_dev, st_ino)`` for a file.  Every
        path to one source (symlinks, hard links, device nodes) gives the
        same value."""
        blk = ffi.new("int *")
        dev = ffi.new("uint64_t *")
        ino = ffi.new("uint64_t *")
        lib.fl_file_identity(self._handle(), blk, dev, ino)
        return ("blk" if blk[0] else "file", int(dev[0]), int(ino[0]))


    def read(self, off: int, length: int) -> tuple[bytearray, bool]:
        """Read LENGTH bytes at OFF.

        :raise OSError: ``EINVAL`` out of range, ``EIO`` on a short read, ``EBADF``
            when closed, or the ``pread(2)`` error.
        :return: ``(data, is_hole)``; ``is_hole`` when the whole range is a hole
            (data is then zeros).
        """
        rc, buf, hole = _read(lib.fl_file_read, self._handle(), off, length, self._size)
        _check(rc)
        return buf, hole

    def read_nowait(self, off: int, length: int) -> tuple[bytearray, bool] | None:
        """Read from the page cache only (``RWF_NOWAIT``); safe on the event loop.

        :raise OSError: as :meth:`read`, except that data not in the page cache is
            no error.
        :return: ``(data, False)`` (holes are not detected here), or ``None`` when
            the read would block.
        """
        # No hole detection here: lseek(SEEK_DATA) takes the inode lock, which
        # a concurrent write holds across its I/O (27.6 ms measured on the
        # loop during a 256 MiB write).  Holes have no cached pages anyway,
        # so they come back EAGAIN and the queue answers them.
        rc, buf, _ = _read(lib.fl_file_read_nowait, self._handle(), off, length, self._size,
                           holes=False)
        if rc == -errno.EAGAIN:
            return None
        _check(rc)
        return buf, False

    def read_run(self, req: bytes | bytearray, pos: int, *, size: int, allowed_flags: int,
                 max_length: int, min_block: int, structured: bool,
                 max_count: int) -> tuple[int, int, int, memoryview] | None:
        """Answer consecutive NBD READ requests of ``REQ[POS:]`` from the page
        cache (``fl_file_read_run``: never blocks, safe on the event loop).

        The rest of the arguments are the NBD engine's READ rule
        (:class:`fleeced.nbd.RunRule`; a SIZE beyond this file's counts as
        this file's) and the most requests to answer.  It stops before the first request that is
        incomplete, not an acceptable READ, or not all in the page cache.

        :raise TypeError: REQ is not bytes or a bytearray.
        :raise OSError: ``EINVAL`` for a bad POS or rule, ``EBADF`` closed.
        :return: ``(consumed, count, data_bytes, replies)``: request bytes
            used, READs answered, data bytes in their replies, and the
            replies in order; ``None`` when not even the first was answered.
        """
        h = self._handle()
        if not isinstance(req, bytes | bytearray):
            raise TypeError(f"req must be bytes or bytearray, not {type(req).__name__}")
        if type(pos) is not int or not 0 <= pos <= len(req):
            raise _einval(f"pos={pos!r}")
        rule = self._c_rule((size, allowed_flags, max_length, min_block, structured))
        run = self._run
        view = ffi.from_buffer("uint8_t[]", req)
        src = view + pos
        n = len(req) - pos
        count = _uint("max_count", max_count)
        # First how much room the replies need (no I/O), then the reads.
        _check(lib.fl_file_read_run(h, src, n, rule, count, ffi.NULL, 0, run))
        if run.count == 0:
            return None
        need = int(run.out_len)
        out = _alloc_uninit("uint8_t[]", need)
        _check(lib.fl_file_read_run(h, src, n, rule, count, out, need, run))
        if run.count == 0:
            return None
        done = int(run.out_len)
        replies = memoryview(ffi.buffer(out, done))
        if 2 * done < need:  # stopped early: do not pin the unused room
            replies = memoryview(bytes(replies))
        return int(run.consumed), int(run.count), int(run.data), replies

    def write_run_check(self, req: bytes | bytearray, pos: int, *, size: int,
                        allowed_flags: int, max_length: int, min_block: int,
                        max_count: int) -> tuple[int, int, int, bytes] | None:
        """Check consecutive NBD WRITE requests of ``REQ[POS:]`` with their
        payload complete, under the engine's WRITE rule (as for
        :meth:`read_run`), for :meth:`NativeQueue.submit_write_run`; no I/O.

        :raise TypeError: REQ is not bytes or a bytearray.
        :raise OSError: ``EINVAL`` for a bad POS or rule, ``EBADF`` closed.
        :return: ``(consumed, count, data_bytes, acks)``: request bytes
            accepted (headers and payloads), their count, payload bytes, and
            their success replies in order; ``None`` when not even the first
            was accepted.
        """
        self._handle()
        if not isinstance(req, bytes | bytearray):
            raise TypeError(f"req must be bytes or bytearray, not {type(req).__name__}")
        if type(pos) is not int or not 0 <= pos <= len(req):
            raise _einval(f"pos={pos!r}")
        rule = self._c_rule((size, allowed_flags, max_length, min_block, False))
        count = _uint("max_count", max_count)
        acks = bytearray(16 * count)
        run = self._run
        view = ffi.from_buffer("uint8_t[]", req)
        _check(lib.fl_write_run_check(view + pos, len(req) - pos, rule, count,
                                      ffi.from_buffer("uint8_t[]", acks, require_writable=True),
                                      len(acks), run))
        if run.count == 0:
            return None
        return (int(run.consumed), int(run.count), int(run.data),
                bytes(acks[:int(run.out_len)]))

    def _c_rule(self, key: tuple[int, int, int, int, bool]) -> Any:
        """The C copy of an NBD rule (kept: one or two per connection)."""
        rule = self._rules.get(key)
        if rule is not None:
            return rule
        size, allowed_flags, max_length, min_block, structured = key
        for name, value in (("allowed_flags", allowed_flags), ("max_length", max_length),
                            ("min_block", min_block)):
            if _uint(name, value) > 0xFFFFFFFF:
                raise _einval(f"{name}={value}")
        rule = ffi.new("struct fl_run_rule *", {
            "size": min(_uint("size", size), self._size), "allowed_flags": allowed_flags,
            "max_length": max_length, "min_block": min_block,
            "structured": int(bool(structured)),
        })
        if len(self._rules) >= 8:  # connections to exports of other shapes
            self._rules.clear()
        self._rules[key] = rule
        return rule

    def write(self, off: int, data: Buffer, *, fua: bool = False) -> None:
        """Guest write: copy-before-write for every session, then write DATA at OFF.

        :param fua: ``fdatasync`` before returning.
        :raise TypeError: when DATA is not a bytes-like object.
        :raise OSError: ``EINVAL`` out of range, ``EROFS`` read-only, ``EBADF``
            closed, a CBW error under ``break_guest_write`` (``ENOSPC``, ``EIO``,
            ``ETIMEDOUT``, ...; the image is then untouched), or the I/O error.
        """
        h = self._handle()
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
        mv = memoryview(data)
        o, n = _range(off, mv.nbytes, self._size)
        if not mv.c_contiguous:
            raise _einval("data must be C-contiguous")
        flags = lib.FL_FUA if fua else 0
        _check(lib.fl_file_write(h, ffi.from_buffer("uint8_t[]", mv), n, o, flags))

    def zero(self, off: int, length: int, *, may_trim: bool, fast: bool, fua: bool = False) -> None:
        """Guest write-zeroes of ``[off, off+length)``.

        :param may_trim: the range may become a hole (NBD without ``NO_HOLE``).
        :param fast: fail with ``ENOTSUP`` rather than write zeros (``FAST_ZERO``).
        :param fua: ``fdatasync`` before returning.
        :raise OSError: as :meth:`write`, plus ``ENOTSUP`` with ``fast``.
        """
        h = self._handle()
        o, n = _range(off, length, self._size)
        flags = (
            (lib.FL_MAY_TRIM if may_trim else 0)
            | (lib.FL_FAST if fast else 0)
            | (lib.FL_FUA if fua else 0)
        )
        _check(lib.fl_file_zero(h, o, n, flags))

    def trim(self, off: int, length: int) -> None:
        """Guest trim (punch a hole; a no-op where unsupported).

        :raise OSError: as :meth:`write`.
        """
        h = self._handle()
        o, n = _range(off, length, self._size)
        _check(lib.fl_file_trim(h, o, n))

    def flush(self) -> None:
        """``fdatasync`` the image.

        :raise OSError: ``EBADF`` when closed, or the ``fdatasync(2)`` error.
        """
        _check(lib.fl_file_flush(self._handle()))

    @property
    def flush_error(self) -> int:
        """The sticky flush error: the first failed ``fdatasync``'s errno, or 0.

        Once set, every later flush and FUA of this file fails ``EIO`` until
        the image is reopened: a writeback error is never forgotten.

        :raise OSError: ``EBADF`` when closed.
        """
        return int(lib.fl_file_flush_error(self._handle()))

    def inject_flush_error(self, err: int, n: int) -> None:
        """Test hook: the next N ``fdatasync`` calls fail with ERR (N = 0 disables).

        :raise OSError: ``EINVAL`` for ``err <= 0`` with ``n > 0`` or huge values.
        """
        _check(lib.fl_file_inject_flush_error(self._handle(), *_fault(err, n)))

    def cache(self, off: int, length: int) -> None:
        """Prefetch hint (``posix_fadvise WILLNEED``).

        :raise OSError: ``EINVAL`` out of range, ``EBADF`` when closed.
        """
        h = self._handle()
        o, n = _range(off, length, self._size)
        _check(lib.fl_file_cache(h, o, n))

    def extents(self, off: int, length: int, max_extents: int = 1024) -> list[tuple[int, int]]:
        """Allocation map of ``[off, off+length)``.

        :param max_extents: at most this many extents (``1 .. MAX_EXTENTS``); the
            answer then may end before ``off+length``.
        :raise OSError: ``EINVAL`` out of range or bad ``max_extents``, ``EBADF``.
        :return: contiguous ``(length, flags)`` from OFF, flags of ``EXT_*``.
        """
        h = self._handle()
        o, n = _range(off, length, self._size)
        return _extents(lib.fl_file_extents, h, o, n, max_extents)

    def attach_bitmap(self, bitmap: NativeBitmap) -> None:
        """Start recording guest writes into BITMAP.

        Every later write, write-zeroes and trim that changes data marks it
        before it completes.  Blocks until guest writes in flight are done (run
        it through ``asyncio.to_thread``).  The file holds its own reference on
        the bitmap until :meth:`detach_bitmap` or its own close.

        :raise TypeError: when BITMAP is not a :class:`NativeBitmap`.
        :raise OSError: ``EINVAL`` when the sizes differ, ``EEXIST`` when already
            attached, ``EBADF`` when either is closed.
        """
        if not isinstance(bitmap, NativeBitmap):
            raise TypeError(f"bitmap must be NativeBitmap, not {type(bitmap).__name__}")
        h = self._handle()
        if bitmap.size != self._size:
            raise _einval(f"bitmap size {bitmap.size} != file size {self._size}")
        _check(lib.fl_file_bitmap_attach(h, bitmap._handle()))

    def detach_bitmap(self, bitmap: NativeBitmap) -> None:
        """Stop recording into BITMAP (it keeps its bits).  Blocks like :meth:`attach_bitmap`.

        :raise TypeError: when BITMAP is not a :class:`NativeBitmap`.
        :raise OSError: ``ENOENT`` when it is not attached, ``EBADF`` closed.
        """
        if not isinstance(bitmap, NativeBitmap):
            raise TypeError(f"bitmap must be NativeBitmap, not {type(bitmap).__name__}")
        _check(lib.fl_file_bitmap_detach(self._handle(), bitmap._handle()))

    def close(self) -> None:
        """Close the file, closing its remaining sessions first.  Idempotent.

        Gives up this object's reference: operations still queued on the file
        keep it open in C and fail ``ESHUTDOWN``.  Closing a remaining session
        here waits for guest writes in flight (use :meth:`NativeQueue.submit_close`
        on an event loop).
        """
        if self._h is None:
            return
        for s in list(self._sessions):
            s.close()
        h, self._h = self._h, None
        ffi.gc(h, None)
        lib.fl_file_close(h)



@dataclass(frozen=True, slots=True)
class SessionParams:
    """Parameters of a fleecing session.

    :ivar cluster_size: CBW granularity, a power of two from 4 KiB to 16 MiB.
    :ivar temp_dir: directory of the unlinked sparse temp file.
    :ivar cache_bytes: in-memory CBW cache budget (0: none).
    :ivar max_temp: temp file byte limit (0: unlimited); over it CBW fails ENOSPC.
    :ivar cbw_timeout: seconds a guest write may wait on CBW (0: forever).
    :ivar break_guest_write: on CBW failure fail the guest write instead of
        breaking the snapshot.
    :ivar scope: ``(offset, length)`` byte ranges; if any, only clusters they
        touch are preserved and readable.
    :ivar checkpoint_since: OLD: at the snapshot instant its bits are frozen into
        the session (:meth:`NativeSession.frozen_bitmap`), the scope becomes the
        clusters touching its dirty granules (``scope`` must then be empty), and
        it is detached from the file if attached.
    :ivar checkpoint_new: NEW: cleared and attached to the file at that same
        instant.  Neither is kept by the session.
    """

    cluster_size: int = 65536
    temp_dir: str = tempfile.gettempdir()
    cache_bytes: int = 0
    max_temp: int = 0
    cbw_timeout: float = 45.0
    break_guest_write: bool = False
    scope: tuple[tuple[int, int], ...] = ()
    checkpoint_since: NativeBitmap | None = None
    checkpoint_new: NativeBitmap | None = None


@dataclass(frozen=True, slots=True)
class SessionStats:
    """Counters of a session (see ``struct fl_session_stats``).

    ``clusters_needed``/``clusters_copied``/``clusters_zero`` count clusters
    currently in that state (ZERO: a hole of the source, nothing stored; all
    go back to needed when the snapshot breaks); ``cbw_count`` counts clusters
    copied (holes not); ``temp_bytes`` is what the temp file holds now,
    ``temp_bytes_allocated`` what it occupies on disk, ``temp_bytes_written``
    all it was ever written.
    """

    clusters_total: int
    clusters_needed: int
    clusters_copied: int
    clusters_zero: int
    clusters_discarded: int
    temp_bytes: int
    temp_bytes_allocated: int
    temp_bytes_written: int
    cache_bytes: int
    cbw_count: int
    cbw_bytes: int
    read_temp_bytes: int
    read_cache_bytes: int
    read_source_bytes: int
    read_retries: int
    discarded_bytes: int
    broken: bool
    broken_errno: int
    #: Guest writes' time in this session's copy-before-write (those that
    #: copied or waited for a copy).
    cbw_latency: Latency


@dataclass(frozen=True, slots=True)
class Latency:
    """A latency histogram of the C data path (``struct fl_latency``).

    ``buckets[i]`` counts observations under ``2**i`` microseconds and, for
    ``i > 0``, from ``2**(i-1)``; the last bucket has no upper bound.
    """

    count: int
    sum_seconds: float
    buckets: tuple[int, ...]

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound in seconds, observations at or under it), the last
        bound ``inf``: the shape of a Prometheus histogram."""
        out: list[tuple[float, int]] = []
        total = 0
        last = len(self.buckets) - 1
        for i, n in enumerate(self.buckets):
            total += n
            out.append((float("inf") if i == last else 2.0 ** i / 1e6, total))
        return out


def _latency(c: Any) -> Latency:
    return Latency(count=int(c.count), sum_seconds=int(c.sum_ns) / 1e9,
                   buckets=tuple(int(c.buckets[i]) for i in range(int(lib.FL_LAT_BUCKETS))))


@dataclass(frozen=True, slots=True)
class FileStats:
    """What was asked of an image (see ``struct fl_file_stats``): calls and
    bytes by command (:data:`FILE_COMMANDS`), failures by errno (0: an errno
    beyond the table), write and flush latency.  Counters only grow."""

    requests: dict[str, int]
    bytes: dict[str, int]
    errors: dict[int, int]
    write_latency: Latency
    flush_latency: Latency


def _read_kind(target: NativeFile | NativeSession, piece: bool) -> tuple[int, int]:
    """The op kind and flags of a read of TARGET (PIECE only counts for
    the image: a session's reads are counted by the session)."""
    if isinstance(target, NativeFile):
        return int(lib.FL_OP_READ), int(lib.FL_PIECE) if piece else 0
    return int(lib.FL_OP_SNAP_READ), 0


def _params_struct(file: NativeFile, p: SessionParams) -> tuple[Any, list[Any]]:
    """Police P and build ``struct fl_session_params`` plus the cdata keeping it alive."""
    cs = _uint("cluster_size", p.cluster_size)
    if cs < CLUSTER_MIN or cs > CLUSTER_MAX or cs & (cs - 1):
        raise _einval(f"cluster_size={cs}")
    if not isinstance(p.temp_dir, str) or not p.temp_dir:
        raise _einval("temp_dir")
    cache = _uint("cache_bytes", p.cache_bytes)
    max_temp = _uint("max_temp", p.max_temp)
    if isinstance(p.cbw_timeout, bool) or not isinstance(p.cbw_timeout, int | float):
        raise TypeError("cbw_timeout must be a number of seconds")
    if not p.cbw_timeout >= 0 or p.cbw_timeout > 1e9:  # also rejects NaN
        raise _einval(f"cbw_timeout={p.cbw_timeout}")
    timeout_ms = int(p.cbw_timeout * 1000)
    if p.cbw_timeout > 0 and timeout_ms == 0:
        timeout_ms = 1
    if not isinstance(p.scope, tuple) or len(p.scope) > MAX_EXTENTS:
        raise _einval("scope")
    offs: list[int] = []
    lens: list[int] = []
    for item in p.scope:
        if not isinstance(item, tuple) or len(item) != 2:
            raise _einval("scope entries are (offset, length)")
        o, n = _range(item[0], item[1], file.size)
        offs.append(o)
        lens.append(n)

    keep: list[Any] = []
    st = ffi.new("struct fl_session_params *")
    st.cluster_size = cs
    tdir = ffi.new("char[]", os.fsencode(p.temp_dir))
    keep.append(tdir)
    st.temp_dir = tdir
    st.cache_bytes = cache
    st.max_temp = max_temp
    st.cbw_timeout_ms = timeout_ms
    st.policy = lib.FL_BREAK_GUEST_WRITE if p.break_guest_write else lib.FL_BREAK_SNAPSHOT
    if offs:
        so = ffi.new("uint64_t[]", offs)
        sl = ffi.new("uint64_t[]", lens)
        keep += [so, sl]
        st.scope_off = so
        st.scope_len = sl
        st.n_scope = len(offs)
    since, new = p.checkpoint_since, p.checkpoint_new
    for name, bm in (("checkpoint_since", since), ("checkpoint_new", new)):
        if bm is not None and not isinstance(bm, NativeBitmap):
            raise TypeError(f"{name} must be NativeBitmap or None")
        if bm is not None and bm.size != file.size:
            raise _einval(f"{name} size {bm.size} != file size {file.size}")
    if since is not None and offs:
        raise _einval("checkpoint_since and scope are exclusive")
    if since is not None and since is new:
        raise _einval("checkpoint_since and checkpoint_new are the same bitmap")
    if since is not None:
        st.checkpoint_since = pin = since._pin()
        keep.append(pin)
    if new is not None:
        st.checkpoint_new = pin = new._pin()
        keep.append(pin)
    return st, keep


class NativeSession(_Handle):
    """A fleecing (copy-before-write snapshot) session on a :class:`NativeFile`.

    The snapshot is the file's data as of :meth:`open` returning.
    """

    __slots__ = ("_file", "_size", "__weakref__")

    def __init__(self, handle: Any, file: NativeFile) -> None:
        """Wrap an ``fl_session *``; use :meth:`open` instead."""
        self._h: Any = handle
        self._file = file  # the file must outlive the session
        self._size = file.size

    @classmethod
    def open(cls, file: NativeFile, params: SessionParams) -> NativeSession:
        """Start a session on FILE: the snapshot point is now.

        Waits for in-flight guest writes to finish.

        :raise TypeError: on wrongly typed parameters.
        :raise OSError: ``EINVAL`` bad parameters or scope, ``EBADF`` closed
            file, ``ENOENT``/``EACCES``/... from the temp directory.
        :return: the session.
        """
        if not isinstance(file, NativeFile):
            raise TypeError("file must be a NativeFile")
        if not isinstance(params, SessionParams):
            raise TypeError("params must be SessionParams")
        fh = file._handle()
        st, keep = _params_struct(file, params)
        out = ffi.new("fl_session **")
        _check(lib.fl_session_open(fh, st, out))
        del keep
        s = cls(ffi.gc(out[0], lib.fl_session_close), file)
        file._sessions.add(s)
        return s

    @property
    def size(self) -> int:
        """Size of the frozen view (the file's size)."""
        return self._size


    @property
    def event_fd(self) -> int:
        """An eventfd that becomes readable when the session breaks (once).

        Owned by the session: stop watching it before closing the session.

        :raise OSError: ``EBADF`` when closed.
        """
        return int(lib.fl_session_event_fd(self._handle()))

    def read(self, off: int, length: int) -> tuple[bytearray, bool]:
        """Read the frozen view.

        :raise OSError: ``EPERM`` when a cluster is out of scope or discarded,
            ``EIO`` when the snapshot is broken, ``ETIMEDOUT`` waiting on a copy,
            ``EINVAL`` out of range, ``EBADF`` closed.
        :return: ``(data, is_hole)`` as :meth:`NativeFile.read`.
        """
        rc, buf, hole = _read(lib.fl_session_read, self._handle(), off, length, self._size)
        _check(rc)
        return buf, hole

    def discard(self, off: int, length: int) -> None:
        """Done with ``[off, off+length)``: drop its copies, stop CBW there.

        Rounds inward to whole clusters (the tail cluster counts as whole when
        the range reaches the end).

        :raise OSError: ``EINVAL`` out of range, ``EBADF`` closed.
        """
        h = self._handle()
        o, n = _range(off, length, self._size)
        _check(lib.fl_session_discard(h, o, n))

    def extents(self, off: int, length: int, max_extents: int = 1024) -> list[tuple[int, int]]:
        """Block status of the frozen view, as :meth:`NativeFile.extents`.

        :raise OSError: ``EIO`` when broken, ``EINVAL``, ``EBADF``.
        """
        h = self._handle()
        o, n = _range(off, length, self._size)
        return _extents(lib.fl_session_extents, h, o, n, max_extents)

    def frozen_bitmap(self) -> NativeBitmap | None:
        """The bits of ``checkpoint_since`` at the snapshot instant (never changes).

        The result holds its own reference (:meth:`NativeBitmap.close` gives it
        up), so it stays valid after the session closes.

        :raise OSError: ``EBADF`` when closed.
        :return: a transient bitmap, or ``None`` without ``checkpoint_since``.
        """
        out = ffi.new("fl_bitmap **")
        rc = int(lib.fl_session_frozen_bitmap(self._handle(), out))
        if rc == -errno.ENOENT:
            return None
        _check(rc)
        return NativeBitmap(ffi.gc(out[0], lib.fl_bitmap_unref), owner=False)

    def stats(self) -> SessionStats:
        """Snapshot of the session's counters.

        :raise OSError: ``EBADF`` closed.
        """
        h = self._handle()
        st = ffi.new("struct fl_session_stats *")
        _check(lib.fl_session_stats(h, st))
        return SessionStats(
            clusters_total=int(st.clusters_total),
            clusters_needed=int(st.clusters_needed),
            clusters_copied=int(st.clusters_copied),
            clusters_zero=int(st.clusters_zero),
            clusters_discarded=int(st.clusters_discarded),
            temp_bytes=int(st.temp_bytes),
            temp_bytes_allocated=int(st.temp_bytes_allocated),
            temp_bytes_written=int(st.temp_bytes_written),
            cache_bytes=int(st.cache_bytes),
            cbw_count=int(st.cbw_count),
            cbw_bytes=int(st.cbw_bytes),
            read_temp_bytes=int(st.read_temp_bytes),
            read_cache_bytes=int(st.read_cache_bytes),
            read_source_bytes=int(st.read_source_bytes),
            read_retries=int(st.read_retries),
            discarded_bytes=int(st.discarded_bytes),
            broken=bool(st.broken),
            broken_errno=int(st.broken_errno),
            cbw_latency=_latency(st.cbw_latency),
        )

    def progress(self) -> tuple[int, int]:
        """Backup progress: ``(read_bytes, total_bytes)``.

        ``read_bytes`` counts the clusters a successful snapshot read touched at
        least once (a whole cluster when any byte of it was read; the disk's
        short tail cluster its own bytes); ``total_bytes`` is the scope at the
        snapshot point (the disk, or the ``scope``/``checkpoint_since``
        clusters).  Discard counts nothing; block status only through
        :meth:`note_zero`.  Lock-free in C: safe on the event loop.

        :raise OSError: ``EBADF`` closed.
        """
        read = ffi.new("uint64_t *")
        total = ffi.new("uint64_t *")
        _check(lib.fl_session_progress(self._handle(), read, total))
        return int(read[0]), int(total[0])

    def note_zero(self, off: int, length: int) -> None:
        """Count the whole clusters of ``[off, off+length)`` as read: a
        ``base:allocation`` reply told the client they read as zeros, so a
        backup that follows the map skips them.  Takes the session's mutex
        only (never held across I/O): safe on the event loop.

        :raise OSError: ``EINVAL`` outside the disk, ``EBADF`` closed.
        """
        h = self._handle()
        o, n = _range(off, length, self._size)
        _check(lib.fl_session_note_zero(h, o, n))

    def cluster_state(self, off: int) -> int:
        """State (``NOT_NEEDED``/``NEEDED``/``COPYING``/``COPIED``/``ZERO``) of the cluster at OFF.

        :raise OSError: ``EINVAL`` when OFF is not below the size, ``EBADF``.
        """
        h = self._handle()
        o = _uint("off", off)
        if o >= self._size:
            raise _einval(f"off={o} not below size {self._size}")
        out = ffi.new("int *")
        _check(lib.fl_session_cluster_state(h, o, out))
        return int(out[0])

    def check_read(self, off: int, length: int) -> None:
        """Whether a read of the range would succeed as far as the session can
        tell now (without I/O; safe on the event loop).

        :raise OSError: ``EIO`` broken, ``EPERM`` a cluster outside the scope
            or discarded, ``EINVAL`` out of range, ``EBADF`` closed.
        """
        o, n = _range(off, length, self._size)
        _check(lib.fl_session_readable(self._handle(), o, n))

    def break_(self, err: int) -> None:
        """Break the snapshot now with ERR (a positive errno), as a failed copy
        would under break-snapshot: for a copy-before-write another process
        runs, once it can no longer reach this session.

        :raise OSError: ``EINVAL`` for ``err <= 0``, ``EBADF`` closed.
        """
        e = _uint("err", err)
        if e == 0 or e > 4095:
            raise _einval(f"err={e}")
        _check(lib.fl_session_break(self._handle(), e))

    def inject_error(self, err: int, n: int) -> None:
        """Test hook: the next N temp-store writes fail with ERR (N = 0 disables).

        :raise OSError: ``EINVAL`` for ``err <= 0`` with ``n > 0`` or huge values.
        """
        _check(lib.fl_session_inject_error(self._handle(), *_fault(err, n)))

    def inject_delay(self, ms: int) -> None:
        """Test hook: every CBW copy of this session first sleeps MS milliseconds.

        :raise OSError: ``EINVAL`` outside 0..60000, ``EBADF`` closed.
        """
        h = self._handle()
        _check(lib.fl_session_inject_delay(h, _uint("ms", ms)))

    def close(self) -> None:
        """Detach from the file and give up this object's reference.  Idempotent.

        Blocks until guest writes in flight are done (the detach); queued
        snapshot operations keep the session alive in C and fail ``ESHUTDOWN``.
        """
        h = self._release()
        if h is not None:
            lib.fl_session_close(h)

    def _release(self) -> Any:
        """Forget the handle (no more calls through this object) and return it."""
        if self._h is None:
            return None
        h, self._h = self._h, None
        self._file._sessions.discard(self)
        ffi.gc(h, None)
        return h



def _close_unclean(h: Any) -> None:
    """Garbage-collection finalizer of an owned bitmap: close, not clean."""
    lib.fl_bitmap_close(h, 0)


class NativeBitmap(_Handle):
    """A dirty bitmap of a disk: one bit per granule, transient or in a file.

    Attached to a :class:`NativeFile` (:meth:`NativeFile.attach_bitmap`) it
    records every guest write that changes data.  Methods are synchronous;
    all but :meth:`open`, :meth:`sync`, :meth:`mark_clean` and :meth:`close`
    of a persistent bitmap work in memory (a persistent bitmap's pages may
    still fault in), except that the first bit-changing call after a
    :meth:`mark_clean` (:meth:`set`, :meth:`reset`, :meth:`clear`,
    :meth:`set_all`, :meth:`merge_from`, or a guest write) re-arms the in-use
    flag with one ``msync`` of the header before it returns.
    Owned objects come from :meth:`open` and :meth:`copy`; the one of
    :meth:`NativeSession.frozen_bitmap` only holds a reference.  An owned
    bitmap that is garbage collected unclosed is closed *not clean*.
    """

    __slots__ = ("_size", "_granularity", "_owner", "__weakref__")

    #: Orders :meth:`_pin` against :meth:`close`: cffi drops the GIL around
    #: ``fl_bitmap_ref``, so without it a close could drop the last reference
    #: (and free the bitmap) between a pin reading ``_h`` and its C ref.
    #: Held only around pointer swaps and that atomic increment.
    _pin_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, handle: Any, *, owner: bool) -> None:
        """Wrap an ``fl_bitmap *``; use :meth:`open` instead."""
        self._h: Any = handle
        self._size = int(lib.fl_bitmap_size(handle))
        self._granularity = int(lib.fl_bitmap_granularity(handle))
        self._owner = owner

    @classmethod
    def open(cls, path: str | None, size: int, granularity: int,
             create: bool) -> tuple[NativeBitmap, int]:
        """Open or create a bitmap for a disk of SIZE bytes.

        :param path: the bitmap file, or ``None`` for a transient bitmap.
        :param granularity: bytes per bit, a power of two from 512 B to 1 GiB.
        :param create: create PATH (all clean; it must not exist) instead of
            loading it.  Ignored for a transient bitmap.
        :raise TypeError: on wrongly typed arguments.
        :raise OSError: ``EINVAL`` bad granularity or size, or PATH is not a
            bitmap of this granularity; ``EEXIST`` on create when PATH
            exists; ``EBUSY`` when another open holds PATH; ``ENOENT`` and other
            ``open(2)``/``mmap(2)`` errors.
        :return: ``(bitmap, recovered)``; ``recovered`` is 0, or
            :data:`RECOVERED_IN_USE` / :data:`RECOVERED_CORRUPT` when the file was
            loaded all dirty, :data:`RECOVERED_RESIZED` when it was made for a
            disk of another size (resized, the new area dirty).
        """
        if path is not None and not isinstance(path, str):
            raise TypeError(f"path must be str or None, not {type(path).__name__}")
        n = _uint("size", size)
        g = _uint("granularity", granularity)
        if n > _I64_MAX:
            raise _einval(f"size={n}")
        if g < _GRANULARITY_MIN or g > _GRANULARITY_MAX or g & (g - 1):
            raise _einval(f"granularity={g}")
        out = ffi.new("fl_bitmap **")
        rec = ffi.new("int *")
        cpath = ffi.NULL if path is None else os.fsencode(path)
        _check(lib.fl_bitmap_open(cpath, n, g, int(bool(create)), out, rec))
        return cls(ffi.gc(out[0], _close_unclean), owner=True), int(rec[0])

    @property
    def size(self) -> int:
        """Size of the disk in bytes."""
        return self._size

    @property
    def granularity(self) -> int:
        """Bytes per bit."""
        return self._granularity


    def _pin(self) -> Any:
        """A new C reference on the bitmap, given up when the result is collected.

        Safe against a concurrent :meth:`close` in another thread: the
        reference is taken before the close gives up this object's one, or
        the pin fails ``EBADF``.

        :raise OSError: ``EBADF`` when closed.
        """
        with self._pin_lock:
            h = self._handle()
            lib.fl_bitmap_ref(h)
        return ffi.gc(ffi.cast("fl_bitmap *", h), lib.fl_bitmap_unref)

    def close(self, clean: bool = False) -> None:
        """Give up this object's reference.  Idempotent.

        For the owner of a persistent bitmap, CLEAN says how the file is put
        away once the last reference goes (files it is still attached to keep
        it alive and recording): clean = sync the bits, write the checksum and
        clear the in-use flag; not clean = leave the header as it is: in use,
        so the next :meth:`open` loads it all dirty, unless a
        :meth:`mark_clean` cleared it and no bit changed since.  Clean-up I/O
        may run here.
        """
        with self._pin_lock:  # see _pin_lock
            if self._h is None:
                return
            h, self._h = self._h, None
        ffi.gc(h, None)
        if self._owner:
            lib.fl_bitmap_close(h, int(bool(clean)))
        else:
            lib.fl_bitmap_unref(h)

    def sync(self) -> None:
        """``msync`` the bits of a persistent bitmap (no-op when transient); blocks.

        :raise OSError: ``EBADF`` when closed, or the ``msync(2)`` error.
        """
        _check(lib.fl_bitmap_sync(self._handle()))

    def mark_clean(self) -> None:
        """Put a persistent bitmap away cleanly while it stays open; blocks.

        ``msync`` the bits, write the checksum, clear the in-use flag and
        ``msync`` the header, as a clean close does, but the bitmap stays open
        and may stay attached and recording.  A crash with no bit changed since
        loads it with ``recovered`` 0; the first change after it sets the
        in-use flag again (durably) before it returns, so a crash after that
        loads it all dirty.  Safe against concurrent guest writes and a
        concurrent :meth:`close`.  A no-op for a transient bitmap.  The daemon
        runs it in a thread (``asyncio.to_thread``).

        :raise OSError: ``EBADF`` when closed, or the ``msync(2)`` error (the
            in-use flag then stays set).
        """
        # Pinned: a close on the loop thread must not free it mid-call.
        _check(lib.fl_bitmap_mark_clean(self._pin()))

    def set(self, off: int, length: int) -> None:
        """Mark dirty every granule that ``[off, off+length)`` touches.

        :raise OSError: ``EINVAL`` out of range, ``EBADF`` when closed, or
            the ``msync(2)`` error of a failed re-arm (the bits are set anyway).
        """
        h = self._handle()
        o, n = _range(off, length, self._size)
        _check(lib.fl_bitmap_set(h, o, n))

    def reset(self, off: int, length: int) -> None:
        """Mark clean every granule lying wholly inside ``[off, off+length)``.

        The disk's short last granule counts as whole when the range reaches
        the end; partly covered granules stay as they are.

        :raise OSError: ``EINVAL`` out of range, ``EBADF`` when closed, or
            the ``msync(2)`` error of a failed re-arm (the bits are reset anyway).
        """
        h = self._handle()
        o, n = _range(off, length, self._size)
        _check(lib.fl_bitmap_reset(h, o, n))

    def clear(self) -> None:
        """Mark everything clean.

        :raise OSError: ``EBADF`` when closed, or the ``msync(2)`` error of a
            failed re-arm (cleared anyway).
        """
        _check(lib.fl_bitmap_clear(self._handle()))

    def set_all(self) -> None:
        """Mark everything dirty.

        :raise OSError: ``EBADF`` when closed, or the ``msync(2)`` error of a
            failed re-arm (set anyway).
        """
        _check(lib.fl_bitmap_set_all(self._handle()))

    def merge_from(self, other: NativeBitmap) -> None:
        """OR OTHER's bits into this bitmap.

        :raise TypeError: when OTHER is not a :class:`NativeBitmap`.
        :raise OSError: ``EINVAL`` unless size and granularity match, ``EBADF``,
            or the ``msync(2)`` error of a failed re-arm (merged anyway).
        """
        if not isinstance(other, NativeBitmap):
            raise TypeError(f"other must be NativeBitmap, not {type(other).__name__}")
        h, oh = self._handle(), other._handle()
        if (other.size, other.granularity) != (self._size, self._granularity):
            raise _einval("merge of bitmaps with different size or granularity")
        _check(lib.fl_bitmap_merge(h, oh))

    def copy(self) -> NativeBitmap:
        """A new transient bitmap with the same geometry and bits (owned).

        :raise OSError: ``ENOMEM``, ``EBADF`` when closed.
        """
        out = ffi.new("fl_bitmap **")
        _check(lib.fl_bitmap_copy(self._handle(), out))
        return NativeBitmap(ffi.gc(out[0], _close_unclean), owner=True)

    def count(self) -> int:
        """Dirty bytes (dirty granules times the granularity, the last one clamped).

        :raise OSError: ``EBADF`` when closed.
        """
        # Pinned: the daemon may call this in a thread while the loop closes it.
        return int(lib.fl_bitmap_count(self._pin()))

    def extents(self, off: int, length: int,
                max_extents: int = 1024) -> list[tuple[int, bool]]:
        """Dirty map of ``[off, off+length)``, clamped to the disk end.

        :param max_extents: at most this many extents (``1 .. MAX_EXTENTS``); the
            answer then may end early.
        :raise OSError: ``EINVAL`` when OFF is beyond the size or bad
            ``max_extents``, ``EBADF`` when closed.
        :return: contiguous ``(length, dirty)`` runs from OFF, neighbours
            merged; at least one when ``off < size`` and ``length > 0``.
        """
        h = self._pin()  # may run in a thread while the loop closes this object
        o = _uint("off", off)
        n = _uint("length", length)
        if o > self._size:
            raise _einval(f"off={o} beyond size {self._size}")
        return [(ln, bool(fl & EXT_DIRTY))
                for ln, fl in _extents(lib.fl_bitmap_extents, h, o, n, max_extents)]

    def _exit(self, failed: bool) -> None:
        self.close(clean=not failed)  # an exception: put away not clean


_alloc_uninit = ffi.new_allocator(should_clear_after_alloc=False)

#: Operation kinds of :class:`NativeQueue` (``FL_OP_*``).
OP_ZERO: int = lib.FL_OP_ZERO
OP_TRIM: int = lib.FL_OP_TRIM
OP_FLUSH: int = lib.FL_OP_FLUSH
OP_CACHE: int = lib.FL_OP_CACHE
OP_SNAP_DISCARD: int = lib.FL_OP_SNAP_DISCARD
OP_READ: int = lib.FL_OP_READ
OP_WRITE: int = lib.FL_OP_WRITE
OP_SNAP_READ: int = lib.FL_OP_SNAP_READ
OP_SESSION_OPEN: int = lib.FL_OP_SESSION_OPEN
OP_SNAP_PUT: int = lib.FL_OP_SNAP_PUT

#: Flags for :meth:`NativeQueue.submit` / :meth:`NativeQueue.submit_write`.
FLAG_FUA: int = lib.FL_FUA
FLAG_MAY_TRIM: int = lib.FL_MAY_TRIM
FLAG_FAST: int = lib.FL_FAST

_NO_OBJECT_OPS = frozenset({lib.FL_OP_FLUSH})
_FILE_OPS = frozenset({lib.FL_OP_ZERO, lib.FL_OP_TRIM, lib.FL_OP_FLUSH, lib.FL_OP_CACHE})
_SESSION_OPS = frozenset({lib.FL_OP_SNAP_DISCARD})


class NativeQueue(_Handle):
    """C worker threads with an eventfd completion ring.

    Submitting never blocks; completions are collected with :meth:`reap` when
    :attr:`fd` is readable (an event loop watches it).  The queue keeps every
    submitted buffer (and its cffi handle) alive until its id is reaped, which
    is what lets C hold the pointer across the call boundary.  The caller
    keeps files and sessions open until their operations are reaped.
    """

    __slots__ = ("_keep", "_ids", "_rcs", "_bits", "_n", "_max")

    def __init__(self, threads: int) -> None:
        """Start THREADS (1..64) worker threads.

        :raise OSError: ``EINVAL`` for a bad thread count, or thread/eventfd
            creation errors.
        """
        n = _uint("threads", threads)
        out = ffi.new("fl_queue **")
        _check(lib.fl_queue_open(n, out))
        self._h: Any = out[0]
        self._keep: dict[int, Any] = {}
        self._max = 1024
        self._ids = ffi.new("uint64_t[]", self._max)
        self._rcs = ffi.new("int32_t[]", self._max)
        self._bits = ffi.new("int32_t[]", self._max)
        self._n = ffi.new("size_t *")

    @property
    def fd(self) -> int:
        """The eventfd to watch for readability."""
        if self._h is None:
            raise _closed()
        return int(lib.fl_queue_fd(self._h))

    def submit_read(self, op_id: int, target: NativeFile | NativeSession, off: int,
                    length: int, *, piece: bool = False) -> memoryview:
        """Queue a read of TARGET (the image, or a session's frozen view).
        PIECE: a later piece of one READ of the image streamed in pieces (its
        bytes count in :meth:`NativeFile.stats`, not another request).

        :raise OSError: ``EINVAL`` out of range, ``EBADF`` closed target,
            ``ESHUTDOWN`` when the queue is closing.
        :return: the buffer the data will land in once OP_ID is reaped.
        """
        h = self._handle()
        th = target._handle()
        o, n = _range(off, length, target.size)
        # Uninitialized: C overwrites every byte before the buffer is read,
        # so skip bytearray's memset (large reads are memory-bound).
        cbuf = _alloc_uninit("uint8_t[]", n)
        buf = memoryview(ffi.buffer(cbuf))
        kind, flags = _read_kind(target, piece)
        _check(lib.fl_queue_submit(h, op_id, kind, th, cbuf, n, o, flags))
        self._keep[op_id] = cbuf
        return buf

    def submit_read_send(self, op_id: int, target: NativeFile | NativeSession, off: int,
                         length: int, sock: NativeSock, header: bytes, *,
                         piece: bool = False) -> memoryview:
        """Queue a read whose reply (HEADER + data) a worker writes to SOCK
        (PIECE as for :meth:`submit_read`).

        The worker sends only what the socket takes without waiting.  The
        completion says what happened: ``rc < 0`` without :data:`DONE_SENT`, a
        read error; :data:`DONE_HOLE`, a hole, nothing sent; :data:`DONE_DEFER`,
        SOCK was stalled when the read started: nothing read or sent (submit
        it again once resumed); no bits, nothing
        sent (the data is in the returned buffer); :data:`DONE_SENT` with
        ``rc == 0``, all sent; :data:`DONE_SENT` with ``rc > 0``, only ``rc``
        bytes of HEADER + data were sent and SOCK is stalled until
        :meth:`NativeSock.resume`; :data:`DONE_SENT` with ``rc < 0``, the send
        failed part way.

        :raise OSError: ``EINVAL`` out of range or bad header, ``EBADF`` closed.
        :return: the buffer the data lands in.
        """
        h = self._handle()
        th = target._handle()
        sh = sock._handle()
        o, n = _range(off, length, target.size)
        _check_header(header, empty_ok=True)
        cbuf = _alloc_uninit("uint8_t[]", n)
        kind, flags = _read_kind(target, piece)
        _check(lib.fl_queue_submit_send(h, op_id, kind, th, cbuf, n, o, sh, header,
                                        len(header), flags))
        self._keep[op_id] = cbuf
        return memoryview(ffi.buffer(cbuf))

    def submit_write(self, op_id: int, file: NativeFile, off: int, data: Buffer,
                     flags: int = 0, sock: NativeSock | None = None,
                     header: bytes = b"") -> None:
        """Queue a guest write (copy-before-write runs in the worker).

        With SOCK, the worker writes the reply (HEADER alone) to SOCK once
        the write succeeded, never waiting on it; the completion bits say
        what was sent, as for :meth:`submit_read_send`.

        :raise OSError: ``EINVAL`` out of range, bad flags or header,
            ``EROFS`` read-only file, ``EBADF`` closed, ``ESHUTDOWN`` closing.
        """
        h = self._handle()
        fh = file._handle()
        view = memoryview(data)
        o, n = _range(off, view.nbytes, file.size)
        if file.readonly:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        if flags & ~int(lib.FL_FUA):
            raise _einval(f"write flags {flags:#x}")
        cbuf = ffi.from_buffer("uint8_t[]", view)
        if sock is None:
            _check(lib.fl_queue_submit(h, op_id, lib.FL_OP_WRITE, fh, cbuf, n, o, flags))
        else:
            sh = sock._handle()
            _check_header(header)
            _check(lib.fl_queue_submit_send(h, op_id, lib.FL_OP_WRITE, fh, cbuf, n, o, sh,
                                            header, len(header), flags))
        self._keep[op_id] = (cbuf, view)

    def submit_put_old(self, op_id: int, session: NativeSession, off: int,
                       data: Buffer | None, length: int = 0) -> None:
        """Queue ``fl_session_put_old`` on a guest-priority worker: the old
        contents of a range, DATA, or LENGTH zeros when DATA is None.

        :raise OSError: ``EINVAL`` out of range, ``EBADF`` closed,
            ``ESHUTDOWN`` closing.
        """
        h = self._handle()
        sh = session._handle()
        if data is None:
            o, n = _range(off, length, session.size)
            _check(lib.fl_queue_submit(h, op_id, lib.FL_OP_SNAP_PUT, sh, ffi.NULL, n, o, 0))
            return
        view = memoryview(data)
        o, n = _range(off, view.nbytes, session.size)
        cbuf = ffi.from_buffer("uint8_t[]", view)
        _check(lib.fl_queue_submit(h, op_id, lib.FL_OP_SNAP_PUT, sh, cbuf, n, o, 0))
        self._keep[op_id] = (cbuf, view)

    def submit_write_run(self, op_id: int, file: NativeFile, req: bytes, count: int) -> Any:
        """Queue COUNT WRITE requests (headers and payloads, as
        :meth:`NativeFile.write_run_check` accepted them): a worker writes
        each (copy-before-write runs there), in order.

        :raise OSError: ``EINVAL`` bad count, ``EROFS`` read-only file,
            ``EBADF`` closed, ``ESHUTDOWN`` closing.
        :return: the ``int32_t[COUNT]`` results, valid once OP_ID is reaped:
            0 or ``-errno`` each, 1 where the operation never ran (its rc
            says why).
        """
        h = self._handle()
        fh = file._handle()
        if not isinstance(req, bytes):
            raise TypeError(f"req must be bytes, not {type(req).__name__}")
        n = _uint("count", count)
        if file.readonly:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        rcs = ffi.new("int32_t[]", [1] * n) if n else ffi.NULL
        _check(lib.fl_queue_submit_write_run(h, op_id, fh, req, len(req), n, rcs))
        self._keep[op_id] = (req, rcs)
        return rcs

    def submit(self, op_id: int, kind: int, target: NativeFile | NativeSession, off: int = 0,
               length: int = 0, flags: int = 0) -> None:
        """Queue a zero / trim / flush / cache (file) or discard (session).

        :raise OSError: ``EINVAL`` bad kind or range, ``EBADF`` closed,
            ``ESHUTDOWN`` closing.
        """
        h = self._handle()
        if kind in _FILE_OPS:
            if not isinstance(target, NativeFile):
                raise _einval("operation needs a NativeFile")
        elif kind in _SESSION_OPS:
            if not isinstance(target, NativeSession):
                raise _einval("operation needs a NativeSession")
        else:
            raise _einval(f"operation kind {kind}")
        th = target._handle()
        if kind not in _NO_OBJECT_OPS:
            off, length = _range(off, length, target.size)
        fl = _uint("flags", flags)
        _check(lib.fl_queue_submit(h, op_id, kind, th, ffi.NULL, length, off, fl))

    def submit_extents(self, op_id: int, target: NativeFile | NativeSession, off: int,
                       length: int, max_extents: int = 1024) -> Callable[[], list[tuple[int, int]]]:
        """Queue block status of TARGET (the image, or a session's frozen view).

        :raise OSError: ``EINVAL`` out of range or bad ``max_extents``, ``EBADF``
            closed, ``ESHUTDOWN`` closing.
        :return: a function that reads the extents once OP_ID was reaped with rc 0.
        """
        h = self._handle()
        th = target._handle()
        o, n = _range(off, length, target.size)
        m = _uint("max_extents", max_extents)
        if m < 1 or m > MAX_EXTENTS:
            raise _einval(f"max_extents={m}")
        lens = ffi.new("uint64_t[]", m)
        flags = ffi.new("uint32_t[]", m)
        count = ffi.new("size_t *")
        kind = lib.FL_OP_EXTENTS if isinstance(target, NativeFile) else lib.FL_OP_SNAP_EXTENTS
        _check(lib.fl_queue_submit_extents(h, op_id, kind, th, o, n, lens, flags, m, count))
        self._keep[op_id] = (lens, flags, count)

        def result() -> list[tuple[int, int]]:
            return [(int(lens[i]), int(flags[i])) for i in range(count[0])]

        return result

    def submit_open(self, op_id: int, file: NativeFile,
                    params: SessionParams) -> Callable[[], NativeSession]:
        """Queue the start of a session on FILE (it waits for guest writes in flight).

        :raise TypeError: on wrongly typed parameters.
        :raise OSError: ``EINVAL`` bad parameters, ``EBADF`` closed file,
            ``ESHUTDOWN`` closing.
        :return: a function that wraps the session once OP_ID was reaped with rc 0.
        """
        h = self._handle()
        if not isinstance(file, NativeFile) or not isinstance(params, SessionParams):
            raise TypeError("submit_open takes a NativeFile and SessionParams")
        fh = file._handle()
        st, keep = _params_struct(file, params)
        out = ffi.new("fl_session **")
        _check(lib.fl_queue_submit_open(h, op_id, fh, st, out))
        self._keep[op_id] = (st, keep, out)

        def result() -> NativeSession:
            s = NativeSession(ffi.gc(out[0], lib.fl_session_close), file)
            file._sessions.add(s)
            return s

        return result

    def submit_close(self, op_id: int, session: NativeSession) -> None:
        """Queue the close of SESSION (detach, then give up its reference).

        SESSION is unusable from here on, whatever the outcome.

        :raise OSError: ``ESHUTDOWN`` when the queue is closing (the session is
            then closed here, synchronously).
        """
        h = self._handle()
        sh = session._release()
        if sh is None:
            raise _closed()
        rc = int(lib.fl_queue_submit_close(h, op_id, sh))
        if rc < 0:
            lib.fl_session_close(sh)
            _check(rc)

    def inject_delay(self, kind: int, ms: int) -> None:
        """Test hook: every operation of KIND first sleeps MS milliseconds.

        :raise OSError: ``EINVAL`` outside 0..60000.
        """
        _check(lib.fl_queue_inject_delay(self._handle(), _uint("kind", kind), _uint("ms", ms)))

    def reap(self) -> list[tuple[int, int, int]]:
        """Collect finished operations; never blocks.

        :return: ``(op_id, rc, done)`` per completion, ``rc`` being ``0`` or
            ``-errno`` (see :func:`error_from_rc`) and ``done`` the
            :data:`DONE_HOLE` / :data:`DONE_SENT` / :data:`DONE_DEFER` bits.
        """
        h = self._handle()
        out: list[tuple[int, int, int]] = []
        while True:
            _check(lib.fl_queue_reap(h, self._ids, self._rcs, self._bits, self._max, self._n))
            n = int(self._n[0])
            keep = self._keep
            ids, rcs, bits = self._ids, self._rcs, self._bits
            for i in range(n):
                op_id = int(ids[i])
                keep.pop(op_id, None)
                out.append((op_id, int(rcs[i]), int(bits[i])))
            if n < self._max:
                return out


    def close(self) -> None:
        """Finish queued operations, stop the workers, free.  Idempotent."""
        if self._h is None:
            return
        h, self._h = self._h, None
        lib.fl_queue_close(h)
        self._keep.clear()


#: Completion bits of :meth:`NativeQueue.reap` (the third field, as int).
DONE_HOLE: int = lib.FL_DONE_HOLE
DONE_SENT: int = lib.FL_DONE_SENT
DONE_DEFER: int = lib.FL_DONE_DEFER


class NativeSock(_Handle):
    """A connection socket that queue workers write READ replies to.

    Holds its own duplicate of the descriptor, so closing the event loop's
    copy never lets a worker write into a reused descriptor number.  Workers
    never wait on it (see :meth:`NativeQueue.submit_read_send`).
    """

    __slots__ = ()

    def __init__(self, fd: int) -> None:
        """Duplicate FD.

        :raise OSError: ``EINVAL`` for a negative fd, or the ``dup`` error.
        """
        if fd < 0:
            raise _einval(f"fd={fd}")
        out = ffi.new("fl_sock **")
        _check(lib.fl_sock_open(fd, out))
        self._h: Any = out[0]


    def resume(self) -> None:
        """Let workers write again after a partial reply stalled the socket."""
        lib.fl_sock_resume(self._handle())

    def close(self) -> None:
        """Close the duplicate; no queued operation may still use it.  Idempotent."""
        if self._h is None:
            return
        h, self._h = self._h, None
        lib.fl_sock_close(h)


def error_from_rc(rc: int) -> OSError:
    """The :class:`OSError` for a negative C return code."""
    return OSError(-rc, os.strerror(-rc))


#: Metadata context kinds of :class:`NativeConn` (exports/base.py names them).
CTX_BASE_ALLOCATION: Final[int] = int(lib.FL_CTX_BASE_ALLOCATION)
CTX_ALLOCATION_DEPTH: Final[int] = int(lib.FL_CTX_ALLOCATION_DEPTH)
CTX_DIRTY_BITMAP: Final[int] = int(lib.FL_CTX_DIRTY_BITMAP)
CONN_MAX_CTX: Final[int] = int(lib.FL_CONN_MAX_CTX)
#: Bytes of requests a native connection may be handed with its socket.
CONN_INITIAL_MAX: Final[int] = 256 * 1024

#: One command's rule, as engine.py builds it: (allowed flags, static NBD
#: error or None, the NBD error of a request beyond the end, maximum length).
ConnRule = tuple[int, int | None, int, int]


@dataclass(frozen=True, slots=True)
class ConnStats:
    """What a native connection counted (:meth:`NativeConn.stats`)."""

    requests: int
    errors: int
    bytes_read: int
    bytes_written: int
    in_flight: int
    ended: bool
    eof: bool
    reason: str
    #: READ bytes admitted in flight plus replies queued unsent.
    reply_bytes: int = 0


class NativeConn(_Handle):
    """An NBD connection's transmission phase run in C (native/src/conn*.c): from the
    handshake's end, its own thread reads, checks and dispatches requests,
    and replies are written by the thread that completed them.  The event
    loop only watches :attr:`done_fd`."""

    __slots__ = ()

    def __init__(
        self, fd: int, queue: NativeQueue, target: NativeFile | NativeSession, *,
        rules: tuple[ConnRule, ...], structured: bool, min_block: int, trim: bool,
        contexts: list[tuple[int, int, NativeBitmap | None]], initial: bytes,
    ) -> None:
        """Take over the socket FD (a dup; the caller closes its own).

        :param rules: eight rules, by command (NBD_CMD_READ first).
        :param contexts: ``(context id, CTX_* kind, bitmap or None)`` each.
        :param initial: request bytes already read from the socket.
        :raise OSError: ``EINVAL`` bad parameters; ``EBADF`` closed objects.
        """
        if fd < 0 or len(rules) != 8 or len(contexts) > CONN_MAX_CTX \
                or len(initial) > CONN_INITIAL_MAX:
            raise _einval("native connection parameters")
        p = ffi.new("struct fl_conn_params *")
        p.fd = fd
        p.queue = queue._handle()
        if isinstance(target, NativeFile):
            p.file = target._handle()
        else:
            p.session = target._handle()
        p.size = target.size
        p.min_block = _uint("min_block", min_block)
        p.structured = 1 if structured else 0
        p.trim = 1 if trim else 0
        for i, (allowed, error, range_error, max_length) in enumerate(rules):
            r = p.rules[i]
            r.allowed_flags = _uint("allowed", allowed)
            r.error = 0 if error is None else _uint("error", error)
            r.range_error = _uint("range_error", range_error)
            r.max_length = min(_uint("max_length", max_length), 0xFFFFFFFF)
        p.n_ctx = len(contexts)
        for i, (ctx_id, kind, bitmap) in enumerate(contexts):
            p.ctx_id[i] = _uint("context id", ctx_id)
            p.ctx_kind[i] = kind
            p.ctx_bitmap[i] = ffi.NULL if bitmap is None else bitmap._handle()
        buf = ffi.from_buffer("uint8_t[]", initial) if initial else ffi.NULL
        p.initial = buf
        p.initial_len = len(initial)
        out = ffi.new("fl_conn **")
        _check(lib.fl_conn_start(p, out))
        self._h: Any = out[0]

    @property
    def done_fd(self) -> int:
        """An eventfd, readable once the connection ended and nothing of it
        is in flight."""
        return int(lib.fl_conn_done_fd(self._handle()))

    def shutdown(self, replay: bool) -> None:
        """Answer what was received (ESHUTDOWN from now on), or with REPLAY
        drop new requests unanswered; close once the client sent nothing
        more.  Never blocks."""
        lib.fl_conn_shutdown(self._handle(), 1 if replay else 0)

    def abort(self) -> None:
        """Shut the socket down now (replies in flight are dropped)."""
        lib.fl_conn_abort(self._handle())

    def stats(self) -> ConnStats:
        s = ffi.new("struct fl_conn_stats *")
        lib.fl_conn_stats(self._handle(), s)
        return ConnStats(int(s.requests), int(s.errors), int(s.bytes_read),
                         int(s.bytes_written), int(s.in_flight), bool(s.ended), bool(s.eof),
                         ffi.string(s.reason).decode("utf-8", "replace"), int(s.reply_bytes))

    def close(self) -> None:
        """Give up the connection (aborted first if it has not ended).  Idempotent."""
        if self._h is None:
            return
        h, self._h = self._h, None
        lib.fl_conn_close(h)
