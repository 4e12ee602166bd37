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
