"""``fleeced demo``: a fleecing backup end to end, with real NBD clients.

1. make a sample image of random data and keep a reference copy;
2. ``fleeced serve IMAGE --fleece`` (a snapshot taken before any client);
3. a writer (``qemu-io``) overwrites parts of the live disk through the
   active export while ``nbdcopy --progress`` copies the snapshot export;
4. verify the backup equals the reference byte for byte and the live image
   carries the writer's data;
5. print the session summary from ``query-fleece`` and stop the daemon.
"""

from __future__ import annotations

import asyncio
import filecmp
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Any

from fleeced.cli import CliError


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise CliError(f"the demo needs {tool} (apt-get install {package})")
    return path


def _say(text: str) -> None:
    print(f"==> {text}", flush=True)


def _wait_ready(notify: socket.socket, proc: subprocess.Popen[bytes]) -> None:
    notify.settimeout(30)
    while True:
        try:
            msg = notify.recv(4096)
        except TimeoutError:
            raise CliError("the daemon did not become ready in 30 s") from None
        if b"READY=1" in msg.split(b"\n"):
            return
        if proc.poll() is not None:
            raise CliError("the daemon exited during start-up")


async def _query(control: str, cmd: str, args: dict[str, Any] | None = None) -> Any:
    from fleeced.control.client import ControlClient

    async with ControlClient.connect_to(control) as client:
        return await client.execute(cmd, args or {})


def run_demo(workdir: str | None, size: int) -> int:
    """Run the demo in WORKDIR (a temp dir when None).

    :raise CliError: when a tool is missing or a step fails.
    """
    qemu_io = _need("qemu-io", "qemu-utils")
    nbdcopy = _need("nbdcopy", "libnbd-bin")
    own = workdir is None
    work = workdir or tempfile.mkdtemp(prefix="fleeced-demo-")
    os.makedirs(work, exist_ok=True)
    try:
        return _demo(work, size, qemu_io, nbdcopy)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _demo(work: str, size: int, qemu_io: str, nbdcopy: str) -> int:
    image = os.path.join(work, "disk.img")
    reference = os.path.join(work, "reference.img")
    backup = os.path.join(work, "backup.img")
    sock = os.path.join(work, "nbd.sock")
    control = os.path.join(work, "control.sock")
    _say(f"creating a {size >> 20} MiB sample image of random data: {image}")
    rng = random.Random(2026)
    with open(image, "wb") as f:
        left = size
        while left:
            n = min(left, 4 << 20)
            f.write(rng.randbytes(n))
            left -= n
    shutil.copyfile(image, reference)

    notify_path = os.path.join(work, "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path)
    cmd = [sys.executable, "-m", "fleeced", "serve", image, "-k", sock, "-t",
           "--control", control, "--fleece", "--cache", "16M"]
    _say("starting: fleeced " + " ".join(cmd[3:]))
    daemon = subprocess.Popen(cmd, env=env)
    try:
        _wait_ready(notify, daemon)
        _say("daemon ready; exports: disk (active, read-write), disk@fleece (snapshot)")
        url_active = f"nbd+unix:///disk?socket={sock}"
        url_snap = f"nbd+unix:///disk@fleece?socket={sock}"
        writes = []
        for i in range(64):
            off = rng.randrange(0, size - 65536) & ~4095
            writes.append(f"write -P {0x40 + i % 64} {off} {rng.choice([4096, 65536])}")
        script = []
        for w in writes:
            script += ["-c", w]
        _say(f"writer: {len(writes)} writes through the active export while the backup runs")
        writer = subprocess.Popen([qemu_io, "-f", "raw", *script, url_active],
                                  stdout=subprocess.DEVNULL)
        _say("backup: nbdcopy of the snapshot export")
        subprocess.run([nbdcopy, "--progress", url_snap, backup], check=True)
        if writer.wait() != 0:
            raise CliError("the writer (qemu-io) failed")
        # A second round of writes after the copy still leaves the backup alone.
        if not filecmp.cmp(backup, reference, shallow=False):
            raise CliError("backup differs from the image at session start!")
        _say("verified: backup == image at session start (byte for byte)")
        if filecmp.cmp(image, reference, shallow=False):
            raise CliError("the live image did not change: the writer did nothing?")
        _say("verified: the live image carries the writer's new data")
        sessions = asyncio.run(_query(control, "query-fleece"))
        for s in sessions:
            c = s["clusters"]
            print(f"    session {s['disk']}@{s['name']}: state {s['state']}, "
                  f"clusters total {c['total']}, copied {c['copied']}, "
                  f"CBW {s['cbw-count']} x ({s['cbw-bytes']} bytes), "
                  f"temp used {s['temp-bytes']} bytes, cache {s['cache-bytes']} bytes, "
                  f"reads from cache/temp/source: {s['reads']['cache']}/"
                  f"{s['reads']['temp']}/{s['reads']['source']} bytes")
        asyncio.run(_query(control, "fleece-stop", {"disk": "disk", "name": "fleece"}))
        _say("session stopped; temp store freed")
    finally:
        daemon.terminate()
        daemon.wait(30)
        notify.close()
    _say("demo finished OK")
    return 0
