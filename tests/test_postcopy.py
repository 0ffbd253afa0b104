"""Postcopy: the simulated userfaultfd, the three ways to place a page and its
tags for a running guest, and whole migrations that switch to postcopy."""

import asyncio
import threading
import time

import pytest
from support import WAIT, digests, open_listener

from hosts.constants import PACKED_TAGS_PER_PAGE, PAGE_SIZE
from hosts.errors import KernelError
from hosts.host import SimulatedHost
from hosts.uffd import MINOR, MISSING, GuestStopped, Userfaultfd
from migrate.config.spec import MigrationConfig
from migrate.engine.dest import DestVmm
from migrate.engine.source import SourceVmm
from migrate.errors import ConfigError, ProtocolError
from migrate.strategies import POSTCOPY_STRATEGIES, STRATEGIES

MiB = 1 << 20
TAGS = bytes([0x53]) * PACKED_TAGS_PER_PAGE
DATA = bytes(range(256)) * 16


def host(ram=4 * MiB, **kw):
    return SimulatedHost(ram, workload="idle", workload_params={"fill": 0}, rate=0, **kw)


# -- the simulated userfaultfd ------------------------------------------------------------
def test_a_guest_access_to_a_missing_page_waits_for_it_and_raises_one_event():
    h = host()
    uffd = h.vm.uffd = Userfaultfd(h.vm, MISSING)
    uffd.drop(3, 4)
    ipa = h.vm.page_to_ipa(3)
    done = []
    reader = threading.Thread(target=lambda: done.append(h.vm.guest_read(ipa, 16)))
    reader.start()
    time.sleep(0.1)
    assert not done  # blocked
    assert uffd.read_events() == [3] and uffd.faults == 1
    uffd.copy(3, DATA)
    reader.join(WAIT)
    assert done == [DATA[:16]] and len(uffd.latencies) == 1
    with pytest.raises(KernelError, match="EEXIST"):
        uffd.copy(3, DATA)  # present already
    h.close()


def test_uffdio_copy_needs_the_page_gone_from_the_memfd():
    # As on shmem: UFFDIO_COPY allocates the page, so one the memfd still
    # holds (written, only unmapped, or read back in through a mapping after
    # the punch) is EEXIST -- what the discard ahead must never leave.
    h = host()
    h.memory.write(7 * PAGE_SIZE, DATA)
    uffd = h.vm.uffd = Userfaultfd(h.vm, MISSING)
    uffd.drop(7, 8)  # not present to the guest, but still in the memfd
    with pytest.raises(KernelError, match="EEXIST"):
        uffd.copy(7, DATA)
    uffd.punch(7, 8)
    _ = bytes(h.memory.data[7 * PAGE_SIZE : 8 * PAGE_SIZE])  # a read through the mapping brings a page back
    with pytest.raises(KernelError, match="EEXIST"):
        uffd.copy(7, DATA)
    uffd.punch(7, 8)
    uffd.copy(7, DATA)  # punched and left alone: placed
    assert bytes(h.memory.data[7 * PAGE_SIZE : 7 * PAGE_SIZE + len(DATA)]) == DATA
    h.close()


def test_uffdio_copy_makes_a_page_live_without_its_tags_which_is_the_race():
    """What tag-ioctl does in postcopy: between UFFDIO_COPY and the tag
    ioctl the guest sees the page with tags cleared by its first access."""
    h = host()
    uffd = h.vm.uffd = Userfaultfd(h.vm, MISSING)
    uffd.drop(5, 6)
    strategy = STRATEGIES["tag-ioctl"](h, MigrationConfig().check())
    ipa = h.vm.page_to_ipa(5)
    uffd.copy(5, DATA)  # first of the two calls
    assert not h.vm.guest_check_page_tags(ipa, TAGS)  # the guest runs here: wrong tags
    strategy.write_tags(5, TAGS)  # the second call
    assert h.vm.guest_check_page_tags(ipa, TAGS)
    assert h.counters.get("guest.wrong_tag_accesses") == 1
    h.close()


@pytest.mark.parametrize("name", ["uffd-copy-tags", "memfd-continue"])
def test_atomic_placements_never_show_a_page_without_its_tags(name):
    h = host()
    strategy = STRATEGIES[name](h, MigrationConfig(strategy=name).check())
    strategy.setup_dest()
    uffd = h.vm.uffd = Userfaultfd(h.vm, strategy.postcopy_mode)
    uffd.drop(0, 8)
    seen = []

    def guest():
        for page in range(8):  # each access waits until the page is placed
            seen.append(h.vm.guest_check_page_tags(h.vm.page_to_ipa(page), TAGS))

    t = threading.Thread(target=guest)
    t.start()
    for page in range(8):
        time.sleep(0.005)
        strategy.place_postcopy(uffd, page, DATA, TAGS)
    t.join(WAIT)
    assert seen == [True] * 8 and h.counters.get("guest.wrong_tag_accesses") == 0
    assert bytes(h.memory.data[: 8 * PAGE_SIZE]) == DATA * 8
    h.close()


