#!/usr/bin/env python3
"""Benchmark an NBD upstream: ``fleeced serve nbd+unix:///...`` in front of
qemu-nbd, against that qemu-nbd served directly (no session: the cost of
the hop through fleeced's libnbd connections).

One qemu-nbd serves a page-cached random raw image for the whole run.  Each
round runs, alternating which goes first, against qemu-nbd's socket
(``direct``) and against a fresh fleeced whose source is that socket
(``fleeced``): fio 4k randread/randwrite at iodepth 16 and 1, and an
``nbdcopy`` full read.  Medians and ``fleeced/direct`` ratios go to stdout,
then the target line (QD16 >= 0.8x), and every sample to
``bench/results/upstream-<timestamp>.json``.

    python3 bench/upstream_bench.py                    # 3 rounds, 5 s, 1 GiB
    python3 bench/upstream_bench.py --rounds 1 --runtime 2 --size 256M
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import benchlib as bl

# name, kind, fio rw, iodepth (nbdcopy: 0)
WORKLOADS: tuple[tuple[str, str, str, int], ...] = (
    ("randread-qd16", "fio", "randread", 16),
    ("randwrite-qd16", "fio", "randwrite", 16),
    ("randread-qd1", "fio", "randread", 1),
    ("randwrite-qd1", "fio", "randwrite", 1),
    ("seqread", "nbdcopy", "read", 0),
)

SHOWN = ("iops", "mb_s", "p99_us")

METRICS: tuple[tuple[str, str, str], ...] = (
    ("4k randread QD16 IOPS ↑", "randread-qd16", "iops"),
    ("4k randwrite QD16 IOPS ↑", "randwrite-qd16", "iops"),
    ("4k randread QD1 IOPS ↑", "randread-qd1", "iops"),
    ("4k randwrite QD1 IOPS ↑", "randwrite-qd1", "iops"),
    ("4k randread QD16 p99 µs ↓", "randread-qd16", "p99_us"),
    ("4k randwrite QD16 p99 µs ↓", "randwrite-qd16", "p99_us"),
    ("nbdcopy read MB/s ↑", "seqread", "mb_s"),
)

# The target: fleeced / direct at QD16.
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("randread-qd16", "iops", 0.8),
    ("randwrite-qd16", "iops", 0.8),
)


def workload(name: str, kind: str, rw: str, depth: int, uri: str,
             args: argparse.Namespace) -> dict[str, float]:
    if kind == "nbdcopy":
        return bl.nbdcopy_read(uri, args.size, timeout=args.timeout)
    res = bl.fio(uri, rw=rw, bs="4k", iodepth=depth, runtime=args.runtime, size=args.size)
    if "write" in rw:
        bl.sync()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--runtime", type=float, default=5.0, help="fio seconds per job (default 5)")
    p.add_argument("--size", type=bl.parse_size, default=1 << 30, help="image size (default 1G)")
    p.add_argument("--fleeced", type=shlex.split, default=bl.default_fleeced_cmd(),
                   metavar="CMD", help="how to run fleeced (default: this python -m fleeced)")
    p.add_argument("--work-dir", type=Path, default=bl.DEFAULT_WORK_DIR)
    p.add_argument("--out-dir", type=Path, default=bl.RESULTS_DIR)
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)
    try:
        return bench(args)
    except bl.BenchError as exc:
        print(f"upstream_bench: error: {exc}", file=sys.stderr)
        return 1


def bench(args: argparse.Namespace) -> int:
    bl.require_tools(["qemu-nbd", "nbdcopy", "fio"])
    bl.run([*args.fleeced, "--version"], timeout=30)
    work = args.work_dir / "upstream"
    work.mkdir(parents=True, exist_ok=True)
    image = bl.ensure_random_image(args.work_dir / f"serve-{bl.human_size(args.size)}.img",
                                   args.size)
    bl.warm_page_cache(image)
    up_sock, fl_sock = work / "qemu-nbd.sock", work / "fleeced.sock"
    upstream = bl.Server("qemu-nbd", ["qemu-nbd", "-f", "raw", "-k", str(up_sock), "-t",
                                      "-e", "32", "--cache=writeback", "--aio=threads",
                                      "-x", "img", str(image)], up_sock, work / "qemu-nbd.log")
    fl_cmd = [*args.fleeced, "serve", f"nbd+unix:///img?socket={up_sock}", "-x", "img",
              "-k", str(fl_sock), "-t", "--no-control", "-e", "0"]
    samples: dict[str, dict[str, list[dict[str, float]]]] = {
        c: {w[0]: [] for w in WORKLOADS} for c in ("direct", "fleeced")}
    t0 = time.monotonic()
    with upstream:
        for rnd in range(args.rounds):
            order = ["direct", "fleeced"] if rnd % 2 == 0 else ["fleeced", "direct"]
            bl.log(f"round {rnd + 1}/{args.rounds}: {' '.join(order)}")
            for name, kind, rw, depth in WORKLOADS:
                for config in order:
                    if config == "direct":
                        res = workload(name, kind, rw, depth, bl.nbd_uri(up_sock, "img"), args)
                        res["cpu_s"] = 0.0
                    else:
                        with bl.Server("fleeced", fl_cmd, fl_sock,
                                       work / "fleeced.log") as srv:
                            cpu0 = srv.cpu_seconds()
                            res = workload(name, kind, rw, depth, bl.nbd_uri(fl_sock, "img"),
                                           args)
                            srv.check_alive()
                            res["cpu_s"] = srv.cpu_seconds() - cpu0
                    samples[config][name].append(res)
                    bl.log(f"  {config:8} {name:15} "
                           f"{ {k: round(v, 1) for k, v in res.items() if k in SHOWN} }")
    elapsed = time.monotonic() - t0

    medians = {c: {w: {k: bl.median([r[k] for r in rows]) for k in rows[0]}
                   for w, rows in per.items() if rows} for c, per in samples.items()}
    rows = []
    for label, wl, field in METRICS:
        d, f = medians["direct"][wl].get(field), medians["fleeced"][wl].get(field)
        rows.append([label, bl.fmt(d), bl.fmt(f), bl.fmt_ratio(bl.ratio(f, d))])
    table = bl.markdown_table(["metric", "qemu-nbd direct", "fleeced → qemu-nbd",
                               "fleeced/direct"], rows)
    targets = []
    for wl, field, thr in TARGETS:
        q = bl.ratio(medians["fleeced"][wl].get(field), medians["direct"][wl].get(field))
        verdict = "n/a" if q is None else f"{q:.2f}x {'MET' if q >= thr else 'MISSED'}"
        targets.append(f"target fleeced {wl} {field} >= {thr:.1f}x direct: {verdict}")
    print(f"## NBD upstream benchmark — {args.rounds} round(s), {args.runtime:g} s fio, "
          f"image {bl.human_size(args.size)}, medians\n")
    print(table)
    print()
    for line in targets:
        print(f"- {line}")
    print(f"\n({elapsed:.0f} s)")
    payload: dict[str, Any] = {"config": {"rounds": args.rounds, "runtime_s": args.runtime,
                                          "size": args.size, "fleeced": shlex.join(fl_cmd)},
                               "medians": medians, "samples": samples, "targets": targets,
                               "markdown": table, "elapsed_s": elapsed}
    print(f"\nJSON: {bl.write_results('upstream', payload, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
