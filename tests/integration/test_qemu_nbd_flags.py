"""qemu-nbd's flags and what qemu-nbd reports, against real peers.

``-A`` and ``qemu:allocation-depth`` compared with a real ``qemu-nbd -A``
on the same sparse raw file (what QEMU's iotest ``block-status-cache``
relies on); ``-B NAME`` and a missing bitmap; the map of a snapshot whose
scope is a checkpoint (``--since``): what lies outside is a hole that reads
fail, so ``qemu-img convert -B`` onto the older backup skips it and the
incremental restores the disk.  Each on both data planes (native C and the
event loop), since each answers BLOCK_STATUS in its own code.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, requires, requires_libnbd_python, run
from tests.integration.test_cli import fleeced
from tests.integration.test_fleece import qmp

pytestmark = pytest.mark.integration

G = 64 * 1024
PLANES = ["native", "loop"]


def nbd_map(url: str, context: str) -> list[tuple[int, int, int]]:
    out = run(requires("nbdinfo"), f"--map={context}", "--json", url)
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out.stdout)]


def sparse_image(path: Path, size: int, data: list[tuple[int, int]]) -> None:
    """A sparse file of SIZE with bytes written at each (offset, length) of DATA."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in data:
            f.seek(off)
            f.write(b"\x5a" * length)


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Factory: a real ``qemu-nbd ARGS IMAGE`` (``--fork``: it returns once
    listening), its ``nbd+unix`` URI; stopped at teardown."""
    pids: list[int] = []

    def start(image: Path, *args: str) -> str:
        n = len(pids) + 1
        sock, pid = tmp_path / f"qemu-nbd{n}.sock", tmp_path / f"qemu-nbd{n}.pid"
        run(requires("qemu-nbd"), "--fork", "--pid-file", str(pid), "-k", str(sock), "-t",
            *args, str(image))
        pids.append(int(pid.read_text()))
        return f"nbd+unix:///?socket={sock}"

    yield start
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("plane", PLANES)
def test_allocation_depth_like_qemu_nbd(tmp_path: Path, start_daemon: Callable[..., Daemon],
                                        qemu_nbd: Callable[..., str], plane: str) -> None:
    """``-A`` is accepted, and both contexts answer what ``qemu-nbd -A``
    answers for the same sparse raw file: holes are depth 1 too (a raw
    file is one layer that owns all its bytes), for the whole file and
    for requests that start and end inside holes and data."""
    image = tmp_path / "sparse.img"
    size = 4 * 1024 * 1024 + 3 * 512  # not a multiple of the cluster or the page
    sparse_image(image, size, [(G, 4096), (3 * G + 512, G), (size - 512, 512)])
    ours = start_daemon(str(image), "-A", "-r", "-f", "raw", "-x", "",
                        "--data-plane", plane).url("")
    theirs = qemu_nbd(image, "-A", "-r", "-f", "raw")
    for context in ("qemu:allocation-depth", "base:allocation"):
        assert nbd_map(ours, context) == nbd_map(theirs, context), context
    assert nbd_map(ours, "qemu:allocation-depth") == [(0, size, 1)]
    # Sub-ranges with libnbd: a request may start and end anywhere.
    script = f"""
