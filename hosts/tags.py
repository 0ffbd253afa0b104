"""Bulk conversions between packed tag storage (two 4-bit tags per byte, the
lower-addressed granule in the low nibble) and one-tag-per-byte arrays (the
KVM_ARM_MTE_COPY_TAGS buffer format).  Everything here works on whole slices
with bytes.translate and big-int arithmetic: no Python loop per granule."""

_LOW_NIBBLE = bytes(b & 0x0F for b in range(256))
_HIGH_NIBBLE = bytes(b >> 4 for b in range(256))
_TO_HIGH_NIBBLE = bytes((b & 0x0F) << 4 for b in range(256))


def unpack(packed) -> bytearray:
    """Packed tags -> one byte per granule (tag in the low nibble)."""
    packed = bytes(packed)
    out = bytearray(2 * len(packed))
    out[0::2] = packed.translate(_LOW_NIBBLE)
    out[1::2] = packed.translate(_HIGH_NIBBLE)
    return out


def unpack_into(packed, out, offset: int = 0) -> None:
    """Like :func:`unpack`, writing 2*len(packed) bytes into ``out`` at ``offset``."""
    packed = bytes(packed)
    n = 2 * len(packed)
    view = memoryview(out)[offset:offset + n]
    view[0::2] = packed.translate(_LOW_NIBBLE)
    view[1::2] = packed.translate(_HIGH_NIBBLE)


def pack(unpacked) -> bytes:
    """One byte per granule -> packed tags.  Only the low nibble of each input
    byte is kept, as the hardware ignores the rest.  The input length must be even."""
    data = bytes(unpacked)
    if len(data) % 2:
        raise ValueError("tag array length must be even")
    low = data[0::2].translate(_LOW_NIBBLE)
    high = data[1::2].translate(_TO_HIGH_NIBBLE)
    n = len(low)
    # The nibbles do not overlap, so one big-int OR merges them in bulk.
    return (int.from_bytes(low, "little") | int.from_bytes(high, "little")).to_bytes(n, "little")


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
        storage[i:i + full_bytes] = bytes([tag | (tag << 4)]) * full_bytes
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
        chunk = bytes(storage[i:i + full_bytes])
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
    return all(_ZERO_CHUNK.startswith(mv[o:o + step]) for o in range(0, len(mv), step))
