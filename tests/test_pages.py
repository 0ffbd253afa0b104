"""Page batches (migrate/pages.py): BatchBuilder on a source host, the wire
codec in between, BatchApplier on a destination host; memory and effective
tags compared with the validation digests (which read the simulated
kernel's storage directly, not through the strategy)."""

import os
import zlib

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from hosts import SimulatedHost
from migrate import strategies
from migrate.config.spec import MigrationConfig
from migrate.engine.bitmaps import run_views, unit_views
from migrate.engine.digest import MemoryDigest, effective_tags
from migrate.engine.pages import BatchApplier, BatchBuilder, BatchStats, _flag_zero_pages, runs, split_batches
from migrate.errors import ProtocolError
from migrate.protocol import frames as fr
from migrate.protocol.compression import LINK_SAMPLES, Compressor
from migrate.protocol.machine import Connection, DestState, dest_machine

PAGE = fr.PAGE_SIZE
TAGB = fr.PACKED_TAGS_PER_PAGE
RAM = 8 << 20
NPAGES = RAM // PAGE


# -- hosts ---------------------------------------------------------------------------
def make_host(prepare=False, seed=3, workload="allocator"):
    host = SimulatedHost(RAM, workload=workload, workload_params={"fill": 1.0}, rate=0, seed=seed)
    if prepare:
        host.prepare_guest()
    return host


@pytest.fixture
def pair():
    src, dst = make_host(prepare=True), make_host()
    yield src, dst
    src.close()
    dst.close()


@pytest.fixture
def blank_pair():
    src, dst = make_host(), make_host()
    yield src, dst
    src.close()
    dst.close()


def write(host, page, data):
    host.vm.guest_write(host.vm.page_to_ipa(page), data)


def set_tags(host, page, tag, npages=1):
    host.vm.guest_set_tags(host.vm.page_to_ipa(page), npages * PAGE, tag)


def page_bytes(host, page):
    return bytes(host.memory.data[page * PAGE : (page + 1) * PAGE])


def page_tags(host, page):
    return effective_tags(host.memory, page, page + 1)


def same_guest(a, b):
    da, db = MemoryDigest(a.memory), MemoryDigest(b.memory)
    return (da.data_digest() == db.data_digest(), da.tag_digest() == db.tag_digest())


class Link:
    """Source builder -> wire -> destination Connection (page bounds checked
    against HELLO) -> applier."""

    def __init__(self, src, dst, mode="none", strategy="tag-ioctl", batch_pages=256, link_cap=None, dst_strategy=None):
        cfg = MigrationConfig(strategy=strategy)
        self.src_strategy = strategies.get(strategy)(src, cfg)
        self.src_strategy.setup_source()
        self.dst_strategy = strategies.get(dst_strategy or strategy)(dst, cfg)
        self.dst_strategy.setup_dest()
        self.compressor = Compressor(mode, link_cap)
        self.builder = BatchBuilder(self.src_strategy, self.compressor, batch_pages)
        self.applier = BatchApplier(self.dst_strategy, dst.memory.npages)
        self.batch_pages = batch_pages
        self.conn = Connection(dest_machine())
        self.conn.machine.state = DestState.RECEIVING
        self.conn.ram_pages = dst.memory.npages
        self.sent = BatchStats()
        self.applied = BatchStats()
        self.frames = []

    def send(self, ranges, pass_no=0):
        """ranges: [(start, end)]"""
        for batch in split_batches(ranges, self.batch_pages):
            frame, stats = self.builder.build(pass_no, batch)
            self.frames.append(frame)
            self.sent.add(stats)
            wire = b"".join(bytes(b) for b in fr.encode(frame))
            (got,) = self.conn.feed(wire)
            self.applied.add(self.applier.apply(got))
        return self

    def send_one(self, ranges, pass_no=0):
        """One batch given as [(first, count)]; returns the built frame."""
        frame, stats = self.builder.build(pass_no, ranges)
        self.sent.add(stats)
        snapshot = fr.Pages(
            frame.pass_no,
            frame.ranges,
            frame.flags,
            bytes(frame.data),
            bytes(frame.tags),
            frame.data_compressed,
            frame.tags_compressed,
        )
        (got,) = self.conn.feed(b"".join(bytes(b) for b in fr.encode(frame)))
        self.applied.add(self.applier.apply(got))
        return snapshot


# -- helpers ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bits, value, expected",
    [
        (b"", 1, []),
        (b"\0\0", 1, []),
        (b"\1\1\0\1", 1, [(0, 2), (3, 4)]),
        (b"\1\1\0\1", 0, [(2, 3)]),
        (b"\0\1\1\1", 0, [(0, 1)]),
    ],
)
def test_runs(bits, value, expected):
    assert list(runs(bits, value)) == expected


@pytest.mark.parametrize(
    "ranges, n, expected",
    [
        ([(0, 10)], 4, [[(0, 4)], [(4, 4)], [(8, 2)]]),
        ([(0, 3), (10, 13)], 4, [[(0, 3), (10, 1)], [(11, 2)]]),
        ([(0, 4)], 4, [[(0, 4)]]),
        ([], 4, []),
        ([(5, 6), (7, 8), (9, 10)], 2, [[(5, 1), (7, 1)], [(9, 1)]]),
    ],
)
def test_split_batches(ranges, n, expected):
    got = list(split_batches(ranges, n))
    assert got == expected
    assert all(sum(c for _, c in b) <= n for b in got)


# -- whole-guest round trips ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["none", "1", "auto"])
def test_round_trip_whole_guest(pair, mode):
    src, dst = pair
    populated = src.memory.populated_ranges()
    assert sum(b - a for a, b in populated) == NPAGES  # fill 1.0
    assert same_guest(src, dst) == (False, False)
    link = Link(src, dst, mode).send(populated)
    assert same_guest(src, dst) == (True, True)
    assert MemoryDigest(src.memory).chunk_crcs() == MemoryDigest(dst.memory).chunk_crcs()
    s, a = link.sent, link.applied
    assert s.pages == a.pages == NPAGES
    assert (s.zero_pages, s.normal_pages, s.tagged_pages) == (a.zero_pages, a.normal_pages, a.tagged_pages)
    assert s.tagged_pages > 0 and s.normal_pages > 0
    assert s.data_bytes == a.data_bytes == s.normal_pages * PAGE
    assert s.tag_raw == a.tag_raw == s.tagged_pages * TAGB
    assert (s.data_wire, s.tag_wire) == (a.data_wire, a.tag_wire)
    if mode == "none":
        assert not any(f.data_compressed or f.tags_compressed for f in link.frames)
        assert s.data_wire == s.data_bytes and s.tag_wire == s.tag_raw
    if mode == "1":
        assert all(f.tags_compressed for f in link.frames if len(f.tags))
        assert any(f.data_compressed for f in link.frames)
        assert s.data_wire < s.data_bytes


