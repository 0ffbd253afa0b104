"""The host's write watch (userfaultfd WP_ASYNC + PAGEMAP_SCAN): every store
to guest RAM is seen once, whatever path GuestMemory takes to make it, and
nothing it cannot see is let through while it is open."""

import os
import platform
import threading

import pytest
from support import KERNEL, needs_watch

from hosts import hugemem
from hosts.constants import PAGE_SIZE
from hosts.host import SimulatedHost
from hosts.memory import GuestMemory
from hosts.writewatch import WatchUnavailable, WriteWatch

MiB = 1 << 20


def test_a_kernel_with_the_interfaces_opens_a_watch():
    if KERNEL < (6, 7) or platform.machine() not in ("x86_64", "aarch64"):
        with pytest.raises(WatchUnavailable):
            GuestMemory(MiB).watch_writes()
        return
    mem = GuestMemory(MiB)
    watch = mem.watch_writes()
    assert watch.written() == []
    mem.unwatch_writes(watch)


def _huge_page_tmpfs() -> str | None:
    """Why this host cannot back RAM with huge pages, or None when it can."""
    fd, mount, why = hugemem.huge_page_file(hugemem.HUGE_PAGE)
    for each in (fd, mount):
        if each is not None:
            os.close(each)
    return None if fd is not None else why


_NO_HUGE = _huge_page_tmpfs()


@needs_watch
@pytest.mark.parametrize(
    "huge",
    [False, pytest.param("on", marks=pytest.mark.skipif(_NO_HUGE is not None, reason=f"no huge pages: {_NO_HUGE}"))],
)
def test_every_kind_of_store_is_seen_once(huge):
    mem = GuestMemory(64 * MiB, huge_pages=huge)
    assert mem.backing == ("huge" if huge else "4k")  # the case it names
    mem.write(0, b"\1" * (8 * MiB))  # populated before the watch: not a write it saw
    watch = mem.watch_writes()
    try:
        assert watch.written() == []
        mem.write(3 * PAGE_SIZE, b"\2" * PAGE_SIZE)  # pwrite() size, into populated RAM
        mem.write(5000 * PAGE_SIZE, b"\3" * 10 * PAGE_SIZE)  # never populated
        mem.write_parts(100 * PAGE_SIZE, [b"\4" * 2 * PAGE_SIZE, b"\5" * PAGE_SIZE])
        mem.data[7 * PAGE_SIZE + 17] = 9  # one byte through the mapping
        assert watch.written() == [(3, 4), (7, 8), (100, 103), (5000, 5010)]
        assert watch.written() == []  # protected again by the scan
        mem.write(4 * PAGE_SIZE, b"\6" * PAGE_SIZE)
        assert watch.written() == [(4, 5)]
    finally:
        mem.unwatch_writes(watch)
    assert bytes(mem.data[5000 * PAGE_SIZE : 5001 * PAGE_SIZE]) == b"\3" * PAGE_SIZE
    mem.close()


@needs_watch
def test_no_hole_is_punched_while_watched_and_stores_use_pwrite_again_after():
    mem = GuestMemory(4 * MiB)
    watch = mem.watch_writes()
    with pytest.raises(RuntimeError, match="watched"):
        mem.punch(0, 1)
    mem.unwatch_writes(watch)
    mem.write(0, b"\1" * (2 * PAGE_SIZE))
    mem.punch(0, 1)
    assert mem.populated_ranges() == [(1, 2)]


@needs_watch
def test_a_store_racing_the_scan_is_in_this_answer_or_the_next():
    """A writer thread stores a counter into distinct pages while the scan
    runs over and over: every page it wrote is reported."""
    mem = GuestMemory(16 * MiB)
    watch = mem.watch_writes()
    seen, done = set(), threading.Event()

    def writer():
        for page in range(0, mem.npages, 3):
            mem.write(page * PAGE_SIZE, os.urandom(64))
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    while not done.is_set():
        for a, b in watch.written():
            seen.update(range(a, b))
    t.join()
    for a, b in watch.written():
        seen.update(range(a, b))
    mem.unwatch_writes(watch)
    assert set(range(0, mem.npages, 3)) <= seen
    assert seen <= set(range(0, mem.npages, 3))


