"""``fleeced demo``: a fleecing backup end to end, with real NBD clients.

1. make a sample image of random data and keep a reference copy;
2. ``fleeced serve IMAGE --fleece`` (a snapshot taken before any client);
3. a writer (``qemu-io``) overwrites parts of the live disk through the
   active export while ``nbdcopy --progress`` copies the snapshot export;
4. verify the backup equals the reference byte for byte and the live image
   carries the writer's data;
5. print the session summary from ``query-fleece`` and stop the daemon;
6. the hypervisor job: a running QEMU VM's disk goes through
   ``fleeced backup-window`` (attach, snapshot, ``nbdcopy``, detach) while
   the guest keeps writing (HMP ``qemu-io`` on the device), and the backup is
   checked against the disk at snapshot time;
7. an incremental chain: a full backup with checkpoint ``c1``, then two
   incrementals (``--checkpoint NEW --since OLD``) read through
   ``qemu:dirty-bitmap:OLD`` by the reference client
   (:mod:`fleeced.incremental`); each restores the disk at its snapshot;
8. a VM whose disk is qcow2, with a daemon that serves nothing yet: the
   backup window's attach makes the disk from QEMU's export of the node, and
   QEMU copies before write into the daemon while the guest writes; the
   backup is the disk at snapshot time, the image passes ``qemu-img check``
   and holds every guest write.
"""

from __future__ import annotations

import asyncio
import contextlib
import filecmp
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from fleeced.errors import CliError


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
    qemu = _need("qemu-system-x86_64", "qemu-system-x86")
    own = workdir is None
    work = workdir or tempfile.mkdtemp(prefix="fleeced-demo-")
    os.makedirs(work, exist_ok=True)
    try:
        _demo(work, size, qemu_io, nbdcopy)
        _vm_demo(work, min(size, 64 << 20), qemu, nbdcopy)
        _incremental_demo(work, min(size, 64 << 20), qemu_io, nbdcopy)
        _qcow2_vm_demo(work, min(size, 64 << 20), qemu, nbdcopy)
        _say("demo finished OK")
        return 0
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _random_image(path: str, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 << 20)
            f.write(rng.randbytes(n))
            left -= n


