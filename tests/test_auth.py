"""Who may migrate (migrate/auth.py, --psk-file): the key file, the HMAC
proofs, and the engines end to end in one process -- same key, different
keys, a key on one side only, and a stranger's JOIN -- plus one run of two
real host processes with different keys.

The promise: a wrong key is refused with a clear error, before any guest byte
is read or written: the destination holds nothing, the source keeps its
guest running."""

import asyncio
import base64
import hashlib
import hmac
import json
import os
import select
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from support import address, digests, run_engines, steps_advance

from hosts.constants import GRANULE, PAGE_SIZE
from migrate.config.spec import MigrationConfig
from migrate.engine.dest import DestVmm
from migrate.engine.source import SourceVmm
from migrate.errors import ConfigError
from migrate.protocol import auth
from migrate.protocol import frames as fr
from migrate.protocol.frames import PROTOCOL_VERSION
from migrate.protocol.machine import DestState

MiB = 1 << 20
RAM = 16 * MiB
WAIT = 60.0  # generous: the machine is shared and noisy
SOURCE_RATE = 2000  # default dirtying rate of hosts.source()
REPO = Path(__file__).resolve().parent.parent
T = fr.FrameType


# -- key files -------------------------------------------------------------------------
def write_key(path: Path, raw: bytes | None = None) -> str:
    """A key file as the docs suggest: 32 random bytes, base64, newline."""
    path.write_bytes(base64.b64encode(raw if raw is not None else os.urandom(32)) + b"\n")
    return str(path)


@pytest.fixture
def keys(tmp_path):
    """Two different key files."""
    return types.SimpleNamespace(k1=write_key(tmp_path / "k1"), k2=write_key(tmp_path / "k2"))


def test_no_key_file_means_no_key():
    assert auth.load_key(None) is None


def test_missing_key_file_is_a_config_error_naming_it(tmp_path):
    path = tmp_path / "nosuch.key"
    with pytest.raises(ConfigError) as info:
        auth.load_key(str(path))
    msg = str(info.value)
    assert f"cannot read the key file {path}" in msg
    assert "No such file or directory" in msg
    assert "\n" not in msg and "Traceback" not in msg


def test_unreadable_key_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=f"cannot read the key file {tmp_path}: Is a directory"):
        auth.load_key(str(tmp_path))


@pytest.mark.parametrize("content, length", [(b"", 0), (b"short", 5), (b"x" * 15, 15), (b"  fifteen-bytes \n\n", 13)])
def test_short_key_is_a_config_error_that_says_how_to_make_one(tmp_path, content, length):
    path = tmp_path / "weak.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        auth.load_key(str(path))
    msg = str(info.value)
    assert f"the key in {path} is {length} bytes; use at least {auth.MIN_KEY_BYTES}" in msg
    assert f"head -c 32 /dev/urandom | base64 > {path}" in msg  # how to make a good one
    assert "\n" not in msg


def test_key_of_the_minimum_length_is_accepted_and_surrounding_whitespace_ignored(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"0123456789abcdef")
    b.write_bytes(b"  0123456789abcdef\r\n")  # an editor's newline must not change the key
    assert auth.load_key(str(a)) == auth.load_key(str(b)) == b"0123456789abcdef"
    assert auth.MIN_KEY_BYTES == 16


def test_new_nonces_are_fresh():
    nonces = {auth.new_nonce() for _ in range(64)}
    assert len(nonces) == 64
    assert all(isinstance(n, bytes) and len(n) == auth.NONCE_BYTES == 32 for n in nonces)


# -- proofs ----------------------------------------------------------------------------
KEY = b"k" * 32
N_SRC, N_DST, SESSION = b"\x01" * 32, b"\x02" * 32, "0123456789abcdef"


def test_proof_is_hmac_sha256_over_the_role_and_length_prefixed_parts():
    # The construction is part of the wire protocol: pin it.
    expected = hmac.new(KEY, b"source", hashlib.sha256)
    for part in (N_DST, N_SRC, SESSION.encode()):
        expected.update(len(part).to_bytes(4, "little") + part)
    got = auth.proof(KEY, "source", N_DST, N_SRC, SESSION)
    assert got == expected.digest()
    assert len(got) == 32
    assert auth.proof(KEY, "source", N_DST, N_SRC, SESSION) == got  # deterministic


