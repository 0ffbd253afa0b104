"""Two ways to place a page and its tags atomically for a running guest in
postcopy.  Both move pages like ``tag-ioctl`` during precopy; they differ
only once the guest runs on the destination with pages still missing.

``uffd-copy-tags`` is a PROPOSAL: a ``UFFDIO_COPY`` flag that carries the
page's tags, so data and tags appear together.  No kernel has it; the Linux
and QEMU discussion named such an extension as what postcopy with MTE
would need.

``memfd-continue`` uses interfaces that exist: guest RAM is a memfd
registered in userfaultfd MINOR mode; the VMM writes data and tags through
its own PROT_MTE mapping of the same memfd (the page is in the page cache,
tagged, but not mapped for the guest), then ``UFFDIO_CONTINUE`` maps it.
No public work describes this design for MTE.  The pieces: memfd and
PROT_MTE on shmem (Linux 5.10), userfaultfd MINOR mode on shmem and
UFFDIO_CONTINUE (5.14), KVM_CAP_ARM_MTE (5.13); shared (MAP_SHARED) memory
in an MTE memslot needs 6.2 or later (6.1 refuses it: recorded in
docs/FIDELITY.md), and tags stored through the PROT_MTE alias surviving
UFFDIO_CONTINUE was recorded on 6.12."""

from hosts import PAGE_SIZE
from migrate.strategies.tag_ioctl import TagIoctl


class UffdCopyTags(TagIoctl):
    name = "uffd-copy-tags"
    description = "postcopy with a proposed UFFDIO_COPY flag that places data and tags together; else as tag-ioctl"
    proposal = True
    postcopy_mode = "missing"
    postcopy_variant_of = "tag-ioctl"

    def place_postcopy(self, uffd, page, data, packed_tags):
        uffd.copy(page, data, tags=packed_tags if packed_tags is not None else bytes(len(data) // PAGE_SIZE * 128))


class MemfdContinue(TagIoctl):
    name = "memfd-continue"
    description = (
        "postcopy: data and tags written through a PROT_MTE alias of the memfd, then UFFDIO_CONTINUE; else as tag-ioctl"
    )
    postcopy_mode = "minor"
    postcopy_variant_of = "tag-ioctl"

    def setup_dest(self):
        super().setup_dest()
        self._alias = None

    def _alias_mapping(self):
        # The VMM's own PROT_MTE mapping of the guest's memfd: not the one
        # the guest faults through, so writing it does not make a page present.
        if getattr(self, "_alias", None) is None:
            self._alias = self.vm.map_guest_ram(prot_mte=True)
            self._alias.set_tco(True)  # the copy itself is not tag checked
        return self._alias

    def place_postcopy(self, uffd, page, data, packed_tags):
        alias = self._alias_mapping()
        alias.set_tco(True)  # per thread
        npages = len(data) // PAGE_SIZE
        alias.write(page * PAGE_SIZE, data)
        alias.store_tags(page, packed_tags if packed_tags is not None else bytes(npages * 128))
        uffd.continue_(page, npages)
