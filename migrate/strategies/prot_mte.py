from hosts import PAGE_SIZE
from migrate.strategies.base import TagStrategy


class ProtMte(TagStrategy):
    """All guest RAM mapped PROT_MTE in the VMM.  Tags are read and written
    with EL0 per-granule instructions (LDG/STG, counted), with no system
    calls.  Every VMM access through the mapping is tag checked, so each
    migration thread sets PSTATE.TCO before it copies; device emulation must
    cope too (see the device-dma scenario)."""

    name = "prot-mte"
    description = "all guest RAM mapped PROT_MTE in the VMM; tags via EL0 LDG/STG per granule"
    vmm_prot_mte = True
    postcopy_refusal = (
        "it stores tags with EL0 STG through the VMM's mapping, which makes no page present to the guest: "
        "use memfd-continue, its postcopy form"
    )

    def __init__(self, host, config):
        super().__init__(host, config)
        device = host.device_mapping
        # One PROT_MTE mapping of all RAM, shared with device emulation.
        self.mapping = device if device.prot_mte else host.vm.map_guest_ram(prot_mte=True, dirty_tracker=host.vmm_dirty)
        host.device_mapping = self.mapping
        host.workload.device = self.mapping

    def _checks_off(self):
        # TCO is per thread: each migration thread sets it once (one MSR).
        self.mapping.set_tco(True)

    def read_data(self, first_page, npages):
        self._checks_off()
        return self.mapping.read(first_page * PAGE_SIZE, npages * PAGE_SIZE)

    def write_data(self, offset, data, populated=False):
        # Through the PROT_MTE mapping (so the pages get mapped tagged), TCO on.
        self._checks_off()
        self.mapping.write(offset, data, populated=populated)

    def write_data_parts(self, offset, parts):
        self._checks_off()
        self.mapping.write_parts(offset, parts)

    def read_tags(self, ranges):
        return b"".join(self.mapping.load_tags(first, count) for first, count in ranges)

    def write_tags(self, first_page, packed):
        self.mapping.store_tags(first_page, packed)

    def clear_tags(self, first_page, npages):
        self.mapping.store_tags(first_page, bytes(npages * 128))
