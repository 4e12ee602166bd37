"""One QMP connection to a VM, every step bounded by a timeout.

Built on QEMU's own ``qemu.qmp`` library.  Each daemon command opens its own
connection and closes it when done: a VM's QMP socket serves one client at a
time, and operators (or libvirt's ``qemu-monitor-command``) need it too.

Errors become :class:`~fleeced.control.server.CommandError` with QEMU's error
class and text, so a control client sees what QEMU said.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any, Final

from qemu.qmp import ExecuteError, QMPClient, QMPError

from fleeced.errors import CommandError

log = logging.getLogger(__name__)

#: Seconds to connect to a VM's QMP socket and finish the greeting.
CONNECT_TIMEOUT: Final = 5.0
#: Seconds one QMP command may take.  ``qom-set drive`` and
#: ``blockdev-reopen`` drain the device's in-flight I/O first; the daemon
#: answers it while it waits, so this is generous, not tight.
COMMAND_TIMEOUT: Final = 30.0


class QmpFailed(CommandError):
    """QEMU answered a command with an error (``klass`` is its error class)."""

    def __init__(self, cmd: str, klass: str, desc: str) -> None:
        super().__init__(f"{cmd}: {desc}", "GenericError")
        self.cmd = cmd
        self.klass = klass
        self.qemu_desc = desc


class Monitor:
    """An open QMP connection; use ``async with Monitor.connect(path)``."""

    def __init__(self, path: str, timeout: float = COMMAND_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._qmp = QMPClient("fleeced")

    @classmethod
    def connect(cls, path: str, timeout: float = COMMAND_TIMEOUT) -> Monitor:
        return cls(path, timeout)

    async def __aenter__(self) -> Monitor:
        # qemu.qmp logs failures at ERROR on its own; ours are reported once.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
        try:
            await asyncio.wait_for(self._qmp.connect(self.path), CONNECT_TIMEOUT)
        except TimeoutError:
            await self._disconnect()
            raise CommandError(f"QMP socket {self.path}: no greeting within "
                               f"{CONNECT_TIMEOUT:g}s (is another client connected?)") from None
        except (QMPError, OSError) as exc:
            await self._disconnect()
            raise CommandError(f"cannot connect to QMP socket {self.path}: "
                               f"{_reason(exc)}") from None
        return self

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._disconnect()

    async def close(self) -> None:
        """Disconnect early (idempotent): frees the VM's single QMP slot."""
        await self._disconnect()

    async def _disconnect(self) -> None:
        try:
            await asyncio.wait_for(self._qmp.disconnect(), CONNECT_TIMEOUT)
        except (TimeoutError, QMPError, OSError, EOFError) as exc:
            log.debug("QMP %s: disconnect: %s", self.path, exc)

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Run CMD with ARGS, bounded by the monitor's timeout.

        :raise QmpFailed: when QEMU answers with an error.
        :raise CommandError: when the VM does not answer in time or the
            connection is lost; the command's effect is then unknown.
        """
        limit = self.timeout
        log.debug("QMP %s: %s %s", self.path, cmd, args or {})
        try:
            return await asyncio.wait_for(self._qmp.execute(cmd, args or {}), limit)
        except ExecuteError as exc:
            raise QmpFailed(cmd, exc.error_class, exc.error.error.desc) from None
        except TimeoutError:
            raise CommandError(f"{cmd}: no answer from the VM within {limit:g}s") from None
        except (QMPError, OSError, EOFError) as exc:
            raise CommandError(f"{cmd}: QMP connection lost ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    inner = getattr(exc, "exc", None)
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror
    return str(inner or exc) or type(exc).__name__
