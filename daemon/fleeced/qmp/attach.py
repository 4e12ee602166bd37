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

Any other node (qcow2, rbd, luks...) the daemon cannot write itself, and
it must not sit in that node's write path either: QEMU drains a node's
exports when it drains the node (``stop``, snapshots, migration), so a guest
request in flight to the daemon that needed QEMU's export of the node would
wait for a drain that waits for it (measured: ``stop`` took 105 s and the
guest writes failed).  Method ``cbw`` leaves the device on its node; QEMU
runs the copy-before-write itself, and the daemon only receives::

    nbd-server-start + block-export-add   N, read-only, on a private socket
                                          (the daemon reads the snapshot's
                                          unchanged clusters there)
    at fleece-start, with the VM paused:
    blockdev-add   nbd node "fleeced-<disk>.cbw" -> export <disk>@<session>.cbw
    blockdev-add   copy-before-write "fleeced-<disk>" (file N, that target)
    qom-set        <device>.drive = "fleeced-<disk>"
    at fleece-stop: qom-set back, blockdev-del both

QEMU writes a cluster's old data to the target, which the daemon stores
for the session before it answers, and only then the guest's data to N.
Nothing QEMU waits for ever waits for QEMU.

Timeouts are the monitor's (:mod:`fleeced.qmp.monitor`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from fleeced.errors import CommandError
from fleeced.qmp.monitor import QmpFailed, VmMonitor

log = logging.getLogger(__name__)

METHODS: Final = ("auto", "qom-set", "reopen", "cbw")
#: What QEMU's copy-before-write target node is called, beside ours.
TARGET_SUFFIX: Final = ".cbw"
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
    #: Method cbw: where QEMU exports the node (read-only) to the daemon.
    upstream: str | None = None
    #: Method cbw: the node's virtual size.
    size: int = 0
    #: The daemon bypasses the host page cache for the disk while attached,
    #: as the VM's node did (``cache.direct=on``, libvirt's cache='none').
    direct: bool = False

    @property
    def own_node(self) -> str | None:
        """What the device pointed at before: the original node (qom-set) or
        the raw node's original file child (reopen)."""
        return self.original_file if self.method == "reopen" else self.original

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
        if self.upstream is not None:
            out["export-socket"] = self.upstream
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


async def prepare(mon: VmMonitor, *, disk: str, image: str | None, size: int, read_only: bool,
                  device: str, method: str, reconnect_delay: int) -> Attachment:
    """Look at the VM and decide how to attach; changes nothing in the VM.

    With IMAGE, the device's node must be a raw node over that file, which
    the daemon serves as DISK.  Without, any node: method ``cbw`` (see the
    module notes), and SIZE (0: any) must be the node's.

    :raise CommandError: when the device is missing, already redirected, or
        not what DISK is.
    """
    path = qom_path(await mon.device_id(device))
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
    if image is None:
        node_size = (info.get("image") or {}).get("virtual-size")
        if not isinstance(node_size, int) or node_size <= 0:
            raise CommandError(f"node {current!r} has no size QEMU reports")
        if size and node_size != size:
            raise CommandError(f"node {current!r} is {node_size} bytes but disk {disk!r} has "
                               f"{size}; refusing to attach a different disk")
        if method not in ("auto", "cbw"):
            raise CommandError(f"node {current!r} is a {info.get('drv')!r} node, which the "
                               f"daemon cannot write: only method cbw (QEMU copies before "
                               f"write) attaches it, not {method}")
        return Attachment(disk=disk, qmp=mon.path, device=device, qom_path=path, node=ours,
                          original=current, method="cbw", reconnect_delay=reconnect_delay,
                          upstream=export_socket(mon.socket_dir, ours), size=node_size)
    if method == "cbw":
        raise CommandError("method cbw is for nodes the daemon does not serve itself")
    _check_same_image(info, current, image=image, size=size, disk=disk)
    if read_only and not info.get("ro", False):
        raise CommandError(f"disk {disk!r} is served read-only but the VM writes to it")
    att = Attachment(disk=disk, qmp=mon.path, device=device, qom_path=path, node=ours,
                     original=current, method="qom-set" if method == "auto" else method,
                     reconnect_delay=reconnect_delay)
    if att.method == "reopen":
        att.original_file = await _file_child(mon, current)
    return att


def export_socket(socket_dir: str, node: str) -> str:
    """Where QEMU exports a node for the daemon: in the monitor's socket
    directory (QEMU can create files there, whatever user it runs as, and
    the daemon reaches it), named after our node."""
    return os.path.join(socket_dir, f"{node}.sock")


def target_node(att: Attachment) -> str:
    """The nbd node QEMU's copy-before-write writes the old data to."""
    return node_name(att.disk + TARGET_SUFFIX)


