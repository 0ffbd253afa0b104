"""Digests of guest memory and tags, read straight from the simulated
kernel's storage -- never through a tag strategy -- for validation.

RAM is cut into 1 MiB chunks (256 pages).  A chunk's data CRC covers its
bytes: read in place through the kernel's mapping when every page of the chunk
is populated, with pread() otherwise so that never-populated pages read as
zeros without being populated (a load through the mapping would allocate
them); a chunk with no data at all is not read; its tag CRC covers the *effective* tags: packed
storage for pages marked tagged, zeros for the rest (FROM_GUEST semantics).
The digest is sha256 over the per-chunk CRCs, so two hosts agree exactly
when every chunk does, and the chunk CRCs say where they differ.
"""

import functools
import hashlib
import threading
import zlib
from array import array

from hosts.constants import PACKED_TAGS_PER_PAGE, PAGE_SIZE

CHUNK_PAGES = 256
_ZERO_CHUNK = bytes(CHUNK_PAGES * PAGE_SIZE)
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
    return zlib.crc32(bytes(npages * per_page))


def chunk_count(npages: int) -> int:
    return -(-npages // CHUNK_PAGES)


class MemoryDigest:
    """Per-chunk CRCs of one guest's RAM and tags.

    It can be kept up to date incrementally by a writer that knows what it
    wrote (the destination): ``mark_stale`` after each write, ``refresh`` in
    the background, and at completion only the chunks written since are
    read again.  A chunk's stale flag is cleared before its CRC is computed,
    so a write that lands during the computation marks it stale again."""

    def __init__(self, memory, chunks: list[int] | None = None, compute: bool = True):
        self.memory = memory
        self.nchunks = chunk_count(memory.npages)
        self.data_crcs = array("I", [0]) * self.nchunks
        self.tag_crcs = array("I", [0]) * self.nchunks
        self.unread = bytearray(b"\x01") * self.nchunks      # never read yet
        self.stale = bytearray(self.nchunks)                  # written since read: data and tags
        self.tags_stale = bytearray(self.nchunks)             # tags only
        # A result computed while set_data() stored a newer one is dropped:
        # set_data bumps the chunk's generation.
        self._gen = array("I", [0]) * self.nchunks
        self._lock = threading.Lock()
        if compute:
            self.refresh(range(self.nchunks) if chunks is None else chunks)

    async def refresh_parallel(self, loop, workers: int = 2, frozen: bool = False) -> None:
        """Recompute the stale chunks in ``workers`` threads (see refresh)."""
        import asyncio
        stale = self.pending_chunks()
        if stale:
            await asyncio.gather(*(loop.run_in_executor(None, self.refresh, stale[i::workers], frozen)
                                   for i in range(workers)))

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

    def mark_stale(self, first_page: int, end_page: int) -> None:
        a, b = first_page // CHUNK_PAGES, -(-end_page // CHUNK_PAGES)
        self.stale[a:b] = b"\x01" * (b - a)

    def set_data(self, chunk: int, crc: int, tags_changed: bool) -> None:
        """Record a chunk's data CRC computed by the caller from this memory
        (the destination, right after landing a whole chunk); its tags are
        read again later if they changed."""
        with self._lock:
            self._gen[chunk] += 1
            self.data_crcs[chunk] = crc
            self.stale[chunk] = self.unread[chunk] = 0
            if tags_changed:
                self.tags_stale[chunk] = 1

    def refresh(self, chunks=None, frozen: bool = False) -> int:
        """Recompute ``chunks`` (default: the stale ones); returns how many.
        ``frozen``: nothing writes this RAM meanwhile (a paused guest, a
        destination after the last pass), so one SEEK_DATA that finds no data
        up to some page stands for every chunk before it (in ascending order):
        a sparse 16 GiB guest is read with a few system calls, not 16,384."""
        if chunks is None:
            chunks = self.pending_chunks()
        hole_end = -1  # with frozen: no page below this holds data
        for c in chunks:
            with self._lock:
                gen, data_needed = self._gen[c], self.stale[c] or self.unread[c] or not self.tags_stale[c]
                self.stale[c] = self.tags_stale[c] = self.unread[c] = 0
            data_crc = None
            if data_needed:
                first, end = self._chunk_bounds(c)
                if frozen and end <= hole_end:
                    data_crc = _zero_crc(end - first)
                else:
                    data_crc, next_data = self._data_crc(c, frozen)
                    if frozen and next_data is not None:
                        hole_end = next_data
            tag_crc = self._tag_crc(c)
            with self._lock:
                if self._gen[c] == gen:
                    if data_crc is not None:
                        self.data_crcs[c] = data_crc
                    self.tag_crcs[c] = tag_crc
                else:  # set_data() stored newer data meanwhile: keep it, and read the tags again
                    self.tags_stale[c] = 1
        return len(chunks)

    def _chunk_bounds(self, chunk: int) -> tuple[int, int]:
        first = chunk * CHUNK_PAGES
        return first, min(first + CHUNK_PAGES, self.memory.npages)

    def _data_crc(self, chunk: int, frozen: bool = False) -> tuple[int, int | None]:
        """(CRC of the chunk's bytes, the first page holding data at or after
        the chunk when that was asked of the file, else None)."""
        first, end = self._chunk_bounds(chunk)
        mem = self.memory
        # mincore first: unlike lseek it does not wait for the inode lock
        # that a concurrent pwrite into this RAM holds.  Frozen, a chunk only
        # allocated ahead (prefault) is asked of SEEK_DATA before it is read.
        if mem.all_resident(first, end) or (not frozen and mem.fully_populated(first, end)):
            return zlib.crc32(mem.data[first * PAGE_SIZE:end * PAGE_SIZE]), None  # no copy
        next_data = mem.next_data(first)
        if next_data < end and mem.fully_populated(first, end):
            return zlib.crc32(mem.data[first * PAGE_SIZE:end * PAGE_SIZE]), next_data
        if next_data >= end:
            return _zero_crc(end - first), next_data  # nothing here was ever populated
        buf = _chunk_buffer()[:(end - first) * PAGE_SIZE]
        self.memory.read_into(first * PAGE_SIZE, buf)  # holes read as zeros, stay holes
        return zlib.crc32(buf), next_data

    def _tag_crc(self, chunk: int) -> int:
        first, end = self._chunk_bounds(chunk)
        if self.memory.tagged.find(1, first, end) < 0:
            return _zero_crc(end - first, PACKED_TAGS_PER_PAGE)
        return zlib.crc32(effective_tags(self.memory, first, end))

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
        data.frombytes(raw[:4 * nchunks])
        tags.frombytes(raw[4 * nchunks:])
        return data, tags


def effective_tags(memory, first: int, end: int) -> bytes:
    """Packed tags of pages [first, end) as KVM would report them: zeros for
    pages not marked tagged (their storage is never read)."""
    tagged = memory.tagged
    n = end - first
    ntagged = tagged.count(1, first, end)
    if ntagged == 0:
        return _ZERO_TAGS[:n * PACKED_TAGS_PER_PAGE] if n <= CHUNK_PAGES else bytes(n * PACKED_TAGS_PER_PAGE)
    if ntagged == n:
        return bytes(memory.tags[first * PACKED_TAGS_PER_PAGE:end * PACKED_TAGS_PER_PAGE])
    out = bytearray(n * PACKED_TAGS_PER_PAGE)
    pos = first
    while pos < end:
        a = tagged.find(1, pos, end)
        if a < 0:
            break
        b = tagged.find(0, a, end)
        b = end if b < 0 else b
        out[(a - first) * PACKED_TAGS_PER_PAGE:(b - first) * PACKED_TAGS_PER_PAGE] = \
            memory.tags[a * PACKED_TAGS_PER_PAGE:b * PACKED_TAGS_PER_PAGE]
        pos = b
    return bytes(out)


def page_detail(memory, chunks: list[int]) -> bytes:
    """For each page of the chunks: data CRC (4 bytes LE) + effective packed
    tags (128 bytes).  Used to find which pages and granules differ."""
    out = bytearray()
    for c in chunks:
        first = c * CHUNK_PAGES
        end = min(first + CHUNK_PAGES, memory.npages)
        buf = _chunk_buffer()[:(end - first) * PAGE_SIZE]
        memory.read_into(first * PAGE_SIZE, buf)
        tags = effective_tags(memory, first, end)
        for i in range(end - first):
            out += zlib.crc32(buf[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]).to_bytes(4, "little")
            out += tags[i * PACKED_TAGS_PER_PAGE:(i + 1) * PACKED_TAGS_PER_PAGE]
    return bytes(out)


DETAIL_PER_PAGE = 4 + PACKED_TAGS_PER_PAGE


def state_digest(state: dict) -> str:
    """Digest of vCPU + device state in canonical form."""
    import msgpack

    def canon(x):
        if isinstance(x, dict):
            return sorted((str(k), canon(v)) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return [canon(v) for v in x]
        return x
    return hashlib.sha256(msgpack.packb(canon(state))).hexdigest()
