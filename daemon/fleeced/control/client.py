"""Control-socket client for the CLI, on QEMU's own ``qemu.qmp`` library.

Using ``QMPClient`` here means every CLI call also exercises the daemon's
QMP compatibility.  Failures become :class:`~fleeced.cli.CliError` lines;
a connection that breaks under a command (the daemon stopped, or was
killed and restarted by systemd) is :class:`ConnectionLost`, after which
:meth:`ControlClient.reconnect` waits, bounded, for the daemon to be back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError, Runstate

from fleeced.errors import CliError

#: Seconds :meth:`ControlClient.reconnect` waits for a daemon to come back
#: (systemd restarts a failed service after RestartSec=, 2 s in our unit).
RECONNECT_TIMEOUT: Final = 60.0
#: Seconds between two attempts.
RECONNECT_INTERVAL: Final = 0.5


class ConnectionLost(CliError):
    """The control connection broke while a command ran: its outcome is unknown."""


class ControlClient:
    """A connected control client; use :meth:`connect_to` as a context manager."""

    def __init__(self, qmp: QMPClient, path: str) -> None:
        self._qmp = qmp
        self._path = path

    @classmethod
    @contextlib.asynccontextmanager
    async def connect_to(cls, path: str) -> AsyncIterator[ControlClient]:
        """Connect to the daemon at PATH.

        :raise CliError: when nothing listens there.
        """
        # qemu.qmp logs connection failures at ERROR; we print one line instead.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
        client = cls(await _connect(path), path)
        try:
            yield client
        finally:
            await client._disconnect()

    async def _disconnect(self) -> None:
        try:
            await self._qmp.disconnect()
        except (QMPError, OSError, EOFError):
            pass  # the connection is gone already; nothing to tidy

    async def execute(self, cmd: str, args: dict[str, Any]) -> Any:
        """Run CMD; a QMP error reply becomes a one-line CliError.

        :raise CliError: when the daemon answers with an error.
        :raise ConnectionLost: when the connection breaks first (whether
            CMD took effect is unknown).
        """
        try:
            return await self._qmp.execute(cmd, args)
        except ExecuteError as exc:
            raise CliError(str(exc)) from None
        except (QMPError, OSError, EOFError) as exc:
            raise ConnectionLost(f"the connection to the daemon broke during {cmd} "
                                 f"({_describe(exc)})") from None

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[EventListener]:
        """Queue the daemon's events named NAMES while the block runs."""
        listener = EventListener(names)
        with self._qmp.listen(listener):
            yield listener

    async def next_event(self, listener: EventListener, within: float) -> dict[str, Any] | None:
        """The next event of LISTENER, or None when WITHIN seconds pass first.

        :raise ConnectionLost: when the daemon hangs up first (it stopped).
        """
        if self._qmp.runstate != Runstate.RUNNING:
            raise ConnectionLost("the daemon closed the connection (it stopped)")
        get = asyncio.ensure_future(listener.get())
        changed = asyncio.ensure_future(self._qmp.runstate_changed())
        try:
            await asyncio.wait({get, changed}, timeout=within,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (get, changed):
                fut.cancel()
        if get.done() and not get.cancelled():
            return dict(get.result())
        if self._qmp.runstate != Runstate.RUNNING:
            raise ConnectionLost("the daemon closed the connection (it stopped)")
        return None

    async def reconnect(self, within: float = RECONNECT_TIMEOUT) -> None:
        """Connect again, to a daemon that is restarting: retried every
        :data:`RECONNECT_INTERVAL` for at most WITHIN seconds.

        :raise CliError: when no daemon answers within WITHIN seconds.
        """
        await self._disconnect()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            try:
                self._qmp = await _connect(self._path)
                return
            except CliError as exc:
                if loop.time() + RECONNECT_INTERVAL > deadline:
                    raise CliError(f"the daemon did not come back within {within:g}s: "
                                   f"{exc}") from None
            await asyncio.sleep(RECONNECT_INTERVAL)


async def _connect(path: str) -> QMPClient:
    """:raise CliError: when nothing (usable) listens at PATH."""
    qmp = QMPClient("fleeced-cli")
    try:
        await qmp.connect(path)
    except ConnectError as exc:
        raise CliError(
            f"cannot reach the daemon at {path}: {_describe(exc.exc)}"
            " (is `fleeced serve` running? set --control or FLEECED_CONTROL)"
        ) from None
    return qmp


def _describe(exc: BaseException) -> str:
    """EXC in words, never empty (several connection errors have no text)."""
    text = str(exc)
    return text if text else type(exc).__name__
