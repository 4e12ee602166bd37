"""fleeced: a userspace NBD daemon serving fleecing exports."""

from __future__ import annotations

import os
import sys

__version__ = "0.1.0"

# A distribution package may bundle a dependency its distribution lacks (the
# Debian package: qemu.qmp) in this private directory; it is searched last,
# so an installed copy of the library wins over the bundled one.
_VENDOR = os.path.join(os.path.dirname(__file__), "_vendor")
if os.path.isdir(_VENDOR) and _VENDOR not in sys.path:
    sys.path.append(_VENDOR)
