"""The state dir: what a restarted daemon remembers.

Disks added at run time come back, disks removed stay gone, the sessions of
a daemon that died are reported broken (never served), and two daemons never
share one state dir.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from tests.conftest import Daemon, daemon_env, make_image, requires, run
from tests.integration.test_cli import fleeced
from tests.integration.test_fleece import qmp

pytestmark = pytest.mark.integration

SIZE = 4 << 20


def served(d: Daemon) -> set[str]:
    exports = qmp(d, "query-exports")
    assert isinstance(exports, list)
    return {e["name"] for e in exports}


def test_disks_added_at_run_time_are_remembered(
        tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_image(a, SIZE)
    data_b = make_image(b, SIZE, seed=7)
    state = str(tmp_path / "state")
    d = start_daemon(str(a), "--state-dir", state)
    proc = fleeced("disk", "add", "b", str(b), "--control", d.control)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out.img"
    run(requires("qemu-img"), "convert", "-f", "raw", "-O", "raw", d.url("b"), str(out))
    assert out.read_bytes() == data_b
    assert d.stop() == 0

    d2 = start_daemon(str(a), "--state-dir", state)
    assert served(d2) == {"a", "b"}
    out.unlink()
    run(requires("qemu-img"), "convert", "-f", "raw", "-O", "raw", d2.url("b"), str(out))
    assert out.read_bytes() == data_b
    proc = fleeced("disk", "remove", "b", "--control", d2.control)
    assert proc.returncode == 0, proc.stderr
    assert served(d2) == {"a"}
    assert d2.stop() == 0

    d3 = start_daemon(str(a), "--state-dir", state)
    assert served(d3) == {"a"}


def test_disk_add_and_remove_errors(tmp_path: Path,
                                    start_daemon: Callable[..., Daemon]) -> None:
    a = tmp_path / "a.img"
    make_image(a, SIZE)
    d = start_daemon(str(a))
    for args, needle in (
        ({"name": "x", "path": "rel.img"}, "must be absolute"),
        ({"name": "x", "path": str(tmp_path / "missing.img")}, "no such file or device"),
        ({"name": "a", "path": str(a)}, "already used"),
        ({"name": "", "path": str(a)}, "invalid disk name"),
        ({"name": "x", "path": str(a), "discard": "maybe"}, "discard must be"),
    ):
        with pytest.raises(ExecuteError, match=needle):
            qmp(d, "disk-add", args)
    with pytest.raises(ExecuteError, match="not found"):
        qmp(d, "disk-remove", {"name": "nope"})
    qmp(d, "fleece-start", {"disk": "a"})
    with pytest.raises(ExecuteError, match="fleece-stop them first"):
        qmp(d, "disk-remove", {"name": "a"})
    assert served(d) == {"a", "a@fleece"}


def test_sessions_of_a_dead_daemon_are_reported_broken(
        tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    """kill -9 with a session active: the restarted daemon reports it broken,
    does not serve its export, refuses to reuse its name until fleece-stop."""
    a = tmp_path / "a.img"
    make_image(a, SIZE)
    state = str(tmp_path / "state")
    d = start_daemon(str(a), "--state-dir", state)
    qmp(d, "fleece-start", {"disk": "a"})
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()

    d2 = start_daemon(str(a), "--state-dir", state)
    sessions = qmp(d2, "query-fleece")
    assert isinstance(sessions, list) and len(sessions) == 1
    assert sessions[0]["state"] == "broken" and sessions[0]["export"] == "a@fleece"
    assert "stopped uncleanly" in sessions[0]["error"]
    assert "a@fleece" not in served(d2)
    assert run(requires("nbdinfo"), d2.url("a@fleece"), check=False).returncode != 0
    listing = fleeced("fleece", "list", "--control", d2.control)
    assert "broken" in listing.stdout
    with pytest.raises(ExecuteError, match="lost in a daemon restart"):
        qmp(d2, "fleece-start", {"disk": "a"})
    qmp(d2, "fleece-stop", {"disk": "a"})
    qmp(d2, "fleece-start", {"disk": "a"})
    assert d2.stop() == 0
    # An orderly stop ends sessions: nothing is reported lost after it.
    d3 = start_daemon(str(a), "--state-dir", state)
    assert qmp(d3, "query-fleece") == []


def test_a_state_dir_serves_one_daemon(tmp_path: Path,
                                       start_daemon: Callable[..., Daemon]) -> None:
    a = tmp_path / "a.img"
    make_image(a, SIZE)
    state = tmp_path / "state"
    d = start_daemon(str(a), "--state-dir", str(state))
    proc = subprocess.run([sys.executable, "-m", "fleeced", "serve", str(a), "--no-control",
                           "-k", str(tmp_path / "other.sock"), "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=60, env=daemon_env())
    assert proc.returncode == 1
    assert f"in use by another fleeced (pid {d.proc.pid})" in proc.stderr, proc.stderr
    assert d.stop() == 0
    (state / "state.json").write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "fleeced", "serve", str(a), "--no-control",
                           "-k", str(tmp_path / "other.sock"), "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=60, env=daemon_env())
    assert proc.returncode == 1 and "corrupt state" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _fails(d: Daemon, cmd: str, args: dict[str, object], *needles: str) -> str:
    with pytest.raises(ExecuteError) as info:
        qmp(d, cmd, args)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_a_change_that_cannot_be_recorded_is_refused(
        tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    """With the state dir unwritable, disk-add and fleece-start succeeded
    without being recorded (a crash forgot them).  Now every command whose
    effect cannot be recorded fails and is rolled back, and one that cannot
    be rolled back (a stop) says that it was not recorded.  The state dir is
    made unwritable by a directory where the new state file goes (the same
    failure as a full file system, without needing one)."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_image(a, SIZE)
    make_image(b, SIZE, seed=3)
    state = tmp_path / "state"
    d = start_daemon(str(a), "--state-dir", str(state))
    qmp(d, "bitmap-add", {"disk": "a", "name": "old"})
    blocker = state / "state.json.tmp"
    blocker.mkdir()
    why = f"cannot save state in {state}: Is a directory"

    _fails(d, "disk-add", {"name": "b", "path": str(b)}, why, "adding disk 'b' was undone")
    assert served(d) == {"a"}
    _fails(d, "fleece-start", {"disk": "a"}, why, "starting session 'fleece' on 'a' was undone")
    assert served(d) == {"a"} and qmp(d, "query-fleece") == []
    _fails(d, "bitmap-add", {"disk": "a", "name": "x"}, why, "adding bitmap 'x'")
    # A checkpoint taken back: OLD records again, NEW is gone (file too).
    _fails(d, "fleece-start", {"disk": "a", "checkpoint": "new", "since": "old"}, why)
    bitmaps = qmp(d, "query-bitmaps")
    assert isinstance(bitmaps, list)
    assert [(b["name"], b["recording"]) for b in bitmaps] == [("old", True)]
    assert sorted(p.name for p in (state / "bitmaps").iterdir()) == ["a@old.fbm"]
    _fails(d, "bitmap-disable", {"disk": "a", "name": "old"}, why)
    bitmaps = qmp(d, "query-bitmaps")
    assert isinstance(bitmaps, list) and bitmaps[0]["recording"] is True

    blocker.rmdir()
    qmp(d, "disk-add", {"name": "b", "path": str(b)})
    qmp(d, "fleece-start", {"disk": "b"})
    blocker.mkdir()
    _fails(d, "bitmap-remove", {"disk": "a", "name": "old"}, why, "was undone")
    _fails(d, "disk-remove", {"name": "b"}, "has sessions")
    _fails(d, "fleece-stop", {"disk": "b"}, "session 'fleece' on 'b' stopped, but", why,
           "a restart lists it as lost until fleece-stop")
    assert served(d) == {"a", "b"}  # the stop happened
    _fails(d, "disk-remove", {"name": "b"}, why, "removing disk 'b' was undone")
    assert served(d) == {"a", "b"}

    # What a crash now finds is what the daemon reported: b served, its
    # session lost (the stop was not recorded), the bitmap there.
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    blocker.rmdir()
    d2 = start_daemon(str(a), "--state-dir", str(state))
    assert served(d2) == {"a", "b"}
    sessions = qmp(d2, "query-fleece")
    assert isinstance(sessions, list)
    assert [(s["disk"], s["state"]) for s in sessions] == [("b", "broken")]
    bitmaps = qmp(d2, "query-bitmaps")
    assert isinstance(bitmaps, list) and [b["name"] for b in bitmaps] == ["old"]
