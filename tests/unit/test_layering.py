"""Import boundaries: the error tree, the paths and the configuration stand
alone (no CLI, no daemon, no data path), so no layer pulls another into an
import cycle through them."""

from __future__ import annotations

import subprocess
import sys

import pytest

ALONE = {
    "fleeced.errors": set(),
    "fleeced.paths": {"fleeced.errors"},
    "fleeced.daemon_config": {"fleeced.errors", "fleeced.paths", "fleeced.control",
                              "fleeced.control.args", "fleeced.tls"},
    "fleeced.sources": set(),
    "fleeced.config_file": {"fleeced.errors", "fleeced.paths", "fleeced.daemon_config",
                            "fleeced.sources", "fleeced.control", "fleeced.control.args",
                            "fleeced.tls"},
}


@pytest.mark.parametrize("module", sorted(ALONE))
def test_module_imports_only_what_it_should(module: str) -> None:
    code = (f"import sys, {module}; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('fleeced.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert set(out) - {module} <= ALONE[module], sorted(set(out) - {module} - ALONE[module])


def test_error_tree() -> None:
    from fleeced.cli import CliError as CliFromCli
    from fleeced.control.server import CommandError as FromServer
    from fleeced.errors import CliError, CommandError, FleecedError

    assert CliFromCli is CliError and FromServer is CommandError
    assert issubclass(CliError, FleecedError) and issubclass(CommandError, FleecedError)
