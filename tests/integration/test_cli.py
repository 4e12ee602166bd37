"""The `fleeced` command line: one-line errors with a non-zero exit, and the control verbs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_image

pytestmark = pytest.mark.integration


def fleeced(*args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleeced", *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **(env or {})))


def assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_version() -> None:
    proc = fleeced("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("fleeced ")


def test_missing_image(tmp_path: Path) -> None:
    proc = fleeced("serve", str(tmp_path / "nope.img"), "-k", str(tmp_path / "s"))
    assert_one_line_error(proc, "no such file")


def test_directory_image(tmp_path: Path) -> None:
    proc = fleeced("serve", str(tmp_path), "-k", str(tmp_path / "s"))
    assert_one_line_error(proc, "is a directory")


def test_unreadable_image(tmp_path: Path) -> None:
    """Mode 000 for a normal user; root bypasses mode bits, so it gets a FIFO."""
    img = tmp_path / "x.img"
    if os.geteuid() == 0:
        os.mkfifo(img)
        needle = "x.img"
    else:
        make_image(img, 4096)
        img.chmod(0)
        needle = "ermission denied"
    proc = fleeced("serve", str(img), "-k", str(tmp_path / "s"), "--no-control")
    assert_one_line_error(proc, needle)


def test_port_in_use(tmp_path: Path) -> None:
    img = tmp_path / "x.img"
    make_image(img, 4096)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = fleeced("serve", str(img), "-p", str(port), "-b", "127.0.0.1", "--no-control")
    assert_one_line_error(proc, "in use")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    img = tmp_path / "x.img"
    make_image(img, 4096)
    proc = fleeced("serve", str(img), "-k", "s", "-p", "1")
    assert proc.returncode == 2
    proc = fleeced("serve", str(img), str(img), "-x", "one")
    assert proc.returncode == 2


def test_control_verbs(start_daemon, tmp_path: Path) -> None:
    img = tmp_path / "vm.img"
    make_image(img, 1 << 20)
    d = start_daemon(str(img))
    env = {"FLEECED_CONTROL": d.control}
    proc = fleeced("fleece", "start", "vm", "--name", "b1", "--cache", "1M", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "vm@b1" in proc.stdout
    proc = fleeced("fleece", "list", "--json", env=env)
    sessions = json.loads(proc.stdout)
    assert [(s["disk"], s["name"], s["state"]) for s in sessions] == [("vm", "b1", "active")]
    proc = fleeced("fleece", "list", env=env)
    assert "vm@b1" in proc.stdout
    proc = fleeced("status", "--json", "--control", d.control)
    status = json.loads(proc.stdout)
    assert {e["name"] for e in status["exports"]} == {"vm", "vm@b1"}
    # daemon errors are one line, exit != 0, and change nothing
    assert_one_line_error(fleeced("fleece", "start", "vm", "--name", "b1", env=env),
                          "already has a session")
    assert_one_line_error(fleeced("fleece", "start", "nope", env=env), "not found")
    assert_one_line_error(
        fleeced("fleece", "start", "vm", "--name", "b2", "--cluster-size", "3000", env=env),
        "cluster-size")
    assert_one_line_error(
        fleeced("fleece", "start", "vm", "--name", "b3", "--temp-dir", "/nonexistent",
                env=env), "temp-dir")
    proc = fleeced("fleece", "stop", "vm", "b1", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(fleeced("fleece", "list", "--json", env=env).stdout) == []
    assert_one_line_error(fleeced("fleece", "stop", "vm", "b1", env=env), "no session")


def test_no_daemon(tmp_path: Path) -> None:
    proc = fleeced("fleece", "list", "--control", str(tmp_path / "none.sock"))
    assert_one_line_error(proc, "cannot reach the daemon")
