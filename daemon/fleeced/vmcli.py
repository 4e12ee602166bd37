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
from fleeced.errors import CliError
from fleeced.settings import session_option_args as _session_option_args


async def vm_command(client: Any, args: argparse.Namespace) -> int:
    """Run one of the VM/disk commands over the control connection CLIENT."""
    if args.command == "attach" and args.list:
        items = await client.execute("query-attachments", {})
        if args.json:
            print(json.dumps(items, indent=2))
        else:
            _print_attachments(items)
        return EXIT_OK
    if args.command == "attach":
        result = await client.execute("vm-attach", _attach_args(args))
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            extra = f"; session export {result['export']}" if "export" in result else ""
            print(f"{args.disk}: device {args.device} now goes through fleeced "
                  f"({result['method']}){extra}")
        return EXIT_OK
    if args.command == "detach":
        await client.execute("vm-detach", {"disk": args.disk, **({"force": True}
                                                                   if args.force else {})})
        print(f"{args.disk}: detached; the VM uses its own node again")
        return EXIT_OK
    if args.command == "bitmap":
        return await _bitmap_command(client, args)
    if args.command == "disk":
        if args.disk_command == "add":
            out = _disk_add_args(args)
            result = await client.execute("disk-add", out)
            print(f"disk {args.name}: {out['path']} ({result['size']} bytes)")
        else:
            await client.execute("disk-remove", {"name": args.name})
            print(f"disk {args.name} removed")
        return EXIT_OK
    return await _backup_window(client, args)


async def _bitmap_command(client: Any, args: argparse.Namespace) -> int:
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
    out: dict[str, Any] = {"name": args.name, "path": os.path.abspath(args.path)}
    if args.read_only:
        out["read-only"] = True
    if args.discard:
        out["discard"] = args.discard
    if args.description is not None:
        out["description"] = args.description
    return out


def _attach_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"disk": args.disk, "qmp": os.path.abspath(args.qmp),
                           "device": args.device}
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


async def _backup_window(client: Any, args: argparse.Namespace) -> int:
    """attach -> fleece start -> COMMAND -> fleece stop -> detach.

    Cleanup runs whatever failed: the session is stopped if it started and
    the disk is detached if it was attached.  The exit code is COMMAND's, or
    1 when the window itself (attach, start or cleanup) failed.
    """
    attach = await client.execute("vm-attach", _attach_args(args))
    print(f"backup-window: {args.disk}: device {args.device} attached ({attach['method']})",
          flush=True)
    code = EXIT_FAILURE
    started = "export" in attach
    try:
        if started:
            export = attach["export"]
        else:
            start = {"disk": args.disk, "name": args.name, **_session_option_args(args)}
            export = (await client.execute("fleece-start", start))["export"]
            started = True
        print(f"backup-window: snapshot export {export}; running {args.argv[0]}", flush=True)
        code = await _run_command(args.argv, attach["socket"], export)
    finally:
        failed = False
        if started:
            try:
                await client.execute("fleece-stop", {"disk": args.disk, "name": args.name})
            except CliError as exc:
                print(f"fleeced: backup-window: fleece-stop: {exc}", file=sys.stderr)
                failed = True
        try:
            await client.execute("vm-detach", {"disk": args.disk, "force": True})
        except CliError as exc:
            print(f"fleeced: backup-window: detach: {exc}", file=sys.stderr)
            failed = True
        if failed:
            code = EXIT_FAILURE
        else:
            print(f"backup-window: {args.disk}: session stopped, device detached", flush=True)
    return code


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
