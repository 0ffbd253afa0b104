"""The destination's guest RAM on huge pages: the private tmpfs file, its
fallbacks, who gets it, and the refusal of postcopy."""

import errno
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

from hosts import hugemem
from hosts.constants import PAGE_SIZE
from hosts.memory import GuestMemory
from migrate.config.spec import GuestSpec, MigrationConfig
from migrate.errors import ConfigError, ProtocolError
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
    assert not os.get_inheritable(fd) and not os.get_inheritable(mount)
    try:
        os.ftruncate(fd, 4 * HUGE)
        os.pwrite(fd, b"y" * PAGE_SIZE, HUGE)
        assert os.pread(fd, PAGE_SIZE, HUGE) == b"y" * PAGE_SIZE
        assert os.lseek(fd, 0, os.SEEK_DATA) == HUGE and os.lseek(fd, HUGE, os.SEEK_HOLE) == 2 * HUGE
        assert os.fstat(fd).st_nlink == 0  # no name anywhere
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
    mem = GuestMemory(4 * HUGE, huge_pages="on")
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
def test_guest_memory_on_huge_pages_reads_writes_and_punches():
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
        mem.punch(page, page + 1)  # as postcopy's discard does
        mem.read_into(page * PAGE_SIZE, buf)
        assert buf == bytes(PAGE_SIZE)
        mem.read_into((page - 1) * PAGE_SIZE, buf)
        assert buf == bytes(PAGE_SIZE)
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
    hello = fr.Hello(fr.PROTOCOL_VERSION, 4096, 4096, 16, True, 1, "tag-ioctl", "packed4", "zstd", postcopy=True)
    meta = hello.meta()
    assert fr.Hello.from_meta(meta, b"").postcopy is True
    with pytest.raises(ProtocolError, match="postcopy"):
        fr.Hello.from_meta({**meta, "postcopy": "yes"}, b"")
    with pytest.raises(ProtocolError, match="missing field 'postcopy'"):  # a source before protocol 9 says so
        fr.Hello.from_meta({k: v for k, v in meta.items() if k != "postcopy"}, b"")


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


def test_a_namespace_helper_that_dies_without_a_word_ends_the_wait(monkeypatch):
    monkeypatch.setattr(hugemem, "_mount_and_open", lambda size: os.kill(os.getpid(), 9))
    with pytest.raises(OSError, match="without a word"):
        hugemem._open_in_namespace(HUGE, wait_s=20)


def test_auto_never_takes_the_namespace_route_whose_mount_cannot_switch_back(monkeypatch):
    def denied(size):
        raise OSError(errno.EPERM, "fsopen(tmpfs): Operation not permitted")

    monkeypatch.setattr(hugemem, "_mount_and_open", denied)
    monkeypatch.setattr(hugemem, "_open_in_namespace", lambda size: pytest.fail("took the namespace route"))
    mem = GuestMemory(4 * HUGE, huge_pages="auto")
    try:
        assert mem.backing == "4k" and "CAP_SYS_ADMIN" in mem.backing_note
    finally:
        mem.close()


# The module's own text, run as nobody (who may not be able to read this checkout).
UNPRIVILEGED = f"""
import os, sys, types
m = types.ModuleType("hugemem")
exec(compile({open(hugemem.__file__).read()!r}, "hugemem.py", "exec"), m.__dict__)
fd, mount, how = m.huge_page_file(8 << 20, namespace=sys.argv[1] == "on")
if fd is None:
    print("none", how); sys.exit(0)
os.ftruncate(fd, 8 << 20); os.pwrite(fd, b"x" * 4096, 0)
try:
    m.small_pages(mount); print(how, os.lseek(fd, 0, os.SEEK_HOLE), "switched")
except OSError as exc:
    print(how, os.lseek(fd, 0, os.SEEK_HOLE), "cannot switch:", exc.strerror)
"""


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv"), reason="needs root to become nobody")
def test_without_privilege_auto_gets_no_huge_pages_and_on_gets_ones_that_stay():
    def as_nobody(mode):
        cp = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-I",
                "-c",
                UNPRIVILEGED,
                mode,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cp.returncode == 0, cp.stderr
        return cp.stdout.strip()

    assert as_nobody("auto").startswith("none mounting a private tmpfs needs CAP_SYS_ADMIN")
    on = as_nobody("on")
    if CAN[0] is not None and "user namespace" in on:  # where user namespaces are allowed
        assert on == f"private tmpfs in a user namespace {HUGE} cannot switch: fspick: Operation not permitted"