def _start_daemon(work: str, cmd: list[str], tag: str) -> tuple[subprocess.Popen[bytes],
                                                                 socket.socket]:
    notify_path = os.path.join(work, f"notify-{tag}.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path)
    _say("starting: fleeced " + " ".join(cmd[3:]))
    daemon = subprocess.Popen(cmd, env=env)
    try:
        _wait_ready(notify, daemon)
    except BaseException:
        daemon.kill()
        daemon.wait()
        notify.close()
        raise
    return daemon, notify


def _stop_daemon(daemon: subprocess.Popen[bytes], notify: socket.socket) -> None:
    daemon.terminate()
    daemon.wait(30)
    notify.close()


def _demo(work: str, size: int, qemu_io: str, nbdcopy: str) -> None:
    image = os.path.join(work, "disk.img")
    reference = os.path.join(work, "reference.img")
    backup = os.path.join(work, "backup.img")
    sock = os.path.join(work, "nbd.sock")
    control = os.path.join(work, "control.sock")
    _say(f"creating a {size >> 20} MiB sample image of random data: {image}")
    _random_image(image, size, 2026)
    rng = random.Random(2027)
    shutil.copyfile(image, reference)

    cmd = [sys.executable, "-m", "fleeced", "serve", image, "-k", sock, "-t",
           "--control", control, "--fleece", "--cache", "16M"]
    daemon, notify = _start_daemon(work, cmd, "lab")
    try:
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
        _stop_daemon(daemon, notify)


def _vm_demo(work: str, size: int, qemu: str, nbdcopy: str) -> None:
    """Back up a running VM's disk with ``fleeced backup-window``."""
    from fleeced.qmp.monitor import connect_sync

    image = os.path.join(work, "vm-vda.img")
    backup = os.path.join(work, "vm-backup.img")
    sock = os.path.join(work, "vm-nbd.sock")
    control = os.path.join(work, "vm-control.sock")
    qmp = os.path.join(work, "vm-qmp.sock")
    writer_qmp = os.path.join(work, "vm-qmp2.sock")
    _say(f"part 2, a running VM: {size >> 20} MiB disk {image}")
    _random_image(image, size, 2028)
    with open(image, "rb") as f:
        model = bytearray(f.read())
    at_snapshot = bytes(model)
    daemon, notify = _start_daemon(work, [
        sys.executable, "-m", "fleeced", "serve", image, "-x", "vda", "-k", sock, "-t",
        "--control", control, "--state-dir", os.path.join(work, "state")], "vm")
    vm_cmd = [qemu, "-S", "-nodefaults", "-display", "none", "-machine", "pc,accel=tcg",
              "-m", "64",
              "-blockdev", f"driver=file,node-name=disk0-file,filename={image}",
              "-blockdev", "driver=raw,node-name=disk0,file=disk0-file",
              "-device", "virtio-blk-pci,id=vda,drive=disk0",
              "-qmp", f"unix:{qmp},server=on,wait=off",
              "-qmp", f"unix:{writer_qmp},server=on,wait=off"]
    _say("starting QEMU: " + " ".join(os.path.basename(a) if a == qemu else a
                                       for a in vm_cmd[:8]) + " ... (no guest OS; "
         "guest writes are HMP qemu-io on the device)")
    vm = subprocess.Popen(vm_cmd, stdout=subprocess.DEVNULL)
    stop = threading.Event()
    written: list[tuple[int, int, int]] = []
    errors: list[str] = []

    def guest_writer() -> None:
        # Writes start once the snapshot exists (the window's fleece start).
        try:
            while not stop.is_set():
                if asyncio.run(_query(control, "query-fleece")):
                    break
                stop.wait(0.05)
            mon = connect_sync(writer_qmp)
            rng = random.Random(7)
            try:
                while not stop.is_set() and len(written) < 300:
                    off = rng.randrange(0, size - 65536) & ~511
                    length = rng.choice([4096, 12288, 65536])
                    pattern = 0x40 + len(written) % 64
                    mon.cmd("human-monitor-command", **{"command-line": (
                        f'qemu-io -d vda/virtio-backend "write -P {pattern} {off} {length}"')})
                    written.append((off, length, pattern))
            finally:
                mon.close()
        except Exception as exc:  # reported by the main thread
            errors.append(str(exc))

    try:
        _wait_for_socket(vm, writer_qmp)
        _backup_window(qmp, control, nbdcopy, backup, guest_writer, stop, errors,
                       writes_first=False)
        stats = asyncio.run(_query(control, "query-stats"))
        through = next(e for e in stats["exports"] if e["name"] == "vda")["bytes-written"]
        _say(f"the guest wrote {len(written)} times while the backup ran; "
             f"{through} bytes of them went through fleeced's copy-before-write "
             "while attached")
        with open(backup, "rb") as f:
            if f.read() != at_snapshot:
                raise CliError("VM backup differs from the disk at snapshot time!")
        _say("verified: VM backup == the disk at snapshot time (byte for byte)")
        for off, length, pattern in written:
            model[off:off + length] = bytes([pattern]) * length
        with open(image, "rb") as f:
            if f.read() != model:
                raise CliError("the VM's disk lost a guest write!")
        _say("verified: the VM's disk holds every guest write; the VM is detached "
             "and back on its own node")
    finally:
        vm.kill()
        vm.wait()
        _stop_daemon(daemon, notify)


def _qcow2_vm_demo(work: str, size: int, qemu: str, nbdcopy: str) -> None:
    """Back up a running VM whose disk is qcow2: the daemon serves nothing
    at first; the attach makes the disk, and QEMU copies before write into
    the daemon while the backup runs."""
    from fleeced.qmp.attach import node_name
    from fleeced.qmp.monitor import connect_sync

    qemu_img = _need("qemu-img", "qemu-utils")
    image = os.path.join(work, "vm2-vda.qcow2")
    raw = os.path.join(work, "vm2-start.raw")
    backup = os.path.join(work, "vm2-backup.img")
    final = os.path.join(work, "vm2-final.raw")
    sock = os.path.join(work, "vm2-nbd.sock")
    control = os.path.join(work, "vm2-control.sock")
    qmp = os.path.join(work, "vm2-qmp.sock")
    writer_qmp = os.path.join(work, "vm2-qmp2.sock")
    _say(f"part 4, a running VM with a qcow2 disk: {size >> 20} MiB {image}")
    _random_image(raw, size, 2030)
    subprocess.run([qemu_img, "convert", "-q", "-f", "raw", "-O", "qcow2", raw, image],
                   check=True)
    with open(raw, "rb") as f:
        model = bytearray(f.read())
    at_snapshot = bytes(model)
    daemon, notify = _start_daemon(work, [
        sys.executable, "-m", "fleeced", "serve", "-k", sock, "-t", "--control", control,
        "--state-dir", os.path.join(work, "vm2-state")], "vm2")
    _say("daemon ready with no disk: the attach makes one from the VM's node")
    vm = subprocess.Popen(
        [qemu, "-nodefaults", "-display", "none", "-machine", "pc,accel=tcg", "-m", "64",
         "-blockdev", f"driver=file,node-name=disk0-file,filename={image}",
         "-blockdev", "driver=qcow2,node-name=disk0,file=disk0-file",
         "-device", "virtio-blk-pci,id=vda,drive=disk0",
         "-qmp", f"unix:{qmp},server=on,wait=off",
         "-qmp", f"unix:{writer_qmp},server=on,wait=off"], stdout=subprocess.DEVNULL,
        # (QEMU warns there that an NBD target names no block size and 64 KiB
        # is used: the size of the daemon's clusters for such a disk.)
        stderr=open(os.path.join(work, "vm2-qemu.log"), "wb"))  # noqa: SIM115
    written: list[tuple[int, int, int]] = []
    try:
        _wait_for_socket(vm, writer_qmp)
        stop = threading.Event()
        errors: list[str] = []

        def guest_writer() -> None:
            # Writes start once QEMU's copy-before-write filter is the
            # device's drive.  The session starts with the VM paused, which
            # stops a guest's writes, but not these: HMP qemu-io writes run
            # in QEMU's main loop, paused or not, so a write between the
            # session's start and the filter's would reach the backup.
            try:
                mon = connect_sync(writer_qmp)
                try:
                    while not stop.is_set() and mon.cmd(
                            "qom-get", path="/machine/peripheral/vda",
                            property="drive") != node_name("vda"):
                        stop.wait(0.05)
                    for i in range(32):
                        off = (i * 37 * 65536) % (size - 65536)
                        mon.cmd("human-monitor-command", **{"command-line": (
                            f'qemu-io -d vda/virtio-backend "write -P {0x70 + i} {off} 65536"')})
                        written.append((off, 65536, 0x70 + i))
                finally:
                    mon.close()
            except Exception as exc:  # reported by the main thread
                errors.append(str(exc))

        _backup_window(qmp, control, nbdcopy, backup, guest_writer, stop, errors,
                       writes_first=True)
        _say(f"the guest wrote {len(written)} times into its qcow2 while the window was "
             "open; QEMU copied the old data into fleeced first")
        with open(backup, "rb") as f:
            if f.read() != at_snapshot:
                raise CliError("qcow2 VM backup differs from the disk at snapshot time!")
        _say("verified: the backup == the qcow2 disk at snapshot time (byte for byte)")
        mon = connect_sync(writer_qmp)
        try:
            mon.cmd("quit")
        finally:
            # QEMU may hang up as soon as it answered: qemu.qmp's close then
            # meets the end of the stream.
            with contextlib.suppress(EOFError):
                mon.close()
        vm.wait(30)
        subprocess.run([qemu_img, "check", "-q", image], check=True)
        subprocess.run([qemu_img, "convert", "-f", "qcow2", "-O", "raw", image, final],
                       check=True)
        for off, length, pattern in written:
            model[off:off + length] = bytes([pattern]) * length
        with open(final, "rb") as f:
            if f.read() != model:
                raise CliError("the qcow2 disk lost a guest write!")
        _say("verified: the qcow2 image is clean (qemu-img check) and holds every "
             "guest write")
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
        _stop_daemon(daemon, notify)


def _wait_for_socket(vm: subprocess.Popen[bytes], path: str) -> None:
    """Until QEMU has created its QMP socket PATH (30 s at most)."""
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if vm.poll() is not None or time.monotonic() > deadline:
            raise CliError("QEMU did not start")
        time.sleep(0.05)


def _backup_window(qmp: str, control: str, nbdcopy: str, backup: str,
                   guest_writer: Callable[[], None], stop: threading.Event,
                   errors: list[str], *, writes_first: bool) -> None:
    """``fleeced backup-window vda`` around ``nbdcopy`` while GUEST_WRITER
    runs in a thread (stopped with the window, or, WRITES_FIRST, left to
    finish its writes first)."""
    writer = threading.Thread(target=guest_writer)
    writer.start()
    window = [sys.executable, "-m", "fleeced", "backup-window", "vda", "--qmp", qmp,
              "--device", "vda", "--control", control, "--",
              nbdcopy, "--progress", "{uri}", backup]
    _say("fleeced " + " ".join(window[3:]))
    try:
        rc = subprocess.run(window).returncode
    finally:
        if writes_first:
            writer.join(120)
        stop.set()
        writer.join(60)
    if rc != 0 or errors:
        raise CliError(f"backup-window failed (exit {rc}) {'; '.join(errors)}")


def _incremental_demo(work: str, size: int, qemu_io: str, nbdcopy: str) -> None:
    """Full backup + two incrementals through the CLI; each one restores."""
    from fleeced.incremental import apply_incremental

    image = os.path.join(work, "inc-disk.img")
    sock = os.path.join(work, "inc-nbd.sock")
    control = os.path.join(work, "inc-control.sock")
    _say(f"part 3, incremental backups: {size >> 20} MiB disk {image}")
    _random_image(image, size, 2029)
    daemon, notify = _start_daemon(work, [
        sys.executable, "-m", "fleeced", "serve", image, "-x", "disk", "-k", sock, "-t",
        "--control", control, "--state-dir", os.path.join(work, "inc-state")], "inc")
    url = f"nbd+unix:///disk?socket={sock}"
    snap = f"nbd+unix:///disk@fleece?socket={sock}"
    rng = random.Random(11)

    def cli(*argv: str) -> None:
        _say("fleeced " + " ".join(argv))
        subprocess.run([sys.executable, "-m", "fleeced", *argv, "--control", control],
                       check=True, stdout=subprocess.DEVNULL)

    def guest_writes(n: int) -> None:
        script: list[str] = []
        for i in range(n):
            off = rng.randrange(0, size - 65536) & ~511
            script += ["-c", f"write -P {0x60 + i % 32} {off} {rng.choice([512, 4096, 65536])}"]
        subprocess.run([qemu_io, "-f", "raw", *script, url], check=True,
                       stdout=subprocess.DEVNULL)

    def at_snapshot() -> bytes:
        with open(image, "rb") as f:
            return f.read()

    try:
        cli("fleece", "start", "disk", "--checkpoint", "c1")
        reference = at_snapshot()
        guest_writes(20)  # lands after the snapshot: not in the full backup
        backup = os.path.join(work, "inc-full.img")
        subprocess.run([nbdcopy, snap, backup], check=True)
        cli("fleece", "stop", "disk")
        with open(backup, "rb") as f:
            if f.read() != reference:
                raise CliError("full backup differs from the disk at its snapshot!")
        _say("full backup == disk at snapshot c1")
        for step, (old, new) in enumerate((("c1", "c2"), ("c2", "c3")), start=1):
            guest_writes(30)
            cli("fleece", "start", "disk", "--checkpoint", new, "--since", old)
            reference = at_snapshot()
            guest_writes(10)  # during the backup: CBW keeps the snapshot
            incremental = os.path.join(work, f"inc-{step}.img")
            shutil.copyfile(backup, incremental)
            copied = asyncio.run(apply_incremental(sock, "disk@fleece", old, incremental))
            cli("fleece", "stop", "disk")
            cli("bitmap", "remove", "disk", old)
            with open(incremental, "rb") as f:
                if f.read() != reference:
                    raise CliError(f"incremental {step} differs from the disk at {new}!")
            _say(f"incremental {step}: read {copied >> 10} KiB of {size >> 10} KiB "
                 f"(only what {old} marked dirty); restores the disk at snapshot {new}")
            backup = incremental
    finally:
        _stop_daemon(daemon, notify)
