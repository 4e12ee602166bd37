"""Shared helpers for the fleeced benchmarks (stdlib only).

Servers are started as child processes listening on a Unix socket, readiness is
"the socket accepts a connection", CPU time is read from /proc for the whole
process tree, and every subprocess runs with a timeout.  Nothing here is a test:
the numbers are medians over rounds on a noisy machine and only the ratios
between servers measured in the same run mean anything.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_WORK_DIR = Path("/var/tmp/fleeced-bench")
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1_000_000
GB = 1_000_000_000


class BenchError(Exception):
    """A one-line failure reported to the user (missing tool, server died, ...)."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    """``1G``, ``256M``, ``64K``, ``4096`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {text!r}")
    shift = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
    return int(m.group(1)) << shift


def human_size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def require_tools(names: Iterable[str]) -> dict[str, str]:
    """Resolve every tool on PATH or raise one clear error listing the missing ones."""
    found: dict[str, str] = {}
    missing = []
    for name in names:
        path = shutil.which(name)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        raise BenchError(
            "missing tool(s): " + ", ".join(missing)
            + " (install qemu-utils, qemu-system-common/qemu-storage-daemon, nbdkit, "
            "libnbd-bin and fio)"
        )
    return found


def run(cmd: Sequence[str], *, timeout: float, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command with a timeout; raise :class:`BenchError` with its stderr on failure."""
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}") from exc
    except FileNotFoundError as exc:
        raise BenchError(f"cannot run {cmd[0]!r}: {exc.strerror}") from exc
    if check and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise BenchError(
            f"exit {proc.returncode}: {shlex.join(cmd)}\n    " + "\n    ".join(tail)
        )
    return proc


# -- images ------------------------------------------------------------------


def ensure_random_image(path: Path, size: int) -> Path:
    """Create ``path`` with ``size`` bytes of random data unless it already exists."""
    if path.exists() and path.stat().st_size == size:
        return path
    log(f"creating {path} ({human_size(size)} of random data)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    chunk = 4 << 20
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    return path


def warm_page_cache(path: Path) -> None:
    """Read the whole file so it sits in the page cache before timing anything."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        while f.readinto(buf):
            pass


def copy_file(src: Path, dst: Path, *, timeout: float = 600) -> None:
    """``cp --reflink=auto --sparse=never`` then flush, so the copy is not timed later."""
    dst.unlink(missing_ok=True)
    run(["cp", "--reflink=auto", "--sparse=never", str(src), str(dst)], timeout=timeout)
    sync(timeout=timeout)


def sync(*, timeout: float = 600) -> None:
    run(["sync"], timeout=timeout)


def allocated_bytes(path: Path) -> int:
    """Bytes allocated on disk (``du --block-size=1``), 0 if the file is gone."""
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def allocated_bytes_tree(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def open_files_allocated(pid: int, under: Path) -> int:
    """Allocated bytes of the files ``pid`` holds open below ``under``, including
    unlinked and O_TMPFILE ones (stat through ``/proc/PID/fd``)."""
    prefix = str(under.resolve()) + "/"
    seen: set[tuple[int, int]] = set()
    total = 0
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return 0
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
            if not target.startswith(prefix):
                continue
            st = os.stat(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


# -- servers -----------------------------------------------------------------


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime (all threads) of ``pid`` and its live descendants, plus reaped children."""
    children = _proc_children()
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17.
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))
        todo.extend(children.get(p, []))
    return total / CLK_TCK


def tree_rss_bytes(pid: int) -> int:
    children = _proc_children()
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
        todo.extend(children.get(p, []))
    return total


class Server:
    """A server child process listening on ``sock``; use as a context manager."""

    def __init__(self, name: str, cmd: Sequence[str], sock: Path, log_path: Path,
                 *, cwd: Path | None = None, env: dict[str, str] | None = None,
                 ready_timeout: float = 30.0) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.sock = sock
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return tree_rss_bytes(self.pid)

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n    ".join(text[-lines:])

    def start(self) -> Server:
        self.sock.unlink(missing_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_file.write(f"\n==== {time.ctime()} {shlex.join(self.cmd)}\n".encode())
        self._log_file.flush()
        try:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=self._log_file,
                stderr=subprocess.STDOUT, cwd=self.cwd, env=self.env,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            self._log_file.close()
            raise BenchError(f"{self.name}: cannot run {self.cmd[0]!r}") from exc
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.proc.returncode} before listening; "
                    f"log {self.log_path}:\n    {self.log_tail()}"
                )
            if self.sock.exists():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(1.0)
                    try:
                        s.connect(str(self.sock))
                        return
                    except OSError:
                        pass
            time.sleep(0.05)
        raise BenchError(f"{self.name} not listening on {self.sock} after "
                         f"{self.ready_timeout:.0f}s; log {self.log_path}")

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"{self.name} died (exit {self.proc.returncode}); log "
                             f"{self.log_path}:\n    {self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if proc is not None and proc.poll() is None:
            log(f"warning: {self.name} (pid {proc.pid}) did not exit")
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.sock.unlink(missing_ok=True)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def nbd_uri(sock: Path, export: str) -> str:
    from urllib.parse import quote

    return f"nbd+unix:///{quote(export, safe='')}?socket={sock}"


# -- clients -----------------------------------------------------------------


def nbdcopy_read(uri: str, size: int, *, timeout: float = 600,
                 connections: int | None = None) -> dict[str, float]:
    """``nbdcopy URI null:``; returns seconds and MB/s (10^6 bytes).

    ``connections`` is passed as ``--connections=N``; None keeps nbdcopy's default
    (multi-conn, up to 4 connections, when the server advertises it).
    """
    cmd = ["nbdcopy", uri, "null:"]
    if connections is not None:
        cmd.insert(1, f"--connections={connections}")
    t0 = time.monotonic()
    run(cmd, timeout=timeout)
    secs = time.monotonic() - t0
    return {"seconds": secs, "mb_s": size / MB / secs}


def fio_cmd(uri: str, *, rw: str, bs: str, iodepth: int, runtime: float, size: int,
            name: str = "job", rate_iops: int = 0) -> list[str]:
    # rate_iops: a fixed workload (a guest that does so much, not as much as
    # it can): fio issues that many per second and measures their latency.
    return [
        "fio", *([f"--rate_iops={rate_iops}"] if rate_iops else []), f"--name={name}",
        "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
        f"--bs={bs}", f"--iodepth={iodepth}", f"--size={size}", "--time_based",
        f"--runtime={runtime:g}", "--invalidate=0", "--randrepeat=0", "--norandommap",
        "--output-format=json",
    ]


def parse_fio(stdout: str, rw: str) -> dict[str, float]:
    """IOPS, MB/s and clat p50/p99 (microseconds) out of fio's JSON (which the nbd
    engine prefixes with a "connected" line on stdout)."""
    start = stdout.find("\n{")
    text = stdout if stdout.startswith("{") else stdout[start + 1:]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchError(f"cannot parse fio output: {stdout[:300]!r}") from exc
    job = data["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}")
    side = job["write" if "write" in rw else "read"]
    pct = side["clat_ns"].get("percentile", {})
    return {
        "iops": float(side["iops"]),
        "mb_s": float(side["bw_bytes"]) / MB,
        "p50_us": float(pct.get("50.000000", 0)) / 1000,
        "p99_us": float(pct.get("99.000000", 0)) / 1000,
        "ios": float(side["total_ios"]),
    }


def fio(uri: str, *, rw: str, bs: str, iodepth: int, runtime: float, size: int
        ) -> dict[str, float]:
    cmd = fio_cmd(uri, rw=rw, bs=bs, iodepth=iodepth, runtime=runtime, size=size)
    proc = run(cmd, timeout=runtime + 120)
    return parse_fio(proc.stdout, rw)


# -- statistics and output ---------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "—"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}" if abs(v) >= 1 else f"{v:.{max(digits, 3)}f}"


def fmt_ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def tool_versions() -> dict[str, str]:
    out = {}
    for tool, args in (("qemu-nbd", ["--version"]), ("qemu-storage-daemon", ["--version"]),
                       ("nbdkit", ["--version"]), ("nbdcopy", ["--version"]),
                       ("fio", ["--version"])):
        if shutil.which(tool):
            try:
                proc = run([tool, *args], timeout=10, check=False)
                out[tool] = (proc.stdout or proc.stderr).strip().splitlines()[0]
            except (BenchError, IndexError):
                out[tool] = "?"
    return out


def write_results(kind: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{kind}-{stamp}.json"
    payload = {
        "kind": kind,
        "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": {"nproc": os.cpu_count(), "uname": " ".join(os.uname()),
                 "loadavg_start": payload.pop("_loadavg", None)},
        "tools": tool_versions(),
        **payload,
    }
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def default_fleeced_cmd() -> list[str]:
    return [sys.executable, "-m", "fleeced"]
