"""CLI commands for hypervisor hosts: ``attach``, ``detach``, ``backup-window``
and ``disk add|remove`` (thin wrappers over the control commands)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import urllib.parse
from typing import Any

from fleeced.cli import EXIT_FAILURE, EXIT_OK
from fleeced.control.client import ConnectionLost, ControlClient
from fleeced.daemon_config import session_option_args as _session_option_args
from fleeced.errors import CliError


async def vm_command(client: ControlClient, args: argparse.Namespace) -> int:
    """Run one of the VM/disk commands over the control connection CLIENT."""
    if args.command == "attach" and args.list:
        items = await client.execute("query-attachments", {})
        if args.json:
            print(json.dumps(items, indent=2))
        else:
            _print_attachments(items)
        return EXIT_OK
    if args.command == "attach":
        try:
            result = await client.execute("vm-attach", _attach_args(args))
        except ConnectionLost as exc:
            result = await _attach_outcome(client, args, exc)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            extra = f"; session export {result['export']}" if "export" in result else ""
            if result["method"] == "cbw":
                print(f"{args.disk}: device {args.device} attached (cbw: QEMU copies before "
                      f"write into fleeced during sessions){extra}")
            else:
                print(f"{args.disk}: device {args.device} now goes through fleeced "
                      f"({result['method']}){extra}")
        return EXIT_OK
    if args.command == "detach":
        detach = {"disk": args.disk, **({"force": True} if args.force else {})}
        try:
            await client.execute("vm-detach", detach)
        except ConnectionLost as exc:
            _warn(f"{exc}; reconnecting to finish the detach")
            await client.reconnect()
            await _detach_again(client, detach)
        print(f"{args.disk}: detached; the VM uses its own node again")
        return EXIT_OK
    if args.command == "bitmap":
        return await _bitmap_command(client, args)
    if args.command == "disk":
        if args.disk_command == "add":
            out = _disk_add_args(args)
            result = await client.execute("disk-add", out)
            print(f"disk {args.name}: {out['source']} ({result['size']} bytes)")
        else:
            await client.execute("disk-remove", {"name": args.name})
            print(f"disk {args.name} removed")
        return EXIT_OK
    return await _backup_window(client, args)


async def _bitmap_command(client: ControlClient, args: argparse.Namespace) -> int:
    action = args.bitmap_command
    if action == "list":
        items = await client.execute("query-bitmaps", {"disk": args.disk} if args.disk else {})
        if args.json:
            print(json.dumps(items, indent=2))
        elif not items:
            print("no dirty bitmaps")
        else:
            print(f"{'DISK':<12} {'NAME':<16} {'GRANULARITY':>11} {'DIRTY':>12} "
                  f"{'RECORDING':<9} PERSISTENT")
            for b in items:
                print(f"{b['disk']:<12} {b['name']:<16} {b['granularity']:>11} "
                      f"{b['dirty-bytes']:>12} {'yes' if b['recording'] else 'no':<9} "
                      f"{'yes' if b['persistent'] else 'no'}")
                if b.get("reason"):
                    print(f"  all dirty: {b['reason']}")
        return EXIT_OK
    if action == "add":
        out: dict[str, Any] = {"disk": args.disk, "name": args.name}
        if args.granularity is not None:
            out["granularity"] = args.granularity
        if args.transient:
            out["persistent"] = False
        if args.disabled:
            out["disabled"] = True
        await client.execute("bitmap-add", out)
        print(f"bitmap {args.name} on {args.disk} added")
        return EXIT_OK
    if action == "merge":
        await client.execute("bitmap-merge", {"disk": args.disk, "target": args.target,
                                              "sources": args.sources})
        print(f"bitmap {args.target} on {args.disk}: merged {', '.join(args.sources)}")
        return EXIT_OK
    await client.execute(f"bitmap-{action}", {"disk": args.disk, "name": args.name})
    done = {"remove": "removed", "clear": "cleared", "enable": "enabled",
            "disable": "disabled"}[action]
    print(f"bitmap {args.name} on {args.disk} {done}")
    return EXIT_OK


def _disk_add_args(args: argparse.Namespace) -> dict[str, Any]:
    # A path is made absolute here (the daemon's working directory is not
    # ours); URIs and rbd: names go as they are.
    text = args.path
    if "://" not in text and not text.startswith("rbd:"):
        text = os.path.abspath(text)
    out: dict[str, Any] = {"name": args.name, "source": text}
    if args.format:
        out["format"] = args.format
    if args.read_only:
        out["read-only"] = True
    if args.discard:
        out["discard"] = args.discard
    if args.cache:
        out["cache"] = args.cache
    if args.description is not None:
        out["description"] = args.description
    return out


def vm_target(args: argparse.Namespace) -> str:
    """The VM as the daemon names it: a QMP socket path, or
    ``libvirt:URI#DOMAIN``."""
    if args.libvirt:
        from fleeced.qmp import libvirt

        return libvirt.target(args.libvirt, args.libvirt_uri or libvirt.DEFAULT_URI)
    return os.path.abspath(str(args.qmp))


