"""`fleeced attach` and `fleeced detach` when the daemon restarts under them.

The daemon side is a scripted QMP peer (the real daemon cannot be made to
die at the exact moment a command is in flight): it drops the connection
when the command arrives, then answers a new connection as the restarted
daemon would.  The real restart, under backup-window, is in
tests/integration/test_attach.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleeced.cli import main
from fleeced.control.framing import JsonSplitter

#: What the restarted daemon answers: command -> reply (a "return" value,
#: or an error description when the value is an Exception).
Script = dict[str, Any]


class FakeDaemon:
    """Drops its first connection at the first command named DROP_AT; later
    connections are answered from SCRIPT.  Records every command it got."""

    def __init__(self, path: str, drop_at: str, script: Script) -> None:
        self.path = path
        self.drop_at = drop_at
        self.script = script
        self.commands: list[tuple[int, str, dict[str, Any]]] = []
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeDaemon:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(asyncio.start_unix_server(self._serve, self.path))
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = self.connections
        writer.write(b'{"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0}, '
                     b'"package": "fake"}, "capabilities": []}}\r\n')
        splitter = JsonSplitter()  # qemu.qmp ends a message with no newline
        while chunk := await reader.read(65536):
            for line in splitter.feed(chunk):
                if not await self._answer(n, json.loads(line), writer):
                    return
        writer.close()

    async def _answer(self, n: int, msg: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        """Answer MSG on connection N; False when the connection was dropped."""
        cmd = msg["execute"]
        self.commands.append((n, cmd, msg.get("arguments", {})))
        if cmd == "qmp_capabilities":
            reply: dict[str, Any] = {"return": {}}
        elif n == 1 and cmd == self.drop_at:
            writer.transport.abort()  # killed with the command in flight
            return False
        else:
            value = self.script.get(cmd, {})
            if isinstance(value, Exception):
                reply = {"error": {"class": "GenericError", "desc": str(value)}}
            else:
                reply = {"return": value}
        if "id" in msg:
            reply["id"] = msg["id"]
        writer.write(json.dumps(reply).encode() + b"\r\n")
        await writer.drain()
        return True


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[[str, Script], FakeDaemon]]:
    made: list[FakeDaemon] = []

    def make(drop_at: str, script: Script) -> FakeDaemon:
        f = FakeDaemon(str(tmp_path / f"ctl{len(made)}.sock"), drop_at, script)
        made.append(f.__enter__())
        return f

    yield make
    for f in made:
        f.__exit__()


ATTACHED = {"disk": "vda", "qmp": "/q", "device": "vda", "method": "qom-set",
            "state": "attached"}
ATTACH = ["attach", "vda", "--qmp", "/q", "--device", "vda"]


def test_attach_that_completed_before_the_restart(fake, capsys: pytest.CaptureFixture[str]
                                                  ) -> None:
    f = fake("vm-attach", {"query-attachments": [ATTACHED]})
    assert main([*ATTACH, "--control", f.path]) == 0
    out, err = capsys.readouterr()
    assert "vda: device vda now goes through fleeced (qom-set)" in out
    assert "the connection to the daemon broke during vm-attach" in err
    assert [c for _, c, _ in f.commands if c != "qmp_capabilities"] == [
        "vm-attach", "query-attachments"]


def test_attach_left_half_done_is_undone(fake, capsys: pytest.CaptureFixture[str]) -> None:
    f = fake("vm-attach", {"query-attachments": [{**ATTACHED, "state": "attaching"}]})
    assert main([*ATTACH, "--control", f.path]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "fleeced: the daemon restarted during the attach of vda; the half-done attach was "
        "undone (run attach again)")
    assert (2, "vm-detach", {"disk": "vda", "force": True}) in f.commands


def test_attach_that_did_not_happen(fake, capsys: pytest.CaptureFixture[str]) -> None:
    f = fake("vm-attach", {"query-attachments": []})
    assert main([*ATTACH, "--control", f.path]) == 1
    assert "which did not take place (run attach again)" in capsys.readouterr().err
    assert not [c for _, c, _ in f.commands if c == "vm-detach"]


@pytest.mark.parametrize("second", [{}, Exception("disk 'vda' is not attached to a VM")])
def test_detach_is_finished_after_the_restart(fake, capsys: pytest.CaptureFixture[str],
                                              second: object) -> None:
    """The detach is sent again; "not attached" means the first one did it."""
    f = fake("vm-detach", {"vm-detach": second})
    assert main(["detach", "vda", "--control", f.path]) == 0
    out, err = capsys.readouterr()
    assert "vda: detached" in out
    assert "reconnecting to finish the detach" in err
    assert [(n, c) for n, c, _ in f.commands if c == "vm-detach"] == [
        (1, "vm-detach"), (2, "vm-detach")]


def test_detach_error_after_the_restart_is_reported(fake,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    f = fake("vm-detach", {"vm-detach": Exception("cannot connect to QMP socket /q")})
    assert main(["detach", "vda", "--control", f.path]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fleeced: cannot connect to QMP socket /q")
