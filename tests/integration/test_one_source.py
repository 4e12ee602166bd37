"""One source is one disk.

Serving one image as two disks let writes through the second bypass the
first disk's copy-before-write: a snapshot of the first then returned the
new bytes with no error.  Whatever path names a source a second time (the
same path, a symlink, a hard link, another node of the same block device,
two ``[[disk]]`` entries, a disk remembered in the state dir), the second is
refused with one line naming the first, and the first is untouched.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from tests.conftest import REQUIRE_TOOLS, make_image, requires, run
from tests.integration.test_fleece import qmp

pytestmark = pytest.mark.integration

MiB = 1 << 20


def fleeced(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleeced", *args], capture_output=True,
                          text=True, timeout=timeout)


def refused(d, name: str, path: str) -> str:  # noqa: ANN001 - the conftest Daemon
    with pytest.raises(ExecuteError) as info:
        qmp(d, "disk-add", {"name": name, "path": path})
    return str(info.value)


def disks(d) -> list[str]:  # noqa: ANN001
    out = qmp(d, "query-disks")
    assert isinstance(out, list)
    return sorted(x["name"] for x in out)


def test_a_second_name_for_a_served_image_is_refused(tmp_path: Path, start_daemon) -> None:
    img = tmp_path / "a.img"
    data = make_image(img, 4 * MiB)
    (tmp_path / "sym.img").symlink_to(img)
    os.link(img, tmp_path / "hard.img")
    d = start_daemon(str(img))
    qmp(d, "fleece-start", {"disk": "a"})
    for path in (img, tmp_path / "sym.img", tmp_path / "hard.img",
                 tmp_path / "." / "a.img"):
        msg = refused(d, "other", str(path))
        assert f"is already served as disk 'a' ({img})" in msg, msg
        assert "\n" not in msg
    assert disks(d) == ["a"]
    # The snapshot is still the image as it was.
    out = tmp_path / "backup.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", d.url("a@fleece"), str(out))
    assert out.read_bytes() == data
    # Another image is still welcome.
    make_image(tmp_path / "b.img", MiB, seed=2)
    qmp(d, "disk-add", {"name": "b", "path": str(tmp_path / "b.img")})
    assert disks(d) == ["a", "b"]


def test_serve_with_two_paths_to_one_image(tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    make_image(img, MiB)
    (tmp_path / "link.img").symlink_to(img)
    proc = fleeced("serve", str(img), str(tmp_path / "link.img"), "-k",
                   str(tmp_path / "nbd.sock"), "--no-control")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"fleeced: {tmp_path}/link.img is already served as disk 'a' ({img}); "
                     "one source can only be one disk"], proc.stderr
    assert not (tmp_path / "nbd.sock").exists()


def test_two_disk_entries_for_one_image(tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    make_image(img, MiB)
    (tmp_path / "link.img").symlink_to(img)
    cfg = tmp_path / "f.toml"
    cfg.write_text(f'control = "{tmp_path}/ctl.sock"\nstate-dir = "{tmp_path}/st"\n'
                   f'[[disk]]\npath = "{img}"\n[[disk]]\npath = "link.img"\nname = "b"\n')
    proc = fleeced("serve", "--config", str(cfg))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"fleeced: {cfg}: disk[2].path: {tmp_path}/link.img is the image of disk[1] "
        f"({img}); one source can only be one disk"], proc.stderr


def test_a_remembered_disk_on_a_served_image_stays_out(tmp_path: Path, start_daemon) -> None:
    """A disk added at run time, then the same image given on the command
    line: the remembered disk is not opened (the record is kept, the error
    logged), the command line's disk is served."""
    img = tmp_path / "a.img"
    make_image(img, MiB)
    other = tmp_path / "b.img"
    make_image(other, MiB, seed=3)
    state = tmp_path / "state"
    d = start_daemon(str(other), "--state-dir", str(state))
    qmp(d, "disk-add", {"name": "x", "path": str(img)})
    assert d.stop() == 0
    d = start_daemon(str(img), "--state-dir", str(state))
    assert disks(d) == ["a"]
    assert d.stop() == 0
    log = (tmp_path / "daemon2.log").read_text()
    assert "is already served as disk 'a'" in log, log
    assert '"name": "x"' in (state / "state.json").read_text()


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loop device on a 4 MiB image, and a second device node for it."""
    requires("losetup")
    img = tmp_path / "backing.img"
    make_image(img, 4 * MiB)
    proc = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True)
    if proc.returncode != 0:
        if REQUIRE_TOOLS:
            pytest.fail(f"no loop device: {proc.stderr.strip()}")
        pytest.skip(f"no loop device: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    alias = tmp_path / "alias-node"
    os.mknod(alias, stat.S_IFBLK | 0o600, os.stat(dev).st_rdev)
    try:
        yield dev, alias
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_one_block_device_by_two_nodes(loop_device: tuple[str, Path], start_daemon) -> None:
    dev, alias = loop_device
    d = start_daemon(dev, "-x", "blk")
    msg = refused(d, "again", str(alias))
    assert f"is already served as disk 'blk' ({dev})" in msg, msg
    assert disks(d) == ["blk"]
