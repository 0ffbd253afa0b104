"""The fuzz campaign (migrate/tools/fuzz.py): its mutators are deterministic,
its target takes the real streams, it tells crashes and hangs from
refusals, and a short campaign over the destination's input path finds
nothing.  The long run (100,000 inputs) is in docs/RELIABILITY.md."""

import argparse
import json
import random
import time
from pathlib import Path

import msgpack
import pytest
import zstandard

from migrate import cli
from migrate.errors import ProtocolError
from migrate.protocol import frames as fr
from migrate.protocol.compression import Decompressor
from migrate.tools import fuzz

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def seeds():
    return fuzz.capture_seeds()


@pytest.fixture(scope="module")
def strays(seeds):
    return fuzz.stray_frames(seeds)


# -- seeds and the target -----------------------------------------------------------------
def test_every_seed_is_a_whole_migration_the_destination_takes(seeds):
    assert {s.checksum for s in seeds} == set(fr.CHECKSUM_MODES)
    assert any(s.data for s in seeds) and any(not s.data for s in seeds)
    for i, seed in enumerate(seeds):
        inp = fuzz.FuzzInput(i, b"".join(seed.control), b"".join(seed.data) if seed.data else None)
        assert fuzz.run_input(inp, seeds) == "accepted:running", seed.name
        # Connection.feed takes every whole frame it is given before the
        # destination can answer: INSPECT then comes before CONFIRM is sent
        # (postcopy has no INSPECT: it sends CONFIRM at the switch)
        feed = fuzz.FuzzInput(i, inp.control, inp.data, "feed", (17, 1000, 70000))
        try:
            outcome = fuzz.run_input(feed, seeds)
        except ProtocolError as exc:
            outcome = str(exc)
        if seed.name.endswith("/postcopy"):
            assert outcome == "accepted:running", seed.name
        else:
            assert outcome == "unexpected INSPECT frame while the destination is in state verifying", seed.name


