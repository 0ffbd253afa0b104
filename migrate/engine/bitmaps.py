"""Byte maps with one byte per page or chunk (0 or 1), walked run by run
with bytes.find: no Python loop per element."""


def runs(bits: bytes, value: int = 1):
    """(start, end) of each run of ``value`` in a byte string of 0/1."""
    other = 1 - value
    pos, n = 0, len(bits)
    while pos < n:
        a = bits.find(value, pos)
        if a < 0:
            return
        b = bits.find(other, a)
        b = n if b < 0 else b
        yield a, b
        pos = b


def pages_bitmap(ranges, npages: int) -> bytearray:
    """1 for each page of (first page, count) ``ranges``, a slice per range."""
    bits = bytearray(npages)
    for first, count in ranges:
        bits[first : first + count] = b"\x01" * count
    return bits


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """(first page, count) ranges, sorted, with overlapping and adjacent
    ones joined; empty ones dropped."""
    merged: list[list[int]] = []
    for first, count in sorted(ranges):
        if merged and first <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], first + count)
        elif count > 0:
            merged.append([first, first + count])
    return [(a, b - a) for a, b in merged]
