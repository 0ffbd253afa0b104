"""Batch compression (migrate/compression.py): forced levels, 'none', the
adaptive 'auto' policy, and bounded decompression."""

import os

import pytest
import zstandard

from migrate.errors import ProtocolError
from migrate.protocol.compression import LINK_SAMPLES, Compressor, Decompressor

PAGE = 4096
TEXT = (b"The quick brown fox jumps over the lazy dog; virtio ring buffer. " * 64)[:PAGE] * 64  # 256 KiB
NOISE = os.urandom(256 * 1024)
TAGS = bytes([0x12, 0x34]) * 64 * 32  # 32 pages of packed tags


def roundtrip(blob, n):
    return Decompressor().decompress(blob, n, "page data")


# -- 'none' ------------------------------------------------------------------------
def test_none_never_compresses():
    c = Compressor("none")
    for data in (TEXT, NOISE, bytes(len(TEXT))):
        out, compressed = c.compress_data(data)
        assert compressed is False and out is data
    out, compressed = c.compress_tags(TAGS)
    assert compressed is False and out is TAGS
    assert c.batches_compressed == 0 and c.batches_raw == 3


def test_none_ignores_even_a_slow_link():
    c = Compressor("none", link_cap=1000.0)
    c.observe_link(1 << 20, 100.0)
    assert c.compress_data(TEXT) == (TEXT, False)


# -- forced level -----------------------------------------------------------------------
@pytest.mark.parametrize("level", ["1", "3", "19", "-5"])
def test_forced_level_compresses_compressible_data(level):
    c = Compressor(level)
    out, compressed = c.compress_data(TEXT)
    assert compressed is True
    assert len(out) < len(TEXT) // 4
    assert roundtrip(out, len(TEXT)) == TEXT
    assert c.batches_compressed == 1 and c.batches_raw == 0


