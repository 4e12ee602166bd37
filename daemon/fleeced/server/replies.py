"""The reply path of one connection, with one owner: :class:`ReplyWriter`.

Replies leave a connection two ways.  Most are encoded by the sans-IO engine
and written by the event loop through the transport.  Large READ replies and
WRITE acknowledgements may instead be written by the native worker that did
the I/O, straight to the socket (header [+ data], never waiting on it): that
takes the copy into the socket off the loop, and a guest write's reply no
longer waits for the loop's turn (during a backup the loop is busy with the
backup's requests).
The two writers must never interleave bytes, so the writer keeps the
hand-off state:

* a worker may be given the socket only while nothing of the loop's is
  buffered in the transport, and not while the socket is *stalled*;
* while worker replies are in flight the loop writes nothing (the engine
  keeps its output; :meth:`ReplyWriter.flush` is a no-op until the last one
  is back), and while the engine keeps output no new worker reply starts;
* a worker reply that went out only in part stalls the socket for workers
  (C refuses further worker writes); its rest is written through the
  transport at once, ahead of anything else, and workers get the socket back
  (:meth:`~fleeced.exports.ReplySocket.resume`) only once the transport's
  buffer is empty again;
* over TLS the socket carries ciphertext: workers never write (for good);
* a READ that cannot have the socket now waits for it *unread* (the
  connection keeps it): a worker handed the socket while it was stalled hands
  the read back (:meth:`ReplyWriter.worker_deferred`), and the connection
  submits it again once :meth:`ReplyWriter.worker_socket` gives the socket,
  asking to be told (:meth:`ReplyWriter.notify_when_drained`) when that wait
  is for the transport's buffer.  Reading the data into memory only to wait
  there cost a copy and the loop's send for most bytes of a busy connection
  (55 % of the replies of ``nbdcopy`` took that way);
* a *streamed* reply (a large READ sent a piece at a time as the socket
  drains, :meth:`ReplyWriter.begin_stream`) owns the socket until it ends:
  workers write only its pieces, the loop only its pieces and the rest of
  a piece a worker sent in part;
* the engine's replies that wait meanwhile (worker replies in flight, or a
  stream) are taken out of the engine and *held* here, counted
  (:attr:`ReplyWriter.held_bytes`), so that the connection stops parsing
  while they pile up: what a connection holds for a client that does not
  read is bounded by its own budget, never by others' memory.

This module must not import the data path, the native queue or the engine:
it gets the engine's output as a callable and the socket handle from a
factory (:func:`fleeced.exports.open_reply_socket` in the daemon, a fake in
tests).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from fleeced.exports import ReplySocket

__all__ = ["ReplyWriter", "SOCKET_SNDBUF", "WRITE_BUFFER_HIGH"]

log = logging.getLogger(__name__)

#: Requested socket send buffer (the kernel caps it at net.core.wmem_max): a
#: buffer that holds whole large replies lets workers write them without
#: waiting.
SOCKET_SNDBUF: Final = 4 * 1024 * 1024
#: Unsent reply bytes in the transport before ``pause_writing``: room for one
#: piece of a streamed reply (the largest READ data held whole) plus headers,
#: bounded per connection.
WRITE_BUFFER_HIGH: Final = 1024 * 1024 + 4096

Buffers = Sequence[bytes | bytearray | memoryview]


class ReplyWriter:
    """Owns a connection's transport, its native socket handle and the
    hand-off between loop-written and worker-written replies.

    :param pending: drains the engine's encoded replies (in order).
    :param open_socket: makes the workers' handle for a socket descriptor;
        None: workers never write (nothing is native, e.g. in tests).
    :param backlog: whether the engine holds replies (without draining
        them); while it does, no new worker reply starts, so that the ones
        in flight drain and the loop's replies go out (a steady stream of
        worker replies would otherwise hold them back for ever).
    """

    def __init__(self, pending: Callable[[], Buffers],
                 open_socket: Callable[[int], ReplySocket] | None = None,
                 backlog: Callable[[], bool] | None = None) -> None:
        self._pending = pending
        self._open_socket = open_socket
        self._backlog = backlog
        self._transport: asyncio.Transport | None = None
        self._sock: ReplySocket | None = None
        self._sends = 0  # worker-written replies in flight
        self._stalled = False  # a worker reply went out in part
        self._tls = False
        self._refused = False  # no worker handle could be made: loop only
        self._draining = False  # limits lowered: resume_writing() = drained
        self._streaming = False  # a streamed reply owns the socket
        # the engine's replies waiting for the socket, and their size
        self._held: list[bytes | bytearray | memoryview] = []
        self._held_bytes = 0

    # -- the transport -------------------------------------------------------

    @property
    def transport(self) -> asyncio.Transport | None:
        """The transport replies go through (None before connection, and
        while a TLS upgrade runs)."""
        return self._transport

    @property
    def tls(self) -> bool:
        """Whether the connection switched to TLS (workers never write)."""
        return self._tls

    @property
    def worker_replies(self) -> int:
        """Worker-written replies in flight."""
        return self._sends

    @property
    def held_bytes(self) -> int:
        """Bytes of the engine's replies held until the socket is the
        loop's again (see :meth:`flush`)."""
        return self._held_bytes

    @property
    def streaming(self) -> bool:
        """Whether a streamed reply owns the socket."""
        return self._streaming

    def attach(self, transport: asyncio.Transport) -> None:
        """Take TRANSPORT: the connection's, or the TLS one after STARTTLS."""
        self._transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        if self._tls:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SNDBUF)
            except OSError as exc:
                log.debug("SO_SNDBUF: %s", exc)

    def start_tls(self) -> asyncio.Transport:
        """Flush the last plaintext and give up the transport for the upgrade.

        From now on workers never write (the socket will carry ciphertext).
        Legal only before any request ran (STARTTLS is an option).

        :return: the plaintext transport.
        """
        assert self._transport is not None
        assert self._sock is None and not self._sends
        self._tls = True
        self.flush()
        transport, self._transport = self._transport, None
        return transport

    def writable(self) -> bool:
        """Whether the transport takes writes."""
        return self._transport is not None and not self._transport.is_closing()

    def buffered(self) -> int:
        """Bytes the transport holds unsent."""
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    # -- loop-written replies ----------------------------------------------

    def flush(self) -> None:
        """Write the engine's replies, unless the socket is someone else's
        now (worker replies in flight, or a streamed reply): they are held
        here, counted, until then."""
        out = self._pending()
        if self._sends or self._streaming:
            for part in out:
                self._held.append(part)
                self._held_bytes += part.nbytes if isinstance(part, memoryview) else len(part)
            return
        if self._held:
            out = self._held + list(out)
            self._held = []
            self._held_bytes = 0
        if out and self.writable():
            assert self._transport is not None
            self._transport.writelines(out)

    # -- worker-written replies --------------------------------------------

    def worker_socket(self, stream: bool = False) -> ReplySocket | None:
        """The handle a worker may write the next reply to, or None: the loop
        writes it (TLS, nothing native, closing, our bytes still buffered, or
        the socket stalled).

        :param stream: for a piece of the streamed reply (no other reply
            gets the socket while one streams).
        Call :meth:`worker_started` once the read is submitted with it.
        """
        if self._tls or self._open_socket is None or not self.writable():
            return None
        if self._streaming and not stream:
            return None
        if self._sends:
            # Workers hold the socket already: they may go on unless one
            # stalled it (its rest is in the transport now) or replies of
            # the loop wait for them to finish.
            if self._stalled or self._held or (self._backlog is not None and self._backlog()):
                return None
            return self._sock
        self.flush()
        if self.buffered():
            return None  # never interleave with our own unsent bytes
        if self._sock is None:
            assert self._transport is not None
            sock = self._transport.get_extra_info("socket")
            if sock is None:
                self._refused = True
                return None
            try:
                self._sock = self._open_socket(sock.fileno())
            except OSError as exc:
                log.debug("no worker replies: %s", exc)
                self._refused = True
                return None
        if self._stalled:  # the rest of the torn-off reply is out: hand back
            self._sock.resume()
            self._stalled = False
        return self._sock

    # -- streamed replies --------------------------------------------------

    def begin_stream(self) -> bool:
        """Give the socket to a streamed reply, once no worker reply is in
        flight: the replies before it go out first (they are complete), and
        from now on nothing else is written until :meth:`end_stream`.

        :return: False when worker replies are still in flight (try again
            when one is back).
        """
        assert not self._streaming
        if self._sends:
            return False
        self.flush()
        self._streaming = True
        return True

    def stream_write(self, parts: Buffers) -> None:
        """Write part of the streamed reply through the transport (only
        while no piece of it is with a worker)."""
        assert self._streaming and not self._sends
        if self.writable():
            assert self._transport is not None
            self._transport.writelines(parts)

    def end_stream(self) -> None:
        """The streamed reply is whole (or abandoned): the held replies go out."""
        self._streaming = False
        self.flush()

    def may_wait(self) -> bool:
        """Whether a reply :meth:`worker_socket` refused now may wait for a
        worker to write it: False when workers never write again (TLS,
        nothing native, no handle, closing) -- the loop must write it."""
        return (not self._tls and self._open_socket is not None and not self._refused
                and self.writable())

    def notify_when_drained(self) -> None:
        """Have the protocol's ``resume_writing()`` called once the transport
        has written all it holds (and ``pause_writing()`` at once, so the
        connection parses no further meanwhile: a client that stops reading
        is then timed as stalled, as for a full buffer).  Nothing to do when
        it holds nothing; call :meth:`drained` from ``resume_writing()``."""
        if self._draining or not self.buffered():
            return
        assert self._transport is not None
        self._draining = True
        self._transport.set_write_buffer_limits(high=0, low=0)

    def drained(self) -> None:
        """``resume_writing()`` was called: back to the normal limits."""
        if self._draining:
            self._draining = False
            if self._transport is not None:
                self._transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def worker_deferred(self) -> None:
        """A worker handed its read back unread: the socket was stalled when
        it started.  Like :meth:`worker_done` for the count; and the socket
        counts as stalled until it is handed back (the partial reply that
        stalled it may not be back yet)."""
        assert self._sends > 0
        self._sends -= 1
        self._stalled = True

    def worker_started(self) -> None:
        """A read was submitted with the handle from :meth:`worker_socket`."""
        self._sends += 1

    def worker_done(self, header: bytes, data: bytes | bytearray | memoryview,
                    sent: int) -> None:
        """A worker-written reply is back.

        :param header: the reply header the worker was given.
        :param data: the reply's data.
        :param sent: bytes of HEADER + DATA the worker wrote: 0 (none: the
            caller has the engine encode the reply, or the operation failed),
            all, or part -- then the rest goes out now, before anything else,
            and the socket stays stalled for workers until the transport has
            written it.
        """
        assert self._sends > 0
        self._sends -= 1
        if not 0 < sent < len(header) + len(data):
            return
        self._stalled = True
        if sent < len(header):
            rest: list[bytes | bytearray | memoryview] = [memoryview(header)[sent:], data]
        else:
            rest = [memoryview(data)[sent - len(header):]]
        if self.writable():
            assert self._transport is not None
            self._transport.writelines(rest)

    # -- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """The connection is gone: give up the workers' handle (C keeps its
        duplicate open while queued worker replies use it).  Idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
