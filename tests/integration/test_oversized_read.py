"""A READ longer than 2^25 (32 MiB) gets an error reply and the connection goes on.

libnbd (Debian's python3-libnbd, run under the system python3) sends a 33 MiB
NBD_CMD_READ with its client-side checks off, then a 4 KiB read on the same handle.
proto.md "Block size constraints": a request larger than the advertised maximum block
size SHOULD get NBD_EINVAL; NBD_EOVERFLOW is only for a READ with NBD_CMD_FLAG_DF
("NBD_CMD_READ", "Error values").  A WRITE payload that large stays fatal
(tests/unit/nbd/test_transmission.py).
"""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, make_image, requires_libnbd_python

pytestmark = pytest.mark.integration

MiB = 1 << 20
IMAGE_SIZE = 34 * MiB  # so that a 33 MiB read at offset 0 is in range: only its length is wrong

LIBNBD_SCRIPT = r"""
import json, sys
import nbd

sock, mode = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.set_strict_mode(0)  # let the oversized request reach the server
h.set_request_structured_replies(mode != "simple")
h.set_export_name("disk")
h.connect_unix(sock)
out = {
    "structured": h.get_structured_replies_negotiated(),
    "can_df": h.can_df(),
    "max_block": h.get_block_size(nbd.SIZE_MAXIMUM),
}
flags = nbd.CMD_FLAG_DF if mode == "structured-df" else 0
try:
    h.pread(33 * 1024 * 1024, 0, flags)
    out["big"] = 0
except nbd.Error as e:
    out["big"] = e.errnum
out["next"] = h.pread(4096, 4096).hex()  # same handle: the connection is still up
out["again"] = h.pread(512, 33 * 1024 * 1024, flags).hex()
h.shutdown()
print(json.dumps(out))
"""


@pytest.mark.parametrize(
    ("mode", "structured", "error"),
    [
        ("simple", False, errno.EINVAL),
        ("structured", True, errno.EINVAL),
        ("structured-df", True, errno.EOVERFLOW),
    ],
)
def test_oversized_read_gets_error_and_connection_continues(
    start_daemon: Callable[..., Daemon], tmp_path: Path, mode: str, structured: bool,
    error: int,
) -> None:
    python = requires_libnbd_python()
    img = tmp_path / "disk.img"
    data = make_image(img, IMAGE_SIZE, seed=7)
    d = start_daemon(str(img))
    proc = subprocess.run(
        [python, "-c", LIBNBD_SCRIPT, d.sock, mode],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["structured"] is structured
    assert out["can_df"] is structured  # SEND_DF is advertised only with structured replies
    assert out["max_block"] == 32 * MiB
    assert out["big"] == error
    assert out["next"] == data[4096:8192].hex()
    assert out["again"] == data[33 * MiB : 33 * MiB + 512].hex()
    assert d.proc.poll() is None, "daemon died"
    log = (tmp_path / "daemon1.log").read_text(errors="replace")
    assert "protocol error" not in log and "Traceback" not in log, log[-4000:]
    assert img.read_bytes() == data
