"""The source's passes: each sends a set of pages over every channel, each
page on its stripe's channel (see lanes.py), and the destination says only
that a pass has landed (APPLIED) -- or that it fails, which one reader on
the control connection hears at once (``PeerWatch``)."""

import asyncio
import functools
import time

from hosts.constants import PAGE_SIZE
from migrate.engine.bitmaps import runs
from migrate.engine.lanes import SendLane, partition
from migrate.engine.pages import BatchStats
from migrate.errors import MigrationError, PeerError, PeerTimeout, ProtocolError, TransportError
from migrate.net.threads import LoopThread
from migrate.protocol import frames as fr


def peer_error(frame) -> PeerError:
    return PeerError(f"destination: {getattr(frame, 'message', None) or frame.reason}", getattr(frame, "code", "abort"))


class PeerWatch:
    """Reads the control connection from the bulk pass to CONFIRM.  The
    destination's APPLIED acknowledgements are counted here; otherwise it
    speaks only to fail (or, at the end, to confirm): that frame, or the
    read's error, is kept for ``check`` and ``answer``."""

    def __init__(self):
        self._task: asyncio.Future | None = None  # the reader
        self._next: asyncio.Future | None = None  # the first frame that is not APPLIED
        self._acked: asyncio.Event | None = None  # set at each APPLIED
        self.applied = -1  # the last pass the destination acknowledged
        #: (first page, count) of the frames the destination found torn (APPLIED), not yet checked
        self.torn: list = []

    def listen(self, chan) -> None:
        self._next = asyncio.get_running_loop().create_future()
        self._next.add_done_callback(lambda f: f.cancelled() or f.exception())  # read when it matters
        self._acked = asyncio.Event()
        self._task = asyncio.ensure_future(self._read(chan, self._next))

    async def _read(self, chan, nxt: asyncio.Future) -> None:
        try:
            while True:
                frame = await chan.recv(timeout=None)
                if frame.type != fr.FrameType.APPLIED:
                    nxt.set_result(frame)
                    return
                self.applied = max(self.applied, frame.pass_no)
                self.torn += frame.torn
                self._acked.set()
        except MigrationError as exc:
            if not nxt.done():
                nxt.set_exception(exc)

    def check(self) -> None:
        """Raise what the destination said, if it said anything."""
        nxt = self._next
        if nxt is not None and nxt.done():
            self._next = None
            frame = nxt.result()  # raises the peer's transport/protocol error
            if frame.type in (fr.FrameType.ERROR, fr.FrameType.ABORT):
                raise peer_error(frame)
            raise ProtocolError(f"unexpected {frame.type.name} frame from the destination")

    async def applied_by(self, pass_no: int, timeout: float) -> float:
        """Wait until the destination acknowledged ``pass_no`` (APPLIED);
        returns the seconds waited.  Raises what it said instead, or
        PeerTimeout."""
        t0 = time.perf_counter()
        deadline = t0 + timeout
        while self.applied < pass_no:
            self.check()
            left = deadline - time.perf_counter()
            if self._next is None or left <= 0:
                raise PeerTimeout(f"the destination did not acknowledge pass {pass_no} within {timeout:g} s")
            self._acked.clear()
            acked = asyncio.ensure_future(self._acked.wait())
            try:
                await asyncio.wait({acked, self._next}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                acked.cancel()
        return time.perf_counter() - t0

    async def words(self, grace: float) -> None:
        """After a data channel broke: the destination's ERROR, if it is on
        its way (it fails, then closes the channel; the reset can overtake
        the control connection's frame), beats the broken pipe."""
        nxt = self._next
        if nxt is not None and not nxt.done():
            await asyncio.wait({nxt}, timeout=grace)
        self.check()

    def check_from_thread(self) -> None:
        """From a channel thread: stop sending once the destination has spoken
        (the main loop reads what it said)."""
        nxt = self._next
        if nxt is not None and nxt.done():
            raise TransportError("destination stopped the migration")

    async def answer(self, chan, timeout: float):
        """The destination's next frame (its CONFIRM), within ``timeout`` seconds."""
        nxt, self._next = self._next, None
        if nxt is None:
            return await chan.recv()
        try:
            frame = await asyncio.wait_for(asyncio.shield(nxt), timeout)
        except TimeoutError:
            self.stop()
            raise TransportError("the destination did not confirm in time") from None
        if frame.type in (fr.FrameType.ERROR, fr.FrameType.ABORT):
            raise peer_error(frame)
        return frame

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._next = None


class PassSender:
    """Sends passes over ``lanes`` (lane 0 on the event loop, lane i on
    ``threads[i - 1]``) and keeps a record of each in ``passes``."""

    def __init__(self, peer: PeerWatch, dirty_log, progress, result: dict):
        self.peer = peer
        self.dirty_log = dirty_log  # for the dirty rate the progress line shows
        self.progress = progress
        self.result = result
        self.lanes: list[SendLane] = []
        self.threads: list[LoopThread] = []
        self.passes: list[dict] = []
        #: the channels pages travel on, the first ones (pages_channels); the
        #: others end each pass with PASS_END only.  Fixed for a migration,
        #: so that every page keeps its channel.
        self.carrying: int | None = None

    @property
    def page_lanes(self) -> int:
        """How many lanes carry pages: the first ``carrying``, else all."""
        return min(self.carrying or len(self.lanes), len(self.lanes))

    async def send(self, pass_no: int, ranges, final: bool = False, tags_only: bytes = b"") -> None:
        """Send the pages in ``ranges`` (data and tags) and the pages marked in
        ``tags_only`` (their tags alone), each on its stripe's channel; every
        channel ends its share with PASS_END."""
        tag_ranges = list(runs(tags_only, 1)) if tags_only else []
        total = sum(b - a for a, b in ranges) + sum(b - a for a, b in tag_ranges)
        n, carrying = len(self.lanes), self.page_lanes
        shares, tag_shares = partition(ranges, carrying), partition(tag_ranges, carrying)
        shares += [[] for _ in range(n - carrying)]
        tag_shares += [[] for _ in range(n - carrying)]
        started = time.perf_counter()
        report = functools.partial(self._report, pass_no, total, started, [lane.pages_done for lane in self.lanes])
        jobs = self._start_shares(pass_no, shares, tag_shares)
        await self._wait(jobs, report)
        pass_stats = BatchStats()
        for job in jobs:
            pass_stats.add(job.result())
        self._record(pass_no, final, total, tag_ranges, pass_stats, time.perf_counter() - started)
        report(force=True)

    def _start_shares(self, pass_no: int, shares, tag_shares) -> list:
        lane0 = self.lanes[0]
        jobs = [asyncio.ensure_future(lane0.send_share(pass_no, shares[0], tag_shares[0], self.peer.check))]
        for lane, thread in zip(self.lanes[1:], self.threads):
            jobs.append(
                thread.submit(
                    lane.send_share(pass_no, shares[lane.index], tag_shares[lane.index], self.peer.check_from_thread)
                )
            )
        for job in jobs:  # the first failure is raised below; the others are only read
            job.add_done_callback(lambda j: j.cancelled() or j.exception())
        return jobs

    async def _wait(self, jobs: list, report) -> None:
        pending = set(jobs)
        try:
            while pending:
                _, pending = await asyncio.wait(pending, timeout=0.25, return_when=asyncio.FIRST_EXCEPTION)
                for job in jobs:
                    if job.done() and not job.cancelled() and job.exception() is not None:
                        await self.peer.words(0.5)  # the destination's own words beat a broken pipe
                        raise job.exception()
                report()
        finally:
            for job in pending:
                job.cancel()

    def _report(self, pass_no: int, total: int, started: float, start_done: list[int], force: bool = False) -> None:
        done = sum(lane.pages_done - s0 for lane, s0 in zip(self.lanes, start_done))
        elapsed = time.perf_counter() - started
        self.progress.update(
            pass_no,
            done,
            total,
            done * PAGE_SIZE / elapsed if elapsed else 0.0,
            self.dirty_log.rate(self.passes),
            self.result["expected_downtime_ms"],
            force=force,
        )

    def _record(self, pass_no: int, final: bool, total: int, tag_ranges, stats: BatchStats, elapsed: float) -> None:
        self.passes.append(
            {
                "pass": pass_no,
                "final": final,
                "pages": total,
                "tags_only_pages": sum(b - a for a, b in tag_ranges),
                "normal_pages": stats.normal_pages,
                "zero_pages": stats.zero_pages,
                "tagged_pages": stats.tagged_pages,
                "seconds": round(elapsed, 6),
                "wire_bytes": stats.data_wire + stats.tag_wire,
            }
        )

    def totals(self) -> BatchStats:
        """Everything the channels sent, including passes that broke off."""
        stats = BatchStats()
        for lane in self.lanes:
            stats.add(lane.totals)
        return stats

    def close(self) -> None:
        for thread in self.threads:  # cancel what still runs there, then close its socket
            thread.stop()
        for lane in self.lanes[1:]:
            lane.chan.close()
