#!/usr/bin/env python3
"""Benchmark the path an attached guest takes: QEMU's own NBD client against
fleeced, qemu-nbd and qemu-storage-daemon, and the guest-visible pause of
``vm-attach`` / ``vm-detach``.

Part 1 (throughput).  ``qemu-img bench`` (QEMU's block layer and NBD client,
the code a VM runs after ``fleeced attach``) over ``nbd+unix://`` against each
server serving the same page-cached raw image, and against the file itself as
the floor.  All three servers run side by side for a round (the image is
opened with ``locking=off`` so they can), and each case runs every target
back to back in an order that rotates between rounds, so drift on a noisy
2-core machine hits every target alike.  Medians over rounds; ratios
fleeced/peer and target/file.

Part 2 (pause).  A real ``qemu-system-x86_64`` (as in
tests/integration/qemu_vm.py) with a virtio-blk disk on the same image, a
fleeced daemon serving it with a control socket, and a thread issuing guest
writes back to back through HMP ``qemu-io -d vda/virtio-backend`` on the VM's
second QMP socket.  Meanwhile ``vm-attach`` / ``vm-detach`` cycles run through
the daemon's control socket.  The pause of one switch is the longest write
call that overlaps it.

    .venv/bin/python bench/attach_bench.py                  # 1 GiB, 3 rounds, 10 cycles
    .venv/bin/python bench/attach_bench.py --quick          # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import benchlib as bl

TARGETS = ("fleeced", "qemu-nbd", "qsd", "file")
SERVERS = ("fleeced", "qemu-nbd", "qsd")
EXPORT = "disk"
K4 = 4096
M1 = 1 << 20

# name, label, write?, buffer size, depth, random-ish stride?, requests (full run)
CASES: tuple[tuple[str, str, bool, int, int, bool, int], ...] = (
    ("randwrite-qd16", "4k randwrite QD16 IOPS", True, K4, 16, True, 60_000),
    ("randread-qd16", "4k randread QD16 IOPS", False, K4, 16, True, 60_000),
    ("randwrite-qd1", "4k randwrite QD1 IOPS", True, K4, 1, True, 20_000),
    ("randread-qd1", "4k randread QD1 IOPS", False, K4, 1, True, 20_000),
    ("seqwrite-1m", "1M seq write QD16 MB/s", True, M1, 16, False, 2048),
    ("seqread-1m", "1M seq read QD16 MB/s", False, M1, 16, False, 2048),
)


# -- part 1: qemu-img bench ----------------------------------------------------


def stride(size: int, bufsize: int) -> int:
    """qemu-img bench 7.2 has no random mode: offsets go ``o += step; o %= size``.

    An odd number of blocks near size/golden-ratio is coprime with a
    power-of-two block count, so the run visits every block once per pass in a
    scattered (Weyl-sequence) order: consecutive requests land ~60 % of the
    image apart, aligned, never past EOF.  It defeats request merging and
    locality the way random I/O does, but it is deterministic and evenly spread
    (no repeats within a pass), unlike fio's ``randrepeat=0``.
    """
    blocks = size // bufsize
    step = int(blocks * 0.6180339887) | 1
    while _gcd(step, blocks) != 1:
        step += 2
    return step * bufsize


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def file_opts(image: Path) -> str:
    """raw over file, writeback page cache, thread pool, no OFD locks (so the
    three servers can hold the image open together; only one is ever busy)."""
    return (f"driver=raw,file.driver=file,file.filename={image},file.aio=threads,"
            "file.locking=off,cache.direct=off")


def server_command(name: str, image: Path, sock: Path, fleeced: list[str]) -> list[str]:
    if name == "fleeced":
        return [*fleeced, "serve", str(image), "-k", str(sock), "-x", EXPORT, "-t",
                "--no-control"]
    if name == "qemu-nbd":
        # qemu-nbd's own defaults (--cache=writeback --aio=threads), spelled out;
        # -e 8 as in serve_bench.py (QEMU's client uses one connection anyway).
        return ["qemu-nbd", "--image-opts", file_opts(image), "-k", str(sock), "-x", EXPORT,
                "-t", "-e", "8", "--cache=writeback", "--aio=threads"]
    if name == "qsd":
        return ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file0,filename={image},aio=threads,"
                              "locking=off,cache.direct=off",
                "--blockdev", "driver=raw,node-name=fmt0,file=file0",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", f"type=nbd,id=e0,node-name=fmt0,name={EXPORT},writable=on"]
    raise ValueError(name)


def bench_command(target: str, image: Path, socks: dict[str, Path], *, write: bool,
                  bufsize: int, depth: int, count: int, step: int) -> list[str]:
    cmd = ["qemu-img", "bench", "-c", str(count), "-d", str(depth), "-s", str(bufsize),
           "-S", str(step), "-t", "writeback", "-i", "threads"]
    if write:
        cmd += ["-w", "--pattern=0x5a"]
    if target == "file":
        return [*cmd, "--image-opts", file_opts(image)]
    return [*cmd, "-f", "raw", bl.nbd_uri(socks[target], EXPORT)]


_COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")


def run_case(cmd: list[str], *, count: int, bufsize: int, timeout: float) -> dict[str, float]:
    t0 = time.monotonic()
    proc = bl.run(cmd, timeout=timeout)
    wall = time.monotonic() - t0
    m = _COMPLETED.search(proc.stdout)
    if not m:
        raise bl.BenchError(f"no 'Run completed' in qemu-img bench output: {proc.stdout!r}")
    secs = float(m.group(1))
    return {"seconds": secs, "wall_s": wall, "iops": count / secs,
            "mb_s": count * bufsize / secs / bl.MB}


def throughput(args: argparse.Namespace, image: Path, work: Path
               ) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    socks = {s: work / f"attach-{s}.sock" for s in SERVERS}
    commands = {s: server_command(s, image, socks[s], args.fleeced) for s in SERVERS}
    samples: dict[str, dict[str, list[dict[str, float]]]] = {
        t: {c[0]: [] for c in CASES} for t in TARGETS}
    bench_cmds: dict[str, str] = {}
    scale = 10 if args.quick else 1
    for rnd in range(args.rounds):
        order = list(TARGETS[rnd % len(TARGETS):] + TARGETS[:rnd % len(TARGETS)])
        bl.log(f"round {rnd + 1}/{args.rounds}: {' '.join(order)}")
        servers = [bl.Server(s, commands[s], socks[s], work / f"attach-{s}.log")
                   for s in SERVERS]
        try:
            for srv in servers:
                srv.start()
            cpu = {srv.name: srv for srv in servers}
            for case, _label, write, bufsize, depth, scattered, count in CASES:
                count = max(count // scale, depth)
                step = stride(args.size, bufsize) if scattered else bufsize
                for target in order:
                    cmd = bench_command(target, image, socks, write=write, bufsize=bufsize,
                                        depth=depth, count=count, step=step)
                    bench_cmds.setdefault(f"{target} {case}", shlex.join(cmd))
                    busy = cpu.get(target)
                    cpu0 = busy.cpu_seconds() if busy else 0.0
                    res = run_case(cmd, count=count, bufsize=bufsize, timeout=args.timeout)
                    if busy:
                        busy.check_alive()
                        res["cpu_us_per_io"] = (busy.cpu_seconds() - cpu0) * 1e6 / count
                    samples[target][case].append(res)
                    if write:
                        bl.sync(timeout=args.timeout)  # dirty pages out, untimed
                    shown = "MB/s" if bufsize == M1 else "IOPS"
                    value = res["mb_s"] if bufsize == M1 else res["iops"]
                    bl.log(f"  {case:15} {target:9} {value:10.0f} {shown}")
        finally:
            for srv in servers:
                srv.stop()
    medians = {t: {c: {k: bl.median([r[k] for r in rows]) for k in rows[0]}
                   for c, rows in per.items() if rows}
               for t, per in samples.items()}
    return ({"samples": samples, "medians": medians},
            [shlex.join(commands[s]) for s in SERVERS], bench_cmds)


def throughput_table(medians: dict[str, Any]) -> tuple[str, list[str], dict[str, Any]]:
    def val(t: str, case: str, field: str) -> float | None:
        v = medians.get(t, {}).get(case, {}).get(field)
        return None if v is None else float(v)

    header = ["case", *TARGETS, "fleeced/qemu-nbd", "fleeced/qsd", "fleeced/file",
              "qemu-nbd/file", "qsd/file"]
    rows = []
    ratios: dict[str, dict[str, float | None]] = {}
    targets = []
    for case, label, _w, bufsize, *_ in CASES:
        field = "mb_s" if bufsize == M1 else "iops"
        r = {f"{a}/{b}": bl.ratio(val(a, case, field), val(b, case, field))
             for a, b in (("fleeced", "qemu-nbd"), ("fleeced", "qsd"), ("fleeced", "file"),
                          ("qemu-nbd", "file"), ("qsd", "file"))}
        ratios[case] = r
        rows.append([label, *(bl.fmt(val(t, case, field)) for t in TARGETS),
                     *(bl.fmt_ratio(v) for v in r.values())])
        q = r["fleeced/qemu-nbd"]
        if q is not None:
            targets.append(f"target {case} >= 1.0x qemu-nbd: {q:.2f}x "
                           f"{'met' if q >= 1.0 else 'missed'}")
    cpu_rows = []
    for case, label, _w, bufsize, *_ in CASES:
        if bufsize != K4 or "qd16" not in case:
            continue
        cpu_rows.append([f"server CPU µs/IO, {label.split(' IOPS')[0]}",
                         *(bl.fmt(val(t, case, "cpu_us_per_io")) for t in SERVERS),
                         "—", bl.fmt_ratio(bl.ratio(val("fleeced", case, "cpu_us_per_io"),
                                                    val("qemu-nbd", case, "cpu_us_per_io"))),
                         bl.fmt_ratio(bl.ratio(val("fleeced", case, "cpu_us_per_io"),
                                               val("qsd", case, "cpu_us_per_io"))),
                         "—", "—", "—"])
    return bl.markdown_table(header, rows + cpu_rows), targets, ratios


# -- part 2: attach / detach pause -------------------------------------------


class Qmp:
    """A minimal synchronous QMP client (stdlib only): QEMU's monitor and
    fleeced's control socket speak the same line-framed JSON."""

    def __init__(self, path: str, timeout: float = 120.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise bl.BenchError(f"{path}: not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise bl.BenchError("QMP peer closed the connection")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise bl.BenchError(f"{cmd}: {reply['error'].get('desc')}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Writer(threading.Thread):
    """Back-to-back 4k guest writes through HMP qemu-io; (start, end) per call."""

    def __init__(self, qmp_path: str, size: int) -> None:
        super().__init__(name="hmp-writer", daemon=True)
        self.qmp = Qmp(qmp_path)
        self.size = size
        self.calls: list[tuple[float, float]] = []
        self.stop_event = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        blocks = self.size // K4
        i = 0
        try:
            while not self.stop_event.is_set():
                off = (i * 7919 % blocks) * K4
                line = f'qemu-io -d vda/virtio-backend "write -P 0x5a {off} 4k"'
                t0 = time.monotonic()
                out = self.qmp.execute("human-monitor-command", {"command-line": line})
                t1 = time.monotonic()
                if out:
                    raise bl.BenchError(f"HMP qemu-io failed: {out.strip()}")
                self.calls.append((t0, t1))
                i += 1
        except Exception as exc:  # reported by the main thread
            self.error = str(exc)
        finally:
            self.qmp.close()


def start_vm(image: Path, work: Path) -> tuple[subprocess.Popen[bytes], str, str, Path]:
    """The VM of tests/integration/qemu_vm.py: paused (no guest OS), two QMP sockets."""
    qmp, tqmp = str(work / "attach-vm-qmp.sock"), str(work / "attach-vm-tqmp.sock")
    log_path = work / "attach-vm-qemu.log"
    for p in (qmp, tqmp):
        Path(p).unlink(missing_ok=True)
    cmd = ["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none",
           "-machine", "pc,accel=tcg", "-m", "64",
           "-blockdev", f"driver=file,node-name=disk0-file,filename={image}",
           "-blockdev", "driver=raw,node-name=disk0,file=disk0-file",
           "-device", "virtio-blk-pci,id=vda,drive=disk0",
           "-qmp", f"unix:{qmp},server=on,wait=off",
           "-qmp", f"unix:{tqmp},server=on,wait=off"]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (Path(qmp).exists() and Path(tqmp).exists()):
        if proc.poll() is not None:
            raise bl.BenchError(f"QEMU exited: {log_path.read_text(errors='replace')[-500:]}")
        if time.monotonic() > deadline:
            raise bl.BenchError("QEMU did not create its QMP sockets")
        time.sleep(0.02)
    return proc, qmp, tqmp, log_path


def longest_overlap(calls: list[tuple[float, float]], t0: float, t1: float) -> float:
    """Longest write call whose interval overlaps [t0, t1] (seconds)."""
    return max((e - s for s, e in calls if s < t1 and e > t0), default=0.0)


def latencies_within(calls: list[tuple[float, float]], spans: list[tuple[float, float]]
                     ) -> list[float]:
    return [e - s for s, e in calls if any(a <= s and e <= b for a, b in spans)]


def pause(args: argparse.Namespace, image: Path, work: Path) -> dict[str, Any]:
    cycles = 3 if args.quick else args.cycles
    sock, ctl = work / "attach-pause.sock", work / "attach-pause-ctl.sock"
    ctl.unlink(missing_ok=True)
    daemon_cmd = [*args.fleeced, "serve", str(image), "-k", str(sock), "-x", EXPORT, "-t",
                  "--control", str(ctl)]
    daemon = bl.Server("fleeced", daemon_cmd, sock, work / "attach-pause-fleeced.log")
    vm: subprocess.Popen[bytes] | None = None
    writer: Writer | None = None
    ctl_qmp: Qmp | None = None
    events: list[dict[str, Any]] = []
    try:
        daemon.start()
        vm, vm_qmp, vm_tqmp, vm_log = start_vm(image, work)
        ctl_qmp = Qmp(str(ctl))
        writer = Writer(vm_tqmp, args.size)
        writer.start()
        bl.log(f"pause: baseline {args.hold * 2:g} s of HMP writes, then {cycles} "
               "attach/detach cycles")
        base0 = time.monotonic()
        time.sleep(args.hold * 2)
        base1 = time.monotonic()
        detached = [(base0, base1)]
        attached: list[tuple[float, float]] = []

        def stats() -> int:
            assert ctl_qmp is not None
            exports = ctl_qmp.execute("query-stats")["exports"]
            return int(next(e for e in exports if e["name"] == EXPORT)["bytes-written"])

        for n in range(cycles):
            for op in ("attach", "detach"):
                if writer.error:
                    raise bl.BenchError(writer.error)
                t0 = time.monotonic()
                if op == "attach":
                    ctl_qmp.execute("vm-attach", {"disk": EXPORT, "qmp": vm_qmp,
                                                  "device": "vda"})
                else:
                    ctl_qmp.execute("vm-detach", {"disk": EXPORT})
                t1 = time.monotonic()
                written = stats()
                time.sleep(args.hold)
                t2 = time.monotonic()
                moved = stats() - written
                (attached if op == "attach" else detached).append((t1, t2))
                events.append({"cycle": n, "op": op, "t0": t0, "t1": t1, "t2": t2,
                               "daemon_bytes_written_while_held": moved})
                bl.log(f"  cycle {n + 1} {op:6} command {1e3 * (t1 - t0):6.1f} ms, "
                       f"longest write {1e3 * longest_overlap(writer.calls, t0, t1):6.1f} ms")
                # Sanity: writes go through the daemon exactly while attached.
                if (op == "attach") != (moved > 0):
                    raise bl.BenchError(f"cycle {n + 1} {op}: daemon saw {moved} bytes "
                                        "written while held; the switch did not take")
        writer.stop_event.set()
        writer.join(30)
        if writer.error:
            raise bl.BenchError(writer.error)
        calls = writer.calls
        wrote = vm_log.read_text(errors="replace").count("wrote 4096/4096 bytes")
        if wrote < len(calls):
            raise bl.BenchError(f"QEMU logged {wrote} completed writes for {len(calls)} calls")
    finally:
        if writer is not None:
            writer.stop_event.set()
            writer.join(30)
        if ctl_qmp is not None:
            ctl_qmp.close()
        if vm is not None and vm.poll() is None:
            vm.kill()
            vm.wait()
        daemon.stop()

    base_direct = latencies_within(calls, detached)
    base_nbd = latencies_within(calls, attached)
    out: dict[str, Any] = {"cycles": cycles, "hold_s": args.hold, "writes": len(calls),
                           "daemon": shlex.join(daemon_cmd), "events": events}
    for op in ("attach", "detach"):
        evs = [e for e in events if e["op"] == op]
        pauses = [longest_overlap(calls, e["t0"], e["t1"]) * 1e3 for e in evs]
        cmd_ms = [(e["t1"] - e["t0"]) * 1e3 for e in evs]
        out[op] = {"pause_ms": pauses, "command_ms": cmd_ms,
                   "pause_median_ms": bl.median(pauses), "pause_max_ms": max(pauses),
                   "command_median_ms": bl.median(cmd_ms), "command_max_ms": max(cmd_ms)}
    for key, lat in (("baseline_direct", base_direct), ("baseline_fleeced", base_nbd)):
        ms = sorted(x * 1e3 for x in lat)
        out[key] = {"n": len(ms), "median_ms": bl.median(ms),
                    "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))] if ms else None,
                    "max_ms": ms[-1] if ms else None}
    return out


def pause_table(p: dict[str, Any]) -> str:
    rows = []
    for op in ("attach", "detach"):
        o = p[op]
        rows.append([f"{op}: guest-visible pause (longest write call)",
                     bl.fmt(o["pause_median_ms"]), bl.fmt(o["pause_max_ms"])])
        rows.append([f"{op}: control command (vm-{op}) wall time",
                     bl.fmt(o["command_median_ms"]), bl.fmt(o["command_max_ms"])])
    for key, label in (("baseline_direct", "no switch, VM on its own node"),
                       ("baseline_fleeced", "no switch, VM attached to fleeced")):
        b = p[key]
        rows.append([f"write call, {label} (n={b['n']}, p99 {bl.fmt(b['p99_ms'])})",
                     bl.fmt(b["median_ms"]), bl.fmt(b["max_ms"])])
    return bl.markdown_table(["ms", "median", "max"], rows)


# -- main --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=bl.parse_size, default=None,
                   help="image size (default 1G; --quick: 64M)")
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds (default 3)")
    p.add_argument("--cycles", type=int, default=10,
                   help="attach/detach cycles for the pause (default 10; --quick: 3)")
    p.add_argument("--hold", type=float, default=1.0,
                   help="seconds attached / detached between switches (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, 1/10 of the requests, 64M, 3 cycles")
    p.add_argument("--skip", choices=("throughput", "pause"), default=None,
                   help="leave one part out")
    p.add_argument("--fleeced", type=shlex.split, default=bl.default_fleeced_cmd(),
                   metavar="CMD", help="how to run fleeced (default: this python -m fleeced)")
    p.add_argument("--work-dir", type=Path, default=bl.DEFAULT_WORK_DIR,
                   help=f"image, sockets, logs (default {bl.DEFAULT_WORK_DIR})")
    p.add_argument("--out", type=Path, default=bl.RESULTS_DIR,
                   help="where attach-<date>.json and .md go (default bench/results)")
    p.add_argument("--timeout", type=float, default=600,
                   help="per-command timeout in seconds (default 600)")
    args = p.parse_args(argv)
    if args.size is None:
        args.size = (64 << 20) if args.quick else (1 << 30)
    if args.quick:
        args.rounds = 1
    if args.size % M1:
        p.error("--size must be a multiple of 1M")
    try:
        return bench(args, argv)
    except bl.BenchError as exc:
        print(f"attach_bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def tool_line(cmd: list[str]) -> str:
    try:
        return bl.run(cmd, timeout=10, check=False).stdout.strip().splitlines()[0]
    except (bl.BenchError, IndexError):
        return "?"


def bench(args: argparse.Namespace, argv: list[str] | None) -> int:
    bl.require_tools(["qemu-img", "qemu-nbd", "qemu-storage-daemon", "qemu-system-x86_64",
                      "sync"])
    fleeced_version = bl.run([*args.fleeced, "--version"], timeout=30).stdout.strip()
    loadavg = os.getloadavg()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    image = bl.ensure_random_image(work / f"attach-{bl.human_size(args.size)}.img", args.size)
    bl.warm_page_cache(image)
    t_start = time.monotonic()

    tp: dict[str, Any] | None = None
    server_cmds: list[str] = []
    bench_cmds: dict[str, str] = {}
    if args.skip != "throughput":
        tp, server_cmds, bench_cmds = throughput(args, image, work)
    pz = pause(args, image, work) if args.skip != "pause" else None
    elapsed = time.monotonic() - t_start

    command = "python3 bench/attach_bench.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    md = [f"## fleeced attach benchmark — {_dt.date.today().isoformat()}", "",
          f"`{command.strip()}`", "",
          f"Image {bl.human_size(args.size)} raw (random data, page-cached); "
          f"{os.cpu_count()} CPUs; load average at start {loadavg[0]:.2f}; {elapsed:.0f} s; "
          f"{fleeced_version}, {tool_line(['qemu-img', '--version'])}.", ""]
    targets: list[str] = []
    ratios: dict[str, Any] = {}
    if tp is not None:
        table, targets, ratios = throughput_table(tp["medians"])
        md += [f"### qemu-img bench over nbd+unix ({args.rounds} round(s), medians)", "",
               table, "", *(f"- {t}" for t in targets), "",
               "Servers (all three up together, image opened without locks):", "",
               *(f"    {c}" for c in server_cmds), "",
               "Client: `qemu-img bench -c N -d DEPTH -s SIZE -S STEP -t writeback "
               "-i threads [-w --pattern=0x5a] -f raw nbd+unix:///disk?socket=SOCK` "
               "(`--image-opts` on the file itself for the floor).", ""]
    if pz is not None:
        md += [f"### attach / detach pause under HMP guest writes ({pz['cycles']} cycles, "
               f"{pz['writes']} writes)", "", pause_table(pz), ""]
    text = "\n".join(md)
    print(text)

    path = bl.write_results("attach", {
        "_loadavg": loadavg,
        "config": {"size": args.size, "rounds": args.rounds, "quick": args.quick,
                   "image": str(image), "servers": server_cmds, "bench": bench_cmds,
                   "fleeced": fleeced_version,
                   "qemu": tool_line(["qemu-system-x86_64", "--version"])},
        "throughput": tp, "ratios": ratios, "targets": targets, "pause": pz,
        "markdown": text, "elapsed_s": elapsed,
    }, args.out)
    path.with_suffix(".md").write_text(text + "\n")
    print(f"\nJSON: {path}\nMarkdown: {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
