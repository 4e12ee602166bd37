"""`fleeced serve` driven by real NBD clients: qemu-img, qemu-io, nbdinfo, nbdcopy, fio."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import make_image, requires, run

pytestmark = pytest.mark.integration

MiB = 1 << 20


def test_qemu_img_info_compare_convert(start_daemon, tmp_path: Path) -> None:
    qemu_img = requires("qemu-img")
    img = tmp_path / "disk.img"
    make_image(img, 8 * MiB + 4096)
    d = start_daemon(str(img))
    info = json.loads(run(qemu_img, "info", "--output=json", d.url("disk")).stdout)
    assert info["virtual-size"] == 8 * MiB + 4096
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(img), d.url("disk"))
    out = tmp_path / "copy.img"
    run(qemu_img, "convert", "-f", "raw", "-O", "raw", d.url("disk"), str(out))
    assert out.read_bytes() == img.read_bytes()
    # and back: convert into the export
    src = tmp_path / "src.img"
    data = make_image(src, 8 * MiB + 4096, seed=7)
    run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), d.url("disk"))
    assert d.stop() == 0
    assert img.read_bytes() == data


def test_default_export_name_is_file_stem_and_empty_name_works(start_daemon, tmp_path) -> None:
    nbdinfo = requires("nbdinfo")
    img = tmp_path / "vm-disk.raw"
    make_image(img, MiB)
    d = start_daemon(str(img))
    listing = json.loads(run(nbdinfo, "--json", "--list", f"nbd+unix://?socket={d.sock}").stdout)
    assert [e["export-name"] for e in listing["exports"]] == ["vm-disk"]
    info = json.loads(run(nbdinfo, "--json", f"nbd+unix://?socket={d.sock}").stdout)
    assert info["exports"][0]["export-size"] == MiB


def test_qemu_io_patterns_fua_discard_zeroes(start_daemon, tmp_path: Path) -> None:
    qemu_io = requires("qemu-io")
    img = tmp_path / "disk.img"
    img.write_bytes(b"\xaa" * (4 * MiB))
    d = start_daemon(str(img), "--discard=unmap")
    url = d.url("disk")
    cmds = [
        "write -P 0x11 0 64k",
        "write -f -P 0x22 64k 4k",  # FUA
        "write -z 1M 256k",  # write zeroes
        "discard 2M 1M",
        "flush",
        "read -P 0x11 0 64k",
        "read -P 0x22 64k 4k",
        "read -P 0xaa 68k 4k",
        "read -P 0 1M 256k",
        "read -P 0 2M 1M",
        "read -P 0xaa 3M 1M",
    ]
    args = [a for c in cmds for a in ("-c", c)]
    out = run(qemu_io, "-f", "raw", *args, url).stdout
    assert "Pattern verification failed" not in out
    assert d.stop() == 0
    data = img.read_bytes()
    assert data[:65536] == b"\x11" * 65536
    assert data[65536:65536 + 4096] == b"\x22" * 4096
    assert data[MiB:MiB + 256 * 1024] == bytes(256 * 1024)
    assert data[2 * MiB:3 * MiB] == bytes(MiB)
    assert data[3 * MiB:] == b"\xaa" * MiB


def test_qemu_io_pattern_mismatch_is_detected(start_daemon, tmp_path: Path) -> None:
    """The pattern checks above can fail: a wrong pattern is reported."""
    qemu_io = requires("qemu-io")
    img = tmp_path / "disk.img"
    img.write_bytes(b"\xaa" * MiB)
    d = start_daemon(str(img))
    out = run(qemu_io, "-f", "raw", "-c", "read -P 0xbb 0 4k", d.url("disk"), check=False)
    assert "Pattern verification failed" in out.stdout + out.stderr


def test_nbdinfo_flags_block_sizes_and_map(start_daemon, tmp_path: Path) -> None:
    nbdinfo = requires("nbdinfo")
    img = tmp_path / "sparse.img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(4 * MiB)
        f.write(b"\x01" * MiB)
    d = start_daemon(str(img))
    info = json.loads(run(nbdinfo, "--json", d.url("sparse")).stdout)
    e = info["exports"][0]
    assert e["export-size"] == 16 * MiB
    assert e["is_read_only"] is False
    assert e["can_flush"] and e["can_fua"] and e["can_trim"] and e["can_zero"]
    assert e["can_multi_conn"] is True
    assert e["block_size_minimum"] == 1
    assert e["block_size_preferred"] == 4096
    assert e["block_size_maximum"] == 32 * MiB
    assert "base:allocation" in e["contexts"]
    extents = json.loads(run(nbdinfo, "--map", "--json", d.url("sparse")).stdout)
    data = [(x["offset"], x["length"]) for x in extents if x["type"] == 0]
    holes = [(x["offset"], x["length"]) for x in extents if x["type"] == 3]
    assert data == [(4 * MiB, MiB)]
    assert sum(h[1] for h in holes) == 15 * MiB


def test_read_only_export_flags(start_daemon, tmp_path: Path) -> None:
    nbdinfo = requires("nbdinfo")
    qemu_io = requires("qemu-io")
    img = tmp_path / "ro.img"
    make_image(img, MiB)
    before = img.read_bytes()
    d = start_daemon(str(img), "-r")
    e = json.loads(run(nbdinfo, "--json", d.url("ro")).stdout)["exports"][0]
    assert e["is_read_only"] is True
    assert not e["can_trim"] and not e["can_zero"]
    out = run(qemu_io, "-f", "raw", "-c", "write -P 1 0 4k", d.url("ro"), check=False)
    assert out.returncode != 0 or "failed" in out.stdout + out.stderr
    assert img.read_bytes() == before


def test_nbdcopy_both_directions_multi_conn(start_daemon, tmp_path: Path) -> None:
    nbdcopy = requires("nbdcopy")
    img = tmp_path / "disk.img"
    size = 32 * MiB + 512
    make_image(img, size)
    d = start_daemon(str(img))
    out = tmp_path / "out.img"
    run(nbdcopy, "--connections=4", "--requests=16", d.url("disk"), str(out))
    assert out.read_bytes() == img.read_bytes()
    src = tmp_path / "src.img"
    data = make_image(src, size, seed=99)
    run(nbdcopy, "--connections=4", str(src), d.url("disk"))
    assert d.stop() == 0
    assert img.read_bytes() == data


def test_fio_verify(start_daemon, tmp_path: Path) -> None:
    fio = requires("fio")
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(64 * MiB))
    d = start_daemon(str(img))
    run(
        fio, "--name=verify", "--ioengine=nbd", f"--uri={d.url('disk')}",
        "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M",
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
        "--numjobs=1",
        timeout=300,
    )


def test_many_idle_connections_then_real_client(start_daemon, tmp_path: Path) -> None:
    import socket

    nbdinfo = requires("nbdinfo")
    img = tmp_path / "disk.img"
    make_image(img, MiB)
    d = start_daemon(str(img))
    socks = []
    try:
        for _ in range(500):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.sock)
            socks.append(s)
        info = json.loads(run(nbdinfo, "--json", d.url("disk")).stdout)
        assert info["exports"][0]["export-size"] == MiB
    finally:
        for s in socks:
            s.close()


def test_non_persistent_exits_after_last_client(start_daemon, tmp_path: Path) -> None:
    nbdinfo = requires("nbdinfo")
    img = tmp_path / "disk.img"
    make_image(img, MiB)
    d = start_daemon(str(img), persistent=False)
    run(nbdinfo, d.url("disk"))
    assert d.proc.wait(30) == 0


def test_sd_notify_ready_and_stopping(start_daemon, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    make_image(img, MiB)
    d = start_daemon(str(img))
    assert d.stop() == 0
    notes = b"\n".join(d.notifications())
    assert b"READY=1" in notes
    assert b"STOPPING=1" in notes
    assert b"STATUS=" in notes


def test_fork_and_pid_file(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    nbdinfo = requires("nbdinfo")
    img = tmp_path / "disk.img"
    make_image(img, MiB)
    sock = tmp_path / "nbd.sock"
    pidf = tmp_path / "pid"
    rc = subprocess.run(
        [sys.executable, "-m", "fleeced", "serve", str(img), "-k", str(sock), "--fork",
         "--pid-file", str(pidf), "-t", "--no-control"],
        capture_output=True, timeout=60,
    )
    assert rc.returncode == 0, rc.stderr
    # --fork returns only once listening and the pid file exists: no waiting here.
    pid = int(pidf.read_text())
    try:
        run(nbdinfo, f"nbd+unix:///disk?socket={sock}")
    finally:
        os.kill(pid, signal.SIGTERM)
    # the daemon removes its pid file on exit
    for _ in range(300):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        import time

        time.sleep(0.1)  # waiting for a foreign process to exit, not for readiness
    assert not pidf.exists()


def test_socket_activation(tmp_path: Path) -> None:
    """LISTEN_FDS/LISTEN_PID: serve on an inherited listening socket."""
    import socket
    import subprocess
    import sys

    nbdinfo = requires("nbdinfo")
    img = tmp_path / "disk.img"
    make_image(img, MiB)
    path = str(tmp_path / "act.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(16)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    npath = str(tmp_path / "n.sock")
    notify.bind(npath)
    # The child must see LISTEN_PID == its own pid: set it in a tiny shim.
    shim = (
        "import os,sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_FDS']='1';"
        "os.environ['LISTEN_PID']=str(os.getpid());"
        "from fleeced.cli import main; sys.exit(main(sys.argv[2:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", shim, str(lsock.fileno()), "serve", str(img), "-t",
         "--no-control"],
        pass_fds=(lsock.fileno(),), env=dict(os.environ, NOTIFY_SOCKET=npath),
    )
    try:
        from tests.conftest import wait_ready

        wait_ready(notify, proc, [])
        info = json.loads(run(nbdinfo, "--json", f"nbd+unix:///disk?socket={path}").stdout)
        assert info["exports"][0]["export-size"] == MiB
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
        notify.close()
        lsock.close()


def test_tcp_listener(start_daemon, tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    nbdinfo = requires("nbdinfo")
    img = tmp_path / "disk.img"
    make_image(img, MiB)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    npath = str(tmp_path / "n.sock")
    notify.bind(npath)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleeced", "serve", str(img), "-p", str(port), "-b",
         "127.0.0.1", "-t", "--no-control"],
        env=dict(os.environ, NOTIFY_SOCKET=npath),
    )
    try:
        from tests.conftest import wait_ready

        wait_ready(notify, proc, [])
        info = json.loads(run(nbdinfo, "--json", f"nbd://127.0.0.1:{port}/disk").stdout)
        assert info["exports"][0]["export-size"] == MiB
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
        notify.close()


def test_sigterm_right_after_ready_is_orderly(start_daemon, tmp_path: Path) -> None:
    """READY=1 is sent only once SIGTERM is handled: stopping at once exits 0."""
    img = tmp_path / "disk.img"
    make_image(img, MiB)
    for _ in range(5):
        d = start_daemon(str(img))
        assert d.stop() == 0
        assert b"STOPPING=1" in b"\n".join(d.notifications())
