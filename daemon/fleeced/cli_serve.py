"""``fleeced serve``: build the daemon configuration and run it.

Handles ``--fork`` (the parent returns only once the child listens and the pid
file exists) and chooses uvloop when it imports.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import stat
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from fleeced import sources, systemd
from fleeced.daemon import Daemon
from fleeced.daemon_config import (
    DaemonConfig,
    DiskSpec,
    Listener,
    SessionOptions,
    session_option_args,
    session_options_from_args,
)
from fleeced.errors import CliError, CommandError
from fleeced.paths import (
    DEFAULT_SOCKET_MODE,
    default_control,
    default_state_dir,
    ensure_private_dir,
)
from fleeced.tls import TlsConfig

log = logging.getLogger(__name__)

DEFAULT_PORT = 10809
#: Largest file ``--pid-file`` may replace: a pid and a newline, with room.
PID_FILE_MAX = 32


def build_config(args: argparse.Namespace) -> DaemonConfig:
    """Turn ``serve`` arguments into a :class:`DaemonConfig`.

    Unless ``--no-control``, the control socket is required: a daemon that
    cannot bind it (say, a second one on the same path) fails at start-up
    rather than running unmanageable.  The default per-user control directory
    is created 0700, or refused when it is not private.

    :raise CliError: when images are missing, unusable or names collide, the
        default control directory is unsafe, or ``--pid-file`` names anything
        but a regular file.
    """
    if args.config is not None:
        from fleeced.config_file import load_config

        config = load_config(args.config)
        if args.pid_file:
            _check_pid_file(args.pid_file, [d.source for d in config.disks
                                            if os.path.exists(d.source)])
            config.pid_file = args.pid_file
        return config
    disks = []
    seen: set[str] = set()
    for text in args.images:
        try:
            src = sources.parse(text, args.format)
        except sources.SourceError as exc:
            raise CliError(str(exc)) from None
        if src.path is not None:
            check_image_path(src.path, args.read_only)
        name = args.export_name if args.export_name is not None else src.default_name()
        if name in seen:
            raise CliError(f"two sources would both be exported as {name!r}")
        seen.add(name)
        disks.append(DiskSpec(source=text, name=name, read_only=args.read_only,
                              discard=args.discard, description=args.description,
                              format=args.format,
                              cache=args.cache if isinstance(args.cache, str) else None,
                              bitmaps=tuple(args.bitmap)))
    fleece = []
    if args.fleece is not None:
        for d in disks:
            fleece.append((d.name, _session_options(args, args.fleece)))
    listeners = []
    if args.socket:
        listeners.append(Listener(unix=args.socket, group=args.socket_group,
                                  mode=DEFAULT_SOCKET_MODE if args.socket_mode is None
                                  else args.socket_mode))
    if args.port is not None or args.bind or (not args.socket and "LISTEN_FDS" not in os.environ):
        port = args.port if args.port is not None else DEFAULT_PORT
        listeners.append(Listener(tcp_host=args.bind, tcp_port=port))
    control: str | None = None
    if args.control:
        control = args.control  # the user's choice, wherever it is
    elif not args.no_control:
        control, private = default_control()
        if private is not None:
            ensure_private_dir(private)
    if args.pid_file:
        _check_pid_file(args.pid_file, [d.source for d in disks if os.path.exists(d.source)])
    return DaemonConfig(
        disks=disks,
        listeners=listeners,
        shared=args.shared,
        persistent=args.persistent,
        control_path=control,
        control_required=control is not None,
        fleece=fleece,
        pid_file=args.pid_file,
        threads=args.threads,
        shutdown_timeout=args.shutdown_timeout,
        handshake_limit=args.handshake_limit,
        data_plane=args.data_plane,
        state_dir=_state_dir(args),
        session_defaults=_session_option_args_of(args),
        tls=_tls_config(args),
        metrics=args.metrics,
    )


def check_image_path(path: str, read_only: bool) -> None:
    """Refuse, at start, an image path that cannot be opened as asked.

    :raise CliError: missing, a directory, or no permission.
    """
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file or device")
    if os.path.isdir(path):
        raise CliError(f"{path}: is a directory, not an image")
    mode = os.R_OK if read_only else os.R_OK | os.W_OK
    if not os.access(path, mode):
        raise CliError(f"{path}: permission denied")


def _state_dir(args: argparse.Namespace) -> str | None:
    """``--state-dir``, else the default one for the daemon on the default
    control socket (``/var/lib/fleeced`` as root, else
    ``$XDG_STATE_HOME/fleeced``), else none.

    Only one daemon can own the default control socket, so only that one
    gets the default state dir: other lab daemons (``--control PATH``,
    ``$FLEECED_CONTROL``, ``--no-control``) keep no state unless asked, and
    never fight over one directory's lock.
    """
    if args.state_dir is not None:
        return str(args.state_dir)
    if args.control or args.no_control or os.environ.get("FLEECED_CONTROL"):
        return None
    return default_state_dir()


def _tls_config(args: argparse.Namespace) -> TlsConfig:
    mode = args.tls
    if mode is None:
        mode = "require" if (args.tls_cert or args.tls_psk) else "off"
    # As qemu-nbd: credentials given with -k apply to that Unix socket.
    return TlsConfig(mode=mode, cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca,
                     psk_file=args.tls_psk, unix=bool(args.socket),
                     authz=tuple(args.tls_authz))


def _session_option_args_of(args: argparse.Namespace) -> dict[str, Any]:
    return session_option_args(args)


def _check_pid_file(path: str, images: list[str]) -> None:
    """Refuse a ``--pid-file`` that writing the pid would damage.

    Only a regular file (possibly through a symlink) that holds a pid, or
    nothing, may be replaced: anything else there is somebody's data (a
    served image would be truncated to six bytes and deleted at exit).  A
    directory, FIFO (the open would block), socket or device is refused, and
    so is a dangling symlink (the write would create its target) and one of
    the images being served.  Disks restored from the state directory are
    checked once they are open (:meth:`fleeced.core.DaemonCore.start`).

    :raise CliError: when PATH is unusable.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise CliError(f"--pid-file {path}: a dangling symlink; refusing to write "
                           "through it") from None
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise CliError(f"--pid-file {path}: directory {parent} does not exist") from None
        return
    except OSError as exc:
        raise CliError(f"--pid-file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CliError(f"--pid-file {path}: is a {_file_kind(st.st_mode)}, not a regular "
                       "file; refusing to replace it")
    for image in images:
        if os.path.samestat(st, os.stat(image)):
            raise CliError(f"--pid-file {path}: is the image {image}")
    if not _holds_a_pid(path, st):
        raise CliError(f"--pid-file {path}: holds something other than a pid "
                       f"({st.st_size} bytes); refusing to replace it")


