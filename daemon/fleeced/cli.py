"""The ``fleeced`` command line: ``serve`` runs the daemon, the rest talk to it.

``main(argv) -> int`` is testable without a subprocess (aiosmtpd style).  Each
command runs one event loop; ``serve`` uses uvloop when it imports.  Errors
are one line on stderr and a non-zero exit; tracebacks only with ``--debug``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from fleeced import __version__
from fleeced.daemon_config import session_option_args as _session_option_args
from fleeced.errors import CliError
from fleeced.paths import (
    check_private_dir,
    default_control,
    default_control_path,
    ensure_private_dir,
    group_id,
    parse_mode,
)
from fleeced.sources import FORMATS

__all__ = ["CliError", "build_parser", "human_bytes", "check_private_dir", "default_control",
           "default_control_path", "ensure_private_dir", "main", "parse_args"]

log = logging.getLogger("fleeced")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _size(text: str) -> int:
    from fleeced.control.args import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cache(text: str) -> int | str:
    """``--cache``: a cache mode of the sources, or the CBW cache's size."""
    from fleeced.daemon_config import CACHE_MODES

    if text in CACHE_MODES:
        return text
    if text in ("writethrough", "directsync", "unsafe"):
        raise argparse.ArgumentTypeError(f"cache mode {text!r} is not offered "
                                         f"(modes: {', '.join(CACHE_MODES)}; or a SIZE)")
    return _size(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _mode(text: str) -> int:
    try:
        return parse_mode(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _metrics_address(text: str) -> tuple[str | None, int]:
    from fleeced.metrics import parse_address

    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _session_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster-size", type=_size, metavar="SIZE",
                   help="CBW cluster size, power of two 4K..16M (default 64K)")
    p.add_argument("--temp-dir", metavar="DIR", help="directory for the temp store")
    p.add_argument("--cache", type=_cache, metavar="none|writeback|SIZE",
                   help="none: the sources bypass the host page cache (O_DIRECT, "
                        "qemu-nbd's --cache=none); writeback: they do not (default, "
                        "unless an attached VM's node bypasses it); a SIZE: the "
                        "sessions' in-memory CBW cache (default none)")
    p.add_argument("--max-temp", type=_size, metavar="SIZE",
                   help="temp-file byte limit (default unlimited)")
    p.add_argument("--on-cbw-error", choices=("break-snapshot", "break-guest-write"),
                   help="what a failed copy-before-write breaks (default break-snapshot)")
    p.add_argument("--cbw-timeout", type=_seconds, metavar="SECONDS",
                   help="copy-before-write timeout (default 45)")


def build_parser() -> argparse.ArgumentParser:
    """The whole argparse tree (also what the man pages are generated from)."""
    parser = argparse.ArgumentParser(
        prog="fleeced", description="NBD server with fleecing (copy-before-write) snapshots."
    )
    parser.add_argument("--version", action="version", version=f"fleeced {__version__}")
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="serve disks over NBD (the daemon)")
    s.add_argument("images", nargs="*", metavar="SOURCE",
                   help="an image file or block device, an NBD URI (nbd+unix:///EXPORT?"
                        "socket=PATH, nbd://HOST:PORT/EXPORT) or rbd:POOL/IMAGE; none: "
                        "a daemon for disks added later")
    s.add_argument("-f", "--format", choices=FORMATS, metavar="FMT",
                   help="the sources' format (default: probed, as qemu-nbd; raw "
                        f"forces raw bytes): {', '.join(FORMATS)}")
    s.add_argument("--config", metavar="FILE",
                   help="service mode: listeners, disks and defaults from a TOML file "
                        "(no IMAGE arguments or listener options then)")
    s.add_argument("--state-dir", metavar="DIR",
                   help="keep runtime state here (disks added at run time, VM "
                        "attachments, sessions) so a restart comes back serving them")
    s.add_argument("-k", "--socket", metavar="PATH", help="listen on a Unix socket")
    s.add_argument("--socket-mode", type=_mode, metavar="MODE",
                   help="permission bits of the --socket file, octal (default 0660, "
                        "whatever the umask)")
    s.add_argument("--socket-group", metavar="GROUP",
                   help="group of the --socket file (a name or gid), e.g. the group "
                        "QEMU runs in")
    s.add_argument("-p", "--port", type=int, metavar="N", help="TCP port (default 10809)")
    s.add_argument("-b", "--bind", metavar="ADDR", help="TCP address (default 0.0.0.0)")
    s.add_argument("-x", "--export-name", metavar="NAME", help="export name (one source)")
    s.add_argument("-r", "--read-only", action="store_true", help="refuse writes")
    s.add_argument("-e", "--shared", type=int, default=0, metavar="N",
                   help="at most N concurrent clients (default unlimited)")
    s.add_argument("-t", "--persistent", action="store_true",
                   help="keep serving after the last client disconnects")
    s.add_argument("-D", "--description", metavar="TEXT", default="",
                   help="export description")
    s.add_argument("--fork", action="store_true",
                   help="run in the background once listening")
    s.add_argument("--pid-file", metavar="FILE", help="write the daemon's pid here")
    s.add_argument("--discard", choices=("ignore", "unmap"), default="ignore",
                   help="what TRIM does on the image (default ignore)")
    s.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    s.add_argument("--log-level", metavar="LEVEL",
                   choices=("debug", "info", "warning", "error", "critical"))
    s.add_argument("--control", metavar="PATH",
                   help="control socket (default $FLEECED_CONTROL, else "
                        "$XDG_RUNTIME_DIR/fleeced/control.sock in a private 0700 "
                        "directory); failing to bind it is an error")
    s.add_argument("--no-control", action="store_true", help="no control socket")
    s.add_argument("--fleece", nargs="?", const="fleece", metavar="NAME",
                   help="start a fleecing session on every image before serving")
    s.add_argument("--threads", type=int, default=0, metavar="N",
                   help="native I/O worker threads, 1..64 (default 8)")
    s.add_argument("--shutdown-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="time clients get to finish at shutdown and fleece-stop "
                        "before they are dropped (default 5)")
    s.add_argument("--handshake-limit", type=float, default=10.0, metavar="SECONDS",
                   help="time a client has to finish the NBD handshake (default 10)")
    s.add_argument("--metrics", type=_metrics_address, metavar="ADDR:PORT",
                   help="serve Prometheus metrics at http://ADDR:PORT/metrics "
                        "([IPV6]:PORT; :PORT for every IPv4 address; default off)")
    s.add_argument("--data-plane", choices=("native", "loop"), default="native",
                   help="run plain connections' requests in C threads (native, the "
                        "default) or on the event loop (loop: for comparison)")
    s.add_argument("--tls", choices=("off", "on", "require"), default=None,
                   help="TLS on TCP and the -k socket: off, offered (on) or required "
                        "(default: require when credentials are given, else off)")
    s.add_argument("--tls-cert", metavar="FILE", help="x509 server certificate (PEM)")
    s.add_argument("--tls-key", metavar="FILE", help="x509 server private key (PEM)")
    s.add_argument("--tls-ca", metavar="FILE",
                   help="CA certificate(s); clients must present a certificate it signed")
    s.add_argument("--tls-psk", metavar="FILE", help="PSK file in psktool format")
    s.add_argument("--tls-authz", action="append", default=[], metavar="DN",
                   help="allow only clients whose certificate subject is DN (RFC 4514, "
                        "e.g. CN=backup,O=Example); repeatable")
    s.add_argument("-A", "--allocation-depth", action="store_true",
                   help="accepted for qemu-nbd compatibility: qemu:allocation-depth is "
                        "always offered")
    s.add_argument("-B", "--bitmap", action="append", default=[], metavar="NAME",
                   help="the persistent dirty bitmap NAME of the disk must exist; it is "
                        "served as qemu:dirty-bitmap:NAME (repeatable)")
    _session_options(s)

    f = sub.add_parser("fleece", help="manage fleecing sessions")
    fsub = f.add_subparsers(dest="fleece_command", metavar="ACTION")
    fs = fsub.add_parser("start", help="start a fleecing session")
    fs.add_argument("disk")
    fs.add_argument("--name", default="fleece")
    fs.add_argument("--export", metavar="NAME", help="snapshot export name")
    fs.add_argument("--bitmap", metavar="OFF:LEN[,OFF:LEN...]",
                    help="scope: preserve only these byte ranges")
    fs.add_argument("--read-only", action="store_true",
                    help="advertise the snapshot READ_ONLY (no discard)")
    fs.add_argument("--checkpoint", metavar="NEW",
                    help="also create dirty bitmap NEW, recording from the snapshot on")
    fs.add_argument("--since", metavar="OLD",
                    help="incremental: preserve and export only what bitmap OLD marks "
                         "dirty (frozen at the snapshot; OLD stops recording)")
    fs.add_argument("--json", action="store_true")
    _control_option(fs)
    _session_options(fs)
    fst = fsub.add_parser("stop", help="stop a fleecing session")
    fst.add_argument("disk")
    fst.add_argument("name", nargs="?", default="fleece")
    _control_option(fst)
    fl = fsub.add_parser("list", help="list fleecing sessions")
    fl.add_argument("--json", action="store_true")
    fl.add_argument("--watch", action="store_true",
                    help="show each session's backup progress live until none is left")
    _control_option(fl)

    a = sub.add_parser("attach", help="redirect a running VM's disk through the daemon")
    a.add_argument("disk", nargs="?",
                   help="the served raw image the VM uses, or a new disk name for any other "
                        "node (qcow2, rbd...: QEMU then copies before write for its sessions)")
    a.add_argument("--qmp", metavar="PATH", help="the VM's QMP unix socket")
    _libvirt_options(a)
    a.add_argument("--device", metavar="ID",
                   help="qdev id or QOM path of the disk device (with --libvirt: the "
                        "disk's target, vda)")
    a.add_argument("--method", choices=("auto", "qom-set", "reopen", "cbw"), default=None,
                   help="how (default auto: a served raw image by qom-set, else reopen; "
                        "any other node by cbw)")
    a.add_argument("--reconnect-delay", type=int, metavar="SECONDS",
                   help="how long QEMU holds guest I/O while the daemon restarts (default 30)")
    a.add_argument("--freeze", action="store_true",
                   help="freeze guest filesystems (guest agent) around the switch and "
                        "start the fleecing session while frozen")
    a.add_argument("--qga", metavar="PATH", help="the guest agent's unix socket (--freeze)")
    a.add_argument("--name", default=None, help="session name with --freeze (default fleece)")
    a.add_argument("--list", action="store_true", help="list attached disks")
    a.add_argument("--json", action="store_true")
    _control_option(a)
    de = sub.add_parser("detach", help="switch a VM's disk back to its own node")
    de.add_argument("disk")
    de.add_argument("--force", action="store_true",
                    help="also stop the disk's fleecing sessions; forget the attachment "
                         "of a VM whose QMP socket is gone")
    _control_option(de)

    bw = sub.add_parser(
        "backup-window",
        help="attach, fleece start, run COMMAND, fleece stop, detach (cleanup on failure)")
    bw.add_argument("disk")
    bw.add_argument("--qmp", metavar="PATH")
    _libvirt_options(bw)
    bw.add_argument("--device", metavar="ID", required=True)
    bw.add_argument("--method", choices=("auto", "qom-set", "reopen", "cbw"), default=None)
    bw.add_argument("--reconnect-delay", type=int, metavar="SECONDS")
    bw.add_argument("--freeze", action="store_true")
    bw.add_argument("--qga", metavar="PATH")
    bw.add_argument("--name", default="fleece", help="session name (default fleece)")
    bw.add_argument("argv", nargs="*", metavar="-- COMMAND",
                    help="run with FLEECED_URI/FLEECED_EXPORT/FLEECED_SOCKET set; "
                         "the words {uri} and {export} are replaced")
    _control_option(bw)
    _session_options(bw)

    dk = sub.add_parser("disk", help="add or remove served disks at run time")
    dksub = dk.add_subparsers(dest="disk_command", metavar="ACTION")
    dka = dksub.add_parser("add", help="serve another disk")
    dka.add_argument("name")
    dka.add_argument("path", metavar="SOURCE",
                     help="an image file or block device, an NBD URI or rbd:POOL/IMAGE")
    dka.add_argument("-f", "--format", choices=FORMATS, metavar="FMT",
                     help=f"its format (default: probed): {', '.join(FORMATS)}")
    dka.add_argument("--read-only", action="store_true")
    dka.add_argument("--discard", choices=("ignore", "unmap"))
    dka.add_argument("--cache", choices=("none", "writeback"),
                     help="none: bypass the host page cache (O_DIRECT)")
    dka.add_argument("--description", metavar="TEXT")
    _control_option(dka)
    dkr = dksub.add_parser("remove", help="stop serving a disk")
    dkr.add_argument("name")
    _control_option(dkr)

    bm = sub.add_parser("bitmap", help="dirty bitmaps for incremental backups")
    bmsub = bm.add_subparsers(dest="bitmap_command", metavar="ACTION")
    bma = bmsub.add_parser("add", help="a new dirty bitmap, recording from now")
    bma.add_argument("disk")
    bma.add_argument("name")
    bma.add_argument("--granularity", type=_size, metavar="SIZE",
                     help="bytes per bit, a power of two (default 64K)")
    bma.add_argument("--transient", action="store_true",
                     help="keep it in memory only (gone at restart)")
    bma.add_argument("--disabled", action="store_true", help="do not record yet")
    _control_option(bma)
    for action, text in (("remove", "delete a bitmap"), ("clear", "mark every cluster clean"),
                         ("enable", "start recording"), ("disable", "stop recording")):
        bp = bmsub.add_parser(action, help=text)
        bp.add_argument("disk")
        bp.add_argument("name")
        _control_option(bp)
    bmm = bmsub.add_parser("merge", help="TARGET |= SOURCE... (same granularity)")
    bmm.add_argument("disk")
    bmm.add_argument("target")
    bmm.add_argument("sources", nargs="+", metavar="SOURCE")
    _control_option(bmm)
    bml = bmsub.add_parser("list", help="bitmaps with their dirty bytes")
    bml.add_argument("disk", nargs="?")
    bml.add_argument("--json", action="store_true")
    _control_option(bml)

    st = sub.add_parser("status", help="disks, exports and connection counts")
    _control_option(st)
    st.add_argument("--json", action="store_true")

    d = sub.add_parser("demo", help="a fleecing backup end to end on a sample image")
    d.add_argument("--dir", metavar="DIR", help="work directory (default: a temp dir)")
    d.add_argument("--size", type=_size, default=256 << 20, metavar="SIZE")
    return parser


