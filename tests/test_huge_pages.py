"""The destination's guest RAM on huge pages: the private tmpfs file, its
fallbacks, who gets it, and the refusal of postcopy."""

import errno
import json
import os

import pytest

from hosts import hugemem
from hosts.constants import PAGE_SIZE
from hosts.memory import GuestMemory
from migrate.config.spec import GuestSpec, MigrationConfig
from migrate.errors import ConfigError
from migrate.hosting.pair import run_pair
from migrate.hosting.process import build_host
from migrate.protocol import frames as fr

HUGE = hugemem.HUGE_PAGE
CAN = hugemem.huge_page_file(HUGE)
for _fd in CAN[:2]:
    if _fd is not None:
        os.close(_fd)
needs_huge = pytest.mark.skipif(CAN[0] is None, reason=f"no huge-page tmpfs on this host: {CAN[2]}")


def _populated_extent(fd) -> int:
    """Bytes from 0 to the first hole."""
    return os.lseek(fd, 0, os.SEEK_HOLE)


@needs_huge
def test_one_small_write_populates_a_whole_huge_page():
    fd, mount, how = hugemem.huge_page_file(4 * HUGE)
    try:
        assert how == "private tmpfs" if os.getuid() == 0 else "user namespace" in how
        os.ftruncate(fd, 4 * HUGE)
        os.pwrite(fd, b"x" * PAGE_SIZE, 0)
        assert _populated_extent(fd) == HUGE  # a 4 KiB memfd page would end the data at 4 KiB
        hugemem.small_pages(mount)
        os.pwrite(fd, b"x" * PAGE_SIZE, 2 * HUGE)
        assert os.lseek(fd, 2 * HUGE, os.SEEK_HOLE) == 2 * HUGE + PAGE_SIZE  # 4 KiB pages from now on
        assert _populated_extent(fd) == HUGE  # the huge page already there stays
    finally:
        os.close(fd)
        os.close(mount)


@needs_huge
def test_the_user_namespace_route_gives_the_same_file():
    fd, mount = hugemem._open_in_namespace(4 * HUGE)
    try:
        os.ftruncate(fd, 4 * HUGE)
        os.pwrite(fd, b"y" * PAGE_SIZE, HUGE)
        assert os.pread(fd, PAGE_SIZE, HUGE) == b"y" * PAGE_SIZE
        assert os.lseek(fd, 0, os.SEEK_DATA) == HUGE and os.lseek(fd, HUGE, os.SEEK_HOLE) == 2 * HUGE
        assert os.fstat(fd).st_nlink == 0  # no name anywhere
        hugemem.small_pages(mount)  # the namespace's owner may reconfigure its mount
    finally:
        os.close(fd)
        os.close(mount)


def test_without_privilege_or_namespaces_it_says_why_and_ram_is_a_memfd(monkeypatch):
    def denied(size):
        raise OSError(errno.EPERM, "fsopen(tmpfs): Operation not permitted")

    def no_userns(size):
        raise OSError(errno.EPERM, "unshare: Operation not permitted")

    monkeypatch.setattr(hugemem, "_mount_and_open", denied)
    monkeypatch.setattr(hugemem, "_open_in_namespace", no_userns)
    fd, mount, why = hugemem.huge_page_file(HUGE)
    assert fd is None and mount is None and "unshare" in why
    mem = GuestMemory(4 * HUGE, huge_pages=True)
    try:
        assert mem.backing == "4k" and "unshare" in mem.backing_note
        mem.data[0:PAGE_SIZE] = b"z" * PAGE_SIZE
        assert mem.populated_ranges() == [(0, 1)]  # 4 KiB pages: one page, not 512
        assert mem.use_small_pages() is None  # nothing to do
    finally:
        mem.close()


def test_a_host_that_denies_tmpfs_huge_pages_is_not_asked(monkeypatch, tmp_path):
    mode = tmp_path / "shmem_enabled"
    mode.write_text("always within_size advise never [deny] force\n")
    assert hugemem.shmem_thp_mode(str(mode)) == "deny"
    monkeypatch.setattr(hugemem, "shmem_thp_mode", lambda: "deny")
    monkeypatch.setattr(hugemem, "_mount_and_open", lambda size: pytest.fail("mounted despite deny"))
    fd, mount, why = hugemem.huge_page_file(HUGE)
    assert fd is None and mount is None and "deny" in why


