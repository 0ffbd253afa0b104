"""The convergence policy (migrate/convergence.py): stop when the estimated
downtime fits the limit, stop anyway (forced) at the pass limit, and always
say why."""

import pytest

from migrate.engine.convergence import Decision, DowntimeOrPassLimit

MB = 1_000_000


@pytest.fixture
def policy():
    return DowntimeOrPassLimit(downtime_limit_ms=300, max_passes=5)


def test_expected_downtime():
    f = DowntimeOrPassLimit.expected_downtime_ms
    assert f(0, None) == 0.0
    assert f(0, 0) == 0.0
    assert f(100 * MB, 1000 * MB) == pytest.approx(100.0)
    assert f(1, None) is None
    assert f(1, 0) is None
    assert f(1, 0.0) is None


def test_stops_under_the_limit_with_the_estimate_in_the_reason(policy):
    d = policy.decide(1, 120 * MB, 1000 * MB)  # 120 ms
    assert d == Decision(True, "estimated downtime 120 ms <= limit 300 ms", False)


def test_stops_exactly_at_the_limit(policy):
    d = policy.decide(1, 300 * MB, 1000 * MB)
    assert d.stop and not d.forced
    assert "300 ms <= limit 300 ms" in d.reason


def test_nothing_left_stops_even_without_a_bandwidth(policy):
    d = policy.decide(0, 0, None)
    assert d.stop and not d.forced
    assert "estimated downtime 0 ms <= limit 300 ms" == d.reason


def test_does_not_stop_over_the_limit(policy):
    d = policy.decide(2, 500 * MB, 1000 * MB)
    assert d == Decision(False, "estimated downtime 500 ms > limit 300 ms", False)


def test_does_not_stop_before_bandwidth_is_known(policy):
    d = policy.decide(0, 4096, None)
    assert not d.stop and not d.forced
    assert d.reason == "bandwidth not measured yet"


@pytest.mark.parametrize("passes", [5, 6, 100])
def test_forced_at_max_passes(policy, passes):
    d = policy.decide(passes, 2000 * MB, 1000 * MB)
    assert d.stop and d.forced
    assert d.reason == "max passes 5 reached with estimated downtime 2000 ms > limit 300 ms"


def test_forced_with_unknown_estimate(policy):
    d = policy.decide(5, 4096, None)
    assert d.stop and d.forced
    assert "estimated downtime unknown > limit 300 ms" in d.reason


def test_converging_at_the_pass_limit_is_not_forced(policy):
    d = policy.decide(5, 1 * MB, 1000 * MB)
    assert d.stop and not d.forced
    assert d.reason.startswith("estimated downtime 1 ms")


def test_one_pass_before_the_limit_keeps_going(policy):
    assert not policy.decide(4, 2000 * MB, 1000 * MB).stop


def test_zero_max_passes_forces_at_once():
    p = DowntimeOrPassLimit(300, 0)
    d = p.decide(0, 10**12, 1.0)
    assert d.stop and d.forced and "max passes 0 reached" in d.reason


def test_sequence_of_passes_on_a_hot_guest():
    # A guest that dirties as fast as the link: the estimate never falls,
    # so the pass limit decides, once, at the limit.
    p = DowntimeOrPassLimit(300, 3)
    decisions = [p.decide(n, 800 * MB, 1000 * MB) for n in range(5)]
    assert [d.stop for d in decisions] == [False, False, False, True, True]
    assert [d.forced for d in decisions] == [False, False, False, True, True]
    assert all("800 ms" in d.reason for d in decisions)


def test_policy_has_a_name():
    assert DowntimeOrPassLimit.name == "downtime-or-pass-limit"


def _pass(no, pages, seconds, normal=None):
    return {"pass": no, "pages": pages, "normal_pages": pages if normal is None else normal, "seconds": seconds}


def test_the_estimate_divides_by_a_dirty_pass_never_the_bulk_pass():
    from migrate.engine.source import dirty_pass_bandwidth

    bulk = _pass(0, 262144, 1.0)  # 1.07 GB/s of whole chunks
    assert dirty_pass_bandwidth([bulk]) is None  # the final pass's scattered pages are not like that
    policy = DowntimeOrPassLimit(300, 30)
    # 22,000 dirty pages after the bulk: unknown, so precopy goes on ...
    d = policy.decide(0, 22000 * 4096, dirty_pass_bandwidth([bulk]))
    assert not d.stop and d.reason == "bandwidth not measured yet"
    # ... and the dirty pass measures the rate that predicts the final pass
    dirty = _pass(1, 22000, 0.264)
    assert dirty_pass_bandwidth([bulk, dirty]) == 22000 * 4096 / 0.264
    assert policy.decide(1, 4000 * 4096, dirty_pass_bandwidth([bulk, dirty])).stop
    assert not policy.decide(1, 40000 * 4096, dirty_pass_bandwidth([bulk, dirty])).stop
    # a pass that sent nothing measures nothing; tags-only passes count their pages
    assert dirty_pass_bandwidth([bulk, dirty, _pass(2, 0, 0.01)]) == 22000 * 4096 / 0.264
    assert dirty_pass_bandwidth([bulk, _pass(1, 100, 0.01, normal=0)]) == 100 * 4096 / 0.01
    # nothing dirty after the bulk pass: stop at once, nothing to measure
    assert policy.decide(0, 0, None).stop
