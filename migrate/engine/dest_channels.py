"""The destination's data channels (``--channels N > 1``, see lanes.py):
each joined connection runs on a thread of its own, applies its PAGES and
reports each PASS_END to the event loop, where the control loop waits for
every channel to deliver the final pass before it digests."""

import asyncio
import time
from collections.abc import Callable

from migrate.engine.pages import BatchApplier, BatchStats
from migrate.errors import MigrationError, PeerError, PeerTimeout, ProtocolError, TransportError, one_line
from migrate.net.threads import LoopThread
from migrate.net.transport import FrameChannel
from migrate.protocol import frames as fr

T = fr.FrameType


class ReceiveLane:
    """One data channel: its thread, its connection once running there, and
    what arrived on it."""

    def __init__(self, thread: LoopThread):
        self.thread = thread
        self.chan: FrameChannel | None = None
        self.stats = BatchStats()
        self.bytes = 0  # received, counted when the channel closes


class DataChannels:
    """The data channels of one migration, and what every channel (the
    control connection too) has delivered.  ``finished`` says the migration
    is over (a channel closing then is no failure)."""

    def __init__(self, timeout_s: float, finished: Callable[[], bool]):
        self.timeout_s = timeout_s
        self._finished = finished
        self.lanes: dict[int, ReceiveLane] = {}
        self.pass_seen = {0: -1}  # channel -> last PASS_END (0: the control connection)
        self.frozen = False  # the final digest has started: no PAGES any more
        self.failure: asyncio.Future | None = None  # the first data channel to fail sets it
        self._progress: asyncio.Event | None = None  # a data channel ended a pass
        self._control: FrameChannel | None = None
        self._make_applier: Callable[[], BatchApplier] | None = None

    def start(self, control: FrameChannel, make_applier: Callable[[], BatchApplier]) -> None:
        """Ready for JOINs, once HELLO is accepted: ``make_applier`` gives each
        channel its own applier (built on the channel's thread)."""
        self._control = control
        self._make_applier = make_applier
        self.failure = asyncio.get_running_loop().create_future()
        # Read by the control loop when it matters; never "unretrieved".
        self.failure.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._progress = asyncio.Event()

    def add(self, index: int, sock, conn, io) -> None:
        """Hand a joined connection to a thread of its own."""
        thread = LoopThread(f"channel{index}")
        lane = ReceiveLane(thread)
        self.lanes[index] = lane
        self.pass_seen[index] = -1
        thread.submit(self._receive(index, sock, conn, lane, asyncio.get_running_loop(), io))

    async def _receive(self, index: int, sock, conn, lane: ReceiveLane, main_loop, io) -> None:
        """Runs on the channel's thread: apply PAGES, report PASS_END."""
        io.loop = asyncio.get_running_loop()  # the connection moves to this thread's loop
        chan = lane.chan = FrameChannel(sock, conn, self.timeout_s, io=io)
        applier = self._make_applier()
        ended = -1  # the last pass this channel ended
        # Whole chunks of raw data are spliced into place (never a frame the
        # checks below would refuse).
        chan.placer = lambda fields, dl: (
            None if fields["pass_no"] <= ended or self.frozen else applier.placement(fields, dl)
        )
        try:
            while True:
                frame = await chan.recv(timeout=None)  # liveness is watched by the control loop
                if frame.type == T.PAGES:
                    if frame.pass_no <= ended or self.frozen:
                        raise ProtocolError(
                            f"PAGES of pass {frame.pass_no} on data channel {index} after "
                            + ("that pass ended" if frame.pass_no <= ended else "the final pass")
                        )
                    lane.stats.add(applier.apply(frame))
                elif frame.type == T.PASS_END:
                    ended = max(ended, frame.pass_no)
                    main_loop.call_soon_threadsafe(self._pass_end, index, frame.pass_no)
                elif frame.type == T.ERROR:
                    raise PeerError(f"source: {frame.message}", frame.code)
                else:
                    raise ProtocolError(f"unexpected {frame.type.name} frame on data channel {index}")
        except TransportError as exc:
            if not chan.closed and not self._finished():
                main_loop.call_soon_threadsafe(self.fail, exc)
        except MigrationError as exc:
            main_loop.call_soon_threadsafe(self.fail, exc)
        except Exception as exc:  # a bug: fail the migration, never hang
            error = MigrationError(f"internal error on data channel {index}: {type(exc).__name__}: {one_line(exc)}")
            main_loop.call_soon_threadsafe(self.fail, error)
        finally:
            lane.bytes = chan.bytes_received
            chan.close()

    def _pass_end(self, index: int, pass_no: int) -> None:
        self.pass_seen[index] = pass_no
        self._progress.set()

    def fail(self, exc: MigrationError) -> None:
        """A channel failed (the fault channel's thread says so here too)."""
        if self.failure is not None and not self.failure.done():
            self.failure.set_exception(exc)

    def active(self) -> bool:
        """Some channel, the control connection included, received within the timeout."""
        now = time.monotonic()
        chans = [self._control] + [lane.chan for lane in self.lanes.values() if lane.chan is not None]
        return any(now - c.last_activity < self.timeout_s for c in chans)

    async def await_final_pass(self, final_pass: int, channels: int) -> None:
        """Every data channel (1 .. ``channels`` - 1) must have delivered the final pass."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            missing = [c for c in range(1, channels) if self.pass_seen.get(c, -1) < final_pass]
            if not missing:
                return
            if self.failure.done():
                raise self.failure.exception()
            if time.monotonic() > deadline and not self.active():
                raise PeerTimeout(f"data channel {missing[0]} did not deliver the final pass")
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), 0.5)
            except TimeoutError:
                pass

    def close(self, stats: BatchStats) -> None:
        """Close every channel and stop its thread; what they received goes into ``stats``."""
        for lane in self.lanes.values():
            if lane.chan is not None:
                lane.chan.close()
            lane.thread.stop()
            stats.add(lane.stats)

    def bytes_received(self) -> int:
        return sum(lane.bytes for lane in self.lanes.values())

    def authenticated_frames(self) -> int:
        return sum(lane.chan.conn.authenticated_frames for lane in self.lanes.values() if lane.chan is not None)
