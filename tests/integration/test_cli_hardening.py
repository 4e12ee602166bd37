"""Hardening of `fleeced serve` start-up and of the control socket, against a real daemon.

Covers: nothing but a socket is ever replaced at the control path and only a regular
file at the pid file; a hostile control message (deep nesting, a non-finite number)
gets a GenericError and the connection lives on; the per-user default control
directory must be private; a second daemon on a busy control path fails instead of
running without one.

Readiness is READY=1 on NOTIFY_SOCKET, failure is the process exiting: both are
waited for with select() on the notify socket and a pidfd, never with a sleep.
"""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, make_image

pytestmark = pytest.mark.integration

MiB = 1 << 20

#: As root the default control path is /run/fleeced/control.sock and
#: XDG_RUNTIME_DIR is ignored, so the per-user default-directory tests run the
#: CLI through a shim that makes ``os.geteuid()`` answer USER_UID (uid 4321 when
#: root, else the real uid); the directories they set up are chowned to it.
#: Switching users for real is not portable: the interpreter may live under a
#: directory only root can read (pyenv in /root).
IS_ROOT = os.geteuid() == 0
USER_UID = 4321 if IS_ROOT else os.getuid()
SHIM = ("import os, sys; uid = int(sys.argv[1]); os.geteuid = lambda: uid; "
        "from fleeced.cli import main; sys.exit(main(sys.argv[2:]))")


def _command(args: tuple[str, ...], as_user: bool) -> list[str]:
    if as_user:
        return [sys.executable, "-c", SHIM, str(USER_UID), *args]
    return [sys.executable, "-m", "fleeced", *args]


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FLEECED_CONTROL", "XDG_RUNTIME_DIR", "NOTIFY_SOCKET")}
    env.update(extra or {})
    return env


def fleeced(*args: str, env: dict[str, str] | None = None, as_user: bool = False,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_command(args, as_user), capture_output=True, text=True,
                          timeout=timeout, env=_env(env))


