"""Wire codec (migrate/frames.py): round trips, header bounds, CRC, field
checks, and property/fuzz tests that the decoder raises only ProtocolError.

The fuzz tests run FUZZ_EXAMPLES hypothesis examples each (default 200, so
this file stays fast).  A longer fuzz run::

    FUZZ_EXAMPLES=200000 python3 -m pytest tests/test_frames.py -k fuzz
"""

import os
import struct
import zlib
from array import array

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrate.errors import ProtocolError
from migrate.protocol import frames as fr
from migrate.protocol.machine import (
    Connection,
    DestState,
    SourceState,
    data_source_machine,
    dest_machine,
    source_machine,
)

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
fuzz_settings = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
T = fr.FrameType
PAGE = fr.PAGE_SIZE


# -- helpers -------------------------------------------------------------------
def wire(frame, checksum=True) -> bytes:
    return b"".join(bytes(b) for b in fr.encode(frame, checksum))


def raw_frame(ftype, meta, payload=b"", flags=fr.FLAG_CRC, meta_bytes=None) -> bytes:
    """A frame built by hand (any meta, any type), with a correct CRC."""
    mb = msgpack.packb(meta) if meta_bytes is None else meta_bytes
    head = struct.pack("<2sBBII", fr.MAGIC, int(ftype), flags, len(mb), len(payload))
    crc = zlib.crc32(payload, zlib.crc32(mb, zlib.crc32(head))) if flags & fr.FLAG_CRC else 0
    return head + struct.pack("<I", crc) + mb + payload


def header(magic=fr.MAGIC, ftype=1, flags=fr.FLAG_CRC, meta_len=0, payload_len=0, crc=0) -> bytes:
    return fr.HEADER.pack(magic, ftype, flags, meta_len, payload_len, crc)


def pages_meta(ranges, flags, dl=0, p=1, dc=False, tc=False):
    flat = array("Q", [v for r in ranges for v in r])
    return {"p": p, "r": flat.tobytes(), "f": bytes(flags), "dc": dc, "tc": tc, "dl": dl}


def decode_one(data: bytes):
    frames = fr.FrameBuffer().feed(data)
    assert len(frames) == 1
    return frames[0]


def sample_pages():
    data = bytes(range(256)) * 16 + b"\xaa" * PAGE  # two data pages
    tags = bytes([0x21]) * fr.PACKED_TAGS_PER_PAGE  # one tagged page
    return fr.Pages(7, [(0, 2), (10, 1)], bytes([0, fr.PAGE_ZERO | fr.PAGE_TAGS, 0]), data, tags)


SAMPLES = [
    fr.Hello(1, 8 << 20, 4096, 16, True, 2, "tag-ioctl", "packed4", "auto", "vm-1"),
    fr.Hello(
        1, 8 << 20, 4096, 16, True, 2, "tag-ioctl", "packed4", "auto", "vm-1", 4, "0123456789abcdef", bytes(range(32))
    ),  # with a nonce
    fr.Welcome(1),
    fr.Welcome(1, b"\x5a" * 32, bytes(range(100, 132))),  # nonce and proof
    fr.Auth(),  # no key: empty proof
    fr.Auth(bytes(range(200, 232))),
    sample_pages(),
    fr.Pages(0, [(5, 3)], bytes([fr.PAGE_ZERO]) * 3),  # all zero: no payload
    fr.Pages(3, [(1, 1)], bytes([0]), b"compressed?", b"tags!", True, True),
    fr.PassEnd(4, 1234),
    fr.State({"vcpus": [{"pc": 4096, "regs": [1, 2, 3]}], "devices": {"uart": b"\x00\x01"}}),
    fr.Complete("d" * 64, "t" * 64, "s" * 64),
    fr.Confirm("d" * 64, "t" * 64, "s" * 64, b"\x01\x02\x03\x04" * 4),
    fr.Confirm("d", "t", "s"),
    fr.Inspect([0, 3, 17]),
    fr.Inspection([3], b"\x05" * (4 + 128)),
    fr.Go(),
    fr.Resumed(),
    fr.Error("protocol", "something went wrong"),
    fr.Abort("cancelled by the user"),
]
if hasattr(fr, "Join"):  # extra data connections
    SAMPLES.append(fr.Join("session-1", 1))
    SAMPLES.append(fr.Join("0123456789abcdef", 3, b"\xee" * 32))
if hasattr(fr, "Recover"):  # the in-doubt window, on a new connection
    SAMPLES.append(fr.Recover("0123456789abcdef", "go"))
    SAMPLES.append(fr.Recover("0123456789abcdef", "abort"))
SAMPLES.append(fr.Postcopy([(3, 2), (9, 1)], bytes(range(24))))  # the switch to postcopy
SAMPLES.append(fr.Postcopy([(0, 1)], b"\x01" * 8, last=False))
SAMPLES.append(fr.Request([(5, 1), (50, 4)]))
SAMPLES.append(fr.Applied(3))
SAMPLE_IDS = [f"{f.type.name}-{i}" for i, f in enumerate(SAMPLES)]