async def node_filename(mon: VmMonitor, node: str) -> str | None:
    """The local file under NODE as QEMU names it (a qcow2 node's image), or
    None (an rbd node, a json: name)."""
    info = (await _nodes(mon)).get(node) or {}
    name = (info.get("image") or {}).get("filename") or info.get("file")
    return name if isinstance(name, str) and name.startswith("/") else None


async def node_is_cache_direct(mon: VmMonitor, node: str) -> bool:
    """Whether NODE bypasses the host page cache (``cache.direct=on``)."""
    info = (await _nodes(mon)).get(node) or {}
    return bool((info.get("cache") or {}).get("direct", False))


async def node_is_read_only(mon: VmMonitor, node: str) -> bool:
    """Whether QEMU opened NODE read-only."""
    info = (await _nodes(mon)).get(node) or {}
    return bool(info.get("ro", False))


async def export_node(mon: VmMonitor, att: Attachment) -> None:
    """Have QEMU export the device's node, read-only, on
    :attr:`Attachment.upstream` (its NBD server: QEMU has one).

    :raise CommandError: when QEMU's NBD server is taken (libvirt's backup, an
        operator) or the export is refused; what was started is undone.
    """
    assert att.upstream is not None
    try:
        os.unlink(att.upstream)
    except FileNotFoundError:
        pass
    for attempt in (1, 2):
        try:
            await mon.execute("nbd-server-start", {
                "addr": {"type": "unix", "data": {"path": att.upstream}}})
            break
        except QmpFailed as exc:
            exports = await mon.execute("query-block-exports")
            leftover = any(isinstance(e, dict) and e.get("id") == att.node for e in exports)
            if attempt == 1 and leftover:
                # Ours, from a daemon that died without a state dir to
                # remember it: take it down and start again.
                log.warning("QEMU still exports %s for an earlier fleeced; replacing it",
                            att.original)
                await unexport_node(mon, att)
                continue
            raise CommandError(f"QEMU's NBD server is not free ({exc.qemu_desc}); the "
                               f"daemon reads node {att.original!r} through it") from None
    try:
        await mon.execute("block-export-add", {
            "type": "nbd", "id": att.node, "node-name": att.original, "name": att.disk,
            "writable": False})
    except BaseException:
        await _quietly(mon, "nbd-server-stop", {})
        raise


