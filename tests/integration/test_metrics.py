"""Prometheus metrics: the endpoint scraped with urllib and parsed with
prometheus-client's own parser, and a real Prometheus scraping the daemon
through a fleecing backup.

The counters must equal what the test did through real clients (qemu-io
writes, nbdcopy reads of the snapshot), on both data planes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Daemon, make_image, requires, requires_libnbd_python, run
from tests.integration.test_fleece import qemu_io, qmp

pytestmark = pytest.mark.integration

KiB = 1 << 10
MiB = 1 << 20
HOOKS = {"FLEECED_TEST_HOOKS": "1"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}: " + ", ".join(
        f"{n}{dict(lv)}" for n, lv in samples if n == name)
    return samples[key]


def start_with_metrics(start_daemon, img: Path, plane: str, *extra: str) -> tuple[Daemon, int]:
    port = free_port()
    d = start_daemon(str(img), "--fleece", "--data-plane", plane,
                     "--metrics", f"127.0.0.1:{port}", *extra, env=HOOKS)
    return d, port


@pytest.mark.parametrize("plane", ["native", "loop"])
def test_scrape_counts_what_the_clients_did(tmp_path: Path, start_daemon, plane: str) -> None:
    img = tmp_path / "disk.img"
    make_image(img, 8 * MiB)
    d, port = start_with_metrics(start_daemon, img, plane)
    qmp(d, "bitmap-add", {"disk": "disk", "name": "b1", "granularity": 65536,
                          "persistent": False})
    active, snap = d.url("disk"), d.url("disk@fleece")
    # Three 64 KiB writes on three clusters (three copies before write),
    # one 4 KiB write on a cluster already copied (none), two reads, the
    # second streamed in 1 MiB pieces but still one request.
    qemu_io(active, "write -P 0x11 0 64k", "write -P 0x22 1M 64k", "write -P 0x33 2M 64k",
            "write -P 0x44 0x101000 4k", "read 4M 128k", "read 5M 0x280000")
    # The snapshot: 64 KiB copied (memory cache) and 64 KiB from the source.
    qemu_io(snap, "read 1M 64k", "read 5M 64k", read_only=True)
    # A failed sync: qemu-io writes through (FUA), so the write (on a
    # copied cluster) fails EIO; counted by errno, and the flush error,
    # sticky from then on (the flushes after it fail too), shows.
    qmp(d, "x-inject-flush-error", {"disk": "disk", "errno": 5, "count": 1})
    qemu_io(active, "write -P 0x55 0x102000 4k", "flush", check=False)

    m = scrape(port)
    disk = {"disk": "disk"}
    assert value(m, "fleeced_disk_requests_total", command="write", **disk) == 5
    assert value(m, "fleeced_disk_bytes_total", command="write", **disk) == 3 * 64 * KiB + 4 * KiB
    assert value(m, "fleeced_disk_requests_total", command="read", **disk) == 2
    assert value(m, "fleeced_disk_bytes_total", command="read", **disk) == 128 * KiB + 0x280000
    flushes = value(m, "fleeced_disk_requests_total", command="flush", **disk)
    assert flushes >= 2                              # one per qemu-io close, and ours
    assert value(m, "fleeced_disk_errors_total", errno="EIO", **disk) >= 2
    assert value(m, "fleeced_disk_flush_error", errno="EIO", **disk) == 1
    assert value(m, "fleeced_disk_source_error", errno="", **disk) == 0
    assert value(m, "fleeced_disk_attached", **disk) == 0
    assert value(m, "fleeced_disk_write_latency_seconds_count", **disk) == 5
    assert value(m, "fleeced_disk_write_latency_seconds_bucket", le="+Inf", **disk) == 5
    assert value(m, "fleeced_disk_write_latency_seconds_sum", **disk) > 0
    assert value(m, "fleeced_disk_flush_latency_seconds_count", **disk) == flushes

    ses = {"disk": "disk", "session": "fleece"}
    assert value(m, "fleeced_session_copied_clusters_total", **ses) == 3
    assert value(m, "fleeced_session_copied_bytes_total", **ses) == 3 * 64 * KiB
    assert value(m, "fleeced_session_clusters", state="copied", **ses) == 3
    assert value(m, "fleeced_session_clusters", state="needed", **ses) == 8 * MiB // (64 * KiB) - 3
    assert value(m, "fleeced_session_disk_clusters", **ses) == 128
    assert value(m, "fleeced_session_cbw_latency_seconds_count", **ses) == 3
    held = value(m, "fleeced_session_cache_bytes", **ses) + value(m, "fleeced_session_temp_bytes",
                                                                  **ses)
    assert held == 3 * 64 * KiB
    stored = value(m, "fleeced_session_read_bytes_total", store="cache", **ses) + value(
        m, "fleeced_session_read_bytes_total", store="temp", **ses)
    assert stored == 64 * KiB
    assert value(m, "fleeced_session_read_bytes_total", store="source", **ses) == 64 * KiB
    assert value(m, "fleeced_session_broken", reason="", **ses) == 0

    bm = {"disk": "disk", "bitmap": "b1"}
    # 0..64k, 1M..1M+64k (the 4k write inside it too), 2M..2M+64k
    assert value(m, "fleeced_bitmap_dirty_bytes", **bm) == 3 * 64 * KiB
    assert value(m, "fleeced_bitmap_in_use_recovered", **bm) == 0
    assert value(m, "fleeced_bitmap_recording", **bm) == 1

    assert value(m, "fleeced_info", version="0.1.0", data_plane=plane) == 1
    assert value(m, "process_open_fds") > 0
    assert value(m, "process_resident_memory_bytes") > 0
    assert value(m, "process_start_time_seconds") > 0
    assert value(m, "fleeced_reply_memory_bytes") == 0
    assert d.stop() == 0


#: A client that ignores what the server advertised (libnbd's strict mode
#: off): a READ past the end of the active export, a WRITE to the read-only
#: snapshot.  Prints the errno each got.
REFUSED_CLIENT = """
import errno, json, nbd, sys
got = []
for uri, op in ((sys.argv[1], "read"), (sys.argv[2], "write")):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(uri)
    try:
        if op == "read":
            h.pread(4096, h.get_size())
        else:
            h.pwrite(bytes(4096), 0)
    except nbd.Error as exc:
        got.append(errno.errorcode.get(exc.errno, exc.errno))  # a name or a number
    h.shutdown()
