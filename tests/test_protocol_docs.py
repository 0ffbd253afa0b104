"""docs/PROTOCOL.md against the code (migrate/protocol/describe.py): the
generated sections must be what the code renders now, every frame type and
every transition of every state table must have its row, the documented
defaults must be the configuration's, and the check itself must be able to
fail.  When a test here fails because the code changed on purpose::

    python -m migrate.protocol.describe --write docs/PROTOCOL.md
"""

import re
import zlib
from pathlib import Path

import pytest

from migrate.config.spec import MigrationConfig
from migrate.errors import ProtocolError
from migrate.protocol import describe
from migrate.protocol import frames as fr
from migrate.protocol import machine as mc

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "PROTOCOL.md"
T = fr.FrameType
PAGE = fr.PAGE_SIZE

TAGS = b"\5" * fr.PACKED_TAGS_PER_PAGE
TAGS_CRC = zlib.crc32(TAGS)

#: one valid frame of every type, written here rather than by describe.py
EXAMPLES = {
    T.HELLO: fr.Hello(2, 1 << 20, PAGE, 16, True, 2, "tag-ioctl", "packed4", "zstd", "vm", 2, "s", b"\1" * 32),
    T.WELCOME: fr.Welcome(2, b"\2" * 32, b"\3" * 32, ram_ready=True),
    T.PAGES: fr.Pages(
        1,
        [(0, 2)],
        bytes([0, fr.PAGE_ZERO | fr.PAGE_TAGS]),
        b"\x11" * PAGE,
        TAGS,
        dcrc=1,
        tcrc=TAGS_CRC,
        live=True,
        quiet=True,
    ),
    T.PASS_END: fr.PassEnd(1, 2),
    T.STATE: fr.State({"vcpus": []}),
    T.COMPLETE: fr.Complete("d", "t", "s", 3),
    T.CONFIRM: fr.Confirm("d", "t", "s", b"\0" * 8),
    T.INSPECT: fr.Inspect([0, 1]),
    T.INSPECTION: fr.Inspection([0], b"\1" * 132),
    T.GO: fr.Go(),
    T.RESUMED: fr.Resumed(),
    T.ERROR: fr.Error("protocol", "bad"),
    T.ABORT: fr.Abort("user cancelled"),
    T.JOIN: fr.Join("s", 1, b"\4" * 32),
    T.AUTH: fr.Auth(b"\4" * 32),
    T.RECOVER: fr.Recover("s", "go"),
    T.POSTCOPY: fr.Postcopy([(0, 1)], b"\x00" * 8),
    T.REQUEST: fr.Request([(0, 1)]),
    T.APPLIED: fr.Applied(0, [(0, 1024)]),
}


def config_defaults() -> dict:
    config = MigrationConfig()
    return {name: getattr(config, name) for name in describe.CONFIG_FIELDS}


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


@pytest.fixture(scope="module")
def rendered() -> dict:
    return describe.sections(config_defaults())


def section(doc: str, name: str) -> str:
    held = describe.read_sections(doc)
    assert name in held, f"docs/PROTOCOL.md has no generated section {name!r}"
    return held[name]


def missing_frame_rows(doc: str) -> list[str]:
    """Frame types without a row in the document's frame table, and meta
    keys (of a real encoded frame) without a row in its field table."""
    text = section(doc, "frames")
    missing = []
    for t in T:
        if not re.search(rf"^\| {t.value} \| {t.name} \|", text, re.M):
            missing.append(t.name)
        for key in EXAMPLES[t].meta():
            if f"| {t.name} | `{key}` |" not in text:
                missing.append(f"{t.name}.{key}")
    return missing


def missing_transitions(doc: str, name: str, machine: mc.StateMachine) -> list[str]:
    """Transitions of a machine's table without their row in its section."""
    text = section(doc, f"machine:{name}")
    out = []
    for (state, direction, what), new in machine.table.items():
        event = f"local: {what}" if direction == mc.LOCAL else f"{direction} {what.name}"
        row = f"| {state.name} | {event} | {new.name} |"
        if row not in text:
            out.append(row)
    return out


# -- the document is current -----------------------------------------------------------
def test_generated_sections_are_what_the_code_renders_now(doc, rendered):
    problems = describe.differences(doc, rendered)
    assert not problems, "\n".join(problems) + "\n\nrun: python -m migrate.protocol.describe --write docs/PROTOCOL.md"


def test_the_entry_point_check_passes_on_the_document():
    assert describe.main(["--check", str(DOC)]) == 0


def test_every_frame_type_and_meta_key_has_a_row(doc):
    assert set(EXAMPLES) == set(T), "add an example of the new frame type to EXAMPLES"
    assert missing_frame_rows(doc) == []


@pytest.mark.parametrize("heading, name, factory", describe.MACHINES, ids=[m[1] for m in describe.MACHINES])
def test_every_transition_has_a_row(doc, heading, name, factory):
    assert missing_transitions(doc, name, factory()) == []
    assert f"### {heading}" in doc


