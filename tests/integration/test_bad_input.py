"""A real `fleeced serve` against hostile and broken clients, byte by byte over a socket.

Every test ends by checking that the same daemon is still alive and still serves a fresh,
well-behaved client correctly (nbdinfo for the size, a raw read compared with the image).
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, make_image, requires, requires_libnbd_python, run
from tests.helpers import (
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    client_flags,
    meta_payload,
    name_info_payload,
    option,
    request,
)

pytestmark = pytest.mark.integration

KiB = 1 << 10
MiB = 1 << 20
TIMEOUT = 10.0

# proto.md values, spelled out here so a wrong constant in the daemon cannot hide.
OPT_EXPORT_NAME, OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 1, 7, 8, 10
REP_ACK, REP_INFO = 1, 3
REP_ERR_UNSUP = 2**31 + 1
REP_ERR_INVALID = 2**31 + 3
REP_ERR_UNKNOWN = 2**31 + 6
INFO_BLOCK_SIZE = 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8, 16
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
NBD_ERRORS = {EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN}
CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS, CHUNK_ERROR = 1, 2, 5, 0x8001

IMAGE_SIZE = MiB


# ---------------------------------------------------------------- a blocking raw client


class Raw:
    """A blocking NBD client on a raw Unix socket, for crafting exact bytes."""

    def __init__(self, path: str, timeout: float = TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.structured = False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 4 * MiB))
            assert chunk, f"server closed after {len(buf)} of {n} bytes"
            buf += chunk
        return bytes(buf)

    def greeting(self) -> None:
        magic, _ihaveopt, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC
        assert flags & 1  # FIXED_NEWSTYLE

    def start(self) -> None:
        """Greeting and client flags (fixed newstyle, no zeroes)."""
        self.greeting()
        self.send(client_flags())

    def opt_reply(self) -> tuple[int, int, bytes]:
        magic, opt, typ, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPTION_REPLY_MAGIC
        return opt, typ, self.recv_exact(length)

    def opt_replies(self, opt: int) -> list[tuple[int, bytes]]:
        """Replies to OPT until ACK or an error reply (the final one is included)."""
        out = []
        while True:
            got, typ, data = self.opt_reply()
            assert got == opt
            out.append((typ, data))
            if typ == REP_ACK or typ & 2**31:
                return out

    def go(self, name: str | bytes) -> list[tuple[int, bytes]]:
        self.send(option(OPT_GO, name_info_payload(name)))
        return self.opt_replies(OPT_GO)

    def open(self, name: str, structured: bool = False, meta: bool = False) -> int:
        """Full handshake; returns the export size."""
        self.start()
        if structured:
            self.send(option(OPT_STRUCTURED_REPLY))
            assert self.opt_replies(OPT_STRUCTURED_REPLY)[-1][0] == REP_ACK
            self.structured = True
            if meta:
                self.send(option(OPT_SET_META_CONTEXT, meta_payload(name, ["base:allocation"])))
                assert self.opt_replies(OPT_SET_META_CONTEXT)[-1][0] == REP_ACK
        replies = self.go(name)
        assert replies[-1][0] == REP_ACK, replies
        for typ, data in replies:
            if typ == REP_INFO and struct.unpack_from(">H", data)[0] == 0:
                return int(struct.unpack_from(">Q", data, 2)[0])
        raise AssertionError("no NBD_INFO_EXPORT in the GO reply")

    def reply(self, read_length: int = 0, read_offset: int = 0) -> tuple[int, int, bytes]:
        """One whole reply -> (cookie, error, data); structured chunks are reassembled.

        :param read_length: for a READ, the requested length (a simple reply's payload).
        :param read_offset: for a READ, the requested offset (to place structured chunks).
        """
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            data = self.recv_exact(read_length) if read_length and not error else b""
            return cookie, error, data
        assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
        data = bytearray(read_length)
        error = 0
        first_cookie = None
        while True:
            flags, typ, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            payload = self.recv_exact(length)
            assert first_cookie in (None, cookie)
            first_cookie = cookie
            if typ == CHUNK_ERROR:
                err, msg_len = struct.unpack_from(">IH", payload)
                assert len(payload) == 6 + msg_len
                error = err
            elif typ in (CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE):
                (off,) = struct.unpack_from(">Q", payload)
                if typ == CHUNK_OFFSET_DATA:
                    pos = off - read_offset
                    data[pos : pos + length - 8] = payload[8:]
            if flags & 1:  # DONE
                return cookie, error, bytes(data) if not error else b""
            (magic,) = struct.unpack(">I", self.recv_exact(4))
            assert magic == STRUCTURED_REPLY_MAGIC

    def cmd(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
            data: bytes = b"", cookie: int = 0x5EED) -> tuple[int, int, bytes]:
        """Send one request, wait for its reply -> (cookie, error, data)."""
        self.send(request(cmd, cookie, offset, length, flags, data))
        got_cookie, error, out = self.reply(length if cmd == CMD_READ else 0, offset)
        assert got_cookie == cookie
        return got_cookie, error, out

    def read(self, offset: int, length: int) -> bytes:
        _, error, data = self.cmd(CMD_READ, offset, length)
        assert error == 0
        return data

    def assert_closed(self) -> None:
        """The server hangs up: EOF (or a reset) within the timeout, and nothing else."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                raise AssertionError(f"unexpected bytes before close: {chunk[:64]!r}")
        except ConnectionResetError:
            return
        except TimeoutError:
            raise AssertionError("server did not close the connection") from None


# ---------------------------------------------------------------- fixtures and checks


def healthy(d: Daemon, img: Path, export: str = "disk", expect: bytes | None = None) -> None:
    """The daemon is alive and a fresh client sees the right size and the image's data."""
    assert d.proc.poll() is None, "daemon died"
    expected = img.read_bytes() if expect is None else expect
    info = json.loads(run(requires("nbdinfo"), "--json", d.url(export)).stdout)
    assert info["exports"][0]["export-size"] == len(expected)
    with Raw(d.sock) as c:
        assert c.open(export) == len(expected)
        n = min(len(expected), 4 * MiB)
        assert c.read(0, n) == expected[:n]
        c.send(request(CMD_DISC))
        c.assert_closed()
    assert d.proc.poll() is None, "daemon died"
    for log in d.tmp.glob("daemon*.log"):
        text = log.read_text(errors="replace")
        assert "Traceback" not in text and "internal error" not in text, text[-4000:]


@pytest.fixture
def served(start_daemon: Callable[..., Daemon], tmp_path: Path) -> tuple[Daemon, Path, bytes]:
    """A daemon serving a 1 MiB random image as export "disk"."""
    requires("nbdinfo")
    img = tmp_path / "disk.img"
    data = make_image(img, IMAGE_SIZE)
    return start_daemon(str(img)), img, data


@pytest.fixture
def served_ro(start_daemon: Callable[..., Daemon], tmp_path: Path) -> tuple[Daemon, Path, bytes]:
    """The same, read-only (`-r`)."""
    requires("nbdinfo")
    img = tmp_path / "disk.img"
    data = make_image(img, IMAGE_SIZE)
    return start_daemon(str(img), "-r"), img, data


# ---------------------------------------------------------------- handshake


@pytest.mark.parametrize("flags", [
    b"\xde\xad\xbe\xef",  # garbage: unknown bits
    b"\x00\x00\x00\x00",  # not fixed newstyle
    b"\x00\x00\x00\x04",  # unknown bit without FIXED_NEWSTYLE
    b"\x00\x00\x00\x07",  # known bits plus an unknown one
])
def test_bad_client_flags_disconnect(served, flags: bytes) -> None:
    d, img, _ = served
    with Raw(d.sock) as c:
        c.greeting()
        c.send(flags)
        c.assert_closed()
    healthy(d, img)


def test_bad_option_magic_disconnects(served) -> None:
    d, img, _ = served
    with Raw(d.sock) as c:
        c.start()
        c.send(struct.pack(">QII", 0x49484156454F5055, OPT_GO, 0))
        c.assert_closed()
    # ... also after a good option.
    with Raw(d.sock) as c:
        c.start()
        c.send(option(OPT_STRUCTURED_REPLY))
        assert c.opt_replies(OPT_STRUCTURED_REPLY)[-1][0] == REP_ACK
        c.send(b"NOTIHAVEOPT!" + bytes(4))
        c.assert_closed()
    healthy(d, img)


def test_bad_request_magic_disconnects(served) -> None:
    d, img, data = served
    with Raw(d.sock) as c:
        c.open("disk")
        assert c.read(0, 512) == data[:512]
        c.send(request(CMD_READ, 7, 0, 512, magic=0x25609514))
        c.assert_closed()
    healthy(d, img)


HANDSHAKE = (
    client_flags()
    + option(OPT_STRUCTURED_REPLY)
    + option(OPT_GO, name_info_payload("disk"))
)


@pytest.mark.parametrize("cut", [0, 2, 4, 4 + 10, 4 + 16, 4 + 16 + 10, len(HANDSHAKE) - 1])
def test_truncated_handshake(served, cut: int) -> None:
    """The client closes mid-handshake: the daemon cleans up and carries on."""
    d, img, _ = served
    with Raw(d.sock) as c:
        c.greeting()
        c.send(HANDSHAKE[:cut])
        if cut >= 4 + 16:  # the STRUCTURED_REPLY option is complete: it is answered
            _, typ, _ = c.opt_reply()
            assert typ == REP_ACK
        c.sock.shutdown(socket.SHUT_WR)
        c.assert_closed()
    # Close without even reading the greeting, too.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(d.sock)
    s.close()
    healthy(d, img)


def test_option_length_over_cap_disconnects_without_payload(served) -> None:
    d, img, _ = served
    with Raw(d.sock) as c:
        c.start()
        # Only the header: the daemon must not wait for (or allocate) 64 KiB + 1 bytes.
        c.send(struct.pack(">QII", 0x49484156454F5054, OPT_GO, 64 * KiB + 1))
        c.assert_closed()
    with Raw(d.sock) as c:
        c.start()
        c.send(struct.pack(">QII", 0x49484156454F5054, 0xDEAD, 0xFFFFFFFF))
        c.assert_closed()
    healthy(d, img)


def test_option_length_longer_than_stream(served) -> None:
    """The header promises more than the client ever sends, then the client closes."""
    d, img, _ = served
    with Raw(d.sock) as c:
        c.start()
        c.send(struct.pack(">QII", 0x49484156454F5054, OPT_GO, 1000) + b"x" * 10)
        c.sock.shutdown(socket.SHUT_WR)
        c.assert_closed()
    with Raw(d.sock) as c:  # and a client that just vanishes
        c.start()
        c.send(struct.pack(">QII", 0x49484156454F5054, OPT_GO, 64 * KiB) + b"x" * 1000)
    healthy(d, img)


def test_too_many_options_disconnects(served) -> None:
    d, img, _ = served
    with Raw(d.sock) as c:
        c.start()
        c.send(option(0xDEAD) * 129)
        for _ in range(128):
            assert c.opt_reply()[1] == REP_ERR_UNSUP
        c.assert_closed()
    healthy(d, img)


BAD_NAMES = [
    pytest.param(b"disk\0", REP_ERR_INVALID, id="nul-suffix"),
    pytest.param(b"di\0sk", REP_ERR_INVALID, id="nul-inside"),
    pytest.param(b"\0", REP_ERR_INVALID, id="only-nul"),
    pytest.param(b"d" * 4097, REP_ERR_INVALID, id="4097-bytes"),
    pytest.param(b"d" * 60000, REP_ERR_INVALID, id="60000-bytes"),
    pytest.param(b"\xff\xfe", REP_ERR_INVALID, id="not-utf8"),
    pytest.param(b"d" * 4096, REP_ERR_UNKNOWN, id="4096-bytes-unknown"),
]


@pytest.mark.parametrize(("name", "rep"), BAD_NAMES)
def test_bad_export_name_go_is_refused_and_handshake_continues(served, name: bytes,
                                                               rep: int) -> None:
    d, img, data = served
    with Raw(d.sock) as c:
        c.start()
        replies = c.go(name)
        assert [typ for typ, _ in replies] == [rep]
        # Haggling goes on: the right name now works, and so does I/O.
        replies = c.go("disk")
        assert replies[-1][0] == REP_ACK
        assert c.read(0, 4096) == data[:4096]
    healthy(d, img)


@pytest.mark.parametrize("name", [b"disk\0", b"\0", b"d" * 4097, b"\xff\xfe", b"nosuch"])
def test_bad_export_name_export_name_option_disconnects(served, name: bytes) -> None:
    d, img, _ = served
    with Raw(d.sock) as c:
        c.start()
        c.send(option(OPT_EXPORT_NAME, name))
        c.assert_closed()
    healthy(d, img)


@pytest.mark.parametrize("opt", [0, 11, 12, 42, 0x7FFFFFFF, 0xFFFFFFFF])
def test_unknown_option_is_unsupported_and_go_works_after(served, opt: int) -> None:
    d, img, data = served
    with Raw(d.sock) as c:
        c.start()
        c.send(option(opt, b"some payload"))
        got, typ, _ = c.opt_reply()
        assert (got, typ) == (opt, REP_ERR_UNSUP)
        c.send(option(opt))
        got, typ, _ = c.opt_reply()
        assert (got, typ) == (opt, REP_ERR_UNSUP)
        assert c.go("disk")[-1][0] == REP_ACK
        assert c.read(4096, 4096) == data[4096:8192]
    healthy(d, img)


# ---------------------------------------------------------------- transmission: EINVAL & co


@pytest.fixture(params=[False, True], ids=["simple", "structured"])
def structured(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.mark.parametrize("cmd", [8, 9, 12, 0x100, 0xFFFF])
def test_unknown_command_einval(served, structured: bool, cmd: int) -> None:
    d, img, data = served
    with Raw(d.sock) as c:
        c.open("disk", structured=structured)
        assert c.cmd(cmd, 0, 512, cookie=0xC0FFEE)[:2] == (0xC0FFEE, EINVAL)
        assert c.cmd(cmd, 0, 0, cookie=2)[1] == EINVAL
        assert c.read(0, 512) == data[:512]
    healthy(d, img)


@pytest.mark.parametrize("flags", [1 << 5, 1 << 6, 1 << 10, 1 << 15, 0xFFE0])
def test_unknown_flag_einval(served, structured: bool, flags: int) -> None:
    d, img, data = served
    with Raw(d.sock) as c:
        c.open("disk", structured=structured)
        assert c.cmd(CMD_READ, 0, 512, flags)[1] == EINVAL
        assert c.cmd(CMD_FLUSH, flags=flags)[1] == EINVAL
        # A WRITE's payload is consumed even though the request is refused.
        assert c.cmd(CMD_WRITE, 0, 512, flags, b"\xee" * 512)[1] == EINVAL
        assert c.read(0, 1024) == data[:1024]
    healthy(d, img)


@pytest.mark.parametrize(("cmd", "flags", "length", "structured_only"), [
    pytest.param(CMD_WRITE, FLAG_NO_HOLE, 512, False, id="NO_HOLE-on-WRITE"),
    pytest.param(CMD_WRITE, FLAG_DF, 512, False, id="DF-on-WRITE"),
    pytest.param(CMD_WRITE, FLAG_REQ_ONE, 512, False, id="REQ_ONE-on-WRITE"),
    pytest.param(CMD_WRITE, FLAG_FAST_ZERO, 512, False, id="FAST_ZERO-on-WRITE"),
    pytest.param(CMD_READ, FLAG_REQ_ONE, 512, False, id="REQ_ONE-on-READ"),
    pytest.param(CMD_READ, FLAG_NO_HOLE, 512, False, id="NO_HOLE-on-READ"),
    pytest.param(CMD_READ, FLAG_FAST_ZERO, 512, False, id="FAST_ZERO-on-READ"),
    pytest.param(CMD_TRIM, FLAG_NO_HOLE, 512, False, id="NO_HOLE-on-TRIM"),
    pytest.param(CMD_TRIM, FLAG_DF, 512, False, id="DF-on-TRIM"),
    pytest.param(CMD_WRITE_ZEROES, FLAG_DF, 512, False, id="DF-on-WRITE_ZEROES"),
    pytest.param(CMD_WRITE_ZEROES, FLAG_REQ_ONE, 512, False, id="REQ_ONE-on-WRITE_ZEROES"),
    pytest.param(CMD_FLUSH, FLAG_NO_HOLE, 0, False, id="NO_HOLE-on-FLUSH"),
    pytest.param(CMD_BLOCK_STATUS, FLAG_DF, 512, True, id="DF-on-BLOCK_STATUS"),
    pytest.param(CMD_BLOCK_STATUS, FLAG_NO_HOLE, 512, True, id="NO_HOLE-on-BLOCK_STATUS"),
])
def test_flag_on_wrong_command_einval(served, cmd: int, flags: int, length: int,
                                      structured_only: bool) -> None:
    d, img, data = served
    with Raw(d.sock) as c:
        c.open("disk", structured=True, meta=structured_only)
        payload = b"\xee" * length if cmd == CMD_WRITE else b""
        assert c.cmd(cmd, 0, length, flags, payload, cookie=0xF1A6)[:2] == (0xF1A6, EINVAL)
        assert c.read(0, 1024) == data[:1024]
    healthy(d, img)


def test_df_on_read_without_structured_replies_einval(served) -> None:
    """SEND_DF is only advertised with structured replies."""
    d, img, data = served
    with Raw(d.sock) as c:
        c.open("disk", structured=False)
        assert c.cmd(CMD_READ, 0, 512, FLAG_DF)[1] == EINVAL
        assert c.read(0, 512) == data[:512]
    healthy(d, img)


def test_fua_not_advertised_on_read_only_export(served_ro, structured: bool) -> None:
    d, img, data = served_ro
    with Raw(d.sock) as c:
        c.open("disk", structured=structured)
        assert c.cmd(CMD_READ, 0, 512, FLAG_FUA)[1] == EINVAL
        assert c.cmd(CMD_FLUSH, flags=FLAG_FUA)[1] == EINVAL
        assert c.read(0, 512) == data[:512]
    healthy(d, img)


@pytest.mark.parametrize(("cmd", "error"), [
    (CMD_READ, EINVAL),
    (CMD_TRIM, EINVAL),
    (CMD_BLOCK_STATUS, EINVAL),
    (CMD_WRITE, ENOSPC),
    (CMD_WRITE_ZEROES, ENOSPC),
])
def test_request_beyond_end(served, cmd: int, error: int) -> None:
    d, img, data = served
    with Raw(d.sock) as c:
        c.open("disk", structured=True, meta=True)
        cases = [
            (IMAGE_SIZE - 511, 512),  # straddles the end
            (IMAGE_SIZE, 1),  # starts at the end
            (IMAGE_SIZE + 4096, 4096),  # wholly past
            (2**64 - 512, 1024),  # offset + length overflows 64 bits
            (2**64 - 1, 1),
        ]
        for cookie, (offset, length) in enumerate(cases, start=100):
            payload = b"\xee" * length if cmd == CMD_WRITE else b""
            got = c.cmd(cmd, offset, length, data=payload, cookie=cookie)
            assert got[:2] == (cookie, error), (offset, length)
        # The last byte is still in range.
        assert c.read(IMAGE_SIZE - 1, 1) == data[-1:]
    healthy(d, img, expect=data)


@pytest.mark.parametrize("cmd", [CMD_READ, CMD_WRITE, CMD_TRIM])
def test_zero_length_einval(served, structured: bool, cmd: int) -> None:
    d, img, data = served
    with Raw(d.sock) as c:
        c.open("disk", structured=structured)
        assert c.cmd(cmd, 0, 0, cookie=0x2E80)[:2] == (0x2E80, EINVAL)
        assert c.cmd(cmd, IMAGE_SIZE, 0, cookie=0x2E81)[:2] == (0x2E81, EINVAL)
        assert c.read(0, 512) == data[:512]
    healthy(d, img, expect=data)


def test_read_of_max_block_works_and_write_payload_over_32mib_disconnects(
        start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    requires("nbdinfo")
    img = tmp_path / "disk.img"
    data = make_image(img, 34 * MiB)
    d = start_daemon(str(img))
    for structured in (False, True):
        with Raw(d.sock) as c:
            c.start()
            if structured:
                c.send(option(OPT_STRUCTURED_REPLY))
                assert c.opt_replies(OPT_STRUCTURED_REPLY)[-1][0] == REP_ACK
                c.structured = True
            replies = c.go("disk")
            assert replies[-1][0] == REP_ACK
            sizes = [struct.unpack(">HIII", body) for typ, body in replies
                     if typ == REP_INFO and struct.unpack_from(">H", body)[0] == INFO_BLOCK_SIZE]
            assert sizes == [(INFO_BLOCK_SIZE, 1, 4096, 32 * MiB)]
            assert c.read(MiB + 3, 32 * MiB) == data[MiB + 3 : 33 * MiB + 3]
            assert c.read(2 * MiB, 32 * MiB) == data[2 * MiB : 34 * MiB]
    # A WRITE payload above 2^25 makes the daemon hang up
    # without reading it; a READ that long has no payload: EINVAL, and the
    # connection goes on (proto.md "Block size constraints").
    with Raw(d.sock) as c:
        c.open("disk")
        c.send(request(CMD_WRITE, 1, 0, 32 * MiB + 1))
        c.assert_closed()
    with Raw(d.sock) as c:
        c.open("disk")
        assert c.cmd(CMD_READ, 0, 32 * MiB + 1)[1] == 22  # NBD_EINVAL
        assert c.read(4096, 4096) == data[4096:8192]
    with Raw(d.sock) as c:
        c.open("disk")
        c.send(request(CMD_WRITE, 1, 0, 0xFFFFFFFF))
        c.assert_closed()
    healthy(d, img, expect=data)


def test_write_to_read_only_export_eperm_and_payload_drained(served_ro,
                                                             structured: bool) -> None:
    d, img, data = served_ro
    with Raw(d.sock) as c:
        c.open("disk", structured=structured)
        # Pipelined: the WRITE (payload sent in pieces) and a READ right behind it.
        payload = b"\xee" * (MiB // 2)
        c.send(request(CMD_WRITE, 0xAAAA, 4096, len(payload)))
        for i in range(0, len(payload), 64 * KiB):
            c.send(payload[i : i + 64 * KiB])
        c.send(request(CMD_READ, 0xBBBB, 4096, 8192))
        assert c.reply()[:2] == (0xAAAA, EPERM)
        assert c.reply(8192, 4096) == (0xBBBB, 0, data[4096 : 4096 + 8192])
        # The payload bytes were not taken for a request header: the same again, whole.
        assert c.cmd(CMD_WRITE, 0, 512, data=b"\x25\x60\x95\x13" * 128)[1] == EPERM
        assert c.cmd(CMD_WRITE_ZEROES, 0, 512)[1] == EPERM
        assert c.cmd(CMD_TRIM, 0, 512)[1] == EPERM
        assert c.read(0, 4096) == data[:4096]
    assert img.read_bytes() == data
    healthy(d, img, expect=data)


@pytest.mark.parametrize("rejected", [False, True], ids=["valid-write", "rejected-write"])
def test_client_vanishes_mid_payload(served, rejected: bool) -> None:
    d, img, data = served
    length = 512 * KiB
    offset = IMAGE_SIZE - length + (4096 if rejected else 0)  # past the end: drained
    with Raw(d.sock) as c:
        c.open("disk")
        c.send(request(CMD_WRITE, 9, offset, length) + b"\xee" * (length // 2))
    with Raw(d.sock) as c:  # and one that half-closes instead
        c.open("disk")
        c.send(request(CMD_WRITE, 9, 0, length) + b"\xee" * (length // 2))
        c.sock.shutdown(socket.SHUT_WR)
        c.assert_closed()
    healthy(d, img, expect=data)
    assert img.read_bytes() == data


def test_many_in_flight_out_of_order_cookies(served) -> None:
    d, img, data = served
    import random

    rng = random.Random(5)
    cookies = list({rng.getrandbits(64) for _ in range(400)})[:200]
    cookies[:2] = [0, 2**64 - 1]
    expect = bytearray(data)
    reqs = bytearray()
    kinds: dict[int, tuple[int, int, int]] = {}
    # Each request touches its own 4 KiB block, so the expected image is order-free.
    blocks = rng.sample(range(IMAGE_SIZE // 4096), 200)
    for i, (cookie, block) in enumerate(zip(cookies, blocks, strict=True)):
        offset = block * 4096 + rng.randrange(2048)
        length = rng.randrange(1, 2048)
        if i % 2:
            payload = rng.randbytes(length)
            expect[offset : offset + length] = payload
            reqs += request(CMD_WRITE, cookie, offset, length, data=payload)
            kinds[cookie] = (CMD_WRITE, offset, length)
        else:
            reqs += request(CMD_READ, cookie, offset, length)
            kinds[cookie] = (CMD_READ, offset, length)
    with Raw(d.sock) as c:
        c.open("disk")
        c.send(bytes(reqs))
        seen: list[int] = []
        for _ in range(200):
            magic, error, cookie = struct.unpack(">IIQ", c.recv_exact(16))
            assert magic == SIMPLE_REPLY_MAGIC
            assert error == 0
            kind, offset, length = kinds[cookie]
            if kind == CMD_READ:
                assert c.recv_exact(length) == data[offset : offset + length]
            seen.append(cookie)
        assert sorted(seen) == sorted(cookies)  # each exactly once
        c.send(request(CMD_DISC))
        c.assert_closed()
    healthy(d, img, expect=bytes(expect))


def test_half_close_after_requests_still_gets_every_reply(served) -> None:
    """EOF at a message boundary ends the session like NBD_CMD_DISC: in-flight requests
    are still answered (the engine turns that EOF into Disconnect)."""
    d, img, data = served
    expect = bytearray(data)
    with Raw(d.sock) as c:
        c.open("disk")
        reqs = b""
        for i in range(10):
            expect[i * 4096 : (i + 1) * 4096] = b"\x11" * 4096
            reqs += request(CMD_WRITE, 100 + i, i * 4096, 4096, data=b"\x11" * 4096)
        c.send(reqs + request(CMD_FLUSH, 200))
        c.sock.shutdown(socket.SHUT_WR)
        got = {c.reply()[:2] for _ in range(11)}
        assert got == {(cookie, 0) for cookie in [*range(100, 110), 200]}
        c.assert_closed()
    healthy(d, img, expect=bytes(expect))


# ---------------------------------------------------------------- a client that never reads


def _vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("sndbuf", [4096, 0], ids=["small-sndbuf", "default-sndbuf"])
def test_slow_client_that_never_reads_replies(start_daemon: Callable[..., Daemon],
                                              tmp_path: Path, sndbuf: int) -> None:
    """2000 x 1 MiB READs, replies never read: memory stays bounded, others are served."""
    requires("nbdinfo")
    img = tmp_path / "disk.img"
    data = make_image(img, 8 * MiB)
    d = start_daemon(str(img))
    limit = 400 * MiB
    base_rss = _vm_rss(d.proc.pid)
    slow = Raw(d.sock, timeout=3.0)
    if sndbuf:
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    slow.open("disk")
    reqs = b"".join(request(CMD_READ, i, (i % 8) * MiB, MiB) for i in range(2000))
    sent = [0]

    def sender() -> None:
        try:
            for i in range(0, len(reqs), 28 * 50):
                slow.sock.sendall(reqs[i : i + 28 * 50])
                sent[0] = i + 28 * 50
        except (TimeoutError, OSError):
            pass  # the daemon stopped reading us: that is the point

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    peak = base_rss
    deadline = time.monotonic() + 8
    try:
        while time.monotonic() < deadline:
            peak = max(peak, _vm_rss(d.proc.pid))
            if peak > limit:
                break
            if not t.is_alive() and time.monotonic() > deadline - 6:
                break
            time.sleep(0.05)
        t.join(timeout=5)
        peak = max(peak, _vm_rss(d.proc.pid))
        assert peak < limit, f"daemon RSS {peak >> 20} MiB (sent {sent[0] // 28} requests)"
        # While the slow client is still connected, others are served.
        with Raw(d.sock) as c:
            c.open("disk")
            assert c.read(3 * MiB, MiB) == data[3 * MiB : 4 * MiB]
        run(requires("nbdinfo"), "--json", d.url("disk"))
    finally:
        slow.close()
    healthy(d, img, expect=data)


# ---------------------------------------------------------------- the snapshot export via libnbd

LIBNBD_SCRIPT = r"""
import json, sys
import nbd

sock, export, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = nbd.NBD()
h.set_strict_mode(0)
h.set_export_name(export)
h.connect_unix(sock)
out = {"size": h.get_size(), "can_zero": h.can_zero(), "read_only": h.is_read_only(),
       "can_trim": h.can_trim()}

def errnum(fn):
    try:
        fn()
    except nbd.Error as e:
        return e.errnum
    return 0

out["pwrite"] = errnum(lambda: h.pwrite(b"x" * 512, 0))
out["zero"] = errnum(lambda: h.zero(512, 0))
out["trim_end"] = errnum(lambda: h.trim(4096, size - 512))
out["trim_past"] = errnum(lambda: h.trim(512, size + 4096))
out["read_past"] = errnum(lambda: h.pread(512, size))
out["read"] = h.pread(16, 0).hex()
h.shutdown()
print(json.dumps(out))
"""


def test_snapshot_export_refuses_writes_via_libnbd(start_daemon: Callable[..., Daemon],
                                                   tmp_path: Path) -> None:
    import errno

    python = requires_libnbd_python()
    requires("nbdinfo")
    img = tmp_path / "disk.img"
    data = make_image(img, IMAGE_SIZE)
    d = start_daemon(str(img), "--fleece")
    proc = subprocess.run(
        [python, "-c", LIBNBD_SCRIPT, d.sock, "disk@fleece", str(IMAGE_SIZE)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["size"] == IMAGE_SIZE
    assert out["read"] == data[:16].hex()
    assert out["can_zero"] is False  # WRITE_ZEROES is not advertised on a snapshot
    assert out["pwrite"] == errno.EPERM
    # Not advertised, but the daemon still answers EPERM (not writable is checked first).
    assert out["zero"] == errno.EPERM
    assert out["zero"] in NBD_ERRORS
    assert out["trim_end"] == errno.EINVAL
    assert out["trim_past"] == errno.EINVAL
    assert out["read_past"] == errno.EINVAL
    healthy(d, img, export="disk@fleece", expect=data)
    healthy(d, img, export="disk", expect=data)
    assert img.read_bytes() == data