def _attach_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"disk": args.disk, "qmp": vm_target(args), "device": args.device}
    if args.method:
        out["method"] = args.method
    if args.reconnect_delay is not None:
        out["reconnect-delay"] = args.reconnect_delay
    if args.freeze:
        out["freeze"] = True
        out["qga"] = os.path.abspath(args.qga)
        if args.name:
            out["session"] = args.name
    return out


def _print_attachments(items: list[dict[str, Any]]) -> None:
    if not items:
        print("no attached disks")
        return
    print(f"{'DISK':<12} {'DEVICE':<12} {'METHOD':<8} {'STATE':<10} QMP")
    for a in items:
        print(f"{a['disk']:<12} {a['device']:<12} {a['method']:<8} {a['state']:<10} {a['qmp']}")


async def _attach_outcome(client: ControlClient, args: argparse.Namespace,
                          lost: ConnectionLost) -> dict[str, Any]:
    """The daemon went away during vm-attach: find out, once it is back,
    whether the attach completed; undo a half-done one.

    :return: the attachment, when it completed.
    :raise CliError: when it did not (it is undone, or the undo's error).
    """
    _warn(f"{lost}; reconnecting to find out whether {args.disk} is attached")
    await client.reconnect()
    for att in await client.execute("query-attachments", {}):
        if att.get("disk") == args.disk and att.get("state") == "attached":
            return dict(att)
        if att.get("disk") == args.disk:
            await client.execute("vm-detach", {"disk": args.disk, "force": True})
            raise CliError(f"the daemon restarted during the attach of {args.disk}; the "
                           "half-done attach was undone (run attach again)")
    raise CliError(f"the daemon restarted during the attach of {args.disk}, which did not "
                   "take place (run attach again)")


async def _detach_again(client: ControlClient, detach: dict[str, Any]) -> None:
    """vm-detach once more after a reconnect: done already is done."""
    try:
        await client.execute("vm-detach", detach)
    except CliError as exc:
        if "is not attached" not in str(exc):
            raise


