"""Page batches: building them on the source from guest RAM and tags, and
applying them on the destination.  Work is per run of pages (bytes.find on
flag bytes), per page only for the zero-page test, never per granule."""

import bisect
import contextlib
import itertools
import mmap
import re
from dataclasses import dataclass
from typing import NamedTuple

from hosts.constants import PACKED_TAGS_PER_PAGE, PAGE_SIZE
from hosts.tags import all_zero
from migrate.checksum import crc32, crc32_join
from migrate.engine.bitmaps import run_views, runs, unit_views
from migrate.engine.digest import CHUNK_PAGES, chunk_count, piece_crcs, prepare_piece_tables_soon
from migrate.errors import ProtocolError
from migrate.protocol import frames as fr
from migrate.protocol.compression import Compressor, Decompressor
from migrate.strategies.base import TagStrategy

_PLAIN_WRITE = TagStrategy.write_data  # a strategy that keeps it stores data as a plain write to RAM

_ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_TAG_PAGE = bytes(PACKED_TAGS_PER_PAGE)
_DATA_BIT = bytes(0 if b & (fr.PAGE_ZERO | fr.PAGE_KEEP) else 1 for b in range(256))  # 1 = data on the wire
_ZERO_BIT = bytes(1 if b & fr.PAGE_ZERO else 0 for b in range(256))  # 1 = all-zero data
_TAGS_BIT = bytes(1 if b & fr.PAGE_TAGS else 0 for b in range(256))  # 1 = tags on the wire
_ADD_TAGS = bytes((b | fr.PAGE_TAGS) & 0xFF for b in range(256))
_IS_ZERO_BYTE = bytes([1]) + bytes(255)  # 1 = the byte is 0
_LANDED_BIT = bytes(0 if b & fr.PAGE_KEEP else 1 for b in range(256))  # 1 = data or zero page
_ZERO_BLOCK_PAGES = 256
_ZERO_BLOCK = memoryview(bytes(_ZERO_BLOCK_PAGES * PAGE_SIZE))


def _no_write(first: int, end: int) -> None:
    pass


def _always(first: int, end: int) -> bool:
    return True


def _not_known() -> bool:
    return False


def _zeros(npages: int):
    """``npages`` zero pages to write (a view of one shared block when it fits)."""
    return _ZERO_BLOCK[: npages * PAGE_SIZE] if npages <= _ZERO_BLOCK_PAGES else bytes(npages * PAGE_SIZE)


_PAGE_KIND = bytes(0 if b & fr.PAGE_KEEP else 2 if b & fr.PAGE_ZERO else 1 for b in range(256))
_SAME_KIND_RUN = re.compile(rb"(.)\1*", re.S)


def content_crc(flags, data) -> int:
    """CRC32 of a batch's pages as they must read on the destination: data
    pages from ``data`` and zero pages as zeros, in batch order; KEEP pages
    (tags only) left out.  What Pages.dcrc holds; for a batch that lands
    whole chunks (lands_whole_chunk) it is their digest CRCs joined."""
    crc, pos = 0, 0
    data = memoryview(data)
    for m in _SAME_KIND_RUN.finditer(bytes(flags).translate(_PAGE_KIND)):
        n, kind = m.end() - m.start(), m.group()[0]
        if kind == 1:
            crc = crc32(data[pos : pos + n * PAGE_SIZE], crc)
            pos += n * PAGE_SIZE
        elif kind == 2:
            crc = crc32(_zeros(n), crc)
    return crc


def whole_chunk(ranges, npages: int) -> int | None:
    """The first of the digest chunks a batch covers exactly (one range,
    chunk aligned, whole chunks: the last may be RAM's short last chunk),
    or None."""
    if len(ranges) != 1:
        return None
    first, count = ranges[0]
    if first % CHUNK_PAGES or count <= 0 or (count % CHUNK_PAGES and first + count != npages):
        return None
    return first // CHUNK_PAGES


CHUNK_BYTES = CHUNK_PAGES * PAGE_SIZE


def _segment_start(segment) -> int:
    return segment[0]


def _joined(crcs: list, nbytes: int) -> int:
    """The CRC of ``nbytes`` of whole chunks (the last may be short) from
    the chunks' CRCs."""
    return crcs[0] if len(crcs) == 1 else crc32_join(crcs, CHUNK_BYTES, nbytes - (len(crcs) - 1) * CHUNK_BYTES)


