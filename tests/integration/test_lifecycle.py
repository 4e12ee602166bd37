"""Daemon lifecycle under hostile and vanishing clients .

Each test reproduces a defect found by the fault probe on the old code: a
crash (use after free), a hang (an unbounded wait) or unbounded memory.  They
assert orderings and exit codes, never speeds; the few time bounds are there
to turn a hang into a failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon, make_image, requires, requires_libnbd_python, run
from tests.helpers import request
from tests.integration.test_bad_input import (
    CMD_READ,
    CMD_WRITE,
    ESHUTDOWN,
    SIMPLE_REPLY_MAGIC,
    Raw,
)
from tests.integration.test_fleece import qmp

pytestmark = pytest.mark.integration

KiB = 1 << 10
MiB = 1 << 20
HOOKS = {"FLEECED_TEST_HOOKS": "1"}


def sparse_image(path: Path, size: int, data_bytes: int) -> bytes:
    """SIZE bytes: DATA_BYTES of pseudo-random data at 0, a hole after it."""
    data = make_image(path, data_bytes)
    with open(path, "r+b") as f:
        f.truncate(size)
    return data + bytes(size - data_bytes)


def alive(d: Daemon) -> None:
    """The daemon still runs and answers on both planes."""
    assert d.proc.poll() is None, f"daemon died: {d.proc.returncode}"
    assert isinstance(qmp(d, "query-disks"), list)


def vanish_mid_pipeline(d: Daemon, export: str, big_hole_reads: int = 63) -> None:
    """Pipeline one 64 KiB data READ and many 4 MiB hole READs, then hang up."""
    with Raw(d.sock) as c:
        c.open(export)
        reqs = [request(CMD_READ, 1, 0, 64 * KiB)]
        reqs += [request(CMD_READ, 2 + i, 8 * MiB + (i % 8) * 4 * MiB, 4 * MiB)
                 for i in range(big_hole_reads)]
        c.send(b"".join(reqs))
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_vanished_snapshot_client_then_fleece_stop(tmp_path: Path, start_daemon) -> None:
    """Ops of a vanished client still queued when fleece-stop frees the
    session (a segfault in 9 of 9 runs before).  Snapshot reads are slowed so
    they are queued for sure; the session is stopped and restarted many times."""
    img = tmp_path / "disk.img"
    expect = sparse_image(img, 48 * MiB, 64 * KiB)
    d = start_daemon(str(img), "--fleece", "--threads", "2", env=HOOKS)
    qmp(d, "x-inject-queue-delay", {"op": "snap-read", "ms": 20})
    for _ in range(6):
        vanish_mid_pipeline(d, "disk@fleece")
        qmp(d, "fleece-stop", {"disk": "disk"})
        alive(d)
        qmp(d, "fleece-start", {"disk": "disk"})
    vanish_mid_pipeline(d, "disk@fleece")
    alive(d)
    assert d.stop() == 0  # SIGTERM with those ops queued: clean exit
    assert img.read_bytes() == expect


def test_sigterm_with_a_client_that_stopped_reading(tmp_path: Path, start_daemon) -> None:
    """A client that never reads its replies blocked SIGTERM for ever
    (shutdown waited for its write buffer to drain).  Now it is aborted after
    --shutdown-timeout and the daemon exits 0 with STOPPING=1."""
    img = tmp_path / "disk.img"
    make_image(img, 32 * MiB)
    d = start_daemon(str(img), "--shutdown-timeout", "1")
    c = Raw(d.sock)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.open("disk")
    c.send(b"".join(request(CMD_READ, i, (i % 8) * 4 * MiB, 4 * MiB) for i in range(64)))
    # Wait until the daemon has read data for it (its replies pile up).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = qmp(d, "query-stats")
        assert isinstance(stats, dict)
        if any(e["bytes-read"] for e in stats["exports"]):
            break
    assert d.stop(timeout=20) == 0
    assert any(b"STOPPING=1" in n for n in d.notifications())
    c.close()


def test_fleece_stop_does_not_block_other_disks(tmp_path: Path, start_daemon) -> None:
    """fleece-stop held a daemon-wide lock while it waited for a client
    that stopped reading, so fleece-start/stop on every other disk hung too."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_image(a, 32 * MiB)
    make_image(b, 4 * MiB, seed=2)
    d = start_daemon(str(a), str(b), "--fleece", "--shutdown-timeout", "3")
    c = Raw(d.sock)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.open("a@fleece")
    c.send(b"".join(request(CMD_READ, i, (i % 8) * 4 * MiB, 4 * MiB) for i in range(32)))
    # Wait until the daemon took them (else fleece-stop may come first, and
    # they are answered ESHUTDOWN at once: nothing to wait for).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = qmp(d, "query-stats")
        assert isinstance(stats, dict)
        if any(e["requests"] for e in stats["exports"] if e["name"] == "a@fleece"):
            break
    order: list[str] = []

    def stop_a() -> None:
        qmp(d, "fleece-stop", {"disk": "a"})
        order.append("stop a")

    t = threading.Thread(target=stop_a)
    t.start()
    qmp(d, "fleece-stop", {"disk": "b"})
    order.append("stop b")
    qmp(d, "fleece-start", {"disk": "b", "name": "again"})
    order.append("start b")
    t.join(30)
    assert not t.is_alive()
    assert order == ["stop b", "start b", "stop a"]
    c.close()
    alive(d)