def test_every_state_table_is_documented():
    documented = {id(factory().table) for _, _, factory in describe.MACHINES}
    tables = {n: v for n, v in vars(mc).items() if n.endswith("_TABLE") and isinstance(v, dict)}
    assert tables, "machine.py has no *_TABLE"
    undocumented = [n for n, table in tables.items() if id(table) not in documented]
    assert not undocumented, f"add these tables to describe.MACHINES: {undocumented}"


# -- what the renderings are drawn from -------------------------------------------------------
def test_the_entry_point_renders_with_the_real_config_defaults():
    assert describe.config_defaults() == config_defaults()


def test_documented_timeout_default_is_the_config_default(doc):
    text = section(doc, "timeouts")
    documented = re.search(r"`--timeout` defaults to \*\*([\d.]+) s\*\*", text)
    assert documented, "the timeouts section does not state the --timeout default"
    assert float(documented.group(1)) == MigrationConfig().timeout_s
    # and the detection bound quoted beside it
    detect = MigrationConfig().timeout_s * (1 + 1 / describe.LIVENESS_CHECKS)
    assert re.search(rf"declares the source dead.*\| {detect:g} s \|", text)
    hold = re.search(r"`--in-doubt-hold` to \*\*([\d.]+) s\*\*", text)
    assert hold and float(hold.group(1)) == MigrationConfig().in_doubt_hold_s


def test_the_engine_factors_quoted_are_the_engines():
    """describe.py may not import the engines; this is the bridge: each
    factor the timeouts section quotes must appear in the engines' code."""
    engine = "\n".join(p.read_text() for p in sorted((REPO / "migrate" / "engine").glob("*.py")))
    uses = {
        "LIVENESS_CHECKS": rf"timeout_s\s*/\s*{describe.LIVENESS_CHECKS}\b",
        "ADMIT_CAP_S": rf"min\([\w.]*timeout_s,\s*{describe.ADMIT_CAP_S}\)",
        "RECOVER_TIMEOUTS": rf"\b{describe.RECOVER_TIMEOUTS}\s*\*\s*[\w.]*timeout_s\b",
    }
    stale = [name for name, pattern in uses.items() if not re.search(pattern, engine)]
    assert not stale, f"the engines no longer use these as describe.py says: {stale}"


def test_the_prose_figures_are_the_engines(doc):
    """The few figures the hand-written text states: the chunk whose channel
    a page follows, what a chunk's digest CRC covers, and the pieces the
    destination keeps."""
    from migrate.engine import digest, lanes

    text = " ".join(doc.split())
    chunk, stripe = digest.CHUNK_PAGES, lanes.STRIPE_PAGES
    assert f"`(page // {stripe}) % N`, {stripe} pages being one 4 MiB stripe of four 1 MiB" in text
    assert chunk * PAGE == 1 << 20 and stripe == 4 * chunk == fr.MAX_BATCH_PAGES
    assert [lanes.channel_of(p, 3) for p in (0, stripe - 1, stripe, 2 * stripe, 3 * stripe)] == [0, 0, 1, 2, 0]
    assert f"A chunk's data CRC is the CRC32 of its bytes ({chunk * PAGE >> 20} MiB;" in text
    piece_kib = digest.PIECE_PAGES * PAGE // 1024
    assert f"the CRC of every {piece_kib} KiB piece ({digest.PIECE_PAGES} pages)" in text


def test_documented_meta_keys_are_exactly_what_the_decoder_requires():
    for t, frame in EXAMPLES.items():
        cls = fr.FRAME_CLASSES[t]
        meta = frame.meta()
        assert [f.key for f in describe.meta_fields(cls)] == list(meta), t.name
        payload = b"".join(bytes(p) for p in getattr(frame, "payload", list)())
        assert type(cls.from_meta(meta, payload)) is cls
        optional = {f.key for f in describe.meta_fields(cls) if f.optional}
        for key in meta:
            without = {k: v for k, v in meta.items() if k != key}
            if key in optional:  # may be left out, or only with its pair (dk, tk)
                try:
                    cls.from_meta(without, payload)
                except ProtocolError as exc:
                    assert f"missing field '{key}'" in str(exc)
                continue
            with pytest.raises(ProtocolError, match=f"missing field '{key}'"):
                cls.from_meta(without, payload)


def test_documented_bounds_are_enforced():
    """A sample of the "checked" column, tried against the decoder."""
    checks = {(t.name, f.key): f.checked for t in T for f in describe.meta_fields(fr.FRAME_CLASSES[t])}
    assert checks[("PAGES", "dl")] == f"≤ {fr.MAX_PAYLOAD:,}"
    assert checks[("INSPECT", "c")] == f"≤ {fr.Inspect.MAX_CHUNKS} items"
    assert checks[("RECOVER", "decision")] == '"go" or "abort" or "postcopy"'
    assert checks[("HELLO", "channels")] == f"1 to {fr.Hello.MAX_CHANNELS}"
    with pytest.raises(ProtocolError):
        fr.Inspect.from_meta({"c": list(range(fr.Inspect.MAX_CHUNKS + 1))}, b"")
    with pytest.raises(ProtocolError):
        fr.Recover.from_meta({"session": "s", "decision": "maybe", "proof": b""}, b"")
    with pytest.raises(ProtocolError):
        fr.Welcome.from_meta({"version": 1 << 16, "nonce": b"", "proof": b""}, b"")
    with pytest.raises(ProtocolError):
        fr.Auth.from_meta({"proof": b"\0" * 65}, b"")
    assert fr.Error.from_meta({"code": "c" * 100, "message": "m"}, b"").code == "c" * 64


