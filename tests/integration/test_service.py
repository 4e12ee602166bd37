"""Service mode: ``fleeced serve --config FILE`` as systemd runs it.

The test plays systemd: it binds the NBD socket itself and passes it as fd 3
with ``LISTEN_FDS=1``/``LISTEN_PID``, owns the ``NOTIFY_SOCKET`` datagram
socket and sets ``WATCHDOG_USEC``.  Real clients (nbdinfo, qemu-img) read the
configured disks.  Readiness is READY=1, never a sleep.
"""

from __future__ import annotations

import grp
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import make_image, requires, run

pytestmark = pytest.mark.integration

MiB = 1 << 20


@dataclass
class Service:
    """A ``fleeced serve --config`` process and the notify socket it reports to."""

    proc: subprocess.Popen[bytes]
    notify: socket.socket
    log: Path
    notes: list[str] = field(default_factory=list)

    def wait_note(self, pred: Callable[[str], bool], timeout: float = 30) -> str:
        """The first notification (one assignment) matching PRED, waiting at most TIMEOUT."""
        seen = len(self.notes)
        for note in self.notes[:seen]:
            if pred(note):
                return note
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching notification in {timeout}s: {self.notes}\n"
                                     f"{self.log.read_text(errors='replace')}")
            # Short slices: a daemon that died is reported at once, not at the deadline.
            self.notify.settimeout(min(left, 0.25))
            try:
                msg = self.notify.recv(4096).decode()
            except TimeoutError:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"daemon exited {self.proc.returncode}: {self.notes}\n"
                        f"{self.log.read_text(errors='replace')}") from None
                continue
            new = msg.split("\n")
            self.notes.extend(new)
            for note in new:
                if pred(note):
                    return note

    def drain(self) -> list[str]:
        self.notify.setblocking(False)
        try:
            while True:
                self.notes.extend(self.notify.recv(4096).decode().split("\n"))
        except BlockingIOError:
            pass
        return self.notes

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Factory: run ``fleeced serve --config CONFIG`` like systemd would.

    :param listen: sockets to pass as fds 3.. (``LISTEN_FDS``, ``LISTEN_PID``).
    :param env: extra environment (``WATCHDOG_USEC``, ...); a value
        ``"$$"`` becomes the daemon's own pid.
    """
    started: list[Service] = []

    def start(config: str, listen: list[socket.socket] = (),  # type: ignore[assignment]
              env: dict[str, str] | None = None, ready: bool = True) -> Service:
        n = len(started) + 1
        notify_path = str(tmp_path / f"notify{n}.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        full_env = dict(os.environ, NOTIFY_SOCKET=notify_path)
        for key in ("LISTEN_FDS", "LISTEN_PID", "WATCHDOG_USEC", "WATCHDOG_PID",
                    "FLEECED_CONTROL"):
            full_env.pop(key, None)
        # A tiny exec wrapper puts the passed sockets at 3, 4, ... (closing the
        # original numbers), sets the "$$" variables to its own pid, then
        # execs the daemon: the pid stays, as with systemd.
        dollars = [k for k, v in (env or {}).items() if v == "$$"]
        full_env.update({k: v for k, v in (env or {}).items() if v != "$$"})
        if listen:
            full_env["LISTEN_FDS"] = str(len(listen))
            dollars.append("LISTEN_PID")
        fds = [s.fileno() for s in listen]
        wrapper = textwrap.dedent(f"""
            import fcntl, os, sys
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in {fds!r}]
            for fd in {fds!r}:
                os.close(fd)
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i)
                os.close(fd)
            for key in {dollars!r}:
                os.environ[key] = str(os.getpid())
            os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
        """)
        log = tmp_path / f"service{n}.log"
        with open(log, "wb") as log_f:
            proc = subprocess.Popen(
                [sys.executable, "-c", wrapper, "-m", "fleeced", "serve", "--config", config,
                 "-v"],
                env=full_env, stderr=log_f, pass_fds=fds,
            )
        svc = Service(proc, notify, log)
        started.append(svc)
        if ready:
            svc.wait_note(lambda note: note == "READY=1")
        return svc

    yield start
    for svc in started:
        if svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()
        svc.notify.close()
        text = svc.log.read_text(errors="replace")
        if text:
            print(f"--- {svc.log.name} ---\n{text[-20000:]}")


def _config(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fleeced.toml"
    path.write_text(f'control = "{tmp_path}/control.sock"\n'
                    f'state-dir = "{tmp_path}/state"\n' + textwrap.dedent(body))
    return str(path)


def _unix_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    return sock


def _fleeced(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleeced", *args], capture_output=True,
                          text=True, timeout=60)


def test_socket_activation_notify_and_watchdog(
        tmp_path: Path, start_service: Callable[..., Service]) -> None:
    """systemd's view: READY=1 once serving on the inherited socket, STATUS=,
    WATCHDOG=1 every WATCHDOG_USEC/2 from the loop, STOPPING=1 and exit 0."""
    nbdinfo = requires("nbdinfo")
    qemu_img = requires("qemu-img")
    img = tmp_path / "vm1.img"
    make_image(img, 4 * MiB)
    config = _config(tmp_path, f"""
        [[disk]]
        name = "vm1-vda"
        path = "{img}"
    """)
    nbd_path = tmp_path / "activated.sock"
    listener = _unix_listener(nbd_path)
    svc = start_service(config, listen=[listener],
                        env={"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "$$"})
    listener.close()  # the daemon owns it now
    assert any(n.startswith("STATUS=serving") for n in svc.notes), svc.notes
    # Keep-alives keep coming at 0.2 s intervals while the loop runs.
    for _ in range(3):
        svc.wait_note(lambda note: note == "WATCHDOG=1", timeout=5)
        svc.notes.remove("WATCHDOG=1")

    url = f"nbd+unix:///vm1-vda?socket={nbd_path}"
    info = json.loads(run(nbdinfo, "--json", url).stdout)
    assert info["exports"][0]["export-size"] == 4 * MiB
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(img), url)
    # A connection shows up in STATUS= (count changes are reported).
    assert any(n.startswith("STATUS=serving, 1 connection") for n in svc.drain()), svc.notes

    assert svc.terminate() == 0
    assert "STOPPING=1" in svc.drain()


def test_watchdog_pid_of_another_process_means_no_keepalives(
        tmp_path: Path, start_service: Callable[..., Service]) -> None:
    """sd_watchdog_enabled(3): WATCHDOG_PID naming another process is not for us."""
    img = tmp_path / "a.img"
    make_image(img, MiB)
    config = _config(tmp_path, f"""
        [[listen]]
        unix = "{tmp_path}/nbd.sock"
        [[disk]]
        path = "{img}"
    """)
    svc = start_service(config, env={"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"})
    # Ten would-be intervals: a bounded wait for something that must not come.
    with pytest.raises(AssertionError, match="no matching notification"):
        svc.wait_note(lambda note: note == "WATCHDOG=1", timeout=0.5)
    assert svc.terminate() == 0


def test_two_disks_on_a_configured_unix_listener(
        tmp_path: Path, start_service: Callable[..., Service]) -> None:
    """[[listen]] unix with mode "0660" and a group; both [[disk]]s are served."""
    nbdinfo = requires("nbdinfo")
    qemu_img = requires("qemu-img")
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_image(a, 2 * MiB, seed=1)
    make_image(b, 3 * MiB, seed=2)
    group = grp.getgrgid(os.getegid()).gr_name
    sock = tmp_path / "nbd.sock"
    config = _config(tmp_path, f"""
        [[listen]]
        unix = "{sock}"
        mode = "0660"
        group = "{group}"
        [[disk]]
        name = "alpha"
        path = "{a}"
        [[disk]]
        name = "beta"
        path = "b.img"
        read-only = true
    """)
    svc = start_service(config)
    st = sock.stat()
    assert st.st_mode & 0o7777 == 0o660
    assert st.st_gid == os.getegid()
    listing = json.loads(run(nbdinfo, "--list", "--json", f"nbd+unix://?socket={sock}").stdout)
    assert sorted(e["export-name"] for e in listing["exports"]) == ["alpha", "beta"]
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(a),
        f"nbd+unix:///alpha?socket={sock}")
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(b),
        f"nbd+unix:///beta?socket={sock}")
    info = json.loads(run(nbdinfo, "--json", f"nbd+unix:///beta?socket={sock}").stdout)
    assert info["exports"][0]["is_read_only"] is True
    # A service keeps serving after its last client left (persistent).
    assert svc.proc.poll() is None
    assert svc.terminate() == 0


@pytest.mark.parametrize(("body", "needle"), [
    ('[[disk]]\npath = "missing.img"\n', "disk[1].path: "),
    ('[[listen]]\nunix = "x.sock"\nmode = "0999"\n', "listen[1].mode: '0999'"),
    ('[session]\ncluster-size = "64Q"\n', "session.cluster-size: invalid size '64Q'"),
    ('threads = 4\nthreads = 5\n', "invalid TOML: "),
    ("sockets = []\n", "unknown key 'sockets'"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, body: str, needle: str) -> None:
    config = _config(tmp_path, body)
    proc = _fleeced("serve", "--config", config)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"fleeced: {config}: "), lines[0]
    assert needle in lines[0], lines[0]


def test_session_defaults_apply_to_fleece_start(
        tmp_path: Path, start_service: Callable[..., Service]) -> None:
    """[session] fills in what `fleeced fleece start` leaves out; the CLI's own
    options still win."""
    img_a, img_b = tmp_path / "a.img", tmp_path / "b.img"
    make_image(img_a, 2 * MiB)
    make_image(img_b, 2 * MiB)
    temp = tmp_path / "temp"
    temp.mkdir()
    config = _config(tmp_path, f"""
        [[listen]]
        unix = "{tmp_path}/nbd.sock"
        [session]
        cluster-size = "128K"
        temp-dir = "temp"
        on-cbw-error = "break-guest-write"
        [[disk]]
        path = "{img_a}"
        [[disk]]
        path = "{img_b}"
    """)
    svc = start_service(config)
    ctl = str(tmp_path / "control.sock")
    for args in (("a",), ("b", "--cluster-size", "256K")):
        proc = _fleeced("fleece", "start", *args, "--control", ctl)
        assert proc.returncode == 0, proc.stderr
    proc = _fleeced("fleece", "list", "--json", "--control", ctl)
    assert proc.returncode == 0, proc.stderr
    sessions = {s["disk"]: s for s in json.loads(proc.stdout)}
    assert sessions["a"]["cluster-size"] == 128 << 10
    assert sessions["b"]["cluster-size"] == 256 << 10
    for s in sessions.values():
        assert s["temp-dir"] == str(temp)
        assert s["on-cbw-error"] == "break-guest-write"
    assert svc.terminate() == 0


def test_activated_socket_repeated_as_listen_is_refused(
        tmp_path: Path, start_service: Callable[..., Service]) -> None:
    """fleeced.socket's path must not be repeated as a [[listen]] (as the units
    document): the daemon finds it in use and fails at start, it does not
    steal the path from the socket systemd holds."""
    img = tmp_path / "a.img"
    make_image(img, MiB)
    nbd_path = tmp_path / "nbd.sock"
    config = _config(tmp_path, f"""
        [[listen]]
        unix = "{nbd_path}"
        [[disk]]
        path = "{img}"
    """)
    listener = _unix_listener(nbd_path)
    svc = start_service(config, listen=[listener], ready=False)
    listener.close()
    assert svc.proc.wait(30) == 1
    assert "address already in use" in svc.log.read_text()
    assert nbd_path.is_socket()
    assert "READY=1" not in svc.drain()
