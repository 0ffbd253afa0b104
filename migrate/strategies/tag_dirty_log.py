from migrate.strategies.tag_ioctl import TagIoctl


class TagDirtyLog(TagIoctl):
    """PROPOSAL -- no public work has built it, and it needs a kernel
    interface that does not exist: a second, tags-only dirty log
    (KVM_GET_TAG_DIRTY_LOG).  With stage 2 able to trap tag stores apart from
    data stores (FEAT_MTE_PERM's NoTagAccess), a guest that retags memory
    without writing it (an MTE allocator's free) dirties only the tag log,
    and the VMM resends 128 bytes of tags instead of the whole page.
    Otherwise it moves tags like tag-ioctl."""

    name = "tag-dirty-log"
    description = "tag-ioctl plus a proposed tags-only dirty log: a retag resends 128 B of tags, not the page"
    proposal = True

    def setup_source(self):
        for slot in self.vm.memslots:
            self.vm.enable_tag_dirty_logging(slot.slot)

    def harvest_tag_dirty(self) -> bytes:
        """Pages whose tags were stored since the last harvest (1 byte a page)."""
        merged = bytearray(self.host.memory.npages)
        for slot in self.vm.memslots:
            log = self.vm.get_tag_dirty_log(slot.slot)
            merged[slot.first_page : slot.first_page + slot.npages] = log.bitmap
        return bytes(merged)

    def close(self):
        for slot in self.vm.memslots:
            self.vm.disable_tag_dirty_logging(slot.slot)
