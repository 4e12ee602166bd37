"""Import boundaries: the error tree, the paths and the configuration stand
alone (no CLI, no daemon, no data path), so no layer pulls another into an
import cycle through them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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


def _fleeced_imports(path: Path, package: str) -> set[str]:
    """The fleeced modules PATH imports, type-only imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else f"{package}.{node.module}"
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("fleeced.")}


def test_exports_modules_import_one_way() -> None:
    """A disk has sessions and a session has a disk, yet no exports module may
    import one that imports it back (even for types only): the rooms stay
    readable in one order, base first."""
    root = Path(__file__).resolve().parents[2] / "daemon" / "fleeced" / "exports"
    modules = {f"fleeced.exports.{p.stem}": p for p in root.glob("*.py") if p.stem != "__init__"}
    graph = {name: _fleeced_imports(path, "fleeced.exports") & set(modules)
             for name, path in modules.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt}))
                   for nxt in graph[start])

    cycles = sorted(name for name in graph if reaches(name, name, {name}))
    assert not cycles, {name: sorted(graph[name]) for name in cycles}
