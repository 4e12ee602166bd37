"""systemd integration with the standard library only: sd_notify and LISTEN_FDS.

Follows sd_notify(3) and sd_listen_fds(3), with nbdkit's checks for socket
activation.  Must not import asyncio or anything of the daemon.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Final

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START: Final = 3
#: More than this many inherited sockets is a configuration error.
MAX_LISTEN_FDS: Final = 64


def notify(state: str) -> bool:
    """Send one sd_notify(3) datagram if ``NOTIFY_SOCKET`` is set.

    Failures are logged at debug level and reported as ``False``: a missing
    or broken notify socket must never stop the data path.

    :param state: newline-separated assignments, e.g. ``"READY=1"``.
    :return: whether the datagram was sent.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never block the event loop on a notify socket nobody reads:
            # a full receive queue drops the datagram (EAGAIN) instead.
            sock.setblocking(False)
            sock.connect(path)
            sock.sendall(state.encode())
    except OSError as exc:
        log.debug("sd_notify(%r) failed: %s", state, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` keep-alives, or ``None`` without a watchdog.

    Per sd_watchdog_enabled(3): ``WATCHDOG_USEC`` set (and ``WATCHDOG_PID``,
    when set, naming us); keep-alives go out at half the timeout.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    try:
        if pid is not None and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC/WATCHDOG_PID")
        return None
    if value <= 0:
        return None
    return value / 2e6


def listen_fds(unset_environment: bool = True) -> list[socket.socket]:
    """Return the sockets passed by systemd socket activation.

    Checks ``LISTEN_PID`` against our pid, caps ``LISTEN_FDS``, unsets both
    variables (so children do not inherit them) and marks the descriptors
    close-on-exec.  The socket family is detected from each descriptor.

    :raise ValueError: when ``LISTEN_FDS`` is malformed or too large.
    :return: the sockets, in descriptor order (empty without activation).
    """
    pid = os.environ.get("LISTEN_PID")
    fds = os.environ.get("LISTEN_FDS")
    if pid is None or fds is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        count = int(fds)
    except ValueError as exc:
        raise ValueError(f"malformed LISTEN_PID/LISTEN_FDS: {exc}") from None
    if not 0 < count <= MAX_LISTEN_FDS:
        raise ValueError(f"LISTEN_FDS={count} is out of range 1..{MAX_LISTEN_FDS}")
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks
