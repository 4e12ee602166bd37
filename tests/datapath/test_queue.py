"""NativeQueue (C workers + eventfd) and read_nowait through datapath."""

from __future__ import annotations

import errno
import select
from pathlib import Path

import pytest

from fleeced import datapath
from fleeced.datapath import NativeFile, NativeQueue, NativeSession, SessionParams

SIZE = 1024 * 1024 + 777  # not a multiple of anything


def _image(tmp_path: Path) -> tuple[Path, bytes]:
    data = bytes((i * 31 + 7) & 0xFF for i in range(SIZE))
    p = tmp_path / "img"
    p.write_bytes(data)
    return p, data


def _reap(q: NativeQueue, want: int) -> dict[int, tuple[int, bool]]:
    got: dict[int, tuple[int, bool]] = {}
    while len(got) < want:
        r, _, _ = select.select([q.fd], [], [], 10)
        assert r, "no completion within 10 s"
        for op_id, rc, hole in q.reap():
            assert op_id not in got, "completed twice"
            got[op_id] = (rc, hole)
    return got


def test_reads_writes_and_errors(tmp_path: Path) -> None:
    path, data = _image(tmp_path)
    q = NativeQueue(4)
    with NativeFile.open(str(path), readonly=False) as f:
        bufs = {i: q.submit_read(i, f, i * 4096, 4096) for i in range(200)}
        done = _reap(q, 200)
        assert all(rc == 0 for rc, _ in done.values())
        for i, buf in bufs.items():
            assert bytes(buf) == data[i * 4096:(i + 1) * 4096]
        q.submit_write(1000, f, SIZE - 10, b"z" * 10, datapath.FLAG_FUA)
        q.submit(1001, datapath.OP_FLUSH, f)
        assert _reap(q, 2) == {1000: (0, False), 1001: (0, False)}
        assert f.read(SIZE - 10, 10)[0] == b"z" * 10
        with pytest.raises(OSError) as ei:
            q.submit_read(1, f, SIZE - 1, 2)
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(OSError) as ei:
            q.submit(1, 12345, f)
        assert ei.value.errno == errno.EINVAL
    q.close()
    q.close()  # idempotent
    with pytest.raises(OSError):
        _ = q.fd


def test_snapshot_read_and_discard(tmp_path: Path) -> None:
    path, data = _image(tmp_path)
    q = NativeQueue(2)
    with NativeFile.open(str(path), readonly=False) as f:
        s = NativeSession.open(f, SessionParams(temp_dir=str(tmp_path)))
        q.submit_write(1, f, 0, b"\xff" * 65536)
        assert _reap(q, 1)[1] == (0, False)
        buf = q.submit_read(2, s, 100, 5000)
        assert _reap(q, 1)[2] == (0, False)
        assert bytes(buf) == data[100:5100]
        q.submit(3, datapath.OP_SNAP_DISCARD, s, 0, 65536)
        assert _reap(q, 1)[3] == (0, False)
        q.submit_read(4, s, 0, 10)
        assert _reap(q, 1)[4][0] == -errno.EPERM
        q.close()
        s.close()


def test_read_nowait(tmp_path: Path) -> None:
    path, data = _image(tmp_path)
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as fh:
        fh.truncate(SIZE)
    with NativeFile.open(str(path), readonly=True) as f:
        f.read(0, SIZE)  # into the page cache
        got = f.read_nowait(4096, 8192)
        assert got is not None and bytes(got[0]) == data[4096:12288] and not got[1]
        with pytest.raises(OSError):
            f.read_nowait(SIZE, 1)
    with NativeFile.open(str(sparse), readonly=True) as f:
        # No SEEK_DATA on the loop (it takes the inode lock): a
        # hole is either uncached (None: the queue answers it) or zeros.
        got = f.read_nowait(0, 4096)
        assert got is None or (bytes(got[0]) == bytes(4096) and not got[1])


def _timeout_setup(tmp_path: Path, break_guest_write: bool):  # type: ignore[no-untyped-def]
    import threading
    import time

    path, data = _image(tmp_path)
    f = NativeFile.open(str(path), readonly=False)
    s = NativeSession.open(f, SessionParams(temp_dir=str(tmp_path), cbw_timeout=0.2,
                                            break_guest_write=break_guest_write))
    s.inject_delay(3000)  # every copy takes 3 s
    errors: list[OSError] = []

    def first_write() -> None:
        try:
            f.write(0, b"A" * 4096)
        except OSError as exc:
            errors.append(exc)

    first = threading.Thread(target=first_write)
    first.start()
    deadline = time.monotonic() + 10
    while s.cluster_state(0) != datapath.COPYING:  # the first write owns the copy
        assert time.monotonic() < deadline
        time.sleep(0.001)
    return f, s, data, first, errors


@pytest.mark.parametrize("break_guest_write", [False, True])
def test_cbw_timeout_applies_the_policy(tmp_path: Path, break_guest_write: bool) -> None:
    """cbw_timeout bounds a write's own copy and its wait for another write's
    copy (the own copy used to run unbounded)."""
    import time

    f, s, data, first, errors = _timeout_setup(tmp_path, break_guest_write)
    t0 = time.monotonic()
    if break_guest_write:
        with pytest.raises(OSError) as ei:
            f.write(100, b"B" * 10)
        assert ei.value.errno == errno.ETIMEDOUT
    else:
        f.write(100, b"B" * 10)  # succeeds: the snapshot breaks instead
    waited = time.monotonic() - t0
    # The timeout (0.2 s), not the copy (3 s): the margin is for a loaded machine.
    assert 0.15 < waited < 2.5, waited
    first.join(10)
    st = s.stats()
    if break_guest_write:
        # The first write's own 3 s copy outlived the timeout: it failed,
        # the source is untouched, and once the late copy is dropped the
        # cluster is NEEDED again with nothing stored.
        assert [e.errno for e in errors] == [errno.ETIMEDOUT]
        deadline = time.monotonic() + 10
        while s.cluster_state(0) != datapath.NEEDED:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        st = s.stats()
        assert not st.broken and st.temp_bytes == 0
        assert bytes(s.read(0, 4096)[0]) == data[:4096]  # snapshot intact
        assert bytes(f.read(0, 4096)[0]) == data[:4096]  # neither write landed
    else:
        assert errors == []
        assert st.broken and st.broken_errno == errno.ETIMEDOUT
        with pytest.raises(OSError) as ei:
            s.read(0, 4096)
        assert ei.value.errno == errno.EIO
        got = bytes(f.read(0, 4096)[0])
        assert got[100:110] in (b"B" * 10, b"A" * 10)  # both writes landed, in some order
        assert got[:100] == b"A" * 100
    s.close()
    f.close()