print(json.dumps(got))
"""


@pytest.mark.parametrize("plane", ["native", "loop"])
def test_refused_requests_are_counted_on_their_export(tmp_path: Path, start_daemon,
                                                      plane: str) -> None:
    """Requests the NBD layer refuses before the image were counted nowhere
    a scrape could see: an operator saw a failing backup client and no
    error.  The export families count them; the image's stay as they were."""
    python = requires_libnbd_python()
    img = tmp_path / "disk.img"
    make_image(img, 1 * MiB)
    d, port = start_with_metrics(start_daemon, img, plane)
    out = run(python, "-c", REFUSED_CLIENT, d.url("disk"), d.url("disk@fleece"))
    assert json.loads(out.stdout) == ["EINVAL", "EPERM"]
    m = scrape(port)
    for export in ("disk", "disk@fleece"):
        assert value(m, "fleeced_export_requests_total", export=export) == 1
        assert value(m, "fleeced_export_errors_total", export=export) == 1
        assert value(m, "fleeced_export_connections_total", export=export) == 1
    assert not [k for k in m if k[0] == "fleeced_disk_errors_total"], m
    assert value(m, "fleeced_disk_requests_total", disk="disk", command="read") == 0
    assert d.stop() == 0


def test_broken_session_says_why(tmp_path: Path, start_daemon) -> None:
    img = tmp_path / "disk.img"
    make_image(img, 1 * MiB)
    # No memory cache: the copy goes to the temp file, where the error waits.
    d, port = start_with_metrics(start_daemon, img, "native", "--cache", "0")
    qmp(d, "x-inject-cbw-error", {"disk": "disk", "name": "fleece", "errno": 28})
    qemu_io(d.url("disk"), "write -P 1 0 4k")
    m = scrape(port)
    assert value(m, "fleeced_session_broken", disk="disk", session="fleece",
                 reason=os.strerror(28)) == 1


