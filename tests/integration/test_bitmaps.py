"""Dirty bitmaps, checkpoints and incremental backups.

Real clients: nbdinfo --map, qemu-img map with x-dirty-bitmap, libnbd with
two contexts, qemu-io writes; the reference incremental client of the demo.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from fleeced.incremental import apply_incremental
from tests.conftest import Daemon, make_image, requires, requires_libnbd_python, run
from tests.integration.test_cli import fleeced
from tests.integration.test_fleece import qmp

pytestmark = pytest.mark.integration

G = 64 * 1024
SIZE = 8 * 1024 * 1024 + 12345  # the last granule is partial


def qemu_io(d: Daemon, *commands: str, export: str = "disk") -> None:
    args = []
    for c in commands:
        args += ["-c", c]
    run(requires("qemu-io"), "-f", "raw", *args, d.url(export))


def nbd_map(d: Daemon, context: str, export: str = "disk") -> list[dict[str, Any]]:
    out = run(requires("nbdinfo"), f"--map={context}", "--json", d.url(export))
    return list(json.loads(out.stdout))


def dirty_ranges(d: Daemon, bitmap: str, export: str = "disk") -> list[tuple[int, int]]:
    out = []
    for e in nbd_map(d, f"qemu:dirty-bitmap:{bitmap}", export):
        if e["type"] & 1:
            if out and out[-1][0] + out[-1][1] == e["offset"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"])
            else:
                out.append((e["offset"], e["length"]))
    return out


def granules(*ranges: tuple[int, int], size: int = SIZE, g: int = G) -> list[tuple[int, int]]:
    """The granule-aligned runs that cover RANGES (clamped to SIZE)."""
    marked = set()
    for off, length in ranges:
        marked.update(range(off // g, (off + length - 1) // g + 1))
    out: list[tuple[int, int]] = []
    for i in sorted(marked):
        start, end = i * g, min((i + 1) * g, size)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + end - start)
        else:
            out.append((start, end - start))
    return out


def bitmaps(d: Daemon) -> dict[str, dict[str, Any]]:
    result = qmp(d, "query-bitmaps")
    assert isinstance(result, list)
    return {b["name"]: b for b in result}


@pytest.fixture
def disk(tmp_path: Path, start_daemon: Callable[..., Daemon]) -> tuple[Daemon, Path]:
    image = tmp_path / "disk.img"
    make_image(image, SIZE)
    d = start_daemon(str(image), "--discard=unmap", "--state-dir", str(tmp_path / "state"))
    return d, image


def test_bitmap_marks_exactly_the_written_clusters(disk: tuple[Daemon, Path]) -> None:
    """Aligned, unaligned, spanning, the last odd granule, write-zeroes and
    trim: nbdinfo --map shows exactly their granules, and qemu-img map with
    x-dirty-bitmap agrees."""
    d, _ = disk
    assert fleeced("bitmap", "add", "disk", "b1", "--control", d.control).returncode == 0
    assert dirty_ranges(d, "b1") == []
    writes = [(0, G), (3 * G + 100, 4096), (5 * G - 512, 1024), (SIZE - 10, 10),
              (10 * G, G), (12 * G, G)]
    qemu_io(d, f"write -P 0x11 0 {G}", f"write -P 0x12 {3 * G + 100} 4096",
            f"write -P 0x13 {5 * G - 512} 1024", f"write -P 0x14 {SIZE - 10} 10",
            f"write -z {10 * G} {G}", f"discard {12 * G} {G}")
    expected = granules(*writes)
    assert dirty_ranges(d, "b1") == expected
    assert bitmaps(d)["b1"]["dirty-bytes"] == sum(n for _, n in expected)

    # qemu-img's x-dirty-bitmap reports dirty extents as "data": false (and
    # pads the size to whole 512-byte sectors: that tail is not ours).
    out = run(requires("qemu-img"), "map", "--output=json", "--image-opts",
              f"driver=nbd,server.type=unix,server.path={d.sock},export=disk,"
              "x-dirty-bitmap=qemu:dirty-bitmap:b1")
    qemu_dirty = [(e["start"], e["length"]) for e in json.loads(out.stdout)
                  if not e["data"] and e["start"] < SIZE]
    assert qemu_dirty == expected


def test_contexts_are_listed_and_work_together(disk: tuple[Daemon, Path],
                                               tmp_path: Path) -> None:
    """LIST_META_CONTEXT shows base:allocation, qemu:allocation-depth and the
    bitmaps; libnbd negotiates two contexts at once and gets both."""
    d, _ = disk
    qmp(d, "bitmap-add", {"disk": "disk", "name": "b1"})
    qmp(d, "bitmap-add", {"disk": "disk", "name": "b2", "granularity": 4096,
                          "persistent": False})
    info = json.loads(run(requires("nbdinfo"), "--json", d.url("disk")).stdout)
    contexts = info["exports"][0]["contexts"]
    assert contexts == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b1",
                        "qemu:dirty-bitmap:b2"]
    qemu_io(d, f"write -P 0x21 {2 * G + 4096} 4096")
    depth = nbd_map(d, "qemu:allocation-depth")
    assert depth and all(e["type"] in (0, 1) for e in depth)
    script = tmp_path / "two.py"
    script.write_text(f"""