def test_continue_needs_minor_mode_and_a_page_in_the_memfd():
    h = host()
    missing = Userfaultfd(h.vm, MISSING)
    with pytest.raises(KernelError, match="EINVAL"):
        missing.continue_(0)
    minor = Userfaultfd(h.vm, MINOR)
    minor.drop(0, 1)
    with pytest.raises(KernelError, match="ENOENT"):
        minor.continue_(0)  # a hole: nothing to map
    h.memory.write(0, DATA)
    minor.continue_(0)
    assert minor.present[0] == 1
    h.close()


def test_punch_drops_data_and_tags_and_teardown_frees_a_waiting_vcpu():
    h = host()
    h.vm.guest_write(h.vm.page_to_ipa(2), DATA)
    uffd = h.vm.uffd = Userfaultfd(h.vm, MISSING)
    uffd.punch(2, 3)
    assert h.memory.populated_ranges() == [] and uffd.present[2] == 0
    errors = []

    def guest():
        try:
            h.vm.guest_read(h.vm.page_to_ipa(2), 1)
        except GuestStopped as exc:
            errors.append(exc)

    t = threading.Thread(target=guest)
    t.start()
    time.sleep(0.05)
    uffd.close()
    t.join(WAIT)
    assert len(errors) == 1
    h.close()


# -- which strategies can --------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in STRATEGIES if n not in POSTCOPY_STRATEGIES])
def test_strategies_that_cannot_place_tags_for_a_running_guest_refuse_postcopy(name):
    with pytest.raises(ConfigError, match=rf"strategy {name} cannot do postcopy: .+; use one of tag-ioctl"):
        MigrationConfig(strategy=name, postcopy=True).check()


def test_the_postcopy_strategies_are_listed():
    assert set(POSTCOPY_STRATEGIES) == {"tag-ioctl", "uffd-copy-tags", "memfd-continue"}
    assert STRATEGIES["uffd-copy-tags"].proposal and not STRATEGIES["memfd-continue"].proposal


# -- whole migrations ----------------------------------------------------------------------------
# a small hot set, so the guest comes back to pages it retagged (and checks them) often
HOT = {"fill": 0.25, "hot_pages": 256}


def hot_set(ram=16 * MiB, start=True):
    h = SimulatedHost(ram, workload="hot-set", workload_params=HOT, rate=4000, seed=3)
    h.prepare_guest()
    if start:
        h.vcpus.start()
    return h


def dest_for(ram=16 * MiB):
    # the destination runs the same guest program once it resumes
    return SimulatedHost(ram, workload="hot-set", workload_params=HOT, rate=4000, seed=3)


async def migrate(src, dst, config, source_cls=SourceVmm):
    listener = open_listener()
    dest = DestVmm(dst, config)
    task = asyncio.ensure_future(dest.serve(listener))
    try:
        sres = await asyncio.wait_for(source_cls(src, config).migrate(listener.getsockname()), WAIT)
        dres = await asyncio.wait_for(task, WAIT)
    finally:
        task.cancel()
        listener.close()
    return sres, dres


