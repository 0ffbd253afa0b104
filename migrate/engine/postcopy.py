"""Postcopy: the guest moves to the destination before all its pages do.

At the switch the source pauses, sends the vCPU state and POSTCOPY: the
pages the destination does not hold as they now are (dirtied since they
were last sent).  The destination drops those pages (they fault through a
userfaultfd from now on), digests what it holds, and resumes the guest at
once.  Then the source sends the pages, each exactly once, and before each
batch its table: per page, CRC-32s of its data and tags as the paused
source holds them.  The pages a vCPU faults on are asked for (REQUEST) and
sent on a connection of their own, the fault channel, served on the
destination by a thread of its own: they never queue behind the background
stream, which fills the control connection's socket buffers.  Each page is checked against the table as it lands and
placed by the strategy (``place_postcopy``).  The source's guest stays
paused from the switch on: it is the only complete copy until the last page
has landed, and every page must equal it."""

import asyncio
import os
import queue
import select
import statistics
import threading
import time
from array import array

from hosts.constants import PACKED_TAGS_PER_PAGE, PAGE_SIZE
from migrate.checksum import crc32
from migrate.engine.bitmaps import merge_ranges, runs
from migrate.engine.digest import CHUNK_PAGES, effective_tags
from migrate.engine.passes import peer_error
from migrate.errors import MigrationError, PeerError, PeerTimeout, ProtocolError, TransportError, one_line
from migrate.net.blocking import BlockingFrames
from migrate.protocol import frames as fr
from migrate.protocol.compression import Decompressor
from migrate.protocol.frames import POSTCOPY_ENTRY

#: pages per background PAGES frame
BACKGROUND_PAGES = 32
#: bytes of the background stream the control connection's socket buffers
#: may hold on each side once postcopy starts.  A page the guest faults on
#: that was already sent in the background cannot be sent again (each page
#: goes once): it waits until the destination has worked through what is
#: queued ahead of it, so that queue is kept short -- at the cost of more,
#: smaller reads and writes of the background stream.
BACKGROUND_BACKLOG = 64 << 10
_ZERO_PAGE = bytes(PAGE_SIZE)
# per-page flag byte -> 1 where the page has that property (counted in bulk)
_HAS_DATA = bytes(0 if b & (fr.PAGE_ZERO | fr.PAGE_KEEP) else 1 for b in range(256))
_HAS_TAGS = bytes(1 if b & fr.PAGE_TAGS else 0 for b in range(256))
_KEEP = bytes(1 if b & fr.PAGE_KEEP else 0 for b in range(256))
_ZERO_TAGS = bytes(PACKED_TAGS_PER_PAGE)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def page_table(memory, ranges) -> bytes:
    """Per page of ``ranges``, in order: CRC-32 of its data and of its
    effective packed tags (zero for a page never tagged), read from the
    kernel's memory and tag storage, never through a strategy."""
    out = array("I")
    data = memory.data
    for first, count in ranges:
        tags = effective_tags(memory, first, first + count)
        for i in range(count):
            p = first + i
            out.append(crc32(data[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]))
            out.append(crc32(tags[i * PACKED_TAGS_PER_PAGE : (i + 1) * PACKED_TAGS_PER_PAGE]))
    return out.tobytes()


def _split_ranges(ranges, max_pages: int, max_ranges: int):
    """Groups of ranges of at most ``max_pages`` pages and ``max_ranges``
    ranges each (a range is cut where needed)."""
    group, pages = [], 0
    for first, count in ranges:
        while count:
            take = min(count, max_pages - pages)
            group.append((first, take))
            pages += take
            first, count = first + take, count - take
            if pages == max_pages or len(group) == max_ranges:
                yield group
                group, pages = [], 0
    if group:
        yield group


def announcements(ranges, npages: int) -> list:
    """POSTCOPY frames without a table naming ``ranges``, as many as it
    takes, ``last`` set on the final one."""
    groups = list(_split_ranges(ranges, npages, fr.Postcopy.MAX_RANGES)) or [[]]
    return [fr.Postcopy(group, b"", last=i == len(groups) - 1) for i, group in enumerate(groups)]