def test_forced_level_is_the_configured_one():
    fast, slow = Compressor("-5"), Compressor("19")
    half_random = b"".join(os.urandom(PAGE // 2) + TEXT[: PAGE // 2] for _ in range(32))
    f, _ = fast.compress_data(half_random)
    s, _ = slow.compress_data(half_random)
    assert len(s) < len(f)


@pytest.mark.parametrize("level", ["1", "19"])
def test_forced_level_sends_incompressible_data_raw(level):
    c = Compressor(level)
    out, compressed = c.compress_data(NOISE)
    assert compressed is False
    assert out is NOISE
    assert c.batches_raw == 1 and c.batches_compressed == 0


def test_forced_level_keeps_compressing_after_a_raw_batch():
    c = Compressor("1", link_cap=1e15)  # forced: the link does not matter
    c.observe_link(1 << 30, 0.001)
    assert c.compress_data(NOISE)[1] is False
    for _ in range(20):
        assert c.compress_data(TEXT)[1] is True


def test_empty_batch_is_never_compressed():
    c = Compressor("1")
    assert c.compress_data(b"") == (b"", False)
    assert c.compress_tags(b"") == (b"", False)


def test_tags_compress_in_every_mode_but_none():
    for mode in ("auto", "1", "19"):
        c = Compressor(mode)
        out, compressed = c.compress_tags(TAGS)
        assert compressed is True and len(out) < len(TAGS)
        assert Decompressor().decompress(out, len(TAGS), "page tags") == TAGS
    random_tags = os.urandom(128)
    assert Compressor("1").compress_tags(random_tags) == (random_tags, False)


# -- auto -------------------------------------------------------------------------------
def test_auto_measures_first_on_a_sample():
    c = Compressor("auto")
    out, compressed = c.compress_data(TEXT)
    assert compressed is False and out is TEXT  # no link measured yet: raw
    assert c.probes == 1 and c.compress_rate.value is not None and c.ratio.value is not None
    assert c.ratio.value < 0.25


def test_auto_samples_spans_spread_over_the_batch():
    c = Compressor("auto")
    batch = b"".join(bytes([i]) * 4096 for i in range(256))  # 1 MiB, each 4 KiB its own byte
    sample = c._sample(batch)
    assert len(sample) == Compressor.SAMPLE_SPANS * Compressor.SAMPLE_SPAN
    assert sample[:4096] == bytes(4096) and sample[-4096:] == bytes([255]) * 4096  # first and last span
    assert c._sample(TEXT[:1000]) == TEXT[:1000]  # small: all of it


def test_auto_with_a_slow_link_compresses_compressible_data():
    c = Compressor("auto", link_cap=1e6)  # 1 MB/s
    results = [c.compress_data(TEXT)[1] for _ in range(40)]
    assert all(results)
    assert c.batches_compressed == 40


def test_auto_with_a_slow_link_still_sends_noise_raw():
    c = Compressor("auto", link_cap=1e6)
    for _ in range(20):
        out, compressed = c.compress_data(NOISE)
        assert compressed is False and out is NOISE


def test_auto_without_any_link_measurement_sends_raw_after_measuring():
    c = Compressor("auto")
    assert [c.compress_data(TEXT)[1] for _ in range(6)] == [False] * 6
    assert c.probes == 1


def test_auto_with_a_very_fast_link_sends_raw_and_probes():
    c = Compressor("auto")
    for _ in range(LINK_SAMPLES):  # sends that waited: a measured link
        c.observe_link(1 << 30, 1e-6)  # ~1 PB/s: compression can only slow it down
    assert c._effective_link() > 1e14
    first = c.compress_data(TEXT)
    assert first == (TEXT, False) and c.probes == 1  # measured on a sample, sent raw
    decisions = [c.compress_data(TEXT) for _ in range(2 * Compressor.PROBE_EVERY)]
    # all raw, a sample of one batch in PROBE_EVERY compressed to keep the estimates fresh
    assert all(out is TEXT and not compressed for out, compressed in decisions)
    assert c.probes == 3


def test_auto_link_cap_bounds_the_measured_link():
    c = Compressor("auto", link_cap=1e6)
    for _ in range(LINK_SAMPLES):  # sends that waited: a measured link
        c.observe_link(1 << 30, 1e-6)
    assert c._effective_link() == 1e6
    c.compress_data(TEXT)
    assert [c.compress_data(TEXT)[1] for _ in range(10)] == [True] * 10


def test_observe_link_ignores_tiny_or_instant_sends():
    c = Compressor("auto")
    c.observe_link(1000, 1.0)  # too small to measure
    c.observe_link(1 << 20, 0.0)  # no time
    assert c.link_rate.value is None
    c.observe_link(1 << 20, 1.0)
    assert c.link_rate.value == float(1 << 20)
    c.observe_link(2 << 20, 1.0)
    assert (1 << 20) < c.link_rate.value < (2 << 20)  # moving average


def test_a_send_that_never_waited_for_room_can_raise_the_link_but_not_lower_it():
    """A send that never found the socket full went as fast as the sender
    gave it bytes (a wait for the interpreter lock or a core counts in its
    time): its rate bounds the link from below only."""
    c = Compressor("none")
    slow, fast = (4 << 20) / 0.7e9, (4 << 20) / 5e9  # seconds for 4 MiB
    c.observe_link(4 << 20, slow, waited_for_room=False)
    assert c.link_rate.value is None and c.raw_over_fast_link()  # not measured yet: taken as fast
    c.observe_link(4 << 20, (4 << 20) / 3e9)  # waited: the link's pace
    assert c.link_rate.value == pytest.approx(3e9)
    for _ in range(20):  # noise alone
        c.observe_link(4 << 20, slow, waited_for_room=False)
    assert c.link_rate.value == pytest.approx(3e9) and c.raw_over_fast_link()
    c.observe_link(4 << 20, fast, waited_for_room=False)  # faster than thought: raises it
    assert c.link_rate.value > 3e9
    for _ in range(20):  # a slow network: every send waits, and the estimate follows
        c.observe_link(4 << 20, slow, 0.0)
    assert c.link_rate.value == pytest.approx(0.7e9, rel=0.05) and not c.raw_over_fast_link()


# -- decompression is bounded ----------------------------------------------------------
def test_decompressor_round_trip():
    blob = zstandard.compress(TEXT)
    assert Decompressor().decompress(blob, len(TEXT), "page data") == TEXT


@pytest.mark.parametrize("expected", [0, 1, len(TEXT) - 1, len(TEXT) + 1, 10 * len(TEXT)])
def test_decompressor_rejects_a_wrong_declared_size(expected):
    blob = zstandard.compress(TEXT)
    with pytest.raises(ProtocolError, match=f"page data declares {len(TEXT)} bytes, expected {expected}"):
        Decompressor().decompress(blob, expected, "page data")


@pytest.mark.parametrize("blob", [b"", b"\x00", b"garbage that is not zstd", NOISE[:100], b"\x28\xb5\x2f\xfd"])
def test_decompressor_rejects_garbage(blob):
    with pytest.raises(ProtocolError, match="page tags"):
        Decompressor().decompress(blob, 128, "page tags")


def test_decompressor_rejects_unknown_content_size():
    blob = zstandard.ZstdCompressor(write_content_size=False).compress(TEXT)
    with pytest.raises(ProtocolError, match=f"declares -1 bytes, expected {len(TEXT)}"):
        Decompressor().decompress(blob, len(TEXT), "page data")


def test_decompressor_rejects_a_corrupt_body():
    blob = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(TEXT))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(ProtocolError, match="page data"):
        Decompressor().decompress(bytes(blob), len(TEXT), "page data")


def test_decompressor_output_is_bounded_by_expected():
    # A frame that declares a small size but holds a large body must not
    # produce more than the declared size.
    big = bytearray(zstandard.compress(bytes(1 << 20)))
    assert zstandard.frame_content_size(bytes(big)) == 1 << 20
    # Replace the frame header's content size with 4096 (FCS 4 bytes here).
    fhd = big[4]
    assert fhd >> 6 == 2  # 4-byte content size field
    off = 5 if fhd & 0x20 else 6
    big[off : off + 4] = (4096).to_bytes(4, "little")
    assert zstandard.frame_content_size(bytes(big)) == 4096
    with pytest.raises(ProtocolError, match="does not decompress"):
        Decompressor().decompress(bytes(big), 4096, "page data")


def test_raw_over_a_fast_link_only_when_measured_fast_and_not_compressing():
    c = Compressor("auto")
    assert c.raw_over_fast_link()  # nothing measured: taken as fast until it is
    c.observe_link(1 << 20, (1 << 20) / 1e9)
    assert c.raw_over_fast_link()  # one send is not a measurement yet: the first ones set the average alone
    for _ in range(LINK_SAMPLES - 1):
        c.observe_link(1 << 20, (1 << 20) / 1e9)
    assert not c.raw_over_fast_link()
    c = Compressor("auto")
    for _ in range(LINK_SAMPLES):  # sends that waited: a measured link
        c.observe_link(1 << 20, (1 << 20) / 3e9)
    assert c.raw_over_fast_link()
    c._compressing = True  # auto's last decision: compress
    assert not c.raw_over_fast_link()
    capped = Compressor("none", link_cap=125e6)  # --max-bandwidth below the link
    for _ in range(LINK_SAMPLES):  # sends that waited: a measured link
        capped.observe_link(1 << 20, (1 << 20) / 3e9)
    assert not capped.raw_over_fast_link()
    level = Compressor("3")
    for _ in range(LINK_SAMPLES):  # sends that waited: a measured link
        level.observe_link(1 << 20, (1 << 20) / 3e9)
    assert not level.raw_over_fast_link()  # a forced level compresses zero pages to nothing anyway


def test_a_link_measured_slow_because_the_receiver_is_counts_as_fast():
    """Over loopback the destination holds the sender back, and per-send rates
    swing about 2 GB/s: a closed receive window for a quarter of the send
    time or more says the receiver, not the network, set the rate.  Not
    with a cap (--max-bandwidth makes the link slow on purpose), not when
    the window stayed open (a slow network), not when the kernel says
    nothing."""

    def measured(receiver_s, cap=None):
        c = Compressor("none", link_cap=cap)
        for _ in range(5):
            c.observe_link(4 << 20, (4 << 20) / 1.2e9, receiver_s)  # 3.5 ms a send
        return c.raw_over_fast_link()

    assert measured(0.002)  # 57 % of the send held back by the receiver
    assert measured(0.0009)  # 26 %
    assert not measured(0.0005)  # 14 %: the network's pace
    assert not measured(0.0)
    assert not measured(None)  # no tcpi_rwnd_limited here
    assert not measured(0.002, cap=1.5e9)


def test_the_receiver_share_is_a_moving_average_of_sends():
    """Averaged over sends, weighted by their time: the kernel counts in
    jiffies, so one send reads 0 and the next a whole 4 ms."""
    c = Compressor("none")
    for _ in range(LINK_SAMPLES):
        c.observe_link(4 << 20, 0.004, 0.004)
    assert c.raw_over_fast_link() and c.receiver_share() == 1.0
    for _ in range(3):  # jiffies: a send or two without, then one with
        c.observe_link(4 << 20, 0.002, 0.0)
        c.observe_link(4 << 20, 0.002, 0.0)
        c.observe_link(4 << 20, 0.002, 0.004)
    assert c.raw_over_fast_link()
    for _ in range(20):  # the destination caught up; the network is the limit now
        c.observe_link(4 << 20, 0.004, 0.0)
    assert not c.raw_over_fast_link() and c.receiver_share() < 0.25
    c.observe_link(1000, 0.004, 0.004)  # too small a send to say anything
    assert not c.raw_over_fast_link()
