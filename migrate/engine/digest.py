"""Digests of guest memory and tags, read straight from the simulated
kernel's storage -- never through a tag strategy -- for validation.

RAM is cut into 1 MiB chunks (256 pages).  A chunk's data CRC is the plain
CRC-32 of its bytes: read in place through the kernel's mapping when every
page of the chunk is populated, with pread() otherwise so that
never-populated pages read as zeros without being populated (a load through
the mapping would allocate them); a chunk with no data at all is not read.

Two ways to the same value.  A digest taken once over frozen memory (the
source's, after the pause) CRCs each chunk in one call: 1,024 calls a GiB,
where 16 KiB pieces took 65,536 and twice the time.  A digest kept up to
date while pages are written (the destination's, or the source's with
--validate tracked) keeps the CRCs of each chunk's 16 KiB pieces (4 pages)
as well and joins them with crc32_concat, so a page written since the chunk
was read costs a 16 KiB read at the next refresh, not 1 MiB: a guest that
writes all over RAM leaves some pages dirty in every chunk.  A chunk's tag
CRC covers its *effective* tags: packed storage for pages marked tagged,
zeros for the rest (FROM_GUEST semantics); tags are 1/32 of the data, so
they stay per chunk.  The digest is sha256 over the per-chunk CRCs, so two
hosts agree exactly when every chunk does, and the chunk CRCs say where they
differ.
"""

import functools
import hashlib
import itertools
import threading
from array import array
from concurrent.futures import ThreadPoolExecutor

from hosts.constants import PACKED_TAGS_PER_PAGE, PAGE_SIZE
from migrate.checksum import crc32, crc32_concat, crc32_swap, swap_needs_tables
from migrate.engine.bitmaps import runs

CHUNK_PAGES = 256
#: granularity of an incremental digest's re-reads; 16 KiB also keeps each
#: CRC call above the size at which zlib and zlib-ng release the GIL (5 KiB)
PIECE_PAGES = 4
PIECES_PER_CHUNK = CHUNK_PAGES // PIECE_PAGES
PIECE_BYTES = PIECE_PAGES * PAGE_SIZE
_LAST_PIECE = PIECES_PER_CHUNK - 1
_ZERO_CHUNK = bytes(CHUNK_PAGES * PAGE_SIZE)
_NO_STALE_PIECES = bytes(PIECES_PER_CHUNK)
_LOCAL = threading.local()


def _chunk_buffer() -> memoryview:
    """A reused 1 MiB buffer per thread (digests run in several threads)."""
    buf = getattr(_LOCAL, "buf", None)
    if buf is None:
        buf = _LOCAL.buf = memoryview(bytearray(CHUNK_PAGES * PAGE_SIZE))
    return buf


_ZERO_TAGS = bytes(CHUNK_PAGES * PACKED_TAGS_PER_PAGE)


@functools.lru_cache(maxsize=64)
def _zero_crc(npages: int, per_page: int = PAGE_SIZE) -> int:
    """CRC of ``npages`` pages of zeros (computed once per size)."""
    return crc32(bytes(npages * per_page))


@functools.lru_cache(maxsize=8)
def zero_pieces(npages: int) -> array:
    """Piece CRCs of ``npages`` (at most a chunk) pages of zeros."""
    return piece_crcs(_ZERO_CHUNK[: npages * PAGE_SIZE])


@functools.lru_cache(maxsize=8)
def zero_chunk_crc(npages: int) -> int:
    return _zero_crc(npages)


