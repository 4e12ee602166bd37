"""Backup progress: query-fleece's exact count, FLEECE_PROGRESS events at a
bounded rate, and ``fleece list`` / ``fleece list --watch``, with real
readers (qemu-io, nbdcopy, libnbd) on both data planes."""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fleeced.control.client import ControlClient
from tests.conftest import Daemon, make_image, requires, requires_libnbd_python, run
from tests.integration.test_cli import fleeced
from tests.integration.test_fleece import qmp

pytestmark = pytest.mark.integration

CS = 65536
SIZE = 16 * CS + 12345          # the tail cluster is short
TAIL = SIZE - 16 * CS
PLANES = ("native", "loop")


def progress(d: Daemon, name: str = "fleece") -> dict[str, int]:
    sessions: Any = qmp(d, "query-fleece")
    (s,) = [s for s in sessions if s["name"] == name]
    return dict(s["progress"])


def qemu_io_read(d: Daemon, *ranges: tuple[int, int], export: str = "disk@fleece") -> None:
    args = []
    for off, length in ranges:
        args += ["-c", f"read {off} {length}"]
    run(requires("qemu-io"), "-r", "-f", "raw", *args, d.url(export))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    make_image(img, SIZE)       # random bytes: no holes, every cluster is data
    return img


@pytest.mark.parametrize("plane", PLANES)
def test_partial_reads_count_the_clusters_they_touch(
        image: Path, start_daemon: Callable[..., Daemon], plane: str) -> None:
    d = start_daemon(str(image), "--data-plane", plane)
    qmp(d, "fleece-start", {"disk": "disk"})
    assert progress(d) == {"read": 0, "total": SIZE}
    # Block status reads nothing.
    run(requires("nbdinfo"), "--map", d.url("disk@fleece"))
    assert progress(d) == {"read": 0, "total": SIZE}
    # One byte counts its cluster; a read across a boundary both; a second
    # read of a cluster nothing more; the short tail its own bytes.
    qemu_io_read(d, (10, 1))
    assert progress(d) == {"read": CS, "total": SIZE}
    qemu_io_read(d, (CS - 512, 1024), (100, 4096))
    assert progress(d) == {"read": 2 * CS, "total": SIZE}
    qemu_io_read(d, (5 * CS, 3 * CS))
    assert progress(d) == {"read": 5 * CS, "total": SIZE}
    qemu_io_read(d, (SIZE - 57, 57))
    assert progress(d) == {"read": 5 * CS + TAIL, "total": SIZE}
    # Guest writes (copy-before-write) read nothing of the snapshot.
    run(requires("qemu-io"), "-f", "raw", "-c", f"write -P 7 {10 * CS} {CS}", d.url("disk"))
    assert progress(d) == {"read": 5 * CS + TAIL, "total": SIZE}


@pytest.mark.parametrize("plane", PLANES)
def test_nbdcopy_full_read_is_100_percent(
        tmp_path: Path, image: Path, start_daemon: Callable[..., Daemon], plane: str) -> None:
    d = start_daemon(str(image), "--data-plane", plane)
    qmp(d, "fleece-start", {"disk": "disk"})
    run(requires("nbdcopy"), d.url("disk@fleece"), str(tmp_path / "backup.img"))
    assert (tmp_path / "backup.img").read_bytes() == image.read_bytes()
    assert progress(d) == {"read": SIZE, "total": SIZE}
    listing = fleeced("fleece", "list", "--control", d.control)
    assert listing.returncode == 0, listing.stderr
    assert "READ" in listing.stdout
    assert "100.0% (1.0 MiB of 1.0 MiB)" in listing.stdout


