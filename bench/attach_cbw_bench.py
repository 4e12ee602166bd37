#!/usr/bin/env python3
"""What an attached qcow2 VM pays for a fleecing session: guest-side 4k
random writes on the VM's own node, alone and under QEMU's copy-before-write
(into fleeced, and into a local qcow2 target the way libvirt fleeces).

A QEMU VM (TCG, no guest OS) has a qcow2 disk on a virtio-blk device
(``share-rw=on``, so the benchmark may write the node beside it).  fleeced
attaches it (method cbw).  The guest's writes are stood in for by fio over
QEMU's own NBD export of the node the device writes to at that moment, so
every configuration pays the same NBD hop and only the path below differs:

* ``node``     the device's node, no session (what the guest has outside
  a backup: attach adds nothing to its path);
* ``fleeced``  a fleeced session: QEMU's filter copies each cluster's old
  data into the daemon before the first write to it;
* ``qemu``     QEMU's own filter with a local qcow2 target (libvirt's
  fleecing), for comparison.

Each round starts a fresh session (so first writes pay the copy), alternating
the order.  Medians and ratios to stdout, samples to
``bench/results/attach-cbw-<timestamp>.json``.

    python3 bench/attach_cbw_bench.py                  # 3 rounds, 5 s, 1 GiB
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib as bl

CONFIGS = ("node", "fleeced", "qemu")


class Qmp:
    """A bare QMP client on the VM's second monitor (the daemon has the first)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.f = self.sock.makefile("rwb")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, command: str, **args: Any) -> Any:
        self.f.write(json.dumps({"execute": command, "arguments": args}).encode() + b"\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise bl.BenchError(f"{command}: {msg['error']['desc']}")


def fleeced(args: argparse.Namespace, *argv: str) -> str:
    return bl.run([*args.fleeced, *argv], timeout=120).stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", type=float, default=5.0)
    p.add_argument("--size", type=bl.parse_size, default=1 << 30)
    p.add_argument("--fleeced", type=shlex.split, default=bl.default_fleeced_cmd(),
                   metavar="CMD")
    p.add_argument("--work-dir", type=Path, default=bl.DEFAULT_WORK_DIR)
    p.add_argument("--out-dir", type=Path, default=bl.RESULTS_DIR)
    args = p.parse_args(argv)
    try:
        return bench(args)
    except bl.BenchError as exc:
        print(f"attach_cbw_bench: error: {exc}", file=sys.stderr)
        return 1


def bench(args: argparse.Namespace) -> int:
    bl.require_tools(["qemu-system-x86_64", "qemu-img", "fio"])
    work = args.work_dir / "attach-cbw"
    work.mkdir(parents=True, exist_ok=True)
    raw = bl.ensure_random_image(args.work_dir / f"fleece-pristine-{bl.human_size(args.size)}.img",
                                 args.size)
    image, target = work / "vda.qcow2", work / "qemu-target.qcow2"
    image.unlink(missing_ok=True)
    bl.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)],
           timeout=600)
    sock, ctl, state = work / "nbd.sock", work / "ctl.sock", work / "state"
    qmp_d, qmp_b = work / "qmp-daemon.sock", work / "qmp-bench.sock"
    for path in (sock, ctl, qmp_d, qmp_b):
        path.unlink(missing_ok=True)
    shutil.rmtree(state, ignore_errors=True)  # a fresh daemon: no attachment remembered
    daemon = bl.Server("fleeced", [*args.fleeced, "serve", "-k", str(sock), "-t", "--control",
                                   str(ctl), "--state-dir", str(state), "--temp-dir",
                                   str(work)], sock, work / "fleeced.log")
    vm = subprocess.Popen([
        "qemu-system-x86_64", "-nodefaults", "-display", "none", "-machine", "pc,accel=tcg",
        "-m", "64",
        "-blockdev", f"driver=file,node-name=disk0-file,filename={image}",
        "-blockdev", "driver=qcow2,node-name=disk0,file=disk0-file",
        "-device", "virtio-blk-pci,id=vda,drive=disk0,share-rw=on",
        "-qmp", f"unix:{qmp_d},server=on,wait=off",
        "-qmp", f"unix:{qmp_b},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=open(work / "qemu.log", "wb"))  # noqa: SIM115
    samples: dict[str, list[dict[str, float]]] = {c: [] for c in CONFIGS}
    try:
        deadline = time.monotonic() + 30
        while not qmp_b.exists():
            if vm.poll() is not None or time.monotonic() > deadline:
                raise bl.BenchError("QEMU did not start")
            time.sleep(0.05)
        daemon.start()
        ctl_args = ("--control", str(ctl))
        fleeced(args, "attach", "vda", "--qmp", str(qmp_d), "--device", "vda", *ctl_args)
        atts = json.loads(fleeced(args, "attach", "--list", "--json", *ctl_args))
        export_sock = atts[0]["export-socket"]  # QEMU's NBD server, started by the attach
        mon = Qmp(qmp_b)
        for rnd in range(args.rounds):
            order = list(CONFIGS[rnd % 3:] + CONFIGS[:rnd % 3])
            bl.log(f"round {rnd + 1}/{args.rounds}: {' '.join(order)}")
            for config in order:
                node = "disk0"
                if config == "fleeced":
                    fleeced(args, "fleece", "start", "vda", *ctl_args)
                    node = "fleeced-vda"
                elif config == "qemu":
                    target.unlink(missing_ok=True)
                    bl.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target),
                            str(args.size)], timeout=60)
                    mon.cmd("blockdev-add", driver="qcow2", **{"node-name": "bench-t"},
                            file={"driver": "file", "filename": str(target)})
                    mon.cmd("blockdev-add", driver="copy-before-write",
                            **{"node-name": "bench-cbw"}, file="disk0", target="bench-t")
                    # As fleeced does: the device onto the filter.
                    mon.cmd("qom-set", path="/machine/peripheral/vda", property="drive",
                            value="bench-cbw")
                    node = "bench-cbw"
                mon.cmd("block-export-add", type="nbd", id="bench", **{"node-name": node},
                        name="bench", writable=True)
                try:
                    res = bl.fio(f"nbd+unix:///bench?socket={export_sock}", rw="randwrite",
                                 bs="4k", iodepth=16, runtime=args.runtime, size=args.size)
                finally:
                    mon.cmd("block-export-del", id="bench")
                    while any(e.get("id") == "bench" for e in mon.cmd("query-block-exports")):
                        time.sleep(0.02)
                    if config == "fleeced":
                        fleeced(args, "fleece", "stop", "vda", *ctl_args)
                    elif config == "qemu":
                        mon.cmd("qom-set", path="/machine/peripheral/vda", property="drive",
                                value="disk0")
                        mon.cmd("blockdev-del", **{"node-name": "bench-cbw"})
                        mon.cmd("blockdev-del", **{"node-name": "bench-t"})
                samples[config].append(res)
                bl.log(f"  {config:8} iops {res['iops']:.0f} p99 {res['p99_us']:.0f} µs")
        fleeced(args, "detach", "vda", *ctl_args)
    finally:
        vm.kill()
        vm.wait()
        daemon.stop()
    med = {c: {k: bl.median([r[k] for r in rows]) for k in ("iops", "p99_us")}
           for c, rows in samples.items()}
    rows = []
    for label, field in (("4k randwrite QD16 IOPS ↑", "iops"), ("4k randwrite QD16 p99 µs ↓",
                                                                 "p99_us")):
        rows.append([label, *(bl.fmt(med[c][field]) for c in CONFIGS),
                     bl.fmt_ratio(bl.ratio(med["fleeced"][field], med["node"][field])),
                     bl.fmt_ratio(bl.ratio(med["fleeced"][field], med["qemu"][field]))])
    table = bl.markdown_table(["metric", "node alone", "session: into fleeced",
                               "session: QEMU's own target", "fleeced/node", "fleeced/qemu"],
                              rows)
    print(f"## attached qcow2 VM, guest-side writes — {args.rounds} round(s), "
          f"{args.runtime:g} s, {bl.human_size(args.size)}, medians\n")
    print(table)
    path = bl.write_results("attach-cbw", {"medians": med, "samples": samples,
                                           "markdown": table}, args.out_dir)
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
