"""QMP through libvirt, for a VM whose monitor libvirt holds.

libvirt keeps the only QMP connection of the VMs it runs; a second ``-qmp``
needs ``<qemu:commandline>`` and hand edits.  libvirt passes a QMP command
through instead (``virDomainQemuMonitorCommand``, what ``virsh
qemu-monitor-command`` does; libvirt marks the domain tainted
"custom-monitor").  :class:`LibvirtMonitor` does that behind the same
interface as :class:`~fleeced.qmp.monitor.Monitor`, so attach, fleecing and
detach run unchanged on a libvirt domain.

A VM is named by a *target* string wherever a QMP socket path goes (the
attachment record, ``vm-attach``'s ``qmp``): ``libvirt:URI#DOMAIN``.

libvirt's API blocks; each call runs in a worker thread, bounded by the same
timeouts as a QMP socket (a call libvirt never answers leaves its thread
behind, not the event loop).  The binding (``libvirt-python``, Debian
``python3-libvirt``) is imported only when a libvirt target is used.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from types import TracebackType
from typing import Any, Final

from fleeced.errors import CommandError, VmUnreachable
from fleeced.qmp.monitor import COMMAND_TIMEOUT, CONNECT_TIMEOUT, QmpFailed

log = logging.getLogger(__name__)

PREFIX: Final = "libvirt:"
DEFAULT_URI: Final = "qemu:///system"
#: Where libvirt's system QEMU driver keeps a running domain's status XML
#: (it names the domain's private directory, where its monitor socket is).
STATUS_DIR: Final = "/run/libvirt/qemu"


def target(domain: str, uri: str = DEFAULT_URI) -> str:
    """The target string of DOMAIN on URI."""
    if not domain or "#" in uri:
        raise CommandError(f"bad libvirt domain {domain!r} or URI {uri!r}")
    return f"{PREFIX}{uri}#{domain}"


def is_target(text: str) -> bool:
    return text.startswith(PREFIX)


def parse(text: str) -> tuple[str, str]:
    """``(uri, domain)`` of a target string.

    :raise CommandError: when it is not one.
    """
    uri, sep, domain = text[len(PREFIX):].partition("#")
    if not is_target(text) or not sep or not domain or not uri:
        raise CommandError(f"bad libvirt target {text!r} (want libvirt:URI#DOMAIN)")
    return uri, domain


def _binding() -> tuple[Any, Any]:
    try:
        import libvirt
        import libvirt_qemu
    except ImportError:
        raise CommandError("the libvirt Python binding is needed for a libvirt domain "
                           "(pip install libvirt-python, or Debian's python3-libvirt)") from None
    return libvirt, libvirt_qemu


async def domain_alive(text: str) -> bool | None:
    """Whether the domain of target TEXT runs: False when libvirt says it
    does not (or knows it no more), None when libvirt cannot be asked."""
    libvirt, _ = _binding()
    uri, domain = parse(text)

    def ask() -> bool:
        conn = libvirt.open(uri)
        try:
            try:
                return bool(conn.lookupByName(domain).isActive())
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False
                raise
        finally:
            conn.close()

    try:
        return await asyncio.wait_for(asyncio.to_thread(ask), CONNECT_TIMEOUT)
    except (TimeoutError, libvirt.libvirtError) as exc:
        log.debug("libvirt %s: cannot tell whether %s runs: %s", uri, domain, exc)
        return None


class LibvirtMonitor:
    """QMP commands to a libvirt domain; ``async with LibvirtMonitor(target)``."""

    def __init__(self, path: str, timeout: float = COMMAND_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.uri, self.domain = parse(path)
        self._conn: Any = None
        self._dom: Any = None

    async def __aenter__(self) -> LibvirtMonitor:
        libvirt, _ = _binding()

        def connect() -> tuple[Any, Any]:
            conn = libvirt.open(self.uri)
            try:
                dom = conn.lookupByName(self.domain)
                if not dom.isActive():
                    raise VmUnreachable(f"libvirt domain {self.domain!r} is not running")
                return conn, dom
            except BaseException:
                conn.close()
                raise

        try:
            self._conn, self._dom = await asyncio.wait_for(asyncio.to_thread(connect),
                                                           CONNECT_TIMEOUT)
        except TimeoutError:
            raise CommandError(f"libvirt {self.uri}: no answer within "
                               f"{CONNECT_TIMEOUT:g}s") from None
        except libvirt.libvirtError as exc:
            raise VmUnreachable(f"cannot reach libvirt domain {self.domain!r} on {self.uri}: "
                               f"{exc.get_error_message()}") from None
        return self

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        conn, self._conn, self._dom = self._conn, None, None
        if conn is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(conn.close), CONNECT_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - closing: nothing to do about it
                log.debug("libvirt %s: close: %s", self.uri, exc)

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Run CMD through libvirt's monitor passthrough.

        :raise QmpFailed: when QEMU answers with an error.
        :raise CommandError: when libvirt refuses or does not answer in time.
        """
        libvirt, libvirt_qemu = _binding()
        if self._dom is None:
            raise CommandError(f"{cmd}: not connected to libvirt domain {self.domain!r}")
        text = json.dumps({"execute": cmd, "arguments": args or {}})
        log.debug("libvirt %s: %s %s", self.domain, cmd, args or {})
        try:
            out = await asyncio.wait_for(
                asyncio.to_thread(libvirt_qemu.qemuMonitorCommand, self._dom, text, 0),
                self.timeout)
        except TimeoutError:
            raise CommandError(f"{cmd}: no answer from libvirt domain {self.domain!r} "
                               f"within {self.timeout:g}s") from None
        except libvirt.libvirtError as exc:
            raise CommandError(f"{cmd}: libvirt: {exc.get_error_message()}") from None
        try:
            reply = json.loads(out)
        except ValueError:
            raise CommandError(f"{cmd}: libvirt passed back no JSON") from None
        if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
            err = reply["error"]
            raise QmpFailed(cmd, str(err.get("class", "GenericError")), str(err.get("desc", "")))
        if not isinstance(reply, dict) or "return" not in reply:
            raise CommandError(f"{cmd}: unexpected reply from libvirt: {out[:200]}")
        return reply["return"]

    async def device_id(self, target_dev: str) -> str:
        """The qdev id of the disk libvirt calls TARGET_DEV (``vda`` ->
        ``virtio-disk0``), from the running domain's XML.

        :raise CommandError: when the domain has no such disk.
        """
        xml = await asyncio.wait_for(asyncio.to_thread(self._dom.XMLDesc, 0), self.timeout)
        for disk in ET.fromstring(xml).iterfind("./devices/disk"):
            tgt, alias = disk.find("target"), disk.find("alias")
            if tgt is not None and tgt.get("dev") == target_dev:
                if alias is None or not alias.get("name"):
                    break
                return str(alias.get("name"))
        raise CommandError(f"libvirt domain {self.domain!r} has no disk {target_dev!r}",
                           "DeviceNotFound")

    @property
    def socket_dir(self) -> str:
        """A directory the domain's QEMU can create sockets in (and its
        security profile allows): the domain's private directory, where
        libvirt put its monitor socket."""
        status = os.path.join(STATUS_DIR, f"{self.domain}.xml")
        try:
            root = ET.parse(status).getroot()
        except (OSError, ET.ParseError):
            raise CommandError(f"cannot read libvirt's status of {self.domain!r} ({status}); "
                               "fleeced needs the system QEMU driver, as root") from None
        mon = root.find("./monitor")
        path = mon.get("path") if mon is not None else None
        if not path or not re.match(r"^/", path):
            raise CommandError(f"libvirt's status of {self.domain!r} names no monitor socket")
        return os.path.dirname(path)
