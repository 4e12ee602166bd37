"""``fleeced fleece list --watch``: live backup progress of the fleecing sessions.

The figures come from the daemon's ``FLEECE_PROGRESS`` events (at most one a
second per session); ``query-fleece`` runs at start, when a session starts,
stops or breaks, and every :data:`FALLBACK_POLL` seconds without news (a
session started meanwhile sends its first event only then).  On a terminal
each session gets a ``rich`` progress bar; otherwise (a pipe, a log) a plain
line per change.  The watch ends with exit status 0 once no session is left
running, 1 with a message when the daemon goes away; Ctrl-C ends it like any
client command (130) and SIGTERM with 143, the display closed first either way
(a terminal gets its cursor back).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass
from typing import Any, Final, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
)

from fleeced.cli import human_bytes as human
from fleeced.control.client import ConnectionLost, ControlClient
from fleeced.errors import CliError

#: Seconds without an event after which the sessions are asked for anyway.
FALLBACK_POLL: Final = 2.0
#: The events that change the picture.
EVENTS: Final = ("FLEECE_PROGRESS", "FLEECE_STOPPED", "FLEECE_BROKEN")

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
#: Ended by SIGTERM, as a shell reports a process killed by it.
EXIT_TERMINATED: Final = 128 + signal.SIGTERM


def percent(read: int, total: int) -> float:
    """Share read, in percent; an empty scope is done."""
    return 100.0 if total == 0 else 100.0 * read / total


def progress_text(read: int, total: int) -> str:
    """``"37.5% (24.0 MiB of 64.0 MiB)"``."""
    return f"{percent(read, total):.1f}% ({human(read)} of {human(total)})"


@dataclass
class _Shown:
    """What the watch last showed of one session."""

    export: str
    state: str
    read: int
    total: int


class _Plain:
    """A line per change, for a pipe or a log."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def show(self, key: tuple[str, str], s: _Shown) -> None:
        print(f"{key[0]}/{key[1]} ({s.export}): {progress_text(s.read, s.total)}"
              + ("" if s.state == "active" else f" [{s.state}]"), file=self._out, flush=True)

    def gone(self, key: tuple[str, str]) -> None:
        print(f"{key[0]}/{key[1]}: stopped", file=self._out, flush=True)

    def close(self) -> None:
        pass


class _Bars:
    """A rich progress bar per session, for a terminal."""

    def __init__(self, out: TextIO) -> None:
        # Refreshed by hand on each change: no refresh thread beside the loop.
        # The figures are the plain lines' own (an empty scope is 100%).
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.fields[figures]}"), TextColumn("{task.fields[state]}"),
            console=Console(file=out), auto_refresh=False,
            redirect_stdout=False, redirect_stderr=False)
        self._tasks: dict[tuple[str, str], TaskID] = {}
        self._progress.start()

    def show(self, key: tuple[str, str], s: _Shown) -> None:
        state = "" if s.state == "active" else s.state
        figures = progress_text(s.read, s.total)
        done, total = (s.read, s.total) if s.total > 0 else (1, 1)
        task = self._tasks.get(key)
        if task is None:
            self._tasks[key] = self._progress.add_task(
                f"{key[0]}/{key[1]}", total=total, completed=done, state=state,
                figures=figures)
        else:
            self._progress.update(task, total=total, completed=done, state=state,
                                  figures=figures)
        self._progress.refresh()

    def gone(self, key: tuple[str, str]) -> None:
        task = self._tasks.get(key)
        if task is not None:
            self._progress.update(task, state="stopped")
            self._progress.refresh()

    def close(self) -> None:
        self._progress.stop()


async def watch_sessions(client: ControlClient, out: TextIO = sys.stdout) -> int:
    """Show the sessions' progress until none is left running.

    :raise CliError: when the daemon goes away (ConnectionLost).
    """
    view: _Plain | _Bars = _Bars(out) if out.isatty() else _Plain(out)
    # SIGTERM's default action would leave the terminal as the bars left it
    # (cursor hidden): it cancels the watch instead, so ``finally`` tidies.
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await _watch(client, view, out)
    except asyncio.CancelledError:
        if not terminated:
            raise
        task.uncancel()
        return EXIT_TERMINATED
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        view.close()


async def _watch(client: ControlClient, view: _Plain | _Bars, out: TextIO) -> int:
    shown: dict[tuple[str, str], _Shown] = {}
    try:
        with client.listen(*EVENTS) as listener:
            if not await _refresh(client, view, shown):
                print("no fleecing sessions", file=out, flush=True)
                return EXIT_OK
            while True:
                try:
                    ev = await client.next_event(listener, FALLBACK_POLL)
                except ConnectionLost as exc:
                    raise CliError(f"the daemon went away: {exc}") from None
                if ev is not None and ev["event"] == "FLEECE_PROGRESS":
                    _on_progress(view, shown, ev["data"])
                    continue
                # A stop, a break or silence: ask for the whole picture.
                if not await _refresh(client, view, shown):
                    return EXIT_OK
    except ConnectionLost as exc:
        raise CliError(f"the daemon went away: {exc}") from None


def _on_progress(view: _Plain | _Bars, shown: dict[tuple[str, str], _Shown],
                 data: dict[str, Any]) -> None:
    key = (str(data["disk"]), str(data["name"]))
    s = shown.get(key)
    if s is None:
        s = shown[key] = _Shown(str(data.get("export", "")), "active", 0, 0)
    read, total = int(data["read"]), int(data["total"])
    if (read, total) != (s.read, s.total):
        s.read, s.total = read, total
        view.show(key, s)


async def _refresh(client: ControlClient, view: _Plain | _Bars,
                   shown: dict[tuple[str, str], _Shown]) -> bool:
    """Bring every session up to date; False once none is running."""
    sessions = await client.execute("query-fleece", {})
    seen = set()
    for info in sessions:
        prog = info.get("progress")
        if prog is None:
            continue    # lost in a daemon restart: nothing runs there
        key = (str(info["disk"]), str(info["name"]))
        seen.add(key)
        now = _Shown(str(info["export"]), str(info["state"]),
                     int(prog["read"]), int(prog["total"]))
        if shown.get(key) != now:
            shown[key] = now
            view.show(key, now)
    for key in [k for k in shown if k not in seen]:
        del shown[key]
        view.gone(key)
    return bool(seen)