async def _backup_window(client: ControlClient, args: argparse.Namespace) -> int:
    """attach -> fleece start -> COMMAND -> fleece stop -> detach.

    Cleanup runs whatever failed: the session is stopped if it started and
    the disk is detached if it was attached -- also when the daemon
    restarted in between (killed and restarted by systemd): the connection
    is made again (bounded), the session lost with the old daemon is
    forgotten and the disk detached, and the window fails, since its
    snapshot did not survive.  The exit code is COMMAND's, or 1 when the
    window itself (attach, start, cleanup, a restart) failed.
    """
    window = _Window(client, args)
    try:
        attach = await client.execute("vm-attach", _attach_args(args))
    except ConnectionLost as exc:
        window.lost(exc)
        await client.reconnect()
        await window.clean_up(session=True)
        raise CliError(f"backup-window: the daemon restarted during the attach of "
                       f"{args.disk}; it was undone, no backup was made") from None
    print(f"backup-window: {args.disk}: device {args.device} attached ({attach['method']})",
          flush=True)
    code = EXIT_FAILURE
    started = "export" in attach
    try:
        if started:
            export = attach["export"]
        else:
            start = {"disk": args.disk, "name": args.name, **_session_option_args(args)}
            started = True  # a session lost with the connection is stopped too
            export = (await client.execute("fleece-start", start))["export"]
        print(f"backup-window: snapshot export {export}; running {args.argv[0]}", flush=True)
        code = await _run_command(args.argv, attach["socket"], export)
    except ConnectionLost as exc:
        window.lost(exc)
        await client.reconnect()
    finally:
        await window.clean_up(started)
    if window.restarted:
        _warn(f"backup-window: the daemon restarted while the window was open: the "
              f"snapshot of {args.disk} was lost with it, so the backup cannot be "
              "trusted; the session was stopped and the disk detached")
        return EXIT_FAILURE
    if window.failed:
        return EXIT_FAILURE
    print(f"backup-window: {args.disk}: session stopped, device detached", flush=True)
    return code


class _Window:
    """The cleanup of a backup window, across a daemon restart."""

    def __init__(self, client: ControlClient, args: argparse.Namespace) -> None:
        self._client = client
        self._args = args
        self.failed = False
        self.restarted = False

    def lost(self, exc: ConnectionLost) -> None:
        self.restarted = True
        _warn(f"backup-window: {exc}; reconnecting to clean up")

    async def clean_up(self, session: bool) -> None:
        """Stop the session (when SESSION) and detach the disk, each retried
        once on a new connection when the daemon went away under it."""
        args = self._args
        steps = [("fleece-stop", {"disk": args.disk, "name": args.name})] if session else []
        steps.append(("vm-detach", {"disk": args.disk, "force": True}))
        for cmd, cmd_args in steps:
            for attempt in (1, 2):
                try:
                    await self._client.execute(cmd, cmd_args)
                except ConnectionLost as exc:
                    if attempt == 2:
                        _warn(f"backup-window: {cmd}: {exc}")
                        self.failed = True
                        break
                    self.lost(exc)
                    try:
                        await self._client.reconnect()
                    except CliError as again:
                        _warn(f"backup-window: {cmd}: {again}")
                        self.failed = True
                        return
                    continue
                except CliError as exc:
                    # Nothing to stop: the session never started, or is done.
                    if not (cmd == "fleece-stop" and "has no session" in str(exc)):
                        _warn(f"backup-window: {cmd}: {exc}")
                        self.failed = True
                break


def _warn(text: str) -> None:
    print(f"fleeced: {text}", file=sys.stderr, flush=True)


async def _run_command(argv: list[str], sock: str, export: str) -> int:
    uri = (f"nbd+unix:///{urllib.parse.quote(export, safe='@')}"
           f"?socket={urllib.parse.quote(sock, safe='/')}")
    words = [w.replace("{uri}", uri).replace("{export}", export) for w in argv]
    env = dict(os.environ, FLEECED_URI=uri, FLEECED_EXPORT=export, FLEECED_SOCKET=sock)
    try:
        proc = await asyncio.create_subprocess_exec(*words, env=env)
    except OSError as exc:
        print(f"fleeced: backup-window: {words[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    loop = asyncio.get_running_loop()
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for sig in forwarded:
        loop.add_signal_handler(sig, proc.send_signal, sig)
    try:
        rc = await proc.wait()
    finally:
        for sig in forwarded:
            loop.remove_signal_handler(sig)
    if rc != 0:
        print(f"fleeced: backup-window: command exited with status {rc}", file=sys.stderr)
    return rc if rc >= 0 else 128 - rc
