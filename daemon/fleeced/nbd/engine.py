"""The sans-IO NBD server engine: fixed-newstyle handshake plus transmission phase.

Bytes go in through :meth:`ServerConnection.receive_data`, events come out of
:meth:`ServerConnection.next_event`, and reply bytes are taken from
:meth:`ServerConnection.data_to_send` (h11 ``_connection.py`` shape).  Every request is
validated here, once, at the protocol edge (nbdkit ``server/protocol.c``
``validate_request``); the layers below may ``assert``.

States (a request or option is parsed only once it is complete in the buffer, so a
partial message never changes state)::

    CLIENT_FLAGS --flags--> OPTIONS --EXPORT_NAME / GO--> TRANSMISSION --DISC/EOF--> CLOSED
         |                   |  ^  |--ABORT / EOF------------------------------------> CLOSED
         |    STARTTLS (ACK) |  | tls_started()
         |                   v  |
         |               TLS_HANDSHAKE   (no input: the connection does the TLS handshake)
         +---------------------+--------- any fatal NbdProtocolError -----------> ERROR

TLS (proto.md "TLS support") is offered per connection with :class:`TlsMode`; the
options allowed before TLS are in :data:`_OPTIONS_BEFORE_TLS`.

This module must not import asyncio, socket, os or anything doing I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

from .buffer import ReceiveBuffer
from .constants import (
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_OPTIONS,
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
    NbdErrno,
    NbdInfo,
    NbdOpt,
    NbdRep,
    NbdReplyFlag,
    NbdReplyType,
    TransmissionFlag,
)
from .errors import LocalProtocolError, NbdProtocolError
from .events import NEED_DATA, Command, Disconnect, Event, ExportChosen, Rejected, StartTls
from .export import ExportInfo
from .meta import resolve_queries
from .wire import (
    CHUNK_ERROR,
    CHUNK_HEADER,
    CHUNK_OFFSET_DATA,
    CHUNK_OFFSET_HOLE,
    CLIENT_FLAGS,
    EXPORT_NAME_REPLY,
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

__all__ = ["PieceReply", "RunRule", "ServerConnection", "TlsMode"]

Lookup = Callable[[str], ExportInfo | None]
ListExports = Callable[[], Sequence[ExportInfo]]
Outgoing = bytes | memoryview


class _State(Enum):
    CLIENT_FLAGS = auto()
    OPTIONS = auto()
    TLS_HANDSHAKE = auto()
    TRANSMISSION = auto()
    CLOSED = auto()
    ERROR = auto()


class TlsMode(Enum):
    """What one connection offers (proto.md "Server-side requirements").

    ======== ============== ===================================================
    mode     spec name      before TLS
    ======== ============== ===================================================
    OFF      NOTLS          STARTTLS gets NBD_REP_ERR_POLICY; the rest as usual
    ON       SELECTIVETLS   STARTTLS gets NBD_REP_ACK; the rest as usual (no
                            export is TLS-only)
    REQUIRE  FORCEDTLS      STARTTLS gets NBD_REP_ACK; ABORT as usual;
                            EXPORT_NAME hangs up; every other option gets
                            NBD_REP_ERR_TLS_REQD
    ======== ============== ===================================================

    Once TLS is up, STARTTLS gets NBD_REP_ERR_INVALID and nothing gets
    NBD_REP_ERR_TLS_REQD.  The values are the ``--tls`` spellings.
    """

    OFF = "off"
    ON = "on"
    REQUIRE = "require"


# proto.md "FORCEDTLS mode": before TLS, only these options are answered as usual.
_OPTIONS_BEFORE_TLS: Final = frozenset({NbdOpt.STARTTLS, NbdOpt.ABORT})

_SERVER_HANDSHAKE_FLAGS: Final = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
_KNOWN_CLIENT_FLAGS: Final = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
_ZEROES: Final = bytes(124)
_MAX_ERROR_MESSAGE: Final = 4096

# Hot-path aliases: bound methods and plain ints avoid attribute and enum lookups.
_REQ_SIZE: Final = REQUEST.size
_req_unpack_from = REQUEST.unpack_from
_u32_unpack_from = struct.Struct(">I").unpack_from
_simple_pack = SIMPLE_REPLY.pack
_data_chunk_pack = CHUNK_OFFSET_DATA.pack
_DONE: Final = int(NbdReplyFlag.DONE)
_OFFSET_DATA: Final = int(NbdReplyType.OFFSET_DATA)
_BYTES_OR_VIEW: Final = (bytes, memoryview)  # a tuple: `bytes | memoryview` is built per call
_CMD_READ: Final = int(NbdCmd.READ)
_CMD_WRITE: Final = int(NbdCmd.WRITE)
_CMD_DISC: Final = int(NbdCmd.DISC)
_CMD_FLUSH: Final = int(NbdCmd.FLUSH)
_CMDS: Final = tuple(NbdCmd)  # indexable by wire value 0..7
_FLAG_VALUES: Final = tuple(NbdCmdFlag(i) for i in range(32))  # every combination of known bits
_EINVAL: Final = NbdErrno.EINVAL
_EOVERFLOW: Final = NbdErrno.EOVERFLOW

_FUA: Final = int(NbdCmdFlag.FUA)
_NO_HOLE: Final = int(NbdCmdFlag.NO_HOLE)
_DF: Final = int(NbdCmdFlag.DF)
_REQ_ONE: Final = int(NbdCmdFlag.REQ_ONE)
_FAST_ZERO: Final = int(NbdCmdFlag.FAST_ZERO)

# A per-command rule, precomputed when transmission starts:
# (allowed flag mask, static error or None, out-of-range error, maximum length)
_Rule = tuple[int, NbdErrno | None, NbdErrno, int]


def _decode_string(raw: bytes) -> str | None:
    """Decode a client string (export name, query); None if too long, NUL or not UTF-8."""
    # proto.md "Option haggling": strings are UTF-8, at most 4096 bytes, no NUL.
    if len(raw) > MAX_STRING or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True, slots=True)
class RunRule:
    """What the engine accepts in a READ or a WRITE, for a caller that takes
    runs of them itself (:meth:`ServerConnection.next_run`): the fields of
    ``_rules[cmd]`` plus the export's size and minimum block, and whether
    replies are structured (a READ's one ``OFFSET_DATA`` chunk with
    ``DONE``; a WRITE's success reply is a simple reply either way)."""

    size: int
    allowed_flags: int
    max_length: int
    min_block: int
    structured: bool


def _build_rules(export: ExportInfo, structured: bool, has_contexts: bool) -> tuple[_Rule, ...]:
    """Precompute validation for each command (nbdkit ``validate_request``, in table form)."""
    tflags = export.transmission_flags(structured)
    # proto.md "Command flags": FUA is valid on *every* command once SEND_FUA is
    # advertised ("the server MUST accept all commands with this bit set").
    common = _FUA if tflags & TransmissionFlag.SEND_FUA else 0
    eperm, einval, enospc = NbdErrno.EPERM, NbdErrno.EINVAL, NbdErrno.ENOSPC
    max_u32 = 0xFFFFFFFF
    read_flags = common | (_DF if tflags & TransmissionFlag.SEND_DF else 0)
    zero_flags = common | _NO_HOLE
    if tflags & TransmissionFlag.SEND_FAST_ZERO:
        zero_flags |= _FAST_ZERO
    zero_err: NbdErrno | None = None
    if not export.writable:
        zero_err = eperm
    elif not export.can_write_zeroes:
        zero_err = einval
    trim_err: NbdErrno | None = None
    if export.read_only:
        trim_err = eperm
    elif not export.can_trim:
        trim_err = einval
    # proto.md "NBD_CMD_BLOCK_STATUS": a client MUST NOT use it unless it selected a
    # nonzero number of metadata contexts; servers SHOULD reply EINVAL.
    bs_err = None if structured and has_contexts else einval
    # proto.md "Error values": write past the end SHOULD be ENOSPC, other commands EINVAL.
    # A READ over max_block gets an error reply however long it is, even past 2^25:
    # it has no payload to refuse (see _next_request).
    rules: dict[NbdCmd, _Rule] = {
        NbdCmd.READ: (read_flags, None, einval, export.max_block),
        NbdCmd.WRITE: (common, None if export.writable else eperm, enospc, export.max_block),
        NbdCmd.DISC: (common, None, einval, max_u32),  # never consulted, DISC is special
        NbdCmd.FLUSH: (common, None if export.can_flush else einval, einval, max_u32),
        NbdCmd.TRIM: (common, trim_err, einval, max_u32),
        NbdCmd.CACHE: (common, None if export.can_cache else einval, einval, max_u32),
        NbdCmd.WRITE_ZEROES: (zero_flags, zero_err, enospc, max_u32),
        NbdCmd.BLOCK_STATUS: (common | _REQ_ONE, bs_err, einval, max_u32),
    }
    return tuple(rules[cmd] for cmd in _CMDS)


class PieceReply:
    """The bytes of one READ reply sent a piece of the data at a time, for a
    server that reads and sends a large READ as the socket drains instead of
    holding all of its data (see :meth:`ServerConnection.piece_reply`).

    The pieces go out in order, each as ``header(pos, n)`` followed by its N
    bytes of data -- or ``hole(pos, n)`` instead when it has one -- with
    nothing of another reply in between.  The wire form (proto.md
    "Structured reply chunk message types"):

    - simple replies: the 16-byte header before the first piece, the data
      raw after it; a failure after the first piece cannot be told (the
      header said success): :meth:`error` is None, the connection must end;
    - structured, with DF ("don't fragment": one chunk): one OFFSET_DATA
      chunk with DONE covering the whole READ, then the data raw; holes are
      sent as zeros, and a later failure cannot be told either;
    - structured: one chunk per piece, OFFSET_DATA or OFFSET_HOLE, DONE on
      the last; a failure is an ERROR chunk with DONE, ending the reply.

    Pure: it only encodes.
    """

    __slots__ = ("cookie", "offset", "length", "_structured", "_df")

    def __init__(self, cookie: int, offset: int, length: int, structured: bool,
                 df: bool) -> None:
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self._structured = structured
        self._df = df

    def _flags(self, pos: int, n: int) -> int:
        return _DONE if pos + n == self.length else 0

    def header(self, pos: int, n: int) -> bytes:
        """What precedes the N bytes of data at POS (POS, N within the READ)."""
        if not self._structured:
            return _simple_pack(SIMPLE_REPLY_MAGIC, 0, self.cookie) if pos == 0 else b""
        if self._df:
            return (_data_chunk_pack(STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA, self.cookie,
                                     8 + self.length, self.offset) if pos == 0 else b"")
        return _data_chunk_pack(STRUCTURED_REPLY_MAGIC, self._flags(pos, n), _OFFSET_DATA,
                                self.cookie, 8 + n, self.offset + pos)

    def hole(self, pos: int, n: int) -> bytes | None:
        """The chunk that says "N bytes of zeros at POS", or None: send
        :meth:`header` and N zero bytes."""
        if not self._structured or self._df:
            return None
        return CHUNK_OFFSET_HOLE.pack(STRUCTURED_REPLY_MAGIC, self._flags(pos, n),
                                      NbdReplyType.OFFSET_HOLE, self.cookie, 12,
                                      self.offset + pos, n)

    def error(self, error: NbdErrno, message: str = "") -> bytes | None:
        """The chunk that ends the reply with ERROR once pieces went out, or
        None when the wire form cannot carry it (the connection must end)."""
        if not self._structured or self._df:
            return None
        return _error_chunk(self.cookie, error, message)


def _error_chunk(cookie: int, error: NbdErrno, message: str) -> bytes:
    """A structured ERROR chunk with DONE (proto.md NBD_REPLY_TYPE_ERROR)."""
    raw = message.encode("utf-8", "replace")[:_MAX_ERROR_MESSAGE]
    return CHUNK_ERROR.pack(STRUCTURED_REPLY_MAGIC, NbdReplyFlag.DONE, NbdReplyType.ERROR,
                            cookie, 6 + len(raw), error, len(raw)) + raw


class ServerConnection:
    """One NBD server-side connection, as a pure state machine.

    :param lookup: returns the export for a client-supplied name, or None if unknown.
        Called during the handshake for EXPORT_NAME, INFO, GO and the meta context options.
    :param list_exports: returns the exports to announce for NBD_OPT_LIST.
    :param tls: whether NBD_OPT_STARTTLS is refused, offered or required.

    The greeting is queued at construction; call :meth:`data_to_send` first.
    """

    def __init__(
        self, lookup: Lookup, list_exports: ListExports, tls: TlsMode = TlsMode.OFF
    ) -> None:
        self._lookup = lookup
        self._list_exports = list_exports
        self._tls = tls
        self._tls_active = False
        self._buf = ReceiveBuffer()
        self._out: list[Outgoing] = [GREETING.pack(NBDMAGIC, IHAVEOPT, _SERVER_HANDSHAKE_FLAGS)]
        self._state = _State.CLIENT_FLAGS
        self._eof = False
        self._error: NbdProtocolError | None = None
        self._shutting_down = False
        # Handshake state.
        self._no_zeroes = False
        self._structured = False
        self._n_options = 0
        self._meta_export: str | None = None  # canonical export name SET_META_CONTEXT was for
        self._meta_selected: dict[int, str] = {}
        # Transmission state.
        self._export: ExportInfo | None = None
        self._meta_contexts: dict[int, str] = {}
        self._rules: tuple[_Rule, ...] = ()
        # the rules next_run() offers, by command (None: never offered)
        self._run_rules: tuple[RunRule | None, RunRule | None] = (None, None)
        self._size = 0
        self._min_block = 1
        self._drain = 0  # payload bytes of a rejected WRITE still to discard
        self._pending: tuple[Rejected, str] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def export(self) -> ExportInfo | None:
        """The export chosen by EXPORT_NAME or GO; None until transmission starts."""
        return self._export

    @property
    def structured(self) -> bool:
        """True once NBD_OPT_STRUCTURED_REPLY was acknowledged."""
        return self._structured

    @property
    def meta_contexts(self) -> dict[int, str]:
        """Context id -> name, as negotiated for the chosen export (a copy)."""
        return dict(self._meta_contexts)

    @property
    def tls_mode(self) -> TlsMode:
        """What this connection offers (fixed at construction)."""
        return self._tls

    @property
    def tls_active(self) -> bool:
        """True once :meth:`tls_started` was called: the session is encrypted."""
        return self._tls_active

    @property
    def in_transmission(self) -> bool:
        """True between ExportChosen and Disconnect (or a fatal error)."""
        return self._state is _State.TRANSMISSION

    @property
    def trailing_data(self) -> bytes:
        """Received bytes not consumed yet (e.g. anything after NBD_CMD_DISC)."""
        return self._buf.peek()

    def transmission_rules(self) -> tuple[tuple[tuple[int, int | None, int, int], ...], bytes]:
        """What a server that runs the transmission phase itself (the native
        data plane) needs to take over: the rule table it must apply, one
        ``(allowed flags, static NBD error or None, range error, maximum
        length)`` per command by wire value, and the received bytes not
        parsed yet.  Nothing changes here; :meth:`handed_over` follows.

        :raise LocalProtocolError: not in a quiet transmission phase (a
            WRITE payload being discarded, a protocol error, replies still
            queued, shutting down).
        """
        if self._state is not _State.TRANSMISSION or self._drain or self._error is not None \
                or self._out or self._shutting_down:
            raise LocalProtocolError("transmission_rules() outside a quiet transmission phase")
        rules = tuple((int(allowed), None if error is None else int(error), int(range_error),
                       max_length) for allowed, error, range_error, max_length in self._rules)
        return rules, self._buf.peek()

    def handed_over(self) -> None:
        """The transmission phase went to another server with the bytes
        :meth:`transmission_rules` returned: they are consumed, and the
        engine is closed."""
        self._require_transmission()
        self._buf.skip(len(self._buf))
        self._state = _State.CLOSED

    # ------------------------------------------------------------------ input side

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the client (empty data feeds nothing: EOF
        is :meth:`receive_eof`, never an empty read in disguise).

        :raise LocalProtocolError: if called after EOF, or between
            :class:`StartTls` and :meth:`tls_started` (no plaintext may follow
            the STARTTLS acknowledgement).
        """
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if self._state is _State.TLS_HANDSHAKE:
            raise LocalProtocolError("receive_data() during the TLS handshake")
        if len(data):
            self._buf.feed(data)

    def receive_eof(self) -> None:
        """The client closed its side: nothing more will arrive.

        :raise LocalProtocolError: if EOF was already signalled, or during the
            TLS handshake.
        """
        if self._eof:
            raise LocalProtocolError("receive_eof() after EOF")
        if self._state is _State.TLS_HANDSHAKE:
            raise LocalProtocolError("receive_eof() during the TLS handshake")
        self._eof = True

    def next_event(self) -> Event | type[NEED_DATA]:
        """Parse buffered input and return the next event, or :class:`NEED_DATA`.

        Handshake options are answered internally (replies are queued) and produce no
        events, except :class:`StartTls` (upgrade, then call :meth:`tls_started`;
        until then this returns NEED_DATA); the handshake ends with
        :class:`ExportChosen` or :class:`Disconnect`.  After :class:`Disconnect`
        every call returns :class:`Disconnect` again.

        :return: an event or the NEED_DATA sentinel.
        :raise NbdProtocolError: the client broke the protocol; send what is queued and
            close.  Raised again on every later call.
        """
        if self._error is not None:
            raise self._error
        try:
            if self._state is _State.TRANSMISSION:
                return self._next_request()
            if self._state is _State.OPTIONS:
                return self._next_option()
            if self._state is _State.CLIENT_FLAGS:
                return self._next_client_flags()
            if self._state is _State.TLS_HANDSHAKE:
                return NEED_DATA
            return Disconnect()
        except NbdProtocolError as exc:
            self._error = exc
            self._state = _State.ERROR
            raise

    def tls_started(self) -> None:
        """The TLS handshake that followed :class:`StartTls` succeeded.

        Option haggling resumes, now over TLS; feed the decrypted bytes to
        :meth:`receive_data`.  Legal only after :class:`StartTls`.

        :raise LocalProtocolError: in any other state.
        """
        if self._state is not _State.TLS_HANDSHAKE:
            raise LocalProtocolError(f"tls_started() in state {self._state.name}")
        self._tls_active = True
        self._state = _State.OPTIONS

    def shutting_down(self) -> None:
        """Refuse everything new: requests get ESHUTDOWN, options NBD_REP_ERR_SHUTDOWN.

        proto.md "Terminating the transmission phase": errors for requests received
        during a server shutdown SHOULD be ESHUTDOWN.  NBD_CMD_DISC still disconnects.
        """
        self._shutting_down = True

    def _need(self) -> Event | type[NEED_DATA]:
        """NEED_DATA, or the end of the session if EOF came at a message boundary."""
        if not self._eof:
            return NEED_DATA
        if len(self._buf) == 0 and self._drain == 0:
            self._state = _State.CLOSED
            return Disconnect()
        raise NbdProtocolError(f"EOF in the middle of a message ({len(self._buf)} bytes left)")

    # ------------------------------------------------------------------ handshake

    def _next_client_flags(self) -> Event | type[NEED_DATA]:
        buf = self._buf
        if len(buf) < CLIENT_FLAGS.size:
            return self._need()
        (flags,) = CLIENT_FLAGS.unpack_from(buf.data, buf.pos)
        buf.skip(CLIENT_FLAGS.size)
        # proto.md "Client flags": we only speak fixed newstyle; unknown flags MUST
        # make the server drop the connection.
        if not flags & ClientFlag.FIXED_NEWSTYLE:
            raise NbdProtocolError("client does not support fixed newstyle")
        if flags & ~_KNOWN_CLIENT_FLAGS:
            raise NbdProtocolError(f"unknown client flags 0x{flags:08x}")
        self._no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self._state = _State.OPTIONS
        return self._next_option()

    def _next_option(self) -> Event | type[NEED_DATA]:
        buf = self._buf
        while True:
            if len(buf) < OPTION_HEADER.size:
                return self._need()
            magic, opt, length = OPTION_HEADER.unpack_from(buf.data, buf.pos)
            if magic != IHAVEOPT:
                raise NbdProtocolError(f"bad option magic 0x{magic:016x}")
            # The length cannot be trusted, so do not wait for (or allocate) the payload.
            if length > MAX_OPTION_LENGTH:
                raise NbdProtocolError(f"option {opt} length {length} exceeds our cap")
            if len(buf) < OPTION_HEADER.size + length:
                return self._need()
            buf.skip(OPTION_HEADER.size)
            payload = buf.take(length)
            self._n_options += 1
            if self._n_options > MAX_OPTIONS:
                raise NbdProtocolError("too many options")
            if (
                self._tls is TlsMode.REQUIRE
                and not self._tls_active
                and opt not in _OPTIONS_BEFORE_TLS
            ):
                # proto.md "FORCEDTLS mode": any other option MUST get
                # NBD_REP_ERR_TLS_REQD (unknown ones too), and EXPORT_NAME, which
                # cannot be answered with an error, MUST terminate the session.
                if opt == NbdOpt.EXPORT_NAME:
                    raise NbdProtocolError("NBD_OPT_EXPORT_NAME before TLS (TLS is required)")
                # The message is qemu-nbd's (nbd/server.c), word for word.
                self._opt_reply(opt, NbdRep.ERR_TLS_REQD,
                                b"Option 0x%x not permitted before TLS" % opt)
                continue
            handler = _OPTION_HANDLERS.get(opt)
            if handler is None:
                # proto.md: an unknown option gets NBD_REP_ERR_UNSUP; haggling continues.
                self._opt_reply(opt, NbdRep.ERR_UNSUP, b"option not supported")
                continue
            if self._shutting_down and opt not in (NbdOpt.ABORT, NbdOpt.EXPORT_NAME):
                self._opt_reply(opt, NbdRep.ERR_SHUTDOWN, b"server is shutting down")
                continue
            event = handler(self, opt, payload)
            if event is not None:
                return event

    def _opt_reply(self, opt: int, rep: NbdRep, payload: bytes = b"") -> None:
        self._out.append(
            OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, opt, rep, len(payload)) + payload
        )

    def _opt_export_name(self, opt: int, payload: bytes) -> Event | None:
        # proto.md "NBD_OPT_EXPORT_NAME": it cannot fail with an error reply; if the
        # export does not exist the server MUST terminate the session.
        name = _decode_string(payload)
        if name is None:
            raise NbdProtocolError("NBD_OPT_EXPORT_NAME: invalid export name")
        if self._shutting_down:
            raise NbdProtocolError("NBD_OPT_EXPORT_NAME while shutting down")
        export = self._lookup(name)
        if export is None:
            raise NbdProtocolError(f"NBD_OPT_EXPORT_NAME: unknown export {name!r}")
        reply = EXPORT_NAME_REPLY.pack(export.size, export.transmission_flags(self._structured))
        self._out.append(reply if self._no_zeroes else reply + _ZEROES)
        return self._start_transmission(export)

    def _opt_abort(self, opt: int, payload: bytes) -> Event | None:
        # proto.md "NBD_OPT_ABORT": the server MUST reply with NBD_REP_ACK.
        self._opt_reply(opt, NbdRep.ACK)
        self._state = _State.CLOSED
        return Disconnect()

    def _opt_starttls(self, opt: int, payload: bytes) -> Event | None:
        # proto.md "NBD_OPT_STARTTLS": no data allowed (NBD_REP_ERR_INVALID); once TLS
        # is up a second one MUST get NBD_REP_ERR_INVALID; "NOTLS mode": MUST answer
        # NBD_REP_ERR_POLICY (as qemu-nbd does without tls-creds) or ERR_UNSUP.
        if payload:
            self._opt_reply(opt, NbdRep.ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
            return None
        if self._tls_active:
            self._opt_reply(opt, NbdRep.ERR_INVALID, b"TLS is already active")
            return None
        if self._tls is TlsMode.OFF:
            self._opt_reply(opt, NbdRep.ERR_POLICY, b"TLS not configured")  # qemu-nbd's words
            return None
        # A client MUST wait for our ACK before its TLS handshake (proto.md "Client-side
        # requirements"), so bytes already here were sent in plaintext after STARTTLS:
        # never treat them as part of the TLS session (the STARTTLS command-injection
        # class of bugs, CVE-2011-0411).  Refuse them before anything is acknowledged.
        if len(self._buf) or self._eof:
            raise NbdProtocolError("plaintext after NBD_OPT_STARTTLS")
        self._opt_reply(opt, NbdRep.ACK)
        # proto.md "NBD_OPT_STARTTLS": when it succeeds the server MUST NOT preserve any
        # negotiation state from before it (nbdkit CVE-2021-3716).
        self._structured = False
        self._meta_export = None
        self._meta_selected = {}
        self._state = _State.TLS_HANDSHAKE
        return StartTls()

    def _opt_list(self, opt: int, payload: bytes) -> Event | None:
        if payload:
            self._opt_reply(opt, NbdRep.ERR_INVALID, b"NBD_OPT_LIST takes no data")
            return None
        for export in self._list_exports():
            name = export.name.encode("utf-8")
            detail = export.description.encode("utf-8")
            self._opt_reply(opt, NbdRep.SERVER, U32.pack(len(name)) + name + detail)
        self._opt_reply(opt, NbdRep.ACK)
        return None

    def _opt_structured_reply(self, opt: int, payload: bytes) -> Event | None:
        if payload:
            self._opt_reply(opt, NbdRep.ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
            return None
        self._structured = True
        self._opt_reply(opt, NbdRep.ACK)
        return None

    def _opt_info_go(self, opt: int, payload: bytes) -> Event | None:
        # Data: 32 bits name length, name, 16 bits number of requests, 16 bits each.
        # Checks are ordered so that no subtraction can underflow.
        total = len(payload)
        if total < 6:
            self._opt_reply(opt, NbdRep.ERR_INVALID, b"option data too short")
            return None
        (name_len,) = U32.unpack_from(payload, 0)
        if name_len > total - 6:
            self._opt_reply(opt, NbdRep.ERR_INVALID, b"name length exceeds option data")
            return None
        (n_requests,) = U16.unpack_from(payload, 4 + name_len)
        if total != 6 + name_len + 2 * n_requests:
            self._opt_reply(opt, NbdRep.ERR_INVALID, b"inconsistent option length")
            return None
        name = _decode_string(payload[4 : 4 + name_len])
        if name is None:
            self._opt_reply(opt, NbdRep.ERR_INVALID, b"invalid export name")
            return None
        export = self._lookup(name)
        if export is None:
            self._opt_reply(opt, NbdRep.ERR_UNKNOWN, b"unknown export")
            return None
        # We send every info we have whether requested or not (proto.md allows that).
        flags = export.transmission_flags(self._structured)
        self._opt_reply(opt, NbdRep.INFO, INFO_EXPORT.pack(NbdInfo.EXPORT, export.size, flags))
        self._opt_reply(opt, NbdRep.INFO, U16.pack(NbdInfo.NAME) + export.name.encode("utf-8"))
        if export.description:
            desc = export.description.encode("utf-8")
            self._opt_reply(opt, NbdRep.INFO, U16.pack(NbdInfo.DESCRIPTION) + desc)
        block = INFO_BLOCK_SIZE.pack(
            NbdInfo.BLOCK_SIZE, export.min_block, export.pref_block, export.max_block
        )
        self._opt_reply(opt, NbdRep.INFO, block)
        self._opt_reply(opt, NbdRep.ACK)
        if opt == NbdOpt.GO:
            return self._start_transmission(export)
        return None

    def _opt_meta_context(self, opt: int, payload: bytes) -> Event | None:
        listing = opt == NbdOpt.LIST_META_CONTEXT
        if not listing:
            # proto.md: SET replaces all previously selected contexts; on any error
            # below nothing stays selected.
            self._meta_export = None
            self._meta_selected = {}
        if not self._structured:
            # proto.md: MUST NOT be requested before structured replies; SHOULD
            # answer NBD_REP_ERR_INVALID.
            self._opt_reply(opt, NbdRep.ERR_INVALID, b"structured replies not negotiated")
            return None
        parsed = self._parse_meta_payload(payload)
        if parsed is None:
            self._opt_reply(opt, NbdRep.ERR_INVALID, b"malformed meta context request")
            return None
        name, queries = parsed
        export = self._lookup(name)
        if export is None:
            self._opt_reply(opt, NbdRep.ERR_UNKNOWN, b"unknown export")
            return None
        matched = resolve_queries(export.meta_contexts, queries, listing)
        selected: dict[int, str] = {}
        for index, context in enumerate(matched, start=1):
            # proto.md: ids in LIST replies are reserved and SHOULD be zero.
            context_id = 0 if listing else index
            self._opt_reply(opt, NbdRep.META_CONTEXT, U32.pack(context_id) + context.encode())
            selected[index] = context
        self._opt_reply(opt, NbdRep.ACK)
        if not listing:
            self._meta_export = export.name
            self._meta_selected = selected
        return None

    @staticmethod
    def _parse_meta_payload(payload: bytes) -> tuple[str, list[str]] | None:
        """Parse (name length, name, query count, [query length, query]...) or None."""
        total = len(payload)
        if total < 8:
            return None
        (name_len,) = U32.unpack_from(payload, 0)
        if name_len > total - 8:
            return None
        name = _decode_string(payload[4 : 4 + name_len])
        (n_queries,) = U32.unpack_from(payload, 4 + name_len)
        pos = 8 + name_len
        queries: list[str] = []
        for _ in range(n_queries):
            if total - pos < 4:
                return None
            (query_len,) = U32.unpack_from(payload, pos)
            pos += 4
            if query_len > total - pos:
                return None
            query = _decode_string(payload[pos : pos + query_len])
            if query is None:
                return None
            queries.append(query)
            pos += query_len
        if pos != total or name is None:
            return None
        return name, queries

    def _start_transmission(self, export: ExportInfo) -> Event:
        self._export = export
        # Contexts negotiated for a different export than the final one are dropped.
        if self._meta_export == export.name:
            self._meta_contexts = dict(self._meta_selected)
        else:
            self._meta_contexts = {}
        self._rules = _build_rules(export, self._structured, bool(self._meta_contexts))
        self._size = export.size
        self._min_block = export.min_block
        read_flags, _error, _range_error, read_max = self._rules[_CMD_READ]
        write_flags, write_error, _range_error, write_max = self._rules[_CMD_WRITE]
        self._run_rules = (
            RunRule(export.size, int(read_flags), read_max, export.min_block, self._structured),
            None if write_error is not None else
            RunRule(export.size, int(write_flags), write_max, export.min_block, self._structured),
        )
        self._state = _State.TRANSMISSION
        return ExportChosen(export)

    # ------------------------------------------------------------------ transmission

    def _next_request(self) -> Event | type[NEED_DATA]:
        """Parse and validate one request: the hot path, kept flat on purpose."""
        if self._drain:
            return self._continue_drain()
        buf = self._buf
        data = buf.data
        pos = buf.pos
        if len(data) - pos < _REQ_SIZE:
            return self._need()
        magic, flags, cmd, cookie, offset, length = _req_unpack_from(data, pos)
        if magic != REQUEST_MAGIC:
            raise NbdProtocolError(f"bad request magic 0x{magic:08x}")
        if cmd == _CMD_DISC:
            # proto.md "NBD_CMD_DISC": there is no reply; whatever the other fields
            # say, the client is leaving.
            buf.skip(_REQ_SIZE)
            self._state = _State.CLOSED
            return Disconnect()
        if length > MAX_PAYLOAD and cmd == _CMD_WRITE:
            # The spec's DoS allowance for a WRITE payload; we neither
            # drain nor allocate it.  A READ has a length but no payload: an
            # oversized one is refused with an error reply below.
            raise NbdProtocolError(f"WRITE payload of {length} bytes exceeds {MAX_PAYLOAD}")

        error: NbdErrno | None
        message = ""
        if self._shutting_down:
            error, message = NbdErrno.ESHUTDOWN, "server is shutting down"
        elif cmd >= len(self._rules):
            error, message = _EINVAL, "unknown command"
        else:
            allowed, error, range_error, max_length = self._rules[cmd]
            if flags & ~allowed:
                error, message = _EINVAL, "invalid or unsupported flags"
            elif error is not None:
                message = "operation not permitted"
            elif cmd == _CMD_FLUSH:
                if offset or length:
                    error, message = _EINVAL, "flush with nonzero offset or length"
            elif length == 0:
                # proto.md leaves zero-length requests unspecified; we refuse them.
                error, message = _EINVAL, "zero length"
            elif offset + length > self._size:  # Python ints: no overflow
                error, message = range_error, "request beyond the end of the export"
            elif length > max_length:
                # proto.md "Block size constraints": "The server SHOULD report an
                # `NBD_EINVAL` error if the client's request [...] is larger than the
                # advertised maximum block size."  For a READ above 2^25 we prefer
                # this to the hard disconnect the same section allows: a READ request
                # carries no payload, so the stream stays in sync.
                error, message = _EINVAL, "request larger than the maximum block size"
                if flags & _DF and length > MAX_PAYLOAD:
                    # Only a READ passes the flag check with DF.  proto.md
                    # "NBD_CMD_READ": "A server MAY reject a client's request with the
                    # error `NBD_EOVERFLOW` if the length is too large to send without
                    # fragmentation"; "Error values": the server SHOULD NOT return it
                    # "except as documented in response to `NBD_CMD_READ` when
                    # `NBD_CMD_FLAG_DF` is supported" -- so never without DF.
                    error = _EOVERFLOW
                    message = "READ length too large to send unfragmented (DF)"
                elif cmd == _CMD_READ:
                    message = "READ length larger than the maximum block size"
            elif self._min_block > 1 and (offset | length) % self._min_block:
                # min_block is a power of two, so OR-ing is an exact test of both.
                error, message = _EINVAL, "request not aligned to the minimum block size"

        if cmd == _CMD_WRITE:
            if error is not None:
                # nbdkit skip_over_write_buffer: keep the stream in sync.
                buf.skip(_REQ_SIZE)
                self._drain = length
                self._pending = (Rejected(cookie, cmd, error), message)
                return self._continue_drain()
            if len(data) - pos < _REQ_SIZE + length:
                return self._need()
            buf.skip(_REQ_SIZE)
            return Command(
                cookie, _CMDS[cmd], _FLAG_VALUES[flags], offset, length, buf.take_view(length)
            )
        buf.pos = pos + _REQ_SIZE  # buf.skip(), inlined
        if error is not None:
            self.reply_error(cookie, error, message)
            return Rejected(cookie, cmd, error)
        return Command(cookie, _CMDS[cmd], _FLAG_VALUES[flags], offset, length, None)

    def next_run(self) -> tuple[int, RunRule, bytes | bytearray, int] | None:
        """Offer the buffered requests to a caller that takes runs of READs
        or WRITEs itself.

        When the next buffered request is complete (a WRITE with its
        payload) and a READ, or a WRITE on a writable export, by its type
        alone, return ``(cmd, rule, data, pos)``: the command (0 READ, 1
        WRITE), the engine's rule for it, and the receive buffer with the
        request's offset in it.  The caller may take any prefix of
        consecutive requests of that command that :class:`RunRule` accepts
        (checked exactly as :meth:`next_event` would) and report it with
        :meth:`take_run`; anything else it leaves to :meth:`next_event`.
        ``None`` whenever :meth:`next_event` must go first: not in
        transmission, a protocol error, a WRITE payload being discarded,
        shutting down, or the next request is another command.  Nothing is
        consumed here.
        """
        if self._state is not _State.TRANSMISSION or self._error is not None \
                or self._drain or self._shutting_down:
            return None
        buf = self._buf
        data = buf.data
        pos = buf.pos
        have = len(data) - pos
        if have < _REQ_SIZE or data[pos + 6]:
            return None
        cmd = data[pos + 7]
        if cmd > _CMD_WRITE:
            return None
        rule = self._run_rules[cmd]
        if rule is None or (cmd == _CMD_WRITE
                            and have < _REQ_SIZE + _u32_unpack_from(data, pos + 24)[0]):
            return None
        return cmd, rule, data, pos

    def take_run(self, consumed: int, replies: bytes | memoryview | None = None) -> None:
        """Consume CONSUMED bytes of requests the caller took (:meth:`next_run`)
        and queue REPLIES, their replies in order, when it has them already
        (else :meth:`reply_run` once it does).

        :raise LocalProtocolError: not in transmission, or CONSUMED is not
            within the buffer (at least one request header).
        """
        self._require_transmission()
        if consumed < _REQ_SIZE or consumed > len(self._buf) or self._drain:
            raise LocalProtocolError(f"take_run({consumed}) does not match the buffer")
        self._buf.pos += consumed
        if replies is not None:
            self._out.append(replies)

    def reply_run(self, replies: bytes | memoryview) -> None:
        """Queue REPLIES of requests taken with :meth:`take_run`, in order.

        :raise LocalProtocolError: before transmission.
        """
        self._require_transmission()
        self._out.append(replies)

    def _continue_drain(self) -> Event | type[NEED_DATA]:
        buf = self._buf
        n = min(self._drain, len(buf))
        buf.skip(n)
        self._drain -= n
        if self._drain:
            return self._need()
        assert self._pending is not None
        rejected, message = self._pending
        self._pending = None
        self.reply_error(rejected.cookie, rejected.error, message)
        return rejected

    # ------------------------------------------------------------------ output side

    def data_to_send(self) -> list[bytes | memoryview]:
        """Drain and return the queued outgoing buffers, in order.

        Write them all, in order, with one writer (header and payload of a reply are
        adjacent in the list).  Buffers passed to :meth:`reply_read` are queued by
        reference: do not modify them until they have been written.
        """
        out = self._out
        self._out = []
        return out

    def _require_transmission(self) -> None:
        if self._export is None:
            raise LocalProtocolError("replies are only valid after ExportChosen")

    def reply_ok(self, cookie: int) -> None:
        """Queue a success reply for a request without reply payload.

        Always a simple reply: proto.md allows it for every command except READ and
        BLOCK_STATUS even with structured replies, and qemu and nbdkit do the same.

        :raise LocalProtocolError: before transmission started.
        """
        self._require_transmission()
        self._out.append(_simple_pack(SIMPLE_REPLY_MAGIC, 0, cookie))

    def reply_error(self, cookie: int, error: NbdErrno, message: str = "") -> None:
        """Queue an error reply (structured ERROR chunk with *message*, or simple reply).

        :param error: the NBD error value (use :func:`to_nbd_errno` for OS errors).
        :param message: shown to the user by the client; truncated to 4096 bytes.
        :raise LocalProtocolError: before transmission, or if *error* is OK.
        """
        self._require_transmission()
        if error == NbdErrno.OK:
            raise LocalProtocolError("reply_error() needs a nonzero error")
        if not self._structured:
            self._out.append(_simple_pack(SIMPLE_REPLY_MAGIC, error, cookie))
            return
        self._out.append(_error_chunk(cookie, error, message))

    def reply_read(
        self,
        cookie: int,
        offset: int,
        data: bytes | bytearray | memoryview,
        is_hole: bool = False,
    ) -> None:
        """Queue a successful READ reply covering *data*.

        Structured: one OFFSET_DATA chunk (or OFFSET_HOLE if *is_hole*) with DONE, which
        also satisfies NBD_CMD_FLAG_DF.  Simple: the header followed by *data* (for a
        hole, *data* must already be zeros).

        :param offset: the request's offset.
        :param data: exactly the requested length of bytes (queued by reference).
        :param is_hole: the whole range reads as zeros.
        :raise LocalProtocolError: before transmission, or if *data* is empty.
        """
        self._require_transmission()
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if n == 0:
            raise LocalProtocolError("reply_read() with no data")
        if not self._structured:
            self._out.append(_simple_pack(SIMPLE_REPLY_MAGIC, 0, cookie))
            self._out.append(data if isinstance(data, _BYTES_OR_VIEW) else memoryview(data))
            return
        if is_hole:
            self._out.append(
                CHUNK_OFFSET_HOLE.pack(
                    STRUCTURED_REPLY_MAGIC,
                    NbdReplyFlag.DONE,
                    NbdReplyType.OFFSET_HOLE,
                    cookie,
                    12,
                    offset,
                    n,
                )
            )
            return
        self._out.append(
            _data_chunk_pack(STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA, cookie, 8 + n, offset)
        )
        self._out.append(data if isinstance(data, _BYTES_OR_VIEW) else memoryview(data))

    def read_reply_header(self, cookie: int, offset: int, length: int) -> bytes:
        """The bytes that precede LENGTH bytes of data in a successful READ reply.

        For a server that writes the payload itself (e.g. from another thread):
        the header and the data together equal what :meth:`reply_read` queues for
        non-hole data.  Nothing is queued here.

        :raise LocalProtocolError: before transmission, or if *length* is 0.
        """
        self._require_transmission()
        if length <= 0:
            raise LocalProtocolError("read_reply_header() with no data")
        if not self._structured:
            return _simple_pack(SIMPLE_REPLY_MAGIC, 0, cookie)
        return _data_chunk_pack(
            STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA, cookie, 8 + length, offset
        )

    def piece_reply(self, cookie: int, offset: int, length: int, flags: int) -> PieceReply:
        """How to send a successful READ reply a piece at a time (see
        :class:`PieceReply`).  Nothing is queued here: the caller writes the
        pieces, with nothing else in between.

        :param flags: the READ's flags (``NBD_CMD_FLAG_DF`` matters).
        :raise LocalProtocolError: before transmission, or if *length* is 0.
        """
        self._require_transmission()
        if length <= 0:
            raise LocalProtocolError("piece_reply() with no data")
        return PieceReply(cookie, offset, length, self._structured, bool(flags & _DF))

    def ok_reply(self, cookie: int) -> bytes:
        """The bytes of the success reply :meth:`reply_ok` would queue.

        For a server that writes the reply itself (e.g. from the thread that
        did the write).  Nothing is queued here.

        :raise LocalProtocolError: before transmission started.
        """
        self._require_transmission()
        return _simple_pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def has_data_to_send(self) -> bool:
        """Whether replies are queued (:meth:`data_to_send` would return any)."""
        return bool(self._out)

    def reply_block_status(
        self, cookie: int, contexts: Sequence[tuple[int, Sequence[tuple[int, int]]]]
    ) -> None:
        """Queue a BLOCK_STATUS reply: one chunk per context, the last one with DONE.

        :param contexts: ``(context_id, [(length, flags), ...])`` per negotiated context.
        :raise LocalProtocolError: before transmission, without structured replies, with
            no contexts, or with a context that has no extents.
        """
        self._require_transmission()
        if not self._structured:
            raise LocalProtocolError("BLOCK_STATUS replies need structured replies")
        if not contexts:
            raise LocalProtocolError("reply_block_status() needs at least one context")
        last = len(contexts) - 1
        for index, (context_id, extents) in enumerate(contexts):
            if not extents:
                raise LocalProtocolError(f"context {context_id} has no extents")
            flat = [value for extent in extents for value in extent]
            body = struct.pack(f">I{len(flat)}I", context_id, *flat)
            header = CHUNK_HEADER.pack(
                STRUCTURED_REPLY_MAGIC,
                NbdReplyFlag.DONE if index == last else 0,
                NbdReplyType.BLOCK_STATUS,
                cookie,
                len(body),
            )
            self._out.append(header + body)


_OptionHandler = Callable[[ServerConnection, int, bytes], Event | None]

# The option dispatch table (h11 keeps its transitions in tables, too).
_OPTION_HANDLERS: Final[dict[int, _OptionHandler]] = {
    NbdOpt.EXPORT_NAME: ServerConnection._opt_export_name,
    NbdOpt.ABORT: ServerConnection._opt_abort,
    NbdOpt.STARTTLS: ServerConnection._opt_starttls,
    NbdOpt.LIST: ServerConnection._opt_list,
    NbdOpt.INFO: ServerConnection._opt_info_go,
    NbdOpt.GO: ServerConnection._opt_info_go,
    NbdOpt.STRUCTURED_REPLY: ServerConnection._opt_structured_reply,
    NbdOpt.LIST_META_CONTEXT: ServerConnection._opt_meta_context,
    NbdOpt.SET_META_CONTEXT: ServerConnection._opt_meta_context,
}
