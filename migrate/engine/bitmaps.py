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