@pytest.mark.parametrize("name", ["memfd-continue", "uffd-copy-tags"])
async def test_postcopy_with_atomic_placement_completes_validated_and_clean(name):
    src, dst = hot_set(), dest_for()
    config = MigrationConfig(strategy=name, postcopy=True, postcopy_after_passes=0, channels=1).check()
    sres, dres = await migrate(src, dst, config)
    try:
        assert sres["status"] == dres["status"] == "completed", (sres["error"], dres["error"])
        assert sres["validation"]["ok"] and sres["validation"]["mode"] == "postcopy"
        assert "checked as it landed" in sres["validation"]["compared"]
        pc, dpc = sres["postcopy"], dres["postcopy"]
        assert pc["pages"] == dpc["pages"] == dpc["pages_verified"] > 0
        assert pc["switch_downtime_ms"] > 0 and pc["reason"].startswith("postcopy after 0 dirty passes")
        if name == "uffd-copy-tags":
            # MISSING mode: most pages were discarded ahead, while the guest
            # still ran on the source; the switch discarded only those
            # dirtied in between (announced with the rest: all counted).
            assert pc["pages_discarded_ahead"] > 0 and pc["discard_ahead_ms"] > 0
            assert dpc["pages_discarded_at_switch"] < pc["pages_discarded_ahead"]
            assert dpc["pages_discarded_at_switch"] + pc["pages_discarded_ahead"] >= pc["pages"]
        else:  # MINOR mode unmaps them all at the switch, after the digest
            assert pc["pages_discarded_ahead"] == 0 and dpc["pages_discarded_at_switch"] == pc["pages"]
        assert set(dpc["fault_latency_ms"]) == {"p50", "p99", "max"}
        assert dpc["guest_wrong_tag_accesses"] == 0
        await asyncio.sleep(0.3)  # the guest runs on, checking the tags it set before the migration
        assert dst.counters.get("guest.tag_checked_loads") > 0
        assert dst.counters.get("guest.wrong_tag_accesses") == 0
        assert not src.vcpus.running and dst.vcpus.running  # the source stays paused from the switch on
        assert dst.vm.uffd is None  # every page is here: the userfaultfd is gone
    finally:
        src.close()
        dst.close()


async def test_postcopy_with_data_channels_discards_ahead_and_runs_clean():
    # With data channels the last pass lands on several connections besides
    # the control one that carries the discard ahead; every page punched
    # must be fetched again and placed (a page landing after its punch
    # would make UFFDIO_COPY fail with EEXIST), and the guest runs clean.
    # (The source waits for APPLIED of the last pass before it discards
    # ahead, so the destination's own wait for every channel is a second
    # guard that this test cannot tell apart.)
    src, dst = hot_set(), dest_for()
    config = MigrationConfig(strategy="uffd-copy-tags", postcopy=True, postcopy_after_passes=0, channels=3).check()
    sres, dres = await migrate(src, dst, config)
    try:
        assert sres["status"] == dres["status"] == "completed", (sres["error"], dres["error"])
        assert sres["validation"]["ok"]
        pc, dpc = sres["postcopy"], dres["postcopy"]
        assert pc["pages_discarded_ahead"] > 0 and dpc["pages_verified"] == dpc["pages"] == pc["pages"]
        assert dpc["guest_wrong_tag_accesses"] == 0
    finally:
        src.close()
        dst.close()


async def test_pages_the_guest_waits_for_overtake_a_slow_background_stream_on_the_fault_channel():
    src, dst = hot_set(), dest_for()
    # the background crawls (1 MB/s): the hot set's pages are asked for long before it gets there
    config = MigrationConfig(
        strategy="memfd-continue", postcopy=True, postcopy_after_passes=0, channels=1, max_bandwidth=1e6
    ).check()
    sres, dres = await migrate(src, dst, config)
    try:
        assert sres["status"] == dres["status"] == "completed", (sres["error"], dres["error"])
        pc, dpc = sres["postcopy"], dres["postcopy"]
        assert pc["pages_requested"] > 0 and dpc["requests"] > 0
        assert pc["fault_channel_bytes"] >= pc["pages_requested"] * PACKED_TAGS_PER_PAGE
        # a page waited for is not paced: it came back far sooner than the background's
        # 1 MB/s would bring it (4 ms a page; the whole stream takes about a second)
        assert dpc["fault_latency_ms"]["p50"] < pc["last_page_ms"] / 4
        assert dpc["pages_verified"] == dpc["pages"] and dpc["guest_wrong_tag_accesses"] == 0
    finally:
        src.close()
        dst.close()


async def test_tag_ioctl_in_postcopy_is_never_a_clean_success_when_the_guest_saw_wrong_tags():
    src, dst = hot_set(), dest_for()
    config = MigrationConfig(postcopy=True, postcopy_after_passes=0, channels=1).check()
    sres, dres = await migrate(src, dst, config)
    try:
        wrong = dres["postcopy"]["guest_wrong_tag_accesses"]
        assert dres["status"] == ("guest-faulted" if wrong else "completed"), dres["error"]
        if wrong:
            assert "saw wrong tags" in dres["error"] and "UFFDIO_COPY" in dres["error"]
        # the pages themselves all arrived and checked out either way
        assert dres["postcopy"]["pages_verified"] == dres["postcopy"]["pages"]
        assert dres["counters"]["syscalls.uffd_copy"] > 0
    finally:
        src.close()
        dst.close()


async def test_precopy_that_converges_does_not_switch_to_postcopy():
    src, dst = host(4 * MiB), host(4 * MiB)
    src.prepare_guest()
    config = MigrationConfig(strategy="memfd-continue", postcopy=True, postcopy_after_passes=5, channels=1).check()
    sres, dres = await migrate(src, dst, config)
    try:
        assert sres["status"] == "completed" and "postcopy" not in sres
        assert digests(src) == digests(dst)
    finally:
        src.close()
        dst.close()


