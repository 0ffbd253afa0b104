"""benchmarks/bench_fresh_memory.py: its probe and the host's report."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_fresh_memory", f"{REPO}/benchmarks/bench_fresh_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_probe_times_both_stores_in_a_fresh_process(bench):
    out = bench.probe(8 << 20)
    assert set(out) == {"cold_s", "again_s"}
    assert all(isinstance(v, float) and 0 < v < 30 for v in out.values())


def test_reported_memory_is_read_where_the_kernel_reports(bench, tmp_path, monkeypatch):
    path = tmp_path / "reported_kib"
    path.write_text("2048\n")
    monkeypatch.setattr(bench, "REPORTED", str(path))
    assert bench.reported_mib() == 2.0
    monkeypatch.setattr(bench, "REPORTED", str(tmp_path / "absent"))
    assert bench.reported_mib() is None


def test_a_run_that_writes_no_result_stops_with_one_line(bench):
    """A migration that could not write its result (here: an unknown
    scenario) ends the benchmark with what ran and how it exited, not a
    traceback."""
    with pytest.raises(
        SystemExit, match=r"migrate run .*--scenario no-such-scenario.* exited with 2 and wrote no result"
    ):
        bench.migrate_once("no-such-scenario")
