"""JSON as QEMU reads it: no ``NaN``/``Infinity``, no number that overflows
to ``inf``, no nesting that recurses past the interpreter's limit.

Python's :func:`json.loads` accepts all three (the first two silently), so
every JSON document the daemon reads from outside -- control commands and
the state file -- goes through :func:`loads`.  Pure: no I/O.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["loads"]


def loads(text: str | bytes | bytearray) -> Any:
    """Parse TEXT strictly.

    :raise ValueError: on invalid JSON, a non-finite number, or nesting too
        deep to parse (``json.JSONDecodeError`` is a ValueError too).
    """
    try:
        return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _finite_float(text: str) -> float:
    """``json.loads`` hook: ``1e400`` would silently become ``inf``.

    :raise ValueError: when TEXT overflows a float.
    """
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> Any:
    """``json.loads`` hook: Python accepts ``NaN``/``Infinity``, JSON (and QEMU) do not.

    :raise ValueError: always.
    """
    raise ValueError(f"{name} is not valid JSON")