class CutAfterSwitch(SourceVmm):
    """A source whose link dies once a few postcopy pages went out."""

    async def _postcopy(self):
        from migrate.engine import postcopy

        real = postcopy.SourcePostcopy._send
        sent = []

        async def send(pc, chan, builder, ranges, paced=True):
            sent.append(ranges)
            if len(sent) == 3:
                pc.chan.sock.shutdown(2)  # the cable is pulled
                pc.faults.sock.shutdown(2)
            return await real(pc, chan, builder, ranges, paced)

        postcopy.SourcePostcopy._send = send
        try:
            await super()._postcopy()
        finally:
            postcopy.SourcePostcopy._send = real


class RetryingCut(CutAfterSwitch):
    """The same cut, with one reconnection allowed (--retry 1)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.postcopy_retries = 1


async def test_a_cut_link_after_the_switch_is_resumed_and_completes_with_every_page_checked():
    src, dst = hot_set(), dest_for()
    config = MigrationConfig(
        strategy="memfd-continue", postcopy=True, postcopy_after_passes=0, channels=1, timeout_s=3, postcopy_hold_s=30
    )
    sres, dres = await migrate(src, dst, config.check(), RetryingCut)
    try:
        assert sres["status"] == dres["status"] == "completed", (sres["error"], dres["error"])
        assert sres["validation"]["ok"], sres["validation"]
        assert sres["postcopy_recovery"]["pauses"] == 1 and dres["postcopy_recovery"]["pauses"] == 1
        assert dres["postcopy"]["pages_verified"] == dres["postcopy"]["pages"] == sres["postcopy"]["pages"]
        assert dres["postcopy"]["guest_wrong_tag_accesses"] == 0
        assert not src.vcpus.running and dst.vcpus.running and dst.vm.uffd is None
    finally:
        src.close()
        dst.close()


async def test_a_cut_link_after_the_switch_without_a_resume_keeps_the_source_paused_and_says_what_is_lost():
    src, dst = hot_set(), dest_for()
    config = MigrationConfig(
        strategy="memfd-continue", postcopy=True, postcopy_after_passes=0, channels=1, timeout_s=3, postcopy_hold_s=2
    )
    sres, dres = await migrate(src, dst, config.check(), CutAfterSwitch)
    try:
        assert sres["status"] == "postcopy-paused", sres["error"]
        assert (
            "no resume within 2 s" in sres["error"]
            and "paused copy as of the switch, the only complete one" in sres["error"]
        )
        assert sres["guest_on"].startswith("split") and not src.vcpus.running  # kept, paused, never resumed
        held = digests(src)
        await asyncio.sleep(0.2)
        assert digests(src) == held  # frozen, nothing discarded
        assert dres["status"] == "postcopy-lost", dres["error"]
        assert "did not resume within 2 s" in dres["error"] and "cannot proceed" in dres["error"]
        assert dres["guest_on"].startswith("nowhere here") and "pages missing" in dres["guest_on"]
    finally:
        src.close()
        dst.close()


def test_a_page_sent_in_the_background_is_not_sent_again_when_asked_for():
    from migrate.engine import postcopy

    class Memory:
        npages = 64

    async def run():
        pc = postcopy.SourcePostcopy(None, None, (None, None), Memory(), [(0, 64)], 1, None)
        pc.pending[10:20] = bytes(10)  # already on their way in the background
        return pc._unsent([(8, 4), (18, 4), (30, 1), (8, 1), (63, 5)])

    assert asyncio.run(run()) == [(8, 2), (20, 2), (30, 1), (63, 1)]


def test_only_the_fault_channel_carries_requests():
    from migrate.protocol import frames as fr
    from migrate.protocol.machine import Connection, data_source_machine

    def joined():
        conn = Connection(data_source_machine(1))
        conn.ram_pages = 64
        conn.send(fr.Join("s", 1))
        conn.feed(b"".join(bytes(b) for b in fr.encode(fr.Welcome(fr.PROTOCOL_VERSION))))
        return conn

    request = b"".join(bytes(b) for b in fr.encode(fr.Request([(3, 1)])))
    data = joined()
    with pytest.raises(ProtocolError, match="unexpected REQUEST"):
        data.feed(request)  # a data channel: pages only
    faults = joined()
    faults.machine.local("faults")
    assert [f.ranges for f in faults.feed(request)] == [[(3, 1)]]
