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
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, requires, run
from tests.integration.test_attach import patterned, read_export
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
