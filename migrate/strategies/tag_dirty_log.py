from migrate.strategies.tag_ioctl import TagIoctl


class TagDirtyLog(TagIoctl):
    """PROPOSAL -- no public work has built it, and it needs a kernel
    interface that does not exist: a second, tags-only dirty log
    (KVM_GET_TAG_DIRTY_LOG).  If stage 2 could let a tag store to a clean
    page through while still trapping data stores, a guest that retags
    memory without writing it (an MTE allocator's free) would dirty only the
    tag log, and the VMM would resend 128 bytes of tags instead of the whole
    page.  The simulation assumes that permission; the architecture has none
    (STG is a write to stage 2, and FEAT_MTE_PERM's NoTagAccess helps only on
    pages already writable: docs/PROPOSALS.md).  Otherwise it moves tags like
    tag-ioctl."""

    name = "tag-dirty-log"
    description = "tag-ioctl plus a proposed tags-only dirty log: a retag resends 128 B of tags, not the page"
    proposal = True
    postcopy_mode = None
    postcopy_refusal = "its tags-only dirty log is a precopy design (postcopy sends each page once)"

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
