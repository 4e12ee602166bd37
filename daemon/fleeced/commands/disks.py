"""Control commands that add and remove disks at run time (``disk-add``, ``disk-remove``)."""

from __future__ import annotations

import logging
import os
from typing import Any

from fleeced import sources
from fleeced.control.args import check_keys, get
from fleeced.core import DaemonCore
from fleeced.daemon_config import CACHE_MODES, DiskSpec
from fleeced.errors import CommandError
from fleeced.exports import Disk

log = logging.getLogger(__name__)


class DiskCommands(DaemonCore):
    """``disk-add`` and ``disk-remove``; the disks are remembered in the state dir."""

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
