"""The daemon: wires disks, exports, NBD listeners and the control socket.

Owns the lifecycle (start, readiness, signals, orderly shutdown with a final
flush) and the control commands.  Nothing here does block I/O directly.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import socket
import stat
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from fleeced import bitmaps as bmap
from fleeced import datapath, sources, systemd
from fleeced.control.args import check_keys, get, get_size
from fleeced.control.server import ControlServer
from fleeced.datapath import NativeFile
from fleeced.errors import CommandError
from fleeced.exports import (
    ActiveExport,
    CbwTargetExport,
    Disk,
    Export,
    Session,
    SessionOptions,
)
from fleeced.ioqueue import DEFAULT_THREADS, IoQueue
from fleeced.metrics import MetricsServer
from fleeced.qmp import attach as vm
from fleeced.qmp import handoff, libvirt
from fleeced.qmp.agent import GuestAgent
from fleeced.qmp.monitor import VmMonitor, open_monitor, vm_alive
from fleeced.settings import CACHE_MODES, DaemonConfig, DiskSpec, session_options_from_args
from fleeced.state import StateDir, StateError

log = logging.getLogger(__name__)

#: How often persistent bitmaps are synced to disk, seconds (also at every
#: FLUSH, at detach and at shutdown).
BITMAP_SYNC_INTERVAL = 30.0
#: How often attached VMs are checked for having gone (virsh destroy, a
#: QEMU that exited or was killed), seconds.
VM_WATCH_INTERVAL = 2.0

#: The cluster size of QEMU 7.2's copy-before-write into an NBD target (the
#: target cannot tell it one; block-copy's default).
CBW_CLUSTER = 64 * 1024

#: Why a session remembered from a daemon that died is broken.
LOST_SESSION = ("the daemon stopped uncleanly while the session was active; its "
                "preserved data is gone (fleece-stop it, then start a new one)")


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
            if self.state is not None:
                await self.state.save()
            for disk_name, options in self.config.fleece:
                await self._start_session(self.disks[disk_name], options)
            if self.config.fleece:
                await self._save_state()
            await self._listen(inherited or [])
            if self.config.metrics is not None:
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
            existing = _identity(os.stat(path))
        except FileNotFoundError:
            existing = None
        for disk in self.disks.values():
            if disk.identity == existing:
                raise ValueError(f"--pid-file {path}: is the image of disk '{disk.name}' "
                                 f"({disk.path}); refusing to replace it")
        # A few bytes to a local file at start-up, before any client is served.
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")
            self._pid_identity = _identity(os.fstat(f.fileno()))

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
                if not _vm_unreachable(exc):
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

    def _unwatch(self, session: Session) -> None:
        """Stop watching before the native session may be freed (its fd with it)."""
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

    # -- control commands ----------------------------------------------------

    def _handlers(self) -> dict[str, Any]:
        return {
            "fleece-start": self.cmd_fleece_start,
            "fleece-stop": self.cmd_fleece_stop,
            "query-fleece": self.cmd_query_fleece,
            "query-disks": self.cmd_query_disks,
            "query-exports": self.cmd_query_exports,
            "query-stats": self.cmd_query_stats,
            "disk-add": self.cmd_disk_add,
            "disk-remove": self.cmd_disk_remove,
            "vm-attach": self.cmd_vm_attach,
            "vm-detach": self.cmd_vm_detach,
            "query-attachments": self.cmd_query_attachments,
            "bitmap-add": self.cmd_bitmap_add,
            "bitmap-remove": self.cmd_bitmap_remove,
            "bitmap-clear": self.cmd_bitmap_clear,
            "bitmap-enable": self.cmd_bitmap_enable,
            "bitmap-disable": self.cmd_bitmap_disable,
            "bitmap-merge": self.cmd_bitmap_merge,
            "query-bitmaps": self.cmd_query_bitmaps,
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
        """Start a session; with ``checkpoint`` NEW (and ``since`` OLD) also a
        checkpoint, the libvirt model: at the snapshot instant OLD's content
        is frozen into the session (its scope, and ``qemu:dirty-bitmap:OLD``
        on the snapshot export) and OLD stops recording, while NEW starts.
        After a good backup remove OLD; after a failed one merge NEW into OLD.
        """
        check_keys(args, {
            "disk", "name", "export", "cluster-size", "bitmap", "on-cbw-error",
            "cbw-timeout", "max-temp", "cache", "temp-dir", "read-only",
            "checkpoint", "since",
        })
        disk = self._disk(args)
        session_args = {k: v for k, v in args.items() if k not in ("checkpoint", "since")}
        att = self.attachments.get(disk.name)
        if att is not None and att.method == "cbw":
            return await self._fleece_start_cbw(disk, att, args, session_args)
        if self._is_cbw_disk(disk):
            raise CommandError(f"disk '{disk.name}' is a VM's node, reached through QEMU; "
                               "it is not attached now (vm-attach it first)")
        options = session_options_from_args({**self.config.session_defaults, **session_args})
        checkpoint = bmap.check_name(get(args, "checkpoint", str)) if "checkpoint" in args \
            else None
        since_name = get(args, "since", str) if "since" in args else None
        if since_name is not None and checkpoint is None:
            raise CommandError("since needs checkpoint (the bitmap that records from now)")
        if since_name is not None and options.scope:
            raise CommandError("bitmap and since both set the session's scope; give one")
        async with self._disk_locks[disk.name]:
            since = None
            if since_name is not None:
                _, since = self._bitmap({"disk": disk.name, "name": since_name})
            new = None
            if checkpoint is not None:
                self._check_new_session(disk, options)
                new = await self._new_bitmap(
                    disk, checkpoint, since.granularity if since else bmap.DEFAULT_GRANULARITY,
                    persistent=self.state is not None)
            try:
                session = await self._start_session(disk, options, since, new)
            except BaseException:
                if new is not None:
                    new.native.close(clean=False)
                    await bmap.remove_file(new)
                raise
            if new is not None:
                disk.bitmaps[new.name] = new
            if since is not None:
                since.enabled = False  # C detached it at the snapshot instant
                frozen = session.native.frozen_bitmap()
                assert frozen is not None
                session.bitmaps[since.name] = bmap.Bitmap(
                    disk.name, since.name, since.granularity, False, frozen,
                    enabled=False, recovered=since.recovered)

            async def undo() -> None:
                await self._stop_session(disk, options.name, record=False)
                if new is not None:
                    await self._undo_checkpoint(disk, since, new)

            await self._record(f"starting session '{options.name}' on '{disk.name}'", undo)
        out: dict[str, Any] = {"export": session.export_name,
                               "cluster-size": options.cluster_size}
        if checkpoint is not None:
            out["checkpoint"] = checkpoint
        if since is not None:
            out["since"] = since.name
            frozen_bm = session.bitmaps[since.name]
            assert isinstance(frozen_bm, bmap.Bitmap)
            out["dirty-bytes"] = await asyncio.to_thread(frozen_bm.native.count)
        return out

    def _is_cbw_disk(self, disk: Disk) -> bool:
        """Whether DISK is a VM node an attach made (method cbw)."""
        return disk.name in self._cbw_disks

    async def _fleece_start_cbw(self, disk: Disk, att: vm.Attachment, args: dict[str, Any],
                                session_args: dict[str, Any]) -> Any:
        """fleece-start on a disk whose VM runs the copy-before-write: with
        the VM paused (the snapshot instant), the session starts, then QEMU's
        filter goes between the device and its node, writing to the
        session's target export."""
        if "checkpoint" in args or "since" in args or "bitmap" in args:
            raise CommandError(f"disk '{disk.name}' is copied before write by QEMU: its "
                               "guest writes do not pass the daemon, which keeps no dirty "
                               "bitmaps for it (no checkpoint, since or bitmap)")
        cluster = session_args.get("cluster-size", CBW_CLUSTER)
        if cluster != CBW_CLUSTER:
            raise CommandError(f"disk '{disk.name}' is copied before write by QEMU, in "
                               f"{CBW_CLUSTER // 1024} KiB clusters: cluster-size must be "
                               f"{CBW_CLUSTER}")
        options = session_options_from_args({**self.config.session_defaults, **session_args,
                                             "cluster-size": CBW_CLUSTER})
        async with self._disk_locks[disk.name]:
            session = await self._start_cbw_session(disk, att, options)

            async def undo() -> None:
                await self._stop_session(disk, options.name, record=False)

            await self._record(f"starting session '{options.name}' on '{disk.name}'", undo)
        return {"export": session.export_name, "cluster-size": options.cluster_size}

    async def _start_cbw_session(self, disk: Disk, att: vm.Attachment,
                                 options: SessionOptions) -> Session:
        """The session, then QEMU's filter writing to its target export, with
        the VM paused between (call holding the disk's lock).

        :raise CommandError: when either cannot start; nothing is left.
        """
        if disk.sessions:
            raise CommandError(f"disk '{disk.name}' has a session already; QEMU's "
                               "copy-before-write serves one at a time")
        socket_path = self._nbd_socket()
        async with open_monitor(att.qmp) as mon:
            paused = await vm.pause(mon)
            try:
                session = await self._start_session(disk, options)
                session.target = CbwTargetExport(session, self._io)
                self.server.add_export(session.target)
                try:
                    await vm.start_cbw(mon, att, socket_path, session.target.info.name,
                                       options.break_guest_write)
                except BaseException:
                    session.target.closing = True
                    await self.server.remove_export(session.target.info.name)
                    session.target = None
                    await self._stop_session(disk, options.name, record=False)
                    raise
            finally:
                if paused:
                    await vm.resume(mon)
        return session

    async def _undo_checkpoint(self, disk: Disk, since: bmap.Bitmap | None,
                               new: bmap.Bitmap) -> None:
        """Take back a checkpoint: NEW goes, SINCE records again and keeps
        what NEW recorded meanwhile (attached before the merge, so no write
        falls between the two)."""
        if since is not None:
            await asyncio.to_thread(disk.file.attach_bitmap, since.native)
            since.enabled = True
            await asyncio.to_thread(since.native.merge_from, new.native)
        await asyncio.to_thread(disk.file.detach_bitmap, new.native)
        del disk.bitmaps[new.name]
        new.native.close(clean=False)
        await bmap.remove_file(new)

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
                        "source-retries": st.read_retries,
                    },
                    "temp-dir": session.temp_dir,
                }
                if st.broken:
                    info["error"] = os.strerror(st.broken_errno or errno.EIO)
                out.append(info)
        for (disk_name, name), rec in self.lost_sessions.items():
            out.append({"disk": disk_name, "name": name, "export": rec["export"],
                        "state": "broken", "error": LOST_SESSION})
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
            if d.source is not None:
                info.update(d.source.describe())
            if d.source is not None and d.source.kind in ("file", "image"):
                info["cache"] = "none" if d.cache == "none" or (
                    d.source.kind == "file" and d.file.direct) else "writeback"
            flush_errno = d.file.flush_error
            if flush_errno:
                # Sticky: FLUSH/FUA fail EIO until the disk is reopened.
                info["flush-error"] = os.strerror(flush_errno)
            source_errno = d.file.source_error
            if source_errno:
                # The upstream (or its qemu-storage-daemon) does not answer:
                # requests fail EIO within a bound until it is back.
                info["source-error"] = os.strerror(source_errno)
            if d.child is not None:
                info["child"] = {"pid": d.child.pid, "running": d.child.running,
                                 "restarts": d.child.restarts}
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
        self.server.sync_stats()
        return {
            "connections": self.server.connection_count,
            "exports": [
                {"name": name, **{k.replace("_", "-"): v for k, v in asdict(e.stats).items()},
                 "in-flight": self.server.in_flight(name)}
                for name, e in self.server.exports.items()
            ],
        }

    # -- dirty bitmaps -----------------------------------------------------------

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

    async def _sync_bitmaps_periodically(self) -> None:
        while True:
            await asyncio.sleep(BITMAP_SYNC_INTERVAL)
            await bmap.sync([bm for bm in self._all_bitmaps() if bm.enabled])

    def _bitmap(self, args: dict[str, Any], key: str = "name") -> tuple[Disk, bmap.Bitmap]:
        disk = self._disk(args)
        name = get(args, key, str)
        bm = disk.bitmaps.get(name)
        if bm is None:
            raise CommandError(f"disk '{disk.name}' has no bitmap '{name}'", "DeviceNotFound")
        assert isinstance(bm, bmap.Bitmap)
        return disk, bm

    async def _new_bitmap(self, disk: Disk, name: str, granularity: int,
                          persistent: bool) -> bmap.Bitmap:
        if name in disk.bitmaps:
            raise CommandError(f"disk '{disk.name}' already has a bitmap '{name}'")
        directory = self._bitmap_dir()
        if persistent and directory is None:
            raise CommandError("persistent bitmaps need a state dir (serve --state-dir DIR "
                               "or --config); add a transient one instead")
        used = set() if self.state is None else {
            str(r.get("file") or bmap.file_name(str(r["disk"]), str(r["name"])))
            for r in self.state.state.bitmaps}
        return await bmap.create(directory if persistent else None, disk.name, name,
                                 disk.size, granularity,
                                 replace_stray=bmap.file_name(disk.name, name) not in used)

    async def cmd_bitmap_add(self, args: dict[str, Any]) -> Any:
        """A new dirty bitmap, recording from now on unless disabled."""
        check_keys(args, {"disk", "name", "granularity", "persistent", "disabled"})
        disk = self._disk(args)
        name = bmap.check_name(get(args, "name", str))
        granularity = bmap.check_granularity(get_size(args, "granularity",
                                                      bmap.DEFAULT_GRANULARITY))
        persistent = get(args, "persistent", bool, True)
        disabled = get(args, "disabled", bool, False)
        if self._is_cbw_disk(disk):
            raise CommandError(f"disk '{disk.name}' is copied before write by QEMU: its guest "
                               "writes do not pass the daemon, which can keep no dirty "
                               "bitmap for it")
        async with self._disk_locks[disk.name]:
            bm = await self._new_bitmap(disk, name, granularity, persistent)
            if not disabled:
                try:
                    await asyncio.to_thread(disk.file.attach_bitmap, bm.native)
                except OSError as exc:
                    bm.native.close(clean=False)
                    await bmap.remove_file(bm)
                    raise CommandError(f"cannot enable bitmap: {exc.strerror or exc}") from None
            bm.enabled = not disabled
            disk.bitmaps[name] = bm

            async def undo() -> None:
                if bm.enabled:
                    await asyncio.to_thread(disk.file.detach_bitmap, bm.native)
                del disk.bitmaps[name]
                bm.native.close(clean=False)
                await bmap.remove_file(bm)

            await self._record(f"adding bitmap '{name}' on '{disk.name}'", undo)
        return await asyncio.to_thread(bm.describe)

    async def cmd_bitmap_remove(self, args: dict[str, Any]) -> Any:
        """Delete a bitmap: recorded first, so that a state that cannot be
        written leaves the bitmap as it was."""
        check_keys(args, {"disk", "name"})
        disk, bm = self._bitmap(args)
        async with self._disk_locks[disk.name]:
            self._still(disk, bm)
            for session in disk.sessions.values():
                if bm.name in session.bitmaps and session.bitmaps[bm.name] is bm:
                    raise CommandError(f"bitmap '{bm.name}' is in use by session "
                                       f"'{session.name}'")
            del disk.bitmaps[bm.name]

            async def undo() -> None:
                disk.bitmaps[bm.name] = bm

            await self._record(f"removing bitmap '{bm.name}' on '{disk.name}'", undo)
            if bm.enabled:
                await asyncio.to_thread(disk.file.detach_bitmap, bm.native)
            bm.native.close(clean=False)
            await bmap.remove_file(bm)
        return {}

    async def cmd_bitmap_clear(self, args: dict[str, Any]) -> Any:
        check_keys(args, {"disk", "name"})
        disk, bm = self._bitmap(args)
        async with self._disk_locks[disk.name]:
            try:
                await asyncio.to_thread(bm.native.clear)
            except OSError as exc:
                raise CommandError(f"cannot clear bitmap: {exc.strerror or exc}") from None
            bm.recovered = None
        return {}

    async def cmd_bitmap_enable(self, args: dict[str, Any]) -> Any:
        check_keys(args, {"disk", "name"})
        disk, bm = self._bitmap(args)
        async with self._disk_locks[disk.name]:
            self._still(disk, bm)
            if not bm.enabled:
                await asyncio.to_thread(disk.file.attach_bitmap, bm.native)
                bm.enabled = True

                async def undo() -> None:
                    await asyncio.to_thread(disk.file.detach_bitmap, bm.native)
                    bm.enabled = False

                await self._record(f"enabling bitmap '{bm.name}' on '{disk.name}'", undo)
        return {}

    async def cmd_bitmap_disable(self, args: dict[str, Any]) -> Any:
        """Stop recording: recorded first, so that a state that cannot be
        written leaves the bitmap recording (a detach and re-attach would
        miss the writes in between)."""
        check_keys(args, {"disk", "name"})
        disk, bm = self._bitmap(args)
        async with self._disk_locks[disk.name]:
            self._still(disk, bm)
            if bm.enabled:
                bm.enabled = False

                async def undo() -> None:
                    bm.enabled = True

                await self._record(f"disabling bitmap '{bm.name}' on '{disk.name}'", undo)
                await asyncio.to_thread(disk.file.detach_bitmap, bm.native)
        return {}

    @staticmethod
    def _still(disk: Disk, bm: bmap.Bitmap) -> None:
        """:raise CommandError: unless BM is still DISK's (after waiting for
        the disk's lock, another command may have removed it)."""
        if disk.bitmaps.get(bm.name) is not bm:
            raise CommandError(f"disk '{disk.name}' has no bitmap '{bm.name}'",
                               "DeviceNotFound")

    async def cmd_bitmap_merge(self, args: dict[str, Any]) -> Any:
        """TARGET |= each of SOURCES (same granularity), e.g. NEW into OLD after
        a failed backup so nothing is lost between attempts."""
        check_keys(args, {"disk", "target", "sources"})
        disk, target = self._bitmap(args, "target")
        names = get(args, "sources", list)
        if not names or not all(isinstance(n, str) for n in names):
            raise CommandError("sources must be a non-empty list of bitmap names")
        sources = []
        for name in names:
            src = disk.bitmaps.get(name)
            if src is None:
                raise CommandError(f"disk '{disk.name}' has no bitmap '{name}'",
                                   "DeviceNotFound")
            assert isinstance(src, bmap.Bitmap)
            if src.granularity != target.granularity:
                raise CommandError(f"bitmap '{name}' has granularity {src.granularity}, "
                                   f"'{target.name}' {target.granularity}: cannot merge")
            sources.append(src)
        async with self._disk_locks[disk.name]:
            for src in sources:
                await asyncio.to_thread(target.native.merge_from, src.native)
                if src.recovered and not target.recovered:
                    target.recovered = src.recovered
        return await asyncio.to_thread(target.describe)

    async def cmd_query_bitmaps(self, args: dict[str, Any]) -> Any:
        check_keys(args, {"disk"})
        wanted = get(args, "disk", str, None) if "disk" in args else None
        if wanted is not None:
            self._disk(args)
        chosen = [bm for bm in self._all_bitmaps() if wanted is None or bm.disk == wanted]
        # Counting walks every word of a mapped file: off the event loop.
        return await asyncio.to_thread(lambda: [bm.describe() for bm in chosen])

    async def _all_dirty(self, disk: Disk, reason: str) -> None:
        """The daemon cannot know what changed on DISK: every enabled bitmap
        goes all dirty, with REASON (never a silently wrong incremental)."""
        for bm in disk.bitmaps.values():
            assert isinstance(bm, bmap.Bitmap)
            if bm.enabled:
                bm.recovered = reason
                try:
                    await asyncio.to_thread(bm.native.set_all)
                except OSError as exc:  # the bits are set; only the re-arm failed
                    log.error("bitmap %s of %s: %s", bm.name, disk.name, exc.strerror or exc)
        log.warning("disk %s: bitmaps set all dirty: %s", disk.name, reason)

    # -- disks at run time ------------------------------------------------------

    async def cmd_disk_add(self, args: dict[str, Any]) -> Any:
        """Serve another disk (a source: an image path, an NBD URI, ``rbd:``;
        ``path`` is the older name of ``source``); remembered in the state
        dir across restarts."""
        check_keys(args, {"name", "source", "path", "format", "read-only", "discard",
                          "description", "cache"})
        name = get(args, "name", str)
        if ("source" in args) == ("path" in args):
            raise CommandError("give the disk's source (or its older name, path)")
        text = get(args, "source" if "source" in args else "path", str)
        fmt = get(args, "format", str, None) if "format" in args else None
        if not name or "\0" in name or len(name.encode()) > 4096:
            raise CommandError(f"invalid disk name {name!r}")
        discard = get(args, "discard", str, "ignore")
        if discard not in ("ignore", "unmap"):
            raise CommandError("discard must be 'ignore' or 'unmap'")
        cache = get(args, "cache", str, None) if "cache" in args else None
        if cache is not None and cache not in CACHE_MODES:
            raise CommandError(f"cache must be one of {', '.join(CACHE_MODES)}")
        try:
            src = sources.parse(text, fmt)
        except sources.SourceError as exc:
            raise CommandError(str(exc)) from None
        spec = DiskSpec(source=text, name=name, read_only=get(args, "read-only", bool, False),
                        discard=discard, description=get(args, "description", str, ""),
                        format=fmt)
        if name in self.disks or self.server.get_export(name) is not None:
            raise CommandError(f"export name '{name}' is already used")
        if src.path is not None and not os.path.isabs(src.path):
            raise CommandError(f"path '{src.path}' must be absolute (the daemon's working "
                               "directory is not yours)")
        try:
            src = await self._probe(src)
            disk = await Disk.open_source(name, src, read_only=spec.read_only,
                                          discard=spec.discard, description=spec.description,
                                          cache=cache)
        except sources.SourceError as exc:
            raise CommandError(str(exc)) from None
        if name in self.disks or self.server.get_export(name) is not None:
            await disk.aclose()
            raise CommandError(f"export name '{name}' is already used")
        try:
            self._check_source(disk)
        except CommandError:
            await disk.aclose()
            raise
        self._add_disk(disk)
        self._log_disk(disk)
        self._runtime_disks.add(name)
        record = {"name": name, **src.record(), "read-only": spec.read_only,
                  "discard": spec.discard, "description": spec.description}
        if cache is not None:
            record["cache"] = cache
        if self.state is not None:
            self.state.state.disks.append(record)

        async def undo() -> None:
            if self.state is not None:
                self.state.state.disks.remove(record)
            self._runtime_disks.discard(name)
            await self._drop_disk(disk)

        await self._record(f"adding disk '{name}'", undo)
        return {"name": name, "size": disk.size}

    async def cmd_disk_remove(self, args: dict[str, Any]) -> Any:
        """Stop serving a disk: its clients get --shutdown-timeout, then a flush."""
        check_keys(args, {"name"})
        name = get(args, "name", str)
        disk = self.disks.get(name)
        if disk is None:
            raise CommandError(f"disk '{name}' not found", "DeviceNotFound")
        async with self._disk_locks[name]:
            if self.disks.get(name) is not disk:
                raise CommandError(f"disk '{name}' not found", "DeviceNotFound")
            if name in self.attachments:
                raise CommandError(f"disk '{name}' is attached to a VM; vm-detach it first")
            sessions = sorted(disk.sessions) + sorted(
                n for (d, n) in self.lost_sessions if d == name)
            if sessions:
                raise CommandError(f"disk '{name}' has sessions ({', '.join(sessions)}); "
                                   "fleece-stop them first")
            if disk.bitmaps:
                raise CommandError(f"disk '{name}' has dirty bitmaps "
                                   f"({', '.join(sorted(disk.bitmaps))}); bitmap-remove "
                                   "them first")
            if name in self._runtime_disks and self.state is not None:
                # Recorded first: a state that cannot be written leaves the
                # disk served, as a restart would find it.
                before = list(self.state.state.disks)
                self.state.state.disks = [d for d in before if d.get("name") != name]

                async def undo() -> None:
                    assert self.state is not None
                    self.state.state.disks = before

                await self._record(f"removing disk '{name}'", undo)
            self._runtime_disks.discard(name)
            await self._drop_disk(disk)
        log.info("disk %s removed", name)
        return {}

    async def _drop_disk(self, disk: Disk) -> None:
        """Stop serving DISK (no sessions, bitmaps or attachment left): its
        clients get --shutdown-timeout, then the image is flushed and closed."""
        await self.server.remove_export(disk.name)
        del self.disks[disk.name]
        del self.actives[disk.name]
        self._disk_locks.pop(disk.name, None)  # waiters find the disk gone
        if not disk.read_only:
            await self._flush_logged(disk, "at disk-remove")
        await disk.aclose()

    # -- VM attachments ----------------------------------------------------------

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

    async def cmd_vm_attach(self, args: dict[str, Any]) -> Any:
        """Redirect a running VM's disk through the daemon (see fleeced.qmp.attach)."""
        check_keys(args, {"disk", "qmp", "device", "method", "reconnect-delay", "freeze",
                          "qga", "session", "freeze-timeout"})
        name = get(args, "disk", str)
        qmp = get(args, "qmp", str)
        device = get(args, "device", str)
        method = get(args, "method", str, "auto")
        if method not in vm.METHODS:
            raise CommandError(f"method must be one of {', '.join(vm.METHODS)}")
        delay = get(args, "reconnect-delay", int, 30)
        if not 0 <= delay <= 3600:
            raise CommandError("reconnect-delay must be between 0 and 3600 seconds")
        freeze = get(args, "freeze", bool, False)
        qga = get(args, "qga", str, None) if "qga" in args else None
        if freeze and not qga:
            raise CommandError("freeze needs qga (the guest agent socket)")
        session_name = get(args, "session", str, None) if "session" in args else None
        if session_name is not None and not freeze:
            raise CommandError("session is started by vm-attach only with freeze")
        freeze_timeout = get(args, "freeze-timeout", float, 10.0)
        if not 0 < freeze_timeout <= 600:
            raise CommandError("freeze-timeout must be between 0 and 600 seconds")
        socket_path = self._nbd_socket()
        found = self.disks.get(name)
        if found is None or self._is_cbw_disk(found):
            if not name or "\0" in name or len(name.encode()) > 4096:
                raise CommandError(f"invalid disk name {name!r}")
            if method not in ("auto", "cbw"):
                raise CommandError(f"disk '{name}' is not a raw image the daemon serves: "
                                   f"QEMU copies before write for it (method cbw, not "
                                   f"{method})")
            return await self._attach_cbw(name, qmp, device, delay, qga if freeze else None,
                                          session_name or "fleece", freeze_timeout)
        if libvirt.is_target(qmp):
            # The device would leave libvirt's node, so a libvirt backup job
            # (which copies before write on that node) would copy new data.
            raise CommandError(f"disk '{name}' serves the image the domain uses: under "
                               "libvirt attach a disk name the daemon does not serve "
                               "(QEMU then copies before write, and libvirt's own backup "
                               "jobs stay right)")
        disk = found
        async with self._disk_locks[disk.name]:
            if disk.name in self.attachments:
                att = self.attachments[disk.name]
                raise CommandError(f"disk '{disk.name}' is already attached (device "
                                   f"{att.device!r} of {att.qmp})")
            async with open_monitor(qmp) as mon:
                att = await vm.prepare(mon, disk=disk.name, image=disk.path, size=disk.size,
                                       read_only=disk.read_only, device=device,
                                       method=method, reconnect_delay=delay)
                # A node that bypassed the host page cache keeps doing so
                # through us, unless the disk's cache mode was given.
                if (disk.cache is None and disk.source is not None
                        and disk.source.kind == "file"
                        and await vm.node_is_cache_direct(mon, att.original)):
                    await self._set_direct(disk, True)
                    att.direct = True
                # Remembered before QEMU changes: a crash from here on is
                # found, and undone by vm-detach, after a restart.
                self.attachments[disk.name] = att
                had_sessions = set(disk.sessions)
                try:
                    await self._save_state()
                    await vm.add_node(mon, att, socket_path)
                    if freeze:
                        assert qga is not None
                        await self._switch_frozen(mon, att, disk, qga, freeze_timeout,
                                                  session_name or "fleece", method == "auto")
                    else:
                        await vm.switch(mon, att, fallback=method == "auto")
                except BaseException as exc:
                    # A session the frozen attach started must not outlive
                    # the switch back: its snapshot would miss guest writes.
                    for name in set(disk.sessions) - had_sessions:
                        await self._stop_session(disk, name, record=False)
                    await self._roll_back(att, exc, mon)
                    raise
                # Writes now come through us: the VM's hand-off bitmap has
                # stopped changing and holds what the detached period wrote.
                await self._take_handoff(mon, disk, att)
            att.state = "attached"
            await self._save_state_logged()
        log.info("disk %s attached: %s %s now reads and writes through fleeced (%s)",
                 disk.name, qmp, device, att.method)
        out = att.describe()
        out["socket"] = socket_path
        if freeze:
            session = disk.sessions.get(session_name or "fleece")
            if session is not None:
                out["export"] = session.export_name
        return out

    async def _set_direct(self, disk: Disk, on: bool) -> None:
        """cache=none on or off for DISK's file (an attach following its VM's
        node).  Failing to is logged, not fatal: the data is the same."""
        try:
            await asyncio.to_thread(disk.file.set_direct, on)
        except OSError as exc:
            log.warning("disk %s: cannot %s the host page cache (%s)", disk.name,
                        "bypass" if on else "use", exc.strerror or exc)

    async def _attach_cbw(self, name: str, qmp: str, device: str, delay: int,
                          qga: str | None, session_name: str, freeze_timeout: float) -> Any:
        """Attach a VM disk the daemon does not serve (any node: qcow2, rbd,
        ...): QEMU exports the node read-only to disk NAME (made now, unless
        a restart kept it), and will run the copy-before-write itself when a
        session starts.  The device stays on its node; with QGA, the guest's
        filesystems are frozen around the session's start."""
        lock = self._disk_locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self.attachments:
                att = self.attachments[name]
                raise CommandError(f"disk '{name}' is already attached (device "
                                   f"{att.device!r} of {att.qmp})")
            disk = self.disks.get(name)
            async with open_monitor(qmp) as mon:
                att = await vm.prepare(mon, disk=name, image=None,
                                       size=disk.size if disk is not None else 0,
                                       read_only=False, device=device, method="cbw",
                                       reconnect_delay=delay)
                if disk is not None and disk.path != _export_uri(att):
                    raise CommandError(f"disk '{name}' is node {disk.path}, not "
                                       f"{att.original!r} of {qmp}; attach under another name")
                ident = None
                if disk is None:
                    filename = await vm.node_filename(mon, att.original)
                    if filename:
                        ident = await asyncio.to_thread(_file_identity, filename)
                    if ident is not None:
                        self._check_identity(ident, f"node {att.original!r} ({filename})")
                self.attachments[name] = att
                created = disk is None
                try:
                    await self._save_state()
                    await vm.export_node(mon, att)
                    if disk is None:
                        disk = await self._cbw_disk(att, ident)
                    else:
                        await self._check_export(disk, att)
                except BaseException as exc:
                    await self._undo_attach_cbw(mon, att, exc, created)
                    raise
            if qga is not None:
                try:
                    await self._frozen_cbw_session(disk, att, qga, freeze_timeout,
                                                   session_name)
                except BaseException as exc:
                    # A session started while frozen must not outlive the attach.
                    for sname in list(disk.sessions):
                        await self._stop_session(disk, sname, record=False)
                    async with open_monitor(qmp) as mon:
                        await self._undo_attach_cbw(mon, att, exc, created)
                    raise
            att.state = "attached"
            await self._save_state_logged()
        log.info("disk %s attached: %s %s, node %s exported to fleeced; QEMU copies "
                 "before write for its sessions", name, qmp, device, att.original)
        out = att.describe()
        out["socket"] = self._nbd_socket()
        if qga is not None:
            out["export"] = disk.sessions[session_name].export_name
        return out

    async def _frozen_cbw_session(self, disk: Disk, att: vm.Attachment, qga: str,
                                  agent_timeout: float, session_name: str) -> None:
        """Freeze the guest's filesystems, start the session, thaw (always,
        bounded; a failed thaw is the command's error)."""
        options = session_options_from_args({**self.config.session_defaults,
                                             "name": session_name,
                                             "cluster-size": CBW_CLUSTER})

        async def start() -> None:
            await self._start_cbw_session(disk, att, options)

        await _frozen(qga, agent_timeout, start)

    async def _cbw_disk(self, att: vm.Attachment, ident: tuple[str, ...] | None) -> Disk:
        """The disk of a VM node QEMU now exports to us (read-only), served
        and remembered like one added by disk-add; IDENT: the node's file."""
        uri = _export_uri(att)
        try:
            native = await asyncio.to_thread(NativeFile.open_nbd, uri, readonly=True)
        except OSError as exc:
            raise CommandError(f"QEMU's export of node {att.original!r} does not answer: "
                               f"{exc.strerror or exc}") from None
        disk = Disk(att.disk, uri, native, read_only=True,
                    source=sources.Source(text=uri, kind="nbd", uri=uri, probed=True),
                    ident=ident)
        try:
            self._check_source(disk)
        except CommandError:
            disk.close()
            raise
        self._add_disk(disk)
        self._runtime_disks.add(att.disk)
        self._cbw_disks.add(att.disk)
        if self.state is not None:
            self.state.state.disks.append({"name": att.disk, "source": uri, "read-only": True,
                                           "vm-node-size": att.size})
        await self._save_state()
        return disk

    async def _check_export(self, disk: Disk, att: vm.Attachment) -> None:
        """See a disk kept from an earlier attach reach QEMU's new export."""
        try:
            await self._io.read(disk.file, 0, min(4096, disk.size))
        except OSError as exc:
            raise CommandError(f"QEMU's export of node {att.original!r} does not answer: "
                               f"{exc.strerror or exc}") from None

    async def _undo_attach_cbw(self, mon: VmMonitor, att: vm.Attachment, cause: BaseException,
                               created: bool) -> None:
        log.warning("attach of %s failed (%s); rolling back", att.disk,
                    getattr(cause, "desc", None) or cause)
        try:
            await vm.unexport_node(mon, att)
        except CommandError as exc:
            log.error("disk %s: QEMU keeps its export of %s: %s", att.disk, att.original,
                      exc.desc)
        if created and att.disk in self.disks:
            await self._forget_cbw_disk(self.disks[att.disk])
        del self.attachments[att.disk]
        await self._save_state_logged()

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

    async def _switch_frozen(self, mon: VmMonitor, att: vm.Attachment, disk: Disk, qga: str,
                             agent_timeout: float, session_name: str, fallback: bool) -> None:
        """Freeze the guest's filesystems, switch, start the session, thaw.

        The thaw always runs, bounded, even when the switch or the session
        fails; a failed thaw is an error of the command (the guest stays
        frozen until someone thaws it, so the caller must know).
        """
        async def switch_and_start() -> None:
            await vm.switch(mon, att, fallback=fallback)
            options = session_options_from_args(
                {**self.config.session_defaults, "name": session_name})
            await self._start_session(disk, options)

        await _frozen(qga, agent_timeout, switch_and_start)

    async def _roll_back(self, att: vm.Attachment, cause: BaseException,
                         mon: VmMonitor) -> None:
        """Put the VM back as it was after a failed attach.

        Uses the attach's own connection (a VM's QMP socket serves one client
        at a time); if that connection is the problem, a fresh one.
        """
        log.warning("attach of %s failed (%s); rolling back", att.disk,
                    getattr(cause, "desc", None) or cause)
        try:
            await vm.switch_back(mon, att)
        except CommandError as first:
            log.warning("rollback of %s on the attach connection failed (%s); "
                        "retrying on a new one", att.disk, first.desc)
            await mon.close()
            try:
                async with open_monitor(att.qmp) as fresh:
                    await vm.switch_back(fresh, att)
            except CommandError as exc:
                # The VM may still point at us: keep the record so vm-detach
                # can finish the job, and keep serving.
                log.error("rollback of %s failed: %s; the attachment stays recorded",
                          att.disk, exc.desc)
                att.state = "rollback-failed"
                await self._save_state_logged()
                return
        del self.attachments[att.disk]
        await self._unset_direct(att)
        await self._save_state_logged()

    async def _unset_direct(self, att: vm.Attachment) -> None:
        """Back to the page cache after an attach that bypassed it."""
        disk = self.disks.get(att.disk)
        if att.direct and disk is not None:
            await self._set_direct(disk, False)

    async def cmd_vm_detach(self, args: dict[str, Any]) -> Any:
        """Switch the VM's disk back to its own node; remove ours."""
        check_keys(args, {"disk", "force"})
        disk = self._disk(args)
        force = get(args, "force", bool, False)
        async with self._disk_locks[disk.name]:
            att = self.attachments.get(disk.name)
            if att is None:
                raise CommandError(f"disk '{disk.name}' is not attached to a VM")
            if disk.sessions and not force:
                raise CommandError(
                    f"disk '{disk.name}' has active sessions ({', '.join(sorted(disk.sessions))})"
                    "; after detach guest writes bypass fleeced and the snapshot would be "
                    "wrong. fleece-stop them first (or force)")
            # Forced: the sessions end before the first write can bypass them.
            for name in list(disk.sessions):
                await self._stop_session(disk, name, record=False)
            if att.method == "cbw":
                await self._detach_cbw(disk, att, force)
                return {}
            if not disk.read_only:
                # Flush while guest I/O still flows: blockdev-del of our node
                # sends an NBD flush and holds QEMU's main loop until it is
                # answered, so the less is dirty then, the shorter the pause.
                await self._flush_logged(disk, "before detach")
            try:
                async with open_monitor(att.qmp) as mon:
                    await self._leave_handoff(mon, disk, att)
                    await vm.switch_back(mon, att)
            except CommandError as exc:
                if not (force and _vm_unreachable(exc)):
                    raise
                # The VM is gone (its QMP socket is dead): nothing to switch back.
                log.warning("disk %s: %s; forgetting the attachment", disk.name, exc.desc)
            del self.attachments[disk.name]
            unrecorded = None
            try:
                await self._record(f"disk '{disk.name}' is detached",
                                   after_restart="a restart lists it as attached until "
                                   "vm-detach --force")
            except CommandError as exc:
                unrecorded = exc  # the detach is done: finish it, then say so
            if not disk.read_only:
                await self._flush_logged(disk, "after detach")
            await self._unset_direct(att)
            # No guest write comes through us until the next attach: the
            # bitmaps are put away clean (a crash now loses nothing; the next
            # write through the daemon marks them in use again first).
            await bmap.mark_clean([bm for bm in self._all_bitmaps() if bm.disk == disk.name])
        log.info("disk %s detached: %s %s is back on node %s", disk.name, att.qmp,
                 att.device, att.original)
        if unrecorded is not None:
            raise unrecorded
        return {}

    async def _detach_cbw(self, disk: Disk, att: vm.Attachment, force: bool) -> None:
        """Detach a disk QEMU copies before write for: its export goes, and
        the disk the attach made with it."""
        try:
            async with open_monitor(att.qmp) as mon:
                await vm.stop_cbw(mon, att)
                await vm.unexport_node(mon, att)
        except CommandError as exc:
            if not (force and _vm_unreachable(exc)):
                raise
            log.warning("disk %s: %s; forgetting the attachment", disk.name, exc.desc)
        del self.attachments[disk.name]
        await self._forget_cbw_disk(disk)
        await self._record(f"disk '{disk.name}' is detached",
                           after_restart="a restart lists it as attached until "
                           "vm-detach --force")
        log.info("disk %s detached: %s %s no longer exports node %s", disk.name, att.qmp,
                 att.device, att.original)

    # -- dirty bitmaps across detached periods ----------------------------------

    async def _leave_handoff(self, mon: VmMonitor, disk: Disk, att: vm.Attachment) -> None:
        """Before switching back: a transient dirty bitmap on the VM's own node
        records the writes that will bypass the daemon (read at the next
        attach).  Without one, the next attach sets the bitmaps all dirty."""
        enabled = [bm for bm in disk.bitmaps.values()
                   if isinstance(bm, bmap.Bitmap) and bm.enabled]
        if not enabled:
            return
        name = vm.node_name(disk.name).replace("fleeced-", "fleeced-handoff-", 1)
        granularity = min(bm.granularity for bm in enabled)
        try:
            await handoff.add_handoff_bitmap(mon, att.original, name, granularity)
        except (CommandError, ValueError) as exc:
            log.error("disk %s: no hand-off bitmap in the VM (%s); its bitmaps go all "
                      "dirty at the next attach", disk.name, getattr(exc, "desc", exc))
            self.handoffs.pop(disk.name, None)
            return
        self.handoffs[disk.name] = {
            "disk": disk.name, "qmp": att.qmp, "device": att.device, "node": att.original,
            "bitmap": name, "granularity": granularity}

    async def _take_handoff(self, mon: VmMonitor, disk: Disk, att: vm.Attachment) -> None:
        """After the switch to the daemon: merge what the VM wrote while
        detached into every enabled bitmap, or set them all dirty when that is
        unknown (no hand-off, the VM restarted, QEMU's NBD server busy)."""
        rec = self.handoffs.pop(disk.name, None)
        enabled = [bm for bm in disk.bitmaps.values()
                   if isinstance(bm, bmap.Bitmap) and bm.enabled]
        if not enabled:
            if rec is not None and rec.get("qmp") == att.qmp:
                try:
                    await handoff.remove_handoff_bitmap(mon, str(rec["node"]),
                                                        str(rec["bitmap"]))
                except CommandError as exc:
                    log.warning("disk %s: stale hand-off bitmap not removed: %s",
                                disk.name, exc.desc)
            return
        if rec is None:
            await self._all_dirty(disk, "the VM may have written while the disk was not "
                                  "attached, and no hand-off bitmap recorded it")
            return
        if rec.get("qmp") != att.qmp or rec.get("node") != att.original:
            await self._all_dirty(disk, "attached to another VM or node than the one that "
                                  "holds the hand-off bitmap")
            return
        try:
            extents = await handoff.collect_handoff(
                mon, att.original, str(rec["bitmap"]), disk.size, mon.socket_dir)
        except (CommandError, OSError, ValueError) as exc:
            reason = (f"hand-off bitmap lost: {exc.reason}"
                      if isinstance(exc, handoff.HandoffLost)
                      else f"hand-off bitmap unreadable: {getattr(exc, 'desc', exc)}")
            await self._all_dirty(disk, reason)
            try:  # leave no stale bitmap in the VM
                await handoff.remove_handoff_bitmap(mon, att.original, str(rec["bitmap"]))
            except CommandError as again:
                log.warning("disk %s: hand-off bitmap not removed: %s", disk.name, again.desc)
            return
        def merge() -> None:
            for bm in enabled:
                for off, length in extents:
                    bm.native.set(off, length)

        await asyncio.to_thread(merge)
        log.info("disk %s: merged %d bytes written while detached into %d bitmap(s)",
                 disk.name, sum(n for _, n in extents), len(enabled))

    async def _flush_logged(self, disk: Disk, when: str) -> None:
        try:
            await self._io.flush(disk.file)
        except OSError as exc:
            log.error("flush of %s %s failed: %s", disk.path, when, exc.strerror or exc)

    async def cmd_query_attachments(self, args: dict[str, Any]) -> Any:
        check_keys(args, set())
        return [a.describe() for a in self.attachments.values()]

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


