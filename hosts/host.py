"""A simulated host with one guest: kernel, VM with MTE, guest RAM, vCPUs
and their workload, and the VMM's own mappings of guest RAM.  This is what a
VMM process owns; the migration code drives it through these handles."""

from .backend import Host
from .kernel import Kernel
from .mapping import VmmDirtyTracker
from .vcpu import VcpuSet
from .workloads import make_workload


class SimulatedHost(Host):
    """``device_prot_mte``: whether the VMM's device emulation reaches guest
    RAM through a PROT_MTE mapping (the prot-mte design) or an untagged one."""

    def __init__(
        self,
        ram_size: int,
        *,
        mte: bool = True,
        vcpus: int = 2,
        workload: str = "idle",
        workload_params: dict | None = None,
        rate: float | None = 0,
        seed: int = 1,
        device_prot_mte: bool = False,
        memslot_sizes: list[int] | None = None,
        huge_pages: bool | str = False,
    ):
        self.kind = "sim"
        self.kernel = Kernel()
        self.vm = self.kernel.create_vm(ram_size, memslot_sizes, huge_pages)
        if mte:
            self.vm.enable_mte()  # before any vCPU exists, as KVM requires
        self.vmm_dirty = VmmDirtyTracker(self.vm.memory.npages)
        self.ram = self.vm.map_guest_ram(prot_mte=False, dirty_tracker=self.vmm_dirty)
        self.device_mapping = (
            self.vm.map_guest_ram(prot_mte=True, dirty_tracker=self.vmm_dirty) if device_prot_mte else self.ram
        )
        self.workload = make_workload(
            workload, self.vm, seed=seed, vcpus=vcpus, params=workload_params, device=self.device_mapping
        )
        self.vcpus = VcpuSet(self.vm, self.workload, vcpus, rate, seed)

    @property
    def memory(self):
        return self.vm.memory

    @property
    def counters(self):
        return self.kernel.counters

    def make_workload(self, name: str, *, seed: int, vcpus: int, params: dict):
        return make_workload(name, self.vm, seed=seed, vcpus=vcpus, params=params, device=self.device_mapping)

    def prepare_guest(self) -> None:
        """Boot-time population of guest memory by the workload; then the
        populated pages are mapped in the VMM, as a running guest's are."""
        self.workload.prepare()
        self.memory.map_populated()

    def watch_writes(self, step: int | None = None):
        """Every store of the simulated guest, its kernel and the VMM's
        devices goes through GuestMemory, which stores through the mapping
        while a watch is open."""
        return self.memory.watch_writes(step)

    def unwatch_writes(self, watch) -> None:
        self.memory.unwatch_writes(watch)

    def watch_tag_writes(self):
        """The simulated kernel stores tags through the tag storage's mapping."""
        return self.memory.watch_tag_writes()

    def close(self) -> None:
        self.vcpus.shutdown()
        self.vm.close()
