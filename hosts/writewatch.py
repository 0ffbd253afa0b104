"""Which pages of guest RAM were written, from the host kernel's page tables.

A userfaultfd registered in write-protect mode with ``UFFD_FEATURE_WP_ASYNC``
(Linux 6.7) write-protects RAM in this process's page tables; the first store
to a protected page is let through by the kernel itself, with no fault to
handle, and the page table entry remembers it.  ``PAGEMAP_SCAN`` (the same
release) on /proc/self/pagemap lists the pages written since and protects
them again in the same walk, so a store racing with the scan is either in
this answer or in the next.  Walking 1 GiB takes about a millisecond; each
first store after a scan costs a fault (about 1.5 us).

It is a second record of writes, kept by the host's MMU: independent of
KVM's dirty log, of the VMM's bitmap and of the tag strategies, which is
what the source's validation digest needs to skip re-reading unwritten RAM
after the pause.  It sees stores through this process's mapping only: data
put in by a system call on the file (pwrite, fallocate) or through another
process's mapping of the memfd is invisible to it, so GuestMemory stores
through the mapping while watched and refuses to punch holes.
"""

import ctypes
import fcntl
import os
import platform
import struct
import threading

from .constants import PAGE_SIZE

_NR_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "arm64": 282}.get(platform.machine())


