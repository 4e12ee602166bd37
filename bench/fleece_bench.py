#!/usr/bin/env python3
"""Benchmark fleecing: ``fleeced serve --fleece`` against qemu-storage-daemon's
copy-before-write + snapshot-access stack (the QEMU fleecing recipe).

Every run restores the source image from a pristine random file and starts a
fresh server, so every guest write pays copy-before-write on first touch.
Runs per configuration and round (configurations alternate, order rotating):

* ``backup``     ``nbdcopy SNAPSHOT null:`` alone: MB/s and server CPU s/GB.
* ``write-4k``   fio randwrite bs=4k iodepth=16 on the active export alone:
  IOPS, p99 completion latency, temp-store bytes written.
* ``write-64k``  the same with bs=64k.
* ``both``       the 4k writer and back-to-back snapshot backups at once for
  ``--runtime`` seconds (at least one full backup pass): backup MB/s, writer
  IOPS and p99, server CPU seconds, CPU s per GB backed up, temp bytes.
* ``both-64k``   the same with the 64k writer.

After the table, one MET/MISSED line per target (fleeced / qsd).  With
``--format qcow2`` the source is a qcow2 image, which qsd opens itself and
fleeced serves through its qemu-storage-daemon child (an NBD upstream); the
targets are then backup MB/s and guest write IOPS during a backup >= 1.0x
qsd, p99 <= 1.0x.

Temp bytes: for qemu-storage-daemon the allocated size of its target file; for
fleeced ``fleeced fleece list --json`` ("temp-bytes-written"), falling back to
the allocated size of ``--temp-dir`` when the control query fails.

    python3 bench/fleece_bench.py                          # 3 rounds, 5 s, 1 GiB
    python3 bench/fleece_bench.py --rounds 1 --runtime 2 --size 256M --configs qsd
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib as bl

# fleeced-loop: --data-plane loop, every request through the event loop (the
# data plane before the native connections), for comparison.
CONFIGS = ("qsd", "fleeced", "fleeced-cache", "fleeced-loop")
RUNS = ("backup", "write-4k", "write-64k", "both", "both-64k", "both-rate", "both-64k-rate")
#: The guest's fixed rate in the *-rate runs (writes per second).
RATE_IOPS = 2000


def qsd_command(src: Path, tmp: Path, sock: Path, fmt: str = "raw") -> list[str]:
    """QEMU 7.2's own fleecing stack (copy-before-write under snapshot-access,
    the baseline fleeced is measured against); for a qcow2 source, a qcow2
    node over the file."""
    if fmt == "qcow2":
        source = ["--blockdev", f"driver=file,node-name=srcf,filename={src},discard=unmap",
                  "--blockdev", "driver=qcow2,node-name=src,file=srcf,discard=unmap"]
    else:
        source = ["--blockdev", f"driver=file,node-name=src,filename={src},discard=unmap"]
    return [
        "qemu-storage-daemon",
        *source,
        "--blockdev", f"driver=file,node-name=tmp,filename={tmp},discard=unmap",
        "--blockdev", "driver=copy-before-write,node-name=cbw,file=src,target=tmp,discard=unmap",
        "--blockdev", "driver=snapshot-access,node-name=snap,file=cbw,discard=unmap",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=a,node-name=cbw,name=active,writable=on",
        "--export", "type=nbd,id=f,node-name=snap,name=fleece,writable=off",
    ]


class Setup:
    """One configuration's server, export names and temp-store accounting."""

    def __init__(self, config: str, args: argparse.Namespace, run_dir: Path) -> None:
        self.config = config
        self.args = args
        self.src = run_dir / ("disk.qcow2" if args.format == "qcow2" else "disk.img")
        self.sock = run_dir / "nbd.sock"
        self.ctl = run_dir / "control.sock"
        self.tmp = run_dir / "cbw-target.img"
        self.temp_dir = run_dir / "temp"
        self.temp_note = ""
        if config == "qsd":
            self.active, self.snapshot = "active", "fleece"
            self.cmd = qsd_command(self.src, self.tmp, self.sock, args.format)
        else:
            self.active, self.snapshot = self.src.stem, f"{self.src.stem}@fleece"
            self.cmd = [*args.fleeced, "serve", str(self.src), "--fleece", "-k", str(self.sock),
                        "-t", "--control", str(self.ctl), "--temp-dir", str(self.temp_dir)]
            if config == "fleeced-cache":
                self.cmd += ["--cache", args.cache]
            if config == "fleeced-loop":
                self.cmd += ["--data-plane", "loop"]

    def prepare(self, pristine: Path) -> None:
        bl.copy_file(pristine, self.src, timeout=self.args.timeout)
        if self.config == "qsd":
            self.tmp.unlink(missing_ok=True)
            with open(self.tmp, "wb") as f:
                f.truncate(self.args.size)
        else:
            if self.temp_dir.exists():
                for p in self.temp_dir.iterdir():
                    p.unlink()
            self.temp_dir.mkdir(exist_ok=True)

    def temp_bytes(self, pid: int) -> dict[str, Any]:
        """Temp-store bytes; call while the server (``pid``) still runs."""
        if self.config == "qsd":
            return {"temp_bytes": bl.allocated_bytes(self.tmp), "temp_source": "allocated"}
        # Allocated size of the temp store, whether or not it is linked in the directory.
        alloc = max(bl.allocated_bytes_tree(self.temp_dir),
                    bl.open_files_allocated(pid, self.temp_dir))
        out: dict[str, Any] = {"temp_allocated": alloc}
        if self.temp_note:  # the control query failed before: do not wait for it again
            return {**out, "temp_bytes": alloc, "temp_source": "allocated"}
        try:
            env = dict(os.environ, FLEECED_CONTROL=str(self.ctl))
            # FLEECED_CONTROL, not --control: works wherever the CLI accepts the option.
            proc = bl.run([*self.args.fleeced, "fleece", "list", "--json"], timeout=10, env=env)
            data = json.loads(proc.stdout)
            sessions = data if isinstance(data, list) else data.get("sessions", [data])
            out["temp_bytes"] = sum(int(s["temp-bytes-written"]) for s in sessions)
            for key in ("temp-bytes", "cache-bytes", "cbw-bytes", "cbw-count"):
                out[key.replace("-", "_")] = sum(int(s.get(key, 0)) for s in sessions)
            out["temp_source"] = "control"
        except (bl.BenchError, ValueError, KeyError, TypeError, AttributeError) as exc:
            if not self.temp_note:
                self.temp_note = ("temp MiB is the allocated size of the temp store, the "
                                  "control query failed: "
                                  + str(exc).splitlines()[-1].strip()[:160])
                bl.log(f"  {self.config}: {self.temp_note}")
            out["temp_bytes"] = alloc
            out["temp_source"] = "allocated"
        return out


