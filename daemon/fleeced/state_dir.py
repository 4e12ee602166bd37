"""The state directory: what a restarted daemon must know to carry on.

A daemon that carries running VMs' disks may be killed at any moment (crash,
OOM, ``kill -9``) while QEMU keeps its NBD client waiting
(``reconnect-delay``).  The restarted daemon must come back serving the same
disks on the same socket, know which VMs are attached so it can detach them,
and know which fleecing sessions were active so it can report them broken
rather than pretend they never existed.  That is all this file holds:

- ``disks``: disks added at run time (``disk-add``); the command line or the
  configuration file names the others;
- ``attachments``: VM disks redirected through the daemon (``vm-attach``),
  written *before* QEMU is switched over, so a crash between the two is
  found at restart;
- ``sessions``: fleecing sessions that were active; after an unclean stop
  they are reported broken (their temp store died with the process);
- ``bitmaps``: persistent dirty bitmaps (the bits are files in ``bitmaps/``);
- ``handoffs``: dirty bitmaps left in VMs at detach, read back at attach.

Design notes:

- One JSON document, replaced atomically (write a temp file, fsync, rename,
  fsync the directory): a crash leaves the old or the new state, never half
  of one.
- The directory is locked (``flock`` on ``lock``) for the daemon's life, so
  two daemons never share, and overwrite, one state.
- Saves run in a thread (``asyncio.to_thread``): an fsync on a busy disk
  must not stall the event loop.  They are serialized by one asyncio lock.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Final

from fleeced import strictjson

log = logging.getLogger(__name__)

STATE_FILE: Final = "state.json"
LOCK_FILE: Final = "lock"
VERSION: Final = 1

#: Fields each kind of record must have, with their JSON types (records
#: may carry more; their readers check those).  A document that breaks
#: this was not written by a daemon of this version: it is corrupt.
_REQUIRED: Final[dict[str, dict[str, type]]] = {
    "disks": {"name": str},  # and a "source" (or, written before, "path")
    "attachments": {"disk": str, "qmp": str, "device": str},
    "sessions": {"disk": str, "name": str},
    "bitmaps": {"disk": str, "name": str, "granularity": int},
    "handoffs": {"disk": str},
}


class StateError(Exception):
    """The state directory cannot be used (locked, unreadable, corrupt)."""


@dataclass
class State:
    """The document in ``state.json`` (plain JSON-able dicts inside)."""

    disks: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[dict[str, Any]] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)
    #: Persistent dirty bitmaps (their bits are files in ``bitmaps/``).
    bitmaps: list[dict[str, Any]] = field(default_factory=list)
    #: Hand-off bitmaps left in VMs at detach (read back at the next attach).
    handoffs: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "disks": self.disks,
                "attachments": self.attachments, "sessions": self.sessions,
                "bitmaps": self.bitmaps, "handoffs": self.handoffs}

    @classmethod
    def from_json(cls, doc: Any) -> State:
        """:raise StateError: when DOC is not a state document we understand."""
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            raise StateError(f"not a version {VERSION} state document")
        out = cls()
        for key, fields in _REQUIRED.items():
            items = doc.get(key, [])
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise StateError(f"{key!r} must be a list of objects")
            for n, item in enumerate(items, 1):
                for name, kind in fields.items():
                    value = item.get(name)
                    if not isinstance(value, kind) or isinstance(value, bool):
                        raise StateError(f"{key}[{n}].{name} must be "
                                         f"{'a string' if kind is str else 'an integer'}")
                if key == "disks" and not isinstance(item.get("source", item.get("path")),
                                                     str):
                    raise StateError(f"disks[{n}].source must be a string")
            setattr(out, key, items)
        return out


class StateDir:
    """A locked state directory; :meth:`open` it, :meth:`save` changes, :meth:`close`."""

    def __init__(self, path: str, lock_fd: int, state: State) -> None:
        self.path = path
        self._lock_fd = lock_fd
        self.state = state
        self._save_lock = asyncio.Lock()

    @classmethod
    def open(cls, path: str) -> StateDir:
        """Create (0700) or open PATH, lock it and load its state.

        Runs once at start-up, before anything is served.

        :raise StateError: when PATH is not usable, another daemon holds it,
            or the state file is corrupt.
        """
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(path, LOCK_FILE),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"state directory {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StateError(f"state directory {path} is in use by another fleeced"
                             f"{f' (pid {other})' if other else ''}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            state = _load(os.path.join(path, STATE_FILE))
        except StateError:
            os.close(fd)
            raise
        return cls(path, fd, state)

    async def save(self) -> None:
        """Write the current state atomically.

        :raise OSError: when the write fails (the old state stays on disk).
        """
        doc = json.dumps(self.state.to_json(), indent=1, sort_keys=True).encode()
        async with self._save_lock:
            await asyncio.to_thread(_write_atomically, self.path, doc)

    def close(self) -> None:
        """Release the lock (the state file stays)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _load(path: str) -> State:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return State()
    except OSError as exc:
        raise StateError(f"{path}: {exc.strerror}") from None
    try:
        return State.from_json(strictjson.loads(raw))
    except (ValueError, StateError) as exc:
        raise StateError(f"{path}: corrupt state ({exc}); move it away to start "
                         "without it") from None



def _write_atomically(directory: str, data: bytes) -> None:
    final = os.path.join(directory, STATE_FILE)
    tmp = final + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