def one_line_error(stderr: str, *needles: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fleeced: "), stderr
    for needle in needles:
        assert needle in lines[0], stderr
    assert "Traceback" not in stderr
    return lines[0]


@dataclass
class Started:
    """A `fleeced serve` that either sent READY=1 or exited first."""

    proc: subprocess.Popen[bytes]
    ready: bool
    log: Path

    @property
    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(30)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A scratch directory with a short path (Unix socket paths are limited)."""
    path = Path(tempfile.mkdtemp(prefix="fleeced-hardening-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def launch(scratch: Path) -> Iterator[Callable[..., Started]]:
    """Factory: run `fleeced serve ARGS`; return once it is ready or has exited."""
    started: list[Started] = []
    counter = [0]

    def start(*args: str, env: dict[str, str] | None = None, as_user: bool = False,
              timeout: float = 30, umask: int = -1,
              nofile: tuple[int, int] | None = None) -> Started:
        counter[0] += 1
        n = counter[0]
        notify_path = scratch / f"notify{n}.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        log = scratch / f"daemon{n}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                _command(("serve", *args), as_user),
                env=_env({**(env or {}), "NOTIFY_SOCKET": str(notify_path)}),
                stdout=subprocess.DEVNULL, stderr=err, umask=umask,
                preexec_fn=None if nofile is None else (
                    lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile)),
            )
        pidfd = os.pidfd_open(proc.pid)
        try:
            ready = _wait_ready_or_exit(notify, pidfd, proc, timeout)
        finally:
            os.close(pidfd)
            notify.close()
        s = Started(proc, ready, log)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()
        text = s.stderr
        if text:
            print(f"--- {s.log.name} ---\n{text[-20000:]}")


def _wait_ready_or_exit(notify: socket.socket, pidfd: int,
                        proc: subprocess.Popen[bytes], timeout: float) -> bool:
    while True:
        readable, _, _ = select.select([notify, pidfd], [], [], timeout)
        if notify in readable:
            if b"READY=1" in notify.recv(4096).split(b"\n"):
                return True
        elif readable:
            proc.wait()
            return False
        else:
            proc.kill()
            proc.wait()
            raise AssertionError(f"neither READY=1 nor an exit within {timeout}s")


def _image(dirpath: Path, name: str = "disk.img", size: int = MiB) -> tuple[Path, bytes]:
    img = dirpath / name
    return img, make_image(img, size)


def _bound_socket(path: Path) -> None:
    """Leave a stale (nobody listening) socket file at PATH."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


# -- 1. nothing but a socket is replaced at the control path --------------------------


def _make_thing(kind: str, path: Path, img: Path) -> None:
    if kind == "image":
        return  # the control path *is* the image
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-to-image":
        path.symlink_to(img)
    elif kind == "dangling-symlink":
        path.symlink_to(path.parent / "nowhere")
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("how", ["--control", "FLEECED_CONTROL"])
@pytest.mark.parametrize("kind", ["image", "directory", "fifo", "symlink-to-image",
                                  "dangling-symlink"])
def test_control_path_not_a_socket_is_refused(launch, scratch: Path, kind: str,
                                              how: str) -> None:
    img, data = _image(scratch)
    ctl = img if kind == "image" else scratch / "ctl"
    _make_thing(kind, ctl, img)
    before = os.lstat(ctl)
    args = [str(img), "-k", str(scratch / "nbd.sock"), "-t"]
    env = None
    if how == "--control":
        args += ["--control", str(ctl)]
    else:
        env = {"FLEECED_CONTROL": str(ctl)}
    d = launch(*args, env=env)
    if d.ready:
        d.stop()
    assert not d.ready, "started with a non-socket at the control path"
    assert d.proc.returncode == 1
    one_line_error(d.stderr, str(ctl), "not a socket")
    after = os.lstat(ctl)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert img.read_bytes() == data
    assert not (scratch / "nbd.sock").exists()


def test_stale_control_socket_is_replaced(launch, scratch: Path) -> None:
    img, _ = _image(scratch)
    ctl = scratch / "ctl.sock"
    _bound_socket(ctl)
    d = launch(str(img), "-k", str(scratch / "nbd.sock"), "-t", "--control", str(ctl))
    assert d.ready, d.stderr
    proc = fleeced("fleece", "list", "--json", "--control", str(ctl))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    assert d.stop() == 0
    assert not ctl.exists()


# -- 1b. the pid file is checked before anything starts --------------------------------


def _make_pid_thing(kind: str, path: Path, img: Path) -> None:
    if kind == "socket":
        _bound_socket(path)
    elif kind == "symlink-to-directory":
        (path.parent / "piddir").mkdir()
        path.symlink_to(path.parent / "piddir")
    elif kind == "symlink-to-fifo":
        os.mkfifo(path.parent / "pidfifo")
        path.symlink_to(path.parent / "pidfifo")
    elif kind == "symlink-to-device":
        path.symlink_to("/dev/null")
    else:
        _make_thing(kind, path, img)


@pytest.mark.parametrize("kind", ["image", "directory", "fifo", "socket", "symlink-to-device",
                                  "symlink-to-directory", "symlink-to-fifo",
                                  "dangling-symlink"])
def test_pid_file_not_a_regular_file_is_refused(launch, scratch: Path, kind: str) -> None:
    img, data = _image(scratch)
    pidf = img if kind == "image" else scratch / "pid"
    _make_pid_thing(kind, pidf, img)
    before = os.lstat(pidf)
    d = launch(str(img), "-k", str(scratch / "nbd.sock"), "-t", "--no-control",
               "--pid-file", str(pidf), timeout=20)
    if d.ready:
        d.stop()
    assert not d.ready, "started with an unusable pid file"
    assert d.proc.returncode == 1
    one_line_error(d.stderr, str(pidf))
    after = os.lstat(pidf)
    assert (after.st_ino, after.st_mode, after.st_size) == (
        before.st_ino, before.st_mode, before.st_size)
    assert img.read_bytes() == data
    # refused before starting: nothing was bound
    assert not (scratch / "nbd.sock").exists()


@pytest.mark.parametrize("content", ["4242\n", ""])
@pytest.mark.parametrize("kind", ["regular", "symlink-to-regular"])
def test_pid_file_regular_file_is_replaced(launch, scratch: Path, kind: str,
                                           content: str) -> None:
    """A stale pid file (or an empty one) is replaced, and removed at exit."""
    img, _ = _image(scratch)
    target = scratch / "pid"
    target.write_text(content)
    pidf = target
    if kind == "symlink-to-regular":
        pidf = scratch / "pid-link"
        pidf.symlink_to(target)
    d = launch(str(img), "-k", str(scratch / "nbd.sock"), "-t", "--no-control",
               "--pid-file", str(pidf))
    assert d.ready, d.stderr
    assert target.read_text() == f"{d.proc.pid}\n"
    assert d.stop() == 0
    assert not os.path.lexists(pidf)


@pytest.mark.parametrize("content", [b"stale\n", b"\x00" * 8, b"1" * 40, b"12 34\n"])
def test_pid_file_holding_anything_but_a_pid_is_refused(launch, scratch: Path,
                                                       content: bytes) -> None:
    """Only a file that holds a pid may be replaced: anything else there is
    somebody's data (an image of another daemon, a config...)."""
    img, _ = _image(scratch)
    pidf = scratch / "pid"
    pidf.write_bytes(content)
    d = launch(str(img), "-k", str(scratch / "nbd.sock"), "-t", "--no-control",
               "--pid-file", str(pidf), timeout=20)
    if d.ready:
        d.stop()
    assert not d.ready, "started over a file that holds no pid"
    one_line_error(d.stderr, str(pidf), "holds something other than a pid")
    assert pidf.read_bytes() == content


def test_pid_file_is_no_disks_image(launch, scratch: Path) -> None:
    """--pid-file naming the image of a disk restored from the state dir (not
    on the command line) truncated it to six bytes and deleted it at exit.
    The image here holds a pid-like text, so only the daemon's own check
    (against every open disk) can catch it; at run time no disk may be
    added on the pid file."""
    img, data = _image(scratch)
    other = scratch / "B.img"
    other.write_bytes(b"12345\n")
    state, ctl, nbd = scratch / "state", scratch / "ctl.sock", scratch / "nbd.sock"
    d = launch(str(img), "-k", str(nbd), "-t", "--control", str(ctl), "--state-dir", str(state))
    assert d.ready, d.stderr
    proc = fleeced("disk", "add", "B", str(other), "--control", str(ctl))
    assert proc.returncode == 0, proc.stderr
    assert d.stop() == 0
    d = launch(str(img), "-k", str(nbd), "-t", "--control", str(ctl), "--state-dir", str(state),
               "--pid-file", str(other), timeout=20)
    if d.ready:
        d.stop()
    assert not d.ready, "started with a disk's image as its pid file"
    one_line_error(d.stderr, f"--pid-file {other}: is the image of disk 'B'")
    assert other.read_bytes() == b"12345\n"
    pidf = scratch / "pid"
    d = launch(str(img), "-k", str(nbd), "-t", "--control", str(ctl), "--state-dir", str(state),
               "--pid-file", str(pidf))
    assert d.ready, d.stderr
    proc = fleeced("disk", "add", "P", str(pidf), "--control", str(ctl))
    one_line_error(proc.stderr, "is the daemon's pid file")
    assert d.stop() == 0
    assert other.read_bytes() == b"12345\n"
    assert img.read_bytes() == data


# -- 1c. the NBD socket's mode does not follow the umask -------------------------------


def test_nbd_socket_is_0660_whatever_the_umask(launch, scratch: Path) -> None:
    """With umask 000 the -k socket was 0777: any local user could read and
    write every disk."""
    img, _ = _image(scratch)
    nbd = scratch / "nbd.sock"
    d = launch(str(img), "-k", str(nbd), "-t", "--no-control", umask=0)
    assert d.ready, d.stderr
    assert stat.S_IMODE(os.stat(nbd).st_mode) == 0o660
    assert d.stop() == 0


def test_socket_mode_and_group(launch, scratch: Path) -> None:
    """--socket-mode/--socket-group: QEMU running as another user (libvirt's
    libvirt-qemu) is given access without a chmod by hand."""
    import grp

    img, _ = _image(scratch)
    nbd = scratch / "nbd.sock"
    group = next(g for g in grp.getgrall() if g.gr_gid != os.getegid())
    d = launch(str(img), "-k", str(nbd), "-t", "--no-control", "--socket-mode", "0640",
               "--socket-group", group.gr_name, umask=0)
    assert d.ready, d.stderr
    st = os.stat(nbd)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, group.gr_gid)
    assert d.stop() == 0
    sock = ["-k", str(scratch / "x.sock")]
    for args, needle in ((["--socket-mode", "0999", *sock], "not an octal mode"),
                         (["--socket-mode", "1777", *sock], "not an octal mode"),
                         (["--socket-group", "no-such-group-xyz", *sock], "no group named"),
                         (["--socket-mode", "0600", "-p", "10999"], "need --socket PATH")):
        proc = fleeced("serve", str(img), "--no-control", *args, timeout=20)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr, proc.stderr


