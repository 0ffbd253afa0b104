"""The protocol's reference, rendered from the code itself: the frame list
(from the frame classes, their encoders, decoders and docstrings), the header
layout and the bounds (from their constants), and each state machine's
transition table and diagram (from the tables in machine.py).  docs/PROTOCOL.md
holds these renderings between marker comments::

    <!-- generated: NAME -->
    ...
    <!-- end generated -->

and prose around them.  Regenerate, or check that the document still says
what the code does (exit status 1 if not)::

    python -m migrate.protocol.describe --write docs/PROTOCOL.md
    python -m migrate.protocol.describe --check docs/PROTOCOL.md

Like the rest of the protocol layer the renderers import nothing that does
I/O and nothing from the layers above.  The figures that live there come in
as arguments: the configuration's defaults as ``defaults`` (the entry point
alone, a tool on top of everything like the command line, loads the
configuration at run time to get them), and how the engines use the timeout
as the constants below, which tests/test_protocol_docs.py checks against
the engines' code.
"""

import argparse
import ast
import dataclasses
import difflib
import importlib
import inspect
import re
import struct
import sys
import textwrap
import typing
from pathlib import Path

from migrate.errors import ProtocolError
from migrate.protocol import auth
from migrate.protocol import frames as fr
from migrate.protocol import machine as mc

T = fr.FrameType

#: How the engines use --timeout (migrate/engine/; the tests check these
#: against the engines' code): the destination looks at
#: its connections' last activity every timeout / LIVENESS_CHECKS ...
LIVENESS_CHECKS = 4
#: ... a later connection must finish TLS and send its first frame within
#: min(timeout, ADMIT_CAP_S) ...
ADMIT_CAP_S = 5.0
#: ... and the source retries RECOVER for RECOVER_TIMEOUTS timeouts.
RECOVER_TIMEOUTS = 2

#: The configuration defaults the document quotes (MigrationConfig fields).
CONFIG_FIELDS = ("timeout_s", "in_doubt_hold_s", "checksum", "channel_count", "batch_pages")

BEGIN = "<!-- generated: {} -->"
END = "<!-- end generated -->"
_SECTION = re.compile(r"<!-- generated: ([\w:.-]+) -->\n(.*?)<!-- end generated -->", re.S)


# -- frames -------------------------------------------------------------------------
#: (name, the source's machine) of every kind of connection: the source
#: opens each, so its table says which frames travel there and which way
CONNECTIONS = (
    ("control", mc.source_machine),
    ("data", lambda: mc.data_source_machine(1)),
    ("recovery", mc.recovery_source_machine),
)

#: (heading, section name, factory) of every machine, in document order
MACHINES = (
    ("Source, control connection", "source", mc.source_machine),
    ("Destination, control connection", "dest", mc.dest_machine),
    ("Source, each extra data connection", "data-source", lambda: mc.data_source_machine(1)),
    ("Destination, every later connection", "data-dest", mc.data_dest_machine),
    ("Source (or `mte-migrate resolve`), recovery connection", "recovery-source", mc.recovery_source_machine),
)


@dataclasses.dataclass(frozen=True)
class MetaField:
    key: str
    wire: str  # msgpack type on the wire
    carries: str  # what of the frame object it holds
    checked: str  # what the decoder enforces beyond the type
    optional: bool


def any_state_frames() -> dict:
    """Frame types legal in every live state, and the state each leads to:
    found by offering every type to a fresh machine, not from a list."""
    out = {}
    for t in T:
        m = mc.source_machine()
        try:
            m.step(mc.RECV, t)
        except ProtocolError:
            continue
        if m.state in (m.failed, m.aborted):
            out[t] = m.state
    return out


def senders(connections=CONNECTIONS) -> dict:
    """FrameType -> (who sends it, on which connections), from the source
    side's tables: sent there means source -> destination, received there
    destination -> source."""
    found: dict = {}
    for name, factory in connections:
        for (_, direction, what), _ in factory().table.items():
            if isinstance(what, T):
                who = "source" if direction == mc.SEND else "destination"
                found.setdefault(what, ({who}, []))
                found[what][0].add(who)
                if name not in found[what][1]:
                    found[what][1].append(name)
    out = {t: ("either side" if len(w) > 1 else w.pop(), ", ".join(c)) for t, (w, c) in found.items()}
    for t in any_state_frames():
        out[t] = ("either side", "any")
    return out