# States in which a receiving Connection accepts each frame type.
RECEIVER = {
    T.HELLO: (dest_machine, DestState.WAIT_HELLO),
    T.WELCOME: (source_machine, SourceState.HANDSHAKE),
    T.AUTH: (dest_machine, DestState.AUTHENTICATING),
    T.PAGES: (dest_machine, DestState.RECEIVING),
    T.PASS_END: (dest_machine, DestState.RECEIVING),
    T.STATE: (dest_machine, DestState.RECEIVING),
    T.COMPLETE: (dest_machine, DestState.STATE_LOADED),
    T.CONFIRM: (source_machine, SourceState.COMPLETING),
    T.INSPECT: (dest_machine, DestState.AWAIT_GO),
    T.INSPECTION: (source_machine, SourceState.VALIDATING),
    T.GO: (dest_machine, DestState.AWAIT_GO),
    T.RESUMED: (source_machine, SourceState.SWITCHING),
    T.ERROR: (dest_machine, DestState.RECEIVING),
    T.ABORT: (source_machine, SourceState.PRECOPY),
}
if hasattr(T, "JOIN"):
    from migrate.protocol.machine import data_dest_machine

    RECEIVER[T.JOIN] = (data_dest_machine, DestState.WAIT_HELLO)
if hasattr(T, "RECOVER"):
    RECEIVER[T.RECOVER] = (data_dest_machine, DestState.WAIT_HELLO)
RECEIVER[T.POSTCOPY] = (dest_machine, DestState.STATE_LOADED)
RECEIVER[T.APPLIED] = (source_machine, SourceState.PRECOPY)
RECEIVER[T.REQUEST] = (lambda: data_source_machine(2), SourceState.POSTCOPY)  # on the fault channel


def receiver_for(ftype, ram_pages=64):
    make, state = RECEIVER[ftype]
    conn = Connection(make())
    conn.machine.state = state
    conn.ram_pages = ram_pages
    return conn


# -- round trips -------------------------------------------------------------------
def test_every_frame_type_has_a_sample():
    assert {f.type for f in SAMPLES} == set(T)
    assert set(fr.FRAME_CLASSES) == set(T)


@pytest.mark.parametrize("frame", SAMPLES, ids=SAMPLE_IDS)
@pytest.mark.parametrize("checksum", [True, False])
def test_round_trip_framebuffer(frame, checksum):
    data = wire(frame, checksum)
    assert data[:2] == fr.MAGIC
    assert data[3] == (fr.FLAG_CRC if checksum else 0)
    buf = fr.FrameBuffer()
    out = buf.feed(data)
    assert out == [frame]
    assert type(out[0]) is type(frame)
    assert buf.pending == 0


@pytest.mark.parametrize("frame", SAMPLES, ids=SAMPLE_IDS)
def test_round_trip_connection_feed(frame):
    conn = receiver_for(frame.type)
    assert conn.feed(wire(frame)) == [frame]


@pytest.mark.parametrize("frame", SAMPLES, ids=SAMPLE_IDS)
def test_round_trip_one_byte_at_a_time(frame):
    buf = fr.FrameBuffer()
    data = wire(frame)
    out = []
    for i in range(len(data)):
        out += buf.feed(data[i : i + 1])
        if i < len(data) - 1:
            assert out == []
            assert buf.pending == i + 1
    assert out == [frame]
    assert buf.pending == 0


def test_many_frames_in_one_feed_and_a_partial_tail():
    stream = b"".join(wire(f) for f in SAMPLES)
    extra = wire(fr.PassEnd(9, 9))
    buf = fr.FrameBuffer()
    assert buf.feed(stream + extra[:20]) == SAMPLES
    assert buf.pending == 20
    assert buf.feed(extra[20:]) == [fr.PassEnd(9, 9)]
    assert buf.pending == 0


def test_pages_payload_is_data_then_tags_and_dl_splits_them():
    frame = sample_pages()
    data = wire(frame)
    h = fr.parse_header(data[: fr.HEADER_SIZE])
    assert h.type == T.PAGES
    assert h.payload_len == len(frame.data) + len(frame.tags)
    meta = msgpack.unpackb(data[fr.HEADER_SIZE : fr.HEADER_SIZE + h.meta_len])
    assert meta["dl"] == len(frame.data)
    got = decode_one(data)
    assert bytes(got.data) == frame.data and bytes(got.tags) == frame.tags
    assert got.ranges == [(0, 2), (10, 1)]
    assert got.npages == 3


def test_encode_does_not_copy_payload_buffers():
    big = bytearray(b"\x07" * (2 * PAGE))
    frame = fr.Pages(1, [(0, 2)], bytes(2), memoryview(big))
    bufs = fr.encode(frame)
    assert len(bufs) == 2
    assert bufs[1].obj is big  # the guest-RAM view itself goes to the socket