def _chunks_of(view, first_chunk: int):
    """(chunk, its bytes) of a view of whole chunks from ``first_chunk`` on."""
    for i, o in enumerate(range(0, len(view), CHUNK_BYTES)):
        yield first_chunk + i, view[o : o + CHUNK_BYTES]


class Placement(NamedTuple):
    """Where a frame's data goes straight into guest RAM (see
    BatchApplier.placement): spliced into the file ``fd`` at ``offset``,
    the writes holding ``lock``, the RAM writers' lock; or, with ``view``,
    read into that view of the mapping (no lock: a store through the
    mapping does not take the file's).  ``landed`` is told the count of
    bytes in place after each."""

    fd: int | None
    offset: int | None
    lock: object
    landed: object
    view: memoryview | None = None


class LandingCrcs:
    """The CRC (and piece CRCs) of each chunk of a frame put straight into
    guest RAM (spliced, or read into place), taken as soon as the chunk's
    last byte has landed, while its bytes are still in the cache: taken after the whole 4 MiB frame, the first
    chunks were read back from memory (1 GiB landed 1 MiB at a time: 0.064
    s of CRC against 0.095-0.16 a 4 MiB write at a time, and 0.11 cold)."""

    def __init__(self, data, first_page: int, npages: int, pieces: bool):
        self.first, self.end = first_page, first_page + npages
        self._view = data[first_page * PAGE_SIZE : self.end * PAGE_SIZE]
        self._pieces = pieces
        self.crcs: list[int] = []
        self.pieces: list = []
        self._done = 0  # bytes CRC'd

    def landed(self, nbytes: int) -> None:
        """``nbytes`` of the frame's data are in place: CRC the whole chunks
        among them not CRC'd yet (the last, maybe short, once all landed)."""
        size = len(self._view)
        while self._done < nbytes and (nbytes - self._done >= CHUNK_BYTES or nbytes >= size):
            part = self._view[self._done : self._done + CHUNK_BYTES]
            self.crcs.append(crc32(part))
            self.pieces.append(piece_crcs(part) if self._pieces else None)
            self._done += len(part)

    def covers(self, first: int, end: int) -> bool:
        """Whether these are the CRCs of all of pages [first, end)."""
        return (self.first, self.end) == (first, end) and self._done == len(self._view)


def lands_whole_chunk(ranges, flags, npages: int) -> bool:
    """Whether every page of whole digest chunks lands with this batch
    (data or zero pages, none tags-only).  Such a batch's data CRC joins
    the chunks' digest CRCs, so the destination checks it on the landed
    pages and keeps their piece CRCs: one pass over the bytes serves as
    frame check and validation digest."""
    return whole_chunk(ranges, npages) is not None and bytes(flags).translate(_LANDED_BIT).find(0) < 0


def _flag_zero_pages(view, heads: bytes, flags: bytearray, at: int) -> None:
    """Mark PAGE_ZERO at ``flags[at + p]`` for each all-zero page p of
    ``view``; ``heads`` holds the first byte of every page, so only the pages
    starting with 0 are compared in full (random or text data: hardly any).
    They are found and compared by C iterators; only the flagging of a
    zero page is a step of Python (the mixed image has a zero page in four:
    0.12 s a GiB compared one by one, 0.044 so)."""
    candidates = heads.translate(_IS_ZERO_BYTE)
    if candidates.find(1) < 0:
        return
    pages = list(itertools.compress(range(len(candidates)), candidates))
    for p in itertools.compress(pages, map(_ZERO_PAGE.startswith, unit_views(view, pages, PAGE_SIZE))):
        flags[at + p] = fr.PAGE_ZERO


def split_batches(ranges, batch_pages: int):
    """Cut page ranges [(start, end)] into batches of (first, count) lists,
    at most ``batch_pages`` pages each.  Whole chunks stay whole (with
    batches of a chunk or more): a chunk-aligned stretch of a chunk or more
    goes as a batch of whole chunks of its own, and a stretch that runs
    past the end of the chunk it starts in is cut there first, so that
    what follows is aligned.  Such a batch lands in one piece and is
    checked as it lands; scattered pages still fill batches across gaps."""
    batch, size = [], 0
    aligned = batch_pages >= CHUNK_PAGES
    for start, end in ranges:
        while start < end:
            if aligned and start % CHUNK_PAGES == 0 and end - start >= CHUNK_PAGES:
                if batch:
                    yield batch
                n = min(end - start, batch_pages) // CHUNK_PAGES * CHUNK_PAGES
                yield [(start, n)]
                batch, size = [], 0
                start += n
                continue
            n = min(end - start, batch_pages - size)
            if aligned and end - start > CHUNK_PAGES - start % CHUNK_PAGES:
                n = min(n, CHUNK_PAGES - start % CHUNK_PAGES)
            batch.append((start, n))
            size += n
            start += n
            if size == batch_pages:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


