"""Postcopy: the guest moves to the destination before all its pages do.

At the switch the source pauses, sends the vCPU state and POSTCOPY: the
pages the destination does not hold as they now are (dirtied since they
were last sent).  The destination drops those pages (they fault through a
userfaultfd from now on), digests what it holds, and resumes the guest at
once.  Then the source sends the pages, those the destination asks for
(REQUEST, from a vCPU's fault) ahead of the rest, each exactly once, and
before each batch its table: per page, CRC-32s of its data and tags as the
paused source holds them.  Each page is checked against the table as it lands and
placed by the strategy (``place_postcopy``).  The source's guest stays
paused from the switch on: it is the only complete copy until the last page
has landed, and every page must equal it."""

import asyncio
import statistics
import time
from array import array

from hosts.constants import PACKED_TAGS_PER_PAGE, PAGE_SIZE
from migrate.checksum import crc32
from migrate.engine.bitmaps import runs
from migrate.engine.digest import CHUNK_PAGES, effective_tags
from migrate.engine.passes import peer_error
from migrate.errors import PeerTimeout, ProtocolError
from migrate.protocol import frames as fr
from migrate.protocol.compression import Decompressor

#: pages per background PAGES frame: a requested page waits behind at most
#: this much on the wire (plus what the socket already holds)
BACKGROUND_PAGES = 32
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
    """Sends the table and the missing pages, requested ones first."""

    def __init__(self, chan, builder, memory, ranges, pass_no: int, progress):
        self.chan = chan
        self.builder = builder
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
        self._asks: asyncio.Queue = asyncio.Queue()
        self.confirm = asyncio.get_running_loop().create_future()
        self.last_page_at: float | None = None

    async def run(self) -> None:
        reader = asyncio.ensure_future(self._read())
        try:
            cursor = 0
            while self.sent < self.total:
                if reader.done():
                    reader.result()  # the destination's error, or the link's
                    raise ProtocolError("the destination stopped asking in postcopy")
                asked = self._take_asks()
                if asked:
                    for batch in _split_ranges(asked, BACKGROUND_PAGES, BACKGROUND_PAGES):
                        await self._send(batch, paced=False)
                        self.requested_pages += sum(c for _, c in batch)
                    continue
                cursor = self.pending.find(1, cursor)
                if cursor < 0:
                    cursor = self.pending.find(1)
                    if cursor < 0:  # never spin: every page is accounted for or this is a bug
                        raise RuntimeError(f"postcopy: {self.total - self.sent} pages unaccounted for")
                end = self.pending.find(0, cursor, cursor + BACKGROUND_PAGES)
                end = min(cursor + BACKGROUND_PAGES, self.memory.npages) if end < 0 else end
                await self._send([(cursor, end - cursor)])
                await asyncio.sleep(0)  # let a REQUEST in between batches
            self.last_page_at = time.perf_counter()
            await self.chan.send(fr.PassEnd(self.pass_no, self.total))
            return await self._finish(reader)
        finally:
            if not reader.done():
                reader.cancel()
            elif not reader.cancelled():
                reader.exception()  # the same break as the send's: retrieved, not logged at exit

    def announced(self) -> bytearray:
        """1 per page announced at the switch."""
        out = bytearray(self.memory.npages)
        for first, count in self.ranges:
            out[first : first + count] = b"\x01" * count
        return out

    def resume(self, chan, missing) -> None:
        """Go on over ``chan`` (a recovery connection) with exactly the pages
        the destination says it still lacks: those in flight at the break
        go again, with their table entries."""
        self.chan = chan
        self.pending = bytearray(self.memory.npages)
        for first, count in missing:
            self.pending[first : first + count] = b"\x01" * count
        owed = self.pending.count(1)
        self.resent += max(0, owed - (self.total - self.sent))
        self.sent = self.total - owed
        self._asks = asyncio.Queue()  # asked on the old link: the destination asks again

    async def _finish(self, reader):
        """After the last page: the destination's CONFIRM (if not yet read)
        and its RESUMED: every page arrived and checked out.  A destination
        silent that long is a broken link (postcopy pauses), not a hang."""
        try:
            async with asyncio.timeout(2 * self.chan.timeout):
                return await reader
        except TimeoutError:
            raise PeerTimeout(f"no RESUMED {2 * self.chan.timeout:g} s after the last postcopy page") from None

    def _take_asks(self) -> list:
        """Requested pages not sent yet (a page asked twice, or already sent
        in the background, goes no second time)."""
        wanted = set()
        while not self._asks.empty():
            for first, count in self._asks.get_nowait():
                end = min(first + count, self.memory.npages)
                for a, b in runs(self.pending[first:end], 1):
                    wanted.update(range(first + a, first + b))
        # ascending, adjacent pages merged: a batch's ranges must be in order
        pages = sorted(wanted)
        out = []
        for p in pages:
            if out and out[-1][0] + out[-1][1] == p:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((p, 1))
        return out

    async def _send(self, ranges, paced: bool = True) -> None:
        """The pages' table entries, then the pages: a page asked for waits
        for its own entries only, not for a table of every missing page."""
        for first, count in ranges:
            self.pending[first : first + count] = bytes(count)
        await self.chan.send(fr.Postcopy(ranges, page_table(self.memory, ranges)), paced)
        frame, _ = self.builder.build(self.pass_no, ranges)
        await self.chan.send(frame, paced)
        self.sent += sum(c for _, c in ranges)
        self.progress.message(f"postcopy: {self.sent}/{self.total} pages") if self.sent == self.total else None

    async def announce(self) -> None:
        """The switch: every missing page, in as many frames as it takes;
        the destination resumes the guest at the last."""
        groups = list(_split_ranges(self.ranges, self.memory.npages, fr.Postcopy.MAX_RANGES)) or [[]]
        for i, group in enumerate(groups):
            await self.chan.send(fr.Postcopy(group, b"", last=i == len(groups) - 1))

    async def _read(self):
        """The destination's frames: REQUESTs, its CONFIRM, and RESUMED at the end."""
        while True:
            frame = await self.chan.recv(timeout=None)
            if frame.type == fr.FrameType.REQUEST:
                self.requests += 1
                self._asks.put_nowait(frame.ranges)
            elif frame.type == fr.FrameType.CONFIRM:
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
    page, placing and checking pages as they land, and the requests."""

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
        self.decompressor = Decompressor()
        self.resumed_at: float | None = None
        self.last_page_at: float | None = None
        self.wrong_before = 0  # the guest's wrong-tag count at the switch

    def add_table(self, frame) -> None:
        table = array("I")
        table.frombytes(frame.table)
        i = 0
        for first, count in frame.ranges:
            for p in range(first, first + count):
                self.expected[p] = (table[i], table[i + 1])
                i += 2

    def place(self, frame) -> int:
        """Check each page of a PAGES frame against the table, then place it
        for the guest; returns the pages placed."""
        flags = bytes(frame.flags)
        if flags.translate(_KEEP).find(1) >= 0:
            raise ProtocolError("a postcopy page must carry its data")
        ndata, ntags = flags.translate(_HAS_DATA).count(1), flags.translate(_HAS_TAGS).count(1)
        data = frame.data
        if frame.data_compressed:
            data = self.decompressor.decompress(data, ndata * PAGE_SIZE, "postcopy PAGES data")
        tags = frame.tags
        if frame.tags_compressed:
            tags = self.decompressor.decompress(tags, ntags * PACKED_TAGS_PER_PAGE, "postcopy PAGES tags")
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
            self.landed += count
        self.last_page_at = time.perf_counter()
        return i

    def _check(self, page: int, content, packed) -> None:
        want = self.expected.pop(page, None)
        if want is None:
            raise ProtocolError(f"postcopy page {page} was not announced, or came twice")
        if (crc32(content), crc32(packed)) != want:
            raise ProtocolError(
                f"postcopy page {page} differs from the paused source's (data or tags): corrupt, or the wrong page"
            )
        self.verified += 1

    def faulted(self) -> list:
        """Ranges of pages the guest waits for that were not asked for yet."""
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
            "requests": self.requests,
            "faults": uffd.faults,
            "fault_latency_ms": _percentiles(uffd.latencies),
            "last_page_ms": _ms(self.last_page_at - self.resumed_at) if self.last_page_at and self.resumed_at else None,
            "guest_wrong_tag_accesses": counters.get("guest.wrong_tag_accesses", 0),
            "guest_tag_checked_loads": counters.get("guest.tag_checked_loads", 0),
        }
