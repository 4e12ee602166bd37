"""Copy-before-write and flush semantics on the wire .

The native tests check the C rules; these check what a real client sees
through the daemon: exact NBD error values and the session's counters.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.integration.test_bad_input import (
    CMD_FLUSH,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EIO,
    ENOTSUP,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    Raw,
)
from tests.integration.test_fleece import fleece_list, qmp

pytestmark = pytest.mark.integration

KiB = 1 << 10
MiB = 1 << 20
HOOKS = {"FLEECED_TEST_HOOKS": "1"}


def test_flush_errors_are_sticky(tmp_path: Path, start_daemon) -> None:
    """After one failed fdatasync every later FLUSH and FUA fails EIO
    (a FUA write could consume the writeback error and a later FLUSH
    succeeded), and query-disks says so."""
    img = tmp_path / "disk.img"
    make_image(img, 1 * MiB)
    d = start_daemon(str(img), env=HOOKS)
    with Raw(d.sock) as c:
        c.open("disk")
        assert c.cmd(CMD_FLUSH)[1] == 0
        qmp(d, "x-inject-flush-error", {"disk": "disk", "errno": 5, "count": 1})
        # the FUA write consumes the (injected) writeback error
        assert c.cmd(CMD_WRITE, 0, 4096, FLAG_FUA, b"x" * 4096)[1] == EIO
        # and nothing forgets it: no injection any more, still EIO
        assert c.cmd(CMD_FLUSH)[1] == EIO
        assert c.cmd(CMD_WRITE, 4096, 4096, FLAG_FUA, b"y" * 4096)[1] == EIO
        assert c.cmd(CMD_FLUSH)[1] == EIO
        # plain writes still work (they make no durability promise)
        assert c.cmd(CMD_WRITE, 8192, 4096, 0, b"z" * 4096)[1] == 0
    (disk,) = qmp(d, "query-disks")  # type: ignore[misc]
    assert disk["flush-error"] == "Input/output error"


@pytest.mark.parametrize("policy", ["break-snapshot", "break-guest-write"])
def test_cbw_timeout_bounds_the_guest_writes_own_copy(tmp_path: Path, start_daemon,
                                                       policy: str) -> None:
    """With --cbw-timeout 0.2 and a 3 s copy, the guest write waited
    3 s and the snapshot stayed whole.  Now the policy applies at 0.2 s, and
    a failed write is EIO on the wire (not EINVAL)."""
    img = tmp_path / "disk.img"
    data = make_image(img, 4 * MiB)
    d = start_daemon(str(img), "--fleece", "--cbw-timeout", "0.2",
                     "--on-cbw-error", policy, env=HOOKS)
    qmp(d, "x-inject-cbw-delay", {"disk": "disk", "ms": 3000})
    with Raw(d.sock) as c:
        c.open("disk")
        t0 = time.monotonic()
        error = c.cmd(CMD_WRITE, 0, 4096, 0, b"N" * 4096)[1]
        waited = time.monotonic() - t0
    assert waited < 2.5, waited  # a bound that turns the old 3 s wait into a failure
    (s,) = fleece_list(d)
    if policy == "break-snapshot":
        assert error == 0
        assert s["state"] == "broken"
        assert img.read_bytes()[:4096] == b"N" * 4096
    else:
        assert error == EIO
        assert s["state"] == "active"
        assert img.read_bytes()[:4096] == data[:4096]  # the source is untouched


def test_holes_cost_no_temp_space(tmp_path: Path, start_daemon) -> None:
    """64 MiB of write-zeroes over a sparse disk with --max-temp 16M
    broke the snapshot although there was nothing to preserve."""
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    d = start_daemon(str(img), "--fleece", "--max-temp", "16M")
    with Raw(d.sock) as c:
        c.open("disk")
        for off in range(0, 64 * MiB, 16 * MiB):
            assert c.cmd(CMD_WRITE_ZEROES, off, 16 * MiB)[1] == 0
        assert c.cmd(CMD_WRITE, 5 * MiB, 4096, 0, b"d" * 4096)[1] == 0
    (s,) = fleece_list(d)
    assert s["state"] == "active"
    assert s["temp-bytes"] == 0
    assert s["clusters"]["zero"] == s["clusters"]["total"]  # type: ignore[index]
    with Raw(d.sock) as c:
        c.open("disk@fleece")
        assert c.read(5 * MiB, 8192) == bytes(8192)


def test_fast_zero_refuses_before_any_copy(tmp_path: Path, start_daemon) -> None:
    """FAST_ZERO ran the whole CBW (possibly GiBs) and only then
    answered ENOTSUP.  Now ENOTSUP comes first and nothing was copied."""
    img = tmp_path / "disk.img"
    data = make_image(img, 8 * MiB)
    d = start_daemon(str(img), "--fleece")
    with Raw(d.sock) as c:
        c.open("disk")
        assert c.cmd(CMD_WRITE_ZEROES, 0, 8 * MiB, FLAG_FAST_ZERO)[1] == ENOTSUP
    (s,) = fleece_list(d)
    assert s["cbw-count"] == 0 and s["temp-bytes"] == 0
    assert s["clusters"]["needed"] == s["clusters"]["total"]  # type: ignore[index]
    assert img.read_bytes() == data