_DIRECTION = re.compile(r"^(Source -> destination|Destination -> source|Either way)[,:]?\s*")
_WHO = {"Source -> destination": "source", "Destination -> source": "destination", "Either way": "either side"}


def _first_paragraph(cls) -> str:
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n")[0].split())


def docstring_sender(cls) -> str | None:
    """Who the frame class's docstring says sends it."""
    m = _DIRECTION.match(_first_paragraph(cls))
    return _WHO[m.group(1)] if m else None


def purpose(cls) -> str:
    """The first sentence of the docstring, without its direction."""
    text = _DIRECTION.sub("", _first_paragraph(cls))
    text = re.split(r"(?<=\.)\s+(?=[A-Z(`])", text)[0]
    text = text.replace("``", "`")
    return text[:1].upper() + text[1:]


def _sample(cls, optional: bool):
    """An instance of a frame class with a value of the annotated type in
    every field without a default, and (``optional``) in every field that
    defaults to None, False (a flag sent only when set) or an empty list
    (sent only when it holds something: a sample holds a page range)."""
    hints = typing.get_type_hints(cls)
    values = {int: 1, str: "x", bytes: b"x", bool: True, list: [], dict: {}, object: b"x"}
    kwargs = {}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if optional and f.default_factory is list:
            kwargs[f.name] = [(1, 1)]
        elif required or (optional and (f.default is None or f.default is False)):
            kind = hints[f.name]
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            kwargs[f.name] = values[args[0] if args else kind]
    return cls(**kwargs)


def _wire_type(value) -> str:
    if value is None:
        return "nil"
    for kind, name in ((bool, "bool"), (int, "int"), (str, "str"), ((bytes, bytearray, memoryview), "bin")):
        if isinstance(value, kind):
            return name
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "map"
    raise TypeError(f"no msgpack type for {type(value).__name__}")


def _function(obj) -> ast.FunctionDef:
    return ast.parse(textwrap.dedent(inspect.getsource(obj))).body[0]


def _self_attrs(node) -> list[str]:
    return [n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and getattr(n.value, "id", "") == "self"]


def _carried(cls) -> dict[str, str]:
    """meta key -> what of the frame it carries, read from ``meta()``."""
    func = _function(cls.meta)
    local = {}
    for node in ast.walk(func):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    local[target.id] = node.value

    def show(expr) -> str:
        names = [n.id for n in ast.walk(expr) if isinstance(n, ast.Name) and n.id in local]
        if names:  # through a local variable: name what it was made from
            attrs = [a for n in names for a in _self_attrs(local[n])]
            return "from " + ", ".join(f"`{a}`" for a in dict.fromkeys(attrs))
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id.startswith("_"):
            # through a private encoder: name what it encodes
            return "from " + ", ".join(f"`{a}`" for a in dict.fromkeys(_self_attrs(expr)))
        return f"`{ast.unparse(expr).replace('self.', '')}`"

    out = {}
    for node in ast.walk(func):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and isinstance(k.value, str):
                    out[k.value] = show(v)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = [(target, node.value)]
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs = list(zip(target.elts, node.value.elts))
                for t, v in pairs:
                    if isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant):
                        out[t.slice.value] = show(v)
    return out


