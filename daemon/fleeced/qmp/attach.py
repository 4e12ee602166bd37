"""Redirect a running VM's disk through the daemon, and back.

The sequence, each step measured on QEMU 7.2::

    blockdev-add   nbd node "fleeced-<disk>" -> our Unix socket, export <disk>
    qom-get        <device>.drive                       -> the original node
    qom-set        <device>.drive = "fleeced-<disk>"    (method "qom-set")
      or
    blockdev-reopen  <raw node> with file = "fleeced-<disk>"   (method "reopen")
    ...
    qom-get (still ours?) ; qom-set back (or reopen back) ; blockdev-del

Rules this module keeps, and why:

- **Never ``qom-set drive`` to the node the device already has**: QEMU 7.2
  aborts (``bdrv_replace_child_noperm: Assertion `old_bs != new_bs'``).
  Every switch is preceded by a read of the current node and done only when
  it differs.
- **Switches drain the device's in-flight I/O** and block QEMU's monitor until
  every request is answered; the daemon keeps serving on the same event loop
  while it waits for QEMU, so the drain completes.
- **AioContexts**: a device with an ``iothread`` whose dataplane runs refuses
  a node from the main context ("Different aio context is not supported").
  The node is then moved with ``x-blockdev-set-iothread`` (possible only
  while nothing else uses it) and the switch is retried.  A paused guest
  whose dataplane has not started takes the node in the main context.
- **Only the same image**: the device's node must be a ``raw`` node over the
  very file the daemon serves, of the same size; anything else would hand
  the guest different bytes.
- **Roll back to exactly what was there** on any failure, and make
  :func:`switch_back` idempotent: it reads where the device points and
  only undoes what is still ours, so it also finishes a detach (or an attach)
  interrupted by a daemon crash.

Timeouts are the monitor's (:mod:`fleeced.qmp.monitor`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from fleeced.errors import CommandError
from fleeced.qmp.monitor import Monitor, QmpFailed

log = logging.getLogger(__name__)

METHODS: Final = ("auto", "qom-set", "reopen")
PERIPHERAL: Final = "/machine/peripheral/"


@dataclass
class Attachment:
    """A VM disk redirected through the daemon (kept in the state dir)."""

    disk: str
    qmp: str
    device: str
    qom_path: str
    #: Our nbd node in the VM.
    node: str
    #: The device's node before the switch (method qom-set), or the raw node
    #: whose ``file`` child was replaced (method reopen).
    original: str
    method: str
    reconnect_delay: int
    #: Method reopen: the raw node's original ``file`` child.
    original_file: str | None = None
    #: The iothread our node was moved to, when the device needed it.
    iothread: str | None = None
    #: ``attaching`` until the switch is done, then ``attached``.
    state: str = "attaching"
    since: float = field(default_factory=time.time)

    @property
    def own_node(self) -> str | None:
        """What the device pointed at before: the original node (qom-set) or
        the raw node's original file child (reopen)."""
        return self.original if self.method == "qom-set" else self.original_file

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Attachment:
        """:raise TypeError: when DOC lacks fields or has unknown ones."""
        return cls(**doc)

    def describe(self) -> dict[str, Any]:
        """The ``query-attachments`` entry."""
        out: dict[str, Any] = {
            "disk": self.disk, "qmp": self.qmp, "device": self.device,
            "qom-path": self.qom_path, "node": self.node, "original-node": self.original,
            "method": self.method, "reconnect-delay": self.reconnect_delay,
            "state": self.state, "since": round(self.since, 3),
        }
        if self.original_file is not None:
            out["original-file-node"] = self.original_file
        if self.iothread is not None:
            out["iothread"] = self.iothread
        return out


def node_name(disk: str) -> str:
    """Our node name in the VM for DISK: ``fleeced-<disk>``.

    QEMU node names are at most 31 characters of letters, digits, ``-``,
    ``.`` and ``_``; other disk names get their odd characters replaced and,
    when too long, a hash of the full name at the end.
    """
    clean = "".join(c if c.isascii() and (c.isalnum() or c in "-._") else "_" for c in disk)
    name = f"fleeced-{clean}"
    if clean != disk or len(name) > 31:
        digest = hashlib.sha256(disk.encode()).hexdigest()[:8]
        name = f"fleeced-{clean[:14]}-{digest}"
    return name


