"""Postcopy recovery: after the switch a broken link pauses both sides, and
the same migration resumes on a fresh, authenticated connection -- by the
source itself (--retry) or on the operator's word (`mte-migrate resume`).
Where it cannot resume, each side's status says what is lost and what is
kept.  In process (one engine each) and with real processes through the
fault proxy (tests/test_faults.py's harness; its matrix holds the rows for
every fault)."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from support import WAIT, digests, open_listener
from test_faults import REPO, _describe, _env, postcopy_violations, run_postcopy_case
from test_postcopy import CutAfterSwitch, RetryingCut, dest_for, hot_set

from migrate.config.spec import MigrationConfig
from migrate.engine.dest import DestVmm
from migrate.engine.recovery import recover
from migrate.engine.source import SourceVmm
from migrate.errors import MigrationError, TransportError
from migrate.net.transport import FrameChannel, connect, secure
from migrate.protocol.machine import Connection, recovery_source_machine
from migrate.tools.pki import have_openssl, make_pki

RESUME = re.compile(r"`(mte-migrate resume --pid (\d+))`")
HERE = re.compile(r"`kill -USR1 (\d+)`")


def _key(path, text: str):
    path.write_text(text)
    return str(path)


async def _until(what, seconds: float = WAIT) -> None:
    """Wait for a condition of the engines' state (polled: no event to await)."""
    deadline = time.monotonic() + seconds
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.02)


# -- in process --------------------------------------------------------------------------
async def test_the_operator_resumes_after_a_cut_and_a_wrong_key_changes_nothing(tmp_path):
    """No --retry: both sides hold; a RECOVER "postcopy" proven with another
    key is refused; the operator's signal (what `mte-migrate resume` sends)
    resumes the migration, sealed with the right key, to completion."""
    right = _key(tmp_path / "k", "k" * 32)
    config = MigrationConfig(
        strategy="memfd-continue",
        postcopy=True,
        postcopy_after_passes=0,
        channels=1,
        timeout_s=3,
        postcopy_hold_s=40,
        psk_file=right,
    ).check()
    src, dst = hot_set(), dest_for()
    listener = open_listener()
    dest = DestVmm(dst, config)
    source = CutAfterSwitch(src, config)
    dtask = asyncio.ensure_future(dest.serve(listener))
    stask = asyncio.ensure_future(source.migrate(listener.getsockname()))
    try:
        await _until(lambda: dest._postcopy_hold.listening and "postcopy_recovery" in source.result)
        first = dest.chan
        sock = await connect(*listener.getsockname(), 3)
        conn = Connection(recovery_source_machine(), config.checksum, keyed=True)
        chan = FrameChannel(sock, conn, 3, io=await secure(sock, None, False, 3))
        try:
            await recover(chan, source._session, "postcopy", b"w" * 32, 3)  # another key
            reply = await chan.recv()
        except MigrationError:
            reply = None  # refused: the connection closed, or a refusal this key cannot read
        chan.close()
        assert reply is None or reply.type.name == "ERROR", reply
        assert dest._postcopy_hold.listening and not stask.done()  # still paused, still waiting
        os.kill(os.getpid(), signal.SIGURG)  # `mte-migrate resume --pid`
        sres = await asyncio.wait_for(stask, WAIT)
        dres = await asyncio.wait_for(dtask, WAIT)
        assert sres["status"] == dres["status"] == "completed", (sres["error"], dres["error"])
        assert sres["validation"]["ok"] and dres["postcopy"]["guest_wrong_tag_accesses"] == 0
        assert sres["postcopy_recovery"]["attempts"] == 1 and dres["postcopy_recovery"]["pauses"] == 1
        assert dres["postcopy"]["pages_verified"] == dres["postcopy"]["pages"]
        # the recovery connection carried the rest, sealed under the key
        assert dest.chan is not first and dest.chan.conn.sealed and dest.chan.conn.authenticated_frames > 0
    finally:
        for t in (stask, dtask):
            t.cancel()
        listener.close()
        src.close()
        dst.close()


async def test_the_operator_can_resume_the_paused_copy_at_the_source_when_the_destination_is_dead():
    """The destination is gone: its guest is lost.  The source's paused copy
    was kept: `kill -USR1` (the operator's word) runs it again there."""
    config = MigrationConfig(
        strategy="memfd-continue", postcopy=True, postcopy_after_passes=0, channels=1, timeout_s=3, postcopy_hold_s=40
    ).check()
    src, dst = hot_set(), dest_for()
    listener = open_listener()
    dest = DestVmm(dst, config)
    source = CutAfterSwitch(src, config)
    dtask = asyncio.ensure_future(dest.serve(listener))
    stask = asyncio.ensure_future(source.migrate(listener.getsockname()))
    try:
        await _until(lambda: dest._postcopy_hold.listening and "postcopy_recovery" in source.result)
        held = digests(src)
        dtask.cancel()  # the destination VMM dies
        listener.close()
        dres = await asyncio.gather(dtask, return_exceptions=True)
        assert not src.vcpus.running and digests(src) == held  # paused, unchanged
        os.kill(os.getpid(), signal.SIGUSR1)
        sres = await asyncio.wait_for(stask, WAIT)
        assert sres["status"] == "failed" and sres["guest_on"] == "source", (sres["status"], sres["guest_on"])
        assert "resumed the paused copy here" in sres["error"]
        await _until(lambda: src.vcpus.running)
        assert dres  # (the destination's result is not what this test is about)
    finally:
        for t in (stask, dtask):
            t.cancel()
        listener.close()
        src.close()
        dst.close()


