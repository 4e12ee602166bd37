"""Fleecing through real clients: QEMU's image-fleecing pattern table and more.

Writes go to the active export with qemu-io; the snapshot export is read with
``qemu-io -r`` and patterns, and compared with ``qemu-img compare`` against a
copy of the image taken before the session started.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, make_image, requires, requires_libnbd_python, run

pytestmark = pytest.mark.integration

MiB = 1 << 20

# (pattern, offset, length) as in qemu-iotests/tests/image-fleecing
PATTERNS = [("0x5d", "0", "64k"), ("0xd5", "1M", "64k"), ("0xdc", "32M", "64k"),
            ("0xcd", "0x3ff0000", "64k")]
OVERWRITE = [
    ("0xab", "0", "64k"),  # full overwrite
    ("0xad", "0x00f8000", "64k"),  # partial-left (1M-32k)
    ("0x1d", "0x2008000", "64k"),  # partial-right (32M+32k)
    ("0xea", "0x3fe0000", "64k"),  # adjacent-left (64M-128k)
]
ZEROES = [("0", "0x00f8000", "32k"), ("0", "0x2010000", "32k"), ("0", "0x3fe0000", "64k")]
REMAINDER = [("0xd5", "0x108000", "32k"), ("0xdc", "32M", "32k"), ("0xcd", "0x3ff0000", "64k")]


def qemu_io(url: str, *cmds: str, read_only: bool = False,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    tool = requires("qemu-io")
    args = [a for c in cmds for a in ("-c", c)]
    ro = ["-r"] if read_only else []
    proc = run(tool, *ro, "-f", "raw", *args, url, check=check)
    if check:
        assert "Pattern verification failed" not in proc.stdout, proc.stdout
        assert "failed" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


def qmp(d: Daemon, cmd: str, args: dict[str, object] | None = None) -> object:
    """Run one control command with QEMU's qemu.qmp library; return its result."""
    import asyncio

    from qemu.qmp import QMPClient

    async def go() -> object:
        client = QMPClient("test")
        await client.connect(d.control)
        try:
            return await client.execute(cmd, args or {})
        finally:
            await client.disconnect()

    return asyncio.run(go())


def snapshot_client(d: Daemon, export: str = "disk@fleece") -> str:
    """The start of a libnbd script: `h` connected to EXPORT (the snapshot)."""
    return f"""
import nbd, sys
h = nbd.NBD()
h.set_export_name({export!r})
h.connect_unix({d.sock!r})
"""


