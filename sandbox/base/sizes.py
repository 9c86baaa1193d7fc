"""Human sizes ("512M", "2G", "1.5GiB") to bytes and back."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(value: str | int, *, default_unit: str = "") -> int:
    """Bytes in ``value``; a bare number is taken in ``default_unit`` ("M" for memory)."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        return value * _UNITS[default_unit.upper()]
    match = _PATTERN.match(value)
    if not match:
        raise ValueError(f"not a size: {value!r} (write it like 512M, 2G or 1.5GiB)")
    number, unit = match.groups()
    unit = unit.upper() or default_unit.upper()
    return int(float(number) * _UNITS[unit])


def format_size(size: int) -> str:
    """A short human form: 1536 MiB -> '1.5G'."""
    for unit in ("T", "G", "M", "K"):
        scale = _UNITS[unit]
        if size >= scale:
            value = size / scale
            return f"{value:.1f}".rstrip("0").rstrip(".") + unit
    return f"{size}B"
