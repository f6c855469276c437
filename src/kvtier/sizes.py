"""Byte sizes as people write them ("40MiB", "6GiB", "2GB", "1048576") and as kvtier prints them; and `grown`,
the one rule by which a buffer grows past what was reserved."""

from __future__ import annotations

import re

# Decimal units are powers of 1000 (as disk and GPU vendors write them), binary ones powers of 1024.
UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
         "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_bytes(value, what: str = "size") -> int:
    """A size as an int of bytes: an int, or a string such as "40MiB", "6GiB", "2GB", "1.5 GiB", "1048576".

    ValueError naming `what` and the accepted forms for anything else (negative, empty, unknown unit such as
    "6G", which is ambiguous between GB and GiB)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a size such as 6GiB, 40MiB, 2GB or a number of bytes, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{what} must be positive, got {value} bytes")
        return value
    if isinstance(value, float):
        raise ValueError(f"{what} as a number must be an int of bytes, got {value!r}; or write it with a unit "
                         "such as 1.5GiB")
    match = _SIZE.fullmatch(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS:
        raise ValueError(f"{what} {value!r} is not a size: give a number of bytes or a number with a unit "
                         "(B, KB, MB, GB, TB: powers of 1000; KiB, MiB, GiB, TiB: powers of 1024), e.g. 6GiB")
    size = int(float(match.group(1)) * UNITS[unit])
    if size <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return size


def format_bytes(n: int | float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1: 1536 -> "1.50 KiB"."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


GROWTH_MARGIN = 256  # tokens (elements, for a staging buffer): the least a buffer grows by past what is needed


def grown(needed: int, reserved: int = 0, unit: int = 1) -> int:
    """The capacity, in tokens, to reallocate a growing buffer to when `needed` tokens no longer fit: the reserved
    length when it covers them (buffers sized once), else `needed` and a quarter more (at least GROWTH_MARGIN),
    so that a buffer growing one token at a time is reallocated rarely; rounded up to whole `unit`s."""
    want = reserved if reserved >= needed else needed + max(GROWTH_MARGIN, needed // 4)
    return -(-want // unit) * unit
