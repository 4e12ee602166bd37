"""Hardening checks without a daemon: size and number parsing, JSON nesting depth,
the private per-user control directory and what ``build_config`` refuses."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from fleeced.cli import (
    CliError,
    check_private_dir,
    default_control,
    ensure_private_dir,
    parse_args,
)
from fleeced.cli_serve import build_config
from fleeced.control.args import MAX_SIZE, get, get_size, parse_size
from fleeced.control.framing import MAX_DEPTH, nesting_depth
from fleeced.control.server import CommandError

# -- sizes and numbers -----------------------------------------------------------------


@pytest.mark.parametrize(("text", "why"), [
    ("1.E400", "not a finite number"),
    ("1.5e400K", "not a finite number"),
    ("9.9e300T", "too large"),
    ("99999999999999999999T", "too large"),
    ("9223372036854775808", "too large"),
    ("8192P", "invalid size"),
    ("nan", "invalid size"),
    ("inf", "invalid size"),
    ("-inf", "invalid size"),
    ("1.nan", "invalid size"),
])
def test_parse_size_refuses_non_finite_and_overflow(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as ei:
        parse_size(text)
    assert repr(text) in str(ei.value)
    assert "\n" not in str(ei.value)


def test_parse_size_limits() -> None:
    assert MAX_SIZE == 2**63 - 1
    assert parse_size("9223372036854775807") == MAX_SIZE
    assert parse_size("8388607T") == 8388607 << 40
    assert parse_size("1.5G") == 3 << 29


@pytest.mark.parametrize("value", ["1.E400", 2**64, MAX_SIZE + 1])
def test_get_size_refuses_overflow(value: object) -> None:
    with pytest.raises(CommandError, match="max-temp") as ei:
        get_size({"max-temp": value}, "max-temp", 0)
    assert ei.value.cls == "GenericError"


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_get_float_refuses_non_finite(value: float) -> None:
    with pytest.raises(CommandError, match="cbw-timeout.*finite"):
        get({"cbw-timeout": value}, "cbw-timeout", float)


def test_cli_refuses_non_finite_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    for text in ("inf", "nan", "1e400"):
        with pytest.raises(SystemExit) as ei:
            parse_args(["fleece", "start", "vm", "--cbw-timeout", text])
        assert ei.value.code == 2
        assert "finite" in capsys.readouterr().err


# -- JSON nesting ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "depth"), [
    (b"", 0),
    (b"not json", 0),
    (b"{}", 1),
    (b'{"a": [1, {"b": []}]}', 4),
    (b'{"a": "[[[[{{{{"}', 1),              # brackets inside strings do not count
    (b'{"a": "\\"[[[", "b": [[]]}', 3),      # nor after an escaped quote
    (b'["\\\\", [[]]]', 3),                  # an escaped backslash ends the escape
    (b"[" * 100000 + b"]" * 100000, 100000),
    (b'{"a": "unterminated [[[[', 1),
])
def test_nesting_depth(text: bytes, depth: int) -> None:
    assert nesting_depth(text) == depth


def test_max_depth_is_safe_for_json() -> None:
    import json

    assert 16 <= MAX_DEPTH <= 256
    doc = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert nesting_depth(doc.encode()) == MAX_DEPTH
    repr(json.loads(doc))  # deep enough for real commands, shallow enough for repr


# -- the default control path and its private directory -------------------------------


def _env(monkeypatch: pytest.MonkeyPatch, **values: str | None) -> None:
    for key in ("FLEECED_CONTROL", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in values.items():
        if value is not None:
            monkeypatch.setenv(key, value)


def test_default_control(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1234)
    _env(monkeypatch)
    assert default_control() == ("/tmp/fleeced-1234/control.sock", "/tmp/fleeced-1234")
    _env(monkeypatch, XDG_RUNTIME_DIR=str(tmp_path))
    private = str(tmp_path / "fleeced")
    assert default_control() == (os.path.join(private, "control.sock"), private)
    # explicit choices are the user's: no directory check
    _env(monkeypatch, XDG_RUNTIME_DIR=str(tmp_path), FLEECED_CONTROL="/tmp/x.sock")
    assert default_control() == ("/tmp/x.sock", None)
    # root: /run is root's own; XDG_RUNTIME_DIR is ignored as before
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    _env(monkeypatch, XDG_RUNTIME_DIR=str(tmp_path))
    assert default_control() == ("/run/fleeced/control.sock", None)


def test_private_dir_ok(tmp_path: Path) -> None:
    d = tmp_path / "fleeced"
    d.mkdir(mode=0o700)
    check_private_dir(str(d))
    d.chmod(0o755)  # readable by others is fine: the socket itself is 0600
    check_private_dir(str(d))


def test_private_dir_owned_by_another_user(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "fleeced"
    d.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(d, 65534, 65534)
    else:
        monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    with pytest.raises(CliError, match="owned by uid") as ei:
        check_private_dir(str(d))
    assert str(d) in str(ei.value)
    with pytest.raises(CliError, match="owned by uid"):
        ensure_private_dir(str(d))


@pytest.mark.parametrize("mode", [0o720, 0o702, 0o777, 0o1777])
def test_private_dir_writable_by_others(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "fleeced"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(CliError, match="writable by group or others"):
        check_private_dir(str(d))


@pytest.mark.parametrize("kind", ["symlink", "file", "socket", "missing"])
def test_private_dir_not_a_directory(tmp_path: Path, kind: str) -> None:
    d = tmp_path / "fleeced"
    if kind == "symlink":
        real = tmp_path / "real"
        real.mkdir(mode=0o700)
        d.symlink_to(real)
    elif kind == "file":
        d.write_text("")
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(d))
    with pytest.raises(CliError, match="not a directory" if kind != "missing" else "No such"):
        check_private_dir(str(d))


def test_ensure_private_dir_creates_0700(tmp_path: Path) -> None:
    d = tmp_path / "fleeced"
    old = os.umask(0o022)
    try:
        ensure_private_dir(str(d))
    finally:
        os.umask(old)
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.geteuid()
    ensure_private_dir(str(d))  # an existing private directory is fine


def test_ensure_private_dir_no_parent(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="cannot create") as ei:
        ensure_private_dir(str(tmp_path / "nope" / "fleeced"))
    assert "\n" not in str(ei.value)


# -- build_config ------------------------------------------------------------------------


def _serve(tmp_path: Path, *extra: str) -> list[str]:
    img = tmp_path / "disk.img"
    if not img.exists():
        img.write_bytes(bytes(4096))
    return ["serve", str(img), "-k", str(tmp_path / "nbd.sock"), *extra]


def test_build_config_control_required(tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEECED_CONTROL", str(tmp_path / "ctl.sock"))
    cfg = build_config(parse_args(_serve(tmp_path)))
    assert (cfg.control_path, cfg.control_required) == (str(tmp_path / "ctl.sock"), True)
    cfg = build_config(parse_args(_serve(tmp_path, "--control", str(tmp_path / "c"))))
    assert (cfg.control_path, cfg.control_required) == (str(tmp_path / "c"), True)
    cfg = build_config(parse_args(_serve(tmp_path, "--no-control")))
    assert (cfg.control_path, cfg.control_required) == (None, False)


def test_build_config_checks_default_dir(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    uid = os.getuid() or 4321  # as root, pretend to be a user (root ignores XDG)
    monkeypatch.setattr(os, "geteuid", lambda: uid)
    _env(monkeypatch, XDG_RUNTIME_DIR=str(tmp_path))
    private = tmp_path / "fleeced"
    if os.getuid() == 0:
        private.mkdir(mode=0o700)
        os.chown(private, uid, uid)
    cfg = build_config(parse_args(_serve(tmp_path)))
    assert cfg.control_path == str(private / "control.sock")
    assert cfg.control_required
    assert stat.S_IMODE(os.lstat(private).st_mode) == 0o700
    private.chmod(0o770)
    with pytest.raises(CliError, match="writable by group or others"):
        build_config(parse_args(_serve(tmp_path)))
    private.chmod(0o700)
    if os.getuid() == 0:
        os.chown(private, 4322, 4322)
        with pytest.raises(CliError, match="owned by uid 4322"):
            build_config(parse_args(_serve(tmp_path)))
    # an explicit --control is not checked
    cfg = build_config(parse_args(_serve(tmp_path, "--control", str(private / "c.sock"))))
    assert cfg.control_path == str(private / "c.sock")


@pytest.mark.parametrize("kind", ["directory", "fifo", "socket", "symlink-to-directory",
                                  "dangling-symlink", "image", "no-parent"])
def test_build_config_refuses_pid_file(tmp_path: Path, kind: str) -> None:
    pidf = tmp_path / "pid"
    if kind == "directory":
        pidf.mkdir()
    elif kind == "fifo":
        os.mkfifo(pidf)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(pidf))
    elif kind == "symlink-to-directory":
        pidf.symlink_to(tmp_path)
    elif kind == "dangling-symlink":
        pidf.symlink_to(tmp_path / "nowhere")
    elif kind == "image":
        pidf = tmp_path / "disk.img"
    elif kind == "no-parent":
        pidf = tmp_path / "nope" / "pid"
    args = parse_args(_serve(tmp_path, "--no-control", "--pid-file", str(pidf)))
    with pytest.raises(CliError, match="--pid-file") as ei:
        build_config(args)
    assert str(pidf) in str(ei.value)


@pytest.mark.parametrize("kind", ["missing", "regular", "symlink-to-regular"])
def test_build_config_accepts_pid_file(tmp_path: Path, kind: str) -> None:
    pidf = tmp_path / "pid"
    if kind == "regular":
        pidf.write_text("1\n")
    elif kind == "symlink-to-regular":
        (tmp_path / "real").write_text("1\n")
        pidf.symlink_to(tmp_path / "real")
    args = parse_args(_serve(tmp_path, "--no-control", "--pid-file", str(pidf)))
    assert build_config(args).pid_file == str(pidf)