def held_reads(script: str, meanwhile: Callable[[], None], timeout: float = 60) -> bytes:
    """Run a libnbd SCRIPT that sends its reads, prints "sent", waits for a
    line on stdin before it reads any reply, then writes its data to stdout;
    MEANWHILE runs between the two.  Returns the data."""
    py = requires_libnbd_python()
    proc = subprocess.Popen([py, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"sent\n"
        meanwhile()
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        got = proc.stdout.read()
        assert proc.wait(timeout) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return got


def read_export(d: Daemon, export: str, out: Path) -> bytes:
    run(requires("qemu-img"), "convert", "-f", "raw", "-O", "raw", d.url(export), str(out))
    return out.read_bytes()


def fleece_list(d: Daemon) -> list[dict[str, object]]:
    result = qmp(d, "query-fleece")
    assert isinstance(result, list)
    return result


@pytest.fixture
def fleece_image(tmp_path: Path) -> tuple[Path, Path]:
    """A 64 MiB image with the image-fleecing patterns, and a pristine copy."""
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    tool = requires("qemu-io")
    for p, off, length in PATTERNS:
        run(tool, "-f", "raw", "-c", f"write -P {p} {off} {length}", str(img))
    ref = tmp_path / "ref.img"
    shutil.copyfile(img, ref)
    return img, ref


def test_image_fleecing_pattern_table(start_daemon, fleece_image, tmp_path: Path) -> None:
    qemu_img = requires("qemu-img")
    img, ref = fleece_image
    d = start_daemon(str(img), "--fleece")
    active, snap = d.url("disk"), d.url("disk@fleece")
    # snapshot sees the original patterns
    qemu_io(snap, *(f"read -P {p} {o} {n}" for p, o, n in PATTERNS), read_only=True)
    # overwrite through the active export
    qemu_io(active, *(f"write -P {p} {o} {n}" for p, o, n in OVERWRITE))
    # the snapshot is unchanged: original patterns and zeros where there were none
    qemu_io(snap, *(f"read -P {p} {o} {n}" for p, o, n in PATTERNS), read_only=True)
    qemu_io(snap, *(f"read -P {p} {o} {n}" for p, o, n in ZEROES), read_only=True)
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(ref), snap)
    # the active export has the new data plus the untouched remainder
    qemu_io(active, *(f"read -P {p} {o} {n}" for p, o, n in OVERWRITE),
            *(f"read -P {p} {o} {n}" for p, o, n in REMAINDER), read_only=True)
    # and the snapshot really differs from the live disk now
    diff = run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(img), snap, check=False)
    assert diff.returncode == 1
    (s,) = fleece_list(d)
    assert s["state"] == "active"
    clusters = s["clusters"]
    assert isinstance(clusters, dict)
    # full (1) + partial-left (2) + partial-right (2) + adjacent (1) clusters
    # preserved; those that were holes in the source cost no temp bytes
    assert clusters["copied"] + clusters["zero"] == 6
    assert s["temp-bytes"] == clusters["copied"] * 65536
    assert d.stop() == 0


def test_odd_sized_disk_last_and_crossing_clusters(start_daemon, tmp_path: Path) -> None:
    qemu_img = requires("qemu-img")
    img = tmp_path / "odd.img"
    size = 5 * MiB + 12345
    make_image(img, size, seed=3)
    ref = tmp_path / "ref.img"
    shutil.copyfile(img, ref)
    d = start_daemon(str(img), "--fleece=bk", "--cluster-size", "64K")
    active, snap = d.url("odd"), d.url("odd@bk")
    qemu_io(active,
            f"write -P 0x11 {size - 1000} 1000",  # last, short cluster
            "write -P 0x22 60k 200k",  # crossing several clusters
            "write -z 2M 1M",
            "discard 3M 64k")
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(ref), snap)
    assert d.stop() == 0
    data = img.read_bytes()
    assert data[size - 1000:] == b"\x11" * 1000
    assert data[60 * 1024:260 * 1024] == b"\x22" * 200 * 1024


def test_discard_on_snapshot(start_daemon, fleece_image, tmp_path: Path) -> None:
    img, _ref = fleece_image
    d = start_daemon(str(img), "--fleece")
    active, snap = d.url("disk"), d.url("disk@fleece")
    qemu_io(active, "write -P 0x77 0 128k")  # clusters 0 and 1 copied
    before = fleece_list(d)[0]
    # preserved: as data, or as zeros where the source had a hole
    assert before["clusters"]["copied"] + before["clusters"]["zero"] == 2  # type: ignore[index]
    # unaligned discard rounds inward: only cluster 1 (64k..128k) is dropped
    qemu_io(snap, "discard 1k 160k")
    after = fleece_list(d)[0]
    assert after["clusters"]["discarded"] == 1  # type: ignore[index]
    # cluster 0 is still readable (partially covered, so kept)
    qemu_io(snap, "read -P 0x5d 0 64k", read_only=True)
    # cluster 1 is gone: EPERM
    out = qemu_io(snap, "read 64k 64k", read_only=True, check=False)
    assert "Operation not permitted" in out.stdout + out.stderr
    # aligned discard of a never-copied cluster, then a guest write there costs no CBW
    qemu_io(snap, "discard 1M 64k")
    cbw_before = fleece_list(d)[0]["cbw-count"]
    qemu_io(active, "write -P 0x99 1M 64k")
    assert fleece_list(d)[0]["cbw-count"] == cbw_before
    out = qemu_io(snap, "read 1M 64k", read_only=True, check=False)
    assert "Operation not permitted" in out.stdout + out.stderr
    # writes to the snapshot are refused
    out = qemu_io(snap, "write -P 1 2M 4k", check=False)
    assert "Operation not permitted" in out.stdout + out.stderr