import nbd, json
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:b2")
h.connect_uri({d.url("disk")!r})
seen = {{}}
def cb(ctx, off, entries, err):
    seen[ctx] = entries
    return 0
h.block_status({4 * G}, 0, cb)
print(json.dumps(seen))
""")
    out = run(requires_libnbd_python(), str(script))
    seen = json.loads(out.stdout)
    assert set(seen) == {"base:allocation", "qemu:dirty-bitmap:b2"}
    b2 = seen["qemu:dirty-bitmap:b2"]
    pairs = list(zip(b2[::2], b2[1::2], strict=True))
    assert pairs == [(2 * G + 4096, 0), (4096, 1), (2 * G - 8192, 0)]


def test_incremental_chain_restores_each_snapshot(disk: tuple[Daemon, Path],
                                                  tmp_path: Path) -> None:
    """Full backup with checkpoint c1, then two incrementals (--checkpoint NEW
    --since OLD) applied by the reference client to copies of the previous
    backup: each equals the disk at its snapshot (qemu-img compare)."""
    d, image = disk
    nbdcopy = requires("nbdcopy")
    qemu_img = requires("qemu-img")

    def snapshot_copy(name: str) -> Path:
        ref = tmp_path / name
        shutil.copyfile(image, ref)
        return ref

    proc = fleeced("fleece", "start", "disk", "--checkpoint", "c1", "--control", d.control)
    assert proc.returncode == 0, proc.stderr
    ref0 = snapshot_copy("ref0.img")
    qemu_io(d, f"write -P 0x31 {G} {G}")  # after the snapshot: not in the full
    full = tmp_path / "full.img"
    run(nbdcopy, d.url("disk@fleece"), str(full))
    assert fleeced("fleece", "stop", "disk", "--control", d.control).returncode == 0
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(full), str(ref0))

    backup = full
    for step, (old, new) in enumerate((("c1", "c2"), ("c2", "c3")), start=1):
        qemu_io(d, f"write -P {0x40 + step} {step * 7 * G + 333} 5000",
                f"write -z {(20 + step) * G} {2 * G}")
        proc = fleeced("fleece", "start", "disk", "--checkpoint", new, "--since", old,
                       "--json", "--control", d.control)
        assert proc.returncode == 0, proc.stderr
        ref = snapshot_copy(f"ref{step}.img")
        qemu_io(d, f"write -P 0x5{step} {step * 3 * G} {G}")  # during the backup
        # The snapshot serves OLD's frozen bitmap; only what it marks is readable.
        inc = tmp_path / f"inc{step}.img"
        shutil.copyfile(backup, inc)
        copied = asyncio.run(apply_incremental(d.sock, "disk@fleece", old, str(inc)))
        assert 0 < copied < SIZE // 4
        assert fleeced("fleece", "stop", "disk", "--control", d.control).returncode == 0
        run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(inc), str(ref))
        assert fleeced("bitmap", "remove", "disk", old, "--control", d.control).returncode == 0
        backup = inc
    assert set(bitmaps(d)) == {"c3"}


def test_failed_backup_merge_keeps_every_change(disk: tuple[Daemon, Path]) -> None:
    """After a failed incremental, merging NEW into OLD gives OLD everything
    since its checkpoint; OLD records nothing after the checkpoint itself."""
    d, _ = disk
    qmp(d, "fleece-start", {"disk": "disk", "checkpoint": "c1"})
    qmp(d, "fleece-stop", {"disk": "disk"})
    qemu_io(d, f"write -P 1 0 {G}")
    qmp(d, "fleece-start", {"disk": "disk", "checkpoint": "c2", "since": "c1"})
    qemu_io(d, f"write -P 2 {4 * G} {G}")
    qmp(d, "fleece-stop", {"disk": "disk"})  # the backup "failed"
    assert dirty_ranges(d, "c1") == [(0, G)]
    assert dirty_ranges(d, "c2") == [(4 * G, G)]
    assert not bitmaps(d)["c1"]["recording"] and bitmaps(d)["c2"]["recording"]
    proc = fleeced("bitmap", "merge", "disk", "c1", "c2", "--control", d.control)
    assert proc.returncode == 0, proc.stderr
    assert dirty_ranges(d, "c1") == [(0, G), (4 * G, G)]


def test_kill_9_leaves_bitmaps_all_dirty_and_the_next_incremental_correct(
        tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    image = tmp_path / "disk.img"
    make_image(image, SIZE)
    state = str(tmp_path / "state")
    sock, ctl = str(tmp_path / "nbd.sock"), str(tmp_path / "ctl.sock")
    d = start_daemon(str(image), "--state-dir", state, sock=sock, control=ctl)
    qmp(d, "fleece-start", {"disk": "disk", "checkpoint": "c1"})
    full = tmp_path / "full.img"
    run(requires("nbdcopy"), d.url("disk@fleece"), str(full))
    qmp(d, "fleece-stop", {"disk": "disk"})
    qemu_io(d, f"write -P 0x61 {G} {G}")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()

    d2 = start_daemon(str(image), "--state-dir", state, sock=sock, control=ctl)
    c1 = bitmaps(d2)["c1"]
    assert c1["in-use-recovered"] and "stopped uncleanly" in c1["reason"]
    assert c1["dirty-bytes"] == SIZE
    qmp(d2, "fleece-start", {"disk": "disk", "checkpoint": "c2", "since": "c1"})
    ref = tmp_path / "ref.img"
    shutil.copyfile(image, ref)
    copied = asyncio.run(apply_incremental(d2.sock, "disk@fleece", "c1", str(full)))
    assert copied == SIZE  # a full read, never a silently wrong incremental
    run(requires("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(full), str(ref))
    qmp(d2, "fleece-stop", {"disk": "disk"})
    # A clean stop leaves c2 clean and consistent for the next daemon.
    assert d2.stop() == 0
    d3 = start_daemon(str(image), "--state-dir", state, sock=sock, control=ctl)
    assert not bitmaps(d3)["c2"]["in-use-recovered"]


def _restart(tmp_path: Path, start_daemon: Callable[..., Daemon], image: Path,
             prepare: Callable[[], None]) -> Daemon:
    """A daemon with bitmap c1 (granules 1 and 3 dirty) stopped cleanly,
    PREPARE run while it is down, and a new daemon on the same state dir."""
    state = str(tmp_path / "state")
    sock, ctl = str(tmp_path / "nbd.sock"), str(tmp_path / "ctl.sock")
    d = start_daemon(str(image), "--state-dir", state, sock=sock, control=ctl)
    qmp(d, "bitmap-add", {"disk": "disk", "name": "c1"})
    qemu_io(d, f"write -P 0x61 {G} 10", f"write -P 0x62 {3 * G + 7} 5")
    assert d.stop() == 0
    prepare()
    return start_daemon(str(image), "--state-dir", state, sock=sock, control=ctl)


def test_a_resized_disk_resizes_its_bitmaps(tmp_path: Path,
                                            start_daemon: Callable[..., Daemon]) -> None:
    """qemu-img resize while the daemon was down: the bitmap was dropped and
    its name blocked ("File exists").  Now it follows the disk: the bits it
    had stay, the new area is dirty, the reason is shown."""
    image = tmp_path / "disk.img"
    make_image(image, SIZE)
    grown = SIZE + 20 * G
    d = _restart(tmp_path, start_daemon, image, lambda: run(
        requires("qemu-img"), "resize", "-f", "raw", str(image), str(grown)))
    c1 = bitmaps(d)["c1"]
    assert "size changed" in c1["reason"], c1
    # Granules 1 and 3 kept; every granule that holds bytes past the old
    # end (the old partial last one included) is dirty.
    assert dirty_ranges(d, "c1") == granules((G, 1), (3 * G, 1), (SIZE, grown - SIZE),
                                             size=grown)
    assert c1["dirty-bytes"] == 2 * G + grown - SIZE // G * G
    with pytest.raises(ExecuteError, match="already has a bitmap 'c1'"):
        qmp(d, "bitmap-add", {"disk": "disk", "name": "c1"})
    # It records as before.
    qemu_io(d, f"write -P 0x63 {6 * G} 1")
    assert (6 * G, G) in dirty_ranges(d, "c1")
    # Shrunk: the bits past the new end go, the rest stays.
    assert d.stop() == 0
    d2 = start_daemon(str(image), "--state-dir", str(tmp_path / "state"),
                      sock=d.sock, control=d.control)
    assert not bitmaps(d2)["c1"]["in-use-recovered"]
    assert d2.stop() == 0
    run(requires("qemu-img"), "resize", "-f", "raw", "--shrink", str(image), str(5 * G))
    d3 = start_daemon(str(image), "--state-dir", str(tmp_path / "state"),
                      sock=d.sock, control=d.control)
    assert dirty_ranges(d3, "c1") == [(G, G), (3 * G, G)]


@pytest.mark.parametrize("damage", ["flag", "magic", "granularity", "directory", "unmovable"])
def test_a_bitmap_file_that_cannot_be_trusted_comes_back_all_dirty(
        tmp_path: Path, start_daemon: Callable[..., Daemon], damage: str) -> None:
    """A bad header or an unknown flag made the daemon drop the bitmap at
    start and block its name.  Now the bitmap stays, all dirty, with the
    reason; the bad file is kept beside it."""
    image = tmp_path / "disk.img"
    make_image(image, SIZE)
    path = tmp_path / "state" / "bitmaps" / "disk@c1.fbm"

    def spoil() -> None:
        with open(path, "r+b") as f:
            if damage == "flag":
                f.seek(32)
                f.write((1 << 7).to_bytes(8, "little"))  # a flag we do not know
            elif damage == "magic":
                f.write(b"NOTDIRTY")
            elif damage == "granularity":
                f.seek(24)
                f.write((4 * G).to_bytes(8, "little"))
        if damage in ("directory", "unmovable"):
            path.unlink()
            path.mkdir()
        if damage == "unmovable":  # nor can it be moved aside
            (path.parent / "disk@c1.fbm.bad" / "x").mkdir(parents=True)

    d = _restart(tmp_path, start_daemon, image, spoil)
    c1 = bitmaps(d)["c1"]
    assert c1["in-use-recovered"] and c1["dirty-bytes"] == SIZE, c1
    if damage == "unmovable":
        assert "kept in memory only" in c1["reason"], c1
    else:
        assert f"kept as {path}.bad" in c1["reason"], c1
        assert (path.parent / "disk@c1.fbm.bad").exists()
    qemu_io(d, f"write -P 0x63 {6 * G} 1")
    assert dirty_ranges(d, "c1") == [(0, SIZE)]
    assert d.stop() == 0
    if damage != "unmovable":  # the new file is good: the next start is clean
        d2 = start_daemon(str(image), "--state-dir", str(tmp_path / "state"),
                          sock=d.sock, control=d.control)
        assert not bitmaps(d2)["c1"]["in-use-recovered"]
        assert bitmaps(d2)["c1"]["dirty-bytes"] == SIZE


def test_a_stray_bitmap_file_does_not_block_its_name(disk: tuple[Daemon, Path],
                                                     tmp_path: Path) -> None:
    """A file left by a daemon that died between creating a bitmap and
    recording it made bitmap-add of that name fail "File exists"."""
    d, _ = disk
    stray = tmp_path / "state" / "bitmaps" / "disk@b1.fbm"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"left over")
    qmp(d, "bitmap-add", {"disk": "disk", "name": "b1"})
    assert bitmaps(d)["b1"]["dirty-bytes"] == 0
    assert stray.read_bytes()[:8] == b"FLDIRTY\0"


def test_bad_bitmap_input_changes_nothing(disk: tuple[Daemon, Path]) -> None:
    d, _ = disk
    qmp(d, "bitmap-add", {"disk": "disk", "name": "b1"})
    qmp(d, "bitmap-add", {"disk": "disk", "name": "b4k", "granularity": 4096})
    before = bitmaps(d)
    for cmd, args, needle in (
        ("bitmap-remove", {"disk": "disk", "name": "nope"}, "has no bitmap 'nope'"),
        ("bitmap-add", {"disk": "disk", "name": "b1"}, "already has a bitmap 'b1'"),
        ("bitmap-add", {"disk": "disk", "name": "x", "granularity": 3000},
         "must be a power of two"),
        ("bitmap-add", {"disk": "nope", "name": "x"}, "disk 'nope' not found"),
        ("bitmap-merge", {"disk": "disk", "target": "b1", "sources": ["b4k"]},
         "cannot merge"),
        ("bitmap-merge", {"disk": "disk", "target": "b1", "sources": []}, "non-empty"),
        ("fleece-start", {"disk": "disk", "checkpoint": "b1"}, "already has a bitmap"),
        ("fleece-start", {"disk": "disk", "checkpoint": "n", "since": "nope"},
         "has no bitmap 'nope'"),
        ("fleece-start", {"disk": "disk", "since": "b1"}, "since needs checkpoint"),
    ):
        with pytest.raises(ExecuteError, match=needle):
            qmp(d, cmd, args)
    assert bitmaps(d) == before
    assert qmp(d, "query-fleece") == []
    proc = fleeced("bitmap", "add", "disk", "y", "--granularity", "3000", "--control",
                   d.control)
    assert proc.returncode == 1 and "power of two" in proc.stderr


def test_transient_bitmaps_without_a_state_dir(tmp_path: Path,
                                               start_daemon: Callable[..., Daemon]) -> None:
    image = tmp_path / "disk.img"
    make_image(image, SIZE)
    d = start_daemon(str(image))
    with pytest.raises(ExecuteError, match="persistent bitmaps need a state dir"):
        qmp(d, "bitmap-add", {"disk": "disk", "name": "b1"})
    proc = fleeced("bitmap", "add", "disk", "b1", "--transient", "--control", d.control)
    assert proc.returncode == 0, proc.stderr
    qemu_io(d, "write -P 1 0 512")
    assert dirty_ranges(d, "b1") == [(0, G)]
    listing = fleeced("bitmap", "list", "--control", d.control)
    assert "b1" in listing.stdout and str(G) in listing.stdout


def test_allocation_depth(tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    """qemu:allocation-depth on the active and snapshot exports: 1 for the
    holes and data of the raw file alike (what qemu-nbd -A says: the raw
    file owns all its bytes), 0 where a snapshot keeps nothing (discarded)."""
    image = tmp_path / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(4 * G)
        f.seek(G)
        f.write(b"x" * G)
    d = start_daemon(str(image), "--fleece")
    for export in ("sparse", "sparse@fleece"):
        depth = [(e["offset"], e["length"], e["type"])
                 for e in nbd_map(d, "qemu:allocation-depth", export)]
        assert depth == [(0, 4 * G, 1)], export
    qemu_io(d, f"discard {G + 512} {2 * G}", export="sparse@fleece")  # rounds inward
    depth = [(e["offset"], e["length"], e["type"])
             for e in nbd_map(d, "qemu:allocation-depth", "sparse@fleece")]
    assert depth == [(0, 2 * G, 1), (2 * G, G, 0), (3 * G, G, 1)]


def test_block_status_edges_with_libnbd(tmp_path: Path,
                                        start_daemon: Callable[..., Daemon]) -> None:
    """LIST_META_CONTEXT with the queries ``qemu:`` and ``qemu:dirty-bitmap:``;
    REQ_ONE gives one extent; a 4 GiB - 1 request on a 5 GiB disk gets at
    least one extent per context and progress; a request past the end is
    EINVAL (proto.md "Error values", as qemu-nbd and nbdkit answer)."""
    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        f.truncate(5 << 30)
    d = start_daemon(str(image), "-x", "disk")
    qmp(d, "bitmap-add", {"disk": "disk", "name": "b1", "persistent": False})
    qemu_io(d, f"write -P 7 {3 * G} 512", f"write -P 8 {(4 << 30) + G} 512")
    script = tmp_path / "edges.py"
    script.write_text(f"""
