"""Whole chunks go out straight from the memory of the running guest (no
snapshot), their data CRC taken there just before the send.  A page the
guest writes in between tears the frame: the destination lands it, says so
in the pass's APPLIED, and the source holds that to its next dirty harvest,
which must hold one of the frame's pages (and sends that page again).  A
frame that fails its CRC with no write to explain it is corruption: the
migration fails there and the guest stays on the source."""

import asyncio

import pytest
from support import WAIT, address, digests, open_listener

from hosts.constants import PAGE_SIZE
from migrate.config.spec import MigrationConfig
from migrate.engine import pages
from migrate.engine.dest import DestVmm
from migrate.engine.source import SourceVmm
from migrate.tools.faultproxy import FaultProxy

RAM = 16 << 20
GUEST_WRITE = b"\x99" * PAGE_SIZE


async def migrate(src, dst, config, proxy_fault=None):
    listener = open_listener()
    dest_task = asyncio.ensure_future(DestVmm(dst, config).serve(listener))
    proxy = FaultProxy(address(listener), proxy_fault, "bulk", bulk_bytes=0) if proxy_fault else None
    try:
        target = await proxy.start() if proxy else address(listener)
        sres = await asyncio.wait_for(SourceVmm(src, config).migrate(target), WAIT)
        dres = await asyncio.wait_for(dest_task, WAIT)
    finally:
        dest_task.cancel()
        if proxy:
            await proxy.close()
        listener.close()
    return sres, dres


async def test_a_frame_torn_by_the_guest_lands_and_its_page_goes_again(hosts, monkeypatch):
    src, dst = hosts.source(rate=0), hosts.dest()
    build, torn_at = pages.BatchBuilder.build, []

    def build_then_guest_writes(self, pass_no, ranges):
        frame, stats = build(self, pass_no, ranges)
        if frame.live and not torn_at:  # after the CRC, before the send: as a vCPU could
            torn_at.append(frame.ranges[0][0] + 3)
            src.vm.guest_write(src.vm.page_to_ipa(torn_at[0]), GUEST_WRITE)
        return frame, stats

    monkeypatch.setattr(pages.BatchBuilder, "build", build_then_guest_writes)
    sres, dres = await migrate(src, dst, MigrationConfig())
    assert sres["status"] == "completed", sres["error"]
    assert sres["validation"]["ok"] and not sres["digest"]["trusts_dirty_tracking"]
    assert torn_at and sres["ram"]["torn_pages"] == pages.CHUNK_PAGES * 4  # one 4 MiB frame
    buf = bytearray(PAGE_SIZE)
    dst.memory.read_into(torn_at[0] * PAGE_SIZE, buf)
    assert bytes(buf) == GUEST_WRITE


@pytest.mark.parametrize("channels", [1, 2])
async def test_a_frame_corrupted_on_the_wire_fails_when_no_write_explains_it(hosts, channels):
    # An idle guest: nothing writes, so a failed data CRC of a live frame is corruption.
    src, dst = hosts.source(rate=0), hosts.dest()
    before = digests(src)
    config = MigrationConfig(channels=channels, compression="none")  # raw from the first frame: live
    sres, dres = await migrate(src, dst, config, proxy_fault="flip")
    assert sres["status"] == "failed" and sres["guest_on"] == "source"
    assert "failed its data checksum, and no page of it is in the next dirty harvest" in sres["error"]
    assert dres["status"] != "completed"
    assert digests(src) == before and src.vcpus.running


def test_torn_ranges_are_merged_and_bounded(hosts):
    vmm = DestVmm(hosts.dest(), MigrationConfig())
    frames = [(0, 1024), (1024, 1024), (8192, 1024), (10240, 1024), (40960, 1024), (50176, 1024)]
    vmm._applier = type("Applier", (), {"torn": list(reversed(frames))})()
    assert vmm._take_torn() == [(0, 2048), (8192, 1024), (10240, 1024), (40960, 1024), (50176, 1024)]
    assert vmm._applier.torn == []
    vmm._applier.torn = list(frames)
    bounded = vmm._take_torn(3)  # the two narrowest gaps (1,024 and 6,144 pages) closed
    assert bounded == [(0, 11264), (40960, 1024), (50176, 1024)]
    assert all(any(a <= f and f + n <= a + m for a, m in bounded) for f, n in frames)