def _evaluate(node, cls):
    """A bound written in a decoder (constants, names of frames.py, ``cls``
    attributes, arithmetic), evaluated without eval()."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return cls if node.id == "cls" else getattr(fr, node.id)
    if isinstance(node, ast.Attribute):
        return getattr(_evaluate(node.value, cls), node.attr)
    if isinstance(node, ast.BinOp):
        ops = {ast.Add: int.__add__, ast.Sub: int.__sub__, ast.Mult: int.__mul__, ast.Pow: int.__pow__}
        return ops[type(node.op)](_evaluate(node.left, cls), _evaluate(node.right, cls))
    raise ValueError(f"cannot evaluate {ast.unparse(node)}")


def _below(limit: int) -> str:
    if limit >= 2**16 and limit & (limit - 1) == 0:
        return f"< 2^{limit.bit_length() - 1}"
    return f"≤ {limit - 1:,}"


def _len_limit(func) -> int:
    """N of a ``len(x) > N`` check in a function."""
    for node in ast.walk(_function(func)):
        if isinstance(node, ast.Compare) and getattr(getattr(node.left, "func", None), "id", "") == "len":
            return _evaluate(node.comparators[0], None)
    raise ValueError(f"{func.__name__} checks no length")


def _helper_check(call: ast.Call, cls) -> tuple[str, str]:
    """(meta key, what is enforced) of a call to one of frames.py's field checkers."""
    name, args = call.func.id, call.args
    if name == "_field":
        return args[1].value, ""
    if name == "_uint":
        limit = _evaluate(args[3], cls) if len(args) > 3 else inspect.signature(fr._uint).parameters["limit"].default
        return args[1].value, _below(limit)
    if name == "_nonce":
        key = args[2].value if len(args) > 2 else inspect.signature(fr._nonce).parameters["name"].default
        return key, f"≤ {_len_limit(fr._nonce)} bytes"
    if name == "_channels":
        return "channels", f"1 to {fr.Hello.MAX_CHANNELS}"
    raise ValueError(f"unknown field checker {name}")


CHECKERS = ("_field", "_uint", "_nonce", "_channels")


def decoder_checks(cls) -> dict[str, str]:
    """meta key -> what the decoder enforces beyond the type, read from
    ``from_meta`` (and the class methods it calls)."""
    funcs = [_function(cls.from_meta)]
    for node in ast.walk(funcs[0]):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and getattr(node.func.value, "id", "") == "cls"
        ):
            if node.func.attr in vars(cls):
                funcs.append(_function(getattr(cls, node.func.attr)))
    out, bound_to = {}, {}
    for func in funcs:
        for node in ast.walk(func):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in CHECKERS:
                key, text = _helper_check(node, cls)
                out[key] = text
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                if getattr(node.value.func, "id", None) in CHECKERS and isinstance(node.targets[0], ast.Name):
                    bound_to[node.targets[0].id] = _helper_check(node.value, cls)[0]
        for node in ast.walk(func):
            # value[:N]: cut to N characters
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call):
                if getattr(node.value.func, "id", None) in CHECKERS and isinstance(node.slice, ast.Slice):
                    key = _helper_check(node.value, cls)[0]
                    out[key] = _join(out[key], f"cut to {_evaluate(node.slice.upper, cls)} characters")
            # name not in ("a", "b"): one of them
            if isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.NotIn):
                name = getattr(node.left, "id", None)
                if name in bound_to and isinstance(node.comparators[0], ast.Tuple):
                    choices = " or ".join(f'"{e.value}"' for e in node.comparators[0].elts)
                    out[bound_to[name]] = _join(out[bound_to[name]], choices)
            # len(name) > N: at most N items
            if isinstance(node, ast.Compare) and getattr(getattr(node.left, "func", None), "id", "") == "len":
                arg = node.left.args[0]
                name = getattr(arg, "id", None)
                if name in bound_to and isinstance(node.ops[0], ast.Gt):
                    out[bound_to[name]] = _join(out[bound_to[name]], f"≤ {_evaluate(node.comparators[0], cls)} items")
    return out


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def meta_fields(cls) -> list[MetaField]:
    """Every meta key of a frame class: its msgpack type (from an encoded
    sample), what it carries (from ``meta()``), what the decoder checks, and
    whether it appears only when optional fields are set."""
    full, bare = _sample(cls, True).meta(), _sample(cls, False).meta()
    carried, checks = _carried(cls), decoder_checks(cls)
    return [
        MetaField(key, _wire_type(value), carried.get(key, ""), checks.get(key, ""), key not in bare)
        for key, value in full.items()
    ]


