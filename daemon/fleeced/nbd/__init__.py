"""Sans-IO NBD protocol engine (fixed-newstyle handshake + transmission phase).

Feed bytes to :class:`ServerConnection`, get events and reply bytes back.  This package
imports no asyncio, socket, os or datapath module.
"""

from __future__ import annotations

from .constants import (
    MAX_PAYLOAD,
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
    NbdState,
    TransmissionFlag,
)
from .engine import PieceReply, RunRule, ServerConnection, TlsMode
from .errors import LocalProtocolError, NbdProtocolError, RequestRejected, to_nbd_errno
from .events import NEED_DATA, Command, Disconnect, Event, ExportChosen, Rejected, StartTls
from .export import ExportInfo

__all__ = [
    "MAX_PAYLOAD",
    "ClientFlag",
    "HandshakeFlag",
    "NbdCmd",
    "NbdCmdFlag",
    "NbdErrno",
    "NbdInfo",
    "NbdOpt",
    "NbdRep",
    "NbdReplyFlag",
    "NbdReplyType",
    "NbdState",
    "PieceReply",
    "RunRule",
    "TransmissionFlag",
    "ServerConnection",
    "TlsMode",
    "LocalProtocolError",
    "NbdProtocolError",
    "RequestRejected",
    "to_nbd_errno",
    "NEED_DATA",
    "Command",
    "Disconnect",
    "Event",
    "ExportChosen",
    "Rejected",
    "StartTls",
    "ExportInfo",
]