@pytest.mark.parametrize("strategy", ["memfd-continue", "uffd-copy-tags"])
async def test_no_live_frames_where_postcopy_may_follow(hosts, strategy):
    # Postcopy's validation skips the chunks holding a postcopy page: a
    # corrupt page excused with a torn frame could go unseen there.  So a
    # migration that may switch sends no live frame, and a flip in its bulk
    # pass fails at the frame, the guest staying on the source.
    src, dst = hosts.source(rate=0, strategy=strategy), hosts.dest()
    before = digests(src)
    config = MigrationConfig(strategy=strategy, postcopy=True, postcopy_after_passes=0, compression="none")
    sres, dres = await migrate(src, dst, config, proxy_fault="flip")
    assert sres["status"] == "failed" and sres["guest_on"] == "source", sres["error"]
    assert "failed its checksum on the landed pages" in sres["error"]
    assert sres["ram"]["torn_pages"] == 0 and dres["status"] != "completed"
    assert digests(src) == before and src.vcpus.running


def test_a_frame_that_may_be_compressed_is_never_live(hosts):
    # zstd reads its input more than once: a page the guest writes meanwhile
    # could make pages it never wrote decode wrong, which no harvest would
    # send again.  So data that may be compressed is copied first.
    from migrate.config.spec import MigrationConfig as Config
    from migrate.protocol.compression import LINK_SAMPLES, Compressor
    from migrate.strategies import get as get_strategy

    src = hosts.source(rate=0, start=False)
    strategy = get_strategy("tag-ioctl")(src, Config())
    text = (b"compressible guest memory, " * 160)[:4096] * 1024
    src.memory.write(0, text)
    slow, fast = Compressor("auto"), Compressor("auto")
    for _ in range(LINK_SAMPLES):  # sends that waited: a measured link
        slow.observe_link(8 << 20, 0.08)  # 100 MB/s: auto compresses this text
        fast.observe_link(8 << 20, 0.001)  # 8 GB/s: raw
    # auto before any measure of the link: raw, decided before the frame is built
    for compressor, live in (
        (Compressor("none"), True),
        (Compressor("3"), False),
        (slow, False),
        (fast, True),
        (Compressor("auto"), True),
    ):
        frame, _ = pages.BatchBuilder(strategy, compressor, 1024).build(0, [(0, 1024)])
        assert frame.live is live, compressor.mode
        assert frame.data_compressed is not live, compressor.mode
        assert src.memory.is_view_of(frame.data, 0) is live, compressor.mode


def test_merge_ranges_joins_overlaps_and_neighbours():
    from migrate.engine.bitmaps import merge_ranges

    assert merge_ranges([(10, 5), (0, 4), (4, 2), (12, 10), (30, 0), (40, 1)]) == [(0, 6), (10, 12), (40, 1)]
    assert merge_ranges([]) == []


def test_an_unchecked_run_from_a_running_guest_is_compressed_only_from_a_copy(hosts):
    # --checksum meta|none sends a batch of one run of data pages straight
    # from guest RAM when it goes raw.  Over a link the receiver holds back
    # (it counts as fast for sending whole chunks) auto may still decide to
    # compress: that must happen on a copy, never on the running guest's
    # memory, which zstd would read more than once.
    from migrate.config.spec import MigrationConfig as Config
    from migrate.protocol.compression import Compressor
    from migrate.strategies import get as get_strategy

    src = hosts.source(rate=0, start=False)
    strategy = get_strategy("tag-ioctl")(src, Config())
    src.memory.write(0, (b"compressible guest memory, " * 160)[:4096] * 64)
    compressor = Compressor("auto")
    for _ in range(5):  # 0.5 GB/s, the receiver's window closed 60 % of the time
        compressor.observe_link(4 << 20, (4 << 20) / 0.5e9, 0.6 * (4 << 20) / 0.5e9)
    assert compressor.sends_raw()
    fed = []
    real = compressor._data

    class Spy:
        def compress(self, data):
            fed.append(isinstance(data, memoryview) and src.memory.is_view_of(data, 0))
            return real.compress(data)

    compressor._data = Spy()
    frame, _ = pages.BatchBuilder(strategy, compressor, 64, checked=False).build(0, [(0, 64)])
    assert frame.data_compressed and fed and not any(fed)
