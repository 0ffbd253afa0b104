"""hosts.tags: packed <-> one-byte-per-granule conversions and the bulk
granule helpers, checked against a per-granule reference written the slow,
obvious way (low nibble = lower-addressed granule)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hosts import tags as T


# -- slow, obvious references --------------------------------------------------
def ref_unpack(packed: bytes) -> bytes:
    out = bytearray()
    for b in packed:
        out.append(b & 0x0F)  # lower address: low nibble
        out.append(b >> 4)
    return bytes(out)


def ref_pack(unpacked: bytes) -> bytes:
    return bytes((unpacked[i] & 0x0F) | ((unpacked[i + 1] & 0x0F) << 4) for i in range(0, len(unpacked), 2))


def ref_tags(storage) -> list[int]:
    return list(ref_unpack(bytes(storage)))


# -- pack / unpack ---------------------------------------------------------------
def test_layout_low_nibble_is_lower_address():
    assert T.unpack(b"\x21\xf0") == b"\x01\x02\x00\x0f"
    assert T.pack(b"\x01\x02\x00\x0f") == b"\x21\xf0"


@settings(deadline=None)  # a noisy machine must not fail a correct example
@given(st.binary(max_size=4096))
def test_unpack_matches_reference_and_round_trips(packed):
    unpacked = T.unpack(packed)
    assert bytes(unpacked) == ref_unpack(packed)
    assert len(unpacked) == 2 * len(packed)
    assert T.pack(unpacked) == packed


@settings(deadline=None)
@given(st.binary(max_size=4096).filter(lambda b: len(b) % 2 == 0))
def test_pack_keeps_only_the_low_nibble(unpacked):
    packed = T.pack(unpacked)
    assert packed == ref_pack(unpacked)
    assert T.unpack(packed) == bytes(b & 0x0F for b in unpacked)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_pack_and_unpack_accept_any_buffer(kind):
    unpacked = bytes(range(16)) * 32
    packed = T.pack(kind(unpacked))
    assert packed == ref_pack(unpacked)
    assert T.unpack(kind(packed)) == unpacked


def test_pack_and_unpack_of_memoryview_slices():
    storage = bytearray(range(256))
    view = memoryview(storage)[3:67]
    assert T.unpack(view) == ref_unpack(bytes(storage[3:67]))
    big = bytearray(bytes(range(256)) * 4)
    assert T.pack(memoryview(big)[2:514]) == ref_pack(bytes(big[2:514]))


def test_pack_rejects_odd_length():
    with pytest.raises(ValueError):
        T.pack(b"\x01\x02\x03")
    with pytest.raises(ValueError):
        T.pack(memoryview(b"\x01"))


def test_empty():
    assert T.unpack(b"") == b""
    assert T.pack(b"") == b""


def test_unpack_into_writes_only_its_span():
    out = bytearray(b"\xee" * 12)
    T.unpack_into(b"\x21\x43", out, offset=3)
    assert out == b"\xee" * 3 + b"\x01\x02\x03\x04" + b"\xee" * 5
    view = memoryview(bytearray(8))[2:6]
    T.unpack_into(b"\xa5\x5a", view)
    assert bytes(view) == b"\x05\x0a\x0a\x05"


def test_large_round_trip():
    import os

    packed = os.urandom(1 << 20)
    assert T.pack(T.unpack(packed)) == packed


# -- fill_granules ------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.integers(0, 63), st.integers(0, 64), st.integers(0, 255), st.binary(min_size=32, max_size=32))
def test_fill_granules_matches_reference(first, count, tag, initial):
    count = min(count, 64 - first)
    storage = bytearray(initial)
    T.fill_granules(storage, first, count, tag)
    expect = ref_tags(initial)
    for g in range(first, first + count):
        expect[g] = tag & 0x0F
    assert ref_tags(storage) == expect


@pytest.mark.parametrize("first,count", [(1, 1), (1, 2), (1, 3), (0, 1), (2, 1), (3, 4), (0, 8), (1, 6)])
def test_fill_granules_half_byte_edges(first, count):
    storage = bytearray(b"\xff" * 6)
    T.fill_granules(storage, first, count, 0x3)
    tags = ref_tags(storage)
    assert tags[:first] == [0xF] * first
    assert tags[first : first + count] == [0x3] * count
    assert tags[first + count :] == [0xF] * (12 - first - count)


def test_fill_granules_zero_or_negative_count_is_a_no_op():
    storage = bytearray(b"\x12\x34")
    T.fill_granules(storage, 1, 0, 7)
    T.fill_granules(storage, 1, -3, 7)
    assert storage == b"\x12\x34"


def test_fill_granules_on_a_memoryview():
    storage = bytearray(4)
    T.fill_granules(memoryview(storage), 1, 5, 0xA)
    assert ref_tags(storage) == [0, 10, 10, 10, 10, 10, 0, 0]


# -- granule_tag / first_mismatch ---------------------------------------------------
def test_granule_tag():
    storage = bytes([0x21, 0x43])
    assert [T.granule_tag(storage, g) for g in range(4)] == [1, 2, 3, 4]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 15), min_size=64, max_size=64), st.integers(0, 63), st.integers(0, 64), st.integers(0, 15)
)
def test_first_mismatch_matches_reference(tags, first, count, tag):
    count = min(count, 64 - first)
    storage = T.pack(bytes(tags))
    expect = next((g for g in range(first, first + count) if tags[g] != tag), None)
    assert T.first_mismatch(storage, first, count, tag) == expect


@pytest.mark.parametrize(
    "first,count,bad",
    [
        (1, 5, 1),  # odd start granule itself mismatches
        (1, 5, 5),  # odd end: the last granule, a low nibble
        (0, 6, 2),  # inside the whole bytes, low nibble
        (0, 6, 3),  # inside the whole bytes, high nibble
        (3, 1, 3),  # single odd granule
        (2, 1, 2),  # single even granule
        (1, 8, 8),  # past a full run, low nibble of the last byte
    ],
)
def test_first_mismatch_edges(first, count, bad):
    tags = [7] * 16
    tags[bad] = 2
    storage = T.pack(bytes(tags))
    assert T.first_mismatch(storage, first, count, 7) == bad
    # a mismatch just outside the range is not reported
    tags = [7] * 16
    if first > 0:
        tags[first - 1] = 2
    tags[first + count] = 2
    assert T.first_mismatch(T.pack(bytes(tags)), first, count, 7) is None


def test_first_mismatch_empty_range_and_tag_masking():
    storage = bytes([0x77] * 4)
    assert T.first_mismatch(storage, 0, 0, 1) is None
    assert T.first_mismatch(storage, 0, 8, 0x17) is None  # only the low 4 bits of the tag count
    assert T.first_mismatch(storage, 0, 8, 7) is None


# -- all_zero ------------------------------------------------------------------------
def test_all_zero():
    assert T.all_zero(b"")
    assert T.all_zero(bytes(10))
    assert not T.all_zero(b"\x00\x01")
    big = bytearray(3 * (1 << 20) + 5)
    assert T.all_zero(big)
    big[-1] = 1  # in the last, short chunk
    assert not T.all_zero(big)
    big[-1] = 0
    big[1 << 20] = 1  # first byte of the second chunk
    assert not T.all_zero(big)
    big[1 << 20] = 0
    big[(1 << 20) - 1] = 1  # last byte of the first chunk
    assert not T.all_zero(memoryview(big))


def test_all_zero_accepts_wider_formats():
    import array

    assert T.all_zero(array.array("Q", [0] * 100))
    assert not T.all_zero(array.array("Q", [0] * 99 + [1 << 60]))
