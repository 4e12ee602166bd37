"""Long fuzz/soak run of fleeced: guests, snapshot readers and chaos, with an oracle.

Each *round* makes a fresh sparse image (64 MiB + 12 KiB: random data,
allocated zeros, holes), starts ``fleeced serve IMAGE --fleece`` with one
configuration from the matrix (cluster size 4K/64K/1M, with and without
``--cache``, ``--on-cbw-error`` break-snapshot/break-guest-write,
``--discard`` ignore/unmap) and runs *segments* of ``soak_client.py run``
(8 guest threads on the active export, 3 snapshot readers, byte-exact model,
every readable snapshot byte and every active byte checked at the end of each
segment).  Between and during segments it picks chaos actions at random:

- ``abandon``: clients that pipeline many reads (large ones over holes and
  data) and disconnect without reading the replies (exit, RST, half-close,
  NBD_CMD_DISC abandoning what is pending, or stall until killed);
- ``abandon-stop``: the same, immediately followed by ``fleece-stop`` (over
  the control socket, QMP), then ``fleece-start``;
- ``stall-stop``: clients that never read their replies, then ``fleece-stop``;
- ``stall-reconnect``: eight clients at a time that ask for 64 large READs
  and never read, replaced by new ones again and again while the guests run
  (a guest op that waits for them past ``--op-timeout`` is a hang);
- ``two-names``: ``disk-add`` of the served image through a symlink and a
  hard link must be refused (one source is one disk); another image is
  added and removed;
- ``cycle``: ``fleeced fleece stop`` / ``fleeced fleece start`` (the CLI);
- ``stop-mid``: ``fleece-stop`` while the snapshot readers are busy;
- ``restart``: SIGTERM (sometimes with stalled clients connected), the daemon
  must exit 0 within ``--stop-timeout``; the image file must equal the model;
  the daemon is started again and the active export must still equal the model;
- ``restart-mid``: the same, while guests write (in-flight operations leave
  their ranges "unknown"; everything else must match).

Findings: crashes (exit by a signal, non-zero exit, an ASan/UBSan report),
hangs (a client call, a control command, READY=1 or a stop that exceeds its
timeout; a gdb backtrace of the daemon is saved), wrong bytes, unexpected
errors, broken sessions.  A round with a finding ends there and a new one
starts.  Peak RSS (VmHWM, and sampled VmRSS) of every daemon is reported.
The exit status is 1 when anything but warnings was found.

Only Unix sockets are used, and the run is bounded: ``--minutes`` plus at most
one segment and the stop/cleanup timeouts.

Usage::

    .venv/bin/python bench/soak.py                  # 10 minutes
    .venv/bin/python bench/soak.py --minutes 2 --seed 7
    .venv/bin/python bench/soak.py --seconds 60 --configs 4K,cache,break-guest-write,unmap
    # the daemon under ASan/UBSan (builds the module with FLEECED_SANITIZE=1 first):
    .venv/bin/python bench/soak.py --minutes 5 --asan
    # any other build or environment for the daemon only:
    .venv/bin/python bench/soak.py --module-path /tmp/other-build/daemon \\
        --daemon-env LD_PRELOAD=... --daemon-env ASAN_OPTIONS=... \\
        --fleeced '/other/venv/bin/python -m fleeced'
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
CLIENT = BENCH_DIR / "soak_client.py"
SYSTEM_PYTHON = "/usr/bin/python3"
KiB = 1 << 10
MiB = 1 << 20
IMAGE_SIZE = 64 * MiB + 12 * KiB
DISK = "disk"
SNAP = "disk@fleece"
LOG_PATTERNS = ("AddressSanitizer", "UndefinedBehaviorSanitizer", "runtime error:",
                "LeakSanitizer", "Fatal Python error", "Segmentation fault")
FAIL_KINDS = ("crash", "hang", "wrong", "error")


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    shift = {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0)
    return int(text[:-1] if shift else text) << shift


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config:
    cluster: str
    cache: str | None
    policy: str
    discard: str

    @property
    def label(self) -> str:
        return (f"cs={self.cluster} cache={self.cache or 'none'} "
                f"on-cbw-error={self.policy} discard={self.discard}")

    def session_args(self) -> list[str]:
        out = ["--cluster-size", self.cluster, "--on-cbw-error", self.policy]
        if self.cache:
            out += ["--cache", self.cache]
        return out

    def serve_args(self) -> list[str]:
        return ["--fleece", "--discard", self.discard, *self.session_args()]

    def qmp_session(self) -> dict[str, Any]:
        args: dict[str, Any] = {"disk": DISK, "cluster-size": parse_size(self.cluster),
                                "on-cbw-error": self.policy}
        if self.cache:
            args["cache"] = parse_size(self.cache)
        return args


def matrix(filters: list[str]) -> list[Config]:
    out = []
    for cs in ("4K", "64K", "1M"):
        for cache in (None, "8M"):
            for policy in ("break-snapshot", "break-guest-write"):
                for discard in ("ignore", "unmap"):
                    c = Config(cs, cache, policy, discard)
                    words = {cs, policy, discard, "cache" if cache else "nocache"}
                    if all(f in words for f in filters):
                        out.append(c)
    return out


# ---------------------------------------------------------------- findings


@dataclass
class Finding:
    kind: str  # crash | hang | wrong | error | warning
    round: int
    config: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


class RoundOver(Exception):
    """A finding ended the round."""


# ---------------------------------------------------------------- control socket (QMP)


class Qmp:
    """Minimal QMP client over the control socket (stdlib, every call bounded)."""

    def __init__(self, path: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.dec = json.JSONDecoder()
        greeting = self._recv()
        assert "QMP" in greeting, greeting
        self.execute("qmp_capabilities")

    def _recv(self) -> dict[str, Any]:
        while True:
            text = self.buf.decode(errors="replace").lstrip()
            if text:
                try:
                    obj, end = self.dec.raw_decode(text)
                except json.JSONDecodeError:
                    pass
                else:
                    self.buf = text[end:].encode()
                    assert isinstance(obj, dict)
                    return obj
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("control socket closed")
            self.buf += data

    def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode())
        while True:
            reply = self._recv()
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"{cmd}: {reply['error']}")
            return reply.get("return")

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------- the daemon


class Daemon:
    """``fleeced serve`` under our control: READY=1 via NOTIFY_SOCKET, RSS sampling."""

    def __init__(self, soak: Soak, rdir: Path, image: Path, config: Config) -> None:
        self.soak = soak
        self.rdir = rdir
        self.sock = str(rdir / "nbd.sock")
        self.control = str(rdir / "ctl.sock")
        self.log_path = rdir / "daemon.log"
        self.cmd = [*soak.fleeced, "serve", str(image), "-k", self.sock, "--control",
                    self.control, "-t", "--temp-dir", str(rdir), *config.serve_args()]
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_hwm = 0
        self.peak_rss = 0
        self._sampler: threading.Thread | None = None
        self.starts = 0
        self.termed = False  # SIGTERM sent to the current process

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30) -> None:
        notify_path = str(self.rdir / "notify.sock")
        Path(notify_path).unlink(missing_ok=True)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path, PYTHONFAULTHANDLER="1")
        env.update(self.soak.daemon_env)
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n==== {time.ctime()} {shlex.join(self.cmd)}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(self.cmd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=subprocess.STDOUT,
                                         cwd=self.rdir, preexec_fn=self._limits)
        self.starts += 1
        self.termed = False
        try:
            notify.settimeout(0.2)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    msg = notify.recv(4096)
                except TimeoutError:
                    msg = b""
                if b"READY=1" in msg.split(b"\n"):
                    break
                if self.proc.poll() is not None:
                    raise self.soak.crashed(f"daemon {self.exit_desc()} before READY=1")
                if time.monotonic() > deadline:
                    raise self.soak.fail("hang", f"no READY=1 within {timeout}s of start",
                                         backtrace=self)
        finally:
            notify.close()
        self._sampler = threading.Thread(target=self._sample, args=(self.proc,), daemon=True)
        self._sampler.start()

    def _limits(self) -> None:
        if self.soak.a.core_dumps:  # core_pattern "core" puts it in the round dir
            resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,
                                                      resource.RLIM_INFINITY))

    def core_backtrace(self) -> str | None:
        """After a crash: gdb backtrace of every thread from the core file, if any."""
        cores = sorted(self.rdir.glob("core*"), key=lambda p: p.stat().st_mtime)
        gdb = shutil.which("gdb")
        if not cores or not gdb:
            return None
        out = self.rdir / f"core-backtrace-{cores[-1].name}.txt"
        exe = os.path.realpath(shutil.which(self.cmd[0]) or self.cmd[0])
        try:
            res = subprocess.run([gdb, "-batch", "-ex", "thread apply all bt", exe,
                                  str(cores[-1])], capture_output=True, text=True, timeout=120)
            out.write_text(res.stdout + res.stderr)
        except subprocess.TimeoutExpired:
            return None
        return str(out)

    def _sample(self, proc: subprocess.Popen[bytes]) -> None:
        path = f"/proc/{proc.pid}/status"
        while proc.poll() is None:
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith(("VmHWM:", "VmRSS:")):
                            kib = int(line.split()[1]) * KiB
                            if line.startswith("VmHWM:"):
                                self.peak_hwm = max(self.peak_hwm, kib)
                            else:
                                self.peak_rss = max(self.peak_rss, kib)
            except (OSError, ValueError):
                return
            time.sleep(0.25)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_desc(self) -> str:
        assert self.proc is not None
        rc = self.proc.returncode
        if rc is None:
            return "running"
        if rc < 0:
            return f"killed by {signal.Signals(-rc).name}"
        return f"exit status {rc}"

    def backtrace(self, tag: str) -> str | None:
        """gdb backtrace of every thread, then SIGABRT (faulthandler dumps Python)."""
        if not self.alive():
            return None
        out = self.rdir / f"backtrace-{tag}.txt"
        gdb = shutil.which("gdb")
        if gdb:
            try:
                res = subprocess.run([gdb, "-p", str(self.pid), "-batch", "-ex",
                                      "thread apply all bt"], capture_output=True,
                                     text=True, timeout=90)
                out.write_text(res.stdout + res.stderr)
            except subprocess.TimeoutExpired:
                out.write_text("gdb timed out\n")
        else:
            out.write_text("gdb not installed\n")
        return str(out)

    def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM; (exit status or None when it did not exit in time, seconds)."""
        assert self.proc is not None
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.termed = True
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None, time.monotonic() - t0
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def read_hwm(self) -> None:
        if self.alive():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.peak_hwm = max(self.peak_hwm, int(line.split()[1]) * KiB)
            except OSError:
                pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