def test_encode_refuses_oversized_frames():
    with pytest.raises(ValueError, match="too large"):
        fr.encode(fr.Inspection([0], bytes(fr.MAX_PAYLOAD + 1)))
    with pytest.raises(ValueError, match="too large"):
        fr.encode(fr.Error("x", "y" * (fr.MAX_META + 1)))


# -- header bounds: checked on the 16 header bytes alone ---------------------------------
@pytest.mark.parametrize(
    "raw, match",
    [
        (header(magic=b"XX"), "bad frame magic"),
        (header(magic=b"TM"), "bad frame magic"),
        (header(ftype=0), "unknown frame type 0"),
        (header(ftype=len(T) + 1), f"unknown frame type {len(T) + 1}"),
        (header(ftype=255), "unknown frame type 255"),
        (header(flags=0x02), "unknown frame flags 0x2"),
        (header(flags=0x81), "unknown frame flags 0x81"),
        (header(meta_len=fr.MAX_META + 1), f"meta length {fr.MAX_META + 1} exceeds the limit {fr.MAX_META}"),
        (header(meta_len=2**32 - 1), "meta length .* exceeds the limit"),
        (header(payload_len=fr.MAX_PAYLOAD + 1), f"payload length {fr.MAX_PAYLOAD + 1} exceeds the limit"),
        (header(payload_len=2**32 - 1), "payload length .* exceeds the limit"),
    ],
)
def test_parse_header_rejects(raw, match):
    with pytest.raises(ProtocolError, match=match):
        fr.parse_header(raw)
    # The FrameBuffer raises as soon as it holds the header: it does not wait
    # for (or allocate) the meta and payload the header announces.
    buf = fr.FrameBuffer()
    with pytest.raises(ProtocolError, match=match):
        buf.feed(raw)
    conn = Connection(dest_machine())
    with pytest.raises(ProtocolError, match=match):
        conn.parse_header(raw)


def test_parse_header_accepts_the_bounds_exactly():
    h = fr.parse_header(header(ftype=T.PAGES, meta_len=fr.MAX_META, payload_len=fr.MAX_PAYLOAD, crc=5))
    assert (h.type, h.flags, h.meta_len, h.payload_len, h.crc) == (T.PAGES, fr.FLAG_CRC, fr.MAX_META, fr.MAX_PAYLOAD, 5)
    assert fr.parse_header(header(flags=0)).flags == 0


@pytest.mark.parametrize("n", [0, 1, 15, 17])
def test_parse_header_rejects_wrong_length(n):
    with pytest.raises(ProtocolError, match="truncated frame header"):
        fr.parse_header(header()[:n] if n <= 16 else header() + b"x")


def test_header_only_of_a_valid_frame_waits_for_the_rest():
    data = wire(sample_pages())
    buf = fr.FrameBuffer()
    assert buf.feed(data[: fr.HEADER_SIZE]) == []
    assert buf.pending == fr.HEADER_SIZE


def test_max_payload_covers_a_full_batch_with_tags():
    assert fr.MAX_PAYLOAD >= fr.MAX_BATCH_PAGES * (fr.PAGE_SIZE + fr.PACKED_TAGS_PER_PAGE)


# -- CRC -----------------------------------------------------------------------------
CRC_FRAMES = [
    fr.Hello(1, 8 << 20, 4096, 16, True, 2, "tag-ioctl", "packed4", "auto", "", nonce=b"\x01" * 32),
    sample_pages(),
    fr.Go(),
    fr.State({"a": 1}),
    fr.Auth(b"\x07" * 32),
]


def _detected(mutated: bytes) -> bool:
    """Feed a mutated frame to a receiver that requires checksums (as a
    Connection with checksum=True, the default, does); pad it with zeros if
    its (possibly corrupted) header announces more bytes, as the rest of a
    stream would.  True when a ProtocolError is raised."""
    buf = fr.FrameBuffer(require_crc=True)
    try:
        h = fr.parse_header(mutated[: fr.HEADER_SIZE])
        buf.feed(mutated + bytes(max(0, h.total - len(mutated))))
    except ProtocolError:
        return True
    return False


@pytest.mark.parametrize("frame", CRC_FRAMES, ids=lambda f: f.type.name)
@given(data=st.data())
@settings(max_examples=150, deadline=None)
def test_any_single_byte_flip_is_detected(frame, data):
    good = wire(frame)
    pos = data.draw(st.integers(0, len(good) - 1), label="position")
    xor = data.draw(st.integers(1, 255), label="xor")
    mutated = bytearray(good)
    mutated[pos] ^= xor
    assert _detected(bytes(mutated)), f"flip of byte {pos} by {xor:#x} went unnoticed"