def test_fleece_start_does_not_block_the_loop(tmp_path: Path, start_daemon) -> None:
    """fleece-start took the file's exclusive lock on the event loop,
    waiting for guest writes in flight (one stuck in a slow CBW copy): a 4 KiB
    READ of another disk waited for it.  Now the READ comes back first."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_image(a, 8 * MiB)
    data_b = make_image(b, 1 * MiB, seed=3)
    d = start_daemon(str(a), str(b), "--fleece", env=HOOKS)
    qmp(d, "x-inject-cbw-delay", {"disk": "a", "ms": 3000})
    writer = Raw(d.sock)
    writer.open("a")
    writer.send(request(CMD_WRITE, 7, 0, 4096, 0, bytes(4096)))  # CBW: 3 s
    order: list[str] = []

    def second_session() -> None:
        qmp(d, "fleece-start", {"disk": "a", "name": "second"})
        order.append("fleece-start")

    # The write must be inside its copy before the session start queues.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        sessions = qmp(d, "query-fleece")
        assert isinstance(sessions, list)
        if any(s["disk"] == "a" and s["clusters"]["needed"] < s["clusters"]["total"]
               for s in sessions):
            break
    t = threading.Thread(target=second_session)
    t.start()
    with Raw(d.sock) as r:
        r.open("b")
        assert r.read(4096, 4096) == data_b[4096:8192]
        order.append("read b")
    t.join(30)
    assert order == ["read b", "fleece-start"]
    assert writer.reply() [:2] == (7, 0)
    writer.close()
    alive(d)


def test_handshake_limit_and_only_negotiated_clients_count(tmp_path: Path,
                                                          start_daemon) -> None:
    """Silent connections held fds for ever, and with -e N, N silent
    connections locked every real client out."""
    nbdinfo = requires("nbdinfo")
    img = tmp_path / "disk.img"
    make_image(img, 1 * MiB)
    d = start_daemon(str(img), "-e", "1", "--handshake-limit", "2")
    silent = []
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(15)
        s.connect(d.sock)
        silent.append(s)
    # A real client gets in although 3 silent ones are connected.
    proc = run(nbdinfo, "--size", d.url("disk"))
    assert proc.stdout.strip() == str(1 * MiB)
    # The silent ones are dropped after the limit: greeting, then EOF.
    for s in silent:
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        assert got.startswith(b"NBDMAGIC")
        s.close()
    alive(d)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_reply_memory_is_bounded(tmp_path: Path, start_daemon) -> None:
    """64 pipelined 32 MiB READs whose replies are never read pinned
    about 2 GiB per connection; then about 28 MiB (a reply's rest).  Large
    READs are now streamed a piece at a time: 16 such clients cost the
    daemon under 64 MiB together (a few MiB each at most)."""
    img = tmp_path / "disk.img"
    make_image(img, 64 * MiB)
    d = start_daemon(str(img))
    clients = []
    before = peak = rss_kib(d.proc.pid)
    try:
        for _ in range(16):
            c = Raw(d.sock)
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.open("disk")
            c.send(b"".join(request(CMD_READ, i, (i % 2) * 32 * MiB, 32 * MiB)
                            for i in range(64)))
            clients.append(c)
        # Sample for a while: the daemon reads, replies pile up, then stop.
        end = time.monotonic() + 8
        while time.monotonic() < end:
            peak = max(peak, rss_kib(d.proc.pid))
            time.sleep(0.05)
        # A well-behaved client is still served.
        stats = qmp(d, "query-stats")
        assert isinstance(stats, dict) and stats["connections"] == 16
    finally:
        for c in clients:
            c.close()
    print(f"daemon peak RSS with 16 hostile clients: {peak} KiB ({peak - before} KiB more)")
    assert peak - before < 64 * 1024, f"peak RSS {peak} KiB, {before} KiB before"
    alive(d)


#: The slowest a good client's read may be while others stall.  A read that
#: waited for another connection's reply budget waited for the 30 s stall
#: rule (reads of 8 s to 31 s were seen); a served one takes milliseconds,
#: and a little over 100 ms on a loaded machine under ASan.  2 s keeps the
#: two apart without timing the daemon.
NOT_STALLED = 2.0


def stalled_reader(path: str, export: str) -> Raw:
    """A client that asks for 64 x 32 MiB (about 2 KB of requests) and
    never reads a byte of the replies."""
    c = Raw(path)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.open(export)
    c.send(b"".join(request(CMD_READ, i, (i % 2) * 32 * MiB, 32 * MiB) for i in range(64)))
    return c


#: The good client: libnbd, 4 KiB READs at random places for SECONDS; prints
#: how many and the slowest, in seconds.
GOOD_CLIENT = """
import json, nbd, random, sys, time
uri, seconds, size = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
rng = random.Random(1)
worst, n = 0.0, 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    t = time.monotonic()
    h.pread(4096, rng.randrange(size // 4096) * 4096)
    worst = max(worst, time.monotonic() - t)
    n += 1
print(json.dumps({"reads": n, "worst": worst}))
"""


def test_stalled_readers_do_not_stall_others(tmp_path: Path, start_daemon) -> None:
    """Eight clients that each asked for 64 x 32 MiB and never read used up
    the daemon-wide reply budget: every other client's READs waited for the
    30 s stall rule (one read in 8 s, of 28 s).  A connection's unread
    replies now cost that connection only: no read of the good client
    waits for the stall rule, and reconnecting stalled clients change
    nothing."""
    python = requires_libnbd_python()
    img = tmp_path / "disk.img"
    make_image(img, 64 * MiB)
    d = start_daemon(str(img))
    stalled = [stalled_reader(d.sock, "disk") for _ in range(8)]
    try:
        out = run(python, "-c", GOOD_CLIENT, d.url("disk"), "3", str(64 * MiB))
        first = json.loads(out.stdout)
        for c in stalled[:4]:  # they come back, and stall again
            c.close()
        stalled[:4] = [stalled_reader(d.sock, "disk") for _ in range(4)]
        out = run(python, "-c", GOOD_CLIENT, d.url("disk"), "3", str(64 * MiB))
        second = json.loads(out.stdout)
    finally:
        for c in stalled:
            c.close()
    print(f"good client: {first} then {second}")
    for got in (first, second):
        assert got["worst"] < NOT_STALLED, got
        assert got["reads"] > 100, got
    alive(d)


def test_sigterm_answers_every_received_request(tmp_path: Path, start_daemon) -> None:
    """SIGTERM dropped parsed-but-unanswered requests (they came back
    as ENOTCONN).  Requests already received are completed or get ESHUTDOWN."""
    img = tmp_path / "disk.img"
    make_image(img, 4 * MiB)
    # The drain bound is generous here: this test is about what is answered,
    # not about the bound (a slow ASan daemon needs a few seconds).
    d = start_daemon(str(img), "--threads", "2", "--shutdown-timeout", "60", env=HOOKS)
    qmp(d, "x-inject-queue-delay", {"op": "write", "ms": 20})
    n = 100
    with Raw(d.sock, timeout=30) as c:
        c.open("disk")
        c.send(b"".join(request(CMD_WRITE, i, i * 4096, 4096, 0, bytes([i]) * 4096)
                        for i in range(n)))
        # Wait until the daemon holds them (64 parsed, the rest buffered).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stats = qmp(d, "query-stats")
            assert isinstance(stats, dict)
            if stats["exports"][0]["requests"] > 0:
                break
        os.kill(d.proc.pid, signal.SIGTERM)
        errors: dict[int, int] = {}
        for _ in range(n):
            magic, error, cookie = struct.unpack(">IIQ", c.recv_exact(16))
            assert magic == SIMPLE_REPLY_MAGIC
            errors[cookie] = error
    assert sorted(errors) == list(range(n))
    assert set(errors.values()) <= {0, ESHUTDOWN}
    assert ESHUTDOWN in errors.values()
    assert d.proc.wait(30) == 0
    # Whatever was acknowledged is on disk.
    got = img.read_bytes()
    for i, error in errors.items():
        if error == 0:
            assert got[i * 4096:(i + 1) * 4096] == bytes([i]) * 4096


def test_sigterm_reads_what_the_client_sent(tmp_path: Path, start_daemon) -> None:
    """A client that sent requests and reads its replies slowly got ENOTCONN
    for most of them at SIGTERM (3 of 3 runs): parsing was held (its replies
    filled the socket), so later requests sat unread in the socket, and the
    close reset the connection, losing the replies too.  Every request the
    client sent is answered: done or ESHUTDOWN."""
    img = tmp_path / "disk.img"
    data = make_image(img, 4 * MiB)
    d = start_daemon(str(img))
    first, later = 3000, 1000

    def read(i: int) -> bytes:
        return request(CMD_READ, i, (i * 4096) % (4 * MiB), 4096)

    with Raw(d.sock, timeout=60) as c:
        c.open("disk")
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        # 12 MiB of replies: answered from the page cache until they fill
        # the socket and the transport; then parsing is held, nothing in
        # flight (a control round trip lets the daemon's loop get there)...
        c.send(b"".join(read(i) for i in range(first)))
        got = c.recv_exact(16)
        qmp(d, "query-stats")
        # ... so these wait in the socket, unread.
        c.send(b"".join(read(i) for i in range(first, first + later)))
        os.kill(d.proc.pid, signal.SIGTERM)
        errors: dict[int, int] = {}
        for k in range(first + later):
            magic, error, cookie = struct.unpack(">IIQ", got if k == 0 else c.recv_exact(16))
            assert magic == SIMPLE_REPLY_MAGIC
            errors[cookie] = error
            if error == 0:
                off = (cookie * 4096) % (4 * MiB)
                assert c.recv_exact(4096) == data[off:off + 4096]
        assert c.sock.recv(1) == b""  # then a clean close
    assert sorted(errors) == list(range(first + later))
    assert set(errors.values()) <= {0, ESHUTDOWN} and ESHUTDOWN in errors.values()
    assert d.proc.wait(30) == 0


def test_half_close_with_a_full_pipeline(tmp_path: Path, start_daemon) -> None:
    """Found by the soak: a client that half-closes with large READs in
    flight made the transport report EOF a second time when reading resumed
    after the replies had backed up ("receive_data() after EOF", the
    connection aborted and its replies lost).  Every reply must arrive."""
    img = tmp_path / "disk.img"
    data = make_image(img, 32 * MiB)
    d = start_daemon(str(img), "--fleece")
    n = 48
    with Raw(d.sock, timeout=30) as c:
        c.open("disk@fleece")
        c.send(b"".join(request(CMD_READ, i, (i % 4) * 8 * MiB, 8 * MiB) for i in range(n)))
        c.sock.shutdown(socket.SHUT_WR)
        got = {}
        for _ in range(n):
            cookie, error, payload = c.reply(8 * MiB, 0)
            got[cookie] = (error, payload == data[(cookie % 4) * 8 * MiB:][:8 * MiB])
    assert got == {i: (0, True) for i in range(n)}
    log = (tmp_path / "daemon1.log").read_text()
    assert "after EOF" not in log and "Traceback" not in log
    alive(d)
