"""Sizes and rates with suffixes (migrate/units.py)."""

import pytest

from migrate.units import fmt_bytes, fmt_rate, parse_rate, parse_size

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40


@pytest.mark.parametrize(
    "text, value",
    [
        ("512MiB", 512 * MiB),
        ("16GiB", 16 * GiB),
        ("50M", 50_000_000),
        ("4096", 4096),
        ("0", 0),
        ("4K", 4000),
        ("4k", 4000),
        ("4KiB", 4 * KiB),
        ("4kib", 4 * KiB),
        ("1TiB", TiB),
        ("2T", 2 * 10**12),
        ("3G", 3 * 10**9),
        ("3GB", 3 * 10**9),
        ("10MB", 10 * 10**6),
        ("7b", 7),
        ("7B", 7),
        ("1.5GiB", 3 * GiB // 2),
        ("0.5MiB", MiB // 2),
        ("125MB/s", 125 * 10**6),
        ("1GiB/s", GiB),
        ("1 GiB", GiB),
        ("  2gib  ", 2 * GiB),
        (4096, 4096),
        (16 * GiB, 16 * GiB),
    ],
)
def test_parse_size(text, value):
    got = parse_size(text)
    assert got == value
    assert type(got) is int


@pytest.mark.parametrize(
    "text",
    [
        "",
        "GiB",
        "abc",
        "12XB",
        "1.2.3",
        "-1",
        "1e3",
        "0x10",
        "1,5GiB",
        "10 MB / s",
        "4 Ki B",
        "MiB512",
        "5 5",
        "nan",
        "inf",
        None,
    ],
)
def test_parse_size_rejects_garbage(text):
    with pytest.raises(ValueError) as info:
        parse_size(text, "guest RAM")
    # names the option, quotes the input and says what would be right
    assert str(info.value) == f"guest RAM {text!r} is not a size like 512MiB, 16GiB, 50M or 4096"


@pytest.mark.parametrize("text", ["none", "None", "NONE", "unlimited", "off", "0", 0, None, " none "])
def test_parse_rate_no_cap(text):
    assert parse_rate(text) is None


@pytest.mark.parametrize(
    "text, value",
    [
        ("50M", 50_000_000),
        ("125MB/s", 125_000_000),
        ("1GiB", GiB),
        ("4096", 4096),
        (1000, 1000),
    ],
)
def test_parse_rate(text, value):
    assert parse_rate(text) == value


@pytest.mark.parametrize("text", ["fast", "50 furlongs", "-5M", "M"])
def test_parse_rate_rejects_garbage(text):
    with pytest.raises(ValueError, match=f"^--max-bandwidth {text!r} is not a size"):
        parse_rate(text, "--max-bandwidth")


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (KiB, "1 KiB"),
        (1536, "1.5 KiB"),
        (MiB, "1 MiB"),
        (512 * MiB, "512 MiB"),
        (GiB, "1 GiB"),
        (16 * GiB, "16 GiB"),
        (3 * GiB // 2, "1.5 GiB"),
    ],
)
def test_fmt_bytes(n, text):
    assert fmt_bytes(n) == text


def test_fmt_bytes_round_trips_through_parse_size():
    for n in (KiB, 4 * MiB, 512 * MiB, GiB, 16 * GiB):
        assert parse_size(fmt_bytes(n).replace(" ", "")) == n


@pytest.mark.parametrize(
    "rate, text", [(50e6, "50 MB/s"), (999e6, "999 MB/s"), (1e9, "1.00 GB/s"), (2.5e9, "2.50 GB/s")]
)
def test_fmt_rate(rate, text):
    assert fmt_rate(rate) == text
