"""Sizes and rates with suffixes: 512MiB, 16GiB, 4K, 50M (decimal), 125MB/s."""

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*(?:/s)?\s*$")


def parse_size(text, what: str = "size") -> int:
    """'512MiB' -> 536870912; '50M' -> 50000000; plain integers are bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{what} {text!r} is not a size like 512MiB, 16GiB, 50M or 4096")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_rate(text, what: str = "rate") -> int | None:
    """Bytes per second; 'none', 'unlimited' or 0 mean no cap (None)."""
    if text is None or str(text).strip().lower() in ("none", "unlimited", "0", "off"):
        return None
    return parse_size(text, what)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{int(n)} B"


def fmt_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e6:.0f} MB/s" if bytes_per_s < 1e9 else f"{bytes_per_s / 1e9:.2f} GB/s"
