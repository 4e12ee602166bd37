"""``load_config``: a full file, the defaults, and one test per way a file is wrong.

Every error must be one line naming the file and the key.
"""

from __future__ import annotations

import grp
import os
import re
import textwrap
from pathlib import Path

import pytest

from fleeced.cli import CliError
from fleeced.config_file import load_config
from fleeced.daemon_config import DiskSpec, Listener
from fleeced.paths import default_state_dir
from fleeced.tls import TlsConfig


def _write(tmp_path: Path, text: str, name: str = "fleeced.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _image(tmp_path: Path, name: str = "vm1.img", size: int = 1 << 20) -> str:
    path = tmp_path / name
    path.write_bytes(b"\0" * size)
    return str(path)


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(CliError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    assert "\n" not in msg
    return msg


def _my_group() -> str:
    return grp.getgrgid(os.getegid()).gr_name


def test_full_file(tmp_path: Path) -> None:
    img1, img2 = _image(tmp_path, "vm1.img"), _image(tmp_path, "vm2.img")
    (tmp_path / "temp").mkdir()
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    path = _write(tmp_path, f"""
        control = "{tmp_path}/control.sock"
        state-dir = "{tmp_path}/state"
        threads = 4
        shutdown-timeout = 2.5
        handshake-limit = 7
        shared = 3

        [[listen]]
        unix = "{tmp_path}/nbd.sock"
        mode = "0660"
        group = "{_my_group()}"

        [[listen]]
        tcp = "127.0.0.1:10809"

        [[listen]]
        tcp = "[::1]:10810"

        [[listen]]
        tcp = ":10811"

        [tls]
        mode = "on"
        cert = "cert.pem"
        key = "key.pem"
        ca = "ca.pem"

        [session]
        cluster-size = "128K"
        temp-dir = "temp"
        cache = 1048576
        max-temp = "1G"
        on-cbw-error = "break-guest-write"
        cbw-timeout = 30

        [[disk]]
        name = "vm1-vda"
        path = "{img1}"
        read-only = false
        discard = "unmap"
        description = "the first VM"

        [[disk]]
        path = "vm2.img"
        read-only = true
    """)
    cfg = load_config(path)
    assert cfg.control_path == f"{tmp_path}/control.sock"
    assert cfg.control_required and cfg.persistent
    assert cfg.state_dir == f"{tmp_path}/state"
    assert (cfg.threads, cfg.shutdown_timeout, cfg.handshake_limit, cfg.shared) == (4, 2.5, 7.0, 3)
    assert cfg.listeners == [
        Listener(unix=f"{tmp_path}/nbd.sock", mode=0o660, group=_my_group()),
        Listener(tcp_host="127.0.0.1", tcp_port=10809),
        Listener(tcp_host="::1", tcp_port=10810),
        Listener(tcp_host=None, tcp_port=10811),
    ]
    assert cfg.tls == TlsConfig(mode="on", cert=f"{tmp_path}/cert.pem",
                                key=f"{tmp_path}/key.pem", ca=f"{tmp_path}/ca.pem")
    assert cfg.session_defaults == {
        "cluster-size": 128 << 10, "temp-dir": f"{tmp_path}/temp", "cache": 1 << 20,
        "max-temp": 1 << 30, "on-cbw-error": "break-guest-write", "cbw-timeout": 30.0,
    }
    assert cfg.disks == [
        DiskSpec(source=img1, name="vm1-vda", read_only=False, discard="unmap",
                 description="the first VM"),
        # Relative to the file's directory; the name defaults to the file's stem.
        DiskSpec(source=img2, name="vm2", read_only=True),
    ]
    assert cfg.pid_file is None and cfg.fleece == []


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEECED_CONTROL", str(tmp_path / "ctl.sock"))
    cfg = load_config(_write(tmp_path, ""))
    assert cfg.disks == [] and cfg.listeners == []
    assert cfg.control_path == str(tmp_path / "ctl.sock") and cfg.control_required
    assert cfg.persistent
    assert cfg.state_dir == default_state_dir()
    assert (cfg.threads, cfg.shared) == (0, 0)
    assert (cfg.shutdown_timeout, cfg.handshake_limit) == (5.0, 10.0)
    assert cfg.session_defaults == {}
    assert cfg.tls == TlsConfig()


def test_tls_mode_defaults_to_require_with_credentials(tmp_path: Path) -> None:
    (tmp_path / "keys.psk").write_text("alice:00ff\n")
    cfg = load_config(_write(tmp_path, f"""
        control = "{tmp_path}/c.sock"
        [tls]
        psk-file = "keys.psk"
    """))
    assert cfg.tls == TlsConfig(mode="require", psk_file=f"{tmp_path}/keys.psk")


def test_tls_unix_authz_and_disk_bitmaps(tmp_path: Path) -> None:
    img = _image(tmp_path)
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    cfg = load_config(_write(tmp_path, f"""
        control = "{tmp_path}/ctl.sock"
        [tls]
        cert = "cert.pem"
        key = "key.pem"
        ca = "ca.pem"
        unix = true
        authz = ['CN=a,O=Example\\, Inc.', "CN=b"]
        [[disk]]
        path = "{img}"
        bitmaps = ["daily", "weekly"]
    """))
    assert cfg.tls.unix and cfg.tls.authz == ("CN=a,O=Example\\, Inc.", "CN=b")
    assert cfg.disks[0].bitmaps == ("daily", "weekly")


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_state_dir() == "/var/lib/fleeced"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", "/xdg/state")
    assert default_state_dir() == "/xdg/state/fleeced"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", "/home/u")
    assert default_state_dir() == "/home/u/.local/state/fleeced"


def test_default_control_for_a_user_is_a_private_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEECED_CONTROL", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    cfg = load_config(_write(tmp_path, ""))
    assert cfg.control_path == f"{tmp_path}/fleeced/control.sock"
    assert (tmp_path / "fleeced").stat().st_mode & 0o777 == 0o700


def test_default_control_as_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FLEECED_CONTROL", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert load_config(_write(tmp_path, "")).control_path == "/run/fleeced/control.sock"


def test_mode_as_toml_octal_integer(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, f"""
        control = "{tmp_path}/c.sock"
        [[listen]]
        unix = "nbd.sock"
        mode = 0o600
        [[listen]]
        tcp = 10809
    """))
    assert cfg.listeners == [Listener(unix=f"{tmp_path}/nbd.sock", mode=0o600),
                             Listener(tcp_port=10809)]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CliError, match=r"nope\.toml: No such file or directory"):
        load_config(str(tmp_path / "nope.toml"))


