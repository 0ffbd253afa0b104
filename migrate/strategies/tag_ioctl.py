import functools
import threading

from hosts import KVM_ARM_TAGS_FROM_GUEST, KVM_ARM_TAGS_TO_GUEST, PAGE_SIZE
from hosts import tags as tagops
from hosts.constants import GRANULES_PER_PAGE

from .base import TagStrategy


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

    def read_tags(self, ranges):
        if not self.vm.mte_enabled:
            return None  # a guest without MTE has no tags to move
        parts = []
        view = memoryview(self._buffer)
        for first, count in ranges:
            for ipa, n in self._calls(first, count):
                out = view[:n * GRANULES_PER_PAGE]
                self.vm.mte_copy_tags(ipa, n * PAGE_SIZE, out, KVM_ARM_TAGS_FROM_GUEST)
                # Untagged memory comes back as zeros: skip packing them.
                parts.append(_zero_packed(n) if tagops.all_zero(out) else tagops.pack(out))
        return b"".join(parts)

    def write_tags(self, first_page, packed):
        packed = memoryview(packed)
        done = 0
        for ipa, n in self._calls(first_page, len(packed) // 128):
            unpacked = tagops.unpack(packed[done * 128:(done + n) * 128])
            self.vm.mte_copy_tags(ipa, n * PAGE_SIZE, unpacked, KVM_ARM_TAGS_TO_GUEST)
            done += n

    def clear_tags(self, first_page, npages):
        for ipa, n in self._calls(first_page, npages):
            self.vm.mte_copy_tags(ipa, n * PAGE_SIZE, bytes(n * GRANULES_PER_PAGE), KVM_ARM_TAGS_TO_GUEST)
