#!/usr/bin/env python3
"""Benchmark ``fleeced serve`` against ``qemu-nbd`` and ``nbdkit file`` on one raw image.

Each round starts every selected server in turn (the order rotates between
rounds) on the same page-cached random-data image and runs, against its Unix
socket: an ``nbdcopy URI null:`` full read with nbdcopy's default connections
(multi-conn) and one with ``--connections=1``, fio 4k randread/randwrite at
iodepth 16 and at iodepth 1 (IOPS, p99 completion latency), measuring the
server's CPU seconds (utime+stime of its process tree) around each workload.
Medians over the rounds go to stdout as a Markdown table, followed by one
MET/MISSED line per target (fleeced / nbdkit), and, with every raw
sample, to ``bench/results/serve-<timestamp>.json``.

    python3 bench/serve_bench.py                       # 5 rounds, 5 s fio, 1 GiB
    python3 bench/serve_bench.py --rounds 1 --runtime 2 --size 256M --servers qemu-nbd,nbdkit
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import benchlib as bl

# fleeced-loop: fleeced with --data-plane loop (every request through the
# event loop), the data plane before the native connections, for comparison.
SERVERS = ("fleeced", "fleeced-loop", "qemu-nbd", "nbdkit")
PEERS = ("qemu-nbd", "nbdkit")

# name, kind, fio rw, fio iodepth or nbdcopy --connections (0: nbdcopy's default, multi-conn)
WORKLOADS: tuple[tuple[str, str, str, int], ...] = (
    ("seqread", "nbdcopy", "read", 0),
    ("seqread-1conn", "nbdcopy", "read", 1),
    ("randread-qd16", "fio", "randread", 16),
    ("randwrite-qd16", "fio", "randwrite", 16),
    ("randread-qd1", "fio", "randread", 1),
    ("randwrite-qd1", "fio", "randwrite", 1),
)

# label, workload, field, higher-is-better
METRICS: tuple[tuple[str, str, str, bool], ...] = (
    ("nbdcopy read MB/s ↑", "seqread", "mb_s", True),
    ("nbdcopy read, 1 connection MB/s ↑", "seqread-1conn", "mb_s", True),
    ("4k randread QD16 IOPS ↑", "randread-qd16", "iops", True),
    ("4k randwrite QD16 IOPS ↑", "randwrite-qd16", "iops", True),
    ("4k randread QD1 p99 µs ↓", "randread-qd1", "p99_us", False),
    ("4k randwrite QD1 p99 µs ↓", "randwrite-qd1", "p99_us", False),
    ("4k randread QD1 IOPS ↑", "randread-qd1", "iops", True),
    ("4k randwrite QD1 IOPS ↑", "randwrite-qd1", "iops", True),
    ("server CPU s/GB, nbdcopy read ↓", "seqread", "cpu_s_per_gb", False),
    ("server CPU s/GB, nbdcopy read 1 connection ↓", "seqread-1conn", "cpu_s_per_gb", False),
    ("server CPU s, nbdcopy read ↓", "seqread", "cpu_s", False),
    ("server CPU s, randread QD16 ↓", "randread-qd16", "cpu_s", False),
    ("server CPU s, randwrite QD16 ↓", "randwrite-qd16", "cpu_s", False),
    ("server CPU s, randread QD1 ↓", "randread-qd1", "cpu_s", False),
    ("server CPU s, randwrite QD1 ↓", "randwrite-qd1", "cpu_s", False),
    ("server CPU µs per 4k IO, randread QD16 ↓", "randread-qd16", "cpu_us_per_io", False),
    ("server CPU µs per 4k IO, randwrite QD16 ↓", "randwrite-qd16", "cpu_us_per_io", False),
)


# The serving targets, fleeced / peer (qemu-nbd ratios are in the table):
# workload, field, threshold (higher is better), peer
TARGETS: tuple[tuple[str, str, float, str], ...] = (
    ("seqread", "mb_s", 1.0, "nbdkit"),
    ("seqread-1conn", "mb_s", 1.0, "nbdkit"),
    ("randread-qd16", "iops", 1.0, "nbdkit"),
    ("randwrite-qd16", "iops", 1.0, "nbdkit"),
    ("randwrite-qd1", "iops", 1.0, "nbdkit"),
    ("randread-qd1", "iops", 1.0, "nbdkit"),
)


def server_command(name: str, args: argparse.Namespace, image: Path, sock: Path) -> list[str]:
    if name in ("fleeced", "fleeced-loop"):
        plane = ["--data-plane", "loop"] if name == "fleeced-loop" else []
        return [*args.fleeced, "serve", str(image), "-k", str(sock), "-t", "--no-control",
                "-e", "0", *plane]
    if name == "qemu-nbd":
        # The qemu-nbd defaults closest to fleeced: writeback page cache, thread pool.
        return ["qemu-nbd", "-f", "raw", "-k", str(sock), "-t", "-e", "8",
                "--cache=writeback", "--aio=threads", "-x", image.stem, str(image)]
    if name == "nbdkit":
        return ["nbdkit", "-f", "-U", str(sock), "file", str(image)]
    raise ValueError(name)


def run_workloads(srv: bl.Server, uri: str, args: argparse.Namespace
                  ) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for wl, kind, rw, depth in WORKLOADS:
        if args.workloads and wl not in args.workloads:
            continue
        cpu0 = srv.cpu_seconds()
        if kind == "nbdcopy":
            res = bl.nbdcopy_read(uri, args.size, timeout=args.timeout,
                                  connections=depth or None)
        else:
            res = bl.fio(uri, rw=rw, bs="4k", iodepth=depth, runtime=args.runtime,
                         size=args.size)
        srv.check_alive()
        res["cpu_s"] = srv.cpu_seconds() - cpu0
        if kind == "nbdcopy":
            res["cpu_s_per_gb"] = res["cpu_s"] / (args.size / bl.GB)
        else:
            res["cpu_us_per_io"] = res["cpu_s"] * 1e6 / max(res["ios"], 1)
        out[wl] = res
        if "write" in rw:
            bl.sync()  # flush dirty pages outside any timed region
        shown = {k: round(v, 2) for k, v in res.items() if k in
                 ("mb_s", "iops", "p99_us", "cpu_s")}
        bl.log(f"  {srv.name:9} {wl:15} {shown}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    p.add_argument("--runtime", type=float, default=5.0, help="fio seconds per job (default 5)")
    p.add_argument("--size", type=bl.parse_size, default=1 << 30,
                   help="image size (default 1G)")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help="comma list out of fleeced,fleeced-loop,qemu-nbd,nbdkit (default all)")
    p.add_argument("--fleeced", type=shlex.split, default=bl.default_fleeced_cmd(),
                   metavar="CMD", help="how to run fleeced (default: this python -m fleeced)")
    p.add_argument("--workloads", type=lambda s: s.split(","), default=None,
                   help="subset of " + ",".join(w[0] for w in WORKLOADS))
    p.add_argument("--work-dir", type=Path, default=bl.DEFAULT_WORK_DIR,
                   help=f"image and socket directory (default {bl.DEFAULT_WORK_DIR})")
    p.add_argument("--out-dir", type=Path, default=bl.RESULTS_DIR,
                   help="where the JSON goes (default bench/results)")
    p.add_argument("--timeout", type=float, default=600,
                   help="per-command timeout in seconds (default 600)")
    args = p.parse_args(argv)

    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in servers if s not in SERVERS]
    if bad or not servers:
        p.error(f"unknown server(s) {bad}; choose from {','.join(SERVERS)}")
    if args.workloads:
        unknown = set(args.workloads) - {w[0] for w in WORKLOADS}
        if unknown:
            p.error(f"unknown workload(s) {sorted(unknown)}")
    try:
        return bench(args, servers)
    except bl.BenchError as exc:
        print(f"serve_bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def bench(args: argparse.Namespace, servers: list[str]) -> int:
    tools = ["nbdcopy", "fio", "sync", "cp"]
    tools += [s for s in servers if not s.startswith("fleeced")]
    bl.require_tools(tools)
    if "fleeced" in servers:
        bl.run([*args.fleeced, "--version"], timeout=30)
    loadavg = os.getloadavg()

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    image = bl.ensure_random_image(work / f"serve-{bl.human_size(args.size)}.img", args.size)
    bl.warm_page_cache(image)
    sock = work / "serve.sock"
    export = image.stem

    samples: dict[str, list[dict[str, dict[str, float]]]] = {s: [] for s in servers}
    commands = {s: server_command(s, args, image, sock) for s in servers}
    t_start = time.monotonic()
    for rnd in range(args.rounds):
        order = servers[rnd % len(servers):] + servers[:rnd % len(servers)]
        bl.log(f"round {rnd + 1}/{args.rounds}: {' '.join(order)}")
        for name in order:
            srv = bl.Server(name, commands[name], sock, work / f"serve-{name}.log")
            try:
                srv.start()
                uri = bl.nbd_uri(sock, export)
                samples[name].append(run_workloads(srv, uri, args))
            finally:
                srv.stop()
    elapsed = time.monotonic() - t_start

    medians: dict[str, dict[str, dict[str, float | None]]] = {}
    for name in servers:
        medians[name] = {}
        for wl, *_ in WORKLOADS:
            got = [r[wl] for r in samples[name] if wl in r]
            if not got:
                continue
            medians[name][wl] = {k: bl.median([r[k] for r in got]) for k in got[0]}

    def value(name: str, wl: str, field: str) -> float | None:
        return medians.get(name, {}).get(wl, {}).get(field)

    peers = [s for s in PEERS if s in servers]
    header = ["metric", *servers]
    if "fleeced" in servers:
        header += [f"fleeced/{peer}" for peer in peers]
        if "fleeced-loop" in servers:
            header.append("fleeced/fleeced-loop")
    rows: list[list[str]] = []
    ratios: dict[str, dict[str, float | None]] = {}
    for label, wl, field, _higher in METRICS:
        if all(value(s, wl, field) is None for s in servers):
            continue
        row = [label, *(bl.fmt(value(s, wl, field)) for s in servers)]
        if "fleeced" in servers:
            for peer in peers:
                r = bl.ratio(value("fleeced", wl, field), value(peer, wl, field))
                ratios.setdefault(label, {})[f"fleeced/{peer}"] = r
                row.append(bl.fmt_ratio(r))
            if "fleeced-loop" in servers:
                r = bl.ratio(value("fleeced", wl, field), value("fleeced-loop", wl, field))
                ratios.setdefault(label, {})["fleeced/fleeced-loop"] = r
                row.append(bl.fmt_ratio(r))
        rows.append(row)

    table = bl.markdown_table(header, rows)
    ran = {wl for wl, *_ in WORKLOADS if not args.workloads or wl in args.workloads}
    targets = check_targets(value, servers, ran)
    print(f"## fleeced serve benchmark — {args.rounds} round(s), fio {args.runtime:g} s, "
          f"image {bl.human_size(args.size)}, medians\n")
    print(table)
    if targets:
        print()
        for line in targets:
            print(f"- {line}")
    print(f"\n(MB = 10^6 bytes; CPU = server utime+stime; ↑ higher is better, ↓ lower; "
          f"load average at start {loadavg[0]:.2f}; {elapsed:.0f} s)")

    path = bl.write_results("serve", {
        "_loadavg": loadavg,
        "config": {"rounds": args.rounds, "runtime_s": args.runtime, "size": args.size,
                   "image": str(image), "export": export, "servers": servers,
                   "commands": {s: shlex.join(c) for s, c in commands.items()}},
        "medians": medians,
        "ratios": ratios,
        "targets": targets,
        "samples": samples,
        "markdown": table,
        "elapsed_s": elapsed,
    }, args.out_dir)
    print(f"\nJSON: {path}")
    return 0


def check_targets(value: Any, servers: list[str], workloads: set[str]) -> list[str]:
    """One MET/MISSED line per TARGETS entry whose workload ran (README, "Targets")."""
    if "fleeced" not in servers:
        return []
    out = []
    for wl, field, thr, peer in TARGETS:
        if peer not in servers or wl not in workloads:
            continue
        head = f"target {wl} {field} >= {thr:.1f}x {peer}"
        r = bl.ratio(value("fleeced", wl, field), value(peer, wl, field))
        if r is None:
            out.append(f"{head}: n/a (no value)")
            continue
        out.append(f"{head}: {r:.2f}x {'MET' if r >= thr else 'MISSED'}")
    return out


if __name__ == "__main__":
    sys.exit(main())
