"""TLS over TCP against real peers: nbdinfo (libnbd + GnuTLS), qemu-img, raw sockets.

Certificates are made here with ``openssl``, PSK files with ``psktool``
(gnutls-bin).  The daemon gets its listening sockets by socket activation
(``LISTEN_FDS``), so every port is bound by the test and never raced for; a
TCP and a Unix socket together show that TLS applies to TCP only.  One test
uses ``-p`` for the bound-listener path.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import make_image, requires, run, wait_ready

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 8 * MiB
IHAVEOPT = 0x49484156454F5054
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_GO = 1, 2, 3, 5, 7
REP_ACK, REP_SERVER = 1, 2
REP_ERR_POLICY, REP_ERR_INVALID, REP_ERR_TLS_REQD = 0x80000002, 0x80000003, 0x80000005
PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1

# Runs the daemon on inherited sockets (fds 3, 4, ...).  MemoryDenyWriteExecute=yes
# in its two forms: "mdwe" sets PR_SET_MDWE (the kernel's, used by systemd >= 255);
# "seccomp" installs systemd 252's filter (x86-64): mmap with PROT_WRITE|PROT_EXEC
# and mprotect/pkey_mprotect adding PROT_EXEC fail with EPERM.
SHIM = """\
import ctypes, os, struct, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [os.dup(fd) for fd in fds]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid())
libc = ctypes.CDLL(None, use_errno=True)
if sys.argv[2] == "mdwe" and libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE
    sys.exit("PR_SET_MDWE failed")
if sys.argv[2] == "seccomp":
    def op(code, k, jt=0, jf=0):
        return struct.pack("HBBI", code, jt, jf, k)
    LD, JEQ, JSET, AND, RET = 0x20, 0x15, 0x45, 0x54, 0x06
    ALLOW, EPERM = 0x7FFF0000, 0x00050001
    prog = [  # seccomp_data: nr at 0, arch at 4, args[2] (prot) at 32
        op(LD, 4), op(JEQ, 0xC000003E, 1, 0), op(RET, ALLOW),
        op(LD, 0), op(JEQ, 9, 0, 5),  # mmap
        op(LD, 32), op(AND, 6), op(JEQ, 6, 0, 1), op(RET, EPERM), op(RET, ALLOW),
        op(JEQ, 10, 1, 0), op(JEQ, 329, 0, 3),  # mprotect, pkey_mprotect
        op(LD, 32), op(JSET, 4, 0, 1), op(RET, EPERM),
        op(RET, ALLOW),
    ]
    code = ctypes.create_string_buffer(b"".join(prog))
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    if (libc.prctl(38, 1, 0, 0, 0) != 0  # PR_SET_NO_NEW_PRIVS
            or libc.prctl(22, 2, ctypes.byref(Prog(len(prog), ctypes.addressof(code))),
                          0, 0) != 0):  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        sys.exit("seccomp filter failed")
    import mmap
    try:
        mmap.mmap(-1, 4096, prot=7)
        sys.exit("the seccomp filter lets W+X through")
    except PermissionError:
        pass
