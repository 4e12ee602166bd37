"""The control socket speaks the QMP wire protocol: tested with QEMU's qemu.qmp library."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from tests.conftest import Daemon, make_image, requires, run

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture
def daemon(start_daemon, tmp_path: Path) -> Daemon:
    img = tmp_path / "vm.img"
    make_image(img, 4 * MiB)
    return start_daemon(str(img), env={"FLEECED_TEST_HOOKS": "1"})


async def _client(d: Daemon) -> QMPClient:
    client = QMPClient("test")
    await client.connect(d.control)
    return client


def test_qmp_library_session(daemon: Daemon) -> None:
    async def go() -> None:
        qmp = await _client(daemon)
        try:
            assert qmp.greeting is not None
            disks = await qmp.execute("query-disks")
            path = disks[0]["path"]
            assert disks == [{"name": "vm", "path": path, "size": 4 * MiB,
                              "read-only": False, "sessions": [], "source": path,
                              "source-kind": "file", "format": "raw",
                              "cache": "writeback"}]
            r = await qmp.execute("fleece-start", {"disk": "vm", "cluster-size": 131072})
            assert r == {"export": "vm@fleece", "cluster-size": 131072}
            exports = await qmp.execute("query-exports")
            assert {(e["name"], e["type"]) for e in exports} == {
                ("vm", "active"), ("vm@fleece", "snapshot")}
            (s,) = await qmp.execute("query-fleece")
            assert s["clusters"]["total"] == 32
            assert s["clusters"]["needed"] == 32
            stats = await qmp.execute("query-stats")
            assert stats["connections"] == 0
            with pytest.raises(ExecuteError) as ei:
                await qmp.execute("no-such-command")
            assert ei.value.error_class == "CommandNotFound"
            with pytest.raises(ExecuteError) as ei:
                await qmp.execute("fleece-start", {})
            assert "disk" in str(ei.value)
            with pytest.raises(ExecuteError) as ei:
                await qmp.execute("fleece-start", {"disk": 5})
            assert "expected: string" in str(ei.value)
            with pytest.raises(ExecuteError) as ei:
                await qmp.execute("fleece-start", {"disk": "vm", "bogus": 1})
            assert "bogus" in str(ei.value)
            with pytest.raises(ExecuteError) as ei:
                await qmp.execute("fleece-start", {"disk": "vm", "name": "t",
                                                   "temp-dir": "/proc"})
            assert "cannot start session" in str(ei.value)
            with pytest.raises(ExecuteError) as ei:
                await qmp.execute("fleece-start", {"disk": "vm", "name": "b",
                                                   "bitmap": [{"offset": 0, "length": 5 * MiB}]})
            assert "beyond the end" in str(ei.value)
            with pytest.raises(ExecuteError) as ei:
                await qmp.execute("fleece-start", {"disk": "vm", "name": "c",
                                                   "on-cbw-error": "explode"})
            assert "on-cbw-error" in str(ei.value)
            # nothing changed by the failed commands
            assert len(await qmp.execute("query-fleece")) == 1
            # events: a broken session, then a stop
            await qmp.execute("x-inject-cbw-error",
                              {"disk": "vm", "name": "fleece", "errno": 28, "count": 1})
            run(requires("qemu-io"), "-f", "raw", "-c", "write -P 1 0 4k",
                f"nbd+unix:///vm?socket={daemon.sock}")
            async with asyncio.timeout(10):
                async for ev in qmp.events:
                    if ev["event"] == "FLEECE_BROKEN":
                        assert ev["data"]["disk"] == "vm"
                        assert "space" in ev["data"]["error"]
                        break
            await qmp.execute("fleece-stop", {"disk": "vm", "name": "fleece"})
            async with asyncio.timeout(10):
                async for ev in qmp.events:
                    if ev["event"] == "FLEECE_STOPPED":
                        assert ev["data"] == {"disk": "vm", "name": "fleece"}
                        break
        finally:
            await qmp.disconnect()

    asyncio.run(go())


def _raw(d: Daemon) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(d.control)
    return s


_pending: dict[int, bytes] = {}


def _recv_line(s: socket.socket) -> dict[str, object]:
    """One JSON message per line; keeps what follows the newline for the next call."""
    buf = _pending.pop(s.fileno(), b"")
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError
        buf += chunk
    line, rest = buf.split(b"\n", 1)
    if rest:
        _pending[s.fileno()] = rest
    return json.loads(line)  # type: ignore[no-any-return]


def test_garbage_keeps_socket_usable(daemon: Daemon) -> None:
    with _raw(daemon) as s:
        assert "QMP" in _recv_line(s)
        s.sendall(b'{"execute": "query-disks"}\n')
        assert _recv_line(s)["error"]["class"] == "CommandNotFound"  # type: ignore[index]
        s.sendall(b'{"execute": "qmp_capabilities"}\n')
        assert _recv_line(s) == {"return": {}}
        s.sendall(b"this is not json\n")
        assert "JSON" in _recv_line(s)["error"]["desc"]  # type: ignore[index]
        s.sendall(b"[1, 2]\n")
        assert _recv_line(s)["error"]["class"] == "GenericError"  # type: ignore[index]
        s.sendall(b'{"execute": "query-disks", "id": 7}\n')
        reply = _recv_line(s)
        assert reply["id"] == 7 and reply["return"][0]["name"] == "vm"  # type: ignore[index]


def test_huge_line_disconnects_only_that_client(daemon: Daemon) -> None:
    with _raw(daemon) as s:
        _recv_line(s)
        chunk = b"x" * (1 << 20)
        with pytest.raises((BrokenPipeError, ConnectionResetError, EOFError)):
            for _ in range(1024):  # up to 1 GiB, but the daemon hangs up long before
                s.sendall(chunk)
            _recv_line(s)
    # the daemon still serves control and NBD clients
    with _raw(daemon) as s:
        _recv_line(s)
        s.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-disks"}\n')
        assert _recv_line(s) == {"return": {}}
        assert _recv_line(s)["return"][0]["name"] == "vm"  # type: ignore[index]
    run(requires("nbdinfo"), f"nbd+unix:///vm?socket={daemon.sock}")


def test_control_socket_mode(daemon: Daemon) -> None:
    import os
    import stat

    assert stat.S_IMODE(os.stat(daemon.control).st_mode) == 0o600