async def unexport_node(mon: VmMonitor, att: Attachment) -> None:
    """Undo :func:`export_node`, whatever of it happened (idempotent).

    :raise CommandError: when QEMU keeps the export.
    """
    exports = await mon.execute("query-block-exports")
    ours = any(isinstance(e, dict) and e.get("id") == att.node for e in exports)
    if ours:
        await mon.execute("block-export-del", {"id": att.node, "mode": "hard"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + mon.timeout
        while any(isinstance(e, dict) and e.get("id") == att.node
                  for e in await mon.execute("query-block-exports")):
            if loop.time() > deadline:
                raise CommandError(f"QEMU still exports {att.original!r} after "
                                   "block-export-del")
            await asyncio.sleep(0.02)
    # The server is ours when our export was there or our socket is: never
    # stop somebody else's (export_node found it taken and started none).
    if ours or (att.upstream is not None
                and await asyncio.to_thread(os.path.exists, att.upstream)):
        await _quietly(mon, "nbd-server-stop", {})
    if att.upstream is not None:
        try:
            os.unlink(att.upstream)
        except OSError:
            pass


async def start_cbw(mon: VmMonitor, att: Attachment, socket_path: str, target_export: str,
                    break_guest_write: bool) -> None:
    """Put QEMU's copy-before-write filter between the device and its node,
    writing old data to TARGET_EXPORT on the daemon's socket (call with the
    VM paused: the snapshot is the node as it is then).

    QEMU's own cbw-timeout is not used: a copy QEMU gave up on would leave
    the daemon's snapshot silently incomplete.  Its on-cbw-error is the
    session's, and the daemon answers an error only when that is the policy
    (else it breaks its own snapshot and answers success).

    :raise CommandError: when QEMU refuses; what was added is removed.
    """
    target = target_node(att)
    await _add_nbd_node(mon, {
        "driver": "nbd", "node-name": target,
        "server": {"type": "unix", "path": socket_path}, "export": target_export})
    try:
        await mon.execute("blockdev-add", {
            "driver": "copy-before-write", "node-name": att.node, "file": att.original,
            "target": target,
            "on-cbw-error": "break-guest-write" if break_guest_write else "break-snapshot"})
        await switch(mon, att)
    except BaseException:
        await stop_cbw(mon, att)
        raise


async def stop_cbw(mon: VmMonitor, att: Attachment) -> None:
    """Undo :func:`start_cbw`, whatever of it happened (idempotent): the
    device back on its node, the filter and its target deleted.

    :raise CommandError: as :func:`switch_back`.
    """
    await switch_back(mon, att)
    if target_node(att) in await _nodes(mon):
        await mon.execute("blockdev-del", {"node-name": target_node(att)})


async def pause(mon: VmMonitor) -> bool:
    """Stop a running VM (nothing new reaches its disks): whether we did."""
    status = await mon.execute("query-status")
    if isinstance(status, dict) and status.get("running"):
        await mon.execute("stop")
        return True
    return False


async def resume(mon: VmMonitor) -> None:
    await mon.execute("cont")


async def _quietly(mon: VmMonitor, cmd: str, args: dict[str, Any]) -> None:
    """Run CMD, logging a failure (cleanup that must not hide the first error)."""
    try:
        await mon.execute(cmd, args)
    except CommandError as exc:
        log.debug("%s: %s", cmd, exc.desc)


def _check_same_image(info: dict[str, Any], node: str, *, image: str, size: int,
                      disk: str) -> None:
    if info.get("drv") != "raw":
        raise CommandError(f"node {node!r} is a {info.get('drv')!r} node, not the raw image "
                           f"disk {disk!r} serves; attach it under a disk name the daemon "
                           "does not serve (QEMU then copies before write for it)")
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


async def add_node(mon: VmMonitor, att: Attachment, socket_path: str) -> None:
    """Create our nbd node in the VM (connects to the daemon right away)."""
    await _add_nbd_node(mon, {
        "driver": "nbd", "node-name": att.node,
        "server": {"type": "unix", "path": socket_path},
        "export": att.disk, "reconnect-delay": att.reconnect_delay,
    })


async def _add_nbd_node(mon: VmMonitor, options: dict[str, Any]) -> None:
    """``blockdev-add`` of an nbd node on the daemon's socket.

    :raise CommandError: QEMU's error; when it may not open the socket, what
        to change.
    """
    try:
        await mon.execute("blockdev-add", options)
    except QmpFailed as exc:
        if "Permission denied" not in exc.qemu_desc:
            raise
        path = options["server"]["path"]
        raise CommandError(
            f"QEMU may not open the daemon's socket {path} (Permission denied): it runs "
            "as another user (libvirt's as libvirt-qemu, group kvm); serve with "
            "--socket-group GROUP (or --socket-mode 0666), and where AppArmor confines "
            "QEMU allow the socket in its profile (abstractions/libvirt-qemu.d)") from None


async def switch(mon: VmMonitor, att: Attachment, fallback: bool = False) -> None:
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


async def _switch_once(mon: VmMonitor, att: Attachment) -> None:
    current = await current_node(mon, att)
    if current == att.node:
        return  # already there: setting it again would abort QEMU
    if current != att.own_node:
        raise CommandError(f"device {att.device!r} changed under us (now {current!r}); "
                           "not switching")
    await _point(mon, att, att.node)


async def _point(mon: VmMonitor, att: Attachment, node: str | None) -> None:
    """Make the device read and write through NODE: its ``drive`` (qom-set,
    cbw), or the raw node's ``file`` child (reopen)."""
    if att.method != "reopen":
        await mon.execute("qom-set", {"path": att.qom_path, "property": "drive",
                                      "value": node})
    else:
        await _reopen(mon, att, node)


async def current_node(mon: VmMonitor, att: Attachment) -> str | None:
    """Where the device points now: its drive (qom-set, cbw) or the raw
    node's file child (reopen)."""
    if att.method != "reopen":
        value = await mon.execute("qom-get", {"path": att.qom_path, "property": "drive"})
        return value if isinstance(value, str) else None
    return await _file_child(mon, att.original)


async def switch_back(mon: VmMonitor, att: Attachment) -> None:
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


async def _reopen(mon: VmMonitor, att: Attachment, file_node: str | None) -> None:
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


async def _nodes(mon: VmMonitor) -> dict[str, dict[str, Any]]:
    out = await mon.execute("query-named-block-nodes", {"flat": True})
    return {n["node-name"]: n for n in out if isinstance(n, dict) and "node-name" in n}


async def _file_child(mon: VmMonitor, node: str) -> str | None:
    graph = await mon.execute("x-debug-query-block-graph")
    ids = {n["id"]: n.get("name") for n in graph.get("nodes", [])}
    by_name = {name: i for i, name in ids.items()}
    parent = by_name.get(node)
    for edge in graph.get("edges", []):
        if edge.get("parent") == parent and edge.get("name") == "file":
            child = ids.get(edge.get("child"))
            return child if isinstance(child, str) else None
    return None


async def _device_iothread(mon: VmMonitor, path: str) -> str | None:
    """The iothread id of the device (``/objects/io0`` -> ``io0``), if any."""
    for where in (path, path + "/virtio-backend"):
        try:
            value = await mon.execute("qom-get", {"path": where, "property": "iothread"})
        except QmpFailed:
            continue
        if isinstance(value, str) and value:
            return value.rsplit("/", 1)[-1]
    return None
