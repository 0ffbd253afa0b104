"""The source and destination engines end to end in one process: two
simulated hosts, a real loopback TCP connection, one asyncio loop.

Every migration is checked independently of the engines' own validation:
after the hand-over the source guest is paused, so its memory, tags and vCPU
state can be compared with the destination's directly (digest.MemoryDigest
reads the simulated kernels' storage, never a strategy)."""

import asyncio
import os
import socket
import struct
import threading
import time
import types
import zlib

import msgpack
import pytest
import zstandard
from support import address, digests, run_engines, steps_advance

from hosts.constants import GRANULE, PAGE_SIZE
from hosts.hugemem import HUGE_PAGE, huge_page_file
from migrate.config.spec import MigrationConfig
from migrate.engine.dest import DestVmm
from migrate.engine.digest import CHUNK_PAGES, MemoryDigest
from migrate.engine.source import SourceVmm
from migrate.protocol import frames as fr
from migrate.protocol.frames import PROTOCOL_VERSION
from migrate.protocol.machine import DestState, SourceState
from migrate.units import fmt_bytes

MiB = 1 << 20
RAM = 32 * MiB
WAIT = 60.0  # generous: the machine is shared and noisy


# -- building hosts ------------------------------------------------------------------
async def migrate_pair(src, dst, config, listener, dest_config=None):
    """Run both engines concurrently; returns (source result, destination result)."""
    sres, dres, _, _ = await run_engines(src, dst, config, listener, dest_config)
    return sres, dres