class FailsAtTheSwitch(DestVmm):
    """A destination whose link breaks while it switches, before the guest resumes."""

    async def _switch_to_postcopy(self, ranges):
        self.chan.sock.shutdown(2)
        raise TransportError("connection lost during the switch")


class Retrying(SourceVmm):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.postcopy_retries = 2


async def test_a_switch_that_broke_before_the_guest_resumed_there_resumes_it_at_the_source():
    """The source counts the guest handed over once it announced the switch;
    the destination, which never resumed it, says so on the recovery
    connection, and the paused copy runs on at the source."""
    config = MigrationConfig(
        strategy="memfd-continue", postcopy=True, postcopy_after_passes=0, channels=1, timeout_s=3, postcopy_hold_s=30
    ).check()
    src, dst = hot_set(), dest_for()
    listener = open_listener()
    dtask = asyncio.ensure_future(FailsAtTheSwitch(dst, config).serve(listener))
    try:
        sres = await asyncio.wait_for(Retrying(src, config).migrate(listener.getsockname()), WAIT)
        dres = await asyncio.wait_for(dtask, WAIT)
        assert sres["status"] == "failed" and sres["guest_on"] == "source", (sres["status"], sres["guest_on"])
        assert "before the guest resumed on the destination" in sres["error"], sres["error"]
        assert dres["guest_on"] == "nowhere (partial state discarded)" and not dst.vcpus.running
        await _until(lambda: src.vcpus.running)
    finally:
        dtask.cancel()
        listener.close()
        src.close()
        dst.close()


@pytest.mark.skipif(not have_openssl(), reason="needs the openssl command to make certificates")
async def test_a_cut_over_mutual_tls_is_resumed_over_tls(tmp_path):
    """The recovery connection is made like every other: TLS first."""
    pki = make_pki(tmp_path, "pc")

    def config(who):
        cert, key = pki[who]
        return MigrationConfig(
            strategy="memfd-continue",
            postcopy=True,
            postcopy_after_passes=0,
            channels=1,
            timeout_s=3,
            postcopy_hold_s=30,
            tls_cert=cert,
            tls_key=key,
            tls_ca=pki["ca"],
        ).check()

    src, dst = hot_set(), dest_for()
    listener = open_listener()
    dtask = asyncio.ensure_future(DestVmm(dst, config("dest")).serve(listener))
    try:
        sres = await asyncio.wait_for(RetryingCut(src, config("source")).migrate(listener.getsockname()), WAIT)
        dres = await asyncio.wait_for(dtask, WAIT)
        assert sres["status"] == dres["status"] == "completed", (sres["error"], dres["error"])
        assert sres["validation"]["ok"] and sres["postcopy_recovery"]["pauses"] == 1
        assert sres["wire"]["protection"] == "tls"
    finally:
        dtask.cancel()
        listener.close()
        src.close()
        dst.close()


# -- real processes, through the fault proxy ------------------------------------------------
def _resume_by_hand(out, procs, files, dest_address) -> bool:
    """The operator: once the source says it is paused, run the command it names."""
    if out.operator is not None:
        return False
    files["source"].flush()
    files["source"].seek(0)
    match = RESUME.search(files["source"].read())
    files["source"].seek(0, 2)
    if match:
        cp = subprocess.run(
            [sys.executable, "-m", "migrate", "resume", "--pid", match.group(2)],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        out.operator = f"{match.group(1)} -> rc {cp.returncode} {(cp.stdout + cp.stderr).strip()!r}"
    return False


@pytest.mark.slow
def test_a_cut_after_the_switch_is_resumed_with_mte_migrate_resume(tmp_path):
    o = run_postcopy_case("cut", tmp_path, source_args=["--retry", "0"], operator=_resume_by_hand)
    assert o.operator and "rc 0" in o.operator, _describe(o)
    assert not postcopy_violations(o, "cut"), "\n".join(postcopy_violations(o, "cut")) + "\n" + _describe(o)
    assert o.source.result["postcopy_recovery"]["attempts"] == 1
    assert "Reconnecting by itself" not in o.source.stderr  # the operator did it


@pytest.mark.slow
@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "psk"])
def test_a_cut_after_the_switch_is_resumed_by_retry_with_and_without_a_key(tmp_path, keyed):
    args = ["--psk-file", _key(tmp_path / "key", "s" * 32)] if keyed else []
    o = run_postcopy_case("cut", tmp_path / "run", dest_args=args, source_args=args)
    problems = postcopy_violations(o, "cut")
    assert not problems, "\n".join(problems) + "\n" + _describe(o)
    protection = o.source.result["wire"]["protection"]
    assert (protection != "none") == keyed, protection