def _libvirt_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--libvirt", metavar="DOMAIN",
                   help="a libvirt domain instead of --qmp: QMP goes through libvirt's "
                        "monitor passthrough (libvirt marks the domain tainted)")
    p.add_argument("--libvirt-uri", metavar="URI",
                   help="libvirt connection URI (default qemu:///system)")


def _control_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", metavar="PATH",
                   help="daemon control socket (default $FLEECED_CONTROL, then the "
                        "per-user runtime path)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and cross-check arguments; usage errors exit 2 via ``parser.error``."""
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "backup-window" in words and "--" in words[words.index("backup-window"):]:
        # Everything after "--" is the backup command, options included
        # (argparse's REMAINDER would also swallow our own options).
        cut = words.index("--", words.index("backup-window"))
        words, command = words[:cut], words[cut + 1:]
    args = parser.parse_args(words)
    if args.command == "backup-window":
        args.argv = args.argv + command
    if args.command is None:
        parser.error("a command is required (serve, fleece, status, attach, detach, "
                     "backup-window, disk, demo)")
    if args.command == "serve":
        if args.config is not None:
            given = [flag for flag, value in (
                ("SOURCE", args.images), ("--format", args.format),
                ("--socket", args.socket), ("--port", args.port),
                ("--socket-mode", args.socket_mode is not None),
                ("--socket-group", args.socket_group),
                ("--bind", args.bind), ("--export-name", args.export_name),
                ("--read-only", args.read_only), ("--shared", args.shared),
                ("--persistent", args.persistent), ("--description", args.description),
                ("--control", args.control), ("--no-control", args.no_control),
                ("--fleece", args.fleece), ("--state-dir", args.state_dir),
                ("--threads", args.threads), ("--tls", args.tls),
                ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                ("--tls-ca", args.tls_ca), ("--tls-psk", args.tls_psk),
                ("--tls-authz", args.tls_authz), ("--bitmap", args.bitmap),
                ("--discard", args.discard != "ignore"),
                ("--cluster-size", args.cluster_size), ("--temp-dir", args.temp_dir),
                ("--cache", args.cache), ("--max-temp", args.max_temp),
                ("--on-cbw-error", args.on_cbw_error), ("--cbw-timeout", args.cbw_timeout),
                ("--shutdown-timeout", args.shutdown_timeout != 5.0),
                ("--handshake-limit", args.handshake_limit != 10.0),
                ("--data-plane", args.data_plane != "native"),
                ("--metrics", args.metrics),
            ) if value]
            if given:
                parser.error(f"--config cannot be combined with {', '.join(given)} "
                             "(set them in the configuration file)")
        elif args.fleece is not None and not args.images:
            parser.error("--fleece needs at least one SOURCE to fleece")
        if args.tls_cert and args.tls_psk:
            parser.error("--tls-cert and --tls-psk are alternatives; give one")
        if bool(args.tls_cert) != bool(args.tls_key):
            parser.error("--tls-cert and --tls-key go together")
        if args.tls_ca and not args.tls_cert:
            parser.error("--tls-ca needs --tls-cert/--tls-key")
        if args.tls in ("on", "require") and not (args.tls_cert or args.tls_psk):
            parser.error(f"--tls={args.tls} needs --tls-cert/--tls-key or --tls-psk")
        if args.tls_authz and not args.tls_ca:
            parser.error("--tls-authz checks client certificates: it needs --tls-ca "
                         "(with --tls-cert/--tls-key); a --tls-psk file already lists "
                         "the identities allowed")
        if args.bitmap and not args.images:
            parser.error("--bitmap needs a SOURCE whose bitmap to serve")
        if args.socket and (args.port is not None or args.bind):
            parser.error("--socket cannot be combined with --port/--bind")
        if (args.socket_mode is not None or args.socket_group) and not args.socket \
                and args.config is None:
            parser.error("--socket-mode and --socket-group need --socket PATH")
        if args.socket_group:
            try:
                group_id(args.socket_group)
            except KeyError:
                parser.error(f"--socket-group: no group named {args.socket_group!r}")
        if args.export_name is not None and len(args.images) != 1:
            parser.error("--export-name needs exactly one SOURCE")
        if args.port is not None and not 0 <= args.port <= 65535:
            parser.error(f"--port {args.port} is out of range")
        if not 0 <= args.threads <= 64:
            parser.error("--threads must be between 1 and 64")
        if args.shared < 0:
            parser.error("--shared must not be negative")
        for flag, value in (("--shutdown-timeout", args.shutdown_timeout),
                            ("--handshake-limit", args.handshake_limit)):
            if not 0 < value <= 3600:  # also refuses NaN
                parser.error(f"{flag} must be between 0 and 3600 seconds")
        if args.fleece is not None and args.read_only:
            parser.error("--fleece needs a writable image (drop --read-only)")
    if args.command == "fleece" and args.fleece_command is None:
        parser.error("fleece needs an action: start, stop or list")
    if args.command == "fleece" and getattr(args, "watch", False) and args.json:
        parser.error("--watch shows progress bars or lines, not JSON (use --json alone)")
    if args.command == "bitmap" and args.bitmap_command is None:
        parser.error("bitmap needs an action: add, remove, clear, enable, disable, merge "
                     "or list")
    if args.command == "fleece" and getattr(args, "since", None) and not args.checkpoint:
        parser.error("--since needs --checkpoint NEW")
    if args.command == "disk" and args.disk_command is None:
        parser.error("disk needs an action: add or remove")
    if args.command == "attach":
        if args.list:
            if args.disk or args.qmp or args.libvirt or args.device:
                parser.error("attach --list takes no DISK, --qmp, --libvirt or --device")
        elif not (args.disk and (args.qmp or args.libvirt) and args.device):
            parser.error("attach needs DISK, --qmp PATH (or --libvirt DOMAIN) and "
                         "--device ID (or --list)")
    if (args.command in ("fleece", "backup-window")
            and isinstance(getattr(args, "cache", None), str)):
        parser.error("--cache none|writeback is a disk's cache mode (serve, disk add); "
                     "a session's --cache is a SIZE")
    if args.command in ("attach", "backup-window"):
        if args.qmp and args.libvirt:
            parser.error("give --qmp PATH or --libvirt DOMAIN, not both")
        if args.command == "backup-window" and not (args.qmp or args.libvirt):
            parser.error("backup-window needs --qmp PATH or --libvirt DOMAIN")
        if args.libvirt_uri and not args.libvirt:
            parser.error("--libvirt-uri is only used with --libvirt")
        if args.freeze and not args.qga:
            parser.error("--freeze needs --qga PATH (the guest agent socket)")
        if args.qga and not args.freeze:
            parser.error("--qga is only used with --freeze")
    if args.command == "backup-window":
        if not args.argv:
            parser.error("backup-window needs a COMMAND after --")
    if args.command == "backup-window" and args.freeze and any(
            v is not None for v in _session_option_args(args).values()):
        parser.error("session options cannot be combined with --freeze (the session "
                     "then uses the daemon's defaults)")
    if args.command == "attach" and args.name is not None and not args.freeze:
        parser.error("--name is only used with --freeze (attach starts no session otherwise)")
    return args


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING
    if getattr(args, "verbose", 0) == 1:
        level = logging.INFO
    elif getattr(args, "verbose", 0) >= 2:
        level = logging.DEBUG
    if getattr(args, "log_level", None):
        level = getattr(logging, args.log_level.upper())
    logging.basicConfig(
        level=level, stream=sys.stderr, format="fleeced[%(process)d]: %(levelname)s: %(message)s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fleeced`` command line.

    :return: the process exit code.
    """
    args = parse_args(argv)
    _setup_logging(args)
    try:
        if args.command == "serve":
            from fleeced.cli_serve import serve

            return serve(args)
        if args.command == "demo":
            from fleeced.demo import run_demo

            return run_demo(args.dir, args.size)
        return _run(_client_command(args, _client_control_path(args)))
    except CliError as exc:
        print(f"fleeced: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        # Some errors carry no text (a connection reset, an EOF): name them.
        print(f"fleeced: {str(exc) or type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILURE


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


# -- control client commands ---------------------------------------------------


def _client_control_path(args: argparse.Namespace) -> str:
    """The socket a client command talks to.

    :raise CliError: when the default per-user directory exists but is unsafe.
    """
    if args.control:
        return str(args.control)
    path, private = default_control()
    # Do not talk to whatever socket someone planted in our default
    # directory.  A missing directory just means no daemon: connect says so.
    if private is not None and os.path.lexists(private):
        check_private_dir(private)
    return path


async def _client_command(args: argparse.Namespace, path: str) -> int:
    from fleeced.control.client import ControlClient

    async with ControlClient.connect_to(path) as client:
        if args.command == "status":
            return await _status(client, args)
        if args.command in ("attach", "detach", "backup-window", "disk", "bitmap"):
            from fleeced.vmcli import vm_command

            return await vm_command(client, args)
        if args.fleece_command == "start":
            result = await client.execute("fleece-start", _fleece_start_args(args))
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                print(f"session {args.name} on {args.disk}: snapshot export {result['export']}")
            return EXIT_OK
        if args.fleece_command == "stop":
            await client.execute("fleece-stop", {"disk": args.disk, "name": args.name})
            print(f"session {args.name} on {args.disk} stopped")
            return EXIT_OK
        if args.watch:
            from fleeced.watch import watch_sessions

            return await watch_sessions(client)
        sessions = await client.execute("query-fleece", {})
        if args.json:
            print(json.dumps(sessions, indent=2))
        else:
            _print_sessions(sessions)
        return EXIT_OK


def _fleece_start_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"disk": args.disk, "name": args.name}
    if args.export:
        out["export"] = args.export
    if args.bitmap:
        extents = []
        for part in args.bitmap.split(","):
            try:
                off_s, len_s = part.split(":")
                from fleeced.control.args import parse_size

                extents.append({"offset": parse_size(off_s), "length": parse_size(len_s)})
            except ValueError:
                raise CliError(f"--bitmap: bad extent {part!r} (want OFFSET:LENGTH)") from None
        out["bitmap"] = extents
    if args.read_only:
        out["read-only"] = True
    if args.checkpoint:
        out["checkpoint"] = args.checkpoint
    if args.since:
        out["since"] = args.since
    out.update(_session_option_args(args))
    return out


def human_bytes(n: int) -> str:
    """N bytes in binary units, as fleece list and status show them."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _print_sessions(sessions: list[dict[str, Any]]) -> None:
    if not sessions:
        print("no fleecing sessions")
        return
    from fleeced.watch import progress_text

    print(f"{'DISK':<12} {'NAME':<10} {'STATE':<7} {'EXPORT':<24} {'COPIED':>8} "
          f"{'NEEDED':>8} {'TEMP':>10} {'CACHE':>10}  READ")
    for s in sessions:
        if "clusters" not in s:  # lost in a daemon restart: no counters left
            print(f"{s['disk']:<12} {s['name']:<10} {s['state']:<7} {s['export']:<24} "
                  f"{'-':>8} {'-':>8} {'-':>10} {'-':>10}  -")
        else:
            c = s["clusters"]
            p = s["progress"]
            print(f"{s['disk']:<12} {s['name']:<10} {s['state']:<7} {s['export']:<24} "
                  f"{c['copied']:>8} {c['needed']:>8} {human_bytes(s['temp-bytes']):>10} "
                  f"{human_bytes(s['cache-bytes']):>10}  {progress_text(p['read'], p['total'])}")
        if s.get("error"):
            print(f"  error: {s['error']}")


async def _status(client: Any, args: argparse.Namespace) -> int:
    disks = await client.execute("query-disks", {})
    exports = await client.execute("query-exports", {})
    stats = await client.execute("query-stats", {})
    if args.json:
        print(json.dumps({"disks": disks, "exports": exports, "stats": stats}, indent=2))
        return EXIT_OK
    print(f"connections: {stats['connections']}")
    for d in disks:
        ro = " (read-only)" if d["read-only"] else ""
        print(f"disk {d['name']}: {d['path']} {human_bytes(d['size'])}{ro}")
    for e in exports:
        print(f"  export {e['name']!r}: {e['type']}, {e['connections']} connection(s)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
