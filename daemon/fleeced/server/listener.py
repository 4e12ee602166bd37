"""asyncio NBD listeners: export registry, connection bookkeeping, shutdown.

The server knows exports by name and connections by export; it never parses
bytes (that is :mod:`fleeced.nbd`) and never does block I/O (that is
:mod:`fleeced.exports`).

One registry: a connection is counted from accept until its ``closed`` future
resolves, i.e. until the peer is gone *and* its last operation has completed.
Only negotiated connections count against ``-e``; a silent one is dropped
after ``handshake_limit``.  Memory for READ replies is budgeted per connection
(see :mod:`fleeced.server.connection`: a client that does not read costs
about 2 MiB, whatever it asked for) and daemon-wide here, against many such
clients: while the connections together hold more than ``reply_budget``
bytes, none parses new requests -- except those of attached VM disks
(:attr:`NbdServer.guest_exports`), which never wait for others; a connection
that keeps its bytes pinned by not reading its replies for ``stall_timeout``
while others wait for the budget is aborted.  That is the loop's path (TLS
connections, ``--data-plane loop``); a native connection bounds its own
replies in C (4 MiB of requests in flight and replies unread) and never
takes from, or waits for, the daemon-wide budget.

TLS (``--tls``) applies to TCP listeners, bound or inherited, and to Unix
sockets only when asked (``TlsConfig.unix``: credentials given with ``-k``,
as qemu-nbd applies them, or ``[tls] unix = true``): a Unix-socket client is
a local peer whose access the file mode already controls, so a service's
Unix sockets stay plain by default, and STARTTLS there gets
NBD_REP_ERR_POLICY.  The server context is built, and its files read, when
the first listener that uses it is set up, so bad credentials fail the
start-up.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import ssl
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from fleeced.exports import Export
from fleeced.nbd import ExportInfo
from fleeced.paths import DEFAULT_SOCKET_MODE, group_id, unix_socket_in_use
from fleeced.server.connection import NbdConnection
from fleeced.tls import TlsConfig

log = logging.getLogger(__name__)



#: Daemon-wide bytes of READ replies held (admitted, or buffered while a
#: client does not read) before every connection stops parsing new requests.
REPLY_BUDGET: Final = 192 * 1024 * 1024
#: Seconds a connection may keep reply bytes pinned without reading while
#: other connections wait for the reply budget.
STALL_TIMEOUT: Final = 30.0
#: File descriptors no NBD client may take: the operator's control
#: connections, and what control commands open (images, bitmaps, temp
#: stores, QMP sockets), must never find the table full.
FD_RESERVE: Final = 64


class NbdServer:
    """Serves a set of named exports on any number of listeners.

    :param shared: maximum concurrent clients, 0 for no limit (qemu-nbd ``-e``).
    :param persistent: keep running after the last client leaves (``-t``).
    :param on_idle: called when the last client leaves and not persistent.
    :param shutdown_timeout: seconds connections get to finish at shutdown and
        when their export is removed, before they are aborted.
    :param handshake_limit: seconds a client has to finish the handshake.
    :param reply_budget: daemon-wide bytes of READ replies held at once.
    :param tls: TLS configuration for TCP clients.
    """

    def __init__(
        self,
        *,
        shared: int = 0,
        persistent: bool = True,
        on_idle: Callable[[], None] | None = None,
        shutdown_timeout: float = 5.0,
        handshake_limit: float = 10.0,
        reply_budget: int = REPLY_BUDGET,
        stall_timeout: float = STALL_TIMEOUT,
        tls: TlsConfig | None = None,
        native: bool = True,
    ) -> None:
        #: Plain connections run their transmission phase in C (exports
        #: with a native form); False: every request goes through the loop.
        self.native = native
        self._exports: dict[str, Export] = {}
        self._default: str | None = None
        self._connections: set[NbdConnection] = set()
        self._negotiated: set[NbdConnection] = set()
        self._by_export: dict[str, set[NbdConnection]] = {}
        self.shutdown_timeout = shutdown_timeout
        self.handshake_limit = handshake_limit
        self.reply_budget = reply_budget
        self.stall_timeout = stall_timeout
        #: TLS for TCP connections (``--tls``), and Unix ones when ``tls.unix``.
        self.tls = tls or TlsConfig()
        self._tls_context: ssl.SSLContext | None = None
        self._charged = 0
        self._budget_waiters: set[NbdConnection] = set()
        self._stall_timer: asyncio.TimerHandle | None = None
        #: Exports whose clients never wait for the daemon-wide budget:
        #: the active exports of attached VM disks (a guest's reads must
        #: not stall behind anybody's unread replies).
        self.guest_exports: set[str] = set()
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
        """Unregister NAME; its clients get ``shutdown_timeout`` to finish, then
        are aborted (their queued operations still complete in C)."""
        self._exports.pop(name, None)
        if self._default == name:
            self._default = next(iter(self._exports), None)
        await self._drain(list(self._by_export.pop(name, ())))

    async def _drain(self, conns: Iterable[NbdConnection],
                     replay: frozenset[str] = frozenset()) -> None:
        """Shut CONNS down: bounded wait, then abort the stragglers.

        Connections to exports in REPLAY are shut down for a client that
        replays unanswered requests (see :meth:`NbdConnection.shutdown`).
        """
        conns = list(conns)
        for conn in conns:
            conn.shutdown(replay=conn.export is not None and conn.export.info.name in replay)
        pending = [c.closed for c in conns if not c.closed.done()]
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=self.shutdown_timeout)
        stragglers = [c for c in conns if c.closed in late]
        for conn in stragglers:
            log.warning("client %s did not finish within %gs, aborting",
                        conn.peer, self.shutdown_timeout)
            conn.abort()

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
        """Register a new connection (it stays until ``conn.closed``).

        :return: False when ``-e`` negotiated clients are connected already,
            or when the connection ate into :data:`FD_RESERVE`.
        """
        if self.shared and len(self._negotiated) >= self.shared:
            log.warning("refusing client: %d clients already (-e %d)",
                        len(self._negotiated), self.shared)
            return False
        left = _fds_left(len(self._connections))
        if left < FD_RESERVE:
            log.warning("refusing client: %d file descriptors left, kept for the control "
                        "socket", left)
            return False
        self._connections.add(conn)
        self._ever_connected = True
        conn.closed.add_done_callback(lambda _: self._forget(conn))
        self._count_changed()
        return True

    def negotiated(self, conn: NbdConnection, export_name: str) -> bool:
        """CONN finished its handshake on EXPORT_NAME.

        :return: False when it would exceed ``-e`` (the caller drops it).
        """
        if self.shared and len(self._negotiated) >= self.shared:
            log.warning("refusing client %s: %d clients already (-e %d)",
                        conn.peer, len(self._negotiated), self.shared)
            return False
        self._negotiated.add(conn)
        self._by_export.setdefault(export_name, set()).add(conn)
        return True

    def _forget(self, conn: NbdConnection) -> None:
        """CONN is gone and its last operation completed."""
        self._connections.discard(conn)
        self._negotiated.discard(conn)
        self._budget_waiters.discard(conn)
        if conn.export is not None:
            conn.export.stats.connections -= 1
            conn.export.client_gone()
            peers = self._by_export.get(conn.export.info.name)
            if peers is not None:
                peers.discard(conn)
        self._count_changed()
        if not self._connections and not self.persistent and self._on_idle is not None:
            self._on_idle()

    # -- reply budget ----------------------------------------------------------

    def charge(self, delta: int) -> None:
        """Account DELTA bytes of READ replies held (negative: released)."""
        self._charged += delta
        if delta < 0 and self._budget_waiters and self._charged < self.reply_budget:
            waiters = list(self._budget_waiters)
            self._budget_waiters.clear()
            loop = asyncio.get_running_loop()
            for conn in waiters:
                loop.call_soon(conn.resume_parsing)

    def over_budget(self, conn: NbdConnection) -> bool:
        """Whether CONN must wait for the daemon-wide reply budget (never
        for a guest's connection: its own per-connection bound is enough)."""
        if self._charged < self.reply_budget:
            return False
        if conn.export is not None and conn.export.info.name in self.guest_exports:
            return False
        self._budget_waiters.add(conn)
        if self._stall_timer is None:
            self._stall_timer = asyncio.get_running_loop().call_later(1.0, self._check_stalls)
        return True

    @property
    def reply_bytes(self) -> int:
        """Bytes of READ replies held daemon-wide."""
        return self._charged

    def _check_stalls(self) -> None:
        self._stall_timer = None
        if not self._budget_waiters or self._charged < self.reply_budget:
            return
        now = time.monotonic()
        for conn in list(self._connections):
            if conn.paused_since and now - conn.paused_since > self.stall_timeout:
                log.warning("client %s has not read its replies for %.0fs while others "
                            "wait for the reply budget; aborting", conn.peer,
                            now - conn.paused_since)
                conn.abort()
        self._stall_timer = asyncio.get_running_loop().call_later(1.0, self._check_stalls)

    def _count_changed(self) -> None:
        if self.on_count_change is not None:
            self.on_count_change(len(self._connections))

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def sync_stats(self) -> None:
        """Bring the exports' counters up to date with what native
        connections counted."""
        for conn in self._connections:
            conn.fold_stats()

    @property
    def native_reply_bytes(self) -> int:
        """Reply memory of the native connections (each bounded in C)."""
        return sum(c.native_reply_bytes for c in self._connections)

    def in_flight(self, export_name: str) -> int:
        """Requests received and not yet answered on EXPORT_NAME's connections."""
        return sum(c.in_flight for c in self._by_export.get(export_name, ()))

    # -- listeners -----------------------------------------------------------

    def _factory(self) -> NbdConnection:
        return NbdConnection(self, self._tls_context if self.tls.unix else None)

    def _tcp_factory(self) -> NbdConnection:
        return NbdConnection(self, self._tls_context)

    def _prepare_tls(self) -> None:
        """Build the TLS server context once, before the first TCP listener.

        :raise ValueError: when the certificate, key, CA or PSK file is
            unusable (the message names it).
        """
        if self.tls.enabled and self._tls_context is None:
            self._tls_context = self.tls.server_context()
            log.info("TLS %s on TCP%s listeners%s",
                     "required" if self.tls.mode == "require" else "offered",
                     " and Unix" if self.tls.unix else "",
                     f", {len(self.tls.authz)} client names allowed" if self.tls.authz
                     else "")

    async def listen_unix(self, path: str, mode: int = DEFAULT_SOCKET_MODE,
                          group: str | None = None) -> None:
        """Listen on a Unix socket at PATH (a stale socket file is replaced).

        The socket file is created private (whatever the umask: a umask of
        000 would otherwise let any local user read and write every disk),
        then given GROUP and then MODE.

        :param mode: permission bits for the socket file.
        :param group: group name or gid to give the socket file.
        :raise OSError: when PATH exists and is not a socket, bind fails, or
            the mode or group cannot be set.
        """
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
            if unix_socket_in_use(path):
                raise OSError(errno.EADDRINUSE, f"{path}: address already in use")
            os.unlink(path)
        if self.tls.unix:
            self._prepare_tls()
        loop = asyncio.get_running_loop()
        # Start-up only: no other thread creates files meanwhile.
        old = os.umask(0o177)
        try:
            server = await loop.create_unix_server(self._factory, path, backlog=512)
        finally:
            os.umask(old)
        self._servers.append(server)
        self._unix_paths.append(path)
        if group is not None:
            try:
                gid = group_id(group)
            except KeyError:
                raise OSError(errno.EINVAL, f"no group named {group!r}") from None
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        log.info("listening on unix:%s", path)

    async def listen_tcp(self, host: str | None, port: int) -> None:
        """Listen on HOST:PORT (all addresses when HOST is None).

        :raise OSError: when the address is in use or cannot be bound.
        :raise ValueError: when TLS is configured and its files are unusable.
        """
        self._prepare_tls()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self._tcp_factory, host, port, backlog=512, reuse_address=True
        )
        self._servers.append(server)
        for sock in server.sockets:
            log.info("listening on tcp:%s", sock.getsockname())

    async def listen_socket(self, sock: socket.socket) -> None:
        """Serve on an inherited listening socket (systemd activation).

        :raise ValueError: for a TCP socket when TLS is configured and its
            files are unusable.
        """
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            if self.tls.unix:
                self._prepare_tls()
            server = await loop.create_unix_server(self._factory, sock=sock)
        else:
            self._prepare_tls()
            server = await loop.create_server(self._tcp_factory, sock=sock)
        self._servers.append(server)
        log.info("serving inherited socket %s", sock.getsockname())

    async def close(self, replay: frozenset[str] = frozenset()) -> None:
        """Stop accepting, give clients ``shutdown_timeout`` to finish, abort the rest.

        Clients of the exports in REPLAY get no answer to requests that
        arrive from now on (they replay them after reconnecting).

        Then waits (bounded again) for the operations of aborted clients, so
        the final flush usually comes after every write.
        """
        for server in self._servers:
            server.close()
        await self._drain(self._connections, replay)
        pending = [c.closed for c in self._connections if not c.closed.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.shutdown_timeout)
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._servers:
            await asyncio.wait(
                [asyncio.ensure_future(s.wait_closed()) for s in self._servers],
                timeout=self.shutdown_timeout,
            )
        self._servers.clear()
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._unix_paths.clear()


def _fds_left(connections: int) -> int:
    """File descriptors left under the soft RLIMIT_NOFILE.

    Counting /proc/self/fd costs a directory read, so it is only done once
    CONNECTIONS (each holds a socket, and a duplicate for worker replies)
    could bring the table near the limit.
    """
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY or 2 * connections + 4 * FD_RESERVE < limit // 2:
        return FD_RESERVE * 4
    try:
        return limit - len(os.listdir("/proc/self/fd"))
    except OSError:
        return FD_RESERVE * 4
