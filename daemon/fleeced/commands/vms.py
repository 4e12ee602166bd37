"""Control commands that attach a running VM's disk to the daemon and detach it
(``vm-attach``, ``vm-detach``), with the dirty-bitmap hand-off across detached periods."""

from __future__ import annotations

import asyncio
import logging
import os
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from fleeced import bitmap_store as bmap
from fleeced import sources
from fleeced.commands.fleecing import CBW_CLUSTER, FleeceCommands
from fleeced.control.args import check_keys, get
from fleeced.daemon_config import session_options_from_args
from fleeced.datapath import NativeFile
from fleeced.errors import CommandError, VmUnreachable
from fleeced.exports import Disk, stat_identity
from fleeced.qmp import attach as vm
from fleeced.qmp import handoff, libvirt
from fleeced.qmp.agent import GuestAgent
from fleeced.qmp.monitor import VmMonitor, open_monitor

log = logging.getLogger(__name__)


class VmCommands(FleeceCommands):
    """``vm-attach`` and ``vm-detach``; a frozen attach starts a session, so the
    fleecing commands' helpers are needed."""

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
                if not (force and isinstance(exc, VmUnreachable)):
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
            if not (force and isinstance(exc, VmUnreachable)):
                raise
            log.warning("disk %s: %s; forgetting the attachment", disk.name, exc.desc)
        del self.attachments[disk.name]
        await self._forget_cbw_disk(disk)
        await self._record(f"disk '{disk.name}' is detached",
                           after_restart="a restart lists it as attached until "
                           "vm-detach --force")
        log.info("disk %s detached: %s %s no longer exports node %s", disk.name, att.qmp,
                 att.device, att.original)

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


def _export_uri(att: vm.Attachment) -> str:
    """Where a disk reaches the VM node QEMU exports for it."""
    assert att.upstream is not None
    return f"nbd+unix:///{urllib.parse.quote(att.disk, safe='')}?socket={att.upstream}"


def _file_identity(path: str) -> tuple[str, ...] | None:
    """:func:`stat_identity` of PATH; None when it is no local file."""
    try:
        return stat_identity(os.stat(path))
    except (OSError, ValueError):
        return None