@pytest.mark.parametrize("batch_pages", [1, 7, 1024])
def test_round_trip_odd_batch_sizes(pair, batch_pages):
    src, dst = pair
    Link(src, dst, "1", batch_pages=batch_pages).send([(0, 300), (301, 900), (1500, NPAGES)])
    # page 300 and 900..1500 were not sent: exactly their chunks differ
    ds, dd = MemoryDigest(src.memory), MemoryDigest(dst.memory)
    differ = [c for c in range(ds.nchunks) if ds.data_crcs[c] != dd.data_crcs[c] or ds.tag_crcs[c] != dd.tag_crcs[c]]
    assert differ == [1, 3, 4, 5]
    for p in (0, 299, 301, 899, 1500, NPAGES - 1):
        assert page_bytes(src, p) == page_bytes(dst, p)
        assert page_tags(src, p) == page_tags(dst, p)
    assert page_bytes(src, 300) != page_bytes(dst, 300)


@pytest.mark.parametrize("strategy", ["tag-ioctl", "prot-mte"])
def test_round_trip_with_mixed_pages(blank_pair, strategy):
    src, dst = blank_pair
    write(src, 0, b"\x11" * PAGE)
    set_tags(src, 0, 5)
    write(src, 1, bytes(PAGE))  # zero data, tagged (sanitised) with zero tags
    write(src, 2, b"\x22" * PAGE)  # data, zero tags
    set_tags(src, 3, 9)  # zero data, non-zero tags
    write(src, 4, b"\x44" * 100 + bytes(PAGE - 100))
    src.vm.guest_set_tags(src.vm.page_to_ipa(4) + 32, 48, 0xA)  # a few granules only
    link = Link(src, dst, "1", strategy=strategy).send([(0, 8)])
    assert same_guest(src, dst) == (True, True)
    for p in range(8):
        assert page_bytes(src, p) == page_bytes(dst, p)
        assert page_tags(src, p) == page_tags(dst, p)
    assert link.frames[0].flags == bytes(
        [
            fr.PAGE_TAGS,
            fr.PAGE_ZERO,
            0,
            fr.PAGE_ZERO | fr.PAGE_TAGS,
            fr.PAGE_TAGS,
            fr.PAGE_ZERO,
            fr.PAGE_ZERO,
            fr.PAGE_ZERO,
        ]
    )


# -- what goes on the wire ---------------------------------------------------------------------
def test_zero_pages_carry_no_payload(blank_pair):
    src, dst = blank_pair
    write(src, 10, b"\x01" * PAGE)
    write(src, 12, bytes(PAGE))  # written, but zero
    write(src, 13, b"\x03" * PAGE)
    link = Link(src, dst, "none")
    frame = link.send_one([(10, 6)])  # 10..15; 11, 14, 15 never populated
    assert frame.flags == bytes([0, fr.PAGE_ZERO, fr.PAGE_ZERO, 0, fr.PAGE_ZERO, fr.PAGE_ZERO])
    assert frame.data == b"\x01" * PAGE + b"\x03" * PAGE
    assert frame.tags == b""
    assert (link.sent.zero_pages, link.sent.normal_pages, link.sent.tagged_pages) == (4, 2, 0)
    assert link.sent.data_bytes == 2 * PAGE
    # an all-zero batch has no payload at all
    zframe = link.send_one([(100, 50)])
    assert zframe.flags == bytes([fr.PAGE_ZERO]) * 50
    assert zframe.data == b"" and zframe.tags == b""
    assert sum(len(b) for b in fr.encode(zframe)[1:]) == 0
    # Zero pages in a stretch with data land with it, in one write (the
    # source holds them populated); all-zero batches populate nothing.
    assert dst.memory.populated_ranges() == [(10, 16)]
    assert same_guest(src, dst) == (True, True)


def test_pages_with_all_zero_tags_carry_no_tags(blank_pair):
    src, dst = blank_pair
    for p in range(4):
        write(src, p, bytes([p + 1]) * PAGE)
    set_tags(src, 1, 7)
    set_tags(src, 3, 0)  # explicitly zero
    link = Link(src, dst, "none")
    frame = link.send_one([(0, 4)])
    assert frame.flags == bytes([0, fr.PAGE_TAGS, 0, 0])
    assert frame.tags == bytes([0x77]) * TAGB
    assert link.sent.tagged_pages == 1 and link.sent.tag_raw == TAGB
    assert page_tags(dst, 1) == bytes([0x77]) * TAGB
    assert same_guest(src, dst) == (True, True)


def test_untagged_guest_sends_no_tags_at_all(blank_pair):
    src, dst = blank_pair
    write(src, 0, b"\x09" * (16 * PAGE))
    link = Link(src, dst, "1")
    frame = link.send_one([(0, 16)])
    assert frame.tags == b"" and not frame.tags_compressed
    assert not any(f & fr.PAGE_TAGS for f in frame.flags)


def test_page_that_loses_its_tags_is_cleared_on_the_destination(blank_pair):
    src, dst = blank_pair
    write(src, 5, b"\x55" * (2 * PAGE))
    set_tags(src, 5, 3, npages=2)
    link = Link(src, dst, "none")
    link.send_one([(5, 2)])
    assert page_tags(dst, 5) == page_tags(dst, 6) == bytes([0x33]) * TAGB
    # the allocator frees page 5: tags back to zero, data unchanged
    set_tags(src, 5, 0)
    frame = link.send_one([(5, 2)], pass_no=1)
    assert frame.flags == bytes([0, fr.PAGE_TAGS])
    assert page_tags(dst, 5) == bytes(TAGB)
    assert page_tags(dst, 6) == bytes([0x33]) * TAGB
    assert same_guest(src, dst) == (True, True)


def test_zero_page_after_earlier_data_overwrites_it(blank_pair):
    src, dst = blank_pair
    write(src, 7, b"\x77" * (3 * PAGE))
    set_tags(src, 7, 2, npages=3)
    link = Link(src, dst, "1")
    link.send_one([(7, 3)])
    assert page_bytes(dst, 8) == b"\x77" * PAGE
    write(src, 8, bytes(PAGE))  # the guest zeroes page 8 (tags stay)
    set_tags(src, 9, 0)  # and frees page 9's tags
    write(src, 9, bytes(PAGE))  # and zeroes it too
    frame = link.send_one([(7, 3)], pass_no=1)
    assert frame.flags == bytes([fr.PAGE_TAGS, fr.PAGE_ZERO | fr.PAGE_TAGS, fr.PAGE_ZERO])
    assert page_bytes(dst, 8) == bytes(PAGE) and page_bytes(dst, 9) == bytes(PAGE)
    assert page_tags(dst, 8) == bytes([0x22]) * TAGB
    assert page_tags(dst, 9) == bytes(TAGB)
    assert page_bytes(dst, 7) == b"\x77" * PAGE
    assert same_guest(src, dst) == (True, True)


def test_dirty_pass_over_a_migrated_guest_converges(pair):
    src, dst = pair
    link = Link(src, dst, "auto")
    link.send(src.memory.populated_ranges())
    # the guest runs a while (allocator: retags and writes), then a dirty pass
    slot = src.vm.memslots[0].slot
    src.vm.enable_dirty_logging(slot)
    src.vcpus.run_steps(300)
    dirty = src.vm.get_dirty_log(slot).ranges()
    assert dirty
    assert same_guest(src, dst) != (True, True)
    link.send(dirty, pass_no=1)
    assert same_guest(src, dst) == (True, True)


