#!/usr/bin/env python3
"""Guest-write overhead of dirty bitmaps on the active export.

One ``fleeced serve`` (with a state dir, so the bitmaps are persistent
files); each round runs fio 4k randwrite QD16 against the active export
with no bitmap and with two enabled bitmaps (64 KiB and 4 KiB granularity),
in alternating order.  Reports the median IOPS of each and the overhead
(target: at most 3 %).  Only ratios from the same run mean anything.

    .venv/bin/python bench/bitmap_bench.py                 # 5 rounds, 5 s, 1 GiB
    .venv/bin/python bench/bitmap_bench.py --rounds 1 --runtime 2 --size 256M
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

import benchlib as bl

BITMAPS = (("b64k", 65536), ("b4k", 4096))


async def _control(path: str, cmd: str, args: dict[str, Any]) -> Any:
    from qemu.qmp import QMPClient

    client = QMPClient("bitmap-bench")
    await client.connect(path)
    try:
        return await client.execute(cmd, args)
    finally:
        await client.disconnect()


def control(path: str, cmd: str, args: dict[str, Any]) -> Any:
    return asyncio.run(_control(path, cmd, args))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runtime", type=float, default=5.0, help="fio seconds per run")
    p.add_argument("--size", type=bl.parse_size, default=1 << 30)
    p.add_argument("--work-dir", type=Path, default=Path("/var/tmp/fleeced-bench"))
    args = p.parse_args()
    bl.require_tools(["fio"])
    args.work_dir.mkdir(parents=True, exist_ok=True)
    image = bl.ensure_random_image(args.work_dir / f"bitmap-{args.size}.img", args.size)
    bl.warm_page_cache(image)
    sock = args.work_dir / "bitmap-bench.sock"
    samples: dict[str, list[float]] = {"none": [], "two": []}
    with tempfile.TemporaryDirectory(prefix="fleeced-bitmap-bench-") as tmp:
        ctl = str(Path(tmp) / "ctl.sock")
        cmd = [*bl.default_fleeced_cmd(), "serve", str(image), "-x", "disk", "-k", str(sock),
               "-t", "--control", ctl, "--state-dir", str(Path(tmp) / "state")]
        uri = bl.nbd_uri(sock, "disk")
        with bl.Server("fleeced", cmd, sock, args.work_dir / "bitmap-bench.log"):
            for rnd in range(args.rounds):
                order = ("none", "two") if rnd % 2 == 0 else ("two", "none")
                for config in order:
                    for name, granularity in BITMAPS:
                        if config == "two":
                            control(ctl, "bitmap-add", {"disk": "disk", "name": name,
                                                        "granularity": granularity})
                    res = bl.fio(uri, rw="randwrite", bs="4k", iodepth=16,
                                 runtime=args.runtime, size=args.size)
                    samples[config].append(res["iops"])
                    bl.log(f"round {rnd + 1}/{args.rounds} {config:>4} bitmaps: "
                           f"{res['iops']:.0f} IOPS")
                    if config == "two":
                        dirty = control(ctl, "query-bitmaps", {})
                        bl.log("  dirty: " + ", ".join(
                            f"{b['name']} {bl.human_size(b['dirty-bytes'])}" for b in dirty))
                        for name, _ in BITMAPS:
                            control(ctl, "bitmap-remove", {"disk": "disk", "name": name})
    none = bl.median(samples["none"])
    two = bl.median(samples["two"])
    overhead = None if not none or two is None else (1 - two / none) * 100
    table = bl.markdown_table(
        ["fio 4k randwrite QD16", "IOPS (median)", "samples"],
        [["no bitmap", bl.fmt(none, 0), ", ".join(f"{v:.0f}" for v in samples["none"])],
         ["two bitmaps (64K, 4K)", bl.fmt(two, 0),
          ", ".join(f"{v:.0f}" for v in samples["two"])]])
    verdict = "n/a" if overhead is None else (
        f"{overhead:.1f} % ({'met' if overhead <= 3 else 'missed'}: target <= 3 %)")
    print(f"## dirty bitmap overhead — {args.rounds} round(s), fio {args.runtime:g} s, "
          f"{bl.human_size(args.size)}\n\n{table}\n\noverhead of two bitmaps: {verdict}")
    path = bl.write_results("bitmap", {"args": {k: str(v) for k, v in vars(args).items()},
                                       "samples": samples, "overhead_pct": overhead})
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