def _holds_a_pid(path: str, st: os.stat_result) -> bool:
    """Whether the regular file PATH is empty or holds one decimal number."""
    if st.st_size > PID_FILE_MAX:
        return False
    try:
        with open(path, "rb") as f:
            text = f.read(PID_FILE_MAX + 1)
    except OSError:
        return False
    return len(text) <= PID_FILE_MAX and (not text.strip() or text.strip().isdigit())


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _session_options(args: argparse.Namespace, name: str) -> SessionOptions:
    try:
        return session_options_from_args({"name": name, **session_option_args(args)})
    except CommandError as exc:
        raise CliError(exc.desc) from None


def _loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run

    def run(main: Coroutine[Any, Any, int]) -> int:
        # What uvloop.run does on Python 3.11+, spelled out: uvloop.run came
        # in uvloop 0.18 and Debian 12 ships 0.17.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)

    return run


async def _amain(config: DaemonConfig, ready_fd: int | None) -> int:
    daemon = Daemon(config)
    try:
        await daemon.start(systemd.listen_fds())
    except (OSError, ValueError, CommandError) as exc:
        msg = exc.desc if isinstance(exc, CommandError) else _oserror_text(exc)
        raise CliError(msg) from None
    if ready_fd is not None:
        # Like qemu-nbd --fork: detach from the caller's stdio once ready so
        # a caller waiting for EOF on our output does not hang.
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    await daemon.run_until_stopped()
    return 0


def _oserror_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror if not exc.args[1:] else str(exc.args[1])
    return str(exc)


def serve(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground (or fork once listening).

    :return: exit code (0 after an orderly shutdown).
    :raise CliError: on configuration or startup failures.
    """
    config = build_config(args)
    run = _loop_runner()
    if not args.fork:
        return run(_amain(config, None))
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        ok = os.read(rfd, 1)
        os.close(rfd)
        if ok == b"1":
            return 0
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) or 1
    os.close(rfd)
    os.setsid()
    try:
        code = run(_amain(config, wfd))
    except Exception as exc:
        print(f"fleeced: {str(exc) or type(exc).__name__}", file=sys.stderr)
        code = 1
    os._exit(code)
