"""The daemon: wires disks, exports, NBD listeners and the control socket.

Owns the lifecycle (start, readiness, signals, orderly shutdown with a final
flush) and the control commands.  Nothing here does block I/O directly.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from fleeced import datapath, systemd
from fleeced.control.args import check_keys, get, get_size
from fleeced.control.server import CommandError, ControlServer
from fleeced.exports import (
    ActiveExport,
    Disk,
    Export,
    Session,
    SessionOptions,
)
from fleeced.exports.aio import DEFAULT_THREADS, IoQueue
from fleeced.tls import TlsConfig

log = logging.getLogger(__name__)

#: How often session health (broken snapshots) is checked, seconds.
WATCH_INTERVAL = 0.25


@dataclass
class DiskSpec:
    """A disk to open at start: image path, export name and options."""

    path: str
    name: str
    read_only: bool = False
    discard: str = "ignore"
    description: str = ""


@dataclass
class Listener:
    """One NBD listener: a Unix socket (with optional mode and group) or TCP."""

    unix: str | None = None
    #: Permission bits of the Unix socket file (``None``: the umask decides).
    mode: int | None = None
    #: Group name or number of the Unix socket file.
    group: str | None = None
    tcp_host: str | None = None
    tcp_port: int | None = None


@dataclass
class DaemonConfig:
    """Everything ``fleeced serve`` (or ``serve --config``) was asked to do."""

    disks: list[DiskSpec]
    listeners: list[Listener] = field(default_factory=list)
    shared: int = 0
    persistent: bool = False
    control_path: str | None = None
    control_required: bool = False
    fleece: list[tuple[str, SessionOptions]] = field(default_factory=list)
    pid_file: str | None = None
    threads: int = 0
    #: Seconds connections get to finish in-flight requests at shutdown and at
    #: fleece-stop before they are aborted (``--shutdown-timeout``).
    shutdown_timeout: float = 5.0
    #: Seconds a client has to finish the handshake (``--handshake-limit``).
    handshake_limit: float = 10.0
    #: Where runtime state lives (disks added at run time, VM attachments,
    #: sessions); ``None``: no state is kept (lab mode, like qemu-nbd).
    state_dir: str | None = None
    #: ``fleece-start`` arguments used when a command leaves them out
    #: (``cluster-size``, ``temp-dir``, ``cache``, ...).
    session_defaults: dict[str, Any] = field(default_factory=dict)
    tls: TlsConfig = field(default_factory=TlsConfig)


class Daemon:
    """One running fleeced: call :meth:`start`, then :meth:`run_until_stopped`."""

    def __init__(self, config: DaemonConfig) -> None:
        from fleeced.server import NbdServer

        self.config = config
        # C worker threads run everything that may block: block I/O, block
        # status, session open/close, the final flush.
        self._io = IoQueue(config.threads or DEFAULT_THREADS)
        self.disks: dict[str, Disk] = {}
        self.actives: dict[str, ActiveExport] = {}
        self._stop = asyncio.Event()
        self.server = NbdServer(
            shared=config.shared, persistent=config.persistent, on_idle=self.stop,
            shutdown_timeout=config.shutdown_timeout, handshake_limit=config.handshake_limit,
            tls=config.tls,
        )
        self.server.on_count_change = self._status
        self.control: ControlServer | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        # One lock per disk serializes the commands that change that disk's
        # sessions; commands on different disks never wait for each other.
        self._disk_locks: dict[str, asyncio.Lock] = {}

    # -- lifecycle -----------------------------------------------------------

    async def start(self, inherited: list[socket.socket] | None = None) -> None:
        """Open disks, start configured sessions, bind listeners.

        :raise OSError: when an image, socket or temp dir cannot be used.
        :raise ValueError: on duplicate export names.
        """
        # Signal handlers before READY=1: a SIGTERM right after readiness
        # must shut down in order, not kill the process.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        self._io.start()
        try:
            for spec in self.config.disks:
                self._open_disk(spec)
            for disk_name, options in self.config.fleece:
                await self._start_session(self.disks[disk_name], options)
            await self._listen(inherited or [])
            if self.config.pid_file:
                _write_pid_file(self.config.pid_file)
        except BaseException:
            await self._close_everything()
            raise
        self._watch_task = asyncio.get_running_loop().create_task(self._watch())
        interval = systemd.watchdog_interval()
        if interval is not None:
            self._watchdog_task = loop.create_task(self._watchdog(interval))
        systemd.notify("READY=1\nSTATUS=serving, 0 connections")

    async def _listen(self, inherited: list[socket.socket]) -> None:
        cfg = self.config
        for sock in inherited:
            await self.server.listen_socket(sock)
        for listener in cfg.listeners:
            if listener.unix is not None:
                await self.server.listen_unix(listener.unix, listener.mode, listener.group)
            elif listener.tcp_port is not None:
                await self.server.listen_tcp(listener.tcp_host, listener.tcp_port)
        if cfg.control_path:
            self.control = ControlServer(self._handlers())
            try:
                await self.control.listen(cfg.control_path)
            except OSError as exc:
                if cfg.control_required:
                    raise
                log.warning("no control socket: %s", exc)
                self.control = None

    def stop(self) -> None:
        """Ask the daemon to shut down (idempotent, signal-safe on the loop)."""
        self._stop.set()

    async def run_until_stopped(self) -> None:
        await self._stop.wait()
        log.info("shutting down")
        systemd.notify("STOPPING=1")
        await self._close_everything()

    async def _close_everything(self) -> None:
        """Orderly shutdown; every wait in it is bounded except the C workers'
        own I/O (the final join waits for operations already running)."""
        for task in (self._watch_task, self._watchdog_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._watch_task = self._watchdog_task = None
        if self.control is not None:
            await self.control.close()
            self.control = None
        # Connections get --shutdown-timeout to finish; stragglers are aborted.
        await self.server.close()
        for disk in self.disks.values():
            for session in list(disk.sessions.values()):
                await self._io.close_session(session.native)
            disk.sessions.clear()
            if not disk.read_only:
                try:
                    await self._io.flush(disk.file)
                except OSError as exc:
                    log.error("final flush of %s failed: %s", disk.path, exc.strerror or exc)
        # Joins the workers: operations of aborted clients finish first.
        self._io.close()
        for disk in self.disks.values():
            disk.close()
        self.disks.clear()
        if self.config.pid_file:
            try:
                os.unlink(self.config.pid_file)
            except OSError:
                pass

    def _status(self, count: int) -> None:
        systemd.notify(f"STATUS=serving, {count} connection{'s' if count != 1 else ''}")

    # -- disks and sessions --------------------------------------------------

    def _open_disk(self, spec: DiskSpec) -> Disk:
        if spec.name in self.disks or self.server.get_export(spec.name) is not None:
            raise ValueError(f"export name {spec.name!r} is used twice")
        disk = Disk.open(
            spec.name, spec.path, read_only=spec.read_only, discard=spec.discard,
            description=spec.description,
        )
        self.disks[spec.name] = disk
        active = ActiveExport(disk, self._io)
        self._disk_locks[spec.name] = asyncio.Lock()
        self.actives[spec.name] = active
        self.server.add_export(active)
        log.info("disk %s: %s (%d bytes)%s", spec.name, spec.path, disk.size,
                 " read-only" if spec.read_only else "")
        return disk

    def _check_new_session(self, disk: Disk, options: SessionOptions) -> str:
        """The export name of a new session, or a CommandError why it cannot start."""
        if options.name in disk.sessions:
            raise CommandError(f"disk '{disk.name}' already has a session '{options.name}'")
        export_name = options.export or f"{disk.name}@{options.name}"
        if self.server.get_export(export_name) is not None:
            raise CommandError(f"export '{export_name}' already exists")
        if disk.read_only:
            raise CommandError(f"disk '{disk.name}' is read-only; it needs no fleecing")
        for off, length in options.scope:
            if off + length > disk.size:
                raise CommandError(
                    f"bitmap extent {off}+{length} lies beyond the end of disk "
                    f"'{disk.name}' ({disk.size} bytes)"
                )
        return export_name

    async def _start_session(self, disk: Disk, options: SessionOptions) -> Session:
        """Start a session (the native open runs in a queue worker).

        :raise CommandError: when the session cannot start.
        """
        export_name = self._check_new_session(disk, options)
        try:
            session = await Session.start(disk, options, self._io)
        except OSError as exc:
            raise CommandError(f"cannot start session: {exc.strerror or exc}") from None
        try:  # another disk may have taken the export name meanwhile
            self._check_new_session(disk, options)
        except CommandError:
            await self._io.close_session(session.native)
            raise
        disk.sessions[options.name] = session
        self.server.add_export(session.export)
        log.info("session %s on %s started: export %r", options.name, disk.name, export_name)
        return session

    async def _stop_session(self, disk: Disk, name: str) -> None:
        session = disk.sessions.get(name)
        if session is None:
            raise CommandError(f"disk '{disk.name}' has no session '{name}'")
        # Clients of the snapshot get --shutdown-timeout, then are aborted;
        # their queued operations keep the native session alive and fail.
        await self.server.remove_export(session.export_name)
        del disk.sessions[name]
        # The detach waits for guest writes in flight, in a worker.
        await self._io.close_session(session.native)
        log.info("session %s on %s stopped", name, disk.name)
        self._emit("FLEECE_STOPPED", {"disk": disk.name, "name": name})

    async def _watch(self) -> None:
        """Report sessions that broke (CBW failed under break-snapshot)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            for disk in list(self.disks.values()):
                for session in list(disk.sessions.values()):
                    if session.broken_reported:
                        continue
                    st = session.stats()
                    if st.broken:
                        session.broken_reported = True
                        err = os.strerror(st.broken_errno or errno.EIO)
                        log.error("session %s on %s broke: %s", session.name, disk.name, err)
                        self._emit(
                            "FLEECE_BROKEN",
                            {"disk": disk.name, "name": session.name, "error": err},
                        )

    async def _watchdog(self, interval: float) -> None:
        """Send WATCHDOG=1 from the event loop itself: a loop that stops turning
        (blocked, or spinning in one callback) stops the keep-alives and
        systemd restarts the service after ``WatchdogSec``."""
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        if self.control is not None:
            self.control.emit(event, data)

    # -- control commands ----------------------------------------------------

    def _handlers(self) -> dict[str, Any]:
        return {
            "fleece-start": self.cmd_fleece_start,
            "fleece-stop": self.cmd_fleece_stop,
            "query-fleece": self.cmd_query_fleece,
            "query-disks": self.cmd_query_disks,
            "query-exports": self.cmd_query_exports,
            "query-stats": self.cmd_query_stats,
            "quit": self.cmd_quit,
            **(
                {
                    "x-inject-cbw-error": self.cmd_inject_error,
                    "x-inject-cbw-delay": self.cmd_inject_cbw_delay,
                    "x-inject-queue-delay": self.cmd_inject_queue_delay,
                    "x-inject-flush-error": self.cmd_inject_flush_error,
                }
                if os.environ.get("FLEECED_TEST_HOOKS") == "1"
                else {}
            ),
        }

    def _disk(self, args: dict[str, Any]) -> Disk:
        name = get(args, "disk", str)
        disk = self.disks.get(name)
        if disk is None:
            raise CommandError(f"disk '{name}' not found", "DeviceNotFound")
        return disk

    def _session(self, args: dict[str, Any]) -> Session:
        """The session named by ``disk`` and ``name`` (default ``fleece``).

        :raise CommandError: when the disk or the session does not exist.
        """
        disk = self._disk(args)
        name = get(args, "name", str, "fleece")
        session = disk.sessions.get(name)
        if session is None:
            raise CommandError(f"disk '{disk.name}' has no session '{name}'")
        return session

    async def cmd_fleece_start(self, args: dict[str, Any]) -> Any:
        check_keys(args, {
            "disk", "name", "export", "cluster-size", "bitmap", "on-cbw-error",
            "cbw-timeout", "max-temp", "cache", "temp-dir", "read-only",
        })
        disk = self._disk(args)
        options = session_options_from_args({**self.config.session_defaults, **args})
        async with self._disk_locks[disk.name]:
            session = await self._start_session(disk, options)
        return {"export": session.export_name, "cluster-size": options.cluster_size}

    async def cmd_fleece_stop(self, args: dict[str, Any]) -> Any:
        check_keys(args, {"disk", "name"})
        disk = self._disk(args)
        async with self._disk_locks[disk.name]:
            await self._stop_session(disk, get(args, "name", str, "fleece"))
        return {}

    async def cmd_query_fleece(self, args: dict[str, Any]) -> Any:
        check_keys(args, set())
        out = []
        for disk in self.disks.values():
            for session in disk.sessions.values():
                st = session.stats()
                info: dict[str, Any] = {
                    "disk": disk.name,
                    "name": session.name,
                    "export": session.export_name,
                    "state": "broken" if st.broken else "active",
                    "cluster-size": session.options.cluster_size,
                    "on-cbw-error": "break-guest-write"
                    if session.options.break_guest_write else "break-snapshot",
                    "clusters": {
                        "total": st.clusters_total,
                        "needed": st.clusters_needed,
                        "copied": st.clusters_copied,
                        "zero": st.clusters_zero,
                        "discarded": st.clusters_discarded,
                    },
                    "temp-bytes": st.temp_bytes,
                    "temp-bytes-allocated": st.temp_bytes_allocated,
                    "temp-bytes-written": st.temp_bytes_written,
                    "cache-bytes": st.cache_bytes,
                    "cbw-count": st.cbw_count,
                    "cbw-bytes": st.cbw_bytes,
                    "discarded-bytes": st.discarded_bytes,
                    "reads": {
                        "temp": st.read_temp_bytes,
                        "cache": st.read_cache_bytes,
                        "source": st.read_source_bytes,
                    },
                    "temp-dir": session.temp_dir,
                }
                if st.broken:
                    info["error"] = os.strerror(st.broken_errno or errno.EIO)
                out.append(info)
        return out

    async def cmd_query_disks(self, args: dict[str, Any]) -> Any:
        check_keys(args, set())
        out = []
        for d in self.disks.values():
            info: dict[str, Any] = {
                "name": d.name,
                "path": d.path,
                "size": d.size,
                "read-only": d.read_only,
                "sessions": sorted(d.sessions),
            }
            flush_errno = d.file.flush_error
            if flush_errno:
                # Sticky: FLUSH/FUA fail EIO until the disk is reopened.
                info["flush-error"] = os.strerror(flush_errno)
            out.append(info)
        return out

    def _export_kind(self, export: Export) -> str:
        return "active" if isinstance(export, ActiveExport) else "snapshot"

    async def cmd_query_exports(self, args: dict[str, Any]) -> Any:
        check_keys(args, set())
        return [
            {
                "name": name,
                "type": self._export_kind(e),
                "size": e.info.size,
                "read-only": e.info.read_only,
                "connections": e.stats.connections,
            }
            for name, e in self.server.exports.items()
        ]

    async def cmd_query_stats(self, args: dict[str, Any]) -> Any:
        check_keys(args, set())
        return {
            "connections": self.server.connection_count,
            "exports": [
                {"name": name, **{k.replace("_", "-"): v for k, v in asdict(e.stats).items()}}
                for name, e in self.server.exports.items()
            ],
        }

    async def cmd_inject_error(self, args: dict[str, Any]) -> Any:
        """Test hook (only with FLEECED_TEST_HOOKS=1): fail the next temp writes."""
        check_keys(args, {"disk", "name", "errno", "count"})
        session = self._session(args)
        err = get(args, "errno", int)
        count = get(args, "count", int, 1)
        if err <= 0 or count < 0:
            raise CommandError("errno must be positive and count non-negative")
        session.native.inject_error(err, count)
        return {}

    async def cmd_inject_cbw_delay(self, args: dict[str, Any]) -> Any:
        """Test hook (only with FLEECED_TEST_HOOKS=1): slow every CBW copy down."""
        check_keys(args, {"disk", "name", "ms"})
        session = self._session(args)
        session.native.inject_delay(get(args, "ms", int))
        return {}

    async def cmd_inject_queue_delay(self, args: dict[str, Any]) -> Any:
        """Test hook (only with FLEECED_TEST_HOOKS=1): slow one kind of queue op down."""
        check_keys(args, {"op", "ms"})
        kinds = {"read": datapath.OP_READ, "write": datapath.OP_WRITE,
                 "snap-read": datapath.OP_SNAP_READ, "flush": datapath.OP_FLUSH}
        op = get(args, "op", str)
        if op not in kinds:
            raise CommandError(f"op must be one of {', '.join(sorted(kinds))}")
        ms = get(args, "ms", int)
        if not 0 <= ms <= 60000:
            raise CommandError("ms must be between 0 and 60000")
        self._io.inject_delay(kinds[op], ms)
        return {}

    async def cmd_inject_flush_error(self, args: dict[str, Any]) -> Any:
        """Test hook (only with FLEECED_TEST_HOOKS=1): fail the next fdatasyncs."""
        check_keys(args, {"disk", "errno", "count"})
        disk = self._disk(args)
        err = get(args, "errno", int)
        count = get(args, "count", int, 1)
        if err <= 0 or count < 0:
            raise CommandError("errno must be positive and count non-negative")
        disk.file.inject_flush_error(err, count)
        return {}

    async def cmd_quit(self, args: dict[str, Any]) -> Any:
        check_keys(args, set())
        asyncio.get_running_loop().call_soon(self.stop)
        return {}


