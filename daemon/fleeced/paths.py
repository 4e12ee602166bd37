"""Where fleeced keeps its sockets and state by default, and the checks on them.

Imports nothing of fleeced but :mod:`fleeced.errors`.
"""

from __future__ import annotations

import grp
import os
import re
import socket
import stat
from typing import Final

from fleeced.errors import CliError


def default_control_path() -> str:
    """``$XDG_RUNTIME_DIR/fleeced/control.sock``, ``/run/fleeced/...`` as root."""
    return default_control()[0]


def default_control() -> tuple[str, str | None]:
    """The default control socket and the per-user directory that must hold it.

    ``$FLEECED_CONTROL`` wins and, like ``--control``, is the user's choice:
    no directory check.  Root uses ``/run/fleeced`` (only root can create
    it under ``/run``, and a root shell's ``XDG_RUNTIME_DIR`` must not hide
    the system daemon's socket), also unchecked.  Anyone else gets
    ``$XDG_RUNTIME_DIR/fleeced``, or ``/tmp/fleeced-$UID`` without it; that
    directory is returned so callers can insist it is private
    (:func:`check_private_dir`), because in ``/tmp`` anyone could have made it.

    :return: ``(socket path, directory to check or None)``.
    """
    env = os.environ.get("FLEECED_CONTROL")
    if env:
        return env, None
    if os.geteuid() == 0:
        return "/run/fleeced/control.sock", None
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        directory = os.path.join(runtime, "fleeced")
    else:
        directory = f"/tmp/fleeced-{os.geteuid()}"
    return os.path.join(directory, "control.sock"), directory


def check_private_dir(path: str) -> None:
    """Refuse PATH unless it is a real directory of ours that only we can write.

    Not a symlink (``lstat``), owned by the effective uid, no group or other
    write bit.  Others may read it: the socket inside is mode 0600.

    :raise CliError: when PATH is missing or fails any of those checks.
    """
    hint = "remove it, or pass --control PATH"
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise CliError(f"control directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CliError(f"unsafe control directory {path}: not a directory ({hint})")
    if st.st_uid != os.geteuid():
        raise CliError(f"unsafe control directory {path}: owned by uid {st.st_uid}, "
                       f"not {os.geteuid()} ({hint})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CliError(f"unsafe control directory {path}: writable by group or others "
                       f"(mode {stat.S_IMODE(st.st_mode):04o}; chmod 700 it, or {hint})")


def ensure_private_dir(path: str) -> None:
    """Create PATH with mode 0700, or check the one already there.

    A directory ``mkdir`` just made is ours and private by construction; one
    that already existed may have been planted, so it goes through
    :func:`check_private_dir`.

    :raise CliError: when PATH cannot be created, or an existing one is unsafe.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        check_private_dir(path)
        return
    except OSError as exc:
        raise CliError(f"cannot create control directory {path}: {exc.strerror}") from None
    os.chmod(path, 0o700)  # the umask may have taken bits away


def default_state_dir() -> str:
    """``/var/lib/fleeced`` as root, else ``$XDG_STATE_HOME/fleeced``
    (``~/.local/state/fleeced`` without it)."""
    if os.geteuid() == 0:
        return "/var/lib/fleeced"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "fleeced")


def unix_socket_in_use(path: str) -> bool:
    """Whether something accepts connections on the Unix socket at PATH (so
    the file is not stale and must not be replaced)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


#: Mode of an NBD Unix socket unless told otherwise: the owner and its
#: group (QEMU running as another user, libvirt's ``libvirt-qemu``, is given
#: access through the group), never others, whatever the umask.
DEFAULT_SOCKET_MODE: Final = 0o660

_OCTAL: Final = re.compile(r"0?[0-7]{3}\Z")


def parse_mode(text: str) -> int:
    """Permission bits written in octal, ``"0660"`` or ``"660"``.

    :raise ValueError: for anything else (a decimal number, setuid bits, ...).
    """
    if not _OCTAL.match(text):
        raise ValueError(f"{text!r} is not an octal mode like \"0660\"")
    return int(text, 8)


def group_id(group: str) -> int:
    """The gid of GROUP, a name or a number.

    :raise KeyError: when no group has that name.
    """
    if group.isdigit():
        return int(group)
    return grp.getgrnam(group).gr_gid