def test_snapshot_export_flags(start_daemon, fleece_image) -> None:
    nbdinfo = requires("nbdinfo")
    img, _ = fleece_image
    d = start_daemon(str(img), "--fleece")
    e = json.loads(run(nbdinfo, "--json", d.url("disk@fleece")).stdout)["exports"][0]
    assert e["is_read_only"] is False
    assert e["can_trim"] is True
    assert e["can_zero"] is False
    qmp(d, "fleece-start", {"disk": "disk", "name": "ro", "read-only": True})
    e = json.loads(run(nbdinfo, "--json", d.url("disk@ro")).stdout)["exports"][0]
    assert e["is_read_only"] is True
    assert e["can_trim"] is False


def test_exact_error_values_with_libnbd(start_daemon, fleece_image, tmp_path: Path) -> None:
    py = requires_libnbd_python()
    img, _ = fleece_image
    d = start_daemon(str(img), "--fleece")
    qemu_io(d.url("disk"), "write -P 1 0 64k")
    qemu_io(d.url("disk@fleece"), "discard 0 64k")
    script = f"""
import errno, nbd
h = nbd.NBD()
h.set_strict_mode(0)
h.set_export_name("disk@fleece")
h.connect_unix({d.sock!r})
def err(f):
    try:
        f()
    except nbd.Error as e:
        return e.errnum
    return 0
print(err(lambda: h.pread(4096, 0)))           # discarded -> EPERM
print(err(lambda: h.pwrite(b"x" * 512, 1 << 20)))  # write on snapshot -> EPERM
print(err(lambda: h.pread(4096, 64 << 20)))    # beyond end -> EINVAL
print(len(h.pread(4096, 1 << 20)))             # still serving
"""
    out = run(py, "-c", script).stdout.split()
    import errno

    assert out == [str(errno.EPERM), str(errno.EPERM), str(errno.EINVAL), "4096"]


def test_scope_bitmap(start_daemon, fleece_image) -> None:
    img, _ = fleece_image
    d = start_daemon(str(img))
    qmp(d, "fleece-start", {"disk": "disk", "name": "inc",
                            "bitmap": [{"offset": 1 * MiB, "length": 64 * 1024}]})
    snap = d.url("disk@inc")
    qemu_io(d.url("disk"), "write -P 0x01 0 64k", "write -P 0x02 1M 64k")
    s = fleece_list(d)[0]
    assert s["cbw-count"] == 1
    qemu_io(snap, "read -P 0xd5 1M 64k", read_only=True)
    out = qemu_io(snap, "read 0 64k", read_only=True, check=False)
    assert "Operation not permitted" in out.stdout + out.stderr


def _policy_daemon(start_daemon, img: Path, policy: str) -> Daemon:
    d = start_daemon(str(img))
    qmp(d, "fleece-start", {"disk": "disk", "on-cbw-error": policy, "max-temp": 128 * 1024})
    return d


