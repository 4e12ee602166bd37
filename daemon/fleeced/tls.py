"""TLS for NBD: configuration (x509 or PSK), the server context, and the
allow-list of client certificate names (``--tls-authz``).

STARTTLS itself (``NBD_OPT_STARTTLS``) is negotiated by the sans-IO engine
(:mod:`fleeced.nbd.engine`) and the upgrade is done by the connection
(:mod:`fleeced.server.connection`); this module only turns the ``--tls*``
options into a server-side :class:`ssl.SSLContext`, reading and checking
every file once, at start-up, so a bad certificate, key or PSK file is a
start-up error and not a failure of the first client.

PSK.  Python's :mod:`ssl` has a server PSK API only from 3.13
(``SSLContext.set_psk_server_callback``).  Before that we set the same
OpenSSL callback ourselves with :mod:`ctypes`, on the ``SSL_CTX`` of the
context object, resolving ``SSL_CTX_set_psk_server_callback`` through the
``_ssl`` extension module so it is the very libssl that module uses.  The
``SSL_CTX *`` is the first field after ``PyObject_HEAD`` of CPython's
``PySSLContext``; :func:`_ssl_ctx_pointer` checks that by reading the
options back through OpenSSL before anything is set.  OpenSSL calls the
callback for TLS 1.2 PSK suites and, with no ``find_session`` callback,
for TLS 1.3 external PSKs too (which then use ``TLS_AES_128_GCM_SHA256``,
GnuTLS's default PSK hash).  The callback runs on the event-loop thread,
inside ``SSL_do_handshake`` (called by :mod:`ssl` with the GIL released;
ctypes takes it back).

``MemoryDenyWriteExecute=yes``: a ctypes callback is a libffi closure.
libffi 3.4 first tries an anonymous ``PROT_WRITE|PROT_EXEC`` page; when that
is refused (``EACCES`` under ``PR_SET_MDWE``, ``EPERM`` under systemd's
seccomp filter) it maps one ``memfd`` twice, writable and executable, never
both in one mapping, which either form of the rule allows
(``memfd_create`` is in ``@system-service``).  tests/integration/test_tls.py
runs the PSK daemon under ``PR_SET_MDWE`` to keep that true.

The PSK file is read once, at start-up: a changed file needs a restart.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import ssl
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

log = logging.getLogger(__name__)

__all__ = ["TLS_MODES", "TlsConfig", "peer_dn", "read_psk_file"]

#: ``--tls`` values: no TLS; offered (STARTTLS accepted, plaintext allowed);
#: required (every option but STARTTLS refused with ``NBD_REP_ERR_TLS_REQD``).
TLS_MODES = ("off", "on", "require")

#: OpenSSL's PSK_MAX_IDENTITY_LEN and PSK_MAX_PSK_LEN (ssl/ssl_local.h, 3.0).
_MAX_IDENTITY: Final = 256
_MAX_PSK: Final = 512
#: TLS 1.2 suites for a PSK-only server (no certificate): forward-secret first.
_PSK_CIPHERS: Final = "ECDHE-PSK+AESGCM:ECDHE-PSK+CHACHA20:ECDHE-PSK:DHE-PSK:PSK:!eNULL"


@dataclass(frozen=True)
class TlsConfig:
    """What ``--tls``, ``--tls-cert/--tls-key/--tls-ca`` and ``--tls-psk`` asked for."""

    mode: str = "off"
    cert: str | None = None
    key: str | None = None
    #: With a CA, clients must present a certificate it signed.
    ca: str | None = None
    #: A ``psktool`` file (``identity:hexkey`` lines).
    psk_file: str | None = None
    #: TLS on Unix sockets too (qemu-nbd applies its credentials to ``-k``).
    unix: bool = False
    #: Client certificate distinguished names allowed in (RFC 4514, as
    #: ``openssl x509 -noout -subject -nameopt RFC2253`` prints them and
    #: qemu-nbd's ``authz-simple`` identity is written); empty: any client
    #: the CA signed.
    authz: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def denied(self, cert: dict[str, Any] | None) -> str | None:
        """Why a client with certificate CERT (``getpeercert()``) may not
        go on, or None when it may: with a CA it must have sent one, and
        with an allow-list its subject's
        distinguished name must be on it (qemu-nbd's authz check, which
        also runs right after the handshake)."""
        if self.ca is not None and self.psk_file is None and not cert:
            return "TLS client certificate required: the client sent none"
        if not self.authz:
            return None
        dn = peer_dn(cert) if cert else None
        if dn is None:
            return "TLS x509 authz check: the client sent no certificate"
        if dn not in self.authz:
            return f"TLS x509 authz check for {dn} is denied"
        return None

    def server_context(self) -> ssl.SSLContext:
        """Build the server-side context: TLS 1.2 or later, x509 or PSK.

        Every file is read now.  With :attr:`ca`, clients must present a
        certificate signed by it (checked in the handshake when sent, and
        its absence right after it, by :meth:`denied`).

        :raise ValueError: when TLS is off, no credentials are configured, a
            file is missing or unreadable, a certificate or key does not
            parse, the key does not match the certificate or is encrypted,
            the PSK file is malformed, or PSK cannot be enabled in this
            Python; the message names the file.
        """
        if not self.enabled:
            raise ValueError("TLS is off: no server context")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # proto.md "TLS versions": MUST support 1.2, SHOULD NOT offer older.
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # Client-initiated renegotiation is a DoS lever and NBD never needs it.
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        if self.psk_file is not None:
            keys = read_psk_file(self.psk_file)
            ctx.set_ciphers(_PSK_CIPHERS)
            _set_psk_server_keys(ctx, keys)
            log.info("TLS: PSK with %d identit%s from %s", len(keys),
                     "y" if len(keys) == 1 else "ies", self.psk_file)
            return ctx
        if self.cert is None or self.key is None:
            raise ValueError("TLS needs a certificate and key, or a PSK file")
        for what, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if path is not None:
                _check_readable(f"TLS {what}", path)
        try:
            ctx.load_cert_chain(self.cert, self.key, password=_no_password)
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(f"TLS certificate {self.cert} with key {self.key}: "
                             f"{_ssl_reason(exc)}") from None
        if self.ca is not None:
            try:
                ctx.load_verify_locations(cafile=self.ca)
            except ssl.SSLError as exc:
                raise ValueError(f"TLS CA {self.ca}: {_ssl_reason(exc)}") from None
            # A certificate the client sends is verified in the handshake,
            # but one it does not send (GnuTLS clients send none that the
            # CA did not sign) is refused only after it (:meth:`denied`), as
            # qemu-nbd does: the client then finishes its handshake and
            # says what it thinks of ours, instead of a bare alert.
            ctx.verify_mode = ssl.CERT_OPTIONAL
            _name_client_cas(ctx, self.ca)
        return ctx


#: Attribute names of ``getpeercert()`` (OpenSSL's long names) as RFC 4514
#: and GnuTLS (hence qemu-nbd's authz identities) write them.
_DN_NAMES: Final = {
    "commonName": "CN", "countryName": "C", "localityName": "L",
    "stateOrProvinceName": "ST", "organizationName": "O",
    "organizationalUnitName": "OU", "streetAddress": "STREET",
    "domainComponent": "DC", "userId": "UID", "emailAddress": "EMAIL",
    "serialNumber": "serialNumber", "title": "title", "givenName": "givenName",
    "surname": "SN", "initials": "initials", "pseudonym": "pseudonym",
}


def _dn_value(value: str) -> str:
    """RFC 4514 section 2.4 escaping of an attribute value."""
    out = "".join("\\" + ch if ch in ',+"\\<>;' else ch for ch in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def peer_dn(cert: dict[str, Any]) -> str | None:
    """The subject of CERT (``SSLObject.getpeercert()``) as an RFC 4514
    string: the last RDN first, ``CN=client,O=Example,C=FR``, the way
    ``openssl x509 -noout -subject -nameopt RFC2253`` prints it and GnuTLS's
    ``gnutls_x509_crt_get_dn`` gives it to qemu-nbd's authz."""
    subject = cert.get("subject")
    if not subject:
        return None
    # Every attribute in reverse, a multi-valued RDN's too, as OpenSSL's
    # RFC2253 printing does, so a name copied from its output matches.
    rdns = ["+".join(f"{_DN_NAMES.get(k, k)}={_dn_value(v)}" for k, v in reversed(rdn))
            for rdn in subject]
    return ",".join(reversed(rdns))


