"""Short end-to-end soak: concurrent guests and snapshot readers against a byte-exact model.

``bench/soak_client.py`` (run under the system python3, where libnbd's bindings
live) drives the running daemon: 8 guest threads issue unaligned WRITE (some
FUA), WRITE_ZEROES with and without NO_HOLE, TRIM and FLUSH on the active
export, never two overlapping operations at once, so its model of the disk is
exact; 3 snapshot readers (one without structured replies) compare random
ranges with the image as it was at session start and TRIM some of them
(reads of whole trimmed clusters must then fail with EPERM).  Every NBD call
has a timeout.  At the end every readable snapshot byte and every active byte
is compared, the daemon must still be running, exit 0 on SIGTERM within
15 s, and the image file must equal the model.

The matrix covers cluster sizes 4K/64K/1M, with and without ``--cache``, both
``--on-cbw-error`` policies and both ``--discard`` modes (alternating, so each
cluster size sees each value of every other axis).  The last tests are the
chaos cases ``bench/soak.py`` runs at random, pinned down: clients that drop a
pipeline of snapshot reads followed by ``fleece-stop``, snapshot readers that
never read their replies during ``fleece-stop`` and SIGTERM, and SIGTERM while
guests write.  ``FLEECED_SOAK_SECONDS`` (default 3) sets the length of each run.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, requires_libnbd_python, run

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench"
CLIENT = str(BENCH / "soak_client.py")
KiB = 1 << 10
MiB = 1 << 20
SIZE = 64 * MiB + 12 * KiB  # not a multiple of any cluster size: a short tail cluster
SECONDS = float(os.environ.get("FLEECED_SOAK_SECONDS", "3"))
OP_TIMEOUT = 15  # per NBD call, per control command
STOP_TIMEOUT = 15  # SIGTERM -> exit

MATRIX = [
    (cs, cache, policy, discard)
    for cs in ("4K", "64K", "1M")
    for cache in (None, "8M")
    for policy in ("break-snapshot", "break-guest-write")
    for discard in ["unmap" if (cache is None) == (policy == "break-snapshot") else "ignore"]
]


def _id(p: tuple[str, str | None, str, str]) -> str:
    cs, cache, policy, discard = p
    return f"{cs}-{'cache' if cache else 'nocache'}-{policy}-{discard}"


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy keeping holes as holes and allocated zeros allocated (SEEK_DATA/SEEK_HOLE)."""
    with open(src, "rb") as f, open(dst, "wb") as g:
        size = os.fstat(f.fileno()).st_size
        g.truncate(size)
        pos = 0
        while pos < size:
            try:
                data = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole = os.lseek(f.fileno(), data, os.SEEK_HOLE)
            f.seek(data)
            g.seek(data)
            while data < hole:
                chunk = f.read(min(8 * MiB, hole - data))
                g.write(chunk)
                data += len(chunk)
            pos = hole


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sparse image (data, allocated zeros, holes) and its state dir, made once."""
    py = requires_libnbd_python()
    d = tmp_path_factory.mktemp("soak-template")
    run(py, CLIENT, "mkimage", str(d / "disk.img"), "--state", str(d / "state"),
        "--size", str(SIZE), "--seed", "7")
    return d


@pytest.fixture
def image(template: Path, tmp_path: Path) -> tuple[Path, Path]:
    img, state = tmp_path / "disk.img", tmp_path / "state"
    sparse_copy(template / "disk.img", img)
    shutil.copytree(template / "state", state)
    return img, state


def soak_run(d: Daemon, state: Path, *, cluster: str, discard: str, seconds: float = SECONDS,
             seed: int = 1, extra: tuple[str, ...] = (), check: bool = True,
             popen: bool = False) -> Any:
    """Run the soak client; return its JSON report (or the Popen when popen=True)."""
    py = requires_libnbd_python()
    report = state.parent / f"report-{seed}.json"
    cmd = [py, CLIENT, "run", "--socket", d.sock, "--export", "disk",
           "--snapshot", "disk@fleece", "--state", str(state), "--seconds", str(seconds),
           "--seed", str(seed), "--cluster-size", cluster, "--discard", discard,
           "--op-timeout", str(OP_TIMEOUT), "--report", str(report), *extra]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=seconds + 4 * OP_TIMEOUT + 60)
    rep = read_report(report, proc.stderr)
    if check:
        assert_clean(d, rep, proc.stderr)
    return rep


def read_report(path: Path, stderr: str) -> dict[str, Any]:
    try:
        rep: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        pytest.fail(f"soak client left no report; stderr:\n{stderr[-4000:]}")
    return rep


def assert_clean(d: Daemon, rep: dict[str, Any], stderr: str = "") -> None:
    assert_alive(d, f"client report {rep}")
    assert not rep["hangs"], f"hangs: {rep['hangs']}\n{stderr[-4000:]}"
    assert rep["wrong_bytes"] == 0, f"wrong bytes: {rep['wrong']}"
    assert not rep["errors"], f"errors: {rep['errors']}"
    assert rep.get("verified"), rep


def stop_ok(d: Daemon) -> None:
    """SIGTERM: exit 0 within STOP_TIMEOUT (a longer wait is a hang)."""
    try:
        rc = d.stop(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"daemon did not exit within {STOP_TIMEOUT}s of SIGTERM (killed)")
    how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
    assert rc == 0, f"daemon {how} after SIGTERM"


def assert_image_is_model(img: Path, state: Path) -> None:
    meta = json.loads((state / "state.json").read_text())
    model = bytearray((state / "model.bin").read_bytes())
    data = bytearray(img.read_bytes())
    for u0, u1 in meta["unknown"]:  # ranges of operations interrupted by the stop
        data[u0:u1] = model[u0:u1]
    assert len(data) == len(model)
    if data != model:
        bad = [i for i in range(0, len(data), 4096) if data[i:i + 4096] != model[i:i + 4096]]
        pytest.fail(f"image file differs from the model in {len(bad)} 4 KiB blocks, "
                    f"first at {bad[0]}")


SANITIZER_MARKS = ("AddressSanitizer", "runtime error:", "LeakSanitizer", "Fatal Python error",
                   "Traceback (most recent call last)")


def assert_log_clean(tmp_path: Path) -> None:
    """No sanitizer report (FLEECED_DAEMON_PRELOAD runs), fatal error or unhandled
    exception (a Python traceback) in the daemon logs."""
    for path in sorted(tmp_path.glob("daemon*.log")):
        text = path.read_text(errors="replace")
        for mark in SANITIZER_MARKS:
            assert mark not in text, f"{path.name}: {mark}\n{text[-4000:]}"


def qmp(d: Daemon, cmd: str, args: dict[str, Any] | None = None,
        timeout: float = OP_TIMEOUT) -> Any:
    """One control command through qemu.qmp; exceeding TIMEOUT is a hang."""
    from qemu.qmp import QMPClient

    async def go() -> Any:
        client = QMPClient("soak")
        await asyncio.wait_for(client.connect(d.control), timeout)
        try:
            return await asyncio.wait_for(client.execute(cmd, args or {}), timeout)
        finally:
            await client.disconnect()

    try:
        return asyncio.run(go())
    except TimeoutError:
        assert_alive(d, f"control command {cmd} timed out")
        pytest.fail(f"control command {cmd} did not return within {timeout}s (daemon alive)")
    except Exception:
        assert_alive(d, f"control command {cmd} failed", grace=5)
        raise


def assert_alive(d: Daemon, what: str, grace: float = 0) -> None:
    """Fail with the daemon's exit (a signal is a crash) if it is gone."""
    try:
        rc = d.proc.wait(grace) if grace else d.proc.poll()
    except subprocess.TimeoutExpired:
        return
    if rc is not None:
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        pytest.fail(f"daemon died ({how}); {what}")