@dataclass
class BatchStats:
    pages: int = 0
    zero_pages: int = 0
    normal_pages: int = 0
    tagged_pages: int = 0
    data_bytes: int = 0  # guest bytes of non-zero pages
    data_wire: int = 0
    tag_raw: int = 0  # packed tag bytes of tagged pages
    tag_wire: int = 0
    spliced_bytes: int = 0  # data received straight into guest RAM (destination)
    unscanned_pages: int = 0  # sent whole, zero pages unsought (source; see FAST_LINK)

    def add(self, other: "BatchStats") -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


def packed_tags_blob(flags: bytearray, packed, n: int) -> tuple[bytes, int]:
    """Keep the tags of pages whose tags are not all zero (marking them
    PAGE_TAGS in ``flags``); returns (blob, count)."""
    if packed is None or all_zero(packed):
        return b"", 0
    if bytes(packed).find(_ZERO_TAG_PAGE) < 0:
        # Not even an unaligned run of 128 zero bytes: every page has tags
        # (the common case of a tagged heap) -- flag them all in bulk.
        flags[:] = flags.translate(_ADD_TAGS)
        return bytes(packed), n
    keep = []
    for p in range(n):
        t = packed[p * PACKED_TAGS_PER_PAGE : (p + 1) * PACKED_TAGS_PER_PAGE]
        if t != _ZERO_TAG_PAGE:
            flags[p] |= fr.PAGE_TAGS
            keep.append(t)
    return (bytes(packed) if len(keep) == n else b"".join(keep)), len(keep)


