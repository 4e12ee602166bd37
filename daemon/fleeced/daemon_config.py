"""The daemon's configuration: what ``fleeced serve`` (or ``serve --config``)
asked for, and the checks on session options shared by the command line,
the configuration file and ``fleece-start``.

Imports no server, no control socket and no data path.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any, Final

from fleeced.control.args import get, get_size
from fleeced.errors import CommandError
from fleeced.paths import DEFAULT_SOCKET_MODE
from fleeced.tls import TlsConfig

#: Session cluster size limits; fleeced.h's FL_CLUSTER_MIN/MAX say the same
#: (tests/datapath checks), kept here so configuration needs no data path.
CLUSTER_MIN: Final = 4096
CLUSTER_MAX: Final = 16 << 20
#: Longest cbw-timeout, seconds (0: no limit).  A guest write that waits
#: longer than an hour for its copy is a hung temp store, not a slow one,
#: and the C side takes the value in milliseconds.
CBW_TIMEOUT_MAX: Final = 3600.0

__all__ = ["DaemonConfig", "DiskSpec", "Listener", "SessionOptions", "session_option_args",
           "session_options_from_args", "image_export_name"]


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """The user-facing options of a fleecing session (``fleece-start``)."""

    name: str = "fleece"
    export: str | None = None
    cluster_size: int = 65536
    scope: tuple[tuple[int, int], ...] = ()
    break_guest_write: bool = False
    cbw_timeout: float = 45.0
    max_temp: int = 0
    cache: int = 0
    temp_dir: str | None = None
    read_only: bool = False


#: A disk's cache modes (qemu-nbd's --cache, the two that differ here).
CACHE_MODES = ("none", "writeback")


@dataclass
class DiskSpec:
    """A disk to open at start: its source (a path, an NBD URI, ``rbd:...``;
    see :mod:`fleeced.sources`), its format when given, the export name and
    options."""

    source: str
    name: str
    read_only: bool = False
    discard: str = "ignore"
    description: str = ""
    #: ``-f FMT`` (None: probe a path, as qemu-nbd does).
    format: str | None = None
    #: An NBD source not connected at start, of this size (a VM node an
    #: attach had QEMU export; the state dir remembers it).
    lazy_size: int | None = None
    #: ``none`` (bypass the host page cache, O_DIRECT) or ``writeback``;
    #: None: writeback, unless an attached VM's node bypasses the cache.
    cache: str | None = None
    #: Persistent dirty bitmaps that must exist at start (``-B NAME``).
    bitmaps: tuple[str, ...] = ()


@dataclass
class Listener:
    """One NBD listener: a Unix socket (with optional mode and group) or TCP."""

    unix: str | None = None
    #: Permission bits of the Unix socket file, whatever the umask.
    mode: int = DEFAULT_SOCKET_MODE
    #: Group name or number of the Unix socket file.
    group: str | None = None
    tcp_host: str | None = None
    tcp_port: int | None = None


@dataclass
class DaemonConfig:
    """Everything ``fleeced serve`` (or ``serve --config``) was asked to do."""

    disks: list[DiskSpec]
    listeners: list[Listener] = field(default_factory=list)
    shared: int = 0
    persistent: bool = False
    control_path: str | None = None
    control_required: bool = False
    fleece: list[tuple[str, SessionOptions]] = field(default_factory=list)
    pid_file: str | None = None
    threads: int = 0
    #: Seconds connections get to finish in-flight requests at shutdown and at
    #: fleece-stop before they are aborted (``--shutdown-timeout``).
    shutdown_timeout: float = 5.0
    #: Seconds a client has to finish the handshake (``--handshake-limit``).
    handshake_limit: float = 10.0
    #: Where a plain connection's requests run after its handshake:
    #: ``native`` (C threads per connection) or ``loop`` (the event loop;
    #: for comparison, ``--data-plane``).  TLS connections use the loop.
    data_plane: str = "native"
    #: Where runtime state lives (disks added at run time, VM attachments,
    #: sessions); ``None``: no state is kept (lab mode, like qemu-nbd).
    state_dir: str | None = None
    #: ``fleece-start`` arguments used when a command leaves them out
    #: (``cluster-size``, ``temp-dir``, ``cache``, ...).
    session_defaults: dict[str, Any] = field(default_factory=dict)
    tls: TlsConfig = field(default_factory=TlsConfig)
    #: Where Prometheus metrics are served (``--metrics``, ``[metrics]
    #: listen``): (host, port), host None for every IPv4 address; None: off.
    metrics: tuple[str | None, int] | None = None


def session_options_from_args(args: dict[str, Any]) -> SessionOptions:
    """Build :class:`SessionOptions` from ``fleece-start`` arguments.

    :raise CommandError: on any missing, mistyped or out-of-range argument.
    """
    name = get(args, "name", str, "fleece")
    if not name or "/" in name or "\0" in name:
        raise CommandError(f"invalid session name {name!r}")
    export = get(args, "export", str, None) if "export" in args else None
    if export is not None and (not export or len(export.encode()) > 4096 or "\0" in export):
        raise CommandError(f"invalid export name {export!r}")
    cluster = get_size(args, "cluster-size", 65536)
    if cluster < CLUSTER_MIN or cluster > CLUSTER_MAX or cluster & (cluster - 1):
        raise CommandError(
            f"cluster-size {cluster} must be a power of two between {CLUSTER_MIN} and "
            f"{CLUSTER_MAX}"
        )
    scope: list[tuple[int, int]] = []
    if "bitmap" in args:
        for item in get(args, "bitmap", list):
            if not isinstance(item, dict) or set(item) - {"offset", "length"}:
                raise CommandError("bitmap entries must be {\"offset\": N, \"length\": N}")
            off = get(item, "offset", int)
            length = get(item, "length", int)
            if off < 0 or length <= 0:
                raise CommandError(f"bad bitmap extent offset={off} length={length}")
            scope.append((off, length))
        if not scope:
            raise CommandError("bitmap must list at least one extent")
    policy = get(args, "on-cbw-error", str, "break-snapshot")
    if policy not in ("break-snapshot", "break-guest-write"):
        raise CommandError(
            f"on-cbw-error must be 'break-snapshot' or 'break-guest-write', not '{policy}'"
        )
    timeout = get(args, "cbw-timeout", float, 45.0)
    if not 0 <= timeout <= CBW_TIMEOUT_MAX:
        raise CommandError(f"cbw-timeout {timeout:g} must be between 0 (no limit) and "
                           f"{CBW_TIMEOUT_MAX:g} seconds")
    temp_dir = get(args, "temp-dir", str, None) if "temp-dir" in args else None
    if temp_dir is not None and not os.path.isdir(temp_dir):
        raise CommandError(f"temp-dir '{temp_dir}' is not a directory")
    return SessionOptions(
        name=name,
        export=export,
        cluster_size=cluster,
        scope=tuple(scope),
        break_guest_write=policy == "break-guest-write",
        cbw_timeout=timeout,
        max_temp=get_size(args, "max-temp", 0),
        cache=get_size(args, "cache", 0),
        temp_dir=temp_dir,
        read_only=get(args, "read-only", bool, False),
    )


def session_option_args(args: argparse.Namespace) -> dict[str, Any]:
    """The session options given on a command line, as fleece-start arguments."""
    out: dict[str, Any] = {}
    for attr, key in (
        ("cluster_size", "cluster-size"), ("temp_dir", "temp-dir"), ("cache", "cache"),
        ("max_temp", "max-temp"), ("on_cbw_error", "on-cbw-error"),
        ("cbw_timeout", "cbw-timeout"),
    ):
        value = getattr(args, attr, None)
        if attr == "cache" and isinstance(value, str):
            continue  # --cache none|writeback: the disks' mode, not the sessions'
        if value is not None:
            out[key] = value
    return out


def image_export_name(path: str) -> str:
    """The default export name of an image: its file name without extension."""
    base = os.path.basename(os.path.normpath(path))
    stem, _ext = os.path.splitext(base)
    return stem or base
