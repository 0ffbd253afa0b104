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
    sres, dres = await migrate(src, dst, MigrationConfig(channels=channels), proxy_fault="flip")
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
