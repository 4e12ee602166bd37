"""Units of the attach path that need no VM: node names, records, CLI checks."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from fleeced.cli import parse_args
from fleeced.qmp.attach import Attachment, node_name, qom_path
from fleeced.state_dir import State, StateDir, StateError


@pytest.mark.parametrize(("disk", "expected"), [
    ("vda", "fleeced-vda"),
    ("vm1-disk.0_x", "fleeced-vm1-disk.0_x"),
])
def test_node_name_keeps_simple_names(disk: str, expected: str) -> None:
    assert node_name(disk) == expected


@pytest.mark.parametrize("disk", ["a" * 40, "vm 1/disk", "dïsk", "a@b"])
def test_node_name_is_a_valid_distinct_qemu_node_name(disk: str) -> None:
    name = node_name(disk)
    assert len(name) <= 31
    assert name[0].isalpha()
    assert all(c.isascii() and (c.isalnum() or c in "-._") for c in name)
    assert node_name(disk + "x") != name


def test_qom_path() -> None:
    assert qom_path("vda") == "/machine/peripheral/vda"
    assert qom_path("/machine/peripheral-anon/device[0]") == "/machine/peripheral-anon/device[0]"


def test_attachment_round_trips_through_json() -> None:
    att = Attachment(disk="vda", qmp="/run/q.sock", device="vda", qom_path="/machine/x",
                     node="fleeced-vda", original="disk0", method="reopen",
                     reconnect_delay=30, original_file="disk0-file", iothread="io0",
                     state="attached")
    again = Attachment.from_json(json.loads(json.dumps(att.to_json())))
    assert again == att
    assert again.describe()["original-file-node"] == "disk0-file"
    with pytest.raises(TypeError):
        Attachment.from_json({"disk": "vda"})


def test_state_document_is_checked() -> None:
    assert State.from_json({"version": 1}).disks == []
    for bad in ([], {"version": 2}, {"version": 1, "disks": {}}, {"version": 1, "sessions": [1]}):
        with pytest.raises(StateError):
            State.from_json(bad)


@pytest.mark.parametrize(("text", "why"), [
    ('{"version": 1, "disks": [', "Expecting value"),  # truncated
    ('{"version": 1, "bitmaps": [{"disk": "a", "name": "b", "granularity": 1e400}]}',
     "number 1e400 is out of range"),
    ('{"version": 1, "sessions": [{"disk": "a", "name": "b", "x": NaN}]}', "NaN"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),  # a RecursionError before
    ('{"version": 1, "disks": [{"name": "x", "path": 5}]}', r"disks\[1\]\.source must be a string"),
    ('{"version": 1, "disks": [{"name": "x"}]}', r"disks\[1\]\.source must be a string"),
    ('{"version": 1, "bitmaps": [{"disk": "a", "name": "b", "granularity": true}]}',
     r"bitmaps\[1\]\.granularity must be an integer"),
])
def test_a_corrupt_state_file_is_named(tmp_path: Path, text: str, why: str) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "state.json").write_text(text)
    with pytest.raises(StateError) as info:
        StateDir.open(str(tmp_path / "s"))
    assert re.search(rf"^{tmp_path}/s/state\.json: corrupt state \(.*{why}", str(info.value))


def test_state_dir_saves_atomically_and_locks(tmp_path: Path) -> None:
    sd = StateDir.open(str(tmp_path / "s"))
    sd.state.disks.append({"name": "b", "path": "/b.img"})
    asyncio.run(sd.save())
    assert json.loads((tmp_path / "s" / "state.json").read_text())["disks"][0]["name"] == "b"
    assert not (tmp_path / "s" / "state.json.tmp").exists()
    with pytest.raises(StateError, match="in use by another fleeced"):
        StateDir.open(str(tmp_path / "s"))
    sd.close()
    again = StateDir.open(str(tmp_path / "s"))
    assert again.state.disks == [{"name": "b", "path": "/b.img"}]
    again.close()


@pytest.mark.parametrize(("argv", "needle"), [
    (["attach", "vda"], "attach needs DISK, --qmp PATH (or --libvirt DOMAIN) and"),
    (["attach", "--list", "vda"], "takes no DISK"),
    (["attach", "vda", "--qmp", "q", "--device", "d", "--freeze"], "--freeze needs --qga"),
    (["attach", "vda", "--qmp", "q", "--device", "d", "--qga", "g"], "only used with --freeze"),
    (["attach", "vda", "--qmp", "q", "--device", "d", "--name", "n"], "only used with --freeze"),
    (["backup-window", "vda", "--qmp", "q", "--device", "d"], "needs a COMMAND"),
    (["backup-window", "vda", "--qmp", "q", "--device", "d", "--freeze", "--qga", "g",
      "--cluster-size", "1M", "--", "true"], "cannot be combined with --freeze"),
    (["disk"], "add or remove"),
    (["serve", "--fleece"], "--fleece needs at least one SOURCE"),
    (["serve", "--config", "f.toml", "x.img"], "--config cannot be combined with SOURCE"),
    (["serve", "-f", "qcow3", "x.img"], "invalid choice: 'qcow3'"),
])
def test_cli_usage_errors(argv: list[str], needle: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_backup_window_command_keeps_its_own_options() -> None:
    args = parse_args(["backup-window", "vda", "--qmp", "q", "--device", "d", "--",
                       "nbdcopy", "--progress", "{uri}", "--", "out.img"])
    assert args.argv == ["nbdcopy", "--progress", "{uri}", "--", "out.img"]
    assert args.disk == "vda" and args.qmp == "q"
