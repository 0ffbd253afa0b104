import functools
import threading
import time

from hosts import KVM_ARM_TAGS_FROM_GUEST, KVM_ARM_TAGS_TO_GUEST, PAGE_SIZE
from hosts import tags as tagops
from hosts.constants import GRANULES_PER_PAGE
from migrate.strategies.base import TagStrategy


@functools.lru_cache(maxsize=8)
def _zero_packed(npages: int) -> bytes:
    return bytes(npages * 128)


class TagIoctl(TagStrategy):
    """The VMM's mapping stays untagged; tags move through
    KVM_ARM_MTE_COPY_TAGS, one call per ``tag_batch_pages`` pages, one byte
    per granule in the buffer, packed to 4 bits for the wire."""

    name = "tag-ioctl"
    description = "untagged VMM mapping; tags via KVM_ARM_MTE_COPY_TAGS in batches (Linux 5.14+)"

    def __init__(self, host, config):
        super().__init__(host, config)
        self.batch = config.tag_batch_pages
        self._local = threading.local()  # one ioctl buffer per data channel thread

    @property
    def _buffer(self) -> bytearray:
        buf = getattr(self._local, "buffer", None)
        if buf is None:
            buf = self._local.buffer = bytearray(self.batch * GRANULES_PER_PAGE)
        return buf

    def _calls(self, first_page, npages):
        """(ipa, pages, buffer view) for each ioctl covering a page run."""
        for start in range(first_page, first_page + npages, self.batch):
            n = min(self.batch, first_page + npages - start)
            yield self.vm.page_to_ipa(start), n

    #: pages of clean gap worth fetching to save a system call: by the cost
    #: model (migrate/tools/costmodel.toml) a call costs 300 ns and a page fetched
    #: for nothing 66 ns (a kernel page-tag read, 256 bytes copied), so a gap
    #: pays up to 4 pages.  (It was 32: a dirty pass with one page in 17
    #: dirty then fetched ~15 pages of tags per page it needed.)
    MAX_GAP = 4

    def _spans(self, ranges):
        """Coalesce page ranges separated by small gaps into spans of at most
        ``tag_batch_pages``: one ioctl a span instead of one a range, which
        matters for the scattered pages of a dirty pass.  Yields
        (span_first, span_pages, [(first, count), ...])."""
        cur_first = cur_end = None
        parts = []
        for first, count in ranges:
            if cur_first is not None and first - cur_end <= self.MAX_GAP and first + count - cur_first <= self.batch:
                cur_end = first + count
                parts.append((first, count))
                continue
            if cur_first is not None:
                yield cur_first, cur_end - cur_first, parts
            if count > self.batch:  # a long run: whole calls of its own
                for start in range(first, first + count, self.batch):
                    n = min(self.batch, first + count - start)
                    yield start, n, [(start, n)]
                cur_first, parts = None, []
            else:
                cur_first, cur_end, parts = first, first + count, [(first, count)]
        if cur_first is not None:
            yield cur_first, cur_end - cur_first, parts

    def read_tags(self, ranges):
        if not self.vm.mte_enabled:
            return None  # a guest without MTE has no tags to move
        out_parts = []
        view = memoryview(self._buffer)
        for span_first, span_pages, parts in self._spans(ranges):
            out = view[: span_pages * GRANULES_PER_PAGE]
            self.vm.mte_copy_tags(self.vm.page_to_ipa(span_first), span_pages * PAGE_SIZE, out, KVM_ARM_TAGS_FROM_GUEST)
            # Untagged memory comes back as zeros: skip packing them.
            packed = _zero_packed(span_pages) if tagops.all_zero(out) else tagops.pack(out)
            if len(parts) == 1 and parts[0][1] == span_pages:
                out_parts.append(packed)
            else:
                for first, count in parts:
                    a = (first - span_first) * 128
                    out_parts.append(packed[a : a + count * 128])
        return b"".join(out_parts)

    def write_tags(self, first_page, packed):
        npages = len(packed) // 128
        if npages <= self.batch:  # one call (the scattered pages of a dirty pass)
            self.vm.mte_copy_tags(
                self.vm.page_to_ipa(first_page), npages * PAGE_SIZE, tagops.unpack(packed), KVM_ARM_TAGS_TO_GUEST
            )
            return
        packed = memoryview(packed)
        done = 0
        for ipa, n in self._calls(first_page, len(packed) // 128):
            unpacked = tagops.unpack(packed[done * 128 : (done + n) * 128])
            self.vm.mte_copy_tags(ipa, n * PAGE_SIZE, unpacked, KVM_ARM_TAGS_TO_GUEST)
            done += n

    def clear_tags(self, first_page, npages):
        for ipa, n in self._calls(first_page, npages):
            self.vm.mte_copy_tags(ipa, n * PAGE_SIZE, bytes(n * GRANULES_PER_PAGE), KVM_ARM_TAGS_TO_GUEST)

    # -- postcopy, as a VMM would do it today ---------------------------------------------
    postcopy_mode = "missing"
    postcopy_race = "UFFDIO_COPY maps the page, KVM_ARM_MTE_COPY_TAGS stores its tags only afterwards"

    def place_postcopy(self, uffd, page, data, packed_tags):
        """UFFDIO_COPY, then KVM_ARM_MTE_COPY_TAGS TO_GUEST: two system calls.
        The page is live after the first, with tags the guest's first access
        clears; between the two, other CPUs run (the GIL is let go here as a
        real kernel entry lets the vCPUs on other cores go on), and a vCPU
        that was waiting for the page can see the wrong tags."""
        uffd.copy(page, data)
        if packed_tags is not None and not tagops.all_zero(packed_tags):
            time.sleep(0)
            self.write_tags(page, packed_tags)
