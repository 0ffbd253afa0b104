"""migrate.tools.bench, costmodel and ceilings: the comparison's arithmetic on
made-up runs (no migrations here), the order and the files of a bench run
with the migrations replaced by made-up results, and the tag-work timing on
real tags."""

import csv
import json
import os
import sys
from types import SimpleNamespace

import pytest

from hosts import tags as tagops
from migrate.strategies import BENCH_STRATEGIES, STRATEGIES
from migrate.tools import bench, costmodel
from migrate.tools.bench import (
    _row,
    chart_panels,
    markdown,
    paired_ratios,
    plot,
    run_order,
    summarise,
    tag_work_bounds,
)
from migrate.tools.ceilings import tag_work_per_page

GB = 10**9
MODEL = costmodel.load()
CEILINGS = {
    "loopback_bytes_per_s": 4e9,
    "zstd": {},
    "tag_work": {"allocator": {"s_per_page": 1e-6, "pages_timed": 1, "level": -3}},
}


def result(strategy, confirm_ms, total_ms=None, tagged_pages=0, counters=None):
    """What run_pair returns, reduced to the fields bench reads."""
    ok = strategy != "none"
    return {
        "status": "completed" if ok else "failed",
        "error": None if ok else "validation failed",
        "validation": {"ok": ok, "tag_mismatches": 0 if ok else 10},
        "confirm_time_ms": confirm_ms,
        "total_time_ms": total_ms if total_ms is not None else confirm_ms + 20.0,
        "downtime_ms": 50.0 if ok else None,
        "passes": [{}, {}],
        "ram": {"total_bytes": GB, "transferred_bytes": GB},
        "wire": {"data_bytes": GB, "tag_bytes": 0 if not ok else 4096 * tagged_pages // 32},
        "tags": {"tagged_pages": tagged_pages},
        "counters": counters or {},
        "cpu": {"process_s": 1.0, "migration_thread_s": 0.5},
        "destination": {"cpu": {"process_s": 0.8, "migration_thread_s": 0.4}},
    }


def row(strategy, confirm_ms, repeat=0, scenario="allocator", total_ms=None, tagged_pages=0, position=1):
    return _row(scenario, strategy, repeat, position, result(strategy, confirm_ms, total_ms, tagged_pages), MODEL)


def entry(summary, strategy, scenario="allocator"):
    return next(e for e in summary if e["strategy"] == strategy and e["scenario"] == scenario)


# -- order -----------------------------------------------------------------------------
def test_latin_square_puts_every_strategy_in_at_least_two_positions_over_four_repeats():
    strategies = list(BENCH_STRATEGIES)
    orders = [run_order(strategies, rep) for rep in range(4)]
    assert all(sorted(o) == sorted(strategies) for o in orders)  # each repeat runs each once
    for s in strategies:
        positions = {o.index(s) for o in orders}
        assert len(positions) >= 2, (s, orders)
    # With as many repeats as strategies, each runs once in every position.
    assert all(len({o.index(s) for o in orders}) == len(strategies) for s in strategies)
    # and none is not pinned to one place (it used to run third every time)
    assert len({o.index("none") for o in orders}) == 4


@pytest.mark.parametrize("n", [2, 3, 5, 6])
def test_every_n_consecutive_repeats_from_the_first_are_a_latin_square(n):
    names = [f"s{i}" for i in range(n)]
    orders = [run_order(names, rep) for rep in range(n)]
    for pos in range(n):
        assert sorted(o[pos] for o in orders) == names


# -- the compared span -------------------------------------------------------------------
def test_the_compared_span_ends_at_confirm_and_leaves_out_nones_inspection():
    # none reached CONFIRM at 500 ms, then inspected page by page for 1.5 s
    # after its validation failed; tag-ioctl reached CONFIRM at 600 ms and
    # switched over in 100 ms.  Over total time tag-ioctl would look 0.35x.
    rows = [row("none", 500.0, total_ms=2000.0), row("tag-ioctl", 600.0, total_ms=700.0)]
    none_row = rows[0]
    assert none_row["confirm_time_ms"] == 500.0
    assert none_row["after_confirm_ms"] == 1500.0
    assert none_row["guest_mb_per_s"] == 2000.0  # 1 GB over 0.5 s, not over 2 s
    e = entry(summarise(rows), "tag-ioctl")
    assert e["vs_none"]["time"]["median"] == 1.2
    assert e["vs_none"]["throughput"]["median"] == round(1 / 1.2, 3)
    text = markdown(summarise(rows), CEILINGS, "c")
    none_line = next(line for line in text.splitlines() if line.startswith("| allocator | none |"))
    cells = [c.strip() for c in none_line.split("|")]
    assert cells[5] == "500 (500–500)"  # compared: time to CONFIRM
    assert cells[9] == "1500 (1500–1500)"  # after CONFIRM, apart
    assert "2000" not in cells[5]


def test_a_run_that_never_reached_confirm_has_no_compared_time_and_no_pair():
    rows = [
        row("none", 500.0),
        _row("allocator", "tag-ioctl", 0, 2, {**result("tag-ioctl", 0), "confirm_time_ms": None}, MODEL),
    ]
    assert rows[1]["confirm_time_ms"] is None and rows[1]["after_confirm_ms"] is None
    assert entry(summarise(rows), "tag-ioctl")["vs_none"] is None


# -- paired ratios -----------------------------------------------------------------------
def test_ratios_against_none_are_paired_within_each_repeat():
    # none: 100, 200, 400 ms; tag-ioctl in the same repeats: 110, 400, 420.
    # Per repeat: 1.1, 2.0, 1.05 -> median 1.1.  The ratio of the medians
    # (400 / 200 = 2.0) would say tag-ioctl takes twice as long.
    rows = [row("none", t, repeat=i) for i, t in enumerate((100.0, 200.0, 400.0))]
    rows += [row("tag-ioctl", t, repeat=i) for i, t in enumerate((110.0, 400.0, 420.0))]
    assert sorted(paired_ratios(rows, "confirm_time_ms")[("allocator", "tag-ioctl")]) == pytest.approx([1.05, 1.1, 2.0])
    e = entry(summarise(rows), "tag-ioctl")
    assert e["confirm_time_ms"]["median"] / entry(summarise(rows), "none")["confirm_time_ms"]["median"] == 2.0
    assert e["vs_none"]["time"] == {"median": 1.1, "min": 1.05, "max": 2.0}
    assert e["vs_none"]["pairs"] == 3
    thr = e["vs_none"]["throughput"]
    assert thr["median"] == round(1 / 1.1, 3) and thr["min"] == 0.5 and thr["max"] == round(1 / 1.05, 3)


def test_a_ratio_on_both_sides_of_one_is_marked_as_not_established():
    rows = [row("none", 1000.0, repeat=i) for i in range(3)]
    rows += [row("tag-ioctl", t, repeat=i) for i, t in enumerate((900.0, 800.0, 1100.0))]
    rows += [row("prot-mte", t, repeat=i) for i, t in enumerate((1200.0, 1300.0, 1250.0))]
    text = markdown(summarise(rows), CEILINGS, "c")
    assert "| 0.90× (0.80–1.10) ~ |" in text  # tag-ioctl's time: faster twice, slower once
    assert "| 1.25× (1.20–1.30) |" in text  # prot-mte slower every time: no mark


def test_a_repeat_without_a_none_run_gives_no_pair():
    rows = [row("none", 100.0, repeat=0), row("tag-ioctl", 150.0, repeat=0), row("tag-ioctl", 900.0, repeat=1)]
    assert entry(summarise(rows), "tag-ioctl")["vs_none"]["time"] == {"median": 1.5, "min": 1.5, "max": 1.5}
    other = [row("none", 100.0, scenario="idle"), row("tag-ioctl", 150.0)]
    assert entry(summarise(other), "tag-ioctl")["vs_none"] is None


# -- the trails line ---------------------------------------------------------------------
def test_the_trails_line_appears_only_for_a_strategy_that_trails():
    rows = [row("none", 1000.0), row("tag-ioctl", 800.0, tagged_pages=250_000), row("prot-mte", 1250.0)]
    text = markdown(summarise(rows), CEILINGS, "c")
    assert "Why prot-mte trails none on allocator: its throughput is 0.80x none's" in text
    assert "Why tag-ioctl trails" not in text  # faster than none here: no excuse printed
    faster = markdown(summarise([row("none", 1000.0), row("tag-ioctl", 900.0)]), CEILINGS, "c")
    assert "trails" not in faster


def test_the_trails_line_says_when_a_repeat_did_not_trail():
    rows = [row("none", 1000.0, repeat=i) for i in range(3)]
    rows += [row("tag-ioctl", t, repeat=i) for i, t in enumerate((1200.0, 1300.0, 950.0))]
    text = markdown(summarise(rows), CEILINGS, "c")
    assert "Why tag-ioctl trails none on allocator" in text
    assert "in some repeat it did not trail, so the gap is not established" in text


def test_bound_spreads_the_tag_work_over_the_cores_on_top_of_none():
    # none reaches CONFIRM in 1.0 s; tag-ioctl sent 250,000 tagged pages at
    # 1 us each: 0.25 s of CPU, on 2 cores at least 0.125 s more -> 1 / 1.125.
    summary = summarise([row("none", 1000.0), row("tag-ioctl", 1250.0, tagged_pages=250_000)])
    bounds = tag_work_bounds(summary, CEILINGS, cores=2)
    assert bounds == {
        "allocator": {
            "tag-ioctl": {
                "tag_work_cpu_ms": 250.0,
                "cores": 2,
                "none_s": 1.0,
                "best_throughput_vs_none": round(1 / 1.125, 3),
                "measured_throughput_vs_none": 0.8,
            }
        }
    }
    text = markdown(summary, CEILINGS, "mte-migrate bench", bounds)
    assert "250 ms of CPU (1.00 us a tagged page) on 2 cores adds at least 125 ms to none's 1000 ms" in text
    assert "at best 0.89x none's; measured 0.80x" in text


def test_no_bound_without_a_none_run_tagged_pages_or_timed_tags():
    alone = summarise([row("tag-ioctl", 1250.0, tagged_pages=250_000)])
    assert tag_work_bounds(alone, CEILINGS, cores=2) == {}
    untagged = summarise([row("none", 1000.0), row("tag-ioctl", 1010.0)])
    assert tag_work_bounds(untagged, CEILINGS, cores=2) == {}
    other = summarise(
        [row("none", 1000.0, scenario="idle"), row("tag-ioctl", 1010.0, scenario="idle", tagged_pages=10)]
    )
    assert tag_work_bounds(other, CEILINGS, cores=2) == {}  # no tag timing for "idle"
    assert "No bound is computed" in markdown(other, CEILINGS, "c", {})


# -- proposals ---------------------------------------------------------------------------
def test_proposals_are_marked_in_the_summary_the_table_and_the_chart():
    assert STRATEGIES["tag-dirty-log"].proposal and not STRATEGIES["tag-ioctl"].proposal
    summary = summarise([row("none", 1000.0), row("tag-dirty-log", 900.0), row("tag-ioctl", 950.0)])
    assert entry(summary, "tag-dirty-log")["proposal"] is True
    assert entry(summary, "tag-ioctl")["proposal"] is False
    text = markdown(summary, CEILINGS, "c")
    assert "| allocator | tag-dirty-log [PROPOSAL] |" in text
    assert "| allocator | tag-ioctl |" in text
    for panel in chart_panels(summary):
        series = {b["series"] for b in panel["bars"] if b["strategy"] == "tag-dirty-log"}
        assert series and all("[PROPOSAL]" in s for s in series)


# -- the chart ---------------------------------------------------------------------------
def test_the_chart_answers_the_design_question_with_whiskers_and_a_separate_estimate():
    rows = [row("none", t, repeat=i) for i, t in enumerate((1000.0, 1100.0, 900.0))]
    rows += [row("tag-ioctl", t, repeat=i, tagged_pages=1000) for i, t in enumerate((1250.0, 1000.0, 2000.0))]
    panels = chart_panels(summarise(rows))
    assert [p["ylabel"] for p in panels] == ["MB/s", "CPU s", "KiB", "est. CPU ms"]
    assert [p["estimate"] for p in panels] == [False, False, False, True]
    assert "ESTIMATE" in panels[3]["title"] and "not measured" in panels[3]["title"]
    thr = next(b for b in panels[0]["bars"] if b["strategy"] == "tag-ioctl")
    assert (thr["low"], thr["median"], thr["high"]) == (500.0, 800.0, 1000.0)  # min-max whiskers
    assert {b["series"] for b in panels[1]["bars"]} == {"none src", "none dst", "tag-ioctl src", "tag-ioctl dst"}


def test_without_matplotlib_there_is_no_chart_and_no_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    summary = summarise([row("none", 1000.0), row("tag-ioctl", 900.0)])
    assert plot(summary, str(tmp_path / "c.png")) is False
    assert not (tmp_path / "c.png").exists()


def test_the_chart_draws_each_panel_with_whiskers_and_hatches_proposals(monkeypatch, tmp_path):
    # A stand-in for matplotlib that records the calls, so the drawing code
    # runs here even where the plot extra is not installed.
    from unittest import mock

    axes = [mock.MagicMock(name=f"ax{i}") for i in range(4)]
    fig = mock.MagicMock(name="fig")
    fig.savefig.side_effect = lambda path, dpi: open(path, "wb").close()
    pyplot = SimpleNamespace(subplots=lambda *a, **k: (fig, SimpleNamespace(flat=axes)), close=lambda f: None)
    mpl = SimpleNamespace(use=lambda backend: None, pyplot=pyplot)
    monkeypatch.setitem(sys.modules, "matplotlib", mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    rows = [row("none", t, repeat=i) for i, t in enumerate((1000.0, 1100.0))]
    rows += [row("tag-dirty-log", t, repeat=i) for i, t in enumerate((1250.0, 1000.0))]
    assert plot(summarise(rows), str(tmp_path / "c.png")) is True
    assert (tmp_path / "c.png").exists()
    titles = [ax.set_title.call_args.args[0] for ax in axes]
    assert titles == [p["title"] for p in chart_panels(summarise(rows))]
    bars = axes[0].bar.call_args_list
    assert len(bars) == 2  # none and the proposal, one series each
    proposal = next(c for c in bars if "[PROPOSAL]" in c.kwargs["label"])
    assert proposal.kwargs["hatch"] == "//"
    lows, highs = proposal.kwargs["yerr"]
    assert lows == [900.0 - 800.0] and highs == [1000.0 - 900.0]  # median 900, whiskers to min and max
    axes[3].set_facecolor.assert_called_once()  # the estimate panel stands apart
    axes[0].set_facecolor.assert_not_called()


def test_with_matplotlib_the_chart_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    summary = summarise([row("none", 1000.0), row("tag-dirty-log", 900.0)])
    assert plot(summary, str(tmp_path / "c.png")) is True
    assert (tmp_path / "c.png").stat().st_size > 0


# -- the cost model ----------------------------------------------------------------------
def test_the_cost_model_charges_the_proposals_stage2_traps():
    counters = {"source.kvm.tag_access_faults": 1000, "source.kvm.write_protect_faults": 500, "source.el0.stg": 2000}
    traps = (1000 * MODEL["tag_access_fault"] + 500 * MODEL["write_protect_fault"]) / 1e6
    work = 2000 * MODEL["el0_tag_instruction"] / 1e6
    assert costmodel.estimate_ms(counters, MODEL, "source.", traps=True) == pytest.approx(traps)
    assert costmodel.estimate_ms(counters, MODEL, "source.", traps=False) == pytest.approx(work)
    assert costmodel.estimate_ms(counters, MODEL, "source.") == pytest.approx(traps + work)
    r = _row("allocator", "tag-dirty-log", 0, 1, result("tag-dirty-log", 100.0, counters=counters), MODEL)
    assert r["est_trap_ms"] == pytest.approx(traps) and r["est_cpu_ms"] == pytest.approx(traps + work)


def test_the_trap_prices_say_where_they_come_from_and_a_model_without_them_is_refused(tmp_path):
    text = costmodel.DEFAULT_MODEL.read_text()
    block = text[: text.index("tag_access_fault =")].rsplit("\n\n", 1)[1]
    assert "ASSUMPTION" in block
    stripped = "\n".join(line for line in text.splitlines() if not line.startswith("tag_access_fault"))
    (tmp_path / "m.toml").write_text(stripped)
    with pytest.raises(ValueError, match="tag_access_fault"):
        costmodel.load(str(tmp_path / "m.toml"))


# -- a whole bench run, migrations made up -------------------------------------------------
def test_a_bench_run_rotates_the_order_and_writes_position_and_proposal(monkeypatch, tmp_path):
    calls = []
    times = {"tag-ioctl": 1100.0, "prot-mte": 1200.0, "none": 1000.0, "tag-dirty-log": 950.0}

    def fake_run_pair(guest, config, scenario, quiet=True):
        calls.append(config.strategy)
        assert config.validate == "digest"  # never the digest that trusts the dirty tracking
        return result(config.strategy, times[config.strategy], tagged_pages=100)

    monkeypatch.setattr(bench, "run_pair", fake_run_pair)
    monkeypatch.setattr(bench, "measure_ceilings", lambda scenarios, seconds: CEILINGS)
    monkeypatch.setattr(bench, "plot", lambda summary, path: False)
    scenario = SimpleNamespace(name="allocator", guest=None, migration=SimpleNamespace(validate="tracked"))
    monkeypatch.setattr(bench, "replace", lambda obj, **kw: SimpleNamespace(**kw))
    strategies = list(BENCH_STRATEGIES)
    code = bench.run_bench([scenario], strategies, 4, str(tmp_path), True, None, "mte-migrate bench", quiet=True)
    assert code == 0
    per_repeat = [calls[i : i + 4] for i in range(0, 16, 4)]
    assert {r.index("none") for r in per_repeat} == {0, 1, 2, 3}

    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"proposal", "position"} <= set(rows[0])
    for r in rows:
        assert r["proposal"] == ("true" if r["strategy"] == "tag-dirty-log" else "false")
        assert per_repeat[int(r["repeat"])][int(r["position"]) - 1] == r["strategy"]
    for s in strategies:
        assert len({r["position"] for r in rows if r["strategy"] == s}) >= 2

    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["proposals"] == ["tag-dirty-log"]
    assert all(r["proposal"] is (r["strategy"] == "tag-dirty-log") for r in doc["runs"])
    assert entry(doc["summary"], "none")["positions"] == [1, 2, 3, 4]
    md = (tmp_path / "results.md").read_text()
    assert "tag-dirty-log [PROPOSAL]" in md and "Why prot-mte trails none" in md
    assert "Why tag-ioctl trails none" in md
    assert "Why tag-dirty-log" not in md  # 950 ms against none's 1000: it does not trail


# -- ceilings ----------------------------------------------------------------------------
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