def payload_parts(cls) -> list[str]:
    """What a frame's payload holds, in wire order, read from ``payload()``."""
    if not hasattr(cls, "payload"):
        return []
    for node in ast.walk(_function(cls.payload)):
        if isinstance(node, ast.Return) and isinstance(node.value, ast.List):
            return [ast.unparse(e).replace("self.", "") for e in node.value.elts]
    raise ValueError(f"{cls.__name__}.payload does not return a list")


def render_frames(connections=CONNECTIONS) -> str:
    sent = senders(connections)
    rows = [
        "| type | name | sent by | connection | payload | purpose |",
        "|---:|---|---|---|---|---|",
    ]
    for t in T:
        cls = fr.FRAME_CLASSES[t]
        who, where = sent.get(t, ("(no table sends it)", ""))
        payload = " + ".join(f"`{p}`" for p in payload_parts(cls)) or "–"
        rows.append(f"| {t.value} | {t.name} | {who} | {where} | {payload} | {purpose(cls)} |")
    rows += [
        "",
        'Meta fields, in encoding order: the msgpack type ("optional": present only',
        "when the frame's optional fields are set), the frame attribute it carries,",
        "and what the decoder enforces beyond the type (a missing field or a wrong",
        "type is always refused):",
        "",
        "| frame | key | type | carries | checked |",
        "|---|---|---|---|---|",
    ]
    for t in T:
        cls = fr.FRAME_CLASSES[t]
        fields = meta_fields(cls)
        if not fields:
            rows.append(f"| {t.name} | – | | | |")
        for f in fields:
            wire = f"{f.wire}, optional" if f.optional else f.wire
            rows.append(f"| {t.name} | `{f.key}` | {wire} | {f.carries} | {f.checked} |")
    return "\n".join(rows) + "\n"


# -- header and bounds ------------------------------------------------------------------
_STRUCT_TYPES = {"s": "bytes", "B": "u8", "H": "u16", "I": "u32", "Q": "u64"}


def header_layout() -> list[tuple[int, int, str, str]]:
    """(offset, size, field, type) of the header: field names from the
    layout line of frames.py's docstring, sizes from the HEADER struct;
    they must agree."""
    line = next(ln for ln in (fr.__doc__ or "").splitlines() if ln.strip().startswith("magic") and "|" in ln)
    names = [part.split()[0] for part in line.split("|")]
    fmt = fr.HEADER.format
    if fmt[0] not in "<":
        raise ValueError(f"header struct {fmt!r} is not little-endian")
    parts = re.findall(r"(\d*)([a-zA-Z])", fmt[1:])
    if len(parts) != len(names):
        raise ValueError(f"frames.py's docstring names {len(names)} header fields, HEADER has {len(parts)}")
    out, offset = [], 0
    for name, (count, code) in zip(names, parts):
        size = struct.calcsize("<" + count + code)
        out.append((offset, size, name, _STRUCT_TYPES[code] if code != "s" else f"{size} bytes"))
        offset += size
    if offset != fr.HEADER_SIZE:
        raise ValueError("header fields do not add up to HEADER_SIZE")
    return out


def _bit(flag: int) -> int:
    return flag.bit_length() - 1


