"""Attach a running QEMU VM's disk through the daemon, and detach it.

A real ``qemu-system-x86_64`` (tests/integration/qemu_vm.py); guest writes
are HMP ``qemu-io`` through the device.  What each test proves is in its
docstring; every one also checks the VM is left as it was.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from tests.conftest import Daemon, daemon_env, make_image, requires, run
from tests.integration.qemu_vm import Vm
from tests.integration.test_cli import fleeced
from tests.integration.test_fleece import qmp

pytestmark = pytest.mark.integration

SIZE = 8 << 20
K64 = 64 * 1024


def export_stats(d: Daemon, name: str) -> dict[str, Any]:
    stats = qmp(d, "query-stats")
    assert isinstance(stats, dict)
    return next(e for e in stats["exports"] if e["name"] == name)


def read_export(d: Daemon, export: str, out: Path) -> bytes:
    run(requires("qemu-img"), "convert", "-f", "raw", "-O", "raw", d.url(export), str(out))
    return out.read_bytes()


def attach(d: Daemon, vm: Vm, *extra: str, disk: str = "vda") -> None:
    proc = fleeced("attach", disk, "--qmp", vm.qmp, "--device", "vda", *extra,
                   "--control", d.control)
    assert proc.returncode == 0, proc.stderr


def detach(d: Daemon, disk: str = "vda") -> None:
    proc = fleeced("detach", disk, "--control", d.control)
    assert proc.returncode == 0, proc.stderr


def patterned(data: bytes, offset: int, length: int, pattern: int) -> bytes:
    return data[:offset] + bytes([pattern]) * length + data[offset + length:]


def test_attach_routes_guest_writes_through_the_daemon_and_detach_restores(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """After attach the device's node is ours, guest writes reach the daemon
    (its counters move, CBW preserves the old data for the snapshot); after
    detach the original node is back, ours is gone, and writes bypass the
    daemon."""
    image = tmp_path / "vda.img"
    model = make_image(image, SIZE)
    d = start_daemon(str(image), "-x", "vda")
    vm = vms(image)
    assert vm.drive() == "disk0"

    attach(d, vm)
    assert vm.drive() == "fleeced-vda"
    listed = fleeced("attach", "--list", "--json", "--control", d.control)
    assert '"state": "attached"' in listed.stdout and '"original-node": "disk0"' in listed.stdout

    assert fleeced("fleece", "start", "vda", "--control", d.control).returncode == 0
    before = export_stats(d, "vda")["bytes-written"]
    vm.write(0, K64, 0x5A)
    vm.write(SIZE - K64 - 512, 4096, 0x5B)  # unaligned, spans two clusters
    assert export_stats(d, "vda")["bytes-written"] - before == K64 + 4096
    session = qmp(d, "query-fleece")[0]  # type: ignore[index]
    assert session["cbw-count"] >= 3
    # The snapshot still shows the data from before the writes ...
    assert read_export(d, "vda@fleece", tmp_path / "snap.img") == model
    # ... and the image has the new data.
    model = patterned(model, 0, K64, 0x5A)
    model = patterned(model, SIZE - K64 - 512, 4096, 0x5B)
    assert image.read_bytes() == model

    assert fleeced("fleece", "stop", "vda", "--control", d.control).returncode == 0
    detach(d)
    assert vm.drive() == "disk0"
    assert "fleeced-vda" not in vm.node_names()
    assert qmp(d, "query-attachments") == []
    written = export_stats(d, "vda")["bytes-written"]
    vm.write(K64, K64, 0x6B)
    assert export_stats(d, "vda")["bytes-written"] == written  # bypassed the daemon
    model = patterned(model, K64, K64, 0x6B)
    assert image.read_bytes() == model


def test_attach_errors_leave_the_vm_untouched(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """Attach twice, detach when not attached, a wrong device id, a dead QMP
    socket, another image, a missing disk: each is a one-line error and the VM
    keeps its node (and no fleeced node is left in it)."""
    image = tmp_path / "vda.img"
    make_image(image, SIZE)
    other = tmp_path / "other.img"
    make_image(other, SIZE, seed=2)
    d = start_daemon(str(image), str(other))
    vm = vms(image)
    nodes = vm.node_names()

    def fails(needle: str, *argv: str) -> None:
        proc = fleeced(*argv, "--control", d.control)
        assert proc.returncode == 1, proc.stderr
        assert needle in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert vm.drive() == "disk0" and vm.node_names() == nodes

    fails("is not attached", "detach", "vda")
    fails("no device 'nosuch'", "attach", "vda", "--qmp", vm.qmp, "--device", "nosuch")
    fails("cannot connect to QMP socket", "attach", "vda", "--qmp", str(tmp_path / "dead.sock"),
          "--device", "vda")
    fails("refusing to attach a different image",
          "attach", "other", "--qmp", vm.qmp, "--device", "vda")
    # A new disk for the VM's node: its file is disk vda's already.
    fails("is already served as disk 'vda'", "attach", "nope", "--qmp", vm.qmp,
          "--device", "vda")

    attach(d, vm)
    proc = fleeced("attach", "vda", "--qmp", vm.qmp, "--device", "vda", "--control", d.control)
    assert proc.returncode == 1 and "already attached" in proc.stderr, proc.stderr
    assert vm.drive() == "fleeced-vda"  # still attached, QEMU alive
    # A second disk cannot take the device either (the device is not on its image).
    proc = fleeced("attach", "other", "--qmp", vm.qmp, "--device", "vda", "--control",
                   d.control)
    assert proc.returncode == 1, proc.stderr
    detach(d)
    assert vm.drive() == "disk0" and vm.node_names() == nodes
    assert vm.proc.poll() is None


def test_dead_qmp_socket_file(tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    """A QMP path that is a socket nobody listens on: clear error, no hang."""
    import socket as socketmod

    image = tmp_path / "vda.img"
    make_image(image, SIZE)
    d = start_daemon(str(image), "-x", "vda")
    stale = tmp_path / "stale.sock"
    s = socketmod.socket(socketmod.AF_UNIX)
    s.bind(str(stale))
    s.close()
    with pytest.raises(ExecuteError, match="cannot connect to QMP socket"):
        qmp(d, "vm-attach", {"disk": "vda", "qmp": str(stale), "device": "vda"})


@pytest.mark.parametrize("method", ["qom-set", "reopen"])
def test_running_guest_with_iothread_and_cache_direct(
        method: str, tmp_path: Path, start_daemon: Callable[..., Daemon],
        vms: Callable[..., Vm]) -> None:
    """A running guest (SeaBIOS drove the disk, so the iothread dataplane is
    active) with ``cache.direct=on``: the nbd node is moved to the device's
    iothread, writes go through the daemon, and after detach the O_DIRECT
    node reads and writes the same image the daemon wrote."""
    image = tmp_path / "vda.img"
    model = make_image(image, SIZE)
    d = start_daemon(str(image), "-x", "vda")
    vm = vms(image, iothread=True, cache_direct=True, paused=False)
    vm.wait_bios_drove_disk()
    attach(d, vm, "--method", method)
    att = qmp(d, "query-attachments")[0]  # type: ignore[index]
    assert att["method"] == method
    if method == "qom-set":
        # qom-set refuses a node from another AioContext; reopen moves the
        # new child into the parent's context by itself.
        assert att["iothread"] == "io0"
    before = export_stats(d, "vda")["bytes-written"]
    vm.write(4096, K64, 0x71)
    assert export_stats(d, "vda")["bytes-written"] - before == K64
    model = patterned(model, 4096, K64, 0x71)
    detach(d)
    assert vm.drive() == "disk0" and "fleeced-vda" not in vm.node_names()
    vm.write(2 * K64, K64, 0x72)
    model = patterned(model, 2 * K64, K64, 0x72)
    assert export_stats(d, "vda")["bytes-written"] - before == K64
    # The guest reads back what it wrote through the daemon, through O_DIRECT.
    vm.qemu_io(f"read -P 0x71 4096 {K64}")
    assert "Pattern verification failed" not in vm.log()
    assert image.read_bytes() == model


def test_kill_9_while_attached_then_restart(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """kill -9 of the daemon with a guest write in flight: QEMU holds it
    (reconnect-delay), the restarted daemon (same socket, same state dir)
    serves the disk again and knows the attachment, the replayed write lands,
    the snapshot of the dead daemon is reported broken and not served, and
    detach works from the new daemon."""
    image = tmp_path / "vda.img"
    model = make_image(image, SIZE)
    state = tmp_path / "state"
    sock = str(tmp_path / "nbd.sock")
    ctl = str(tmp_path / "ctl.sock")
    hooks = {"FLEECED_TEST_HOOKS": "1"}
    d = start_daemon(str(image), "-x", "vda", "--state-dir", str(state), sock=sock,
                     control=ctl, env=hooks)
    vm = vms(image)
    attach(d, vm, "--reconnect-delay", "60")
    assert fleeced("fleece", "start", "vda", "--control", ctl).returncode == 0
    vm.write(0, K64, 0x11)
    model = patterned(model, 0, K64, 0x11)

    # Slow the daemon's writes down so one is in flight when it dies.
    qmp(d, "x-inject-queue-delay", {"op": "write", "ms": 3000})
    writer_error: list[BaseException] = []

    def guest_write() -> None:
        try:
            vm.write(3 * K64, 2 * K64, 0x22)
        except BaseException as exc:  # noqa: BLE001 - reported below
            writer_error.append(exc)

    t = threading.Thread(target=guest_write)
    t.start()
    # Wait until the write is in the daemon (received, not answered).
    import time

    deadline = time.monotonic() + 30
    while export_stats(d, "vda")["in-flight"] == 0:
        assert time.monotonic() < deadline, "the guest write never reached the daemon"
        time.sleep(0.05)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    assert t.is_alive()  # QEMU holds the write while it reconnects

    d2 = start_daemon(str(image), "-x", "vda", "--state-dir", str(state), sock=sock,
                      control=ctl)
    t.join(90)
    assert not t.is_alive() and not writer_error, writer_error
    model = patterned(model, 3 * K64, 2 * K64, 0x22)
    assert image.read_bytes() == model
    att = qmp(d2, "query-attachments")
    assert isinstance(att, list) and att[0]["disk"] == "vda" and att[0]["state"] == "attached"
    sessions = qmp(d2, "query-fleece")
    assert isinstance(sessions, list) and sessions[0]["state"] == "broken"
    assert "stopped uncleanly" in sessions[0]["error"]
    proc = run(requires("nbdinfo"), d2.url("vda@fleece"), check=False)
    assert proc.returncode != 0  # never served
    assert vm.drive() == "fleeced-vda"
    proc = fleeced("detach", "vda", "--control", ctl)
    assert proc.returncode == 0, proc.stderr  # lost sessions do not block detach
    assert vm.drive() == "disk0"
    qmp(d2, "fleece-stop", {"disk": "vda"})
    assert qmp(d2, "query-fleece") == []
    vm.write(5 * K64, K64, 0x33)
    model = patterned(model, 5 * K64, K64, 0x33)
    assert image.read_bytes() == model


def test_backup_window_detaches_when_the_command_fails(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """A failing backup command: its exit status is returned, the session is
    stopped and the disk detached all the same."""
    image = tmp_path / "vda.img"
    make_image(image, SIZE)
    d = start_daemon(str(image), "-x", "vda")
    vm = vms(image)
    marker = tmp_path / "ran"
    proc = fleeced("backup-window", "vda", "--qmp", vm.qmp, "--device", "vda",
                   "--control", d.control, "--",
                   "sh", "-c", f'echo "$FLEECED_URI {{export}}" > {marker}; exit 3')
    assert proc.returncode == 3, proc.stderr
    assert "exited with status 3" in proc.stderr
    text = marker.read_text()
    assert text.startswith("nbd+unix:///vda@fleece?socket=") and text.strip().endswith(
        "vda@fleece")
    assert qmp(d, "query-attachments") == [] and qmp(d, "query-fleece") == []
    assert vm.drive() == "disk0" and "fleeced-vda" not in vm.node_names()


def test_attach_a_qcow2_vm(tmp_path: Path, start_daemon: Callable[..., Daemon],
                           vms: Callable[..., Vm]) -> None:
    """A qcow2 VM could not be backed up ("only a raw node can be
    redirected").  Now the attach makes disk vda from QEMU's read-only
    export of the node, and a session has QEMU copy before write into the
    daemon: the snapshot holds the disk as it was while the guest writes
    straight into its qcow2; fleece-stop and detach leave the VM as it was,
    with every guest write in a good image."""
    img = tmp_path / "vda.qcow2"
    run(requires("qemu-img"), "create", "-q", "-f", "qcow2", str(img), str(SIZE))
    run(requires("qemu-io"), "-f", "qcow2", "-c", "write -P 0x21 0 1M", str(img))
    d = start_daemon()  # no disk yet: the attach makes it
    vm = vms(img, fmt="qcow2", paused=False)
    nodes = vm.node_names()
    attach(d, vm)
    disks = qmp(d, "query-disks")
    assert isinstance(disks, list) and [(x["name"], x["source-kind"], x["size"])
                                        for x in disks] == [("vda", "nbd", SIZE)]
    assert vm.drive() == "disk0"  # the guest keeps its node
    assert [e["node-name"] for e in vm.execute("query-block-exports")] == ["disk0"]
    vm.write(2 * K64, K64, 0x31)
    at_snapshot = read_export(d, "vda", tmp_path / "a.raw")
    assert qmp(d, "fleece-start", {"disk": "vda"}) == {"export": "vda@fleece",
                                                       "cluster-size": K64}
    assert vm.drive() == "fleeced-vda"  # QEMU's copy-before-write filter
    vm.write(K64, 3 * K64, 0x41)  # over data and over the earlier write
    vm.write(40 * K64, K64, 0x42)  # where the qcow2 has no cluster yet
    assert read_export(d, "vda@fleece", tmp_path / "s.raw") == at_snapshot
    stats = qmp(d, "query-fleece")
    # Three clusters of data; QEMU sends the one the qcow2 did not have as
    # zeroes, kept without storage.
    assert isinstance(stats, list) and stats[0]["cbw-count"] == 3
    assert stats[0]["clusters"]["zero"] == 1
    qmp(d, "fleece-stop", {"disk": "vda"})
    assert vm.drive() == "disk0" and vm.node_names() == nodes
    detach(d)
    assert vm.execute("query-block-exports") == [] and qmp(d, "query-disks") == []
    vm.write(80 * K64, K64, 0x51)
    vm.stop()
    run(requires("qemu-img"), "check", str(img))
    want = bytearray(SIZE)
    for off, length, byte in ((0, 1 << 20, 0x21), (2 * K64, K64, 0x31), (K64, 3 * K64, 0x41),
                              (40 * K64, K64, 0x42), (80 * K64, K64, 0x51)):
        want[off:off + length] = bytes([byte]) * length
    out = tmp_path / "final.raw"
    run(requires("qemu-img"), "convert", "-f", "qcow2", "-O", "raw", str(img), str(out))
    assert out.read_bytes() == bytes(want)


def test_pausing_a_qcow2_vm_mid_write_never_waits_for_the_daemon(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """A first design routed a qcow2 VM's writes through the daemon and
    QEMU's own export of the node: QEMU quiesces a node's exports while it
    drains the node, so a guest write in flight when the VM was paused
    waited for a drain that waited for it -- ``stop`` took 105 s and the
    writes failed EIO.  With QEMU copying before write into the daemon,
    nothing QEMU waits for waits for QEMU: the pause is immediate, the
    writes succeed, and the snapshot is still the disk as it was."""
    img = tmp_path / "vda.qcow2"
    run(requires("qemu-img"), "create", "-q", "-f", "qcow2", str(img), "16M")
    run(requires("qemu-io"), "-f", "qcow2", "-c", "write -P 0x21 0 16M", str(img))
    d = start_daemon()
    vm = vms(img, fmt="qcow2", paused=False)
    attach(d, vm)
    qmp(d, "fleece-start", {"disk": "vda"})
    vm.qemu_io("aio_write -P 0x41 0 8M")  # in flight when the VM stops
    vm.qemu_io("aio_write -P 0x42 8M 8M")
    t = time.monotonic()
    vm.execute("stop")
    paused = time.monotonic() - t
    vm.execute("cont")
    deadline = time.monotonic() + 60
    while vm.log().count("wrote 8388608/8388608") < 2 and "failed" not in vm.log():
        assert time.monotonic() < deadline, vm.log()
        time.sleep(0.05)
    print(f"stop with 16 MiB of guest writes in flight: {paused * 1000:.0f} ms")
    assert "failed" not in vm.log(), vm.log()
    assert paused < 10, f"stop took {paused:.1f} s"  # a hang, not a speed bound
    assert read_export(d, "vda@fleece", tmp_path / "s.raw") == b"\x21" * (16 << 20)
    stats = qmp(d, "query-fleece")
    assert isinstance(stats, list) and stats[0]["state"] == "active"
    qmp(d, "fleece-stop", {"disk": "vda"})
    detach(d)


def test_qcow2_vm_errors(tmp_path: Path, start_daemon: Callable[..., Daemon],
                         vms: Callable[..., Vm]) -> None:
    """What a disk QEMU copies before write for cannot do, each a one-line
    error that leaves the VM as it was: dirty bitmaps (its writes never pass
    the daemon), another cluster size than QEMU's, two sessions, a detach
    with a session running; and a VM whose NBD server is taken."""
    img = tmp_path / "vda.qcow2"
    run(requires("qemu-img"), "create", "-q", "-f", "qcow2", str(img), str(SIZE))
    d = start_daemon()
    vm = vms(img, fmt="qcow2", paused=False)
    nodes = vm.node_names()
    vm.execute("nbd-server-start", addr={"type": "unix",
                                         "data": {"path": str(tmp_path / "theirs.sock")}})
    proc = fleeced("attach", "vda", "--qmp", vm.qmp, "--device", "vda", "--control", d.control)
    assert proc.returncode == 1 and "NBD server is not free" in proc.stderr, proc.stderr
    assert qmp(d, "query-disks") == [] and qmp(d, "query-attachments") == []
    vm.execute("nbd-server-stop")
    assert vm.node_names() == nodes
    attach(d, vm)
    for args, needle in (({"checkpoint": "c1"}, "keeps no dirty bitmaps"),
                         ({"cluster-size": 1 << 20}, "cluster-size must be 65536")):
        with pytest.raises(ExecuteError, match=needle):
            qmp(d, "fleece-start", {"disk": "vda", **args})
    with pytest.raises(ExecuteError, match="can keep no dirty bitmap"):
        qmp(d, "bitmap-add", {"disk": "vda", "name": "b"})
    qmp(d, "fleece-start", {"disk": "vda"})
    with pytest.raises(ExecuteError, match="one at a time"):
        qmp(d, "fleece-start", {"disk": "vda", "name": "two"})
    proc = fleeced("detach", "vda", "--control", d.control)
    assert proc.returncode == 1 and "active sessions" in proc.stderr, proc.stderr
    assert vm.drive() == "fleeced-vda"
    proc = fleeced("detach", "vda", "--force", "--control", d.control)
    assert proc.returncode == 0, proc.stderr
    assert vm.drive() == "disk0" and vm.node_names() == nodes
    assert vm.execute("query-block-exports") == []


def test_restart_takes_away_qemus_filter_of_a_lost_session(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """kill -9 of the daemon while QEMU copied before write into it, under
    break-guest-write: every first write to a cluster then fails in the
    guest, since its old data has nowhere to go.  The restarted daemon takes
    QEMU's filter away at once (the session is lost either way), so the
    guest writes again; the disk comes back, attached, and backs up again."""
    img = tmp_path / "vda.qcow2"
    run(requires("qemu-img"), "create", "-q", "-f", "qcow2", str(img), str(SIZE))
    sock, ctl = str(tmp_path / "nbd.sock"), str(tmp_path / "ctl.sock")
    state = str(tmp_path / "state")
    d = start_daemon("--state-dir", state, sock=sock, control=ctl)
    vm = vms(img, fmt="qcow2", paused=False)
    nodes = vm.node_names()
    attach(d, vm)
    qmp(d, "fleece-start", {"disk": "vda", "on-cbw-error": "break-guest-write"})
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    with pytest.raises(AssertionError, match="failed"):
        vm.write(0, K64, 0x11)  # nowhere to put the old data: refused
    d2 = start_daemon("--state-dir", state, sock=sock, control=ctl)
    assert vm.drive() == "disk0" and vm.node_names() == nodes
    vm.write(0, K64, 0x12)
    atts = qmp(d2, "query-attachments")
    assert isinstance(atts, list) and [a["disk"] for a in atts] == ["vda"]
    qmp(d2, "fleece-stop", {"disk": "vda"})  # the lost session
    qmp(d2, "fleece-start", {"disk": "vda"})
    vm.write(K64, K64, 0x13)
    snap = read_export(d2, "vda@fleece", tmp_path / "s.raw")
    assert snap == patterned(bytes(SIZE), 0, K64, 0x12)
    qmp(d2, "fleece-stop", {"disk": "vda"})
    detach(d2)
    assert vm.execute("query-block-exports") == []


def wait_for(what: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_attachments_end_when_the_vm_is_gone(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """A VM that exits (or is killed) while attached needed ``detach
    --force``.  Now its attachment ends by itself: a raw image stays served
    with its session (nothing writes it any more); a disk QEMU exported to
    the daemon goes, with its session, since its source went with QEMU."""
    image = tmp_path / "vda.img"
    make_image(image, SIZE)
    img = tmp_path / "vdb.qcow2"
    run(requires("qemu-img"), "create", "-q", "-f", "qcow2", str(img), str(SIZE))
    d = start_daemon(str(image), "-x", "vda")
    vm_a = vms(image)
    vm_b = vms(img, fmt="qcow2", paused=False)
    attach(d, vm_a)
    proc = fleeced("attach", "vdb", "--qmp", vm_b.qmp, "--device", "vda", "--control",
                   d.control)
    assert proc.returncode == 0, proc.stderr
    qmp(d, "fleece-start", {"disk": "vda"})
    qmp(d, "fleece-start", {"disk": "vdb"})
    vm_a.stop()
    vm_b.stop()

    def ended() -> bool:
        return qmp(d, "query-attachments") == []

    wait_for(ended)
    disks = qmp(d, "query-disks")
    assert isinstance(disks, list) and [x["name"] for x in disks] == ["vda"]
    sessions = qmp(d, "query-fleece")
    assert isinstance(sessions, list) and [(x["disk"], x["state"]) for x in sessions] == [
        ("vda", "active")]
    qmp(d, "fleece-stop", {"disk": "vda"})


def test_stalled_readers_do_not_stall_an_attached_guest(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """An attached guest had reads of 30.9 s while eight clients sat on
    unread 32 MiB replies (540 reads in 95 s instead of 54,000).  Its reads
    now stay fast: a guest connection waits for nobody's budget, and the
    stalled clients cost only their own connections."""
    from tests.integration.test_lifecycle import NOT_STALLED, stalled_reader

    image = tmp_path / "vda.img"
    make_image(image, 64 << 20)
    d = start_daemon(str(image), "-x", "vda")
    vm = vms(image)
    attach(d, vm)
    stalled = [stalled_reader(d.sock, "vda") for _ in range(8)]
    worst = 0.0
    try:
        for i in range(100):
            t = time.monotonic()
            vm.qemu_io(f"read {(i * 7919 % 16384) * 4096} 4k")
            worst = max(worst, time.monotonic() - t)
    finally:
        for c in stalled:
            c.close()
    print(f"guest's worst 4 KiB read (with the QMP round trip): {worst * 1000:.1f} ms")
    assert worst < NOT_STALLED
    assert "read 4096/4096 bytes" in vm.log()
    detach(d)


def test_backup_window_cleans_up_after_a_daemon_restart(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """kill -9 and a restart of the daemon while the backup command ran: the
    CLI printed "fleeced:" with nothing after it and exited 1, leaving the
    session broken and the VM attached.  Now it reconnects, forgets the lost
    session, detaches, and says what happened."""
    image = tmp_path / "vda.img"
    model = make_image(image, SIZE)
    sock, ctl = str(tmp_path / "nbd.sock"), str(tmp_path / "ctl.sock")
    state = str(tmp_path / "state")
    d = start_daemon(str(image), "-x", "vda", "--state-dir", state, sock=sock, control=ctl)
    vm = vms(image)
    running, go = tmp_path / "running", tmp_path / "go"
    script = tmp_path / "backup.sh"
    script.write_text(f"#!/bin/sh\ntouch {running}\n"
                      f"while [ ! -e {go} ]; do sleep 0.05; done\nexit 0\n")
    script.chmod(0o755)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleeced", "backup-window", "vda", "--qmp", vm.qmp,
         "--device", "vda", "--control", ctl, "--", str(script)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not running.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the backup command never ran"
            time.sleep(0.05)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        d2 = start_daemon(str(image), "-x", "vda", "--state-dir", state, sock=sock,
                          control=ctl)
        go.touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, (out, err)
    assert "the daemon restarted while the window was open" in err, err
    assert "snapshot of vda was lost" in err, err
    assert not [line for line in err.splitlines() if line.strip() == "fleeced:"], err
    assert qmp(d2, "query-attachments") == [] and qmp(d2, "query-fleece") == []
    assert vm.drive() == "disk0" and "fleeced-vda" not in vm.node_names()
    vm.write(3 * K64, K64, 0x5a)
    assert image.read_bytes() == patterned(model, 3 * K64, K64, 0x5a)


def test_backup_window_backs_up_while_the_guest_writes(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """The hypervisor backup end to end: a real QEMU's disk attached, snapshotted, copied
    with nbdcopy while guest writes keep coming, and detached, all from the
    CLI; the backup equals the disk at snapshot time and the image equals the
    model of every write."""
    nbdcopy = requires("nbdcopy")
    image = tmp_path / "vda.img"
    model = make_image(image, SIZE)
    at_start = model
    d = start_daemon(str(image), "-x", "vda")
    vm = vms(image)
    backup = tmp_path / "backup.img"
    go = threading.Event()
    stop = threading.Event()
    writes: list[tuple[int, int, int]] = []

    def writer() -> None:
        go.wait(60)
        n = 0
        while not stop.is_set() and n < 200:
            off = (n * 37 * 4096) % (SIZE - K64)
            vm.write(off, 12288, 0x40 + n % 64)
            writes.append((off, 12288, 0x40 + n % 64))
            n += 1

    t = threading.Thread(target=writer)
    t.start()
    # The command starts the writer, then copies: writes land during the copy.
    script = tmp_path / "backup.sh"
    gate = tmp_path / "gate"
    script.write_text(f"#!/bin/sh\ntouch {gate}\nexec {nbdcopy} \"$FLEECED_URI\" {backup}\n")
    script.chmod(0o755)

    def open_gate() -> None:
        while not gate.exists() and not stop.is_set():
            stop.wait(0.01)
        go.set()

    g = threading.Thread(target=open_gate)
    g.start()
    try:
        proc = fleeced("backup-window", "vda", "--qmp", vm.qmp, "--device", "vda",
                       "--control", d.control, "--", str(script), timeout=300)
    finally:
        stop.set()
        go.set()
        t.join(120)
        g.join()
    assert proc.returncode == 0, proc.stderr
    assert backup.read_bytes() == at_start
    assert writes, "no guest write happened during the window"
    for off, length, pattern in writes:
        model = patterned(model, off, length, pattern)
    assert image.read_bytes() == model
    assert vm.drive() == "disk0"


def test_attach_needs_a_unix_listener(tmp_path: Path) -> None:
    """A daemon on TCP only cannot be attached (QEMU reaches it on a Unix
    socket): a clear error."""
    import socket as socketmod
    import subprocess
    import sys

    image = tmp_path / "vda.img"
    make_image(image, SIZE)
    with socketmod.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctl = str(tmp_path / "ctl.sock")
    proc = subprocess.Popen([sys.executable, "-m", "fleeced", "serve", str(image), "-x", "vda",
                             "-p", str(port), "-b", "127.0.0.1", "-t", "--control", ctl],
                            stderr=subprocess.PIPE, env=daemon_env())
    try:
        import time

        deadline = time.monotonic() + 30
        while not os.path.exists(ctl):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        out = fleeced("attach", "vda", "--qmp", str(tmp_path / "x.sock"), "--device", "vda",
                      "--control", ctl)
        assert out.returncode == 1 and "Unix socket" in out.stderr, out.stderr
    finally:
        proc.terminate()
        proc.wait(30)


def test_clean_restart_while_attached_loses_no_guest_write(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """SIGTERM (a service restart) with guest writes in flight and new ones
    arriving during the drain: in-flight writes complete, new ones are left
    unanswered for QEMU to replay after it reconnects (an NBD_ESHUTDOWN reply
    would reach the guest as an I/O error: QEMU 7.2 retries only lost
    connections, not error replies)."""
    image = tmp_path / "vda.img"
    model = make_image(image, SIZE)
    state = tmp_path / "state"
    sock = str(tmp_path / "nbd.sock")
    ctl = str(tmp_path / "ctl.sock")
    d = start_daemon(str(image), "-x", "vda", "--state-dir", str(state), sock=sock,
                     control=ctl, env={"FLEECED_TEST_HOOKS": "1"})
    vm = vms(image)
    attach(d, vm)
    qmp(d, "x-inject-queue-delay", {"op": "write", "ms": 2000})
    vm.qemu_io(f"aio_write -P 0x44 0 {K64}")
    import time

    deadline = time.monotonic() + 30
    while export_stats(d, "vda")["in-flight"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    d.proc.send_signal(signal.SIGTERM)
    vm.qemu_io(f"aio_write -P 0x55 {K64} {K64}")  # reaches the draining daemon
    assert d.proc.wait(30) == 0
    start_daemon(str(image), "-x", "vda", "--state-dir", str(state), sock=sock, control=ctl)
    vm.qemu_io("aio_flush")
    log = vm.log()
    assert "failed" not in log, log
    assert log.count("wrote 65536/65536 bytes") == 2, log
    model = patterned(model, 0, K64, 0x44)
    model = patterned(model, K64, K64, 0x55)
    assert image.read_bytes() == model
    assert vm.drive() == "fleeced-vda"


class FakeGuestAgent:
    """A guest agent socket speaking qemu-ga's protocol (the test VM has no
    guest OS to run the real one).  Records each command with the VM's drive
    and the daemon's sessions at that moment, so the order is checked."""

    def __init__(self, path: Path, vm: Vm, d: Daemon, fail: str | None = None) -> None:
        import socket as socketmod

        self.calls: list[tuple[str, str, int]] = []
        self.fail = fail
        self._vm = vm
        self._d = d
        self._sock = socketmod.socket(socketmod.AF_UNIX)
        self._sock.bind(str(path))
        self._sock.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import json

        conn, _ = self._sock.accept()
        with conn, conn.makefile("rwb") as f:
            for line in f:
                msg = json.loads(line)
                cmd = msg["execute"]
                if cmd == "guest-sync-delimited":
                    f.write(b"\xff" + json.dumps({"return": msg["arguments"]["id"]}).encode()
                            + b"\n")
                else:
                    sessions = qmp(self._d, "query-fleece")
                    assert isinstance(sessions, list)
                    self.calls.append((cmd, self._vm.drive(), len(sessions)))
                    if cmd == self.fail:
                        reply: dict[str, Any] = {"error": {"class": "GenericError",
                                                           "desc": "freeze refused"}}
                    else:
                        reply = {"return": 1 if cmd == "guest-fsfreeze-freeze" else 0}
                    f.write(json.dumps(reply).encode() + b"\n")
                f.flush()

    def close(self) -> None:
        self._sock.close()
        self._thread.join(10)


