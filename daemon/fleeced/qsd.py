"""A qemu-storage-daemon child that serves one disk's source over NBD.

For an ``image`` source (qcow2 and the other QEMU formats) or an ``rbd``
source, QEMU opens the data and fleeced reaches it as an NBD export on a
Unix socket in a private directory (mode 0700, removed with the child).
The child:

- runs as ``setpriv --pdeathsig KILL -- qemu-storage-daemon ...``: when the
  daemon dies, even by ``kill -9``, the kernel kills the child; it is never
  orphaned.  It has a session of its own, so signals for the daemon's
  terminal or process group (``^C``) reach only the daemon, which stops the
  child after its final flush (systemd: ``KillMode=mixed``);
- exports its node writable (read-only for a read-only disk) with
  multi-conn (QEMU 7.2 offers it), so the upstream may use one connection
  per worker;
- is started again when it exits on its own (with a growing pause, 1 s to
  30 s): the C upstream connects again by itself on the next request, and
  requests meanwhile fail EIO within the upstream's bound (the disk shows
  ``source-error``);
- is stopped (SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`) after the
  disk's last flush.

Every wait here is bounded; nothing blocks the event loop (asyncio
subprocesses).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import tempfile
from collections import deque
from typing import Any, Final

from fleeced.sources import Source, SourceError

log = logging.getLogger(__name__)

#: Seconds a child has to start listening, and to exit after SIGTERM.
START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 10.0
#: Pauses between restarts of a child that keeps exiting, seconds.
RESTART_MIN: Final = 1.0
RESTART_MAX: Final = 30.0
#: The export's name inside the child.
EXPORT: Final = "disk"


class QsdChild:
    """One disk's qemu-storage-daemon.

    :param name: the disk's name (for messages).
    :param src: an ``image`` or ``rbd`` source.
    :param read_only: open and export the image read-only.
    """

    def __init__(self, name: str, src: Source, read_only: bool, direct: bool = False) -> None:
        assert src.needs_child
        self.name = name
        self.src = src
        self.read_only = read_only
        #: cache=none: the image file is opened with cache.direct=on.
        self.direct = direct
        self._dir: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self._stderr: deque[str] = deque(maxlen=20)
        self._pause = RESTART_MIN
        #: Times the child was started again after exiting on its own.
        self.restarts = 0

    @property
    def uri(self) -> str:
        """Where the upstream connects."""
        assert self._dir is not None
        return f"nbd+unix:///{EXPORT}?socket={self.socket}"

    @property
    def socket(self) -> str:
        assert self._dir is not None
        return os.path.join(self._dir, "nbd.sock")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        """The child's command line (``setpriv`` and ``qemu-storage-daemon``
        looked up on PATH by :meth:`start`)."""
        ro = self.read_only
        src = self.src
        if src.kind == "rbd":
            opts = dict(src.rbd)
            proto: dict[str, Any] = {"driver": "rbd", "node-name": "proto",
                                     "pool": opts["pool"], "image": opts["image"],
                                     "read-only": ro}
            for key in ("namespace", "snapshot", "conf", "user"):
                if key in opts:
                    proto[key] = opts[key]
            nodes = [proto]
            top = "proto"
        else:
            assert src.path is not None
            nodes = [{"driver": "file", "node-name": "proto",
                      "filename": os.path.abspath(src.path), "read-only": ro,
                      "cache": {"direct": self.direct}},
                     {"driver": src.format, "node-name": "fmt", "file": "proto",
                      "read-only": ro}]
            top = "fmt"
        cmd = ["--pdeathsig", "KILL", "--", "qemu-storage-daemon"]
        for node in nodes:
            cmd += ["--blockdev", json.dumps(node)]
        cmd += ["--nbd-server", json.dumps({"addr": {"type": "unix", "path": self.socket}}),
                "--export", json.dumps({"type": "nbd", "id": "fleeced", "node-name": top,
                                        "name": EXPORT, "writable": not ro})]
        return cmd

    async def start(self) -> None:
        """Start the child and wait (bounded) until it listens.

        :raise SourceError: when a program is missing, or the child exits
            or does not listen in time (the message has QEMU's reason).
        """
        for program in ("setpriv", "qemu-storage-daemon"):
            if shutil.which(program) is None:
                raise SourceError(f"{self.src.text}: {program} is needed to serve a "
                                  f"{self.src.format if self.src.kind == 'image' else 'rbd'} "
                                  "source (install util-linux and qemu-system-x86)")
        if self._dir is None:
            self._dir = await asyncio.to_thread(_private_dir)
        await self._spawn()
        self._watch = asyncio.get_running_loop().create_task(self._watch_child())

    async def _spawn(self) -> None:
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass
        self._stderr.clear()
        # A session of its own: a terminal's ^C or a job-control kill reaches
        # the daemon, which stops the child after its final flush through it.
        self._proc = await asyncio.create_subprocess_exec(
            "setpriv", *self.command(), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            start_new_session=True)
        reader = asyncio.get_running_loop().create_task(self._read_stderr(self._proc))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while not _listening(self.socket):
            if self._proc.returncode is not None or loop.time() > deadline:
                if self._proc.returncode is None:
                    self._proc.kill()
                await self._proc.wait()
                await asyncio.wait_for(reader, 5)
                raise SourceError(f"{self.src.text}: qemu-storage-daemon "
                                  f"{'exited' if loop.time() <= deadline else 'did not listen'}"
                                  f": {self.reason()}")
            await asyncio.sleep(0.02)
        log.info("disk %s: qemu-storage-daemon (pid %d) serves %s as %s", self.name,
                 self._proc.pid, self.src.text, self.src.format)

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self._stderr.append(text)
            log.debug("qemu-storage-daemon for %s: %s", self.name, text)

    def reason(self) -> str:
        """QEMU's last words, one line (or the exit status)."""
        lines = [line.removeprefix("qemu-storage-daemon: ") for line in self._stderr
                 if line.strip()]
        if lines:
            return lines[-1]
        rc = self._proc.returncode if self._proc is not None else None
        return f"exit status {rc}" if rc is not None else "no reason given"

    async def _watch_child(self) -> None:
        """Start the child again whenever it exits on its own."""
        while not self._stopping:
            assert self._proc is not None
            await self._proc.wait()
            if self._stopping:
                return
            log.error("disk %s: qemu-storage-daemon exited (%s); starting it again in "
                      "%gs", self.name, self.reason(), self._pause)
            await asyncio.sleep(self._pause)
            self._pause = min(self._pause * 2, RESTART_MAX)
            if self._stopping:
                return
            try:
                await self._spawn()
            except (SourceError, OSError) as exc:
                log.error("disk %s: %s", self.name, exc)
                continue
            self.restarts += 1
            self._pause = RESTART_MIN

    async def stop(self) -> None:
        """Stop the child (bounded) and remove its directory.  Idempotent."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            try:
                await self._watch
            except asyncio.CancelledError:
                pass
            self._watch = None
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("disk %s: qemu-storage-daemon ignored SIGTERM; killing it",
                            self.name)
                proc.kill()
                await proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def _private_dir() -> str:
    """A new directory only we can enter (mkdtemp makes it 0700), for the
    child's socket: under /run/fleeced as root, else $TMPDIR."""
    base = "/run/fleeced" if os.geteuid() == 0 and os.path.isdir("/run/fleeced") else None
    return tempfile.mkdtemp(prefix="fleeced-qsd-", dir=base)
