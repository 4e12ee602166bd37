"""The daemon's QMP connection against a peer that speaks QMP as QEMU does.

A real QEMU is used everywhere else; here the peer is scripted because the
case is a race: QEMU puts a new monitor into command mode before it sends
the reply to ``qmp_capabilities``, so an event emitted at that moment (a
block job's, say) can reach the client first.  qemu.qmp takes that for a
failed negotiation, and an attach or detach failed with it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from fleeced.errors import CommandError
from fleeced.qmp.monitor import NEGOTIATION_TRIES, Monitor

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                "package": ""}, "capabilities": []}}
EVENT = {"event": "JOB_STATUS_CHANGE", "data": {"id": "j", "status": "running"},
         "timestamp": {"seconds": 0, "microseconds": 0}}


async def _peer(path: Path, early_events: int) -> tuple[asyncio.AbstractServer, list[int]]:
    """A QMP peer whose first EARLY_EVENTS connections get an event before
    the capabilities reply.  Returns the server and the connection count."""
    seen = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen[0] += 1
        early = seen[0] <= early_events

        def send(msg: dict[str, object]) -> None:
            writer.write(json.dumps(msg).encode() + b"\r\n")

        send(GREETING)
        buf, decoder = "", json.JSONDecoder()
        try:
            while chunk := await reader.read(4096):
                # A JSON stream, as QEMU parses it: qemu.qmp ends no
                # message with a newline.
                buf += chunk.decode()
                try:
                    cmd, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    continue
                buf = buf.lstrip()[end:]
                if cmd["execute"] == "qmp_capabilities" and early:
                    send(EVENT)
                reply: dict[str, object] = {"return": {}}
                if cmd["execute"] == "query-status":
                    reply = {"return": {"status": "running", "running": True}}
                if "id" in cmd:
                    reply["id"] = cmd["id"]
                send(reply)
                await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_unix_server(serve, path=str(path)), seen


async def _query(path: Path) -> object:
    async with Monitor.connect(str(path)) as mon:
        return await mon.execute("query-status")


def test_an_event_before_the_capabilities_reply_is_connected_again(tmp_path: Path) -> None:
    async def main() -> tuple[object, int]:
        server, seen = await _peer(tmp_path / "qmp.sock", early_events=1)
        async with server:
            result = await _query(tmp_path / "qmp.sock")
        return result, seen[0]

    result, connections = asyncio.run(main())
    assert result == {"status": "running", "running": True}
    assert connections == 2


def test_negotiation_failures_are_bounded(tmp_path: Path) -> None:
    async def main() -> int:
        server, seen = await _peer(tmp_path / "qmp.sock", early_events=1000)
        async with server:
            with pytest.raises(CommandError, match="cannot connect to QMP socket"):
                await _query(tmp_path / "qmp.sock")
        return seen[0]

    assert asyncio.run(main()) == NEGOTIATION_TRIES