def _name_client_cas(ctx: ssl.SSLContext, cafile: str) -> None:
    """Name the CA's subjects in the handshake's CertificateRequest (what
    GnuTLS, hence qemu-nbd, sends and :mod:`ssl` cannot), so a GnuTLS client
    holding only a certificate of another CA sends none: it completes the
    handshake, judges our certificate, and is dropped after it (as with
    qemu-nbd) instead of failing mid-handshake.  Only a hint to the client:
    what it sends is verified all the same, so a failure here is logged and
    the context used without it."""
    try:
        lib = _libssl()
        load = lib.SSL_load_client_CA_file
        load.restype = ctypes.c_void_p
        load.argtypes = [ctypes.c_char_p]
        put = lib.SSL_CTX_set_client_CA_list
        put.restype = None
        put.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        ptr = _ssl_ctx_pointer(ctx, lib)
        names = load(os.fsencode(cafile))
        if not names:
            raise ValueError(f"no CA names read from {cafile}")
        put(ptr, names)  # the context owns the list from now on
    except (ValueError, AttributeError) as exc:
        log.warning("TLS: clients are not told which CA signs their certificates: %s", exc)


def _no_password() -> bytes:
    # A daemon must never prompt on a terminal (OpenSSL's default for an
    # encrypted key when no password is given).
    raise ValueError("the key is encrypted; give an unencrypted key file")


