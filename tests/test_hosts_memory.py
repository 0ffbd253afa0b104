"""hosts.memory.GuestMemory: sparse memfd-backed RAM, populated ranges, image
loading, and (in a subprocess) that a 64 GiB guest with a few touched pages
stays small in host memory."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hosts import PACKED_TAGS_PER_PAGE, PAGE_SIZE, GuestMemory

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def mem():
    m = GuestMemory(4 * MiB)
    yield m
    m.close()


@pytest.mark.parametrize("size", [0, -PAGE_SIZE, PAGE_SIZE + 1, 100])
def test_size_must_be_positive_page_multiple(size):
    with pytest.raises(ValueError):
        GuestMemory(size)


def test_geometry(mem):
    assert mem.npages == 1024
    assert len(mem.data) == 4 * MiB
    assert len(mem.tags) == 1024 * PACKED_TAGS_PER_PAGE == 4 * MiB // 32
    assert mem.tagged == bytearray(1024)
    assert len(mem.page_tags(5)) == PACKED_TAGS_PER_PAGE
    assert GuestMemory.granule_of(0) == 0
    assert GuestMemory.granule_of(4095) == 255
    assert GuestMemory.granule_of(4096) == 256


def test_fresh_memory_is_unpopulated(mem):
    assert mem.populated_ranges() == []
    assert mem.populated_pages() == 0


def test_populated_ranges_after_writes(mem):
    mem.data[3 * PAGE_SIZE] = 1
    mem.data[5 * PAGE_SIZE - 1] = 1  # last byte of page 4
    mem.data[10 * PAGE_SIZE + 100 : 10 * PAGE_SIZE + 200] = b"x" * 100
    mem.data[1023 * PAGE_SIZE] = 9  # the last page
    assert mem.populated_ranges() == [(3, 5), (10, 11), (1023, 1024)]
    assert mem.populated_pages() == 4
    # bounds clip the answer to [first_page, end_page)
    assert mem.populated_ranges(4, 10) == [(4, 5)]
    assert mem.populated_ranges(5, 10) == []
    assert mem.populated_ranges(0, 4) == [(3, 4)]
    assert mem.populated_ranges(11, 1023) == []
    # asking never populates anything
    assert mem.populated_ranges() == [(3, 5), (10, 11), (1023, 1024)]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1023), st.integers(1, 40), st.booleans()), max_size=12))
def test_populated_ranges_agree_with_seek_alone(writes):
    """mincore() first, SEEK_DATA in its holes: the same answer as
    SEEK_DATA/SEEK_HOLE alone, after writes and punched holes."""
    m = GuestMemory(4 * MiB)
    try:
        for first, count, punch in writes:
            end = min(first + count, 1024)
            if punch:
                m.punch(first, end)
            else:
                m.data[first * PAGE_SIZE : end * PAGE_SIZE] = b"\1" * ((end - first) * PAGE_SIZE)
        for first, end in ((0, 1024), (3, 700), (500, 501)):
            assert m.populated_ranges(first, end) == m.seek_ranges(first, end)
    finally:
        m.close()


def test_populated_ranges_ask_seek_where_mincore_sees_nothing(mem, monkeypatch):
    """A page swapped out holds data but is not resident: where mincore()
    reports nothing, SEEK_DATA decides, so such a page is still sent."""
    mem.data[2 * PAGE_SIZE] = 1
    mem.data[7 * PAGE_SIZE : 9 * PAGE_SIZE] = b"x" * (2 * PAGE_SIZE)
    real = mem.resident_pages
    monkeypatch.setattr(mem, "resident_pages", lambda a, b: bytes(len(real(a, b))))  # none resident
    assert mem.populated_ranges() == [(2, 3), (7, 9)]
    monkeypatch.setattr(mem, "resident_pages", lambda a, b: None)  # mincore unusable
    assert mem.populated_ranges() == [(2, 3), (7, 9)]


def test_populated_ranges_of_a_sparse_guest_ask_mincore_little():
    """SEEK_DATA skips the holes; mincore() is asked a small window from
    each populated page, growing only while all of it is resident."""
    m = GuestMemory(1 << 30)
    try:
        for page in (5, 100_000, 262_143):
            m.data[page * PAGE_SIZE] = 1
        asked = []
        real = m.resident_pages
        m.resident_pages = lambda a, b: asked.append(b - a) or real(a, b)
        assert m.populated_ranges() == [(5, 6), (100_000, 100_001), (262_143, 262_144)]
        assert len(asked) == 3 and sum(asked) <= 3 * 512, asked
    finally:
        m.close()


def test_zero_bytes_written_still_populate(mem):
    mem.data[7 * PAGE_SIZE : 8 * PAGE_SIZE] = bytes(PAGE_SIZE)
    assert mem.populated_ranges() == [(7, 8)]


@pytest.mark.parametrize("length", [10, PAGE_SIZE, 64 * 1024, 300 * 1024 + 5])
@pytest.mark.parametrize("prepopulated", [False, True])
def test_write_stores_bytes_and_populates(mem, length, prepopulated):
    """GuestMemory.write: small stores memcpy, large stores into holes pwrite;
    either way the bytes land and exactly the covered pages are populated."""
    offset = 2 * PAGE_SIZE + 16
    if prepopulated:
        mem.data[offset] = 0xAA
    payload = bytes((i * 7 + 3) & 0xFF for i in range(length))
    mem.write(offset, payload)
    assert bytes(mem.data[offset : offset + length]) == payload
    last = -(-(offset + length) // PAGE_SIZE)
    assert mem.populated_ranges() == [(2, last)]
    assert mem.data[offset - 1] == 0 and mem.data[offset + length] == 0


def test_write_accepts_memoryview_and_starts_in_a_hole_after_data(mem):
    mem.data[0] = 1
    src = bytearray(b"\x5a" * (256 * 1024))
    mem.write(PAGE_SIZE, memoryview(src)[1000:200_000])
    assert bytes(mem.data[PAGE_SIZE : PAGE_SIZE + 199_000]) == b"\x5a" * 199_000
    assert mem.populated_ranges() == [(0, 1 + -(-199_000 // PAGE_SIZE))]


def test_prefault_populates_the_pages_zeroed_as_mem_prealloc_does(mem):
    """prefault() touches every page of the range (MADV_POPULATE_WRITE), as
    QEMU's -mem-prealloc does: the memory is there, in memory and zero, so a
    later store costs a copy only; pages outside the range stay holes."""
    mem.prefault(100, 110)
    assert os.fstat(mem._data_fd).st_blocks * 512 >= 10 * PAGE_SIZE
    assert mem.populated_ranges() == [(100, 110)]
    assert mem.all_resident(100, 110) and not mem.all_resident(99, 110)
    assert bytes(mem.data[100 * PAGE_SIZE : 110 * PAGE_SIZE]) == bytes(10 * PAGE_SIZE)


def test_prefault_without_populate_stores_zeros(mem, monkeypatch):
    """On a kernel without MADV_POPULATE_WRITE (before 5.14) prefault()
    stores zeros instead, which populates the pages just the same."""
    import hosts.memory as hm

    monkeypatch.setattr(hm, "MADV_POPULATE_WRITE", -1)  # madvise() fails with EINVAL
    mem.prefault(100, 110)
    assert mem.populated_ranges() == [(100, 110)]
    assert bytes(mem.data[100 * PAGE_SIZE : 110 * PAGE_SIZE]) == bytes(10 * PAGE_SIZE)


def test_reading_a_hole_through_the_mapping_populates_it(mem):
    """tmpfs allocates a page on a read fault of a shared mapping, as it would
    for a real VMM's memfd-backed RAM: a migration source that wants to keep
    RAM sparse must consult populated_ranges() before reading."""
    assert bytes(mem.data[50 * PAGE_SIZE : 50 * PAGE_SIZE + 8]) == bytes(8)
    assert mem.populated_ranges() == [(50, 51)]


def test_close_with_a_view_still_alive():
    """close() must not fail half-way (leaking the tag mapping and both
    files) because a caller still holds a view returned by a read."""
    m = GuestMemory(MiB)
    m.data[0:5] = b"alive"
    view = m.data[0:5]
    m.close()
    assert bytes(view) == b"alive"  # the mapping lives as long as the view
    del view


# -- load_image --------------------------------------------------------------------------
def _image(tmp_path, content: bytes, name="img.raw"):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def test_load_image_at_offset(mem, tmp_path):
    content = bytes(range(256)) * 48 + b"tail"  # 3 pages + 4 bytes
    n = mem.load_image(_image(tmp_path, content), offset=8 * PAGE_SIZE)
    assert n == len(content)
    assert bytes(mem.data[8 * PAGE_SIZE : 8 * PAGE_SIZE + len(content)]) == content
    assert mem.populated_ranges() == [(8, 12)]


def test_load_image_repeat_fills_ram(mem, tmp_path):
    content = bytes((i * 13 + 1) & 0xFF or 1 for i in range(5000))  # not a page multiple
    offset = 1000 * PAGE_SIZE
    n = mem.load_image(_image(tmp_path, content), offset=offset, repeat=True)
    assert n == mem.size - offset
    want = (content * (n // len(content) + 1))[:n]
    assert bytes(mem.data[offset:]) == want
    assert mem.populated_ranges() == [(1000, 1024)]


def test_load_image_larger_than_ram_is_cut_at_the_end(mem, tmp_path):
    content = b"\x01" * (mem.size + 3 * PAGE_SIZE)
    n = mem.load_image(_image(tmp_path, content), offset=mem.size - 2 * PAGE_SIZE)
    assert n == 2 * PAGE_SIZE
    assert bytes(mem.data[-2 * PAGE_SIZE :]) == b"\x01" * 2 * PAGE_SIZE


def test_load_image_leaves_all_zero_chunks_unpopulated(tmp_path):
    mem = GuestMemory(8 * MiB)
    try:
        content = b"\x11" * MiB + bytes(2 * MiB) + b"\x22" * MiB + bytes(MiB // 2)
        n = mem.load_image(_image(tmp_path, content), offset=0)
        assert n == len(content)
        assert bytes(mem.data[:MiB]) == b"\x11" * MiB
        assert bytes(mem.data[3 * MiB : 4 * MiB]) == b"\x22" * MiB
        pages_per_mib = MiB // PAGE_SIZE
        assert mem.populated_ranges() == [(0, pages_per_mib), (3 * pages_per_mib, 4 * pages_per_mib)]
    finally:
        mem.close()


@pytest.mark.parametrize("offset", [1, PAGE_SIZE + 8, -PAGE_SIZE, 4 * MiB, 4 * MiB + PAGE_SIZE])
def test_load_image_bad_offset(mem, tmp_path, offset):
    with pytest.raises(ValueError, match="offset"):
        mem.load_image(_image(tmp_path, b"\x01" * 100), offset=offset)
    assert mem.populated_ranges() == []


def test_load_image_empty_file(mem, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        mem.load_image(_image(tmp_path, b""))


def test_load_image_missing_file(mem, tmp_path):
    with pytest.raises(FileNotFoundError):
        mem.load_image(str(tmp_path / "nope.raw"))


# -- sparse RAM: host memory of a 64 GiB guest --------------------------------------------
_SPARSE_CHILD = textwrap.dedent(r"""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    from hosts import SimulatedHost, PAGE_SIZE
    from hosts.constants import RAM_BASE_IPA

    def status():
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    before = status()
    host = SimulatedHost(64 << 30, vcpus=2, workload="allocator")
    vm = host.vm
    touched = [0, 1, 4096, 1 << 20, (16 << 30) // PAGE_SIZE, (64 << 30) // PAGE_SIZE - 1]
    for page in touched:
        ipa = RAM_BASE_IPA + page * PAGE_SIZE
        vm.guest_write(ipa + 64, b"hello, sparse world")
        vm.guest_set_tags(ipa, PAGE_SIZE, 5)
    host.ram.write(2 * PAGE_SIZE, b"device")             # one VMM write
    vm.enable_dirty_logging(0)
    vm.guest_write(RAM_BASE_IPA, b"again")
    dirty = vm.get_dirty_log(0).ranges()
    populated = host.memory.populated_ranges()
    after = status()
    print(json.dumps({
        "before": before, "after": after,
        "populated_pages": sum(e - s for s, e in populated),
        "data_file_bytes": os.fstat(host.memory._data_fd).st_blocks * 512,
        "tags_file_bytes": os.fstat(host.memory._tags_fd).st_blocks * 512,
        "dirty": dirty, "touched": len(touched),
    }))
""")


def test_64gib_guest_with_few_touched_pages_stays_small():
    """Run in a fresh interpreter so RSS is not polluted by other tests.  The
    data file's allocated blocks are checked too: stores that go through
    pwrite() land in the memfd without being mapped, so RSS alone could miss
    them."""
    proc = subprocess.run([sys.executable, "-c", _SPARSE_CHILD, REPO], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = r["after"]["VmRSS"] - r["before"]["VmRSS"]
    assert growth < 200 * MiB, r
    assert r["populated_pages"] == r["touched"] + 1  # + the device write's page
    assert r["data_file_bytes"] <= 64 * PAGE_SIZE, r
    assert r["tags_file_bytes"] <= 64 * PAGE_SIZE, r
    assert r["dirty"] == [[0, 1]]


def test_prefaulted_pages_read_in_place():
    from hosts.memory import GuestMemory

    m = GuestMemory(8 << 20)
    try:
        m.prefault(0, 512)
        assert m.populated_ranges() == [(0, 512)] and m.has_data(0, 512)
        assert m.fully_populated(0, 512) and not m.fully_populated(0, 513)
        assert bytes(m.data[:4096]) == bytes(4096)
    finally:
        m.close()