class BatchBuilder:
    """Source side: guest pages -> Pages frames.

    ``checked`` (checksum "full"): the frame carries CRCs of its pages and
    tags.  Whole chunks go out straight from guest RAM, the CRC taken there
    just before (one read of memory, the send then copies from cache): while
    the guest runs, a page it writes in between fails the frame's CRC, and
    the frame goes marked ``live`` (see Pages.live: the destination reports
    it torn, the next dirty harvest must hold one of its pages, and that
    page goes again).  They are copied first instead, as other checked
    batches always are, with ``snapshot_running`` (a stream with a MAC,
    which a torn frame would fail as tampered; a migration that may switch
    to postcopy) and whenever the data may be compressed (zstd reads its
    input more than once: a page written in between could make other pages
    decode wrong).  Unchecked, a batch whose data pages form one run is sent
    straight from guest RAM when it goes raw (a page the guest changes
    meanwhile is in the next dirty harvest and goes again)."""

    def __init__(
        self,
        strategy,
        compressor: Compressor,
        batch_pages: int,
        checked: bool = True,
        digest=None,
        snapshot_running: bool = False,
    ):
        self.strategy = strategy
        self.compressor = compressor
        self.batch_pages = batch_pages
        self.checked = checked
        self.snapshot_running = snapshot_running
        #: the guest may write its memory while frames are built and sent;
        #: the source clears it when it pauses the guest
        self.guest_runs = True
        #: the source's validation digest: when a checked batch is whole
        #: chunks and the strategy handed back kernel memory itself (checked
        #: by address), the snapshot's CRCs are those chunks' digests too
        self.digest = digest
        #: whether those chunks' 16 KiB piece CRCs are taken too (64 more
        #: calls a chunk, in cache): for a digest whose writer marks pieces
        #: stale one by one; without them a chunk written later is read whole
        self.digest_pieces = True
        #: whether the source has watched its guest write nothing so far
        #: (see Pages.quiet); set by the source where it watches writes
        self.guest_quiet = _not_known
        #: (first, end) -> whether the digest's writes to those pages are
        #: seen from now on (waiting for it if need be): a chunk's CRC stands
        #: as its digest only then.  The source's write watch protects RAM
        #: from its start while the bulk pass goes.
        self.watched = _always
        self.npages = strategy.host.memory.npages
        # Anonymous memory, its pages taken on first use: bytearray() writes
        # all 4 MiB (2-3 ms a channel at set-up), and a batch sent straight
        # from guest RAM never touches it.
        self._scratch = mmap.mmap(-1, batch_pages * PAGE_SIZE)

    def build(self, pass_no: int, ranges) -> tuple[fr.Pages, BatchStats]:
        if self.checked:
            chunk = whole_chunk(ranges, self.npages)
            if chunk is not None:
                first, count = ranges[0]
                view = self.strategy.read_data(first, count)
                digest = self.digest  # once: the source may take it away at the pause
                record = (
                    digest is not None
                    and digest.memory.is_view_of(view, first * PAGE_SIZE)
                    and self.watched(first, first + count)
                )
                heads = bytes(view[::PAGE_SIZE])  # the first byte of every page, in one strided copy
                # (a chunk of zeros alone is flagged below, without a copy)
                if record or not (heads.count(0) == count and all_zero(view)):
                    # counted before the bytes are read: a write marked since
                    # keeps the chunk stale (set_chunk_crc)
                    marks = digest.marks_of(chunk, -(-count // CHUNK_PAGES)) if record else None
                    return self._build_whole_chunk(
                        pass_no, ranges, view, heads, (digest, chunk, marks) if record else None
                    )
        n = sum(c for _, c in ranges)
        flags = bytearray(n)
        parts = []  # views of the runs of non-zero pages, in batch order
        i = 0
        for first, count in ranges:
            view = self.strategy.read_data(first, count)
            heads = bytes(view[::PAGE_SIZE])  # the first byte of every page, in one strided copy
            if heads.find(0) < 0:  # no zero page here: the whole range is data
                parts.append(view)
                i += count
                continue
            if heads.count(0) == count and all_zero(view):
                flags[i : i + count] = bytes([fr.PAGE_ZERO]) * count
                i += count
                continue
            _flag_zero_pages(view, heads, flags, i)
            for a, b in runs(bytes(flags[i : i + count]), 0):
                parts.append(view[a * PAGE_SIZE : b * PAGE_SIZE])
            i += count
        filled = sum(len(v) for v in parts)
        one_run = len(parts) == 1 and not self.checked
        decided = None  # compress_data decides: on a copy, or on a paused guest's memory
        if one_run and self.guest_runs:
            # A running guest's memory goes out uncopied only raw: zstd reads
            # its input more than once (see _build_whole_chunk).
            decided = self.compressor.decide(parts[0])
        if one_run and not decided:
            data = parts[0]
        else:
            scratch, pos = memoryview(self._scratch), 0
            for v in parts:
                scratch[pos : pos + len(v)] = v
                pos += len(v)
            data = scratch[:filled]
        packed = self.strategy.read_tags(ranges)
        return self._finish(pass_no, ranges, flags, data, packed_tags_blob(flags, packed, n), filled, decided=decided)

    def _build_whole_chunk(self, pass_no, ranges, view, heads: bytes, record=None) -> tuple[fr.Pages, BatchStats]:
        """Whole chunks, checked: find the zero pages, and CRC the chunks in
        one call -- the frame's data CRC and, with ``record`` (a digest, the
        first chunk, the chunks' mark counts taken before reading: ``view``
        is kernel memory itself), the chunks' digests (one CRC call each, of
        bytes in cache, when there are several).  The data
        pages go out where they lie (a Gather: one gathering send): in guest
        RAM, or in a snapshot of it (see the class).  Copying the runs of data pages
        together and CRC'ing them and the zero pages run by run made 64
        copies and 128 CRC calls a chunk of the mixed image: 224 ms a GiB
        against 154 for the snapshot, one CRC and the views; without the
        snapshot the sender spends 0.07 s a GiB less (318 ms of CPU against
        388 to send 1 GiB over loopback, medians of 5)."""
        n = ranges[0][1]
        # Straight from the running guest's memory only when it goes raw:
        # zstd reads its input more than once, and a page the guest writes
        # meanwhile could make pages it never wrote decode wrong.  Asked
        # first (auto decides on a copied sample), so that a batch is copied
        # only to be compressed -- not while the link is still unmeasured.
        compress = None
        if self.guest_runs and not self.snapshot_running:
            compress = False if self.compressor.sends_raw() else self.compressor.decide(view)
        live = compress is False
        if self.guest_runs and not live:
            snap = memoryview(self._scratch)[: n * PAGE_SIZE]
            snap[:] = view  # a copy: what the CRC covers is what goes out
        else:
            snap = view
        flags = bytearray(n)
        # ``heads``, read from guest RAM before any copy, only pick the pages
        # to compare: a page is flagged zero only if it is all zeros in what
        # goes out.  Every chunk at most half zero pages (by their first bytes):
        few_zero = all(heads.count(0, o, o + CHUNK_PAGES) <= CHUNK_PAGES // 2 for o in range(0, n, CHUNK_PAGES))
        unscanned = n if few_zero and self.compressor.raw_over_fast_link() else 0
        if not unscanned:
            _flag_zero_pages(snap, heads, flags, 0)
        # else over a fast link the chunk goes whole, any zero pages in it
        # as data: it lands in one splice, where split around them it is
        # copied run by run (the mixed image, a zero page in four: the
        # destination's CPU 0.75-0.87 s a GiB against 1.00-1.12), and the
        # source saves the scan for them.
        # Zero pages are zeros here, as they land.
        if record is None:
            crc = crc32(snap)
        else:
            # The chunks' CRCs are their digests, joined they are the
            # frame's.  A page written after the CRC is in a later dirty
            # harvest or write-watch scan, which marks the chunk stale again.
            digest, chunk, marks = record
            crcs = []
            for i, (c, part) in enumerate(_chunks_of(snap, chunk)):
                crcs.append(crc32(part))
                pieces = piece_crcs(part) if digest.keeps_pieces and self.digest_pieces else None
                digest.set_chunk_crc(c, crcs[-1], tags="later", pieces=pieces, marks=marks[i])
            crc = _joined(crcs, len(snap))
        if flags.find(fr.PAGE_ZERO) < 0:
            data = snap
        else:
            data = fr.Gather(run_views(snap, bytes(flags), 0, PAGE_SIZE))  # (no tag flags yet: 0 or PAGE_ZERO)
        packed = self.strategy.read_tags(ranges)
        frame, stats = self._finish(
            pass_no, ranges, flags, data, packed_tags_blob(flags, packed, n), len(data), crc, decided=compress
        )
        frame.live = live
        stats.unscanned_pages = unscanned
        return frame, stats

    def build_tags_only(self, pass_no: int, ranges) -> tuple[fr.Pages, BatchStats]:
        """A batch of pages whose data is unchanged: only their tags travel."""
        n = sum(c for _, c in ranges)
        flags = bytearray([fr.PAGE_KEEP]) * n
        packed = self.strategy.read_tags(ranges)
        return self._finish(pass_no, ranges, flags, b"", packed_tags_blob(flags, packed, n), 0)

    def _finish(self, pass_no, ranges, flags, data, tags, filled, dcrc=None, decided=None):
        tag_blob, ntagged = tags
        n = len(flags)
        data_wire, data_c = self.compressor.compress_data(data, decided=decided)
        tags_wire, tags_c = self.compressor.compress_tags(tag_blob)
        zero = flags.count(fr.PAGE_ZERO) + flags.count(fr.PAGE_ZERO | fr.PAGE_TAGS)
        normal = n - zero - flags.count(fr.PAGE_KEEP) - flags.count(fr.PAGE_KEEP | fr.PAGE_TAGS)
        stats = BatchStats(
            pages=n,
            zero_pages=zero,
            normal_pages=normal,
            tagged_pages=ntagged,
            data_bytes=filled,
            data_wire=len(data_wire),
            tag_raw=len(tag_blob),
            tag_wire=len(tags_wire),
        )
        if not self.checked:
            dcrc = tcrc = None
        else:
            dcrc = content_crc(flags, data) if dcrc is None else dcrc
            tcrc = crc32(tags_wire)
        frame = fr.Pages(pass_no, list(ranges), bytes(flags), data_wire, tags_wire, data_c, tags_c, dcrc, tcrc)
        frame.quiet = self.guest_quiet()
        return frame, stats


class BatchApplier:
    """Destination side: Pages frames -> guest RAM and tags, in place.

    ``written`` remembers pages this destination stored data in (a zero page
    needs writing only over earlier data); ``has_tags`` pages it stored
    non-zero tags in (a page arriving without tags must then be cleared)."""

    def __init__(
        self,
        strategy,
        npages: int,
        written: bytearray | None = None,
        has_tags: bytearray | None = None,
        on_write=None,
        digest=None,
        torn: list | None = None,
    ):
        # Data channels share the page maps (each page belongs to one
        # channel, so their slices never overlap) and the torn list, but not
        # the decompressor.
        self.strategy = strategy
        self.decompressor = Decompressor()
        self.written = bytearray(npages) if written is None else written
        self.has_tags = bytearray(npages) if has_tags is None else has_tags
        #: (first page, count) of the live frames whose data failed its CRC,
        #: landed as they came: for the pass's APPLIED (see Pages.live)
        self.torn = [] if torn is None else torn
        #: called with (first_page, end_page) after each store, e.g. to mark digests stale
        self.on_write = on_write or (lambda first, end: None)
        #: the destination's validation digest: a checked frame that lands
        #: whole chunks is verified on the landed memory, whose CRCs the
        #: digest then keeps (one read of those bytes instead of two)
        self.digest = digest
        self.npages = npages
        #: the CRCs of the frame the transport is splicing into place, taken
        #: as its chunks land (see placement)
        self._landing: LandingCrcs | None = None

    def apply(self, frame: fr.Pages) -> BatchStats:
        flags = frame.flags
        data_bits = flags.translate(_DATA_BIT)
        zero_bits = flags.translate(_ZERO_BIT)
        tag_bits = flags.translate(_TAGS_BIT)
        ndata, ntags = data_bits.count(1), tag_bits.count(1)
        if frame.pass_no and self.digest is not None:
            prepare_piece_tables_soon()  # the guest writes again: pieces will be swapped
        if frame.landed:  # the transport spliced the data into place (see placement())
            return self._apply_landed(frame, ndata, tag_bits, ntags)
        data = self._payload(frame.data, frame.data_compressed, ndata * PAGE_SIZE, "page data")
        tags = self._tags_of(frame, ntags)
        page_of = []  # (batch position start, end, first guest page) per range
        pos = 0
        for first, count in frame.ranges:
            page_of.append((pos, pos + count, first))
            pos += count
        landed_chunk = None
        if frame.dcrc is not None:
            if self.digest is not None and ndata and lands_whole_chunk(frame.ranges, flags, self.npages):
                landed_chunk = frame.ranges[0][0] // CHUNK_PAGES  # checked on the landed pages below, chunk by chunk
            elif content_crc(flags, data) != frame.dcrc and not self._torn(frame):
                raise ProtocolError("PAGES frame data failed its checksum: the stream is corrupt")
        if landed_chunk is None:
            self._store(page_of, flags.translate(_LANDED_BIT), data_bits, memoryview(data))
            self._land_tags(page_of, tag_bits, tags)
        else:
            with self._digest_told_after():
                self._store(page_of, flags.translate(_LANDED_BIT), data_bits, memoryview(data))
                self._land_tags(page_of, tag_bits, tags)
            self._check_landed(frame, frame.ranges[0][0], frame.ranges[0][0] + frame.ranges[0][1])
        zero = zero_bits.count(1)
        return BatchStats(
            pages=len(flags),
            zero_pages=zero,
            normal_pages=ndata,
            tagged_pages=ntags,
            data_bytes=ndata * PAGE_SIZE,
            data_wire=len(frame.data),
            tag_raw=ntags * PACKED_TAGS_PER_PAGE,
            tag_wire=len(frame.tags),
        )

    def placement(self, fields: dict, data_len: int):
        """Where the transport may put a frame's data straight into guest
        RAM (a Placement: spliced into the file, or read into place through
        the mapping), or None.  Only whole digest chunks of data
        pages, raw and self-checked -- the frame is then verified on the
        landed pages anyway -- and only when the strategy stores data as a
        plain write to RAM (prot-mte goes through its PROT_MTE mapping)."""
        ranges = fields["ranges"]
        if (
            self.digest is None
            or fields["data_compressed"]
            or fields["dcrc"] is None
            or type(self.strategy).write_data is not _PLAIN_WRITE
            or len(ranges) != 1
        ):
            return None
        first, count = ranges[0]
        if (
            whole_chunk(ranges, self.npages) is None
            or data_len != count * PAGE_SIZE
            or fields["flags"].translate(_DATA_BIT).find(0) >= 0
        ):
            return None
        memory = self.digest.memory
        self._landing = LandingCrcs(memory.data, first, count, self.digest.keeps_pieces and not fields["quiet"])
        if memory.stores_in_place(first, first + count):
            # A read into the mapping: one copy, cheaper than the splice's
            # write into the file (RAM allocated ahead, 1 GiB, 3 pairs: the
            # destination's CPU 0.86x, the total 0.84x), and the channels
            # read at once, with no writers' lock (see stores_in_place)
            view = memory.data[first * PAGE_SIZE : (first + count) * PAGE_SIZE]
            return Placement(None, None, None, self._landing.landed, view)
        return Placement(memory.data_fd, first * PAGE_SIZE, memory.write_lock, self._landing.landed)

    def _apply_landed(self, frame, ndata: int, tag_bits: bytes, ntags: int) -> BatchStats:
        first, count = frame.ranges[0]
        end = first + count
        self.written[first:end] = b"\x01" * count
        landing, self._landing = self._landing, None
        with self._digest_told_after():
            self._land_tags([(0, count, first)], tag_bits, self._tags_of(frame, ntags))
        self._check_landed(frame, first, end, landing if landing is not None and landing.covers(first, end) else None)
        return BatchStats(
            pages=count,
            zero_pages=0,
            normal_pages=ndata,
            tagged_pages=ntags,
            data_bytes=ndata * PAGE_SIZE,
            data_wire=ndata * PAGE_SIZE,
            tag_raw=ntags * PACKED_TAGS_PER_PAGE,
            tag_wire=len(frame.tags),
            spliced_bytes=ndata * PAGE_SIZE,
        )

    @contextlib.contextmanager
    def _digest_told_after(self):
        """While whole chunks land: no stale marks for them, one by one --
        _check_landed records the whole chunks (data and tags) right after.
        A mark in between would make the background refresh, on another
        thread, read a chunk that is just being recorded."""
        on_write, self.on_write = self.on_write, _no_write
        try:
            yield
        finally:
            self.on_write = on_write

    def _tags_of(self, frame, ntags: int):
        tags = self._payload(frame.tags, frame.tags_compressed, ntags * PACKED_TAGS_PER_PAGE, "page tags")
        if ntags and self.strategy.tag_format == "none":
            raise ProtocolError("PAGES frame carries tags, but the negotiated strategy moves none")
        return tags

    def _land_tags(self, page_of, tag_bits: bytes, tags) -> None:
        """Store the tags of PAGE_TAGS pages; clear those of the others that had tags."""
        tags, pos = memoryview(tags), 0
        for a, b in runs(tag_bits, 1):
            self._tag_run(page_of, a, b, tags[pos : pos + (b - a) * PACKED_TAGS_PER_PAGE])
            pos += (b - a) * PACKED_TAGS_PER_PAGE
        if self.strategy.tag_format != "none":
            for a, b in runs(tag_bits, 0):
                self._untag_run(page_of, a, b)

    def _check_landed(self, frame, first: int, end: int, landing: "LandingCrcs | None" = None) -> None:
        """The frame's data CRC against the pages as they landed, one call a
        chunk, joined; each chunk's CRC becomes its validation digest, with
        its piece CRCs (a second read, of bytes now in cache: a guest that
        writes the chunk again costs a 16 KiB piece, not 1 MiB).  Its tags
        have landed too.  Recorded before the check: a frame that fails it
        fails the migration.  ``landing``: those CRCs, taken by the
        transport as each chunk landed."""
        nbytes = (end - first) * PAGE_SIZE
        if landing is None:
            landing = LandingCrcs(
                self.digest.memory.data, first, end - first, self.digest.keeps_pieces and not frame.quiet
            )
            landing.landed(nbytes)
        for i, c in enumerate(range(first // CHUNK_PAGES, chunk_count(end))):
            self.digest.set_chunk_crc(c, landing.crcs[i], tags="now", pieces=landing.pieces[i])
        crc = _joined(landing.crcs, nbytes)
        if crc != frame.dcrc and not self._torn(frame):
            raise ProtocolError(
                f"PAGES frame data failed its checksum on the landed pages {first}..{end - 1} "
                f"(crc {crc:#010x}, expected {frame.dcrc:#010x}): corrupt on the wire, "
                f"or stored in the wrong place"
            )

    def _torn(self, frame) -> bool:
        """A frame whose data failed its CRC: torn by the running guest, if
        the source sent it live -- recorded, for the source to hold to its
        next dirty harvest -- or else corrupt (False)."""
        if not frame.live:
            return False
        # A pass sends a chunk once: more torn ranges than chunks before the
        # pass's APPLIED takes them is a peer out to fill this list.
        if len(self.torn) + len(frame.ranges) > chunk_count(self.npages):
            raise ProtocolError(
                f"more torn PAGES frames in one pass than RAM has chunks ({chunk_count(self.npages)}): "
                "the stream is corrupt"
            )
        self.torn.extend(frame.ranges)  # list.extend: atomic, channels share the list
        return True

    def _payload(self, blob, compressed: bool, expected: int, what: str):
        if compressed:
            return self.decompressor.decompress(blob, expected, what)
        if len(blob) != expected:
            raise ProtocolError(f"PAGES {what} is {len(blob)} bytes, expected {expected}")
        return blob

    @staticmethod
    def _page_runs(segments, a, b):
        """Split batch positions [a, b) into runs of consecutive guest pages:
        yields (first guest page, count), one per range it overlaps.  Found
        by bisection: a batch of scattered pages has a range a page, and a
        scan from the first for every run made a dirty pass quadratic."""
        for i in range(max(0, bisect.bisect_right(segments, a, key=_segment_start) - 1), len(segments)):
            sa, sb, first = segments[i]
            if sa >= b:
                return
            lo, hi = max(a, sa), min(b, sb)
            if lo < hi:
                yield first + lo - sa, hi - lo

    def _store(self, page_of, landed_bits: bytes, data_bits: bytes, data) -> None:
        """Land data pages and zero pages.  A stretch of pages consecutive in
        guest RAM that holds any data goes down in one write, its zero pages
        as a shared zero page (the source sent them because it holds them
        populated, so the destination may too): a batch of interleaved data
        and zero pages is one system call, not one per run, and its chunk
        ends up fully populated (digested in place).  A stretch of zero pages
        alone is written only over earlier data, so memory never written
        stays unpopulated."""
        pos, written = 0, self.written
        for sa, sb, first in page_of:
            n = sb - sa
            if data_bits.find(0, sa, sb) < 0:
                # Every page of the range carries data: one store, no run
                # splitting (the scattered pages of a dirty pass are ranges
                # of a page or a few, so this is per page there).
                end = first + n
                populated = written.find(0, first, end) < 0
                self.strategy.write_data(first * PAGE_SIZE, data[pos : pos + n * PAGE_SIZE], populated)
                pos += n * PAGE_SIZE
                if not populated:
                    written[first:end] = b"\x01" * n
                self.on_write(first, end)
                continue
            for a, b in runs(landed_bits[sa:sb], 1):
                lo, hi = sa + a, sa + b
                if data_bits.find(1, lo, hi) < 0:
                    self._zero_run(first + a, first + b)
                    continue
                parts, prev_end = [], 0
                for x, y in runs(data_bits[lo:hi], 1):
                    if x > prev_end:  # zero pages before this data run
                        parts.append(_zeros(x - prev_end))
                    parts.append(data[pos : pos + (y - x) * PAGE_SIZE])
                    pos += (y - x) * PAGE_SIZE
                    prev_end = y
                if prev_end < hi - lo:  # zero pages after the last data run
                    parts.append(_zeros(hi - lo - prev_end))
                start, end = first + lo - sa, first + hi - sa
                if len(parts) == 1:
                    self.strategy.write_data(start * PAGE_SIZE, parts[0])
                else:
                    self.strategy.write_data_parts(start * PAGE_SIZE, parts)
                self.written[start:end] = b"\x01" * (end - start)
                self.on_write(start, end)

    def _zero_run(self, first: int, end: int) -> None:
        """Guest pages [first, end) are zero: write them only over earlier data."""
        if first < end and self.written.find(1, first, end) >= 0:
            self.strategy.write_data(first * PAGE_SIZE, bytes((end - first) * PAGE_SIZE))
            self.on_write(first, end)

    def _tag_run(self, page_of, a, b, tags):
        off = 0
        for first, n in self._page_runs(page_of, a, b):
            self.strategy.write_tags(first, tags[off : off + n * PACKED_TAGS_PER_PAGE])
            self.has_tags[first : first + n] = b"\x01" * n
            self.on_write(first, first + n)
            off += n * PACKED_TAGS_PER_PAGE

    def _untag_run(self, page_of, a, b):
        for first, n in self._page_runs(page_of, a, b):
            for x, y in runs(bytes(self.has_tags[first : first + n]), 1):
                self.strategy.clear_tags(first + x, y - x)
                self.has_tags[first + x : first + y] = bytes(y - x)
                self.on_write(first + x, first + y)
