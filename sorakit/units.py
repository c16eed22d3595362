"""Sizes in bytes: parsing what people type ("2GB", "40%") and printing sizes back. Stdlib only."""

from __future__ import annotations

import math
import re

from sorakit.errors import SorakitError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)(%|[a-z]*)")


def parse_bytes(spec: str | int | float, available: int | None = None) -> int:
    """'2GB', '512MiB', '1.5e9', 3000000000 or '40%' (of ``available``) -> bytes (a positive int).

    ``available`` is the reference of a percentage; without it, the memory available now.
    Anything else (negative, zero, not finite, over 100 %, an unknown unit) is a SorakitError.
    """
    if isinstance(spec, bool) or not isinstance(spec, (str, int, float)):
        raise SorakitError(f"a memory size must be a number of bytes or a string like '2GB', got {spec!r}")
    if isinstance(spec, (int, float)):
        value, unit, text = float(spec), "", repr(spec)
    else:
        text = spec
        m = _SIZE.fullmatch(spec.strip().lower().replace(" ", ""))
        if not m or (m.group(2) not in _UNITS and m.group(2) != "%"):
            raise SorakitError(f"cannot read memory size {spec!r}; use e.g. 2GB, 512MiB or 40%")
        value, unit = float(m.group(1)), m.group(2)
    if not math.isfinite(value) or value <= 0:
        raise SorakitError(f"memory size {text} must be a positive, finite amount")
    if unit == "%":
        if value > 100:
            raise SorakitError(f"memory size {text} is more than all of the available memory; use at most 100%")
        if available is None:
            from sorakit.memory import available_memory

            available = available_memory()
        return max(1, int(available * value / 100))
    n = value * _UNITS[unit]
    if n > 2**62:
        raise SorakitError(f"memory size {text} is not a plausible amount of memory")
    if n < 1:
        raise SorakitError(f"memory size {text} is less than one byte")
    return int(n)


def human_bytes(n: float) -> str:
    """1536000 -> '1.5 MB' (decimal units, as disks and phones count)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)
