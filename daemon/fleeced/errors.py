"""The one exception tree for errors fleeced reports to a person.

- :class:`CliError`: a one-line message and exit status 1 (command line,
  configuration file, start-up).
- :class:`CommandError`: a control command failed; sent to the client as a
  QMP error object ``{"class": cls, "desc": desc}``.
  :class:`VmUnreachable` is the one that says the VM is gone.

Both derive from :class:`FleecedError`.  This module imports nothing of
fleeced, so every layer can raise them without import cycles.
"""

from __future__ import annotations


class FleecedError(Exception):
    """Base of every error meant for a person rather than a traceback."""


class CliError(FleecedError):
    """A one-line error for the user; the command exits with status 1."""


class CommandError(FleecedError):
    """A command failed; sent as ``{"error": {"class": cls, "desc": desc}}``.

    :param desc: human-readable one-line description.
    :param cls: QMP error class (``GenericError``, ``CommandNotFound``, ...).
    """

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


class VmUnreachable(CommandError):
    """The VM is gone (its QMP socket refuses connections, its libvirt
    domain is not running or not reachable), as opposed to a VM that
    refused a command: ``vm-detach force`` and fleece-stop forget such a
    VM's attachment or filter instead of failing."""
