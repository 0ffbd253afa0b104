"""Validation digests (migrate/digest.py) and the comparison that names
pages and granules (migrate/validate.py).  Both read the simulated kernel's
memory and tag storage directly."""

import zlib
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import needs_watch

from hosts import SimulatedHost
from hosts import tags as tagops
from migrate.engine.digest import (
    CHUNK_PAGES,
    DETAIL_PER_PAGE,
    MemoryDigest,
    chunk_count,
    chunk_crc,
    effective_tags,
    page_detail,
    state_digest,
)
from migrate.engine.validate import MAX_REPORTED, Validation, _compact, compare_detail, differing_chunks

PAGE = 4096
TAGB = 128
RAM = 8 << 20
NPAGES = RAM // PAGE


def make_host(ram=RAM, prepare=True, seed=5):
    host = SimulatedHost(ram, workload="allocator", workload_params={"fill": 1.0}, rate=0, seed=seed)
    if prepare:
        host.prepare_guest()
    return host


@pytest.fixture
def twins():
    a, b = make_host(), make_host()
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def blank():
    h = make_host(prepare=False)
    yield h
    h.close()


def diff(a, b):
    # As in a migration: ``a`` digested as the source does after the pause
    # (one CRC a chunk, no pieces kept), ``b`` as the destination does (piece
    # CRCs joined per chunk), so every comparison below also checks that the
    # two computations agree.
    da, db = MemoryDigest(a.memory, pieces=False), MemoryDigest(b.memory)
    data = [c for c in range(da.nchunks) if da.data_crcs[c] != db.data_crcs[c]]
    tags = [c for c in range(da.nchunks) if da.tag_crcs[c] != db.tag_crcs[c]]
    return data, tags, da, db


def set_granules(memory, page, first_granule, count, tag):
    tagops.fill_granules(memory.tags, page * 256 + first_granule, count, tag)


# -- digests ------------------------------------------------------------------------
def test_chunk_count():
    assert chunk_count(0) == 0
    assert chunk_count(1) == 1
    assert chunk_count(CHUNK_PAGES) == 1
    assert chunk_count(CHUNK_PAGES + 1) == 2
    assert CHUNK_PAGES * PAGE == 1 << 20


def test_identical_hosts_match(twins):
    a, b = twins
    assert a.memory.populated_pages() == NPAGES
    assert a.memory.tagged.count(1) == NPAGES
    assert any(a.memory.tags[i] for i in range(0, NPAGES * TAGB, 4096))  # really tagged
    data, tags, da, db = diff(a, b)
    assert data == [] and tags == []
    assert da.data_digest() == db.data_digest()
    assert da.tag_digest() == db.tag_digest()
    assert da.chunk_crcs() == db.chunk_crcs()
    assert da.nchunks == NPAGES // CHUNK_PAGES
    assert len(da.data_digest()) == 64


def test_different_guests_differ(twins):
    a, _ = twins
    c = make_host(seed=6)
    try:
        data, tags, da, dc = diff(a, c)
        assert data and tags
        assert da.data_digest() != dc.data_digest() and da.tag_digest() != dc.tag_digest()
    finally:
        c.close()


