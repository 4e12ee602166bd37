"""The detached-period hand-off bitmap against a real QEMU.

No daemon: a VM on a raw image (tests/integration/qemu_vm.py), guest writes
through HMP ``qemu-io``, :mod:`fleeced.qmp.handoff` driving QEMU through a
:class:`~fleeced.qmp.monitor.Monitor` on the VM's first QMP socket while the
test inspects through the second.  Every test also checks that the VM is left
without an NBD server, export or stray bitmap.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleeced.qmp.handoff import HandoffLost, add_handoff_bitmap, collect_handoff
from fleeced.qmp.monitor import Monitor
from tests.conftest import make_image
from tests.integration.qemu_vm import QmpError, Vm

pytestmark = pytest.mark.integration

SIZE = 8 << 20
K64 = 64 * 1024
GRAN = K64
NODE = "disk0"
BITMAP = "fleeced-handoff"


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[Vm]:
    image = tmp_path / "vda.img"
    # Not a multiple of the granularity: the last granule is partial.
    make_image(image, SIZE - 4096)
    machine = Vm(tmp_path, image)
    yield machine
    machine.stop()
    print(f"--- {machine.out.name} ---\n{machine.log()[-3000:]}")


@pytest.fixture
def sockdir(tmp_path: Path) -> Path:
    path = tmp_path / "s"
    path.mkdir()
    return path


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def add(vm: Vm, node: str = NODE, gran: int = GRAN) -> None:
    async with Monitor.connect(vm.qmp) as mon:
        await add_handoff_bitmap(mon, node, BITMAP, gran)


async def collect(vm: Vm, sockdir: Path, size: int = SIZE - 4096,
                  node: str = NODE) -> list[tuple[int, int]]:
    async with Monitor.connect(vm.qmp) as mon:
        return await collect_handoff(mon, node, BITMAP, size, str(sockdir))


def bitmaps(vm: Vm, node: str = NODE) -> list[dict[str, Any]]:
    for entry in vm.execute("query-named-block-nodes", flat=True):
        if entry["node-name"] == node:
            return list(entry.get("dirty-bitmaps") or [])
    raise AssertionError(f"no node {node}")


def nbd_server_running(vm: Vm, sockdir: Path) -> bool:
    """QEMU 7.2 has no query for its NBD server: a second start tells."""
    probe = str(sockdir / "probe.sock")
    try:
        vm.execute("nbd-server-start", addr={"type": "unix", "data": {"path": probe}})
    except QmpError as exc:
        assert "already running" in str(exc), exc
        return True
    vm.execute("nbd-server-stop")
    return False


def assert_clean(vm: Vm, sockdir: Path, bitmap_left: bool = False) -> None:
    assert vm.execute("query-block-exports") == []
    assert not nbd_server_running(vm, sockdir)
    assert [b["name"] for b in bitmaps(vm)] == ([BITMAP] if bitmap_left else [])
    assert not [p for p in sockdir.iterdir() if p.name != "probe.sock"]


def test_collect_returns_exactly_the_written_granules(vm: Vm, sockdir: Path) -> None:
    """Aligned, unaligned, spanning, the last partial granule and a write-zeroes:
    the extents are exactly the touched granules, merged; afterwards no server,
    export or bitmap is left in the VM."""
    size = SIZE - 4096
    run(add(vm))
    [info] = bitmaps(vm)
    assert info["granularity"] == GRAN and info["recording"] and not info["persistent"]

    vm.write(0, K64, 0x11)                      # granule 0 (aligned)
    vm.write(3 * K64 + 100, 10, 0x12)           # inside granule 3 (unaligned)
    vm.write(6 * K64 - 512, 1024, 0x13)         # spans granules 5 and 6
    vm.write(size - 512, 512, 0x14)             # the last, partial granule
    vm.qemu_io(f"write -z {20 * K64} {2 * K64}")  # write-zeroes: granules 20, 21
    vm.write(K64, K64, 0x15)                    # granule 1: merges with granule 0

    extents = run(collect(vm, sockdir))
    last = size // GRAN * GRAN
    assert extents == [(0, 2 * K64), (3 * K64, K64), (5 * K64, 2 * K64),
                       (20 * K64, 2 * K64), (last, size - last)]
    assert_clean(vm, sockdir)


def test_nothing_written_gives_no_extents(vm: Vm, sockdir: Path) -> None:
    run(add(vm))
    assert run(collect(vm, sockdir)) == []
    assert_clean(vm, sockdir)


def test_writes_after_qom_set_back_are_recorded(vm: Vm, sockdir: Path,
                                                tmp_path: Path) -> None:
    """The real detach order with method qom-set: the device points at another
    node, the bitmap is added to the original node, qom-set back, then writes:
    they are in the bitmap.  Writes made while the device was elsewhere are
    not (they went to the other node)."""
    copy = tmp_path / "copy.img"
    make_image(copy, SIZE - 4096, seed=2)
    vm.execute("blockdev-add", driver="file", **{"node-name": "other-file"},
               filename=str(copy))
    vm.execute("blockdev-add", driver="raw", **{"node-name": "other"}, file="other-file")
    vm.execute("qom-set", path="/machine/peripheral/vda", property="drive", value="other")
    assert vm.drive() == "other"

    run(add(vm))                 # on disk0, which no device uses right now
    vm.write(8 * K64, K64, 0x21)  # goes to "other": not for the bitmap
    vm.execute("qom-set", path="/machine/peripheral/vda", property="drive", value=NODE)
    assert vm.drive() == NODE
    vm.write(2 * K64 + 7, 3, 0x22)  # after the switch back: recorded

    # Away again (what vm-attach does) before collecting.
    vm.execute("qom-set", path="/machine/peripheral/vda", property="drive", value="other")
    vm.write(9 * K64, K64, 0x23)  # not on disk0 any more
    assert run(collect(vm, sockdir)) == [(2 * K64, K64)]
    assert_clean(vm, sockdir)
    assert vm.drive() == "other"


def test_method_reopen_records_on_the_raw_node(vm: Vm, sockdir: Path,
                                               tmp_path: Path) -> None:
    """Method reopen keeps the device on the raw node and swaps its file child:
    the bitmap on the raw node records the writes after the reopen back, and
    the export works while the device still writes through the node.  Writes
    between the reopen away and the collect are recorded too (a superset: the
    daemon saw them as well)."""
    copy = tmp_path / "copy.img"
    make_image(copy, SIZE - 4096, seed=2)
    vm.execute("blockdev-add", driver="file", **{"node-name": "other-file"},
               filename=str(copy))

    def reopen(file: str) -> None:
        vm.execute("blockdev-reopen", options=[{
            "driver": "raw", "node-name": NODE, "file": file, "read-only": False,
            "cache": {"direct": False, "no-flush": False}, "detect-zeroes": "off"}])

    reopen("other-file")
    run(add(vm))
    vm.write(8 * K64, K64, 0x24)   # through disk0 while "attached": recorded too
    reopen("disk0-file")
    vm.write(2 * K64, 1, 0x25)
    reopen("other-file")
    assert run(collect(vm, sockdir)) == [(2 * K64, K64), (8 * K64, K64)]
    assert_clean(vm, sockdir)


def test_iothread_device_with_running_dataplane(tmp_path: Path, sockdir: Path) -> None:
    """The node lives in the iothread's AioContext once the guest drove the
    disk; the export follows it there."""
    image = tmp_path / "io.img"
    make_image(image, SIZE)
    machine = Vm(tmp_path, image, iothread=True, paused=False, name="io")
    try:
        machine.wait_bios_drove_disk()
        run(add(machine))
        machine.write(5 * K64 + 1, 2, 0x26)
        assert run(collect(machine, sockdir, size=SIZE)) == [(5 * K64, K64)]
        assert_clean(machine, sockdir)
    finally:
        machine.stop()


def test_missing_bitmap_is_lost(vm: Vm, sockdir: Path) -> None:
    """No bitmap (the VM was restarted): HandoffLost, and nothing changed."""
    with pytest.raises(HandoffLost, match="no bitmap"):
        run(collect(vm, sockdir))
    assert_clean(vm, sockdir)


def test_missing_node_is_lost(vm: Vm, sockdir: Path) -> None:
    with pytest.raises(HandoffLost, match="no node"):
        run(collect(vm, sockdir, node="nosuchnode"))
    assert_clean(vm, sockdir)


def test_busy_nbd_server_is_lost_and_left_alone(vm: Vm, sockdir: Path,
                                                tmp_path: Path) -> None:
    """Someone else's NBD server (with an export) is running: HandoffLost, their
    server and export keep working, our bitmap stays and keeps recording."""
    theirs = str(tmp_path / "theirs.sock")
    vm.execute("nbd-server-start", addr={"type": "unix", "data": {"path": theirs}})
    vm.execute("block-export-add", type="nbd", id="backup", **{"node-name": NODE},
               name="backup", writable=False)
    run(add(vm))
    with pytest.raises(HandoffLost, match="NBD server"):
        run(collect(vm, sockdir))
    assert [e["id"] for e in vm.execute("query-block-exports")] == ["backup"]
    with socket.socket(socket.AF_UNIX) as sock:  # their server still answers
        sock.settimeout(10)
        sock.connect(theirs)
        assert sock.recv(8) == b"NBDMAGIC"
    [info] = bitmaps(vm)
    assert info["recording"]  # re-enabled: left as it was
    vm.write(4 * K64, 1, 0x31)
    vm.execute("block-export-del", id="backup")
    vm.execute("nbd-server-stop")
    # Once their server is gone the same bitmap can be collected.
    assert run(collect(vm, sockdir)) == [(4 * K64, K64)]
    assert_clean(vm, sockdir)


def test_add_keeps_an_uncollected_bitmap(vm: Vm, sockdir: Path) -> None:
    """A second detach before any collect keeps (and re-enables) the first
    bitmap: it covers both periods."""
    run(add(vm))
    vm.write(0, 1, 0x41)
    vm.execute("block-dirty-bitmap-disable", node=NODE, name=BITMAP)
    run(add(vm))
    [info] = bitmaps(vm)
    assert info["recording"]
    vm.write(10 * K64, 1, 0x42)
    assert run(collect(vm, sockdir)) == [(0, K64), (10 * K64, K64)]
    assert_clean(vm, sockdir)


def test_size_mismatch_cleans_up_and_keeps_the_bitmap(vm: Vm, sockdir: Path) -> None:
    """A failure after the export is up undoes everything but the bitmap,
    which is enabled again."""
    run(add(vm))
    vm.write(0, 1, 0x51)
    with pytest.raises(Exception, match="QEMU exports"):
        run(collect(vm, sockdir, size=SIZE))
    assert_clean(vm, sockdir, bitmap_left=True)
    assert bitmaps(vm)[0]["recording"]
    assert run(collect(vm, sockdir)) == [(0, K64)]


@pytest.mark.parametrize("gran", [512, 1 << 20])
def test_other_granularities(vm: Vm, sockdir: Path, gran: int) -> None:
    run(add(vm, gran=gran))
    vm.write(3 * K64 + 600, 100, 0x61)
    start = (3 * K64 + 600) // gran * gran
    assert run(collect(vm, sockdir)) == [(start, gran)]
    assert_clean(vm, sockdir)