# -- compression on the wire --------------------------------------------------------------
def test_incompressible_batch_goes_raw_and_tags_compressed_separately(blank_pair):
    import os

    src, dst = blank_pair
    noise = os.urandom(4 * PAGE)
    write(src, 0, noise)
    set_tags(src, 0, 4, npages=4)
    link = Link(src, dst, "3")
    frame = link.send_one([(0, 4)])
    assert not frame.data_compressed and frame.data == noise
    assert frame.tags_compressed and len(frame.tags) < 4 * TAGB
    assert same_guest(src, dst) == (True, True)


# -- hostile batches ----------------------------------------------------------------------
def _applier(dst, strategy="tag-ioctl"):
    s = strategies.get(strategy)(dst, MigrationConfig(strategy=strategy))
    s.setup_dest()
    return BatchApplier(s, dst.memory.npages)


def _through_wire(frame):
    (got,) = fr.FrameBuffer(require_crc=True).feed(b"".join(bytes(b) for b in fr.encode(frame)))
    return got


@pytest.mark.parametrize(
    "frame, match",
    [
        (
            fr.Pages(0, [(0, 2)], bytes(2), b"\1" * (2 * PAGE - 1)),
            f"PAGES page data is {2 * PAGE - 1} bytes, expected {2 * PAGE}",
        ),
        (
            fr.Pages(0, [(0, 2)], bytes(2), b"\1" * (3 * PAGE)),
            f"PAGES page data is {3 * PAGE} bytes, expected {2 * PAGE}",
        ),
        (
            fr.Pages(0, [(0, 2)], bytes([0, fr.PAGE_ZERO]), b"\1" * (2 * PAGE)),
            f"page data is {2 * PAGE} bytes, expected {PAGE}",
        ),
        (
            fr.Pages(0, [(0, 1)], bytes([fr.PAGE_TAGS]), b"\1" * PAGE, b"\2" * (TAGB + 1)),
            f"PAGES page tags is {TAGB + 1} bytes, expected {TAGB}",
        ),
        (fr.Pages(0, [(0, 1)], bytes([0]), b"\1" * PAGE, b"\2" * TAGB), f"page tags is {TAGB} bytes, expected 0"),
        (
            fr.Pages(0, [(0, 1)], bytes([0]), zstandard.compress(bytes(2 * PAGE)), b"", True),
            f"page data declares {2 * PAGE} bytes, expected {PAGE}",
        ),
        (
            fr.Pages(0, [(0, 2)], bytes(2), zstandard.compress(bytes(PAGE)), b"", True),
            f"page data declares {PAGE} bytes, expected {2 * PAGE}",
        ),
        (
            fr.Pages(
                0, [(0, 1)], bytes([fr.PAGE_TAGS]), b"\1" * PAGE, zstandard.compress(bytes(2 * TAGB)), False, True
            ),
            f"page tags declares {2 * TAGB} bytes, expected {TAGB}",
        ),
        (fr.Pages(0, [(0, 1)], bytes([0]), b"not zstd at all", b"", True), "page data is not a zstd frame"),
        (fr.Pages(0, [(0, 1)], bytes([0]), b"", b"", True), "page data is not a zstd frame"),
        (
            fr.Pages(
                0,
                [(0, 1)],
                bytes([0]),
                zstandard.ZstdCompressor(write_content_size=False).compress(bytes(PAGE)),
                b"",
                True,
            ),
            f"page data declares -1 bytes, expected {PAGE}",
        ),
    ],
)
def test_hostile_batches_are_protocol_errors(blank_pair, frame, match):
    _, dst = blank_pair
    applier = _applier(dst)
    with pytest.raises(ProtocolError, match=match):
        applier.apply(_through_wire(frame))
    # nothing was written before the batch was checked
    assert dst.memory.populated_ranges() == []
    assert dst.memory.tagged.count(1) == 0


def test_compressed_data_that_lies_about_its_content_is_refused(blank_pair):
    _, dst = blank_pair
    # A zstd frame whose header declares PAGE bytes but whose body holds
    # 2 * PAGE: the frame content size field is patched by hand.
    real = bytearray(zstandard.compress(b"\x5a" * (2 * PAGE)))
    assert real[:4] == b"\x28\xb5\x2f\xfd" and real[4] == 0x60  # single segment, 2-byte FCS
    assert int.from_bytes(real[5:7], "little") + 256 == 2 * PAGE
    real[5:7] = (PAGE - 256).to_bytes(2, "little")
    forged = bytes(real)
    assert zstandard.frame_content_size(forged) == PAGE
    applier = _applier(dst)
    with pytest.raises(ProtocolError, match="page data does not decompress"):
        applier.apply(_through_wire(fr.Pages(0, [(0, 1)], bytes([0]), forged, b"", True)))
    assert dst.memory.populated_ranges() == []


def test_tags_for_the_none_strategy_are_refused(blank_pair):
    _, dst = blank_pair
    applier = _applier(dst, "none")
    frame = fr.Pages(0, [(0, 1)], bytes([fr.PAGE_TAGS]), b"\1" * PAGE, b"\x12" * TAGB)
    with pytest.raises(ProtocolError, match="PAGES frame carries tags, but the negotiated strategy moves none"):
        applier.apply(_through_wire(frame))
    assert dst.memory.populated_ranges() == []
    # compressed tags too
    frame = fr.Pages(
        0, [(0, 1)], bytes([fr.PAGE_ZERO | fr.PAGE_TAGS]), b"", zstandard.compress(b"\x12" * TAGB), False, True
    )
    with pytest.raises(ProtocolError, match="carries tags"):
        applier.apply(_through_wire(frame))


def test_none_strategy_round_trip_loses_tags_only(pair):
    src, dst = pair
    link = Link(src, dst, "1", strategy="none")
    link.send(src.memory.populated_ranges())
    assert not any(len(f.tags) for f in link.frames)
    assert same_guest(src, dst) == (True, False)


def test_tags_only_batch_keeps_data_and_moves_tags(blank_pair):
    src, dst = blank_pair
    write(src, 20, b"\x20" * (3 * PAGE))
    set_tags(src, 20, 1, npages=3)
    link = Link(src, dst, "1")
    link.send_one([(20, 3)])
    # the allocator retags 20 and frees 21's tags; data untouched
    set_tags(src, 20, 0xE)
    set_tags(src, 21, 0)
    frame, stats = link.builder.build_tags_only(1, [(20, 3)])
    assert frame.flags == bytes([fr.PAGE_KEEP | fr.PAGE_TAGS, fr.PAGE_KEEP, fr.PAGE_KEEP | fr.PAGE_TAGS])
    assert len(frame.data) == 0
    assert (stats.pages, stats.zero_pages, stats.normal_pages, stats.tagged_pages) == (3, 0, 0, 2)
    (got,) = link.conn.feed(b"".join(bytes(b) for b in fr.encode(frame)))
    applied = link.applier.apply(got)
    assert (applied.zero_pages, applied.normal_pages, applied.tagged_pages) == (0, 0, 2)
    for p in (20, 21, 22):
        assert page_bytes(dst, p) == b"\x20" * PAGE
    assert page_tags(dst, 20) == bytes([0xEE]) * TAGB
    assert page_tags(dst, 21) == bytes(TAGB)
    assert page_tags(dst, 22) == bytes([0x11]) * TAGB
    assert same_guest(src, dst) == (True, True)


