"""Bulk conversions between packed tag storage (two 4-bit tags per byte, the
lower-addressed granule in the low nibble) and one-tag-per-byte arrays (the
KVM_ARM_MTE_COPY_TAGS buffer format).  Everything here works on whole slices
with C-level codecs and bytes.translate: no Python loop per granule."""

import binascii
import codecs
from array import array

_LOW_NIBBLE = bytes(b & 0x0F for b in range(256))
# unpack: packed byte (hi << 4 | lo) -> code point (hi << 8 | lo); encoded as
# UTF-16-LE that is the two bytes lo, hi.  All code points are below 0x0F10,
# so there are no surrogates and every character encodes to exactly 2 bytes.
_UNPACK_TABLE = "".join(chr(((b >> 4) << 8) | (b & 0x0F)) for b in range(256))
# pack: each granule byte -> the hex digit of its low nibble; swapping the
# two digits of each pair (array byteswap) makes unhexlify join them into the
# packed byte (hi << 4 | lo).
_TO_HEX_DIGIT = bytes(b"0123456789abcdef"[b & 0x0F] for b in range(256))


def unpack(packed) -> bytes:
    """Packed tags -> one byte per granule (tag in the low nibble)."""
    return codecs.charmap_decode(packed, "strict", _UNPACK_TABLE)[0].encode("utf-16-le")


def unpack_into(packed, out, offset: int = 0) -> None:
    """Like :func:`unpack`, writing 2*len(packed) bytes into ``out`` at ``offset``."""
    unpacked = unpack(packed)
    memoryview(out).cast("B")[offset : offset + len(unpacked)] = unpacked


def pack(unpacked) -> bytes:
    """One byte per granule -> packed tags.  Only the low nibble of each input
    byte is kept, as the hardware ignores the rest.  The input length must be even."""
    if len(unpacked) % 2:
        raise ValueError("tag array length must be even")
    digits = array("H")
    # bytearray.translate: about twice as fast as bytes.translate, which
    # also tracks whether anything changed (read_tags / write_tags of a
    # 256 MiB tagged guest: 26 -> 21 ms each, medians of 7)
    digits.frombytes(bytearray(unpacked).translate(_TO_HEX_DIGIT))
    digits.byteswap()  # the same on any host: bytes within each 2-byte item
    return binascii.unhexlify(digits)


def fill_granules(storage, first_granule: int, count: int, tag: int) -> None:
    """Set ``count`` granules starting at ``first_granule`` to ``tag`` in packed
    ``storage`` (a writable buffer), handling the half-byte edges."""
    if count <= 0:
        return
    tag &= 0x0F
    g, end = first_granule, first_granule + count
    if g & 1:  # odd granule: high nibble of its byte
        i = g >> 1
        storage[i] = (storage[i] & 0x0F) | (tag << 4)
        g += 1
    full_bytes = (end - g) >> 1
    if full_bytes:
        i = g >> 1
        storage[i : i + full_bytes] = bytes([tag | (tag << 4)]) * full_bytes
        g += 2 * full_bytes
    if g < end:  # one granule left: low nibble
        i = g >> 1
        storage[i] = (storage[i] & 0xF0) | tag


def granule_tag(storage, granule: int) -> int:
    byte = storage[granule >> 1]
    return (byte >> 4) if granule & 1 else (byte & 0x0F)


def first_mismatch(storage, first_granule: int, count: int, tag: int):
    """Index of the first granule in the range whose tag differs from ``tag``,
    or None.  Bulk: strips the matching prefix of the packed bytes."""
    if count <= 0:
        return None
    tag &= 0x0F
    g, end = first_granule, first_granule + count
    if g & 1:
        if granule_tag(storage, g) != tag:
            return g
        g += 1
    full_bytes = (end - g) >> 1
    if full_bytes:
        i = g >> 1
        chunk = bytes(storage[i : i + full_bytes])
        rest = chunk.lstrip(bytes([tag | (tag << 4)]))
        if rest:
            bad = i + (full_bytes - len(rest))
            byte = storage[bad]
            return 2 * bad if (byte & 0x0F) != tag else 2 * bad + 1
        g += 2 * full_bytes
    if g < end and granule_tag(storage, g) != tag:
        return g
    return None


_ZERO_CHUNK = bytes(1 << 20)


def all_zero(buf) -> bool:
    """True when every byte is zero: memcmp against a zero block, 1 MiB at a
    time, with no copy and no per-byte Python work."""
    mv = memoryview(buf).cast("B")
    step = len(_ZERO_CHUNK)
    if len(mv) <= step:  # one compare: most calls (a page's or a batch's tags)
        return _ZERO_CHUNK.startswith(mv)
    return all(_ZERO_CHUNK.startswith(mv[o : o + step]) for o in range(0, len(mv), step))