@pytest.mark.parametrize(
    "role, parts",
    [
        ("destination", (N_SRC, N_DST, SESSION)),
        ("source", (N_DST, N_SRC, SESSION)),
        ("join", (SESSION, 1, N_DST)),
    ],
)
def test_proof_and_check_round_trip(role, parts):
    assert auth.check(KEY, auth.proof(KEY, role, *parts), role, *parts) is True


BASE = ("source", (N_DST, N_SRC, SESSION))
CHANGES = {
    "role": ("destination", (N_DST, N_SRC, SESSION)),  # a reflected proof
    "role join": ("join", (N_DST, N_SRC, SESSION)),
    "destination nonce": ("source", (b"\x03" * 32, N_SRC, SESSION)),
    "source nonce": ("source", (N_DST, b"\x03" * 32, SESSION)),
    "one nonce bit": ("source", (N_DST, b"\x01" * 31 + b"\x00", SESSION)),
    "nonces swapped": ("source", (N_SRC, N_DST, SESSION)),
    "empty nonce": ("source", (b"", N_SRC, SESSION)),
    "session": ("source", (N_DST, N_SRC, "fedcba9876543210")),
    "session case": ("source", (N_DST, N_SRC, SESSION.upper())),
    "a part added": ("source", (N_DST, N_SRC, SESSION, "")),
    "a part dropped": ("source", (N_DST, N_SRC)),
    "parts re-split": ("source", (N_DST + N_SRC[:1], N_SRC[1:], SESSION)),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_any_change_to_role_nonce_or_session_fails(change):
    role, parts = BASE
    good = auth.proof(KEY, role, *parts)
    other_role, other_parts = CHANGES[change]
    assert auth.check(KEY, good, other_role, *other_parts) is False
    assert auth.proof(KEY, other_role, *other_parts) != good


@pytest.mark.parametrize("other_key", [b"K" * 32, b"k" * 31 + b"K", b"k" * 33, b"k" * 16])
def test_another_key_fails(other_key):
    role, parts = BASE
    assert auth.check(other_key, auth.proof(KEY, role, *parts), role, *parts) is False
    assert auth.check(KEY, auth.proof(other_key, role, *parts), role, *parts) is False


def test_join_proof_binds_channel_and_migration():
    good = auth.proof(KEY, "join", SESSION, 1, N_DST)
    assert auth.check(KEY, good, "join", SESSION, 1, N_DST)
    assert not auth.check(KEY, good, "join", SESSION, 2, N_DST)  # another channel
    assert not auth.check(KEY, good, "join", SESSION, 1, b"\x09" * 32)  # another migration's nonce
    assert not auth.check(KEY, good, "join", "another-session", 1, N_DST)


def test_recover_proof_binds_the_challenge_session_and_decision():
    """A recovery connection's AUTH is good for the nonce the destination
    sent on that connection only: the same decision under another challenge
    (a replay on a new connection) fails."""
    good = auth.recover_proof(KEY, SESSION, "go", N_DST)
    assert good == auth.proof(KEY, "recover", SESSION, "go", N_DST)
    assert auth.check_recover(KEY, good, SESSION, "go", N_DST)
    assert not auth.check_recover(KEY, good, SESSION, "go", b"\x09" * 32)  # another connection's challenge
    assert not auth.check_recover(KEY, good, SESSION, "abort", N_DST)
    assert not auth.check_recover(KEY, good, "another-session", "go", N_DST)
    assert not auth.check_recover(b"another key of 32 bytes, really!", good, SESSION, "go", N_DST)
    assert not auth.check(KEY, good, "recover", SESSION, "go")  # the old, nonce-less form


@pytest.mark.parametrize("how", ["empty", "zeros", "reversed", "truncated", "one bit", "longer"])
def test_malformed_or_empty_proofs_fail(how):
    role, parts = BASE
    good = auth.proof(KEY, role, *parts)
    given = {
        "empty": b"",
        "zeros": bytes(32),
        "reversed": bytes(reversed(good)),
        "truncated": good[:16],
        "one bit": bytes([good[0] ^ 1]) + good[1:],
        "longer": good + b"\x00",
    }[how]
    assert auth.check(KEY, given, role, *parts) is False


def test_check_compares_in_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    role, parts = BASE
    good = auth.proof(KEY, role, *parts)
    assert auth.check(KEY, good, role, *parts) is True
    assert auth.check(KEY, b"\x00" * 32, role, *parts) is False
    assert calls == [(good, good), (b"\x00" * 32, good)]


# -- engines in one process ------------------------------------------------------------------
async def migrate_pair(src, dst, src_config, dst_config, listener, source_cls=SourceVmm):
    """Run both engines concurrently; returns (source result, destination result, destination engine)."""
    sres, dres, _, dest_engine = await run_engines(src, dst, src_config, listener, dst_config, source_cls)
    return sres, dres, dest_engine


def assert_completed_and_identical(sres, dres, src, dst):
    assert sres["status"] == "completed", sres["error"]
    assert sres["error"] is None and sres["guest_on"] == "destination"
    val = sres["validation"]
    assert val["ok"] is True and val["data_mismatches"] == 0 and val["tag_mismatches"] == 0 and val["state_ok"]
    assert dres["status"] == "completed", dres["error"]
    assert dres["guest_on"] == "destination"
    # independently of the engines' own validation
    assert not src.vcpus.running and dst.vcpus.running
    assert digests(src) == digests(dst)


def assert_refused(sres, dres, src, dst, src_words, dst_words):
    """Both failed with one-line errors containing the words; the destination
    holds nothing; the source guest runs on where it was."""
    assert sres["status"] == "failed" and dres["status"] == "failed"
    for res, words in ((sres, src_words), (dres, dst_words)):
        err = res["error"]
        assert err and "\n" not in err and "internal error" not in err
        for w in words:
            assert w in err, err
    # the destination wrote nothing and never resumed
    assert dst.memory.populated_ranges() == []
    assert dres["ram"]["normal_pages"] == 0 and dres["tags"]["tagged_pages"] == 0
    assert not dst.vcpus.running
    assert dres["guest_on"] != "destination"
    # the source keeps its guest, running, with dirty logging off again
    assert sres["guest_on"] == "source"
    assert src.vcpus.running and steps_advance(src)
    assert not src.vcpus.throttle
    assert not src.vm.dirty_logging()


@pytest.mark.parametrize("channels", [1, 2])
async def test_same_key_migrates_and_validates(hosts, listener, keys, channels, monkeypatch):
    checks = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: checks.append(len(a)) or real(a, b))
    src, dst = hosts.source(), hosts.dest()
    config = MigrationConfig(psk_file=keys.k1, channels=channels)
    sres, dres, engine = await migrate_pair(src, dst, config, config, listener)
    assert_completed_and_identical(sres, dres, src, dst)
    assert dres["wire"]["channels"] == channels
    # every proof went through the constant-time compare: the source checked
    # WELCOME's, the destination AUTH's and each JOIN's; every frame after
    # them was checked against its 16-byte MAC the same way
    assert [c for c in checks if c == 32] == [32] * (2 + channels - 1)
    authenticated = sres["wire"]["authenticated_frames"] + dres["wire"]["authenticated_frames"]
    assert authenticated > 10 and checks.count(16) == authenticated
    assert sres["wire"]["protection"] == dres["wire"]["protection"] == "psk-mac"


