#!/usr/bin/env python3
"""Would a second, low-priority event loop thread take the backup off the
guest's loop?  A measurement of the idea, not of fleeced.

The main thread runs an asyncio loop that wakes every millisecond and records
how late it ran (the guest's loop).  A second thread runs Python in short
bursts with short sleeps between them, the way a loop parsing a backup's
requests would.  Two busy processes keep both CPUs contended, as fio and
nbdcopy do in ``fleece_bench.py``.  The second thread runs at nice 0 and at
nice 19 (what the snapshot workers use), and not at all.

A thread at nice 19 gets CPU only when nothing else wants it, but it still
takes the GIL: when the scheduler preempts it while it holds the GIL, the
main loop cannot run Python until the low-priority thread is scheduled
again.  If the lateness at nice 19 is worse than at nice 0, moving the
backup's parsing to a low-priority thread of the same process would hurt
the guest, not help it.

Usage: python3 bench/gil_priority.py [--seconds 5] [--hogs 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time


def burst(stop: threading.Event, nice: int, ready: threading.Event) -> None:
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    ready.set()
    while not stop.is_set():
        end = time.perf_counter() + 0.0002  # ~200 us of Python: a batch parsed
        x = 0
        while time.perf_counter() < end:
            x += 1
        time.sleep(0.00005)  # waits for its socket


async def lateness(seconds: float) -> list[float]:
    loop = asyncio.get_running_loop()
    late: list[float] = []
    end = loop.time() + seconds
    while loop.time() < end:
        due = time.perf_counter() + 0.001
        await asyncio.sleep(0.001)
        late.append((time.perf_counter() - due) * 1e3)
    return late


def run(nice: int | None, seconds: float) -> list[float]:
    stop = threading.Event()
    ready = threading.Event()
    t = None
    if nice is not None:
        t = threading.Thread(target=burst, args=(stop, nice, ready))
        t.start()
        ready.wait()
    try:
        return asyncio.run(lateness(seconds))
    finally:
        stop.set()
        if t is not None:
            t.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--hogs", type=int, default=2, help="busy processes (CPU contention)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.hogs)]
    try:
        print(f"{args.hogs} busy processes; main loop wakes every 1 ms; lateness in ms")
        print(f"{'second thread':16} {'p50':>7} {'p99':>7} {'p99.9':>7} {'max':>7}")
        for _ in range(args.rounds):
            for label, nice in (("none", None), ("nice 0", 0), ("nice 19", 19)):
                late = sorted(run(nice, args.seconds))
                q = statistics.quantiles(late, n=1000)
                print(f"{label:16} {statistics.median(late):7.2f} {q[989]:7.2f} "
                      f"{q[998]:7.2f} {late[-1]:7.2f}")
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
