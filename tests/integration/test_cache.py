"""cache=none: a disk that bypasses the host page cache (qemu-nbd's
``--cache=none``, QEMU's ``cache.direct=on``, libvirt's ``cache='none'``).

What is measured is the page cache itself: ``fincore`` (util-linux) counts
the image's resident pages after writes through the daemon.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, requires, run
from tests.integration.qemu_vm import Vm
from tests.integration.test_attach import K64, attach, detach
from tests.integration.test_cli import fleeced
from tests.integration.test_fleece import qmp

pytestmark = pytest.mark.integration

SIZE = 16 << 20


def resident(path: Path) -> int:
    """Bytes of PATH in the page cache."""
    out = run(requires("fincore"), "--bytes", "--noheadings", "--output", "RES",
              str(path)).stdout
    return int(out.strip())


def sparse(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def disk_cache(d: Daemon, name: str) -> str:
    disks = qmp(d, "query-disks")
    assert isinstance(disks, list)
    return str(next(x for x in disks if x["name"] == name)["cache"])


@pytest.mark.parametrize("mode", ["none", "writeback"])
def test_serve_with_a_cache_mode(tmp_path: Path, start_daemon: Callable[..., Daemon],
                                 mode: str) -> None:
    """--cache none writes whole blocks around the page cache (and reads
    them back right, odd ranges included); writeback leaves them there."""
    img = sparse(tmp_path / "d.img")
    d = start_daemon(str(img), "-x", "d", "--cache", mode)
    assert disk_cache(d, "d") == mode
    run(requires("qemu-io"), "-f", "raw", "-c", "write -P 0x5a 0 4M",
        "-c", "write -P 0x6b 1000 10", d.url("d"))
    run(requires("qemu-io"), "-f", "raw", "-c", "read -P 0x5a 0 1000",
        "-c", "read -P 0x6b 1000 10", "-c", "read -P 0x5a 1010 4000",
        "-c", "read -P 0 4M 1M", d.url("d"))
    cached = resident(img)
    if mode == "none":
        assert cached < 64 * 1024, cached  # the odd ranges' blocks only
    else:
        assert cached >= 4 << 20, cached


def test_cache_none_of_an_image_and_bad_modes(tmp_path: Path,
                                              start_daemon: Callable[..., Daemon]) -> None:
    """A qcow2 image's child opens its file with cache.direct; an NBD export
    has no page cache of ours; modes qemu-nbd has but fleeced does not
    offer are refused by name."""
    img = tmp_path / "q.qcow2"
    run(requires("qemu-img"), "create", "-q", "-f", "qcow2", str(img), str(SIZE))
    d = start_daemon(str(img), "--cache", "none")
    disks = qmp(d, "query-disks")
    assert isinstance(disks, list) and disks[0]["cache"] == "none"
    pid = disks[0]["child"]["pid"]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    nodes = [json.loads(a) for a in cmdline if a.startswith(b"{\"driver\": \"file\"")]
    assert nodes and nodes[0]["cache"] == {"direct": True}
    proc = fleeced("serve", "--cache", "writethrough", str(img))
    assert proc.returncode == 2 and "not offered" in proc.stderr, proc.stderr
    proc = fleeced("disk", "add", "n", f"nbd+unix:///x?socket={tmp_path}/none.sock",
                   "--cache", "none", "--control", d.control)
    assert proc.returncode == 1 and "cache=none is for image files" in proc.stderr


def test_attach_follows_the_vms_cache_direct(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """A VM whose node had cache.direct=on went through the host page cache
    once attached.  Now the disk bypasses it while attached (guest writes
    leave nothing cached) and uses it again after detach; a disk served
    with --cache writeback keeps its mode."""
    img = sparse(tmp_path / "vda.img")
    d = start_daemon(str(img), "-x", "vda")
    vm = vms(img, cache_direct=True)
    assert disk_cache(d, "vda") == "writeback"
    attach(d, vm)
    assert disk_cache(d, "vda") == "none"
    for i in range(16):
        vm.write(i * K64 * 4, K64 * 4, 0x40 + i)
    assert resident(img) == 0
    detach(d)
    assert disk_cache(d, "vda") == "writeback"

    other = sparse(tmp_path / "vdb.img")
    d2 = start_daemon(str(other), "-x", "vda", "--cache", "writeback")
    vm2 = vms(other, cache_direct=True)
    attach(d2, vm2)
    assert disk_cache(d2, "vda") == "writeback"
    vm2.write(0, 1 << 20, 0x77)
    assert resident(other) >= 1 << 20
    detach(d2)
