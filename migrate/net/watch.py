"""Interrupting a receive without racing it.

A receive that must also end when something else fails (a data channel, the
fault channel) or when the peer goes silent used to run as a task of its
own, raced against the failure in an ``asyncio.wait`` per frame.  At a few
hundred frames a second that bookkeeping was a third of the event loop's
time.  A ``ReceiveWatch`` instead stays armed around a plain ``await``: a
failure's callback, or a periodic check, cancels the receiving task and
leaves the reason to raise in its place."""

import asyncio


class ReceiveWatch:
    def __init__(self, check, period: float):
        """``check()`` returns an exception when the link has gone silent for
        too long, else None; it runs every ``period`` seconds while armed."""
        self._check = check
        self._period = period
        self._task: asyncio.Task | None = None
        self._failure: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.reason: BaseException | None = None  # why the watch cancelled the task
        self._armed = 0  # which receive is armed (they all run in the same task)

    async def receive(self, awaitable, failure: asyncio.Future | None):
        """``await awaitable``, raising instead ``failure``'s error if it
        fails meanwhile, or the check's once the link is silent.  A cancel
        from anyone else stays a cancel."""
        task = asyncio.current_task()
        self.arm(task, failure)
        try:
            return await awaitable
        except asyncio.CancelledError:
            reason = self.reason
            if reason is None or task.uncancel() > 0:
                raise  # the user's cancel (alone, or with ours): it stays a cancel
            raise reason from None
        finally:
            self.disarm()

    def arm(self, task: asyncio.Task, failure: asyncio.Future | None) -> None:
        """Watch ``task``, now awaiting a receive, and ``failure`` (or None)."""
        self._task, self._failure, self.reason = task, failure, None
        self._armed += 1  # an interrupt queued for an earlier receive must not hit this one
        if failure is not None:
            failure.add_done_callback(self._failed)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._period, self._tick)

    def disarm(self) -> None:
        if self._failure is not None:
            self._failure.remove_done_callback(self._failed)
        self._task = self._failure = None

    def close(self) -> None:
        self.disarm()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _interrupt(self, reason: BaseException) -> None:
        # Next round of the loop, not now: a frame whose last bytes arrived
        # this round has its receive's wake-up queued already, and it must
        # win (an ABORT says more than the broken channel that followed it).
        # By then that receive has returned and disarmed the watch.
        asyncio.get_running_loop().call_soon(self._cancel, self._armed, reason)

    def _cancel(self, armed: int, reason: BaseException) -> None:
        if self._task is not None and armed == self._armed and self.reason is None:
            self.reason = reason
            self._task.cancel()

    def _failed(self, failure: asyncio.Future) -> None:
        if failure is self._failure and not failure.cancelled():
            self._interrupt(failure.exception())

    def _tick(self) -> None:
        self._timer = None
        if self._task is None:
            return  # re-armed by the next receive
        reason = self._check()
        if reason is not None:
            self._interrupt(reason)
        else:
            self._timer = asyncio.get_running_loop().call_later(self._period, self._tick)