async def test_same_key_in_differently_formatted_files_migrates(hosts, listener, tmp_path):
    raw = base64.b64encode(os.urandom(32))
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "b").write_bytes(raw + b"\n")
    src, dst = hosts.source(), hosts.dest()
    sres, dres, _ = await migrate_pair(
        src, dst, MigrationConfig(psk_file=str(tmp_path / "a")), MigrationConfig(psk_file=str(tmp_path / "b")), listener
    )
    assert_completed_and_identical(sres, dres, src, dst)


@pytest.mark.parametrize("channels", [1, 2])
async def test_different_keys_are_refused_and_nothing_moves(hosts, listener, keys, channels):
    src, dst = hosts.source(), hosts.dest()
    sres, dres, engine = await migrate_pair(
        src,
        dst,
        MigrationConfig(psk_file=keys.k1, channels=channels),
        MigrationConfig(psk_file=keys.k2, channels=channels),
        listener,
    )
    assert_refused(
        sres,
        dres,
        src,
        dst,
        ["the destination failed authentication: its shared key differs"],
        ["failed authentication", "shared key differs"],
    )
    assert sres["ram"]["normal_pages"] == 0 and sres["passes"] == []  # not one page left the source
    assert dres["wire"]["channels"] == 1  # no data channel was admitted
    assert engine.machine.state == DestState.FAILED


