"""Control commands of persistent and transient dirty bitmaps (``bitmap-*``)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fleeced import bitmap_store as bmap
from fleeced.control.args import check_keys, get, get_size
from fleeced.core import DaemonCore
from fleeced.errors import CommandError
from fleeced.exports import Disk

log = logging.getLogger(__name__)


class BitmapCommands(DaemonCore):
    """``bitmap-add``, ``-remove``, ``-clear``, ``-enable``, ``-disable``, ``-merge``."""

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
            bmap.check_removable(disk.name, bm.name, self.config.disks)
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