def _write_pid_file(path: str) -> None:
    # A few bytes to a local file at start-up, before any client is served.
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")


def session_options_from_args(args: dict[str, Any]) -> SessionOptions:
    """Build :class:`SessionOptions` from ``fleece-start`` arguments.

    :raise CommandError: on any missing, mistyped or out-of-range argument.
    """
    name = get(args, "name", str, "fleece")
    if not name or "/" in name or "\0" in name:
        raise CommandError(f"invalid session name {name!r}")
    export = get(args, "export", str, None) if "export" in args else None
    if export is not None and (not export or len(export.encode()) > 4096 or "\0" in export):
        raise CommandError(f"invalid export name {export!r}")
    cluster = get_size(args, "cluster-size", 65536)
    if cluster < 4096 or cluster > 16 << 20 or cluster & (cluster - 1):
        raise CommandError(
            f"cluster-size {cluster} must be a power of two between 4096 and 16777216"
        )
    scope: list[tuple[int, int]] = []
    if "bitmap" in args:
        for item in get(args, "bitmap", list):
            if not isinstance(item, dict) or set(item) - {"offset", "length"}:
                raise CommandError("bitmap entries must be {\"offset\": N, \"length\": N}")
            off = get(item, "offset", int)
            length = get(item, "length", int)
            if off < 0 or length <= 0:
                raise CommandError(f"bad bitmap extent offset={off} length={length}")
            scope.append((off, length))
        if not scope:
            raise CommandError("bitmap must list at least one extent")
    policy = get(args, "on-cbw-error", str, "break-snapshot")
    if policy not in ("break-snapshot", "break-guest-write"):
        raise CommandError(
            f"on-cbw-error must be 'break-snapshot' or 'break-guest-write', not '{policy}'"
        )
    timeout = get(args, "cbw-timeout", float, 45.0)
    if timeout < 0:
        raise CommandError("cbw-timeout must not be negative")
    temp_dir = get(args, "temp-dir", str, None) if "temp-dir" in args else None
    if temp_dir is not None and not os.path.isdir(temp_dir):
        raise CommandError(f"temp-dir '{temp_dir}' is not a directory")
    return SessionOptions(
        name=name,
        export=export,
        cluster_size=cluster,
        scope=tuple(scope),
        break_guest_write=policy == "break-guest-write",
        cbw_timeout=timeout,
        max_temp=get_size(args, "max-temp", 0),
        cache=get_size(args, "cache", 0),
        temp_dir=temp_dir,
        read_only=get(args, "read-only", bool, False),
    )
