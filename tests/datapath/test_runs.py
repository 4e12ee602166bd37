"""READ and WRITE runs checked in C (``NativeFile.read_run``,
``NativeFile.write_run_check``) against the sans-IO engine: the same request
stream, cut into the same chunks, must give the same reply bytes whether
every request goes through ``ServerConnection.next_event`` or the runs take
what they accept first (a WRITE's reply is its success ack here: the write
itself is the queue's, tested in C).

The streams mix READs and WRITEs the engine accepts with every kind it
refuses (past the end, zero length, unknown or foreign flags, unaligned,
over the maximum block) and with other commands, so a run that takes one
request the engine would refuse, or answers it differently, shows up as a
diff.
"""

from __future__ import annotations

import errno
import random
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from tests.helpers import DISK, opened, request

from fleeced.datapath import NativeFile
from fleeced.nbd import NEED_DATA, Command, NbdCmd, NbdProtocolError, RunRule, ServerConnection

SIZE = DISK.size
MAX_BLOCK = 64 * 1024


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("readrun") / "disk.img"
    path.write_bytes(random.Random(7).randbytes(SIZE))
    return path


def stream(seed: int, min_block: int) -> bytes:
    """Requests: mostly READs, some refused, some other commands."""
    rnd = random.Random(seed)
    out = []
    for cookie in range(1, 400):
        kind = rnd.random()
        off = rnd.randrange(0, SIZE // 512) * 512
        length = rnd.choice((512, 4096, 8192, 65536))
        if kind < 0.70:
            out.append(request(NbdCmd.READ, cookie, off, min(length, SIZE - off)))
        elif kind < 0.74:
            out.append(request(NbdCmd.READ, cookie, SIZE - 100, 512))  # past the end
        elif kind < 0.76:
            out.append(request(NbdCmd.READ, cookie, off, 0))  # zero length
        elif kind < 0.79:
            flags = rnd.choice((1, 2, 4, 8, 0x40, 0x8000))  # FUA NO_HOLE DF REQ_ONE ...
            out.append(request(NbdCmd.READ, cookie, off, 512, flags=flags))
        elif kind < 0.82:
            out.append(request(NbdCmd.READ, cookie, off + 1, 511))  # unaligned
        elif kind < 0.84:
            out.append(request(NbdCmd.READ, cookie, 0, MAX_BLOCK + min_block))  # too long
        elif kind < 0.92:
            out.append(request(NbdCmd.FLUSH, cookie))
        elif kind < 0.86:
            out.append(request(NbdCmd.CACHE, cookie, off, 512))
        elif kind < 0.95:
            flags = rnd.choice((0, 0, 1))  # FUA is a WRITE flag
            n = min(length, SIZE - off, 8192)
            out.append(request(NbdCmd.WRITE, cookie, off, n, flags=flags,
                               data=rnd.randbytes(n)))
        else:  # refused WRITEs: past the end, a READ-only flag, unaligned
            bad = rnd.choice(((SIZE - 100, 512, 0), (off, 512, 4), (off + 1, 511, 0)))
            out.append(request(NbdCmd.WRITE, cookie, bad[0], bad[1], flags=bad[2],
                               data=bytes(bad[1])))
    return b"".join(out)


def chunks(data: bytes, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    out, pos = [], 0
    while pos < len(data):
        n = rnd.choice((1, 7, 28, 29, 100, 1000, 5000))
        out.append(data[pos:pos + n])
        pos += n
    return out


def answer(engine: ServerConnection, f: NativeFile, ev: object) -> None:
    """A READ answered from F, any other command OK (a Rejected one is
    answered by the engine already)."""
    if isinstance(ev, Command):
        if ev.cmd == NbdCmd.READ:
            data, _hole = f.read(ev.offset, ev.length)
            engine.reply_read(ev.cookie, ev.offset, data)
        else:
            engine.reply_ok(ev.cookie)


def answer_events(engine: ServerConnection, f: NativeFile) -> None:
    """next_event until NEED_DATA, each answered."""
    while (ev := engine.next_event()) is not NEED_DATA:
        answer(engine, f, ev)


def run_then_events(engine: ServerConnection, f: NativeFile, counts: list[int]) -> None:
    """What the connection does: runs first, the engine for the rest."""
    while True:
        offered = engine.next_run()
        if offered is not None:
            cmd, rule, data, pos = offered
            got = (f.read_run if cmd == 0 else f.write_run_check)(  # type: ignore[operator]
                data, pos, size=rule.size, allowed_flags=rule.allowed_flags,
                max_length=rule.max_length, min_block=rule.min_block,
                **({"structured": rule.structured} if cmd == 0 else {}), max_count=5)
            if got is not None:
                consumed, count, _n, replies = got
                engine.take_run(consumed, replies)  # WRITE: acks now (not written here)
                counts.append(count)
                continue
        ev = engine.next_event()
        if ev is NEED_DATA:
            return
        answer(engine, f, ev)


def wire(engine: ServerConnection) -> bytes:
    return b"".join(bytes(b) for b in engine.data_to_send())


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize("min_block", [1, 512])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_runs_answer_exactly_what_the_engine_would(image: Path, structured: bool,
                                                   min_block: int, seed: int) -> None:
    export = replace(DISK, min_block=min_block, max_block=MAX_BLOCK)
    plain, fast = opened(export, structured), opened(export, structured)
    counts: list[int] = []
    with open(image, "rb") as fh:
        fh.read()  # in the page cache: runs answer from it only
    with NativeFile.open(str(image), readonly=True) as f:
        for piece in chunks(stream(seed, min_block), seed):
            plain.receive_data(piece)
            fast.receive_data(piece)
            answer_events(plain, f)
            run_then_events(fast, f, counts)
            assert wire(fast) == wire(plain)
    # The runs did the work (not only the fallback): many requests, some in
    # runs of more than one, none over max_count.
    assert sum(counts) > 150 and max(counts) == 5


@pytest.mark.parametrize("seed", range(8))
def test_garbage_after_good_requests_ends_the_same_way(image: Path, seed: int) -> None:
    """Bad input: random bytes after a run of good READs and WRITEs.  Both
    paths answer the good requests alike and then raise the engine's
    protocol error (or, when the garbage happens to parse, agree on it)."""
    rnd = random.Random(seed)
    good = b"".join(request(NbdCmd.READ, c, 4096 * c, 4096) for c in range(1, 6))
    good += b"".join(request(NbdCmd.WRITE, c, 4096 * c, 512, data=bytes(512))
                     for c in range(6, 9))
    garbage = rnd.randbytes(rnd.randrange(1, 200))
    if rnd.random() < 0.5:  # a READ header with a wrong magic
        garbage = b"\x26" + request(NbdCmd.READ, 99, 0, 512)[1:] + garbage
    outcome = []
    with open(image, "rb") as fh:
        fh.read()
    with NativeFile.open(str(image), readonly=True) as f:
        for serve in (answer_events, lambda e, f: run_then_events(e, f, [])):
            engine = opened()
            error = None
            for piece in chunks(good + garbage, seed):
                engine.receive_data(piece)
                try:
                    serve(engine, f)
                except NbdProtocolError as exc:
                    error = str(exc)
                    break
            outcome.append((wire(engine), error))
    assert outcome[0] == outcome[1]
    assert outcome[0][0].count(struct.pack(">I", 0x668E33EF)) >= 5  # the READs answered


def test_run_offered_only_for_a_complete_read_or_write() -> None:
    engine = opened()
    assert engine.next_run() is None  # nothing buffered
    read = request(NbdCmd.READ, 1, 0, 512)
    engine.receive_data(read[:27])
    assert engine.next_run() is None  # incomplete
    engine.receive_data(read[27:])
    offered = engine.next_run()
    assert offered is not None
    cmd, rule, data, pos = offered
    assert cmd == 0 and rule == RunRule(SIZE, 1 | 4, DISK.max_block, 1, True)  # FUA | DF
    assert bytes(data[pos:pos + 28]) == read
    engine.take_run(28, b"reply")
    assert engine.next_run() is None
    assert wire(engine) == b"reply"
    write = request(NbdCmd.WRITE, 2, 0, 512, data=bytes(512))
    engine.receive_data(write[:-1])
    assert engine.next_run() is None  # payload incomplete
    engine.receive_data(write[-1:])
    offered = engine.next_run()
    assert offered is not None and offered[:2] == (1, RunRule(SIZE, 1, DISK.max_block, 1, True))
    engine.take_run(len(write))
    engine.reply_run(b"ack")
    assert wire(engine) == b"ack"
    engine.receive_data(request(NbdCmd.FLUSH, 3))
    assert engine.next_run() is None  # another command: next_event first
    assert engine.next_event() is not NEED_DATA
    engine.shutting_down()
    engine.receive_data(read)
    assert engine.next_run() is None


def test_no_write_runs_on_a_read_only_export() -> None:
    engine = opened(replace(DISK, read_only=True))
    engine.receive_data(request(NbdCmd.WRITE, 2, 0, 512, data=bytes(512)))
    assert engine.next_run() is None  # the engine's EPERM


def test_take_run_must_match_the_buffer() -> None:
    engine = opened()
    engine.receive_data(request(NbdCmd.READ, 1, 0, 512))
    for bad in (0, 27, 56):
        with pytest.raises(Exception, match="does not match"):
            engine.take_run(bad, b"")


def test_read_run_checks_its_arguments(image: Path) -> None:
    req = request(NbdCmd.READ, 1, 0, 512)
    rule = {"size": SIZE, "allowed_flags": 1, "max_length": 4096, "structured": False,
            "max_count": 4}
    with NativeFile.open(str(image), readonly=True) as f:
        with pytest.raises(OSError) as ei:
            f.read_run(req, 0, min_block=3, **rule)  # type: ignore[arg-type]
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(OSError) as ei:
            f.read_run(req, 29, min_block=1, **rule)  # type: ignore[arg-type]
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(TypeError):
            f.read_run(memoryview(req), 0, min_block=1, **rule)  # type: ignore[arg-type]
        got = f.read_run(req, 0, min_block=1, **rule)  # type: ignore[arg-type]
        assert got is not None
        consumed, count, nbytes, replies = got
        assert (consumed, count, nbytes) == (28, 1, 512)
        assert bytes(replies[:16]) == struct.pack(">IIQ", 0x67446698, 0, 1)
        assert bytes(replies[16:]) == image.read_bytes()[:512]
        # a smaller export than the file: its size bounds the run
        assert f.read_run(request(NbdCmd.READ, 1, 4096, 512), 0, min_block=1,
                          **{**rule, "size": 4096}) is None  # type: ignore[arg-type]
    with pytest.raises(OSError) as ei:
        f.read_run(req, 0, min_block=1, **rule)  # type: ignore[arg-type]
    assert ei.value.errno == errno.EBADF