def mixed_chunks(ranges) -> set[int]:
    """Chunks that hold a page fetched in postcopy: their digests cannot be
    compared at the switch (those pages are checked one by one instead)."""
    out = set()
    for first, count in ranges:
        out.update(range(first // CHUNK_PAGES, (first + count - 1) // CHUNK_PAGES + 1))
    return out


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"p50": _ms(statistics.median(ordered)), "p99": _ms(p99), "max": _ms(ordered[-1])}


# -- source -----------------------------------------------------------------------------
class SourcePostcopy:
    """Sends the missing pages: the background stream on the control
    connection, the pages the destination asks for on the fault channel."""

    def __init__(self, chan, faults, builders, memory, ranges, pass_no: int, progress):
        self.chan = chan  # control: the background stream, CONFIRM and RESUMED
        self.faults = faults  # the fault channel: REQUESTs in, the pages they ask for out
        self.builder, self.fault_builder = builders  # one each: a frame may be in flight on both
        self.memory = memory
        self.ranges = ranges
        self.pass_no = pass_no
        self.progress = progress
        self.pending = bytearray(memory.npages)  # 1 = still to send
        for first, count in ranges:
            self.pending[first : first + count] = b"\x01" * count
        self.total = sum(c for _, c in ranges)
        self.sent = 0
        self.requested_pages = 0  # pages sent because the destination asked
        self.requests = 0
        self.resent = 0  # pages sent again after a broken link (postcopy_recovery)
        self._all_sent = asyncio.Event()
        if not self.total:
            self._all_sent.set()
        self.confirm = asyncio.get_running_loop().create_future()
        self.last_page_at: float | None = None

    async def run(self) -> None:
        reader = asyncio.ensure_future(self._read())
        tasks = (reader,)
        if self.faults is not None:  # none after a recovery that found every page there
            tasks += (asyncio.ensure_future(self._serve_requests()),)
        try:
            cursor = 0
            while True:
                self._check(tasks)
                cursor = self.pending.find(1, cursor)
                if cursor < 0:
                    cursor = self.pending.find(1)
                    if cursor < 0:
                        break  # every page handed out (asked-for ones may still be on their way)
                end = self.pending.find(0, cursor, cursor + BACKGROUND_PAGES)
                end = min(cursor + BACKGROUND_PAGES, self.memory.npages) if end < 0 else end
                await self._send(self.chan, self.builder, [(cursor, end - cursor)])
                await asyncio.sleep(0)  # let the fault channel's sends in between batches
            sent = asyncio.ensure_future(self._all_sent.wait())
            try:
                await asyncio.wait({sent, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sent.cancel()
            self._check(tasks)
            self.last_page_at = time.perf_counter()
            await self.chan.send(fr.PassEnd(self.pass_no, self.total))
            return await self._finish(reader)
        finally:
            for task in tasks:
                if task.done():
                    task.cancelled() or task.exception()  # seen: the break, or the fault channel closing at the end
                else:
                    task.cancel()

    @staticmethod
    def _check(tasks) -> None:
        """The reader and the request server run until the end: one that
        stopped raises the destination's error, or the link's."""
        for task in tasks:
            if task.done():
                task.result()
                raise ProtocolError("the destination stopped answering in postcopy")

    def announced(self) -> bytearray:
        """1 per page announced at the switch."""
        out = bytearray(self.memory.npages)
        for first, count in self.ranges:
            out[first : first + count] = b"\x01" * count
        return out

    def resume(self, chan, faults, missing) -> None:
        """Go on over ``chan`` (a recovery connection) and ``faults`` (a new
        fault channel) with exactly the pages the destination says it still
        lacks: those in flight at the break go again, with their table
        entries."""
        self.chan, self.faults = chan, faults
        self.pending = bytearray(self.memory.npages)
        for first, count in missing:
            self.pending[first : first + count] = b"\x01" * count
        owed = self.pending.count(1)
        self.resent += max(0, owed - (self.total - self.sent))
        self.sent = self.total - owed
        if owed:
            self._all_sent.clear()
        else:
            self._all_sent.set()

    async def _finish(self, reader):
        """After the last page: the destination's CONFIRM (if not yet read)
        and its RESUMED: every page arrived and checked out.  A destination
        silent that long is a broken link (postcopy pauses), not a hang."""
        try:
            async with asyncio.timeout(2 * self.chan.timeout):
                return await reader
        except TimeoutError:
            raise PeerTimeout(f"no RESUMED {2 * self.chan.timeout:g} s after the last postcopy page") from None

    def _unsent(self, ranges) -> list:
        """Of the pages asked for, those not sent yet (a page asked twice, or
        already sent in the background, goes no second time), ascending."""
        npages = self.memory.npages
        merged = merge_ranges((first, min(first + count, npages) - first) for first, count in ranges)
        return [(first + a, b - a) for first, count in merged for a, b in runs(self.pending[first : first + count], 1)]

    async def _serve_requests(self) -> None:
        """The fault channel: each REQUEST answered at once, on that channel."""
        while True:
            frame = await self.faults.recv(timeout=None)
            if frame.type == fr.FrameType.REQUEST:
                self.requests += 1
                for batch in _split_ranges(self._unsent(frame.ranges), BACKGROUND_PAGES, BACKGROUND_PAGES):
                    await self._send(self.faults, self.fault_builder, batch, paced=False)
                    self.requested_pages += sum(c for _, c in batch)
            elif frame.type in (fr.FrameType.ERROR, fr.FrameType.ABORT):
                raise peer_error(frame)
            else:
                raise ProtocolError(f"unexpected {frame.type.name} frame on the fault channel")

    async def _send(self, chan, builder, ranges, paced: bool = True) -> None:
        """The pages' table entries, then the pages: a page asked for waits
        for its own entries only, not for a table of every missing page.
        A paced batch waits for the link (--max-bandwidth, booked at its raw
        size) before its pages count as sent: a page the guest asks for
        meanwhile still goes on the fault channel, not behind the limiter."""
        npages = sum(c for _, c in ranges)
        if paced and chan.limiter is not None:
            await chan.limiter.wait(npages * (PAGE_SIZE + PACKED_TAGS_PER_PAGE + POSTCOPY_ENTRY))
            ranges = self._unsent(ranges)  # the fault channel may have taken some meanwhile
            if not ranges:
                return
        for first, count in ranges:
            self.pending[first : first + count] = bytes(count)
        await chan.send(fr.Postcopy(ranges, page_table(self.memory, ranges)), paced=False)
        frame, _ = builder.build(self.pass_no, ranges)
        await chan.send(frame, paced=False)
        self.sent += sum(c for _, c in ranges)
        if self.sent == self.total:
            self._all_sent.set()
            self.progress.message(f"postcopy: {self.sent}/{self.total} pages")

    async def announce(self) -> None:
        """The switch: every missing page, in as many frames as it takes;
        the destination resumes the guest at the last."""
        for frame in announcements(self.ranges, self.memory.npages):
            await self.chan.send(frame)

    async def _read(self):
        """The destination's frames on the control connection: its CONFIRM,
        and RESUMED at the end."""
        while True:
            frame = await self.chan.recv(timeout=None)
            if frame.type == fr.FrameType.CONFIRM:
                if not self.confirm.done():
                    self.confirm.set_result(frame)
            elif frame.type == fr.FrameType.RESUMED:
                return frame
            elif frame.type in (fr.FrameType.ERROR, fr.FrameType.ABORT):
                raise peer_error(frame)
            else:
                raise ProtocolError(f"unexpected {frame.type.name} frame in postcopy")


# -- destination --------------------------------------------------------------------------
class DestPostcopy:
    """The destination's side after POSTCOPY: expected CRCs per missing
    page, placing and checking pages as they land (from the event loop and
    the fault channel's thread), and the requests."""

    def __init__(self, host, strategy, uffd, ranges):
        self.host = host
        self.strategy = strategy
        self.uffd = uffd
        self.ranges = ranges
        self.total = sum(c for _, c in ranges)
        self.expected: dict[int, tuple[int, int]] = {}
        self.landed = 0
        self.verified = 0
        self.requests = 0
        self.requested: set[int] = set()
        self.decompressor = Decompressor()  # the event loop's; the fault channel has its own
        self.resumed_at: float | None = None
        self.last_page_at: float | None = None
        self.wrong_before = 0  # the guest's wrong-tag count at the switch
        self.discarded_at_switch = 0  # pages discarded during the switch (not ahead of it)
        self.on_complete = None  # called (from either thread) once the last page has landed
        self._owed = bytearray(host.memory.npages)  # 1: announced at the switch, not landed yet
        for first, count in ranges:
            self._owed[first : first + count] = b"\x01" * count
        self._count_lock = threading.Lock()  # two threads place pages: their counts add up here

    def add_table(self, frame) -> None:
        """A batch's table: only pages announced at the switch and not
        landed yet may have an entry (placing any other would overwrite a
        page the guest already uses)."""
        owed = self._owed
        for first, count in frame.ranges:
            bad = owed.find(0, first, first + count)
            if bad >= 0:
                raise ProtocolError(f"POSTCOPY table for page {bad}, which was not announced or has landed already")
        table = array("I")
        table.frombytes(frame.table)
        i = 0
        for first, count in frame.ranges:
            for p in range(first, first + count):
                self.expected[p] = (table[i], table[i + 1])
                i += 2

    def place(self, frame, decompressor=None) -> int:
        """Check each page of a PAGES frame against the table, then place it
        for the guest; returns the pages placed.  Safe from two threads: the
        source sends each page once, on one channel, after its table entry."""
        decompressor = decompressor or self.decompressor
        flags = bytes(frame.flags)
        if flags.translate(_KEEP).find(1) >= 0:
            raise ProtocolError("a postcopy page must carry its data")
        ndata, ntags = flags.translate(_HAS_DATA).count(1), flags.translate(_HAS_TAGS).count(1)
        data = frame.data
        if frame.data_compressed:
            data = decompressor.decompress(data, ndata * PAGE_SIZE, "postcopy PAGES data")
        tags = frame.tags
        if frame.tags_compressed:
            tags = decompressor.decompress(tags, ntags * PACKED_TAGS_PER_PAGE, "postcopy PAGES tags")
        if len(data) != ndata * PAGE_SIZE or len(tags) != ntags * PACKED_TAGS_PER_PAGE:
            raise ProtocolError("postcopy PAGES frame: payload lengths do not match its flags")
        data, tags = memoryview(data), memoryview(tags)
        d = t = i = 0
        for first, count in frame.ranges:
            contents, packs = [], []
            for page in range(first, first + count):
                f = flags[i]
                i += 1
                if f & fr.PAGE_ZERO:
                    content = _ZERO_PAGE
                else:
                    content = data[d * PAGE_SIZE : (d + 1) * PAGE_SIZE]
                    d += 1
                if f & fr.PAGE_TAGS:
                    packed = tags[t * PACKED_TAGS_PER_PAGE : (t + 1) * PACKED_TAGS_PER_PAGE]
                    t += 1
                else:
                    packed = _ZERO_TAGS
                self._check(page, content, packed)
                contents.append(content)
                packs.append(packed)
            # one placement per run of pages: a system call each, not one a page
            self.strategy.place_postcopy(self.uffd, first, b"".join(contents), b"".join(packs))
            self._owed[first : first + count] = bytes(count)
            with self._count_lock:
                self.landed += count
                self.verified += count
                done = self.landed == self.total
            if done:
                self.last_page_at = time.perf_counter()
                if self.on_complete is not None:
                    self.on_complete()
        return i

    def _check(self, page: int, content, packed) -> None:
        want = self.expected.pop(page, None)
        if want is None:
            raise ProtocolError(f"postcopy page {page} was not announced, or came twice")
        if (crc32(content), crc32(packed)) != want:
            raise ProtocolError(
                f"postcopy page {page} differs from the paused source's (data or tags): corrupt, or the wrong page"
            )

    def faulted(self) -> list:
        """Ranges of pages the guest waits for that were not asked for yet
        (called on the fault channel's thread only)."""
        present = self.uffd.present  # (its table may not be here yet: ask all the same)
        pages = [p for p in self.uffd.read_events() if p not in self.requested and not present[p]]
        self.requested.update(pages)
        return [(p, 1) for p in sorted(set(pages))]

    def missing(self) -> list:
        """Ranges of announced pages not placed yet (in flight at a break
        included): what the source must send again."""
        present = self.uffd.present
        out = []
        for first, count in self.ranges:
            for a, b in runs(present[first : first + count], 0):
                out.append((first + a, b - a))
        return out

    def waiting(self, missing) -> list:
        """Of ``missing``, the pages the guest asked for: asked again first."""
        out = []
        for first, count in missing:
            out += [(p, 1) for p in range(first, first + count) if p in self.requested]
        return out

    @property
    def complete(self) -> bool:
        return self.landed == self.total

    def report(self, counters: dict) -> dict:
        uffd = self.uffd
        return {
            "pages": self.total,
            "pages_verified": self.verified,
            "pages_discarded_at_switch": self.discarded_at_switch,
            "requests": self.requests,
            "faults": uffd.faults,
            "fault_latency_ms": _percentiles(uffd.latencies),
            "last_page_ms": _ms(self.last_page_at - self.resumed_at) if self.last_page_at and self.resumed_at else None,
            "guest_wrong_tag_accesses": counters.get("guest.wrong_tag_accesses", 0),
            "guest_tag_checked_loads": counters.get("guest.tag_checked_loads", 0),
        }


class DestFaultChannel:
    """The destination's end of the fault channel, on a thread of its own:
    it polls the userfaultfd and the connection, asks the source for the
    pages that faulted and places them as they come back, while the event
    loop works through the background stream.  No event loop of its own
    (net/blocking.py says why).  Until the switch it only holds the
    connection."""

    def __init__(self, sock, conn, io, timeout_s: float):
        self._stop_r, self._stop_w = os.pipe()  # wakes the thread's polls to end it
        self.frames = BlockingFrames(sock, conn, io, timeout_s, stop_fd=self._stop_r)
        self._conn = conn
        self.closing = False  # the migration is over: the source's close is no failure
        self.failure: asyncio.Future | None = None  # set by start()
        # The thread starts now, not at the switch: starting one waits for
        # it to get the interpreter lock, up to 5 ms of downtime.
        self._handed: queue.SimpleQueue = queue.SimpleQueue()  # (pc, report), or None to end
        self._thread = threading.Thread(target=self._run, name="faults", daemon=True)
        self._thread.start()

    def start(self, pc: DestPostcopy) -> None:
        """Serve ``pc``'s faults; ``failure`` (a future of the caller's loop)
        gets the channel's error if it fails."""
        main_loop = asyncio.get_running_loop()
        self.failure = main_loop.create_future()
        self.failure.add_done_callback(lambda f: f.cancelled() or f.exception())  # read when it matters

        def failed(exc):
            if not self.failure.done():
                self.failure.set_exception(exc)

        def report(exc):  # from the fault thread
            main_loop.call_soon_threadsafe(failed, exc)

        self._handed.put((pc, report))

    def _run(self) -> None:
        handed = self._handed.get()
        if handed is None:
            self.frames.close()
        else:
            self._serve(*handed)

    def _serve(self, pc: DestPostcopy, failed) -> None:
        frames, uffd = self.frames, pc.uffd.fileno()
        poller = select.poll()
        for fd in (self._stop_r, uffd, frames.fileno()):
            poller.register(fd, select.POLLIN)
        decompressor = Decompressor()
        try:
            # A fault channel that replaces a broken one asks again first for
            # the pages the guest was waiting for when the link broke.
            if pc.requested:
                self._ask(pc, pc.waiting(pc.missing()))
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self._stop_r in ready:
                    return
                if uffd in ready:  # the asking first: the answers can wait a poll
                    self._ask(pc, pc.faulted())
                if frames.fileno() in ready:
                    for frame in frames.frames():
                        self._on_frame(pc, frame, decompressor)
        except TransportError as exc:
            if not self.closing and not pc.complete:
                failed(exc)
        except MigrationError as exc:
            failed(exc)
        except Exception as exc:  # a bug: fail the migration, never hang a vCPU
            failed(MigrationError(f"internal error on the fault channel: {type(exc).__name__}: {one_line(exc)}"))
        finally:
            frames.close()

    @staticmethod
    def _on_frame(pc: DestPostcopy, frame, decompressor) -> None:
        if frame.type == fr.FrameType.POSTCOPY:
            if not frame.table and frame.ranges:
                raise ProtocolError("a POSTCOPY announcement on the fault channel")
            pc.add_table(frame)
        elif frame.type == fr.FrameType.PAGES:
            pc.place(frame, decompressor)
        elif frame.type == fr.FrameType.ERROR:
            raise PeerError(f"source: {frame.message}", frame.code)
        else:
            raise ProtocolError(f"unexpected {frame.type.name} frame on the fault channel")

    def _ask(self, pc: DestPostcopy, ranges) -> None:
        for i in range(0, len(ranges), fr.Request.MAX_RANGES):
            pc.requests += 1
            self.frames.send(fr.Request(ranges[i : i + fr.Request.MAX_RANGES]))

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self._handed.put(None)  # ends a thread never handed a postcopy
        os.write(self._stop_w, b"\x01")  # and one serving, or sending
        self._thread.join(timeout=5)
        if not self._thread.is_alive():  # (else it still polls them: leave them to the process's end)
            for fd in (self._stop_r, self._stop_w):
                os.close(fd)

    @property
    def bytes_received(self) -> int:
        return self.frames.bytes_received

    @property
    def authenticated_frames(self) -> int:
        return self._conn.authenticated_frames