def run_backup(setup: Setup, srv: bl.Server, args: argparse.Namespace) -> dict[str, Any]:
    uri = bl.nbd_uri(setup.sock, setup.snapshot)
    cpu0 = srv.cpu_seconds()
    res: dict[str, Any] = bl.nbdcopy_read(uri, args.size, timeout=args.timeout)
    srv.check_alive()
    res["cpu_s"] = srv.cpu_seconds() - cpu0
    res["cpu_s_per_gb"] = res["cpu_s"] / (args.size / bl.GB)
    return res


def run_writer(setup: Setup, srv: bl.Server, args: argparse.Namespace, bs: str
               ) -> dict[str, Any]:
    uri = bl.nbd_uri(setup.sock, setup.active)
    cpu0 = srv.cpu_seconds()
    res: dict[str, Any] = bl.fio(uri, rw="randwrite", bs=bs, iodepth=16,
                                 runtime=args.runtime, size=args.size)
    srv.check_alive()
    res["cpu_s"] = srv.cpu_seconds() - cpu0
    res.update(setup.temp_bytes(srv.pid))
    return res


def run_both(setup: Setup, srv: bl.Server, args: argparse.Namespace, bs: str,
             rate_iops: int = 0) -> dict[str, Any]:
    """QD16 writer of ``bs`` blocks (closed loop, or RATE_IOPS writes a
    second) for as long as back-to-back backup passes take >= --runtime."""
    active = bl.nbd_uri(setup.sock, setup.active)
    snap = bl.nbd_uri(setup.sock, setup.snapshot)
    cmd = bl.fio_cmd(active, rw="randwrite", bs=bs, iodepth=16,
                     runtime=args.runtime + args.timeout, size=args.size, rate_iops=rate_iops)
    cpu0 = srv.cpu_seconds()
    writer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    passes: list[float] = []
    try:
        time.sleep(0.2)  # let fio connect and start writing before the first backup pass
        t0 = time.monotonic()
        while not passes or time.monotonic() - t0 < args.runtime:
            if writer.poll() is not None:
                raise bl.BenchError(f"fio writer exited early ({writer.returncode}): "
                                    f"{writer.stderr.read()[-300:] if writer.stderr else ''}")
            passes.append(bl.nbdcopy_read(snap, args.size, timeout=args.timeout)["seconds"])
        window = time.monotonic() - t0
        writer.send_signal(signal.SIGINT)
        out, err = writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            os.killpg(writer.pid, signal.SIGKILL)
            writer.wait(10)
    srv.check_alive()
    cpu = srv.cpu_seconds() - cpu0
    w = bl.parse_fio(out, "randwrite")
    backed = args.size * len(passes)
    res: dict[str, Any] = {
        "backup_mb_s": backed / bl.MB / sum(passes),
        "first_pass_mb_s": args.size / bl.MB / passes[0],
        "passes": len(passes),
        "window_s": window,
        "writer_iops": w["iops"],
        "writer_p99_us": w["p99_us"],
        "writer_p50_us": w["p50_us"],
        "cpu_s": cpu,
        "cpu_s_per_gb": cpu / (backed / bl.GB),
    }
    res.update(setup.temp_bytes(srv.pid))
    return res