import json, nbd
url = {d.url("disk")!r}
out = {{}}
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(url)
for query in ("qemu:", "qemu:dirty-bitmap:"):
    h.clear_meta_contexts()
    h.add_meta_context(query)
    names = []
    h.opt_list_meta_context(lambda name: names.append(name) or 0)
    out[query] = names
h.opt_abort()

h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:b1")
h.connect_uri(url)
seen = {{}}
def cb(ctx, off, entries, err):
    seen.setdefault(ctx, []).append(entries)
    return 0
h.block_status(3 * {G}, 0, cb, flags=nbd.CMD_FLAG_REQ_ONE)
out["req_one"] = seen
seen = {{}}
h.block_status((4 << 30) - 1, 0, cb)
out["big"] = seen
try:
    h.block_status(2 * {G}, (5 << 30) - {G}, cb)
    out["beyond"] = "ok"
except nbd.Error as e:
    out["beyond"] = e.errnum
print(json.dumps(out))
""")
    res = json.loads(run(requires_libnbd_python(), str(script)).stdout)
    assert res["qemu:"] == ["qemu:allocation-depth", "qemu:dirty-bitmap:b1"]
    assert res["qemu:dirty-bitmap:"] == ["qemu:dirty-bitmap:b1"]
    for ctx, calls in res["req_one"].items():
        assert len(calls) == 1 and len(calls[0]) == 2, (ctx, calls)
    b1 = res["big"]["qemu:dirty-bitmap:b1"][0]
    pairs = list(zip(b1[::2], b1[1::2], strict=True))
    assert pairs[:2] == [(3 * G, 0), (G, 1)] and sum(n for n, _ in pairs) >= 4 * G
    assert res["big"]["base:allocation"][0]  # at least one extent
    import errno

    assert res["beyond"] == errno.EINVAL


def test_no_write_is_missed_under_concurrency(tmp_path: Path,
                                              start_daemon: Callable[..., Daemon]) -> None:
    """fio with 16 writes in flight (sizes 512 B..64 KiB, unaligned) while a
    fleecing session copies before writes: fio's own I/O log says which
    bytes were written, and both bitmaps (4 KiB and 64 KiB granules) mark
    exactly the granules those writes touch -- none missed, none extra."""
    fio = requires("fio")
    image = tmp_path / "disk.img"
    size = 64 << 20
    with open(image, "wb") as f:
        f.truncate(size)
    d = start_daemon(str(image), "--fleece")
    qmp(d, "bitmap-add", {"disk": "disk", "name": "g4k", "granularity": 4096,
                          "persistent": False})
    qmp(d, "bitmap-add", {"disk": "disk", "name": "g64k", "persistent": False})
    log = tmp_path / "iolog.txt"
    run(fio, "--name=w", "--ioengine=nbd", f"--uri={d.url('disk')}", "--rw=randwrite",
        "--bsrange=512-64k", "--blockalign=512", "--iodepth=16", f"--size={size}",
        "--time_based", "--runtime=2", f"--write_iolog={log}", "--output-format=terse")
    writes = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[2] == "write":
            writes.append((int(parts[3]), int(parts[4])))
    assert len(writes) > 100
    for name, g in (("g4k", 4096), ("g64k", G)):
        assert dirty_ranges(d, name, "disk") == granules(*writes, size=size, g=g), name