def _check_readable(what: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror or exc}") from None


#: OpenSSL reasons rephrased for the one-line start-up error.
_REASONS: Final = {
    "PEM lib": "not a PEM certificate or key it can use",
    "KEY_VALUES_MISMATCH": "the key does not match the certificate",
    "NO_CERTIFICATE_OR_CRL_FOUND": "no certificate in the file",
}


def _ssl_reason(exc: BaseException) -> str:
    if not isinstance(exc, ssl.SSLError):
        return str(exc)
    reason = exc.reason or (str(exc.args[1]) if len(exc.args) > 1 else str(exc))
    # "[SSL] PEM lib (_ssl.c:3905)" -> "PEM lib"
    reason = re.sub(r"^\[\w+\] | \(_ssl\.c:\d+\)$", "", reason)
    return _REASONS.get(reason, reason.replace("_", " ").lower())


def read_psk_file(path: str) -> dict[bytes, bytes]:
    """Parse a ``psktool`` file: one ``identity:hexkey`` per line.

    This is the format GnuTLS's ``gnutls_psk_set_server_credentials_file``
    reads for nbdkit and qemu-nbd.  Blank lines are skipped.

    :return: identity -> key.
    :raise ValueError: when the file is unreadable, empty, or a line is not
        ``identity:hexkey`` with a non-empty identity of at most 256 bytes and
        a key of 1..512 bytes, or an identity repeats.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ValueError(f"TLS PSK file {path}: {exc.strerror or exc}") from None
    keys: dict[bytes, bytes] = {}
    for number, line in enumerate(raw.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        identity, sep, hexkey = line.partition(b":")
        where = f"TLS PSK file {path} line {number}"
        if not sep or not identity or not hexkey:
            raise ValueError(f"{where}: not identity:hexkey")
        if len(identity) > _MAX_IDENTITY:
            raise ValueError(f"{where}: identity longer than {_MAX_IDENTITY} bytes")
        try:
            key = bytes.fromhex(hexkey.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{where}: the key is not hexadecimal") from None
        if not key or len(key) > _MAX_PSK:
            raise ValueError(f"{where}: key of {len(key)} bytes (1..{_MAX_PSK})")
        if identity in keys:
            raise ValueError(f"{where}: identity {identity.decode(errors='replace')!r} "
                             "appears twice")
        keys[identity] = key
    if not keys:
        raise ValueError(f"TLS PSK file {path}: no keys")
    return keys


# ---------------------------------------------------------------- PSK hook


def _set_psk_server_keys(ctx: ssl.SSLContext, keys: Mapping[bytes, bytes]) -> None:
    """Make CTX accept the PSK identities in KEYS (and nothing else).

    :raise ValueError: when this Python's ssl module cannot be given a PSK
        callback.
    """
    native: Callable[..., None] | None = getattr(ctx, "set_psk_server_callback", None)
    if native is not None:  # Python >= 3.13
        def lookup(identity: str | None) -> bytes:
            return keys.get((identity or "").encode("utf-8"), b"")

        native(lookup)
        return
    _PskCallback(keys).install(ctx)


_PSK_SERVER_CB = ctypes.CFUNCTYPE(
    ctypes.c_uint,  # PSK length, 0: unknown identity
    ctypes.c_void_p,  # SSL *
    ctypes.c_char_p,  # const char *identity (NUL-terminated)
    ctypes.POINTER(ctypes.c_ubyte),  # unsigned char *psk
    ctypes.c_uint,  # unsigned int max_psk_len
)


class _PskCallback:
    """OpenSSL's ``SSL_psk_server_cb_func`` over a fixed table of keys.

    The instance is kept alive by the context it is installed on (the
    closure must outlive every handshake of that ``SSL_CTX``).
    """

    def __init__(self, keys: Mapping[bytes, bytes]) -> None:
        self._keys = dict(keys)
        self._fn = _PSK_SERVER_CB(self._find)

    def _find(self, ssl_ptr: int | None, identity: bytes | None,
              out: ctypes._Pointer[ctypes.c_ubyte], max_len: int) -> int:
        try:
            key = self._keys.get(identity or b"")
            if key is None:
                log.info("TLS: unknown PSK identity %r", identity)
                return 0
            if len(key) > max_len:  # cannot happen: we cap keys at PSK_MAX_PSK_LEN
                return 0
            ctypes.memmove(out, key, len(key))
            return len(key)
        except Exception:  # never let an exception unwind into OpenSSL
            log.exception("TLS: PSK callback failed")
            return 0

    def install(self, ctx: ssl.SSLContext) -> None:
        """Set the callback on CTX's ``SSL_CTX``.

        :raise ValueError: when libssl or the context layout is not as expected.
        """
        lib = _libssl()
        setter = lib.SSL_CTX_set_psk_server_callback
        setter.restype = None
        setter.argtypes = [ctypes.c_void_p, _PSK_SERVER_CB]
        setter(_ssl_ctx_pointer(ctx, lib), self._fn)
        # The closure lives as long as the context object.
        ctx.__dict__["_fleeced_psk_callback"] = self


def _libssl() -> ctypes.CDLL:
    """The libssl the ``_ssl`` module is linked with.

    :raise ValueError: when it cannot be found or lacks the PSK API.
    """
    import _ssl

    try:
        # dlsym on the extension's handle searches its dependencies too, so
        # this is the libssl already loaded for it, never a second copy.
        lib = ctypes.CDLL(getattr(_ssl, "__file__", None))
        lib.SSL_CTX_set_psk_server_callback  # noqa: B018 - probe the symbol
        lib.SSL_CTX_get_options  # noqa: B018
    except (OSError, AttributeError) as exc:
        raise ValueError(f"TLS PSK is not available in this Python: {exc}") from None
    return lib


def _ssl_ctx_pointer(ctx: ssl.SSLContext, lib: ctypes.CDLL) -> int:
    """The ``SSL_CTX *`` inside CTX, checked against OpenSSL's view of it.

    :raise ValueError: when this is not CPython or the pointer does not read
        back CTX's options and verify mode.
    """
    if sys.implementation.name != "cpython" or not isinstance(ctx, ssl.SSLContext):
        raise ValueError("TLS PSK needs CPython's ssl module (or Python >= 3.13)")
    # PySSLContext: PyObject_HEAD, then SSL_CTX *ctx (Modules/_ssl.c).
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        raise ValueError("TLS PSK: the SSL context has no SSL_CTX")
    get_options = lib.SSL_CTX_get_options
    get_options.restype = ctypes.c_uint64
    get_options.argtypes = [ctypes.c_void_p]
    get_verify = lib.SSL_CTX_get_verify_mode
    get_verify.restype = ctypes.c_int
    get_verify.argtypes = [ctypes.c_void_p]
    # Flip a harmless option and watch OpenSSL see the flip: a coincidence
    # cannot pass both reads.
    before = ctx.options
    ctx.options = before ^ ssl.OP_CIPHER_SERVER_PREFERENCE
    flipped = get_options(ptr)
    ctx.options = before
    if (flipped != int(before ^ ssl.OP_CIPHER_SERVER_PREFERENCE)
            or get_options(ptr) != int(before)
            or get_verify(ptr) != int(ctx.verify_mode)):
        raise ValueError("TLS PSK: unexpected ssl module layout; needs Python >= 3.13")
    return ptr