def _iowr(kind: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | nr


_UFFD_API = 0xAA
_UFFDIO_API = _iowr(0xAA, 0x3F, 24)
_UFFDIO_REGISTER = _iowr(0xAA, 0x00, 32)
_UFFDIO_WRITEPROTECT = _iowr(0xAA, 0x06, 24)
_UFFD_USER_MODE_ONLY = 1  # no privilege needed for faults taken in user mode
_FEATURE_WP_SHMEM = 1 << 12  # write-protect on shmem (memfd, tmpfs)
_FEATURE_WP_UNPOPULATED = 1 << 13  # pages never populated are protected too
_FEATURE_WP_ASYNC = 1 << 15  # the kernel resolves the fault itself
_FEATURES = _FEATURE_WP_SHMEM | _FEATURE_WP_UNPOPULATED | _FEATURE_WP_ASYNC
_REGISTER_MODE_WP = 1 << 1
_WRITEPROTECT_MODE_WP = 1 << 0

_PAGEMAP_SCAN = _iowr(ord("f"), 16, 96)
_PM_SCAN_WP_MATCHING = 1 << 0  # protect again what matched
_PM_SCAN_CHECK_WPASYNC = 1 << 1  # fail unless the range is registered WP_ASYNC
_PAGE_IS_WRITTEN = 1 << 1
_REGIONS = 4096  # page runs a scan call returns at most (72 KiB of vector)


class WatchUnavailable(Exception):
    """This kernel or host cannot watch writes; the message says why."""


def _address_of(mapping) -> int:
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


class WriteWatch:
    """Write-protects ``mapping`` (a shared mmap of ``size`` bytes, a whole
    number of pages) now, and tells which of its pages were written since
    (``written``), each standing for ``scale`` pages of the caller's (the
    tag storage: a page of it holds the tags of 32 pages of RAM), up to
    ``limit``."""

    def __init__(
        self, mapping, size: int, scale: int = 1, limit: int | None = None, step: int | None = None, background=True
    ):
        """``step``: protect RAM that many bytes at a time, from its start,
        in a thread of the watch's own (see ``wait_protected``), rather
        than all of it now -- 17 ms a GiB of 4 KiB pages, which a source
        otherwise spends before its first page goes out, while the
        destination has nothing to do.  Only what is protected is watched:
        ``written`` reports nothing beyond ``protected``.  ``background``
        False: no thread; the caller protects with ``protect_next``."""
        self._scale, self._limit = scale, (size // PAGE_SIZE) * scale if limit is None else limit
        self._cond = threading.Condition()
        self._closing, self._failure, self._thread = False, None, None
        self.protected = 0  # bytes from the start, write-protected and watched
        if _NR_USERFAULTFD is None:
            raise WatchUnavailable(f"no userfaultfd system call number known for {platform.machine()}")
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(_NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY)
        if fd < 0:
            raise WatchUnavailable(f"userfaultfd: {os.strerror(ctypes.get_errno())}")
        self._uffd, self._pagemap = fd, -1
        try:
            api = bytearray(struct.pack("QQQ", _UFFD_API, _FEATURES, 0))
            try:
                fcntl.ioctl(fd, _UFFDIO_API, api)
            except OSError as exc:
                raise WatchUnavailable(
                    f"userfaultfd lacks asynchronous write-protect on shared memory (Linux 6.7): {exc.strerror}"
                ) from None
            self._start, self._size = _address_of(mapping), size
            try:
                fcntl.ioctl(
                    fd, _UFFDIO_REGISTER, bytearray(struct.pack("QQQQ", self._start, size, _REGISTER_MODE_WP, 0))
                )
                self._step = size if step is None else min(size, max(PAGE_SIZE, step // PAGE_SIZE * PAGE_SIZE))
                self.protect_next()
            except OSError as exc:
                raise WatchUnavailable(f"write-protecting guest RAM: {exc.strerror}") from None
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            self._vec = (ctypes.c_uint64 * (3 * _REGIONS))()
            try:
                self.written()
            except OSError as exc:
                raise WatchUnavailable(f"PAGEMAP_SCAN (Linux 6.7): {exc.strerror}") from None
            if self.protected < size and step is not None and background:
                self._thread = threading.Thread(target=self._protect_rest, name="write-watch-protect", daemon=True)
                self._thread.start()
        except BaseException:
            self.close()
            raise

    def protect_next(self) -> bool:
        """Write-protect the next ``step`` bytes; False once all are."""
        with self._cond:
            at = self.protected
            if at >= self._size or self._closing:
                return False
            n = min(self._step, self._size - at)
            # Under the lock: close() waits for a step under way, and a
            # scan never walks a range half protected.
            fcntl.ioctl(
                self._uffd,
                _UFFDIO_WRITEPROTECT,
                bytearray(struct.pack("QQQ", self._start + at, n, _WRITEPROTECT_MODE_WP)),
            )
            self.protected = at + n
            self._cond.notify_all()
            return True

    def _protect_rest(self) -> None:
        try:
            while self.protect_next():
                pass
        except OSError as exc:
            with self._cond:
                self._failure = exc
                self._cond.notify_all()

    def wait_protected(self, end: int, timeout: float | None = None) -> bool:
        """Wait until the first ``end`` bytes are protected (watched from
        then on); False if protection stopped short of them (a failure, or
        the watch closed) or ``timeout`` ran out."""
        with self._cond:
            self._cond.wait_for(lambda: self.protected >= end or self._failure is not None or self._closing, timeout)
            return self.protected >= end

    def written(self) -> list[tuple[int, int]]:
        """Runs [first page, end page) written since the last call (since
        the watch began, the first time); they are protected again."""
        with self._cond:  # (a protection step is never half done here)
            return self._scan(self._start + self.protected)

    def _scan(self, end: int) -> list[tuple[int, int]]:
        out, at = [], self._start
        vec = memoryview(self._vec).cast("B").cast("Q")
        while at < end:
            arg = bytearray(
                struct.pack(
                    "12Q",
                    96,
                    _PM_SCAN_WP_MATCHING | _PM_SCAN_CHECK_WPASYNC,
                    at,
                    end,
                    0,  # walk_end, set by the kernel
                    ctypes.addressof(self._vec),
                    _REGIONS,
                    0,  # max_pages: no limit
                    0,  # category_inverted
                    _PAGE_IS_WRITTEN,  # category_mask: all of these ...
                    0,  # category_anyof_mask
                    _PAGE_IS_WRITTEN,  # return_mask
                )
            )
            n = fcntl.ioctl(self._pagemap, _PAGEMAP_SCAN, arg)
            starts, ends = vec[0 : 3 * n : 3].tolist(), vec[1 : 3 * n : 3].tolist()
            base, k, top = self._start, self._scale, self._limit
            out.extend(
                ((a - base) // PAGE_SIZE * k, min((b - base) // PAGE_SIZE * k, top)) for a, b in zip(starts, ends)
            )
            walked = struct.unpack_from("Q", arg, 32)[0]
            if walked <= at:  # the kernel made no progress: do not spin
                raise OSError(0, "PAGEMAP_SCAN made no progress")
            at = walked
        return out

    def close(self) -> None:
        """Closing the userfaultfd unregisters it: RAM is writable as before."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self._pagemap >= 0:
            os.close(self._pagemap)
            self._pagemap = -1
        if self._uffd >= 0:
            os.close(self._uffd)
            self._uffd = -1
