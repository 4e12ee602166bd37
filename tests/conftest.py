"""Shared fixtures: tool gating and a real `fleeced serve` started with sd_notify."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pytest

REQUIRE_TOOLS = os.environ.get("FLEECED_REQUIRE_TOOLS") == "1"
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(autouse=True, scope="session")
def _private_state_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Daemons on a default control socket get a default state dir under
    $XDG_STATE_HOME: keep it inside the test session, never in $HOME."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state-home"))


def requires(tool: str) -> str:
    """Path of TOOL; skip without it on a dev machine, fail under FLEECED_REQUIRE_TOOLS=1."""
    path = shutil.which(tool)
    if path is None:
        if REQUIRE_TOOLS:
            pytest.fail(f"required tool {tool!r} is missing (FLEECED_REQUIRE_TOOLS=1)")
        pytest.skip(f"{tool} not installed")
    return path


def requires_libnbd_python() -> str:
    """The system python3 with Debian's python3-libnbd (`import nbd`)."""
    ok = os.path.exists(SYSTEM_PYTHON) and subprocess.run(
        [SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True
    ).returncode == 0
    if not ok:
        if REQUIRE_TOOLS:
            pytest.fail("python3-libnbd is missing for /usr/bin/python3")
        pytest.skip("python3-libnbd not installed")
    return SYSTEM_PYTHON


def daemon_env(**extra: str) -> dict[str, str]:
    """Environment for a daemon process a test starts itself: with the
    sanitizer runtime preloaded when the suite runs the ASan build
    (FLEECED_DAEMON_PRELOAD, see test.sh)."""
    env = dict(os.environ, **extra)
    preload = os.environ.get("FLEECED_DAEMON_PRELOAD")
    if preload:
        env["LD_PRELOAD"] = preload
    return env


@dataclass
class Daemon:
    """A running `fleeced serve`."""

    proc: subprocess.Popen[bytes]
    sock: str
    control: str
    tmp: Path
    notes: list[bytes] = field(default_factory=list)
    notify: socket.socket | None = None

    def url(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def notifications(self) -> list[bytes]:
        assert self.notify is not None
        self.notify.setblocking(False)
        try:
            while True:
                self.notes.append(self.notify.recv(4096))
        except BlockingIOError:
            pass
        return self.notes


def wait_ready(notify: socket.socket, proc: subprocess.Popen[bytes], notes: list[bytes],
               timeout: float = 30) -> None:
    """Block until the daemon sends READY=1 (or dies)."""
    notify.settimeout(timeout)
    while True:
        try:
            msg = notify.recv(4096)
        except TimeoutError:
            proc.kill()
            proc.wait()
            raise AssertionError(f"no READY=1 within {timeout}s") from None
        notes.append(msg)
        if b"READY=1" in msg.split(b"\n"):
            return


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory: start `fleeced serve ARGS -k SOCK --control CTL -t` and wait for READY=1."""
    started: list[Daemon] = []
    logs: list[BinaryIO] = []
    counter = [0]

    def start(*args: str, persistent: bool = True, ready: bool = True,
              env: dict[str, str] | None = None, sock: str | None = None,
              control: str | None = None) -> Daemon:
        counter[0] += 1
        n = counter[0]
        sock = sock or str(tmp_path / f"nbd{n}.sock")
        control = control or str(tmp_path / f"ctl{n}.sock")
        notify_path = str(tmp_path / f"notify{n}.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        cmd = [sys.executable, "-m", "fleeced", "serve", *args, "-k", sock,
               "--control", control]
        if persistent:
            cmd.append("-t")
        # The whole suite can run against either data plane (the default
        # is native); test.sh runs a share of it with loop as well.
        plane = os.environ.get("FLEECED_TEST_DATA_PLANE")
        if plane and "--config" not in args and "--data-plane" not in args:
            cmd += ["--data-plane", plane]
        full_env = dict(os.environ, NOTIFY_SOCKET=notify_path)
        # Run only the daemon under a preloaded sanitizer runtime (see
        # bench/soak.py --asan); the client tools stay as they are.
        preload = os.environ.get("FLEECED_DAEMON_PRELOAD")
        if preload:
            full_env["LD_PRELOAD"] = preload
        full_env.update(env or {})
        log = open(tmp_path / f"daemon{n}.log", "wb")  # noqa: SIM115 - closed at teardown
        logs.append(log)
        proc = subprocess.Popen(cmd, env=full_env, stderr=log)
        d = Daemon(proc, sock, control, tmp_path, notify=notify)
        started.append(d)
        if ready:
            wait_ready(notify, proc, d.notes)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        if d.notify is not None:
            d.notify.close()
    for log in logs:
        log.close()
    # Show the daemons' logs in the test report (pytest prints it on failure).
    for path in sorted(tmp_path.glob("daemon*.log")):
        text = path.read_text(errors="replace")
        if text:
            print(f"--- {path.name} ---\n{text[-20000:]}")


def make_image(path: Path, size: int, seed: int = 1) -> bytes:
    """Write SIZE bytes of deterministic pseudo-random data to PATH."""
    import random

    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def run(*cmd: str, check: bool = True, timeout: float = 120,
        input: bytes | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a client tool; on failure show its output in the assertion."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          input=input.decode() if input is not None else None, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} -> {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc
