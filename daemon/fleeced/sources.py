"""A disk's source: where its data lives, and how fleeced reaches it.

QEMU does image formats and storage protocols; fleeced does fleecing above
them.  A source is one of:

- ``file``: a raw file or block device, opened directly (the fast path:
  page-cache reads on the event loop, sendfile);
- ``nbd``: an NBD export, ``nbd+unix:///EXPORT?socket=PATH`` or
  ``nbd://HOST[:PORT]/EXPORT``, reached from C through libnbd;
- ``image``: a file in a QEMU image format (qcow2, qed, vmdk, vhdx, vpc,
  vdi, luks), served as its *guest view* (virtual size, guest data) by a
  qemu-storage-daemon child the daemon owns (:mod:`fleeced.qsd`) and
  reached as an NBD export;
- ``rbd``: a QEMU protocol filename ``rbd:POOL/IMAGE[@SNAP][:conf=FILE]
  [:id=USER]`` (Ceph RBD, through QEMU's rbd driver), served the same way.

Probing follows qemu-nbd: without a format, a file whose header is a QEMU
image format is served as that format (``qemu-img info`` decides, as QEMU
probes), anything else as raw bytes; ``-f raw`` forces raw bytes and
``-f FMT`` names the format.  :func:`parse` only reads the text;
:func:`probe` looks at the file (a subprocess: call it off the event loop's
hot path, it is awaited).

Imports nothing of the daemon: the CLI, the configuration and the daemon
all describe sources with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import stat
import urllib.parse
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["FORMATS", "Source", "SourceError", "parse", "probe"]

#: Formats a source may name (``-f``): raw bytes, or what a
#: qemu-storage-daemon child opens.
FORMATS: Final = ("raw", "qcow2", "qed", "vmdk", "vhdx", "vpc", "vdi", "luks")
#: Seconds ``qemu-img info`` gets to probe a file.
PROBE_TIMEOUT: Final = 30.0


class SourceError(ValueError):
    """A source that cannot be used: bad syntax, unknown format, a probe
    that failed.  The message is one line for the user."""


@dataclass(frozen=True)
class Source:
    """Where a disk's data lives (see the module notes)."""

    #: As the user wrote it (a path, a URI, ``rbd:...``).
    text: str
    #: ``file``, ``nbd``, ``image`` or ``rbd``.
    kind: str
    #: What was asked with ``-f`` (None: probe a path; raw otherwise).
    requested_format: str | None = None
    #: The QEMU format of an ``image`` source (``raw`` for the others).
    format: str = "raw"
    #: The file of a ``file`` or ``image`` source.
    path: str | None = None
    #: The export of an ``nbd`` source.
    uri: str | None = None
    #: Ceph options of an ``rbd`` source: pool, image, and maybe namespace,
    #: snapshot, conf, user.
    rbd: tuple[tuple[str, str], ...] = ()
    #: :func:`probe` decided the format already.
    probed: bool = False

    @property
    def needs_child(self) -> bool:
        """Whether a qemu-storage-daemon child serves it."""
        return self.kind in ("image", "rbd")

    def default_name(self) -> str:
        """The disk (and active export) name when none is given: a file's
        name without extension, an RBD image's name, an NBD export's name."""
        if self.kind in ("file", "image"):
            assert self.path is not None
            base = os.path.basename(os.path.normpath(self.path))
            stem, _ext = os.path.splitext(base)
            return stem or base
        if self.kind == "rbd":
            return dict(self.rbd)["image"]
        assert self.uri is not None
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.uri).path.lstrip("/"))
        return name or "disk"

    def identity(self) -> tuple[str, ...] | None:
        """What makes two sources the same data, for those the daemon does
        not open itself (a ``file`` source's comes from its descriptor);
        None for a ``file`` source."""
        if self.kind == "image":
            assert self.path is not None
            st = os.stat(self.path)
            kind = "blk" if stat.S_ISBLK(st.st_mode) else "file"
            return (kind, str(st.st_rdev if kind == "blk" else st.st_dev),
                    "0" if kind == "blk" else str(st.st_ino))
        if self.kind == "rbd":
            o = dict(self.rbd)
            return ("rbd", o["pool"], o.get("namespace", ""), o["image"], o.get("snapshot", ""))
        if self.kind == "nbd":
            assert self.uri is not None
            return ("nbd", self.uri)
        return None

    def record(self) -> dict[str, Any]:
        """What the state dir remembers: enough for :func:`parse` again, with
        the format as decided, so a restart never probes again (a guest can
        write an image header into its raw disk: probed again, that disk
        would turn into an image whose backing file the guest chose)."""
        out: dict[str, Any] = {"source": self.text}
        if self.requested_format is not None:
            out["format"] = self.requested_format
        elif self.probed and self.kind in ("file", "image"):
            out["format"] = self.format
        return out

    def describe(self) -> dict[str, Any]:
        """The ``query-disks`` fields."""
        out: dict[str, Any] = {"source": self.text, "source-kind": self.kind,
                               "format": self.format}
        return out


