"""The sealed stream, sans I/O: after the handshake every frame carries a MAC
bound to the key, the connection's transcript, its direction and its place
in the stream.  Each test changes one of those and must be refused."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.errors import ProtocolError, TamperedFrame
from migrate.protocol import auth
from migrate.protocol import frames as fr
from migrate.protocol.machine import Connection, dest_machine, source_machine

KEY = b"k" * 32
RAM = 64 * fr.PAGE_SIZE


def wire(buffers) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def hello(strategy="tag-ioctl"):
    return fr.Hello(1, RAM, fr.PAGE_SIZE, 16, True, 2, strategy, "packed4", "zstd", "vm", nonce=b"\x01" * 32)


def pages(first, byte):
    return fr.Pages(0, [(first, 2)], bytes(2), bytes([byte]) * (2 * fr.PAGE_SIZE))


def sealed_pair(alter_hello=None):
    """A source and a destination connection through HELLO, WELCOME (both
    then seal) and AUTH.  ``alter_hello(bytes) -> bytes`` plays a man in
    the middle on HELLO."""
    src = Connection(source_machine(), keyed=True)
    dst = Connection(dest_machine(), keyed=True)
    h = wire(src.send(hello()))
    dst.feed(alter_hello(h) if alter_hello else h)
    src.feed(wire(dst.send(fr.Welcome(1, b"\x02" * 32, b"\x03" * 32))))
    src.seal(KEY, "source")
    dst.seal(KEY, "destination")
    dst.feed(wire(src.send(fr.Auth(b"\x04" * 32))))
    return src, dst


def test_a_sealed_stream_flows_and_is_counted():
    src, dst = sealed_pair()
    got = dst.feed(wire(src.send(pages(0, 1))) + wire(src.send(pages(2, 2))))
    assert [f.data[:1] for f in got] == [b"\x01", b"\x02"]
    assert dst.authenticated_frames == 3  # AUTH and two PAGES
    assert src.stream_secret == dst.stream_secret


def test_a_changed_payload_byte_with_every_crc_fixed_is_refused():
    src, dst = sealed_pair()
    frame = pages(0, 1)
    sent = wire(src.send(frame))
    trailer = sent[-fr.MAC_SIZE :]

    class Old:  # the attacker re-encodes, but can only pass the old MAC on
        def tag(self, *_):
            return trailer

    frame.data = b"\x01" * 100 + b"\x66" + b"\x01" * (len(frame.data) - 101)
    forged = wire(fr.encode(frame, "full", Old()))
    with pytest.raises(TamperedFrame, match=r"PAGES frame #1 after the handshake failed its authentication"):
        dst.feed(forged)


def test_replayed_dropped_and_reordered_frames_are_refused():
    for plan in ("replay", "drop", "swap"):
        src, dst = sealed_pair()
        a, b = wire(src.send(pages(0, 1))), wire(src.send(pages(2, 2)))
        stream = {"replay": a + a, "drop": b, "swap": b + a}[plan]
        with pytest.raises(TamperedFrame):
            dst.feed(stream)


def test_a_frame_without_its_mac_is_refused_at_the_header():
    src, dst = sealed_pair()
    with pytest.raises(TamperedFrame, match="carries no MAC"):
        dst.feed(wire(fr.encode(pages(0, 1))))


def test_a_frame_with_a_mac_before_the_seal_is_refused():
    dst = Connection(dest_machine(), keyed=True)
    with pytest.raises(ProtocolError, match="carries a MAC where this side expects none"):
        dst.feed(wire(fr.encode(hello(), "full", auth.FrameMac(KEY))))


def test_an_altered_hello_gives_the_two_sides_different_keys():
    """The transcript binds the handshake: a man in the middle who changes
    HELLO (and fixes its CRC) leaves the source's AUTH failing its MAC."""

    def downgrade(raw):
        header = fr.parse_header(raw[: fr.HEADER_SIZE])
        frame = fr.decode(header, raw[fr.HEADER_SIZE :], b"")
        frame.strategy = "prot-mte"
        return wire(fr.encode(frame))

    with pytest.raises(TamperedFrame, match="AUTH frame #0"):
        sealed_pair(alter_hello=downgrade)


def test_each_direction_has_its_own_key():
    secret = auth.stream_secret(KEY, b"t" * 32)
    src_out, src_in = auth.direction_keys(secret, "source")
    dst_out, dst_in = auth.direction_keys(secret, "destination")
    assert src_out == dst_in and src_in == dst_out and src_out != src_in
    assert auth.stream_secret(KEY, b"u" * 32) != secret  # another transcript, another secret


def test_a_first_unsealed_error_is_the_peers_refusal_but_only_first():
    src, dst = sealed_pair()
    # the source refused (it never sealed): its ERROR is read, and ends the connection
    refusal = fr.Error("auth", "the destination failed authentication: its shared key differs")
    src2 = Connection(source_machine(), keyed=True)
    dst2 = Connection(dest_machine(), keyed=True)
    dst2.feed(wire(src2.send(hello())))
    src2.feed(wire(dst2.send(fr.Welcome(1, b"\x02" * 32, b"\x03" * 32))))
    dst2.seal(KEY, "destination")
    assert dst2.feed(wire(fr.encode(refusal))) == [refusal]
    # after a sealed frame, an unsealed ERROR is a forgery
    dst.feed(wire(src.send(pages(0, 1))))
    with pytest.raises(TamperedFrame, match="ERROR frame carries no MAC"):
        dst.feed(wire(fr.encode(refusal)))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_single_bit_flip_in_a_sealed_frame_is_refused(data):
    src, dst = sealed_pair()
    raw = bytearray(wire(src.send(pages(0, 7))))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(ProtocolError):
        if not dst.feed(bytes(raw)):  # a flipped length: the rest of a stream follows
            dst.feed(bytes(fr.HEADER_SIZE + fr.MAX_META + fr.MAX_PAYLOAD + fr.MAC_SIZE))
