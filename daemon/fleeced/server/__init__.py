"""The asyncio NBD server: listeners and the registry (:mod:`.listener`),
one protocol object per client connection (:mod:`.connection`)."""

from fleeced.server.connection import NbdConnection
from fleeced.server.listener import NbdServer

__all__ = ["NbdConnection", "NbdServer"]