def test_frame_docstrings_name_the_sender_the_tables_name():
    sent = describe.senders()
    for t in T:
        cls = fr.FRAME_CLASSES[t]
        assert describe.docstring_sender(cls) == sent[t][0], f"{cls.__name__}: docstring vs state tables"
        assert describe.purpose(cls), f"{cls.__name__} has no docstring"


def test_error_and_abort_are_the_frames_legal_everywhere():
    assert describe.any_state_frames() == {T.ERROR: mc.SourceState.FAILED, T.ABORT: mc.SourceState.ABORTED}
    for _, _, factory in describe.MACHINES:
        probe = factory()
        live = {s for (s, _, _) in probe.table} - probe.terminal
        for state in live:
            for t, goes in describe.any_state_frames().items():
                m = factory()
                m.state = state
                m.step(mc.RECV, t)
                assert m.state.name == goes.name


def test_header_layout_is_the_encoded_header():
    frame = EXAMPLES[T.WELCOME]
    raw = b"".join(bytes(b) for b in fr.encode(frame, "full"))
    header = fr.parse_header(raw[: fr.HEADER_SIZE], "full")
    at = {name: (offset, size) for offset, size, name, _ in describe.header_layout()}
    field = lambda name: int.from_bytes(raw[at[name][0] : sum(at[name])], "little")  # noqa: E731
    assert raw[at["magic"][0] : sum(at["magic"])] == fr.MAGIC
    assert field("type") == T.WELCOME
    assert field("flags") == header.flags == fr.FLAG_CRC
    assert field("meta_len") == header.meta_len
    assert field("payload_len") == header.payload_len == 0
    assert field("crc32") == header.crc


# -- the check can fail ----------------------------------------------------------------------
def test_check_fails_when_a_table_changes(doc, rendered):
    doctored = dict(mc.SOURCE_TABLE)
    del doctored[(mc.SourceState.VALIDATING, mc.SEND, T.INSPECT)]
    doctored[(mc.SourceState.SWITCHING, mc.RECV, T.ERROR)] = mc.SourceState.FAILED
    machine = mc.StateMachine(
        "source", mc.SourceState.IDLE, doctored, mc.SourceState.FAILED, mc.SourceState.ABORTED, set()
    )
    problems = describe.differences(doc, {**rendered, "machine:source": describe.render_machine(machine)})
    assert len(problems) == 1 and "machine:source" in problems[0]
    assert "| VALIDATING | send INSPECT | VALIDATING |" in problems[0]
    assert "SWITCHING | recv ERROR | FAILED" in problems[0]
    assert missing_transitions(doc, "source", machine) == ["| SWITCHING | recv ERROR | FAILED |"]


def test_check_fails_when_the_document_is_edited(doc, rendered):
    without_recover = re.sub(r"^\| 16 \| RECOVER \|.*\n", "", doc, flags=re.M)
    assert without_recover != doc
    assert missing_frame_rows(without_recover) == ["RECOVER"]
    assert any("'frames' differs" in p for p in describe.differences(without_recover, rendered))
    old_default = doc.replace("defaults to **8 s**", "defaults to **10 s**")
    assert old_default != doc
    assert any("'timeouts' differs" in p for p in describe.differences(old_default, rendered))
    no_section = re.sub(r"<!-- generated: machine:data-dest -->.*?<!-- end generated -->", "", doc, flags=re.S)
    assert any("'machine:data-dest' is missing" in p for p in describe.differences(no_section, rendered))
    stray = doc + "\n<!-- generated: nothing -->\n<!-- end generated -->\n"
    assert any("'nothing'" in p for p in describe.differences(stray, rendered))


def test_write_then_check_round_trip(tmp_path, doc, capsys):
    stale = tmp_path / "PROTOCOL.md"
    stale.write_text(re.sub(r"^\| IDLE \| send HELLO \| HANDSHAKE \|\n", "", doc, flags=re.M))
    assert describe.main(["--check", str(stale)]) == 1
    assert "machine:source" in capsys.readouterr().err
    assert describe.main(["--write", str(stale)]) == 0
    assert stale.read_text() == doc
    assert describe.main(["--check", str(stale)]) == 0


def test_write_refuses_a_document_without_a_place_for_a_section(doc, rendered):
    no_section = re.sub(r"<!-- generated: timeouts -->.*?<!-- end generated -->", "", doc, flags=re.S)
    with pytest.raises(ValueError, match="timeouts"):
        describe.replace(no_section, rendered)
