"""Guest RAM and its MTE tag storage, as the host kernel holds them.

Both live in tmpfs files mapped shared -- memfds, or for RAM on huge pages a
file in a tmpfs of our own (hugemem.py) -- so RAM the guest never touched
costs no host memory, and which pages were ever populated can be asked of the
file with SEEK_DATA / SEEK_HOLE -- the simulated equivalent of what mincore or
/proc/PID/pagemap tell a real VMM.  Tag storage is RAM/32 bytes, packed two
tags per byte; ``tagged`` is the per-page PG_mte_tagged flag.
"""

import ctypes
import mmap
import os
import threading

from .constants import GRANULES_PER_PAGE, PACKED_TAGS_PER_PAGE, PAGE_SIZE
from .hugemem import huge_page_file, small_pages
from .tags import all_zero
from .writewatch import WriteWatch

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
# Stores at least this large that start in never-populated RAM go through
# pwrite() (see GuestMemory.write).
_PWRITE_MIN = 4096  # a pwrite beats a page fault per page already for one page
_MEMCPY_POPULATED_MAX = 16 * PAGE_SIZE  # up to here a memcpy into populated pages beats the system call

try:  # fallocate(2) with FALLOC_FL_PUNCH_HOLE (os has only posix_fallocate)
    _fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    _fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
    _fallocate.restype = ctypes.c_int
except (OSError, AttributeError):
    _fallocate = None
_PUNCH_HOLE_KEEP_SIZE = 0x02 | 0x01

try:  # mincore(2): which pages of a mapping are in memory, without touching them
    _mincore = ctypes.CDLL(None, use_errno=True).mincore
    _mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    _mincore.restype = ctypes.c_int
except (OSError, AttributeError):
    _mincore = None


def populate(mapping: mmap.mmap, fd: int, offset: int, length: int) -> None:
    """Populate a range of a shared file mapping, as -mem-prealloc does:
    every page allocated, zeroed where new, and touched now
    (MADV_POPULATE_WRITE; before Linux 5.14, a store of zeros, so for RAM
    not used yet)."""
    try:
        mapping.madvise(MADV_POPULATE_WRITE, offset, length)
    except OSError:
        zeros = bytes(min(length, 2 << 20))
        for at in range(offset, offset + length, len(zeros)):
            os.pwrite(fd, zeros[: offset + length - at], at)


#: pages populated_ranges asks mincore() about at once, at first and at most
#: (2 MiB, and 256 MiB: a 64 KiB answer)
RESIDENCY_WINDOW = (1 << 9, 1 << 16)


def _runs_of(flags: bytes, value: int):
    """Runs [a, b) of bytes equal to ``value``, one find per run."""
    other, pos, n = 1 - value, 0, len(flags)
    while True:
        a = flags.find(value, pos)
        if a < 0:
            return
        b = flags.find(other, a)
        b = n if b < 0 else b
        yield a, b
        pos = b