Metric = tuple[str, str, str, bool, float]


def both_metrics(run: str, prefix: str, bs: str) -> tuple[Metric, ...]:
    """The rows of a writer-during-backup run (``both``, ``both-64k``)."""
    return (
        (f"{prefix}: backup MB/s ↑", run, "backup_mb_s", True, 1),
        (f"{prefix}: first backup pass MB/s ↑", run, "first_pass_mb_s", True, 1),
        (f"{prefix}: writer {bs} IOPS ↑", run, "writer_iops", True, 1),
        (f"{prefix}: writer {bs} p99 µs ↓", run, "writer_p99_us", False, 1),
        (f"{prefix}: server CPU s ↓", run, "cpu_s", False, 1),
        (f"{prefix}: server CPU s per GB backed up ↓", run, "cpu_s_per_gb", False, 1),
        (f"{prefix}: temp MiB written ↓", run, "temp_bytes", False, 2**-20),
    )


# label, run, field, higher-is-better, scale
METRICS: tuple[Metric, ...] = (
    ("backup alone: MB/s ↑", "backup", "mb_s", True, 1),
    ("backup alone: server CPU s/GB ↓", "backup", "cpu_s_per_gb", False, 1),
    ("writer alone 4k QD16: IOPS ↑", "write-4k", "iops", True, 1),
    ("writer alone 4k QD16: p99 µs ↓", "write-4k", "p99_us", False, 1),
    ("writer alone 4k QD16: server CPU s ↓", "write-4k", "cpu_s", False, 1),
    ("writer alone 4k QD16: temp MiB written ↓", "write-4k", "temp_bytes", False, 2**-20),
    ("writer alone 64k QD16: IOPS ↑", "write-64k", "iops", True, 1),
    ("writer alone 64k QD16: p99 µs ↓", "write-64k", "p99_us", False, 1),
    ("writer alone 64k QD16: server CPU s ↓", "write-64k", "cpu_s", False, 1),
    ("writer alone 64k QD16: temp MiB written ↓", "write-64k", "temp_bytes", False, 2**-20),
    *both_metrics("both", "both", "4k"),
    *both_metrics("both-64k", "both 64k", "64k"),
    *both_metrics("both-rate", f"both, writer at {RATE_IOPS}/s", "4k"),
    *both_metrics("both-64k-rate", f"both 64k, writer at {RATE_IOPS}/s", "64k"),
)

# The targets for a qcow2 source, config / qsd.
TARGETS_QCOW2: tuple[tuple[str, str, str, float, str], ...] = (
    ("backup", "mb_s", ">=", 1.0, "fleeced"),
    ("both", "backup_mb_s", ">=", 1.0, "fleeced"),
    ("both", "writer_iops", ">=", 1.0, "fleeced"),
    ("both", "writer_p99_us", "<=", 1.0, "fleeced"),
    ("both-64k", "writer_iops", ">=", 1.0, "fleeced"),
    ("both-64k", "writer_p99_us", "<=", 1.0, "fleeced"),
)