@pytest.mark.parametrize("plane", PLANES)
def test_a_sparse_disk_backed_up_by_the_map_reaches_100_percent(
        tmp_path: Path, start_daemon: Callable[..., Daemon], plane: str) -> None:
    """nbdcopy skips what base:allocation says reads as zeros: those
    clusters count as backed up, so a sparse disk's full backup ends at
    100%; qemu:allocation-depth and partial zero clusters count nothing."""
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
        for c in (0, 5, 6):
            f.seek(c * CS + 100)
            f.write(os.urandom(4096))
    d = start_daemon(str(img), "--data-plane", plane)
    qmp(d, "fleece-start", {"disk": "disk"})
    nbdinfo = requires("nbdinfo")
    run(nbdinfo, "--map=qemu:allocation-depth", d.url("disk@fleece"))
    assert progress(d) == {"read": 0, "total": SIZE}
    # Cluster 1 whole and cluster 2 in part: one cluster.
    script = (
        "import nbd, sys\n"
        "h = nbd.NBD()\n"
        "h.add_meta_context('base:allocation')\n"
        "h.connect_uri(sys.argv[1])\n"
        f"h.block_status({CS + 4096}, {CS}, lambda *a: 0)\n"
        "h.shutdown()\n")
    run(requires_libnbd_python(), "-c", script, d.url("disk@fleece"))
    assert progress(d) == {"read": CS, "total": SIZE}
    run(requires("nbdcopy"), d.url("disk@fleece"), str(tmp_path / "backup.img"))
    assert (tmp_path / "backup.img").read_bytes() == img.read_bytes()
    assert progress(d) == {"read": SIZE, "total": SIZE}


@pytest.mark.parametrize("plane", PLANES)
def test_incremental_total_is_the_scope(
        tmp_path: Path, image: Path, start_daemon: Callable[..., Daemon], plane: str) -> None:
    d = start_daemon(str(image), "--data-plane", plane, "--state-dir", str(tmp_path / "st"))
    qmp(d, "fleece-start", {"disk": "disk", "checkpoint": "c1"})
    qmp(d, "fleece-stop", {"disk": "disk"})
    run(requires("qemu-io"), "-f", "raw", "-c", f"write -P 1 {CS} 10",
        "-c", f"write -P 2 {SIZE - 5} 5", d.url("disk"))
    qmp(d, "fleece-start", {"disk": "disk", "checkpoint": "c2", "since": "c1"})
    scope = CS + TAIL
    assert progress(d) == {"read": 0, "total": scope}
    # Outside the scope a read fails and counts nothing.
    proc = run(requires("qemu-io"), "-r", "-f", "raw", "-c", "read 0 512",
               d.url("disk@fleece"), check=False)
    assert "failed" in proc.stdout + proc.stderr
    assert progress(d) == {"read": 0, "total": scope}
    qemu_io_read(d, (CS, CS))
    assert progress(d) == {"read": CS, "total": scope}
    qemu_io_read(d, (16 * CS, TAIL))
    assert progress(d) == {"read": scope, "total": scope}


SLOW_READER = f"""
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for c in range(int(sys.argv[2])):
    h.pread(512, c * {CS})
    time.sleep(0.2)
h.pread(h.get_size() - 16 * {CS}, 16 * {CS})
"""


@pytest.mark.parametrize("plane", PLANES)
def test_progress_events_at_a_bounded_rate(
        image: Path, start_daemon: Callable[..., Daemon], plane: str) -> None:
    """A reader that touches a cluster every 0.2 s for 3 s: the events come at
    most once a second, the last one says 100%, and they agree with
    query-fleece."""
    py = requires_libnbd_python()
    d = start_daemon(str(image), "--data-plane", plane)

    async def go() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        async with ControlClient.connect_to(d.control) as client:
            with client.listen("FLEECE_PROGRESS") as listener:
                await client.execute("fleece-start", {"disk": "disk"})
                reader = await asyncio.create_subprocess_exec(
                    py, "-c", SLOW_READER, d.url("disk@fleece"), "16")
                try:
                    async with asyncio.timeout(60):
                        while not got or got[-1]["data"]["read"] < SIZE:
                            ev = await client.next_event(listener, 60)
                            if ev is not None:
                                got.append(ev)
                finally:
                    assert await reader.wait() == 0
        return got

    events = asyncio.run(go())
    assert events[0]["data"] == {"disk": "disk", "name": "fleece", "export": "disk@fleece",
                                 "read": 0, "total": SIZE}
    assert events[-1]["data"]["read"] == SIZE
    reads = [e["data"]["read"] for e in events]
    assert reads == sorted(reads) and len(set(reads)) == len(reads)
    stamps = [e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
              for e in events]
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    # At most one a second, the one at 100% excepted (the clocks differ
    # by the emit's own microseconds: allow 50 ms).
    assert all(g >= 0.95 for g in gaps[:-1]), gaps
    # One at the start, one a second at most, one at 100%: not one per
    # cluster read (17 reads), however slowly the machine ran the reader.
    assert 3 <= len(events) <= stamps[-1] - stamps[0] + 2, (reads, gaps)
    assert progress(d) == {"read": SIZE, "total": SIZE}


