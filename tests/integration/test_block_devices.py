"""Block devices as sources, on loop devices (this kernel has loop, not
device-mapper): 512 and 4096-byte sectors, a read-only loop, a loop that
shows a window of its file.

What a device must get: TRIM as BLKDISCARD of the whole blocks inside the
range (an unaligned TRIM was a silent no-op even for those, and fallocate
made the kernel write zeroes instead of discarding), WRITE_ZEROES as
BLKZEROOUT with the partial blocks at the ends written, and a read-only
device refused read-write at start (it was served writable, every write
failing EPERM).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_TOOLS, make_image, requires, run

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Callable[..., tuple[str, Path, bytes]]]:
    """Factory: a loop device over a new 16 MiB image: (device, image, data)."""
    made: list[str] = []
    requires("losetup")

    def make(*options: str, size: int = 16 * MiB) -> tuple[str, Path, bytes]:
        img = tmp_path / f"backing{len(made)}.img"
        data = make_image(img, size, seed=len(made) + 5)
        proc = subprocess.run(["losetup", "-f", "--show", *options, str(img)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            if REQUIRE_TOOLS:
                pytest.fail(f"no loop device: {proc.stderr.strip()}")
            pytest.skip(f"no loop device: {proc.stderr.strip()}")
        made.append(proc.stdout.strip())
        return made[-1], img, data

    yield make
    for dev in made:
        subprocess.run(["losetup", "-d", dev], check=False)


def allocated(img: Path, off: int, length: int) -> bool:
    """Whether [off, off+length) of IMG holds any data block (SEEK_DATA)."""
    fd = os.open(img, os.O_RDONLY)
    try:
        try:
            d = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            return False
        return d < off + length
    finally:
        os.close(fd)


@pytest.mark.parametrize("sector", [512, 4096])
def test_trim_discards_the_whole_blocks_inside(start_daemon, loop, sector: int) -> None:
    dev, img, data = loop("--sector-size", str(sector))
    d = start_daemon(dev, "-x", "blk", "--discard=unmap")
    # Unaligned at both ends: the whole blocks inside go, the edges stay.
    off, length = 3 * MiB + 100, 2 * MiB
    run(requires("qemu-io"), "-f", "raw", "-c", f"discard {off} {length}", d.url("blk"))
    run(requires("qemu-io"), "-f", "raw", "-c", "flush", d.url("blk"))
    inner_a = -(-off // sector) * sector
    inner_b = (off + length) // sector * sector
    got = open(dev, "rb").read()
    assert got[inner_a:inner_b] == bytes(inner_b - inner_a)  # discarded: zeros
    assert got[off:inner_a] == data[off:inner_a]  # the partial blocks stay
    assert got[inner_b:off + length] == data[inner_b:off + length]
    # BLKDISCARD on a loop device punches its file: the space comes back.
    assert not allocated(img, inner_a + 4096 * 2, inner_b - inner_a - 4096 * 4)
    assert d.stop() == 0


@pytest.mark.parametrize("sector", [512, 4096])
def test_write_zeroes_on_a_device(start_daemon, loop, sector: int) -> None:
    dev, _img, data = loop("--sector-size", str(sector))
    d = start_daemon(dev, "-x", "blk")
    off, length = MiB + 1000, 3 * MiB + 77
    run(requires("qemu-io"), "-f", "raw", "-c", f"write -z {off} {length}", d.url("blk"))
    got = open(dev, "rb").read()
    want = data[:off] + bytes(length) + data[off + length:]
    assert got == want
    assert d.stop() == 0


def test_a_read_only_device_needs_read_only(start_daemon, loop, tmp_path: Path) -> None:
    dev, _img, data = loop("-r")
    proc = subprocess.run(
        [*_fleeced(), "serve", dev, "-k", str(tmp_path / "x.sock"), "--no-control"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"fleeced: {dev}: is read-only (serve it with -r)"
    d = start_daemon(dev, "-x", "blk", "-r")
    out = tmp_path / "out"
    run(requires("qemu-img"), "convert", "-f", "raw", "-O", "raw", d.url("blk"), str(out))
    assert out.read_bytes() == data


def test_a_window_of_a_file(start_daemon, loop, tmp_path: Path) -> None:
    """A loop device that shows 4 MiB from 1 MiB into its file."""
    dev, _img, data = loop("-o", str(MiB), "--sizelimit", str(4 * MiB))
    d = start_daemon(dev, "-x", "blk", "--fleece")
    out = tmp_path / "out"
    run(requires("qemu-img"), "convert", "-f", "raw", "-O", "raw", d.url("blk"), str(out))
    assert out.read_bytes() == data[MiB:5 * MiB]
    run(requires("qemu-io"), "-f", "raw", "-c", "write -P 0x42 0 64k", d.url("blk"))
    snap = tmp_path / "snap"
    run(requires("qemu-img"), "convert", "-f", "raw", "-O", "raw", d.url("blk@fleece"),
        str(snap))
    assert snap.read_bytes() == data[MiB:5 * MiB]


def _fleeced() -> list[str]:
    import sys

    return [sys.executable, "-m", "fleeced"]
