"""Test hooks (``x-inject-*``), offered only with ``FLEECED_TEST_HOOKS=1``: they make
the failures and delays the tests need happen on demand."""

from __future__ import annotations

from typing import Any

from fleeced import datapath
from fleeced.control.args import check_keys, get
from fleeced.core import DaemonCore
from fleeced.errors import CommandError


class InjectCommands(DaemonCore):
    """``x-inject-cbw-error``, ``-cbw-delay``, ``-queue-delay``, ``-flush-error``."""

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
