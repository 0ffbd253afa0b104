"""An attacker on the path rewrites one byte of a PAGES frame and fixes every
CRC (and the completion digests), with and without --psk-file.

Without the key the attack goes through: that is what plain TCP gives, and
the docs say so.  With it, the destination refuses that very frame, the
guest stays on the source, and the altered page is never written."""

import asyncio
import base64
import os

import pytest
from support import WAIT, address, digests, open_listener

from hosts.constants import PAGE_SIZE
from migrate.config.spec import MigrationConfig
from migrate.engine.dest import DestVmm
from migrate.engine.source import SourceVmm
from migrate.tools.faultproxy import FaultProxy

RAM = 16 << 20


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(base64.b64encode(os.urandom(32)))
    return str(path)


async def through_tamperer(src, dst, config, at="bulk"):
    """Migrate ``src`` to ``dst`` through a tampering proxy; returns
    (source result, destination result, proxy)."""
    listener = open_listener()
    dest_task = asyncio.ensure_future(DestVmm(dst, config).serve(listener))
    proxy = FaultProxy(address(listener), "tamper", at, bulk_bytes=0)
    try:
        sres = await asyncio.wait_for(SourceVmm(src, config).migrate(await proxy.start()), WAIT)
        dres = await asyncio.wait_for(dest_task, WAIT)
    finally:
        dest_task.cancel()
        await proxy.close()
        listener.close()
    return sres, dres, proxy


def page(host, n: int) -> bytes:
    buf = bytearray(PAGE_SIZE)
    host.memory.read_into(n * PAGE_SIZE, buf)
    return bytes(buf)


@pytest.mark.parametrize("channels", [1, 2])
async def test_without_a_key_the_rewritten_page_runs_on_the_destination(hosts, channels):
    """Plain TCP: every CRC agrees with the forged frame, and CONFIRM is
    rewritten to agree with COMPLETE, so the source hands over a guest with
    one byte changed.  (The control for the test below.)"""
    src, dst = hosts.source(rate=0), hosts.dest()
    sres, dres, proxy = await through_tamperer(src, dst, MigrationConfig(channels=channels))
    assert sres["status"] == "completed" and dres["status"] == "completed", (sres["error"], dres["error"])
    assert sres["wire"]["protection"] == "none"
    hit = proxy.tampered
    assert hit is not None, "the proxy never found a PAGES frame with data"
    mine, theirs = page(src, hit["page"]), page(dst, hit["page"])
    diff = [i for i in range(PAGE_SIZE) if mine[i] != theirs[i]]
    assert diff == [hit["offset"]] and mine[hit["offset"]] ^ theirs[hit["offset"]] == 0xFF
    assert digests(src) != digests(dst)  # the source's own check was fooled
    assert dst.vcpus.running


@pytest.mark.parametrize("at,channels", [("bulk", 1), ("bulk", 2), ("dirty", 1)])
async def test_with_a_key_the_rewritten_frame_is_refused_and_the_guest_stays(hosts, key_file, at, channels):
    rate = 0 if at == "bulk" else 5000  # a dirty pass needs a guest that writes
    src, dst = hosts.source(rate=rate), hosts.dest()
    before = digests(src) if rate == 0 else None
    config = MigrationConfig(psk_file=key_file, channels=channels, max_passes=3)
    sres, dres, proxy = await through_tamperer(src, dst, config, at)
    hit = proxy.tampered
    assert hit is not None, "the proxy never found a PAGES frame with data"
    # the destination names the frame and why ...
    assert dres["status"] == "failed"
    assert "PAGES frame #" in dres["error"] and "failed its authentication (MAC)" in dres["error"], dres["error"]
    assert dres["guest_on"].startswith("nowhere") and not dst.vcpus.running
    # ... the source learns it (with two channels the destination's reset of
    # the data channel can overtake its ERROR: the source may see only that
    # the connection broke), and keeps the guest running
    assert sres["status"] == "failed" and sres["guest_on"] == "source"
    if channels == 1:
        assert "failed its authentication (MAC)" in sres["error"], sres["error"]
    else:
        assert "failed its authentication (MAC)" in sres["error"] or "connection" in sres["error"], sres["error"]
    assert src.vcpus.running
    if before is not None:
        assert digests(src) == before  # memory and tags as they were
    # the forged page never landed
    forged = bytearray(page(src, hit["page"]))
    forged[hit["offset"]] ^= 0xFF
    assert page(dst, hit["page"]) != bytes(forged)
    assert dres["wire"]["protection"] == "psk-mac"


def test_tamper_needs_a_pages_phase():
    with pytest.raises(ValueError, match="--at bulk or --at dirty"):
        FaultProxy(("127.0.0.1", 1), "tamper", "completion")