def qom_path(device: str) -> str:
    """A qdev id becomes ``/machine/peripheral/<id>``; a QOM path stays."""
    return device if device.startswith("/") else PERIPHERAL + device


async def prepare(mon: Monitor, *, disk: str, image: str, size: int, read_only: bool,
                  device: str, method: str, reconnect_delay: int) -> Attachment:
    """Look at the VM and decide how to attach; changes nothing in the VM.

    :raise CommandError: when the device is missing, already redirected, or
        not a raw node over IMAGE of SIZE bytes.
    """
    path = qom_path(device)
    ours = node_name(disk)
    try:
        current = await mon.execute("qom-get", {"path": path, "property": "drive"})
    except QmpFailed as exc:
        if exc.klass == "DeviceNotFound":
            raise CommandError(f"VM has no device {device!r} ({exc.qemu_desc})",
                               "DeviceNotFound") from None
        raise CommandError(f"device {device!r} has no usable 'drive' property: "
                           f"{exc.qemu_desc}") from None
    if not isinstance(current, str) or not current:
        raise CommandError(f"device {device!r} has no medium (drive is empty)")
    nodes = await _nodes(mon)
    if ours in nodes:
        raise CommandError(f"the VM already has a node {ours!r}: disk {disk!r} is attached "
                           "(or a previous attach was not cleaned up; run vm-detach)")
    info = nodes.get(current)
    if info is None:
        raise CommandError(f"device {device!r} uses node {current!r}, which QEMU does "
                           "not list (a BlockBackend name? attach needs -blockdev nodes)")
    _check_same_image(info, current, image=image, size=size, disk=disk)
    if read_only and not info.get("ro", False):
        raise CommandError(f"disk {disk!r} is served read-only but the VM writes to it")
    att = Attachment(disk=disk, qmp=mon.path, device=device, qom_path=path, node=ours,
                     original=current, method="qom-set" if method == "auto" else method,
                     reconnect_delay=reconnect_delay)
    if att.method == "reopen":
        att.original_file = await _file_child(mon, current)
    return att


def _check_same_image(info: dict[str, Any], node: str, *, image: str, size: int,
                      disk: str) -> None:
    if info.get("drv") != "raw":
        raise CommandError(f"node {node!r} is a {info.get('drv')!r} node; fleeced serves raw "
                           "images, so only a raw node can be redirected")
    img = info.get("image") or {}
    filename = img.get("filename", "")
    try:
        same = os.path.samefile(filename, image)
    except (OSError, TypeError, ValueError):
        same = False
    if not same:
        raise CommandError(f"node {node!r} is {filename!r}, not the image of disk "
                           f"{disk!r} ({image}); refusing to attach a different image")
    if img.get("virtual-size") != size:
        raise CommandError(f"node {node!r} is {img.get('virtual-size')} bytes but disk "
                           f"{disk!r} has {size} (a raw node with offset/size?)")


async def add_node(mon: Monitor, att: Attachment, socket_path: str) -> None:
    """Create our nbd node in the VM (connects to the daemon right away)."""
    await mon.execute("blockdev-add", {
        "driver": "nbd", "node-name": att.node,
        "server": {"type": "unix", "path": socket_path},
        "export": att.disk, "reconnect-delay": att.reconnect_delay,
    })


async def switch(mon: Monitor, att: Attachment, fallback: bool = False) -> None:
    """Point the device at our node (moving the node to the device's iothread
    if QEMU asks for it).

    :param fallback: method ``auto``: when QEMU refuses ``qom-set`` for any
        other reason, try ``blockdev-reopen`` of the raw node.
    :raise CommandError: when QEMU refuses; the device is then unchanged.
    """
    try:
        await _switch_once(mon, att)
        return
    except QmpFailed as exc:
        if "aio context" not in exc.qemu_desc.lower():
            if not (fallback and att.method == "qom-set"):
                raise
            log.info("qom-set refused (%s); trying blockdev-reopen", exc.qemu_desc)
            att.method = "reopen"
            att.original_file = await _file_child(mon, att.original)
            await switch(mon, att)
            return
        first = exc
    iothread = await _device_iothread(mon, att.qom_path)
    if iothread is None:
        raise first
    await mon.execute("x-blockdev-set-iothread", {"node-name": att.node, "iothread": iothread})
    att.iothread = iothread
    await _switch_once(mon, att)