class Lines:
    """Lines of a child's stdout, each wait bounded."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""
        self.seen: list[str] = []

    def until(self, pred: Callable[[str], bool], timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.fd, selectors.EVENT_READ)
            while True:
                while b"\n" in self.buf:
                    line, self.buf = self.buf.split(b"\n", 1)
                    text = line.decode()
                    self.seen.append(text)
                    if pred(text):
                        return text
                left = deadline - time.monotonic()
                assert left > 0, f"no such line within {timeout}s: {self.seen}"
                if sel.select(left):
                    chunk = os.read(self.fd, 65536)
                    if not chunk:
                        raise AssertionError(f"EOF; lines: {self.seen}")
                    self.buf += chunk


def watch(d: Daemon) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "fleeced", "fleece", "list", "--watch",
                             "--control", d.control],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)


def test_watch_without_a_tty_follows_and_ends_with_the_session(
        tmp_path: Path, image: Path, start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon(str(image))
    qmp(d, "fleece-start", {"disk": "disk"})
    proc = watch(d)
    try:
        out = Lines(proc)
        out.until(lambda s: s == "disk/fleece (disk@fleece): 0.0% (0 B of 1.0 MiB)")
        qemu_io_read(d, (0, 8 * CS))
        out.until(lambda s: s.startswith("disk/fleece (disk@fleece): 49.4% (512.0 KiB"))
        run(requires("nbdcopy"), d.url("disk@fleece"), str(tmp_path / "backup.img"))
        out.until(lambda s: s.endswith("100.0% (1.0 MiB of 1.0 MiB)"))
        qmp(d, "fleece-stop", {"disk": "disk"})
        out.until(lambda s: s == "disk/fleece: stopped")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.stderr is not None and proc.stderr.read() == b""


def test_watch_ends_on_sigint_and_when_the_daemon_goes(
        image: Path, start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon(str(image))
    qmp(d, "fleece-start", {"disk": "disk"})
    proc = watch(d)
    Lines(proc).until(lambda s: "0.0%" in s)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()

    proc = watch(d)
    Lines(proc).until(lambda s: "0.0%" in s)
    d.proc.kill()
    d.proc.wait()
    assert proc.wait(30) == 1
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    assert err.startswith("fleeced: the daemon went away"), err
    assert len(err.splitlines()) == 1, err


def test_watch_with_no_session_and_bad_flags(start_daemon: Callable[..., Daemon],
                                             image: Path) -> None:
    d = start_daemon(str(image))
    proc = fleeced("fleece", "list", "--watch", "--control", d.control)
    assert (proc.returncode, proc.stdout) == (0, "no fleecing sessions\n")
    proc = fleeced("fleece", "list", "--watch", "--json", "--control", d.control)
    assert proc.returncode == 2 and "--watch" in proc.stderr
    assert json.loads(fleeced("fleece", "list", "--json", "--control", d.control).stdout) == []


class TtyWatch:
    """``fleece list --watch`` with its stdout on a pty, as on a terminal."""

    def __init__(self, d: Daemon) -> None:
        import pty

        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleeced", "fleece", "list", "--watch",
             "--control", d.control], stdout=slave, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, env=dict(os.environ, TERM="xterm", COLUMNS="120"))
        os.close(slave)
        self.screen = b""

    def read_until(self, needle: bytes | None) -> None:
        """Read the screen until NEEDLE is on it, or (None) until the end."""
        deadline = time.monotonic() + 30
        with selectors.DefaultSelector() as sel:
            sel.register(self.master, selectors.EVENT_READ)
            while needle is None or needle not in self.screen:
                left = deadline - time.monotonic()
                assert left > 0, self.screen
                if sel.select(left):
                    try:
                        chunk = os.read(self.master, 65536)
                    except OSError:     # EIO: the pty's other side is closed
                        chunk = b""
                    if not chunk:
                        assert needle is None, self.screen
                        return
                    self.screen += chunk

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


def test_watch_on_a_tty_draws_bars(tmp_path: Path, image: Path,
                                   start_daemon: Callable[..., Daemon]) -> None:
    """On a terminal (a pty) the watch draws rich bars and still ends with
    the session."""
    d = start_daemon(str(image))
    qmp(d, "fleece-start", {"disk": "disk"})
    tty = TtyWatch(d)
    try:
        tty.read_until(b"disk/fleece")
        run(requires("nbdcopy"), d.url("disk@fleece"), str(tmp_path / "backup.img"))
        tty.read_until(b"100.0% (1.0 MiB of 1.0 MiB)")
        qmp(d, "fleece-stop", {"disk": "disk"})
        tty.read_until(b"stopped")
        assert tty.proc.wait(30) == 0
    finally:
        tty.close()
    assert "━" in tty.screen.decode(errors="replace")     # a bar was drawn
    assert tty.proc.stderr is not None and tty.proc.stderr.read() == b""


#: The terminal sequences that hide and show the cursor (DECTCEM).
HIDE_CURSOR, SHOW_CURSOR = b"\x1b[?25l", b"\x1b[?25h"


def test_watch_on_a_tty_tidies_the_terminal_on_sigterm(
        image: Path, start_daemon: Callable[..., Daemon]) -> None:
    """SIGTERM killed the watch where it stood, leaving the terminal's
    cursor hidden by the bars.  It now ends like Ctrl-C does: the display is
    closed (the cursor shown again), exit status 143."""
    d = start_daemon(str(image))
    qmp(d, "fleece-start", {"disk": "disk"})
    tty = TtyWatch(d)
    try:
        tty.read_until(b"disk/fleece")
        assert HIDE_CURSOR in tty.screen
        tty.proc.send_signal(signal.SIGTERM)
        assert tty.proc.wait(30) == 143
        tty.read_until(None)
    finally:
        tty.close()
    assert tty.screen.rfind(SHOW_CURSOR) > tty.screen.rfind(HIDE_CURSOR), tty.screen
    assert tty.proc.stderr is not None and tty.proc.stderr.read() == b""


@pytest.mark.parametrize("plane", PLANES)
def test_the_last_count_goes_out_before_the_stop(
        image: Path, start_daemon: Callable[..., Daemon], plane: str) -> None:
    """A read just before fleece-stop is not lost to the rate limit: a
    FLEECE_PROGRESS with it comes before FLEECE_STOPPED."""
    d = start_daemon(str(image), "--data-plane", plane)

    async def go() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        async with ControlClient.connect_to(d.control) as client:
            with client.listen("FLEECE_PROGRESS", "FLEECE_STOPPED") as listener:
                await client.execute("fleece-start", {"disk": "disk"})
                proc = await asyncio.create_subprocess_exec(
                    requires("qemu-io"), "-r", "-f", "raw", "-c", "read 0 1",
                    d.url("disk@fleece"))
                assert await proc.wait() == 0
                await client.execute("fleece-stop", {"disk": "disk"})
                async with asyncio.timeout(30):
                    while not got or got[-1]["event"] != "FLEECE_STOPPED":
                        ev = await client.next_event(listener, 30)
                        if ev is not None:
                            got.append(ev)
        return got

    events = asyncio.run(go())
    assert [e["event"] for e in events][-1] == "FLEECE_STOPPED"
    assert events[-2]["event"] == "FLEECE_PROGRESS"
    assert events[-2]["data"]["read"] == CS and events[-2]["data"]["total"] == SIZE
