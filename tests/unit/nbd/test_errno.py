"""One table test of to_nbd_errno."""

from __future__ import annotations

import errno

import pytest

from fleeced.nbd import NbdCmdFlag, NbdErrno, to_nbd_errno

F0 = NbdCmdFlag(0)
DF = NbdCmdFlag.DF
FZ = NbdCmdFlag.FAST_ZERO

TABLE = [
    # (os errno, request flags, expected NBD errno)
    (0, F0, NbdErrno.OK),
    (errno.EPERM, F0, NbdErrno.EPERM),
    (errno.EROFS, F0, NbdErrno.EPERM),
    (errno.EIO, F0, NbdErrno.EIO),
    (errno.ETIMEDOUT, F0, NbdErrno.EIO),
    (errno.ETIMEDOUT, NbdCmdFlag.FUA, NbdErrno.EIO),
    (errno.ENOMEM, F0, NbdErrno.ENOMEM),
    (errno.ENOSPC, F0, NbdErrno.ENOSPC),
    (errno.EDQUOT, F0, NbdErrno.ENOSPC),
    (errno.EFBIG, F0, NbdErrno.ENOSPC),
    (errno.EOVERFLOW, DF, NbdErrno.EOVERFLOW),
    (errno.EOVERFLOW, F0, NbdErrno.EINVAL),
    (errno.EOVERFLOW, FZ, NbdErrno.EINVAL),
    (errno.ENOTSUP, FZ, NbdErrno.ENOTSUP),
    (errno.EOPNOTSUPP, FZ, NbdErrno.ENOTSUP),
    (errno.ENOTSUP, F0, NbdErrno.EINVAL),
    (errno.EOPNOTSUPP, DF, NbdErrno.EINVAL),
    (errno.ESHUTDOWN, F0, NbdErrno.ESHUTDOWN),
    (errno.EINVAL, F0, NbdErrno.EINVAL),
    (errno.EACCES, F0, NbdErrno.EINVAL),
    (errno.EBADF, F0, NbdErrno.EINVAL),
    (errno.ENOENT, NbdCmdFlag.FUA, NbdErrno.EINVAL),
    (99999, F0, NbdErrno.EINVAL),
]


@pytest.mark.parametrize(("os_errno", "flags", "expected"), TABLE)
def test_to_nbd_errno(os_errno: int, flags: NbdCmdFlag, expected: NbdErrno) -> None:
    assert to_nbd_errno(os_errno, flags) is expected


def test_default_flags() -> None:
    assert to_nbd_errno(errno.EOVERFLOW) is NbdErrno.EINVAL
    assert to_nbd_errno(errno.EIO) is NbdErrno.EIO
