"""Byte maps with one byte per page or chunk (0 or 1), walked run by run
with bytes.find: no Python loop per element."""

import itertools
import operator
import re

_RUN_OF = {0: re.compile(rb"\x00+"), 1: re.compile(rb"\x01+")}


def run_views(view, bits: bytes, value: int, unit: int) -> list:
    """``view[a * unit : b * unit]`` for each run [a, b) of ``value`` in a
    byte string of 0/1, built by C iterators alone: no Python step per run
    (a frame of the mixed image has 256 runs, a GiB 65,536)."""
    spans = list(map(_SPAN, _RUN_OF[value].finditer(bits)))
    starts = map(operator.mul, map(_FIRST, spans), itertools.repeat(unit))
    ends = map(operator.mul, map(_SECOND, spans), itertools.repeat(unit))
    return list(map(view.__getitem__, map(slice, starts, ends)))


def unit_views(view, at: list, unit: int):
    """``view[i * unit : (i + 1) * unit]`` for each i of ``at``, lazily and
    without a Python step per unit."""
    starts = map(operator.mul, at, itertools.repeat(unit))
    ends = map(operator.mul, map(operator.add, at, itertools.repeat(1)), itertools.repeat(unit))
    return map(view.__getitem__, map(slice, starts, ends))


_SPAN = operator.methodcaller("span")
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)


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