@pytest.mark.parametrize(("text", "expected"), [
    ('threads = 4\nshared = = 1\n', r"invalid TOML: .*\(at line 2, column 10\)"),
    ('[disk]\npath = "x"\n[disk]\n', r"invalid TOML: .*line 3"),
    ('control = "a\n', r"invalid TOML: .*line 1"),
])
def test_toml_syntax_errors_carry_the_line(tmp_path: Path, text: str, expected: str) -> None:
    assert re.search(expected, _error(tmp_path, text))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'control = "\xff"\n')
    with pytest.raises(CliError, match="invalid TOML"):
        load_config(str(path))


@pytest.mark.parametrize(("text", "expected"), [
    # unknown keys, at every level
    ("socket = 'x'\n", "unknown key 'socket'"),
    ("[[listen]]\nunix = 'x'\nport = 1\n", r"unknown key 'listen\[1\]\.port'"),
    ("[tls]\ncertificate = 'x'\n", "unknown key 'tls.certificate'"),
    ("[session]\ncluster = '64K'\n", "unknown key 'session.cluster'"),
    ("[[disk]]\npath = 'IMG'\nreadonly = true\n", r"unknown key 'disk\[1\]\.readonly'"),
    # wrong types
    ("threads = '8'\n", "threads: must be an integer, not a string"),
    ("threads = true\n", "threads: must be an integer, not a boolean"),
    ("threads = 0\n", "threads: 0 is out of range 1..64"),
    ("shared = -1\n", "shared: must not be negative"),
    ("shutdown-timeout = 0\n", r"shutdown-timeout: 0.0 is out of range"),
    ("handshake-limit = 'ten'\n", "handshake-limit: must be a number of seconds"),
    ("handshake-limit = nan\n", "handshake-limit: must be a finite number"),
    ("control = 5\n", "control: must be a string, not an integer"),
    ("state-dir = ''\n", "state-dir: must be a non-empty path"),
    ("listen = 'x'\n", r"listen: must be an array of tables \(\[\[listen\]\]\)"),
    ("tls = 1\n", "tls: must be a table, not an integer"),
    ("[[session]]\n", r"session: must be a table, not an array \(write \[session\]"),
    ("disk = ['a']\n", "disk\\[1\\]: must be a table, not a string"),
    # listeners
    ("[[listen]]\nmode = '0660'\n", r"listen\[1\]: give exactly one of unix"),
    ("[[listen]]\nunix = 'a'\ntcp = ':1'\n", r"listen\[1\]: give exactly one of unix"),
    ("[[listen]]\nunix = 'a'\nmode = '0686'\n", r"listen\[1\]\.mode: '0686' is not an octal"),
    ("[[listen]]\nunix = 'a'\nmode = '1777'\n", r"listen\[1\]\.mode: '1777' is not an octal"),
    ("[[listen]]\nunix = 'a'\nmode = 660\n",
     r"listen\[1\]\.mode: 660 is out of range .*not the decimal 660"),
    ("[[listen]]\nunix = 'a'\nmode = true\n", r"listen\[1\]\.mode: must be an octal string"),
    ("[[listen]]\nunix = 'a'\ngroup = 'no-such-group-xyz'\n",
     r"listen\[1\]\.group: no group named 'no-such-group-xyz'"),
    ("[[listen]]\ntcp = ':1'\nmode = '0600'\n", r"listen\[1\]\.mode: only applies to a unix"),
    ("[[listen]]\ntcp = 'localhost'\n", r"listen\[1\]\.tcp: 'localhost' is not \"HOST:PORT\""),
    ("[[listen]]\ntcp = '::1:10809'\n", r"listen\[1\]\.tcp: '::1:10809' is not"),
    ("[[listen]]\ntcp = 'h:0'\n", r"listen\[1\]\.tcp: port 0 is out of range"),
    ("[[listen]]\ntcp = ':70000'\n", r"listen\[1\]\.tcp: port 70000 is out of range"),
    ("[[listen]]\ntcp = 1.5\n", r"listen\[1\]\.tcp: must be \"HOST:PORT\""),
    ("[[listen]]\nunix = 'a'\n[[listen]]\nunix = 'a'\n",
     r"listen: unix socket .*/a is listed twice"),
    ("control = 'a'\n[[listen]]\nunix = 'a'\n", "control: .*/a is also an NBD"),
    # metrics
    ("[metrics]\nport = 9\n", r"unknown key 'metrics\.port'"),
    ("[metrics]\nlisten = 9632\n", r"metrics\.listen: must be a string, not an integer"),
    ("[metrics]\nlisten = 'localhost'\n", r"metrics\.listen: 'localhost' is not ADDR:PORT"),
    ("[metrics]\nlisten = ':0'\n", r"metrics\.listen: port 0 is out of range"),
    ("[[metrics]]\nlisten = ':1'\n", r"metrics: must be a table, not an array"),
    # tls
    ("[tls]\nmode = 'yes'\ncert = 'F'\nkey = 'F'\n",
     r"tls\.mode: 'yes' is not one of off, on, require"),
    ("[tls]\nmode = 'require'\n", r"tls\.mode: 'require' needs cert and key, or psk-file"),
    ("[tls]\ncert = 'F'\n", "tls: cert and key go together"),
    ("[tls]\ncert = 'F'\nkey = 'F'\npsk-file = 'F'\n", "tls: cert and psk-file are alternatives"),
    ("[tls]\nca = 'F'\n", r"tls\.ca: needs cert and key"),
    ("[tls]\ncert = 'missing.pem'\nkey = 'F'\n", r"tls\.cert: .*/missing\.pem: no such file"),
    ("[tls]\ncert = 'F'\nkey = 'F'\nauthz = ['CN=x']\n", r"tls\.authz: checks client cert"),
    ("[tls]\ncert = 'F'\nkey = 'F'\nca = 'F'\nauthz = 'CN=x'\n", r"tls\.authz: a list of"),
    ("[tls]\nunix = 'yes'\n", r"tls\.unix: must be a boolean"),
    # session defaults: sizes, and everything fleece-start would refuse
    ("[session]\ncluster-size = '64Q'\n", r"session\.cluster-size: invalid size '64Q'"),
    ("[session]\ncache = -5\n", r"session\.cache: must not be negative"),
    ("[session]\nmax-temp = 1.5\n", r"session\.max-temp: must be a size .*not a float"),
    ("[session]\ncluster-size = '3K'\n", r"session: cluster-size 3072 must be a power of two"),
    ("[session]\non-cbw-error = 'panic'\n", r"session: on-cbw-error must be"),
    ("[session]\ncbw-timeout = -1\n", r"session: cbw-timeout -1 must be between 0 \(no limit\)"),
    # accepted once, and then every fleece-start failed "Invalid argument"
    ("[session]\ncbw-timeout = 1e300\n", r"session: cbw-timeout 1e\+300 must be between 0"),
    ("[session]\ncbw-timeout = 3601\n", r"session: cbw-timeout 3601 must be between 0"),
    ("[session]\ncbw-timeout = '45'\n", r"session\.cbw-timeout: must be a number"),
    ("[session]\ntemp-dir = 'no-such-dir'\n", r"session: temp-dir '.*/no-such-dir' is not a dir"),
    # disks
    ("[[disk]]\nname = 'a'\n", r"disk\[1\]\.source: missing"),
    ("[[disk]]\nsource = 'IMG'\npath = 'IMG'\n", r"disk\[1\]: give source or path"),
    ("[[disk]]\nsource = 'IMG'\nformat = 'qcow3'\n", r"disk\[1\]\.format: 'qcow3' is not"),
    ("[[disk]]\nsource = 'rbd:pool'\n", r"disk\[1\]\.source: rbd:pool: want rbd:POOL/IMAGE"),
    ("[[disk]]\nsource = 'nbd://h/x'\nformat = 'qcow2'\n",
     r"disk\[1\]\.source: nbd://h/x: an NBD export is served as it is"),
    ("[[disk]]\npath = 'absent.img'\n", r"disk\[1\]\.path: .*/absent\.img: no such file"),
    ("[[disk]]\npath = '.'\n", r"disk\[1\]\.path: .*: is a directory"),
    ("[[disk]]\npath = 'IMG'\nread-only = 'no'\n", r"disk\[1\]\.read-only: must be a boolean"),
    ("[[disk]]\npath = 'IMG'\ndiscard = 'trim'\n", r"disk\[1\]\.discard: 'trim' is not one of"),
    ("[[disk]]\npath = 'IMG'\nname = ''\n", r"disk\[1\]\.name: invalid disk name ''"),
    ("[[disk]]\npath = 'IMG'\nname = 'a'\n[[disk]]\npath = 'IMG'\nname = 'a'\n",
     r"disk\[2\]\.name: 'a' is already the name of disk\[1\]"),
    ("[[disk]]\npath = 'IMG'\n[[disk]]\npath = 'IMG'\n",
     r"disk\[2\]\.name: 'vm1' is already the name of disk\[1\]"),
    ("[[disk]]\npath = 'IMG'\ndescription = 3\n", r"disk\[1\]\.description: must be a string"),
    ("[[disk]]\npath = 'IMG'\nbitmaps = 'b1'\n", r"disk\[1\]\.bitmaps: a list of bitmap"),
])
def test_schema_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    _image(tmp_path)
    (tmp_path / "F").write_text("x")
    text = text.replace("IMG", str(tmp_path / "vm1.img"))
    if not text.startswith("control"):
        text = f"control = '{tmp_path}/ctl.sock'\n{text}"
    msg = _error(tmp_path, text)
    assert re.search(expected, msg), msg