# The fleecing targets for a raw source, config / qsd:
# (run, field, kind, threshold, config-that-must-meet-it)
TARGETS: tuple[tuple[str, str, str, float, str], ...] = (
    ("backup", "mb_s", ">=", 1.5, "fleeced"),
    ("both", "backup_mb_s", ">=", 1.5, "fleeced"),
    ("write-4k", "iops", ">=", 1.0, "fleeced"),
    ("write-64k", "iops", ">=", 1.0, "fleeced"),
    ("both", "writer_iops", ">=", 1.0, "fleeced"),
    ("both-64k", "writer_iops", ">=", 1.0, "fleeced"),
    ("write-4k", "p99_us", "<=", 1.0, "fleeced"),
    ("write-64k", "p99_us", "<=", 1.0, "fleeced"),
    ("both", "writer_p99_us", "<=", 1.0, "fleeced"),
    ("both-64k", "writer_p99_us", "<=", 1.0, "fleeced"),
    ("both-rate", "writer_p99_us", "<=", 1.0, "fleeced"),
    ("both-64k-rate", "writer_p99_us", "<=", 1.0, "fleeced"),
    ("backup", "cpu_s_per_gb", "<=", 1.0, "fleeced"),
    ("both", "cpu_s_per_gb", "<=", 1.0, "fleeced"),
    ("both-64k", "cpu_s_per_gb", "<=", 1.0, "fleeced"),
    ("write-4k", "temp_bytes", "<", 1.0, "fleeced-cache"),
    ("both", "temp_bytes", "<", 1.0, "fleeced-cache"),
)


