"""The control socket: a server speaking the QMP wire protocol.

Greeting, then ``qmp_capabilities``, then ``{"execute", "arguments", "id"}``
commands answered with ``{"return"}`` or ``{"error": {"class", "desc"}}``, and
asynchronous ``{"event", "data", "timestamp"}`` messages, each one JSON object
per line.  QEMU's own ``qemu.qmp`` client library and ``qmp-shell`` work
against it unchanged.

A client sending garbage gets a ``GenericError`` and stays connected; a line
over :data:`MAX_LINE` bytes or a non-object greeting reply disconnects it.
So does one that takes longer than ``message_limit`` (the NBD handshake
limit, 10 s by default) to finish a message it started, or to negotiate
capabilities after connecting: a peer cannot hold a slot and a megabyte by
trickling.  At most :data:`MAX_CLIENTS` clients are connected at once; one
more is told so in a QMP error and closed.
Garbage includes JSON nested deeper than
:data:`~fleeced.control.framing.MAX_DEPTH` and numbers JSON cannot carry
(``NaN``, ``Infinity``, ``1e400``).  Nothing a client sends can stop the daemon.

At start-up only a stale *socket* at the control path is replaced; anything
else there (an image, a directory, a symlink) is an error, never unlinked.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from fleeced import __version__, strictjson
from fleeced.control.framing import MAX_DEPTH, JsonSplitter, MessageTooLong, nesting_depth
from fleeced.errors import CommandError
from fleeced.paths import unix_socket_in_use

log = logging.getLogger(__name__)

#: Longest accepted command line, bytes.
MAX_LINE: Final = 1024 * 1024
#: Control clients connected at once (each may buffer up to MAX_LINE).
MAX_CLIENTS: Final = 16

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


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

    def __init__(self, handlers: Mapping[str, Handler], *, max_clients: int = MAX_CLIENTS,
                 message_limit: float = 10.0) -> None:
        """:param max_clients: clients connected at once.
        :param message_limit: seconds a client has to finish a message it
            started, and to negotiate capabilities after connecting."""
        self._handlers = dict(handlers)
        self._max_clients = max_clients
        self._message_limit = message_limit
        self._handlers["query-commands"] = self._query_commands
        self._clients: set[_Client] = set()
        self._server: asyncio.AbstractServer | None = None
        self._path: str | None = None
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket

    async def _query_commands(self, args: dict[str, Any]) -> Any:
        return [{"name": n} for n in sorted({*self._handlers, "qmp_capabilities"})]

    async def listen(self, path: str) -> None:
        """Listen on PATH with mode 0600 (parent directory created 0700).

        :raise OSError: when the socket cannot be created, PATH holds anything
            but a stale socket, or another daemon listens there; the message
            is one line starting ``control socket PATH:``.
        """
        try:
            _prepare_socket_path(path)
            old = os.umask(0o177)
            try:
                self._server = await asyncio.start_unix_server(
                    self._serve, path, limit=MAX_LINE
                )
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            st = os.lstat(path)
        except OSError as exc:
            if self._server is not None:
                self._server.close()
                self._server = None
            raise OSError(exc.errno, f"control socket {path}: {_reason(exc, path)}") from None
        self._path = path
        self._ident = (st.st_dev, st.st_ino)
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
            # Remove only our own socket: never whatever replaced it since.
            try:
                st = os.lstat(self._path)
                if (st.st_dev, st.st_ino) == self._ident:
                    os.unlink(self._path)
            except OSError:
                pass
            self._path = None
            self._ident = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= self._max_clients:
            log.warning("control client refused: %d clients already", self._max_clients)
            writer.write(json.dumps(_error(
                "GenericError", f"too many control connections ({self._max_clients}); "
                "try again later")).encode() + b"\r\n")
            writer.close()
            return
        client = _Client(writer)
        self._clients.add(client)
        loop = asyncio.get_running_loop()
        try:
            client.send({"QMP": {"version": _version(), "capabilities": []}})
            splitter = JsonSplitter(MAX_LINE)
            # Until capabilities are negotiated, the connection itself is
            # the message that must finish in time.
            deadline: float | None = loop.time() + self._message_limit
            while True:
                timeout = None if deadline is None else max(deadline - loop.time(), 0.0)
                try:
                    data = await asyncio.wait_for(reader.read(65536), timeout)
                except TimeoutError:
                    log.warning("control client: no complete message within %gs; closing",
                                self._message_limit)
                    break
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
                if client.negotiated and not splitter.pending:
                    deadline = None
                elif splitter.pending and (deadline is None or messages):
                    deadline = loop.time() + self._message_limit  # one starts now
        except (ConnectionError, OSError) as exc:
            log.debug("control client gone: %s", exc)
        finally:
            self._clients.discard(client)
            writer.close()

    async def _dispatch(self, client: _Client, line: bytes) -> dict[str, Any] | None:
        # Depth first: json.loads recurses per level and would raise
        # RecursionError (or leave objects too deep to repr) long before the
        # 1 MiB cap.  QEMU's parser has the same kind of limit.
        if nesting_depth(line) > MAX_DEPTH:
            return _error("GenericError",
                          f"JSON parse error: nesting deeper than {MAX_DEPTH} levels")
        try:
            msg = strictjson.loads(line)
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


def _reason(exc: OSError, path: str) -> str:
    """EXC as text without repeating PATH (naming any other file involved)."""
    text = exc.strerror or str(exc)
    if exc.filename and exc.filename != path:
        text = f"{exc.filename}: {text}"
    return text


def _prepare_socket_path(path: str) -> None:
    """Create the parent (0700) and remove a stale socket (start-up only).

    Only a socket nobody listens on is removed.  ``lstat``: a symlink is not
    followed, and is refused like any other non-socket.

    :raise OSError: when PATH exists and is not a socket, or another daemon
        is listening there.
    """
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "exists and is not a socket; refusing to replace it")
    if unix_socket_in_use(path):
        raise OSError(errno.EADDRINUSE,
                      "a daemon is already listening there (stop it, or use another "
                      "--control PATH or --no-control)")
    os.unlink(path)