def test_native_reply_memory_of_a_client_that_never_reads(tmp_path: Path,
                                                          start_daemon) -> None:
    """A client that asked for 64 x 32 MiB and reads nothing holds its
    connection's flow-control budget of reply memory, no more; it is
    given back when the client goes."""
    from tests.integration.test_lifecycle import stalled_reader

    img = tmp_path / "disk.img"
    make_image(img, 64 * MiB)
    d, port = start_with_metrics(start_daemon, img, "native")
    name = "fleeced_native_reply_memory_bytes"
    assert value(scrape(port), name) == 0
    client = stalled_reader(d.sock, "disk")
    try:
        held = poll_metric(port, name, lambda v: v > 0)
        # The budget (4 MiB) and the piece being streamed (1 MiB).
        assert held <= 5 * MiB
    finally:
        client.close()
    poll_metric(port, name, lambda v: v == 0)
    assert d.stop() == 0


def poll_metric(port: int, name: str, ok: Callable[[float], bool],
                timeout: float = 10.0) -> float:
    """The daemon-wide metric NAME once OK accepts it (bounded)."""
    end = time.monotonic() + timeout
    while True:
        v = value(scrape(port), name)
        if ok(v):
            return v
        if time.monotonic() > end:
            raise AssertionError(f"{name} stayed {v} for {timeout} s")
        time.sleep(0.05)


def test_a_stalled_scraper_stalls_nobody(tmp_path: Path, start_daemon) -> None:
    """A scraper that connects and sends half a request holds its own
    thread only: NBD clients and other scrapes go on."""
    img = tmp_path / "disk.img"
    make_image(img, 1 * MiB)
    d, port = start_with_metrics(start_daemon, img, "native")
    with socket.create_connection(("127.0.0.1", port)) as stalled:
        stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        qemu_io(d.url("disk"), "write -P 1 0 4k")
        assert value(scrape(port), "fleeced_disk_requests_total", disk="disk",
                     command="write") == 1
        assert time.monotonic() - t0 < 5
    assert d.stop() == 0


def test_metrics_port_in_use_fails_the_start(tmp_path: Path, start_daemon) -> None:
    img = tmp_path / "disk.img"
    make_image(img, 1 * MiB)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = start_daemon(str(img), "--metrics", f"127.0.0.1:{port}", ready=False)
        assert d.proc.wait(30) == 1
    log = (tmp_path / "daemon1.log").read_text()
    assert f"metrics endpoint 127.0.0.1:{port}: Address already in use" in log, log


@pytest.mark.parametrize(("arg", "expected"), [
    ("9632", "'9632' is not ADDR:PORT"),
    ("127.0.0.1:0", "port 0 is out of range"),
    ("[::1:9632", "'[::1:9632' is not ADDR:PORT"),
])
def test_bad_metrics_address(tmp_path: Path, arg: str, expected: str) -> None:
    import sys

    img = tmp_path / "disk.img"
    make_image(img, 64 * KiB)
    proc = run(sys.executable, "-m", "fleeced", "serve", str(img), "--no-control",
               "--metrics", arg, check=False, timeout=30)
    assert proc.returncode == 2
    assert f"argument --metrics: {expected}" in proc.stderr, proc.stderr


