"""A real QEMU VM for the attach tests (``qemu-system-x86_64`` from Debian).

The VM has no guest OS.  Guest writes are simulated with HMP ``qemu-io -d
<device>/virtio-backend``, which goes through the device's BlockBackend like
a guest request.  Two QMP sockets: ``qmp`` for the daemon (a QMP chardev
serves one client at a time) and ``test_qmp`` for the test itself.

``paused=False`` lets SeaBIOS run: it drives the virtio-blk device, which
starts an ``iothread=`` device's dataplane (and moves its BlockBackend into
the iothread's AioContext), as a real guest would.  SeaBIOS's debug port
log tells when it got that far.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError

from fleeced.qmp.monitor import connect_sync
from tests.conftest import requires


class QmpError(Exception):
    """QEMU answered with an error."""


class Vm:
    """A running ``qemu-system-x86_64`` with one virtio-blk disk ``vda``."""

    def __init__(self, tmp: Path, image: Path, *, iothread: bool = False,
                 cache_direct: bool = False, paused: bool = True, name: str = "vm",
                 fmt: str = "raw", blockdev: list[str] | None = None) -> None:
        """:param blockdev: the disk's -blockdev arguments, the top node
            named disk0 (default: FMT over the file IMAGE)."""
        qemu = requires("qemu-system-x86_64")
        self.tmp = tmp
        self.image = image
        self.qmp = str(tmp / f"{name}-qmp.sock")
        self.test_qmp = str(tmp / f"{name}-tqmp.sock")
        self.bios_log = tmp / f"{name}-bios.log"
        self.log_path = tmp / f"{name}-qemu.log"
        self.out = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        direct = ",cache.direct=on" if cache_direct else ""
        nodes = blockdev or [
            "-blockdev", f"driver=file,node-name=disk0-file,filename={image}{direct}",
            "-blockdev", f"driver={fmt},node-name=disk0,file=disk0-file{direct}"]
        cmd = [qemu, "-nodefaults", "-display", "none", "-machine", "pc,accel=tcg",
               "-m", "64", *nodes,
               "-qmp", f"unix:{self.qmp},server=on,wait=off",
               "-qmp", f"unix:{self.test_qmp},server=on,wait=off",
               "-chardev", f"file,id=dbg,path={self.bios_log}",
               "-device", "isa-debugcon,iobase=0x402,chardev=dbg"]
        if iothread:
            cmd += ["-object", "iothread,id=io0",
                    "-device", "virtio-blk-pci,id=vda,drive=disk0,iothread=io0"]
        else:
            cmd += ["-device", "virtio-blk-pci,id=vda,drive=disk0"]
        if paused:
            cmd.append("-S")
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT)
        self._wait_socket(self.test_qmp)

    def _wait_socket(self, path: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not Path(path).exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited: {self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError("QEMU did not create its QMP socket")
            time.sleep(0.02)

    def wait_bios_drove_disk(self, timeout: float = 60) -> None:
        """Block until SeaBIOS has initialized virtio-blk (and tried to boot it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.bios_log.read_text(errors="replace") if self.bios_log.exists() else ""
            if "Booting from Hard Disk" in text or "No bootable device" in text:
                return
            time.sleep(0.1)
        raise AssertionError(f"SeaBIOS never reached the disk: {text[-2000:]}")

    def execute(self, cmd: str, **args: Any) -> Any:
        """One QMP command on the test's own socket (connect, run, close)."""
        mon = connect_sync(self.test_qmp)
        mon.settimeout(120)
        try:
            return mon.cmd(cmd, **args)
        except ExecuteError as exc:
            raise QmpError(exc.error.error.desc) from None
        finally:
            mon.close()

    def drive(self) -> str:
        value = self.execute("qom-get", path="/machine/peripheral/vda", property="drive")
        assert isinstance(value, str)
        return value

    def node_names(self) -> set[str]:
        return {n["node-name"] for n in self.execute("query-named-block-nodes", flat=True)}

    def write(self, offset: int, length: int, pattern: int) -> None:
        """A guest write through the device (HMP qemu-io; waits for completion).

        qemu-io prints to QEMU's stdout, not the HMP reply: success is the
        ``wrote`` line appearing there.
        """
        done = f"wrote {length}/{length} bytes at offset {offset}\n"
        before = self.log().count(done)
        self.qemu_io(f"write -P {pattern:#x} {offset} {length}")
        text = self.log()
        assert text.count(done) > before, f"write {offset}+{length} failed: {text[-1000:]}"

    def qemu_io(self, command: str) -> None:
        out = self.execute("human-monitor-command",
                           **{"command-line": f'qemu-io -d vda/virtio-backend "{command}"'})
        assert out == "", out  # errors come back here; success output goes to stdout

    def log(self) -> str:
        """QEMU's stdout and stderr so far (qemu-io output lands here)."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