async def test_source_without_key_is_refused_by_a_keyed_destination(hosts, listener, keys):
    # The keyless source sees the destination's proof in WELCOME and refuses
    # to go on; the destination learns why from its ERROR.
    src, dst = hosts.source(), hosts.dest()
    sres, dres, engine = await migrate_pair(
        src, dst, MigrationConfig(channels=1), MigrationConfig(psk_file=keys.k1, channels=1), listener
    )
    assert_refused(
        sres,
        dres,
        src,
        dst,
        ["authentication failed", "requires a shared key"],
        ["authentication failed", "requires a shared key"],
    )
    assert engine.machine.state == DestState.FAILED


async def test_keyed_source_refuses_a_destination_without_key(hosts, listener, keys):
    src, dst = hosts.source(), hosts.dest()
    sres, dres, engine = await migrate_pair(src, dst, MigrationConfig(psk_file=keys.k1), MigrationConfig(), listener)
    assert_refused(
        sres,
        dres,
        src,
        dst,
        ["the destination has no shared key: start it with the same --psk-file"],
        ["has no shared key"],
    )
    assert sres["ram"]["normal_pages"] == 0 and sres["passes"] == []


# -- a stranger on the wire --------------------------------------------------------------------
def encoded(frame) -> bytes:
    return b"".join(bytes(b) for b in fr.encode(frame))


def hello_for(dst, nonce: bytes, session: str = SESSION, channels: int = 1) -> fr.Hello:
    return fr.Hello(
        version=PROTOCOL_VERSION,
        ram_size=dst.memory.size,
        page_size=PAGE_SIZE,
        granule=GRANULE,
        mte=True,
        vcpus=dst.vcpus.count,
        strategy="tag-ioctl",
        tag_format="packed4",
        compression="zstd",
        channels=channels,
        session=session,
        nonce=nonce,
    )


async def exchange(addr, data: bytes, until_eof=True) -> list:
    """Send ``data`` on a new connection; the frames answered until the peer closes."""
    reader, writer = await asyncio.open_connection(*addr)
    received = b""
    try:
        writer.write(data)
        await writer.drain()
        try:
            received = await asyncio.wait_for(reader.read(), WAIT)
        except ConnectionError:
            pass
    finally:
        writer.close()
    return fr.FrameBuffer().feed(received)


async def test_raw_source_with_a_wrong_proof_writes_nothing(hosts, listener, keys):
    """A source that does not know the key and sends pages right behind its
    AUTH: the destination refuses before it reads a single page."""
    dst = hosts.dest()
    engine = DestVmm(dst, MigrationConfig(psk_file=keys.k1, timeout_s=10))
    task = asyncio.ensure_future(engine.serve(listener))
    reader, writer = await asyncio.open_connection(*address(listener))
    try:
        writer.write(encoded(hello_for(dst, auth.new_nonce())))
        await writer.drain()
        buf = fr.FrameBuffer()
        welcome = []
        while not welcome:
            welcome = buf.feed(await asyncio.wait_for(reader.read(4096), WAIT))
        assert welcome[0].type == T.WELCOME and len(welcome[0].proof) == 32 and len(welcome[0].nonce) == 32
        forged = auth.proof(b"not the key at all", "source", welcome[0].nonce, b"", SESSION)
        writer.write(encoded(fr.Auth(forged)) + encoded(fr.Pages(0, [(0, 4)], bytes(4), b"\xab" * (4 * PAGE_SIZE))))
        await writer.drain()
        try:
            rest = await asyncio.wait_for(reader.read(), WAIT)
        except ConnectionError:
            rest = b""
        result = await asyncio.wait_for(task, WAIT)
    finally:
        writer.close()
        task.cancel()
    frames = buf.feed(rest)
    # it could not seal the stream either: its AUTH is refused at the header
    assert [f.type for f in frames] == [T.ERROR]
    assert frames[0].code == "tampered"
    assert frames[0].message.startswith("AUTH frame carries no MAC on a connection sealed with the shared key")
    assert result["status"] == "failed" and result["error"] == frames[0].message
    assert dst.memory.populated_ranges() == [] and result["ram"]["normal_pages"] == 0
    assert not dst.vcpus.running and not engine.resumed


