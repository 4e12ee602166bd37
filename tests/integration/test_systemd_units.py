"""The shipped systemd units parse, and the service keeps its sandbox."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import requires, run

pytestmark = pytest.mark.integration

UNITS = Path(__file__).resolve().parents[2] / "systemd"


def _unit_copy(tmp_path: Path) -> Path:
    # verify insists that ExecStart's binary exists: point it at /bin/true.
    text = (UNITS / "fleeced.service").read_text()
    text = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", text, flags=re.M)
    (tmp_path / "fleeced.service").write_text(text)
    (tmp_path / "fleeced.socket").write_text((UNITS / "fleeced.socket").read_text())
    return tmp_path / "fleeced.service"


def test_units_verify(tmp_path: Path) -> None:
    tool = requires("systemd-analyze")
    service = _unit_copy(tmp_path)
    out = run(tool, "verify", str(service), str(tmp_path / "fleeced.socket"), check=False)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if "fleeced" in line and "User" not in line]
    assert out.returncode == 0 or not problems, out.stdout + out.stderr


def test_service_exposure_is_low(tmp_path: Path) -> None:
    tool = requires("systemd-analyze")
    service = _unit_copy(tmp_path)
    out = run(tool, "security", "--offline=true", str(service), check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout + out.stderr)
    assert m, out.stdout + out.stderr
    assert float(m.group(1)) <= 3.0


def test_service_is_type_notify_without_forking() -> None:
    text = (UNITS / "fleeced.service").read_text()
    assert "\nType=notify\n" in text
    assert "--fork" not in text and "PIDFile" not in text
    assert "MemoryDenyWriteExecute=yes" in text


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_service_runs_the_config_file_with_a_watchdog() -> None:
    d = _directives((UNITS / "fleeced.service").read_text())
    assert d["ExecStart"] == [
        "/usr/local/bin/fleeced serve --config /etc/fleeced/fleeced.toml --log-level info"]
    assert d["NotifyAccess"] == ["main"]
    # The loop sends WATCHDOG=1 every WatchdogSec/2 (core.py DaemonCore._watchdog).
    assert d["WatchdogSec"] == ["30s"]
    assert d["Restart"] == ["on-failure"] and "RestartSec" in d
    assert d["StateDirectory"] == ["fleeced"]
    assert d["RuntimeDirectory"] == ["fleeced"] and d["RuntimeDirectoryPreserve"] == ["yes"]
    assert d["CacheDirectory"] == ["fleeced"]
    assert "EnvironmentFile" not in d  # the TOML file is the one configuration
    for key in ("ProtectSystem", "ProtectHome", "PrivateDevices", "NoNewPrivileges",
                "RestrictNamespaces", "SystemCallFilter", "SystemCallArchitectures",
                "LockPersonality", "RestrictRealtime", "RestrictSUIDSGID", "UMask",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                "ProtectControlGroups", "ProtectHostname", "CapabilityBoundingSet"):
        assert key in d, key
    assert d["CapabilityBoundingSet"] == [""]


def test_socket_unit_passes_the_nbd_socket() -> None:
    d = _directives((UNITS / "fleeced.socket").read_text())
    assert d["ListenStream"] == ["/run/fleeced/nbd.sock"]
    assert d["SocketMode"] == ["0660"]
    service = _directives((UNITS / "fleeced.service").read_text())
    assert "fleeced.socket" in service["After"][0] and service["Also"] == ["fleeced.socket"]


def _comment_blocks(text: str) -> list[str]:
    blocks, current = [], []
    for line in text.splitlines():
        if line.startswith("#"):
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    return blocks


def test_every_gap_in_the_sandbox_is_explained(tmp_path: Path) -> None:
    """Each item `systemd-analyze security` marks as exposed is named in a
    "Relaxed:" comment of the unit, saying why it stays."""
    tool = requires("systemd-analyze")
    service = _unit_copy(tmp_path)
    out = run(tool, "security", "--offline=true", "--no-pager", str(service), check=False)
    exposed = {m.group(1) for m in re.finditer(r"^✗ (\w+)=", out.stdout, re.M)}
    assert exposed, out.stdout
    relaxed = [b for b in _comment_blocks((UNITS / "fleeced.service").read_text())
               if "Relaxed:" in b]
    unexplained = sorted(k for k in exposed if not any(f"{k}=" in b for b in relaxed))
    assert not unexplained, unexplained


def test_each_relaxation_has_its_reason_right_above() -> None:
    """The directives that open the sandbox wider than the strict baseline (or than
    systemd's strictest value) sit right under a "Relaxed:" comment."""
    lines = (UNITS / "fleeced.service").read_text().splitlines()
    for key in ("SupplementaryGroups", "ReadWritePaths", "RuntimeDirectoryMode",
                "PrivateUsers", "RestrictAddressFamilies", "SystemCallFilter"):
        for i, line in enumerate(lines):
            if line.startswith(f"{key}="):
                j = i - 1
                while j >= 0 and lines[j].startswith("#") and "Relaxed:" not in lines[j]:
                    j -= 1
                assert j >= 0 and "Relaxed:" in lines[j], f"{line}: no Relaxed: comment above"