def render_header() -> str:
    layout = header_layout()
    crc_at = next(off for off, _, name, _ in layout if name.startswith("crc"))
    notes = {
        "magic": f"`{fr.MAGIC.decode()}`",
        "type": "a FrameType (below); any other value is a protocol error",
        "flags": (
            f"bit {_bit(fr.FLAG_CRC)} `FLAG_CRC`: a CRC is present; bit {_bit(fr.FLAG_CRC_META_ONLY)} "
            f"`FLAG_CRC_META_ONLY` (only with bit {_bit(fr.FLAG_CRC)}): the CRC leaves the payload out; "
            f"bit {_bit(fr.FLAG_MAC)} `FLAG_MAC`: a {fr.MAC_SIZE}-byte MAC follows the payload "
            "(required on a sealed connection, refused on any other); any other bit is a protocol error"
        ),
        "meta_len": f"≤ `MAX_META` = {fr.MAX_META:,}",
        "payload_len": f"≤ `MAX_PAYLOAD` = {fr.MAX_PAYLOAD:,}",
        "crc32": (
            f"CRC-32 over header bytes 0–{crc_at - 1}, the meta and (without `FLAG_CRC_META_ONLY`) "
            "the payload; 0 without `FLAG_CRC`"
        ),
    }
    rows = [
        f"A frame is a fixed {fr.HEADER_SIZE}-byte header, a msgpack map (the meta), an optional raw",
        f"payload and, with `FLAG_MAC`, a {fr.MAC_SIZE}-byte MAC. Integers are little-endian.",
        "",
        "| offset | size | field | type | notes |",
        "|---:|---:|---|---|---|",
    ]
    for offset, size, name, kind in layout:
        rows.append(f"| {offset} | {size} | {name} | {kind} | {notes.get(name, '')} |")
    return "\n".join(rows) + "\n"


def page_flags() -> list[tuple[str, int, str]]:
    """(name, value, meaning) of the per-page flags, the meaning from the
    comment beside each constant in frames.py."""
    found = re.findall(r"^(PAGE_[A-Z]+) = (0x[0-9A-Fa-f]+)\s+#\s*(.+)$", inspect.getsource(fr), re.M)
    out = [(name, int(value, 16), meaning.strip()) for name, value, meaning in found]
    for name, value, _ in out:
        if getattr(fr, name) != value:
            raise ValueError(f"{name} is not {value} any more")
    return out


def _flag_names(value: int, flags) -> str:
    names = [name for name, bit, _ in flags if value & bit]
    return f"`{' | '.join(names)}`" if names else "`0`"


def render_bounds(defaults: dict) -> str:
    slack = fr.MAX_PAYLOAD - fr.MAX_BATCH_PAGES * (fr.PAGE_SIZE + fr.PACKED_TAGS_PER_PAGE)
    bounds = [
        ("PROTOCOL_VERSION", fr.PROTOCOL_VERSION, "carried by HELLO and WELCOME; the destination refuses any other"),
        ("HEADER_SIZE", fr.HEADER_SIZE, "bytes of header, read and checked before anything else"),
        ("MAX_META", fr.MAX_META, "bytes of meta per frame"),
        ("MAC_SIZE", fr.MAC_SIZE, "bytes of MAC after the payload of a `FLAG_MAC` frame (not in `payload_len`)"),
        (
            "MAX_PAYLOAD",
            fr.MAX_PAYLOAD,
            f"bytes of payload per frame: `MAX_BATCH_PAGES` × (`PAGE_SIZE` + `PACKED_TAGS_PER_PAGE`) "
            f"+ {slack // 1024} KiB for a compressed part that came out larger than its input",
        ),
        (
            "MAX_BATCH_PAGES",
            fr.MAX_BATCH_PAGES,
            f"pages per PAGES frame (the source sends `batch_pages`, default {defaults['batch_pages']})",
        ),
        ("PAGE_SIZE", fr.PAGE_SIZE, "bytes per page (HELLO must agree)"),
        ("PACKED_TAGS_PER_PAGE", fr.PACKED_TAGS_PER_PAGE, "bytes of packed tags per page: two 4-bit tags a byte"),
        (
            "Hello.MAX_CHANNELS",
            fr.Hello.MAX_CHANNELS,
            f"data connections (`channels` in HELLO; {defaults['channel_count']} by default)",
        ),
        ("Inspect.MAX_CHUNKS", fr.Inspect.MAX_CHUNKS, "chunk numbers per INSPECT"),
        ("auth.NONCE_BYTES", auth.NONCE_BYTES, "bytes of each fresh nonce (HELLO, WELCOME)"),
        ("auth.MIN_KEY_BYTES", auth.MIN_KEY_BYTES, "bytes of shared key at least (`--psk-file`)"),
    ]
    rows = ["| bound | value | what |", "|---|---:|---|"]
    rows += [f"| `{name}` | {value:,} | {what} |" for name, value, what in bounds]
    flags = page_flags()
    rows += ["", "Per-page flags of a PAGES frame (`f`, one byte per page):", ""]
    rows += ["| flag | value | meaning |", "|---|---:|---|"]
    rows += [f"| `{name}` | {value:#04x} | {meaning} |" for name, value, meaning in flags]
    valid = ", ".join(_flag_names(v, flags) for v in fr.VALID_PAGE_FLAGS)
    rows += ["", f"Any other byte is refused. The valid ones: {valid}.", ""]
    rows += ["Checksum modes (`--checksum`, the same on both sides) and the header flags they set:", ""]
    rows += ["| mode | flags |", "|---|---|"]
    for mode, value in fr.CHECKSUM_FLAGS.items():
        names = [
            n for n, bit in (("FLAG_CRC", fr.FLAG_CRC), ("FLAG_CRC_META_ONLY", fr.FLAG_CRC_META_ONLY)) if value & bit
        ]
        default = " (default)" if mode == defaults["checksum"] else ""
        rows.append(f"| `{mode}`{default} | {' + '.join(f'`{n}`' for n in names) or 'none'} |")
    return "\n".join(rows) + "\n"