# -- the destination's handshake, with the real engines ---------------------------------
def _hot_set_source():
    from hosts.host import SimulatedHost

    src = SimulatedHost(
        16 << 20, workload="hot-set", workload_params={"fill": 0.25, "hot_pages": 256}, rate=4000, seed=3
    )
    src.prepare_guest()
    src.vcpus.start()
    return src


def _huge_dest(mode="auto", prealloc=False):
    from hosts.host import SimulatedHost

    dst = SimulatedHost(
        16 << 20,
        workload="hot-set",
        workload_params={"fill": 0.25, "hot_pages": 256},
        rate=4000,
        seed=3,
        huge_pages=mode,
    )
    if prealloc:
        dst.memory.prefault(0, dst.memory.npages)
    return dst


async def _migrate(src, dst, src_config, dst_config):
    from support import open_listener, run_engines

    listener = open_listener()
    try:
        sres, dres, _, _ = await run_engines(src, dst, src_config, listener, dst_config)
    finally:
        listener.close()
    return sres, dres


POSTCOPY = MigrationConfig(strategy="memfd-continue", postcopy=True, postcopy_after_passes=0, channels=1)
PLAIN = MigrationConfig(strategy="memfd-continue", channels=1)


@needs_huge
async def test_an_empty_destination_on_huge_pages_turns_to_small_ones_for_a_postcopy_source():
    src, dst = _hot_set_source(), _huge_dest()
    try:
        assert dst.memory.backing == "huge"
        sres, dres = await _migrate(src, dst, POSTCOPY.check(), PLAIN.check())  # only the source said postcopy
        assert sres["status"] == dres["status"] == "completed", (sres["error"], dres["error"])
        assert sres["validation"]["ok"] and sres["validation"]["mode"] == "postcopy"
        assert dst.memory.backing == "4k" and "postcopy" in dst.memory.backing_note
        assert dres["postcopy"]["guest_wrong_tag_accesses"] == 0
    finally:
        src.close()
        dst.close()


@needs_huge
@pytest.mark.parametrize("mode, prealloc, why", [("on", False, "--huge-pages on"), ("auto", True, "--prealloc")])
async def test_a_destination_that_cannot_turn_to_small_pages_refuses_a_postcopy_source(mode, prealloc, why):
    src, dst = _hot_set_source(), _huge_dest(mode, prealloc)
    try:
        sres, dres = await _migrate(src, dst, POSTCOPY.check(), PLAIN.check())
        assert sres["status"] == dres["status"] == "failed"
        for error in (sres["error"], dres["error"]):
            assert "may switch to postcopy" in error and why in error and "--huge-pages off" in error
        assert sres["guest_on"] == "source" and src.vcpus.running  # nothing lost: the guest runs on there
        assert dst.memory.backing == "huge"
    finally:
        src.close()
        dst.close()


async def test_postcopy_frames_after_a_hello_without_postcopy_are_refused(monkeypatch):
    # a source that switches to postcopy without having said so in HELLO
    from migrate.engine import handshake

    real = handshake._hello
    monkeypatch.setattr(handshake, "_hello", lambda host, config, *a: real(host, replace(config, postcopy=False), *a))
    src, dst = _hot_set_source(), _huge_dest("off")
    try:
        sres, dres = await _migrate(src, dst, POSTCOPY.check(), PLAIN.check())
        assert dres["status"] == "failed", dres["error"]
        assert "did not say it may switch to postcopy" in sres["error"] + dres["error"], (sres["error"], dres["error"])
        assert sres["status"] != "completed" and dres["guest_on"] != "destination"
    finally:
        src.close()
        dst.close()


def test_the_postcopy_bench_says_which_pages_each_destination_had(monkeypatch):
    from migrate.tools import postcopy_bench

    def fake_run_pair(guest, config, scenario, quiet=True):
        return {
            "status": "completed",
            "total_time_ms": 100.0,
            "downtime_ms": 5.0,
            "destination": {"ram_backing": "4k" if config.postcopy else "huge"},
        }

    monkeypatch.setattr(postcopy_bench, "run_pair", fake_run_pair)
    doc = postcopy_bench.run("hot-set", 16 << 20, 1, quiet=True)
    backing = {e["case"]: e["dest_ram"] for e in doc["summary"]}
    assert backing["precopy, auto-converge"] == ["huge"] and backing["postcopy, memfd-continue"] == ["4k"]
    text = postcopy_bench.markdown(doc, "mte-migrate bench --postcopy")
    assert "| destination RAM |" in text and text.count("| huge |") == 2 and text.count("| 4k |") == 3
