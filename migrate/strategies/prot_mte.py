from hosts import PAGE_SIZE

from .base import TagStrategy


class ProtMte(TagStrategy):
    """All guest RAM mapped PROT_MTE in the VMM.  Tags are read and written
    with EL0 per-granule instructions (LDG/STG, counted), with no system
    calls.  Every VMM access through the mapping is tag checked, so the
    migration thread sets TCO for its copies; device emulation must cope too
    (see the device-dma scenario)."""
    name = "prot-mte"
    description = "all guest RAM mapped PROT_MTE in the VMM; tags via EL0 LDG/STG per granule"
    vmm_prot_mte = True

    def __init__(self, host, config):
        super().__init__(host, config)
        self.mapping = host.vm.map_guest_ram(prot_mte=True, dirty_tracker=host.vmm_dirty)
        self._tco = None

    def _enter_tco(self):
        # The migration thread copies guest memory with tag checks off.
        if self._tco is None:
            self._tco = self.mapping.tco()
            self._tco.__enter__()

    def setup_source(self):
        self._enter_tco()

    def setup_dest(self):
        self._enter_tco()

    def read_data(self, first_page, npages):
        return self.mapping.read(first_page * PAGE_SIZE, npages * PAGE_SIZE)

    def write_data(self, offset, data):
        # Through the PROT_MTE mapping (so the pages get mapped tagged), TCO on.
        self.mapping.write(offset, data)

    def read_tags(self, ranges):
        return b"".join(self.mapping.load_tags(first, count) for first, count in ranges)

    def write_tags(self, first_page, packed):
        self.mapping.store_tags(first_page, packed)

    def clear_tags(self, first_page, npages):
        self.mapping.store_tags(first_page, bytes(npages * 128))

    def close(self):
        if self._tco is not None:
            self._tco.__exit__(None, None, None)
            self._tco = None
