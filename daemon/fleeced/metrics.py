"""Prometheus metrics (``--metrics ADDR:PORT``, ``[metrics] listen``).

What a scrape returns is read from the daemon's live objects when it comes:
the C counters of each image (``fl_file_stats``: both data planes count
there), of each session (``fl_session_stats``), the bitmaps, the NBD server's
exports, connections and reply memory.  Nothing is counted twice in the hot
path.  The image counters see only what reaches the image; what the NBD layer
refuses before it (a range past the end, a write to a read-only export, a
request during shutdown) is in the exports' counters.

Threads: the endpoint is prometheus-client's WSGI app in a threading HTTP
server of its own (one thread per scrape), so a slow or stalled scraper only
holds its own thread.  The daemon's objects belong to the event loop, so a
scrape takes a snapshot of them *on* the loop
(:func:`asyncio.run_coroutine_threadsafe`, bounded by
:data:`SNAPSHOT_TIMEOUT`): plain numbers, copied without I/O.  Counting a
bitmap's dirty bits walks its words, so that runs in the scrape's thread, as
``query-bitmaps`` runs it off the loop.  A scrape that fails (the loop too
busy to answer in time, say) gets HTTP 503 and a log line; the daemon goes
on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any, Final, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from fleeced import __version__
from fleeced.datapath import FILE_COMMANDS, FileStats, Latency, SessionStats

__all__ = ["MetricsServer", "parse_address", "SNAPSHOT_TIMEOUT"]

log = logging.getLogger(__name__)

#: Seconds a scrape waits for the event loop to copy the numbers out.
SNAPSHOT_TIMEOUT: Final = 2.0
#: Seconds a scraper has to send its request and take the reply before its
#: connection is dropped (a silent one must not keep a thread for ever).
CLIENT_TIMEOUT: Final = 10.0

#: Why a session remembered from a daemon that died counts as broken.
LOST_REASON: Final = "daemon stopped uncleanly"


def parse_address(text: str) -> tuple[str | None, int]:
    """``"HOST:PORT"``, ``"[IPV6]:PORT"`` or ``":PORT"`` (every IPv4 address).

    :raise ValueError: with a message that names what is wrong.
    """
    m = re.fullmatch(r"\[([0-9A-Fa-f:.%a-zA-Z]+)\]:(\d+)|([^:\[\]]*):(\d+)", text)
    if not m:
        raise ValueError(f"{text!r} is not ADDR:PORT or [IPV6]:PORT")
    host = m.group(1) if m.group(1) is not None else m.group(3)
    port = int(m.group(2) if m.group(2) is not None else m.group(4))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1..65535")
    return (host or None), port


# -- what a scrape reads -----------------------------------------------------------


class DaemonView(Protocol):
    """What the collector reads of the daemon (its attributes, on the loop)."""

    config: Any
    disks: dict[str, Any]
    attachments: dict[str, Any]
    lost_sessions: dict[tuple[str, str], dict[str, Any]]
    server: Any


@dataclass
class _DiskSnap:
    name: str
    stats: FileStats
    connections: int
    in_flight: int
    attached: bool
    source_errno: int
    flush_errno: int


@dataclass
class _SessionSnap:
    disk: str
    name: str
    cluster_size: int
    stats: SessionStats | None          # None: lost with a daemon that died
    connections: int
    #: Backup progress: bytes of the scope read (or told zero) at least
    #: once, and the scope's bytes.
    progress: tuple[int, int] = (0, 0)


@dataclass
class _ExportSnap:
    name: str
    requests: int
    errors: int
    connections_total: int


@dataclass
class _Snapshot:
    disks: list[_DiskSnap] = field(default_factory=list)
    exports: list[_ExportSnap] = field(default_factory=list)
    sessions: list[_SessionSnap] = field(default_factory=list)
    bitmaps: list[Any] = field(default_factory=list)   # fleeced.bitmap_store.Bitmap
    connections: int = 0
    reply_bytes: int = 0
    native_reply_bytes: int = 0
    reply_budget: int = 0
    data_plane: str = ""


def _connections(server: Any, export_name: str) -> int:
    export = server.exports.get(export_name)
    return int(export.stats.connections) if export is not None else 0


def take_snapshot(daemon: DaemonView) -> _Snapshot:
    """Copy what a scrape reports out of DAEMON's live objects.  Runs on the
    event loop: atomic loads and short mutex holds in C, no I/O."""
    server = daemon.server
    snap = _Snapshot(connections=server.connection_count, reply_bytes=server.reply_bytes,
                     native_reply_bytes=server.native_reply_bytes,
                     reply_budget=server.reply_budget,
                     data_plane=str(getattr(daemon.config, "data_plane", "")))
    server.sync_stats()                 # what native connections counted, so far
    for name, export in server.exports.items():
        st = export.stats
        snap.exports.append(_ExportSnap(name, st.requests, st.errors, st.connections_total))
    for disk in daemon.disks.values():
        if disk.file.closed:
            continue
        snap.disks.append(_DiskSnap(
            name=disk.name, stats=disk.file.stats(),
            connections=_connections(server, disk.name),
            in_flight=server.in_flight(disk.name),
            attached=disk.name in daemon.attachments,
            source_errno=disk.file.source_error, flush_errno=disk.file.flush_error))
        for session in disk.sessions.values():
            if session.native.closed:
                continue
            snap.sessions.append(_SessionSnap(
                disk=disk.name, name=session.name,
                cluster_size=session.options.cluster_size, stats=session.stats(),
                connections=_connections(server, session.export_name),
                progress=session.progress()))
        snap.bitmaps.extend(disk.bitmaps.values())
    for (disk_name, name) in daemon.lost_sessions:
        snap.sessions.append(_SessionSnap(disk=disk_name, name=name, cluster_size=0,
                                          stats=None, connections=0))
    return snap


# -- the families ------------------------------------------------------------------


def _errno_name(e: int) -> str:
    return errno.errorcode.get(e, str(e)) if e > 0 else "other"


def _histogram(fam: HistogramMetricFamily, labels: list[str], lat: Latency) -> None:
    buckets = [("+Inf" if bound == float("inf") else repr(bound), float(n))
               for bound, n in lat.cumulative()]
    fam.add_metric(labels, buckets, lat.sum_seconds)


def _disks(disks: list[_DiskSnap]) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "fleeced_disk_requests", "Requests on the disk's image by NBD command (failed ones too)",
        labels=["disk", "command"])
    nbytes = CounterMetricFamily(
        "fleeced_disk_bytes", "Bytes moved by the disk's successful requests, by command "
        "(read, write, write_zeroes, trim, cache)", labels=["disk", "command"])
    errors = CounterMetricFamily(
        "fleeced_disk_errors", "Failed requests on the disk's image by errno",
        labels=["disk", "errno"])
    write_lat = HistogramMetricFamily(
        "fleeced_disk_write_latency_seconds",
        "Time of guest writes in the data path (copy-before-write, write, FUA)",
        labels=["disk"])
    flush_lat = HistogramMetricFamily(
        "fleeced_disk_flush_latency_seconds", "Time of flushes (fdatasync)", labels=["disk"])
    conns = GaugeMetricFamily("fleeced_disk_connections",
                              "NBD connections to the disk's active export", labels=["disk"])
    in_flight = GaugeMetricFamily("fleeced_disk_requests_in_flight",
                                  "Requests received on the active export and not yet "
                                  "answered", labels=["disk"])
    attached = GaugeMetricFamily("fleeced_disk_attached",
                                 "1 while a VM's disk is redirected through the daemon",
                                 labels=["disk"])
    source_err = GaugeMetricFamily(
        "fleeced_disk_source_error",
        "1 while the disk's NBD upstream does not answer (errno of the last loss)",
        labels=["disk", "errno"])
    flush_err = GaugeMetricFamily(
        "fleeced_disk_flush_error",
        "1 once a flush failed: flushes and FUA fail EIO until the disk is reopened",
        labels=["disk", "errno"])
    for d in disks:
        for cmd in FILE_COMMANDS:
            requests.add_metric([d.name, cmd], d.stats.requests[cmd])
            if cmd not in ("flush", "block_status"):
                nbytes.add_metric([d.name, cmd], d.stats.bytes[cmd])
        for e, n in sorted(d.stats.errors.items()):
            errors.add_metric([d.name, _errno_name(e)], n)
        _histogram(write_lat, [d.name], d.stats.write_latency)
        _histogram(flush_lat, [d.name], d.stats.flush_latency)
        conns.add_metric([d.name], d.connections)
        in_flight.add_metric([d.name], d.in_flight)
        attached.add_metric([d.name], int(d.attached))
        source_err.add_metric([d.name, _errno_name(d.source_errno) if d.source_errno else ""],
                              int(d.source_errno != 0))
        flush_err.add_metric([d.name, _errno_name(d.flush_errno) if d.flush_errno else ""],
                             int(d.flush_errno != 0))
    yield from (requests, nbytes, errors, write_lat, flush_lat, conns, in_flight, attached,
                source_err, flush_err)


def _exports(exports: list[_ExportSnap]) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "fleeced_export_requests", "NBD requests answered on the export, those refused "
        "before the image included", labels=["export"])
    errors = CounterMetricFamily(
        "fleeced_export_errors", "NBD requests answered with an error on the export, "
        "refusals (bad range, read-only, shutting down) included", labels=["export"])
    conns = CounterMetricFamily("fleeced_export_connections",
                                "NBD connections that chose the export", labels=["export"])
    for e in exports:
        requests.add_metric([e.name], e.requests)
        errors.add_metric([e.name], e.errors)
        conns.add_metric([e.name], e.connections_total)
    yield from (requests, errors, conns)


def _sessions(sessions: list[_SessionSnap]) -> Iterator[Metric]:
    labels = ["disk", "session"]
    clusters = GaugeMetricFamily(
        "fleeced_session_clusters", "Clusters of the snapshot by state: needed (old data "
        "still only in the source), copied (in memory or the temp file), zero (a hole, "
        "nothing stored), discarded (never read)", labels=[*labels, "state"])
    disk_clusters = GaugeMetricFamily("fleeced_session_disk_clusters",
                                      "Clusters of the disk", labels=labels)
    cluster_size = GaugeMetricFamily("fleeced_session_cluster_size_bytes",
                                     "The session's cluster size", labels=labels)
    copied = CounterMetricFamily("fleeced_session_copied_clusters",
                                 "Clusters copied before a guest write (holes not)",
                                 labels=labels)
    copied_bytes = CounterMetricFamily("fleeced_session_copied_bytes",
                                       "Bytes copied before a guest write", labels=labels)
    temp = GaugeMetricFamily("fleeced_session_temp_bytes",
                             "Bytes the temp file holds now", labels=labels)
    temp_alloc = GaugeMetricFamily("fleeced_session_temp_allocated_bytes",
                                   "Bytes the temp file occupies on disk", labels=labels)
    temp_written = CounterMetricFamily("fleeced_session_temp_written_bytes",
                                       "Bytes ever written to the temp file", labels=labels)
    cache = GaugeMetricFamily("fleeced_session_cache_bytes",
                              "Bytes of copied data held in memory", labels=labels)
    reads = CounterMetricFamily(
        "fleeced_session_read_bytes", "Snapshot bytes read, by where they came from "
        "(cache: memory-cache hits, temp, source: not copied yet)",
        labels=[*labels, "store"])
    retries = CounterMetricFamily("fleeced_session_read_retries",
                                  "Source reads done again because a guest write got in",
                                  labels=labels)
    discarded = CounterMetricFamily("fleeced_session_discarded_bytes",
                                    "Bytes the backup discarded", labels=labels)
    cbw_lat = HistogramMetricFamily(
        "fleeced_session_cbw_latency_seconds",
        "Time guest writes spent copying before write (those that copied or waited)",
        labels=labels)
    conns = GaugeMetricFamily("fleeced_session_connections",
                              "NBD connections to the session's snapshot export",
                              labels=labels)
    backed_up = GaugeMetricFamily(
        "fleeced_session_backup_read_bytes", "Backup progress: bytes of the snapshot's "
        "scope read at least once (or told zero by base:allocation)", labels=labels)
    scope = GaugeMetricFamily("fleeced_session_backup_scope_bytes",
                              "Bytes of the snapshot a backup reads: the disk, or the "
                              "bitmap/since scope", labels=labels)
    broken = GaugeMetricFamily("fleeced_session_broken",
                               "1 once the snapshot is broken; reason says why",
                               labels=[*labels, "reason"])
    for s in sessions:
        lv = [s.disk, s.name]
        st = s.stats
        if st is None:
            broken.add_metric([*lv, LOST_REASON], 1)
            continue
        for state, n in (("needed", st.clusters_needed), ("copied", st.clusters_copied),
                         ("zero", st.clusters_zero), ("discarded", st.clusters_discarded)):
            clusters.add_metric([*lv, state], n)
        disk_clusters.add_metric(lv, st.clusters_total)
        cluster_size.add_metric(lv, s.cluster_size)
        copied.add_metric(lv, st.cbw_count)
        copied_bytes.add_metric(lv, st.cbw_bytes)
        temp.add_metric(lv, st.temp_bytes)
        temp_alloc.add_metric(lv, st.temp_bytes_allocated)
        temp_written.add_metric(lv, st.temp_bytes_written)
        cache.add_metric(lv, st.cache_bytes)
        for store, n in (("cache", st.read_cache_bytes), ("temp", st.read_temp_bytes),
                         ("source", st.read_source_bytes)):
            reads.add_metric([*lv, store], n)
        retries.add_metric(lv, st.read_retries)
        discarded.add_metric(lv, st.discarded_bytes)
        _histogram(cbw_lat, lv, st.cbw_latency)
        conns.add_metric(lv, s.connections)
        reason = os.strerror(st.broken_errno or errno.EIO) if st.broken else ""
        broken.add_metric([*lv, reason], int(st.broken))
        backed_up.add_metric(lv, s.progress[0])
        scope.add_metric(lv, s.progress[1])
    yield from (clusters, disk_clusters, cluster_size, copied, copied_bytes, temp, temp_alloc,
                temp_written, cache, reads, retries, discarded, cbw_lat, conns, broken,
                backed_up, scope)


def _bitmaps(bitmaps: Iterable[Any]) -> Iterator[Metric]:
    labels = ["disk", "bitmap"]
    dirty = GaugeMetricFamily("fleeced_bitmap_dirty_bytes",
                              "Bytes of the disk the bitmap marks changed", labels=labels)
    recovered = GaugeMetricFamily(
        "fleeced_bitmap_in_use_recovered",
        "1 when the bitmap was found in use at load (all dirty: a crash)", labels=labels)
    recording = GaugeMetricFamily("fleeced_bitmap_recording",
                                  "1 while the bitmap records guest writes", labels=labels)
    for bm in bitmaps:
        try:
            # Walks the bitmap's words: here, in the scrape's thread.
            info = bm.describe()
        except OSError:
            continue                    # removed since the snapshot
        lv = [info["disk"], info["name"]]
        dirty.add_metric(lv, info["dirty-bytes"])
        recovered.add_metric(lv, int(info["in-use-recovered"]))
        recording.add_metric(lv, int(info["recording"]))
    yield from (dirty, recovered, recording)


def _daemon(snap: _Snapshot) -> Iterator[Metric]:
    info = InfoMetricFamily("fleeced", "The daemon")
    info.add_metric([], {"version": __version__, "data_plane": snap.data_plane})
    yield info
    yield GaugeMetricFamily("fleeced_connections", "NBD connections", value=snap.connections)
    yield GaugeMetricFamily("fleeced_reply_memory_bytes",
                            "Bytes of READ replies held for clients on the event loop's path",
                            value=snap.reply_bytes)
    yield GaugeMetricFamily("fleeced_reply_memory_budget_bytes",
                            "Daemon-wide bound of fleeced_reply_memory_bytes",
                            value=snap.reply_budget)
    yield GaugeMetricFamily("fleeced_native_reply_memory_bytes",
                            "Bytes of READ replies in flight or queued unsent on native "
                            "connections (each bounded by its flow-control budget)",
                            value=snap.native_reply_bytes)


class DaemonCollector(Collector):
    """Reads the daemon at each scrape (see the module's notes on threads)."""

    def __init__(self, daemon: DaemonView, loop: asyncio.AbstractEventLoop) -> None:
        self._daemon = daemon
        self._loop = loop
        self.closed = False

    async def _snapshot(self) -> _Snapshot:
        return take_snapshot(self._daemon)

    def collect(self) -> Iterator[Metric]:
        if self.closed:
            raise RuntimeError("the daemon is shutting down")
        fut = asyncio.run_coroutine_threadsafe(self._snapshot(), self._loop)
        try:
            snap = fut.result(timeout=SNAPSHOT_TIMEOUT)
        except TimeoutError:
            fut.cancel()
            raise TimeoutError(f"the event loop did not answer within {SNAPSHOT_TIMEOUT} s") \
                from None
        yield from _daemon(snap)
        yield from _disks(snap.disks)
        yield from _exports(snap.exports)
        yield from _sessions(snap.sessions)
        yield from _bitmaps(snap.bitmaps)


# -- the endpoint --------------------------------------------------------------------


class _Handler(WSGIRequestHandler):
    timeout = CLIENT_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass                            # scrapes are not worth a log line each


class _HttpServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Http6Server(_HttpServer):
    address_family = socket.AF_INET6


def _guarded(app: Callable[..., Any]) -> Callable[..., Any]:
    """APP, with a failed collection answered 503 and logged (one line),
    not a traceback on stderr."""
    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        try:
            return app(environ, start_response)
        except Exception as exc:  # any failure is one failed scrape
            log.warning("metrics scrape failed: %s", exc)
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [f"metrics unavailable: {exc}\n".encode()]
    return guarded


class MetricsServer:
    """The ``/metrics`` endpoint of one daemon: :meth:`start`, then :meth:`close`."""

    def __init__(self, daemon: DaemonView, host: str | None, port: int) -> None:
        self.host = host or "0.0.0.0"
        self.port = port
        self._daemon = daemon
        self._collector: DaemonCollector | None = None
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        """Bind and serve in a thread of its own.

        :raise OSError: when the address cannot be bound (in use, not local).
        """
        loop = asyncio.get_running_loop()
        registry = CollectorRegistry(auto_describe=False)
        # The process's own: open fds, RSS, CPU, start time (process_*).
        ProcessCollector(registry=registry)
        self._collector = DaemonCollector(self._daemon, loop)
        registry.register(self._collector)
        cls = _Http6Server if ":" in self.host else _HttpServer
        try:
            # In a thread: resolving the host and the server's own name
            # (HTTPServer.server_bind calls getfqdn) may ask DNS.
            self._httpd = await asyncio.to_thread(
                make_server, self.host, self.port, _guarded(make_wsgi_app(registry)),
                server_class=cls, handler_class=_Handler)
        except OSError as exc:
            raise OSError(exc.errno, f"metrics endpoint {self.host}:{self.port}: "
                          f"{exc.strerror or exc}") from None
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="fleeced-metrics", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        """Stop serving (scrapes in progress fail; bounded wait)."""
        if self._collector is not None:
            self._collector.closed = True
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        # shutdown() waits for serve_forever's poll (0.5 s): off the loop.
        try:
            await asyncio.wait_for(asyncio.to_thread(httpd.shutdown), 5.0)
        except TimeoutError:
            log.warning("the metrics endpoint did not stop within 5 s; leaving it")
        httpd.server_close()
