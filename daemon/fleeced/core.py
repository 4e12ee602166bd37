"""The daemon's core: its lifecycle, its registry and its state.

Owns the lifecycle (start, readiness, signals, orderly shutdown with a final
flush), the registry of disks, exports, sessions and VM attachments, and the
state directory that remembers them across restarts.  The control commands
live in :mod:`fleeced.commands`, one module per area; :class:`fleeced.daemon.Daemon`
puts them together.  Nothing here does block I/O directly.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fleeced import bitmap_store as bmap
from fleeced import progress, sources, systemd
from fleeced.control.args import check_keys, get
from fleeced.control.server import ControlServer
from fleeced.daemon_config import CACHE_MODES, DaemonConfig, DiskSpec
from fleeced.datapath import NativeFile
from fleeced.errors import CommandError, VmUnreachable
from fleeced.exports import (
    ActiveExport,
    CbwTargetExport,
    Disk,
    Session,
    SessionOptions,
    stat_identity,
)
from fleeced.ioqueue import DEFAULT_THREADS, IoQueue
from fleeced.qmp import attach as vm
from fleeced.qmp.monitor import open_monitor, vm_alive
from fleeced.state_dir import StateDir, StateError

if TYPE_CHECKING:
    from fleeced.metrics import MetricsServer

log = logging.getLogger(__name__)

#: How often persistent bitmaps are synced to disk, seconds (also at every
#: FLUSH, at detach and at shutdown).
BITMAP_SYNC_INTERVAL = 30.0
#: How often attached VMs are checked for having gone (virsh destroy, a
#: QEMU that exited or was killed), seconds.
VM_WATCH_INTERVAL = 2.0


class DaemonCore:
    """One running fleeced: call :meth:`start`, then :meth:`run_until_stopped`.

    The command handlers are mixins on this class (:mod:`fleeced.commands`).
    """

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
            tls=config.tls, native=config.data_plane == "native",
        )
        self.server.on_count_change = self._status
        self.control: ControlServer | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._bitmap_task: asyncio.Task[None] | None = None
        self._vm_task: asyncio.Task[None] | None = None
        # One lock per disk serializes the commands that change that disk's
        # sessions and attachment; commands on different disks never wait
        # for each other.
        self._disk_locks: dict[str, asyncio.Lock] = {}
        self.state: StateDir | None = None
        #: VM disks redirected through the daemon, by disk name.
        self.attachments: dict[str, vm.Attachment] = {}
        #: Sessions that were active when an earlier daemon died: reported
        #: broken until fleece-stop, never served.  Keyed by (disk, name).
        self.lost_sessions: dict[tuple[str, str], dict[str, Any]] = {}
        #: Hand-off bitmaps left in VMs at detach, by disk (state dir: handoffs).
        self.handoffs: dict[str, dict[str, Any]] = {}
        #: Disks added with disk-add (remembered in the state dir).
        self._runtime_disks: set[str] = set()
        #: Disks an attach made for a VM node QEMU copies before write for.
        self._cbw_disks: set[str] = set()
        #: Unix sockets of inherited (socket-activated) listeners.
        self._inherited_unix: list[str] = []
        #: Records of bitmaps of served disks that could not be loaded even
        #: in memory: kept in the state for the next start.
        self._unloaded_bitmaps: list[dict[str, Any]] = []
        #: What our pid file is (no disk may be it), once written.
        self._pid_identity: tuple[str, ...] | None = None
        #: The Prometheus endpoint (``--metrics``), while serving.
        self._metrics: MetricsServer | None = None

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
        _raise_fd_limit()
        self._io.start()
        try:
            if self.config.state_dir is not None:
                try:
                    self.state = StateDir.open(self.config.state_dir)
                except StateError as exc:
                    raise ValueError(str(exc)) from None
            for spec in self.config.disks:
                await self._open_disk(spec)
            # Taken first: _restore_state re-syncs the document from memory.
            remembered = list(self.state.state.bitmaps) if self.state is not None else []
            await self._restore_state()
            await self._restore_bitmaps(remembered)
            bmap.check_required(self.disks, self.config.disks)
            if self.state is not None:
                await self.state.save()
            for disk_name, options in self.config.fleece:
                await self._start_session(self.disks[disk_name], options)
            if self.config.fleece:
                await self._save_state()
            await self._listen(inherited or [])
            if self.config.metrics is not None:
                # prometheus-client and its HTTP server cost a quarter of the
                # daemon's start-up: loaded only when asked for.
                from fleeced.metrics import MetricsServer

                self._metrics = MetricsServer(self, *self.config.metrics)
                await self._metrics.start()
            if self.config.pid_file:
                self._write_pid_file(self.config.pid_file)
        except BaseException:
            await self._close_everything()
            raise
        self._bitmap_task = loop.create_task(self._sync_bitmaps_periodically())
        self._vm_task = loop.create_task(self._watch_vms())
        interval = systemd.watchdog_interval()
        if interval is not None:
            self._watchdog_task = loop.create_task(self._watchdog(interval))
        systemd.notify("READY=1\nSTATUS=serving, 0 connections")

    async def _listen(self, inherited: list[socket.socket]) -> None:
        cfg = self.config
        for sock in inherited:
            if sock.family == socket.AF_UNIX and isinstance(sock.getsockname(), str):
                self._inherited_unix.append(sock.getsockname())
            await self.server.listen_socket(sock)
        for listener in cfg.listeners:
            if listener.unix is not None:
                await self.server.listen_unix(listener.unix, listener.mode, listener.group)
            elif listener.tcp_port is not None:
                await self.server.listen_tcp(listener.tcp_host, listener.tcp_port)
        if cfg.control_path:
            self.control = ControlServer(self._handlers(),
                                         message_limit=self.config.handshake_limit)
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
        for task in (self._watchdog_task, self._bitmap_task, self._vm_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._watchdog_task = self._bitmap_task = self._vm_task = None
        if self._metrics is not None:
            await self._metrics.close()
            self._metrics = None
        if self.control is not None:
            await self.control.close()
            self.control = None
        # Connections get --shutdown-timeout to finish; stragglers are aborted.
        # QEMU's nbd nodes of attached disks replay what is left unanswered.
        if self.attachments:
            log.warning("stopping with attached VM disks (%s): QEMU holds their I/O until "
                        "a daemon serves them again (reconnect-delay), then fails it",
                        ", ".join(sorted(self.attachments)))
        await self.server.close(replay=frozenset(self.attachments))
        for disk in self.disks.values():
            for session in list(disk.sessions.values()):
                self._unwatch(session)
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
            await disk.aclose()  # its qemu-storage-daemon child, if any, last
            # After the final flush: bits synced, checksum written, in-use
            # cleared (C does it when the last reference goes).
            for bm in list(disk.bitmaps.values()):
                assert isinstance(bm, bmap.Bitmap)
                bm.native.close(clean=True)
            disk.bitmaps.clear()
        self.disks.clear()
        if self.state is not None:
            # An orderly stop ended the sessions; only lost ones stay listed.
            # Attachments stay: QEMU still points at our socket.
            self.state.state.sessions = [dict(disk=d, name=n, **rec) for (d, n), rec
                                         in self.lost_sessions.items()]
            try:
                await self.state.save()
            except OSError as exc:
                log.error("cannot save state in %s: %s", self.state.path, exc)
            self.state.close()
            self.state = None
        if self.config.pid_file and self._pid_identity is not None:
            _remove_pid_file(self.config.pid_file, self._pid_identity)

    def _status(self, count: int) -> None:
        systemd.notify(f"STATUS=serving, {count} connection{'s' if count != 1 else ''}")

    # -- disks and sessions --------------------------------------------------

    async def _open_disk(self, spec: DiskSpec) -> Disk:
        """Open and serve the disk SPEC describes (at start-up).

        :raise ValueError: when its name is taken, its source already
            served (:meth:`_check_source`) or unusable.
        """
        if spec.name in self.disks or self.server.get_export(spec.name) is not None:
            raise ValueError(f"export name {spec.name!r} is used twice")
        if spec.lazy_size is not None:
            return await self._open_lazy(spec)
        try:
            src = await self._probe(sources.parse(spec.source, spec.format))
            disk = await Disk.open_source(spec.name, src, read_only=spec.read_only,
                                          discard=spec.discard, description=spec.description,
                                          cache=spec.cache)
        except sources.SourceError as exc:
            raise ValueError(str(exc)) from None
        except CommandError as exc:
            raise ValueError(exc.desc) from None
        try:
            self._check_source(disk)
        except CommandError as exc:
            await disk.aclose()
            raise ValueError(exc.desc) from None
        self._add_disk(disk)
        self._log_disk(disk)
        return disk

    async def _open_lazy(self, spec: DiskSpec) -> Disk:
        """A disk an attach made for a VM node QEMU exports (remembered in
        the state dir): connected once QEMU's export answers."""
        assert spec.lazy_size is not None
        try:
            native = await asyncio.to_thread(NativeFile.open_nbd_lazy, spec.source,
                                             spec.lazy_size, readonly=True)
        except OSError as exc:
            raise ValueError(f"{spec.source}: {exc.strerror or exc}") from None
        disk = Disk(spec.name, spec.source, native, read_only=True,
                    source=sources.Source(text=spec.source, kind="nbd", uri=spec.source,
                                          probed=True))
        self._add_disk(disk)
        self._log_disk(disk)
        return disk

    @staticmethod
    def _log_disk(disk: Disk) -> None:
        src = disk.source
        how = "" if src is None or src.kind == "file" else (
            f", {src.format} through qemu-storage-daemon" if src.needs_child
            else ", an NBD upstream")
        log.info("disk %s: %s (%d bytes%s)%s", disk.name, disk.path, disk.size, how,
                 " read-only" if disk.read_only else "")

    async def _restore_state(self) -> None:
        """Bring back what the state dir remembers: disks added at run time,
        attachments (QEMU still points at our socket), and the sessions an
        earlier daemon had (reported broken: their temp stores died with it)."""
        if self.state is None:
            return
        st = self.state.state
        kept = []
        for rec in st.disks:
            text = rec.get("source", rec.get("path"))
            fmt = rec.get("format")
            if not isinstance(text, str) or not (fmt is None or isinstance(fmt, str)):
                log.error("state: skipping disk %s: no source", rec["name"])
                continue
            size = rec.get("vm-node-size")
            spec = DiskSpec(source=text, name=str(rec["name"]), format=fmt,
                            read_only=bool(rec.get("read-only", False)),
                            discard=str(rec.get("discard", "ignore")),
                            description=str(rec.get("description", "")),
                            lazy_size=size if isinstance(size, int) and size > 0 else None,
                            cache=rec["cache"] if rec.get("cache") in CACHE_MODES else None)
            if spec.name in self.disks:
                log.warning("state: disk %s is configured; the remembered one is dropped",
                            spec.name)
                continue
            kept.append(rec)
            try:
                await self._open_disk(spec)
            except ValueError as exc:
                # Keep serving the others; the record stays for a later restart.
                log.error("state: cannot reopen disk %s (%s): %s", spec.name, spec.source, exc)
                continue
            self._runtime_disks.add(spec.name)
            if spec.lazy_size is not None:
                self._cbw_disks.add(spec.name)
        st.disks = kept
        for rec in st.attachments:
            try:
                att = vm.Attachment.from_json(rec)
            except TypeError as exc:
                log.error("state: skipping an unreadable attachment: %s", exc)
                continue
            if att.disk not in self.disks:
                log.error("state: VM disk %s was attached but the disk is not served; "
                          "QEMU's requests to it will fail", att.disk)
            self.attachments[att.disk] = att
            log.info("state: %s is attached to %s (%s), state %s", att.disk, att.qmp,
                     att.device, att.state)
            if att.method == "cbw":
                await self._clear_cbw(att)
            elif att.direct and att.disk in self.disks:
                await self._set_direct(self.disks[att.disk], True)
        self._sync_guests()
        for rec in st.handoffs:
            self.handoffs[str(rec.get("disk"))] = rec
        for rec in st.sessions:
            disk_name, name = str(rec.get("disk")), str(rec.get("name"))
            self.lost_sessions[(disk_name, name)] = {"export": str(rec.get("export", ""))}
            log.error("session %s on %s was lost when the previous daemon stopped "
                      "uncleanly; reported broken until fleece-stop", name, disk_name)
        self._sync_state()

    async def _clear_cbw(self, att: vm.Attachment) -> None:
        """After a restart: QEMU's copy-before-write filter of a session the
        previous daemon had is still in the VM, its target gone (QEMU broke
        its snapshot, or fails guest writes under break-guest-write).  Take
        it away now; the session is lost either way."""
        try:
            async with open_monitor(att.qmp) as mon:
                await vm.stop_cbw(mon, att)
        except CommandError as exc:
            log.error("state: cannot check %s for a copy-before-write filter left by the "
                      "previous daemon: %s (fleece-stop or vm-detach retries)", att.qmp, exc.desc)

    def _sync_guests(self) -> None:
        """The NBD server's list of guest exports: the active exports of the
        attached disks, whose clients never wait for others' reply budget."""
        self.server.guest_exports = {name for name, att in self.attachments.items()
                                     if name in self.disks and att.method != "cbw"}

    def _sync_state(self) -> None:
        """Mirror attachments, runtime disks and sessions into the state document."""
        if self.state is None:
            return
        st = self.state.state
        st.attachments = [a.to_json() for a in self.attachments.values()]
        sessions = [dict(disk=d, name=n, **rec) for (d, n), rec in self.lost_sessions.items()]
        for disk in self.disks.values():
            for session in disk.sessions.values():
                sessions.append({"disk": disk.name, "name": session.name,
                                 "export": session.export_name})
        st.sessions = sessions
        st.handoffs = list(self.handoffs.values())
        kept = [r for r in st.bitmaps if r.get("disk") not in self.disks]
        st.bitmaps = (kept + self._unloaded_bitmaps
                      + [bm.record() for bm in self._all_bitmaps() if bm.persistent])

    async def _save_state(self) -> None:
        """Persist the state now.

        :raise CommandError: when it cannot be written.
        """
        self._sync_guests()
        if self.state is None:
            return
        self._sync_state()
        try:
            await self.state.save()
        except OSError as exc:
            raise CommandError(f"cannot save state in {self.state.path}: "
                               f"{exc.strerror or exc}") from None

    async def _save_state_logged(self) -> None:
        try:
            await self._save_state()
        except CommandError as exc:
            log.error("%s", exc.desc)

    async def _record(self, done: str, undo: Callable[[], Awaitable[None]] | None = None,
                      after_restart: str = "") -> None:
        """Persist what a command just did, or fail the command.

        A command whose effect a crash would forget must not report success:
        with UNDO, the effect is rolled back (the state on disk still
        describes the daemon as it was) and the command fails; without, the
        effect stays (it cannot be undone) and the error says so, and what
        a restart would then believe (AFTER_RESTART).

        :param done: what the command did, for the message.
        :raise CommandError: when the state cannot be written.
        """
        try:
            await self._save_state()
        except CommandError as exc:
            if undo is not None:
                await undo()
                self._sync_state()
                raise CommandError(f"{exc.desc}; {done} was undone") from None
            raise CommandError(f"{done}, but {exc.desc}; {after_restart}") from None

    def _check_source(self, disk: Disk) -> None:
        """One source is one disk: a second disk on an image already served
        (by any path: a symlink, a hard link, another device node) would
        write it without the first disk's copy-before-write, and the first
        disk's snapshots would silently take in those writes.

        :raise CommandError: naming the disk that serves it already, or the
            daemon's own file it is.
        """
        self._check_identity(disk.identity, disk.path)
        if (self.state is not None and disk.source is not None and disk.source.path is not None
                and _inside(disk.source.path, self.state.path)):
            raise CommandError(f"{disk.path} lies in the state directory {self.state.path}")

    def _check_identity(self, identity: tuple[str, ...], text: str) -> None:
        """:raise CommandError: when IDENTITY is a served disk's, or the pid file's."""
        for other in self.disks.values():
            if other.identity == identity:
                raise CommandError(f"{text} is already served as disk '{other.name}' "
                                   f"({other.path}); one source can only be one disk")
        if identity == self._pid_identity:
            raise CommandError(f"{text} is the daemon's pid file")

    async def _probe(self, src: sources.Source) -> sources.Source:
        """The source's format decided, and the one-source rule checked
        before anything opens it where it can be (a second opener of an
        image is also refused by QEMU's locks, with a less helpful message).

        :raise sources.SourceError, CommandError: as they say.
        """
        src = await sources.probe(src)
        identity = await asyncio.to_thread(src.identity)
        if identity is not None:
            self._check_identity(identity, src.text)
        return src

    def _write_pid_file(self, path: str) -> None:
        """Write our pid to PATH, which ``serve`` checked holds a pid or
        nothing, unless it is a disk's image (a disk restored from the state
        dir is only known now).

        :raise ValueError: when PATH is a served disk's image.
        """
        try:
            existing = stat_identity(os.stat(path))
        except FileNotFoundError:
            existing = None
        for disk in self.disks.values():
            if disk.identity == existing:
                raise ValueError(f"--pid-file {path}: is the image of disk '{disk.name}' "
                                 f"({disk.path}); refusing to replace it")
        # A few bytes to a local file at start-up, before any client is served.
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")
            self._pid_identity = stat_identity(os.fstat(f.fileno()))

    def _add_disk(self, disk: Disk) -> None:
        self.disks[disk.name] = disk
        active = ActiveExport(disk, self._io)
        self._disk_locks[disk.name] = asyncio.Lock()
        self.actives[disk.name] = active
        self.server.add_export(active)

    def _check_new_session(self, disk: Disk, options: SessionOptions) -> str:
        """The export name of a new session, or a CommandError why it cannot start."""
        if options.name in disk.sessions:
            raise CommandError(f"disk '{disk.name}' already has a session '{options.name}'")
        if (disk.name, options.name) in self.lost_sessions:
            raise CommandError(f"session '{options.name}' on disk '{disk.name}' was lost "
                               "in a daemon restart; fleece-stop it first")
        export_name = options.export or f"{disk.name}@{options.name}"
        if self.server.get_export(export_name) is not None:
            raise CommandError(f"export '{export_name}' already exists")
        if disk.read_only and not self._is_cbw_disk(disk):
            # (A VM node's disk is read-only to the daemon, not to the VM.)
            raise CommandError(f"disk '{disk.name}' is read-only; it needs no fleecing")
        for off, length in options.scope:
            if off + length > disk.size:
                raise CommandError(
                    f"bitmap extent {off}+{length} lies beyond the end of disk "
                    f"'{disk.name}' ({disk.size} bytes)"
                )
        return export_name

    async def _start_session(self, disk: Disk, options: SessionOptions,
                             since: bmap.Bitmap | None = None,
                             new: bmap.Bitmap | None = None) -> Session:
        """Start a session (the native open runs in a queue worker), with a
        checkpoint when SINCE or NEW is given (see :meth:`cmd_fleece_start`).

        :raise CommandError: when the session cannot start.
        """
        export_name = self._check_new_session(disk, options)
        try:
            session = await Session.start(
                disk, options, self._io,
                checkpoint_since=since.native if since is not None else None,
                checkpoint_new=new.native if new is not None else None)
        except OSError as exc:
            raise CommandError(f"cannot start session: {exc.strerror or exc}") from None
        try:  # another disk may have taken the export name meanwhile
            self._check_new_session(disk, options)
        except CommandError:
            await self._io.close_session(session.native)
            raise
        disk.sessions[options.name] = session
        self.server.add_export(session.export)
        self._watch(disk, session)
        log.info("session %s on %s started: export %r", options.name, disk.name, export_name)
        return session

    async def _stop_session(self, disk: Disk, name: str, record: bool = True) -> None:
        """Stop session NAME of DISK (or forget a lost one).

        :param record: persist the state now (else the caller does).
        :raise CommandError: when there is no such session, or the stop
            cannot be recorded (it happened all the same).
        """
        if (disk.name, name) in self.lost_sessions:
            del self.lost_sessions[(disk.name, name)]
            log.info("lost session %s on %s forgotten", name, disk.name)
            self._emit("FLEECE_STOPPED", {"disk": disk.name, "name": name})
            if record:
                await self._record(f"lost session '{name}' on '{disk.name}' forgotten",
                                   after_restart="it is listed as lost again after a "
                                   "restart")
            return
        session = disk.sessions.get(name)
        if session is None:
            raise CommandError(f"disk '{disk.name}' has no session '{name}'")
        if session.target is not None:
            await self._stop_cbw(disk, session.target)
        # Clients of the snapshot get --shutdown-timeout, then are aborted;
        # their queued operations keep the native session alive and fail.
        await self.server.remove_export(session.export_name)
        del disk.sessions[name]
        self._unwatch(session)
        # The detach waits for guest writes in flight, in a worker.
        await self._io.close_session(session.native)
        log.info("session %s on %s stopped", name, disk.name)
        self._emit("FLEECE_STOPPED", {"disk": disk.name, "name": name})
        if record:
            await self._record(f"session '{name}' on '{disk.name}' stopped",
                               after_restart="a restart lists it as lost until fleece-stop")

    async def _stop_cbw(self, disk: Disk, target: CbwTargetExport) -> None:
        """Take QEMU's copy-before-write filter away (the device back on its
        node), then the target export.  A VM that is gone has nothing to take
        away.

        :raise CommandError: when QEMU refuses: the session stays, since the
            filter would go on copying into a target that is gone.
        """
        att = self.attachments.get(disk.name)
        target.closing = True
        if att is not None:
            try:
                async with open_monitor(att.qmp) as mon:
                    await vm.stop_cbw(mon, att)
            except CommandError as exc:
                if not isinstance(exc, VmUnreachable):
                    target.closing = False
                    raise
                log.warning("disk %s: %s; its copy-before-write filter went with it",
                            disk.name, exc.desc)
        await self.server.remove_export(target.info.name)

    def _watch(self, disk: Disk, session: Session) -> None:
        """Report the session when it breaks (CBW failed under break-snapshot):
        C writes its eventfd at the break, no polling."""
        fd = session.native.event_fd
        asyncio.get_running_loop().add_reader(fd, self._session_broke, disk, session, fd)
        progress.watch(self._emit, disk.name, session)

    def _unwatch(self, session: Session) -> None:
        """Stop watching before the native session may be freed (its fd with it)."""
        progress.unwatch(session)
        if not session.broken_reported:
            asyncio.get_running_loop().remove_reader(session.native.event_fd)

    def _session_broke(self, disk: Disk, session: Session, fd: int) -> None:
        asyncio.get_running_loop().remove_reader(fd)
        session.broken_reported = True
        st = session.stats()
        err = os.strerror(st.broken_errno or errno.EIO)
        log.error("session %s on %s broke: %s", session.name, disk.name, err)
        self._emit("FLEECE_BROKEN", {"disk": disk.name, "name": session.name, "error": err})

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

    def _handlers(self) -> dict[str, Any]:
        """The control commands by name (:class:`fleeced.daemon.Daemon` has them all)."""
        raise NotImplementedError

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

    def _is_cbw_disk(self, disk: Disk) -> bool:
        """Whether DISK is a VM node an attach made (method cbw)."""
        return disk.name in self._cbw_disks

    # -- dirty bitmaps -------------------------------------------------------

    def _all_bitmaps(self) -> list[bmap.Bitmap]:
        out = []
        for disk in self.disks.values():
            for bm in disk.bitmaps.values():
                assert isinstance(bm, bmap.Bitmap)
                out.append(bm)
        return out

    def _bitmap_dir(self) -> str | None:
        return None if self.state is None else os.path.join(self.state.path, "bitmaps")

    async def _restore_bitmaps(self, records: list[dict[str, Any]]) -> None:
        """Reopen the persistent bitmaps of the served disks (a bitmap a dead
        daemon had open comes back all dirty) and attach the enabled ones.
        Records of disks not served now stay in the state document."""
        directory = self._bitmap_dir()
        if self.state is None or directory is None:
            return
        self.state.state.bitmaps = list(records)
        for rec in records:
            disk = self.disks.get(str(rec.get("disk")))
            if disk is None:
                continue  # the record stays for when the disk is served again
            try:
                bm = await bmap.load(directory, rec, disk.size)
            except OSError as exc:  # not even in memory (ENOMEM)
                log.error("bitmap %s of %s cannot be loaded (%s); it stays recorded for "
                          "the next start", rec["name"], disk.name, exc.strerror or exc)
                self._unloaded_bitmaps.append(rec)
                continue
            if bm.enabled:
                await asyncio.to_thread(disk.file.attach_bitmap, bm.native)
            disk.bitmaps[bm.name] = bm
        self._sync_state()

    async def _sync_bitmaps_periodically(self) -> None:
        while True:
            await asyncio.sleep(BITMAP_SYNC_INTERVAL)
            await bmap.sync([bm for bm in self._all_bitmaps() if bm.enabled])

    # -- VM attachments ------------------------------------------------------

    async def _watch_vms(self) -> None:
        """End the attachments of VMs that are gone (``virsh destroy``, a
        shutdown, QEMU killed): nothing is left to switch back, and a disk
        QEMU exported to us has no source any more."""
        while True:
            await asyncio.sleep(VM_WATCH_INTERVAL)
            for att in list(self.attachments.values()):
                try:
                    if att.state != "attached" or await vm_alive(att.qmp) is not False:
                        continue
                    await self._vm_gone(att)
                except CommandError as exc:
                    log.error("disk %s: ending the attachment of a VM that is gone: %s",
                              att.disk, exc.desc)
                except Exception:  # the watcher must outlive one bad round
                    log.exception("disk %s: checking its VM failed", att.disk)

    async def _vm_gone(self, att: vm.Attachment) -> None:
        disk = self.disks.get(att.disk)
        lock = self._disk_locks.setdefault(att.disk, asyncio.Lock())
        async with lock:
            if self.attachments.get(att.disk) is not att:
                return  # detached meanwhile
            log.warning("disk %s: VM %s is gone; its attachment ends", att.disk, att.qmp)
            del self.attachments[att.disk]
            if disk is not None and att.method == "cbw":
                # Its source was the VM's own export: nothing can be read now.
                for name in list(disk.sessions):
                    session = disk.sessions[name]
                    if session.target is not None:
                        session.target.closing = True
                        await self.server.remove_export(session.target.info.name)
                        session.target = None
                    await self._stop_session(disk, name, record=False)
                await self._forget_cbw_disk(disk)
            elif disk is not None:
                await self._unset_direct(att)
                # Its sessions stay: nothing writes the image any more.
                await bmap.mark_clean([bm for bm in self._all_bitmaps()
                                       if bm.disk == disk.name])
            self._sync_guests()
            await self._record(f"the attachment of disk '{att.disk}' ended",
                               after_restart="a restart lists it as attached until "
                               "vm-detach --force")
        self._emit("VM_GONE", {"disk": att.disk, "qmp": att.qmp})

    def _nbd_socket(self) -> str:
        """The Unix socket QEMU's NBD client reaches the daemon at.

        :raise CommandError: when the daemon listens on no Unix socket.
        """
        for listener in self.config.listeners:
            if listener.unix is not None:
                return os.path.abspath(listener.unix)
        if self._inherited_unix:
            return self._inherited_unix[0]
        raise CommandError("vm-attach needs the daemon to listen on a Unix socket "
                           "(serve --socket PATH, or a [[listen]] unix entry)")

    async def _set_direct(self, disk: Disk, on: bool) -> None:
        """cache=none on or off for DISK's file (an attach following its VM's
        node).  Failing to is logged, not fatal: the data is the same."""
        try:
            await asyncio.to_thread(disk.file.set_direct, on)
        except OSError as exc:
            log.warning("disk %s: cannot %s the host page cache (%s)", disk.name,
                        "bypass" if on else "use", exc.strerror or exc)

    async def _unset_direct(self, att: vm.Attachment) -> None:
        """Back to the page cache after an attach that bypassed it."""
        disk = self.disks.get(att.disk)
        if att.direct and disk is not None:
            await self._set_direct(disk, False)

    async def _forget_cbw_disk(self, disk: Disk) -> None:
        """Remove a disk :meth:`_cbw_disk` made (at detach, or a failed attach)."""
        self._runtime_disks.discard(disk.name)
        self._cbw_disks.discard(disk.name)
        if self.state is not None:
            self.state.state.disks = [d for d in self.state.state.disks
                                      if d.get("name") != disk.name]
        await self.server.remove_export(disk.name)
        del self.disks[disk.name]
        del self.actives[disk.name]
        await disk.aclose()

    async def _flush_logged(self, disk: Disk, when: str) -> None:
        try:
            await self._io.flush(disk.file)
        except OSError as exc:
            log.error("flush of %s %s failed: %s", disk.path, when, exc.strerror or exc)

    async def cmd_quit(self, args: dict[str, Any]) -> Any:
        check_keys(args, set())
        asyncio.get_running_loop().call_soon(self.stop)
        return {}


def _remove_pid_file(path: str, identity: tuple[str, ...]) -> None:
    """Remove our pid file, but not whatever may have replaced it."""
    try:
        if stat_identity(os.stat(path)) == identity:
            os.unlink(path)
    except OSError:
        pass


def _inside(path: str, directory: str) -> bool:
    """Whether PATH (symlinks resolved) lies under DIRECTORY."""
    real, top = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([real, top]) == top


def _raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every NBD client holds
    descriptors, and the event loop has no select() limit to keep under."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the file descriptor limit from %d to %d: %s",
                        soft, hard, exc)
        else:
            log.info("file descriptor limit raised from %d to %d", soft, hard)