# -- state machines ------------------------------------------------------------------------
def _event(direction: str, what) -> str:
    if direction == mc.LOCAL:
        return f"local: {what}"
    return f"{direction} {what.name}"


def render_machine(machine: mc.StateMachine) -> str:
    """The transition table of one machine and a mermaid diagram of it."""
    rows = ["| state | event | next |", "|---|---|---|"]
    edges: dict = {}
    for (state, direction, what), new in machine.table.items():
        rows.append(f"| {state.name} | {_event(direction, what)} | {new.name} |")
        edges.setdefault((state.name, new.name), []).append(_event(direction, what).replace(":", ""))
    live = [s for s in type(machine.state) if s not in machine.terminal]
    used = {s for (s, _, _) in machine.table} | set(machine.table.values())
    live = [s for s in live if s in used]
    for what, goes in any_state_frames().items():
        new = machine.failed if goes.name == "FAILED" else machine.aborted
        rows.append(f"| any of {', '.join(s.name for s in live)} | send/recv {what.name} | {new.name} |")
    diagram = ["```mermaid", "stateDiagram-v2", f"    [*] --> {machine.state.name}"]
    for (a, b), events in edges.items():
        diagram.append(f"    {a} --> {b}: {', '.join(events)}")
    for s in sorted(machine.terminal - {machine.failed, machine.aborted}, key=lambda s: s.name):
        diagram.append(f"    {s.name} --> [*]")
    diagram.append("```")
    return "\n".join(rows + [""] + diagram) + "\n"


# -- timeouts ---------------------------------------------------------------------------
def _s(x: float) -> str:
    return f"{x:g} s"


def render_timeouts(defaults: dict) -> str:
    t, hold = defaults["timeout_s"], defaults["in_doubt_hold_s"]
    detect = t * (1 + 1 / LIVENESS_CHECKS)
    rows = [
        f"`--timeout` defaults to **{_s(t)}** (`MigrationConfig.timeout_s`); `--in-doubt-hold` to "
        f"**{_s(hold)}** (`in_doubt_hold_s`).",
        "",
        "| what | bound | with the defaults |",
        "|---|---|---:|",
        f"| connecting, the TLS handshake, sending one frame (all of it handed to the kernel) | `--timeout` | {_s(t)} |",
        f"| a reply awaited: WELCOME, HELLO and AUTH, INSPECTION, RESUMED | `--timeout` | {_s(t)} |",
        "| CONFIRM awaited by the source | `--timeout` plus an allowance for the destination to digest "
        f"what the final pass wrote | ≥ {_s(t)} |",
        f"| the destination declares the source dead: no connection has received a byte for `--timeout`, "
        f"looked at every `--timeout` / {LIVENESS_CHECKS} | at most {1 + 1 / LIVENESS_CHECKS:g} × `--timeout` "
        f"| {_s(detect)} |",
        f"| a later connection (data, recovery, stranger): TLS and its first frame | min(`--timeout`, "
        f"{_s(ADMIT_CAP_S)}) | {_s(min(t, ADMIT_CAP_S))} |",
        f"| the source retries RECOVER go on new connections (GO sent, RESUMED not heard) "
        f"| {RECOVER_TIMEOUTS} × `--timeout` | {_s(RECOVER_TIMEOUTS * t)} |",
        f"| the source tries RECOVER abort, best effort (the control connection broke before GO) "
        f"| `--timeout` | {_s(t)} |",
        f"| a side that may own the guest keeps it paused, waiting to be told | `--in-doubt-hold` | {_s(hold)} |",
    ]
    return "\n".join(rows) + "\n"


