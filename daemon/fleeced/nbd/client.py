"""The sans-IO NBD *client* role: just enough to read block status from a server.

fleeced reads a QEMU dirty bitmap through QEMU's own NBD server when a VM's disk
comes back to the daemon.  This is the client side
of the fixed-newstyle protocol, as a pure state machine in the shape of
:class:`~fleeced.nbd.engine.ServerConnection`: feed server bytes to
:meth:`ClientConnection.receive_data`, take events from
:meth:`ClientConnection.next_event`, write what :meth:`ClientConnection.data_to_send`
returns.  It speaks only what the hand-off needs:

* fixed newstyle with ``NBD_FLAG_C_FIXED_NEWSTYLE`` (and ``NO_ZEROES`` when offered);
* ``NBD_OPT_STRUCTURED_REPLY``; ``NBD_OPT_SET_META_CONTEXT`` for exact context names
  (every one must be granted); ``NBD_OPT_GO`` (``NBD_INFO_EXPORT`` gives the size);
* ``NBD_CMD_BLOCK_STATUS`` with structured replies, and ``NBD_CMD_DISC``.

States (an option reply or reply chunk is parsed only once it is whole in the
buffer, so a partial message never changes state)::

    GREETING --greeting--> STRUCTURED --ACK--> META --ACK--> GO --ACK--> TRANSMISSION
                                  (no contexts: STRUCTURED --ACK--> GO)      | disconnect()
       any option error reply: NBD_OPT_ABORT queued, NegotiationFailed      v
       any violation by the server: ServerProtocolError -----> ERROR      CLOSED

The client is strict: whatever the server sends that proto.md does not allow is
a :class:`ServerProtocolError`, never guessed around.

Error tree (the engine's :mod:`.errors` tree, seen from the client side)::

    Exception
     +-- NbdProtocolError
     |    +-- ServerProtocolError  the server broke the protocol: hang up
     +-- NegotiationFailed         the server refused something we need: write
     |                             what is queued (NBD_OPT_ABORT), then hang up
     +-- LocalProtocolError        our code misused the client (a bug)

This module must not import asyncio, socket, os or anything doing I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Final

from .buffer import ReceiveBuffer
from .constants import (
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    NbdCmd,
    NbdCmdFlag,
    NbdInfo,
    NbdOpt,
    NbdRep,
    NbdReplyFlag,
    NbdReplyType,
    TransmissionFlag,
)
from .errors import LocalProtocolError, NbdProtocolError
from .events import NEED_DATA
from .wire import (
    CHUNK_HEADER,
    CLIENT_FLAGS,
    GREETING,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    REQUEST,
    SIMPLE_REPLY,
    U16,
    U32,
)

__all__ = [
    "ClientConnection",
    "ClientEvent",
    "Ready",
    "BlockStatus",
    "ReadData",
    "ReplyError",
    "Closed",
    "ServerProtocolError",
    "NegotiationFailed",
]

_U32_MAX: Final = 0xFFFFFFFF
#: The largest structured chunk we accept: an OFFSET_DATA chunk of a maximum
#: READ (its offset, then the data).  BLOCK_STATUS chunks are far smaller.
_MAX_CHUNK: Final = MAX_PAYLOAD + 8
_ERROR_BIT: Final = 1 << 15
_EXTENT_PAIR: Final = struct.Struct(">II")
_NO_FLAGS: Final = NbdCmdFlag(0)
# Plain ints: ``~`` of an IntFlag member only inverts within the known members.
_DONE: Final = int(NbdReplyFlag.DONE)
_REQ_ONE: Final = int(NbdCmdFlag.REQ_ONE)


class ServerProtocolError(NbdProtocolError):
    """Fatal: the server violated the protocol (bad magic, impossible length, ...).

    Hang up (proto.md "Terminating the transmission phase": either side MAY
    initiate a hard disconnect on a violation of a mandatory condition).  Once
    raised, :meth:`ClientConnection.next_event` raises it again.
    """


class NegotiationFailed(Exception):
    """The server answered an option we need with an error, or did not grant a
    requested metadata context.

    ``NBD_OPT_ABORT`` is already queued (proto.md "Termination of the session
    during option haggling": the client ends haggling with a soft disconnect):
    write :meth:`ClientConnection.data_to_send`, then close.

    :param option: the option that failed.
    :param reply: the error reply type, or None when the option succeeded but
        did not give what we asked for (a context not granted).
    :param message: why, including the server's message if it sent one.
    """

    def __init__(self, option: NbdOpt, reply: int | None, message: str) -> None:
        super().__init__(message)
        self.option = option
        self.reply = reply
        self.message = message


# ---------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Ready:
    """The handshake ended with NBD_OPT_GO: transmission starts.

    :ivar size: the export size (NBD_INFO_EXPORT).
    :ivar flags: the transmission flags.
    :ivar contexts: context name -> id assigned by the server.
    """

    size: int
    flags: TransmissionFlag
    contexts: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class BlockStatus:
    """A successful BLOCK_STATUS reply.

    ``extents`` maps each negotiated context name to its ``(length, flags)``
    descriptors, consecutive from ``offset``.  They cover at least one byte and
    at most ``length`` bytes: a final extent the server let run past the request
    (proto.md allows it) is clipped here, so the caller continues at
    ``offset + covered(name)``.
    """

    cookie: int
    offset: int
    length: int
    extents: Mapping[str, tuple[tuple[int, int], ...]]

    def covered(self, name: str) -> int:
        """Bytes described for context NAME (``0 < covered <= length``)."""
        return sum(length for length, _ in self.extents[name])


@dataclass(frozen=True, slots=True)
class ReplyError:
    """The server answered a request with an error (simple reply or ERROR chunk).

    :ivar error: the NBD error value as sent (proto.md "Error values"; a
        client treats unknown values like EINVAL).
    :ivar message: the server's message, if it sent one.
    """

    cookie: int
    error: int
    message: str = ""


@dataclass(frozen=True, slots=True)
class ReadData:
    """A successful READ reply: every byte of ``[offset, offset+len(data))``,
    holes (NBD_REPLY_TYPE_OFFSET_HOLE) as zeros."""

    cookie: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Closed:
    """The server closed the connection after our NBD_OPT_ABORT or NBD_CMD_DISC."""


ClientEvent = Ready | BlockStatus | ReadData | ReplyError | Closed


# ---------------------------------------------------------------------- state


class _State(Enum):
    GREETING = auto()
    STRUCTURED = auto()  # waiting for the reply to NBD_OPT_STRUCTURED_REPLY
    META = auto()  # ... to NBD_OPT_SET_META_CONTEXT
    GO = auto()  # ... to NBD_OPT_GO
    TRANSMISSION = auto()
    CLOSING = auto()  # NBD_OPT_ABORT or NBD_CMD_DISC sent; only EOF may follow
    CLOSED = auto()
    ERROR = auto()


# The option whose reply each handshake state waits for.
_AWAITED: Final[dict[_State, NbdOpt]] = {
    _State.STRUCTURED: NbdOpt.STRUCTURED_REPLY,
    _State.META: NbdOpt.SET_META_CONTEXT,
    _State.GO: NbdOpt.GO,
}


@dataclass(slots=True)
class _Pending:
    """A request in flight (BLOCK_STATUS, or READ with ``data``) and the chunks
    received for it so far."""

    offset: int
    length: int
    req_one: bool
    chunks: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    error: ReplyError | None = None
    #: READ only: the reply's bytes, and the bytes its chunks covered so far.
    data: bytearray | None = None
    covered: int = 0


def _decode(raw: bytes, what: str) -> str:
    """A server string: UTF-8, no NUL, at most 4096 bytes (proto.md "Conventions")."""
    if len(raw) > MAX_STRING or b"\0" in raw:
        raise ServerProtocolError(f"{what}: not a valid NBD string")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ServerProtocolError(f"{what}: not UTF-8") from None


def _message(raw: bytes) -> str:
    """An error message for display: decoded leniently, it only goes to a log."""
    return raw[:MAX_STRING].decode("utf-8", "replace")


class ClientConnection:
    """One NBD client connection, as a pure state machine.

    :param export: the export name to open with NBD_OPT_GO.
    :param contexts: metadata context names to select (exact names, e.g.
        ``qemu:dirty-bitmap:NAME``); every one must be granted.  Without any,
        BLOCK_STATUS cannot be used.
    :raise ValueError: if a name is not a valid NBD string, or a context repeats.

    Nothing is queued until the server's greeting arrived.
    """

    def __init__(self, export: str, contexts: Sequence[str] = ()) -> None:
        self._export_raw = _encode_name(export)
        self._wanted = tuple(contexts)
        for name in self._wanted:
            _encode_name(name)
            if ":" not in name:
                raise ValueError(f"metadata context {name!r} has no namespace")
        if len(set(self._wanted)) != len(self._wanted):
            raise ValueError("duplicate metadata context")
        self.export = export
        self._buf = ReceiveBuffer()
        self._out: list[bytes] = []
        self._state = _State.GREETING
        self._eof = False
        self._error: Exception | None = None
        self._no_zeroes = False
        # Handshake results.
        self._granted: dict[str, int] = {}
        self._size: int | None = None
        self._flags = TransmissionFlag(0)
        self._block_size: tuple[int, int, int] | None = None
        # Transmission.
        self._ids: dict[int, str] = {}
        self._next_cookie = 1
        self._pending: dict[int, _Pending] = {}

    # ------------------------------------------------------------------ properties

    @property
    def size(self) -> int:
        """The export size.

        :raise LocalProtocolError: before :class:`Ready`.
        """
        if self._size is None or self._state not in (_State.TRANSMISSION, _State.CLOSING,
                                                     _State.CLOSED):
            raise LocalProtocolError("the export size is known only after Ready")
        return self._size

    @property
    def contexts(self) -> dict[str, int]:
        """Context name -> id granted by the server (a copy; empty until granted)."""
        return dict(self._granted)

    @property
    def block_size(self) -> tuple[int, int, int] | None:
        """(minimum, preferred, maximum) from NBD_INFO_BLOCK_SIZE, if the server sent it."""
        return self._block_size

    @property
    def in_transmission(self) -> bool:
        """True between :class:`Ready` and :meth:`disconnect` (or an error)."""
        return self._state is _State.TRANSMISSION

    @property
    def pending(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._pending)

    # ------------------------------------------------------------------ input side

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the server.

        :raise LocalProtocolError: after :meth:`receive_eof`.
        """
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if len(data):
            self._buf.feed(data)

    def receive_eof(self) -> None:
        """The server closed the connection.

        :raise LocalProtocolError: if EOF was already signalled.
        """
        if self._eof:
            raise LocalProtocolError("receive_eof() twice")
        self._eof = True

    def next_event(self) -> ClientEvent | type[NEED_DATA]:
        """Parse buffered input; return the next event or :class:`NEED_DATA`.

        :return: :class:`Ready` once, then :class:`BlockStatus` /
            :class:`ReplyError` per request, and :class:`Closed` at EOF after
            :meth:`disconnect` (then again on every call).
        :raise ServerProtocolError: the server broke the protocol (or closed the
            connection when it must not); raised again on every later call.
        :raise NegotiationFailed: an option we need was refused; raised again on
            every later call.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except (ServerProtocolError, NegotiationFailed) as exc:
            self._error = exc
            self._state = _State.ERROR
            raise

    def _next_event(self) -> ClientEvent | type[NEED_DATA]:
        state = self._state
        if state is _State.TRANSMISSION:
            return self._next_reply()
        if state in _AWAITED:
            return self._next_option_reply()
        if state is _State.GREETING:
            return self._next_greeting()
        if state is _State.CLOSING:
            if len(self._buf):
                raise ServerProtocolError(
                    f"{len(self._buf)} unexpected bytes after the client ended the session")
            if not self._eof:
                return NEED_DATA
            self._state = _State.CLOSED
        return Closed()

    def _need(self) -> type[NEED_DATA]:
        """NEED_DATA, unless the server already hung up (it must not, here)."""
        if not self._eof:
            return NEED_DATA
        where = "handshake" if self._state in _AWAITED or self._state is _State.GREETING \
            else "transmission"
        raise ServerProtocolError(f"server closed the connection during the {where} "
                                  f"({len(self._buf)} bytes of a partial message)")

    # ------------------------------------------------------------------ handshake

    def _next_greeting(self) -> ClientEvent | type[NEED_DATA]:
        buf = self._buf
        if len(buf) < GREETING.size:
            return self._need()
        magic, opt_magic, flags = GREETING.unpack_from(buf.data, buf.pos)
        buf.skip(GREETING.size)
        # proto.md "Newstyle negotiation": S: 'NBDMAGIC', 'IHAVEOPT', handshake flags.
        if magic != NBDMAGIC:
            raise ServerProtocolError(f"bad greeting magic 0x{magic:016x}")
        if opt_magic != IHAVEOPT:
            raise ServerProtocolError(f"not a newstyle server (0x{opt_magic:016x})")
        # We need fixed newstyle (proto.md "Fixed newstyle negotiation") for any
        # option but EXPORT_NAME.  Unknown handshake flags: "The client SHOULD
        # ignore any handshake flags it does not recognize".
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise ServerProtocolError("server does not support fixed newstyle negotiation")
        client = ClientFlag.FIXED_NEWSTYLE
        # proto.md "Client flags": NO_ZEROES MUST NOT be set unless the server set it.
        if flags & HandshakeFlag.NO_ZEROES:
            client |= ClientFlag.NO_ZEROES
            self._no_zeroes = True
        self._out.append(CLIENT_FLAGS.pack(client))
        # proto.md "NBD_OPT_STRUCTURED_REPLY": no data.
        self._send_option(NbdOpt.STRUCTURED_REPLY, b"")
        self._state = _State.STRUCTURED
        return self._next_option_reply()

    def _send_option(self, opt: NbdOpt, payload: bytes) -> None:
        self._out.append(OPTION_HEADER.pack(IHAVEOPT, opt, len(payload)) + payload)

    def _next_option_reply(self) -> ClientEvent | type[NEED_DATA]:
        buf = self._buf
        while self._state in _AWAITED:
            if len(buf) < OPTION_REPLY_HEADER.size:
                return self._need()
            magic, opt, rep, length = OPTION_REPLY_HEADER.unpack_from(buf.data, buf.pos)
            if magic != OPTION_REPLY_MAGIC:
                raise ServerProtocolError(f"bad option reply magic 0x{magic:016x}")
            awaited = _AWAITED[self._state]
            # proto.md "Fixed newstyle negotiation": the reply carries "the option
            # as sent by the client to which this is a reply"; we send one at a time.
            if opt != awaited:
                raise ServerProtocolError(f"reply for option {opt} while waiting for "
                                          f"{awaited.name}")
            if length > MAX_OPTION_LENGTH:
                raise ServerProtocolError(f"option reply of {length} bytes exceeds our cap")
            if len(buf) < OPTION_REPLY_HEADER.size + length:
                return self._need()
            buf.skip(OPTION_REPLY_HEADER.size)
            payload = buf.take(length)
            if rep & (1 << 31):
                self._refused(awaited, rep, payload)
            handler = _REPLY_HANDLERS.get((self._state, rep))
            if handler is None:
                raise ServerProtocolError(f"unexpected reply type 0x{rep:08x} to "
                                          f"{awaited.name}")
            event = handler(self, payload)
            if event is not None:
                return event
        return self._next_event()

    def _refused(self, opt: NbdOpt, rep: int, payload: bytes) -> None:
        """An error reply (bit 31 set) to an option we need: abort the session."""
        try:
            name = NbdRep(rep).name
        except ValueError:
            name = f"0x{rep:08x}"  # proto.md: unknown error replies are still errors
        text = _message(payload)
        self._abort()
        raise NegotiationFailed(opt, rep, f"server refused {opt.name}: {name}"
                                          + (f" ({text})" if text else ""))

    def _abort(self) -> None:
        # proto.md "NBD_OPT_ABORT": the soft disconnect during haggling; we send it
        # only after the final reply to our last option, as the spec requires.
        self._send_option(NbdOpt.ABORT, b"")
        self._state = _State.CLOSING

    def _ack_structured(self, payload: bytes) -> ClientEvent | None:
        if payload:
            raise ServerProtocolError("NBD_REP_ACK with data")
        if self._wanted:
            # proto.md "NBD_OPT_SET_META_CONTEXT": 32 bits export name length, name,
            # 32 bits number of queries, then 32 bits length + query for each.
            data = [U32.pack(len(self._export_raw)), self._export_raw,
                    U32.pack(len(self._wanted))]
            for name in self._wanted:
                raw = name.encode("utf-8")
                data += [U32.pack(len(raw)), raw]
            self._send_option(NbdOpt.SET_META_CONTEXT, b"".join(data))
            self._state = _State.META
        else:
            self._send_go()
        return None

    def _meta_context(self, payload: bytes) -> ClientEvent | None:
        # proto.md "NBD_REP_META_CONTEXT": 32 bits context id, then the name.
        if len(payload) <= 4:
            raise ServerProtocolError("NBD_REP_META_CONTEXT without a name")
        (context_id,) = U32.unpack_from(payload, 0)
        name = _decode(payload[4:], "metadata context name")
        # We asked for exact names, so anything else was not asked for.
        if name not in self._wanted:
            raise ServerProtocolError(f"server selected metadata context {name!r}, "
                                      "which was not requested")
        if name in self._granted:
            raise ServerProtocolError(f"metadata context {name!r} selected twice")
        # proto.md "NBD_OPT_SET_META_CONTEXT": "each with a unique metadata context ID".
        if context_id in self._granted.values():
            raise ServerProtocolError(f"metadata context id {context_id} used twice")
        self._granted[name] = context_id
        return None

    def _ack_meta(self, payload: bytes) -> ClientEvent | None:
        if payload:
            raise ServerProtocolError("NBD_REP_ACK with data")
        missing = [name for name in self._wanted if name not in self._granted]
        if missing:
            # proto.md: selecting nothing is not an error for the server; it is for us.
            self._abort()
            raise NegotiationFailed(NbdOpt.SET_META_CONTEXT, None,
                                    f"export {self.export!r} does not offer metadata "
                                    f"context(s) {', '.join(missing)}")
        self._send_go()
        return None

    def _send_go(self) -> None:
        # proto.md "NBD_OPT_GO": 32 bits name length, name, 16 bits number of
        # information requests (none: NBD_INFO_EXPORT is always sent).
        self._send_option(NbdOpt.GO, U32.pack(len(self._export_raw)) + self._export_raw
                          + U16.pack(0))
        self._state = _State.GO

    def _info(self, payload: bytes) -> ClientEvent | None:
        # proto.md "NBD_REP_INFO": 16 bits information type, then its fields.
        if len(payload) < 2:
            raise ServerProtocolError("NBD_REP_INFO without a type")
        (info,) = U16.unpack_from(payload, 0)
        if info == NbdInfo.EXPORT:
            if len(payload) != INFO_EXPORT.size:
                raise ServerProtocolError(f"NBD_INFO_EXPORT of {len(payload)} bytes")
            if self._size is not None:
                raise ServerProtocolError("NBD_INFO_EXPORT sent twice")
            _, size, flags = INFO_EXPORT.unpack(payload)
            # proto.md "Transmission flags": bit 0, NBD_FLAG_HAS_FLAGS, MUST always be 1.
            if not flags & TransmissionFlag.HAS_FLAGS:
                raise ServerProtocolError("transmission flags without NBD_FLAG_HAS_FLAGS")
            if size >= 1 << 63:
                raise ServerProtocolError(f"export size {size} out of range")
            self._size = size
            self._flags = TransmissionFlag(flags)
        elif info == NbdInfo.BLOCK_SIZE:
            if len(payload) != INFO_BLOCK_SIZE.size:
                raise ServerProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes")
            _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(payload)
            # proto.md "Block size constraints": powers of two, min <= 64 KiB,
            # preferred >= min, maximum a multiple of min.
            if (not _pow2(minimum) or minimum > 64 * 1024 or not _pow2(preferred)
                    or preferred < minimum or maximum < minimum or maximum % minimum):
                raise ServerProtocolError(f"invalid block sizes {minimum}/{preferred}/{maximum}")
            self._block_size = (minimum, preferred, maximum)
        # proto.md "NBD_REP_INFO": a client MUST ignore information types it does
        # not recognise (NAME, DESCRIPTION, and any future ones).
        return None

    def _ack_go(self, payload: bytes) -> ClientEvent | None:
        if payload:
            raise ServerProtocolError("NBD_REP_ACK with data")
        # proto.md "NBD_OPT_GO": the server MUST send NBD_INFO_EXPORT before the ACK.
        if self._size is None:
            raise ServerProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
        self._ids = {context_id: name for name, context_id in self._granted.items()}
        self._state = _State.TRANSMISSION
        return Ready(self._size, self._flags, dict(self._granted))

    # ------------------------------------------------------------------ transmission

    def block_status(self, offset: int, length: int,
                     flags: NbdCmdFlag = _NO_FLAGS) -> int:
        """Queue an NBD_CMD_BLOCK_STATUS request; legal in transmission only.

        :param offset: start of the range.
        :param length: 1 .. 2^32-1 bytes, within the export.
        :param flags: 0 or NBD_CMD_FLAG_REQ_ONE.
        :return: the request's cookie (its :class:`BlockStatus` or
            :class:`ReplyError` carries it).
        :raise LocalProtocolError: outside transmission, without contexts, with
            other flags, or with a range outside the export.
        """
        if self._state is not _State.TRANSMISSION:
            raise LocalProtocolError(f"block_status() in state {self._state.name}")
        # proto.md "Metadata querying": a client MUST NOT use BLOCK_STATUS unless
        # it selected a nonzero number of metadata contexts.
        if not self._ids:
            raise LocalProtocolError("block_status() without metadata contexts")
        if int(flags) & ~_REQ_ONE:
            raise LocalProtocolError(f"block_status() with flags {flags!r}")
        assert self._size is not None
        if not 0 < length <= _U32_MAX or offset < 0 or offset + length > self._size:
            raise LocalProtocolError(f"block_status({offset}, {length}) outside the "
                                     f"export of {self._size} bytes")
        cookie = self._next_cookie
        self._next_cookie += 1
        self._pending[cookie] = _Pending(offset, length, bool(flags & NbdCmdFlag.REQ_ONE))
        self._out.append(REQUEST.pack(REQUEST_MAGIC, flags, NbdCmd.BLOCK_STATUS, cookie,
                                      offset, length))
        return cookie

    def read(self, offset: int, length: int) -> int:
        """Queue an NBD_CMD_READ; legal in transmission only.

        :param length: 1 .. the server's maximum block size (32 MiB without one).
        :return: the request's cookie (its :class:`ReadData` or
            :class:`ReplyError` carries it).
        :raise LocalProtocolError: outside transmission or the export, or too long.
        """
        if self._state is not _State.TRANSMISSION:
            raise LocalProtocolError(f"read() in state {self._state.name}")
        assert self._size is not None
        limit = self._block_size[2] if self._block_size else MAX_PAYLOAD
        if not 0 < length <= limit or offset < 0 or offset + length > self._size:
            raise LocalProtocolError(f"read({offset}, {length}) outside the export of "
                                     f"{self._size} bytes or over {limit} bytes")
        cookie = self._next_cookie
        self._next_cookie += 1
        self._pending[cookie] = _Pending(offset, length, False, data=bytearray(length))
        self._out.append(REQUEST.pack(REQUEST_MAGIC, 0, NbdCmd.READ, cookie, offset, length))
        return cookie

    def disconnect(self) -> None:
        """Queue NBD_CMD_DISC; legal in transmission with nothing in flight.

        proto.md "Terminating the transmission phase": the client SHOULD wait
        until there are no inflight requests first.  The server then closes the
        connection; :meth:`next_event` returns :class:`Closed` at EOF.

        :raise LocalProtocolError: in another state or with requests in flight.
        """
        if self._state is not _State.TRANSMISSION:
            raise LocalProtocolError(f"disconnect() in state {self._state.name}")
        if self._pending:
            raise LocalProtocolError(f"disconnect() with {len(self._pending)} requests "
                                     "in flight")
        self._out.append(REQUEST.pack(REQUEST_MAGIC, 0, NbdCmd.DISC, self._next_cookie, 0, 0))
        self._state = _State.CLOSING

    def _next_reply(self) -> ClientEvent | type[NEED_DATA]:
        buf = self._buf
        while True:
            if len(buf) < 4:
                if not len(buf) and self._eof:
                    raise ServerProtocolError(
                        "server closed the connection during transmission"
                        + (f" with {len(self._pending)} requests in flight"
                           if self._pending else ""))
                return self._need()
            (magic,) = U32.unpack_from(buf.data, buf.pos)
            if magic == SIMPLE_REPLY_MAGIC:
                event = self._simple_reply()
            elif magic == STRUCTURED_REPLY_MAGIC:
                event = self._chunk()
            else:
                raise ServerProtocolError(f"bad reply magic 0x{magic:08x}")
            if event is NEED_DATA:
                return self._need()
            if event is not None:
                return event

    def _take_pending(self, cookie: int) -> _Pending:
        pending = self._pending.get(cookie)
        # proto.md "Transmission": the server MUST use the handle of the request.
        if pending is None:
            raise ServerProtocolError(f"reply for unknown cookie {cookie}")
        return pending

    def _simple_reply(self) -> ClientEvent | type[NEED_DATA] | None:
        buf = self._buf
        if len(buf) < SIMPLE_REPLY.size:
            return NEED_DATA
        _, error, cookie = SIMPLE_REPLY.unpack_from(buf.data, buf.pos)
        buf.skip(SIMPLE_REPLY.size)
        pending = self._take_pending(cookie)
        # proto.md "Metadata querying": the reply to BLOCK_STATUS MUST be structured
        # (a success has a payload); "Simple reply message": a simple reply MAY be
        # used for any other reply without payload -- an error -- and never in the
        # middle of a structured one.
        if error == 0:
            # Structured replies were negotiated: READ and BLOCK_STATUS replies
            # with data MUST be structured (proto.md "Structured replies").
            raise ServerProtocolError("simple success reply to a request with data")
        if pending.chunks or pending.error is not None:
            raise ServerProtocolError(f"simple reply in the middle of structured reply "
                                      f"{cookie}")
        del self._pending[cookie]
        return ReplyError(cookie, error)

    def _chunk(self) -> ClientEvent | type[NEED_DATA] | None:
        buf = self._buf
        if len(buf) < CHUNK_HEADER.size:
            return NEED_DATA
        _, flags, rtype, cookie, length = CHUNK_HEADER.unpack_from(buf.data, buf.pos)
        pending = self._take_pending(cookie)
        if flags & ~_DONE:
            raise ServerProtocolError(f"unknown reply chunk flags 0x{flags:04x}")
        if length > _MAX_CHUNK:
            raise ServerProtocolError(f"reply chunk of {length} bytes exceeds our cap")
        if len(buf) < CHUNK_HEADER.size + length:
            return NEED_DATA
        buf.skip(CHUNK_HEADER.size)
        payload = buf.take(length)
        if pending.data is not None and rtype in (NbdReplyType.OFFSET_DATA,
                                                  NbdReplyType.OFFSET_HOLE):
            self._read_chunk(pending, rtype, payload)
        elif rtype == NbdReplyType.BLOCK_STATUS and pending.data is None:
            self._status_chunk(pending, payload)
        elif rtype & _ERROR_BIT:
            self._error_chunk(pending, cookie, rtype, payload)
        elif rtype == NbdReplyType.NONE:
            # proto.md "NBD_REPLY_TYPE_NONE": length MUST be 0, flags MUST include DONE.
            if length or not flags & NbdReplyFlag.DONE:
                raise ServerProtocolError("NBD_REPLY_TYPE_NONE with data or without DONE")
        else:
            # OFFSET_DATA / OFFSET_HOLE belong to READ; a non-error type we do not
            # know cannot be skipped safely (proto.md "Structured reply types").
            raise ServerProtocolError(f"reply chunk type {rtype} to this request")
        if not flags & NbdReplyFlag.DONE:
            return None
        del self._pending[cookie]
        if pending.error is not None:
            return pending.error
        if pending.data is not None:
            # proto.md "Structured reply chunk message": a successful READ's
            # chunks cover every byte of the request exactly once.
            if pending.covered != pending.length:
                raise ServerProtocolError(f"READ reply {cookie} covered {pending.covered} "
                                          f"of {pending.length} bytes")
            return ReadData(cookie, pending.offset, bytes(pending.data))
        missing = [self._ids[i] for i in self._ids if i not in pending.chunks]
        if missing:
            # proto.md "NBD_REPLY_TYPE_BLOCK_STATUS": a successful block status
            # request MUST have exactly one status chunk per negotiated context.
            raise ServerProtocolError(f"BLOCK_STATUS reply {cookie} has no extents for "
                                      f"{', '.join(missing)}")
        extents = {self._ids[i]: chunk for i, chunk in pending.chunks.items()}
        return BlockStatus(cookie, pending.offset, pending.length, extents)

    def _read_chunk(self, pending: _Pending, rtype: int, payload: bytes) -> None:
        # proto.md "NBD_REPLY_TYPE_OFFSET_DATA": 64 bits offset, then data (at
        # least one byte); "NBD_REPLY_TYPE_OFFSET_HOLE": 64 bits offset, 32 bits
        # nonzero length.  Both MUST lie within the request, and chunks MUST
        # NOT overlap (counted: the total must equal the request at DONE).
        assert pending.data is not None
        if rtype == NbdReplyType.OFFSET_DATA:
            if len(payload) < 9:
                raise ServerProtocolError(f"OFFSET_DATA chunk of {len(payload)} bytes")
            (offset,) = struct.unpack_from(">Q", payload, 0)
            length = len(payload) - 8
        else:
            if len(payload) != 12:
                raise ServerProtocolError(f"OFFSET_HOLE chunk of {len(payload)} bytes")
            offset, length = struct.unpack_from(">QI", payload, 0)
            if length == 0:
                raise ServerProtocolError("OFFSET_HOLE of length 0")
        start = offset - pending.offset
        if start < 0 or start + length > pending.length:
            raise ServerProtocolError(f"READ chunk {offset}+{length} outside the request "
                                      f"{pending.offset}+{pending.length}")
        if rtype == NbdReplyType.OFFSET_DATA:
            pending.data[start:start + length] = payload[8:]
        pending.covered += length
        if pending.covered > pending.length:
            raise ServerProtocolError("READ chunks overlap")

    def _status_chunk(self, pending: _Pending, payload: bytes) -> None:
        # proto.md "NBD_REPLY_TYPE_BLOCK_STATUS": length MUST be 4 + (a positive
        # integer multiple of 8): 32 bits context id, then (length, flags) pairs.
        n = len(payload)
        if n < 12 or (n - 4) % 8:
            raise ServerProtocolError(f"BLOCK_STATUS chunk of {n} bytes")
        (context_id,) = U32.unpack_from(payload, 0)
        if context_id not in self._ids:
            raise ServerProtocolError(f"BLOCK_STATUS chunk for context id {context_id}, "
                                      "which was not negotiated")
        if context_id in pending.chunks:
            raise ServerProtocolError(f"two BLOCK_STATUS chunks for context {context_id}")
        pairs = list(_EXTENT_PAIR.iter_unpack(memoryview(payload)[4:]))
        if pending.req_one and len(pairs) != 1:
            # "every reply chunk MUST contain exactly one descriptor, and that
            # descriptor MUST NOT exceed the length of the original request"
            raise ServerProtocolError(f"{len(pairs)} extents in reply to a REQ_ONE request")
        out: list[tuple[int, int]] = []
        total = 0
        for length, status in pairs:
            # "32 bits, length of the extent ... (unsigned, MUST be nonzero)"
            if length == 0:
                raise ServerProtocolError("zero-length extent")
            if total >= pending.length:
                # "the sum of the length fields of the first N-1 extents (if any)
                # MUST be less than the requested length"
                raise ServerProtocolError("extents continue past the requested length")
            # "the length of the final extent MAY result in a sum larger than the
            # original requested length": clip it (the server knew it anyway).
            if pending.req_one and length > pending.length:
                raise ServerProtocolError("REQ_ONE extent longer than the request")
            length = min(length, pending.length - total)
            total += length
            out.append((length, status))
        pending.chunks[context_id] = tuple(out)

    def _error_chunk(self, pending: _Pending, cookie: int, rtype: int, payload: bytes) -> None:
        # proto.md "Structured reply types": every error chunk starts with 32 bits
        # error, 16 bits message length, the message; NBD_REPLY_TYPE_ERROR has
        # nothing after it, other error types have more fields.
        if len(payload) < 6:
            raise ServerProtocolError(f"error chunk of {len(payload)} bytes")
        error, msg_len = struct.unpack_from(">IH", payload, 0)
        if msg_len > len(payload) - 6:
            raise ServerProtocolError("error message longer than its chunk")
        if rtype == NbdReplyType.ERROR and msg_len != len(payload) - 6:
            raise ServerProtocolError("NBD_REPLY_TYPE_ERROR with trailing data")
        # "error ... MUST be nonzero" for error chunks.
        if error == 0:
            raise ServerProtocolError("error chunk with error value 0")
        if pending.error is None:  # the first error is the one reported
            pending.error = ReplyError(cookie, error, _message(payload[6 : 6 + msg_len]))

    # ------------------------------------------------------------------ output side

    def data_to_send(self) -> bytes:
        """Drain and return the queued bytes (write them all, in order)."""
        out = b"".join(self._out)
        self._out = []
        return out

    @property
    def no_zeroes(self) -> bool:
        """True if NBD_FLAG_C_NO_ZEROES was sent (only EXPORT_NAME would care)."""
        return self._no_zeroes


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _encode_name(name: str) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > MAX_STRING or b"\0" in raw:
        raise ValueError(f"not a valid NBD string: {name!r}")
    return raw


_ReplyHandler = Callable[[ClientConnection, bytes], ClientEvent | None]

# What each handshake state accepts, by reply type (h11 keeps transitions in tables).
# A pair not listed is a protocol error; error replies are handled before this.
_REPLY_HANDLERS: Final[dict[tuple[_State, int], _ReplyHandler]] = {
    (_State.STRUCTURED, NbdRep.ACK): ClientConnection._ack_structured,
    (_State.META, NbdRep.META_CONTEXT): ClientConnection._meta_context,
    (_State.META, NbdRep.ACK): ClientConnection._ack_meta,
    (_State.GO, NbdRep.INFO): ClientConnection._info,
    (_State.GO, NbdRep.ACK): ClientConnection._ack_go,
}
