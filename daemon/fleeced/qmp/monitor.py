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
import os
from types import TracebackType
from typing import Any, Final, Protocol

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu.qmp.qmp_client import NegotiationError

from fleeced.errors import CommandError, VmUnreachable

log = logging.getLogger(__name__)

#: Seconds to connect to a VM's QMP socket and finish the greeting.
CONNECT_TIMEOUT: Final = 5.0
#: Seconds one QMP command may take.  ``qom-set drive`` and
#: ``blockdev-reopen`` drain the device's in-flight I/O first; the daemon
#: answers it while it waits, so this is generous, not tight.
COMMAND_TIMEOUT: Final = 30.0
#: Connects tried when the capabilities negotiation fails.  QEMU switches a
#: new monitor to command mode before it sends the reply to
#: ``qmp_capabilities``, so an event emitted meanwhile (a job's, say) can
#: arrive first, and qemu.qmp takes that for a failed negotiation.
NEGOTIATION_TRIES: Final = 3


def negotiation_failed(exc: BaseException) -> bool:
    """Whether EXC is a connect that failed in the capabilities negotiation
    (worth another try: :data:`NEGOTIATION_TRIES` says why)."""
    return isinstance(exc, ConnectError) and isinstance(exc.exc, NegotiationError)


def connect_sync(path: str) -> QEMUMonitorProtocol:
    """A connected synchronous QMP client for PATH (the demo's and the
    tests' guest writers), tried again as :class:`Monitor` does."""
    for tries_left in range(NEGOTIATION_TRIES - 1, -1, -1):
        mon = QEMUMonitorProtocol(path)
        try:
            mon.connect()
            return mon
        except ConnectError as exc:
            mon.close()
            if not negotiation_failed(exc) or not tries_left:
                raise
    raise AssertionError("unreachable")


class QmpFailed(CommandError):
    """QEMU answered a command with an error (``klass`` is its error class)."""

    def __init__(self, cmd: str, klass: str, desc: str) -> None:
        super().__init__(f"{cmd}: {desc}", "GenericError")
        self.cmd = cmd
        self.klass = klass
        self.qemu_desc = desc


class VmMonitor(Protocol):
    """What the attach code needs of a VM's monitor: a QMP socket
    (:class:`Monitor`) or libvirt's passthrough
    (:class:`~fleeced.qmp.libvirt.LibvirtMonitor`)."""

    #: The VM's target: a QMP socket path, or ``libvirt:URI#DOMAIN``.
    path: str
    timeout: float

    async def __aenter__(self) -> VmMonitor: ...

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None: ...

    async def close(self) -> None: ...

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any: ...

    async def device_id(self, device: str) -> str:
        """The qdev id or QOM path of DEVICE as the user named it."""

    @property
    def socket_dir(self) -> str:
        """A directory where QEMU can create a Unix socket the daemon reaches."""


async def vm_alive(target: str) -> bool | None:
    """Whether the VM TARGET names still runs: True, False (gone), or None
    (cannot tell now).  Never takes the VM's QMP slot: for a socket, a bare
    connect (refused or missing: QEMU is gone; accepted, or queued behind
    another client: it runs); for libvirt, the domain's state."""
    from fleeced.qmp import libvirt

    if libvirt.is_target(target):
        return await libvirt.domain_alive(target)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(target),
                                           CONNECT_TIMEOUT)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except (OSError, TimeoutError):
        return None
    writer.close()
    return True


def open_monitor(target: str, timeout: float = COMMAND_TIMEOUT) -> VmMonitor:
    """The monitor of TARGET: a QMP socket path, or a libvirt domain
    (``libvirt:URI#DOMAIN``); use ``async with``."""
    from fleeced.qmp import libvirt

    if libvirt.is_target(target):
        return libvirt.LibvirtMonitor(target, timeout)
    return Monitor(target, timeout)


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
            for tries_left in range(NEGOTIATION_TRIES - 1, -1, -1):
                try:
                    await asyncio.wait_for(self._qmp.connect(self.path), CONNECT_TIMEOUT)
                    break
                except ConnectError as exc:
                    if not negotiation_failed(exc) or not tries_left:
                        raise
                    log.debug("QMP %s: negotiation failed (%s), connecting again",
                              self.path, _reason(exc))
                    await self._disconnect()
                    self._qmp = QMPClient("fleeced")
        except TimeoutError:
            await self._disconnect()
            raise CommandError(f"QMP socket {self.path}: no greeting within "
                               f"{CONNECT_TIMEOUT:g}s (is another client connected?)") from None
        except (QMPError, OSError) as exc:
            await self._disconnect()
            raise VmUnreachable(f"cannot connect to QMP socket {self.path}: "
                               f"{_reason(exc)}") from None
        return self

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._disconnect()

    async def close(self) -> None:
        """Disconnect early (idempotent): frees the VM's single QMP slot."""
        await self._disconnect()

    async def device_id(self, device: str) -> str:
        return device

    @property
    def socket_dir(self) -> str:
        """Beside the VM's QMP socket: QEMU created that one there."""
        return os.path.dirname(os.path.abspath(self.path))

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