def test_a_host_that_cannot_say_its_stores_reach_the_watch_refuses_it():
    host = SimulatedHost(MiB)
    try:
        with pytest.raises(WatchUnavailable, match="not been shown"):
            super(SimulatedHost, host).watch_writes()  # the backend's default
    finally:
        host.close()


def test_without_the_system_call_the_watch_says_why(monkeypatch):
    import hosts.writewatch as ww

    monkeypatch.setattr(ww, "_NR_USERFAULTFD", None)
    mem = GuestMemory(4 * MiB)
    with pytest.raises(WatchUnavailable, match="userfaultfd"):
        mem.watch_writes()
    mem.write(0, b"\1" * (2 * PAGE_SIZE))
    mem.punch(0, 1)  # not left as if watched
    assert mem.populated_ranges() == [(1, 2)]


@needs_watch
def test_the_tag_storage_watch_names_the_pages_of_ram_whose_tags_were_stored():
    """A page of tag storage holds the tags of 32 pages of RAM: a tag store
    names those 32 (a granule's STG, or the whole page's packed tags)."""
    from hosts import tags as tagops
    from hosts.constants import PACKED_TAGS_PER_PAGE

    mem = GuestMemory(64 * MiB)
    watch = mem.watch_tag_writes()
    try:
        assert watch.written() == []
        tagops.fill_granules(mem.tags, 100 * 256 + 3, 1, 5)  # one granule of page 100
        mem.tags[5000 * PACKED_TAGS_PER_PAGE : 5001 * PACKED_TAGS_PER_PAGE] = b"\x11" * PACKED_TAGS_PER_PAGE
        assert watch.written() == [(96, 128), (4992, 5024)]
        assert watch.written() == []
    finally:
        watch.close()


@needs_watch
def test_a_watch_protecting_step_by_step_reports_only_what_it_protected():
    """Pages not protected yet are not watched: written() leaves them out
    (a scan would report them all, never having been protected); once a
    step protects them, their stores are seen."""
    mem = GuestMemory(8 * MiB)
    mem.write(0, b"\1" * (8 * MiB))
    watch = WriteWatch(mem._data_map, mem.size, step=2 * MiB, background=False)
    try:
        assert watch.protected == 2 * MiB  # the first step, before it returns
        mem.data[0] = 2  # protected
        mem.data[1024 * PAGE_SIZE] = 2  # page 1024, at 4 MiB: not yet
        assert watch.written() == [(0, 1)]
        assert not watch.wait_protected(4 * MiB, timeout=0)
        assert watch.protect_next() and watch.protected == 4 * MiB
        assert watch.wait_protected(4 * MiB, timeout=0)
        mem.data[600 * PAGE_SIZE] = 2
        assert watch.written() == [(600, 601)]
        assert watch.protect_next() and watch.protect_next() and not watch.protect_next()
        assert watch.protected == 8 * MiB and watch.written() == []  # page 1024's store came before
        mem.data[1024 * PAGE_SIZE + 5] = 3
        mem.data[2047 * PAGE_SIZE] = 3
        assert watch.written() == [(1024, 1025), (2047, 2048)]
    finally:
        watch.close()
    mem.close()


@needs_watch
def test_a_watch_protects_the_rest_in_the_background_and_stops_when_closed():
    mem = GuestMemory(64 * MiB)
    mem.write(0, b"\1" * (64 * MiB))
    watch = mem.watch_writes(step=MiB)
    try:
        assert watch.wait_protected(64 * MiB, timeout=30) and watch.protected == 64 * MiB
        mem.write(63 * MiB, b"\2" * PAGE_SIZE)  # through the mapping, as every store while watched
        assert watch.written() == [(16128, 16129)]
    finally:
        mem.unwatch_writes(watch)
    slow = mem.watch_writes(step=PAGE_SIZE)  # 16,384 steps: closed well before the last
    mem.unwatch_writes(slow)
    assert not slow._thread.is_alive()  # close() stopped it and waited
    mem.write(0, b"\3" * PAGE_SIZE)  # unprotected again: stores go on as before
    assert bytes(mem.data[:PAGE_SIZE]) == b"\3" * PAGE_SIZE
    mem.close()