def parse(text: str, fmt: str | None = None) -> Source:
    """Read TEXT (and ``-f FMT``) as a source, without I/O.

    A path's format is left to :func:`probe` unless FMT names one.

    :raise SourceError: for an empty text, an unknown format, a format given
        with an NBD URI, or a malformed ``rbd:`` name.
    """
    if not isinstance(text, str) or not text or "\0" in text:
        raise SourceError(f"invalid source {text!r}")
    if fmt is not None and fmt not in FORMATS:
        raise SourceError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if text.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://")):
        if fmt not in (None, "raw"):
            raise SourceError(f"{text}: an NBD export is served as it is (no -f {fmt})")
        if text.startswith("nbds"):
            raise SourceError(f"{text}: TLS to an upstream is not supported")
        return Source(text=text, kind="nbd", requested_format=fmt, uri=text)
    if text.startswith("rbd:"):
        if fmt not in (None, "raw"):
            raise SourceError(f"{text}: an RBD image holds raw data (no -f {fmt})")
        return Source(text=text, kind="rbd", requested_format=fmt, rbd=_rbd_options(text))
    if fmt is None:
        return Source(text=text, kind="file", path=text)  # probe() decides
    if fmt == "raw":
        return Source(text=text, kind="file", requested_format="raw", path=text)
    return Source(text=text, kind="image", requested_format=fmt, format=fmt, path=text)


def _rbd_options(text: str) -> tuple[tuple[str, str], ...]:
    """``rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:key=value...]`` as QEMU reads it
    (``\\:`` escapes a colon); keys ``conf`` and ``id`` (the Ceph user).

    :raise SourceError: when it has no pool or image, or another key.
    """
    parts, cur, i, body = [], "", 0, text[4:]
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            cur += body[i + 1]
            i += 2
            continue
        if body[i] == ":":
            parts.append(cur)
            cur = ""
        else:
            cur += body[i]
        i += 1
    parts.append(cur)
    name, opts = parts[0], parts[1:]
    snap = None
    if "@" in name:
        name, snap = name.split("@", 1)
    pieces = name.split("/")
    if len(pieces) not in (2, 3) or not all(pieces):
        raise SourceError(f"{text}: want rbd:POOL/IMAGE (or POOL/NAMESPACE/IMAGE)")
    out = [("pool", pieces[0]), ("image", pieces[-1])]
    if len(pieces) == 3:
        out.append(("namespace", pieces[1]))
    if snap:
        out.append(("snapshot", snap))
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or not value or key not in ("conf", "id"):
            raise SourceError(f"{text}: unknown option {opt!r} (conf=FILE, id=USER)")
        out.append(("conf" if key == "conf" else "user", value))
    return tuple(out)


async def probe(src: Source) -> Source:
    """Decide the format of a path given without one, as QEMU probes:
    ``qemu-img info`` (with ``-U``: the image may be in use by a VM).  Other
    sources are returned as they are.

    :raise SourceError: when the path is missing, or qemu-img cannot say.
    """
    if src.kind != "file" or src.requested_format is not None or src.probed:
        return src
    assert src.path is not None
    # stat(2) of a slow or remote path must not stall the event loop.
    why = await asyncio.to_thread(_unusable, src.path)
    if why:
        raise SourceError(f"{src.path}: {why}")
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise SourceError(f"{src.path}: qemu-img is needed to tell its format "
                          "(install qemu-utils, or say -f raw)")
    proc = await asyncio.create_subprocess_exec(
        qemu_img, "info", "-U", "--output=json", "--", src.path,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise SourceError(f"{src.path}: qemu-img info did not answer within "
                          f"{PROBE_TIMEOUT:g}s") from None
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise SourceError(f"{src.path}: {lines[-1] if lines else 'qemu-img info failed'}")
    try:
        fmt = json.loads(out)["format"]
    except (ValueError, KeyError, TypeError):
        raise SourceError(f"{src.path}: qemu-img info said nothing of its format") from None
    if fmt == "raw":
        return dataclasses.replace(src, probed=True)
    if fmt not in FORMATS:
        raise SourceError(f"{src.path}: a {fmt!r} image, which fleeced does not serve "
                          f"(formats: {', '.join(FORMATS)}; -f raw serves its bytes)")
    return Source(text=src.text, kind="image", format=fmt, path=src.path, probed=True)


def _unusable(path: str) -> str | None:
    """Why PATH cannot be an image (missing, a directory), or None."""
    if not os.path.exists(path):
        return "no such file or device"
    if os.path.isdir(path):
        return "is a directory, not an image"
    return None
