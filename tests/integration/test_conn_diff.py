"""The native connection (native/src/conn*.c) against the sans-IO engine
served from the event loop: the same request byte streams, cut into the
same chunks (down to one byte at a time), sent to ``fleeced serve
--data-plane native`` and ``--data-plane loop`` must give the same replies,
request by request, the same closing decision and the same image.

The engine's rule table is the specification; the C checks are written
from it, and this is what holds them to it.  Streams mix every command
with every kind of request the engine refuses (unknown command, foreign
flags, zero length, past the end, over the maximum block, DF overflow,
FLUSH with an offset, refused WRITEs whose payload must be skipped), READs
long enough to be sent a piece at a time, holes, block status with two
contexts, and end with a clean half-close, a DISC, or a protocol error.

Requests of one stream may run in parallel, so replies are compared per
cookie, and no READ or BLOCK_STATUS touches what a WRITE of the same
stream changes (writes go to the second half of the disk, each to a slot
of its own).
"""

from __future__ import annotations

import random
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from fleeced.nbd import NbdCmd, NbdOpt
from tests.conftest import Daemon
from tests.helpers import (
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    client_flags,
    meta_payload,
    name_info_payload,
    option,
    request,
)

SIZE = 36 << 20  # over the 32 MiB maximum block: a READ can be too long in range
HALF = 4 << 20  # reads below it; writes from it up to 2 * HALF
MAX_BLOCK = 32 << 20
SLOT = 64 << 10


def make_image(path: Path) -> None:
    """Data with holes: every other 256 KiB of the first 8 MiB, the rest a hole."""
    rnd = random.Random(3)
    with path.open("wb") as f:
        f.truncate(SIZE)
        for off in range(0, 2 * HALF, 512 << 10):
            f.seek(off)
            f.write(rnd.randbytes(256 << 10))