@pytest.mark.parametrize("frame", CRC_FRAMES, ids=lambda f: f.type.name)
def test_every_single_bit_flip_is_detected(frame):
    """Every bit of the header and meta; payload bits sampled (the
    hypothesis test above covers any position)."""
    good = wire(frame)
    body = fr.HEADER_SIZE + fr.parse_header(good[: fr.HEADER_SIZE]).meta_len
    positions = list(range(body)) + list(range(body, len(good), 61)) + [len(good) - 1]
    for pos in sorted(set(positions)):
        for bit in range(8):
            mutated = bytearray(good)
            mutated[pos] ^= 1 << bit
            assert _detected(bytes(mutated)), f"flip of bit {bit} of byte {pos} went unnoticed"


def test_crc_error_names_the_frame_and_corruption():
    good = bytearray(wire(sample_pages()))
    good[-1] ^= 0xFF
    with pytest.raises(ProtocolError, match="PAGES frame failed its checksum.*corrupt"):
        fr.FrameBuffer().feed(bytes(good))


def test_crc_covers_the_header():
    good = bytearray(wire(fr.PassEnd(1, 2)))
    good[2] = T.GO  # same lengths, another type: only the CRC can tell
    with pytest.raises(ProtocolError, match="checksum"):
        fr.FrameBuffer().feed(bytes(good))


def test_checksum_false_frames_decode_without_crc():
    data = wire(fr.PassEnd(1, 2), checksum=False)
    assert data[12:16] == b"\0\0\0\0"
    assert decode_one(data) == fr.PassEnd(1, 2)
    conn = Connection(dest_machine(), checksum=False)
    conn.machine.state = DestState.RECEIVING
    assert conn.feed(data) == [fr.PassEnd(1, 2)]
    # A receiver without checksums still checks the ones it is sent.
    conn = Connection(dest_machine(), checksum=False)
    conn.machine.state = DestState.RECEIVING
    bad = bytearray(wire(fr.PassEnd(1, 2)))
    bad[-1] ^= 1
    with pytest.raises(ProtocolError, match="checksum"):
        conn.feed(bytes(bad))


def test_flag_bit_flip_cannot_switch_the_checksum_off():
    # Clearing FLAG_CRC (one bit) must not turn the check off in a receiver
    # that sends checksums itself: otherwise a second error in the same
    # frame would go unnoticed.
    good = bytearray(wire(fr.PassEnd(1, 2)))
    good[3] ^= fr.FLAG_CRC
    good[-1] ^= 0x40  # and the meta is corrupt too
    conn = Connection(dest_machine())
    conn.machine.state = DestState.RECEIVING
    with pytest.raises(ProtocolError, match="PASS_END frame has no checksum, but this side requires one"):
        conn.feed(bytes(good))
    with pytest.raises(ProtocolError, match="no checksum"):
        conn.parse_header(bytes(good[: fr.HEADER_SIZE]))
    with pytest.raises(ProtocolError, match="no checksum"):
        fr.FrameBuffer(require_crc=True).feed(bytes(good[: fr.HEADER_SIZE]))


# -- field checks ------------------------------------------------------------------------
HELLO_META = fr.Hello(1, 8 << 20, 4096, 16, True, 2, "tag-ioctl", "packed4", "auto", "").meta()


def _expect(ftype, meta, match, payload=b""):
    with pytest.raises(ProtocolError, match=match):
        fr.FrameBuffer().feed(raw_frame(ftype, meta, payload))
    conn = receiver_for(ftype)
    with pytest.raises(ProtocolError, match=match):
        conn.feed(raw_frame(ftype, meta, payload))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("ram_size", "8MiB", "HELLO field 'ram_size' must be int, got str"),
        ("ram_size", 8.0 * 2**20, "HELLO field 'ram_size' must be int, got float"),
        ("ram_size", True, "HELLO field 'ram_size' must be int, got bool"),
        ("version", False, "HELLO field 'version' must be int, got bool"),
        ("vcpus", None, "HELLO field 'vcpus' must be int, got NoneType"),
        ("page_size", [4096], "HELLO field 'page_size' must be int, got list"),
        ("mte", 1, "HELLO field 'mte' must be bool, got int"),
        ("strategy", b"tag-ioctl", "HELLO field 'strategy' must be str, got bytes"),
        ("compression", 1, "HELLO field 'compression' must be str, got int"),
        ("ram_size", -4096, "HELLO field 'ram_size' = -4096 is out of range"),
        ("ram_size", 2**48, "HELLO field 'ram_size' = 281474976710656 is out of range"),
        ("vcpus", 4096, "HELLO field 'vcpus' = 4096 is out of range"),
        ("version", 2**16, "HELLO field 'version' = 65536 is out of range"),
        ("nonce", "abc", "HELLO field 'nonce' must be bytes, got str"),
        ("nonce", None, "HELLO field 'nonce' must be bytes, got NoneType"),
        ("nonce", b"\0" * 65, "HELLO field 'nonce' is longer than 64 bytes"),
    ],
)
def test_hello_field_types_and_ranges(field, value, match):
    _expect(T.HELLO, {**HELLO_META, field: value}, match)


