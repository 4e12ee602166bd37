"""Dirty bitmaps and checkpoints through ``fleeced.datapath`` (``NativeBitmap``).

Disk sizes are not multiples of the granularity, so the last granule is short.
The persistent format is checked against an independent reader (``struct`` plus
FNV-1a 64 written here), as an external tool would read it.
"""

from __future__ import annotations

import errno
import gc
import select
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleeced import datapath
from fleeced.datapath import NativeBitmap, NativeFile, NativeQueue, NativeSession, SessionParams

G = 65536
SIZE = 5 * G + 1000  # six granules, the last 1000 bytes
HDR = struct.Struct("<8sIIQQQQQ")


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def header(path: Path) -> dict[str, int | bytes]:
    raw = path.read_bytes()
    magic, version, hsize, size, gran, flags, csum, wbytes = HDR.unpack_from(raw)
    return {"magic": magic, "version": version, "hdr_size": hsize, "size": size,
            "granularity": gran, "flags": flags, "checksum": csum, "word_bytes": wbytes,
            "file_size": len(raw), "fnv": fnv1a64(raw[4096:4096 + wbytes])}


def transient(size: int = SIZE, gran: int = G) -> NativeBitmap:
    bm, rec = NativeBitmap.open(None, size, gran, create=False)
    assert rec == 0
    return bm


