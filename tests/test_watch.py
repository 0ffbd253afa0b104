"""The receive watch: a failure or a silence interrupts a plain receive with
its own reason; a cancel of anyone else's stays a cancel."""

import asyncio

import pytest

from migrate.errors import PeerTimeout, TransportError
from migrate.net.watch import ReceiveWatch


async def _receive(watch, failure, forever):
    return await watch.receive(forever, failure)


async def test_a_failure_interrupts_the_receive_with_its_error():
    loop = asyncio.get_running_loop()
    failure, forever = loop.create_future(), loop.create_future()
    watch = ReceiveWatch(lambda: None, 10.0)
    task = asyncio.ensure_future(_receive(watch, failure, forever))
    await asyncio.sleep(0)
    failure.set_exception(TransportError("data channel 2: cut"))
    with pytest.raises(TransportError, match="data channel 2"):
        await task
    watch.close()


async def test_silence_interrupts_only_once_the_check_says_so():
    loop = asyncio.get_running_loop()
    forever = loop.create_future()
    checks = []

    def check():
        checks.append(1)
        return PeerTimeout("source sent nothing for 0.1 s") if len(checks) >= 3 else None

    watch = ReceiveWatch(check, 0.02)
    with pytest.raises(PeerTimeout):
        await _receive(watch, None, forever)
    assert len(checks) == 3  # two checks found it alive; the third interrupted
    watch.close()


async def test_a_frame_in_time_is_returned_and_the_watch_disarms():
    loop = asyncio.get_running_loop()
    failure, frame = loop.create_future(), loop.create_future()
    watch = ReceiveWatch(lambda: PeerTimeout("silent"), 0.05)
    loop.call_soon(frame.set_result, "PAGES")
    assert await _receive(watch, failure, frame) == "PAGES"
    failure.set_exception(TransportError("after the receive"))  # nobody is interrupted now
    await asyncio.sleep(0.1)  # nor by the timer: it stops once nothing is armed
    assert watch.reason is None
    watch.close()


async def test_a_cancel_from_elsewhere_stays_a_cancel():
    loop = asyncio.get_running_loop()
    forever = loop.create_future()
    watch = ReceiveWatch(lambda: None, 10.0)
    task = asyncio.ensure_future(_receive(watch, loop.create_future(), forever))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    watch.close()


async def test_a_frame_already_there_wins_over_a_failure_in_the_same_round():
    # The receive's wake-up is queued when its last bytes arrive; a failure
    # reported in the same round of the loop must not throw that frame away.
    loop = asyncio.get_running_loop()
    failure, frame = loop.create_future(), loop.create_future()
    watch = ReceiveWatch(lambda: None, 10.0)
    task = asyncio.ensure_future(_receive(watch, failure, frame))
    await asyncio.sleep(0)
    failure.set_exception(TransportError("data channel 1: peer closed"))  # its callback queued first
    frame.set_result("ABORT")  # then the receive's wake-up, in the same round
    assert await task == "ABORT"
    watch.close()


async def test_an_interrupt_queued_for_one_receive_does_not_hit_the_next():
    # The check finds silence in the very round a frame arrives: the frame
    # wins, and the next receive (same task, no await in between) must not
    # be cancelled by the interrupt queued for the first.
    loop = asyncio.get_running_loop()
    first, second = loop.create_future(), loop.create_future()

    def check():
        first.done() or first.set_result("PASS_END")  # the frame's wake-up is queued first
        return PeerTimeout("silent")

    watch = ReceiveWatch(check, 0.01)
    assert await _receive(watch, None, first) == "PASS_END"
    loop.call_later(0.05, second.set_result, "PAGES")
    watch._period = 10.0  # no new silence now: only the stale interrupt could strike
    assert await _receive(watch, None, second) == "PAGES"
    watch.close()


async def test_a_user_cancel_with_the_watch_interrupt_stays_a_cancel():
    loop = asyncio.get_running_loop()
    failure, forever = loop.create_future(), loop.create_future()
    watch = ReceiveWatch(lambda: None, 10.0)
    task = asyncio.ensure_future(_receive(watch, failure, forever))
    await asyncio.sleep(0)
    failure.set_exception(TransportError("cut"))
    await asyncio.sleep(0)  # the watch's interrupt is queued
    task.cancel()  # and the user's
    with pytest.raises(asyncio.CancelledError):
        await task
    watch.close()