# -- 2. hostile control messages -----------------------------------------------------


class RawQmp:
    """A blocking QMP client on a plain Unix socket, one JSON object per line."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.rfile = self.sock.makefile("rb")
        greeting = self.recv()
        assert "QMP" in greeting
        assert self.call(b'{"execute": "qmp_capabilities"}') == {"return": {}}

    def recv(self) -> dict[str, Any]:
        line = self.rfile.readline()
        assert line, "the daemon closed the control connection"
        msg: dict[str, Any] = json.loads(line)
        return msg

    def call(self, raw: bytes) -> dict[str, Any]:
        self.sock.sendall(raw + b"\n")
        return self.recv()

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer closes SOCK within TIMEOUT (what it sends is read)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_control_connections_are_capped(launch, scratch: Path) -> None:
    """1,000 connections each holding ~1 MiB of JSON without an end took
    1.07 GiB.  At most 16 are served at once; one more gets a QMP error;
    a partial message must end within the handshake limit."""
    img, _ = _image(scratch)
    ctl = scratch / "ctl.sock"
    d = launch(str(img), "-k", str(scratch / "nbd.sock"), "-t", "--control", str(ctl),
               "--handshake-limit", "2")
    assert d.ready, d.stderr
    held = [RawQmp(str(ctl)) for _ in range(16)]
    extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    extra.connect(str(ctl))
    extra.settimeout(30)
    refusal = extra.makefile("rb").readline()
    assert json.loads(refusal)["error"]["desc"].startswith("too many control connections")
    assert _closed_by_peer(extra, 30)
    extra.close()
    # Negotiated and idle: they stay (a backup tool waits for events).
    assert held[0].call(b'{"execute": "query-disks"}')["return"][0]["name"] == "disk"
    held.pop().close()
    again = RawQmp(str(ctl))
    # A message begun and not ended: closed after the limit.
    again.sock.sendall(b'{"execute": "query-disks"')
    assert _closed_by_peer(again.sock, 30)
    # Connected and never negotiated: closed too.
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(ctl))
    assert _closed_by_peer(silent, 30)
    silent.close()
    for q in held:
        assert q.call(b'{"execute": "query-disks"}')["return"][0]["name"] == "disk"
        q.close()
    # Many clients trickling a megabyte each: memory stays bounded.
    rss = _rss_kib(d.proc.pid)
    clients = []
    for _ in range(200):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(ctl))
        c.setblocking(False)
        try:
            c.send(b'{"execute": "' + b"x" * (1 << 20))
        except OSError:
            pass
        clients.append(c)
    peak = _rss_kib(d.proc.pid)
    for c in clients:
        c.close()
    assert peak - rss < 64 * 1024, f"RSS grew by {peak - rss} KiB"
    assert d.stop() == 0


def test_nbd_clients_leave_file_descriptors_for_the_operator(launch, scratch: Path) -> None:
    """At a limit of 256 descriptors, NBD connections took them all and the
    control socket could not accept.  The soft limit is raised to the hard
    one, and NBD clients never take the last FD_RESERVE (64)."""
    img, _ = _image(scratch)
    ctl, nbd = scratch / "ctl.sock", scratch / "nbd.sock"
    d = launch(str(img), "-k", str(nbd), "-t", "--control", str(ctl),
               "--handshake-limit", "120", nofile=(128, 256))
    assert d.ready, d.stderr
    with open(f"/proc/{d.proc.pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max open files"))
    assert line.split()[3:5] == ["256", "256"], line
    conns = []
    served = 0
    for _ in range(300):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(nbd))
        c.settimeout(30)
        # Served: the handshake greeting comes; refused: EOF at once.
        if c.recv(8) == b"NBDMAGIC":
            served += 1
        conns.append(c)
    try:
        q = RawQmp(str(ctl))
        stats = q.call(b'{"execute": "query-stats"}')["return"]
        assert 100 < served == stats["connections"] <= 256 - 64, (served, stats)
        # A control command that opens files still can.
        other = scratch / "b.img"
        make_image(other, MiB, seed=2)
        reply = q.call(json.dumps({"execute": "disk-add", "arguments": {
            "name": "b", "path": str(other)}}).encode())
        assert "return" in reply, reply
        q.close()
    finally:
        for c in conns:
            c.close()
    assert d.stop() == 0


DEEP = b"[" * 100000 + b"]" * 100000

#: name -> (raw message, a word the error must contain)
HOSTILE = {
    "deep-argument": (b'{"execute": "fleece-start", "arguments": {"disk": "vm", "x": '
                      + DEEP + b"}}", "nesting"),
    "deep-message": (DEEP, "nesting"),
    "deep-objects": (b'{"a":' * 50000 + b"1" + b"}" * 50000, "nesting"),
    "size-overflow": (b'{"execute": "fleece-start", '
                      b'"arguments": {"disk": "vm", "max-temp": "1.E400"}}', "max-temp"),
    "number-overflow": (b'{"execute": "fleece-start", '
                        b'"arguments": {"disk": "vm", "cbw-timeout": 1e400}}', "out of range"),
    "nan": (b'{"execute": "fleece-start", '
            b'"arguments": {"disk": "vm", "cbw-timeout": NaN}}', "NaN"),
    "infinity": (b'{"execute": "fleece-start", '
                 b'"arguments": {"disk": "vm", "cbw-timeout": -Infinity}}', "Infinity"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_control_message(start_daemon, tmp_path: Path, name: str) -> None:
    img = tmp_path / "vm.img"
    make_image(img, MiB)
    d: Daemon = start_daemon(str(img))
    qmp = RawQmp(d.control)
    message, needle = HOSTILE[name]
    try:
        reply = qmp.call(message)
        assert reply.get("error", {}).get("class") == "GenericError", reply
        desc = reply["error"]["desc"]
        assert needle in desc, desc
        assert "internal error" not in desc, desc
        # the connection is still usable, and nothing was started
        commands = qmp.call(b'{"execute": "query-commands", "id": 7}')
        assert commands["id"] == 7
        assert {"name": "fleece-start"} in commands["return"]
        assert qmp.call(b'{"execute": "query-fleece"}') == {"return": []}
    finally:
        qmp.close()
    assert d.stop() == 0
    log = (tmp_path / "daemon1.log").read_text(errors="replace")
    assert "Traceback" not in log
    assert "Error" not in log.replace("GenericError", "")


# -- 3. the per-user default control directory must be private ------------------------


def _runtime_dir(scratch: Path) -> Path:
    run = scratch / "run"
    run.mkdir(mode=0o700)
    os.chown(run, USER_UID, -1)
    return run


def test_default_control_dir_is_created_private(launch, scratch: Path) -> None:
    img, _ = _image(scratch)
    run = _runtime_dir(scratch)
    env = {"XDG_RUNTIME_DIR": str(run)}
    d = launch(str(img), "-k", str(scratch / "nbd.sock"), "-t", env=env, as_user=True)
    assert d.ready, d.stderr
    st = os.lstat(run / "fleeced")
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.geteuid()  # the real owner: the daemon made it
    assert stat.S_ISSOCK(os.lstat(run / "fleeced" / "control.sock").st_mode)
    assert d.stop() == 0


def test_client_uses_private_default_control_dir(launch, scratch: Path) -> None:
    img, _ = _image(scratch)
    run = _runtime_dir(scratch)
    private = run / "fleeced"
    private.mkdir(mode=0o700)
    os.chown(private, USER_UID, -1)
    env = {"XDG_RUNTIME_DIR": str(run)}
    d = launch(str(img), "-k", str(scratch / "nbd.sock"), "-t", env=env, as_user=True)
    assert d.ready, d.stderr
    assert stat.S_ISSOCK(os.lstat(private / "control.sock").st_mode)
    proc = fleeced("fleece", "list", env=env, as_user=True)
    assert proc.returncode == 0, proc.stderr
    assert "no fleecing sessions" in proc.stdout
    assert d.stop() == 0


def _unsafe_dir(kind: str, run: Path) -> Path:
    path = run / "fleeced"
    if kind == "symlink":
        real = run / "elsewhere"
        real.mkdir(mode=0o700)
        os.chown(real, USER_UID, -1)
        path.symlink_to(real)
        os.lchown(path, USER_UID, -1)
        return path
    path.mkdir(mode=0o700)
    if kind == "other-owner":
        if not IS_ROOT:
            pytest.skip("needs root to make a directory owned by another user "
                        "(tests/unit/test_control_hardening.py covers the check)")
        return path  # owned by root, the shim's user is USER_UID
    os.chown(path, USER_UID, -1)
    os.chmod(path, {"group-writable": 0o770, "other-writable": 0o703}[kind])
    return path


UNSAFE = {
    "group-writable": "writable by group or others",
    "other-writable": "writable by group or others",
    "other-owner": "owned by uid 0",
    "symlink": "not a directory",
}


@pytest.mark.parametrize("kind", list(UNSAFE))
def test_daemon_refuses_unsafe_default_control_dir(launch, scratch: Path, kind: str) -> None:
    img, data = _image(scratch)
    run = _runtime_dir(scratch)
    path = _unsafe_dir(kind, run)
    d = launch(str(img), "-k", str(scratch / "nbd.sock"), "-t",
               env={"XDG_RUNTIME_DIR": str(run)}, as_user=True)
    if d.ready:
        d.stop()
    assert not d.ready, "started with an unsafe control directory"
    assert d.proc.returncode == 1
    one_line_error(d.stderr, str(path), UNSAFE[kind])
    assert not os.path.lexists(path / "control.sock")
    assert not (scratch / "nbd.sock").exists()
    assert img.read_bytes() == data


@pytest.mark.parametrize("kind", list(UNSAFE))
def test_client_refuses_unsafe_default_control_dir(launch, scratch: Path, kind: str) -> None:
    """A daemon listens in the directory (explicit --control); the CLI default refuses it."""
    img, _ = _image(scratch)
    run = _runtime_dir(scratch)
    path = _unsafe_dir(kind, run)
    ctl = path / "control.sock"
    d = launch(str(img), "-k", str(scratch / "nbd.sock"), "-t", "--control", str(ctl),
               as_user=True)
    assert d.ready, d.stderr
    env = {"XDG_RUNTIME_DIR": str(run)}
    proc = fleeced("fleece", "list", env=env, as_user=True)
    assert proc.returncode == 1, proc.stdout
    one_line_error(proc.stderr, str(path), UNSAFE[kind])
    # an explicit path is the user's choice and still works
    proc = fleeced("fleece", "list", "--control", str(ctl), env=env, as_user=True)
    assert proc.returncode == 0, proc.stderr
    assert d.stop() == 0


def test_explicit_control_in_shared_dir(launch, scratch: Path) -> None:
    """--control in a sticky world-writable directory (like /tmp) is not second-guessed."""
    img, _ = _image(scratch)
    shared = scratch / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    ctl = shared / "ctl.sock"
    d = launch(str(img), "-k", str(scratch / "nbd.sock"), "-t", "--control", str(ctl),
               as_user=True)
    assert d.ready, d.stderr
    proc = fleeced("status", "--control", str(ctl), as_user=True)
    assert proc.returncode == 0, proc.stderr
    proc = fleeced("status", env={"FLEECED_CONTROL": str(ctl)}, as_user=True)
    assert proc.returncode == 0, proc.stderr
    assert d.stop() == 0


# -- 4. a busy control path is an error, not a warning --------------------------------


@pytest.mark.parametrize("how", ["--control", "FLEECED_CONTROL"])
def test_second_daemon_on_same_control_path(launch, scratch: Path, how: str) -> None:
    img_a, _ = _image(scratch, "a.img")
    img_b, _ = _image(scratch, "b.img")
    ctl = scratch / "ctl.sock"
    env = {"FLEECED_CONTROL": str(ctl)} if how == "FLEECED_CONTROL" else None
    extra = ["--control", str(ctl)] if how == "--control" else []
    a = launch(str(img_a), "-k", str(scratch / "a.sock"), "-t", *extra, env=env)
    assert a.ready, a.stderr
    b = launch(str(img_b), "-k", str(scratch / "b.sock"), "-t", *extra, env=env)
    if b.ready:
        b.stop()
    assert not b.ready, "a second daemon started without its control socket"
    assert b.proc.returncode == 1
    one_line_error(b.stderr, "control socket", str(ctl), "already")
    assert not (scratch / "b.sock").exists()
    # A is untouched and still reachable on its control socket
    proc = fleeced("status", "--json", "--control", str(ctl))
    assert proc.returncode == 0, proc.stderr
    assert [x["name"] for x in json.loads(proc.stdout)["disks"]] == ["a"]
    # --no-control lets B run beside A
    b2 = launch(str(img_b), "-k", str(scratch / "b.sock"), "-t", "--no-control", env=env)
    assert b2.ready, b2.stderr
    assert b2.stop() == 0
    assert a.stop() == 0
    assert not ctl.exists()
