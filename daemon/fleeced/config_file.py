"""``fleeced serve --config FILE``: the service-mode TOML configuration.

Reads one TOML file (stdlib :mod:`tomllib`) into a :class:`DaemonConfig`.  The
schema is strict: an unknown key, a value of the wrong type, a bad size or
mode, a duplicate disk name or a missing image is a :class:`CliError` that
names the file, the key (``disk[2].path``; arrays of tables count from 1) and
what is wrong.  ``systemd/fleeced.toml.example`` documents every key.

Relative paths in the file are taken relative to the file's directory.  Apart
from reading the file, the only I/O is checking that the named images, TLS
files and temp directory exist (so a typo fails at start, not at the first
``fleece-start``) and, for an unprivileged user's default control socket,
creating its private directory exactly as ``fleeced serve`` does.

Must not import asyncio machinery beyond what :mod:`fleeced.daemon` brings.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tomllib
from typing import Any, Final

from fleeced.control.args import parse_size
from fleeced.daemon_config import (
    CACHE_MODES,
    DaemonConfig,
    DiskSpec,
    Listener,
    session_options_from_args,
)
from fleeced.errors import CliError, CommandError
from fleeced.paths import (
    DEFAULT_SOCKET_MODE,
    default_control,
    default_state_dir,
    ensure_private_dir,
    group_id,
    parse_mode,
)
from fleeced.sources import FORMATS, SourceError
from fleeced.sources import parse as parse_source
from fleeced.tls import TLS_MODES, TlsConfig

__all__ = ["load_config"]

log = logging.getLogger(__name__)

_TOP_KEYS: Final = frozenset({
    "control", "state-dir", "threads", "shutdown-timeout", "handshake-limit", "shared",
    "listen", "tls", "session", "disk", "data-plane", "metrics",
})
_METRICS_KEYS: Final = frozenset({"listen"})
_LISTEN_KEYS: Final = frozenset({"unix", "mode", "group", "tcp"})
_TLS_KEYS: Final = frozenset({"mode", "cert", "key", "ca", "psk-file", "unix", "authz"})
_SIZE_KEYS: Final = ("cluster-size", "cache", "max-temp")
_SESSION_KEYS: Final = frozenset({*_SIZE_KEYS, "temp-dir", "on-cbw-error", "cbw-timeout"})
_DISK_KEYS: Final = frozenset({"name", "source", "path", "format", "read-only", "discard",
                               "description", "cache", "bitmaps"})
_MAX_NAME: Final = 4096  # NBD_MAX_STRING: longer export names cannot be asked for


class _Bad(Exception):
    """A problem with one key; :func:`load_config` adds the file name."""

    def __init__(self, key: str, what: str) -> None:
        super().__init__(f"{key}: {what}" if key else what)


def load_config(path: str) -> DaemonConfig:
    """Read the TOML file at PATH into a :class:`DaemonConfig`.

    The result has ``persistent=True`` (a service keeps serving after its
    last client leaves), a required control socket and no ``pid_file``
    (that stays a command-line option).

    :raise CliError: when the file cannot be read, is not valid TOML (the
        message carries tomllib's line and column), or breaks the schema.
    """
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise CliError(f"{path}: invalid TOML: not UTF-8 ({exc.reason})") from None
    try:
        return _build(doc, os.path.dirname(os.path.abspath(path)))
    except _Bad as exc:
        raise CliError(f"{path}: {exc}") from None


# -- the document ----------------------------------------------------------------


def _build(doc: dict[str, Any], base: str) -> DaemonConfig:
    _check_keys(doc, _TOP_KEYS, "")
    control = _opt(doc, "control", str, "control")
    if control is not None:
        control = _path(control, base, "control")
    threads = _opt(doc, "threads", int, "threads")
    if threads is not None and not 1 <= threads <= 64:
        raise _Bad("threads", f"{threads} is out of range 1..64")
    shared = _opt(doc, "shared", int, "shared")
    if shared is not None and shared < 0:
        raise _Bad("shared", "must not be negative (0: unlimited)")
    timeouts = {}
    for key, default in (("shutdown-timeout", 5.0), ("handshake-limit", 10.0)):
        value = _opt_number(doc, key, key)
        if value is not None and not 0 < value <= 3600:  # NaN fails too
            raise _Bad(key, f"{value} is out of range (0, 3600] seconds")
        timeouts[key] = default if value is None else value
    data_plane = _opt(doc, "data-plane", str, "data-plane") or "native"
    if data_plane not in ("native", "loop"):
        raise _Bad("data-plane", f"{data_plane!r} is not one of native, loop")
    state_dir = _opt(doc, "state-dir", str, "state-dir")
    state_dir = default_state_dir() if state_dir is None else _path(state_dir, base, "state-dir")

    listeners = [_listener(t, base, f"listen[{i}]")
                 for i, t in enumerate(_tables(doc, "listen"), 1)]
    unix_paths = [listener.unix for listener in listeners if listener.unix is not None]
    for i, p in enumerate(unix_paths):
        if p in unix_paths[:i]:
            raise _Bad("listen", f"unix socket {p} is listed twice")
    if control is not None and control in unix_paths:
        raise _Bad("control", f"{control} is also an NBD [[listen]] socket")
    tls = _tls(_table(doc, "tls"), base)
    metrics = _metrics(_table(doc, "metrics"))
    session = _session(_table(doc, "session"), base)
    disks = [_disk(t, base, f"disk[{i}]") for i, t in enumerate(_tables(doc, "disk"), 1)]
    seen: dict[str, int] = {}
    files: list[os.stat_result | None] = []
    for i, d in enumerate(disks, 1):
        if d.name in seen:
            raise _Bad(f"disk[{i}].name",
                       f"{d.name!r} is already the name of disk[{seen[d.name]}]")
        seen[d.name] = i
        # The daemon refuses it too, once open; here the keys can be named.
        # (An NBD URI or an rbd: name is no file: the daemon compares those.)
        st = os.stat(d.source) if os.path.exists(d.source) else None
        for j, earlier in enumerate(files, 1):
            if st is not None and earlier is not None and _same_source(st, earlier):
                key = "source" if "source" in _tables(doc, "disk")[i - 1] else "path"
                raise _Bad(f"disk[{i}].{key}", f"{d.source} is the image of disk[{j}] "
                           f"({disks[j - 1].source}); one source can only be one disk")
        files.append(st)
    if not listeners and "LISTEN_FDS" not in os.environ:
        log.warning("no [[listen]] in the configuration and no socket activation: "
                    "only the control socket is served")

    if control is None:
        control, private = default_control()
        if private is not None:
            try:
                ensure_private_dir(private)
            except CliError as exc:
                raise _Bad("control", f"{exc} (set control = PATH)") from None
    return DaemonConfig(
        disks=disks,
        listeners=listeners,
        shared=shared or 0,
        persistent=True,
        control_path=control,
        control_required=True,
        threads=threads or 0,
        shutdown_timeout=timeouts["shutdown-timeout"],
        handshake_limit=timeouts["handshake-limit"],
        data_plane=data_plane,
        state_dir=state_dir,
        session_defaults=session,
        tls=tls,
        metrics=metrics,
    )


def _metrics(t: dict[str, Any]) -> tuple[str | None, int] | None:
    from fleeced.metrics import parse_address

    _check_keys(t, _METRICS_KEYS, "metrics")
    listen = _opt(t, "listen", str, "metrics.listen")
    if listen is None:
        return None
    try:
        return parse_address(listen)
    except ValueError as exc:
        raise _Bad("metrics.listen", str(exc)) from None


def _listener(t: dict[str, Any], base: str, where: str) -> Listener:
    _check_keys(t, _LISTEN_KEYS, where)
    unix = _opt(t, "unix", str, f"{where}.unix")
    tcp = t.get("tcp")
    if (unix is None) == (tcp is None):
        raise _Bad(where, "give exactly one of unix = PATH or tcp = \"HOST:PORT\"")
    if unix is not None:
        mode = _mode(t["mode"], f"{where}.mode") if "mode" in t else DEFAULT_SOCKET_MODE
        group = _group(t["group"], f"{where}.group") if "group" in t else None
        return Listener(unix=_path(unix, base, f"{where}.unix"), mode=mode, group=group)
    for key in ("mode", "group"):
        if key in t:
            raise _Bad(f"{where}.{key}", "only applies to a unix listener")
    host, port = _tcp(tcp, f"{where}.tcp")
    return Listener(tcp_host=host, tcp_port=port)


def _tls(t: dict[str, Any], base: str) -> TlsConfig:
    _check_keys(t, _TLS_KEYS, "tls")
    files: dict[str, str | None] = {}
    for name in ("cert", "key", "ca", "psk-file"):
        value = _opt(t, name, str, f"tls.{name}")
        if value is not None:
            value = _path(value, base, f"tls.{name}")
            if not os.path.isfile(value):
                raise _Bad(f"tls.{name}", f"{value}: no such file")
        files[name] = value
    cert, key, ca, psk = files["cert"], files["key"], files["ca"], files["psk-file"]
    if cert and psk:
        raise _Bad("tls", "cert and psk-file are alternatives; give one")
    if bool(cert) != bool(key):
        raise _Bad("tls", "cert and key go together")
    if ca and not cert:
        raise _Bad("tls.ca", "needs cert and key")
    mode = _opt(t, "mode", str, "tls.mode")
    if mode is None:
        mode = "require" if (cert or psk) else "off"
    if mode not in TLS_MODES:
        raise _Bad("tls.mode", f"{mode!r} is not one of {', '.join(TLS_MODES)}")
    if mode != "off" and not (cert or psk):
        raise _Bad("tls.mode", f"{mode!r} needs cert and key, or psk-file")
    unix = _opt(t, "unix", bool, "tls.unix") or False
    authz = t.get("authz", [])
    if not isinstance(authz, list) or not all(isinstance(a, str) and a for a in authz):
        raise _Bad("tls.authz", "a list of distinguished names (strings)")
    if authz and not ca:
        raise _Bad("tls.authz", "checks client certificates: needs ca (and cert, key)")
    return TlsConfig(mode=mode, cert=cert, key=key, ca=ca, psk_file=psk, unix=unix,
                     authz=tuple(authz))


def _session(t: dict[str, Any], base: str) -> dict[str, Any]:
    """``[session]``: ``fleece-start`` defaults, sizes as ints, checked in full."""
    _check_keys(t, _SESSION_KEYS, "session")
    out: dict[str, Any] = {}
    for key in _SIZE_KEYS:
        if key in t:
            out[key] = _size(t[key], f"session.{key}")
    if "temp-dir" in t:
        out["temp-dir"] = _path(_opt(t, "temp-dir", str, "session.temp-dir") or "", base,
                                "session.temp-dir")
    if "on-cbw-error" in t:
        out["on-cbw-error"] = _opt(t, "on-cbw-error", str, "session.on-cbw-error")
    if "cbw-timeout" in t:
        out["cbw-timeout"] = _opt_number(t, "cbw-timeout", "session.cbw-timeout")
    try:
        session_options_from_args({"name": "fleece", **out})
    except CommandError as exc:
        # The messages name the fleece-start parameter, which is the key here.
        raise _Bad("session", exc.desc) from None
    return out


def _disk(t: dict[str, Any], base: str, where: str) -> DiskSpec:
    """``[[disk]]``: ``source`` (an image path, an NBD URI, ``rbd:...``; a
    relative path is the file's directory's), or its older name ``path``,
    and maybe ``format``."""
    _check_keys(t, _DISK_KEYS, where)
    key = "source" if "source" in t else "path"
    if "source" in t and "path" in t:
        raise _Bad(where, "give source or path (its older name), not both")
    raw = _opt(t, key, str, f"{where}.{key}")
    if not raw:
        raise _Bad(f"{where}.source", "missing (every [[disk]] needs source = IMAGE, "
                                      "an NBD URI or rbd:POOL/IMAGE)")
    fmt = _opt(t, "format", str, f"{where}.format")
    if fmt is not None and fmt not in FORMATS:
        raise _Bad(f"{where}.format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    read_only = _opt(t, "read-only", bool, f"{where}.read-only") or False
    if "://" not in raw and not raw.startswith("rbd:"):
        raw = _path(raw, base, f"{where}.{key}")
    try:
        src = parse_source(raw, fmt)
    except SourceError as exc:
        raise _Bad(f"{where}.{key}", str(exc)) from None
    if src.path is not None:
        path = src.path
        if not os.path.exists(path):
            raise _Bad(f"{where}.{key}", f"{path}: no such file or device")
        if os.path.isdir(path):
            raise _Bad(f"{where}.{key}", f"{path}: is a directory, not an image")
        if not os.access(path, os.R_OK if read_only else os.R_OK | os.W_OK):
            raise _Bad(f"{where}.{key}", f"{path}: permission denied"
                       + ("" if read_only else " (read-write)"))
    name = _opt(t, "name", str, f"{where}.name")
    if name is None:
        name = src.default_name()
    if not name or "\0" in name or len(name.encode()) > _MAX_NAME:
        raise _Bad(f"{where}.name", f"invalid disk name {name!r}")
    discard = _opt(t, "discard", str, f"{where}.discard") or "ignore"
    if discard not in ("ignore", "unmap"):
        raise _Bad(f"{where}.discard", f"{discard!r} is not one of ignore, unmap")
    description = _opt(t, "description", str, f"{where}.description") or ""
    cache = _opt(t, "cache", str, f"{where}.cache")
    if cache is not None and cache not in CACHE_MODES:
        raise _Bad(f"{where}.cache", f"{cache!r} is not one of {', '.join(CACHE_MODES)}")
    bitmaps = t.get("bitmaps", [])
    if not isinstance(bitmaps, list) or not all(isinstance(b, str) and b for b in bitmaps):
        raise _Bad(f"{where}.bitmaps", "a list of bitmap names (strings)")
    return DiskSpec(source=raw, name=name, read_only=read_only, discard=discard,
                    description=description, format=fmt, cache=cache,
                    bitmaps=tuple(bitmaps))


def _same_source(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether A and B are one image: one file, or one block device."""
    if stat.S_ISBLK(a.st_mode) and stat.S_ISBLK(b.st_mode):
        return a.st_rdev == b.st_rdev
    return os.path.samestat(a, b)


# -- values ------------------------------------------------------------------------

_TYPE_NAMES: Final = {str: "a string", int: "an integer", bool: "a boolean (true/false)",
                      dict: "a table", list: "an array"}


def _type_name(value: object) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a float"),
                       (str, "a string"), (dict, "a table"), (list, "an array")):
        if isinstance(value, kind):
            return name
    return f"a {type(value).__name__}"  # TOML dates and times


