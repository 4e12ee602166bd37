"""``fleeced serve --config FILE``: the service-mode TOML configuration."""

from __future__ import annotations

from fleeced.app import DaemonConfig


def load_config(path: str) -> DaemonConfig:
    """Read the TOML file at PATH into a :class:`DaemonConfig`.

    :raise CliError: when the file cannot be read or is invalid.
    """
    from fleeced.cli import CliError

    raise CliError(f"{path}: --config is not implemented yet")
