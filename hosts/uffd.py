"""A simulated userfaultfd over guest RAM, for postcopy.

Registered on the whole of guest RAM, in MISSING mode (a page not present
to the guest faults; ``copy`` or ``zeropage`` resolves it with a new page)
or MINOR mode (the page may sit in the memfd already, written through the
VMM's own mapping; ``continue_`` maps it for the guest).  A guest access to
a page that is not present blocks that vCPU until the page is resolved; the
fault is queued as an event and a byte is written to a pipe, so the VMM can
poll ``fileno()`` as it would the real file descriptor.

What the real kernel does that matters here, and what this models:

- ``UFFDIO_COPY`` allocates a fresh page and copies the data in; the page's
  MTE tags are not part of the call.  The page is not PG_mte_tagged, so the
  guest's first stage-2 access clears its tags to zero (KVM's sanitising),
  whatever the VMM meant them to be.  Tags stored afterwards with
  ``KVM_ARM_MTE_COPY_TAGS`` land later, after the guest may have run.
- ``copy(..., tags=...)`` is the proposed ``UFFDIO_COPY`` flag that places
  data and tags in one step (a kernel extension suggested upstream; no
  kernel has it).
- ``UFFDIO_CONTINUE`` maps a page already in the page cache, with the tags
  that were stored there through a PROT_MTE mapping of the same memfd.
- ``fallocate(PUNCH_HOLE)``: ``punch`` drops pages (data and tags) and makes
  them not present again.
"""

import os
import threading
import time
from collections import deque

from .constants import PACKED_TAGS_PER_PAGE, PAGE_SIZE
from .errors import KernelError

MISSING, MINOR = "missing", "minor"


class GuestStopped(Exception):
    """A vCPU blocked on a missing page when its VM was torn down."""


def punch_pages(vm, ranges, then=None) -> None:
    """fallocate(PUNCH_HOLE) of every (first page, count) of ``ranges`` in
    guest RAM's memfd, a system call each: their data and tags are gone.
    A VMM may do it before registering a userfaultfd (the guest is not
    running there yet); a registered one then sees the pages missing."""
    mem = vm.memory
    with vm.mmu_lock:
        for first, count in ranges:
            end = first + count
            mem.punch(first, end)
            mem.tags[first * PACKED_TAGS_PER_PAGE : end * PACKED_TAGS_PER_PAGE] = bytes(count * PACKED_TAGS_PER_PAGE)
            mem.tagged[first:end] = bytes(count)
        if then is not None:  # under the same hold (a registered userfaultfd's bitmap)
            then()
    vm.counters.add("syscalls.fallocate_punch_hole", len(ranges))


def unmap_ranges(vm, ranges) -> None:
    """madvise(MADV_DONTNEED) of every range of the guest's mapping, a
    system call each: the page-table entries go, the memfd keeps the data."""
    mem = vm.memory
    with vm.mmu_lock:
        for first, count in ranges:
            mem.unmap(first, first + count)
    vm.counters.add("syscalls.madvise_dontneed", len(ranges))


