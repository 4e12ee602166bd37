"""asyncio NBD listeners: export registry, connection bookkeeping, shutdown.

The server knows exports by name and connections by export; it never parses
bytes (that is :mod:`fleeced.nbd`) and never does block I/O (that is
:mod:`fleeced.exports`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from collections.abc import Callable, Sequence

from fleeced.exports import Export
from fleeced.nbd import ExportInfo
from fleeced.server.connection import NbdConnection

log = logging.getLogger(__name__)

__all__ = ["NbdServer", "NbdConnection"]


class NbdServer:
    """Serves a set of named exports on any number of listeners.

    :param shared: maximum concurrent clients, 0 for no limit (qemu-nbd ``-e``).
    :param persistent: keep running after the last client leaves (``-t``).
    :param on_idle: called when the last client leaves and not persistent.
    """

    def __init__(
        self,
        *,
        shared: int = 0,
        persistent: bool = True,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self._exports: dict[str, Export] = {}
        self._default: str | None = None
        self._connections: set[NbdConnection] = set()
        self._by_export: dict[str, set[NbdConnection]] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self.shared = shared
        self.persistent = persistent
        self._on_idle = on_idle
        self._ever_connected = False
        self.on_count_change: Callable[[int], None] | None = None

    # -- exports -------------------------------------------------------------

    def add_export(self, export: Export, default: bool = False) -> None:
        """Register EXPORT under its name.

        :raise ValueError: when the name is taken.
        """
        name = export.info.name
        if name in self._exports:
            raise ValueError(f"export {name!r} already exists")
        self._exports[name] = export
        if default or self._default is None:
            self._default = name

    async def remove_export(self, name: str) -> None:
        """Unregister NAME; its clients are closed after in-flight requests finish."""
        self._exports.pop(name, None)
        if self._default == name:
            self._default = next(iter(self._exports), None)
        conns = list(self._by_export.pop(name, ()))
        for conn in conns:
            conn.shutdown()
        if conns:
            await asyncio.gather(*(c.closed for c in conns))

    def get_export(self, name: str) -> Export | None:
        return self._exports.get(name)

    @property
    def exports(self) -> dict[str, Export]:
        return dict(self._exports)

    def lookup_info(self, name: str) -> ExportInfo | None:
        """Engine callback: the export for NAME ("" is the default export)."""
        if name == "" and self._default is not None:
            name = self._default
        export = self._exports.get(name)
        return export.info if export is not None else None

    def list_infos(self) -> Sequence[ExportInfo]:
        return [e.info for e in self._exports.values()]

    # -- connections ---------------------------------------------------------

    def connection_opened(self, conn: NbdConnection) -> bool:
        if self.shared and len(self._connections) >= self.shared:
            log.warning("refusing client: %d connections already (-e %d)",
                        len(self._connections), self.shared)
            return False
        self._connections.add(conn)
        self._ever_connected = True
        self._count_changed()
        return True

    def attach(self, conn: NbdConnection, export_name: str) -> None:
        self._by_export.setdefault(export_name, set()).add(conn)

    def connection_closed(self, conn: NbdConnection) -> None:
        if conn not in self._connections:
            return
        self._connections.discard(conn)
        if conn.export is not None:
            conn.export.stats.connections -= 1
            peers = self._by_export.get(conn.export.info.name)
            if peers is not None:
                peers.discard(conn)
        self._count_changed()
        if not self._connections and not self.persistent and self._on_idle is not None:
            self._on_idle()

    def _count_changed(self) -> None:
        if self.on_count_change is not None:
            self.on_count_change(len(self._connections))

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # -- listeners -----------------------------------------------------------

    def _factory(self) -> NbdConnection:
        return NbdConnection(self)

    async def listen_unix(self, path: str) -> None:
        """Listen on a Unix socket at PATH (a stale socket file is replaced).

        :raise OSError: when PATH exists and is not a socket, or bind fails.
        """
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(17, f"{path} exists and is not a socket")
            if _unix_in_use(path):
                raise OSError(98, f"{path}: address already in use")
            os.unlink(path)
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(self._factory, path, backlog=512)
        self._servers.append(server)
        self._unix_paths.append(path)
        log.info("listening on unix:%s", path)

    async def listen_tcp(self, host: str | None, port: int) -> None:
        """Listen on HOST:PORT (all addresses when HOST is None).

        :raise OSError: when the address is in use or cannot be bound.
        """
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self._factory, host, port, backlog=512, reuse_address=True
        )
        self._servers.append(server)
        for sock in server.sockets:
            log.info("listening on tcp:%s", sock.getsockname())

    async def listen_socket(self, sock: socket.socket) -> None:
        """Serve on an inherited listening socket (systemd activation)."""
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(self._factory, sock=sock)
        else:
            server = await loop.create_server(self._factory, sock=sock)
        self._servers.append(server)
        log.info("serving inherited socket %s", sock.getsockname())

    async def close(self) -> None:
        """Stop accepting, let in-flight requests finish, close every client."""
        for server in self._servers:
            server.close()
        conns = list(self._connections)
        for conn in conns:
            conn.shutdown()
        if conns:
            await asyncio.gather(*(c.closed for c in conns))
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._unix_paths.clear()


def _unix_in_use(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True