def test_max_temp_break_snapshot(start_daemon, fleece_image) -> None:
    img, _ = fleece_image
    d = _policy_daemon(start_daemon, img, "break-snapshot")
    # three clusters of CBW: the third exceeds 128 KiB of temp
    qemu_io(d.url("disk"), "write -P 0x61 0 64k", "write -P 0x62 1M 64k",
            "write -P 0x63 32M 64k", "write -P 0x64 48M 64k")
    s = fleece_list(d)[0]
    assert s["state"] == "broken"
    assert s["temp-bytes"] == 0
    out = qemu_io(d.url("disk@fleece"), "read 0 64k", read_only=True, check=False)
    assert "Input/output error" in out.stdout + out.stderr
    assert d.stop() == 0
    data = img.read_bytes()  # every guest write landed
    for pat, off in ((0x61, 0), (0x62, MiB), (0x63, 32 * MiB), (0x64, 48 * MiB)):
        assert data[off:off + 65536] == bytes([pat]) * 65536


def test_max_temp_break_guest_write(start_daemon, fleece_image) -> None:
    img, ref = fleece_image
    d = _policy_daemon(start_daemon, img, "break-guest-write")
    qemu_io(d.url("disk"), "write -P 0x61 0 64k", "write -P 0x62 1M 64k")
    out = qemu_io(d.url("disk"), "write -P 0x63 32M 64k", check=False)
    assert "No space left on device" in out.stdout + out.stderr
    s = fleece_list(d)[0]
    assert s["state"] == "active"
    # the snapshot is intact, including the cluster whose write failed
    run(requires("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(ref), d.url("disk@fleece"))
    assert d.stop() == 0
    data = img.read_bytes()
    assert data[32 * MiB:32 * MiB + 65536] == ref.read_bytes()[32 * MiB:32 * MiB + 65536]


@pytest.mark.parametrize("policy", ["break-snapshot", "break-guest-write"])
def test_injected_temp_io_error(start_daemon, fleece_image, policy: str) -> None:
    img, ref = fleece_image
    d = start_daemon(str(img), env={"FLEECED_TEST_HOOKS": "1"})
    qmp(d, "fleece-start", {"disk": "disk", "on-cbw-error": policy})
    qmp(d, "x-inject-cbw-error", {"disk": "disk", "name": "fleece", "errno": 5, "count": 1})
    out = qemu_io(d.url("disk"), "write -P 0x42 0 64k", check=False)
    s = fleece_list(d)[0]
    if policy == "break-snapshot":
        assert "failed" not in out.stdout + out.stderr
        assert s["state"] == "broken"
        assert s["error"] == "Input/output error"
    else:
        assert "Input/output error" in out.stdout + out.stderr
        assert s["state"] == "active"
        run(requires("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(ref),
            d.url("disk@fleece"))
    assert d.stop() == 0
    expect = b"\x42" * 65536 if policy == "break-snapshot" else ref.read_bytes()[:65536]
    assert img.read_bytes()[:65536] == expect


def test_concurrent_writers_while_backup(start_daemon, tmp_path: Path) -> None:
    fio = requires("fio")
    nbdcopy = requires("nbdcopy")
    img = tmp_path / "disk.img"
    make_image(img, 128 * MiB, seed=11)
    ref = tmp_path / "ref.img"
    shutil.copyfile(img, ref)
    d = start_daemon(str(img), "--fleece", "--cache", "8M")
    backup = tmp_path / "backup.img"
    writer = subprocess.Popen(
        [fio, "--name=w", "--ioengine=nbd", f"--uri={d.url('disk')}", "--rw=randwrite",
         "--bsrange=4k-1M", "--iodepth=8", "--numjobs=2", "--size=64M",
         "--offset_increment=64M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
         "--verify_state_save=0",
         "--group_reporting"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        run(nbdcopy, "--connections=2", d.url("disk@fleece"), str(backup), timeout=300)
    finally:
        out, _ = writer.communicate(timeout=300)
    assert writer.returncode == 0, out
    assert backup.read_bytes() == ref.read_bytes()
    s = fleece_list(d)[0]
    assert s["state"] == "active"
    assert s["cbw-count"] > 0
    assert d.stop() == 0
    assert img.read_bytes() != ref.read_bytes()


def test_two_sessions_each_keep_their_point_in_time(start_daemon, fleece_image) -> None:
    img, _ = fleece_image
    d = start_daemon(str(img))
    qmp(d, "fleece-start", {"disk": "disk", "name": "t1"})
    qemu_io(d.url("disk"), "write -P 0x01 0 64k")
    qmp(d, "fleece-start", {"disk": "disk", "name": "t2", "cluster-size": 4096})
    qemu_io(d.url("disk"), "write -P 0x02 0 64k", "write -P 0x03 1M 4k")
    qemu_io(d.url("disk@t1"), "read -P 0x5d 0 64k", "read -P 0xd5 1M 4k", read_only=True)
    qemu_io(d.url("disk@t2"), "read -P 0x01 0 64k", "read -P 0xd5 1M 4k", read_only=True)
    qemu_io(d.url("disk"), "read -P 0x02 0 64k", "read -P 0x03 1M 4k", read_only=True)
    # stopping one leaves the other intact
    qmp(d, "fleece-stop", {"disk": "disk", "name": "t1"})
    qemu_io(d.url("disk@t2"), "read -P 0x01 0 64k", read_only=True)
    assert [s["name"] for s in fleece_list(d)] == ["t2"]


def test_fleece_stop_disconnects_snapshot_clients(start_daemon, fleece_image) -> None:
    py = requires_libnbd_python()
    img, _ = fleece_image
    d = start_daemon(str(img), "--fleece")
    # a client holds the snapshot export open while the session stops
    script = snapshot_client(d) + """
assert len(h.pread(4096, 0)) == 4096
sys.stdout.write("connected\\n"); sys.stdout.flush()
sys.stdin.readline()
try:
    h.pread(4096, 0)
    print("still served")
except nbd.Error as e:
    print("disconnected")
"""
    proc = subprocess.Popen([py, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "connected"
    qmp(d, "fleece-stop", {"disk": "disk", "name": "fleece"})
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "disconnected"
    proc.wait(30)
    # the active export still works
    qemu_io(d.url("disk"), "read -P 0x5d 0 64k", read_only=True)


def test_snapshot_reply_still_in_the_socket_keeps_the_old_data(start_daemon, fleece_image,
                                                              tmp_path: Path) -> None:
    """A snapshot READ reply the client has not read yet must not
    change when the guest overwrites the range afterwards.  Replies of the
    active export go out with sendfile(2), which queues references to
    page-cache pages, not copies (a later write to the file changes what
    the peer reads); the snapshot export must copy (its reply is the old
    data, whatever the guest does next)."""
    img, ref = fleece_image
    d = start_daemon(str(img), "--fleece")
    script = snapshot_client(d) + """
buf = nbd.Buffer(1 << 20)
cookie = h.aio_pread(buf, 0)
print("sent", flush=True)
sys.stdin.readline()           # the guest has overwritten the range
while not h.aio_command_completed(cookie):
    h.poll(-1)
sys.stdout.buffer.write(buf.to_bytearray())
"""

    def overwrite_once_answered() -> None:
        # Wait until the daemon has answered the read (it is then in the
        # socket, unread), then overwrite the range through the active export.
        deadline = time.monotonic() + 20
        while True:
            stats = qmp(d, "query-stats")
            assert isinstance(stats, dict)
            snap = next(e for e in stats["exports"] if e["name"] == "disk@fleece")
            if snap["bytes-read"] >= 1 << 20:
                break
            assert time.monotonic() < deadline, "the snapshot read was never answered"
            time.sleep(0.01)
        qemu_io(d.url("disk"), "write -P 0x5a 0 1M")
        qemu_io(d.url("disk"), "read -P 0x5a 0 1M", read_only=True)

    got = held_reads(script, overwrite_once_answered, timeout=30)
    assert got == ref.read_bytes()[: 1 << 20]
    assert d.stop() == 0


@pytest.mark.parametrize("export", ["disk", "disk@fleece"])
def test_pipelined_big_reads_to_a_client_that_reads_late(start_daemon, tmp_path: Path,
                                                        export: str) -> None:
    """48 READs of 1 MiB, all sent before the client reads a byte,
    fill the socket many times over.  Replies that cannot go out wait unread
    (a worker that finds the socket stalled hands its read back) and go to
    workers as the client drains.  Every reply must arrive whole and right;
    for the snapshot, even though the guest overwrote the range (and was
    acknowledged) before the reads waiting in the daemon were done."""
    img = tmp_path / "disk.img"
    data = make_image(img, 64 * MiB, seed=9)
    d = start_daemon(str(img), "--fleece")
    script = snapshot_client(d, export) + """
bufs = [nbd.Buffer(1 << 20) for _ in range(48)]
pending = {h.aio_pread(b, i << 20): i for i, b in enumerate(bufs)}
print("sent", flush=True)
sys.stdin.readline()
while pending:
    h.poll(-1)
    for c in [c for c in pending if h.aio_command_completed(c)]:
        del pending[c]
for b in bufs:
    sys.stdout.buffer.write(b.to_bytearray())
"""

    def overwrite() -> None:
        if export == "disk@fleece":
            qemu_io(d.url("disk"), "write -P 0x5a 0 48M")

    got = held_reads(script, overwrite)
    assert got == data[: 48 * MiB]
    assert d.stop() == 0


def test_pipelined_small_writes_under_fleecing(start_daemon, tmp_path: Path) -> None:
    """WRITEs sent back to back are taken in runs (checked in C on
    the loop, written by one worker each run).  About 340 of them, 4 KiB
    and 64 KiB, some FUA, pairs in the same cluster, none overlapping, all
    sent before the client waits for any: every one lands on the image, the
    snapshot keeps every old byte (copy-before-write ran for each), and
    each was acknowledged."""
    img = tmp_path / "disk.img"
    data = make_image(img, 64 * MiB, seed=12)
    d = start_daemon(str(img), "--fleece")
    script = snapshot_client(d, "disk") + """
import random
rnd = random.Random(5)
writes = []  # never overlapping: NBD orders no two writes in flight
for slot in rnd.sample(range(1024), 200):  # 64 KiB slots
    if rnd.random() < 0.3:
        extents = [(slot << 16, 65536)]
    else:  # two writes into the same cluster
        a, b = rnd.sample(range(16), 2)
        extents = [((slot << 16) + (a << 12), 4096), ((slot << 16) + (b << 12), 4096)]
    for off, n in extents:
        writes.append((off, bytes([len(writes) % 251 + 1]) * n, rnd.random() < 0.1))
bufs = [nbd.Buffer.from_bytearray(bytearray(b)) for _off, b, _fua in writes]
pending = {h.aio_pwrite(buf, off, flags=nbd.CMD_FLAG_FUA if fua else 0): i
           for i, (buf, (off, _b, fua)) in enumerate(zip(bufs, writes))}
while pending:
    h.poll(-1)
    for c in [c for c in pending if h.aio_command_completed(c)]:
        del pending[c]
for off, b, _fua in writes:
    sys.stdout.buffer.write(off.to_bytes(8, "big") + len(b).to_bytes(4, "big") + b[:1])
"""
    py = requires_libnbd_python()
    out = subprocess.run([py, "-c", script], capture_output=True, timeout=120, check=True).stdout
    expect = bytearray(data)
    for i in range(0, len(out), 13):
        off, n, byte = int.from_bytes(out[i:i + 8]), int.from_bytes(out[i + 8:i + 12]), out[i + 12]
        expect[off:off + n] = bytes([byte]) * n
    assert read_export(d, "disk@fleece", tmp_path / "snap.img") == data
    assert read_export(d, "disk", tmp_path / "active.img") == expect
    assert fleece_list(d)[0]["cbw-count"] > 0
    assert d.stop() == 0
    assert img.read_bytes() == expect
