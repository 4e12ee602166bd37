"""The control socket: a server speaking the QMP wire protocol.

Greeting, then ``qmp_capabilities``, then ``{"execute", "arguments", "id"}``
commands answered with ``{"return"}`` or ``{"error": {"class", "desc"}}``, and
asynchronous ``{"event", "data", "timestamp"}`` messages, each one JSON object
per line.  QEMU's own ``qemu.qmp`` client library and ``qmp-shell`` work
against it unchanged.

A client sending garbage gets a ``GenericError`` and stays connected; a line
over :data:`MAX_LINE` bytes or a non-object greeting reply disconnects it.
Nothing a client sends can stop the daemon.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from fleeced import __version__
from fleeced.control.framing import JsonSplitter, MessageTooLong

log = logging.getLogger(__name__)

#: Longest accepted command line, bytes.
MAX_LINE: Final = 1024 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class CommandError(Exception):
    """A command failed; sent as ``{"error": {"class": cls, "desc": desc}}``.

    :param desc: human-readable one-line description.
    :param cls: QMP error class (``GenericError``, ``CommandNotFound``, ...).
    """

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


def _version() -> dict[str, Any]:
    parts = [int(p) for p in __version__.split(".")[:3]]
    while len(parts) < 3:
        parts.append(0)
    return {
        "qemu": {"major": parts[0], "minor": parts[1], "micro": parts[2]},
        "package": f"fleeced {__version__}",
    }


class ControlServer:
    """Unix-socket QMP server dispatching to named async handlers.

    :param handlers: command name -> coroutine taking the arguments dict.
    """

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self._handlers = dict(handlers)
        self._handlers["query-commands"] = self._query_commands
        self._clients: set[_Client] = set()
        self._server: asyncio.AbstractServer | None = None
        self._path: str | None = None

    async def _query_commands(self, args: dict[str, Any]) -> Any:
        return [{"name": n} for n in sorted({*self._handlers, "qmp_capabilities"})]

    async def listen(self, path: str) -> None:
        """Listen on PATH with mode 0600 (parent directory created 0700).

        :raise OSError: when the socket cannot be created.
        """
        _prepare_socket_path(path)
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path, limit=MAX_LINE
            )
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._path = path
        log.info("control socket on %s", path)

    def emit(self, event: str, data: Mapping[str, Any]) -> None:
        """Send an asynchronous event to every negotiated client."""
        now = time.time()
        msg = {
            "event": event,
            "data": dict(data),
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1_000_000)},
        }
        for client in list(self._clients):
            if client.negotiated:
                client.send(msg)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for client in list(self._clients):
                client.writer.close()
            await self._server.wait_closed()
            self._server = None
        if self._path is not None:
            try:
                os.unlink(self._path)
            except OSError:
                pass
            self._path = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(writer)
        self._clients.add(client)
        try:
            client.send({"QMP": {"version": _version(), "capabilities": []}})
            splitter = JsonSplitter(MAX_LINE)
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                try:
                    messages = splitter.feed(data)
                except MessageTooLong:
                    log.warning("control client sent a message over %d bytes; closing",
                                MAX_LINE)
                    break
                for message in messages:
                    reply = await self._dispatch(client, message)
                    if reply is not None:
                        client.send(reply)
                    await writer.drain()
        except (ConnectionError, OSError) as exc:
            log.debug("control client gone: %s", exc)
        finally:
            self._clients.discard(client)
            writer.close()

    async def _dispatch(self, client: _Client, line: bytes) -> dict[str, Any] | None:
        try:
            msg = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error("GenericError", f"JSON parse error: {exc}")
        if not isinstance(msg, dict):
            return _error("GenericError", "QMP input must be a JSON object")
        has_id = "id" in msg
        ident = msg.get("id")
        try:
            result = await self._execute(client, msg)
        except CommandError as exc:
            reply = _error(exc.cls, exc.desc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a handler must not kill the daemon
            log.exception("control command %r failed", msg.get("execute"))
            reply = _error("GenericError", f"internal error: {exc}")
        else:
            reply = {"return": result if result is not None else {}}
        if has_id:
            reply["id"] = ident
        return reply

    async def _execute(self, client: _Client, msg: dict[str, Any]) -> Any:
        cmd = msg.get("execute")
        if cmd is None and "exec-oob" in msg:
            raise CommandError("out-of-band execution is not supported")
        if not isinstance(cmd, str):
            raise CommandError("QMP input lacks member 'execute'")
        for key in msg:
            if key not in ("execute", "arguments", "id"):
                raise CommandError(f"QMP input member '{key}' is unexpected")
        args = msg.get("arguments", {})
        if not isinstance(args, dict):
            raise CommandError("QMP input member 'arguments' must be an object")
        if cmd == "qmp_capabilities":
            if client.negotiated:
                raise CommandError(
                    "Capabilities negotiation is already complete, command ignored",
                    "CommandNotFound",
                )
            enable = args.get("enable", [])
            if enable:
                raise CommandError(f"Capability '{enable[0]}' not available")
            client.negotiated = True
            return {}
        if not client.negotiated:
            raise CommandError(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
                "CommandNotFound",
            )
        handler = self._handlers.get(cmd)
        if handler is None:
            raise CommandError(f"The command {cmd} has not been found", "CommandNotFound")
        return await handler(args)


class _Client:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.negotiated = False

    def send(self, msg: Mapping[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(msg).encode() + b"\r\n")


def _error(cls: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


def _prepare_socket_path(path: str) -> None:
    """Create the parent (0700) and remove a stale socket (start-up only).

    :raise OSError: when another daemon is listening at PATH.
    """
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    if os.path.exists(path):
        if _in_use(path):
            raise OSError(98, f"{path}: a daemon is already listening there")
        os.unlink(path)


def _in_use(path: str) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True
