"""The daemon: :class:`~fleeced.core.DaemonCore` with every control command.

Each area's handlers are a mixin from :mod:`fleeced.commands`; :meth:`Daemon._handlers`
maps the control socket's command names to them.
"""

from __future__ import annotations

import os
from typing import Any

from fleeced.commands.bitmaps import BitmapCommands
from fleeced.commands.disks import DiskCommands
from fleeced.commands.fleecing import FleeceCommands
from fleeced.commands.inject import InjectCommands
from fleeced.commands.queries import QueryCommands
from fleeced.commands.vms import VmCommands


class Daemon(DiskCommands, VmCommands, FleeceCommands, BitmapCommands, QueryCommands,
             InjectCommands):
    """One running fleeced: call :meth:`start`, then :meth:`run_until_stopped`."""

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
