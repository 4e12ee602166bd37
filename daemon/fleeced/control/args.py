"""Argument checking for control commands: every mistake is a clear CommandError."""

from __future__ import annotations

import math
from typing import Any, Final, TypeVar

from fleeced.errors import CommandError

T = TypeVar("T")

#: Largest accepted byte count: sizes and offsets end up as ``off_t`` in C.
MAX_SIZE: Final = 2**63 - 1

_MISSING = object()


def check_keys(args: dict[str, Any], allowed: set[str]) -> None:
    """Refuse unknown arguments (QMP: "Parameter 'x' is unexpected").

    :raise CommandError: on the first unknown key.
    """
    for key in args:
        if key not in allowed:
            raise CommandError(f"Parameter '{key}' is unexpected")


def get(args: dict[str, Any], key: str, kind: type[T], default: Any = _MISSING) -> T:
    """Return ``args[key]`` checked against KIND (bool is not an int, a float is finite).

    :raise CommandError: when missing without default, of the wrong type, or a
        non-finite number.
    """
    if key not in args:
        if default is _MISSING:
            raise CommandError(f"Parameter '{key}' is missing")
        return default  # type: ignore[no-any-return]
    value = args[key]
    ok = isinstance(value, kind)
    if kind is int and isinstance(value, bool):
        ok = False
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
        ok = True
    if not ok:
        names = {str: "string", int: "integer", bool: "boolean", float: "number",
                 list: "array", dict: "object"}
        raise CommandError(
            f"Invalid parameter type for '{key}', expected: {names.get(kind, kind.__name__)}"
        )
    if kind is float and not math.isfinite(value):
        raise CommandError(f"Parameter '{key}' must be a finite number")
    result: T = value
    return result


def get_size(args: dict[str, Any], key: str, default: int) -> int:
    """A byte count from 0 to :data:`MAX_SIZE`, or a size string like ``"64M"``.

    :raise CommandError: when malformed, negative or too large.
    """
    if key not in args:
        return default
    value = args[key]
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise CommandError(f"Parameter '{key}': {exc}") from None
    n = get(args, key, int)
    if n < 0:
        raise CommandError(f"Parameter '{key}' must not be negative")
    if n > MAX_SIZE:
        raise CommandError(f"Parameter '{key}' is too large (at most {MAX_SIZE})")
    return n


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse ``"65536"``, ``"64K"``, ``"1.5G"``, ``"2MiB"`` into bytes.

    :raise ValueError: when the text is not a size, is negative, not finite
        (``"1.E400"`` overflows a float) or over :data:`MAX_SIZE`.
    """
    s = text.strip().upper()
    for suffix in ("IB", "B"):
        if s.endswith(suffix) and len(s) > len(suffix) and s[-len(suffix) - 1].isalpha():
            s = s[: -len(suffix)]
            break
    unit = s[-1:] if s[-1:].isalpha() else ""
    number = s[: len(s) - len(unit)]
    if unit not in _UNITS or not number:
        raise ValueError(f"invalid size {text!r}")
    try:
        value = float(number) if "." in number else int(number)
    except ValueError:
        raise ValueError(f"invalid size {text!r}") from None
    if value < 0:
        raise ValueError(f"invalid size {text!r}: negative")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"invalid size {text!r}: not a finite number")
    scaled = value * _UNITS[unit]
    if scaled > MAX_SIZE:  # also a float product that overflowed to inf
        raise ValueError(f"invalid size {text!r}: too large (at most {MAX_SIZE} bytes)")
    return int(scaled)
