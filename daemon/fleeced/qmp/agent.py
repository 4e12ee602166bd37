"""The QEMU guest agent (``qemu-ga``): freeze and thaw guest filesystems.

The agent's socket speaks QMP-style JSON without a greeting, so it is not a
``qemu.qmp`` peer.  A stale reply from an earlier client may sit in the
channel; ``guest-sync-delimited`` (a 0xFF byte, then the echoed id) resyncs
before every session, as libvirt does.  Every step is bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Any, Final

from fleeced.errors import CommandError

log = logging.getLogger(__name__)

#: Seconds for one agent command (a freeze flushes the guest's caches).
AGENT_TIMEOUT: Final = 10.0
#: Longest reply line accepted from the agent.
MAX_LINE: Final = 1 << 20


class GuestAgent:
    """One connection to a guest agent socket; ``async with GuestAgent(path)``."""

    def __init__(self, path: str, timeout: float = AGENT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> GuestAgent:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.path, limit=MAX_LINE), self.timeout)
        except (TimeoutError, OSError) as exc:
            raise CommandError(f"cannot connect to the guest agent at {self.path}: "
                               f"{getattr(exc, 'strerror', None) or 'timed out'}") from None
        try:
            await self._sync()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await asyncio.wait_for(self._writer.wait_closed(), self.timeout)
            except (TimeoutError, OSError):
                pass
            self._writer = None

    async def _sync(self) -> None:
        token = random.randrange(1, 1 << 31)
        await self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}})
        while True:
            reply = await self._recv()
            if reply.get("return") == token:
                return

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Run CMD in the agent.

        :raise CommandError: on an error reply, a timeout or a lost connection.
        """
        msg: dict[str, Any] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        await self._send(msg)
        reply = await self._recv()
        if "error" in reply:
            err = reply["error"]
            desc = err.get("desc", "error") if isinstance(err, dict) else str(err)
            raise CommandError(f"guest agent {cmd}: {desc}")
        return reply.get("return")

    async def _send(self, msg: dict[str, Any]) -> None:
        assert self._writer is not None
        self._writer.write(json.dumps(msg).encode() + b"\n")
        try:
            await asyncio.wait_for(self._writer.drain(), self.timeout)
        except (TimeoutError, OSError) as exc:
            raise CommandError(f"guest agent {self.path}: send failed ({exc})") from None

    async def _recv(self) -> dict[str, Any]:
        assert self._reader is not None
        try:
            line = await asyncio.wait_for(self._reader.readline(), self.timeout)
        except TimeoutError:
            raise CommandError(f"guest agent {self.path}: no answer within "
                               f"{self.timeout:g}s") from None
        except (OSError, ValueError) as exc:
            raise CommandError(f"guest agent {self.path}: {exc}") from None
        if not line:
            raise CommandError(f"guest agent {self.path}: connection closed")
        try:
            reply = json.loads(line.lstrip(b"\xff"))
        except ValueError:
            raise CommandError(f"guest agent {self.path}: not JSON: {line[:80]!r}") from None
        if not isinstance(reply, dict):
            raise CommandError(f"guest agent {self.path}: unexpected reply {reply!r:.80}")
        return reply
