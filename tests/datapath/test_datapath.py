"""CBW invariants through ``fleeced.datapath`` on small temp images.

Image sizes are deliberately not multiples of the cluster size, so the tail
cluster is short.  Pattern table after QEMU's image-fleecing test.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleeced import datapath
from fleeced.datapath import NativeFile, NativeSession, SessionParams

CS = 65536
SIZE = 5 * CS + 1000
REPO = Path(__file__).resolve().parents[2]


def pattern(size: int, seed: int = 1) -> bytes:
    return bytes((i * 13 + seed + (i >> 16)) & 0xFF for i in range(size))


ORIG = pattern(SIZE)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.raw"
    p.write_bytes(ORIG)
    return p


@pytest.fixture
def nfile(image: Path) -> Iterator[NativeFile]:
    with NativeFile.open(str(image), readonly=False) as f:
        yield f


def params(tmp_path: Path, **kw: object) -> SessionParams:
    args: dict[str, object] = {"temp_dir": str(tmp_path), "cbw_timeout": 10.0, **kw}
    return SessionParams(**args)  # type: ignore[arg-type]


# ---- smoke -----------------------------------------------------------------


def test_smoke(nfile: NativeFile) -> None:
    assert datapath.COPIED == 3
    assert (datapath.NOT_NEEDED, datapath.NEEDED, datapath.COPYING) == (0, 1, 2)
    assert nfile.size == SIZE


def test_no_ffi_callback_in_tree() -> None:
    offenders = []
    for top in ("daemon", "native"):
        for p in (REPO / top).rglob("*"):
            if p.is_file() and p.suffix in {".py", ".c", ".h", ".cdef"}:
                if "ffi.callback" in p.read_text(errors="replace"):
                    offenders.append(str(p.relative_to(REPO)))
    assert offenders == []


# ---- files -----------------------------------------------------------------


def test_file_read_write(nfile: NativeFile) -> None:
    data, hole = nfile.read(SIZE - 100, 100)
    assert data == ORIG[-100:] and not hole
    nfile.write(10, memoryview(b"xyz"), fua=True)
    nfile.write(20, bytearray(b"abc"))
    assert nfile.read(10, 13)[0] == b"xyz" + ORIG[13:20] + b"abc"
    nfile.zero(CS, CS, may_trim=True, fast=False)
    data, hole = nfile.read(CS, CS)
    assert data == bytes(CS) and hole
    assert nfile.extents(0, SIZE) == [(CS, 0), (CS, 3), (SIZE - 2 * CS, 0)]
    nfile.trim(2 * CS, 10)
    nfile.flush()
    nfile.cache(0, SIZE)


@pytest.mark.parametrize(
    ("off", "length"),
    [(SIZE, 1), (SIZE - 1, 2), (-1, 1), (0, -1), (2**64 - 1, 2), (2**64, 0)],
)
def test_file_bounds(nfile: NativeFile, off: int, length: int) -> None:
    with pytest.raises(OSError) as ei:
        nfile.read(off, length)
    assert ei.value.errno == errno.EINVAL
    for call in (
        lambda: nfile.zero(off, length, may_trim=False, fast=False),
        lambda: nfile.trim(off, length),
        lambda: nfile.extents(off, length),
    ):
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == errno.EINVAL


def test_file_errors(tmp_path: Path, image: Path) -> None:
    with pytest.raises(OSError) as ei:
        NativeFile.open(str(tmp_path / "missing"), readonly=True)
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(OSError) as ei:
        NativeFile.open(str(tmp_path), readonly=True)
    assert ei.value.errno == errno.EISDIR
    with pytest.raises(TypeError):
        NativeFile.open(image, readonly=True)  # type: ignore[arg-type]
    with NativeFile.open(str(image), readonly=True) as f:
        with pytest.raises(OSError) as ei:
            f.write(0, b"x")
        assert ei.value.errno == errno.EROFS
        with pytest.raises(TypeError):
            f.read(True, 1)
        with pytest.raises(OSError) as ei:
            f.write(SIZE, b"x")
        assert ei.value.errno == errno.EINVAL
    f.close()  # idempotent
    with pytest.raises(OSError) as ei:
        f.read(0, 1)
    assert ei.value.errno == errno.EBADF


# ---- CBW invariants --------------------------------------------------------

WRITES = [
    pytest.param(0, CS, id="full-overwrite"),
    pytest.param(CS + 100, 200, id="inside"),
    pytest.param(2 * CS, 512, id="partial-left"),
    pytest.param(3 * CS - 512, 512, id="partial-right"),
    pytest.param(4 * CS - 10, 20, id="crossing"),
    pytest.param(SIZE - 300, 300, id="last-cluster"),
    pytest.param(0, SIZE, id="everything"),
]


@pytest.mark.parametrize(("off", "length"), WRITES)
def test_snapshot_keeps_old_data(tmp_path: Path, nfile: NativeFile, off: int, length: int) -> None:
    with NativeSession.open(nfile, params(tmp_path)) as s:
        assert s.cluster_state(off) == datapath.NEEDED
        nfile.write(off, b"\x5d" * length)
        assert nfile.read(off, length)[0] == b"\x5d" * length
        assert s.read(0, SIZE)[0] == ORIG
        assert s.read(off, length)[0] == ORIG[off : off + length]
        assert s.cluster_state(off) == datapath.COPIED
        assert s.cluster_state(off + length - 1) == datapath.COPIED
        st = s.stats()
        first, last = off // CS, (off + length - 1) // CS
        copied = min((last + 1) * CS, SIZE) - first * CS
        assert st.cbw_count == last - first + 1
        assert st.cbw_bytes == st.temp_bytes == st.temp_bytes_written == copied
        assert not st.broken and st.broken_errno == 0


def test_zero_and_trim_run_cbw(tmp_path: Path, nfile: NativeFile) -> None:
    with NativeSession.open(nfile, params(tmp_path)) as s:
        nfile.zero(100, CS, may_trim=True, fast=False)
        nfile.zero(2 * CS + 1, 10, may_trim=False, fast=False)
        nfile.trim(3 * CS, SIZE - 3 * CS)
        assert s.read(0, SIZE)[0] == ORIG


def test_discard(tmp_path: Path, nfile: NativeFile) -> None:
    with NativeSession.open(nfile, params(tmp_path)) as s:
        nfile.write(CS, b"\x01" * 2 * CS)
        s.discard(CS + 1, 2 * CS - 2)  # no whole cluster: nothing dropped
        assert s.cluster_state(CS) == datapath.COPIED
        s.discard(CS, 2 * CS)
        for off in (CS, 2 * CS, 3 * CS - 1):
            assert s.cluster_state(off) == datapath.NOT_NEEDED
        with pytest.raises(OSError) as ei:
            s.read(CS - 8, 16)
        assert ei.value.errno == errno.EPERM
        st = s.stats()
        assert st.temp_bytes == 0 and st.clusters_discarded == 2
        assert st.discarded_bytes == 2 * CS
        s.discard(5 * CS, SIZE - 5 * CS)  # short tail counts as whole
        assert s.cluster_state(SIZE - 1) == datapath.NOT_NEEDED
        nfile.write(SIZE - 1, b"\x02")
        assert s.stats().cbw_count == 2
        assert s.read(0, CS)[0] == ORIG[:CS]


def test_scope(tmp_path: Path, nfile: NativeFile) -> None:
    p = params(tmp_path, scope=((CS + 5, 10), (4 * CS, 1)))
    with NativeSession.open(nfile, p) as s:
        assert [s.cluster_state(c * CS) for c in range(6)] == [0, 1, 0, 0, 1, 0]
        nfile.write(0, b"\x99" * SIZE)
        assert s.read(CS, CS)[0] == ORIG[CS : 2 * CS]
        assert s.read(4 * CS, CS)[0] == ORIG[4 * CS : 5 * CS]
        with pytest.raises(OSError) as ei:
            s.read(0, 1)
        assert ei.value.errno == errno.EPERM
        st = s.stats()
        assert st.cbw_count == 2 and st.temp_bytes == 2 * CS
    with pytest.raises(OSError) as ei:
        NativeSession.open(nfile, params(tmp_path, scope=((SIZE, 1),)))
    assert ei.value.errno == errno.EINVAL


def test_progress_through_the_boundary(tmp_path: Path, nfile: NativeFile) -> None:
    p = params(tmp_path, scope=((CS + 5, 10), (4 * CS, 1)))
    s = NativeSession.open(nfile, p)
    assert s.progress() == (0, 2 * CS)
    s.read(CS + 3, 1)
    s.extents(0, SIZE)
    assert s.progress() == (CS, 2 * CS)
    s.read(4 * CS, CS)
    assert s.progress() == (2 * CS, 2 * CS)
    s.close()
    with pytest.raises(OSError) as ei:
        s.progress()
    assert ei.value.errno == errno.EBADF


def test_max_temp_break_snapshot(tmp_path: Path, nfile: NativeFile) -> None:
    with NativeSession.open(nfile, params(tmp_path, max_temp=CS + 10)) as s:
        nfile.write(0, b"\x11")
        nfile.write(CS, b"\x22" * 10)  # would exceed: the snapshot breaks
        assert nfile.read(CS, 10)[0] == b"\x22" * 10
        st = s.stats()
        assert st.broken and st.broken_errno == errno.ENOSPC and st.temp_bytes == 0
        for off in (0, 3 * CS):
            with pytest.raises(OSError) as ei:
                s.read(off, 16)
            assert ei.value.errno == errno.EIO


def test_max_temp_break_guest_write(tmp_path: Path, nfile: NativeFile) -> None:
    p = params(tmp_path, max_temp=CS + 10, break_guest_write=True)
    with NativeSession.open(nfile, p) as s:
        nfile.write(0, b"\x11")
        with pytest.raises(OSError) as ei:
            nfile.write(CS, b"\x22" * 10)
        assert ei.value.errno == errno.ENOSPC
        assert nfile.read(CS, 10)[0] == ORIG[CS : CS + 10]
        assert s.cluster_state(CS) == datapath.NEEDED
        assert not s.stats().broken
        assert s.read(0, SIZE)[0] == ORIG


@pytest.mark.parametrize("cache_bytes", [0, 4 * CS])
def test_inject_error_break_snapshot(tmp_path: Path, nfile: NativeFile, cache_bytes: int) -> None:
    with NativeSession.open(nfile, params(tmp_path, cache_bytes=cache_bytes)) as s:
        s.inject_error(errno.EIO, 1)
        nfile.write(CS, b"\x22" * 10)
        assert nfile.read(CS, 10)[0] == b"\x22" * 10
        st = s.stats()
        assert st.broken and st.broken_errno == errno.EIO
        with pytest.raises(OSError) as ei:
            s.read(0, 1)
        assert ei.value.errno == errno.EIO
        with pytest.raises(OSError) as ei:
            s.extents(0, SIZE)
        assert ei.value.errno == errno.EIO


def test_break_makes_the_event_fd_readable(tmp_path: Path, nfile: NativeFile) -> None:
    """The daemon learns of a break from the session's eventfd, not by polling:
    not readable while healthy, readable once after the break."""
    import select

    with NativeSession.open(nfile, params(tmp_path)) as s:
        fd = s.event_fd
        nfile.write(0, b"\x11" * 10)  # a copy that works: no event
        assert select.select([fd], [], [], 0)[0] == []
        s.inject_error(errno.EIO, 1)
        nfile.write(CS, b"\x22" * 10)
        assert select.select([fd], [], [], 0)[0] == [fd]
        assert int.from_bytes(os.read(fd, 8), "little") == 1
        nfile.write(2 * CS, b"\x33" * 10)  # already broken: no second event
        assert select.select([fd], [], [], 0)[0] == []


@pytest.mark.parametrize("cache_bytes", [0, 4 * CS])
def test_inject_error_break_guest_write(
    tmp_path: Path, nfile: NativeFile, cache_bytes: int
) -> None:
    p = params(tmp_path, cache_bytes=cache_bytes, break_guest_write=True)
    with NativeSession.open(nfile, p) as s:
        s.inject_error(errno.EIO, 1)
        with pytest.raises(OSError) as ei:
            nfile.write(CS, b"\x22" * 10)
        assert ei.value.errno == errno.EIO
        assert nfile.read(CS, 10)[0] == ORIG[CS : CS + 10]
        nfile.write(CS, b"\x22" * 10)  # the hook is used up
        assert not s.stats().broken
        assert s.read(0, SIZE)[0] == ORIG
        with pytest.raises(OSError) as ei:
            s.inject_error(0, 1)
        assert ei.value.errno == errno.EINVAL


def test_cache(tmp_path: Path, nfile: NativeFile) -> None:
    with NativeSession.open(nfile, params(tmp_path, cache_bytes=2 * CS)) as s:
        nfile.write(0, b"\x44" * 2 * CS)
        st = s.stats()
        assert st.cache_bytes == 2 * CS and st.temp_bytes_written == 0
        assert s.read(0, 2 * CS)[0] == ORIG[: 2 * CS]
        assert s.stats().read_cache_bytes == 2 * CS
        nfile.write(2 * CS, b"\x44")  # over budget: temp file
        st = s.stats()
        assert st.temp_bytes_written == CS and st.cache_bytes == 2 * CS
        assert s.read(0, SIZE)[0] == ORIG
        st = s.stats()
        assert st.read_cache_bytes == 4 * CS and st.read_temp_bytes == CS
        assert st.read_source_bytes == SIZE - 3 * CS


def test_session_extents(tmp_path: Path) -> None:
    img = tmp_path / "sparse.raw"
    with open(img, "wb") as fh:
        fh.truncate(SIZE)
    with (
        NativeFile.open(str(img), readonly=False) as f,
        NativeSession.open(f, params(tmp_path)) as s,
    ):
        f.write(CS, b"\x01")
        f.write(3 * CS, b"\x01")
        s.discard(3 * CS, CS)
        hz = datapath.EXT_HOLE | datapath.EXT_ZERO
        # Cluster 1 was a hole when its CBW ran: recorded ZERO, still a hole
        # in the frozen view; cluster 3 was discarded: nothing there, reads
        # fail EPERM (a hole, not zeros, unreadable).
        gone = datapath.EXT_HOLE | datapath.EXT_UNREADABLE
        assert s.cluster_state(CS) == datapath.ZERO
        assert s.extents(0, SIZE) == [(3 * CS, hz), (CS, gone), (SIZE - 4 * CS, hz)]
        assert s.extents(0, SIZE, max_extents=2) == [(3 * CS, hz), (CS, gone)]
        assert s.stats().temp_bytes == 0
        assert s.read(0, 100) == (bytearray(100), True)
        with pytest.raises(OSError) as ei:
            s.extents(0, SIZE, max_extents=0)
        assert ei.value.errno == errno.EINVAL


def test_session_bounds_and_params(tmp_path: Path, nfile: NativeFile) -> None:
    for bad in (
        params(tmp_path, cluster_size=3000),
        params(tmp_path, cluster_size=32 << 20),
        params(tmp_path, cbw_timeout=-1.0),
        params(tmp_path, cache_bytes=-1),
    ):
        with pytest.raises(OSError) as ei:
            NativeSession.open(nfile, bad)
        assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        NativeSession.open(nfile, params(tmp_path / "missing"))
    assert ei.value.errno == errno.ENOENT
    s = NativeSession.open(nfile, params(tmp_path))
    for call in (
        lambda: s.read(SIZE - 1, 2),
        lambda: s.discard(2**64 - 1, 2),
        lambda: s.extents(SIZE, 1),
        lambda: s.cluster_state(SIZE),
    ):
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == errno.EINVAL
    s.close()
    s.close()
    with pytest.raises(OSError) as ei:
        s.stats()
    assert ei.value.errno == errno.EBADF


def test_file_close_closes_sessions(tmp_path: Path, image: Path) -> None:
    f = NativeFile.open(str(image), readonly=False)
    s = NativeSession.open(f, params(tmp_path))
    f.close()
    assert s.closed


def test_temp_file_is_unlinked(tmp_path: Path, nfile: NativeFile) -> None:
    tdir = tmp_path / "t"
    tdir.mkdir()
    with NativeSession.open(nfile, params(tdir)):
        nfile.write(0, b"\x01" * SIZE)
        assert os.listdir(tdir) == []


# ---- threads ---------------------------------------------------------------


@pytest.mark.parametrize(("cluster", "cache"), [(4096, 0), (4096, 8 * 4096), (CS, 0)])
def test_concurrent_writes_and_snapshot_reads(tmp_path: Path, cluster: int, cache: int) -> None:
    size = 40 * cluster + 777
    orig = pattern(size, seed=7)
    img = tmp_path / "c.raw"
    img.write_bytes(orig)
    errors: list[BaseException] = []
    p = SessionParams(
        cluster_size=cluster, temp_dir=str(tmp_path), cache_bytes=cache, cbw_timeout=30.0
    )
    with NativeFile.open(str(img), readonly=False) as f, NativeSession.open(f, p) as s:

        def worker(seed: int, writer: bool) -> None:
            rng = random.Random(seed)
            try:
                for i in range(150):
                    off = rng.randrange(size)
                    length = min(1 + rng.randrange(3 * cluster), size - off)
                    if writer:
                        if i % 5 == 0:
                            f.zero(off, length, may_trim=True, fast=False)
                        else:
                            f.write(off, bytes([rng.randrange(256)]) * length)
                    else:
                        data, _ = s.read(off, length)
                        assert data == orig[off : off + length]
            except BaseException as e:  # reported below, in the test thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i, i % 2 == 0)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert s.read(0, size)[0] == orig
        st = s.stats()
        assert not st.broken and st.cbw_count > 0
        assert st.clusters_copied + st.clusters_needed == st.clusters_total