async def wait_until(predicate, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def assert_identical_guests(src, dst):
    """Independent check: memory, tags and vCPU state of the paused source
    equal the destination's."""
    assert not src.vcpus.running, "the source must have given the guest up"
    assert dst.vcpus.running, "the destination must run the guest"
    assert digests(src) == digests(dst)
    # The destination guest runs at rate 0, so its state is the migrated one.
    src_states = src.vcpus.get_states()
    assert [(s.index, s.regs, s.sysregs) for s in src_states] == [
        (s.index, s.regs, s.sysregs) for s in dst.vcpus.states
    ]
    assert any("GCR_EL1" in s.sysregs for s in src_states)  # the MTE registers travelled too


def assert_completed(sres, dres):
    assert sres["status"] == "completed", sres["error"]
    assert sres["error"] is None
    assert sres["guest_on"] == "destination"
    val = sres["validation"]
    assert val["ok"] is True
    assert val["data_mismatches"] == 0 and val["tag_mismatches"] == 0
    assert val["state_ok"] is True
    assert dres["status"] == "completed", dres["error"]
    assert dres["guest_on"] == "destination"


# -- completed migrations -------------------------------------------------------------
WORKLOADS = {
    "allocator": None,
    "retag-churn": {"fill": 0.5},
    "device-dma": {"fill": 0.25, "dma_policy": "tco"},
    "stream": {"fill": 0.5, "pages_per_step": 16},
}


@pytest.mark.parametrize("strategy", ["tag-ioctl", "prot-mte"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
async def test_running_guest_migrates_with_every_tag(hosts, listener, workload, strategy):
    src = hosts.source(workload=workload, strategy=strategy, params=WORKLOADS[workload], rate=5000)
    dst = hosts.dest()
    tagged_at_start = src.memory.tagged.count(1)
    assert tagged_at_start > 0
    await asyncio.sleep(0.1)  # let the guest run a little first
    assert steps_advance(src)
    sres, dres = await migrate_pair(src, dst, MigrationConfig(strategy=strategy), listener)

    assert_completed(sres, dres)
    assert sres["strategy"] == strategy and dres["strategy"] == strategy
    assert sres["validation"]["pages_checked"] == src.memory.npages
    assert sres["tags"]["tagged_pages"] > 0 and sres["tags"]["raw_bytes"] > 0
    assert dres["tags"]["tagged_pages"] == sres["tags"]["tagged_pages"]
    assert sres["passes"][0]["pass"] == 0 and sres["passes"][-1]["final"] is True
    assert sres["downtime_ms"] is not None and sres["downtime_ms"] >= 0
    assert_identical_guests(src, dst)
    # The destination holds tags, and at least as many tagged pages as the
    # source had at the start (tagging is never undone by these workloads).
    assert dst.memory.tagged.count(1) >= tagged_at_start
    counters = sres["counters"]
    if strategy == "tag-ioctl":
        assert counters.get("syscalls.kvm_arm_mte_copy_tags", 0) > 0
        assert counters.get("el0.ldg", 0) == 0
    else:
        assert counters.get("syscalls.kvm_arm_mte_copy_tags", 0) == 0
        assert counters.get("el0.ldg", 0) > 0  # per-granule EL0 tag loads
    assert dres["counters"].get("syscalls.kvm_arm_mte_copy_tags", 0) > 0 or dres["counters"].get("el0.stg", 0) > 0
    assert not src.vm.dirty_logging() and not src.vmm_dirty.enabled


async def test_bandwidth_cap_forces_dirty_passes(hosts, listener):
    src = hosts.source(ram=16 * MiB, workload="allocator", rate=5000)
    dst = hosts.dest(16 * MiB)
    config = MigrationConfig(max_bandwidth=4 * MiB, downtime_limit_ms=20, max_passes=4)
    sres, dres = await migrate_pair(src, dst, config, listener)

    assert_completed(sres, dres)
    passes = sres["passes"]
    assert len(passes) >= 3, passes
    assert [p["pass"] for p in passes] == list(range(len(passes)))
    assert all(not p["final"] for p in passes[:-1]) and passes[-1]["final"]
    assert sres["dirty_sync_count"] >= len(passes)
    assert_identical_guests(src, dst)


async def test_hot_set_that_cannot_converge_is_forced_by_the_pass_limit(hosts, listener):
    src = hosts.source(workload="hot-set", rate=20000, params={"fill": 0.25, "hot_pages": 2048})
    dst = hosts.dest()
    config = MigrationConfig(max_bandwidth=10 * MiB, downtime_limit_ms=0.001, max_passes=2)
    sres, dres = await migrate_pair(src, dst, config, listener)

    assert_completed(sres, dres)
    conv = sres["convergence"]
    assert conv["forced"] is True
    assert "max passes 2" in conv["reason"]
    assert len(sres["passes"]) == 4  # bulk, two dirty passes, final
    assert_identical_guests(src, dst)


async def test_full_validation_compares_every_page(hosts, listener):
    src = hosts.source(workload="retag-churn", params={"fill": 0.5})
    dst = hosts.dest()
    sres, dres = await migrate_pair(src, dst, MigrationConfig(validate="full"), listener)

    assert_completed(sres, dres)
    val = sres["validation"]
    assert val["mode"] == "full"
    assert val["pages_checked"] == src.memory.npages == RAM // PAGE_SIZE
    assert val["first_mismatches"] == []
    # Every page's detail (4-byte CRC + 128 bytes of tags) came back from the destination.
    assert sres["wire"]["bytes_received"] >= src.memory.npages * (4 + 128)
    assert_identical_guests(src, dst)


async def test_digest_validation_does_not_fetch_page_detail(hosts, listener):
    src = hosts.source(workload="retag-churn", params={"fill": 0.5})
    dst = hosts.dest()
    sres, dres = await migrate_pair(src, dst, MigrationConfig(), listener)

    assert_completed(sres, dres)
    assert sres["validation"]["mode"] == "digest"
    assert sres["wire"]["bytes_received"] < src.memory.npages * (4 + 128) // 4


# -- validation must be able to fail --------------------------------------------------------
async def test_strategy_none_loses_tags_and_the_guest_stays_on_the_source(hosts, listener):
    src = hosts.source(workload="allocator", strategy="none", rate=2000)
    dst = hosts.dest()
    sres, dres = await migrate_pair(src, dst, MigrationConfig(strategy="none"), listener)

    assert sres["status"] == "failed"
    assert sres["teardown_ms"] is None  # counted in total_time_ms: the guest resumed here during it
    val = sres["validation"]
    assert val["ok"] is False
    assert val["tag_mismatches"] > 0
    assert val["data_mismatches"] == 0  # data made it; only the tags are lost
    assert any(m["kind"] == "tags" and m.get("granules") for m in val["first_mismatches"])
    assert "validation" in sres["error"] and "\n" not in sres["error"]
    assert sres["guest_on"] == "source"
    assert src.vcpus.running
    assert steps_advance(src), "the source guest must run again after a failed migration"
    assert dres["status"] != "completed"
    assert not dst.vcpus.running
    assert sres["tags"]["tagged_pages"] == 0 and sres["tags"]["wire_bytes"] == 0
    assert not src.vm.dirty_logging() and not src.vmm_dirty.enabled

    # The failure lost nothing: the same guest migrates with tags afterwards.
    dst2 = hosts.dest()
    with socket.create_server(("127.0.0.1", 0)) as listener2:
        sres2, dres2 = await migrate_pair(src, dst2, MigrationConfig(strategy="tag-ioctl"), listener2)
    assert_completed(sres2, dres2)
    assert_identical_guests(src, dst2)


# -- handshake --------------------------------------------------------------------------------
async def test_ram_size_mismatch_fails_both_sides_with_the_reason(hosts, listener):
    src = hosts.source(ram=32 * MiB, workload="idle", rate=0)
    dst = hosts.dest(64 * MiB)
    sres, dres = await migrate_pair(src, dst, MigrationConfig(), listener)

    expected = f"RAM size differs: source {fmt_bytes(32 * MiB)}, destination {fmt_bytes(64 * MiB)}"
    assert expected == "RAM size differs: source 32 MiB, destination 64 MiB"
    assert sres["status"] == "failed" and dres["status"] == "failed"
    assert expected in sres["error"]
    assert expected in dres["error"]
    assert sres["guest_on"] == "source" and src.vcpus.running
    assert not dst.vcpus.running
    assert sres["ram"]["normal_pages"] == 0  # nothing was sent


async def test_destination_insisting_on_another_strategy_refuses(hosts, listener):
    src = hosts.source(workload="idle", rate=0)
    dst = hosts.dest()
    dest_engine = DestVmm(dst, MigrationConfig(strategy="prot-mte"), strategy="prot-mte")
    dest_task = asyncio.ensure_future(dest_engine.serve(listener))
    sres = await asyncio.wait_for(SourceVmm(src, MigrationConfig()).migrate(address(listener)), WAIT)
    dres = await asyncio.wait_for(dest_task, WAIT)
    assert sres["status"] == dres["status"] == "failed"
    assert "strategy differs: source tag-ioctl, destination prot-mte" in sres["error"]
    assert "strategy differs" in dres["error"]
    assert src.vcpus.running and not dst.vcpus.running


# -- a second source while one migrates --------------------------------------------------------
async def test_second_connection_is_refused_while_busy(hosts, listener):
    src = hosts.source(ram=16 * MiB, workload="allocator", rate=2000)
    dst = hosts.dest(16 * MiB)
    config = MigrationConfig(max_bandwidth=4 * MiB)
    dest_engine = DestVmm(dst, config)
    dest_task = asyncio.ensure_future(dest_engine.serve(listener))
    src_task = asyncio.ensure_future(SourceVmm(src, config).migrate(address(listener)))
    try:
        await wait_until(
            lambda: dest_engine.machine is not None and dest_engine.machine.state == DestState.RECEIVING,
            "the destination to receive",
        )
        # A second source: it connects and says HELLO, as any source would.
        reader, writer = await asyncio.open_connection(*address(listener))
        data = b""
        try:
            try:  # the destination may refuse before hearing anything
                data = await asyncio.wait_for(reader.read(1 << 16), 0.5)
            except TimeoutError:
                writer.write(hello_for(dst))
                await writer.drain()
            if data or not reader.at_eof():
                data += await asyncio.wait_for(reader.read(), WAIT)  # until the destination closes it
        except ConnectionError:
            pass
        finally:
            writer.close()
        assert not src_task.done(), "the first migration should still be in progress"
        frames = fr.FrameBuffer().feed(data)
        assert len(frames) == 1, frames
        assert frames[0].type == fr.FrameType.ERROR
        assert frames[0].code == "busy"
        assert "already receiving a migration" in frames[0].message

        sres = await asyncio.wait_for(src_task, WAIT)
        dres = await asyncio.wait_for(dest_task, WAIT)
    finally:
        src_task.cancel()
        dest_task.cancel()
    assert_completed(sres, dres)
    assert_identical_guests(src, dst)


# -- a hostile stream ---------------------------------------------------------------------------
def raw(ftype, meta, payload=b"", checksum=True) -> bytes:
    """Any frame, well-formed or not, encoded by the real codec."""
    frame = types.SimpleNamespace(type=ftype, meta=lambda: meta, payload=lambda: [payload])
    return b"".join(bytes(b) for b in fr.encode(frame, checksum))


def hello_for(dst, **changes) -> bytes:
    """A HELLO that ``dst`` accepts, with ``changes`` to its fields."""
    meta = fr.Hello(
        version=PROTOCOL_VERSION,
        ram_size=dst.memory.size,
        page_size=PAGE_SIZE,
        granule=GRANULE,
        mte=True,
        vcpus=dst.vcpus.count,
        strategy="tag-ioctl",
        tag_format="packed4",
        compression="zstd",
    ).meta()
    meta.update(changes)
    return raw(fr.FrameType.HELLO, meta)


def encoded(frame) -> bytes:
    return b"".join(bytes(b) for b in fr.encode(frame))


def handshake(dst, **changes) -> list:
    """What a source without a shared key sends to reach the RECEIVING state:
    HELLO, then (after WELCOME) an empty AUTH."""
    return [hello_for(dst, **changes), encoded(fr.Auth(b""))]


def pages(first, count, flags=None, data=b"", tags=b"", dc=False, tc=False) -> bytes:
    flags = bytes([fr.PAGE_ZERO]) * count if flags is None else flags
    return encoded(fr.Pages(0, [(first, count)], flags, data, tags, dc, tc))


def header(ftype, meta_len, payload_len, flags=fr.FLAG_CRC) -> bytes:
    """A bare header (for bounds that must be refused before any body is read)."""
    return fr.HEADER.pack(fr.MAGIC, ftype, flags, meta_len, payload_len, 0)


def with_crc(ftype, meta_bytes: bytes, payload: bytes = b"") -> bytes:
    """A frame with arbitrary meta bytes and a correct checksum."""
    head = struct.pack("<2sBBII", fr.MAGIC, ftype, fr.FLAG_CRC, len(meta_bytes), len(payload))
    crc = zlib.crc32(payload, zlib.crc32(meta_bytes, zlib.crc32(head)))
    return head + struct.pack("<I", crc) + meta_bytes + payload


NPAGES = RAM // PAGE_SIZE
HOSTILE = {
    "garbage": (lambda d: [b"GET / HTTP/1.1\r\n"], "magic"),
    "unknown frame type": (lambda d: [header(99, 0, 0)], "unknown frame type 99"),
    "unknown flags": (lambda d: [header(fr.FrameType.HELLO, 0, 0, flags=0x81)], "flags"),
    "huge payload length": (lambda d: [header(fr.FrameType.PAGES, 10, 1 << 31)], "exceeds the limit"),
    "huge meta length": (lambda d: [header(fr.FrameType.HELLO, 1 << 30, 0)], "exceeds the limit"),
    "bad checksum": (lambda d: [hello_for(d)[:-1] + b"X"], "checksum"),
    "meta not msgpack": (lambda d: [with_crc(fr.FrameType.HELLO, b"\xc1\xc1\xc1")], "msgpack"),
    "meta not a map": (lambda d: [with_crc(fr.FrameType.HELLO, msgpack.packb([1, 2, 3]))], "map"),
    "wrong field type": (lambda d: [hello_for(d, ram_size="32MiB")], "ram_size"),
    "missing field": (lambda d: [raw(fr.FrameType.HELLO, {"version": PROTOCOL_VERSION})], "missing field"),
    "GO before HELLO": (lambda d: [encoded(fr.Go())], "unexpected GO"),
    "GO straight after HELLO": (lambda d: [*handshake(d), encoded(fr.Go())], "unexpected GO"),
    "COMPLETE without STATE": (lambda d: [*handshake(d), encoded(fr.Complete("a", "b", "c"))], "unexpected COMPLETE"),
    "pages out of range": (lambda d: [*handshake(d), pages(NPAGES, 1)], "outside guest RAM"),
    "pages range overflowing": (lambda d: [*handshake(d), pages(2**64 - 1, 1)], "outside guest RAM"),
    "flags count differs": (lambda d: [*handshake(d), pages(0, 2, flags=b"\x01")], "flags"),
    "unknown page flag": (lambda d: [*handshake(d), pages(0, 1, flags=b"\x09")], "unknown page flag"),
    "raw data too short": (lambda d: [*handshake(d), pages(0, 1, flags=b"\x00", data=b"x" * 100)], "expected 4096"),
    "decompression bomb": (
        lambda d: [
            *handshake(d),
            pages(0, 1, flags=b"\x00", dc=True, data=zstandard.ZstdCompressor().compress(bytes(64 * MiB))),
        ],
        "expected 4096",
    ),
    "not zstd": (lambda d: [*handshake(d), pages(0, 1, flags=b"\x00", dc=True, data=b"\x00" * 64)], "zstd"),
    "tags for a strategy without tags": (
        lambda d: [
            *handshake(d, strategy="none", tag_format="none"),
            pages(0, 1, flags=bytes([fr.PAGE_TAGS | fr.PAGE_ZERO]), tags=b"\x11" * 128),
        ],
        "tags",
    ),
    "invalid STATE": (lambda d: [*handshake(d), encoded(fr.State({"vcpus": "nonsense"}))], "STATE"),
    "INSPECT before COMPLETE": (lambda d: [*handshake(d), encoded(fr.Inspect([0]))], "unexpected INSPECT"),
    "stream ends inside a frame": (lambda d: [*handshake(d), pages(0, 1)[:20]], "inside a frame"),
    "stream ends between frames": (lambda d: handshake(d), "closed the connection"),
    "GO straight after AUTH": (lambda d: [*handshake(d), encoded(fr.Go())], "unexpected GO"),
    "PAGES before AUTH": (lambda d: [hello_for(d), pages(0, 1)], "unexpected PAGES"),
    "unsupported strategy": (lambda d: [hello_for(d, strategy="telepathy")], "telepathy"),
    "protocol version": (lambda d: [hello_for(d, version=PROTOCOL_VERSION + 1)], "protocol version differs"),
    "frame without checksum": (
        lambda d: [raw(fr.FrameType.HELLO, {"version": PROTOCOL_VERSION}, checksum=False)],
        "checksum",
    ),
}


async def feed_destination(dst, chunks, config=None):
    """Connect a raw client to DestVmm.serve, send ``chunks``, half-close,
    and collect whatever the destination answers.  Returns (engine, result,
    frames it sent back, or None if they do not decode)."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        engine = DestVmm(dst, config or MigrationConfig(timeout_s=5))
        task = asyncio.ensure_future(engine.serve(listener))
        reader, writer = await asyncio.open_connection(*address(listener))
        received = b""
        try:
            for chunk in chunks:
                writer.write(chunk)
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            try:
                received = await asyncio.wait_for(reader.read(), WAIT)
            except ConnectionError:
                pass  # the destination may reset a connection it stopped reading
            result = await asyncio.wait_for(task, WAIT)
        finally:
            writer.close()
            task.cancel()
    finally:
        listener.close()
    try:
        frames = fr.FrameBuffer().feed(received)
    except Exception:
        frames = None
    return engine, result, frames


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_hostile_stream_fails_cleanly_and_never_resumes(hosts, case):
    dst = hosts.dest()
    make, expected = HOSTILE[case]
    engine, result, frames = await feed_destination(dst, make(dst))

    assert result["status"] == "failed"
    error = result["error"]
    assert error and "\n" not in error
    assert expected.lower() in error.lower(), error
    assert "Traceback" not in error and "internal error" not in error
    assert not dst.vcpus.running
    assert not engine.resumed
    assert result["guest_on"] != "destination"
    assert engine.machine.state in (DestState.FAILED, DestState.ABORTED)


async def test_hostile_pages_get_an_error_frame_naming_the_problem(hosts):
    dst = hosts.dest()
    engine, result, frames = await feed_destination(dst, [*handshake(dst), pages(NPAGES + 5, 3)])
    assert result["status"] == "failed"
    assert [f.type for f in frames] == [fr.FrameType.WELCOME, fr.FrameType.ERROR]
    assert frames[1].code == "protocol"
    assert f"pages {NPAGES + 5}..{NPAGES + 7}" in frames[1].message
    assert "outside guest RAM" in frames[1].message
    assert frames[1].message == result["error"]
    assert not dst.vcpus.running


async def test_partial_guest_is_never_resumed_after_valid_pages(hosts):
    """Real pages land, then the stream dies before completion: no resume."""
    dst = hosts.dest()
    data = bytes(range(256)) * (PAGE_SIZE // 256)
    chunks = [*handshake(dst), pages(0, 1, flags=b"\x00", data=data), encoded(fr.PassEnd(0, 1))]
    engine, result, frames = await feed_destination(dst, chunks)
    assert result["status"] == "failed"
    assert "closed the connection" in result["error"]
    assert result["ram"]["normal_pages"] == 1
    assert not dst.vcpus.running and not engine.resumed


async def test_hostile_handshake_mismatch_sends_error_frame(hosts):
    dst = hosts.dest()
    engine, result, frames = await feed_destination(dst, [hello_for(dst, ram_size=RAM * 2)])
    assert result["status"] == "failed"
    assert frames and frames[0].type == fr.FrameType.ERROR and frames[0].code == "mismatch"
    assert "RAM size differs: source 64 MiB, destination 32 MiB" in frames[0].message


# -- cancel and peer death ------------------------------------------------------------------------
async def test_cancel_mid_migration_keeps_the_guest_on_the_source(hosts, listener):
    src = hosts.source(ram=16 * MiB, workload="allocator", rate=0)
    dst = hosts.dest(16 * MiB)
    before = digests(src)
    config = MigrationConfig(max_bandwidth=2 * MiB)
    source_engine = SourceVmm(src, config)
    dest_engine = DestVmm(dst, config)
    dest_task = asyncio.ensure_future(dest_engine.serve(listener))
    src_task = asyncio.ensure_future(source_engine.migrate(address(listener)))
    try:
        await wait_until(
            lambda: source_engine.machine is not None and source_engine.machine.state == SourceState.PRECOPY, "precopy"
        )
        await asyncio.sleep(0.3)
        assert not src_task.done()
        src_task.cancel()
        try:
            sres = await asyncio.wait_for(src_task, WAIT)
        except asyncio.CancelledError:
            sres = source_engine.result
        dres = await asyncio.wait_for(dest_task, WAIT)
    finally:
        src_task.cancel()
        dest_task.cancel()

    assert sres["status"] == "cancelled"
    assert sres["error"] and "\n" not in sres["error"]
    assert sres["guest_on"] == "source"
    assert src.vcpus.running
    assert digests(src) == before, "a cancelled migration must leave memory and tags untouched"
    assert not src.vm.dirty_logging() and not src.vmm_dirty.enabled
    assert dres["status"] != "completed"
    assert "abort" in (dres["error"] or "").lower()
    assert not dst.vcpus.running

    # Nothing lost: a new migration of the same guest can start and completes.
    dst2 = hosts.dest(16 * MiB)
    with socket.create_server(("127.0.0.1", 0)) as listener2:
        sres2, dres2 = await migrate_pair(src, dst2, MigrationConfig(), listener2)
    assert_completed(sres2, dres2)
    assert digests(dst2) == before
    assert_identical_guests(src, dst2)


async def test_destination_cancelled_mid_migration_source_resumes(hosts, listener):
    src = hosts.source(ram=16 * MiB, workload="allocator", rate=2000)
    dst = hosts.dest(16 * MiB)
    config = MigrationConfig(max_bandwidth=2 * MiB, timeout_s=5)
    source_engine = SourceVmm(src, config)
    dest_engine = DestVmm(dst, config)
    dest_task = asyncio.ensure_future(dest_engine.serve(listener))
    src_task = asyncio.ensure_future(source_engine.migrate(address(listener)))
    try:
        await wait_until(
            lambda: dest_engine.machine is not None and dest_engine.machine.state == DestState.RECEIVING,
            "the destination to receive",
        )
        await asyncio.sleep(0.3)
        dest_task.cancel()
        listener.close()
        try:
            dres = await asyncio.wait_for(dest_task, WAIT)
        except asyncio.CancelledError:
            dres = dest_engine.result
        sres = await asyncio.wait_for(src_task, WAIT)
    finally:
        src_task.cancel()
        dest_task.cancel()

    assert sres["status"] == "failed"
    error = sres["error"]
    assert error and "\n" not in error
    assert "connection" in error.lower() or "closed" in error.lower(), error
    assert sres["guest_on"] == "source"
    assert src.vcpus.running and steps_advance(src)
    assert dres["status"] != "completed"
    assert not dst.vcpus.running


async def _fake_destination(reader, writer, die_on):
    """A destination that accepts the handshake, swallows frames and
    disappears (closes the connection) when it sees a frame of type ``die_on``."""
    buf = fr.FrameBuffer()
    seen = []
    control = False
    while True:
        data = await reader.read(1 << 20)
        if not data:
            break
        for frame in buf.feed(data):
            seen.append(frame.type)
            control = control or frame.type.name == "HELLO"
            if frame.type.name in ("HELLO", "JOIN"):  # JOIN: an extra data connection, if any
                writer.write(encoded(fr.Welcome(PROTOCOL_VERSION)))
                await writer.drain()
            if frame.type.name == "PASS_END" and control:  # the pass has landed, says the control connection
                writer.write(encoded(fr.Applied(frame.pass_no)))
                await writer.drain()
            if frame.type == die_on:
                writer.transport.abort()
                return seen
    writer.close()
    return seen


@pytest.mark.parametrize("die_on", [fr.FrameType.STATE, fr.FrameType.COMPLETE])
async def test_destination_dying_during_stop_and_copy_resumes_the_paused_guest(hosts, die_on):
    src = hosts.source(ram=16 * MiB, workload="allocator", rate=2000)
    seen = []

    async def handle(reader, writer):
        seen.extend(await _fake_destination(reader, writer, die_on))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        engine = SourceVmm(src, MigrationConfig(timeout_s=5))
        sres = await asyncio.wait_for(engine.migrate(("127.0.0.1", port)), WAIT)
    finally:
        server.close()
    assert die_on in seen
    assert SourceState.STOP_COPY in engine.machine.history  # the guest had been paused
    assert sres["status"] == "failed"
    error = sres["error"]
    assert error and "\n" not in error
    assert "connection" in error.lower() or "closed" in error.lower() or "peer" in error.lower(), error
    assert sres["guest_on"] == "source"
    assert src.vcpus.running
    assert steps_advance(src), "the paused guest must run again on the source"


async def test_unreachable_destination_fails_with_one_line(hosts):
    src = hosts.source(workload="idle", rate=0)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sres = await asyncio.wait_for(SourceVmm(src, MigrationConfig(timeout_s=5)).migrate(("127.0.0.1", port)), WAIT)
    assert sres["status"] == "failed"
    assert f"127.0.0.1:{port}" in sres["error"] and "refused" in sres["error"]
    assert "\n" not in sres["error"]
    assert sres["guest_on"] == "source" and src.vcpus.running


async def _migrate_a_writing_guest(hosts, listener, workload, strategy, validate):
    """A guest writing all along, over a capped link so that several passes
    run; returns the source's result and engine, once its digest is frozen."""
    src = hosts.source(workload=workload, strategy=strategy, params=WORKLOADS[workload], rate=5000)
    dst = hosts.dest()
    await asyncio.sleep(0.05)
    config = MigrationConfig(strategy=strategy, max_bandwidth=12_000_000, max_passes=4, validate=validate)
    sres, dres, engine, _ = await run_engines(src, dst, config, listener)
    assert_completed(sres, dres)
    assert len(sres["passes"]) >= 2 and sres["passes"][-1]["pages"] > 0  # changes after the bulk pass
    fresh = MemoryDigest(src.memory)
    assert not engine._digest.pending()
    assert (engine._digest.data_crcs, engine._digest.tag_crcs) == (fresh.data_crcs, fresh.tag_crcs)
    return src, sres


@pytest.mark.parametrize(
    "workload, strategy", [("allocator", "tag-ioctl"), ("retag-churn", "tag-dirty-log"), ("device-dma", "prot-mte")]
)
async def test_incremental_source_digest_equals_a_fresh_one(hosts, listener, workload, strategy):
    # With --validate tracked the source digests chunks while the guest runs
    # and re-reads only the chunks a dirty harvest (or a tags-dirty harvest)
    # marked stale; on the frozen guest that must equal a digest computed
    # from scratch -- the bandwidth cap makes several passes, so stale
    # marking is exercised.
    _, sres = await _migrate_a_writing_guest(hosts, listener, workload, strategy, "tracked")
    assert sres["digest"]["trusts_dirty_tracking"]


@pytest.mark.parametrize(
    "workload, strategy, writes_data",
    [("allocator", "tag-ioctl", True), ("retag-churn", "tag-dirty-log", False), ("device-dma", "prot-mte", True)],
)
async def test_the_watched_source_digest_equals_a_fresh_one(hosts, listener, workload, strategy, writes_data):
    """The default digest: the host's write watch says what the guest
    writes, a keeper reads those chunks while it runs, and after the pause
    the pages written since, every chunk's tags and the chunks nobody wrote
    are read.  On the frozen guest that must equal a digest computed from
    scratch, with the guest (and with device-dma, the VMM's device) writing
    all along; retag-churn changes tags only, so its data is the bulk
    pass's CRCs."""
    src, sres = await _migrate_a_writing_guest(hosts, listener, workload, strategy, "digest")
    taken = sres["digest"]
    assert taken["write_watch"] == "on" and not taken["trusts_dirty_tracking"]
    populated_mib = src.memory.populated_pages() * PAGE_SIZE / (1 << 20)
    if writes_data:
        assert taken["keeper"]["mib_read"] > 0 and taken["keeper"]["pages_written"] > 0
        assert taken["mib_read_at_pause"] < populated_mib / 2  # not a re-read of RAM
    else:
        assert taken["keeper"]["mib_read"] == 0 and taken["keeper"]["pages_written"] == 0


async def test_the_bulk_pass_waits_for_the_watch_to_protect_a_chunk_before_its_crc_stands(hosts, listener, monkeypatch):
    """The write watch protects RAM a step at a time, in the background,
    ahead of the bulk pass: a chunk's CRC stands as its digest only once
    its pages are watched, and the keeper reads nothing beyond them.  Here
    each 1 MiB step takes 20 ms, so the bulk pass of 32 MiB waits at nearly
    every chunk while the guest writes; the frozen digest still equals a
    fresh one."""
    from hosts.writewatch import WriteWatch
    from migrate.engine import source as source_mod

    real = WriteWatch.protect_next

    def slow(self):
        time.sleep(0.02)
        return real(self)

    monkeypatch.setattr(WriteWatch, "protect_next", slow)
    monkeypatch.setattr(source_mod, "WATCH_STEP", MiB)
    src = hosts.source(workload="allocator", params=WORKLOADS["allocator"], rate=5000)
    dst = hosts.dest()
    sres, dres, engine, _ = await run_engines(src, dst, MigrationConfig(), listener)
    assert_completed(sres, dres)
    assert sres["digest"]["write_watch"] == "on"
    assert sres["passes"][0]["seconds"] >= 0.3  # 31 steps after the first: it waited for them
    fresh = MemoryDigest(src.memory)
    assert not engine._digest.pending()
    assert (engine._digest.data_crcs, engine._digest.tag_crcs) == (fresh.data_crcs, fresh.tag_crcs)
    assert_identical_guests(src, dst)


@pytest.mark.parametrize("checksum", ["full", "meta"])
async def test_the_bulk_pass_crcs_serve_as_the_digest_of_what_nobody_writes_after(hosts, listener, checksum):
    """A guest that writes nothing: with checked frames the bulk pass's CRC
    of each whole chunk it read from guest RAM is that chunk's digest, and
    the write watch reports nothing since, so neither the keeper nor the
    pause reads RAM again.  Unchecked frames take no CRC: the pause reads."""
    src = hosts.source(ram=16 * MiB, workload="idle", params={"fill": 1.0}, rate=0)
    dst = hosts.dest(ram=16 * MiB)
    sres, dres, engine, _ = await run_engines(src, dst, MigrationConfig(checksum=checksum), listener)
    assert_completed(sres, dres)
    taken = sres["digest"]
    assert taken["write_watch"] == "on" and taken["keeper"]["mib_read"] == 0
    if checksum == "full":
        assert taken["mib_read_at_pause"] == 0
    else:
        assert taken["mib_read_at_pause"] == 16
    assert engine._digest.data_crcs == MemoryDigest(src.memory).data_crcs


async def test_a_host_without_a_write_watch_reads_all_again_after_the_pause(hosts, listener, monkeypatch):
    from hosts.writewatch import WatchUnavailable

    src = hosts.source(ram=16 * MiB, rate=3000)
    dst = hosts.dest(ram=16 * MiB)

    def cannot(step=None):
        raise WatchUnavailable("no watch on this test host")

    monkeypatch.setattr(src, "watch_writes", cannot)
    sres, dres, _, _ = await run_engines(src, dst, MigrationConfig(), listener)
    assert_completed(sres, dres)
    assert sres["digest"]["taken"] == "re-read after the pause"
    assert sres["digest"]["write_watch"] == "no watch on this test host"
    assert sres["digest"]["mib_read_at_pause"] > 0


async def test_a_write_watch_that_fails_midway_costs_a_re_read_not_a_verdict(hosts, listener, monkeypatch):
    """The keeper's scan fails once the migration runs: the keeper gives up
    its digest, the scan at the pause fails too, and the source reads all
    its RAM again; the guest still migrates, validated."""
    from hosts.writewatch import WriteWatch

    real, calls = WriteWatch.written, []

    def failing(self):
        calls.append(1)
        if len(calls) > 1:  # the first is the probe when the watch opens
            raise OSError(5, "Input/output error")
        return real(self)

    monkeypatch.setattr(WriteWatch, "written", failing)
    src = hosts.source(ram=16 * MiB, rate=3000)
    dst = hosts.dest(ram=16 * MiB)
    sres, dres, _, _ = await run_engines(src, dst, MigrationConfig(), listener)
    assert_completed(sres, dres)
    assert sres["digest"]["taken"] == "re-read after the pause"
    assert "the write watch failed at the pause" in sres["digest"]["write_watch"]
    assert sres["digest"]["mib_read_at_pause"] > 0


async def test_the_source_reads_its_frozen_memory_while_its_event_loop_is_busy(hosts, listener):
    """The independent re-read starts at the pause in threads that need
    nothing from the event loop, which is busy with the final pass: here the
    loop is held outright until the reading is done (through the loop, each
    of its steps waited for a turn, and it began 20 ms into the downtime)."""
    src = hosts.source(ram=16 * MiB, rate=3000)
    dst = hosts.dest(ram=16 * MiB)
    held = {}

    class BusyLoopSource(SourceVmm):
        def _start_final_digest(self):
            super()._start_final_digest()
            t = time.monotonic()
            while not self._digest_reading.done() and time.monotonic() - t < 10:
                time.sleep(0.001)  # the event loop gets no turn meanwhile
            held["read_meanwhile"] = self._digest_reading.done()

    config = MigrationConfig(validate="reread")
    sres, dres, _, _ = await run_engines(src, dst, config, listener, source_cls=BusyLoopSource)
    assert_completed(sres, dres)
    assert held["read_meanwhile"]
    assert sres["digest"]["taken"] == "re-read after the pause" and sres["digest"]["mib_read_at_pause"] > 0


async def test_destination_digests_while_the_source_still_digests(hosts, listener, monkeypatch):
    """Its final digest starts once every channel delivered the final pass
    (the source's STATE follows it), not after the source's COMPLETE: the
    two digests overlap inside the downtime."""
    src = hosts.source(ram=16 * MiB, rate=3000)
    dst = hosts.dest(ram=16 * MiB)
    marks = {}

    class SlowDigestSource(SourceVmm):
        async def _final_digest(self, reading):
            digest = await super()._final_digest(reading)
            await asyncio.sleep(0.5)
            marks["source_complete"] = time.monotonic()  # COMPLETE goes out right after
            return digest

    real = DestVmm._final_digest

    async def timed(self):
        await real(self)
        marks["dest_digested"] = time.monotonic()

    monkeypatch.setattr(DestVmm, "_final_digest", timed)
    sres, dres, _, _ = await run_engines(src, dst, MigrationConfig(channels=2), listener, source_cls=SlowDigestSource)
    assert_completed(sres, dres)
    assert marks["dest_digested"] < marks["source_complete"]


async def test_pages_on_a_data_channel_after_the_final_pass_are_refused(hosts, listener):
    src = hosts.source(ram=16 * MiB, rate=3000)
    dst = hosts.dest(ram=16 * MiB)

    class LatePagesSource(SourceVmm):
        async def _final_digest(self, reading):
            digest = await super()._final_digest(reading)
            # After the final pass and STATE: one more batch on data channel 1
            # (chunk 1 is channel 1's), then time for the destination to see it.
            lane = self.lanes[1]
            frame, _ = lane.builder.build(self.passes[-1]["pass"], [(CHUNK_PAGES, 1)])
            await self._sender.threads[0].submit(lane.chan.send(frame))
            await asyncio.sleep(0.5)
            return digest

    sres, dres, _, _ = await run_engines(src, dst, MigrationConfig(channels=2), listener, source_cls=LatePagesSource)
    assert sres["status"] == "failed" and dres["status"] == "failed"
    assert "on data channel 1 after" in dres["error"], dres["error"]
    assert sres["guest_on"] == "source" and src.vcpus.running
    assert not dst.vcpus.running


@pytest.mark.parametrize("strategy, spliced", [("tag-ioctl", True), ("none", True), ("prot-mte", False)])
async def test_whole_chunks_are_spliced_into_guest_ram(hosts, listener, strategy, spliced):
    """Raw whole-chunk frames go from the socket into the destination's RAM
    with splice(2), checked on the landed pages; not with prot-mte, whose
    data goes through its PROT_MTE mapping.  The result is the same guest."""
    import os

    src = hosts.source(ram=16 * MiB, workload="stream", strategy=strategy, params={"fill": 0.5}, rate=0)
    for chunk in range(4):  # whole chunks of data: what is spliced
        src.memory.write(chunk * CHUNK_PAGES * PAGE_SIZE, os.urandom(CHUNK_PAGES * PAGE_SIZE))
    dst = hosts.dest(ram=16 * MiB)
    sres, dres, _, _ = await run_engines(src, dst, MigrationConfig(strategy=strategy, channels=2), listener)
    if strategy == "none":
        assert sres["status"] == "failed" and sres["validation"]["data_mismatches"] == 0  # only tags differ
    else:
        assert_completed(sres, dres)
    if spliced:
        assert dres["ram"]["spliced_bytes"] >= 4 * CHUNK_PAGES * PAGE_SIZE
    else:
        assert dres["ram"]["spliced_bytes"] == 0


class _CountingLock:
    """A writers' lock that counts how often it was taken."""

    def __init__(self):
        self.inner, self.taken = threading.Lock(), 0

    def __enter__(self):
        self.inner.acquire()
        self.taken += 1

    def __exit__(self, *exc):
        self.inner.release()


def _no_huge_pages() -> str | None:
    """Why this host gives no huge-page tmpfs, or None where it does."""
    fd, mount, why = huge_page_file(HUGE_PAGE)
    for f in (fd, mount):
        if f is not None:
            os.close(f)
    return why if fd is None else None


NO_HUGE_PAGES = _no_huge_pages()


@pytest.mark.parametrize(
    "ram",
    [
        "fresh, 4 KiB pages",
        "allocated ahead",
        pytest.param(
            "fresh, huge pages",
            marks=pytest.mark.skipif(NO_HUGE_PAGES is not None, reason=f"no huge-page tmpfs: {NO_HUGE_PAGES}"),
        ),
    ],
)
@pytest.mark.parametrize("flip", [False, True])
async def test_a_spliced_chunk_is_checked_on_the_landed_pages(hosts, flip, ram):
    """Through a real socket: the frame's meta is read, its data spliced into
    the destination's RAM under the writers' lock -- or, where RAM was
    allocated ahead or is on huge pages, received into the mapping with no
    lock, so that channels fill fresh RAM at once -- and the landed pages
    are held to the frame's data CRC: a byte flipped on the wire fails
    there, naming the pages."""
    import os

    from migrate.engine.pages import BatchApplier, BatchBuilder
    from migrate.errors import ProtocolError
    from migrate.net.transport import FrameChannel
    from migrate.protocol.compression import Compressor
    from migrate.protocol.machine import Connection, dest_machine
    from migrate.strategies import get as get_strategy

    huge = ram == "fresh, huge pages"
    src = hosts.source(ram=16 * MiB, workload="idle", rate=0, start=False)
    dst = hosts.dest(ram=16 * MiB, huge_pages=huge)
    assert dst.memory.backing == ("huge" if huge else "4k")
    lock = dst.memory._write_lock = _CountingLock()
    chunk = os.urandom(CHUNK_PAGES * PAGE_SIZE)
    src.memory.write(CHUNK_PAGES * PAGE_SIZE, chunk)  # chunk 1
    builder = BatchBuilder(
        get_strategy("tag-ioctl")(src, MigrationConfig()),
        Compressor("none"),
        CHUNK_PAGES,
        checked=True,
        digest=MemoryDigest(src.memory, compute=False),
    )
    builder.guest_runs = False  # paused: a bad CRC cannot be a torn read
    frame, _ = builder.build(0, [(CHUNK_PAGES, CHUNK_PAGES)])
    wire = bytearray(b"".join(bytes(b) for b in fr.encode(frame, "full")))
    meta_len = struct.unpack_from("<I", wire, 4)[0]
    if flip:
        wire[fr.HEADER_SIZE + meta_len + 5000] ^= 0x01
    conn = Connection(dest_machine())
    conn.machine.state = DestState.RECEIVING
    conn.ram_pages = dst.memory.npages
    strategy = get_strategy("tag-ioctl")(dst, MigrationConfig())
    strategy.setup_dest()
    applier = BatchApplier(strategy, dst.memory.npages, digest=MemoryDigest(dst.memory, compute=False))
    if ram == "allocated ahead":
        dst.memory.prefault(0, dst.memory.npages)
    lock.taken = 0
    a, b = socket.socketpair()
    chan = FrameChannel(b, conn, 5)
    targets = []
    chan.placer = lambda fields, dl: targets.append(applier.placement(fields, dl)) or targets[-1]
    a.setblocking(False)
    try:
        _, got = await asyncio.gather(asyncio.get_running_loop().sock_sendall(a, bytes(wire)), chan.recv())
        assert got.landed and got.data is None and chan.bytes_received == len(wire)
        (fd, offset, _, _, view) = targets[0]
        if ram == "fresh, 4 KiB pages":  # into the file, under the lock
            assert (fd, offset, view) == (dst.memory.data_fd, CHUNK_PAGES * PAGE_SIZE, None)
            assert lock.taken > 0
        else:  # into the mapping, at the chunk's place, no lock taken
            assert fd is None and dst.memory.is_view_of(view, CHUNK_PAGES * PAGE_SIZE)
            assert lock.taken == 0
        if flip:
            with pytest.raises(ProtocolError, match="failed its checksum on the landed pages 256..511"):
                applier.apply(got)
        else:
            applier.apply(got)
            assert bytes(dst.memory.data[CHUNK_PAGES * PAGE_SIZE : 2 * CHUNK_PAGES * PAGE_SIZE]) == chunk
    finally:
        chan.close()
        a.close()


@pytest.mark.parametrize("quiet", [False, True])
async def test_a_quiet_chunk_lands_without_its_pieces_and_is_read_whole_once_written(hosts, quiet):
    """A frame the source marks quiet (its guest seen writing nothing) lands
    with its chunk's CRC alone: a page written there later costs the
    destination a read of the whole chunk, where one not quiet costs its
    16 KiB piece -- and either way the digest is that of the bytes."""
    import os

    from migrate.engine.pages import BatchApplier, BatchBuilder
    from migrate.net.transport import FrameChannel
    from migrate.protocol.compression import Compressor
    from migrate.protocol.machine import Connection, dest_machine
    from migrate.strategies import get as get_strategy

    src, dst = hosts.source(ram=16 * MiB, workload="idle", rate=0, start=False), hosts.dest(ram=16 * MiB)
    src.memory.write(CHUNK_PAGES * PAGE_SIZE, os.urandom(CHUNK_PAGES * PAGE_SIZE))  # chunk 1
    builder = BatchBuilder(get_strategy("tag-ioctl")(src, MigrationConfig()), Compressor("none"), CHUNK_PAGES)
    builder.guest_runs = False
    builder.guest_quiet = lambda: quiet
    frame, _ = builder.build(0, [(CHUNK_PAGES, CHUNK_PAGES)])
    assert frame.quiet is quiet
    conn = Connection(dest_machine())
    conn.machine.state = DestState.RECEIVING
    conn.ram_pages = dst.memory.npages
    strategy = get_strategy("tag-ioctl")(dst, MigrationConfig())
    strategy.setup_dest()
    digest = MemoryDigest(dst.memory, compute=False)
    applier = BatchApplier(strategy, dst.memory.npages, digest=digest)
    a, b = socket.socketpair()
    chan = FrameChannel(b, conn, 5)
    chan.placer = applier.placement
    a.setblocking(False)
    wire = b"".join(bytes(p) for p in fr.encode(frame, "full"))
    try:
        _, got = await asyncio.gather(asyncio.get_running_loop().sock_sendall(a, wire), chan.recv())
        assert got.landed and got.quiet is quiet
        applier.apply(got)
    finally:
        chan.close()
        a.close()
    assert digest.pieces_unknown[1] == quiet and not digest.unread[1] and not digest.stale[1]
    page = CHUNK_PAGES + 3
    dst.memory.write(page * PAGE_SIZE, b"\x5a" * PAGE_SIZE)
    digest.mark_stale(page, page + 1)
    before = digest.bytes_read
    digest.refresh([1])
    assert digest.bytes_read - before == (CHUNK_PAGES * PAGE_SIZE if quiet else 16 * 1024)
    assert digest.data_crcs[1] == MemoryDigest(dst.memory).data_crcs[1]


async def test_a_guest_that_writes_nothing_lands_quiet_chunks(hosts, listener):
    """An idle guest: the source's write watch finds nothing written, so its
    whole-chunk frames go quiet and the destination keeps no piece CRCs for
    the chunks they land; the guest still validates."""
    src = hosts.source(ram=16 * MiB, workload="idle", params={"fill": 1.0}, rate=0)
    dst = hosts.dest(ram=16 * MiB)
    sres, dres, _, dest = await run_engines(src, dst, MigrationConfig(), listener)
    assert_completed(sres, dres)
    assert sres["digest"]["write_watch"] == "on" and sres["digest"]["keeper"]["pages_written"] == 0
    landed = [c for c in range(dest._digest.nchunks) if not dest._digest.unread[c]]
    assert len(landed) >= 12  # the first frames may go before the watch's first look
    assert sum(dest._digest.pieces_unknown[c] for c in landed) >= len(landed) - 4


@pytest.mark.parametrize("checksum", ["full", "meta", "none"])
async def test_every_checksum_mode_migrates_and_only_full_splices(hosts, listener, checksum):
    """Splicing needs a frame that checks its own data (mode "full"); with
    "meta" or "none" the data is read and stored as before, and every mode
    ends with the same validated guest."""
    import os

    src = hosts.source(ram=16 * MiB, workload="allocator", rate=2000)
    src.memory.write(8 * CHUNK_PAGES * PAGE_SIZE, os.urandom(2 * CHUNK_PAGES * PAGE_SIZE))
    dst = hosts.dest(ram=16 * MiB)
    sres, dres, _, _ = await run_engines(src, dst, MigrationConfig(checksum=checksum, channels=2), listener)
    assert_completed(sres, dres)
    assert (dres["ram"]["spliced_bytes"] > 0) == (checksum == "full")