# -- the document ---------------------------------------------------------------------------
def sections(defaults: dict, machines=MACHINES) -> dict[str, str]:
    """Every generated section by name."""
    out = {"header": render_header(), "bounds": render_bounds(defaults), "frames": render_frames()}
    for _, name, factory in machines:
        out[f"machine:{name}"] = render_machine(factory())
    out["timeouts"] = render_timeouts(defaults)
    return out


def read_sections(text: str) -> dict[str, str]:
    """The generated sections a document holds, by name."""
    found = {}
    for m in _SECTION.finditer(text):
        if m.group(1) in found:
            raise ValueError(f"section {m.group(1)!r} appears twice")
        found[m.group(1)] = m.group(2)
    return found


def differences(text: str, rendered: dict[str, str]) -> list[str]:
    """One line per section that is missing, unknown, or not what the code
    renders now, followed by a diff; empty when the document is current."""
    held = read_sections(text)
    out = []
    for name in held.keys() - rendered.keys():
        out.append(f"section {name!r} is in the document but nothing renders it")
    for name, want in rendered.items():
        if name not in held:
            out.append(f"section {name!r} is missing: add {BEGIN.format(name)} ... {END}")
        elif held[name] != want:
            diff = difflib.unified_diff(
                held[name].splitlines(), want.splitlines(), f"{name} (document)", f"{name} (code)", lineterm=""
            )
            out.append(f"section {name!r} differs from the code:\n" + "\n".join(diff))
    return out


def replace(text: str, rendered: dict[str, str]) -> str:
    """The document with every generated section rendered anew."""
    unknown = read_sections(text).keys() - rendered.keys()
    if unknown:
        raise ValueError(f"unknown generated sections: {', '.join(sorted(unknown))}")
    missing = rendered.keys() - read_sections(text).keys()
    if missing:
        raise ValueError(f"the document has no place for: {', '.join(sorted(missing))}")
    return _SECTION.sub(lambda m: f"{BEGIN.format(m.group(1))}\n{rendered[m.group(1)]}{END}", text)


def config_defaults() -> dict:
    """The defaults of CONFIG_FIELDS, from a MigrationConfig made at run
    time: only the entry point calls this (the protocol layer does not
    import the configuration; the renderers take the figures as arguments)."""
    config = importlib.import_module("migrate.config.spec").MigrationConfig()
    return {name: getattr(config, name) for name in CONFIG_FIELDS}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migrate.protocol.describe", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", metavar="DOC", help="render the generated sections of DOC anew")
    mode.add_argument("--check", metavar="DOC", help="exit 1 if the generated sections of DOC are not current")
    args = parser.parse_args(argv)
    rendered = sections(config_defaults())
    if args.write:
        doc = Path(args.write)
        text = doc.read_text()
        new = replace(text, rendered)
        if new != text:
            doc.write_text(new)
        print(f"{doc}: {'rewritten' if new != text else 'already current'}")
        return 0
    if args.check:
        problems = differences(Path(args.check).read_text(), rendered)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print(f"{args.check} is stale: python -m migrate.protocol.describe --write {args.check}", file=sys.stderr)
        return 1 if problems else 0
    for name, text in rendered.items():
        print(f"{BEGIN.format(name)}\n{text}{END}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