async def test_raw_source_with_the_right_proof_gets_its_pages_in(hosts, listener, keys):
    """The control for the test above: the same stranger, now holding the key
    and answering with the documented proof, is let in (and its pages land)."""
    dst = hosts.dest()
    key = auth.load_key(keys.k1)
    engine = DestVmm(dst, MigrationConfig(psk_file=keys.k1, timeout_s=10))
    task = asyncio.ensure_future(engine.serve(listener))
    reader, writer = await asyncio.open_connection(*address(listener))
    nonce = auth.new_nonce()
    try:
        hello = encoded(hello_for(dst, nonce))
        writer.write(hello)
        await writer.drain()
        buf, welcome, answer = fr.FrameBuffer(), [], b""
        while not welcome:
            chunk = await asyncio.wait_for(reader.read(4096), WAIT)
            answer += chunk
            welcome = buf.feed(chunk)
        w = welcome[0]
        # the destination proved the key over both nonces and the session
        assert auth.check(key, w.proof, "destination", nonce, w.nonce, SESSION)
        # then the stream is sealed: keys from the key and every byte so far
        secret = auth.stream_secret(key, hashlib.sha256(hello + answer).digest())
        to_dest, _ = auth.direction_keys(secret, "source")
        mac = auth.FrameMac(to_dest)

        def sealed(frame):
            return b"".join(bytes(b) for b in fr.encode(frame, "full", mac))

        writer.write(
            sealed(fr.Auth(auth.proof(key, "source", w.nonce, nonce, SESSION)))
            + sealed(fr.Pages(0, [(0, 4)], bytes(4), b"\xab" * (4 * PAGE_SIZE)))
            + sealed(fr.PassEnd(0, 4))
        )
        await writer.drain()
        deadline = time.monotonic() + WAIT
        while dst.memory.populated_ranges() != [(0, 4)]:
            assert time.monotonic() < deadline, "the pages never landed"
            await asyncio.sleep(0.01)
        assert engine.machine.state == DestState.RECEIVING
        writer.write(sealed(fr.Abort("that is all")))
        await writer.drain()
        result = await asyncio.wait_for(task, WAIT)
    finally:
        writer.close()
        task.cancel()
    assert result["status"] == "cancelled"
    assert result["ram"]["normal_pages"] == 4
    assert not dst.vcpus.running


class GatedSource(SourceVmm):
    """A source whose data channels wait for the test to open the gate (so a
    stranger can knock first, deterministically)."""

    gate = None

    async def _open_lane(self, index, address, session, limiter):
        await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, WAIT)
        return await super()._open_lane(index, address, session, limiter)