async def _switch_once(mon: Monitor, att: Attachment) -> None:
    current = await current_node(mon, att)
    if current == att.node:
        return  # already there: setting it again would abort QEMU
    if current != att.own_node:
        raise CommandError(f"device {att.device!r} changed under us (now {current!r}); "
                           "not switching")
    await _point(mon, att, att.node)


async def _point(mon: Monitor, att: Attachment, node: str | None) -> None:
    """Make the device read and write through NODE: its ``drive`` (qom-set),
    or the raw node's ``file`` child (reopen)."""
    if att.method == "qom-set":
        await mon.execute("qom-set", {"path": att.qom_path, "property": "drive",
                                      "value": node})
    else:
        await _reopen(mon, att, node)


async def current_node(mon: Monitor, att: Attachment) -> str | None:
    """Where the device points now: its drive (qom-set) or the raw node's file
    child (reopen)."""
    if att.method == "qom-set":
        value = await mon.execute("qom-get", {"path": att.qom_path, "property": "drive"})
        return value if isinstance(value, str) else None
    return await _file_child(mon, att.original)


async def switch_back(mon: Monitor, att: Attachment) -> None:
    """Undo :func:`add_node` and :func:`switch`, whatever of them happened.

    Idempotent: reads where the device points, switches back only if it is
    our node, then deletes our node if it exists.

    :raise CommandError: when the device points somewhere else than ours or
        the original (someone else changed it: we do not touch it), when the
        original node is gone, or when QEMU refuses.
    """
    current = await current_node(mon, att)
    original = att.own_node
    nodes = await _nodes(mon)
    if current == att.node:
        if original not in nodes:
            raise CommandError(f"the original node {original!r} of device {att.device!r} "
                               "is gone; the device stays on fleeced")
        await _point(mon, att, original)
        nodes = await _nodes(mon)
    elif current != original:
        raise CommandError(f"device {att.device!r} now uses node {current!r}, neither "
                           f"fleeced's nor the original {original!r}; leaving it alone")
    if att.node in nodes:
        await mon.execute("blockdev-del", {"node-name": att.node})


async def _reopen(mon: Monitor, att: Attachment, file_node: str | None) -> None:
    """``blockdev-reopen`` the raw node with FILE_NODE as its file, repeating
    every option QEMU reports for it (others would fall back to defaults)."""
    nodes = await _nodes(mon)
    info = nodes.get(att.original)
    if info is None or file_node is None:
        raise CommandError(f"node {att.original!r} is gone; cannot reopen it")
    cache = info.get("cache") or {}
    opts: dict[str, Any] = {
        "driver": "raw", "node-name": att.original, "file": file_node,
        "read-only": bool(info.get("ro", False)),
        "cache": {"direct": bool(cache.get("direct", False)),
                  "no-flush": bool(cache.get("no-flush", False))},
        "detect-zeroes": info.get("detect_zeroes", "off"),
    }
    await mon.execute("blockdev-reopen", {"options": [opts]})


async def _nodes(mon: Monitor) -> dict[str, dict[str, Any]]:
    out = await mon.execute("query-named-block-nodes", {"flat": True})
    return {n["node-name"]: n for n in out if isinstance(n, dict) and "node-name" in n}


async def _file_child(mon: Monitor, node: str) -> str | None:
    graph = await mon.execute("x-debug-query-block-graph")
    ids = {n["id"]: n.get("name") for n in graph.get("nodes", [])}
    by_name = {name: i for i, name in ids.items()}
    parent = by_name.get(node)
    for edge in graph.get("edges", []):
        if edge.get("parent") == parent and edge.get("name") == "file":
            child = ids.get(edge.get("child"))
            return child if isinstance(child, str) else None
    return None


async def _device_iothread(mon: Monitor, path: str) -> str | None:
    """The iothread id of the device (``/objects/io0`` -> ``io0``), if any."""
    for where in (path, path + "/virtio-backend"):
        try:
            value = await mon.execute("qom-get", {"path": where, "property": "iothread"})
        except QmpFailed:
            continue
        if isinstance(value, str) and value:
            return value.rsplit("/", 1)[-1]
    return None