def serve_args(img: Path, tmp: Path, cs: str, cache: str | None, policy: str,
               discard: str) -> list[str]:
    args = [str(img), "--fleece", "--cluster-size", cs, "--on-cbw-error", policy,
            "--discard", discard, "--temp-dir", str(tmp)]
    return args + (["--cache", cache] if cache else [])


ENV = {"PYTHONFAULTHANDLER": "1"}


@pytest.mark.parametrize("params", MATRIX, ids=_id)
def test_soak(start_daemon, image: tuple[Path, Path], tmp_path: Path,
              params: tuple[str, str | None, str, str]) -> None:
    cs, cache, policy, discard = params
    img, state = image
    d = start_daemon(*serve_args(img, tmp_path, cs, cache, policy, discard), env=ENV)
    rep = soak_run(d, state, cluster=cs, discard=discard, seed=MATRIX.index(params) + 1,
                   extra=("--fresh-snapshot",))
    assert rep["ops"].get("snap-read", 0) > 0 and rep["ops"].get("write", 0) > 0, rep["ops"]
    sessions = qmp(d, "query-fleece")
    assert [s["state"] for s in sessions] == ["active"], sessions
    stop_ok(d)
    assert_image_is_model(img, state)
    assert_log_clean(tmp_path)


# ---------------------------------------------------------------- chaos cases, pinned down


