#!/usr/bin/python3
"""Soak client for fleeced: guest writers and snapshot readers over libnbd.

Runs under the *system* ``/usr/bin/python3``, where Debian's ``python3-libnbd``
lives (``import nbd``); everything else is stdlib.  ``bench/soak.py`` and
``tests/integration/test_soak.py`` run it as a subprocess against a running
``fleeced serve``.  It never starts or stops the daemon itself.

Subcommands:

``mkimage IMAGE --state DIR``
    Write a sparse test image (random data, allocated zeros, holes, a size that
    is not a multiple of any cluster size) and initialise the state directory:
    ``model.bin`` (what the active export must contain), ``snapref.bin`` (what
    the snapshot export must contain), ``trimmed.bin`` (one byte per snapshot
    cluster, 1 = trimmed on the snapshot) and ``state.json`` (size, cluster
    size, ranges whose contents are unknown).

``run --socket S --export E --snapshot E@fleece --state DIR``
    8 guest threads on the active export (one libnbd handle each, the export is
    CAN_MULTI_CONN) issue unaligned WRITE (some with FUA), WRITE_ZEROES with and
    without NO_HOLE, TRIM and FLUSH.  A client-side range lock keeps two
    overlapping guest operations from ever running at once, so the model stays
    byte-exact.  3 snapshot readers (one with structured replies off) read
    random ranges and compare them with ``snapref.bin``, and now and then TRIM a
    range of the snapshot (the daemon rounds inward to whole clusters, the tail
    cluster counting as whole when the range reaches the end; later reads of
    those clusters must fail with EPERM).  Snapshot reads and trims of
    overlapping ranges never run at once either (the daemon documents that race
    as unspecified).  At the end every readable byte of the snapshot and every
    byte of the active export is compared.  Every NBD call has a timeout (aio +
    poll); a call that exceeds it is a hang.  The state directory is updated so
    a later ``run`` (or the caller, on the image file) can go on checking.

``abandon --socket S --export E``
    Pipeline many reads (large ones over holes and data included), then drop
    the connection without reading the replies: exit, RST, half-close, a
    libnbd disconnect abandoning what is pending, or stall (never read again,
    until the caller kills the process).

The report is JSON, written to ``--report`` and (one line) to stdout.  ``run``
exits 0 when clean, 1 on wrong bytes, unexpected errors or hangs, 3 when the
watchdog had to give up on a stuck thread.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KiB = 1 << 10
MiB = 1 << 20
CHUNK = 8 * MiB  # verification read size (below the 32 MiB block size maximum)
MAX_NOTES = 30

# Errors that mean "the connection is gone", tolerated only when the caller
# said the daemon or the snapshot may go away during the run.
CONN_ERRNOS = {errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNRESET, errno.EPIPE,
               errno.ECONNREFUSED, errno.ENOENT, errno.ECONNABORTED}


def _nbd() -> Any:
    import nbd  # Debian python3-libnbd; only under /usr/bin/python3

    return nbd


class Hang(Exception):
    """An NBD call did not complete within its timeout."""


class Stopped(Exception):
    """The run is being wound down (another thread failed)."""


# ---------------------------------------------------------------- state directory


@dataclass
class State:
    size: int
    cluster: int
    model: bytearray
    snapref: bytearray
    trimmed: bytearray
    unknown: list[list[int]] = field(default_factory=list)

    @property
    def n_clusters(self) -> int:
        return (self.size + self.cluster - 1) // self.cluster

    @classmethod
    def load(cls, d: str) -> State:
        with open(os.path.join(d, "state.json")) as f:
            meta = json.load(f)
        def rd(name: str) -> bytearray:
            with open(os.path.join(d, name), "rb") as f:
                return bytearray(f.read())
        st = cls(meta["size"], meta["cluster"], rd("model.bin"), rd("snapref.bin"),
                 rd("trimmed.bin"), [list(u) for u in meta.get("unknown", [])])
        assert len(st.model) == len(st.snapref) == st.size, "state files disagree"
        if len(st.trimmed) != st.n_clusters:
            st.trimmed = bytearray(st.n_clusters)
        return st

    def save(self, d: str) -> None:
        def wr(name: str, data: bytes | bytearray) -> None:
            tmp = os.path.join(d, name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, os.path.join(d, name))
        wr("model.bin", self.model)
        wr("snapref.bin", self.snapref)
        wr("trimmed.bin", self.trimmed)
        wr("state.json", json.dumps({"size": self.size, "cluster": self.cluster,
                                     "unknown": self.unknown}).encode())


def count_diff(got: bytes | bytearray | memoryview, want: bytes | bytearray | memoryview
               ) -> tuple[int, int]:
    """(number of differing bytes, index of the first one); (0, -1) when equal."""
    if got == want:
        return 0, -1
    assert len(got) == len(want)
    n, first = 0, -1
    for i in range(0, len(got), 4 * MiB):
        a, b = bytes(got[i:i + 4 * MiB]), bytes(want[i:i + 4 * MiB])
        if a == b:
            continue
        x = (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")
        n += len(x) - x.count(0)
        if first < 0:
            first = i + len(x) - len(x.lstrip(b"\0"))
    return n, first


def make_image(path: str, size: int, seed: int) -> bytearray:
    """A sparse image: 256 KiB extents of random data, allocated zeros or holes."""
    rng = random.Random(seed)
    data = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        ext = 256 * KiB
        for off in range(0, size, ext):
            n = min(ext, size - off)
            r = rng.random()
            if off + n == size or r < 0.6:  # data (always at the tail)
                # a hole inside a data extent now and then (4 KiB aligned)
                chunk = bytearray(rng.randbytes(n))
                if rng.random() < 0.3 and n > 64 * KiB:
                    h0 = rng.randrange(0, n - 16 * KiB, 4 * KiB)
                    h1 = min(n, h0 + rng.randrange(4 * KiB, 64 * KiB, 4 * KiB))
                    chunk[h0:h1] = bytes(h1 - h0)
                    f.seek(off)
                    f.write(chunk[:h0])
                    f.seek(off + h1)
                    f.write(chunk[h1:])
                else:
                    f.seek(off)
                    f.write(chunk)
                data[off:off + n] = chunk
            elif r < 0.75:  # allocated zeros
                f.seek(off)
                f.write(bytes(n))
            # else: hole
    return data


# ---------------------------------------------------------------- report


class Report:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops: dict[str, int] = {}
        self.max_ms: dict[str, float] = {}
        self.wrong_bytes = 0
        self.wrong: list[str] = []
        self.errors: list[str] = []
        self.hangs: list[str] = []
        self.notes: list[str] = []
        self.flags: dict[str, Any] = {}
        self.total = 0
        self.announce = 0

    def op(self, kind: str, t0: float) -> None:
        ms = (time.monotonic() - t0) * 1000
        with self.lock:
            self.ops[kind] = self.ops.get(kind, 0) + 1
            if ms > self.max_ms.get(kind, 0.0):
                self.max_ms[kind] = ms
            self.total += 1
            if self.total == self.announce:
                print("running", flush=True)  # --announce-after: the caller may act now

    def _add(self, lst: list[str], msg: str) -> None:
        with self.lock:
            if len(lst) > MAX_NOTES:
                return
            lst.append(msg if len(lst) < MAX_NOTES else "... (more)")
        print(f"soak_client: {msg}", file=sys.stderr, flush=True)

    def mismatch(self, where: str, off: int, got: bytes | bytearray | memoryview,
                 want: bytes | bytearray | memoryview) -> bool:
        n, first = count_diff(got, want)
        if n == 0:
            return False
        with self.lock:
            self.wrong_bytes += n
        bad = off + first
        self._add(self.wrong, f"{where}: {n} wrong bytes in [{off}, +{len(got)}), first at "
                              f"{bad} (got {bytes(got[first:first + 8]).hex()}, want "
                              f"{bytes(want[first:first + 8]).hex()})")
        return True

    def error(self, msg: str) -> None:
        self._add(self.errors, msg)

    def hang(self, msg: str) -> None:
        self._add(self.hangs, msg)

    def note(self, msg: str) -> None:
        self._add(self.notes, msg)

    @property
    def failed(self) -> bool:
        return bool(self.wrong_bytes or self.errors or self.hangs)

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {"ok": not self.failed, "wrong_bytes": self.wrong_bytes,
                    "wrong": list(self.wrong), "errors": list(self.errors),
                    "hangs": list(self.hangs), "notes": list(self.notes),
                    "ops": dict(self.ops),
                    "max_ms": {k: round(v, 1) for k, v in self.max_ms.items()},
                    **self.flags}


def write_report(rep: Report, path: str | None) -> None:
    text = json.dumps(rep.as_dict())
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    print(text, flush=True)


# ---------------------------------------------------------------- range lock


class RangeLock:
    """Byte-range lock: exclusive holders exclude every overlapping holder."""

    def __init__(self, stop: threading.Event) -> None:
        self.cv = threading.Condition()
        self.held: list[tuple[int, int, bool, int]] = []
        self.stop = stop
        self.seq = 0

    def acquire(self, start: int, end: int, exclusive: bool,
                deadline: float) -> tuple[int, int, bool, int]:
        with self.cv:
            while any(s < end and start < e and (exclusive or x)
                      for s, e, x, _ in self.held):
                if self.stop.is_set():
                    raise Stopped
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Hang(f"range lock [{start}, {end}) still held by another "
                               "client operation")
                self.cv.wait(min(left, 0.2))
            self.seq += 1
            entry = (start, end, exclusive, self.seq)
            self.held.append(entry)
            return entry

    def release(self, entry: tuple[int, int, bool, int]) -> None:
        with self.cv:
            self.held.remove(entry)
            self.cv.notify_all()


# ---------------------------------------------------------------- libnbd helpers


def is_conn_error(h: Any, e: Exception) -> bool:
    nbd = _nbd()
    if isinstance(e, nbd.Error):
        if e.errnum in CONN_ERRNOS:
            return True
        try:
            return bool(h is not None and (h.aio_is_dead() or h.aio_is_closed()))
        except Exception:  # noqa: BLE001 - the handle itself may be unusable
            return True
    return False


def dead(h: Any) -> bool:
    try:
        return bool(h.aio_is_dead() or h.aio_is_closed())
    except Exception:  # noqa: BLE001
        return True


def errname(e: Exception) -> str:
    num = getattr(e, "errnum", None)
    name = errno.errorcode.get(num, str(num)) if num is not None else type(e).__name__
    return f"{name} ({e})"


def connect(sock: str, export: str, timeout: float, structured: bool = True) -> Any:
    nbd = _nbd()
    h = nbd.NBD()
    h.set_export_name(export)
    if not structured:
        h.set_request_structured_replies(False)
    h.aio_connect_unix(sock)
    deadline = time.monotonic() + timeout
    while not h.aio_is_ready():
        if time.monotonic() > deadline:
            raise Hang(f"connect to {export!r} (handshake) exceeded {timeout}s")
        h.poll(100)
    return h


def wait_cmd(h: Any, cookie: int, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not h.aio_command_completed(cookie):
        left = deadline - time.monotonic()
        if left <= 0:
            raise Hang(f"{what} got no reply within {timeout}s")
        h.poll(max(1, min(200, int(left * 1000))))


def pread(h: Any, off: int, length: int, what: str, timeout: float) -> bytearray:
    nbd = _nbd()
    buf = nbd.Buffer(length)
    wait_cmd(h, h.aio_pread(buf, off), what, timeout)
    return buf.to_bytearray()


def disconnect(h: Any, timeout: float) -> None:
    """Polite NBD_CMD_DISC with a bound; a server that never closes is a hang."""
    if h.aio_is_closed() or h.aio_is_dead():
        return
    h.aio_disconnect(0)
    deadline = time.monotonic() + timeout
    while not (h.aio_is_closed() or h.aio_is_dead()):
        if time.monotonic() > deadline:
            raise Hang(f"server did not close the connection {timeout}s after NBD_CMD_DISC")
        h.poll(100)


# ---------------------------------------------------------------- the run


@dataclass
class Ctx:
    args: argparse.Namespace
    st: State
    rep: Report
    stop: threading.Event
    end: float
    glock: RangeLock
    slock: RangeLock
    tlock: threading.Lock = field(default_factory=threading.Lock)
    trimmed_count: int = 0
    current: dict[str, tuple[str, float]] = field(default_factory=dict)
    daemon_gone: bool = False
    snapshot_gone: bool = False

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.end

    def mark_unknown(self, off: int, end: int) -> None:
        with self.tlock:
            self.st.unknown.append([off, end])


def pick_range(rng: random.Random, size: int, cs: int, big: int) -> tuple[int, int]:
    r = rng.random()
    if r < 0.45:
        length = rng.randint(1, 8 * KiB)
    elif r < 0.75:
        length = rng.randint(1, 2 * cs + 8 * KiB)
    elif r < 0.95:
        length = rng.randint(1, MiB)
    else:
        length = rng.randint(1, big)
    length = min(length, size)
    p = rng.random()
    if p < 0.12:  # the short tail cluster
        off = size - length - rng.randint(0, min(size - length, 2 * cs))
    elif p < 0.30:  # a hot spot: many operations on a few clusters
        off = rng.randint(0, min(size - length, 4 * cs))
    elif p < 0.45:  # cluster aligned, sometimes whole clusters
        off = rng.randrange(0, size - length + 1, cs) if size - length >= cs else 0
        if rng.random() < 0.5:
            length = min(size - off, cs * rng.randint(1, 3))
    else:
        off = rng.randint(0, size - length)
    return off, length


GUEST_OPS = [("write", 38), ("write-fua", 10), ("zero", 12), ("zero-nohole", 12),
             ("trim", 12), ("flush", 6), ("write-zero-data", 5), ("read", 5)]


def guest(ctx: Ctx, idx: int) -> None:
    nbd = _nbd()
    a, st, rep = ctx.args, ctx.st, ctx.rep
    rng = random.Random(a.seed * 1009 + idx)
    name = f"guest{idx}"
    kinds = [k for k, _ in GUEST_OPS]
    weights = [w for _, w in GUEST_OPS]
    try:
        h = connect(a.socket, a.export, a.op_timeout)
    except Hang as e:
        rep.hang(f"{name}: {e}")
        ctx.stop.set()
        return
    except Exception as e:  # noqa: BLE001
        if a.daemon_may_stop and is_conn_error(None, e):
            ctx.daemon_gone = True
        else:
            rep.error(f"{name}: connect: {errname(e)}")
        return
    while ctx.running():
        kind = rng.choices(kinds, weights)[0]
        t0 = time.monotonic()
        if kind == "flush":
            ctx.current[name] = ("flush", t0)
            try:
                wait_cmd(h, h.aio_flush(), f"{name} FLUSH", a.op_timeout)
                rep.op(kind, t0)
                continue
            except Hang as e:
                rep.hang(f"{name}: {e}")
                ctx.stop.set()
                return
            except nbd.Error as e:
                if a.daemon_may_stop and is_conn_error(h, e):
                    ctx.daemon_gone = True
                    return
                rep.error(f"{name}: FLUSH failed: {errname(e)}")
                if dead(h):
                    return
                continue
        off, length = pick_range(rng, st.size, st.cluster, a.max_len)
        end = off + length
        try:
            entry = ctx.glock.acquire(off, end, True, t0 + a.op_timeout)
        except Stopped:
            break
        except Hang as e:
            rep.hang(f"{name}: {e}")
            ctx.stop.set()
            break
        desc = f"{name} {kind.upper()} [{off}, +{length})"
        ctx.current[name] = (desc, t0)
        try:
            if kind in ("write", "write-fua", "write-zero-data"):
                data = bytes(length) if kind == "write-zero-data" else rng.randbytes(length)
                flags = nbd.CMD_FLAG_FUA if kind == "write-fua" else 0
                buf = nbd.Buffer.from_bytearray(bytearray(data))
                wait_cmd(h, h.aio_pwrite(buf, off, flags=flags), desc, a.op_timeout)
                st.model[off:end] = data
            elif kind in ("zero", "zero-nohole"):
                flags = nbd.CMD_FLAG_NO_HOLE if kind == "zero-nohole" else 0
                if rng.random() < 0.2:
                    flags |= nbd.CMD_FLAG_FUA
                wait_cmd(h, h.aio_zero(length, off, flags=flags), desc, a.op_timeout)
                st.model[off:end] = bytes(length)
            elif kind == "trim":
                flags = nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0
                wait_cmd(h, h.aio_trim(length, off, flags=flags), desc, a.op_timeout)
                if a.discard == "unmap":  # a punched hole reads as zeros
                    st.model[off:end] = bytes(length)
                # --discard=ignore: TRIM is dropped, the data stays
            else:  # read-your-writes on the active export
                got = pread(h, off, length, desc, a.op_timeout)
                rep.mismatch(f"{desc} (active read)", off, got, st.model[off:end])
            rep.op(kind, t0)
        except Hang as e:
            rep.hang(f"{name}: {e}")
            ctx.mark_unknown(off, end)
            ctx.stop.set()
            return  # the range lock stays held: nobody touches the range again
        except nbd.Error as e:
            ctx.mark_unknown(off, end)
            if a.daemon_may_stop and is_conn_error(h, e):
                ctx.daemon_gone = True
                ctx.glock.release(entry)
                return
            rep.error(f"{desc} failed: {errname(e)}")
            if dead(h):
                rep.error(f"{name}: connection lost")
                ctx.glock.release(entry)
                return
        ctx.glock.release(entry)
        ctx.current.pop(name, None)
    ctx.current.pop(name, None)
    try:
        disconnect(h, a.op_timeout)
    except Hang as e:
        rep.hang(f"{name}: {e}")
    except nbd.Error as e:
        if not (a.daemon_may_stop and is_conn_error(h, e)):
            rep.error(f"{name}: disconnect: {errname(e)}")


def covered_clusters(st: State, off: int, end: int) -> tuple[int, int]:
    """Clusters a snapshot TRIM of [off, end) drops: rounded inward, tail counts whole."""
    cs = st.cluster
    c0 = (off + cs - 1) // cs
    c1 = st.n_clusters if end == st.size else end // cs
    return c0, c1


def reader(ctx: Ctx, idx: int, structured: bool) -> None:
    nbd = _nbd()
    a, st, rep = ctx.args, ctx.st, ctx.rep
    rng = random.Random(a.seed * 7919 + idx)
    name = f"reader{idx}{'' if structured else '(simple)'}"
    cs = st.cluster

    def gone(h: Any, e: Exception) -> bool:
        if a.snapshot_may_vanish and is_conn_error(h, e):
            ctx.snapshot_gone = True
            return True
        if a.daemon_may_stop and is_conn_error(h, e):
            ctx.daemon_gone = True
            return True
        return False

    try:
        h = connect(a.socket, a.snapshot, a.op_timeout, structured)
    except Hang as e:
        rep.hang(f"{name}: {e}")
        ctx.stop.set()
        return
    except Exception as e:  # noqa: BLE001
        if not gone(None, e):
            rep.error(f"{name}: connect: {errname(e)}")
        return
    while ctx.running():
        t0 = time.monotonic()
        trim = (rng.random() < a.trim_rate
                and ctx.trimmed_count < a.max_trim_fraction * st.n_clusters)
        if trim:
            length = rng.randint(1, 4 * cs + 8 * KiB)
            length = min(length, st.size)
            if rng.random() < 0.15:  # reach the end: the short tail cluster counts whole
                off = st.size - length
            else:
                off = rng.randint(0, st.size - length)
        else:
            for _ in range(4):  # mostly ranges still readable; some trimmed ones (EPERM)
                r = rng.random()
                length = (rng.randint(1, 64 * KiB) if r < 0.5 else
                          rng.randint(1, 2 * MiB) if r < 0.9 else rng.randint(1, a.max_len))
                length = min(length, st.size)
                off = rng.randint(0, st.size - length)
                with ctx.tlock:
                    if not any(st.trimmed[off // cs:(off + length - 1) // cs + 1]):
                        break
        end = off + length
        try:
            entry = ctx.slock.acquire(off, end, trim, t0 + a.op_timeout)
        except Stopped:
            break
        except Hang as e:
            rep.hang(f"{name}: {e}")
            ctx.stop.set()
            break
        desc = f"{name} {'TRIM' if trim else 'READ'} {a.snapshot} [{off}, +{length})"
        ctx.current[name] = (desc, t0)
        try:
            if trim:
                wait_cmd(h, h.aio_trim(length, off), desc, a.op_timeout)
                c0, c1 = covered_clusters(st, off, end)
                with ctx.tlock:
                    for c in range(c0, c1):
                        if not st.trimmed[c]:
                            st.trimmed[c] = 1
                            ctx.trimmed_count += 1
                rep.op("snap-trim", t0)
            else:
                with ctx.tlock:
                    expect_eperm = any(st.trimmed[off // cs:(end - 1) // cs + 1])
                try:
                    got = pread(h, off, length, desc, a.op_timeout)
                except nbd.Error as e:
                    if expect_eperm and e.errnum == errno.EPERM:
                        rep.op("snap-read-eperm", t0)
                    elif gone(h, e):
                        ctx.slock.release(entry)
                        return
                    else:
                        rep.error(f"{desc} failed: {errname(e)}"
                                  + ("" if expect_eperm else " (no cluster of it was trimmed)"))
                        if dead(h):
                            ctx.slock.release(entry)
                            return
                else:
                    if expect_eperm:
                        rep.error(f"{desc} succeeded, but it covers a trimmed cluster "
                                  "(expected EPERM)")
                    rep.mismatch(desc, off, got, st.snapref[off:end])
                    rep.op("snap-read", t0)
        except Hang as e:
            rep.hang(f"{name}: {e}")
            ctx.stop.set()
            return
        except nbd.Error as e:
            if not gone(h, e):
                rep.error(f"{desc} failed: {errname(e)}")
            if gone(h, e) or dead(h):
                ctx.slock.release(entry)
                return
        ctx.slock.release(entry)
        ctx.current.pop(name, None)
    ctx.current.pop(name, None)
    try:
        disconnect(h, a.op_timeout)
    except Hang as e:
        rep.hang(f"{name}: {e}")
    except nbd.Error as e:
        if not gone(h, e):
            rep.error(f"{name}: disconnect: {errname(e)}")


def verify_active(ctx: Ctx, what: str) -> None:
    """Read the whole active export; adopt unknown ranges, then compare with the model."""
    a, st, rep = ctx.args, ctx.st, ctx.rep
    h = connect(a.socket, a.export, a.op_timeout)
    actual = bytearray()
    for off in range(0, st.size, CHUNK):
        n = min(CHUNK, st.size - off)
        actual += pread(h, off, n, f"{what}: READ {a.export} [{off}, +{n})", a.op_timeout)
    disconnect(h, a.op_timeout)
    for u0, u1 in st.unknown:
        st.model[u0:u1] = actual[u0:u1]
    if st.unknown:
        rep.note(f"{what}: adopted {len(st.unknown)} ranges left unknown by interrupted "
                 "operations")
    st.unknown.clear()
    for off in range(0, st.size, CHUNK):
        rep.mismatch(f"{what}: active export", off, actual[off:off + CHUNK],
                     st.model[off:off + CHUNK])


def verify_snapshot(ctx: Ctx) -> None:
    """Every readable byte of the snapshot equals snapref; trimmed clusters give EPERM."""
    nbd = _nbd()
    a, st, rep = ctx.args, ctx.st, ctx.rep
    cs = st.cluster
    h = connect(a.socket, a.snapshot, a.op_timeout)
    c = 0
    checked = 0
    trimmed_samples: list[int] = []
    while c < st.n_clusters:
        if st.trimmed[c]:
            if len(trimmed_samples) < 4 or random.random() < 0.02:
                trimmed_samples.append(c)
            c += 1
            continue
        c1 = c
        while c1 < st.n_clusters and not st.trimmed[c1] and (c1 - c) * cs < CHUNK:
            c1 += 1
        off, end = c * cs, min(c1 * cs, st.size)
        desc = f"final: READ {a.snapshot} [{off}, +{end - off})"
        try:
            got = pread(h, off, end - off, desc, a.op_timeout)
        except nbd.Error as e:
            rep.error(f"{desc} failed: {errname(e)}")
        else:
            rep.mismatch(desc, off, got, st.snapref[off:end])
            checked += end - off
        c = c1
    for c in trimmed_samples[:16]:
        off, end = c * cs, min((c + 1) * cs, st.size)
        desc = f"final: READ trimmed cluster {c} of {a.snapshot} [{off}, +{end - off})"
        try:
            pread(h, off, end - off, desc, a.op_timeout)
            rep.error(f"{desc} succeeded (expected EPERM)")
        except nbd.Error as e:
            if e.errnum != errno.EPERM:
                rep.error(f"{desc}: expected EPERM, got {errname(e)}")
    disconnect(h, a.op_timeout)
    rep.flags["snapshot_bytes_verified"] = checked
    rep.flags["snapshot_clusters_trimmed"] = sum(st.trimmed)


def cmd_run(a: argparse.Namespace) -> int:
    nbd = _nbd()
    st = State.load(a.state)
    rep = Report()
    rep.announce = a.announce_after
    stop = threading.Event()
    ctx = Ctx(a, st, rep, stop, 0.0, RangeLock(stop), RangeLock(stop))
    rep.flags.update(seed=a.seed, cluster=st.cluster, discard=a.discard)
    code = 0
    if a.cluster_size and a.cluster_size != st.cluster:
        if not a.fresh_snapshot:
            raise SystemExit("--cluster-size may change only with --fresh-snapshot")
        st.cluster = a.cluster_size
        st.trimmed = bytearray(st.n_clusters)
    try:
        if not a.no_pre_verify:
            verify_active(ctx, "pre-run")
        if a.fresh_snapshot:
            st.snapref[:] = st.model
            st.trimmed[:] = bytes(st.n_clusters)
        ctx.trimmed_count = sum(st.trimmed)
        ctx.end = time.monotonic() + a.seconds
        threads = [threading.Thread(target=guest, args=(ctx, i), daemon=True)
                   for i in range(a.guests)]
        if a.snapshot:
            threads += [threading.Thread(target=reader, args=(ctx, i, i != 0), daemon=True)
                        for i in range(a.readers)]
        for t in threads:
            t.start()
        hard = ctx.end + 2 * a.op_timeout + 5
        for t in threads:
            t.join(max(0.0, hard - time.monotonic()))
        stuck = [t for t in threads if t.is_alive()]
        if stuck:
            now = time.monotonic()
            for who, (desc, t0) in list(ctx.current.items()):
                rep.hang(f"watchdog: {who} stuck in {desc} for {now - t0:.1f}s")
            rep.flags["watchdog"] = True
            code = 3
        elif not ctx.daemon_gone and not rep.hangs:
            if a.snapshot and not ctx.snapshot_gone:
                try:
                    verify_snapshot(ctx)
                except nbd.Error as e:
                    if not (a.snapshot_may_vanish and is_conn_error(None, e)):
                        raise
                    ctx.snapshot_gone = True
            verify_active(ctx, "final")
            rep.flags["verified"] = True
    except Hang as e:
        rep.hang(str(e))
    except nbd.Error as e:
        if a.daemon_may_stop and is_conn_error(None, e):
            ctx.daemon_gone = True
        else:
            rep.error(f"verification: {errname(e)}")
    rep.flags.update(daemon_gone=ctx.daemon_gone, snapshot_gone=ctx.snapshot_gone,
                     unknown_ranges=len(st.unknown))
    st.save(a.state)
    write_report(rep, a.report)
    if code:
        sys.stdout.flush()
        os._exit(code)  # stuck threads hold libnbd handles; do not wait for them
    return 1 if rep.failed else 0


# ---------------------------------------------------------------- abandon


def cmd_abandon(a: argparse.Namespace) -> int:
    """Pipeline reads, then drop the connection without reading the replies."""
    nbd = _nbd()
    rng = random.Random(a.seed)
    h = connect(a.socket, a.export, 30, structured=rng.random() < 0.7)
    size = h.get_size()
    bufs = []
    for _ in range(a.count):
        r = rng.random()
        if r < a.big:
            length = rng.randint(8 * MiB, 32 * MiB)
        elif r < a.big + (1 - a.big) * 0.6:
            length = rng.randint(64 * KiB, 2 * MiB)
        else:
            length = rng.randint(1, 64 * KiB)
        length = min(length, size)
        off = rng.randint(0, size - length)
        buf = nbd.Buffer(length)
        try:
            h.aio_pread(buf, off)
        except nbd.Error:
            break  # the server went away (a fleece-stop, say): fine here
        bufs.append(buf)
    # Let some requests out and some replies start arriving, then vanish.
    for _ in range(rng.randint(1, 4)):
        try:
            h.poll(rng.choice([0, 1, 5, 20]))
        except nbd.Error:
            break
    style = a.style if a.style != "random" else rng.choice(
        ["exit", "rst", "halfclose", "disconnect", "stall"])
    print(f"abandon: {len(bufs)} reads in flight, style {style}", flush=True)
    fd = h.aio_get_fd()
    if style == "rst":
        s = socket.socket(fileno=os.dup(fd))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        os._exit(0)  # the last close of the socket sends RST (unread data, linger 0)
    elif style == "halfclose":
        s = socket.socket(fileno=os.dup(fd))
        s.shutdown(socket.SHUT_WR)
        time.sleep(rng.random() * 0.5)
        os._exit(0)
    elif style == "disconnect":
        try:
            h.aio_disconnect(0)
            h.poll(1)
        except nbd.Error:
            pass
        os._exit(0)
    elif style == "stall":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(a.stall)  # never read: the server's socket buffer stays full
        os._exit(0)
    os._exit(0)


# ---------------------------------------------------------------- CLI


def cmd_mkimage(a: argparse.Namespace) -> int:
    os.makedirs(a.state, exist_ok=True)
    data = make_image(a.image, a.size, a.seed)
    n = (a.size + a.cluster_size - 1) // a.cluster_size
    State(a.size, a.cluster_size, data, bytearray(data), bytearray(n)).save(a.state)
    return 0


def parse_size(s: str) -> int:
    units = {"K": KiB, "M": MiB, "G": 1 << 30}
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    total = 0
    for part in s.split("+"):
        part = part.strip()
        mult = units.get(part[-1:], 1)
        total += int(part[:-1] if part[-1:] in units else part) * mult
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("mkimage", help="write a test image and a fresh state dir")
    m.add_argument("image")
    m.add_argument("--state", required=True)
    m.add_argument("--size", type=parse_size, default=64 * MiB + 12 * KiB)
    m.add_argument("--seed", type=int, default=1)
    m.add_argument("--cluster-size", type=parse_size, default=64 * KiB)

    r = sub.add_parser("run", help="guests + snapshot readers, then verify")
    r.add_argument("--socket", required=True)
    r.add_argument("--export", required=True)
    r.add_argument("--snapshot", default="", help="snapshot export ('' = no readers)")
    r.add_argument("--state", required=True)
    r.add_argument("--seconds", type=float, default=5)
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--cluster-size", type=parse_size, default=0,
                   help="the snapshot's cluster size (default: as in the state dir)")
    r.add_argument("--discard", choices=["ignore", "unmap"], default="ignore",
                   help="the daemon's --discard (its default is ignore)")
    r.add_argument("--guests", type=int, default=8)
    r.add_argument("--readers", type=int, default=3)
    r.add_argument("--op-timeout", type=float, default=20)
    r.add_argument("--max-len", type=parse_size, default=4 * MiB)
    r.add_argument("--trim-rate", type=float, default=0.05)
    r.add_argument("--max-trim-fraction", type=float, default=0.25)
    r.add_argument("--fresh-snapshot", action="store_true",
                   help="the snapshot was taken just now: it equals the model")
    r.add_argument("--no-pre-verify", action="store_true")
    r.add_argument("--daemon-may-stop", action="store_true",
                   help="connection loss is expected (the caller stops the daemon)")
    r.add_argument("--snapshot-may-vanish", action="store_true",
                   help="snapshot connections may be closed (the caller stops the session)")
    r.add_argument("--announce-after", type=int, default=0, metavar="N",
                   help="print 'running' on stdout once N operations have completed")
    r.add_argument("--report")

    b = sub.add_parser("abandon", help="pipeline reads, then drop the connection")
    b.add_argument("--socket", required=True)
    b.add_argument("--export", required=True)
    b.add_argument("--count", type=int, default=64)
    b.add_argument("--seed", type=int, default=1)
    b.add_argument("--style", default="random",
                   choices=["random", "exit", "rst", "halfclose", "disconnect", "stall"])
    b.add_argument("--big", type=float, default=0.3,
                   help="fraction of reads of 8-32 MiB (the rest: 64 KiB-2 MiB and small)")
    b.add_argument("--stall", type=float, default=60, help="seconds a stalled client waits")

    a = p.parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "mkimage": cmd_mkimage, "run": cmd_run, "abandon": cmd_abandon}
    return handlers[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
