"""Sources other than a raw file: QEMU image formats through a
qemu-storage-daemon child, and NBD upstreams (qemu-nbd, nbdkit).

Every test compares what the daemon serves with what QEMU's own tools read
from the same image (``qemu-img convert``), before and after writes through
fleeced, and checks the image with ``qemu-img check`` once the daemon let go.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from tests.conftest import Daemon, make_image, requires, run
from tests.integration.test_cli import fleeced
from tests.integration.test_fleece import qmp

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 64 * MiB


def qcow2(path: Path, size: int = SIZE, *writes: tuple[int, int, int]) -> None:
    """A qcow2 image with pattern WRITES (offset, length, byte) in it."""
    run(requires("qemu-img"), "create", "-q", "-f", "qcow2", str(path), str(size))
    if writes:
        cmds = []
        for off, length, byte in writes:
            cmds += ["-c", f"write -P {byte:#x} {off} {length}"]
        run(requires("qemu-io"), "-f", "qcow2", *cmds, str(path))


def guest_view(path: Path, out: Path, fmt: str = "qcow2") -> bytes:
    """What QEMU itself reads from the image: its guest data."""
    run(requires("qemu-img"), "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(out))
    return out.read_bytes()


def served(d: Daemon, export: str, out: Path) -> bytes:
    run(requires("qemu-img"), "convert", "-f", "raw", "-O", "raw", d.url(export), str(out))
    return out.read_bytes()


def disk_info(d: Daemon, name: str) -> dict[str, object]:
    disks = qmp(d, "query-disks")
    assert isinstance(disks, list)
    return next(x for x in disks if x["name"] == name)


WRITES = ((0, MiB, 0x11), (10 * MiB, 64 * 1024, 0x22), (SIZE - 4096, 4096, 0x33))


def test_qcow2_is_served_as_its_guest_view_and_fleeced(tmp_path: Path, start_daemon) -> None:
    """`fleeced serve vm.qcow2` served the container's bytes as a raw disk
    (size = file size; a raw write corrupts the image).  It is now the
    guest view, through a qemu-storage-daemon child: size, data, holes;
    a fleecing session keeps the old data; the image stays a good qcow2."""
    img = tmp_path / "vm.qcow2"
    qcow2(img, SIZE, *WRITES)
    before = guest_view(img, tmp_path / "before.raw")
    d = start_daemon(str(img))
    info = json.loads(run(requires("nbdinfo"), "--json", d.url("vm")).stdout)
    assert info["exports"][0]["export-size"] == SIZE
    disk = disk_info(d, "vm")
    assert (disk["source-kind"], disk["format"], disk["size"]) == ("image", "qcow2", SIZE)
    assert served(d, "vm", tmp_path / "a.raw") == before
    holes = json.loads(run(requires("nbdinfo"), "--map", "--json", d.url("vm")).stdout)
    assert any(e["type"] & 1 and e["offset"] <= 20 * MiB < e["offset"] + e["length"]
               for e in holes), holes  # unallocated in the qcow2: a hole

    qmp(d, "fleece-start", {"disk": "vm"})
    run(requires("qemu-io"), "-f", "raw", "-c", "write -P 0x44 5M 3M",
        "-c", f"write -P 0x55 {10 * MiB + 4096} 4096", d.url("vm"))
    assert served(d, "vm@fleece", tmp_path / "snap.raw") == before
    stats = qmp(d, "query-fleece")
    assert isinstance(stats, list) and stats[0]["cbw-count"] > 0
    # Clusters that were holes in the source cost no temp bytes.
    assert stats[0]["temp-bytes-allocated"] < 3 * MiB + 2 * 65536
    qmp(d, "fleece-stop", {"disk": "vm"})
    assert d.stop() == 0
    run(requires("qemu-img"), "check", str(img))
    after = bytearray(before)
    after[5 * MiB:8 * MiB] = b"\x44" * 3 * MiB
    after[10 * MiB + 4096:10 * MiB + 8192] = b"\x55" * 4096
    assert guest_view(img, tmp_path / "after.raw") == bytes(after)


def test_format_raw_serves_the_file_bytes(tmp_path: Path, start_daemon) -> None:
    img = tmp_path / "vm.qcow2"
    qcow2(img, SIZE, *WRITES)
    d = start_daemon("-f", "raw", str(img))
    assert disk_info(d, "vm")["size"] == img.stat().st_size
    assert served(d, "vm", tmp_path / "bytes") == img.read_bytes()


@pytest.mark.parametrize("fmt", ["qed", "vmdk", "vhdx", "vpc", "vdi"])
def test_other_qemu_formats(tmp_path: Path, start_daemon, fmt: str) -> None:
    """Every format probing names: the same guest data as QEMU reads."""
    img = tmp_path / f"disk.{fmt}"
    run(requires("qemu-img"), "create", "-q", "-f", fmt, str(img), str(16 * MiB))
    run(requires("qemu-io"), "-f", fmt, "-c", "write -P 0x5c 1M 2M", str(img))
    want = guest_view(img, tmp_path / "want.raw", fmt)
    d = start_daemon(str(img))
    disk = disk_info(d, "disk")
    assert disk["format"] == fmt, disk
    assert served(d, "disk", tmp_path / "got.raw") == want


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Callable[[str, Path], str]]:
    """Start an NBD server (qemu-nbd or nbdkit) on IMAGE: its URI."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(kind: str, image: Path) -> str:
        sock = tmp_path / f"{kind}.sock"
        if kind == "qemu-nbd":
            cmd = [requires("qemu-nbd"), "-f", "raw", "-k", str(sock), "-t", "-e", "8",
                   "-x", "up", str(image)]
        else:
            cmd = [requires("nbdkit"), "-f", "-U", str(sock), "-e", "up", "file",
                   f"file={image}"]
        procs.append(subprocess.Popen(cmd, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline, f"{kind} did not start"
            time.sleep(0.02)
        return f"nbd+unix:///up?socket={sock}"

    yield start
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.parametrize("server", ["qemu-nbd", "nbdkit"])
def test_nbd_upstream(tmp_path: Path, start_daemon, upstream, server: str) -> None:
    """An NBD export as the source: served, fleeced, written through."""
    img = tmp_path / "up.img"
    data = make_image(img, 16 * MiB)
    uri = upstream(server, img)
    d = start_daemon(uri)
    disk = disk_info(d, "up")
    assert (disk["source-kind"], disk["size"]) == ("nbd", 16 * MiB)
    qmp(d, "fleece-start", {"disk": "up"})
    run(requires("qemu-io"), "-f", "raw", "-c", "write -P 0x66 1M 1M", d.url("up"))
    assert served(d, "up@fleece", tmp_path / "snap") == data
    qmp(d, "fleece-stop", {"disk": "up"})
    assert d.stop() == 0
    assert img.read_bytes()[MiB:2 * MiB] == b"\x66" * MiB


def test_a_daemon_without_disks_takes_them_at_run_time(tmp_path: Path, start_daemon) -> None:
    """`serve` with no SOURCE: the usual shape on a host.  disk add with
    any source; the state dir brings a qcow2 disk back after a restart."""
    img = tmp_path / "vm.qcow2"
    qcow2(img, SIZE, *WRITES)
    before = guest_view(img, tmp_path / "before.raw")
    state = str(tmp_path / "state")
    sock, ctl = str(tmp_path / "nbd.sock"), str(tmp_path / "ctl.sock")
    d = start_daemon("--state-dir", state, sock=sock, control=ctl)
    assert qmp(d, "query-disks") == []
    proc = fleeced("disk", "add", "vm", str(img), "--control", ctl)
    assert proc.returncode == 0, proc.stderr
    assert served(d, "vm", tmp_path / "a.raw") == before
    # The same image again, under another name: one source is one disk.
    with pytest.raises(ExecuteError, match="already served as disk 'vm'"):
        qmp(d, "disk-add", {"name": "again", "source": str(img)})
    assert d.stop() == 0
    d2 = start_daemon("--state-dir", state, sock=sock, control=ctl)
    assert disk_info(d2, "vm")["format"] == "qcow2"
    assert served(d2, "vm", tmp_path / "b.raw") == before


def test_bad_sources_are_one_line_errors(tmp_path: Path, start_daemon) -> None:
    img = tmp_path / "vm.qcow2"
    qcow2(img)
    orphan = tmp_path / "orphan.qcow2"
    base = tmp_path / "base.qcow2"
    qcow2(base)
    run(requires("qemu-img"), "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
        str(orphan))
    base.unlink()  # its backing file is missing now
    d = start_daemon()
    for args, needle in (
        ({"name": "x", "source": str(img), "format": "qcow3"}, "unknown format 'qcow3'"),
        ({"name": "x", "source": str(orphan)}, "base.qcow2"),
        ({"name": "x", "source": f"nbd+unix:///up?socket={tmp_path}/none.sock"},
         "No such file or directory"),
        ({"name": "x", "source": "rbd:pool"}, "want rbd:POOL/IMAGE"),
        ({"name": "x", "source": "nbd://h/e", "format": "qcow2"}, "served as it is"),
        ({"name": "x", "source": str(tmp_path)}, "is a directory"),
    ):
        with pytest.raises(ExecuteError) as info:
            qmp(d, "disk-add", args)
        msg = str(info.value)
        assert needle in msg and "\n" not in msg.strip(), msg
    assert qmp(d, "query-disks") == []
    proc = fleeced("serve", "-f", "qcow3", str(img), "--no-control", "-k",
                   str(tmp_path / "s.sock"))
    assert proc.returncode == 2 and "invalid choice: 'qcow3'" in proc.stderr
    proc = fleeced("serve", str(orphan), "--no-control", "-k", str(tmp_path / "s.sock"))
    assert proc.returncode == 1 and "base.qcow2" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_dead_child_fails_requests_and_comes_back(tmp_path: Path, start_daemon) -> None:
    """The qemu-storage-daemon child is killed: requests fail EIO (no hang),
    query-disks says source-error; the daemon starts it again and the same
    disk serves again.  kill -9 of the daemon takes the child with it."""
    img = tmp_path / "vm.qcow2"
    qcow2(img, SIZE, *WRITES)
    d = start_daemon(str(img))
    child = disk_info(d, "vm")["child"]
    assert isinstance(child, dict) and child["running"]
    os.kill(int(child["pid"]), signal.SIGKILL)
    t = time.monotonic()
    proc = run(requires("qemu-io"), "-f", "raw", "-r", "-c", "read 0 4k", d.url("vm"),
               check=False)
    assert "Input/output error" in proc.stdout + proc.stderr
    assert time.monotonic() - t < 30
    assert disk_info(d, "vm")["source-error"] == "Input/output error"
    deadline = time.monotonic() + 60
    while True:  # the restart comes after a 1 s pause
        proc = run(requires("qemu-io"), "-f", "raw", "-r", "-c", "read -P 0x11 0 4k",
                   d.url("vm"), check=False)
        if proc.returncode == 0 and "Pattern verification failed" not in proc.stdout:
            break
        assert time.monotonic() < deadline, proc.stdout
        time.sleep(0.2)
    info = disk_info(d, "vm")
    assert "source-error" not in info and info["child"]["restarts"] == 1  # type: ignore[index]
    pid = int(info["child"]["pid"])  # type: ignore[index]
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "qemu-storage-daemon outlived the daemon"
        time.sleep(0.05)
    run(requires("qemu-img"), "check", str(img))
