#!/usr/bin/env python3
"""How fast can any Python event-loop NBD server answer small requests?

Runs fio 4k randread/randwrite at iodepth 1 and 16 against three servers on
the same page-cached image, in rotating order, several rounds:

- ``floor``: the smallest uvloop NBD server this script can be (below,
  ``--serve``): one Protocol, fixed-newstyle handshake, simple replies, no
  validation beyond the magic, and READ/WRITE done *inline* on the loop with
  ``os.pread``/``os.pwrite``.  It is not a server anyone should run (a write
  blocks the loop on the disk; nothing is bounded), only the least Python
  work per request that the decided stack (asyncio + uvloop) allows;
- ``fleeced serve`` (the real data path: validation, structured replies,
  bounds, writes in C workers);
- ``nbdkit file`` (C threads doing recv/pread/send).

It prints medians of IOPS and of server CPU per IO and the ratios
floor/nbdkit and fleeced/floor: the first is the ceiling of the stack at that
depth, the second how much of it fleeced uses.

    python3 bench/loop_floor.py                     # 3 rounds, 5 s fio
    python3 bench/loop_floor.py --rounds 1 --runtime 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import struct
import sys
from pathlib import Path
from typing import Any

SERVERS = ("floor", "fleeced", "nbdkit")
# name, fio rw, iodepth
WORKLOADS = (("randread-qd1", "randread", 1), ("randwrite-qd1", "randwrite", 1),
             ("randread-qd16", "randread", 16), ("randwrite-qd16", "randwrite", 16))

# --- the floor server (proto.md, the fewest steps a client accepts) --------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC_OPT = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_GO = 1, 7
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, 0x80000001
INFO_EXPORT = 0
TFLAGS = 0x1 | 0x4  # HAS_FLAGS | SEND_FLUSH
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3

_req = struct.Struct(">IHHQQI")
_reply = struct.Struct(">IIQ")
_opt = struct.Struct(">QII")
_optrep = struct.Struct(">QIII")


class FloorProtocol(asyncio.Protocol):
    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.buf = bytearray()
        self.phase = 0  # 0 client flags, 1 options, 2 transmission
        self.tr: Any = None

    def connection_made(self, transport: Any) -> None:
        self.tr = transport
        transport.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                    FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.phase < 2:
            self._handshake()
            if self.phase < 2:
                return
        pos, n, out = 0, len(buf), []
        fd = self.fd
        while n - pos >= 28:
            _magic, _flags, cmd, handle, off, length = _req.unpack_from(buf, pos)
            if cmd == CMD_READ:
                out.append(_reply.pack(SIMPLE_REPLY_MAGIC, 0, handle))
                out.append(os.pread(fd, length, off))
                pos += 28
            elif cmd == CMD_WRITE:
                if n - pos < 28 + length:
                    break
                os.pwrite(fd, memoryview(buf)[pos + 28:pos + 28 + length], off)
                out.append(_reply.pack(SIMPLE_REPLY_MAGIC, 0, handle))
                pos += 28 + length
            elif cmd == CMD_FLUSH:
                os.fdatasync(fd)
                out.append(_reply.pack(SIMPLE_REPLY_MAGIC, 0, handle))
                pos += 28
            else:  # DISC or anything else
                self.tr.close()
                return
        del buf[:pos]
        if out:
            self.tr.writelines(out)

    def _handshake(self) -> None:
        buf = self.buf
        if self.phase == 0:
            if len(buf) < 4:
                return
            del buf[:4]
            self.phase = 1
        while self.phase == 1 and len(buf) >= 16:
            _magic, opt, ln = _opt.unpack_from(buf, 0)
            if len(buf) < 16 + ln:
                return
            del buf[:16 + ln]
            size_flags = struct.pack(">QH", self.size, TFLAGS)
            if opt == OPT_EXPORT_NAME:
                self.tr.write(size_flags)
                self.phase = 2
            elif opt == OPT_GO:
                info = struct.pack(">H", INFO_EXPORT) + size_flags
                self.tr.write(_optrep.pack(REPLY_MAGIC_OPT, opt, REP_INFO, len(info)) + info)
                self.tr.write(_optrep.pack(REPLY_MAGIC_OPT, opt, REP_ACK, 0))
                self.phase = 2
            else:
                self.tr.write(_optrep.pack(REPLY_MAGIC_OPT, opt, REP_ERR_UNSUP, 0))


def serve(image: str, sock: str) -> None:
    import uvloop

    fd = os.open(image, os.O_RDWR)
    size = os.fstat(fd).st_size

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: FloorProtocol(fd, size), sock)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


# --- the driver ------------------------------------------------------------

def server_command(name: str, args: argparse.Namespace, image: Path, sock: Path) -> list[str]:
    if name == "floor":
        return [args.python, os.path.abspath(__file__), "--serve", str(image), str(sock)]
    if name == "fleeced":
        return [*args.fleeced, "serve", str(image), "-k", str(sock), "-t", "--no-control",
                "-e", "0"]
    if name == "nbdkit":
        return ["nbdkit", "-f", "-U", str(sock), "file", str(image)]
    raise ValueError(name)


def bench(args: argparse.Namespace) -> int:
    import benchlib as bl

    bl.require_tools(["fio", "nbdkit", "sync", "cp"])
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    image = bl.ensure_random_image(work / f"serve-{bl.human_size(args.size)}.img", args.size)
    bl.warm_page_cache(image)
    sock = work / "floor.sock"
    commands = {s: server_command(s, args, image, sock) for s in SERVERS}
    samples: dict[str, dict[str, list[dict[str, float]]]] = {s: {} for s in SERVERS}
    for rnd in range(args.rounds):
        order = SERVERS[rnd % 3:] + SERVERS[:rnd % 3]
        bl.log(f"round {rnd + 1}/{args.rounds}: {' '.join(order)}")
        for name in order:
            with bl.Server(name, commands[name], sock, work / f"floor-{name}.log") as srv:
                uri = bl.nbd_uri(sock, image.stem)
                for wl, rw, depth in WORKLOADS:
                    cpu0 = srv.cpu_seconds()
                    res = bl.fio(uri, rw=rw, bs="4k", iodepth=depth, runtime=args.runtime,
                                 size=args.size)
                    srv.check_alive()
                    res["cpu_us_per_io"] = (srv.cpu_seconds() - cpu0) * 1e6 / max(res["ios"], 1)
                    samples[name].setdefault(wl, []).append(res)
                    if "write" in rw:
                        bl.sync()
                    bl.log(f"  {name:8} {wl:15} iops={res['iops']:.0f} "
                           f"cpu={res['cpu_us_per_io']:.1f}us/io")

    def med(name: str, wl: str, field: str) -> float | None:
        return bl.median([r[field] for r in samples[name].get(wl, [])])

    rows = []
    for wl, _rw, _depth in WORKLOADS:
        for field, label in (("iops", "IOPS"), ("cpu_us_per_io", "server CPU µs/IO")):
            v = {s: med(s, wl, field) for s in SERVERS}
            rows.append([f"{wl} {label}", *(bl.fmt(v[s]) for s in SERVERS),
                         bl.fmt_ratio(bl.ratio(v["floor"], v["nbdkit"])),
                         bl.fmt_ratio(bl.ratio(v["fleeced"], v["floor"]))])
    table = bl.markdown_table(["metric", *SERVERS, "floor/nbdkit", "fleeced/floor"], rows)
    print(f"## Python event-loop floor — {args.rounds} round(s), fio {args.runtime:g} s, "
          f"image {bl.human_size(args.size)}, medians\n")
    print(table)
    path = bl.write_results("floor", {
        "config": {"rounds": args.rounds, "runtime_s": args.runtime, "size": args.size,
                   "commands": {s: shlex.join(c) for s, c in commands.items()}},
        "samples": samples, "markdown": table,
    }, args.out_dir)
    print(f"\nJSON: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--serve"]:
        if len(argv) != 3:
            print("usage: loop_floor.py --serve IMAGE SOCKET", file=sys.stderr)
            return 2
        serve(argv[1], argv[2])
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import benchlib as bl

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--runtime", type=float, default=5.0, help="fio seconds per job (default 5)")
    p.add_argument("--size", type=bl.parse_size, default=1 << 30, help="image size (default 1G)")
    p.add_argument("--fleeced", type=shlex.split, default=bl.default_fleeced_cmd(),
                   metavar="CMD", help="how to run fleeced (default: this python -m fleeced)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter with uvloop for the floor server (default: this one)")
    p.add_argument("--work-dir", type=Path, default=bl.DEFAULT_WORK_DIR)
    p.add_argument("--out-dir", type=Path, default=bl.RESULTS_DIR)
    args = p.parse_args(argv)
    try:
        return bench(args)
    except bl.BenchError as exc:
        print(f"loop_floor: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