@pytest.mark.parametrize("field", sorted(HELLO_META))
def test_hello_missing_field(field):
    meta = dict(HELLO_META)
    del meta[field]
    _expect(T.HELLO, meta, f"HELLO frame is missing field '{field}'")


@pytest.mark.parametrize(
    "ftype, meta, match",
    [
        (T.WELCOME, {}, "WELCOME frame is missing field 'version'"),
        (T.WELCOME, {"version": "1"}, "WELCOME field 'version' must be int, got str"),
        (T.WELCOME, {"version": 1, "proof": b""}, "WELCOME frame is missing field 'nonce'"),
        (T.WELCOME, {"version": 1, "nonce": b""}, "WELCOME frame is missing field 'proof'"),
        (T.WELCOME, {"version": 1, "nonce": "n", "proof": b""}, "WELCOME field 'nonce' must be bytes, got str"),
        (T.WELCOME, {"version": 1, "nonce": b"", "proof": 7}, "WELCOME field 'proof' must be bytes, got int"),
        (T.WELCOME, {"version": 1, "nonce": b"\0" * 65, "proof": b""}, "WELCOME field 'nonce' is longer than 64 bytes"),
        (T.WELCOME, {"version": 1, "nonce": b"", "proof": b"\0" * 65}, "WELCOME field 'proof' is longer than 64 bytes"),
        (T.AUTH, {}, "AUTH frame is missing field 'proof'"),
        (T.AUTH, {"proof": "secret"}, "AUTH field 'proof' must be bytes, got str"),
        (T.AUTH, {"proof": True}, "AUTH field 'proof' must be bytes, got bool"),
        (T.AUTH, {"proof": [1, 2]}, "AUTH field 'proof' must be bytes, got list"),
        (T.AUTH, {"proof": b"\0" * 65}, "AUTH field 'proof' is longer than 64 bytes"),
        (T.JOIN, {"session": "s", "channel": 1}, "JOIN frame is missing field 'proof'"),
        (T.JOIN, {"session": "s", "channel": 1, "proof": "p"}, "JOIN field 'proof' must be bytes, got str"),
        (T.JOIN, {"session": "s", "channel": 1, "proof": b"\0" * 65}, "JOIN field 'proof' is longer than 64 bytes"),
        (T.PASS_END, {"p": 1}, "PASS_END frame is missing field 'n'"),
        (T.PASS_END, {"p": 1, "n": -1}, "PASS_END field 'n' = -1 is out of range"),
        (T.PASS_END, {"p": True, "n": 1}, "PASS_END field 'p' must be int, got bool"),
        (T.COMPLETE, {"d": "a", "t": "b"}, "COMPLETE frame is missing field 's'"),
        (T.COMPLETE, {"d": "a", "t": 5, "s": "c"}, "COMPLETE field 't' must be str, got int"),
        (T.CONFIRM, {"d": b"a", "t": "b", "s": "c"}, "CONFIRM field 'd' must be str, got bytes"),
        (T.INSPECT, {"c": "0"}, "INSPECT field 'c' must be list, got str"),
        (T.INSPECT, {"c": [0, -1]}, "INSPECT wants a list of at most 64 chunk numbers"),
        (T.INSPECT, {"c": [True]}, "INSPECT wants a list"),
        (T.INSPECT, {"c": list(range(65))}, "INSPECT wants a list of at most 64"),
        (T.INSPECTION, {"c": [1.5]}, "INSPECTION chunk numbers must be non-negative integers"),
        (T.ERROR, {"code": "x"}, "ERROR frame is missing field 'message'"),
        (T.ERROR, {"code": 1, "message": "m"}, "ERROR field 'code' must be str, got int"),
        (T.ABORT, {"why": "x"}, "ABORT frame is missing field 'reason'"),
    ],
)
def test_other_frames_field_checks(ftype, meta, match):
    _expect(ftype, meta, match)


@pytest.mark.parametrize(
    "meta_bytes, match",
    [
        (msgpack.packb([1, 2]), "HELLO frame meta must be a map"),
        (msgpack.packb("hello"), "HELLO frame meta must be a map"),
        (b"\xc1", "HELLO frame meta is not valid msgpack"),
        (b"\x81", "HELLO frame meta is not valid msgpack"),  # map missing its entry
        (msgpack.packb({1: 2}), "HELLO frame meta is not valid msgpack"),  # int keys refused
        (b"\x81\xa1\xff\x01", "HELLO frame meta is not valid msgpack"),  # invalid UTF-8 key
        (b"", "HELLO frame meta is not valid msgpack"),
    ],
)
def test_meta_must_be_a_msgpack_map(meta_bytes, match):
    with pytest.raises(ProtocolError, match=match):
        fr.FrameBuffer().feed(raw_frame(T.HELLO, None, meta_bytes=meta_bytes))