def stream(seed: int, snapshot: bool) -> tuple[bytes, dict[int, tuple[int, int, int]]]:
    """Requests and, by cookie, (command, flags, length) for reply parsing."""
    rnd = random.Random(seed)
    out: list[bytes] = []
    meta: dict[int, tuple[int, int, int]] = {}
    slots = list(range(HALF // SLOT, 2 * HALF // SLOT))
    rnd.shuffle(slots)

    def add(cookie: int, cmd: int, off: int = 0, length: int = 0, flags: int = 0,
            data: bytes = b"") -> None:
        out.append(request(cmd, cookie, off, length, flags=flags, data=data))
        meta[cookie] = (cmd, flags, length)

    for cookie in range(1, 160):
        k = rnd.random()
        off = rnd.randrange(0, HALF // 512) * 512
        n = rnd.choice((1, 512, 4096, 65536, 200_000))
        n = min(n, HALF - off)
        if k < 0.30:
            add(cookie, NbdCmd.READ, off, n, flags=rnd.choice((0, 0, 1, 4)))
        elif k < 0.34:  # a piece at a time
            add(cookie, NbdCmd.READ, 0, rnd.choice((HALF, 1536 << 10)), flags=rnd.choice((0, 4)))
        elif k < 0.42:
            add(cookie, NbdCmd.BLOCK_STATUS, off, n, flags=rnd.choice((0, 8)))
        elif k < 0.52 and slots:
            slot = slots.pop() * SLOT
            m = rnd.choice((512, 4096, SLOT))
            add(cookie, NbdCmd.WRITE, slot, m, flags=rnd.choice((0, 1)), data=rnd.randbytes(m))
        elif k < 0.56 and slots:
            add(cookie, NbdCmd.WRITE_ZEROES, slots.pop() * SLOT, SLOT,
                flags=rnd.choice((0, 1, 2, 16, 18)))
        elif k < 0.60 and slots:
            add(cookie, NbdCmd.TRIM, slots.pop() * SLOT, SLOT, flags=rnd.choice((0, 1)))
        elif k < 0.64:
            add(cookie, NbdCmd.FLUSH)
        elif k < 0.67:
            add(cookie, NbdCmd.CACHE, off, n)
        elif k < 0.70:
            add(cookie, 9, off, n)  # unknown command
        elif k < 0.73:
            add(cookie, NbdCmd.READ, off, max(n, 1), flags=rnd.choice((2, 8, 16, 0x40, 0x8000)))
        elif k < 0.76:
            add(cookie, rnd.choice((NbdCmd.READ, NbdCmd.CACHE, NbdCmd.TRIM)), off, 0)
        elif k < 0.80:
            add(cookie, rnd.choice((NbdCmd.READ, NbdCmd.BLOCK_STATUS, NbdCmd.WRITE_ZEROES)),
                SIZE - 100, 512)
        elif k < 0.82:
            add(cookie, NbdCmd.READ, 0, MAX_BLOCK + 512, flags=rnd.choice((0, 4)))
        elif k < 0.84:
            add(cookie, NbdCmd.FLUSH, 4096, 0)
        elif k < 0.88:  # refused WRITEs: past the end, a READ flag, zero length
            bad = rnd.choice(((SIZE - 100, 512, 0), (HALF, 512, 4), (HALF, 0, 0)))
            add(cookie, NbdCmd.WRITE, bad[0], bad[1], flags=bad[2], data=bytes(bad[1]))
        elif k < 0.90 and not snapshot:
            add(cookie, NbdCmd.WRITE_ZEROES, HALF, 512, flags=0x40)
        else:
            add(cookie, NbdCmd.READ, off, n)
    end = seed % 3  # the test knows it as stream_seed % 3
    if end == 1:
        out.append(request(NbdCmd.DISC, 999))
    elif end == 2:  # a protocol error: the connection ends there
        out.append(request(NbdCmd.READ, 1000, 0, 512, magic=0x12345678))
    return b"".join(out), meta


def cuts(data: bytes, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    out, pos = [], 0
    while pos < len(data):
        n = 1 if rnd.random() < 0.2 else rnd.choice((2, 7, 28, 100, 4096, 65536))
        out.append(data[pos:pos + n])
        pos += n
    return out


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = s.recv(n - len(buf))
        assert got, f"closed after {len(buf)} of {n} bytes"
        buf += got
    return bytes(buf)


def handshake(s: socket.socket, export: str, structured: bool) -> None:
    recv_exact(s, 18)
    s.sendall(client_flags())
    if structured:
        s.sendall(option(NbdOpt.STRUCTURED_REPLY))
        _, _, typ, n = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, n)
        s.sendall(option(NbdOpt.SET_META_CONTEXT,
                         meta_payload(export, ["base:allocation", "qemu:allocation-depth"])))
        while True:
            _, _, typ, n = struct.unpack(">QIII", recv_exact(s, 20))
            recv_exact(s, n)
            if typ == 1:  # NBD_REP_ACK
                break
    s.sendall(option(NbdOpt.GO, name_info_payload(export)))
    while True:
        _, _, typ, n = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, n)
        if typ == 1:
            return
        assert typ == 3, f"unexpected option reply {typ:#x}"  # NBD_REP_INFO


def exchange(sock_path: str, export: str, structured: bool, parts: list[bytes],
             ) -> bytes:
    """Send PARTS (from a thread, reading replies meanwhile, as a client
    must), half-close, and return every reply byte until the close."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(sock_path)

    def send() -> None:
        try:
            for p in parts:
                s.sendall(p)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # a protocol error closed it; what came back counts

    with s:
        handshake(s, export, structured)
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = bytearray()
        while True:
            try:
                b = s.recv(1 << 20)
            except ConnectionResetError:
                break
            if not b:
                break
            got += b
        sender.join(timeout=30)
    return bytes(got)


def by_cookie(data: bytes, meta: dict[int, tuple[int, int, int]], structured: bool,
              cut_ok: bool = False) -> dict[int, list[bytes]]:
    """Split reply bytes into units, grouped by cookie, in arrival order.
    CUT_OK: the connection was dropped, so the last unit may be cut short
    (it is left out)."""
    out: dict[int, list[bytes]] = {}
    pos = 0
    while pos < len(data):
        (magic,) = struct.unpack_from(">I", data, pos)
        if magic == SIMPLE_REPLY_MAGIC:
            _, err, cookie = struct.unpack_from(">IIQ", data, pos)
            cmd, _, length = meta[cookie]
            n = 16 + (length if cmd == NbdCmd.READ and err == 0 else 0)
        else:
            assert magic == STRUCTURED_REPLY_MAGIC, f"bad magic at {pos}"
            _, _, _, cookie, length = struct.unpack_from(">IHHQI", data, pos)
            n = 20 + length
        if cut_ok and pos + n > len(data):
            break
        assert pos + n <= len(data), "reply cut short"
        out.setdefault(cookie, []).append(data[pos:pos + n])
        pos += n
    return out


def canonical(units: list[bytes], cmd: int) -> list[bytes]:
    """A successful structured READ reply as the data it carries: how it is
    cut into chunks, and whether zeros are sent as a hole chunk, is the
    server's choice (proto.md "Structured reply chunk message types"), and
    the loop's own paths differ in it.  Everything else stays as sent."""
    if cmd != NbdCmd.READ or struct.unpack_from(">I", units[0])[0] != STRUCTURED_REPLY_MAGIC:
        return units
    data = bytearray()
    for u in units:
        flags, typ = struct.unpack_from(">HH", u, 4)
        if typ == 1:  # OFFSET_DATA
            data += u[28:]
        elif typ == 2:  # OFFSET_HOLE
            data += bytes(struct.unpack_from(">I", u, 28)[0])
        else:
            return units
    return [b"data", bytes(data), bytes([units[-1][5] & 1])]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("structured", [True, False])
@pytest.mark.parametrize("snapshot", [False, True])
def test_native_connection_replies_as_the_engine(
        tmp_path: Path, start_daemon: Callable[..., Daemon], seed: int, structured: bool,
        snapshot: bool) -> None:
    stream_seed = seed * 2 + (1 if snapshot else 0)
    data, meta = stream(stream_seed, snapshot)
    parts = cuts(data, seed)
    results = {}
    images = {}
    for plane in ("loop", "native"):
        (tmp_path / plane).mkdir()
        img = tmp_path / plane / "disk.img"
        make_image(img)
        args = [str(img), "--data-plane", plane]
        if snapshot:
            args += ["--fleece"]
        d = start_daemon(*args)
        export = "disk@fleece" if snapshot else "disk"
        raw = exchange(d.sock, export, structured, parts)
        results[plane] = by_cookie(raw, meta, structured, cut_ok=stream_seed % 3 == 2)
        d.proc.terminate()
        d.proc.wait(timeout=30)
        images[plane] = img.read_bytes()[:2 * HALF]
    loop, native = results["loop"], results["native"]
    assert loop, "no reply at all: the stream is wrong"
    if stream_seed % 3 == 2:
        # A protocol error ends both at the same request; the loop aborts
        # and drops replies still in flight (how many: a race), the native
        # connection answers what it received before the bad request.
        # Replies the loop had only begun when it dropped the connection
        # (chunks without DONE) are left out.
        loop = {k: v for k, v in loop.items()
                if struct.unpack_from(">I", v[-1])[0] == SIMPLE_REPLY_MAGIC or v[-1][5] & 1}
        assert set(loop) <= set(native), "the loop answered what native did not"
    else:
        assert sorted(native) == sorted(loop), "different requests answered"
    for cookie in loop:
        cmd = meta[cookie][0]
        assert canonical(native[cookie], cmd) == canonical(loop[cookie], cmd), \
            f"cookie {cookie} {meta[cookie]}: {native[cookie][0][:40].hex()} vs " \
            f"{loop[cookie][0][:40].hex()}"
    assert images["native"] == images["loop"]