import json, nbd
out = []
for url in {[ours, theirs]!r}:
    h = nbd.NBD()
    h.add_meta_context("qemu:allocation-depth")
    h.add_meta_context("base:allocation")
    h.connect_uri(url)
    seen = []
    for off, length in (({G // 2}, {G}), ({3 * G}, {2 * G + 7}), ({size - 1000}, 1000)):
        got = {{}}
        def cb(ctx, o, entries, err):
            got[ctx] = entries
            return 0
        h.block_status(length, off, cb)
        seen.append([got["qemu:allocation-depth"], got["base:allocation"]])
    out.append(seen)
    h.shutdown()
print(json.dumps(out))
"""
    ours_seen, theirs_seen = json.loads(run(requires_libnbd_python(), "-c", script).stdout)
    assert ours_seen == theirs_seen
    # What QEMU's iotest block-status-cache does: qemu-img map, then maps
    # through qemu:allocation-depth (read by qemu as a dirty bitmap), then
    # qemu-img map again; each the same as against qemu-nbd.
    maps = []
    for url in (ours, theirs):
        opts = f"driver=nbd,server.type=unix,server.path={url.split('socket=')[1]}"
        seen = [run(requires("qemu-img"), "map", "--output=json", "--image-opts", opts).stdout]
        for _ in range(2):
            seen.append(run(requires("qemu-img"), "map", "--output=json", "--image-opts",
                            f"{opts},x-dirty-bitmap=qemu:allocation-depth").stdout)
        seen.append(run(requires("qemu-img"), "map", "--output=json", "--image-opts",
                        opts).stdout)
        assert seen[0] == seen[3]
        maps.append(seen)
    assert maps[0] == maps[1]


def clipped(extents: list[tuple[int, int, int]], size: int) -> list[tuple[int, int, int]]:
    return [(off, min(length, size - off), kind) for off, length, kind in extents if off < size]


@pytest.mark.parametrize("plane", PLANES)
def test_unaligned_raw_file_like_qemu_nbd(tmp_path: Path, start_daemon: Callable[..., Daemon],
                                          qemu_nbd: Callable[..., str], plane: str) -> None:
    """A raw file whose size is no multiple of 512: qemu-nbd 7.2 serves it
    rounded up to 512 (the tail past EOF a hole of depth 1), fleeced at its
    size; up to the file's end both contexts say the same."""
    image = tmp_path / "odd.img"
    size = 1050000
    sparse_image(image, size, [(G, 4096), (size - 100, 100)])
    ours = start_daemon(str(image), "-A", "-r", "-f", "raw", "-x", "",
                        "--data-plane", plane).url("")
    theirs = qemu_nbd(image, "-A", "-r", "-f", "raw")
    assert run(requires("nbdinfo"), "--size", theirs).stdout.strip() == str(size + 112)
    assert run(requires("nbdinfo"), "--size", ours).stdout.strip() == str(size)
    for context in ("qemu:allocation-depth", "base:allocation"):
        assert nbd_map(ours, context) == clipped(nbd_map(theirs, context), size), context


def _checkpoint_chain(tmp_path: Path, start_daemon: Callable[..., Daemon],
                      plane: str) -> tuple[Daemon, Path]:
    """A disk with a full backup (checkpoint c1) taken and a snapshot
    ``disk@fleece`` started with --since c1 after some guest writes: its
    scope is the clusters written since the full backup."""
    image = tmp_path / "disk.img"
    sparse_image(image, 32 * G, [(0, 32 * G)])
    d = start_daemon(str(image), "-x", "disk", "--state-dir", str(tmp_path / "state"),
                     "--data-plane", plane)
    assert fleeced("fleece", "start", "disk", "--checkpoint", "c1",
                   "--control", d.control).returncode == 0
    full = tmp_path / "full.qcow2"
    run(requires("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", d.url("disk@fleece"),
        str(full))
    qmp(d, "fleece-stop", {"disk": "disk"})
    run(requires("qemu-io"), "-f", "raw", "-c", f"write -P 0x11 {4 * G + 100} 10",
        "-c", f"write -z {10 * G} {2 * G}", "-c", f"write -P 0x22 {31 * G} {G}",
        d.url("disk"))
    proc = fleeced("fleece", "start", "disk", "--checkpoint", "c2", "--since", "c1",
                   "--control", d.control)
    assert proc.returncode == 0, proc.stderr
    return d, full


@pytest.mark.parametrize("plane", PLANES)
def test_since_snapshot_map_outside_scope(tmp_path: Path, start_daemon: Callable[..., Daemon],
                                          plane: str) -> None:
    """Outside a --since snapshot's scope reads fail (EPERM), so
    base:allocation says HOLE without ZERO there (nothing stored, and not
    zeros either) and allocation-depth 0; ``qemu-img convert -B full``
    follows that map, skips what is outside and never reads it, and the
    incremental over the full backup is the disk."""
    d, full = _checkpoint_chain(tmp_path, start_daemon, plane)
    snap = d.url("disk@fleece")
    assert nbd_map(snap, "base:allocation") == [
        (0, 4 * G, 1), (4 * G, G, 0), (5 * G, 5 * G, 1), (10 * G, 2 * G, 3),
        (12 * G, 19 * G, 1), (31 * G, G, 0)]
    assert nbd_map(snap, "qemu:allocation-depth") == [
        (0, 4 * G, 0), (4 * G, G, 1), (5 * G, 5 * G, 0), (10 * G, 2 * G, 1),
        (12 * G, 19 * G, 0), (31 * G, G, 1)]
    proc = run(requires("qemu-io"), "-f", "raw", "-r", "-c", "read 0 512", snap, check=False)
    assert "Operation not permitted" in proc.stdout + proc.stderr
    # A client that copies everything reads a HOLE without ZERO: it fails
    # loudly rather than writing zeros where the scope says nothing.
    proc = run(requires("nbdcopy"), snap, str(d.tmp / "all.img"), check=False)
    assert proc.returncode != 0 and "Operation not permitted" in proc.stderr, proc.stderr
    inc = d.tmp / "inc.qcow2"
    run(requires("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", "-B", str(full),
        "-F", "qcow2", snap, str(inc))
    qmp(d, "fleece-stop", {"disk": "disk"})
    assert d.stop() == 0
    run(requires("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", str(inc),
        str(d.tmp / "disk.img"))
    # Only the scope is in the incremental: the rest comes from the backing file.
    top = json.loads(run(requires("qemu-img"), "map", "--output=json", str(inc)).stdout)
    own = [(e["start"], e["length"]) for e in top if e["depth"] == 0]
    assert own == [(4 * G, G), (10 * G, 2 * G), (31 * G, G)]


@pytest.mark.parametrize("plane", PLANES)
def test_bitmap_flag(tmp_path: Path, start_daemon: Callable[..., Daemon], plane: str) -> None:
    """``-B NAME``: the disk's persistent bitmap is served as
    ``qemu:dirty-bitmap:NAME`` (qemu-img map with x-dirty-bitmap reads it);
    a bitmap the disk lacks stops the start with a one-line error, as
    qemu-nbd refuses a --bitmap its image lacks."""
    image = tmp_path / "disk.img"
    sparse_image(image, 16 * G, [])
    state = str(tmp_path / "state")
    proc = fleeced("serve", str(image), "-B", "b1", "--state-dir", state, "-k",
                   str(tmp_path / "x.sock"), "--no-control")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "fleeced: disk disk has no dirty bitmap 'b1' (it has: none); add it with "
        "`fleeced bitmap add` on a daemon with a state dir"]
    d = start_daemon(str(image), "--state-dir", state)
    assert fleeced("bitmap", "add", "disk", "b1", "--control", d.control).returncode == 0
    assert d.stop() == 0
    d = start_daemon(str(image), "-B", "b1", "--state-dir", state, "--data-plane", plane)
    run(requires("qemu-io"), "-f", "raw", "-c", f"write -P 1 {3 * G} 512", d.url("disk"))
    out = run(requires("qemu-img"), "map", "--output=json", "--image-opts",
              f"driver=nbd,server.type=unix,server.path={d.sock},export=disk,"
              "x-dirty-bitmap=qemu:dirty-bitmap:b1").stdout
    # qemu-img map over x-dirty-bitmap: dirty shows as data false.
    dirty = [(e["start"], e["length"]) for e in json.loads(out) if not e["data"]]
    assert dirty == [(3 * G, G)]
    # Served as asked: it cannot be removed under its clients (as QEMU
    # refuses to remove a bitmap an export uses).
    proc = fleeced("bitmap", "remove", "disk", "b1", "--control", d.control)
    assert proc.returncode == 1 and "restart without it first" in proc.stderr, proc.stderr
    assert "b1" in fleeced("bitmap", "list", "--control", d.control).stdout


def test_bitmap_flag_usage_errors(tmp_path: Path) -> None:
    proc = fleeced("serve", "-B", "b1", "-k", str(tmp_path / "x.sock"), "--no-control")
    assert proc.returncode == 2 and "--bitmap needs a SOURCE" in proc.stderr