async def test_stranger_join_with_a_wrong_proof_is_refused_and_the_migration_completes(hosts, listener, keys):
    src, dst = hosts.source(), hosts.dest()
    config = MigrationConfig(psk_file=keys.k1, channels=2, timeout_s=30)
    key = auth.load_key(keys.k1)
    GatedSource.gate = threading.Event()
    dest_engine = DestVmm(dst, config)
    dest_task = asyncio.ensure_future(dest_engine.serve(listener))
    src_task = asyncio.ensure_future(GatedSource(src, config).migrate(address(listener)))
    try:
        deadline = time.monotonic() + WAIT
        while dest_engine.hello is None:  # set once the main connection has authenticated
            assert time.monotonic() < deadline and not src_task.done(), "the main connection never authenticated"
            await asyncio.sleep(0.01)
        session = dest_engine.hello.session  # a stranger who watched HELLO on the wire knows it
        wrong = {
            "no proof": b"",
            "another key": auth.proof(b"x" * 32, "join", session, 1, dest_engine._nonce),
            "a replay from another migration": auth.proof(key, "join", session, 1, b"\x00" * 32),
            "a proof made for another role": auth.proof(key, "source", dest_engine._nonce, b"", session),
        }
        for what, proof in wrong.items():
            frames = await exchange(address(listener), encoded(fr.Join(session, 1, proof)))
            assert [f.type for f in frames] == [T.ERROR], what
            assert frames[0].code == "auth", what
            assert frames[0].message == "data channel 1 failed authentication", what
            assert dest_engine._channels.lanes == {}, what
            assert not src_task.done(), what
        GatedSource.gate.set()
        sres = await asyncio.wait_for(src_task, WAIT)
        dres = await asyncio.wait_for(dest_task, WAIT)
    finally:
        GatedSource.gate.set()
        src_task.cancel()
        dest_task.cancel()
    assert_completed_and_identical(sres, dres, src, dst)
    assert dres["wire"]["channels"] == 2 and sres["wire"]["channels"] == 2


# -- two real processes --------------------------------------------------------------------------
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("PYTHONWARNINGS", None)
    return env


def _popen(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "migrate", *map(str, args)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _kill(proc):
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()


def test_processes_with_different_keys_both_exit_1_with_an_authentication_error(tmp_path, keys):
    dest = _popen(
        "dest", "--listen", "127.0.0.1:0", "--ram", "32MiB", "--psk-file", keys.k1, "--json", tmp_path / "dest.json"
    )
    source = None
    try:
        ready, _, _ = select.select([dest.stdout], [], [], 180)
        assert ready, "the destination printed nothing"
        line = dest.stdout.readline().strip()
        assert line.startswith("listening on "), line
        source = _popen(
            "source",
            "--connect",
            line.removeprefix("listening on "),
            "--ram",
            "32MiB",
            "--psk-file",
            keys.k2,
            "--json",
            tmp_path / "source.json",
        )
        _, src_err = source.communicate(timeout=180)
        _, dst_err = dest.communicate(timeout=180)
    finally:
        _kill(source)
        _kill(dest)
    assert (source.returncode, dest.returncode) == (1, 1), (src_err, dst_err)
    for side, err in (("source", src_err), ("dest", dst_err)):
        assert "Traceback" not in err, err
        failed = [ln for ln in err.splitlines() if ln.startswith("FAILED:")]
        assert len(failed) == 1, err
        assert "failed authentication" in failed[0] and "shared key differs" in failed[0], err
        r = json.loads((tmp_path / f"{side}.json").read_text())
        assert r["status"] == "failed"
        assert "\n" not in r["error"] and r["error"] in failed[0]
        assert "failed authentication: its shared key differs" in r["error"]
        assert r["ram"]["normal_pages"] == 0
    assert json.loads((tmp_path / "source.json").read_text())["guest_on"] == "source"


async def test_source_without_key_and_data_channels_reports_the_refusal(hosts, listener, keys):
    """A keyless source sees the destination's proof in WELCOME and stops at
    once with the reason, before it opens data channels or sends a page."""
    src, dst = hosts.source(), hosts.dest()
    sres, dres, engine = await migrate_pair(
        src, dst, MigrationConfig(channels=2), MigrationConfig(psk_file=keys.k1, channels=2), listener
    )
    assert_refused(sres, dres, src, dst, ["authentication failed", "requires a shared key"], ["authentication failed"])


def test_cli_source_without_key_reports_the_refusal(tmp_path, keys):
    dest = _popen("dest", "--listen", "127.0.0.1:0", "--ram", "32MiB", "--psk-file", keys.k1)
    source = None
    try:
        ready, _, _ = select.select([dest.stdout], [], [], 180)
        assert ready
        line = dest.stdout.readline().strip()
        source = _popen("source", "--connect", line.removeprefix("listening on "), "--ram", "32MiB")
        _, src_err = source.communicate(timeout=180)
        dest.communicate(timeout=180)
    finally:
        _kill(source)
        _kill(dest)
    assert source.returncode == 1
    assert "requires a shared key" in src_err, src_err