@pytest.mark.parametrize(("listen", "expected"), [
    (None, None),
    ("127.0.0.1:9632", ("127.0.0.1", 9632)),
    ("[::1]:9632", ("::1", 9632)),
    (":9632", (None, 9632)),
])
def test_metrics_listen(tmp_path: Path, listen: str | None,
                        expected: tuple[str | None, int] | None) -> None:
    text = f"control = '{tmp_path}/c.sock'\n"
    if listen is not None:
        text += f"[metrics]\nlisten = '{listen}'\n"
    assert load_config(_write(tmp_path, text)).metrics == expected


def test_unwritable_disk_unless_read_only(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can write anything")
    img = _image(tmp_path)
    os.chmod(img, 0o400)
    text = f"control = '{tmp_path}/c.sock'\n[[disk]]\npath = '{img}'\n"
    assert "disk[1].path" in _error(tmp_path, text)
    load_config(_write(tmp_path, text + "read-only = true\n"))


EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "fleeced.toml.example"


def test_the_shipped_example_loads(tmp_path: Path) -> None:
    img = _image(tmp_path)
    (tmp_path / "cache").mkdir()
    text = (EXAMPLE.read_text()
            .replace("/var/lib/libvirt/images/vm1.img", img)
            .replace("/var/cache/fleeced", str(tmp_path / "cache"))
            .replace("/run/fleeced/", f"{tmp_path}/")
            .replace("/var/lib/fleeced", str(tmp_path / "state")))
    # As shipped it serves no disk (the package installs it as the service's
    # config); its first disk example, uncommented, is a working disk.
    assert load_config(_write(tmp_path, text)).disks == []
    text = (text.replace('#[[disk]]\n#name = "vm1-vda"', '[[disk]]\nname = "vm1-vda"', 1)
            .replace(f'#source = "{img}"', f'source = "{img}"', 1))
    cfg = load_config(_write(tmp_path, text))
    assert [d.name for d in cfg.disks] == ["vm1-vda"]
    assert cfg.session_defaults["cluster-size"] == 64 << 10
    assert cfg.control_path == f"{tmp_path}/control.sock"


def test_the_example_documents_every_key() -> None:
    from fleeced import config_file as config

    text = EXAMPLE.read_text()
    keys = (config._TOP_KEYS | config._LISTEN_KEYS | config._TLS_KEYS | config._SESSION_KEYS
            | config._DISK_KEYS)
    missing = [k for k in sorted(keys) if not re.search(rf"^#?\[*{re.escape(k)}\b", text, re.M)]
    assert not missing, missing
