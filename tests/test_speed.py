"""migrate.tools.speed's floor and report on made-up runs, and the ceilings it
measures (no migrations here)."""

import os

import pytest

from migrate.tools.ceilings import crc_throughput, landing_times
from migrate.tools.speed import _first_store_note, floor_ms, markdown

CEILINGS = {
    "loopback_bytes_per_s": 4e9,
    "zstd": {"random": {"level": 1, "bytes_per_s": 5e9, "ratio": 1.0}},
    "crc_bytes_per_s": 4e9,
    "landing_bytes_per_s": 2e9,
    "cores": 2,
}


def test_floor_is_crc_on_both_sides_landing_and_sending_over_the_cores():
    # 1 GB of data pages: 2 x 0.25 s of CRC + 0.5 s landing + 0.25 s sending = 1.25 s, over 2 cores
    assert floor_ms({"median": 1e9, "min": 0, "max": 0}, CEILINGS) == pytest.approx(625.0)
    assert floor_ms({"median": 0, "min": 0, "max": 0}, CEILINGS) is None  # all-zero image: no data pages
    assert floor_ms(None, CEILINGS) is None


@pytest.mark.parametrize("prealloc, memory", [(False, "fresh"), (True, "preallocated")])
def test_report_shows_the_floor_beside_the_measured_time(prealloc, memory):
    stat = {"median": 1000.0, "min": 900.0, "max": 1100.0}
    doc = {
        "command": "mte-migrate speed",
        "prealloc": prealloc,
        "ceilings": CEILINGS,
        "capped": {},
        "summary": [
            {
                "kind": "random",
                "size": 1 << 30,
                "runs": 5,
                "validated": 5,
                "total_ms": stat,
                "floor_ms": 625.4,
                "downtime_ms": stat,
                "gb_per_s": stat,
                "rss_over_touched": None,
                "qemu_ms": {"plain": 489, "multifd2": 289},
            },
            {
                "kind": "zero",
                "size": 1 << 30,
                "runs": 5,
                "validated": 5,
                "total_ms": stat,
                "floor_ms": None,
                "downtime_ms": stat,
                "gb_per_s": stat,
                "rss_over_touched": None,
                "qemu_ms": None,
            },
        ],
    }
    text = markdown(doc)
    assert f"storing them at 2.00 GB/s into {memory} memory" in text
    assert "| random 1 GiB | 5/5 | 1000 (900–1100) | 625 | 1000 (900–1100) |" in text
    assert "| zero 1 GiB | 5/5 | 1000 (900–1100) | – |" in text
    # QEMU's constants are labelled as figures from another run, not measured here
    assert "| dated QEMU plain / multifd×2 ms |" in text
    assert "QEMU 10.0.2, recorded 2026-11-28 in another run" in text and "--vs-qemu" in text


def test_markdown_of_a_side_by_side_doc_is_the_side_by_side_table():
    doc = {
        "vs_qemu": True,
        "command": "mte-migrate speed --vs-qemu",
        "prealloc": False,
        "qemu": {"binary": "qemu-system-aarch64", "version": "QEMU emulator version 10.0.2"},
        "image_offset_in_qemu": 2 << 20,
        "summary": [],
    }
    text = markdown(doc)
    assert "defaults against defaults" in text and "| image | QEMU ms | mte-migrate ms | ratio |" in text


def test_ceilings_measure_and_clean_up():
    before = len(os.listdir("/proc/self/fd"))
    assert crc_throughput(4 << 20, repeat=1) > 0
    for preallocated in (False, True):
        times = landing_times(preallocated, size=8 << 20, repeat=2)
        assert len(times) == 2 and all(t > 0 for t in times)
    assert len(os.listdir("/proc/self/fd")) == before  # every memfd closed


@pytest.mark.parametrize(
    "first, prealloc, shown",
    [(0.5e9, False, True), (1.5e9, False, False), (0.5e9, True, False), (None, False, False)],
)
def test_a_slow_first_store_into_fresh_memory_is_named(first, prealloc, shown):
    """Under a hypervisor that takes freed memory back, the first store into
    fresh memory can be many times slower than the best: the report says so
    (not with preallocated memory, and not when the two are close)."""
    ceilings = dict(CEILINGS, landing_first_bytes_per_s=first)
    note = _first_store_note(ceilings, prealloc)
    assert bool(note) == shown
    if shown:
        assert "0.50 GB/s" in note and "hypervisor" in note