def _address_of(mapping: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # no export left behind: the mapping can still be closed


class GuestMemory:
    def __init__(self, size: int, name: str = "guest-ram", huge_pages: bool | str = False):
        """``huge_pages``: back RAM with a tmpfs file that takes its pages
        2 MiB at a time (hugemem.py) if this host can, a memfd otherwise:
        "auto" (or True) only where it can be switched to 4 KiB pages later
        (use_small_pages), "on" by any route, for good.  Writing one 4 KiB
        page then populates its whole 2 MiB, so the page ranges below come
        in 2 MiB steps: no use to userfaultfd, which needs a hole for each
        missing 4 KiB page."""
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"guest RAM size must be a positive multiple of {PAGE_SIZE}, got {size}")
        self.size = size
        self.npages = size // PAGE_SIZE
        self._huge_for_good = huge_pages == "on"
        fd, self._mount_fd, why = (
            huge_page_file(size, namespace=self._huge_for_good) if huge_pages else (None, None, "not asked for")
        )
        #: "huge" (2 MiB pages) or "4k"; ``backing_note`` says how, or why not huge
        self.backing, self.backing_note = ("huge", why) if fd is not None else ("4k", why)
        self._data_fd = fd if fd is not None else os.memfd_create(name, os.MFD_CLOEXEC)
        self._tags_fd = os.memfd_create(name + "-tags", os.MFD_CLOEXEC)
        os.ftruncate(self._data_fd, size)
        os.ftruncate(self._tags_fd, self.npages * PACKED_TAGS_PER_PAGE)
        self._data_map = mmap.mmap(self._data_fd, size)
        # pwrite() on one tmpfs file takes its inode lock, and a second writer
        # spins on that lock while the first copies: wait here instead,
        # asleep (measured: 15 % of a destination's CPU spinning at 4 GiB).
        self._write_lock = threading.Lock()
        self._tags_map = mmap.mmap(self._tags_fd, self.npages * PACKED_TAGS_PER_PAGE)
        self._data_address = _address_of(self._data_map) if _mincore is not None else None
        #: pages allocated ahead of use (prefault), zero and in memory
        self._prefaulted = bytearray(self.npages)
        #: guest RAM bytes; the kernel's direct view (the linear map)
        self.data = memoryview(self._data_map)
        #: packed tag storage, PACKED_TAGS_PER_PAGE bytes per page
        self.tags = memoryview(self._tags_map)
        #: PG_mte_tagged, one byte per page (0 or 1)
        self.tagged = bytearray(self.npages)
        #: write watches open on RAM: while there is one, every store goes
        #: through the mapping, where the watch sees it (see writewatch.py)
        self._watches = 0

    def use_small_pages(self) -> str | None:
        """Switch RAM on huge pages to 4 KiB pages, for postcopy: possible
        while nothing was stored yet.  None when done (or nothing to do),
        else why not."""
        if self.backing != "huge":
            return None
        if self._huge_for_good:
            return "huge pages were asked for (--huge-pages on)"
        if self._prefaulted.find(1) >= 0:
            return "it was preallocated on huge pages (--prealloc)"
        if self.next_data(0) < self.npages:
            return "pages are already stored on huge pages"
        try:
            small_pages(self._mount_fd)
        except OSError as exc:
            return f"the mount could not be switched: {exc.strerror or exc}"
        self.backing, self.backing_note = "4k", "huge pages turned off for postcopy"
        return None

    # -- which pages exist -------------------------------------------------
    def populated_ranges(self, first_page: int = 0, end_page: int | None = None) -> list[tuple[int, int]]:
        """Page ranges [start, end) that hold host memory: never reads (and
        so never populates) a page.  SEEK_DATA skips what holds nothing;
        from there mincore() is asked a window at a time, and the pages it
        reports resident hold data.  Where it reports none, SEEK_DATA and
        SEEK_HOLE decide (a page swapped out is data there, not resident).
        One mincore() for 1 GiB took 0.4-0.6 ms where SEEK_HOLE, which scans
        populated RAM to the next hole, took 10-13 ms -- at the start of the
        bulk pass, before the first page went out.  The window starts at
        2 MiB and doubles while every page in it is resident, so a sparse
        guest asks little beyond the pages it has."""
        end_page = self.npages if end_page is None else end_page
        ranges: list[tuple[int, int]] = []
        at, window = first_page, RESIDENCY_WINDOW[0]
        while at < end_page:
            at = self.next_data(at)
            if at >= end_page:
                break
            stop = min(at + window, end_page)
            resident = self.resident_pages(at, stop)
            if resident is None:
                found = self.seek_ranges(at, stop)
            else:
                found = [(at + a, at + b) for a, b in _runs_of(resident, 1)]
                for a, b in _runs_of(resident, 0):
                    found += self.seek_ranges(at + a, at + b)
                found.sort()
            full = resident is not None and resident.find(0) < 0
            window = min(window * 2, RESIDENCY_WINDOW[1]) if full else RESIDENCY_WINDOW[0]
            for a, b in found:  # in order, none overlapping: join the adjacent
                if ranges and a == ranges[-1][1]:
                    ranges[-1] = (ranges[-1][0], b)
                else:
                    ranges.append((a, b))
            at = stop
        return ranges

    def seek_ranges(self, first_page: int = 0, end_page: int | None = None) -> list[tuple[int, int]]:
        """As populated_ranges, from SEEK_DATA/SEEK_HOLE alone."""
        end_page = self.npages if end_page is None else end_page
        ranges: list[tuple[int, int]] = []
        offset, limit = first_page * PAGE_SIZE, end_page * PAGE_SIZE
        while offset < limit:
            try:
                start = os.lseek(self._data_fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            if start >= limit:
                break
            hole = min(os.lseek(self._data_fd, start, os.SEEK_HOLE), limit)
            ranges.append((start // PAGE_SIZE, -(-hole // PAGE_SIZE)))
            offset = hole
        return ranges

    def next_data(self, first_page: int) -> int:
        """The first page at or after ``first_page`` that holds data (one
        SEEK_DATA), or ``npages`` if none does."""
        try:
            return min(os.lseek(self._data_fd, first_page * PAGE_SIZE, os.SEEK_DATA) // PAGE_SIZE, self.npages)
        except OSError:  # ENXIO: no data at or after the offset
            return self.npages

    def has_data(self, first_page: int, end_page: int) -> bool:
        """Whether any page in the range was ever populated (one SEEK_DATA)."""
        return self.next_data(first_page) < end_page

    def prefaulted(self, first_page: int, end_page: int) -> bool:
        """Whether prefault() populated every page of the range."""
        return self._prefaulted.find(0, first_page, end_page) < 0

    def stores_in_place(self, first_page: int, end_page: int) -> bool:
        """Whether a receiver should store this range's data through the
        mapping rather than write it into the file: RAM allocated ahead
        (prefault), where a store is a copy and nothing else, or RAM on huge
        pages, where a first store faults in 2 MiB at once.  Stores through
        the mapping take no lock, so two receivers fill fresh RAM at once,
        where their writes into the file queue on its inode lock: with fresh
        memory that a hypervisor took back, the time to fault each page in
        is what they then share (1 GiB image, default settings: 0.49-0.77x)."""
        return self.backing == "huge" or self.prefaulted(first_page, end_page)

    def fully_populated(self, first_page: int, end_page: int) -> bool:
        """Whether every page in the range holds host memory, so that reading
        it through the mapping allocates nothing.  Asks mincore(), which
        costs per page asked; SEEK_HOLE would scan the file up to the next
        hole, the end of a fully populated file.  False when unsure."""
        if not 0 <= first_page < end_page <= self.npages:
            return False
        return self._prefaulted.find(0, first_page, end_page) < 0 or self.all_resident(first_page, end_page)

    def all_resident(self, first_page: int, end_page: int) -> bool:
        """Whether mincore() reports every page in the range in memory (so
        it holds data).  False when unsure."""
        if self._data_address is None or not 0 <= first_page < end_page <= self.npages:
            return False
        vec = ctypes.create_string_buffer(end_page - first_page)
        if _mincore(self._data_address + first_page * PAGE_SIZE, (end_page - first_page) * PAGE_SIZE, vec) != 0:
            return False
        return vec.raw.find(b"\0") < 0  # bit 0 set in every byte (the other bits are reserved, 0)

    def resident_pages(self, first_page: int = 0, end_page: int | None = None) -> bytes | None:
        """One byte per page of the range, 1 where mincore() reports the page
        in memory (as all_resident), from one system call; None when unsure.
        Asking once for all of RAM costs a few ms a GiB where a call per
        1 MiB chunk cost about three times that, and SEEK_HOLE, which scans
        a fully populated file to its end, ten times that."""
        end_page = self.npages if end_page is None else end_page
        if self._data_address is None or not 0 <= first_page < end_page <= self.npages:
            return None
        vec = ctypes.create_string_buffer(end_page - first_page)
        if _mincore(self._data_address + first_page * PAGE_SIZE, (end_page - first_page) * PAGE_SIZE, vec) != 0:
            return None
        return vec.raw  # bit 0 of each byte (the other bits are reserved, 0)

    def is_view_of(self, view, offset: int) -> bool:
        """Whether ``view`` is this RAM's own storage at byte ``offset`` (the
        very bytes, not a copy), checked by address: lets a reader that was
        handed a view elsewhere trust it as a direct read of kernel memory."""
        if (
            not isinstance(view, memoryview)
            or view.obj is not self._data_map
            or self._data_address is None
            or view.readonly
            or not view.c_contiguous
        ):
            return False
        anchor = ctypes.c_char.from_buffer(view)
        try:
            return ctypes.addressof(anchor) == self._data_address + offset
        finally:
            del anchor

    def read_into(self, offset: int, buf) -> int:
        """Copy RAM at ``offset`` into ``buf`` with pread(): a page that was
        never populated reads as zeros and stays unpopulated (a load through
        the mapping would allocate it)."""
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self._data_fd, [view[done:]], offset + done)
            if n == 0:
                view[done:] = bytes(len(view) - done)
                break
            done += n
        return len(view)

    def populated_pages(self) -> int:
        return sum(e - s for s, e in self.populated_ranges())

    @property
    def write_lock(self):
        """Held by every writer of the backing file (see __init__): a
        receiver that splices into it takes it too."""
        return self._write_lock

    @property
    def data_fd(self) -> int:
        """The backing file: a receiver may splice(2) page data into it."""
        return self._data_fd

    def map_populated(self) -> None:
        """Map every populated page into this process's page tables (no
        allocation, no copy).  A running guest's memory is mapped in its VMM,
        which shares the guest's address space; pages this simulation filled
        with pwrite() were not, so the VMM's first read of each would fault
        (1 GiB: 0.13 s of copying instead of 0.06, under the GIL)."""
        for a, b in self.populated_ranges():
            try:
                self._data_map.madvise(MADV_POPULATE_READ, a * PAGE_SIZE, (b - a) * PAGE_SIZE)
            except OSError:
                return  # a kernel before 5.14: the faults come later instead

    def prefault(self, first_page: int, end_page: int) -> None:
        """Allocate and touch host memory for a range of RAM not used yet,
        as a VMM's -mem-prealloc does: every page is populated now, zeroed
        and mapped, so landing a page later costs a copy and nothing else
        (what the range held is not kept).  fallocate() alone is not
        enough: tmpfs leaves fallocated pages untouched until written, and a
        hypervisor that took back free guest memory (free page reporting)
        then faults each one in during the copy (measured here: 1 GiB of
        writes 0.25-0.35 s instead of 0.15)."""
        with self._write_lock:
            populate(self._data_map, self._data_fd, first_page * PAGE_SIZE, (end_page - first_page) * PAGE_SIZE)
        self._prefaulted[first_page:end_page] = b"\x01" * (end_page - first_page)

    def punch(self, first_page: int, end_page: int) -> None:
        """fallocate(PUNCH_HOLE): the pages hold no memory any more (they
        read as zeros; SEEK_DATA and mincore see holes).  Refused while a
        write watch is open: it would not see the pages change."""
        if self._watches:
            raise RuntimeError("cannot punch holes in guest RAM while its writes are watched")
        offset, length = first_page * PAGE_SIZE, (end_page - first_page) * PAGE_SIZE
        if _fallocate is not None and _fallocate(self._data_fd, _PUNCH_HOLE_KEEP_SIZE, offset, length) == 0:
            return
        self.data[offset : offset + length] = bytes(length)  # no hole punching here: at least the zeros

    def unmap(self, first_page: int, end_page: int) -> None:
        """madvise(MADV_DONTNEED) on this shared mapping: the page-table
        entries go, the data stays in the memfd (what zapping the guest's
        mapping of pages costs a VMM that makes them fault again)."""
        self._data_map.madvise(mmap.MADV_DONTNEED, first_page * PAGE_SIZE, (end_page - first_page) * PAGE_SIZE)

    def fault_in(self, first_page: int, end_page: int) -> int:
        """Allocate the never-populated pages of a range as a fault on them
        would (a zeroed page, data for SEEK_DATA from then on), leaving
        populated ones alone; returns how many pages needed a new page (those
        allocated ahead by prefault are not counted: they existed).  Asks
        mincore() which pages hold memory: its cost is per page asked, while
        SEEK_HOLE scans the file up to the next hole, which in a fully
        populated guest is the end of RAM (a call per 256 pages then made a
        1 GiB bulk pass three times slower)."""
        holes = self._missing(first_page, end_page)
        for a, b in holes:
            try:
                self._data_map.madvise(MADV_POPULATE_WRITE, a * PAGE_SIZE, (b - a) * PAGE_SIZE)
            except OSError:  # a kernel before 5.14: a store of zeros allocates as well
                with self._write_lock:
                    for page in range(a, b):
                        os.pwrite(self._data_fd, bytes(PAGE_SIZE), page * PAGE_SIZE)
        return sum(self._prefaulted.count(0, a, b) for a, b in holes)

    def _missing(self, first_page: int, end_page: int) -> list[tuple[int, int]]:
        """Runs [a, b) of pages in the range that hold no memory yet."""
        if self._data_address is not None and 0 <= first_page < end_page <= self.npages:
            vec = ctypes.create_string_buffer(end_page - first_page)
            if _mincore(self._data_address + first_page * PAGE_SIZE, (end_page - first_page) * PAGE_SIZE, vec) == 0:
                # bit 0 of each byte: resident (the other bits are reserved, 0)
                return [(first_page + a, first_page + b) for a, b in _runs_of(vec.raw, 0)]
        holes, pos = [], first_page  # no mincore: ask the file
        for a, b in self.populated_ranges(first_page, end_page):
            if a > pos:
                holes.append((pos, a))
            pos = b
        if pos < end_page:
            holes.append((pos, end_page))
        return holes

    # -- storing -------------------------------------------------------------
    def write(self, offset: int, data, populated: bool = False) -> None:
        """Store ``data`` at RAM byte ``offset``.  A small store is a memcpy
        into the mapping; a large one is a pwrite() on the backing file: the
        same bytes land in the same (shared) pages, and never-populated pages
        are allocated without a page fault each (about half the cost of
        first-touch faults on tmpfs), while populated ones are a plain copy.
        ``populated``: the caller knows every page was written before, so a
        store of a few pages is a memcpy too (0.3 us a page against 1.2 us
        for a pwrite: the scattered pages of a dirty pass)."""
        n = len(data)
        if n >= _PWRITE_MIN and not (populated and n <= _MEMCPY_POPULATED_MAX):
            view = memoryview(data).cast("B")
            fd = self._data_fd
            with self._write_lock:
                if not self._watches:  # asked under the lock: see watch_writes
                    while view:
                        k = os.pwrite(fd, view, offset)
                        view, offset = view[k:], offset + k
                    return
        self.data[offset : offset + n] = data

    def write_parts(self, offset: int, parts) -> None:
        """Store consecutive buffers at RAM byte ``offset``: one pwritev() per
        IOV_MAX buffers, so a run of pages gathered from several places (data
        runs and shared zero pages) lands in one system call, not one per part."""
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        total = sum(len(v) for v in views)
        if total < _PWRITE_MIN or self._watches:
            for v in views:
                self.write(offset, v)
                offset += len(v)
            return
        fd, limit = self._data_fd, os.sysconf("SC_IOV_MAX")
        while views:
            group = views[:limit]
            want = sum(len(v) for v in group)
            with self._write_lock:
                done = os.pwritev(fd, group, offset)
            offset += done
            if done == want:
                views = views[limit:]
                continue
            # A short write: drop what landed and go on from there.
            while done >= len(views[0]):
                done -= len(views.pop(0))
            views[0] = views[0][done:]

    # -- watching ------------------------------------------------------------
    def watch_writes(self, step: int | None = None) -> "WriteWatch":
        """A WriteWatch over RAM, open from now until ``unwatch_writes``:
        which pages are written from here on, as the host's page tables
        record it (``step``: protected that many bytes at a time, in the
        background; see WriteWatch).  Raises WatchUnavailable (with why)
        where the kernel cannot.  Stores go through the mapping from before
        the watch begins: a pwrite() already under way finishes first (it
        holds the lock)."""
        with self._write_lock:
            self._watches += 1
        try:
            return WriteWatch(self._data_map, self.size, step=step)
        except BaseException:
            with self._write_lock:
                self._watches -= 1
            raise

    def unwatch_writes(self, watch: "WriteWatch") -> None:
        watch.close()
        with self._write_lock:
            self._watches -= 1

    def watch_tag_writes(self) -> "WriteWatch":
        """A WriteWatch over the tag storage, in pages of RAM: every tag
        store (and every change of PG_mte_tagged, which comes with one)
        goes through its mapping.  Close it with ``close()``."""
        size = -(-self.npages * PACKED_TAGS_PER_PAGE // PAGE_SIZE) * PAGE_SIZE
        return WriteWatch(self._tags_map, size, scale=PAGE_SIZE // PACKED_TAGS_PER_PAGE, limit=self.npages)

    # -- loading -------------------------------------------------------------
    def load_image(self, path: str, offset: int = 0, repeat: bool = False) -> int:
        """Copy a raw image file into RAM at byte ``offset`` (page aligned);
        with ``repeat`` the image is repeated until RAM is full.  Reads land
        in place; an all-zero 1 MiB chunk is not written, so it stays
        unpopulated as it would in a VMM that maps a sparse image.  Returns
        the bytes of RAM the image covers."""
        if offset % PAGE_SIZE or not 0 <= offset < self.size:
            raise ValueError(f"image offset {offset} must be page aligned and inside RAM")
        chunk = bytearray(1 << 20)
        pos = offset
        with open(path, "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ValueError(f"image {path} is empty")
            while pos < self.size:
                n = f.readinto(memoryview(chunk)[: min(len(chunk), self.size - pos)])
                if n == 0:
                    if not repeat:
                        break
                    f.seek(0)
                    continue
                if not all_zero(memoryview(chunk)[:n]):
                    self.data[pos : pos + n] = memoryview(chunk)[:n]
                pos += n
            # The image is in guest RAM now: its page cache would only crowd
            # out the memory the guest (and a migration) allocates next.
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return pos - offset

    # -- helpers -------------------------------------------------------------
    def page_tags(self, page: int) -> memoryview:
        o = page * PACKED_TAGS_PER_PAGE
        return self.tags[o : o + PACKED_TAGS_PER_PAGE]

    @staticmethod
    def granule_of(offset: int) -> int:
        return offset // (PAGE_SIZE // GRANULES_PER_PAGE)

    def close(self) -> None:
        for view in (self.data, self.tags):
            view.release()
        for mapping in (self._data_map, self._tags_map):
            try:
                mapping.close()
            except BufferError:
                # A view handed out earlier (VmmMapping.read returns one) is
                # still alive; the mapping is unmapped when the last one goes.
                pass
        os.close(self._data_fd)
        os.close(self._tags_fd)
        if self._mount_fd is not None:
            os.close(self._mount_fd)
            self._mount_fd = None
