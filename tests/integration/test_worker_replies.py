"""Large READ replies written by native workers straight to the socket.

Workers never wait on the socket: a reply that does not fit goes out in part
and the event loop writes the rest, ahead of anything else.  These tests
make that happen with slow readers and mixed traffic and check that every
reply arrives whole, once, with the right data.
"""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.helpers import request
from tests.integration.test_bad_input import CMD_FLUSH, CMD_READ, CMD_WRITE, Raw, healthy

pytestmark = pytest.mark.integration

MiB = 1 << 20


class SlowRaw(Raw):
    """Raw client that, once ``slow`` is set, reads 16 KiB at a time with pauses."""

    slow = False

    def recv_exact(self, n: int) -> bytes:
        if not self.slow:
            return super().recv_exact(n)
        buf = bytearray()
        while len(buf) < n:
            time.sleep(0.0002)
            chunk = self.sock.recv(min(n - len(buf), 16384))
            assert chunk, f"server closed after {len(buf)} of {n} bytes"
            buf += chunk
        return bytes(buf)


@pytest.mark.parametrize("structured", [False, True])
def test_slow_reader_gets_every_big_reply_whole(start_daemon, tmp_path: Path,
                                                structured: bool) -> None:
    img = tmp_path / "disk.img"
    data = make_image(img, 64 * MiB, seed=5)
    d = start_daemon(str(img))
    rng = random.Random(1)
    reqs = {}
    with SlowRaw(d.sock) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        c.open("disk", structured=structured)
        wire = b""
        for cookie in range(1, 49):
            length = rng.choice([64 * 1024, 256 * 1024, MiB, 3 * MiB + 4096])
            off = rng.randrange(0, 64 * MiB - length)
            reqs[cookie] = (off, length)
            wire += request(CMD_READ, cookie, off, length)
        c.send(wire)
        # Read the replies slowly, in small pieces: the server's socket
        # buffer fills and worker replies go out in part.
        c.slow = True
        seen = set()
        for _ in reqs:
            # a reply's length is known from its cookie only after the header;
            # Raw.reply needs it up front, so peek the cookie via the header.
            cookie, error, got = _reply_any(c, reqs, structured)
            assert error == 0
            assert cookie not in seen
            seen.add(cookie)
            off, length = reqs[cookie]
            assert got == data[off:off + length], f"cookie {cookie} data differs"
    healthy(d, img)


def _reply_any(c: Raw, reqs: dict[int, tuple[int, int]],
               structured: bool) -> tuple[int, int, bytes]:
    import struct

    if not structured:
        magic, error, cookie = struct.unpack(">IIQ", c.recv_exact(16))
        assert magic == 0x67446698
        off, length = reqs[cookie]
        return cookie, error, c.recv_exact(length) if not error else b""
    # Chunks until DONE: a READ larger than the server's piece comes as
    # several, in order (data, or holes), each for its own offset.
    data = bytearray()
    while True:
        magic, flags, typ, cookie, length = struct.unpack(">IHHQI", c.recv_exact(20))
        assert magic == 0x668E33EF and typ in (1, 2), (typ, flags)  # OFFSET_DATA/HOLE
        payload = c.recv_exact(length)
        (off,) = struct.unpack_from(">Q", payload)
        assert off == reqs[cookie][0] + len(data)
        data += payload[8:] if typ == 1 else bytes(struct.unpack_from(">I", payload, 8)[0])
        if flags & 1:
            return cookie, 0, bytes(data)


def test_mixed_traffic_replies_never_interleave(start_daemon, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    data = bytearray(make_image(img, 16 * MiB, seed=9))
    d = start_daemon(str(img))
    rng = random.Random(2)
    with Raw(d.sock) as c:
        c.open("disk")
        expect: dict[int, tuple[int, bytes | None]] = {}
        wire = b""
        cookie = 0
        for _ in range(120):
            cookie += 1
            kind = rng.choice(["big", "big", "small", "write", "flush"])
            if kind == "write":
                # writes go to a region no READ touches
                off = 15 * MiB + rng.randrange(0, MiB - 4096)
                payload = rng.randbytes(4096)
                data[off:off + 4096] = payload
                wire += request(CMD_WRITE, cookie, off, 4096, 0, payload)
                expect[cookie] = (0, None)
            elif kind == "flush":
                wire += request(CMD_FLUSH, cookie)
                expect[cookie] = (0, None)
            else:
                length = MiB if kind == "big" else 512
                off = rng.randrange(0, 15 * MiB - length)
                wire += request(CMD_READ, cookie, off, length)
                expect[cookie] = (length, bytes(data[off:off + length]))
        c.send(wire)
        import struct

        for _ in range(len(expect)):
            magic, error, got_cookie = struct.unpack(">IIQ", c.recv_exact(16))
            assert magic == 0x67446698 and error == 0
            length, want = expect.pop(got_cookie)
            if want is not None:
                assert c.recv_exact(length) == want
        assert not expect
    healthy(d, img, expect=bytes(data))


@pytest.mark.parametrize("structured", [False, True])
def test_big_read_of_a_hole(start_daemon, tmp_path: Path, structured: bool) -> None:
    """A large READ of a hole: OFFSET_HOLE when structured, zeros when simple."""
    import struct

    img = tmp_path / "sparse.img"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"\x07" * 4096)
    d = start_daemon(str(img))
    with Raw(d.sock) as c:
        c.open("sparse", structured=structured)
        c.send(request(CMD_READ, 77, 4 * MiB, 2 * MiB))
        if structured:
            # OFFSET_HOLE chunks (one per piece the server reads) cover it all
            pos = 4 * MiB
            while True:
                magic, flags, typ, cookie, length = struct.unpack(">IHHQI", c.recv_exact(20))
                assert (magic, typ, cookie, length) == (0x668E33EF, 2, 77, 12)
                off, n = struct.unpack(">QI", c.recv_exact(12))
                assert off == pos
                pos += n
                if flags & 1:
                    break
            assert pos == 6 * MiB
        else:
            magic, error, cookie = struct.unpack(">IIQ", c.recv_exact(16))
            assert (magic, error, cookie) == (0x67446698, 0, 77)
            assert c.recv_exact(2 * MiB) == bytes(2 * MiB)
        # data next to it still arrives as data
        _, error, got = c.cmd(CMD_READ, MiB, 128 * 1024, cookie=78)
        assert error == 0 and got[:4096] == b"\x07" * 4096 and got[4096:] == bytes(124 * 1024)