def test_freeze_around_the_switch_and_the_session_start(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """--freeze: the guest is frozen before the switch, the session starts
    while it is frozen, and it is thawed after; a refused freeze fails the
    attach, is still followed by a thaw, and leaves the VM as it was."""
    image = tmp_path / "vda.img"
    make_image(image, SIZE)
    d = start_daemon(str(image), "-x", "vda")
    vm = vms(image)

    bad = FakeGuestAgent(tmp_path / "qga-bad.sock", vm, d, fail="guest-fsfreeze-freeze")
    proc = fleeced("attach", "vda", "--qmp", vm.qmp, "--device", "vda", "--freeze",
                   "--qga", str(tmp_path / "qga-bad.sock"), "--control", d.control)
    bad.close()
    assert proc.returncode == 1 and "freeze refused" in proc.stderr, proc.stderr
    assert [c[0] for c in bad.calls] == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    assert vm.drive() == "disk0" and "fleeced-vda" not in vm.node_names()
    assert qmp(d, "query-attachments") == [] and qmp(d, "query-fleece") == []

    agent = FakeGuestAgent(tmp_path / "qga.sock", vm, d)
    proc = fleeced("attach", "vda", "--qmp", vm.qmp, "--device", "vda", "--freeze",
                   "--qga", str(tmp_path / "qga.sock"), "--control", d.control)
    agent.close()
    assert proc.returncode == 0, proc.stderr
    assert "session export vda@fleece" in proc.stdout
    assert agent.calls == [("guest-fsfreeze-freeze", "disk0", 0),
                           ("guest-fsfreeze-thaw", "fleeced-vda", 1)]
    assert fleeced("fleece", "stop", "vda", "--control", d.control).returncode == 0
    detach(d)
    assert vm.drive() == "disk0"


def test_freeze_around_the_session_start_of_a_qcow2_vm(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """--freeze on a VM QEMU copies before write for: frozen, then QEMU's
    filter and the session, then thawed; a refused freeze undoes the whole
    attach (no export, no disk) and still thaws."""
    img = tmp_path / "vda.qcow2"
    run(requires("qemu-img"), "create", "-q", "-f", "qcow2", str(img), str(SIZE))
    d = start_daemon()
    vm = vms(img, fmt="qcow2", paused=False)
    nodes = vm.node_names()
    bad = FakeGuestAgent(tmp_path / "qga-bad.sock", vm, d, fail="guest-fsfreeze-freeze")
    proc = fleeced("attach", "vda", "--qmp", vm.qmp, "--device", "vda", "--freeze",
                   "--qga", str(tmp_path / "qga-bad.sock"), "--control", d.control)
    bad.close()
    assert proc.returncode == 1 and "freeze refused" in proc.stderr, proc.stderr
    assert [c[0] for c in bad.calls] == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    assert vm.node_names() == nodes and vm.execute("query-block-exports") == []
    assert qmp(d, "query-attachments") == [] and qmp(d, "query-disks") == []

    agent = FakeGuestAgent(tmp_path / "qga.sock", vm, d)
    proc = fleeced("attach", "vda", "--qmp", vm.qmp, "--device", "vda", "--freeze",
                   "--qga", str(tmp_path / "qga.sock"), "--control", d.control)
    agent.close()
    assert proc.returncode == 0, proc.stderr
    assert "session export vda@fleece" in proc.stdout
    assert agent.calls == [("guest-fsfreeze-freeze", "disk0", 0),
                           ("guest-fsfreeze-thaw", "fleeced-vda", 1)]
    assert fleeced("fleece", "stop", "vda", "--control", d.control).returncode == 0
    detach(d)
    assert vm.node_names() == nodes


def test_detach_refuses_while_sessions_run(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """After detach guest writes bypass the daemon, so a running session's
    snapshot would silently go wrong: detach refuses (unless --force, which
    stops the sessions too)."""
    image = tmp_path / "vda.img"
    make_image(image, SIZE)
    d = start_daemon(str(image), "-x", "vda")
    vm = vms(image)
    attach(d, vm)
    assert fleeced("fleece", "start", "vda", "--control", d.control).returncode == 0
    proc = fleeced("detach", "vda", "--control", d.control)
    assert proc.returncode == 1 and "fleece-stop them first" in proc.stderr, proc.stderr
    assert vm.drive() == "fleeced-vda"
    proc = fleeced("detach", "vda", "--force", "--control", d.control)
    assert proc.returncode == 0, proc.stderr
    assert vm.drive() == "disk0" and qmp(d, "query-fleece") == []


def test_detach_force_forgets_a_vm_that_is_gone(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """The VM exited while attached: detach says it cannot reach it; --force
    forgets the attachment (there is nothing left to switch back)."""
    image = tmp_path / "vda.img"
    make_image(image, SIZE)
    d = start_daemon(str(image), "-x", "vda")
    vm = vms(image)
    attach(d, vm)
    vm.stop()
    proc = fleeced("detach", "vda", "--control", d.control)
    assert proc.returncode == 1 and "cannot connect to QMP socket" in proc.stderr, proc.stderr
    assert len(qmp(d, "query-attachments")) == 1  # type: ignore[arg-type]
    proc = fleeced("detach", "vda", "--force", "--control", d.control)
    assert proc.returncode == 0, proc.stderr
    assert qmp(d, "query-attachments") == []


def test_a_qmp_socket_that_never_greets_times_out(
        tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    """A QMP path where something accepts but never speaks (a VM whose
    monitor is held by another client looks like this): the attach fails
    after the connect timeout instead of hanging the control command."""
    import socket as socketmod
    import time

    image = tmp_path / "vda.img"
    make_image(image, SIZE)
    d = start_daemon(str(image), "-x", "vda")
    mute = socketmod.socket(socketmod.AF_UNIX)
    mute.bind(str(tmp_path / "mute.sock"))
    mute.listen(1)
    try:
        start = time.monotonic()
        with pytest.raises(ExecuteError, match="no greeting within 5s"):
            qmp(d, "vm-attach", {"disk": "vda", "qmp": str(tmp_path / "mute.sock"),
                                 "device": "vda"})
        assert time.monotonic() - start < 20
        assert qmp(d, "query-attachments") == []
    finally:
        mute.close()


def _dirty(d: Daemon, bitmap: str) -> list[tuple[int, int]]:
    import json

    out = run(requires("nbdinfo"), f"--map=qemu:dirty-bitmap:{bitmap}", "--json", d.url("vda"))
    return [(e["offset"], e["length"]) for e in json.loads(out.stdout) if e["type"] & 1]


def test_bitmaps_cover_the_detached_period(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """attach, write, detach, write while detached (HMP), re-attach: the
    bitmap holds both sets of writes (the detached ones through QEMU's own
    dirty bitmap, read back over QEMU's NBD server); the VM is left with no
    hand-off bitmap, NBD server or export."""
    image = tmp_path / "vda.img"
    make_image(image, SIZE)
    d = start_daemon(str(image), "-x", "vda", "--state-dir", str(tmp_path / "state"))
    vm = vms(image)
    attach(d, vm)
    qmp(d, "bitmap-add", {"disk": "vda", "name": "b1"})
    vm.write(0, 4096, 0x11)
    proc = fleeced("detach", "vda", "--control", d.control)
    assert proc.returncode == 0, proc.stderr
    vm.write(5 * K64 + 100, 4096, 0x22)  # bypasses the daemon
    attach(d, vm)
    vm.write(9 * K64, 512, 0x33)
    assert _dirty(d, "b1") == [(0, K64), (5 * K64, K64), (9 * K64, K64)]
    b1 = qmp(d, "query-bitmaps")[0]  # type: ignore[index]
    assert not b1["in-use-recovered"]
    assert vm.execute("query-block-exports") == []
    nodes = vm.execute("query-named-block-nodes", flat=True)
    assert all(not n.get("dirty-bitmaps") for n in nodes), nodes
    detach(d)


def test_bitmaps_go_all_dirty_when_the_hand_off_is_lost(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """The VM restarted while detached (its hand-off bitmap is gone): at the
    next attach every bitmap is all dirty, with the reason, never silently
    wrong."""
    image = tmp_path / "vda.img"
    make_image(image, SIZE)
    d = start_daemon(str(image), "-x", "vda", "--state-dir", str(tmp_path / "state"))
    vm = vms(image)
    attach(d, vm)
    qmp(d, "bitmap-add", {"disk": "vda", "name": "b1"})
    detach(d)
    vm.stop()
    vm2 = vms(image)  # same QMP path layout, new process: no hand-off bitmap
    vm2.write(K64, 4096, 0x44)
    proc = fleeced("attach", "vda", "--qmp", vm2.qmp, "--device", "vda", "--control",
                   d.control)
    assert proc.returncode == 0, proc.stderr
    b1 = qmp(d, "query-bitmaps")[0]  # type: ignore[index]
    assert b1["in-use-recovered"] and b1["dirty-bytes"] == SIZE, b1
    assert "hand-off" in b1["reason"] or "another VM" in b1["reason"], b1
    detach(d)


def test_a_crash_while_detached_keeps_the_bitmaps_clean(
        tmp_path: Path, start_daemon: Callable[..., Daemon], vms: Callable[..., Vm]) -> None:
    """vm-detach marks the persistent bitmaps clean: a kill -9 of the daemon
    while the disk is detached loses nothing (the bitmap reloads exact, not
    all dirty), and the hand-off still covers the detached writes."""
    image = tmp_path / "vda.img"
    make_image(image, SIZE)
    state, sock, ctl = str(tmp_path / "state"), str(tmp_path / "n.sock"), str(tmp_path / "c.sock")
    d = start_daemon(str(image), "-x", "vda", "--state-dir", state, sock=sock, control=ctl)
    vm = vms(image)
    attach(d, vm)
    qmp(d, "bitmap-add", {"disk": "vda", "name": "b1"})
    vm.write(0, 4096, 0x11)
    detach(d)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    vm.write(2 * K64, 4096, 0x22)  # detached: QEMU's hand-off bitmap records it
    d2 = start_daemon(str(image), "-x", "vda", "--state-dir", state, sock=sock, control=ctl)
    b1 = qmp(d2, "query-bitmaps")[0]  # type: ignore[index]
    assert not b1["in-use-recovered"] and b1["dirty-bytes"] == K64, b1
    attach(d2, vm)
    assert _dirty(d2, "b1") == [(0, K64), (2 * K64, K64)]
    detach(d2)