def test_nonces_and_proofs_of_64_bytes_are_accepted():
    # the bound is inclusive: SHA-512-sized proofs would still fit
    longest = bytes(range(64))
    assert decode_one(wire(fr.Auth(longest))) == fr.Auth(longest)
    assert decode_one(wire(fr.Welcome(1, longest, longest))) == fr.Welcome(1, longest, longest)
    assert decode_one(wire(fr.Join("s", 1, longest))) == fr.Join("s", 1, longest)
    hello = fr.Hello(1, 8 << 20, 4096, 16, True, 2, "tag-ioctl", "packed4", "auto", "", nonce=longest)
    assert decode_one(wire(hello)).nonce == longest


def test_auth_is_type_15_and_carries_only_the_proof():
    assert T.AUTH == 15
    data = wire(fr.Auth(b"\x09" * 32))
    h = fr.parse_header(data[: fr.HEADER_SIZE])
    assert (h.type, h.payload_len) == (T.AUTH, 0)
    assert msgpack.unpackb(data[fr.HEADER_SIZE :]) == {"proof": b"\x09" * 32}


def test_error_and_abort_texts_are_bounded():
    e = decode_one(raw_frame(T.ERROR, {"code": "c" * 500, "message": "m" * 5000}))
    assert len(e.code) == 64 and len(e.message) == 1000
    a = decode_one(raw_frame(T.ABORT, {"reason": "r" * 5000}))
    assert len(a.reason) == 1000


def test_state_payload_checks():
    with pytest.raises(ProtocolError, match="STATE payload is not valid msgpack"):
        fr.FrameBuffer().feed(raw_frame(T.STATE, {}, b"\xc1"))
    with pytest.raises(ProtocolError, match="STATE payload must be a map"):
        fr.FrameBuffer().feed(raw_frame(T.STATE, {}, msgpack.packb([1, 2])))
    with pytest.raises(ProtocolError, match="STATE payload is not valid msgpack"):
        fr.FrameBuffer().feed(raw_frame(T.STATE, {}, b""))


# Pages
@pytest.mark.parametrize(
    "meta, payload, match",
    [
        (pages_meta([(0, 2)], bytes(3)), b"", "PAGES batch has 2 pages in ranges but 3 flags"),
        (pages_meta([(0, 2), (5, 2)], bytes(3)), b"", "PAGES batch has 4 pages in ranges but 3 flags"),
        (pages_meta([], b""), b"", "PAGES batch has 0 pages"),
        (pages_meta([(0, 0), (4, 2)], bytes(2)), b"", "PAGES batch has an empty range"),
        (pages_meta([(0, 0)], b""), b"", "PAGES batch has an empty range"),
        (
            pages_meta([(0, fr.MAX_BATCH_PAGES + 1)], bytes(fr.MAX_BATCH_PAGES + 1)),
            b"",
            f"at most {fr.MAX_BATCH_PAGES} pages per batch",
        ),
        (pages_meta([(0, 1000), (2000, 25)], bytes(1025)), b"", "1025 pages .*at most 1024 pages per batch"),
        (pages_meta([(0, 3)], bytes([0, 8, 0])), b"", "PAGES batch has an unknown page flag"),
        (pages_meta([(0, 1)], bytes([0x80])), b"", "PAGES batch has an unknown page flag"),
        (pages_meta([(0, 1)], bytes([0xFF])), b"", "PAGES batch has an unknown page flag"),
        (
            pages_meta([(0, 1)], bytes(1), dl=PAGE + 1),
            bytes(PAGE),
            f"PAGES data length {PAGE + 1} exceeds the payload \\({PAGE} bytes\\)",
        ),
        (pages_meta([(0, 1)], bytes(1), dl=1), b"", "PAGES data length 1 exceeds the payload \\(0 bytes\\)"),
        (
            {**pages_meta([(0, 1)], bytes(1)), "r": b"\0" * 15},
            b"",
            "PAGES ranges field is not a list of \\(page, count\\) pairs",
        ),
        ({**pages_meta([(0, 1)], bytes(1)), "r": [0, 1]}, b"", "PAGES field 'r' must be bytes, got list"),
        ({**pages_meta([(0, 1)], bytes(1)), "f": "\x00"}, b"", "PAGES field 'f' must be bytes, got str"),
        ({**pages_meta([(0, 1)], bytes(1)), "dc": 0}, b"", "PAGES field 'dc' must be bool, got int"),
        ({**pages_meta([(0, 1)], bytes(1)), "tc": "yes"}, b"", "PAGES field 'tc' must be bool, got str"),
        ({**pages_meta([(0, 1)], bytes(1)), "dl": -1}, b"", "PAGES field 'dl' = -1 is out of range"),
        ({**pages_meta([(0, 1)], bytes(1)), "dl": 2**40}, b"", "PAGES field 'dl' = .* is out of range"),
        ({**pages_meta([(0, 1)], bytes(1)), "p": "1"}, b"", "PAGES field 'p' must be int, got str"),
        (
            {k: v for k, v in pages_meta([(0, 1)], bytes(1)).items() if k != "f"},
            b"",
            "PAGES frame is missing field 'f'",
        ),
        (
            {k: v for k, v in pages_meta([(0, 1)], bytes(1)).items() if k != "dl"},
            b"",
            "PAGES frame is missing field 'dl'",
        ),
    ],
)
def test_pages_field_checks(meta, payload, match):
    _expect(T.PAGES, meta, match, payload)