def chunk_count(npages: int) -> int:
    return -(-npages // CHUNK_PAGES)


def piece_crcs(content) -> array:
    """The piece CRCs of a chunk's bytes (the last piece may be short)."""
    view = memoryview(content).cast("B")
    return array("I", [crc32(view[o : o + PIECE_BYTES]) for o in range(0, len(view), PIECE_BYTES)])


_TABLES_READY = False


def prepare_piece_tables() -> None:
    """Build the look-up tables that join and update piece CRCs (~70 ms,
    once a process).  Called by the first refresh of a running guest's
    memory, in the background, so that the first use is not inside the
    downtime; a migration that never re-reads a piece never builds them."""
    global _TABLES_READY
    if not _TABLES_READY:  # (two threads may both build them: each gets whole tables)
        chunk_crc(zero_pieces(CHUNK_PAGES))
        if swap_needs_tables():
            crc32_swap(0, 0, 0, PIECE_BYTES, _LAST_PIECE)
        _TABLES_READY = True


_TABLES_STARTED = threading.Event()


def prepare_piece_tables_soon() -> None:
    """prepare_piece_tables in a thread of its own, once a process: called
    when a guest is seen to write again (a dirty pass arrives), so that the
    swap tables are ready before the final digest swaps piece CRCs.  With
    zlib-ng a swap is one library call and nothing is built: 68 ms of pure
    Python that, started by the first dirty pass, ran into the downtime."""
    if swap_needs_tables() and not _TABLES_STARTED.is_set():
        _TABLES_STARTED.set()
        threading.Thread(target=prepare_piece_tables, name="piece-tables", daemon=True).start()


def chunk_crc(pieces, nbytes: int = CHUNK_PAGES * PAGE_SIZE) -> int:
    """A chunk's data CRC -- the CRC-32 of its ``nbytes`` bytes -- from its
    piece CRCs, without reading the bytes again (the last piece of a short
    chunk may be short)."""
    return crc32_concat(pieces, PIECE_BYTES, nbytes - (len(pieces) - 1) * PIECE_BYTES)


class MemoryDigest:
    """Per-chunk CRCs of one guest's RAM and tags.

    With ``pieces`` (the default) it keeps per-piece data CRCs too, and can
    be kept up to date incrementally by a writer that knows what it wrote:
    ``mark_stale`` after each write, ``refresh`` in the background, and at
    completion only the pieces written since are read again.  Stale flags
    are cleared before a CRC is computed, so a write that lands during the
    computation marks it stale again.  Without ``pieces`` each chunk is
    CRC'd in one call and a stale chunk is read whole: for a digest taken
    once, over frozen memory."""

    def __init__(self, memory, chunks: list[int] | None = None, compute: bool = True, pieces: bool = True):
        self.memory = memory
        self.nchunks = chunk_count(memory.npages)
        self.keeps_pieces = pieces
        self.data_crcs = array("I", [0]) * self.nchunks
        self.tag_crcs = array("I", [0]) * self.nchunks
        self.piece_crcs = array("I", [0]) * (self.nchunks * PIECES_PER_CHUNK if pieces else 0)
        self.unread = bytearray(b"\x01") * self.nchunks  # never read yet
        self.stale = bytearray(self.nchunks)  # written since read: some piece, and the tags
        self.piece_stale = bytearray(self.nchunks * PIECES_PER_CHUNK)  # which pieces
        #: chunks whose CRC was taken in one call and whose piece CRCs are
        #: not kept: a write there makes the next refresh read it whole
        self.pieces_unknown = bytearray(self.nchunks)
        self.tags_stale = bytearray(self.nchunks)  # tags only
        #: with remember_tagged(): PG_mte_tagged as it was when each chunk's
        #: tags were last read, to find the flags that changed since
        self._tagged_seen: bytearray | None = None
        # A result computed while set_data() stored a newer one is dropped:
        # set_data bumps the chunk's generation.
        self._gen = array("I", [0]) * self.nchunks
        #: how many times each chunk was marked stale: a caller that read a
        #: chunk itself (set_chunk_crc) may clear its stale flags only if no
        #: mark came after it began to read
        self._marks = array("I", [0]) * self.nchunks
        self._lock = threading.Lock()
        #: bytes of RAM read so far (holes settled or skipped are not read)
        self.bytes_read = 0
        if compute:
            self.refresh(range(self.nchunks) if chunks is None else chunks)

    def refresh_parallel(self, workers: int = 2, frozen: bool = False) -> None:
        """Recompute the stale chunks in ``workers`` threads, the calling
        one among them (see refresh); blocks, so call it in a thread of its
        own.  Nothing here waits for an event loop: a source that starts it
        at the pause reads from then on, while its loop builds the final
        pass (through the loop, each step waited for that: the reading began
        20 ms into the downtime).  Frozen, which pages hold memory is asked
        once, of mincore() for all of RAM, and serves every chunk."""
        stale = self.pending_chunks()
        resident = self.memory.resident_pages() if frozen and stale else None
        if frozen and self.unread.find(1) >= 0:  # only chunks never read can be holes worth settling
            never_read = [c for c in stale if self.unread[c]]
            settled = set(never_read).difference(self._settle_holes(never_read, resident))
            stale = [c for c in stale if c not in settled]
        if not stale:
            return
        if workers < 2 or not self._mostly_whole(stale):
            # Stale pieces are 16 KiB CRC calls, and two threads making them
            # take turns on the GIL at every call: 850 chunks' pieces took 41
            # ms and 49 ms of CPU in two threads, 14-23 ms in one.
            self.refresh(stale, frozen, resident)
            return
        with ThreadPoolExecutor(workers - 1, thread_name_prefix="digest") as pool:
            others = [pool.submit(self.refresh, stale[i::workers], frozen, resident) for i in range(1, workers)]
            self.refresh(stale[::workers], frozen, resident)
            for job in others:
                job.result()

    def _mostly_whole(self, chunks: list[int]) -> bool:
        """Whether a quarter or more of ``chunks`` would be read whole (1 MiB
        calls, long enough for threads to share the work) rather than in
        their stale pieces or tags alone."""
        whole = sum(
            1 for c in chunks if self.unread[c] or (self.stale[c] and (not self.keeps_pieces or self.pieces_unknown[c]))
        )
        return 4 * whole >= len(chunks)

    def _settle_holes(self, chunks: list[int], resident: bytes | None = None) -> list[int]:
        """Frozen memory: a chunk none of whose pages was ever populated reads
        as zeros.  Settle such chunks (without a tagged page) in bulk -- slice
        assignments per run, not a refresh per chunk in threads that take
        turns on the GIL (a 16 GiB guest 5 % populated has 15,000 of them);
        returns the chunks left to read.  A chunk that ``resident`` (one
        mincore() over RAM) shows all in memory holds data; each other one
        is asked of SEEK_DATA, one call standing for every chunk up to the
        data it finds.  No SEEK_HOLE: it scans populated RAM up to the next
        hole, the end of a fully populated guest (50 ms a GiB here)."""
        mem, n = self.memory, self.nchunks
        whole = mem.npages // CHUNK_PAGES  # a short last chunk is read as usual
        settle = bytearray(n)
        asked, no_data_below = 0, 0  # no page in [asked, no_data_below) holds data
        for c in chunks:
            first, end = c * CHUNK_PAGES, (c + 1) * CHUNK_PAGES
            if c >= whole or (resident is not None and resident.find(0, first, end) < 0):
                continue
            if mem.tagged.find(1, first, end) >= 0:  # tags on pages without data: read as usual
                continue
            if not asked <= first < end <= no_data_below:
                asked, no_data_below = first, mem.next_data(first)
            settle[c] = end <= no_data_below
        zero_data, zero_tags = zero_chunk_crc(CHUNK_PAGES), _zero_crc(CHUNK_PAGES, PACKED_TAGS_PER_PAGE)
        for ca, cb in runs(bytes(settle)):
            k, pa, pb = cb - ca, ca * PIECES_PER_CHUNK, cb * PIECES_PER_CHUNK
            with self._lock:
                self.data_crcs[ca:cb] = array("I", [zero_data]) * k
                self.tag_crcs[ca:cb] = array("I", [zero_tags]) * k
                if self.keeps_pieces:
                    self.piece_crcs[pa:pb] = zero_pieces(CHUNK_PAGES) * k
                self.piece_stale[pa:pb] = bytes(pb - pa)
                self.pieces_unknown[ca:cb] = bytes(k)
                for flags in (self.stale, self.tags_stale, self.unread):
                    flags[ca:cb] = bytes(k)
        return [c for c in chunks if not settle[c]]

    def _maps(self, unread: bool):
        return (self.stale, self.tags_stale, self.unread) if unread else (self.stale, self.tags_stale)

    def pending(self, unread: bool = True) -> bool:
        """Whether some chunk is to be read (again); ``unread=False`` leaves
        out chunks never read, e.g. a destination's RAM nothing has reached
        yet, so that they are read once, at the end, not also before."""
        return any(bits.find(1) >= 0 for bits in self._maps(unread))

    def pending_chunks(self, limit: int | None = None, unread: bool = True) -> list[int]:
        """Chunks to read (again), in order (the first ``limit`` of them)."""
        found = set()
        for bits in self._maps(unread):
            pos, n = bits.find(1), 0
            while pos >= 0 and (limit is None or n < limit):
                found.add(pos)
                n += 1
                pos = bits.find(1, pos + 1)
        return sorted(found)[:limit]

    def stale_piece_bytes(self) -> int:
        """Bytes of the stale pieces of chunks read before: what a refresh
        reads again (a chunk never read is read whole, if it holds data; so
        is a stale one when this digest keeps no pieces)."""
        again = [c for c in range(self.nchunks) if self.stale[c] and not self.unread[c]]
        if not self.keeps_pieces:
            return len(again) * CHUNK_PAGES * PAGE_SIZE
        whole = [c for c in again if self.pieces_unknown[c]]
        return len(whole) * CHUNK_PAGES * PAGE_SIZE + (
            sum(
                self.piece_stale.count(1, c * PIECES_PER_CHUNK, (c + 1) * PIECES_PER_CHUNK)
                for c in again
                if not self.pieces_unknown[c]
            )
            * PIECE_BYTES
        )

    def invalidate(self) -> None:
        """Forget every CRC: all chunks are read again."""
        with self._lock:
            self.unread[:] = b"\x01" * self.nchunks
            self._marks = array("I", (m + 1 for m in self._marks))

    def mark_stale(self, first_page: int, end_page: int) -> None:
        # Under the lock: refresh() takes a chunk's stale pieces and clears
        # them in one step, and a mark landing in between would be lost.
        if end_page - first_page == 1:  # a dirty pass's scattered pages: no slices to build
            c = first_page // CHUNK_PAGES
            with self._lock:
                self.piece_stale[first_page // PIECE_PAGES] = self.stale[c] = 1
                self._marks[c] += 1
            return
        a, b = first_page // CHUNK_PAGES, -(-end_page // CHUNK_PAGES)
        pa, pb = first_page // PIECE_PAGES, -(-end_page // PIECE_PAGES)
        with self._lock:
            self.piece_stale[pa:pb] = b"\x01" * (pb - pa)
            self.stale[a:b] = b"\x01" * (b - a)
            for c in range(a, min(b, self.nchunks)):
                self._marks[c] += 1

    def marks_of(self, first_chunk: int, count: int) -> array:
        """The stale-mark counts of ``count`` chunks, taken by a caller
        before it reads them, for set_chunk_crc(marks=...)."""
        with self._lock:
            return self._marks[first_chunk : first_chunk + count]

    def mark_tags_stale(self, first_page: int, end_page: int) -> None:
        """The tags of these pages changed: read them again, in chunks read
        before (a chunk never read is read whole, its tags with it)."""
        a, b = first_page // CHUNK_PAGES, -(-end_page // CHUNK_PAGES)
        with self._lock:
            for c in range(a, min(b, self.nchunks)):
                if not self.unread[c]:
                    self.tags_stale[c] = 1

    def remember_tagged(self) -> None:
        """Keep PG_mte_tagged as each chunk's tags are read, for
        mark_tags_stale_where_flags_changed (a watch over the tag storage
        sees tag stores, not the flag, which lives elsewhere)."""
        self._tagged_seen = bytearray(self.memory.npages)

    def mark_tags_stale_where_flags_changed(self) -> None:
        """Chunks read before whose PG_mte_tagged flags differ from those
        their tags were read with: read their tags again."""
        seen, now = self._tagged_seen, self.memory.tagged
        if seen == now:
            return
        with self._lock:
            for c in range(self.nchunks):
                a, b = c * CHUNK_PAGES, (c + 1) * CHUNK_PAGES
                if not self.unread[c] and seen[a:b] != now[a:b]:
                    self.tags_stale[c] = 1

    def mark_all_tags_stale(self) -> None:
        """Read every chunk's tags again at the next refresh (RAM/32 bytes:
        a write watch sees data stores, not tag stores or PG_mte_tagged)."""
        with self._lock:
            self.tags_stale[:] = b"\x01" * self.nchunks

    def set_data(self, chunk: int, pieces: array, tags_changed: bool) -> int:
        """Record a chunk's piece CRCs computed by the caller from this
        memory (the source from its snapshot of a whole chunk, the
        destination right after landing one); its tags are read again later
        if they changed.  Returns the chunk's CRC."""
        first, end = self._chunk_bounds(chunk)
        p, crc = chunk * PIECES_PER_CHUNK, chunk_crc(pieces, (end - first) * PAGE_SIZE)
        with self._lock:
            self._gen[chunk] += 1
            if self.keeps_pieces:
                self.piece_crcs[p : p + len(pieces)] = pieces
            self.data_crcs[chunk] = crc
            self.piece_stale[p : p + PIECES_PER_CHUNK] = _NO_STALE_PIECES
            self.stale[chunk] = self.unread[chunk] = self.pieces_unknown[chunk] = 0
            if tags_changed:
                self.tags_stale[chunk] = 1
        return crc

    def set_chunk_crc(
        self, chunk: int, crc: int, tags: str, pieces: array | None = None, marks: int | None = None
    ) -> None:
        """Record a chunk's CRC taken by the caller in one call over this
        memory (the destination right after landing a whole chunk) -- no
        join of piece CRCs, so no join tables -- and its ``pieces`` when the
        caller took them too.  Without them, a chunk written later is read
        whole at its next refresh (1 MiB where a piece is 16 KiB: in a
        guest that dirties most chunks, the final digest then reads most of
        RAM inside the downtime).  ``tags``: "now" reads the chunk's tag CRC
        here (the caller has just stored them: no background refresh a
        chunk for its tags alone), "later" leaves them to a refresh.
        ``marks``: the chunk's count from marks_of(), taken before the
        caller began to read it while the memory could be written (the
        source's bulk pass); if a mark came since, the write it stands for
        may be newer than ``crc``, so the chunk stays stale and is read
        again whole (its stale flags may already have been taken by a
        refresh whose result this replaces)."""
        p = chunk * PIECES_PER_CHUNK
        tag_crc = self._tag_crc(chunk) if tags == "now" else None
        with self._lock:
            written_since = marks is not None and self._marks[chunk] != marks
            self._gen[chunk] += 1
            self.data_crcs[chunk] = crc
            self.piece_stale[p : p + PIECES_PER_CHUNK] = _NO_STALE_PIECES
            self.unread[chunk] = 0
            self.stale[chunk] = written_since
            if pieces is not None and self.keeps_pieces:
                self.piece_crcs[p : p + len(pieces)] = pieces
            self.pieces_unknown[chunk] = pieces is None or written_since
            if tag_crc is None:
                self.tags_stale[chunk] = 1
            else:
                self.tag_crcs[chunk] = tag_crc
                self.tags_stale[chunk] = 0

    def refresh(
        self, chunks=None, frozen: bool = False, resident: bytes | None = None, stop: threading.Event | None = None
    ) -> int:
        """Recompute ``chunks`` (default: the stale ones); returns how many.
        A chunk read before is read again only in its stale pieces.
        ``frozen``: nothing writes this RAM meanwhile (a paused guest, a
        destination after the last pass), so one SEEK_DATA that finds no data
        up to some page stands for every chunk before it (in ascending order):
        a sparse 16 GiB guest is read with a few system calls, not 16,384.
        ``resident``: resident_pages() of all RAM, taken while frozen, so that
        no chunk asks mincore() again.  ``stop``: once set, the chunks not
        started yet are left stale (for a later refresh)."""
        if chunks is None:
            chunks = self.pending_chunks()
        hole_end = -1  # with frozen: no page below this holds data
        done = 0
        for c in chunks:
            if stop is not None and stop.is_set():
                break
            done += 1
            p = c * PIECES_PER_CHUNK
            with self._lock:
                gen = self._gen[c]
                if self.unread[c] or not (self.stale[c] or self.tags_stale[c]):
                    which = None  # every piece
                elif self.stale[c]:
                    known = self.keeps_pieces and not self.pieces_unknown[c]
                    which = bytes(self.piece_stale[p : p + PIECES_PER_CHUNK]) if known else None
                else:
                    which = b""  # the tags only
                if self.stale[c]:
                    self.piece_stale[p : p + PIECES_PER_CHUNK] = _NO_STALE_PIECES
                self.stale[c] = self.tags_stale[c] = self.unread[c] = 0
            first, end = self._chunk_bounds(c)
            pieces, data_crc = None, None  # new piece CRCs (array, or dict of some), the chunk's CRC
            if which != b"" and self.keeps_pieces and not frozen:
                prepare_piece_tables()  # a running guest's memory: pieces are joined and swapped from now on
            if which is None:
                if frozen and end <= hole_end:
                    data_crc = zero_chunk_crc(end - first)
                    pieces = zero_pieces(end - first) if self.keeps_pieces else None
                else:
                    pieces, data_crc, next_data = self._read_chunk(c, frozen, resident)
                    if frozen and next_data is not None:
                        hole_end = next_data
            elif which:
                pieces = self._stale_pieces(c, which)
            if self._tagged_seen is not None:  # before the CRC: a change after it shows
                self._tagged_seen[first:end] = self.memory.tagged[first:end]
            tag_crc = self._tag_crc(c)
            with self._lock:
                if self._gen[c] == gen:
                    if isinstance(pieces, dict) and end - first == CHUNK_PAGES:
                        # Only some pieces changed: update the chunk's CRC
                        # from their old and new CRCs (a few look-ups each).
                        data_crc = self.data_crcs[c]
                        for i, crc in pieces.items():
                            data_crc = crc32_swap(data_crc, self.piece_crcs[p + i], crc, PIECE_BYTES, _LAST_PIECE - i)
                            self.piece_crcs[p + i] = crc
                    elif isinstance(pieces, dict):  # a short last chunk: join them all
                        for i, crc in pieces.items():
                            self.piece_crcs[p + i] = crc
                        n = -(-(end - first) // PIECE_PAGES)
                        data_crc = chunk_crc(self.piece_crcs[p : p + n], (end - first) * PAGE_SIZE)
                    elif pieces is not None:
                        self.piece_crcs[p : p + len(pieces)] = pieces
                        self.pieces_unknown[c] = 0
                    elif data_crc is not None and self.keeps_pieces:
                        self.pieces_unknown[c] = 1  # read frozen, in one call
                    if data_crc is not None:
                        self.data_crcs[c] = data_crc
                    self.tag_crcs[c] = tag_crc
                else:  # set_data() stored newer data meanwhile: keep it, and read the tags again
                    self.tags_stale[c] = 1
        return done

    def _chunk_bounds(self, chunk: int) -> tuple[int, int]:
        first = chunk * CHUNK_PAGES
        return first, min(first + CHUNK_PAGES, self.memory.npages)

    def _readable(self, first: int, end: int, frozen: bool, resident: bytes | None = None) -> bool:
        """Whether the chunk can be read in place through the mapping (every
        page populated).  mincore first: unlike lseek it does not wait for
        the inode lock that a concurrent pwrite into this RAM holds."""
        mem = self.memory
        if resident is not None:
            return resident.find(0, first, end) < 0
        return mem.all_resident(first, end) or (not frozen and mem.fully_populated(first, end))

    def _read_chunk(
        self, chunk: int, frozen: bool = False, resident: bytes | None = None
    ) -> tuple[array | None, int, int | None]:
        """(piece CRCs of the chunk's bytes, or None when this digest keeps
        none; the chunk's CRC; the first page holding data at or after the
        chunk when that was asked of the file, else None).  Frozen, a chunk
        only allocated ahead (prefault) is asked of SEEK_DATA before it is
        read."""
        first, end = self._chunk_bounds(chunk)
        mem, nbytes = self.memory, (end - first) * PAGE_SIZE
        next_data = None
        if self._readable(first, end, frozen, resident):
            content = mem.data[first * PAGE_SIZE : end * PAGE_SIZE]  # no copy
        else:
            next_data = mem.next_data(first)
            if next_data >= end:  # nothing here was ever populated
                return (zero_pieces(end - first) if self.keeps_pieces else None), zero_chunk_crc(end - first), next_data
            if mem.fully_populated(first, end):
                content = mem.data[first * PAGE_SIZE : end * PAGE_SIZE]
            else:
                content = _chunk_buffer()[:nbytes]
                mem.read_into(first * PAGE_SIZE, content)  # holes read as zeros, stay holes
        with self._lock:
            self.bytes_read += nbytes
        if not self.keeps_pieces or frozen:
            # One call a chunk: nothing writes frozen memory, so no piece is
            # ever read again (the chunk is marked as without its pieces).
            return None, crc32(content), next_data
        pieces = piece_crcs(content)
        return pieces, chunk_crc(pieces, nbytes), next_data

    def _stale_pieces(self, chunk: int, which: bytes) -> dict:
        """CRCs of the pieces flagged in ``which`` (one byte a piece): read in
        place, or with holes only the stale pieces by pread (zeros where
        never populated, and nothing populated by reading)."""
        first, end = self._chunk_bounds(chunk)
        mem, size = self.memory, (end - first) * PAGE_SIZE
        in_place = self._readable(first, end, False)
        view = mem.data[first * PAGE_SIZE : end * PAGE_SIZE] if in_place else _chunk_buffer()[:size]
        out, i = {}, which.find(1)
        while i >= 0:
            lo, hi = i * PIECE_BYTES, min((i + 1) * PIECE_BYTES, size)
            if not in_place:
                mem.read_into(first * PAGE_SIZE + lo, view[lo:hi])
            out[i] = crc32(view[lo:hi])
            i = which.find(1, i + 1)
        with self._lock:
            self.bytes_read += sum(min(PIECE_BYTES, size - i * PIECE_BYTES) for i in out)
        return out

    def _tag_crc(self, chunk: int) -> int:
        first, end = self._chunk_bounds(chunk)
        mem = self.memory
        if mem.tagged.find(1, first, end) < 0:
            return _zero_crc(end - first, PACKED_TAGS_PER_PAGE)
        if mem.tagged.find(0, first, end) < 0:  # every page tagged: the storage as it is, not a copy
            return crc32(mem.tags[first * PACKED_TAGS_PER_PAGE : end * PACKED_TAGS_PER_PAGE])
        return crc32(effective_tags(mem, first, end))

    def data_digest(self) -> str:
        return hashlib.sha256(self.data_crcs.tobytes()).hexdigest()

    def tag_digest(self) -> str:
        return hashlib.sha256(self.tag_crcs.tobytes()).hexdigest()

    def chunk_crcs(self) -> bytes:
        return self.data_crcs.tobytes() + self.tag_crcs.tobytes()

    @staticmethod
    def split_chunk_crcs(raw: bytes, nchunks: int) -> tuple[array, array]:
        if len(raw) != 8 * nchunks:
            raise ValueError(f"expected {8 * nchunks} bytes of chunk CRCs, got {len(raw)}")
        data, tags = array("I"), array("I")
        data.frombytes(raw[: 4 * nchunks])
        tags.frombytes(raw[4 * nchunks :])
        return data, tags


def effective_tags(memory, first: int, end: int) -> bytes:
    """Packed tags of pages [first, end) as KVM would report them: zeros for
    pages not marked tagged (their storage is never read)."""
    tagged = memory.tagged
    n = end - first
    ntagged = tagged.count(1, first, end)
    if ntagged == 0:
        return _ZERO_TAGS[: n * PACKED_TAGS_PER_PAGE] if n <= CHUNK_PAGES else bytes(n * PACKED_TAGS_PER_PAGE)
    if ntagged == n:
        return bytes(memory.tags[first * PACKED_TAGS_PER_PAGE : end * PACKED_TAGS_PER_PAGE])
    out = bytearray(n * PACKED_TAGS_PER_PAGE)
    pos = first
    while pos < end:
        a = tagged.find(1, pos, end)
        if a < 0:
            break
        b = tagged.find(0, a, end)
        b = end if b < 0 else b
        out[(a - first) * PACKED_TAGS_PER_PAGE : (b - first) * PACKED_TAGS_PER_PAGE] = memory.tags[
            a * PACKED_TAGS_PER_PAGE : b * PACKED_TAGS_PER_PAGE
        ]
        pos = b
    return bytes(out)


def page_detail(memory, chunks: list[int]) -> bytes:
    """For each page of the chunks: data CRC (4 bytes LE) + effective packed
    tags (128 bytes).  Used to find which pages and granules differ."""
    out = bytearray()
    for c in chunks:
        first = c * CHUNK_PAGES
        end = min(first + CHUNK_PAGES, memory.npages)
        buf = _chunk_buffer()[: (end - first) * PAGE_SIZE]
        memory.read_into(first * PAGE_SIZE, buf)
        tags = effective_tags(memory, first, end)
        for i in range(end - first):
            out += crc32(buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]).to_bytes(4, "little")
            out += tags[i * PACKED_TAGS_PER_PAGE : (i + 1) * PACKED_TAGS_PER_PAGE]
    return bytes(out)


DETAIL_PER_PAGE = 4 + PACKED_TAGS_PER_PAGE


#: types msgpack packs as they are: a list of nothing else has nothing to reorder
_PLAIN = frozenset((int, float, str, bytes, bool, type(None)))


def _canon(x):
    """Dicts as their items sorted by key, at any depth.  A list holding no
    dict is returned as it is (msgpack packs lists and tuples alike): the
    types of its items, and of its lists' items, are checked in C, not one
    item at a time in Python -- a hot-set guest's state holds 16,384 pairs,
    and canonicalising them one by one took 10 ms of the switch."""
    if isinstance(x, dict):
        return sorted((str(k), _canon(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        kinds = set(map(type, x))
        if kinds <= _PLAIN:
            return x
        if kinds <= {list, tuple} and set(map(type, itertools.chain.from_iterable(x))) <= _PLAIN:
            return x
        return [_canon(v) for v in x]
    return x


def state_digest(state: dict) -> str:
    """Digest of vCPU + device state in canonical form."""
    import msgpack

    return hashlib.sha256(msgpack.packb(_canon(state))).hexdigest()
