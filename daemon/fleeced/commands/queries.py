"""Control commands that report without changing anything (``query-*``)."""

from __future__ import annotations

import asyncio
import errno
import os
from dataclasses import asdict
from typing import Any

from fleeced.control.args import check_keys, get
from fleeced.core import DaemonCore
from fleeced.exports import ActiveExport, Export

#: Why a session remembered from a daemon that died is broken.
LOST_SESSION = ("the daemon stopped uncleanly while the session was active; its "
                "preserved data is gone (fleece-stop it, then start a new one)")


class QueryCommands(DaemonCore):
    """``query-fleece``, ``-disks``, ``-exports``, ``-stats``, ``-bitmaps``, ``-attachments``."""

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
                read, total = session.progress()
                info["progress"] = {"read": read, "total": total}
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

    async def cmd_query_bitmaps(self, args: dict[str, Any]) -> Any:
        check_keys(args, {"disk"})
        wanted = get(args, "disk", str, None) if "disk" in args else None
        if wanted is not None:
            self._disk(args)
        chosen = [bm for bm in self._all_bitmaps() if wanted is None or bm.disk == wanted]
        # Counting walks every word of a mapped file: off the event loop.
        return await asyncio.to_thread(lambda: [bm.describe() for bm in chosen])

    async def cmd_query_attachments(self, args: dict[str, Any]) -> Any:
        check_keys(args, set())
        return [a.describe() for a in self.attachments.values()]
