"""Ceph RBD sources: a real one-node cluster (tests/ceph/bootstrap.sh: one
mon, one mgr, one memstore OSD from Debian's ceph packages) that the tests
start and tear down themselves.

The daemon reaches an RBD image through a qemu-storage-daemon child (QEMU's
rbd driver); a VM whose disk is an rbd node is attached through QEMU's own
NBD export of that node.  Every test ends by reading the image back with
``rbd export`` and comparing it with a model of every write.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, requires, run
from tests.integration.qemu_vm import Vm
from tests.integration.test_attach import patterned, read_export
from tests.integration.test_cli import fleeced
from tests.integration.test_fleece import qmp

pytestmark = pytest.mark.integration

SIZE = 16 << 20
K64 = 64 * 1024
CEPH = Path(__file__).resolve().parent.parent / "ceph"


class Cluster:
    def __init__(self, conf: str) -> None:
        self.conf = conf
        self.env = dict(os.environ, CEPH_CONF=conf)
        self.count = 0

    def image(self, size: int = SIZE) -> str:
        """A new image of SIZE bytes in pool rbd; its name."""
        self.count += 1
        name = f"t{self.count}"
        run(requires("rbd"), "create", f"rbd/{name}", "--size", f"{size >> 20}M", env=self.env)
        return name

    def source(self, name: str) -> str:
        return f"rbd:rbd/{name}:conf={self.conf}:id=admin"

    def read(self, name: str, out: Path) -> bytes:
        run(requires("rbd"), "export", "--no-progress", f"rbd/{name}", str(out), env=self.env)
        return out.read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    for tool in ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "rbd"):
        requires(tool)
    base = tmp_path_factory.mktemp("ceph") / "c"
    env = dict(os.environ, BASE=str(base), PORT=str(free_port()), STORE="memstore")
    proc = subprocess.run([str(CEPH / "bootstrap.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield Cluster(str(base / "ceph.conf"))
    finally:
        subprocess.run([str(CEPH / "teardown.sh")], env=env, timeout=120)


def test_serve_fleece_and_back_up_an_rbd_image(
        tmp_path: Path, ceph: Cluster, start_daemon: Callable[..., Daemon]) -> None:
    """``fleeced serve rbd:…`` was "no such file".  Now the image is served
    under its own name, writes land in Ceph, and a fleece holds the image as
    it was while they do."""
    name = ceph.image()
    d = start_daemon(ceph.source(name), env=ceph.env)
    disks = qmp(d, "query-disks")
    assert isinstance(disks, list)
    assert [(x["name"], x["source-kind"], x["size"]) for x in disks] == [(name, "rbd", SIZE)]
    qemu_io = requires("qemu-io")
    run(qemu_io, "-f", "raw", "-c", "write -P 0x11 0 1M", d.url(name))
    at_snapshot = read_export(d, name, tmp_path / "a.raw")
    qmp(d, "fleece-start", {"disk": name})
    run(qemu_io, "-f", "raw", "-c", f"write -P 0x22 {K64} {3 * K64}",
        "-c", f"write -P 0x23 {8 << 20} 1M", d.url(name))
    assert read_export(d, f"{name}@fleece", tmp_path / "s.raw") == at_snapshot
    backup = tmp_path / "backup.raw"
    run(requires("nbdcopy"), d.url(f"{name}@fleece"), str(backup))
    assert backup.read_bytes() == at_snapshot
    qmp(d, "fleece-stop", {"disk": name})
    want = patterned(patterned(patterned(bytes(SIZE), 0, 1 << 20, 0x11),
                               K64, 3 * K64, 0x22), 8 << 20, 1 << 20, 0x23)
    assert read_export(d, name, tmp_path / "b.raw") == want
    run(qemu_io, "-f", "raw", "-c", "flush", d.url(name))
    assert ceph.read(name, tmp_path / "ceph.raw") == want


def test_backup_window_on_a_vm_whose_disk_is_rbd(
        tmp_path: Path, ceph: Cluster, start_daemon: Callable[..., Daemon],
        vms: Callable[..., Vm]) -> None:
    """attach refused an rbd node.  Now a backup window has QEMU copy before
    write into the daemon: the backup is the disk as it was while the guest
    writes, and afterwards the image in Ceph holds every guest write."""
    name = ceph.image()
    run(requires("qemu-io"), "-f", "raw", "-c", "write -P 0x31 0 4M", ceph.source(name),
        env=ceph.env)
    model = patterned(bytes(SIZE), 0, 4 << 20, 0x31)
    d = start_daemon(env=ceph.env)
    vm = vms(tmp_path / "unused", paused=False, blockdev=[
        "-blockdev", f"driver=rbd,node-name=disk0,pool=rbd,image={name},"
                     f"conf={ceph.conf},user=admin"])
    backup = tmp_path / "backup.raw"
    go, stop = threading.Event(), threading.Event()
    writes: list[tuple[int, int, int]] = []

    failed: list[BaseException] = []
    gate, wrote = tmp_path / "gate", tmp_path / "wrote"

    def writer() -> None:
        go.wait(120)
        n = 0
        try:
            while not stop.is_set() and n < 100:
                off = (n * 37 * 4096) % (SIZE - K64)
                vm.write(off, 12288, 0x40 + n % 64)
                writes.append((off, 12288, 0x40 + n % 64))
                wrote.touch()
                n += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failed.append(exc)

    script = tmp_path / "backup.sh"
    # The copy starts once the guest has written (polled up to 60 s).
    script.write_text(f"#!/bin/sh\ntouch {gate}\ni=0\n"
                      f"while [ ! -e {wrote} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n"
                      f"exec {requires('nbdcopy')} \"$FLEECED_URI\" {backup}\n")
    script.chmod(0o755)

    def open_gate() -> None:
        while not gate.exists() and not stop.is_set():
            stop.wait(0.01)
        go.set()

    threads = [threading.Thread(target=writer), threading.Thread(target=open_gate)]
    for t in threads:
        t.start()
    try:
        proc = fleeced("backup-window", "vda", "--qmp", vm.qmp, "--device", "vda",
                       "--control", d.control, "--", str(script), timeout=300)
    finally:
        stop.set()
        go.set()
        for t in threads:
            t.join(120)
    assert proc.returncode == 0, proc.stderr
    assert not failed, failed
    assert backup.read_bytes() == model
    assert writes, "no guest write happened during the window"
    assert vm.drive() == "disk0" and vm.execute("query-block-exports") == []
    for off, length, pattern in writes:
        model = patterned(model, off, length, pattern)
    vm.write(12 << 20, K64, 0x77)  # straight to Ceph again
    model = patterned(model, 12 << 20, K64, 0x77)
    vm.execute("human-monitor-command", **{"command-line": 'qemu-io -d vda/virtio-backend "flush"'})
    assert ceph.read(name, tmp_path / "ceph.raw") == model
