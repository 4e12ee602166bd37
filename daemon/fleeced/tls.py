"""TLS for NBD over TCP: configuration (x509 or PSK) and the server context.

STARTTLS itself (``NBD_OPT_STARTTLS``) is negotiated by the sans-IO engine;
this module only turns the ``--tls*`` options into a server-side
:class:`ssl.SSLContext`.
"""

from __future__ import annotations

from dataclasses import dataclass

#: ``--tls`` values: no TLS; offered (STARTTLS accepted, plaintext allowed);
#: required (every option but STARTTLS refused with ``NBD_REP_ERR_TLS_REQD``).
TLS_MODES = ("off", "on", "require")


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

    @property
    def enabled(self) -> bool:
        return self.mode != "off"
