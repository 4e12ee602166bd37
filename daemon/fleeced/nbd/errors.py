"""Errors of the sans-IO NBD engine and the one OS-errno -> NBD-errno mapping.

Error tree::

    Exception
     +-- NbdProtocolError   the peer broke the protocol: send what is queued, hang up
     +-- RequestRejected    one request is refused with an NbdErrno; the connection goes on
     +-- LocalProtocolError the *server code* misused the engine (a bug, never the peer's fault)

Imports nothing but :mod:`errno` (constants only) and :mod:`.constants`.
"""

from __future__ import annotations

import errno as _errno

from .constants import NbdCmdFlag, NbdErrno

__all__ = ["NbdProtocolError", "RequestRejected", "LocalProtocolError", "to_nbd_errno"]


class NbdProtocolError(Exception):
    """Fatal: the client violated the protocol (bad magic, impossible length, ...).

    The connection must be closed after sending whatever
    :meth:`ServerConnection.data_to_send` still returns.  Once raised, the engine
    raises it again from every later :meth:`ServerConnection.next_event`.

    :param message: a human-readable reason, for the log.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RequestRejected(Exception):
    """One request failed validation; its error reply goes on the wire, the session continues.

    :param cookie: the request's cookie (handle).
    :param errno: the NBD error value to reply with.
    :param message: a human-readable reason (sent in structured ERROR chunks).
    """

    def __init__(self, cookie: int, errno: NbdErrno, message: str = "") -> None:
        super().__init__(cookie, errno, message)
        self.cookie = cookie
        self.errno = errno
        self.message = message


class LocalProtocolError(Exception):
    """The server code used the engine wrongly (e.g. a reply before transmission).

    This is a programming error on our side, in the spirit of h11's
    ``LocalProtocolError``; it is never caused by peer input.
    """


# Flag-independent rows.  Everything not listed becomes EINVAL.
_SIMPLE_MAP: dict[int, NbdErrno] = {
    0: NbdErrno.OK,
    _errno.EPERM: NbdErrno.EPERM,
    _errno.EROFS: NbdErrno.EPERM,
    _errno.EIO: NbdErrno.EIO,
    # A CBW copy that outlived cbw-timeout under break-guest-write: the write
    # failed on the server's side, not because the request was invalid
    # (DESIGN "Decided": ETIMEDOUT reaches the wire as NBD_EIO).
    _errno.ETIMEDOUT: NbdErrno.EIO,
    # proto.md: ENOMEM is allowed but "SHOULD be avoided"; callers rarely see it.
    _errno.ENOMEM: NbdErrno.ENOMEM,
    _errno.ENOSPC: NbdErrno.ENOSPC,
    _errno.EDQUOT: NbdErrno.ENOSPC,
    _errno.EFBIG: NbdErrno.ENOSPC,
    _errno.ESHUTDOWN: NbdErrno.ESHUTDOWN,
}
_NOTSUP = frozenset({_errno.ENOTSUP, _errno.EOPNOTSUPP})
_NO_FLAGS = NbdCmdFlag(0)


def to_nbd_errno(os_errno: int, cmd_flags: NbdCmdFlag = _NO_FLAGS) -> NbdErrno:
    """Map an OS errno to the NBD error value to put on the wire (nbdkit ``nbd_errno``).

    proto.md "Error values": EOVERFLOW SHOULD NOT be sent unless the client used
    NBD_CMD_FLAG_DF, and ENOTSUP SHOULD NOT be sent unless it used
    NBD_CMD_FLAG_FAST_ZERO; without those flags both become EINVAL.

    :param os_errno: a POSIX errno (``OSError.errno``), 0 for success.
    :param cmd_flags: the flags of the request that failed.
    :return: one of the :class:`NbdErrno` values.
    :raise: nothing; unknown values map to :attr:`NbdErrno.EINVAL`.
    """
    mapped = _SIMPLE_MAP.get(os_errno)
    if mapped is not None:
        return mapped
    if os_errno == _errno.EOVERFLOW and cmd_flags & NbdCmdFlag.DF:
        return NbdErrno.EOVERFLOW
    if os_errno in _NOTSUP and cmd_flags & NbdCmdFlag.FAST_ZERO:
        return NbdErrno.ENOTSUP
    return NbdErrno.EINVAL