def test_keep_pages_carry_no_data(blank_pair):
    _, dst = blank_pair
    applier = _applier(dst)
    frame = fr.Pages(0, [(0, 1)], bytes([fr.PAGE_KEEP]), b"\1" * PAGE)
    with pytest.raises(ProtocolError, match=f"PAGES page data is {PAGE} bytes, expected 0"):
        applier.apply(_through_wire(frame))


# -- zero-page test and copies ---------------------------------------------------------
def test_pages_with_a_zero_first_byte_are_compared_in_full(blank_pair):
    src, dst = blank_pair
    tail_only = bytearray(PAGE)
    tail_only[-1] = 7  # first byte 0, last byte not: not a zero page
    write(src, 10, bytes(PAGE))  # populated, all zero
    write(src, 11, bytes(tail_only))
    write(src, 12, b"\x01" + bytes(PAGE - 1))
    write(src, 13, bytes(PAGE))
    link = Link(src, dst)
    frame = link.send_one([(10, 4)])
    assert list(frame.flags) == [fr.PAGE_ZERO, 0, 0, fr.PAGE_ZERO]
    assert frame.data == bytes(tail_only) + b"\x01" + bytes(PAGE - 1)
    assert page_bytes(dst, 11) == bytes(tail_only) and page_bytes(dst, 12) == page_bytes(src, 12)


@pytest.mark.parametrize("checked", [False, True])
def test_one_run_of_data_is_sent_from_guest_ram_unless_a_snapshot_is_needed(blank_pair, checked):
    src, dst = blank_pair
    write(src, 20, b"\x33" * (4 * PAGE))
    write(src, 30, b"\x44" * PAGE)
    link = Link(src, dst)
    link.builder.checked = checked
    frame, _ = link.builder.build(0, [(20, 4)])
    assert bytes(frame.data) == b"\x33" * (4 * PAGE)
    write(src, 21, b"\x55" * PAGE)  # the guest writes before the frame goes out
    live = bytes(frame.data)[PAGE : 2 * PAGE] == b"\x55" * PAGE
    assert live is not checked  # a view of guest RAM sees it; a snapshot does not
    # Two runs (a hole between them) are always gathered into one buffer.
    frame, _ = link.builder.build(0, [(20, 1), (30, 1)])
    assert bytes(frame.data) == page_bytes(src, 20) + b"\x44" * PAGE
    write(src, 30, b"\x66" * PAGE)
    assert bytes(frame.data)[PAGE:] == b"\x44" * PAGE


def test_interleaved_data_and_zero_pages_land_in_one_write_and_keep_pages_are_untouched(blank_pair):
    src, dst = blank_pair
    for p in range(40, 52):
        write(src, p, bytes(PAGE) if p % 3 == 1 else bytes([p]) * PAGE)
    link = Link(src, dst, "none")
    calls = []
    real = link.dst_strategy.write_data_parts
    link.dst_strategy.write_data_parts = lambda off, parts: (calls.append((off, len(parts))), real(off, parts))
    link.send_one([(40, 12)])
    assert calls == [(40 * PAGE, 8)]  # zero pages 40, 43, 46, 49 and the 4 data runs after them: one call
    assert all(page_bytes(dst, p) == page_bytes(src, p) for p in range(40, 52))
    # A tags-only (KEEP) page between data pages is not written over.
    write(dst, 45, b"\x77" * PAGE)
    frame = fr.Pages(1, [(44, 3)], bytes([0, fr.PAGE_KEEP, 0]), b"\x01" * PAGE + b"\x02" * PAGE, b"", False, False)
    (got,) = link.conn.feed(b"".join(bytes(b) for b in fr.encode(frame)))
    link.applier.apply(got)
    assert (page_bytes(dst, 44), page_bytes(dst, 45), page_bytes(dst, 46)) == (
        b"\x01" * PAGE,
        b"\x77" * PAGE,
        b"\x02" * PAGE,
    )


def test_write_parts_lands_more_buffers_than_iov_max(blank_pair):
    _, dst = blank_pair
    n = 1500  # more than IOV_MAX (1024): several pwritev calls
    parts = [bytes([i % 251]) * 1024 for i in range(n)]
    dst.memory.write_parts(3 * PAGE, parts)
    assert bytes(dst.memory.data[3 * PAGE : 3 * PAGE + n * 1024]) == b"".join(parts)
    dst.memory.write_parts(0, [b"ab", b"cd"])  # small: through the mapping
    assert bytes(dst.memory.data[:4]) == b"abcd"


# -- checksum "full": each PAGES frame checks its own pages and tags ----------------------
CHUNK = 256


def checked_link(src, dst, digest=True, batch_pages=256):
    link = Link(src, dst, "none", batch_pages=batch_pages)
    if digest:
        link.applier.digest = MemoryDigest(dst.memory, compute=False)
    return link


def wire_of(frame, flip_at=None):
    data = bytearray(b"".join(bytes(b) for b in fr.encode(frame)))
    if flip_at is not None:
        data[flip_at] ^= 0x20
    return bytes(data)


