"""Control-socket client for the CLI, on QEMU's own ``qemu.qmp`` library.

Using ``QMPClient`` here means every CLI call also exercises the daemon's
QMP compatibility.  Failures become :class:`~fleeced.cli.CliError` lines.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient

from fleeced.errors import CliError


class ControlClient:
    """A connected control client; use :meth:`connect_to` as a context manager."""

    def __init__(self, qmp: QMPClient) -> None:
        self._qmp = qmp

    @classmethod
    @contextlib.asynccontextmanager
    async def connect_to(cls, path: str) -> AsyncIterator[ControlClient]:
        """Connect to the daemon at PATH.

        :raise CliError: when nothing listens there.
        """
        # qemu.qmp logs connection failures at ERROR; we print one line instead.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
        qmp = QMPClient("fleeced-cli")
        try:
            await qmp.connect(path)
        except ConnectError as exc:
            raise CliError(
                f"cannot reach the daemon at {path}: {exc.exc}"
                " (is `fleeced serve` running? set --control or FLEECED_CONTROL)"
            ) from None
        try:
            yield cls(qmp)
        finally:
            await qmp.disconnect()

    async def execute(self, cmd: str, args: dict[str, Any]) -> Any:
        """Run CMD; a QMP error reply becomes a one-line CliError.

        :raise CliError: when the daemon answers with an error.
        """
        try:
            return await self._qmp.execute(cmd, args)
        except ExecuteError as exc:
            raise CliError(str(exc)) from None
