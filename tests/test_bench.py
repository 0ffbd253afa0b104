"""migrate.tools.bench and migrate.ceilings: the comparison's arithmetic on
made-up runs (no migrations here), and the tag-work timing on real tags."""

import os

import pytest

from hosts import tags as tagops
from migrate.tools.bench import markdown, summarise, tag_work_bounds
from migrate.tools.ceilings import tag_work_per_page

GB = 10**9


def row(strategy, confirm_mbps, tagged_pages, scenario="allocator", repeat=0):
    return {
        "scenario": scenario,
        "strategy": strategy,
        "repeat": repeat,
        "status": "completed" if strategy != "none" else "failed",
        "validation_ok": strategy != "none",
        "tag_mismatches": 0,
        "total_time_ms": GB / 1e6 / confirm_mbps * 1e3,
        "downtime_ms": 100.0,
        "passes": 3,
        "guest_mb_per_s": confirm_mbps,
        "wire_data_bytes": GB,
        "wire_tag_bytes": 0,
        "wire_total_bytes": GB,
        "cpu_source_s": 1.0,
        "cpu_dest_s": 1.0,
        "est_tag_cpu_ms": 0.0,
        "ram_bytes": GB,
        "tagged_pages_sent": tagged_pages,
        "error": None,
    }


CEILINGS = {
    "loopback_bytes_per_s": 4e9,
    "zstd": {},
    "tag_work": {"allocator": {"s_per_page": 1e-6, "pages_timed": 1, "level": -3}},
}


def test_bound_spreads_the_tag_work_over_the_cores_on_top_of_none():
    # none moves 1 GB in 1.0 s; tag-ioctl sent 250,000 tagged pages at 1 us
    # each: 0.25 s of CPU, on 2 cores at least 0.125 s more -> 1 / 1.125.
    summary = summarise([row("none", 1000.0, 0), row("tag-ioctl", 800.0, 250_000)])
    bounds = tag_work_bounds(summary, CEILINGS, cores=2)
    assert bounds == {
        "allocator": {
            "tag_work_cpu_ms": 250.0,
            "cores": 2,
            "none_s": 1.0,
            "best_throughput_vs_none": round(1 / 1.125, 3),
            "measured_throughput_vs_none": 0.8,
        }
    }
    text = markdown(summary, CEILINGS, "mte-migrate bench", bounds)
    assert "allocator: 250 ms of CPU (1.00 us a tagged page) on 2 cores adds at least 125 ms to none's 1000 ms" in text
    assert "at best 0.89x none's; measured 0.80x" in text


def test_no_bound_without_a_none_run_tagged_pages_or_timed_tags():
    alone = summarise([row("tag-ioctl", 800.0, 250_000)])
    assert tag_work_bounds(alone, CEILINGS, cores=2) == {}
    untagged = summarise([row("none", 1000.0, 0), row("tag-ioctl", 990.0, 0)])
    assert tag_work_bounds(untagged, CEILINGS, cores=2) == {}
    other = summarise([row("none", 1000.0, 0, "idle"), row("tag-ioctl", 990.0, 10, "idle")])
    assert tag_work_bounds(other, CEILINGS, cores=2) == {}  # no tag timing for "idle"
    assert "Why tag-ioctl trails" not in markdown(other, CEILINGS, "c", {})


def test_ratios_against_none_come_from_medians_of_the_same_run():
    rows = [row("none", m, 0, repeat=i) for i, m in enumerate((900.0, 1000.0, 1100.0))]
    rows += [row("tag-ioctl", m, 1, repeat=i) for i, m in enumerate((700.0, 800.0, 2000.0))]
    entry = next(e for e in summarise(rows) if e["strategy"] == "tag-ioctl")
    assert entry["guest_mb_per_s"] == {"median": 800.0, "min": 700.0, "max": 2000.0}
    assert entry["vs_none"]["throughput"] == 0.8


def test_tag_work_is_timed_per_tagged_page():
    storage = os.urandom(300 * 128)
    assert tagops.pack(tagops.unpack(storage)) == storage  # the pipeline it times is lossless
    work = tag_work_per_page(storage, chunk_pages=64, repeat=2)
    assert work["pages_timed"] == 300
    assert 0 < work["s_per_page"] < 1e-3
    assert tag_work_per_page(b"") is None


@pytest.mark.parametrize("pages", [1, 255, 257])
def test_tag_work_handles_a_last_partial_chunk(pages):
    assert tag_work_per_page(bytes(pages * 128), repeat=1)["pages_timed"] == pages