# ---------------------------------------------------------------- the soak


class Soak:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.rng = random.Random(a.seed)
        self.fleeced = shlex.split(a.fleeced) if a.fleeced else [sys.executable, "-m",
                                                                  "fleeced"]
        self.daemon_env = dict(kv.split("=", 1) for kv in a.daemon_env)
        if a.module_path:
            self.daemon_env["PYTHONPATH"] = a.module_path
        self.client_env = dict(os.environ)
        for key in ("LD_PRELOAD", "ASAN_OPTIONS", "PYTHONPATH"):
            self.client_env.pop(key, None)  # the daemon's sanitizer is not the client's
        self.findings: list[Finding] = []
        self.rounds: list[dict[str, Any]] = []
        self.deadline = time.monotonic() + (a.seconds if a.seconds else a.minutes * 60)
        self.configs = matrix([f for f in a.configs.split(",") if f])
        if not self.configs:
            raise SystemExit(f"--configs {a.configs!r} matches no configuration")
        self.round = 0
        self.config: Config | None = None
        self.daemon: Daemon | None = None
        self.rdir = Path()
        self.state = Path()
        self.image = Path()
        self.actions: list[str] = []
        self.t_round = 0.0
        self.fresh = True
        self.stats: dict[str, int] = {}
        self.clients: list[subprocess.Popen[bytes]] = []
        self.enabled: set[str] = set()
        self.interrupted = False
        self.work = Path()

    # -- findings --------------------------------------------------------------

    def fail(self, kind: str, message: str, backtrace: Daemon | None = None,
             **details: Any) -> RoundOver:
        d = self.daemon
        if backtrace is not None:
            bt = backtrace.backtrace(f"r{self.round}-{len(self.findings)}")
            if bt:
                details["backtrace"] = bt
        if d is not None:
            details.setdefault("daemon", d.exit_desc() if d.proc else "not started")
            details.setdefault("daemon_log", str(d.log_path))
            details.setdefault("daemon_cmd", shlex.join(d.cmd))
        details.setdefault("actions", list(self.actions))
        f = Finding(kind, self.round, self.config.label if self.config else "", message,
                    details)
        self.findings.append(f)
        log(f"FINDING {kind.upper()}: {message}")
        return RoundOver(message)

    def note(self, action: str) -> None:
        self.actions.append(f"+{time.monotonic() - self.t_round:6.1f}s {action}")
        log(f"round {self.round}: {action}")

    def check_alive(self, what: str) -> None:
        d = self.daemon
        assert d is not None
        if not d.alive():
            raise self.crashed(f"daemon died ({d.exit_desc()}) during/after {what}")

    def crashed(self, message: str) -> RoundOver:
        d = self.daemon
        assert d is not None
        details: dict[str, Any] = {"log_tail": d.log_tail()}
        time.sleep(0.5)  # the kernel may still be writing the core file
        bt = d.core_backtrace()
        if bt:
            details["core_backtrace"] = bt
        return self.fail("crash", message, **details)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    # -- subprocesses ------------------------------------------------------------

    def client_cmd(self, *args: str) -> list[str]:
        return [self.a.client_python, str(CLIENT), *args]

    def run_client(self, seconds: float, *, may_stop: bool = False,
                   may_vanish: bool = False, during: Any = None) -> dict[str, Any]:
        d, cfg = self.daemon, self.config
        assert d is not None and cfg is not None
        seed = self.rng.randrange(1 << 30)
        report = self.rdir / "report.json"
        report.unlink(missing_ok=True)
        args = ["run", "--socket", d.sock, "--export", DISK, "--snapshot", SNAP,
                "--state", str(self.state), "--seconds", f"{seconds:.1f}", "--seed", str(seed),
                "--discard", cfg.discard, "--op-timeout", str(self.a.op_timeout),
                "--report", str(report)]
        if self.fresh:
            args.append("--fresh-snapshot")
        if may_stop:
            args.append("--daemon-may-stop")
        if may_vanish or may_stop:
            args.append("--snapshot-may-vanish")
        cmd = self.client_cmd(*args)
        self.note(f"client run {seconds:.1f}s seed={seed}"
                  f"{' fresh' if self.fresh else ''}{' may-stop' if may_stop else ''}"
                  f"{' may-vanish' if may_vanish else ''}")
        with open(self.rdir / "client.log", "ab") as logf:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logf,
                                    env=self.client_env)
        try:
            if during is not None:
                during(proc, seconds)
            limit = seconds + 3 * self.a.op_timeout + 60
            try:
                proc.wait(limit)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise self.fail("hang", f"soak client still running {limit:.0f}s after start",
                                backtrace=d, client_cmd=shlex.join(cmd)) from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.fresh = False
        try:
            rep: dict[str, Any] = json.loads(report.read_text())
        except (OSError, ValueError):
            rep = {}
        for k, v in rep.get("ops", {}).items():
            self.stats[k] = self.stats.get(k, 0) + v
        if not may_stop:
            self.check_alive("a client run")
        if proc.returncode not in (0, 1, 3) or not rep:
            raise self.fail("error", f"soak client exited {proc.returncode} without a report",
                            client_cmd=shlex.join(cmd),
                            client_log=str(self.rdir / "client.log"))
        details = {"client_cmd": shlex.join(cmd), "report": rep}
        if rep.get("hangs"):
            alive = d.alive()
            raise self.fail("hang", f"client: {rep['hangs'][0]}",
                            backtrace=d if alive else None, **details)
        if rep.get("wrong_bytes"):
            raise self.fail("wrong", f"{rep['wrong_bytes']} wrong bytes: {rep['wrong'][0]}",
                            **details)
        if rep.get("errors"):
            raise self.fail("error", f"client: {rep['errors'][0]}", **details)
        return rep

    def spawn_abandon(self, export: str, style: str, count: int | None = None,
                      big: float = 0.3) -> subprocess.Popen[bytes]:
        d = self.daemon
        assert d is not None
        seed = self.rng.randrange(1 << 30)
        n = count if count is not None else self.rng.randint(8, 96)
        cmd = self.client_cmd("abandon", "--socket", d.sock, "--export", export,
                              "--count", str(n), "--seed", str(seed), "--style", style,
                              "--stall", "120", "--big", str(big))
        self.note(f"abandon client on {export}: {n} reads, style {style}, seed {seed}")
        with open(self.rdir / "client.log", "ab") as logf:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf,
                                 env=self.client_env)
        self.clients.append(p)
        return p

    def wait_pipelined(self, p: subprocess.Popen[bytes], timeout: float = 30) -> None:
        """Until the abandon client says its reads are in flight (or it died)."""
        assert p.stdout is not None
        ready: list[bytes] = []
        t = threading.Thread(target=lambda: ready.append(p.stdout.readline()),  # type: ignore
                             daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            p.kill()
            raise self.fail("hang", f"abandon client did not get its reads out in {timeout}s",
                            backtrace=self.daemon)

    def reap_clients(self) -> None:
        for p in self.clients:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.clients.clear()

    # -- control -----------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 30) -> str:
        d = self.daemon
        assert d is not None
        cmd = [*self.fleeced, *args, "--control", d.control]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                 env=dict(os.environ, **self.daemon_env))
        except subprocess.TimeoutExpired:
            raise self.fail("hang", f"`{shlex.join(args)}` did not return in {timeout}s",
                            backtrace=d) from None
        if res.returncode != 0:
            self.check_alive(shlex.join(args))
            raise self.fail("error", f"`{shlex.join(args)}` -> {res.returncode}: "
                                     f"{res.stderr.strip()[-500:]}")
        return res.stdout

    def qmp(self, timeout: float = 30) -> Qmp:
        d = self.daemon
        assert d is not None
        try:
            return Qmp(d.control, timeout)
        except TimeoutError:
            raise self.fail("hang", "control socket: no greeting", backtrace=d) from None

    def qmp_exec(self, q: Qmp, cmd: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return q.execute(cmd, args)
        except TimeoutError:
            raise self.fail("hang", f"QMP {cmd} did not return in time",
                            backtrace=self.daemon) from None
        except (ConnectionError, OSError) as e:
            self.check_alive(f"QMP {cmd}")
            raise self.fail("error", f"QMP {cmd}: {e}") from None
        except RuntimeError as e:
            self.check_alive(f"QMP {cmd}")
            raise self.fail("error", str(e)) from None

    def fleece_stop_cli(self) -> None:
        t0 = time.monotonic()
        self.cli("fleece", "stop", DISK)
        self.note(f"fleece stop (CLI) took {time.monotonic() - t0:.2f}s")
        self.check_alive("fleece stop")

    def fleece_start_cli(self) -> None:
        assert self.config is not None
        self.cli("fleece", "start", DISK, *self.config.session_args())
        self.note("fleece start (CLI)")
        self.check_alive("fleece start")
        self.fresh = True

    def check_sessions(self) -> None:
        q = self.qmp()
        try:
            sessions = self.qmp_exec(q, "query-fleece")
        finally:
            q.close()
        for s in sessions or []:
            if s.get("state") != "active":
                raise self.fail("error", f"session {s.get('name')} is {s.get('state')} "
                                         f"({s.get('error')}) with no CBW failure provoked",
                                session=s)

    # -- daemon stop/start with the on-disk oracle -------------------------------

    def stop_daemon(self, why: str) -> None:
        d = self.daemon
        assert d is not None
        d.read_hwm()
        self.check_alive(f"before SIGTERM ({why})")
        rc, took = d.terminate(self.a.stop_timeout)
        if rc is None:
            raise self.fail("hang", f"daemon did not exit within {self.a.stop_timeout}s of "
                                    f"SIGTERM ({why})", backtrace=d, log_tail=d.log_tail())
        self.note(f"SIGTERM ({why}): {d.exit_desc()} after {took:.2f}s")
        if rc != 0:
            raise self.crashed(f"daemon {d.exit_desc()} after SIGTERM ({why})")

    def check_image_file(self, why: str) -> None:
        """With the daemon stopped, the image file must equal the model (minus unknowns)."""
        if str(BENCH_DIR) not in sys.path:
            sys.path.insert(0, str(BENCH_DIR))
        import soak_client

        st = soak_client.State.load(str(self.state))
        data = bytearray(self.image.read_bytes())
        for u0, u1 in st.unknown:
            data[u0:u1] = st.model[u0:u1]
        n, first = soak_client.count_diff(data, st.model)
        if n:
            raise self.fail("wrong", f"image file after {why}: {n} bytes differ from the "
                                     f"model, first at {first}",
                            unknown_ranges=len(st.unknown))
        self.note(f"image file == model after {why}"
                  + (f" ({len(st.unknown)} unknown ranges skipped)" if st.unknown else ""))

    def restart_daemon(self) -> None:
        d = self.daemon
        assert d is not None
        d.start()
        self.fresh = True
        self.note(f"daemon restarted (pid {d.pid})")

    def session(self) -> dict[str, Any]:
        assert self.config is not None
        return self.config.qmp_session()

    # -- actions -------------------------------------------------------------------

    def seg(self) -> float:
        return max(1.0, min(self.rng.uniform(2, self.a.segment), self.left()))

    def act_plain(self) -> None:
        self.run_client(self.seg())
        self.check_sessions()

    def act_abandon(self) -> None:
        def during(proc: subprocess.Popen[bytes], seconds: float) -> None:
            t_end = time.monotonic() + seconds * 0.8
            for _ in range(self.rng.randint(2, 5)):
                time.sleep(max(0.0, min(self.rng.uniform(0, seconds / 4),
                                        t_end - time.monotonic())))
                export = SNAP if self.rng.random() < 0.8 else DISK
                self.spawn_abandon(export, "random")
                if proc.poll() is not None:
                    break
        self.run_client(self.seg(), during=during)
        self.reap_clients()
        self.check_alive("abandoning clients")
        self.check_sessions()

    def act_abandon_stop(self) -> None:
        """Clients drop pipelined snapshot reads; fleece-stop right after (QMP)."""
        q = self.qmp()
        try:
            procs = [self.spawn_abandon(SNAP, self.rng.choice(
                ["exit", "rst", "halfclose", "disconnect"]))
                for _ in range(self.rng.randint(1, 4))]
            for p in procs:
                self.wait_pipelined(p)
            if self.rng.random() < 0.5:
                for p in procs:
                    p.wait(30)
                self.note("abandon clients gone")
            delay = self.rng.choice([0, 0, 0.01, 0.05, 0.1, 0.3])
            time.sleep(delay)  # where the connection teardown is when the stop comes
            if delay:
                self.note(f"waited {delay}s")
            t0 = time.monotonic()
            self.qmp_exec(q, "fleece-stop", {"disk": DISK, "name": "fleece"})
            self.note(f"fleece-stop (QMP) took {time.monotonic() - t0:.2f}s")
            self.reap_clients()
            self.check_alive("abandon + fleece-stop")
            self.qmp_exec(q, "fleece-start", self.session())
            self.note("fleece-start (QMP)")
            self.fresh = True
        finally:
            q.close()
        self.run_client(self.seg())

    def act_stall_stop(self) -> None:
        procs = [self.spawn_abandon(SNAP, "stall", count=self.rng.randint(16, 64))
                 for _ in range(self.rng.randint(1, 3))]
        for p in procs:
            self.wait_pipelined(p)
        time.sleep(0.3)  # let the daemon fill the socket buffers of the stalled readers
        self.fleece_stop_cli()
        self.reap_clients()
        self.fleece_start_cli()
        self.run_client(self.seg())

    def act_stall_reconnect(self) -> None:
        """Stalled readers of large replies, eight at a time, come and go
        while the guests run: nobody else's I/O may wait for them."""
        def during(proc: subprocess.Popen[bytes], seconds: float) -> None:
            t_end = time.monotonic() + seconds * 0.8
            while time.monotonic() < t_end and proc.poll() is None:
                batch = [self.spawn_abandon(self.rng.choice([SNAP, DISK]), "stall", count=64,
                                            big=1.0) for _ in range(8)]
                for p in batch:
                    self.wait_pipelined(p)
                time.sleep(max(0.0, min(self.rng.uniform(0.5, 2.0), t_end - time.monotonic())))
                for p in batch:  # they go; the next batch comes back for more
                    p.kill()
                    p.wait()
                self.note("stalled readers replaced")
        self.run_client(max(self.seg(), 3.0), during=during)
        self.reap_clients()
        self.check_alive("stalled readers that reconnect")
        self.check_sessions()

    def act_two_names(self) -> None:
        """The served image under other names must be refused; another
        image is welcome (and goes again)."""
        q = self.qmp()
        try:
            for kind in ("symlink", "hardlink"):
                alias = self.rdir / f"alias-{kind}.img"
                alias.unlink(missing_ok=True)
                if kind == "symlink":
                    alias.symlink_to(self.image)
                else:
                    os.link(self.image, alias)
                try:
                    q.execute("disk-add", {"name": f"alias-{kind}", "path": str(alias)})
                except RuntimeError as e:
                    if "already served as disk" not in str(e):
                        raise self.fail("error", f"disk-add of a {kind}: {e}") from None
                else:
                    raise self.fail("wrong", f"the served image was added again through a "
                                             f"{kind}: one source served as two disks")
                finally:
                    alias.unlink(missing_ok=True)
            other = self.rdir / "other.img"
            with open(other, "wb") as f:
                f.truncate(MiB)
            self.qmp_exec(q, "disk-add", {"name": "other", "path": str(other)})
            self.qmp_exec(q, "disk-remove", {"name": "other"})
            other.unlink()
            self.note("two names refused, another image added and removed")
        finally:
            q.close()
        self.check_alive("disk-add with two names")
        self.run_client(self.seg())

    def act_cycle(self) -> None:
        self.run_client(self.seg())
        self.fleece_stop_cli()
        self.fleece_start_cli()

    def act_stop_mid(self) -> None:
        q = self.qmp()
        try:
            def during(proc: subprocess.Popen[bytes], seconds: float) -> None:
                time.sleep(self.rng.uniform(0.3, 0.8) * seconds)
                if self.rng.random() < 0.5:
                    p = self.spawn_abandon(SNAP, self.rng.choice(["exit", "rst", "stall"]))
                    self.wait_pipelined(p)
                t0 = time.monotonic()
                self.qmp_exec(q, "fleece-stop", {"disk": DISK, "name": "fleece"})
                self.note(f"fleece-stop (QMP) during the run took {time.monotonic() - t0:.2f}s")
            self.run_client(max(self.seg(), 2.0), may_vanish=True, during=during)
            self.reap_clients()
            self.check_alive("fleece-stop under load")
            self.qmp_exec(q, "fleece-start", self.session())
            self.note("fleece-start (QMP)")
            self.fresh = True
        finally:
            q.close()

    def act_restart(self) -> None:
        self.run_client(self.seg())
        if self.rng.random() < 0.5:
            for _ in range(self.rng.randint(1, 3)):
                p = self.spawn_abandon(self.rng.choice([SNAP, DISK]), "stall")
                self.wait_pipelined(p)
            time.sleep(0.3)
        self.stop_daemon("between runs")
        self.reap_clients()
        self.check_image_file("SIGTERM")
        self.restart_daemon()

    def act_restart_mid(self) -> None:
        def during(proc: subprocess.Popen[bytes], seconds: float) -> None:
            time.sleep(self.rng.uniform(0.3, 0.8) * seconds)
            if self.rng.random() < 0.5:
                p = self.spawn_abandon(SNAP, "stall")
                self.wait_pipelined(p)
            self.stop_daemon("while guests write")
        self.run_client(max(self.seg(), 2.0), may_stop=True, during=during)
        self.reap_clients()
        self.check_image_file("SIGTERM under load")
        self.restart_daemon()

    ACTIONS = {"plain": 2, "abandon": 3, "abandon-stop": 3, "stall-stop": 1,
               "stall-reconnect": 2, "two-names": 1, "cycle": 2, "stop-mid": 2, "restart": 1,
               "restart-mid": 1}

    # -- rounds ----------------------------------------------------------------------

    def one_round(self, config: Config) -> None:
        self.round += 1
        self.config = config
        self.actions = []
        self.t_round = time.monotonic()
        self.rdir = self.work / f"round-{self.round:03d}"
        self.rdir.mkdir(parents=True, exist_ok=True)
        self.image = self.rdir / "disk.img"
        self.state = self.rdir / "state"
        seed = self.rng.randrange(1 << 30)
        log(f"round {self.round}: {config.label}, image seed {seed}")
        subprocess.run(self.client_cmd("mkimage", str(self.image), "--state", str(self.state),
                                       "--size", str(IMAGE_SIZE), "--seed", str(seed),
                                       "--cluster-size", config.cluster),
                       check=True, timeout=120, env=self.client_env)
        self.fresh = True
        self.daemon = Daemon(self, self.rdir, self.image, config)
        info: dict[str, Any] = {"round": self.round, "config": config.label,
                                "image_seed": seed, "dir": str(self.rdir)}
        self.rounds.append(info)
        findings_before = len(self.findings)
        names = list(self.ACTIONS)
        weights = [self.ACTIONS[n] for n in names if n in self.enabled]
        names = [n for n in names if n in self.enabled]
        t_end = min(self.deadline, time.monotonic() + self.rng.uniform(*self.a.round_seconds))
        try:
            self.daemon.start()
            self.note(f"daemon started (pid {self.daemon.pid})")
            while time.monotonic() < t_end - 1:
                action = self.rng.choices(names, weights)[0]
                self.note(f"== {action}")
                getattr(self, "act_" + action.replace("-", "_"))()
            self.stop_daemon("end of round")
            self.check_image_file("the final stop")
        except RoundOver:
            pass
        except Exception as e:  # noqa: BLE001 - a harness bug must not lose the report
            self.fail("error", f"harness: {type(e).__name__}: {e}")
        finally:
            d = self.daemon
            if d.alive() and len(self.findings) > findings_before and not d.termed:
                # After a finding, does SIGTERM still stop it (clients left as they were)?
                first = self.findings[findings_before].message
                rc, took = d.terminate(self.a.stop_timeout)
                if rc is None:
                    self.fail("hang", f"SIGTERM did not stop the daemon within "
                                      f"{self.a.stop_timeout}s (after: {first})",
                              backtrace=d)
                elif rc != 0:
                    self.fail("crash", f"daemon {d.exit_desc()} after SIGTERM (after: {first})",
                              log_tail=d.log_tail())
                else:
                    self.note(f"SIGTERM after the finding: exit 0 in {took:.2f}s")
            self.reap_clients()
            if d.alive():
                d.kill()
            text = d.log_path.read_text(errors="replace") if d.log_path.exists() else ""
            for pat in LOG_PATTERNS:
                if pat in text:
                    kind = "crash" if "Sanitizer" in pat or "runtime error" in pat else "warning"
                    self.fail(kind, f"daemon log contains {pat!r}", daemon_log=str(d.log_path))
                    break
            tracebacks = text.count("Traceback (most recent call last)")
            if tracebacks:
                self.fail("warning", f"daemon log has {tracebacks} Python traceback(s)",
                          daemon_log=str(d.log_path))
            info.update(peak_vmhwm_mib=round(d.peak_hwm / MiB, 1),
                        peak_vmrss_mib=round(d.peak_rss / MiB, 1), daemon_starts=d.starts,
                        seconds=round(time.monotonic() - self.t_round, 1),
                        findings=len(self.findings) - findings_before,
                        actions=list(self.actions))
            mine = self.findings[findings_before:]
            if not self.a.keep and not any(f.kind in FAIL_KINDS for f in mine):
                if mine:  # warnings only: keep the logs, drop the images
                    for path in (self.image, *self.rdir.glob("core*")):
                        path.unlink(missing_ok=True)
                    shutil.rmtree(self.state, ignore_errors=True)
                else:
                    shutil.rmtree(self.rdir, ignore_errors=True)
            log(f"round {self.round} done: {info['findings']} finding(s), peak VmHWM "
                f"{info['peak_vmhwm_mib']} MiB")

    def setup_asan(self) -> None:
        """Sanitizer build of the native module (unless given) + its runtime preloaded."""
        if "PYTHONPATH" not in self.daemon_env:
            build = self.work / "asan-build"
            if not (build / "daemon" / "fleeced").exists():
                log(f"building the module with FLEECED_SANITIZE=1 in {build}")
                build.mkdir(parents=True, exist_ok=True)
                for name in ("daemon", "native"):
                    shutil.copytree(REPO_DIR / name, build / name, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("*.so", "*.o", "build",
                                                                  "__pycache__", "*.egg-info"))
                for name in ("setup.py", "pyproject.toml", "README.md"):
                    shutil.copy2(REPO_DIR / name, build / name)
                res = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                                     cwd=build, capture_output=True, text=True, timeout=600,
                                     env=dict(os.environ, FLEECED_SANITIZE="1"))
                if res.returncode != 0:
                    raise SystemExit(f"ASan build failed:\n{res.stdout}\n{res.stderr}")
            self.daemon_env["PYTHONPATH"] = str(build / "daemon")
        libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                                 text=True).stdout.strip()
        if not os.path.isabs(libasan):
            raise SystemExit("--asan: gcc cannot find libasan.so")
        self.daemon_env.setdefault("LD_PRELOAD", libasan)
        self.daemon_env.setdefault("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1")
        self.daemon_env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")

    def run(self) -> int:
        a = self.a
        self.enabled = set(a.actions.split(",")) if a.actions else set(self.ACTIONS)
        unknown = self.enabled - set(self.ACTIONS)
        if unknown:
            raise SystemExit(f"unknown actions {sorted(unknown)}; known: {list(self.ACTIONS)}")
        self.work = Path(a.work_dir) if a.work_dir else Path(
            tempfile.mkdtemp(prefix="fleeced-soak-", dir="/var/tmp"))
        self.work.mkdir(parents=True, exist_ok=True)
        if a.asan:
            self.setup_asan()
        log(f"work dir {self.work}; {len(self.configs)} configuration(s); seed {a.seed}")
        if self.daemon_env:
            log(f"daemon env: {self.daemon_env}")
        t0 = time.monotonic()
        order: list[Config] = []

        def interrupted(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupted)
        try:
            while self.left() > 5:
                if not order:
                    order = list(self.configs)
                    self.rng.shuffle(order)
                self.one_round(order.pop())
        except KeyboardInterrupt:  # the round's cleanup ran; report what we have
            log("interrupted")
            self.interrupted = True
        return self.summary(time.monotonic() - t0)

    def summary(self, took: float) -> int:
        count = {k: sum(1 for f in self.findings if f.kind == k)
                 for k in (*FAIL_KINDS, "warning")}
        peak = max(self.rounds, key=lambda r: r.get("peak_vmhwm_mib", 0), default={})
        out = {"seconds": round(took, 1), "seed": self.a.seed, "work_dir": str(self.work),
               "rounds": self.rounds, "findings": [f.__dict__ for f in self.findings],
               "counts": count, "ops": self.stats,
               "peak_vmhwm_mib": peak.get("peak_vmhwm_mib"), "peak_config": peak.get("config"),
               "daemon_cmd": shlex.join(self.fleeced), "daemon_env": self.daemon_env}
        path = Path(self.a.json) if self.a.json else self.work / "summary.json"
        path.write_text(json.dumps(out, indent=2) + "\n")
        out["interrupted"] = self.interrupted
        actions: dict[str, int] = {}
        for r in self.rounds:
            for line in r.get("actions", []):
                m = re.fullmatch(r"\+\s*[\d.]+s == (\S+)", line)
                if m:
                    actions[m.group(1)] = actions.get(m.group(1), 0) + 1
        out["actions"] = actions
        print(f"fleeced soak: {len(self.rounds)} rounds in {took:.0f}s, seed {self.a.seed}"
              + (" (interrupted)" if self.interrupted else ""))
        print(f"  ops: {sum(self.stats.values())} "
              f"({', '.join(f'{k} {v}' for k, v in sorted(self.stats.items()))})")
        print(f"  actions: {', '.join(f'{k} {v}' for k, v in sorted(actions.items()))}")
        print(f"  crashes {count['crash']}, hangs {count['hang']}, wrong-byte findings "
              f"{count['wrong']}, errors {count['error']}, warnings {count['warning']}")
        print(f"  peak daemon RSS (VmHWM): {peak.get('peak_vmhwm_mib')} MiB "
              f"({peak.get('config')})")
        for f in self.findings:
            print(f"  - round {f.round} [{f.config}] {f.kind.upper()}: {f.message}")
            for key in ("daemon_log", "backtrace", "core_backtrace"):
                if key in f.details:
                    print(f"      {key}: {f.details[key]}")
            if f.kind in FAIL_KINDS:
                print("      actions: " + " | ".join(f.details.get("actions", [])[-6:]))
        print(f"  details: {path}")
        failed = any(count[k] for k in FAIL_KINDS)
        if not self.findings and not self.a.keep and not self.a.work_dir:
            shutil.rmtree(self.work, ignore_errors=True)
        return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="actions: " + ", ".join(Soak.ACTIONS))
    p.add_argument("--minutes", type=float, default=10, help="run time (default 10)")
    p.add_argument("--seconds", type=float, default=0, help="run time in seconds instead")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    p.add_argument("--work-dir", help="keep rounds here (default: a new /var/tmp/fleeced-soak-*)")
    p.add_argument("--keep", action="store_true", help="keep passing rounds' files too")
    p.add_argument("--json", help="summary JSON path (default WORK_DIR/summary.json)")
    p.add_argument("--fleeced", help="daemon command (default: this python -m fleeced)")
    p.add_argument("--daemon-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the daemon only (LD_PRELOAD, ASAN_OPTIONS, "
                        "PYTHONPATH of another build, ...); repeatable")
    p.add_argument("--module-path", metavar="DIR",
                   help="run the daemon (and the CLI) with PYTHONPATH=DIR: another build of "
                        "the fleeced package (e.g. `setup.py build_ext --inplace` in a copy)")
    p.add_argument("--asan", action="store_true",
                   help="run the daemon under ASan/UBSan: build the module from this tree "
                        "with FLEECED_SANITIZE=1 into WORK_DIR/asan-build (unless "
                        "--module-path names one) and preload libasan; sanitizer reports in "
                        "the daemon log count as crashes")
    p.add_argument("--no-core-dumps", dest="core_dumps", action="store_false",
                   help="do not lift RLIMIT_CORE for the daemon (cores land in the round dir "
                        "when core_pattern is a plain file name; gdb backtraces them)")
    p.add_argument("--client-python", default=SYSTEM_PYTHON,
                   help="python with libnbd bindings (default /usr/bin/python3)")
    p.add_argument("--configs", default="",
                   help="comma-separated filter: 4K,64K,1M,cache,nocache,break-snapshot,"
                        "break-guest-write,ignore,unmap (default: the whole matrix)")
    p.add_argument("--actions", default="", help="comma-separated subset of the actions")
    p.add_argument("--segment", type=float, default=12, help="longest client run, seconds")
    p.add_argument("--round-seconds", type=float, nargs=2, default=(40, 120),
                   metavar=("MIN", "MAX"))
    p.add_argument("--op-timeout", type=float, default=30,
                   help="per NBD call (and per control command) timeout, seconds")
    p.add_argument("--stop-timeout", type=float, default=15,
                   help="SIGTERM to exit bound, seconds")
    a = p.parse_args(argv)
    if not CLIENT.exists() or subprocess.run([a.client_python, "-c", "import nbd"],
                                             capture_output=True).returncode != 0:
        print(f"soak: {a.client_python} cannot import nbd (Debian python3-libnbd)",
              file=sys.stderr)
        return 2
    return Soak(a).run()


if __name__ == "__main__":
    sys.exit(main())
