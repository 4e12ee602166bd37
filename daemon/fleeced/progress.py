"""``FLEECE_PROGRESS`` events: a session's backup progress on the control socket.

C counts the snapshot's clusters read at least once (lock-free, both data
planes); this module only looks at the two numbers from the event loop and
tells control clients when they changed, at a bounded rate per session: at
most one event per :data:`MIN_INTERVAL`, except the one that reaches 100%,
which goes out at the next look, and a last one when the session stops with
news not yet sent (before its ``FLEECE_STOPPED``).  Looking costs one cffi
call that reads two integers, every :data:`POLL_INTERVAL` per session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final, Protocol

log = logging.getLogger("fleeced")

#: The name of the event.
EVENT: Final = "FLEECE_PROGRESS"
#: Seconds at least between two events of one session (100% excepted).
MIN_INTERVAL: Final = 1.0
#: Seconds between two looks at a session's counters.
POLL_INTERVAL: Final = 0.25

Emit = Callable[[str, dict[str, Any]], None]


class _Progressing(Protocol):
    name: str
    export_name: str

    def progress(self) -> tuple[int, int]: ...


class ProgressEvents:
    """Emits ``FLEECE_PROGRESS`` for one session while it runs."""

    def __init__(self, emit: Emit, disk: str, session: _Progressing) -> None:
        self._emit = emit
        self._disk = disk
        self._session = session
        self._sent: tuple[int, int] | None = None   # what the last event said
        self._sent_at = float("-inf")
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start looking (on the running loop); the first event tells the total."""
        self._tick()

    def stop(self) -> None:
        """Stop looking; send what changed since the last event, if anything."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._look(final=True)

    def _tick(self) -> None:
        self._handle = None
        if self._look(final=False):
            self._handle = asyncio.get_running_loop().call_later(POLL_INTERVAL, self._tick)

    def _look(self, final: bool) -> bool:
        """Emit when due; False once the session can no longer be asked."""
        try:
            now = self._session.progress()
        except OSError:
            return False    # closed under us (the stop comes next)
        if now == self._sent:
            return True
        t = asyncio.get_running_loop().time()
        if final or now[0] >= now[1] or t - self._sent_at >= MIN_INTERVAL:
            self._sent, self._sent_at = now, t
            self._emit(EVENT, {"disk": self._disk, "name": self._session.name,
                               "export": self._session.export_name,
                               "read": now[0], "total": now[1]})
        return True


def watch(emit: Emit, disk: str, session: Any) -> None:
    """Start the events of SESSION (a :class:`~fleeced.exports.snapshot.Session`)."""
    events = ProgressEvents(emit, disk, session)
    session.progress_events = events
    events.start()


def unwatch(session: Any) -> None:
    """Stop them, before the native session may be closed."""
    events: ProgressEvents | None = getattr(session, "progress_events", None)
    if events is not None:
        session.progress_events = None
        events.stop()