def test_checked_frame_of_a_whole_chunk_is_verified_on_the_landed_memory(blank_pair):
    src, dst = blank_pair
    write(src, CHUNK, bytes(range(256)) * (CHUNK * PAGE // 256))
    write(src, CHUNK + 5, bytes(PAGE))  # a zero page inside
    set_tags(src, CHUNK + 9, 3)
    link = checked_link(src, dst)
    frame, _ = link.builder.build(0, [(CHUNK, CHUNK)])
    assert frame.self_checked and wire_of(frame)[3] == fr.FLAG_CRC | fr.FLAG_CRC_META_ONLY
    (got,) = link.conn.feed(wire_of(frame))
    link.applier.apply(got)
    digest = link.applier.digest
    fresh = MemoryDigest(dst.memory, chunks=[1])
    assert digest.data_crcs[1] == fresh.data_crcs[1] == frame.dcrc
    # data and tags both read as the chunk landed (page 9's tags among them)
    assert not digest.stale[1] and not digest.tags_stale[1] and not digest.pending(unread=False)
    assert digest.tag_crcs[1] == fresh.tag_crcs[1]
    assert same_guest(src, dst) == (True, True)


def test_a_checked_whole_chunk_goes_out_gathered_from_its_snapshot(blank_pair, monkeypatch):
    # Without a source digest too: one CRC call over the snapshot, the data
    # pages sent from it as they lie (a Gather, one part a run), and the
    # destination lands the chunk exactly.
    import zlib

    from migrate.engine import pages

    src, dst = blank_pair
    for p in range(CHUNK):
        if p % 4:
            write(src, p, bytes([p % 251 + 1]) * PAGE)
    link = checked_link(src, dst)
    for _ in range(LINK_SAMPLES):  # sends that waited: a measured link
        link.compressor.observe_link(1 << 20, (1 << 20) / 1e9)  # slower than landing: zero pages go as flags
    calls = []
    monkeypatch.setattr(pages, "crc32", lambda b, *x: calls.append(len(b)) or zlib.crc32(b, *x))
    frame, stats = link.builder.build(0, [(0, CHUNK)])
    monkeypatch.undo()
    assert calls == [CHUNK * PAGE, 0]  # the chunk, then the (empty) tags payload
    assert isinstance(frame.data, fr.Gather) and len(frame.data.parts) == CHUNK // 4
    assert len(frame.data) == stats.data_bytes == (CHUNK - CHUNK // 4) * PAGE
    chunk_bytes = bytes(src.memory.data[: CHUNK * PAGE])
    assert frame.dcrc == zlib.crc32(chunk_bytes)
    assert bytes(frame.data) == b"".join(chunk_bytes[p * PAGE : (p + 1) * PAGE] for p in range(CHUNK) if p % 4)
    (got,) = link.conn.feed(wire_of(frame))
    link.applier.apply(got)
    assert bytes(dst.memory.data[: CHUNK * PAGE]) == chunk_bytes


def test_a_landing_whole_chunk_is_never_seen_half_recorded(blank_pair):
    # Its pages and tags land without a stale mark each (a background refresh
    # on another thread would read the chunk meanwhile); the chunk is recorded
    # whole right after, and a later write marks it as usual.
    src, dst = blank_pair
    write(src, CHUNK, bytes(range(256)) * (CHUNK * PAGE // 256))
    write(src, CHUNK + 5, bytes(PAGE))
    set_tags(src, CHUNK + 9, 3)
    link = checked_link(src, dst)
    digest = link.applier.digest
    marks = []
    link.applier.on_write = lambda a, b: marks.append((a, b)) or digest.mark_stale(a, b)
    frame, _ = link.builder.build(0, [(CHUNK, CHUNK)])
    (got,) = link.conn.feed(wire_of(frame))
    link.applier.apply(got)
    assert marks == [] and not digest.pending(unread=False)
    fresh = MemoryDigest(dst.memory, chunks=[1])
    assert (digest.data_crcs[1], digest.tag_crcs[1]) == (fresh.data_crcs[1], fresh.tag_crcs[1])
    link.send([(CHUNK + 7, CHUNK + 8)], pass_no=1)  # one page of it again: marked
    assert marks and digest.stale[1]
    assert digest.stale_piece_bytes() == 16384  # its pieces were kept as it landed: one piece to read again


@pytest.mark.parametrize("whole_chunk", [True, False])
def test_a_flipped_data_byte_is_caught_at_its_frame(blank_pair, whole_chunk):
    src, dst = blank_pair
    write(src, 0, b"\x42" * (CHUNK * PAGE))
    link = checked_link(src, dst)
    link.builder.guest_runs = False  # a paused guest: nothing can tear a frame
    ranges = [(0, CHUNK)] if whole_chunk else [(0, 10)]
    frame, _ = link.builder.build(0, ranges)
    good = wire_of(frame)
    bad = wire_of(frame, flip_at=len(good) - len(frame.tags) - 100)  # inside the data
    (got,) = link.conn.feed(bad)  # header and meta are intact: the frame decodes
    where = "on the landed pages 0..255" if whole_chunk else "data failed its checksum: the stream is corrupt"
    with pytest.raises(ProtocolError, match=where):
        link.applier.apply(got)
    if not whole_chunk:  # checked before anything landed
        assert dst.memory.populated_ranges() == []


def test_a_whole_chunk_goes_from_guest_ram_while_the_guest_runs(blank_pair):
    # No snapshot: a page the guest writes after the CRC and before the send
    # tears the frame; the destination lands it and records it as torn.
    src, dst = blank_pair
    write(src, 0, b"\x42" * (CHUNK * PAGE))
    link = checked_link(src, dst)
    frame, _ = link.builder.build(0, [(0, CHUNK)])
    assert frame.live and src.memory.is_view_of(frame.data, 0)
    write(src, 7, b"\x43" * PAGE)  # the guest, between the CRC and the send
    (got,) = link.conn.feed(wire_of(frame))
    assert got.live
    link.applier.apply(got)
    assert link.applier.torn == [(0, CHUNK)]
    assert bytes(dst.memory.data[7 * PAGE : 8 * PAGE]) == b"\x43" * PAGE  # landed as sent
    fresh = MemoryDigest(dst.memory, chunks=[0])
    assert link.applier.digest.data_crcs[0] == fresh.data_crcs[0]  # the digest holds what landed


def test_a_frame_sent_whole_is_torn_only_if_live(blank_pair):
    # Unscanned through the plain (not landed) path too: a live frame that
    # fails its CRC is recorded, a frame of a paused guest is refused.
    src, dst = blank_pair
    write(src, 0, b"\x42" * (CHUNK * PAGE))
    for live in (True, False):
        link = checked_link(src, dst, digest=False)
        link.builder.guest_runs = live
        frame, _ = link.builder.build(0, [(0, CHUNK)])
        assert frame.live is live
        bad = wire_of(frame, flip_at=len(wire_of(frame)) - len(frame.tags) - 100)
        (got,) = link.conn.feed(bad)
        if live:
            link.applier.apply(got)
            assert link.applier.torn == [(0, CHUNK)]
        else:
            with pytest.raises(ProtocolError, match="data failed its checksum"):
                link.applier.apply(got)


def test_torn_frames_are_bounded_by_the_chunks_of_ram(blank_pair):
    # A pass sends each chunk once: a peer that sends more torn frames than
    # that before APPLIED cannot grow the list without end.
    src, dst = blank_pair
    write(src, 0, b"\x42" * (CHUNK * PAGE))
    link = checked_link(src, dst, digest=False)
    frame, _ = link.builder.build(0, [(0, CHUNK)])
    bad = wire_of(frame, flip_at=len(wire_of(frame)) - len(frame.tags) - 100)
    limit = -(-dst.memory.npages // CHUNK)
    for _ in range(limit):
        (got,) = link.conn.feed(bad)
        link.applier.apply(got)
    assert len(link.applier.torn) == limit
    (got,) = link.conn.feed(bad)
    with pytest.raises(ProtocolError, match=f"more torn PAGES frames in one pass than RAM has chunks \\({limit}\\)"):
        link.applier.apply(got)


def test_with_a_mac_the_running_guests_chunks_are_snapshot(blank_pair):
    src, dst = blank_pair
    write(src, 0, b"\x42" * (CHUNK * PAGE))
    link = checked_link(src, dst)
    link.builder.snapshot_running = True
    frame, _ = link.builder.build(0, [(0, CHUNK)])
    assert not frame.live and not src.memory.is_view_of(frame.data, 0)
    write(src, 7, b"\x43" * PAGE)  # after the snapshot: not in this frame
    (got,) = link.conn.feed(wire_of(frame))
    link.applier.apply(got)
    assert link.applier.torn == []
    assert bytes(dst.memory.data[7 * PAGE : 8 * PAGE]) == b"\x42" * PAGE


def test_live_needs_a_data_crc():
    frame = fr.Pages(0, [(0, 1)], bytes(1), bytes(PAGE), b"", dcrc=zlib.crc32(bytes(PAGE)), tcrc=0, live=True)
    meta = frame.meta()
    assert meta["lv"] is True
    assert fr.Pages.fields_of(meta, PAGE)[0]["live"] is True
    assert fr.Pages.fields_of({k: v for k, v in meta.items() if k != "lv"}, PAGE)[0]["live"] is False
    del meta["dk"], meta["tk"]
    with pytest.raises(ProtocolError, match="marked live but carries no data CRC"):
        fr.Pages.fields_of(meta, PAGE)


def test_quiet_is_a_hint_sent_only_when_true():
    frame = fr.Pages(0, [(0, 1)], bytes(1), bytes(PAGE), b"", quiet=True)
    meta = frame.meta()
    assert meta["qt"] is True
    assert fr.Pages.fields_of(meta, PAGE)[0]["quiet"] is True
    assert "qt" not in fr.Pages(0, [(0, 1)], bytes(1), bytes(PAGE), b"").meta()
    assert fr.Pages.fields_of({k: v for k, v in meta.items() if k != "qt"}, PAGE)[0]["quiet"] is False
    with pytest.raises(ProtocolError, match="qt"):
        fr.Pages.fields_of({**meta, "qt": 1}, PAGE)


def test_applied_carries_the_torn_ranges_bounded():
    frame = fr.Applied(3, [(0, 1024), (4096, 1024)])
    assert fr.Applied.from_meta(frame.meta(), b"") == frame
    assert "r" not in fr.Applied(3).meta() and fr.Applied.from_meta({"p": 3}, b"").torn == []
    many = fr.Applied(3, [(i * 2, 1) for i in range(fr.Applied.MAX_TORN + 1)]).meta()
    with pytest.raises(ProtocolError, match="at most 2048"):
        fr.Applied.from_meta(many, b"")


def test_a_flipped_tag_byte_is_caught_at_its_frame(pair):
    src, dst = pair
    link = checked_link(src, dst)
    frame, _ = link.builder.build(0, [(0, CHUNK)])
    assert len(frame.tags) > 0
    with pytest.raises(ProtocolError, match="PAGES frame tags failed their checksum"):
        link.conn.feed(wire_of(frame, flip_at=len(wire_of(frame)) - 1))


def test_pages_stored_in_the_wrong_place_fail_the_landed_check(blank_pair):
    src, dst = blank_pair
    write(src, 0, bytes(range(256)) * (CHUNK * PAGE // 256))
    link = checked_link(src, dst)
    link.builder.guest_runs = False  # paused: a bad CRC cannot be a torn read
    real = link.dst_strategy.write_data
    link.dst_strategy.write_data = lambda off, data, populated=False: real(
        off + PAGE, data[: len(data) - PAGE]
    )  # off by a page
    frame, _ = link.builder.build(0, [(0, CHUNK)])
    (got,) = link.conn.feed(wire_of(frame))
    with pytest.raises(ProtocolError, match="stored in the wrong place"):
        link.applier.apply(got)


def test_full_receiver_refuses_unchecked_pages_with_meta_only_crc(blank_pair):
    src, dst = blank_pair
    write(src, 0, b"\x01" * PAGE)
    link = checked_link(src, dst)
    link.builder.checked = False
    frame, _ = link.builder.build(0, [(0, 1)])
    assert not frame.self_checked
    with pytest.raises(ProtocolError, match="requires --checksum full"):
        link.conn.feed(b"".join(bytes(b) for b in fr.encode(frame, "meta")))


def test_source_digests_a_whole_chunk_from_its_snapshot_only_when_it_is_kernel_memory(blank_pair):
    src, dst = blank_pair
    write(src, 0, bytes(range(256)) * (2 * CHUNK * PAGE // 256))
    link = checked_link(src, dst, digest=False)
    digest = link.builder.digest = MemoryDigest(src.memory, compute=False)
    link.builder.build(0, [(0, CHUNK)])
    assert not digest.stale[0] and not digest.unread[0]
    assert digest.data_crcs[0] == MemoryDigest(src.memory, chunks=[0]).data_crcs[0]
    # A strategy that hands back a copy is not trusted as a read of kernel memory.
    real = link.src_strategy.read_data
    link.src_strategy.read_data = lambda first, n: memoryview(bytes(real(first, n)))
    link.builder.build(0, [(CHUNK, CHUNK)])
    assert digest.unread[1]
    # Nor is part of a chunk.
    link.src_strategy.read_data = real
    link.builder.build(0, [(2 * CHUNK, 10)])
    assert digest.unread[2]


# -- scattered pages (a dirty pass) ----------------------------------------------------------
def test_scattered_pages_over_landed_ones_are_stored_in_memory_not_through_the_file(blank_pair, monkeypatch):
    """A dirty pass's pages are ranges of a page or a few over pages the
    destination already holds: they land with a memcpy, no pwrite each, and
    still land exactly (and only) where they belong."""
    import os

    src, dst = blank_pair
    write(src, 0, bytes(range(256)) * (64 * PAGE // 256))
    link = Link(src, dst, "none")
    link.send([(0, 64)])
    scattered = [3, 4, 9, 30, 31, 32, 50]
    for p in scattered:
        write(src, p, bytes([p]) * PAGE)
    set_tags(src, 9, 7)
    calls = []
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda *a: calls.append(a) or real_pwrite(*a))
    link.send([(3, 5), (9, 10), (30, 33), (50, 51)], pass_no=1)
    assert calls == []
    assert same_guest(src, dst) == (True, True)
    assert page_bytes(dst, 31) == bytes([31]) * PAGE and page_tags(dst, 9) == page_tags(src, 9)


def test_scattered_pages_into_never_written_memory_still_go_through_the_file(blank_pair, monkeypatch):
    import os

    src, dst = blank_pair
    for p in (5, 70):
        write(src, p, bytes([p]) * PAGE)
    link = Link(src, dst, "none")
    calls = []
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda *a: calls.append(a) or real_pwrite(*a))
    link.send([(5, 6), (70, 71)])
    assert len(calls) == 2  # allocated by the write, not by a page fault each
    assert same_guest(src, dst) == (True, True)


@pytest.mark.parametrize(
    "pages, calls",
    [
        ([1, 3, 8, 13], 1),  # gaps of 1, 4 and 4 pages: fetched with the pages around them
        ([1, 7, 20], 3),  # gaps of 5 and 12: a call each
        ([0, 1, 2, 100], 2),
    ],
)
def test_tag_fetches_bridge_gaps_of_up_to_four_pages(pair, pages, calls):
    src, _ = pair
    s = strategies.get("tag-ioctl")(src, MigrationConfig())
    ranges = [(p, 1) for p in pages]
    before = src.vm.counters.get("syscalls.kvm_arm_mte_copy_tags")
    packed = s.read_tags(ranges)
    assert src.vm.counters.get("syscalls.kvm_arm_mte_copy_tags") - before == calls
    assert packed == b"".join(page_tags(src, p) for p in pages)


def test_whole_chunk_with_zero_pages_is_snapshotted_and_crcd_in_one_pass(blank_pair, monkeypatch):
    """Every fourth page zero (the mixed image): the frame flags them and
    leaves them out of its data, its data CRC covers the chunk as it must
    land, computed in one call over the snapshot, which is also the source
    digest's CRC of the chunk, kept with the CRCs of its 16 KiB pieces
    (taken from the snapshot in cache) -- and the destination lands it
    exactly."""
    import zlib

    from migrate.engine import digest as digest_mod
    from migrate.engine import pages

    src, dst = blank_pair
    for p in range(CHUNK):
        if p % 4:
            write(src, p, bytes([p % 251 + 1]) * PAGE)
    link = checked_link(src, dst, digest=False)
    for _ in range(LINK_SAMPLES):  # sends that waited: a measured link
        link.compressor.observe_link(1 << 20, (1 << 20) / 1e9)  # slower than landing: zero pages go as flags
    digest = link.builder.digest = MemoryDigest(src.memory, compute=False)
    calls = []

    def counting(*a):
        calls.append(memoryview(a[0]).nbytes)
        return zlib.crc32(*a)

    monkeypatch.setattr(pages, "crc32", counting)
    monkeypatch.setattr(digest_mod, "crc32", counting)
    frame, stats = link.builder.build(0, [(0, CHUNK)])
    # one call covers the chunk, 64 its pieces, and one the (empty) tags payload
    assert sorted(calls) == [0] + [16384] * 64 + [CHUNK * PAGE]
    monkeypatch.undo()
    assert [p for p in range(CHUNK) if frame.flags[p] & fr.PAGE_ZERO] == list(range(0, CHUNK, 4))
    assert len(frame.data) == stats.data_bytes == (CHUNK - CHUNK // 4) * PAGE
    chunk_bytes = bytes(src.memory.data[: CHUNK * PAGE])
    assert frame.dcrc == zlib.crc32(chunk_bytes) == digest.data_crcs[0]
    assert not digest.stale[0] and not digest.unread[0] and not digest.pieces_unknown[0]
    assert list(digest.piece_crcs[:64]) == [
        zlib.crc32(chunk_bytes[o : o + 16384]) for o in range(0, CHUNK * PAGE, 16384)
    ]
    (got,) = link.conn.feed(wire_of(frame))
    link.applier.apply(got)
    assert bytes(dst.memory.data[: CHUNK * PAGE]) == chunk_bytes


@pytest.mark.parametrize(
    "zero_every, link_rate, whole",
    [
        (4, 3e9, True),  # the mixed image over loopback: the chunk goes whole
        (4, 1e9, False),  # a link slower than the destination lands pages: zero pages stay flags
        (4, None, True),  # no link measured yet: taken as fast until it is
        (2, 3e9, True),  # half zero pages: still whole
        (-4, 3e9, False),  # three zero pages in four: more than half, so they are sought and flagged
    ],
)
def test_over_a_fast_link_a_chunk_with_few_zero_pages_goes_whole_unscanned(blank_pair, zero_every, link_rate, whole):
    src, dst = blank_pair
    if zero_every < 0:  # one page in -zero_every holds data
        zeros = [p for p in range(CHUNK) if p % -zero_every]
    else:
        zeros = [p for p in range(CHUNK) if p % zero_every == 0]
    for p in range(CHUNK):
        if p not in zeros:
            write(src, p, bytes([p % 251 + 1]) * PAGE)
    write(src, 0, bytes(PAGE)) if 0 in zeros else None  # populated all the same, so the chunk is read
    link = checked_link(src, dst)
    link.compressor.mode = "auto"
    link.compressor._measure(bytes(64 << 10))  # an estimate, as auto takes before deciding
    if link_rate is not None:
        for _ in range(LINK_SAMPLES):  # sends that waited: a measured link
            link.compressor.observe_link(1 << 20, (1 << 20) / link_rate)
    frame, stats = link.builder.build(0, [(0, CHUNK)])
    if whole:
        assert frame.flags == bytes(CHUNK) and len(frame.data) == CHUNK * PAGE  # every page as data
        assert stats.zero_pages == 0 and stats.unscanned_pages == CHUNK and stats.normal_pages == CHUNK
        assert link.applier.placement(
            {
                "ranges": frame.ranges,
                "data_compressed": False,
                "dcrc": frame.dcrc,
                "flags": frame.flags,
                "quiet": False,
            },
            len(frame.data),
        )[:3] == (dst.memory.data_fd, 0, dst.memory.write_lock)  # spliced whole on a real link
    else:
        assert stats.zero_pages == len(zeros) and stats.unscanned_pages == 0
        assert frame.flags.count(fr.PAGE_ZERO) == len(zeros)
    (got,) = link.conn.feed(wire_of(frame))
    link.applier.apply(got)
    assert same_guest(src, dst) == (True, True)


STRIPE = 4 * CHUNK


@pytest.mark.parametrize("landed", ["spliced", "spliced, never told", "copied"])
def test_a_frame_of_four_whole_chunks_is_checked_and_recorded_chunk_by_chunk(blank_pair, landed):
    src, dst = blank_pair
    for p in range(STRIPE):
        write(src, p, bytes([p % 251 + 1]) * PAGE)
    set_tags(src, CHUNK + 3, 5)
    link = checked_link(src, dst, batch_pages=STRIPE)
    frame, stats = link.builder.build(0, [(0, STRIPE)])
    assert frame.ranges == [(0, STRIPE)] and frame.self_checked and stats.normal_pages == STRIPE
    assert frame.dcrc == zlib.crc32(bytes(src.memory.data[: STRIPE * PAGE]))  # the frame's CRC covers all four
    (got,) = link.conn.feed(wire_of(frame))
    if landed != "copied":  # as the transport does: the data spliced into place, then the frame applied
        fields = {"ranges": got.ranges, "data_compressed": False, "dcrc": got.dcrc, "flags": got.flags, "quiet": False}
        fd, offset, _, told, _ = link.applier.placement(fields, len(got.data))
        data = bytes(got.data)
        for at in (3 * PAGE, CHUNK * PAGE + 5, 2 * CHUNK * PAGE, len(data)):  # in writes of odd sizes
            os.pwrite(fd, data[:at], offset)
            if landed == "spliced":
                told(at)  # each chunk CRC'd once its last byte is there
        got.landed, got.data = True, None
    link.applier.apply(got)
    digest, fresh = link.applier.digest, MemoryDigest(dst.memory, chunks=[0, 1, 2, 3])
    pieces = MemoryDigest(dst.memory, chunks=[0, 1, 2, 3], pieces=True)
    for c in range(4):  # each chunk's own digest CRC and pieces, recorded as it landed
        assert digest.data_crcs[c] == fresh.data_crcs[c] and not digest.stale[c]
        assert digest.tag_crcs[c] == fresh.tag_crcs[c]
        per = digest.piece_crcs[c * 64 : (c + 1) * 64]
        assert per == pieces.piece_crcs[c * 64 : (c + 1) * 64] and len(set(per)) > 1
    assert same_guest(src, dst) == (True, True)


def test_a_flipped_byte_in_the_third_chunk_of_a_frame_is_caught(blank_pair):
    src, dst = blank_pair
    write(src, 0, b"\x42" * (STRIPE * PAGE))
    link = checked_link(src, dst, batch_pages=STRIPE)
    link.builder.guest_runs = False  # paused: a bad CRC cannot be a torn read
    frame, _ = link.builder.build(0, [(0, STRIPE)])
    good = wire_of(frame)
    at = len(good) - len(frame.tags) - len(frame.data) + 2 * CHUNK * PAGE + 77  # inside chunk 2
    (got,) = link.conn.feed(wire_of(frame, flip_at=at))
    with pytest.raises(ProtocolError, match=f"on the landed pages 0..{STRIPE - 1}"):
        link.applier.apply(got)


def test_a_frame_may_end_with_rams_short_last_chunk():
    src = SimulatedHost(RAM + 12 * PAGE, workload="allocator", workload_params={"fill": 1.0}, rate=0, seed=3)
    dst = SimulatedHost(RAM + 12 * PAGE, workload="idle", workload_params={"fill": 0}, rate=0)
    try:
        src.prepare_guest()
        link = checked_link(src, dst, batch_pages=STRIPE)
        first = NPAGES - 3 * CHUNK
        frame, _ = link.builder.build(0, [(first, 3 * CHUNK + 12)])  # three chunks and the short last one
        (got,) = link.conn.feed(wire_of(frame))
        link.applier.apply(got)
        fresh = MemoryDigest(dst.memory)
        assert [link.applier.digest.data_crcs[c] for c in range(5, 9)] == [fresh.data_crcs[c] for c in range(5, 9)]
        assert bytes(dst.memory.data[first * PAGE :]) == bytes(src.memory.data[first * PAGE :])
    finally:
        src.close()
        dst.close()


def test_channels_carry_4_mib_stripes():
    from migrate.engine.lanes import STRIPE_PAGES, partition

    assert STRIPE_PAGES == STRIPE == fr.MAX_BATCH_PAGES
    lanes = partition([(0, 3 * STRIPE + 5)], 2)
    assert lanes == [[(0, STRIPE), (2 * STRIPE, 3 * STRIPE)], [(STRIPE, 2 * STRIPE), (3 * STRIPE, 3 * STRIPE + 5)]]
    assert list(split_batches(lanes[0], STRIPE)) == [[(0, STRIPE)], [(2 * STRIPE, STRIPE)]]  # one frame a stripe


def test_the_source_digests_each_chunk_of_a_frame_from_its_snapshot(blank_pair):
    src, dst = blank_pair
    for p in range(STRIPE):
        write(src, p, bytes([p % 241 + 1]) * PAGE)
    link = checked_link(src, dst, digest=False, batch_pages=STRIPE)
    digest = link.builder.digest = MemoryDigest(src.memory, compute=False)
    link.builder.build(0, [(0, STRIPE)])
    fresh = MemoryDigest(src.memory, chunks=[0, 1, 2, 3], pieces=True)
    for c in range(4):
        assert not digest.stale[c] and not digest.unread[c]
        assert digest.data_crcs[c] == fresh.data_crcs[c]
        assert digest.piece_crcs[c * 64 : (c + 1) * 64] == fresh.piece_crcs[c * 64 : (c + 1) * 64]
    assert len(set(digest.data_crcs[:4])) == 4


def test_a_zero_chunk_in_a_frame_is_still_sought_over_a_fast_link(blank_pair):
    # The few-zero-pages rule holds chunk by chunk: a 4 MiB frame with one
    # all-zero chunk flags that chunk's pages zero, not sends them as data.
    src, dst = blank_pair
    for p in list(range(CHUNK)) + list(range(2 * CHUNK, STRIPE)):
        write(src, p, bytes([p % 251 + 1]) * PAGE)
    write(src, CHUNK, bytes(PAGE))  # populated, all zero
    link = checked_link(src, dst, batch_pages=STRIPE)
    link.compressor.mode = "auto"
    link.compressor._measure(bytes(64 << 10))
    for _ in range(LINK_SAMPLES):  # sends that waited: a measured link
        link.compressor.observe_link(1 << 20, (1 << 20) / 3e9)
    frame, stats = link.builder.build(0, [(0, STRIPE)])
    assert stats.zero_pages == CHUNK and stats.unscanned_pages == 0
    (got,) = link.conn.feed(wire_of(frame))
    link.applier.apply(got)
    assert same_guest(src, dst) == (True, True)


@pytest.mark.parametrize(
    "ranges, expected",
    [
        # a channel's share that starts inside a chunk: the head alone, then whole chunks
        ([(256, 1024), (2048, 3072)], [[(256, 768)], [(2048, 1024)]]),
        ([(100, 2000)], [[(100, 156)], [(256, 1024)], [(1280, 512)], [(1792, 208)]]),
        # scattered pages still fill batches across gaps
        ([(5, 6), (300, 301), (9000, 9001)], [[(5, 1), (300, 1), (9000, 1)]]),
        # a scattered page, then whole chunks: they go apart
        ([(5, 6), (512, 1024)], [[(5, 1)], [(512, 512)]]),
    ],
)
def test_batches_keep_whole_chunks_whole(ranges, expected):
    batches = list(split_batches(ranges, STRIPE))
    assert batches == expected
    from migrate.engine.pages import whole_chunk

    assert [whole_chunk(b, 1 << 20) is not None for b in batches] == [
        len(b) == 1 and b[0][0] % CHUNK == 0 and b[0][1] % CHUNK == 0 for b in expected
    ]


def test_channel_shares_from_an_unaligned_start_still_go_in_whole_stripes():
    from migrate.engine.lanes import partition

    shares = partition([(256, 8448)], 2)
    batches = [b for share in shares for b in split_batches(share, STRIPE)]
    stripes = [b for b in batches if b in ([(s, STRIPE)] for s in range(STRIPE, 8448, STRIPE))]
    assert len(stripes) == 7  # every whole stripe after the first, ragged one: one frame each


def test_a_dirty_pass_of_scattered_tagged_pages_in_big_batches_lands_exactly(blank_pair):
    src, dst = blank_pair
    pages = list(range(0, NPAGES, 2))  # 1,024 scattered pages, every other one tagged
    for i, p in enumerate(pages):
        write(src, p, bytes([i % 200 + 1]) * PAGE)
        if i % 2:
            set_tags(src, p, 7)
    link = Link(src, dst, "none", batch_pages=STRIPE)
    link.send([(p, p + 1) for p in pages])
    assert len(link.frames) == 1 and len(link.frames[0].ranges) == len(pages)
    assert same_guest(src, dst) == (True, True)


# -- run and page views built by C iterators ------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1), max_size=40), st.integers(0, 1))
def test_run_views_are_the_views_of_the_runs(bits, value):
    bits = bytes(bits)
    view = memoryview(bytes(range(256)) * 2)[: 3 * len(bits)]
    got = run_views(view, bits, value, 3)
    assert [bytes(v) for v in got] == [bytes(view[a * 3 : b * 3]) for a, b in runs(bits, value)]
    assert all(v.obj is view.obj for v in got)  # views, not copies
    at = [i for i, b in enumerate(bits) if b]
    assert [bytes(v) for v in unit_views(view, at, 3)] == [bytes(view[i * 3 : i * 3 + 3]) for i in at]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["zero", "data", "zero-headed data", "data-headed"]), min_size=1, max_size=24))
def test_zero_pages_are_flagged_exactly(kinds):
    # A page that starts with a zero byte but holds data is compared and
    # left as data; a zero page is flagged wherever it lies.
    content = {
        "zero": bytes(PAGE),
        "data": b"\x07" * PAGE,
        "zero-headed data": bytes(PAGE - 1) + b"\x01",
        "data-headed": b"\x01" + bytes(PAGE - 1),
    }
    view = memoryview(b"".join(content[k] for k in kinds))
    flags = bytearray(len(kinds) + 2)
    _flag_zero_pages(view, bytes(view[::PAGE]), flags, 2)
    assert flags == bytes(2) + bytes(fr.PAGE_ZERO if k == "zero" else 0 for k in kinds)