@pytest.mark.slow
def test_a_destination_killed_after_the_switch_leaves_the_source_paused_saying_so(tmp_path):
    o = run_postcopy_case("kill-dest", tmp_path)
    problems = postcopy_violations(o, "kill-dest")
    assert not problems, "\n".join(problems) + "\n" + _describe(o)
    assert "the guest as it ran there is lost" in o.source.error and HERE.search(o.source.error)
    assert "POSTCOPY PAUSED" in o.source.stderr  # the alert came while it held


@pytest.mark.slow
def test_a_source_killed_after_the_switch_leaves_the_destination_saying_its_guest_is_lost(tmp_path):
    o = run_postcopy_case("kill-source", tmp_path)
    problems = postcopy_violations(o, "kill-source")
    assert not problems, "\n".join(problems) + "\n" + _describe(o)
    assert o.dest.guest_on.startswith("nowhere here") and "POSTCOPY PAUSED" in o.dest.stderr


# -- the pieces ---------------------------------------------------------------------------
class _Frames:
    """A channel that yields the given frames."""

    def __init__(self, frames):
        self.frames = list(frames)

    async def recv(self, timeout=None):
        return self.frames.pop(0)


def _entries(*pairs) -> bytes:
    from array import array

    return array("I", [v for pair in pairs for v in pair]).tobytes()


def test_the_destination_lists_exactly_the_pages_not_placed_and_asks_first_for_those_the_guest_waits_for():
    from test_postcopy import host

    from hosts.uffd import MISSING, Userfaultfd
    from migrate.engine.postcopy import DestPostcopy

    h = host()
    uffd = Userfaultfd(h.vm, MISSING)
    uffd.drop(10, 20)
    uffd.drop(40, 42)
    pc = DestPostcopy(h, None, uffd, [(10, 10), (40, 2)])
    uffd.copy(12, b"\0" * 4096)
    uffd.copy(41, b"\0" * 4096)
    pc.requested.update({11, 13, 41})
    assert pc.missing() == [(10, 2), (13, 7), (40, 1)]
    assert pc.waiting(pc.missing()) == [(11, 1), (13, 1)]
    h.close()


def test_a_table_entry_sent_again_replaces_the_old_one_and_a_page_twice_is_refused():
    import types

    from hosts.constants import PACKED_TAGS_PER_PAGE, PAGE_SIZE
    from migrate.checksum import crc32
    from migrate.engine.postcopy import DestPostcopy
    from migrate.errors import ProtocolError
    from migrate.protocol import frames as fr

    host = types.SimpleNamespace(memory=types.SimpleNamespace(npages=64))
    pc = DestPostcopy(host, None, None, [(3, 1)])
    data, tags = b"\x07" * PAGE_SIZE, b"\0" * PACKED_TAGS_PER_PAGE
    pc.add_table(fr.Postcopy([(3, 1)], _entries((1, 2))))  # sent before the break
    pc.add_table(fr.Postcopy([(3, 1)], _entries((crc32(data), crc32(tags)))))  # again, after it
    pc._check(3, data, tags)
    with pytest.raises(ProtocolError, match="came twice"):
        pc._check(3, data, tags)


async def test_the_source_takes_only_pages_it_announced_each_once():
    from migrate.engine.postcopy_recovery import SourcePostcopyHold
    from migrate.errors import PeerError, ProtocolError
    from migrate.protocol import frames as fr

    announced = bytearray(64)
    announced[8:24] = b"\x01" * 16
    ok = [fr.Postcopy([(8, 2)], b"", last=False), fr.Postcopy([(20, 4)], b"", last=True)]
    assert await SourcePostcopyHold.missing_list(_Frames(ok), announced) == [(8, 2), (20, 4)]
    assert await SourcePostcopyHold.missing_list(_Frames([fr.Postcopy([], b"", last=True)]), announced) == []
    for bad in (
        [fr.Postcopy([(7, 2)], b"", last=True)],  # page 7 was never announced
        [fr.Postcopy([(8, 2)], b"", last=False), fr.Postcopy([(9, 1)], b"", last=True)],  # page 9 twice
        [fr.Postcopy([(8, 1)], b"\0" * 8, last=True)],  # a table: not a list
    ):
        with pytest.raises(ProtocolError):
            await SourcePostcopyHold.missing_list(_Frames(bad), announced)
    with pytest.raises(PeerError, match="no postcopy"):
        await SourcePostcopyHold.missing_list(_Frames([fr.Error("protocol", "no postcopy is paused")]), announced)