@needs_huge
def test_guest_memory_on_huge_pages_reads_writes_and_punches_as_before():
    mem = GuestMemory(8 * HUGE, huge_pages=True)
    try:
        assert mem.backing == "huge"
        page = HUGE // PAGE_SIZE + 3
        mem.data[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = b"\xa5" * PAGE_SIZE
        assert mem.populated_ranges() == [(HUGE // PAGE_SIZE, 2 * HUGE // PAGE_SIZE)]  # 2 MiB steps
        buf = bytearray(PAGE_SIZE)
        mem.read_into(page * PAGE_SIZE, buf)
        assert buf == b"\xa5" * PAGE_SIZE
        mem.read_into((page + 1) * PAGE_SIZE, buf)
        assert buf == bytes(PAGE_SIZE)  # the rest of the huge page reads as zeros
    finally:
        mem.close()


def _spec(**guest):
    return GuestSpec(ram=8 << 20, vcpus=1, workload="idle", rate=0, params={"fill": 0.0}, **guest)


@needs_huge
def test_only_the_destination_gets_huge_pages_and_only_without_postcopy():
    picks = {}
    for role in ("source", "destination"):
        for postcopy in (False, True):
            host = build_host(_spec(), "tag-ioctl", role, postcopy)
            picks[role, postcopy] = host.memory.backing
            host.close()
    assert picks == {
        ("source", False): "4k",
        ("source", True): "4k",
        ("destination", False): "huge",
        ("destination", True): "4k",  # userfaultfd needs a hole for each missing 4 KiB page
    }
    host = build_host(_spec(huge_pages="off"), "tag-ioctl", "destination")
    assert host.memory.backing == "4k"
    host.close()


def test_huge_pages_on_refuses_what_it_cannot_do(monkeypatch):
    with pytest.raises(ConfigError, match="cannot go with --postcopy"):
        build_host(_spec(huge_pages="on"), "tag-ioctl", "destination", postcopy=True)
    with pytest.raises(ConfigError, match="only the simulated host"):
        build_host(_spec(huge_pages="on", host="kvm"), "tag-ioctl", "destination")
    monkeypatch.setattr(hugemem, "_mount_and_open", lambda size: (_ for _ in ()).throw(OSError(errno.ENODEV, "x")))
    monkeypatch.setattr("hosts.memory.huge_page_file", hugemem.huge_page_file)
    with pytest.raises(ConfigError, match="--huge-pages on: no private tmpfs"):
        build_host(_spec(huge_pages="on"), "tag-ioctl", "destination")


@needs_huge
def test_untouched_ram_turns_to_small_pages_for_postcopy_and_stored_ram_cannot():
    fresh = GuestMemory(4 * HUGE, huge_pages=True)
    stored = GuestMemory(4 * HUGE, huge_pages=True)
    try:
        assert fresh.use_small_pages() is None
        assert fresh.backing == "4k" and "postcopy" in fresh.backing_note
        fresh.data[0:PAGE_SIZE] = b"q" * PAGE_SIZE
        assert fresh.populated_ranges() == [(0, 1)]  # a missing page is a hole again
        stored.data[0:PAGE_SIZE] = b"q" * PAGE_SIZE
        assert "already stored" in stored.use_small_pages()
        assert stored.backing == "huge"
    finally:
        fresh.close()
        stored.close()


def test_hello_carries_postcopy_and_insists_on_it():
    hello = fr.Hello(1, 4096, 4096, 16, True, 1, "tag-ioctl", "packed4", "zstd", postcopy=True)
    meta = hello.meta()
    assert fr.Hello.from_meta(meta, b"").postcopy is True
    del meta["postcopy"]
    with pytest.raises(Exception, match="postcopy"):
        fr.Hello.from_meta(meta, b"")


@needs_huge
def test_a_migration_onto_huge_pages_validates_and_reports_its_backing():
    guest = GuestSpec(ram=32 << 20, vcpus=2, workload="allocator", rate=2000)
    r = run_pair(guest, MigrationConfig(), "huge-pages", quiet=True)
    assert r["status"] == "completed", r["error"]
    assert r["validation"]["ok"] is True
    assert r["ram"]["backing"] == "4k"  # the source keeps its pages
    assert r["destination"]["ram_backing"] == "huge"
    json.dumps(r)  # still plain JSON
    small = GuestSpec.from_dict({**guest.to_dict(), "huge_pages": "off"})
    off = run_pair(small, MigrationConfig(), "small-pages", quiet=True)
    assert off["status"] == "completed" and off["destination"]["ram_backing"] == "4k"