def test_a_postcopy_seed_places_every_missing_page_checked_against_its_table(seeds):
    i = next(i for i, s in enumerate(seeds) if s.name.endswith("/postcopy"))
    target = fuzz.DestTarget(seeds[i].checksum)
    try:
        assert target.run(fuzz.FuzzInput(i, b"".join(seeds[i].control), None)) == "accepted:running"
        uffd = target.host.vm.uffd
        missing = sum(c for _, c in fuzz.POSTCOPY_RANGES)
        assert uffd.missing_pages == 0 and target.host.counters.get("syscalls.uffd_continue") >= 2
        assert missing == 10
    finally:
        target.close()
    # one byte of the first postcopy batch changed, the frame's CRC made to
    # match (the meta seed checks no payload either way): its table catches it
    i = next(i for i, s in enumerate(seeds) if s.name.startswith("meta/") and s.name.endswith("/postcopy"))
    control = list(seeds[i].control)
    tables = [j for j, raw in enumerate(control) if raw[2] == fr.FrameType.POSTCOPY]
    at = tables[-2] + 1  # the PAGES after the first table
    ftype, flags, meta, payload = fuzz.split_frame(control[at])
    assert ftype == fr.FrameType.PAGES and len(payload) > 4096
    payload = bytearray(payload)
    payload[len(payload) // 3] ^= 0x40
    control[at] = fuzz.build_frame(ftype, flags, meta, bytes(payload))
    with pytest.raises(ProtocolError, match="differs from the paused source's"):
        fuzz.run_input(fuzz.FuzzInput(i, b"".join(control), None), seeds)


def test_the_seeds_land_whole_chunks_and_go_through_every_state(seeds):
    types = {raw[2] for s in seeds for raw in s.control + s.data}
    assert types == {
        t.value
        for t in fr.FrameType
        if t.name not in ("WELCOME", "CONFIRM", "INSPECTION", "RESUMED", "ERROR", "ABORT", "RECOVER")
        # REQUEST and APPLIED go the other way (from the destination)
        and t.name not in ("REQUEST", "APPLIED")
    }
    # a self-checked whole chunk (FLAG_CRC_META_ONLY) reaches the landing path
    assert any(raw[2] == fr.FrameType.PAGES and raw[3] & fr.FLAG_CRC_META_ONLY for s in seeds for raw in s.control)


def test_a_cut_stream_is_incomplete_not_an_error(seeds):
    control = b"".join(seeds[0].control)
    assert fuzz.run_input(fuzz.FuzzInput(0, control[: len(control) // 2], None), seeds).startswith("incomplete:")


# -- mutators ------------------------------------------------------------------------------------
def test_inputs_are_deterministic_per_seed_and_index(seeds, strays):
    a = [fuzz.make_input(random.Random(f"5:{i}"), seeds, strays) for i in range(200)]
    b = [fuzz.make_input(random.Random(f"5:{i}"), seeds, strays) for i in range(200)]
    c = [fuzz.make_input(random.Random(f"6:{i}"), seeds, strays) for i in range(200)]
    assert a == b
    assert a != c
    assert len({x.control + (x.data or b"") for x in a}) > 190  # hardly any duplicates


@pytest.mark.parametrize("name", sorted(fuzz.MUTATORS))
def test_each_mutator_is_deterministic_and_changes_the_stream(name, seeds, strays):
    ctx = {"npages": fuzz.RAM // fr.PAGE_SIZE, "strays": strays}
    changed = 0
    for i in range(60):
        seed = seeds[i % len(seeds)]
        at = i % len(seed.control)
        one = fuzz.MUTATORS[name](random.Random(i), list(seed.control), at, ctx)
        two = fuzz.MUTATORS[name](random.Random(i), list(seed.control), at, ctx)
        assert one == two
        changed += b"".join(one) != b"".join(seed.control)
        if name in ("header", "meta", "payload", "bytes"):
            assert b"".join(one).startswith(b"".join(seed.control[:at]))  # the prefix sets the state
    assert changed >= 40


def test_frame_surgery_round_trips(seeds):
    for raw in seeds[0].control + seeds[1].control:
        parts = fuzz.split_frame(raw)
        assert fuzz.build_frame(*parts) == raw
    assert fuzz.split_frame(seeds[0].control[0][:-1]) is None


def test_the_zstd_bomb_declares_the_expected_size_and_is_refused():
    bomb = fuzz._zstd_lie(random.Random(0), 16 << 20, 8 * fr.PAGE_SIZE)
    assert len(bomb) < 4096
    assert zstandard.frame_content_size(bomb) == 8 * fr.PAGE_SIZE
    with pytest.raises(ProtocolError, match="does not decompress|decompressed to"):
        Decompressor().decompress(bomb, 8 * fr.PAGE_SIZE, "page data")


def test_outcome_classes_leave_numbers_and_values_out():
    a = fuzz.outcome_class(ProtocolError("PAGES field 'p' = 7 is out of range"))
    b = fuzz.outcome_class(ProtocolError("PAGES field 'dl' = 99 is out of range"))
    assert a == b == "ProtocolError: PAGES field Q = N is out of range"
    assert fuzz.outcome_class(None, "accepted:running") == "accepted:running"


# -- the campaign: crashes, hangs, reproducers ----------------------------------------------------
def test_a_crash_is_detected_recorded_and_reproducible(tmp_path):
    def target(inp, seeds):
        if inp.control[2] == fr.FrameType.HELLO and len(inp.control) % 3 == 0:
            raise KeyError("a bug")
        raise ProtocolError("refused")

    report = fuzz.campaign(30, seed=3, out=str(tmp_path), target=target, trace_every=0)
    assert report.inputs == 30
    assert report.crashes, "the fake target's KeyError must count as a crash"
    crash = report.crashes[0]
    assert crash["error"].startswith("KeyError") and "a bug" in crash["traceback"]
    assert Path(crash["reproducer"] + ".control.bin").exists()
    saved = json.loads((tmp_path / "fuzz.json").read_text())
    assert len(saved["crashes"]) == len(report.crashes)
    assert saved["outcome_classes"]["ProtocolError: refused"] == 30 - len(report.crashes)
    assert "CRASH" in fuzz.summary(report)
    # replaying the reproducer against the real destination runs it again (no crash there)
    outcome = _replay_outcome(crash["reproducer"])
    assert outcome.startswith(("accepted", "incomplete", "ProtocolError", "HandshakeMismatch", "PeerTimeout"))


def _replay_outcome(base):
    try:
        return fuzz.replay(base)
    except Exception as exc:
        return fuzz.outcome_class(exc)


def test_a_hang_is_detected(tmp_path):
    def target(inp, seeds):
        time.sleep(2.0)
        return "accepted:slow"

    t = time.perf_counter()
    report = fuzz.campaign(2, seed=1, out=str(tmp_path), hang_seconds=0.2, target=target, trace_every=0)
    assert time.perf_counter() - t < 1.9  # the timer interrupted the inputs
    assert len(report.hangs) == 2 and not report.crashes
    assert Path(report.hangs[0]["reproducer"] + ".json").exists()


def test_the_cli_exits_1_on_a_crash(tmp_path, monkeypatch, capsys):
    real = fuzz.campaign

    def crashing(*args, **kw):
        kw["target"] = lambda inp, seeds: 1 // 0
        return real(*args, **kw)

    monkeypatch.setattr(fuzz, "campaign", crashing)
    assert cli.main(["fuzz", "--inputs", "3", "--out", str(tmp_path), "-q"]) == 1
    assert "crashes       3" in capsys.readouterr().out


def test_a_short_campaign_finds_no_crash_and_no_hang(tmp_path):
    """The CI run: 2,000 inputs of the destination's input path."""
    t = time.perf_counter()
    report = fuzz.campaign(2000, seed=1, out=str(tmp_path), hang_seconds=10.0)
    assert report.inputs == 2000
    assert not report.crashes, fuzz.summary(report)
    assert not report.hangs, fuzz.summary(report)
    assert not report.generator_errors, report.generator_errors[0]
    assert "accepted:running" in report.classes
    assert len(report.classes) > 50
    assert time.perf_counter() - t < 60  # under 20 s on an idle machine


def test_the_fuzz_flags_are_documented():
    text = (REPO / "docs" / "USAGE.md").read_text()
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["fuzz"]._actions:
        for flag in action.option_strings:
            assert f"`{flag}" in text or flag in ("-h", "--help"), flag
    assert "### fuzz" in text


# -- regressions: what the campaign found ---------------------------------------------------------
def _with_state(seed, state: dict) -> bytes:
    """The seed's control stream with its STATE frame replaced."""
    frames = [
        b"".join(fr.encode(fr.State(state), seed.checksum)) if raw[2] == fr.FrameType.STATE else raw
        for raw in seed.control
    ]
    return b"".join(frames)


def test_a_state_whose_rng_word_is_negative_is_a_protocol_error(seeds):
    """Found by `mte-migrate fuzz --seed 1` (inputs 5315 and 8239): one bit
    flipped in a STATE payload (checksum "none") made a word of the
    workload's random generator state negative; random.setstate raised
    OverflowError, which _load_state did not turn into a ProtocolError (the
    real destination reported "internal error: OverflowError")."""
    import msgpack

    i = next(i for i, s in enumerate(seeds) if not s.data)
    seed = seeds[i]
    raw = next(r for r in seed.control if r[2] == fr.FrameType.STATE)
    state = msgpack.unpackb(fuzz.split_frame(raw)[3], raw=False, strict_map_key=False)
    state["workload"]["state"]["rngs"][0][1][5] = -1  # the minimal reproducer: one word < 0
    inp = fuzz.FuzzInput(i, _with_state(seed, state), None)
    with pytest.raises(ProtocolError, match="STATE is not a valid guest state: OverflowError"):
        fuzz.run_input(inp, seeds)
    state["workload"]["state"]["rngs"][0][1][5] = -(2**63)  # the most negative a msgpack int holds
    with pytest.raises(ProtocolError, match="STATE is not a valid guest state: OverflowError"):
        fuzz.run_input(fuzz.FuzzInput(i, _with_state(seed, state), None), seeds)


@pytest.mark.parametrize("first", [fr.Error("fuzz", "an error"), fr.Abort("fuzz")], ids=["ERROR", "ABORT"])
def test_an_error_or_abort_instead_of_join_is_refused(seeds, first):
    """Found by `mte-migrate fuzz --seed 1` (inputs 21820, 49537, 59386,
    65822, 68771, 71930, 92107): ERROR and ABORT are legal in every state of
    the data machine, so a new connection whose first frame was one of them
    reached _check_join, which read ``frame.session``: AttributeError, out of
    _admit's task (only MigrationError is refused there)."""
    i = next(i for i, s in enumerate(seeds) if s.data)
    seed = seeds[i]
    data = b"".join(fr.encode(first, seed.checksum))  # the minimal reproducer: one frame
    with pytest.raises(ProtocolError, match=f"expected JOIN on a new connection, got {first.type.name}"):
        fuzz.run_input(fuzz.FuzzInput(i, b"".join(seed.control), data), seeds)


def test_a_postcopy_table_for_a_page_not_announced_is_refused_before_anything_is_placed(seeds):
    # found by the campaign: a table naming a page the destination holds let
    # its page through to UFFDIO_CONTINUE, which failed with EEXIST (a crash)
    i = next(i for i, s in enumerate(seeds) if s.name.startswith("full/") and s.name.endswith("/postcopy"))
    control = list(seeds[i].control)
    at = [j for j, raw in enumerate(control) if raw[2] == fr.FrameType.POSTCOPY][
        3
    ]  # the first table (after one discarded ahead and two announcing)
    ftype, flags, meta, payload = fuzz.split_frame(control[at])
    m = fuzz._unpack_meta(meta)
    m["r"] = fr.Postcopy([(5, 2)], b"").meta()["r"]
    control[at] = fuzz.build_frame(ftype, flags, msgpack.packb(m), bytes(16))
    with pytest.raises(ProtocolError, match="POSTCOPY table for page 5, which was not announced"):
        fuzz.run_input(fuzz.FuzzInput(i, b"".join(control), None), seeds)


def test_a_page_discarded_ahead_must_be_announced_at_the_switch(seeds):
    # A page discarded before the pause and then left out of the switch's
    # announcement would run on the destination as a hole: refused before
    # the guest resumes.
    i = next(i for i, s in enumerate(seeds) if "uffd-copy-tags" in s.name and s.name.endswith("/postcopy"))
    control = list(seeds[i].control)
    at = [j for j, raw in enumerate(control) if raw[2] == fr.FrameType.POSTCOPY][0]  # discarded ahead
    ftype, flags, meta, payload = fuzz.split_frame(control[at])
    m = fuzz._unpack_meta(meta)
    m["r"] = fr.Postcopy([(900, 1)], b"").meta()["r"]
    control[at] = fuzz.build_frame(ftype, flags, msgpack.packb(m), payload)
    with pytest.raises(ProtocolError, match="page 900 was discarded ahead but the switch did not announce it"):
        fuzz.run_input(fuzz.FuzzInput(i, b"".join(control), None), seeds)


def _with_frame(seed, after_type, nth, raw):
    """The seed's control stream with ``raw`` inserted after its ``nth``
    frame of ``after_type``."""
    control = list(seed.control)
    at = [j for j, f in enumerate(control) if f[2] == after_type][nth]
    return b"".join(control[: at + 1] + [raw] + control[at + 1 :])


def test_pages_may_be_discarded_ahead_once_and_then_only_state_may_follow(seeds):
    # A second discard ahead would hide the first from the switch's hole
    # check; PAGES, PASS_END or COMPLETE after one would land on discarded
    # pages or end in a stop-and-copy over holes.  Each is refused.
    i = next(i for i, s in enumerate(seeds) if "uffd-copy-tags" in s.name and s.name.endswith("/postcopy"))
    seed = seeds[i]
    control = list(seed.control)
    ahead = [f for f in control if f[2] == fr.FrameType.POSTCOPY][0]
    again = _with_frame(seed, fr.FrameType.POSTCOPY, 0, ahead)
    with pytest.raises(ProtocolError, match="discarded ahead twice"):
        fuzz.run_input(fuzz.FuzzInput(i, again, None), seeds)
    pass_end = [f for f in control if f[2] == fr.FrameType.PASS_END][0]
    late = _with_frame(seed, fr.FrameType.POSTCOPY, 0, pass_end)
    with pytest.raises(ProtocolError, match="PASS_END after pages were discarded ahead"):
        fuzz.run_input(fuzz.FuzzInput(i, late, None), seeds)
