"""Byte sizes as people write them ("2GB", "200MB", "1.5GiB") and as chatvec prints them."""

from __future__ import annotations

import re

from chatvec.core.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes in `text`: an int, or a number with a unit (decimal KB/MB/GB/TB, binary KiB/MiB/GiB/TiB)."""
    if isinstance(text, bool):
        raise ConfigError(f"size {text!r} is not a size: write e.g. 2GB, 200MB, 1.5GiB or a byte count")
    if isinstance(text, int):
        if text <= 0:
            raise ConfigError(f"size {text} must be positive")
        return text
    match = _SIZE_RE.match(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"size {text!r} is not a size: write e.g. 2GB, 200MB, 1.5GiB or a byte count")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return value


def format_size(n: float) -> str:
    """Decimal units, three significant figures: 1.23 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"