def abandon(d: Daemon, export: str, style: str, seed: int, count: int = 64
            ) -> subprocess.Popen[str]:
    """A client that pipelines COUNT reads and drops the connection (see soak_client)."""
    py = requires_libnbd_python()
    return subprocess.Popen([py, CLIENT, "abandon", "--socket", d.sock, "--export", export,
                             "--count", str(count), "--seed", str(seed), "--style", style,
                             "--stall", "60"], stdout=subprocess.PIPE, text=True)


def first_line(p: subprocess.Popen[str], prefix: str) -> None:
    """Wait (bounded) for the client's first stdout line, which must start with PREFIX."""
    assert p.stdout is not None
    out = p.stdout
    line: list[str] = []
    t = threading.Thread(target=lambda: line.append(out.readline()), daemon=True)
    t.start()
    t.join(OP_TIMEOUT)
    if t.is_alive():
        p.kill()
        pytest.fail(f"client printed no {prefix!r} line within {OP_TIMEOUT}s")
    assert line and line[0].startswith(prefix), (line, p.poll())


def pipelined(p: subprocess.Popen[str]) -> None:
    """The abandoning client has its reads in flight."""
    first_line(p, "abandon:")


STYLES = ["exit", "rst", "halfclose", "disconnect"]


@pytest.mark.slow
def test_disconnect_mid_pipeline_then_fleece_stop(start_daemon, image: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    """Snapshot clients vanish with large reads in flight; fleece-stop right after."""
    img, state = image
    d = start_daemon(*serve_args(img, tmp_path, "64K", None, "break-snapshot", "ignore"),
                     env=ENV)
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(8):
            procs = [abandon(d, "disk@fleece", STYLES[(i + k) % 4], seed=10 * i + k)
                     for k in range(4)]
            for p in procs:
                pipelined(p)
            if i % 2:  # half the time the clients are gone before the stop
                for p in procs:
                    p.wait(OP_TIMEOUT)
            qmp(d, "fleece-stop", {"disk": "disk", "name": "fleece"})
            assert_alive(d, f"iteration {i}: clients dropped pipelined snapshot reads "
                            f"({', '.join(STYLES)}), then fleece-stop", grace=0.2)
            qmp(d, "fleece-start", {"disk": "disk", "name": "fleece", "cluster-size": 65536})
            for p in procs:
                p.kill()
                p.wait()
    finally:
        for p in procs:
            p.kill()
            p.wait()
    soak_run(d, state, cluster="64K", discard="ignore", seconds=1.5,
             extra=("--fresh-snapshot",))
    stop_ok(d)
    assert_image_is_model(img, state)
    assert_log_clean(tmp_path)


def test_stalled_snapshot_readers_fleece_stop_and_sigterm(start_daemon, image: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    """Readers that never read their replies must not block fleece-stop or SIGTERM."""
    img, _ = image
    d = start_daemon(*serve_args(img, tmp_path, "1M", "8M", "break-guest-write", "unmap"),
                     "--shutdown-timeout", "2", env=ENV)
    procs: list[subprocess.Popen[str]] = []
    try:
        procs += [abandon(d, "disk@fleece", "stall", seed=k, count=32) for k in range(2)]
        for p in procs:
            pipelined(p)
        qmp(d, "fleece-stop", {"disk": "disk", "name": "fleece"})
        qmp(d, "fleece-start", {"disk": "disk", "name": "fleece", "cluster-size": MiB})
        procs += [abandon(d, export, "stall", seed=10 + k, count=32)
                  for k, export in enumerate(["disk@fleece", "disk"])]
        for p in procs[2:]:
            pipelined(p)
        stop_ok(d)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert_log_clean(tmp_path)


def test_sigterm_while_guests_write(start_daemon, image: tuple[Path, Path],
                                    tmp_path: Path) -> None:
    """In-flight operations may land or not; everything acknowledged must be on disk."""
    img, state = image
    d = start_daemon(*serve_args(img, tmp_path, "4K", "8M", "break-snapshot", "unmap"),
                     env=ENV)
    client = soak_run(d, state, cluster="4K", discard="unmap", seconds=30, popen=True,
                      extra=("--fresh-snapshot", "--daemon-may-stop", "--no-pre-verify",
                             "--announce-after", "300"))
    try:
        first_line(client, "running")  # guests and readers are busy
        stop_ok(d)
        _, err = client.communicate(timeout=4 * OP_TIMEOUT)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    rep = read_report(state.parent / "report-1.json", err)
    assert rep["daemon_gone"], rep
    assert not rep["hangs"] and not rep["errors"] and rep["wrong_bytes"] == 0, rep
    assert_image_is_model(img, state)
    assert_log_clean(tmp_path)
