"""Control commands that start and stop fleecing sessions (``fleece-start``, ``fleece-stop``)."""

from __future__ import annotations

import asyncio
from typing import Any

from fleeced import bitmap_store as bmap
from fleeced.commands.bitmaps import BitmapCommands
from fleeced.control.args import check_keys, get
from fleeced.daemon_config import session_options_from_args
from fleeced.errors import CommandError
from fleeced.exports import CbwTargetExport, Disk, Session, SessionOptions
from fleeced.qmp import attach as vm
from fleeced.qmp.monitor import open_monitor

#: The cluster size of QEMU 7.2's copy-before-write into an NBD target (the
#: target cannot tell it one; block-copy's default).
CBW_CLUSTER = 64 * 1024


class FleeceCommands(BitmapCommands):
    """``fleece-start`` (with checkpoints, or with QEMU copying before write) and
    ``fleece-stop``; a checkpoint uses the bitmap commands' helpers."""

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