class Userfaultfd:
    def __init__(self, vm, mode: str = MISSING):
        if mode not in (MISSING, MINOR):
            raise ValueError(f"userfaultfd mode must be {MISSING} or {MINOR}")
        self.vm = vm
        self.memory = vm.memory
        self.mode = mode
        npages = self.memory.npages
        #: 1 = present to the guest (mapped at stage 2); a 0 faults on access
        self.present = bytearray(b"\x01" * npages)
        self._cond = threading.Condition()
        self._events: deque[tuple[int, float]] = deque()
        self._pending: dict[int, float] = {}  # page -> when it first faulted, until resolved
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self.closed = False
        self.faults = 0  # fault events raised (one per missing page, however many vCPUs wait)
        self.latencies: list[float] = []  # seconds from fault to resolution, per faulted page

    # -- the VMM's side ---------------------------------------------------------
    def fileno(self) -> int:
        return self._rfd

    def drop(self, first_page: int, end_page: int) -> None:
        """Make pages not present (the postcopy switch: pages the destination
        does not hold, or must fetch again).  Their contents stay where they
        are until ``punch``."""
        with self._cond:
            self.present[first_page:end_page] = bytes(end_page - first_page)

    def drop_ranges(self, ranges) -> None:
        """``drop`` of every (first page, count) of ``ranges``, under one
        lock, with the system call per range a VMM makes to unmap them
        (MADV_DONTNEED: the memfd keeps their data for UFFDIO_CONTINUE)."""
        unmap_ranges(self.vm, ranges)
        self.mark_missing(ranges)

    def mark_missing(self, ranges) -> None:
        """Pages already discarded (``punch_pages`` or ``unmap_ranges``,
        possibly before this registration) fault from now on."""
        with self._cond:
            for first, count in ranges:
                self.present[first : first + count] = bytes(count)

    def read_events(self) -> list[int]:
        """Pages that faulted since the last call (the pipe drained)."""
        try:
            while os.read(self._rfd, 4096):
                pass
        except BlockingIOError:
            pass
        with self._cond:
            out = [page for page, _ in self._events]
            self._events.clear()
        return out

    def copy(self, page: int, data, tags=None) -> None:
        """UFFDIO_COPY of one or more whole pages at ``page``; ``tags``
        (packed, the proposal's flag) places their tags in the same step."""
        npages = len(data) // PAGE_SIZE
        if len(data) % PAGE_SIZE or not npages:
            raise KernelError("EINVAL", "UFFDIO_COPY takes whole pages")
        if tags is not None and len(tags) != npages * PACKED_TAGS_PER_PAGE:
            raise KernelError("EINVAL", "UFFDIO_COPY tags must cover the pages")
        self._need_holes(page, npages, "UFFDIO_COPY")
        self._place(page, npages, "uffd_copy", data, tags)

    def _need_holes(self, page: int, npages: int, call: str) -> None:
        """UFFDIO_COPY and UFFDIO_ZEROPAGE allocate the page: on shmem the
        kernel answers EEXIST when the memfd holds one there already (not
        punched, or brought back by a read through a mapping)."""
        if self.memory._missing(page, page + npages) != [(page, page + npages)]:
            raise KernelError("EEXIST", f"{call}: the memfd holds that page (punch it first)")

    def zeropage(self, page: int, npages: int = 1) -> None:
        self._need_holes(page, npages, "UFFDIO_ZEROPAGE")
        self._place(page, npages, "uffd_zeropage", bytes(npages * PAGE_SIZE), None)

    def continue_(self, page: int, npages: int = 1) -> None:
        """UFFDIO_CONTINUE (MINOR mode): map pages already in the memfd."""
        if self.mode != MINOR:
            raise KernelError("EINVAL", "UFFDIO_CONTINUE needs a MINOR registration")
        if self.memory._missing(page, page + npages):
            raise KernelError("ENOENT", "UFFDIO_CONTINUE on a page the memfd does not hold")
        self._place(page, npages, "uffd_continue", None, None)

    def punch(self, first_page: int, end_page: int) -> None:
        """fallocate(PUNCH_HOLE) on the memfd: the pages' data and tags are
        gone, and so is their stage-2 mapping."""
        self.punch_ranges([(first_page, end_page - first_page)])

    def punch_ranges(self, ranges) -> None:
        """``punch`` of every (first page, count) of ``ranges``: a system
        call each, under one hold of the locks."""
        punch_pages(self.vm, ranges, then=lambda: self.mark_missing(ranges))

    def _place(self, page: int, npages: int, call: str, data, tags) -> None:
        end = page + npages
        if page < 0 or end > len(self.present):
            raise KernelError("EINVAL", f"{call} outside the registered range")
        mem = self.memory
        with self.vm.mmu_lock, self._cond:
            if self.present.find(1, page, end) >= 0:
                raise KernelError("EEXIST", f"{call}: page already present")
            if data is not None:
                mem.write(page * PAGE_SIZE, data)
                if tags is not None:
                    mem.tags[page * PACKED_TAGS_PER_PAGE : end * PACKED_TAGS_PER_PAGE] = tags
                    mem.tagged[page:end] = b"\x01" * npages
                else:  # a fresh page: not PG_mte_tagged, its tags cleared at the first stage-2 access
                    mem.tagged[page:end] = bytes(npages)
            self.present[page:end] = b"\x01" * npages
            now = time.monotonic()
            for p in range(page, end):
                t = self._pending.pop(p, None)
                if t is not None:
                    self.latencies.append(now - t)
            self._cond.notify_all()
        self.vm.counters.add(f"syscalls.{call}")

    def close(self) -> None:
        """Tear down: every blocked vCPU gets GuestStopped."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- the guest's side ----------------------------------------------------------
    def wait_present(self, first_page: int, end_page: int) -> None:
        """Called on a guest access: block until every page of the range is
        present, raising a fault event for each missing one (once)."""
        present = self.present
        if present.find(0, first_page, end_page) < 0:
            return
        with self._cond:
            while True:
                missing = present.find(0, first_page, end_page)
                if missing < 0:
                    return
                if self.closed:
                    raise GuestStopped("the VM was torn down while a vCPU waited for a page")
                if missing not in self._pending:
                    self._pending[missing] = time.monotonic()
                    self._events.append((missing, self._pending[missing]))
                    self.faults += 1
                    try:
                        os.write(self._wfd, b"\x01")
                    except (BlockingIOError, OSError):
                        pass  # the pipe is full of unread wake-ups already: the VMM will look
                self._cond.wait(0.5)

    @property
    def missing_pages(self) -> int:
        return self.present.count(0)