@pytest.fixture
def nfile(tmp_path: Path) -> Iterator[NativeFile]:
    p = tmp_path / "disk.raw"
    p.write_bytes(bytes(range(256)) * (SIZE // 256) + b"\x01" * (SIZE % 256))
    with NativeFile.open(str(p), readonly=False) as f:
        yield f


def errno_of(exc: pytest.ExceptionInfo[OSError]) -> int | None:
    return exc.value.errno


# ---- arguments ----------------------------------------------------------------


@pytest.mark.parametrize("gran", [0, 256, 3 * 4096, 2 << 30])
def test_bad_granularity(gran: int) -> None:
    with pytest.raises(OSError) as ei:
        NativeBitmap.open(None, SIZE, gran, create=False)
    assert errno_of(ei) == errno.EINVAL


def test_bad_arguments() -> None:
    with pytest.raises(TypeError):
        NativeBitmap.open(b"x", SIZE, G, create=True)  # type: ignore[arg-type]
    with pytest.raises(OSError) as ei:
        NativeBitmap.open(None, 1 << 63, G, create=False)
    assert errno_of(ei) == errno.EINVAL
    bm = transient()
    with pytest.raises(TypeError):
        bm.set(True, 1)
    with pytest.raises(OSError) as ei:
        bm.set(SIZE, 1)
    assert errno_of(ei) == errno.EINVAL
    with pytest.raises(OSError) as ei:
        bm.extents(SIZE + 1, 1)
    assert errno_of(ei) == errno.EINVAL
    with pytest.raises(OSError) as ei:
        bm.extents(0, 1, max_extents=0)
    assert errno_of(ei) == errno.EINVAL
    bm.close()
    bm.close()  # idempotent
    with pytest.raises(OSError) as ei:
        bm.count()
    assert errno_of(ei) == errno.EBADF


# ---- bits ---------------------------------------------------------------------


def test_set_reset_count_extents() -> None:
    bm = transient()
    assert (bm.size, bm.granularity) == (SIZE, G)
    assert bm.extents(0, SIZE) == [(SIZE, False)]
    bm.set(1, 1)  # unaligned byte: granule 0
    bm.set(3 * G - 1, 2)  # spanning: granules 2 and 3
    bm.set(SIZE - 1, 1)  # the short last granule
    assert bm.count() == 3 * G + 1000
    assert bm.extents(0, SIZE) == [(G, True), (G, False), (2 * G, True), (G, False),
                                   (1000, True)]
    assert bm.extents(100, 2 * G) == [(G - 100, True), (G, False), (100, True)]
    # Lengths beyond the disk are clamped (NBD block status up to 4 GiB).
    assert bm.extents(4 * G, 4 << 30) == [(G, False), (1000, True)]
    assert bm.extents(SIZE, 10) == []
    assert bm.extents(0, SIZE, max_extents=2) == [(G, True), (G, False)]
    # reset clears whole granules only.
    bm.reset(1, G)
    assert bm.count() == 3 * G + 1000
    bm.reset(2 * G + 1, 2 * G)  # granule 3 whole, 2 and 4 partly
    assert bm.extents(0, SIZE) == [(G, True), (G, False), (G, True), (2 * G, False),
                                   (1000, True)]
    bm.reset(5 * G, 1000)  # the short granule, to the disk end
    assert bm.count() == 2 * G
    bm.set_all()
    assert bm.count() == SIZE and bm.extents(0, SIZE) == [(SIZE, True)]
    c = bm.copy()
    bm.clear()
    assert bm.count() == 0 and c.count() == SIZE
    bm.merge_from(c)
    assert bm.count() == SIZE
    with pytest.raises(OSError) as ei:
        bm.merge_from(transient(gran=G // 2))
    assert errno_of(ei) == errno.EINVAL
    with pytest.raises(OSError) as ei:
        transient(SIZE + 1).merge_from(bm)
    assert errno_of(ei) == errno.EINVAL
    c.close()
    bm.close()


# ---- persistence ------------------------------------------------------------------


def test_persistent_round_trip_and_format(tmp_path: Path) -> None:
    p = tmp_path / "a.bitmap"
    bm, rec = NativeBitmap.open(str(p), SIZE, G, create=True)
    assert rec == 0 and p.stat().st_mode & 0o777 == 0o600
    h = header(p)
    assert (h["magic"], h["version"], h["hdr_size"], h["size"], h["granularity"],
            h["flags"], h["word_bytes"], h["file_size"]) == (
        b"FLDIRTY\0", 1, 4096, SIZE, G, 1, 8, 4096 + 8)
    with pytest.raises(OSError) as ei:
        NativeBitmap.open(str(p), SIZE, G, create=True)
    assert errno_of(ei) == errno.EEXIST
    with pytest.raises(OSError) as ei:
        NativeBitmap.open(str(p), SIZE, G, create=False)
    assert errno_of(ei) == errno.EBUSY
    bm.set(G, 10)
    bm.sync()
    bm.close(clean=True)
    h = header(p)
    assert h["flags"] == 0 and h["checksum"] == h["fnv"]

    bm, rec = NativeBitmap.open(str(p), SIZE, G, create=False)
    assert rec == 0 and bm.extents(0, SIZE) == [(G, False), (G, True), (SIZE - 2 * G, False)]
    assert header(p)["flags"] == 1  # in use from open on
    bm.close(clean=False)  # as if the daemon died

    bm, rec = NativeBitmap.open(str(p), SIZE, G, create=False)
    assert rec == datapath.RECOVERED_IN_USE and bm.count() == SIZE
    bm.clear()
    bm.close(clean=True)

    raw = bytearray(p.read_bytes())
    raw[4096] ^= 0x02  # one flipped bit: checksum mismatch
    p.write_bytes(raw)
    bm, rec = NativeBitmap.open(str(p), SIZE, G, create=False)
    assert rec == datapath.RECOVERED_CORRUPT and bm.count() == SIZE
    bm.close(clean=True)

    p.write_bytes(p.read_bytes()[:4100])  # torn length, header intact
    bm, rec = NativeBitmap.open(str(p), SIZE, G, create=False)
    assert rec == datapath.RECOVERED_CORRUPT and bm.count() == SIZE
    bm.close(clean=True)
    assert p.stat().st_size == 4096 + 8


def test_a_resized_disk_resizes_the_bitmap(tmp_path: Path) -> None:
    """The disk grew while no daemon had the bitmap open: the bits stay, the
    granules past the old end come back dirty (RECOVERED_RESIZED)."""
    p = tmp_path / "b.bitmap"
    bm, _ = NativeBitmap.open(str(p), SIZE, G, create=True)
    bm.set(G, 1)
    bm.close(clean=True)
    bm, rec = NativeBitmap.open(str(p), SIZE + 3 * G, G, create=False)
    assert rec == datapath.RECOVERED_RESIZED
    last = SIZE // G * G  # the old partial granule holds new bytes too
    assert bm.extents(0, SIZE + 3 * G) == [(G, False), (G, True), (last - 2 * G, False),
                                          (SIZE + 3 * G - last, True)]
    bm.close(clean=True)


@pytest.mark.parametrize("damage", ["granularity", "magic", "short", "empty"])
def test_not_a_bitmap(tmp_path: Path, damage: str) -> None:
    p = tmp_path / "b.bitmap"
    NativeBitmap.open(str(p), SIZE, G, create=True)[0].close(clean=True)
    size, gran = SIZE, G
    if damage == "granularity":
        gran *= 2
    elif damage == "magic":
        p.write_bytes(b"X" + p.read_bytes()[1:])
    elif damage == "short":
        p.write_bytes(p.read_bytes()[:100])
    else:
        p.write_bytes(b"")
    with pytest.raises(OSError) as ei:
        NativeBitmap.open(str(p), size, gran, create=False)
    assert errno_of(ei) == errno.EINVAL


def test_gc_closes_not_clean(tmp_path: Path) -> None:
    p = tmp_path / "c.bitmap"
    bm, _ = NativeBitmap.open(str(p), SIZE, G, create=True)
    del bm
    gc.collect()
    bm, rec = NativeBitmap.open(str(p), SIZE, G, create=False)
    assert rec == datapath.RECOVERED_IN_USE
    bm.close(clean=True)


# ---- the guest write path --------------------------------------------------------


def test_attach_marks_writes(nfile: NativeFile, tmp_path: Path) -> None:
    p = tmp_path / "d.bitmap"
    bm, _ = NativeBitmap.open(str(p), SIZE, G, create=True)
    fine = transient(gran=4096)
    with pytest.raises(OSError) as ei:
        nfile.attach_bitmap(transient(SIZE - 1))
    assert errno_of(ei) == errno.EINVAL
    with pytest.raises(OSError) as ei:
        nfile.detach_bitmap(fine)
    assert errno_of(ei) == errno.ENOENT
    nfile.attach_bitmap(bm)
    nfile.attach_bitmap(fine)
    with pytest.raises(OSError) as ei:
        nfile.attach_bitmap(bm)
    assert errno_of(ei) == errno.EEXIST
    nfile.write(G - 5, b"0123456789")
    nfile.zero(2 * G, 100, may_trim=False, fast=False)
    nfile.trim(SIZE - 10, 10)
    assert bm.extents(0, SIZE) == [(3 * G, True), (2 * G, False), (1000, True)]
    assert fine.count() == 3 * 4096 + 1000
    nfile.flush()  # msyncs bm
    nfile.detach_bitmap(fine)
    nfile.write(4 * G, b"x")
    assert fine.count() == 3 * 4096 + 1000
    # The owner lets go while attached: the file keeps it recording and puts
    # it away cleanly when it lets go itself.
    bm.close(clean=True)
    nfile.write(3 * G, b"y")
    nfile.close()
    bm, rec = NativeBitmap.open(str(p), SIZE, G, create=False)
    assert rec == 0 and bm.count() == 5 * G + 1000
    bm.close(clean=True)


# ---- checkpoints -----------------------------------------------------------------


def _params(tmp_path: Path, **kw: object) -> SessionParams:
    args: dict[str, object] = {"temp_dir": str(tmp_path), "cbw_timeout": 10.0,
                               "cluster_size": 4096, **kw}
    return SessionParams(**args)  # type: ignore[arg-type]


def test_checkpoint(nfile: NativeFile, tmp_path: Path) -> None:
    old, new = transient(), transient()
    nfile.attach_bitmap(old)
    nfile.write(G + 7, b"a")
    nfile.write(SIZE - 1, b"b")
    with pytest.raises(OSError) as ei:  # policed: nothing attached or detached
        NativeSession.open(nfile, _params(tmp_path, checkpoint_since=old,
                                          checkpoint_new=transient(SIZE + 1)))
    assert errno_of(ei) == errno.EINVAL
    with pytest.raises(OSError) as ei:
        NativeSession.open(nfile, _params(tmp_path, checkpoint_since=old, checkpoint_new=old))
    assert errno_of(ei) == errno.EINVAL
    with pytest.raises(OSError) as ei:
        NativeSession.open(nfile, _params(tmp_path, checkpoint_since=old, scope=((0, 1),)))
    assert errno_of(ei) == errno.EINVAL
    with pytest.raises(TypeError):
        NativeSession.open(nfile, _params(tmp_path, checkpoint_new=object()))

    new.set(0, 1)
    s = NativeSession.open(nfile, _params(tmp_path, checkpoint_since=old, checkpoint_new=new))
    assert new.count() == 0
    frozen = s.frozen_bitmap()
    assert frozen is not None
    assert frozen.extents(0, SIZE) == [(G, False), (G, True), (3 * G, False), (1000, True)]
    # Scope: exactly the 4 KiB clusters of the dirty 64 KiB granules.
    for off in range(0, SIZE, 4096):
        want = datapath.NEEDED if G <= off < 2 * G or off >= 5 * G else datapath.NOT_NEEDED
        assert s.cluster_state(off) == want
    with pytest.raises(OSError) as ei:
        s.read(0, 1)  # out of scope
    assert errno_of(ei) == errno.EPERM
    nfile.write(3 * G, b"c")  # after the cut: NEW only
    assert new.extents(0, SIZE) == [(3 * G, False), (G, True), (G + 1000, False)]
    assert old.count() == G + 1000 == frozen.count()
    with pytest.raises(OSError) as ei:
        nfile.detach_bitmap(old)  # the checkpoint detached it
    assert errno_of(ei) == errno.ENOENT
    s.close()
    assert frozen.count() == G + 1000  # its own reference
    frozen.close(clean=True)
    nfile.detach_bitmap(new)

    s = NativeSession.open(nfile, _params(tmp_path))
    assert s.frozen_bitmap() is None
    s.close()


def test_checkpoint_through_queue(nfile: NativeFile, tmp_path: Path) -> None:
    """submit_open passes the checkpoint and pins the bitmaps until reaped."""
    old, new = transient(), transient()
    nfile.attach_bitmap(old)
    nfile.write(0, b"z")
    q = NativeQueue(1)
    q.inject_delay(datapath.OP_SESSION_OPEN, 50)
    result = q.submit_open(1, nfile, _params(tmp_path, checkpoint_since=old,
                                             checkpoint_new=new))
    old.close()  # the queued open keeps its own references
    new.close()
    del old, new
    gc.collect()
    r, _, _ = select.select([q.fd], [], [], 10)
    assert r
    assert [(i, rc) for i, rc, _ in q.reap()] == [(1, 0)]
    s = result()
    frozen = s.frozen_bitmap()
    assert frozen is not None and frozen.extents(0, SIZE) == [(G, True), (SIZE - G, False)]
    nfile.write(G, b"z")  # NEW, held by the file only, still records
    s.close()
    frozen.close()
    q.close()


def test_consistent_cut_threads(nfile: NativeFile, tmp_path: Path) -> None:
    """Writers race a checkpoint: every write done before it is in OLD's frozen
    copy, every write started after it is in NEW, none in both."""
    gran = 4096
    n = SIZE // gran  # whole granules only
    old, new = transient(gran=gran), transient(gran=gran)
    nfile.attach_bitmap(old)
    lock = threading.Lock()
    seq = [0]
    log: list[tuple[int, int, int]] = []
    started = threading.Barrier(5)

    def tick() -> int:
        with lock:
            seq[0] += 1
            return seq[0]

    def writer(k: int) -> None:
        started.wait()
        for g in range(k, n, 4):
            b = tick()
            nfile.write(g * gran, b"w" * gran)
            e = tick()
            with lock:
                log.append((g, b, e))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    started.wait()
    while True:
        with lock:
            if len(log) >= n // 3:
                break
    c0 = tick()
    s = NativeSession.open(nfile, _params(tmp_path, checkpoint_since=old, checkpoint_new=new))
    c1 = tick()
    for t in threads:
        t.join()
    frozen = s.frozen_bitmap()
    assert frozen is not None
    for g, b, e in log:
        in_old = frozen.extents(g * gran, 1)[0][1]
        in_new = new.extents(g * gran, 1)[0][1]
        assert in_old != in_new
        if e < c0:
            assert in_old
        if b > c1:
            assert in_new
    s.close()
    frozen.close()


# ---- clean marks (in-use cleared after a clean flush at detach) ----------


def _persistent(tmp_path: Path, name: str = "m.bitmap") -> tuple[Path, NativeBitmap]:
    p = tmp_path / name
    bm, rec = NativeBitmap.open(str(p), SIZE, G, create=True)
    assert rec == 0
    return p, bm


def test_mark_clean_then_crash_loads_clean(tmp_path: Path) -> None:
    p, bm = _persistent(tmp_path)
    bm.set(G, 10)
    bm.set(SIZE - 1, 1)
    bm.mark_clean()
    h = header(p)
    assert h["flags"] == 0 and h["checksum"] == h["fnv"]
    bm.mark_clean()  # idempotent
    assert header(p)["flags"] == 0
    want = bm.extents(0, SIZE)
    bm.close(clean=False)  # as if the daemon died: nothing changed since the mark
    bm, rec = NativeBitmap.open(str(p), SIZE, G, create=False)
    assert rec == 0 and bm.extents(0, SIZE) == want
    bm.close(clean=True)


@pytest.mark.parametrize("op", ["set_new", "set_already_set", "reset", "clear",
                                "set_all", "merge_from"])
def test_change_after_mark_clean_rearms(tmp_path: Path, op: str) -> None:
    """The first change after a clean mark sets IN_USE on disk before it returns
    (even one that finds its bit already set: another writer's unarmed change
    may have set it), so a crash after it loads all dirty."""
    p, bm = _persistent(tmp_path)
    bm.set(0, G)
    bm.mark_clean()
    assert header(p)["flags"] == 0
    if op == "set_new":
        bm.set(3 * G, 1)
    elif op == "set_already_set":
        bm.set(0, 1)
    elif op == "reset":
        bm.reset(0, G)
    elif op == "clear":
        bm.clear()
    elif op == "set_all":
        bm.set_all()
    else:
        src = transient()
        src.set(4 * G, 1)
        bm.merge_from(src)
    assert header(p)["flags"] == 1
    bm.close(clean=False)
    bm, rec = NativeBitmap.open(str(p), SIZE, G, create=False)
    assert rec == datapath.RECOVERED_IN_USE and bm.count() == SIZE
    bm.close(clean=True)


def test_mark_clean_transient_and_closed(tmp_path: Path) -> None:
    bm = transient()
    bm.set(0, 1)
    bm.mark_clean()  # no-op
    assert bm.count() == G
    bm.close()
    with pytest.raises(OSError) as ei:
        bm.mark_clean()
    assert errno_of(ei) == errno.EBADF
    _, pb = _persistent(tmp_path)
    pb.close(clean=True)
    with pytest.raises(OSError) as ei:
        pb.mark_clean()
    assert errno_of(ei) == errno.EBADF


def test_mark_clean_attached_guest_writes(nfile: NativeFile, tmp_path: Path) -> None:
    """Detach-style use: marked clean while attached, a guest write re-arms before
    it returns; after detach + mark, a crash loads exactly the recorded bits."""
    p, bm = _persistent(tmp_path)
    nfile.attach_bitmap(bm)
    nfile.write(0, b"a")
    nfile.flush()
    bm.mark_clean()
    assert header(p)["flags"] == 0
    nfile.write(2 * G, b"b")
    assert header(p)["flags"] == 1
    nfile.detach_bitmap(bm)
    bm.mark_clean()
    nfile.write(4 * G, b"c")  # detached: not recorded, header stays clean
    assert header(p)["flags"] == 0
    bm.close(clean=False)
    bm, rec = NativeBitmap.open(str(p), SIZE, G, create=False)
    assert rec == 0
    assert bm.extents(0, SIZE) == [(G, True), (G, False), (G, True), (2 * G + 1000, False)]
    bm.close(clean=True)


def test_mark_clean_races_writers_and_close(nfile: NativeFile, tmp_path: Path) -> None:
    """Guest writes in threads race a loop of clean marks; afterwards every write
    is in the bitmap, a final mark then a crash loads it clean with them all; a
    mark running in a thread while the owner closes never touches freed memory."""
    gran = 4096
    p = tmp_path / "race.bitmap"
    bm, _ = NativeBitmap.open(str(p), SIZE, gran, create=True)
    nfile.attach_bitmap(bm)
    n = SIZE // gran
    stop = threading.Event()
    marks = [0]

    def marker() -> None:
        while not stop.is_set():
            bm.mark_clean()
            marks[0] += 1

    def writer(k: int) -> None:
        for g in range(k, n, 8):
            nfile.write(g * gran, b"w")

    m = threading.Thread(target=marker)
    m.start()
    writers = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    m.join()
    assert marks[0] > 0
    want = [g for g in range(n) if g % 8 < 4]
    assert all(bm.extents(g * gran, 1)[0][1] for g in want)
    bm.mark_clean()
    nfile.detach_bitmap(bm)

    # A mark in a thread while the owner closes: pinned, so it finishes or
    # raises EBADF; the owner's not-clean close then leaves the clean header.
    errors: list[int | None] = []

    def late_mark() -> None:
        try:
            bm.mark_clean()
        except OSError as exc:
            errors.append(exc.errno)

    t = threading.Thread(target=late_mark)
    t.start()
    bm.close(clean=False)
    t.join()
    assert errors in ([], [errno.EBADF])
    bm, rec = NativeBitmap.open(str(p), SIZE, gran, create=False)
    assert rec == 0 and bm.count() == len(want) * gran
    bm.close(clean=True)


def test_cluster_limits_agree_with_the_configuration() -> None:
    """The cluster-size limits are C's (fleeced.h); the configuration layer
    keeps a copy so it needs no data path: they must agree."""
    from fleeced import daemon_config, datapath

    assert (daemon_config.CLUSTER_MIN, daemon_config.CLUSTER_MAX) == (datapath.CLUSTER_MIN,
                                                                      datapath.CLUSTER_MAX)