def run_one(run: str, setup: Setup, srv: bl.Server, args: argparse.Namespace
            ) -> dict[str, Any]:
    if run == "backup":
        return run_backup(setup, srv, args)
    if run in ("write-4k", "write-64k"):
        return run_writer(setup, srv, args, run.removeprefix("write-"))
    if run == "both":
        return run_both(setup, srv, args, "4k")
    if run == "both-64k":
        return run_both(setup, srv, args, "64k")
    if run == "both-rate":
        return run_both(setup, srv, args, "4k", RATE_IOPS)
    if run == "both-64k-rate":
        return run_both(setup, srv, args, "64k", RATE_IOPS)
    raise ValueError(run)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--runtime", type=float, default=5.0,
                   help="seconds per writer run / concurrent window (default 5)")
    p.add_argument("--size", type=bl.parse_size, default=1 << 30,
                   help="image size (default 1G)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="comma list out of qsd,fleeced,fleeced-cache,fleeced-loop (default all)")
    p.add_argument("--runs", default=",".join(RUNS), help="subset of " + ",".join(RUNS))
    p.add_argument("--cache", default="256M", help="--cache for fleeced-cache (default 256M)")
    p.add_argument("--format", choices=("raw", "qcow2"), default="raw",
                   help="the source image's format (default raw)")
    p.add_argument("--fleeced", type=shlex.split, default=bl.default_fleeced_cmd(),
                   metavar="CMD", help="how to run fleeced (default: this python -m fleeced)")
    p.add_argument("--work-dir", type=Path, default=bl.DEFAULT_WORK_DIR,
                   help=f"image and socket directory (default {bl.DEFAULT_WORK_DIR})")
    p.add_argument("--out-dir", type=Path, default=bl.RESULTS_DIR,
                   help="where the JSON goes (default bench/results)")
    p.add_argument("--timeout", type=float, default=600,
                   help="per-command timeout in seconds (default 600)")
    args = p.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not configs or set(configs) - set(CONFIGS):
        p.error(f"--configs: choose from {','.join(CONFIGS)}")
    if not runs or set(runs) - set(RUNS):
        p.error(f"--runs: choose from {','.join(RUNS)}")
    try:
        return bench(args, configs, runs)
    except bl.BenchError as exc:
        print(f"fleece_bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def bench(args: argparse.Namespace, configs: list[str], runs: list[str]) -> int:
    tools = ["nbdcopy", "fio", "sync", "cp"]
    if "qsd" in configs:
        tools.append("qemu-storage-daemon")
    bl.require_tools(tools)
    if any(c.startswith("fleeced") for c in configs):
        bl.run([*args.fleeced, "--version"], timeout=30)
    loadavg = os.getloadavg()

    work = args.work_dir
    run_dir = work / "fleece"
    run_dir.mkdir(parents=True, exist_ok=True)
    pristine = bl.ensure_random_image(work / f"fleece-pristine-{bl.human_size(args.size)}.img",
                                      args.size)
    if args.format == "qcow2":
        raw, pristine = pristine, pristine.with_suffix(".qcow2")
        if not pristine.exists():
            bl.require_tools(["qemu-img"])
            bl.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
                    str(pristine)], timeout=args.timeout)
    bl.warm_page_cache(pristine)

    setups = {c: Setup(c, args, run_dir) for c in configs}
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        c: {r: [] for r in runs} for c in configs
    }
    t_start = time.monotonic()
    for rnd in range(args.rounds):
        order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]
        bl.log(f"round {rnd + 1}/{args.rounds}: {' '.join(order)}")
        for run_name in runs:
            for config in order:
                setup = setups[config]
                setup.prepare(pristine)
                srv = bl.Server(config, setup.cmd, setup.sock, work / f"fleece-{config}.log")
                try:
                    srv.start()
                    res = run_one(run_name, setup, srv, args)
                    res["rss_mib_end"] = srv.rss_bytes() / 2**20
                finally:
                    srv.stop()
                samples[config][run_name].append(res)
                shown = {k: (round(v, 2) if isinstance(v, float) else v)
                         for k, v in res.items() if k in (
                             "mb_s", "iops", "p99_us", "cpu_s", "temp_bytes", "backup_mb_s",
                             "writer_iops", "writer_p99_us", "passes", "rss_mib_end")}
                bl.log(f"  {config:13} {run_name:9} {shown}")
    elapsed = time.monotonic() - t_start

    medians: dict[str, dict[str, dict[str, float | None]]] = {}
    for c in configs:
        medians[c] = {}
        for r in runs:
            got = samples[c][r]
            numeric = [k for k, v in got[0].items() if isinstance(v, int | float)]
            medians[c][r] = {k: bl.median([row[k] for row in got]) for k in numeric}

    def value(c: str, r: str, field: str) -> float | None:
        return medians.get(c, {}).get(r, {}).get(field)

    labels = {"qsd": "qsd 7.2", "fleeced": "fleeced",
              "fleeced-cache": f"fleeced --cache {args.cache}",
              "fleeced-loop": "fleeced --data-plane loop"}
    fl = [c for c in configs if c != "qsd"]
    header = [labels[c] for c in configs]
    if "qsd" in configs:
        header += [f"{c}/qsd" for c in fl]
    rows: list[list[str]] = []
    ratios: dict[str, dict[str, float | None]] = {}
    for label, r, field, _higher, scale in METRICS:
        if r not in runs:
            continue
        vals = {c: value(c, r, field) for c in configs}
        row = [label, *(bl.fmt(None if v is None else v * scale) for v in vals.values())]
        if "qsd" in configs:
            for c in fl:
                q = bl.ratio(vals[c], vals["qsd"])
                ratios.setdefault(label, {})[f"{c}/qsd"] = q
                row.append(bl.fmt_ratio(q))
        rows.append(row)
    table = bl.markdown_table(["metric", *header], rows)

    targets = []
    if "qsd" in configs:
        for r, field, op, thr, c in (TARGETS_QCOW2 if args.format == "qcow2" else TARGETS):
            if r not in runs or c not in configs:
                continue
            head = f"target {c} {r} {field} {op} {thr:.1f}x qsd"
            q = bl.ratio(value(c, r, field), value("qsd", r, field))
            if q is None:
                targets.append(f"{head}: n/a (no value)")
                continue
            ok = {">=": q >= thr, "<=": q <= thr, "<": q < thr}[op]
            targets.append(f"{head}: {q:.2f}x {'MET' if ok else 'MISSED'}")
    notes = [f"{c}: {s.temp_note}" for c, s in setups.items() if s.temp_note]

    print(f"## fleecing benchmark — {args.rounds} round(s), {args.runtime:g} s runs, "
          f"{args.format} image {bl.human_size(args.size)}, medians\n")
    print(table)
    if targets or notes:
        print()
        for line in targets + notes:
            print(f"- {line}")
    print(f"\n(MB = 10^6 bytes; temp MiB: qsd = allocated size of its CBW target, fleeced = "
          f"temp-bytes-written from the control socket; CPU = server utime+stime; "
          f"load average at start {loadavg[0]:.2f}; {elapsed:.0f} s)")

    path = bl.write_results("fleece", {
        "_loadavg": loadavg,
        "config": {"rounds": args.rounds, "runtime_s": args.runtime, "size": args.size,
                   "format": args.format,
                   "cache": args.cache, "configs": configs, "runs": runs,
                   "commands": {c: shlex.join(s.cmd) for c, s in setups.items()}},
        "medians": medians,
        "ratios": ratios,
        "targets": targets,
        "notes": notes,
        "samples": samples,
        "markdown": table,
        "elapsed_s": elapsed,
    }, args.out_dir)
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
