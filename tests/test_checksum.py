"""migrate.checksum: the accelerated CRC-32 gives the standard library's
values, and without an accelerator the standard library's is used."""

import builtins
import importlib
import os
import zlib

import pytest

import migrate.checksum as checksum

CASES = [b"", b"a", os.urandom(4096), os.urandom(3 << 20)]


@pytest.mark.parametrize("data", CASES, ids=["empty", "one", "page", "3MiB"])
def test_same_values_as_the_standard_library(data):
    view = memoryview(bytearray(data))
    assert checksum.crc32(data) == zlib.crc32(data)
    assert checksum.crc32(view[1:]) == zlib.crc32(view[1:])
    assert checksum.crc32(data, 0x1234_5678) == zlib.crc32(data, 0x1234_5678)  # a running CRC continues


def test_a_running_crc_over_pieces_equals_one_over_the_whole():
    data = os.urandom(1 << 20)
    crc = 0
    for o in range(0, len(data), 16384):
        crc = checksum.crc32(data[o : o + 16384], crc)
    assert crc == zlib.crc32(data)


def test_without_an_accelerator_the_standard_library_is_used(monkeypatch):
    real_import = builtins.__import__

    def no_accelerators(name, *args, **kw):
        if name.split(".")[0] in ("zlib_ng", "isal"):
            raise ImportError(f"no {name} here")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_accelerators)
    try:
        plain = importlib.reload(checksum)
        assert plain.IMPLEMENTATION == "zlib" and plain.crc32 is zlib.crc32
    finally:
        monkeypatch.undo()
        importlib.reload(checksum)


def test_the_accelerator_is_used_when_installed():
    try:
        import zlib_ng  # noqa: F401
    except ImportError:
        pytest.skip("zlib-ng is not installed (the fast extra)")
    assert checksum.IMPLEMENTATION == "zlib-ng"


@pytest.mark.parametrize(
    "sizes",
    [[16384] * 64, [16384, 16384, 8192], [16384], [4096, 4096], [3, 5], [0, 7], [1 << 20, 16384 * 3 + 1]],
    ids=["chunk", "short-last", "one", "pages", "tiny", "empty-first", "mixed"],
)
def test_concatenated_crcs_equal_the_crc_of_the_joined_bytes(sizes):
    # Pieces of one length, the last one possibly shorter: what a digest
    # keeps per 16 KiB of a chunk and joins into the chunk's plain CRC.
    parts = [os.urandom(n) for n in sizes]
    crcs = [zlib.crc32(p) for p in parts]
    assert checksum.crc32_concat(crcs, sizes[0], sizes[-1]) == zlib.crc32(b"".join(parts))


def test_concatenated_crcs_of_nothing_and_of_zeros():
    assert checksum.crc32_concat([], 16384) == 0 == zlib.crc32(b"")
    zero = zlib.crc32(bytes(16384))
    assert checksum.crc32_concat([zero] * 4, 16384) == zlib.crc32(bytes(4 * 16384))
    # one flipped bit in one piece changes the joined CRC
    assert checksum.crc32_concat([zero, zero ^ 1, zero, zero], 16384) != zlib.crc32(bytes(4 * 16384))


@pytest.mark.parametrize("piece", [0, 1, 31, 62, 63])
def test_swapping_one_piece_crc_gives_the_crc_of_the_new_block(piece):
    # A block of 64 pieces of 16 KiB (a digest chunk); one piece rewritten:
    # its old and new CRCs give the block's new CRC without the others.
    size = 16384
    block = bytearray(os.urandom(64 * size))
    before = zlib.crc32(block)
    old = zlib.crc32(block[piece * size : (piece + 1) * size])
    block[piece * size + 100] ^= 0x01
    new = zlib.crc32(block[piece * size : (piece + 1) * size])
    after = checksum.crc32_swap(before, old, new, size, 63 - piece)
    assert after == zlib.crc32(block) != before
    assert checksum.crc32_swap(after, new, old, size, 63 - piece) == before  # and back
    assert checksum.crc32_swap(before, old, old, size, 63 - piece) == before  # unchanged piece, unchanged CRC


def test_swap_by_library_and_by_tables_agree():
    # zlib-ng's crc32_combine where installed, the tables of powers elsewhere:
    # the same CRC either way, the plain CRC of the new block.
    size = 16384
    parts = [os.urandom(size) for _ in range(64)]
    before = zlib.crc32(b"".join(parts))
    for piece in (0, 17, 63):
        changed = parts[:piece] + [os.urandom(size)] + parts[piece + 1 :]
        old, new = zlib.crc32(parts[piece]), zlib.crc32(changed[piece])
        want = zlib.crc32(b"".join(changed))
        assert checksum._swap_by_tables(before, old, new, size, 63 - piece) == want
        assert checksum.crc32_swap(before, old, new, size, 63 - piece) == want


@pytest.mark.parametrize("library", [True, False], ids=["zlib-ng combine", "tables"])
@pytest.mark.parametrize("sizes", [[1 << 20] * 4, [1 << 20, 1 << 20, 12288]], ids=["4", "short-last"])
def test_joined_chunk_crcs_equal_the_crc_of_the_frame(monkeypatch, library, sizes):
    # A frame of whole chunks: its data CRC from the chunks' CRCs as they landed.
    if not library:
        monkeypatch.setattr(checksum, "_combine", None)
    elif checksum._combine is None:
        pytest.skip("zlib-ng is not installed")
    parts = [os.urandom(n) for n in sizes]
    crcs = [zlib.crc32(p) for p in parts]
    assert checksum.crc32_join(crcs, sizes[0], sizes[-1]) == zlib.crc32(b"".join(parts))
    assert checksum.crc32_join(crcs[:-1] + [crcs[-1] ^ 4], sizes[0], sizes[-1]) != zlib.crc32(b"".join(parts))