def test_pages_flags_zero_and_keep_together_are_refused():
    _expect(T.PAGES, pages_meta([(0, 1)], bytes([fr.PAGE_ZERO | fr.PAGE_KEEP])), "PAGES batch has an unknown page flag")


def test_pages_full_batch_is_accepted():
    n = fr.MAX_BATCH_PAGES
    frame = decode_one(raw_frame(T.PAGES, pages_meta([(0, n - 1), (5000, 1)], bytes([fr.PAGE_ZERO]) * n)))
    assert frame.npages == n
    assert frame.ranges == [(0, n - 1), (5000, 1)]


# -- fuzz / properties: the decoder raises ProtocolError and nothing else ---------------------
def _feed_all(make, chunks):
    """Feed chunks; return the frames, or the ProtocolError.  Any other
    exception type fails the test."""
    target = make()
    out = []
    try:
        for c in chunks:
            out += target.feed(c)
    except ProtocolError as exc:
        assert str(exc), "ProtocolError without a message"
        return exc
    return out


def _all_receivers():
    """FrameBuffers and Connections of both sides in every state, with and
    without checksums."""
    makers = [fr.FrameBuffer, lambda: fr.FrameBuffer(require_crc=True)]
    machines = [(dest_machine, list(DestState)), (source_machine, list(SourceState))]
    if hasattr(T, "JOIN"):
        from migrate.protocol.machine import data_dest_machine, data_source_machine

        machines += [
            (data_dest_machine, [DestState.WAIT_HELLO, DestState.RECEIVING]),
            (lambda: data_source_machine(1), [SourceState.HANDSHAKE, SourceState.PRECOPY]),
        ]
    if hasattr(T, "RECOVER"):
        from migrate.protocol.machine import recovery_source_machine

        machines += [(recovery_source_machine, [SourceState.SWITCHING])]
    for make, states in machines:
        for state, checksum in ((s, c) for s in states for c in (True, False)):

            def m(make=make, state=state, checksum=checksum):
                conn = Connection(make(), checksum)
                conn.machine.state = state
                conn.ram_pages = 2048
                return conn

            makers.append(m)
    return makers


RECEIVERS = _all_receivers()


def _split(data: bytes, cuts):
    cuts = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for c in cuts + [len(data)]:
        out.append(data[prev:c])
        prev = c
    return out


@fuzz_settings
@given(blob=st.binary(max_size=4096), which=st.integers(0, len(RECEIVERS) - 1))
def test_fuzz_arbitrary_bytes(blob, which):
    _feed_all(RECEIVERS[which], [blob])


@fuzz_settings
@given(
    ftype=st.integers(0, 20),
    flags=st.sampled_from([0, fr.FLAG_CRC, 2, 0xFF]),
    meta=st.binary(max_size=300),
    payload=st.binary(max_size=300),
    fix_crc=st.booleans(),
    which=st.integers(0, len(RECEIVERS) - 1),
)
def test_fuzz_random_bodies_behind_a_plausible_header(ftype, flags, meta, payload, fix_crc, which):
    head = struct.pack("<2sBBII", fr.MAGIC, ftype, flags, len(meta), len(payload))
    crc = zlib.crc32(payload, zlib.crc32(meta, zlib.crc32(head))) if fix_crc else 0
    _feed_all(RECEIVERS[which], [head + struct.pack("<I", crc) + meta + payload])


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=64)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_all_names = sorted({k for f in SAMPLES for k in f.meta()} | {"x"})


@st.composite
def _hostile_meta(draw):
    """A meta map: a sample frame's real meta with some fields replaced,
    dropped or added, so that decoding gets past msgpack to the field checks."""
    base = dict(draw(st.sampled_from(SAMPLES)).meta())
    for name in draw(st.lists(st.sampled_from(_all_names), max_size=4)):
        action = draw(st.integers(0, 2))
        if action == 0:
            base.pop(name, None)
        else:
            base[name] = draw(
                _values
                if action == 1
                else st.sampled_from([0, -1, 2**63, 2**64 - 1, True, b"", b"\0" * 16, "", [], {}])
            )
    return base


