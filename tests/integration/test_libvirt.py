"""libvirt-managed VMs: a real libvirtd and virtlogd (Debian 12's monolithic
daemon, started here when none runs; no systemd), a transient TCG domain
with a raw disk (``cache='none'``) and a qcow2 disk, attached with
``--libvirt`` (QMP through libvirt's monitor passthrough: no second
``-qmp``), backed up, backed up by libvirt itself, and destroyed.

Guest writes are HMP ``qemu-io`` through libvirt's passthrough on the disk's
device (libvirt names it ``virtio-disk<N>``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from tests.conftest import Daemon, requires, run
from tests.integration.test_attach import patterned, read_export, wait_for
from tests.integration.test_cli import fleeced
from tests.integration.test_fleece import qmp

pytestmark = pytest.mark.integration

URI = "qemu:///system"
SIZE = 8 << 20
M = 1 << 20
LIBVIRT_SOCK = "/run/libvirt/libvirt-sock"


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """libvirtd and virtlogd, started unless they run already."""
    for tool in ("libvirtd", "virtlogd", "virsh"):
        requires(tool)
    try:
        import libvirt  # noqa: F401 - the daemon's --libvirt needs the binding
    except ImportError:
        pytest.fail("libvirt-python is missing (a test extra)")
    # Debian's udev rule gives /dev/kvm to group kvm (libvirt-qemu is in it);
    # where no udev ran it is root's alone, and libvirt then takes its cached
    # QEMU capabilities as stale and probes every QEMU binary again at each
    # domain start (48 s here).  TCG domains either way.
    if os.path.exists("/dev/kvm"):
        shutil.chown("/dev/kvm", group="kvm")
        os.chmod("/dev/kvm", 0o660)
    run_dir = tmp_path_factory.mktemp("libvirtd")
    started: list[Path] = []
    if not _listening("/run/libvirt/virtlogd-sock"):
        pid = run_dir / "virtlogd.pid"
        run(shutil.which("virtlogd") or "virtlogd", "-d", "-p", str(pid))
        started.append(pid)
    if not _listening(LIBVIRT_SOCK):
        pid = run_dir / "libvirtd.pid"
        run(shutil.which("libvirtd") or "libvirtd", "-d", "-p", str(pid))
        started.append(pid)
        deadline = time.monotonic() + 60
        while not _listening(LIBVIRT_SOCK):
            assert time.monotonic() < deadline, "libvirtd did not come up"
            time.sleep(0.1)
    yield
    for pid in reversed(started):
        try:
            os.kill(int(pid.read_text()), 15)
        except (OSError, ValueError):
            pass


class Domain:
    """A transient libvirt domain with disks vda (raw, cache none) and vdb
    (qcow2), images in a directory QEMU's user can reach."""

    def __init__(self, name: str, where: Path) -> None:
        self.name = name
        self.dir = where
        self.raw = where / "a.img"
        self.qcow2 = where / "b.qcow2"
        xml = where / "domain.xml"
        xml.write_text(f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>{requires('qemu-system-x86_64')}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='{self.raw}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{self.qcow2}'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
""")
        run(requires("virsh"), "-c", URI, "create", str(xml))

    def hmp(self, line: str) -> str:
        return run(requires("virsh"), "-c", URI, "qemu-monitor-command", "--hmp", self.name,
                   line).stdout.strip()

    def write(self, dev: int, offset: int, length: int, pattern: int) -> None:
        """A guest write on virtio-disk<DEV>: its result is checked in the
        images at the end (qemu-io prints to QEMU's log, not the reply)."""
        out = self.hmp(f'qemu-io -d virtio-disk{dev}/virtio-backend '
                       f'"write -P {pattern:#x} {offset} {length}"')
        assert out == "", out

    def destroy(self) -> None:
        subprocess.run([requires("virsh"), "-c", URI, "destroy", self.name],
                       capture_output=True, timeout=60)

    def running(self) -> bool:
        proc = subprocess.run([requires("virsh"), "-c", URI, "domstate", self.name],
                              capture_output=True, text=True, timeout=60)
        return proc.returncode == 0 and "running" in proc.stdout


@pytest.fixture
def domain(libvirtd: None) -> Iterator[Domain]:
    where = Path(tempfile.mkdtemp(prefix="fleeced-libvirt-", dir="/var/tmp"))
    where.chmod(0o755)  # libvirt's QEMU runs as libvirt-qemu
    a, b = where / "a.img", where / "b.qcow2"
    run(requires("qemu-img"), "create", "-q", "-f", "raw", str(a), str(SIZE))
    run(requires("qemu-io"), "-f", "raw", "-c", f"write -P 0x21 0 {2 * M}", str(a))
    run(requires("qemu-img"), "create", "-q", "-f", "qcow2", str(b), str(SIZE))
    run(requires("qemu-io"), "-f", "qcow2", "-c", f"write -P 0x31 0 {2 * M}", str(b))
    dom = Domain(f"fleeced-test-{secrets.token_hex(4)}", where)
    yield dom
    dom.destroy()
    shutil.rmtree(where, ignore_errors=True)


def attach(d: Daemon, dom: Domain, disk: str) -> None:
    proc = fleeced("attach", disk, "--libvirt", dom.name, "--device", disk,
                   "--control", d.control)
    assert proc.returncode == 0, proc.stderr
    assert "cbw" in proc.stdout, proc.stdout


def qcow2_bytes(path: Path, out: Path) -> bytes:
    run(requires("qemu-img"), "convert", "-U", "-f", "qcow2", "-O", "raw", str(path), str(out))
    return out.read_bytes()


def test_libvirt_domain(tmp_path: Path, domain: Domain,
                        start_daemon: Callable[..., Daemon]) -> None:
    """A libvirt domain attached through libvirt itself: a backup window on
    its raw cache='none' disk while the guest writes; a fleecing session on
    its qcow2 disk with libvirt's own backup job running meanwhile (both
    backups right); QEMU's user kept out of the socket gets told how to let
    it in; and ``virsh destroy`` ends the attachment by itself."""
    raw0 = patterned(bytes(SIZE), 0, 2 * M, 0x21)
    qcow0 = patterned(bytes(SIZE), 0, 2 * M, 0x31)

    # The domain's raw image served by the daemon: not switched away from
    # libvirt's node (libvirt's backup jobs would copy new data).
    closed = start_daemon(str(domain.raw), "-x", "vda")
    proc = fleeced("attach", "vda", "--libvirt", domain.name, "--device", "vda",
                   "--control", closed.control)
    assert proc.returncode == 1 and "libvirt's own backup" in proc.stderr, proc.stderr
    # The default socket mode keeps libvirt-qemu out: the session says so.
    attach(closed, domain, "vdb")
    with pytest.raises(ExecuteError, match="--socket-group"):
        qmp(closed, "fleece-start", {"disk": "vdb"})
    assert fleeced("detach", "vdb", "--control", closed.control).returncode == 0
    closed.proc.terminate()
    closed.proc.wait(30)

    # The socket where QEMU's user can reach it (not under pytest's 0700 tmp).
    d = start_daemon("--socket-group", "kvm", sock=str(domain.dir / "nbd.sock"))
    # A backup window on vda: the command writes in the guest, then copies.
    backup = tmp_path / "vda.backup"
    script = tmp_path / "backup.sh"
    script.write_text(
        f"#!/bin/sh\nset -e\n"
        f"{requires('virsh')} -c {URI} qemu-monitor-command --hmp {domain.name} "
        f"'qemu-io -d virtio-disk0/virtio-backend \"write -P 0x77 {M} {M}\"' >/dev/null\n"
        f"exec {requires('nbdcopy')} \"$FLEECED_URI\" {backup}\n")
    script.chmod(0o755)
    proc = fleeced("backup-window", "vda", "--libvirt", domain.name, "--device", "vda",
                   "--control", d.control, "--", str(script), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert backup.read_bytes() == raw0
    raw = patterned(raw0, M, M, 0x77)

    # A fleecing session on vdb, and libvirt's own backup job meanwhile.
    attach(d, domain, "vdb")
    qmp(d, "fleece-start", {"disk": "vdb"})
    domain.write(1, 0, M, 0x44)
    qcow = patterned(qcow0, 0, M, 0x44)
    libvirt_backup = domain.dir / "vdb.libvirt"  # libvirt creates it as QEMU's user
    job = tmp_path / "backup.xml"
    job.write_text(f"""<domainbackup><disks>
  <disk name='vda' backup='no'/>
  <disk name='vdb' type='file'><target file='{libvirt_backup}'/><driver type='raw'/></disk>
</disks></domainbackup>""")
    run(requires("virsh"), "-c", URI, "backup-begin", domain.name, str(job))
    domain.write(1, M // 2, M, 0x55)
    at_libvirt_backup = qcow

    def job_done() -> bool:
        out = run(requires("virsh"), "-c", URI, "domjobinfo", domain.name).stdout
        return "None" in out.split("Job type:", 1)[-1].splitlines()[0]

    wait_for(job_done, 120)
    qcow = patterned(qcow, M // 2, M, 0x55)
    assert libvirt_backup.read_bytes() == at_libvirt_backup
    assert read_export(d, "vdb@fleece", tmp_path / "s.raw") == qcow0
    qmp(d, "fleece-stop", {"disk": "vdb"})

    # virsh destroy: the attachment ends by itself, the disk with it.
    domain.destroy()
    wait_for(lambda: qmp(d, "query-attachments") == [])
    assert qmp(d, "query-disks") == []
    assert domain.raw.read_bytes() == raw
    run(requires("qemu-img"), "check", "-U", str(domain.qcow2))
    assert qcow2_bytes(domain.qcow2, tmp_path / "final.raw") == qcow
