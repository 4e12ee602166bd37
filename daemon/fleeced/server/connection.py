"""One NBD connection: asyncio glue around the sans-IO engine.

The engine parses and validates; this module runs each accepted command as a
task against the chosen export and writes replies.  All replies go through
the engine's outgoing queue and are written with one ``writelines`` call on
the event-loop thread, so a reply header and its payload are never
interleaved with another reply.

Flow control: parsing (and reading from the socket) pauses while too many
requests are in flight, while the transport's write buffer is above its
high-water mark (a client that never reads its replies), while this
connection holds more than :data:`CONN_REPLY_BUDGET` bytes of READ replies or
of replies waiting for the socket, or while the daemon as a whole holds more
than its reply budget (see :class:`~fleeced.server.NbdServer`; connections of
attached VM disks never wait for it), so memory stays bounded.  A READ larger
than :data:`STREAM_PIECE` is *streamed*: read and sent a piece at a time, each
piece only once the last one has left the transport, so no reply is ever held
whole and a client that stops reading costs the daemon about a piece.

Every wait is bounded: the handshake (``handshake_limit``), the drain at
shutdown and at fleece-stop (``shutdown_timeout``, then the transport is
aborted), and a close that cannot flush (aborted after ``shutdown_timeout``).
A connection stays in the server's registry until its last operation has
completed (:attr:`NbdConnection.closed`), whatever happened to the socket.

TLS: when the engine acknowledges NBD_OPT_STARTTLS (event ``StartTls``) the
acknowledgement is the last plaintext written; reading stops and
``loop.start_tls`` upgrades the transport, bounded by ``handshake_limit``.
The upgrade counts as an operation in flight (``closed`` waits for it).  A
failed handshake drops the connection: nothing is ever sent in plaintext
after the ACK, and nothing received in plaintext after STARTTLS is parsed
(the engine refuses it).  On a TLS connection every reply goes through the
TLS transport: native workers never write to the socket, since their writes
would bypass the encryption.

Replies have one owner, :class:`~fleeced.server.replies.ReplyWriter`: it
holds the transport, the workers' socket handle and the hand-off between
worker-written and loop-written replies.  Exports are driven through
"submit a command, get a result" (:class:`~fleeced.exports.Export`); this
module never imports the data path.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import ssl
import sys
import termios
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Final, cast

from fleeced.exports import ReplyTorn, open_reply_socket
from fleeced.nbd import (
    NEED_DATA,
    Command,
    Disconnect,
    ExportChosen,
    LocalProtocolError,
    NbdCmd,
    NbdCmdFlag,
    NbdErrno,
    NbdProtocolError,
    PieceReply,
    Rejected,
    ServerConnection,
    StartTls,
    TlsMode,
    to_nbd_errno,
)
from fleeced.nbd.wire import REQUEST as _REQUEST
from fleeced.server.replies import ReplyWriter

if TYPE_CHECKING:
    from fleeced.datapath import ConnStats, NativeConn
    from fleeced.exports import Export, ReadResult, ReplySocket
    from fleeced.server.listener import NbdServer

log = logging.getLogger(__name__)

_CMD_READ: Final = int(NbdCmd.READ)

#: Requests in flight per connection before reading pauses.
MAX_IN_FLIGHT: Final = 64
#: Seconds a connection refused after its TLS handshake reads and drops
#: what its client still sends before it is aborted (as native connections
#: linger at their close).
REFUSED_LINGER: Final = 0.5

#: READs at least this large have their reply written by a native worker
#: (header + data straight to the socket, never waiting on it), taking the
#: copy into the socket off the event-loop thread.
SEND_MIN: Final = 64 * 1024
#: Most READs one call of Export.read_run answers (one send for all of
#: them; what the loop flushed after before runs, 16 inline reads).
RUN_MAX: Final = 16
#: Most WRITEs one Export.write_run queues as one operation, which one
#: worker writes in order.  More per run serialises copy-before-write
#: behind one worker: with 16, guest 4k writes during a backup ran at
#: 14.7-15.8k IOPS, p99 7.2-7.3 ms; with 4, 17.3-19.7k at 6.3-6.7 ms (the
#: same 4k QD16 IOPS when serving, 2 pairs each; 2 per run lost 20 %).
WRITE_RUN_MAX: Final = 4
#: A WRITE is acknowledged by the worker that wrote it only while fewer
#: requests than this are in flight on the connection: at queue depth 1 that
#: saves the trip back through the loop (+35 % 4k IOPS at QD1);
#: deeper queues are faster with the loop's batched replies (one send for
#: many; worker-written 16-byte replies cost 10-20 % IOPS at QD16).
WORKER_ACK_MAX_IN_FLIGHT: Final = 2
#: Bytes of READ replies one connection may hold (admitted and not yet handed
#: to the socket), and bytes of replies held while the socket is a worker's or
#: a stream's, before it stops parsing requests.  One request is always
#: admitted, so a connection holds at most this plus one piece, plus its
#: transport's buffer (WRITE_BUFFER_HIGH): what a client that stops reading
#: costs, whatever it asked for.
CONN_REPLY_BUDGET: Final = 1024 * 1024
#: READs longer than this are streamed (a piece of this size at a time).
STREAM_PIECE: Final = 1024 * 1024


class _Stream:
    """A READ being answered a piece at a time (see NbdConnection._pump)."""

    __slots__ = ("cmd", "reply", "pos", "started", "busy")

    def __init__(self, cmd: Command, reply: PieceReply) -> None:
        self.cmd = cmd
        self.reply = reply
        self.pos = 0  # data bytes handed over (to a worker's send or the transport)
        self.started = False  # owns the socket (ReplyWriter.begin_stream)
        self.busy = False  # a piece is being read


class NbdConnection(asyncio.Protocol):
    """asyncio protocol for one client connection.

    :param tls_context: the server context for STARTTLS (TCP connections
        when ``--tls`` is on or require); None: STARTTLS is refused.
    """

    def __init__(self, server: NbdServer, tls_context: ssl.SSLContext | None = None, *,
                 open_socket: Callable[[int], ReplySocket] | None = open_reply_socket,
                 ) -> None:
        """:param open_socket: makes the workers' socket handle (None: the
            loop writes every reply; tests without the native queue)."""
        self._server = server
        tls_mode = TlsMode(server.tls.mode) if tls_context is not None else TlsMode.OFF
        self._engine = ServerConnection(server.lookup_info, server.list_infos, tls_mode)
        self._replies = ReplyWriter(self._engine.data_to_send, open_socket,
                                    self._engine.has_data_to_send)
        self._tls_context = tls_context
        # The plaintext transport while start_tls() runs (self._transport is
        # None then), and TLS data that arrived before start_tls() returned.
        self._upgrading: asyncio.Transport | None = None
        self._early: list[bytes] = []
        #: Refused after the TLS handshake (``--tls-authz``, no client
        #: certificate): whatever the client still sends is dropped unread.
        self._refused = False
        self.export: Export | None = None
        self.peer = "?"
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight = 0  # tasks plus native queue operations
        self._writing_paused = False
        self.paused_since = 0.0  # monotonic time writing paused (0: not paused)
        self._reading_paused = False
        self._closing = False
        self._disconnect_requested = False
        self._shutdown = False
        #: Shut down for a client that reconnects and replays (QEMU's nbd
        #: node of an attached disk): new requests are read and dropped.
        self._replay = False
        self.dropped = 0
        self._eof = False  # the client half-closed (or closed) its side
        self._held = False  # parsing stopped at _hold(); an op completion retries
        self.negotiated = False
        # The export takes runs of READs and WRITEs itself (Export.read_run,
        # write_run); off once shut down: a replay drops requests instead of
        # answering them.
        self._runs = False
        self.reply_bytes = 0  # READ bytes admitted, reply not yet handed over
        self.paused_bytes = 0  # write buffer held while writing is paused
        # READs (admitted, counted in flight) waiting unread for the socket
        # to be free for workers again; see _defer().
        self._deferred: deque[Command] = deque()
        # Streamed READs (counted in flight), the first one on the wire.
        self._streams: deque[_Stream] = deque()
        # The native connection serving the transmission phase, once the
        # socket was handed over (then nothing of it passes through here),
        # and the counters of it already added to the export's.
        self._native: NativeConn | None = None
        self._folded = (0, 0, 0, 0)
        loop = asyncio.get_running_loop()
        self.closed = loop.create_future()
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None

    @property
    def _transport(self) -> asyncio.Transport | None:
        return self._replies.transport

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        plain = cast(asyncio.Transport, transport)
        self._replies.attach(plain)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer) if peer else "unix"
        if not self._server.connection_opened(self):
            self._closing = True
            plain.abort()
            return
        log.info("client %s connected", self.peer)
        self._handshake_timer = asyncio.get_running_loop().call_later(
            self._server.handshake_limit, self._handshake_expired
        )
        self._flush()

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if not self.negotiated and not self._closing:
            log.warning("client %s: no handshake within %gs, closing",
                        self.peer, self._server.handshake_limit)
            self.abort()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._upgrading is not None:
            # Only the TLS layer calls us now (it owns the plaintext
            # transport): this is decrypted data that came before start_tls()
            # returned (the stdlib loop delivers it that early).
            self._early.append(data)
            return
        self._engine.receive_data(data)
        self._process()

    def eof_received(self) -> bool | None:
        # Once only: the engine refuses data after EOF, and reading never
        # resumes after it (_update_reading), but a transport may still
        # report it twice.
        if not self._eof:
            self._eof = True
            if self._upgrading is None and not self._refused:
                self._engine.receive_eof()
                self._process()
        if self._replies.tls:
            # TLS has no half-close: the TLS layer shuts down after the
            # client's close_notify whatever we return.
            return None
        # Keep the transport open (half-closed): requests still in flight
        # must get their replies; the engine reports Disconnect at the EOF
        # and we close once idle.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._native is not None:
            # Our descriptor only: the socket lives on in the native
            # connection, which reports its own end (_native_done).
            self._replies.close()
            return
        if exc is not None:
            log.info("client %s lost: %s", self.peer, exc)
        else:
            log.info("client %s disconnected", self.peer)
        self._closing = True
        self._cancel_timers()
        self._replies.close()
        self._set_paused_bytes(0)
        self._send_deferred()  # no worker writes now: the loop's path
        self._maybe_closed()

    def _cancel_timers(self) -> None:
        for timer in (self._handshake_timer, self._abort_timer):
            if timer is not None:
                timer.cancel()
        self._handshake_timer = self._abort_timer = None

    def pause_writing(self) -> None:
        self._writing_paused = True
        self.paused_since = time.monotonic()
        if self._transport is not None:
            self._set_paused_bytes(self._transport.get_write_buffer_size())
        self._update_reading()

    def resume_writing(self) -> None:
        self._replies.drained()
        self._writing_paused = False
        self.paused_since = 0.0
        self._set_paused_bytes(0)
        self._send_deferred()
        self.resume_parsing()

    def resume_parsing(self) -> None:
        """Parse what was held back (write buffer drained, budget freed)."""
        if not self._disconnect_requested or self._shutdown:
            self._held = False
            self._process()
        self._update_reading()

    def _set_paused_bytes(self, n: int) -> None:
        self._server.charge(n - self.paused_bytes)
        self.paused_bytes = n

    def _admit(self, cmd: Command) -> None:
        """Charge a READ's reply bytes until the reply is handed over."""
        self._charge(cmd.length)

    def _release(self, cmd: Command) -> None:
        self._charge(-cmd.length)

    def _charge(self, n: int) -> None:
        self.reply_bytes += n
        self._server.charge(n)

    # -- engine pump -------------------------------------------------------

    def _hold(self) -> bool:
        """Whether to stop parsing for now (bounded memory per connection).

        At shutdown everything already received is parsed (and answered
        ESHUTDOWN by the engine): small replies, bounded by what was read.
        """
        if self._shutdown:
            return False
        return (
            self._writing_paused
            or self._inflight >= MAX_IN_FLIGHT
            or self.reply_bytes + self._replies.held_bytes >= CONN_REPLY_BUDGET
            # the handshake needs no budget: only READ replies are charged
            or (self.negotiated and self._server.over_budget(self))
        )

    def _process(self) -> None:
        engine = self._engine
        inline = 0
        while not self._closing:
            # Parse no further while the client is not reading its replies
            # or too much is in flight; what was received stays in the
            # engine's buffer and reading from the socket pauses.
            if self._hold():
                self._held = True  # whatever frees the hold parses again
                break
            if self._runs and self._take_run():
                continue
            try:
                event = engine.next_event()
            except NbdProtocolError as exc:
                log.warning("client %s: protocol error, closing: %s", self.peer, exc)
                self._flush()
                self._abort()
                return
            if event is NEED_DATA:
                break
            if isinstance(event, Command) and self._replay:
                # Unanswered, QEMU replays it on its next connection; an
                # ESHUTDOWN reply would reach the guest as an I/O error.
                self.dropped += 1
                log.debug("client %s: %s left for replay after reconnect", self.peer,
                          event.cmd.name)
                continue
            if isinstance(event, Command):
                if event.cmd == NbdCmd.READ:
                    if self._read_inline(event):
                        inline += 1
                        if inline % 16 == 0:
                            self._flush()  # may pause_writing() -> _hold()
                        continue
                    if event.length > STREAM_PIECE:
                        self._stream(event)
                        continue
                    self._admit(event)
                    if self._submit_read(event):
                        continue
                elif event.cmd == NbdCmd.WRITE and self._submit_write(event):
                    continue
                self._start(event)
            elif isinstance(event, Rejected):
                if self.export is not None:
                    self.export.stats.requests += 1
                    self.export.stats.errors += 1
                log.debug(
                    "client %s: rejected cmd %s: %s", self.peer, event.cmd, event.error.name
                )
            elif isinstance(event, ExportChosen):
                export = self._server.get_export(event.export.name)
                if export is None or not self._server.negotiated(self, event.export.name):
                    # removed between lookup and GO, or over -e
                    self._flush()
                    self._abort()
                    return
                self.negotiated = True
                if self._handshake_timer is not None:
                    self._handshake_timer.cancel()
                    self._handshake_timer = None
                self.export = export
                self._runs = export.takes_runs and not self._replay
                export.stats.connections += 1
                export.stats.connections_total += 1
                log.info("client %s: export %r", self.peer, event.export.name)
                if self._go_native(export):
                    return
            elif isinstance(event, Disconnect):
                self._disconnect_requested = True
                self._close_when_idle()
                break
            elif isinstance(event, StartTls):
                self._start_tls()
                return
        self._flush()
        self._update_reading()
        if self._shutdown:
            self._close_when_idle()

    # -- the native data plane -------------------------------------------------

    def _go_native(self, export: Export) -> bool:
        """Hand a plain connection's transmission phase to C, when the
        export has a native form and nothing is half done here: from then
        on only the native connection's end comes back (:meth:`_native_done`)."""
        transport = self._transport
        engine = self._engine
        if not self._server.native or self._replies.tls or self._shutdown or transport is None \
                or transport.is_closing() or self._inflight:
            return False
        self._flush()
        if transport.get_write_buffer_size() or engine.has_data_to_send():
            return False
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            rules, rest = engine.transmission_rules()
        except LocalProtocolError:
            return False
        # Nothing more is read here from now: the socket is C's or, if the
        # start fails, read again below.
        transport.pause_reading()
        try:
            native = export.start_native(sock.fileno(), rules, engine.structured,
                                         engine.meta_contexts, rest)
        except OSError as exc:
            log.warning("client %s: native data plane refused (%s); serving it here",
                        self.peer, exc)
            native = None
        if native is None:
            transport.resume_reading()
            return False
        engine.handed_over()
        self._native = native
        asyncio.get_running_loop().add_reader(native.done_fd, self._native_done)
        transport.abort()  # our descriptor: the native connection has its own
        return True

    def _native_done(self) -> None:
        native = self._native
        assert native is not None
        asyncio.get_running_loop().remove_reader(native.done_fd)
        st = self.fold_stats()
        if st is not None and st.reason:
            log.info("client %s: closed: %s", self.peer, st.reason)
        else:
            log.info("client %s disconnected", self.peer)
        native.close()
        self._closing = True
        self._cancel_timers()
        if not self.closed.done():
            self.closed.set_result(None)

    def fold_stats(self) -> ConnStats | None:
        """Add what the native connection counted since the last call to
        the export's counters; its stats, or None when not native."""
        native = self._native
        if native is None or native.closed or self.export is None:
            return None
        st = native.stats()
        now = (st.requests, st.errors, st.bytes_read, st.bytes_written)
        old = self._folded
        stats = self.export.stats
        stats.requests += now[0] - old[0]
        stats.errors += now[1] - old[1]
        stats.bytes_read += now[2] - old[2]
        stats.bytes_written += now[3] - old[3]
        self._folded = now
        return st

    # -- TLS upgrade ---------------------------------------------------------

    def _start_tls(self) -> None:
        """Bottom half: the engine acknowledged NBD_OPT_STARTTLS; upgrade now."""
        assert self._tls_context is not None
        # The ACK is the last plaintext of this connection; STARTTLS is an
        # option, so no request ran yet: no worker holds the socket.
        transport = self._replies.start_tls()
        if transport.is_closing():
            self._abort()
            return
        transport.pause_reading()
        self._reading_paused = False  # the TLS transport starts out reading
        self._writing_paused = False
        self.paused_since = 0.0
        self._set_paused_bytes(0)
        self._upgrading = transport
        self._inflight += 1  # `closed` waits for the handshake to end
        task = asyncio.get_running_loop().create_task(
            self._upgrade(transport, self._tls_context)
        )
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _upgrade(self, plain: asyncio.Transport, context: ssl.SSLContext) -> None:
        """Bottom half: run the TLS handshake; on any failure drop the client."""
        loop = asyncio.get_running_loop()
        tls: asyncio.Transport | None = None
        error: BaseException | None = None
        try:
            tls = await loop.start_tls(
                plain, self, context, server_side=True,
                ssl_handshake_timeout=self._server.handshake_limit,
                ssl_shutdown_timeout=self._server.shutdown_timeout,
            )
        except Exception as exc:  # ssl.SSLError, ConnectionError, timeouts...
            error = exc
        finally:
            self._upgrading = None
            if tls is None:  # failed or cancelled: never a plaintext word more
                self._closing = True
                plain.abort()
        if tls is None or self._closing or tls.is_closing():
            # proto.md "FORCEDTLS mode": if the handshake is unsuccessful the
            # server MUST terminate the session.
            reason = (str(error) or type(error).__name__) if error else "connection closed"
            log.warning("client %s: TLS handshake failed, closing: %s", self.peer, reason)
            self._closing = True
            self._early.clear()
            if tls is not None:  # else plain was aborted above
                tls.abort()
            return
        sslobj = tls.get_extra_info("ssl_object")
        why = self._server.tls.denied(sslobj.getpeercert() if sslobj is not None else None)
        if why is not None:
            # As qemu-nbd: the allow-list is checked once the handshake is
            # done, and a client not on it is dropped before any option.
            log.warning("client %s: %s, closing", self.peer, why)
            self._refuse(plain, tls)
            return
        self._replies.attach(tls)
        self._engine.tls_started()
        if sslobj is not None:
            cipher = sslobj.cipher()
            peer = sslobj.getpeercert() or {}
            subject = ",".join("=".join(rdn[0]) for rdn in peer.get("subject", ()))
            log.info("client %s: TLS up (%s, %s)%s", self.peer, sslobj.version(),
                     cipher[0] if cipher else "?",
                     f", client certificate {subject}" if subject else "")
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)
        if self._eof and not self._closing:
            self._engine.receive_eof()
            self._process()

    def _refuse(self, plain: asyncio.Transport, tls: asyncio.Transport) -> None:
        """End a connection refused right after its TLS handshake the way
        qemu-nbd does: the TCP end goes out first (no TLS close_notify:
        the client sees the session cut, not a clean end), and what the
        client sent meanwhile (its first option) is read and dropped, so
        the close never resets the connection under the client before it
        read the end; 500 ms at most, then the transport is aborted."""
        self._closing = True
        self._refused = True
        self._early.clear()
        try:
            plain.write_eof()
        except (OSError, RuntimeError):  # already gone, or cannot half-close
            tls.abort()
            return
        asyncio.get_running_loop().call_later(REFUSED_LINGER, tls.abort)

    def _take_run(self) -> bool:
        """Have the export take the READs or WRITEs at the head of the input,
        up to :data:`RUN_MAX` in one call: READs answered from the page
        cache and sent at once (like :meth:`_read_inline`, not admitted to
        the reply budget), WRITEs queued as one operation whose replies go
        out when it completes (:meth:`_write_run_done`).

        :return: False when the engine must parse the next request (another
            command, one the export leaves to the engine, not cached, a
            lone WRITE: the worker-acknowledged path is faster for those).
        """
        engine = self._engine
        offered = engine.next_run()
        if offered is None:
            return False
        cmd, rule, data, pos = offered
        export = self.export
        assert export is not None
        try:
            if cmd == _CMD_READ:
                got = export.read_run(rule, data, pos, RUN_MAX)
            elif self._inflight < WORKER_ACK_MAX_IN_FLIGHT:
                return False  # the queue is shallow: the worker acknowledges
            else:  # MAX_IN_FLIGHT stays exact: _hold() let one more in
                taken = export.write_run(rule, data, pos,
                                         min(WRITE_RUN_MAX, MAX_IN_FLIGHT - self._inflight))
                if taken is None:
                    return False
                self._write_run(*taken)
                return True
        except OSError as exc:  # a rule C refuses, or the queue is closing
            log.warning("client %s: no request runs: %s", self.peer, exc)
            self._runs = False
            return False
        if got is None:
            return False
        consumed, count, nbytes, replies = got
        engine.take_run(consumed, replies)
        stats = export.stats
        stats.requests += count
        stats.bytes_read += nbytes
        self._flush()  # may pause_writing() -> _hold()
        return True

    def _write_run(self, consumed: int, count: int, nbytes: int, acks: bytes, req: bytes,
                   fut: asyncio.Future[list[int]]) -> None:
        self._engine.take_run(consumed)
        self._inflight += count
        fut.add_done_callback(lambda f: self._write_run_done(count, nbytes, acks, req, f))

    def _write_run_done(self, count: int, nbytes: int, acks: bytes, req: bytes,
                        fut: asyncio.Future[list[int]]) -> None:
        """Answer a run of WRITEs: the checked acks when every write
        succeeded, else request by request (as :meth:`_write_done` would)."""
        export = self.export
        assert export is not None
        stats = export.stats
        stats.requests += count
        rcs = None if fut.cancelled() or fut.exception() else fut.result()
        if rcs is not None and not any(rcs):
            stats.bytes_written += nbytes
            self._engine.reply_run(acks)
        else:
            pos = 0
            for i in range(count):
                _magic, flags, _cmd, cookie, offset, length = _REQUEST.unpack_from(req, pos)
                pos += _REQUEST.size + length
                rc = -errno.ESHUTDOWN if rcs is None else rcs[i]
                if rc == 0:
                    stats.bytes_written += length
                    self._engine.reply_run(acks[16 * i:16 * (i + 1)])
                else:
                    cmd = Command(cookie, NbdCmd.WRITE, NbdCmdFlag(flags), offset, length)
                    self._reply_oserror(export, cmd, OSError(-rc, os.strerror(-rc)))
        self._inflight -= count - 1  # _op_done() takes the last one
        self._op_done()

    def _read_inline(self, cmd: Command) -> bool:
        """Answer a READ from the page cache without a task or thread hop.

        Not admitted against the reply budget: the reply is handed over at
        once (the engine's output is flushed every 16 of them).

        :return: False when the read would block (or failed): the task path
            then does it, and reports any error.
        """
        export = self.export
        assert export is not None
        try:
            got = export.read_now(cmd.offset, cmd.length)
        except OSError:
            return False
        if got is None:
            return False
        stats = export.stats
        stats.requests += 1
        stats.bytes_read += cmd.length
        self._engine.reply_read(cmd.cookie, cmd.offset, got.data, got.hole)
        return True

    # The hot path submits READ/WRITE straight to the native queue and
    # answers from the future's callback: no task, no coroutine frame.
    # Submission errors fall back to the task path, which reports them.

    def _submit_read(self, cmd: Command) -> bool:
        if cmd.length >= SEND_MIN:
            # Behind those already waiting, or wait for the socket.
            sock = None if self._deferred else self._replies.worker_socket()
            if sock is None:
                if self._defer(cmd):
                    return True
            elif self._submit_send(cmd, sock):
                self._inflight += 1
                return True
        if not self._submit_plain_read(cmd):
            return False
        self._inflight += 1
        return True

    def _submit_plain_read(self, cmd: Command) -> bool:
        """Submit a READ answered by the loop (not counted in flight here)."""
        export = self.export
        assert export is not None
        try:
            fut = export.submit_read(cmd.offset, cmd.length)
        except OSError:
            return False
        fut.add_done_callback(lambda f: self._read_done(cmd, f))
        return True

    def _defer(self, cmd: Command) -> bool:
        """Have a large READ wait, unread, until workers may write its reply
        (the socket is busy: stalled, or the loop's bytes still buffered).

        Read now, its data would only wait in memory and then cost the loop
        a send -- the copy sendfile saves.  It stays admitted and in flight;
        :meth:`_send_deferred` submits it once the socket is free, and the
        wait is bounded like any full buffer: parsing pauses meanwhile, and a
        client that stops reading is timed as stalled.

        :return: False when no worker will write again (the loop must).
        """
        if not self._replies.may_wait():
            return False
        self._deferred.append(cmd)
        self._inflight += 1
        self._replies.notify_when_drained()
        return True

    def _send_deferred(self) -> None:
        """Move the streamed reply along, and submit the READs that wait for
        the socket, while workers may write; when they never will again
        (closing), on the loop's path."""
        self._pump()
        while self._deferred:
            sock = self._replies.worker_socket()
            if sock is None and self._replies.may_wait():
                self._replies.notify_when_drained()
                return
            cmd = self._deferred.popleft()
            if sock is not None and self._submit_send(cmd, sock):
                continue
            self._inflight -= 1
            if not self._submit_plain_read(cmd):
                self._start(cmd)  # the task path reports the error
            else:
                self._inflight += 1

    # -- streamed READs -----------------------------------------------------

    def _stream(self, cmd: Command) -> None:
        """Answer a READ too large to hold whole: a piece at a time (see
        :meth:`_pump`), after the export said the whole range is readable
        (once a piece is out, not every wire form can carry an error)."""
        export = self.export
        assert export is not None
        try:
            export.check_read(cmd.offset, cmd.length)
        except OSError as exc:
            export.stats.requests += 1
            self._reply_oserror(export, cmd, exc)
            return
        reply = self._engine.piece_reply(cmd.cookie, cmd.offset, cmd.length, cmd.flags)
        self._streams.append(_Stream(cmd, reply))
        self._inflight += 1
        self._pump()

    def _pump(self) -> None:
        """Move the streamed reply at the head along.

        It takes the socket once no worker reply is in flight (its replies
        are complete: they go first); then each piece is read only once the
        last one has left the transport: through a worker that sends it
        straight to the socket when it can, else through the transport.
        Whatever frees the socket calls this again (a worker's reply coming
        back, ``resume_writing``).  Streams nobody can be sent to any more
        are dropped.
        """
        export = self.export
        while self._streams:
            st = self._streams[0]
            if st.busy:
                return
            if self._closing:
                self._streams.popleft()
                if st.started:
                    self._replies.end_stream()
                self._inflight -= 1
                continue
            if not st.started:
                if not self._replies.begin_stream():
                    return
                st.started = True
            if self._writing_paused:
                return
            n = min(STREAM_PIECE, st.cmd.length - st.pos)
            header = st.reply.header(st.pos, n)
            sock = self._replies.worker_socket(stream=True)
            if sock is None and self._replies.may_wait():
                self._replies.notify_when_drained()  # our last piece is still leaving
                return
            assert export is not None
            try:
                fut = export.submit_read(st.cmd.offset + st.pos, n, sock, header,
                                         piece=st.pos > 0)
            except OSError as exc:
                self._piece_failed(st, exc)
                continue
            st.busy = True
            # Charged daemon-wide, not against this connection's budget: a
            # stream reads one piece at a time anyway, and other requests
            # go on meanwhile.
            self._server.charge(n)
            if sock is not None:
                self._replies.worker_started()
            fut.add_done_callback(partial(self._piece_done, st, n, header, sock is not None))
            return

    def _piece_done(self, st: _Stream, n: int, header: bytes, by_worker: bool,
                    fut: asyncio.Future[ReadResult]) -> None:
        st.busy = False
        self._server.charge(-n)
        result = None if fut.cancelled() or fut.exception() else fut.result()
        if by_worker:
            if result is not None and result.deferred:
                self._replies.worker_deferred()  # the socket was stalled: again
                self._send_deferred()
                return
            self._replies.worker_done(header, result.data if result else b"",
                                      result.sent if result else 0)
        if self._reply_torn(fut) or self._closing:
            self._finish_stream()
            return
        if result is None:
            exc = None if fut.cancelled() else fut.exception()
            self._piece_failed(st, exc if isinstance(exc, OSError)
                               else OSError(errno.ESHUTDOWN, "server shutting down"))
            self._send_deferred()
            return
        if not result.sent:  # a hole, or the socket was full: the loop sends it
            hole = st.reply.hole(st.pos, n) if result.hole else None
            self._replies.stream_write([hole] if hole is not None else [header, result.data])
        st.pos += n
        if st.pos < st.cmd.length:
            self._send_deferred()
            return
        export = self.export
        assert export is not None
        export.stats.requests += 1
        export.stats.bytes_read += st.cmd.length
        self._finish_stream()

    def _piece_failed(self, st: _Stream, exc: OSError) -> None:
        """A piece could not be read (nothing of it went out): the reply
        ends with the error -- a plain error reply when no piece went out
        yet, an error chunk when the wire form has one, else the connection
        ends (a success header is out already)."""
        export = self.export
        assert export is not None
        export.stats.requests += 1
        if st.pos == 0:
            self._finish_stream()
            self._reply_oserror(export, st.cmd, exc)
            self._flush()
            return
        export.stats.errors += 1
        chunk = st.reply.error(to_nbd_errno(exc.errno or errno.EIO, st.cmd.flags),
                               export.error_message(exc))
        log.info("client %s: READ off=%d len=%d failed after %d bytes: %s%s", self.peer,
                 st.cmd.offset, st.cmd.length, st.pos, exc.strerror or exc,
                 "" if chunk is not None else " (simple reply begun: closing)")
        if chunk is not None:
            self._replies.stream_write([chunk])
        else:
            self._abort()
        self._finish_stream()

    def _finish_stream(self) -> None:
        """The head stream is done (answered, or abandoned): the socket goes
        back, the next stream or the held replies go out."""
        self._streams.popleft()
        self._replies.end_stream()
        self._op_done()

    def _submit_send(self, cmd: Command, sock: ReplySocket) -> bool:
        """Submit a READ whose reply a native worker may write itself to SOCK
        (not counted in flight here)."""
        export = self.export
        assert export is not None
        header = self._engine.read_reply_header(cmd.cookie, cmd.offset, cmd.length)
        try:
            fut = export.submit_read(cmd.offset, cmd.length, sock, header)
        except OSError:
            return False
        self._replies.worker_started()
        fut.add_done_callback(lambda f: self._send_done(cmd, header, f))
        return True

    def _send_done(self, cmd: Command, header: bytes,
                   fut: asyncio.Future[ReadResult]) -> None:
        result = None if fut.cancelled() or fut.exception() else fut.result()
        if result is not None and result.deferred:
            # Handed back unread: still admitted and in flight.
            self._replies.worker_deferred()
            self._deferred.append(cmd)
            self._send_deferred()
            return
        self._replies.worker_done(header, result.data if result else b"",
                                  result.sent if result else 0)
        if not self._reply_torn(fut) and self._complete(cmd, fut) is not None:
            assert result is not None and self.export is not None
            self.export.stats.bytes_read += cmd.length
            if not result.sent:  # a hole, or the socket was full: reply ourselves
                self._engine.reply_read(cmd.cookie, cmd.offset, result.data, result.hole)
        self._release(cmd)
        self._op_done()

    def _reply_torn(self, fut: asyncio.Future[ReadResult] | asyncio.Future[int]) -> bool:
        """Whether FUT failed writing its reply part way: the stream is torn
        (the connection is aborted here)."""
        exc = None if fut.cancelled() else fut.exception()
        if not isinstance(exc, ReplyTorn):
            return False
        log.info("client %s: reply write failed, closing: %s", self.peer, exc)
        self._abort()
        return True

    def _complete(self, cmd: Command,
                  fut: asyncio.Future[ReadResult] | asyncio.Future[int] | asyncio.Future[None],
                  ) -> Export | None:
        """Account a finished queue operation and answer its failure.

        :return: the export when the operation succeeded (the caller replies).
        """
        export = self.export
        assert export is not None
        export.stats.requests += 1
        if fut.cancelled():
            self._engine.reply_error(cmd.cookie, NbdErrno.ESHUTDOWN, "server shutting down")
            return None
        exc = fut.exception()
        if exc is not None:
            self._reply_exception(export, cmd, exc)
            return None
        return export

    def _read_done(self, cmd: Command, fut: asyncio.Future[ReadResult]) -> None:
        export = self._complete(cmd, fut)
        if export is not None:
            export.stats.bytes_read += cmd.length
            result = fut.result()
            self._engine.reply_read(cmd.cookie, cmd.offset, result.data, result.hole)
        self._release(cmd)
        self._op_done()

    def _submit_write(self, cmd: Command) -> bool:
        """Submit a WRITE; when the socket is free, the worker that wrote
        acknowledges it too, so the reply does not wait for this loop."""
        export = self.export
        assert export is not None and cmd.data is not None
        sock = (self._replies.worker_socket() if self._inflight < WORKER_ACK_MAX_IN_FLIGHT
                else None)
        header = self._engine.ok_reply(cmd.cookie) if sock is not None else b""
        try:
            fut = export.submit_write(cmd.offset, cmd.data, bool(cmd.flags & NbdCmdFlag.FUA),
                                      sock, header)
        except OSError:
            return False
        if fut is None:
            return False
        if sock is not None:
            self._replies.worker_started()
        self._inflight += 1
        fut.add_done_callback(lambda f: self._write_done(cmd, header, f))
        return True

    def _write_done(self, cmd: Command, header: bytes, fut: asyncio.Future[int]) -> None:
        sent = 0 if fut.cancelled() or fut.exception() else fut.result()
        if header:
            self._replies.worker_done(header, b"", sent)
        if not self._reply_torn(fut):
            export = self._complete(cmd, fut)
            if export is not None:
                export.stats.bytes_written += cmd.length
                if not sent:  # no worker reply, or the socket was full
                    self._engine.reply_ok(cmd.cookie)
        self._op_done()

    def _reply_exception(self, export: Export, cmd: Command, exc: BaseException) -> None:
        if isinstance(exc, OSError):
            self._reply_oserror(export, cmd, exc)
        else:  # a bug: answer EIO, keep the connection and log loudly
            log.error("client %s: internal error on %s: %r", self.peer, cmd.cmd.name, exc)
            export.stats.errors += 1
            self._engine.reply_error(cmd.cookie, NbdErrno.EIO, "internal server error")

    def _start(self, cmd: Command) -> None:
        task = asyncio.get_running_loop().create_task(self._run(cmd))
        self._tasks.add(task)
        self._inflight += 1
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._op_done()

    def _run_done(self, cmd: Command) -> None:
        if cmd.cmd == NbdCmd.READ:
            self._release(cmd)

    def _maybe_closed(self) -> None:
        # `closed` means: the peer is gone AND no operation of ours is still
        # queued or running; only then does the server forget us.
        if self._closing and self._inflight == 0 and not self.closed.done():
            self._cancel_timers()
            self.closed.set_result(None)

    def _op_done(self) -> None:
        self._inflight -= 1
        self._maybe_closed()
        self._flush()
        self._send_deferred()
        if self._held and not self._disconnect_requested:
            # An op finished: in-flight count and reply bytes went down, so a
            # hold on either may be over.  Parse what is buffered.
            self._held = False
            self._process()
        self._update_reading()
        if self._disconnect_requested or self._closing:
            self._close_when_idle()

    async def _run(self, cmd: Command) -> None:
        export = self.export
        engine = self._engine
        assert export is not None
        stats = export.stats
        stats.requests += 1
        try:
            kind = cmd.cmd
            if kind == NbdCmd.READ:
                result = await export.read(cmd.offset, cmd.length)
                stats.bytes_read += cmd.length
                engine.reply_read(cmd.cookie, cmd.offset, result.data, result.hole)
            elif kind == NbdCmd.WRITE:
                assert cmd.data is not None
                await export.write(cmd.offset, cmd.data, bool(cmd.flags & NbdCmdFlag.FUA))
                stats.bytes_written += cmd.length
                engine.reply_ok(cmd.cookie)
            elif kind == NbdCmd.BLOCK_STATUS:
                await self._block_status(export, cmd)
            elif kind == NbdCmd.FLUSH:
                await export.flush()
                engine.reply_ok(cmd.cookie)
            elif kind == NbdCmd.TRIM:
                await export.trim(cmd.offset, cmd.length, bool(cmd.flags & NbdCmdFlag.FUA))
                engine.reply_ok(cmd.cookie)
            elif kind == NbdCmd.WRITE_ZEROES:
                await export.zero(
                    cmd.offset,
                    cmd.length,
                    may_trim=not cmd.flags & NbdCmdFlag.NO_HOLE,
                    fast=bool(cmd.flags & NbdCmdFlag.FAST_ZERO),
                    fua=bool(cmd.flags & NbdCmdFlag.FUA),
                )
                engine.reply_ok(cmd.cookie)
            elif kind == NbdCmd.CACHE:
                await export.cache(cmd.offset, cmd.length)
                engine.reply_ok(cmd.cookie)
            else:  # the engine validated the command; nothing else arrives
                raise OSError(errno.EINVAL, f"unexpected command {kind!r}")
        except OSError as exc:
            self._reply_oserror(export, cmd, exc)
        except asyncio.CancelledError:
            engine.reply_error(cmd.cookie, NbdErrno.ESHUTDOWN, "server shutting down")
            raise
        except Exception:  # a bug: answer EIO, keep the connection and log loudly
            log.exception("client %s: internal error on %s", self.peer, cmd)
            engine.reply_error(cmd.cookie, NbdErrno.EIO, "internal server error")
        finally:
            self._run_done(cmd)

    def _reply_oserror(self, export: Export, cmd: Command, exc: OSError) -> None:
        nbd_err = to_nbd_errno(exc.errno or errno.EIO, cmd.flags)
        export.stats.errors += 1
        # Log the real errno first (nbdkit), then send the mapped one.
        log.info(
            "client %s: %s off=%d len=%d failed: %s -> %s",
            self.peer, cmd.cmd.name, cmd.offset, cmd.length, exc.strerror or exc, nbd_err.name,
        )
        self._engine.reply_error(cmd.cookie, nbd_err, export.error_message(exc))

    async def _block_status(self, export: Export, cmd: Command) -> None:
        """One chunk per negotiated context (proto.md "NBD_CMD_BLOCK_STATUS"):
        at least one extent each, the first only with REQ_ONE."""
        replies = []
        for ctx_id, ctx_name in self._engine.meta_contexts.items():
            extents = await export.context_extents(ctx_name, cmd.offset, cmd.length)
            if cmd.flags & NbdCmdFlag.REQ_ONE:
                extents = extents[:1]
            export.extents_told(ctx_name, cmd.offset, extents)
            replies.append((ctx_id, extents))
        self._engine.reply_block_status(cmd.cookie, replies)

    # -- output and lifecycle ----------------------------------------------

    def _flush(self) -> None:
        self._replies.flush()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        # At shutdown keep reading: whatever the client already sent is
        # answered (ESHUTDOWN) rather than left unread, which would make the
        # close reset the connection and lose replies in flight (AF_UNIX and
        # TCP both reset a socket closed with unread data).
        want_pause = (self._disconnect_requested and not self._shutdown) or self._hold()
        if want_pause and not self._reading_paused:
            transport.pause_reading()
            self._reading_paused = True
        elif not want_pause and self._reading_paused and not self._eof:
            # After EOF there is nothing left to read: resuming would only
            # make the transport report EOF again.
            transport.resume_reading()
            self._reading_paused = False

    def _close_when_idle(self) -> None:
        if self._inflight:
            return
        if self._shutdown and not self._closing and self._unread():
            # Requests the client sent before the shutdown may still sit in
            # the socket, unread because parsing was held: they were
            # received, so they are answered (ESHUTDOWN) first.  Closing a
            # socket with unread bytes also resets it, and the client loses
            # the replies it has not read yet.  Reading goes on at shutdown
            # (_update_reading); what arrives is parsed, then we get here
            # again.  A client that never stops sending is aborted at the
            # server's drain bound.
            self._update_reading()
            return
        self._flush()
        self._close_transport()

    def _unread(self) -> int:
        """Bytes the client sent that sit unread in the socket."""
        sock = self._transport.get_extra_info("socket") if self._transport else None
        if sock is None:
            return 0
        try:
            buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except (OSError, ValueError):  # ValueError: closed already (fd -1)
            return 0
        return int.from_bytes(buf, sys.byteorder, signed=True)

    def _close_transport(self) -> None:
        """Close after the buffered replies went out, or abort if they cannot
        within ``shutdown_timeout`` (a client that stopped reading)."""
        transport = self._transport
        if transport is None and self._upgrading is not None:
            self._upgrading.abort()  # mid TLS handshake: nothing to flush
            return
        if transport is None or transport.is_closing():
            return
        transport.close()
        if transport.get_write_buffer_size() and self._abort_timer is None:
            self._abort_timer = asyncio.get_running_loop().call_later(
                self._server.shutdown_timeout, self.abort
            )

    def _abort(self) -> None:
        # In-flight requests are not cancelled: their native operations run
        # to completion anyway (they hold references in C), and `closed`
        # waits for them.  Their replies are dropped.
        self._closing = True
        self._close_transport()

    def abort(self) -> None:
        """Drop the connection now: the socket closes without flushing.

        Operations in flight still complete (``closed`` waits for them).
        """
        if self._native is not None:
            if not self._native.closed:
                self._native.abort()
            return
        self._closing = True
        if self._transport is not None:
            self._transport.abort()
        elif self._upgrading is not None:
            self._upgrading.abort()

    def shutdown(self, replay: bool = False) -> None:
        """Finish in-flight requests, then close.

        Requests received from now on (buffered, not yet parsed, or still
        arriving) are parsed and answered ESHUTDOWN by the engine, so none is
        silently dropped -- unless REPLAY: for a client that reconnects and
        resends every unanswered request (QEMU's nbd node with
        ``reconnect-delay``, i.e. an attached VM disk) they are read and
        dropped instead.  QEMU 7.2 passes an ESHUTDOWN reply to the guest as
        an I/O error, but replays a request whose connection was lost, so a
        daemon restart is then invisible to the guest beyond the pause.
        Reading goes on in both cases: a close with unread bytes resets the
        connection and could lose replies already sent.
        """
        if self._native is not None:
            if not self._native.closed:
                self._native.shutdown(replay)
            return
        if self._upgrading is not None:
            # Mid TLS handshake: nothing negotiated, nothing to answer.
            self.abort()
            return
        self._runs = False
        if replay:
            self._replay = True
        else:
            self._engine.shutting_down()
        self._disconnect_requested = True
        self._shutdown = True
        if not self._closing:
            self._process()
        self._close_when_idle()
        self._update_reading()

    @property
    def in_flight(self) -> int:
        native = self._native
        if native is not None:
            return 0 if native.closed else native.stats().in_flight
        return self._inflight

    @property
    def native_reply_bytes(self) -> int:
        """Reply memory of the native connection (READ bytes in flight and
        replies queued unsent, bounded per connection in C); 0 on the loop's
        path, whose replies :attr:`reply_bytes` counts against the daemon's
        budget."""
        native = self._native
        return 0 if native is None or native.closed else native.stats().reply_bytes
