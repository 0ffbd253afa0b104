"""The sending-rate limiter (migrate/ratelimit.py), with a fake clock: the
arithmetic of book() and what wait() sleeps, without sleeping."""

import asyncio
import types

import pytest

from migrate.net import ratelimit
from migrate.net.ratelimit import RateLimiter


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(monotonic=c))
    return c


def test_rate_must_be_positive():
    for bad in (0, -1, -0.5):
        with pytest.raises(ValueError, match="rate must be positive"):
            RateLimiter(bad)


def test_first_send_goes_at_once_then_sends_queue(clock):
    rl = RateLimiter(1000.0, burst_s=0.0)  # 1000 bytes/s
    assert rl.book(500) == 0.0  # link free: go now; busy until +0.5 s
    assert rl.book(500) == pytest.approx(0.5)  # waits for the first
    assert rl.book(1000) == pytest.approx(1.0)  # after both: +1.0 s
    clock.t += 2.0  # link free again exactly now
    assert rl.book(100) == pytest.approx(0.0)
    assert rl.book(100) == pytest.approx(0.1)


def test_waiting_callers_advance_the_clock(clock):
    rl = RateLimiter(1e6, burst_s=0.0)
    total_wait = 0.0
    for _ in range(10):
        d = rl.book(100_000)  # 0.1 s each
        total_wait += d
        clock.t += d  # the caller sleeps as told
    # 10 x 100 kB at 1 MB/s: the tenth starts 0.9 s after the first
    assert total_wait == pytest.approx(0.9)
    assert rl._free_at == pytest.approx(clock.t + 0.1)


def test_average_rate_is_the_cap(clock):
    rate = 50e6
    rl = RateLimiter(rate)
    start = clock.t
    sent = 0
    for _ in range(1000):
        clock.t += rl.book(65536)
        sent += 65536
    # the last send starts at start + (sent - last) / rate, minus the burst credit at most
    assert clock.t - start == pytest.approx((sent - 65536) / rate, abs=0.011)


def test_burst_credit_is_bounded(clock):
    rl = RateLimiter(1000.0, burst_s=0.01)
    clock.t += 100.0  # idle for a long time
    # Only 10 ms of credit is kept: 10 bytes go now, free_at = now.
    assert rl.book(10) == 0.0
    assert rl._free_at == pytest.approx(clock.t)
    assert rl.book(10) == 0.0  # link free at exactly now
    assert rl.book(10) == pytest.approx(0.01)


def test_small_scheduling_delay_does_not_lower_the_rate(clock):
    rl = RateLimiter(1000.0, burst_s=0.01)
    assert rl.book(100) == 0.0
    free = rl._free_at
    clock.t = free + 0.005  # the sender came back 5 ms late
    assert rl.book(100) == 0.0
    assert rl._free_at == pytest.approx(free + 0.1)  # booked from when the link was free


def test_late_sender_beyond_the_burst_loses_the_rest(clock):
    rl = RateLimiter(1000.0, burst_s=0.01)
    rl.book(100)
    free = rl._free_at
    clock.t = free + 1.0
    rl.book(100)
    assert rl._free_at == pytest.approx(clock.t - 0.01 + 0.1)


def test_zero_bytes_book_nothing(clock):
    rl = RateLimiter(1000.0, burst_s=0.0)
    rl.book(1000)
    assert rl.book(0) == pytest.approx(1.0)
    assert rl.book(0) == pytest.approx(1.0)


def test_wait_sleeps_for_what_book_says(clock, monkeypatch):
    slept = []

    async def fake_sleep(d):
        slept.append(d)

    monkeypatch.setattr(ratelimit, "asyncio", types.SimpleNamespace(sleep=fake_sleep))
    rl = RateLimiter(1000.0, burst_s=0.0)

    async def go():
        await rl.wait(250)
        await rl.wait(250)
        await rl.wait(500)

    asyncio.run(go())
    assert slept == [pytest.approx(0.25), pytest.approx(0.5)]  # no sleep for the first
