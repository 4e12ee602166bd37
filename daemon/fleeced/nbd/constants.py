"""NBD wire constants (fixed-newstyle handshake, transmission, structured replies).

Values and names follow the NBD protocol document (NetworkBlockDevice/nbd
``doc/proto.md``) and nbdkit's ``nbd-protocol.h``.  This module is pure data: it
imports nothing but :mod:`enum` and :mod:`typing`.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

__all__ = [
    "NBDMAGIC",
    "IHAVEOPT",
    "OPTION_REPLY_MAGIC",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY_MAGIC",
    "STRUCTURED_REPLY_MAGIC",
    "MAX_PAYLOAD",
    "MAX_STRING",
    "MAX_OPTION_LENGTH",
    "MAX_OPTIONS",
    "HandshakeFlag",
    "ClientFlag",
    "TransmissionFlag",
    "NbdOpt",
    "NbdRep",
    "NbdInfo",
    "NbdCmd",
    "NbdCmdFlag",
    "NbdReplyFlag",
    "NbdReplyType",
    "NbdErrno",
    "NbdState",
]

# proto.md "Newstyle negotiation": S: 64 bits, 0x4e42444d41474943 (ASCII 'NBDMAGIC').
NBDMAGIC: Final = 0x4E42444D41474943
# ... followed by 64 bits 0x49484156454F5054 (ASCII 'IHAVEOPT'), also the option magic.
IHAVEOPT: Final = 0x49484156454F5054
OPTION_REPLY_MAGIC: Final = 0x0003E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# proto.md "Block size constraints": a client MAY send a payload of up to 2^25 bytes
# (32 MiB) whatever the advertised maximum; above that the server may hang up.  We do
# for a WRITE payload; a READ over it only has a length and gets an error reply.
MAX_PAYLOAD: Final = 32 * 1024 * 1024
# proto.md "Option haggling": strings (export names, queries) are at most 4096 bytes.
MAX_STRING: Final = 4096
# Our cap on one option's payload.  The largest legitimate option is a
# SET_META_CONTEXT with a handful of queries; anything bigger is treated as hostile.
MAX_OPTION_LENGTH: Final = 64 * 1024
# Our cap on the number of options in one handshake (nbdkit uses 32).
MAX_OPTIONS: Final = 128


class HandshakeFlag(IntFlag):
    """Server handshake flags (16 bits, sent in the greeting)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """Client flags (32 bits, the first thing a newstyle client sends)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    """Per-export transmission flags (16 bits)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class NbdOpt(IntEnum):
    """Option types (NBD_OPT_*)."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR: Final = 1 << 31


class NbdRep(IntEnum):
    """Option reply types (NBD_REP_*); errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9
    ERR_EXT_HEADER_REQD = _REP_ERR | 10


class NbdInfo(IntEnum):
    """Information types carried by NBD_REP_INFO (NBD_INFO_*)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class NbdCmd(IntEnum):
    """Request types (NBD_CMD_*)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class NbdCmdFlag(IntFlag):
    """Command flags (NBD_CMD_FLAG_*)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class NbdReplyFlag(IntFlag):
    """Structured reply chunk flags."""

    DONE = 1 << 0


class NbdReplyType(IntEnum):
    """Structured reply chunk types (NBD_REPLY_TYPE_*)."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


class NbdErrno(IntEnum):
    """The error values allowed on the wire (proto.md "Error values")."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class NbdState(IntFlag):
    """``base:allocation`` extent flags (NBD_STATE_*)."""

    HOLE = 1 << 0
    ZERO = 1 << 1