def _identity(st: os.stat_result) -> tuple[str, ...]:
    """What :attr:`Disk.identity` says of the file STAT describes."""
    if stat.S_ISBLK(st.st_mode):
        return ("blk", str(st.st_rdev), "0")
    return ("file", str(st.st_dev), str(st.st_ino))


def _remove_pid_file(path: str, identity: tuple[str, ...]) -> None:
    """Remove our pid file, but not whatever may have replaced it."""
    try:
        if _identity(os.stat(path)) == identity:
            os.unlink(path)
    except OSError:
        pass


def _inside(path: str, directory: str) -> bool:
    """Whether PATH (symlinks resolved) lies under DIRECTORY."""
    real, top = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([real, top]) == top


async def _frozen(qga: str, agent_timeout: float,
                  action: Callable[[], Awaitable[None]]) -> None:
    """Run ACTION with the guest's filesystems frozen (guest agent QGA).

    The thaw always runs, bounded, even when the freeze or ACTION fails;
    a failed thaw is an error (the guest stays frozen until someone thaws
    it, so the caller must know).
    """
    async with GuestAgent(qga, agent_timeout) as agent:
        failure: BaseException | None = None
        try:
            # Thawed below even when the freeze itself fails: it may have
            # frozen some filesystems before failing on another.
            await agent.execute("guest-fsfreeze-freeze")
            await action()
        except BaseException as exc:
            failure = exc
        try:
            await agent.execute("guest-fsfreeze-thaw")
        except CommandError as exc:
            log.error("thaw of %s failed: %s", qga, exc.desc)
            if failure is None:
                raise
        if failure is not None:
            raise failure


def _vm_unreachable(exc: CommandError) -> bool:
    """Whether EXC says the VM is gone (its QMP socket dead, its libvirt
    domain not running), not that it refused something."""
    return (exc.desc.startswith(("cannot connect to QMP socket", "cannot reach libvirt domain"))
            or (exc.desc.startswith("libvirt domain") and exc.desc.endswith("is not running")))


def _export_uri(att: vm.Attachment) -> str:
    """Where a disk reaches the VM node QEMU exports for it."""
    assert att.upstream is not None
    return f"nbd+unix:///{urllib.parse.quote(att.disk, safe='')}?socket={att.upstream}"


def _file_identity(path: str) -> tuple[str, ...] | None:
    """:func:`_identity` of PATH; None when it is no local file."""
    try:
        return _identity(os.stat(path))
    except (OSError, ValueError):
        return None


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