@fuzz_settings
@given(
    ftype=st.sampled_from(list(T)),
    meta=_hostile_meta(),
    payload=st.binary(max_size=2 * PAGE),
    which=st.integers(0, len(RECEIVERS) - 1),
)
def test_fuzz_hostile_field_values(ftype, meta, payload, which):
    result = _feed_all(RECEIVERS[which], [raw_frame(ftype, meta, payload)])
    if isinstance(result, list):
        assert len(result) == 1 and result[0].type == ftype


@st.composite
def _mutated_stream(draw):
    frames = draw(st.lists(st.sampled_from(SAMPLES), min_size=1, max_size=4))
    checksum = draw(st.booleans())
    data = bytearray(b"".join(wire(f, checksum) for f in frames))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.integers(0, 4))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == 0 and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == 1:
            data = data[:pos]  # truncate
        elif op == 2:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))  # insert
        elif op == 3:
            del data[pos : pos + draw(st.integers(1, 16))]  # delete
        else:
            # overwrite a length field of the first header with something absurd
            data[4:12] = struct.pack("<II", draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)))
    return bytes(data)


@fuzz_settings
@given(
    data=_mutated_stream(), cuts=st.lists(st.integers(0, 10**6), max_size=5), which=st.integers(0, len(RECEIVERS) - 1)
)
def test_fuzz_truncated_and_mutated_frames(data, cuts, which):
    _feed_all(RECEIVERS[which], _split(data, cuts))


@settings(max_examples=50, deadline=None)
@given(
    frames=st.lists(st.sampled_from(SAMPLES), min_size=1, max_size=6), cuts=st.lists(st.integers(0, 10**6), max_size=8)
)
def test_property_any_split_decodes_the_same_frames(frames, cuts):
    stream = b"".join(wire(f) for f in frames)
    buf = fr.FrameBuffer()
    out = []
    for c in _split(stream, cuts):
        out += buf.feed(c)
    assert out == frames
    assert buf.pending == 0


# -- checksum mode "meta" (the default): header and meta covered, payload not --
def test_meta_mode_flags_and_round_trip():
    frame = sample_pages()
    data = wire(frame, "meta")
    assert data[3] == fr.FLAG_CRC | fr.FLAG_CRC_META_ONLY
    assert decode_one(data) == frame
    conn = Connection(dest_machine(), "meta")
    assert conn.checksum == "meta"


def test_meta_mode_catches_header_and_meta_corruption_but_not_payload():
    frame = sample_pages()
    good = wire(frame, "meta")
    meta_end = fr.HEADER_SIZE + struct.unpack_from("<I", good, 4)[0]
    assert meta_end < len(good)  # this frame has a payload
    for pos in (2, 12, fr.HEADER_SIZE, meta_end - 1):  # type, crc, meta
        bad = bytearray(good)
        bad[pos] ^= 0x10
        with pytest.raises(ProtocolError):
            fr.FrameBuffer(require_crc="meta").feed(bytes(bad))
    # A payload byte is left to the completion digest: the frame decodes.
    bad = bytearray(good)
    bad[-1] ^= 0x10
    out = fr.FrameBuffer(require_crc="meta").feed(bytes(bad))
    assert len(out) == 1 and (out[0].data, out[0].tags) != (frame.data, frame.tags)


def test_a_bit_flip_cannot_turn_full_coverage_into_meta_only():
    # The META_ONLY bit lies inside the CRC'd header bytes.
    good = bytearray(wire(sample_pages(), "full"))
    good[3] ^= fr.FLAG_CRC_META_ONLY
    with pytest.raises(ProtocolError, match="checksum"):
        fr.FrameBuffer(require_crc="none").feed(bytes(good))


@pytest.mark.parametrize(
    "sent, required, ok",
    [
        ("meta", "meta", True),
        ("full", "meta", True),
        ("none", "meta", False),
        ("full", "full", True),
        ("meta", "full", False),
        ("none", "full", False),
        ("none", "none", True),
        ("meta", "none", True),
        ("full", "none", True),
    ],
)
def test_receiver_refuses_frames_covering_less_than_it_requires(sent, required, ok):
    data = wire(fr.PassEnd(1, 2), sent)
    if ok:
        assert fr.FrameBuffer(require_crc=required).feed(data) == [fr.PassEnd(1, 2)]
    else:
        with pytest.raises(ProtocolError, match="same --checksum"):
            fr.FrameBuffer(require_crc=required).feed(data)


def test_meta_only_flag_without_crc_is_refused():
    data = bytearray(wire(fr.PassEnd(1, 2), "none"))
    data[3] = fr.FLAG_CRC_META_ONLY
    with pytest.raises(ProtocolError, match="unknown frame flags 0x2"):
        fr.FrameBuffer().feed(bytes(data))


def test_checksum_mode_names():
    assert [fr.checksum_mode(v) for v in (True, False, "meta", "full", "none")] == [
        "full",
        "none",
        "meta",
        "full",
        "none",
    ]
    with pytest.raises(ValueError, match="checksum must be one of full, meta, none"):
        fr.checksum_mode("crc")