@pytest.mark.parametrize("page, offset", [(0, 0), (600, 17), (1023, PAGE - 1), (NPAGES - 1, PAGE - 1), (256, 0)])
def test_one_byte_data_change_is_found_in_its_chunk(twins, page, offset):
    a, b = twins
    pos = page * PAGE + offset
    b.memory.data[pos] ^= 0x01
    data, tags, da, db = diff(a, b)
    assert data == [page // CHUNK_PAGES]
    assert tags == []
    assert da.data_digest() != db.data_digest()
    assert da.tag_digest() == db.tag_digest()


@pytest.mark.parametrize("page, granule", [(0, 0), (1000, 1), (1000, 255), (NPAGES - 1, 128), (511, 77)])
def test_one_granule_tag_change_is_found_in_its_chunk(twins, page, granule):
    a, b = twins
    old = tagops.granule_tag(b.memory.tags, page * 256 + granule)
    set_granules(b.memory, page, granule, 1, (old + 1) & 0xF)
    data, tags, da, db = diff(a, b)
    assert tags == [page // CHUNK_PAGES]
    assert data == []
    assert da.tag_digest() != db.tag_digest()
    assert da.data_digest() == db.data_digest()


def test_tag_storage_of_an_untagged_page_does_not_count(blank):
    # Effective tags: a page not marked PG_mte_tagged reads as zero tags
    # (KVM's FROM_GUEST semantics), whatever its storage holds.
    other = make_host(prepare=False)
    try:
        assert blank.memory.tagged[9] == 0
        set_granules(blank.memory, 9, 0, 256, 0xC)
        assert effective_tags(blank.memory, 9, 10) == bytes(TAGB)
        assert diff(blank, other)[:2] == ([], [])
        blank.memory.tagged[9] = 1
        assert effective_tags(blank.memory, 9, 10) == bytes([0xCC]) * TAGB
        assert diff(blank, other)[1] == [0]
    finally:
        other.close()


def test_never_populated_pages_count_as_zeros(blank):
    other = make_host(prepare=False)
    try:
        blank.vm.guest_write(blank.vm.page_to_ipa(5), bytes(3 * PAGE))  # populated, zero, tagged-with-zero
        assert blank.memory.populated_ranges() == [(5, 8)]
        assert other.memory.populated_ranges() == []
        assert diff(blank, other)[:2] == ([], [])
        blank.vm.guest_write(blank.vm.page_to_ipa(6), b"\x01")
        assert diff(blank, other)[:2] == ([0], [])
    finally:
        other.close()


def test_digesting_does_not_populate_memory(blank):
    vm = blank.vm
    vm.guest_write(vm.page_to_ipa(3), b"\x11" * PAGE)
    vm.guest_write(vm.page_to_ipa(700), b"\x22" * (5 * PAGE))
    vm.guest_set_tags(vm.page_to_ipa(700), 2 * PAGE, 6)
    vm.guest_write(vm.page_to_ipa(NPAGES - 1), b"\x33" * PAGE)
    before = blank.memory.populated_ranges()
    assert before == [(3, 4), (700, 705), (NPAGES - 1, NPAGES)]
    tagged_before = bytes(blank.memory.tagged)
    d = MemoryDigest(blank.memory)
    d.data_digest(), d.tag_digest(), d.chunk_crcs()
    detail = page_detail(blank.memory, list(range(d.nchunks)))
    assert len(detail) == NPAGES * DETAIL_PER_PAGE
    effective_tags(blank.memory, 0, NPAGES)
    assert blank.memory.populated_ranges() == before
    assert bytes(blank.memory.tagged) == tagged_before


def test_partial_last_chunk():
    ram = RAM + 3 * PAGE
    a, b = make_host(ram), make_host(ram)
    try:
        assert a.memory.npages == NPAGES + 3
        da = MemoryDigest(a.memory)
        assert da.nchunks == NPAGES // CHUNK_PAGES + 1
        b.memory.data[(NPAGES + 2) * PAGE] ^= 0xFF
        data, tags, _, _ = diff(a, b)
        assert data == [NPAGES // CHUNK_PAGES] and tags == []
        c = da.nchunks - 1
        detail_a, detail_b = page_detail(a.memory, [c]), page_detail(b.memory, [c])
        assert len(detail_a) == 3 * DETAIL_PER_PAGE
        v = Validation("digest")
        compare_detail(v, [c], detail_a, detail_b, a.memory.npages)
        assert v.data_mismatches == 1
        assert v.first_mismatches == [{"page": NPAGES + 2, "kind": "data"}]
    finally:
        a.close()
        b.close()


def test_digest_of_selected_chunks(twins):
    a, _ = twins
    full = MemoryDigest(a.memory)
    part = MemoryDigest(a.memory, chunks=[1, 3])
    for c in range(full.nchunks):
        if c in (1, 3):
            assert (part.data_crcs[c], part.tag_crcs[c]) == (full.data_crcs[c], full.tag_crcs[c])
        else:
            assert (part.data_crcs[c], part.tag_crcs[c]) == (0, 0)


@pytest.mark.parametrize("pieces", [True, False])
def test_chunk_crc_is_the_plain_crc_of_its_bytes(twins, pieces):
    a, _ = twins
    d = MemoryDigest(a.memory, pieces=pieces)
    c = 2
    lo, hi = c * CHUNK_PAGES * PAGE, (c + 1) * CHUNK_PAGES * PAGE
    assert d.data_crcs[c] == zlib.crc32(a.memory.data[lo:hi])
    assert d.tag_crcs[c] == zlib.crc32(a.memory.tags[lo // 32 : hi // 32])
    if pieces:  # and the pieces kept are the CRCs of its 16 KiB pieces
        want = [zlib.crc32(a.memory.data[o : o + 16384]) for o in range(lo, hi, 16384)]
        assert list(d.piece_crcs[c * 64 : (c + 1) * 64]) == want
        assert chunk_crc(array("I", want)) == d.data_crcs[c]
    else:
        assert len(d.piece_crcs) == 0


@pytest.mark.parametrize("pieces", [True, False])
def test_a_partial_last_chunk_has_a_short_last_piece(pieces):
    # 1 MiB + 6 pages: the second chunk holds one whole piece and one of 2 pages.
    host = make_host(ram=RAM // 8 + 6 * PAGE)
    try:
        assert host.memory.npages == CHUNK_PAGES + 6
        d = MemoryDigest(host.memory, pieces=pieces)
        lo = CHUNK_PAGES * PAGE
        assert d.nchunks == 2 and d.data_crcs[1] == zlib.crc32(host.memory.data[lo : lo + 6 * PAGE])
        if pieces:
            assert list(d.piece_crcs[64:66]) == [
                zlib.crc32(host.memory.data[lo : lo + 16384]),
                zlib.crc32(host.memory.data[lo + 16384 : lo + 6 * PAGE]),
            ]
        # a stale page in the short piece: the refreshed CRC is still the plain one
        host.memory.data[lo + 5 * PAGE] ^= 0x80
        d.mark_stale(CHUNK_PAGES + 5, CHUNK_PAGES + 6)
        d.refresh()
        assert d.data_crcs[1] == zlib.crc32(host.memory.data[lo : lo + 6 * PAGE])
    finally:
        host.close()


def test_the_source_digest_reads_each_chunk_in_one_crc_call(twins, monkeypatch):
    # The source's digest after the pause: one call of 1 MiB a chunk (where
    # 16 KiB pieces made 64), and the same chunk CRCs as the destination's
    # piece-keeping digest of the same bytes.
    a, b = twins
    calls = []
    real = zlib.crc32
    monkeypatch.setattr("migrate.engine.digest.crc32", lambda buf, *x: calls.append(len(buf)) or real(buf, *x))
    one_shot = MemoryDigest(a.memory, compute=False, pieces=False)
    one_shot.refresh(frozen=True)
    data_calls = [n for n in calls if n > TAGB * CHUNK_PAGES]  # not the tag CRCs (32 KiB a chunk)
    assert data_calls == [CHUNK_PAGES * PAGE] * one_shot.nchunks
    monkeypatch.undo()
    assert one_shot.chunk_crcs() == MemoryDigest(b.memory).chunk_crcs()


def test_the_source_and_destination_computations_agree_and_a_flipped_byte_is_named(twins):
    # The destination's digest as a migration builds it: whole chunks
    # recorded from their landed piece CRCs (set_data), then pages written by
    # a dirty pass re-read piece by piece (the chunk CRC updated from the old
    # and new piece CRCs).  The source's: one CRC call a chunk after the
    # pause.  Equal memory: equal digests; one flipped byte: that chunk, and
    # page detail names the page.
    import asyncio

    from migrate.engine.digest import piece_crcs

    a, b = twins
    dst = MemoryDigest(b.memory, compute=False)
    for c in range(dst.nchunks):
        lo, hi = c * CHUNK_PAGES * PAGE, (c + 1) * CHUNK_PAGES * PAGE
        dst.set_data(c, piece_crcs(b.memory.data[lo:hi]), tags_changed=True)
    for page in (7, 300, 301, 1500, NPAGES - 1):  # a dirty pass lands on both
        for host in (a, b):
            host.memory.data[page * PAGE : (page + 1) * PAGE] = bytes([page % 251]) * PAGE
        dst.mark_stale(page, page + 1)
    dst.refresh()

    async def source_digest():
        d = MemoryDigest(a.memory, compute=False, pieces=False)
        await asyncio.get_running_loop().run_in_executor(None, lambda: d.refresh_parallel(frozen=True))
        return d

    src = asyncio.run(source_digest())
    assert src.chunk_crcs() == dst.chunk_crcs() and src.data_digest() == dst.data_digest()
    b.memory.data[1500 * PAGE + 99] ^= 0x04  # lands wrong on the destination, unmarked
    dst.mark_stale(1500, 1501)
    dst.refresh()
    chunks = differing_chunks(src.data_crcs, src.tag_crcs, dst.data_crcs, dst.tag_crcs)
    assert chunks == [1500 // CHUNK_PAGES]
    v = Validation("digest")
    compare_detail(v, chunks, page_detail(a.memory, chunks), page_detail(b.memory, chunks), NPAGES)
    assert (v.data_mismatches, v.tag_mismatches) == (1, 0)
    assert v.first_mismatches == [{"page": 1500, "kind": "data"}]


def test_a_digest_without_pieces_reads_a_stale_chunk_whole_and_stays_right(twins):
    a, b = twins
    d = MemoryDigest(b.memory, pieces=False)
    b.memory.data[700 * PAGE + 3] ^= 0x10
    d.mark_stale(700, 701)
    assert d.stale_piece_bytes() == CHUNK_PAGES * PAGE  # the whole chunk, not its 16 KiB piece
    d.refresh()
    assert d.chunk_crcs() == MemoryDigest(b.memory).chunk_crcs()
    assert [c for c in range(d.nchunks) if d.data_crcs[c] != MemoryDigest(a.memory).data_crcs[c]] == [2]


def test_a_refresh_reads_only_the_stale_pieces_of_a_chunk_read_before(twins, monkeypatch):
    a, b = twins
    da, db = MemoryDigest(a.memory), MemoryDigest(b.memory)
    for page in (5, 6, 700, NPAGES - 1):
        b.memory.data[page * PAGE + 9] ^= 0x40
        db.mark_stale(page, page + 1)
    assert db.pending_chunks() == [0, 2, NPAGES // CHUNK_PAGES - 1]
    assert db.stale_piece_bytes() == 3 * 16384  # pages 5 and 6 share a piece
    read = []
    real = zlib.crc32
    monkeypatch.setattr("migrate.engine.digest.crc32", lambda buf, *a: read.append(len(buf)) or real(buf, *a))
    db.refresh()
    data_reads = [n for n in read if n == 16384]
    assert len(data_reads) == 3 and max(read) < 1 << 20  # no whole chunk read again
    monkeypatch.undo()
    # ... and it is right: the changed chunks differ from the twin, the others agree;
    # undoing the changes makes the digests equal again.
    assert [c for c in range(da.nchunks) if da.data_crcs[c] != db.data_crcs[c]] == [0, 2, da.nchunks - 1]
    for page in (5, 6, 700, NPAGES - 1):
        b.memory.data[page * PAGE + 9] ^= 0x40
        db.mark_stale(page, page + 1)
    db.refresh()
    assert db.data_digest() == da.data_digest() and db.chunk_crcs() == da.chunk_crcs()
    assert db.data_digest() == MemoryDigest(b.memory).data_digest()


def test_a_stopped_refresh_leaves_the_chunks_it_did_not_reach_stale(twins):
    # The destination stops its background refresh when the final digest
    # starts: what it did not reach must still be read, and nothing is lost.
    import threading

    a, b = twins
    d = MemoryDigest(b.memory)
    for page in (5, 300, 600, 1500):
        b.memory.data[page * PAGE] ^= 0x08
        d.mark_stale(page, page + 1)
    stop = threading.Event()
    real = d._tag_crc
    d._tag_crc = lambda c: stop.set() or real(c)  # stop once the first chunk is under way
    assert d.refresh(stop=stop) == 1
    assert d.pending_chunks() == [1, 2, 5]  # chunk 0 done, the rest left stale
    del d._tag_crc
    assert d.refresh(stop=stop) == 0  # still stopped: nothing taken, nothing cleared
    assert d.refresh() == 3 and not d.pending()
    assert d.chunk_crcs() == MemoryDigest(b.memory).chunk_crcs() != MemoryDigest(a.memory).chunk_crcs()


def test_a_change_not_marked_stale_is_not_seen_until_the_chunk_is_read_again(twins):
    # The digest trusts its writer's stale marks; a whole read finds what they missed.
    a, b = twins
    db = MemoryDigest(b.memory)
    b.memory.data[3 * PAGE] ^= 1
    db.mark_stale(100, 101)  # another piece of the same chunk
    db.refresh()
    assert db.data_digest() == MemoryDigest(a.memory).data_digest()
    db.refresh([0])  # asked explicitly: the whole chunk is read
    assert db.data_digest() != MemoryDigest(a.memory).data_digest()


def test_split_chunk_crcs(twins):
    a, _ = twins
    d = MemoryDigest(a.memory)
    data, tags = MemoryDigest.split_chunk_crcs(d.chunk_crcs(), d.nchunks)
    assert list(data) == list(d.data_crcs) and list(tags) == list(d.tag_crcs)
    with pytest.raises(ValueError, match=f"expected {8 * d.nchunks} bytes of chunk CRCs, got {8 * d.nchunks - 1}"):
        MemoryDigest.split_chunk_crcs(d.chunk_crcs()[:-1], d.nchunks)


def test_state_digest_is_canonical():
    s1 = {"vcpus": [{"pc": 1, "sctlr": 2}], "devices": {"uart": {"a": 1, "b": [1, 2]}}}
    s2 = {"devices": {"uart": {"b": (1, 2), "a": 1}}, "vcpus": [{"sctlr": 2, "pc": 1}]}
    assert state_digest(s1) == state_digest(s2)
    s3 = {"vcpus": [{"pc": 1, "sctlr": 3}], "devices": {"uart": {"a": 1, "b": [1, 2]}}}
    assert state_digest(s1) != state_digest(s3)
    assert state_digest({"a": [1, 2]}) != state_digest({"a": [2, 1]})


def _plain_canon(x):
    """The definition: every dict as its items sorted by key, every list and tuple walked."""
    if isinstance(x, dict):
        return sorted((str(k), _plain_canon(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return [_plain_canon(v) for v in x]
    return x


_scalars = st.one_of(
    st.integers(-(2**63), 2**64 - 1), st.text(max_size=3), st.binary(max_size=3), st.booleans(), st.none()
)
_states = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=3), inner, max_size=4),
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_states)
def test_state_digest_skips_only_what_has_no_dict_inside(state):
    # Lists without a dict inside are packed as they are, not walked: the
    # digest must still be that of the plain definition, however dicts nest.
    import hashlib

    import msgpack

    assert state_digest({"s": state}) == hashlib.sha256(msgpack.packb(_plain_canon({"s": state}))).hexdigest()


# -- page detail and compare_detail ----------------------------------------------------------
def test_page_detail_layout(twins):
    a, _ = twins
    detail = page_detail(a.memory, [1])
    assert len(detail) == CHUNK_PAGES * DETAIL_PER_PAGE
    p = 300
    rec = detail[(p - 256) * DETAIL_PER_PAGE : (p - 255) * DETAIL_PER_PAGE]
    assert int.from_bytes(rec[:4], "little") == zlib.crc32(a.memory.data[p * PAGE : (p + 1) * PAGE])
    assert rec[4:] == bytes(a.memory.tags[p * TAGB : (p + 1) * TAGB])


def test_compare_detail_counts_and_names_pages_and_granules(twins):
    a, b = twins
    b.memory.data[600 * PAGE + 5] ^= 0x80  # page 600: data
    old = tagops.granule_tag(b.memory.tags, 1000 * 256 + 5)
    set_granules(b.memory, 1000, 5, 3, (old + 7) & 0xF)  # page 1000: granules 5..7
    set_granules(b.memory, 1000, 9, 1, (tagops.granule_tag(b.memory.tags, 1000 * 256 + 9) + 1) & 0xF)
    b.memory.data[1001 * PAGE] ^= 1  # page 1001: data and tags
    set_granules(b.memory, 1001, 255, 1, (tagops.granule_tag(b.memory.tags, 1001 * 256 + 255) + 1) & 0xF)
    da, db = MemoryDigest(a.memory), MemoryDigest(b.memory)
    chunks = differing_chunks(da.data_crcs, da.tag_crcs, db.data_crcs, db.tag_crcs)
    assert chunks == [2, 3]
    v = Validation("digest")
    compare_detail(v, chunks, page_detail(a.memory, chunks), page_detail(b.memory, chunks), a.memory.npages)
    assert v.pages_checked == 0  # the caller counts pages checked
    assert (v.data_mismatches, v.tag_mismatches) == (2, 2)
    assert not v.ok
    m = v.first_mismatches
    assert m[0] == {"page": 600, "kind": "data"}
    assert m[1]["page"] == 1000 and m[1]["kind"] == "tags"
    assert m[1]["granules"] == "5-7,9"
    assert m[1]["source_tag"] == old and m[1]["destination_tag"] == (old + 7) & 0xF
    assert m[2] == {"page": 1001, "kind": "data"}
    assert m[3]["page"] == 1001 and m[3]["granules"] == "255"
    assert len(m) == 4
    assert v.summary() == "validation failed: 2 pages with different data, 2 pages with different tags"
    d = v.to_dict()
    assert d["ok"] is False and d["data_mismatches"] == 2 and d["tag_mismatches"] == 2


def test_compare_detail_of_identical_hosts(twins):
    a, b = twins
    chunks = list(range(chunk_count(NPAGES)))
    v = Validation("full")
    compare_detail(v, chunks, page_detail(a.memory, chunks), page_detail(b.memory, chunks), NPAGES)
    assert (v.data_mismatches, v.tag_mismatches, v.first_mismatches) == (0, 0, [])
    assert v.ok and v.summary() == "validation ok"


def test_compare_detail_counts_past_the_report_limit(twins):
    a, b = twins
    for p in range(0, 40, 2):
        b.memory.data[p * PAGE] ^= 0x55
    v = Validation("digest")
    compare_detail(v, [0], page_detail(a.memory, [0]), page_detail(b.memory, [0]), NPAGES)
    assert v.data_mismatches == 20
    assert len(v.first_mismatches) == MAX_REPORTED
    assert [m["page"] for m in v.first_mismatches] == list(range(0, 2 * MAX_REPORTED, 2))


def test_compare_detail_rejects_different_lengths(twins):
    a, _ = twins
    d = page_detail(a.memory, [0])
    with pytest.raises(ValueError, match="page detail lengths differ"):
        compare_detail(Validation("digest"), [0], d, d[:-1], NPAGES)


def test_lost_tags_are_caught(twins):
    # What `--strategy none` does to a tagged guest: data arrives, tags do not.
    a, b = twins
    b.memory.tagged[:] = bytes(NPAGES)
    data, tags, da, db = diff(a, b)
    assert data == [] and tags == list(range(da.nchunks))
    v = Validation("digest")
    compare_detail(v, tags, page_detail(a.memory, tags), page_detail(b.memory, tags), NPAGES)
    assert v.data_mismatches == 0
    assert v.tag_mismatches == NPAGES
    assert v.first_mismatches[0]["destination_tag"] == 0


@pytest.mark.parametrize(
    "granules, text",
    [
        ([0], "0"),
        ([0, 1, 2, 5], "0-2,5"),
        ([3, 4], "3-4"),
        ([1, 3, 5], "1,3,5"),
        (list(range(256)), "0-255"),
        ([0, 1, 2, 10, 11, 255], "0-2,10-11,255"),
    ],
)
def test_compact(granules, text):
    assert _compact(granules) == text


def test_validation_state_only_failure():
    v = Validation("digest", state_ok=False)
    assert not v.ok
    assert v.summary() == "validation failed: vCPU/device state differs (as loaded on the destination)"
    assert Validation("digest", state_ok=None).ok


def test_full_and_holey_chunks_read_in_place_or_by_pread_give_the_plain_crc(blank):
    # Chunk 0 fully populated (read through the mapping), chunk 1 with one
    # hole (read by pread): both CRCs must be the CRC of the chunk's bytes.
    vm, mem = blank.vm, blank.memory
    vm.guest_write(vm.page_to_ipa(0), bytes(range(256)) * (CHUNK_PAGES * PAGE // 256))
    vm.guest_write(vm.page_to_ipa(CHUNK_PAGES), b"\x5a" * ((CHUNK_PAGES - 1) * PAGE))
    assert mem.fully_populated(0, CHUNK_PAGES)
    assert not mem.fully_populated(CHUNK_PAGES, 2 * CHUNK_PAGES)
    assert not mem.fully_populated(2 * CHUNK_PAGES - 1, 2 * CHUNK_PAGES)
    d = MemoryDigest(mem, chunks=[0, 1])
    assert d.data_crcs[0] == zlib.crc32(mem.data[: CHUNK_PAGES * PAGE])
    assert d.data_crcs[1] == zlib.crc32(b"\x5a" * ((CHUNK_PAGES - 1) * PAGE) + bytes(PAGE))
    one_shot = MemoryDigest(mem, chunks=[0, 1], pieces=False)
    assert one_shot.data_crcs[:2] == d.data_crcs[:2]
    assert mem.populated_ranges() == [(0, 2 * CHUNK_PAGES - 1)]


def test_a_refresh_racing_set_data_keeps_the_newer_crc(blank):
    d = MemoryDigest(blank.memory, compute=False)
    real = d._read_chunk
    newer = array("I", range(1000, 1064))

    def racing(chunk, *args):  # a whole chunk lands and is recorded while this read is in flight
        d.set_data(chunk, newer, tags_changed=False)
        pieces, crc, next_data = real(chunk, *args)
        return array("I", (c ^ 1 for c in pieces)), crc ^ 1, next_data  # what the stale read saw

    d._read_chunk = racing
    d.refresh([2])
    assert d.data_crcs[2] == chunk_crc(newer)
    assert d.tags_stale[2] and not d.stale[2]  # its tag CRC may be stale too: read again
    d._read_chunk = real
    d.refresh()
    assert d.data_crcs[2] == chunk_crc(newer) and not d.pending()


def test_unread_chunks_can_be_left_for_the_end(blank):
    d = MemoryDigest(blank.memory, compute=False)
    assert d.pending() and not d.pending(unread=False)
    d.mark_stale(CHUNK_PAGES, CHUNK_PAGES + 1)
    assert d.pending_chunks(unread=False) == [1]
    d.refresh(d.pending_chunks(unread=False))
    assert not d.pending(unread=False) and d.pending()
    d.refresh()
    assert not d.pending()
    assert (d.data_crcs, d.tag_crcs) == (MemoryDigest(blank.memory).data_crcs, MemoryDigest(blank.memory).tag_crcs)


@pytest.mark.parametrize("frozen", [False, True])
def test_frozen_refresh_skips_holes_with_one_seek_and_agrees(blank, frozen):
    vm, mem = blank.vm, blank.memory
    vm.guest_write(vm.page_to_ipa(3), b"\x11" * PAGE)  # chunk 0, partly
    vm.guest_write(vm.page_to_ipa(5 * CHUNK_PAGES + 7), b"\x22" * PAGE)  # chunk 5
    seeks = []
    real = mem.next_data
    mem.next_data = lambda first: seeks.append(first) or real(first)
    d = MemoryDigest(mem, compute=False)
    d.refresh(frozen=frozen)
    mem.next_data = real
    fresh = MemoryDigest(mem)
    assert (d.data_crcs, d.tag_crcs) == (fresh.data_crcs, fresh.tag_crcs)
    if frozen:  # chunk 0 (data), 1 (holes up to chunk 5), 5, 6 (no data after): one seek each
        assert seeks == [0, CHUNK_PAGES, 5 * CHUNK_PAGES, 6 * CHUNK_PAGES]
    else:
        assert len(seeks) == d.nchunks


def test_frozen_refresh_of_prefaulted_ram_reads_it_all_once(blank):
    # Preallocated RAM is populated (as -mem-prealloc leaves it): its zeros
    # are read like any data, each chunk in one call, and agree with a fresh
    # digest.
    mem = blank.memory
    mem.prefault(0, mem.npages)
    blank.vm.guest_write(blank.vm.page_to_ipa(2 * CHUNK_PAGES), b"\x33" * (CHUNK_PAGES * PAGE))
    reads = []
    real = zlib.crc32
    d = MemoryDigest(mem, compute=False)
    import migrate.engine.digest as dg

    dg.crc32 = lambda b, c=0: reads.append(len(b)) or real(b, c)
    try:
        d.refresh(frozen=True)
    finally:
        dg.crc32 = real
    data_reads = [n for n in reads if n > TAGB * CHUNK_PAGES]
    assert len(data_reads) == d.nchunks and sum(data_reads) == mem.npages * PAGE  # frozen: no piece read again
    fresh = MemoryDigest(mem)
    assert (d.data_crcs, d.tag_crcs) == (fresh.data_crcs, fresh.tag_crcs)


def test_frozen_parallel_refresh_settles_runs_of_empty_chunks_in_bulk():
    # 40 chunks and 6 pages: data in chunks 3 and 20, tags (no data) in chunk 30,
    # a short last chunk; everything else was never populated.
    import asyncio

    host = make_host(ram=40 * CHUNK_PAGES * PAGE + 6 * PAGE, prepare=False)
    try:
        vm, mem = host.vm, host.memory
        vm.guest_write(vm.page_to_ipa(3 * CHUNK_PAGES + 7), b"\x11" * (3 * PAGE))
        vm.guest_write(vm.page_to_ipa(20 * CHUNK_PAGES), b"\x22" * PAGE)
        vm.guest_set_tags(vm.page_to_ipa(30 * CHUNK_PAGES + 1), 2 * PAGE, 9)
        assert mem.tagged.find(1, 30 * CHUNK_PAGES, 31 * CHUNK_PAGES) >= 0
        d = MemoryDigest(mem, compute=False)
        read = []
        real = d._read_chunk
        d._read_chunk = lambda c, *args: read.append(c) or real(c, *args)

        async def go():
            await asyncio.get_running_loop().run_in_executor(None, lambda: d.refresh_parallel(frozen=True))

        asyncio.run(go())
        assert sorted(read) == [3, 20, 30, 40]  # data, tags without data, the short chunk
        assert not d.pending()
        full = MemoryDigest(mem)
        assert d.chunk_crcs() == full.chunk_crcs()
        # chunks read frozen keep no pieces (nothing writes them again); settled ones keep zeros
        assert {3, 20, 30} <= {c for c in range(d.nchunks) if d.pieces_unknown[c]} <= set(read)
        for c in range(d.nchunks):
            if not d.pieces_unknown[c]:
                assert d.piece_crcs[c * 64 : (c + 1) * 64] == full.piece_crcs[c * 64 : (c + 1) * 64]
        assert mem.populated_ranges() == [
            (3 * CHUNK_PAGES + 7, 3 * CHUNK_PAGES + 10),
            (20 * CHUNK_PAGES, 20 * CHUNK_PAGES + 1),
            (30 * CHUNK_PAGES + 1, 30 * CHUNK_PAGES + 3),  # the tag store faulted these in
        ]  # nothing populated by reading
    finally:
        host.close()


def test_a_stale_mark_landing_while_refresh_takes_a_chunks_pieces_is_not_lost(twins):
    # A data channel marks a piece stale at the moment a background refresh
    # copies the chunk's stale pieces: the mark must survive (be read later).
    import threading

    a, _ = twins
    mem, first = a.memory, CHUNK_PAGES
    d = MemoryDigest(mem)
    mem.data[first * PAGE : (first + 1) * PAGE] = b"\x11" * PAGE
    d.mark_stale(first, first + 1)
    late = first + 5 * 4  # piece 5 of the same chunk
    marker = []

    class Hook(bytearray):
        def __getitem__(self, k):
            if isinstance(k, slice) and not marker:  # refresh copying the chunk's stale pieces

                def write_and_mark():
                    mem.data[late * PAGE : (late + 1) * PAGE] = b"\x22" * PAGE
                    d.mark_stale(late, late + 1)

                marker.append(threading.Thread(target=write_and_mark))
                marker[0].start()
                marker[0].join(0.2)  # unlocked, the mark would land right here
            return bytearray.__getitem__(self, k)

    d.piece_stale = Hook(d.piece_stale)
    d.refresh()
    marker[0].join()
    d.piece_stale = bytearray(d.piece_stale)
    assert d.pending_chunks() == [1]
    d.refresh()
    assert d.data_digest() == MemoryDigest(mem).data_digest()


def test_stale_pieces_of_a_chunk_with_holes_are_read_alone(blank, monkeypatch):
    vm, mem = blank.vm, blank.memory
    vm.guest_write(vm.page_to_ipa(10), b"\x44" * (20 * PAGE))  # chunk 0 has holes
    d = MemoryDigest(mem)
    vm.guest_write(vm.page_to_ipa(13), b"\x55" * PAGE)
    d.mark_stale(13, 14)
    sizes = []
    real = mem.read_into
    monkeypatch.setattr(mem, "read_into", lambda off, buf: sizes.append(len(buf)) or real(off, buf))
    d.refresh()
    assert sizes == [16384]  # the one stale piece, not the whole chunk
    assert d.data_digest() == MemoryDigest(mem).data_digest()
    assert mem.populated_ranges() == [(10, 30)]


def test_the_source_digest_keeper_works_while_the_event_loop_is_busy(twins):
    # A pass keeps the source's event loop busy (lane 0 builds and sends
    # inline); the keeper must bring the digest up to date meanwhile.
    import asyncio
    import time

    from migrate.engine.digest_keeper import DigestKeeper

    a, _ = twins
    d = MemoryDigest(a.memory, compute=False)

    async def go():
        keeper = DigestKeeper(d)
        t = time.monotonic()
        while d.pending() and time.monotonic() - t < 10:
            time.sleep(0.001)  # blocking: the event loop does not run
        await keeper.stop()

    asyncio.run(go())
    assert not d.pending()
    assert d.chunk_crcs() == MemoryDigest(a.memory).chunk_crcs()


def test_stopping_the_digest_keeper_waits_for_its_thread(twins):
    # A failed migration stops the keeper before the host closes the guest's
    # memory: stop() must return only once no refresh is in flight.
    import asyncio

    from migrate.engine.digest_keeper import DigestKeeper

    a, _ = twins
    d = MemoryDigest(a.memory, compute=False)

    async def go():
        keeper = DigestKeeper(d)
        await asyncio.sleep(0)  # it is working on a slice now or soon
        await keeper.stop()
        return keeper

    keeper = asyncio.run(go())
    assert not keeper._thread.is_alive()


def test_stopping_the_digest_keeper_leaves_the_rest_of_its_slice(twins):
    # The final digest waits for the keeper at the pause: it stops between
    # chunks, not after its whole slice; the chunks left stay stale.
    import asyncio
    import time

    from migrate.engine.digest_keeper import DigestKeeper

    a, _ = twins
    d = MemoryDigest(a.memory, compute=False)
    real = d._read_chunk
    d._read_chunk = lambda *args: time.sleep(0.02) or real(*args)  # each chunk takes 20 ms

    async def go():
        keeper = DigestKeeper(d)
        await asyncio.sleep(0.03)  # into its first slice
        t = time.monotonic()
        await keeper.stop()
        return time.monotonic() - t

    waited = asyncio.run(go())
    assert d.nchunks >= 8 and waited < 0.1
    assert d.pending()  # the rest of the slice, for the final digest
    del d._read_chunk
    d.refresh()
    assert d.chunk_crcs() == MemoryDigest(a.memory).chunk_crcs()


def test_a_failing_digest_keeper_leaves_every_chunk_to_be_read_again(twins, caplog):
    import asyncio

    from migrate.engine.digest_keeper import DigestKeeper

    a, _ = twins
    d = MemoryDigest(a.memory)
    d.mark_stale(0, 1)

    def broken(chunks=None, frozen=False, **kw):
        raise ValueError("operation forbidden on released memoryview object")

    d.refresh = broken

    async def go():
        keeper = DigestKeeper(d)
        keeper._thread.join(10)  # it fails on its first slice and ends
        assert not keeper._thread.is_alive()
        await keeper.stop()

    asyncio.run(go())
    del d.refresh
    assert d.pending_chunks() == list(range(d.nchunks))  # nothing trusted
    assert "validation digest keeper stopped: operation forbidden" in caplog.text
    d.refresh()
    assert d.chunk_crcs() == MemoryDigest(a.memory).chunk_crcs()


@needs_watch
def test_the_keeper_calls_the_guest_quiet_only_until_its_watch_finds_a_write(blank):
    import time

    from migrate.engine.digest_keeper import DigestKeeper

    mem = blank.memory
    watch = mem.watch_writes()
    keeper = DigestKeeper(MemoryDigest(mem, compute=False), watch)
    try:

        def until(predicate):
            deadline = time.monotonic() + 10
            while not predicate():
                assert time.monotonic() < deadline
                time.sleep(0.005)

        until(lambda: keeper.scans >= 2)
        assert keeper.quiet()
        mem.write(5 * PAGE, b"\x01" * PAGE)
        until(lambda: not keeper.quiet())
        assert keeper.pages_written >= 1
        mem.write(6 * PAGE, b"\x01")  # it stays not quiet
        time.sleep(0.1)
        assert not keeper.quiet()
    finally:
        keeper.stop_now()
        mem.unwatch_writes(watch)


def test_a_chunk_recorded_in_one_call_is_read_whole_once_written_then_by_pieces(twins, monkeypatch):
    # The destination records a landed whole chunk's CRC in one call, no
    # pieces; a page written there later makes the next refresh read the
    # whole chunk (its pieces kept from then on), and the one after that
    # only the stale piece -- the chunk CRC always the plain CRC of its bytes.
    a, _ = twins
    mem, c = a.memory, 2
    lo, hi = c * CHUNK_PAGES * PAGE, (c + 1) * CHUNK_PAGES * PAGE
    d = MemoryDigest(mem, compute=False)
    d.set_chunk_crc(c, zlib.crc32(mem.data[lo:hi]), tags="now")
    assert d.tag_crcs[c] == MemoryDigest(mem).tag_crcs[c] and not d.tags_stale[c]
    assert d.pieces_unknown[c] and not d.pending(unread=False)
    reads = []
    real = zlib.crc32
    monkeypatch.setattr("migrate.engine.digest.crc32", lambda b, *x: reads.append(len(b)) or real(b, *x))
    for page, expect in ((c * CHUNK_PAGES + 9, [16384] * 64), (c * CHUNK_PAGES + 200, [16384])):
        mem.data[page * PAGE] ^= 0xFF
        d.mark_stale(page, page + 1)
        assert d.stale_piece_bytes() == (CHUNK_PAGES * PAGE if d.pieces_unknown[c] else 16384)
        reads.clear()
        d.refresh([c])
        assert [n for n in reads if n == 16384] == expect
        assert d.data_crcs[c] == real(mem.data[lo:hi]) and not d.pieces_unknown[c]


@pytest.mark.parametrize("refreshed_between", [False, True])
def test_a_chunk_written_while_a_sender_read_it_stays_stale(twins, refreshed_between):
    # The source's bulk pass CRCs a chunk of guest RAM and hands the CRC to
    # the digest (set_chunk_crc with the mark count it took before reading).
    # A write marked in between -- by a write-watch scan in another thread,
    # perhaps followed by a refresh that took the stale flag -- may be newer
    # than that CRC: the chunk stays stale and the next refresh reads it
    # whole.  With no mark in between, the CRC stands and nothing is read.
    a, _ = twins
    mem, c = a.memory, 3
    lo, hi = c * CHUNK_PAGES * PAGE, (c + 1) * CHUNK_PAGES * PAGE
    d = MemoryDigest(mem, compute=False)
    clean, token = 5, d.marks_of(0, 8)
    d.set_chunk_crc(
        clean,
        zlib.crc32(mem.data[clean * CHUNK_PAGES * PAGE : (clean + 1) * CHUNK_PAGES * PAGE]),
        tags="later",
        marks=token[clean],
    )
    assert not d.stale[clean] and not d.unread[clean]

    crc_read = zlib.crc32(mem.data[lo:hi])  # the sender's read
    page = c * CHUNK_PAGES + 17
    mem.data[page * PAGE] ^= 0xFF  # the guest writes; a scan marks it
    d.mark_stale(page, page + 1)
    if refreshed_between:
        d.refresh([c])  # takes the stale flag (and reads the new bytes)
        assert not d.stale[c]
    d.set_chunk_crc(c, crc_read, tags="later", marks=token[c])
    assert d.stale[c] and d.pieces_unknown[c]
    d.refresh()
    assert d.data_crcs[c] == zlib.crc32(mem.data[lo:hi]) != crc_read
    assert d.data_crcs[clean] == MemoryDigest(mem).data_crcs[clean]


def test_parallel_refresh_takes_a_second_thread_only_for_whole_chunks(twins):
    """Stale pieces are short CRC calls that two threads would take turns on
    the GIL for: read in one thread.  Chunks read whole (a digest taken over
    frozen memory) are shared between two."""
    import threading

    a, _ = twins
    mem = a.memory
    nchunks = -(-mem.npages // CHUNK_PAGES)

    def threads_used(d):
        names, real = set(), d.refresh
        d.refresh = lambda *args, **kw: names.add(threading.current_thread().name) or real(*args, **kw)
        d.refresh_parallel(frozen=True)
        return len(names)

    kept = MemoryDigest(mem)  # pieces kept, every chunk read
    fresh = MemoryDigest(mem)
    for c in range(nchunks):
        kept.mark_stale(c * CHUNK_PAGES + 3, c * CHUNK_PAGES + 4)  # one piece of every chunk
    assert threads_used(kept) == 1
    assert (kept.data_crcs, kept.tag_crcs) == (fresh.data_crcs, fresh.tag_crcs)
    whole = MemoryDigest(mem, compute=False, pieces=False)  # as the source's re-read after the pause
    assert threads_used(whole) == 2
    assert (whole.data_crcs, whole.tag_crcs) == (fresh.data_crcs, fresh.tag_crcs)


def test_the_keeper_reads_no_chunk_the_bulk_pass_has_not_sent(twins):
    """Given the bulk pass's front, the keeper reads chunks never read only
    below it (the sender has just read them); chunks read before are kept
    up to date anywhere."""
    import time

    from migrate.engine.digest_keeper import DigestKeeper

    a, _ = twins
    d = MemoryDigest(a.memory, compute=False)
    front = {"chunk": 2}
    keeper = DigestKeeper(d, front=lambda: front["chunk"])
    t = time.monotonic()
    while d.unread[:2] != b"\0\0" and time.monotonic() - t < 10:
        time.sleep(0.005)
    time.sleep(0.05)
    assert d.unread[:2] == b"\0\0" and all(d.unread[2:])
    front["chunk"] = None  # the bulk pass is over
    t = time.monotonic()
    while d.pending() and time.monotonic() - t < 10:
        time.sleep(0.005)
    keeper.stop_now()
    assert d.chunk_crcs() == MemoryDigest(a.memory).chunk_crcs()


def test_with_a_write_watch_the_keeper_reads_only_what_the_guest_wrote(twins):
    """Kept from the host's write watch, the digest reads a chunk while the
    guest runs only once the guest wrote it (one nobody writes is read at
    the pause, in one call, on cores the bulk pass no longer holds); what
    the pause reads then makes it a fresh digest's."""
    import time

    from migrate.engine.digest_keeper import DigestKeeper

    a, _ = twins
    watch = a.watch_writes()
    try:
        d = MemoryDigest(a.memory, compute=False)
        keeper = DigestKeeper(d, watch)
        a.memory.write(3 * CHUNK_PAGES * PAGE + 5 * PAGE, b"\7" * PAGE)
        t = time.monotonic()
        while d.unread[3] and time.monotonic() - t < 10:
            time.sleep(0.005)
        keeper.stop_now()
        assert not d.unread[3] and d.unread.count(1) == d.nchunks - 1
        for x, y in watch.written():
            d.mark_stale(x, y)
    finally:
        a.unwatch_writes(watch)
    d.mark_all_tags_stale()
    d.refresh_parallel(frozen=True)
    assert d.chunk_crcs() == MemoryDigest(a.memory).chunk_crcs()


def test_a_flag_changed_without_a_tag_store_is_found_by_its_snapshot(twins):
    """A watch over the tag storage sees tag stores, not PG_mte_tagged: the
    digest keeps the flags its tag CRCs were read with and, asked at the
    pause, reads again the chunks whose flags changed since."""
    a, _ = twins
    d = MemoryDigest(a.memory, compute=False)
    d.remember_tagged()
    d.refresh()
    page = 2 * CHUNK_PAGES + 7
    a.memory.tags[page * 128 : (page + 1) * 128] = b"\x33" * 128
    a.memory.tagged[page] = 1 - a.memory.tagged[page]  # the effective tags change, no store marks it
    d.mark_tags_stale_where_flags_changed()
    assert d.pending_chunks() == [2]
    d.refresh()
    assert d.chunk_crcs() == MemoryDigest(a.memory).chunk_crcs()