from fleeced.cli import main
sys.exit(main(sys.argv[3:]))
"""


# ---------------------------------------------------------------- credentials


@dataclass
class Creds:
    server_cert: str
    server_key: str
    ca: str
    anon: str  # client dir: the CA only
    good: str  # client dir: CA + a client certificate our CA signed
    rogue: str  # client dir: CA + a client certificate another CA signed


def _openssl(*args: str) -> None:
    run(requires("openssl"), *args)


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}-key.pem", d / f"{name}-cert.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
             "-days", "2", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _make_leaf(d: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    key, cert, csr = d / f"{name}-key.pem", d / f"{name}-cert.pem", d / f"{name}.csr"
    extfile = d / f"{name}.ext"
    extfile.write_text(ext)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(extfile))
    return cert, key


def _client_dir(d: Path, ca: Path, leaf: tuple[Path, Path] | None) -> str:
    # The layout libnbd's tls-certificates= and qemu's tls-creds-x509 dir= share.
    d.mkdir()
    (d / "ca-cert.pem").write_bytes(ca.read_bytes())
    if leaf is not None:
        (d / "client-cert.pem").write_bytes(leaf[0].read_bytes())
        (d / "client-key.pem").write_bytes(leaf[1].read_bytes())
    return str(d)


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    d = tmp_path_factory.mktemp("pki")
    ca = _make_ca(d, "ca")
    rogue_ca = _make_ca(d, "rogue-ca")
    basic = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
    server = _make_leaf(d, "server", ca, basic + "extendedKeyUsage=serverAuth\n"
                        "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    client = _make_leaf(d, "client", ca, basic + "extendedKeyUsage=clientAuth\n")
    rogue = _make_leaf(d, "rogue", rogue_ca, basic + "extendedKeyUsage=clientAuth\n")
    return Creds(
        server_cert=str(server[0]), server_key=str(server[1]), ca=str(ca[0]),
        anon=_client_dir(d / "anon", ca[0], None),
        good=_client_dir(d / "good", ca[0], client),
        rogue=_client_dir(d / "rogue", ca[0], rogue),
    )


def make_psk(d: Path, identity: str) -> Path:
    """DIR/keys.psk made by psktool: the file both qemu (dir=) and libnbd read."""
    d.mkdir(exist_ok=True)
    run(requires("psktool"), "-u", identity, "-p", str(d / "keys.psk"))
    return d / "keys.psk"


# ---------------------------------------------------------------- the daemon


@dataclass
class TlsDaemon:
    proc: subprocess.Popen[bytes]
    port: int
    unix: str
    log: Path

    def nbds(self, query: str = "", user: str = "") -> str:
        at = f"{user}@" if user else ""
        return f"nbds://{at}127.0.0.1:{self.port}/disk" + (f"?{query}" if query else "")

    def nbd(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/disk"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture
def tls_daemon(tmp_path: Path) -> Iterator[Callable[..., TlsDaemon]]:
    """Factory: `fleeced serve IMG -x disk ARGS` on an inherited TCP and Unix socket."""
    started: list[TlsDaemon] = []
    closers: list[socket.socket] = []

    def start(img: Path, *args: str, mdwe: str = "-") -> TlsDaemon:
        n = len(started) + 1
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(64)
        unix_path = str(tmp_path / f"tls{n}.sock")
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(unix_path)
        unix.listen(64)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(tmp_path / f"tls-notify{n}.sock"))
        closers.extend((tcp, unix, notify))
        log = tmp_path / f"tls-daemon{n}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", SHIM, f"{tcp.fileno()},{unix.fileno()}",
                 mdwe, "serve", str(img), "-x", "disk", "-t",
                 "--no-control", "-v", *args],
                pass_fds=(tcp.fileno(), unix.fileno()), stderr=out,
                env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / f"tls-notify{n}.sock")),
            )
        d = TlsDaemon(proc, tcp.getsockname()[1], unix_path, log)
        started.append(d)
        wait_ready(notify, proc, [])
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        print(f"--- {d.log.name} ---\n{d.log.read_text(errors='replace')[-20000:]}")
    for s in closers:
        s.close()


def x509_args(creds: Creds, *extra: str) -> tuple[str, ...]:
    return ("--tls-cert", creds.server_cert, "--tls-key", creds.server_key, *extra)


def qemu_x509(client_dir: str, priority: str = "") -> str:
    prio = f",priority={priority}" if priority else ""
    return f"tls-creds-x509,id=tls0,endpoint=client,dir={client_dir}{prio}"


def qemu_psk(psk_dir: Path, user: str, priority: str = "") -> str:
    prio = f",priority={priority}" if priority else ""
    return f"tls-creds-psk,id=tls0,endpoint=client,dir={psk_dir},username={user}{prio}"


def qemu_opts(d: TlsDaemon) -> str:
    return f"driver=nbd,host=127.0.0.1,port={d.port},export=disk,tls-creds=tls0"


def nbdinfo_size(url: str) -> int:
    info = json.loads(run(requires("nbdinfo"), "--json", url).stdout)
    return int(info["exports"][0]["export-size"])


def assert_serving(d: TlsDaemon, client_dir: str) -> None:
    """The daemon is alive and serves a proper TLS client."""
    assert d.proc.poll() is None
    assert nbdinfo_size(d.nbds(f"tls-certificates={client_dir}")) == SIZE


# ---------------------------------------------------------------- raw NBD client


def recv_exactly(s: socket.socket | ssl.SSLSocket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return out


def recv_all(s: socket.socket) -> bytes:
    """Everything until the server closes (a reset counts as closed)."""
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def connect(port: int | str) -> socket.socket:
    """Greeting read, fixed-newstyle + NO_ZEROES client flags sent."""
    if isinstance(port, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(20)
        s.connect(port)
    else:
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
    greeting = recv_exactly(s, 18)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    s.sendall(struct.pack(">I", 3))
    return s


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def reply(s: socket.socket | ssl.SSLSocket) -> tuple[int, int, bytes]:
    magic, opt, typ, length = struct.unpack(">QIII", recv_exactly(s, 20))
    assert magic == 0x0003E889045565A9
    return opt, typ, recv_exactly(s, length)


def go_payload(name: bytes = b"disk") -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", 0)


# ---------------------------------------------------------------- x509


def test_x509_nbdinfo_and_qemu_img(tls_daemon, creds: Creds, tmp_path: Path) -> None:
    """nbds:// reads the size; qemu-img reads the right bytes and a write round-trips.

    qemu-img convert reads in large requests, which plaintext connections
    answer from native workers writing to the socket: over TLS that would put
    plaintext on the wire and the copy would not match.
    """
    qemu_img = requires("qemu-img")
    img = tmp_path / "disk.img"
    data = make_image(img, SIZE)
    d = tls_daemon(img, *x509_args(creds))
    assert nbdinfo_size(d.nbds(f"tls-certificates={creds.anon}")) == SIZE
    info = json.loads(run(qemu_img, "info", "--output=json", "--object", qemu_x509(creds.anon),
                          "--image-opts", qemu_opts(d)).stdout)
    assert info["virtual-size"] == SIZE
    out = tmp_path / "copy.img"
    run(qemu_img, "convert", "-O", "raw", "--object", qemu_x509(creds.anon), "--image-opts",
        qemu_opts(d), str(out))
    assert out.read_bytes() == data
    # TLS 1.2 too (proto.md "TLS versions": MUST support 1.2).
    run(qemu_img, "convert", "-O", "raw", "--object",
        qemu_x509(creds.anon, "NORMAL:-VERS-TLS1.3"), "--image-opts", qemu_opts(d), str(out))
    assert out.read_bytes() == data
    src = tmp_path / "src.img"
    new = make_image(src, SIZE, seed=9)
    run(qemu_img, "convert", "-n", "-f", "raw", "--object", qemu_x509(creds.anon),
        "--target-image-opts", str(src), qemu_opts(d))
    run(qemu_img, "convert", "-O", "raw", "--object", qemu_x509(creds.anon), "--image-opts",
        qemu_opts(d), str(out))
    assert out.read_bytes() == new
    assert d.stop() == 0
    assert img.read_bytes() == new


def test_client_certificate_verification(tls_daemon, creds: Creds, tmp_path: Path) -> None:
    """With --tls-ca a client needs a certificate that CA signed."""
    nbdinfo = requires("nbdinfo")
    qemu_img = requires("qemu-img")
    img = tmp_path / "disk.img"
    make_image(img, SIZE)
    d = tls_daemon(img, *x509_args(creds, "--tls-ca", creds.ca))
    for client in (creds.anon, creds.rogue):
        proc = run(nbdinfo, "--size", d.nbds(f"tls-certificates={client}"), check=False)
        assert proc.returncode != 0, proc.stdout
        proc = run(qemu_img, "info", "--object", qemu_x509(client), "--image-opts",
                   qemu_opts(d), check=False)
        assert proc.returncode != 0, proc.stdout
    assert_serving(d, creds.good)
    info = run(qemu_img, "info", "--output=json", "--object", qemu_x509(creds.good),
               "--image-opts", qemu_opts(d))
    assert json.loads(info.stdout)["virtual-size"] == SIZE
    assert "client certificate commonName=client" in d.log.read_text()
    # A client with no certificate finishes its handshake (it can judge ours
    # first, as with qemu-nbd) and is dropped before any option.
    assert "TLS client certificate required: the client sent none, closing" in d.log.read_text()
    # The CertificateRequest names our CA, so a GnuTLS client that holds only
    # another CA's certificate (and trusts only that CA) sends none and
    # reports its own verdict on ours, as against qemu-nbd (QEMU's iotest 233).
    pki = Path(creds.ca).parent
    other = _client_dir(tmp_path / "other", pki / "rogue-ca-cert.pem",
                        (pki / "rogue-cert.pem", pki / "rogue-key.pem"))
    none = "the client sent none, closing"
    before = d.log.read_text().count(none)
    proc = run(qemu_img, "info", "--object", qemu_x509(other), "--image-opts", qemu_opts(d),
               check=False)
    assert proc.returncode != 0
    assert "The certificate hasn't got a known issuer" in proc.stderr, proc.stderr
    deadline = time.monotonic() + 10  # the daemon logs once its side is done
    while d.log.read_text().count(none) == before:
        assert time.monotonic() < deadline, d.log.read_text()
        time.sleep(0.05)


# ---------------------------------------------------------------- --tls=require


def test_require_refuses_plaintext(tls_daemon, creds: Creds, tmp_path: Path) -> None:
    nbdinfo = requires("nbdinfo")
    img = tmp_path / "disk.img"
    make_image(img, SIZE)
    d = tls_daemon(img, *x509_args(creds, "--tls", "require"))
    proc = run(nbdinfo, "--size", d.nbd(), check=False)
    assert proc.returncode != 0
    assert "TLS" in proc.stderr, proc.stderr  # libnbd: "server requires TLS encryption first"

    # proto.md "FORCEDTLS mode", on the wire: options before STARTTLS get
    # NBD_REP_ERR_TLS_REQD, and the session goes on.
    with connect(d.port) as s:
        for opt, data in ((OPT_LIST, b""), (OPT_GO, go_payload()), (0x1234, b"x")):
            s.sendall(option(opt, data))
            got_opt, typ, _ = reply(s)
            assert (got_opt, typ) == (opt, REP_ERR_TLS_REQD)
        s.sendall(option(OPT_ABORT))
        assert reply(s)[:2] == (OPT_ABORT, REP_ACK)
    # EXPORT_NAME cannot get an error reply: the server hangs up, sending nothing.
    with connect(d.port) as s:
        s.sendall(option(OPT_EXPORT_NAME, b"disk"))
        assert recv_all(s) == b""
    assert_serving(d, creds.anon)


def test_starttls_with_python_ssl_client(tls_daemon, creds: Creds, tmp_path: Path) -> None:
    """A raw STARTTLS: ACK, TLS, options over TLS; no TLS_REQD and no second STARTTLS."""
    img = tmp_path / "disk.img"
    make_image(img, SIZE)
    d = tls_daemon(img, *x509_args(creds))
    ctx = ssl.create_default_context(cafile=creds.ca)
    with connect(d.port) as raw:
        raw.sendall(option(OPT_STARTTLS))
        assert reply(raw) == (OPT_STARTTLS, REP_ACK, b"")
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(option(OPT_STARTTLS))
            assert reply(s)[:2] == (OPT_STARTTLS, REP_ERR_INVALID)
            s.sendall(option(OPT_LIST))
            opt, typ, data = reply(s)
            assert (opt, typ) == (OPT_LIST, REP_SERVER) and data[4:8] == b"disk"
            assert reply(s)[:2] == (OPT_LIST, REP_ACK)
            s.sendall(option(OPT_ABORT))
            assert reply(s)[:2] == (OPT_ABORT, REP_ACK)


def test_tls_is_for_tcp_only(tls_daemon, creds: Creds, tmp_path: Path) -> None:
    """A Unix-socket client is served in plaintext; its STARTTLS gets ERR_POLICY."""
    nbdinfo = requires("nbdinfo")
    img = tmp_path / "disk.img"
    make_image(img, SIZE)
    d = tls_daemon(img, *x509_args(creds, "--tls", "require"))
    with connect(d.unix) as s:
        s.sendall(option(OPT_STARTTLS))
        assert reply(s)[:2] == (OPT_STARTTLS, REP_ERR_POLICY)
        s.sendall(option(OPT_ABORT))
        assert reply(s)[:2] == (OPT_ABORT, REP_ACK)
    info = json.loads(run(nbdinfo, "--json", f"nbd+unix:///disk?socket={d.unix}").stdout)
    assert info["exports"][0]["export-size"] == SIZE


# ---------------------------------------------------------------- --tls=on, -p


def test_on_serves_plaintext_and_tls_on_a_bound_port(creds: Creds, tmp_path: Path) -> None:
    """``-p``: the bound-listener path; --tls=on offers TLS and allows plaintext."""
    qemu_img = requires("qemu-img")
    img = tmp_path / "disk.img"
    data = make_image(img, SIZE)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "n.sock"))
    log = tmp_path / "on-daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleeced", "serve", str(img), "-x", "disk", "-p", str(port),
             "-b", "127.0.0.1", "-t", "--no-control", "-v", "--tls", "on",
             *x509_args(creds)],
            env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "n.sock")), stderr=out,
        )
    d = TlsDaemon(proc, port, "", log)
    try:
        wait_ready(notify, proc, [])
        assert nbdinfo_size(d.nbd()) == SIZE
        assert nbdinfo_size(d.nbds(f"tls-certificates={creds.anon}")) == SIZE
        out_img = tmp_path / "plain.img"
        run(qemu_img, "convert", "-O", "raw", d.nbd(), str(out_img))
        assert out_img.read_bytes() == data
        run(qemu_img, "convert", "-O", "raw", "--object", qemu_x509(creds.anon),
            "--image-opts", qemu_opts(d), str(out_img))
        assert out_img.read_bytes() == data
    finally:
        if proc.poll() is None:
            proc.terminate()
        assert proc.wait(30) == 0
        notify.close()
        print(log.read_text(errors="replace")[-20000:])


# ---------------------------------------------------------------- bad upgrades


def test_failed_handshake_is_dropped_without_plaintext(tls_daemon, creds: Creds,
                                                       tmp_path: Path) -> None:
    """After the ACK, garbage instead of a ClientHello: dropped, no NBD byte follows."""
    img = tmp_path / "disk.img"
    make_image(img, SIZE)
    d = tls_daemon(img, *x509_args(creds, "--tls", "on"))
    for _ in range(3):
        with connect(d.port) as s:
            s.sendall(option(OPT_STARTTLS))
            assert reply(s) == (OPT_STARTTLS, REP_ACK, b"")
            s.sendall(b"GET / HTTP/1.0\r\n\r\n" + option(OPT_GO, go_payload()))
            rest = recv_all(s)
        # At most a TLS alert record (content type 21); never NBD plaintext.
        assert rest == b"" or rest[0] == 0x15, rest[:64]
        assert b"NBDMAGIC" not in rest and struct.pack(">Q", 0x0003E889045565A9) not in rest
    assert "TLS handshake failed" in d.log.read_text()
    assert_serving(d, creds.anon)


def test_plaintext_pipelined_after_starttls_is_refused(tls_daemon, creds: Creds,
                                                       tmp_path: Path) -> None:
    """Bytes sent with STARTTLS, before the ACK, are plaintext: no ACK, hang up."""
    img = tmp_path / "disk.img"
    make_image(img, SIZE)
    d = tls_daemon(img, *x509_args(creds, "--tls", "on"))
    with connect(d.port) as s:
        s.sendall(option(OPT_STARTTLS) + option(OPT_GO, go_payload()))
        assert recv_all(s) == b""
    assert_serving(d, creds.anon)


def test_stalled_handshake_is_bounded(tls_daemon, creds: Creds, tmp_path: Path) -> None:
    """A client that never starts TLS after the ACK is dropped at --handshake-limit."""
    img = tmp_path / "disk.img"
    make_image(img, SIZE)
    d = tls_daemon(img, *x509_args(creds, "--handshake-limit", "1"))
    with connect(d.port) as s:
        s.sendall(option(OPT_STARTTLS))
        assert reply(s) == (OPT_STARTTLS, REP_ACK, b"")
        start = time.monotonic()
        assert recv_all(s) == b""
        assert time.monotonic() - start < 10
    assert_serving(d, creds.anon)


# ---------------------------------------------------------------- PSK


def _mdwe_supported() -> bool:
    # PR_GET_MDWE only reads this process's setting (Linux >= 6.3).
    return bool(ctypes.CDLL(None, use_errno=True).prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0)


@pytest.mark.parametrize("mdwe", ["-", "mdwe", "seccomp"])
def test_psk_nbdinfo_and_qemu_img(tls_daemon, tmp_path: Path, mdwe: str) -> None:
    """--tls-psk with a psktool file: libnbd and qemu-img, TLS 1.3 and 1.2.

    With ``mdwe``/``seccomp`` the daemon runs under either form of the unit's
    MemoryDenyWriteExecute=yes (no page both writable and executable, ever):
    the PSK callback, a libffi closure, must still work.
    """
    nbdinfo = requires("nbdinfo")
    qemu_img = requires("qemu-img")
    if mdwe == "mdwe" and not _mdwe_supported():
        pytest.skip("kernel without PR_SET_MDWE")
    if mdwe == "seccomp" and os.uname().machine != "x86_64":
        pytest.skip("the seccomp filter here is written for x86-64")
    img = tmp_path / "disk.img"
    data = make_image(img, SIZE)
    psk_dir = tmp_path / "psk"
    keys = make_psk(psk_dir, "alice")
    d = tls_daemon(img, "--tls-psk", str(keys), mdwe=mdwe)
    # libnbd 1.14 takes the PSK identity from the URI's user (tls-username=
    # also needs a login name it fails to find without a terminal).
    assert nbdinfo_size(d.nbds(f"tls-psk-file={keys}", user="alice")) == SIZE
    for prio in ("", "NORMAL:-VERS-TLS1.3:+ECDHE-PSK:+PSK"):
        out = tmp_path / "copy.img"
        run(qemu_img, "convert", "-O", "raw", "--object", qemu_psk(psk_dir, "alice", prio),
            "--image-opts", qemu_opts(d), str(out))
        assert out.read_bytes() == data
    src = tmp_path / "src.img"
    new = make_image(src, SIZE, seed=5)
    run(qemu_img, "convert", "-n", "-f", "raw", "--object", qemu_psk(psk_dir, "alice"),
        "--target-image-opts", str(src), qemu_opts(d))
    # Unknown identity, and the right identity with the wrong key: refused.
    other = make_psk(tmp_path / "other", "bob")
    proc = run(nbdinfo, "--size", d.nbds(f"tls-psk-file={other}", user="bob"), check=False)
    assert proc.returncode != 0
    wrong = make_psk(tmp_path / "wrong", "alice")
    assert wrong.read_text() != keys.read_text()
    proc = run(nbdinfo, "--size", d.nbds(f"tls-psk-file={wrong}", user="alice"), check=False)
    assert proc.returncode != 0
    proc = run(nbdinfo, "--size", d.nbd(), check=False)  # and plaintext (require)
    assert proc.returncode != 0
    assert d.stop() == 0
    assert img.read_bytes() == new


# ---------------------------------------------------------------- start-up errors


@pytest.mark.parametrize("case", ["garbage-cert", "mismatched-key", "missing-ca", "bad-psk",
                                  "empty-psk"])
def test_bad_credentials_fail_startup(creds: Creds, tmp_path: Path, case: str) -> None:
    img = tmp_path / "disk.img"
    make_image(img, MiB)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    other_key = Path(creds.good) / "client-key.pem"
    psk = tmp_path / "bad.psk"
    args, needle = {
        "garbage-cert": (["--tls-cert", str(junk), "--tls-key", creds.server_key], "junk.pem"),
        "mismatched-key": (["--tls-cert", creds.server_cert, "--tls-key", str(other_key)],
                           "does not match"),
        "missing-ca": ([*x509_args(creds), "--tls-ca", str(tmp_path / "nope.pem")],
                       "nope.pem"),
        "bad-psk": (["--tls-psk", str(psk)], "line 2"),
        "empty-psk": (["--tls-psk", str(psk)], "no keys"),
    }[case]
    psk.write_text("alice:00112233\nbob:xyz\n" if case == "bad-psk" else "\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "fleeced", "serve", str(img), "-p", str(port), "-b",
         "127.0.0.1", "--no-control", *args],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- Unix sockets, --tls-authz


def test_tls_on_a_unix_socket(start_daemon, creds: Creds, tmp_path: Path) -> None:
    """Credentials given with ``-k`` apply to that Unix socket, as qemu-nbd
    applies them: x509 (with the hostname override qemu needs there) and
    PSK both work, plaintext is refused."""
    qemu_img = requires("qemu-img")
    img = tmp_path / "disk.img"
    data = make_image(img, SIZE)
    d = start_daemon(str(img), "-x", "disk", *x509_args(creds, "--tls-ca", creds.ca))
    proc = run(qemu_img, "info", d.url("disk"), check=False)
    # qemu-nbd's words, which qemu-img shows (QEMU's iotest 233 compares them)
    assert proc.returncode != 0, proc.stderr
    assert "server reported: Option 0x7 not permitted before TLS" in proc.stderr
    unix_opts = f"driver=nbd,server.type=unix,server.path={d.sock},export=disk,tls-creds=tls0"
    out = tmp_path / "copy.img"
    run(qemu_img, "convert", "-O", "raw", "--object", qemu_x509(creds.good), "--image-opts",
        f"{unix_opts},tls-hostname=127.0.0.1", str(out))
    assert out.read_bytes() == data
    proc = run(qemu_img, "info", "--object", qemu_x509(creds.anon), "--image-opts",
               f"{unix_opts},tls-hostname=127.0.0.1", check=False)
    assert proc.returncode != 0  # --tls-ca: a client certificate is required
    assert d.stop() == 0

    psk_dir = tmp_path / "psk"
    keys = make_psk(psk_dir, "alice")
    d = start_daemon(str(img), "-x", "disk", "--tls-psk", str(keys))
    unix_opts = f"driver=nbd,server.type=unix,server.path={d.sock},export=disk,tls-creds=tls0"
    run(qemu_img, "convert", "-O", "raw", "--object", qemu_psk(psk_dir, "alice"),
        "--image-opts", unix_opts, str(out))
    assert out.read_bytes() == data
    info = json.loads(run(requires("nbdinfo"), "--json",
                          f"nbds+unix://alice@/disk?socket={d.sock}&tls-psk-file={keys}").stdout)
    assert info["exports"][0]["export-size"] == SIZE
    wrong = make_psk(tmp_path / "wrong", "alice")
    proc = run(qemu_img, "info", "--object", qemu_psk(wrong.parent, "alice"),
               "--image-opts", unix_opts, check=False)
    assert proc.returncode != 0
    assert d.stop() == 0

    # A TLS client of a plain server: refused, in qemu-nbd's words.
    d = start_daemon(str(img), "-x", "disk")
    unix_opts = f"driver=nbd,server.type=unix,server.path={d.sock},export=disk,tls-creds=tls0"
    proc = run(qemu_img, "info", "--object", qemu_psk(psk_dir, "alice"), "--image-opts",
               unix_opts, check=False)
    assert proc.returncode != 0
    assert "server reported: TLS not configured" in proc.stderr, proc.stderr


def test_tls_authz_allow_list(tls_daemon, creds: Creds, tmp_path: Path) -> None:
    """``--tls-authz DN``: only clients whose certificate subject is on the
    list get past the handshake (written as ``openssl x509 -nameopt
    RFC2253`` prints it); another client the CA signed is dropped right
    after the handshake, before any option, with the reason logged."""
    qemu_img = requires("qemu-img")
    img = tmp_path / "disk.img"
    data = make_image(img, SIZE)
    d0 = tmp_path / "pki"
    d0.mkdir()
    ca = (Path(creds.ca), Path(creds.ca).with_name("ca-key.pem"))
    key, cert, csr = d0 / "backup-key.pem", d0 / "backup-cert.pem", d0 / "backup.csr"
    (d0 / "ext").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr),
             "-subj", "/C=FR/O=Example, Inc./OU=backup+UID=42/CN=backup host")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(d0 / "ext"))
    dn = run(requires("openssl"), "x509", "-in", str(cert), "-noout", "-subject",
             "-nameopt", "RFC2253").stdout.strip().removeprefix("subject=")
    assert dn == "CN=backup host,UID=42+OU=backup,O=Example\\, Inc.,C=FR"
    backup = _client_dir(d0 / "client", ca[0], (cert, key))
    d = tls_daemon(img, *x509_args(creds, "--tls-ca", creds.ca, "--tls-authz", "CN=nobody",
                                   "--tls-authz", dn))
    out = tmp_path / "copy.img"
    run(qemu_img, "convert", "-O", "raw", "--object", qemu_x509(backup), "--image-opts",
        qemu_opts(d), str(out))
    assert out.read_bytes() == data
    for _ in range(3):
        # Cut as qemu-nbd cuts it: TCP's end without a TLS close_notify, and
        # never a reset under the client's first option (which it had sent).
        proc = run(qemu_img, "info", "--object", qemu_x509(creds.good), "--image-opts",
                   qemu_opts(d), check=False)
        assert proc.returncode != 0
        assert ("Failed to read option reply: Cannot read from TLS channel: "
                "Software caused connection abort") in proc.stderr, proc.stderr
    proc = run(requires("nbdinfo"), "--size", d.nbds(f"tls-certificates={creds.good}"),
               check=False)
    assert proc.returncode != 0
    assert "TLS x509 authz check for CN=client is denied, closing" in d.log.read_text()
    assert_serving_as(d, backup)


def assert_serving_as(d: TlsDaemon, client_dir: str) -> None:
    assert d.proc.poll() is None
    assert nbdinfo_size(d.nbds(f"tls-certificates={client_dir}")) == SIZE


@pytest.mark.parametrize("args, needle", [
    (["--tls-authz", "CN=x"], "--tls-authz checks client certificates"),
    (["--tls-psk", "k.psk", "--tls-authz", "CN=x"], "--tls-authz checks client certificates"),
])
def test_tls_authz_usage_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    img = tmp_path / "disk.img"
    make_image(img, MiB)
    proc = subprocess.run([sys.executable, "-m", "fleeced", "serve", str(img), "-k",
                           str(tmp_path / "s.sock"), "--no-control", *args],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