# -- a real Prometheus ----------------------------------------------------------------


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.proc = proc

    def get(self, path: str, **params: str) -> object:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as r:
            return json.load(r)

    def query(self, expr: str) -> list[tuple[dict[str, str], float, float]]:
        """(labels, sample time, value) of each series EXPR gives now."""
        doc = self.get("/api/v1/query", query=expr)
        assert isinstance(doc, dict) and doc["status"] == "success", doc
        return [(r["metric"], float(r["value"][0]), float(r["value"][1]))
                for r in doc["data"]["result"]]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    """Factory: a Prometheus of the test's own (never the system service)
    scraping TARGET every second; returns once it is ready."""
    tool = requires("prometheus")
    started: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> Prometheus:
        home = tmp_path / "prometheus"
        home.mkdir()
        (home / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: fleeced\n"
            f"    static_configs:\n      - targets: ['{target}']\n")
        port = free_port()
        log = open(home / "log", "wb")  # noqa: SIM115 - closed at teardown
        proc = subprocess.Popen(
            [tool, f"--config.file={home / 'prometheus.yml'}",
             f"--storage.tsdb.path={home / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=home)
        log.close()
        started.append(proc)
        prom = Prometheus(f"http://127.0.0.1:{port}", proc)
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (home / "log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return prom
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "Prometheus not ready within 60 s"
            time.sleep(0.1)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_scraped_after(prom: Prometheus, expr: str, after: float, timeout: float = 30) -> float:
    """The value of EXPR (one series) in a sample Prometheus took after AFTER
    (epoch seconds); polls its API, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        # timestamp() gives the scrape's own time, not the query's.
        res = prom.query(f"timestamp({expr})")
        if res and res[0][2] > after:
            (series,) = prom.query(expr)
            return series[2]
        assert time.monotonic() < deadline, f"no sample of {expr} after {after} in {timeout} s"
        time.sleep(0.2)


@pytest.mark.parametrize("plane", ["native", "loop"])
def test_prometheus_stores_what_a_fleecing_backup_did(tmp_path: Path, start_daemon, prometheus,
                                                      plane: str) -> None:
    nbdcopy = requires("nbdcopy")
    img = tmp_path / "disk.img"
    original = make_image(img, 16 * MiB)
    d, port = start_with_metrics(start_daemon, img, plane)
    prom = prometheus(f"127.0.0.1:{port}")
    # The guest writes 8 clusters while the backup runs...
    writes = [f"write -P 0x{0x40 + i:x} {i * 2}M 64k" for i in range(8)]
    qemu_io(d.url("disk"), *writes)
    # ...and the backup reads the whole snapshot: the data as it was.
    backup = tmp_path / "backup.img"
    run(nbdcopy, d.url("disk@fleece"), str(backup))
    assert backup.read_bytes() == original
    done = time.time()

    sel = 'disk="disk"'
    ses = 'disk="disk",session="fleece"'
    assert wait_scraped_after(
        prom, f'fleeced_disk_bytes_total{{{sel},command="write"}}', done) == 8 * 64 * KiB
    assert prom.query(f'fleeced_disk_requests_total{{{sel},command="write"}}')[0][2] == 8
    assert prom.query(f'fleeced_disk_write_latency_seconds_count{{{sel}}}')[0][2] == 8
    assert prom.query(f"fleeced_session_copied_clusters_total{{{ses}}}")[0][2] == 8
    assert prom.query(f"fleeced_session_copied_bytes_total{{{ses}}}")[0][2] == 8 * 64 * KiB
    assert prom.query(f"fleeced_session_cbw_latency_seconds_count{{{ses}}}")[0][2] == 8
    # Every byte of the snapshot was read once: the copies from where they
    # were kept, the rest from the source.
    read = {labels["store"]: v for labels, _, v in
            prom.query(f"fleeced_session_read_bytes_total{{{ses}}}")}
    assert read["cache"] + read["temp"] == 8 * 64 * KiB
    assert read["source"] == 16 * MiB - 8 * 64 * KiB
    assert prom.query(f'fleeced_session_broken{{{ses}}}')[0][2] == 0
    # Backup progress: the whole scope read.
    assert prom.query(f"fleeced_session_backup_read_bytes{{{ses}}}")[0][2] == 16 * MiB
    assert prom.query(f"fleeced_session_backup_scope_bytes{{{ses}}}")[0][2] == 16 * MiB
    (up,) = prom.query('up{job="fleeced"}')
    assert up[2] == 1
    assert d.stop() == 0