def _opt(t: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """``t[key]`` when present and of KIND (a bool is not an int), else ``None``."""
    if key not in t:
        return None
    value = t[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Bad(where, f"must be {_TYPE_NAMES[kind]}, not {_type_name(value)}")
    return value


def _opt_number(t: dict[str, Any], key: str, where: str) -> float | None:
    if key not in t:
        return None
    value = t[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(where, f"must be a number of seconds, not {_type_name(value)}")
    if value != value or value in (float("inf"), float("-inf")):
        raise _Bad(where, "must be a finite number")
    return float(value)


def _check_keys(t: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    for key in t:
        if key not in allowed:
            name = f"{where}.{key}" if where else key
            raise _Bad("", f"unknown key {name!r} (expected one of: "
                           f"{', '.join(sorted(allowed))})")


def _table(doc: dict[str, Any], key: str) -> dict[str, Any]:
    """``[key]``, a single table (empty when absent)."""
    value = doc.get(key, {})
    if not isinstance(value, dict):
        hint = f" (write [{key}], not [[{key}]])" if isinstance(value, list) else ""
        raise _Bad(key, f"must be a table, not {_type_name(value)}{hint}")
    return value


def _tables(doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """``[[key]]``, an array of tables (empty when absent)."""
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise _Bad(key, f"must be an array of tables ([[{key}]]), not {_type_name(value)}")
    for i, item in enumerate(value, 1):
        if not isinstance(item, dict):
            raise _Bad(f"{key}[{i}]", f"must be a table, not {_type_name(item)}")
    return value


def _path(value: str, base: str, where: str) -> str:
    if not value or "\0" in value:
        raise _Bad(where, "must be a non-empty path")
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _size(value: object, where: str) -> int:
    """``"64K"``-style strings (:func:`parse_size`) or plain byte counts."""
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise _Bad(where, str(exc)) from None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _Bad(where, "must not be negative")
        return parse_size(str(value))  # the same upper bound as strings
    raise _Bad(where, f"must be a size (\"64K\" or a byte count), not {_type_name(value)}")


def _mode(value: object, where: str) -> int:
    """Permission bits: an octal string (``"0660"``) or a TOML integer (``0o660``)."""
    if isinstance(value, str):
        try:
            return parse_mode(value)
        except ValueError as exc:
            raise _Bad(where, str(exc)) from None
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= 0o777:
            raise _Bad(where, f"{value} is out of range (write \"0660\" or 0o660, "
                              "not the decimal 660)")
        return value
    raise _Bad(where, f"must be an octal string like \"0660\", not {_type_name(value)}")


def _group(value: object, where: str) -> str:
    """A group name or gid, checked now so a typo fails with the key named."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _Bad(where, "a gid must not be negative")
        return str(value)
    if not isinstance(value, str) or not value:
        raise _Bad(where, f"must be a group name or gid, not {_type_name(value)}")
    try:
        group_id(value)
    except KeyError:
        raise _Bad(where, f"no group named {value!r}") from None
    return value


def _tcp(value: object, where: str) -> tuple[str | None, int]:
    """``"HOST:PORT"``, ``"[V6]:PORT"``, ``":PORT"``/``"*:PORT"`` (every address),
    or a bare port number (every address)."""
    if isinstance(value, int) and not isinstance(value, bool):
        host, port_text = None, str(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\[([0-9A-Fa-f:.%a-zA-Z]+)\]:(\d+)|([^:\[\]]*):(\d+)", value)
        if not m:
            raise _Bad(where, f"{value!r} is not \"HOST:PORT\" or \"[IPV6]:PORT\"")
        host = m.group(1) if m.group(1) is not None else m.group(3)
        port_text = m.group(2) if m.group(2) is not None else m.group(4)
        if host in ("", "*"):
            host = None
    else:
        raise _Bad(where, f"must be \"HOST:PORT\" or a port number, not {_type_name(value)}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise _Bad(where, f"port {port} is out of range 1..65535")
    return host, port
