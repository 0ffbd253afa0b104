"""A host on the real Linux KVM: one VM with MTE, its RAM in a memfd, vCPU
threads in KVM_RUN running a bare-metal guest program (native/mte_guest.S).

The guest's state lives where a real guest's does: in its RAM, its tags and
its registers.  The workload object only names the program and its
parameters; it has no state of its own to migrate.
"""

import time

from .. import tags as tagops
from ..backend import Host
from ..constants import GRANULES_PER_PAGE, PACKED_TAGS_PER_PAGE, PAGE_SIZE, RAM_BASE_IPA
from ..counters import Counters
from ..mapping import VmmDirtyTracker
from . import uapi
from .build import GUEST_BIN, artifact
from .kvm import KvmSystem, KvmVm
from .vcpu import KvmVcpuSet

#: guest program modes by workload name (x3 at entry)
PROGRAM_MODES = {"allocator": 0, "retag-churn": 1, "idle": 2}
#: the heap starts 1 MiB into RAM; the tag record is the 64 KiB below it
HEAP_OFFSET = 1 << 20
MAX_OBJECTS = 65536
#: share of RAM above the heap start the heap takes by default
DEFAULT_HEAP_PAGES = 256  # 1 MiB: 65,536 granules checked per self-check
DEFAULT_CHECK_EVERY = 2000


class GuestProgram:
    """The workload of a KVM guest: which program mode and its parameters.
    Nothing to carry over but those: the program's state is in guest RAM
    and registers, which migrate as they are."""

    def __init__(self, name: str, seed: int, params: dict):
        if name not in PROGRAM_MODES:
            raise ValueError(f"the kvm backend runs workloads {', '.join(PROGRAM_MODES)}; not {name!r}")
        self.name, self.seed, self.params = name, seed, dict(params)
        self.device = None

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        if state:
            raise ValueError("a KVM guest program has no workload state outside the guest")

    def device_state(self) -> dict:
        return {}

    def set_device_state(self, state: dict) -> None:
        if state:
            raise ValueError("a KVM guest has no emulated devices")


class KvmHost(Host):
    kind = "kvm"

    def __init__(
        self,
        ram_size: int,
        *,
        mte: bool = True,
        vcpus: int = 1,
        workload: str = "allocator",
        workload_params: dict | None = None,
        rate: float | None = 0,
        seed: int = 1,
        device_prot_mte: bool = False,
        memslot_sizes: list[int] | None = None,
    ):
        self._counters = Counters()
        self.system = KvmSystem()
        self.vm = None
        self.vcpus = None
        try:
            self.vm = KvmVm(self.system, self._counters, ram_size, memslot_sizes)
            if mte:
                self.vm.enable_mte()  # before any vCPU exists, as KVM requires
            self.vmm_dirty = VmmDirtyTracker(self.vm.memory.npages)
            self.ram = self.vm.map_guest_ram(prot_mte=False, dirty_tracker=self.vmm_dirty)
            self.device_mapping = (
                self.vm.map_guest_ram(prot_mte=True, dirty_tracker=self.vmm_dirty) if device_prot_mte else self.ram
            )
            self.workload = GuestProgram(workload, seed, workload_params or {})
            self.rate = rate
            self.vcpus = KvmVcpuSet(self.vm, vcpus, self.workload)
        except BaseException:
            self.close()
            raise

    @property
    def memory(self):
        return self.vm.memory

    @property
    def counters(self):
        return self._counters

    def make_workload(self, name: str, *, seed: int, vcpus: int, params: dict):
        return GuestProgram(name, seed, params)

    # -- booting the guest program -------------------------------------------------
    def prepare_guest(self) -> None:
        """Load the program at the start of RAM and point every vCPU at it,
        each with a heap of its own after the first 1 MiB."""
        path = artifact(GUEST_BIN)
        if path is None:
            raise ValueError(f"no {GUEST_BIN}: build it with `python -m hosts.kvm.build`")
        image = path.read_bytes()
        if len(image) > HEAP_OFFSET - (64 << 10):
            raise ValueError("the guest program overlaps its tag record")
        self.memory.write(0, image)
        params = self.workload.params
        n = self.vcpus.count
        heap_pages = int(params.get("heap_pages", DEFAULT_HEAP_PAGES))
        # each vCPU: its 64 KiB tag record, then its heap
        stride = heap_pages * PAGE_SIZE + (64 << 10)
        if heap_pages < 1 or heap_pages > MAX_OBJECTS or HEAP_OFFSET + n * stride > self.memory.size:
            raise ValueError(f"heap_pages {heap_pages} x {n} vCPUs does not fit in guest RAM")
        # --rate is pages per second for the whole guest; each op dirties one page
        rate = 0 if self.rate is None else max(1, round(self.rate / n)) if self.rate else 0
        mode = PROGRAM_MODES[self.workload.name]
        for i in range(n):
            heap = RAM_BASE_IPA + HEAP_OFFSET + i * stride
            regs = {
                uapi.REG_PC: RAM_BASE_IPA,
                uapi.REG_PSTATE: 0x3C5,  # EL1h, DAIF masked
                uapi.reg_x(0): heap,
                uapi.reg_x(1): heap_pages,
                uapi.reg_x(2): rate,
                uapi.reg_x(3): mode,
                uapi.reg_x(4): int(params.get("check_every", DEFAULT_CHECK_EVERY)),
                uapi.reg_x(5): (self.workload.seed * 0x9E3779B1 + i) & (2**64 - 1) or 1,
            }
            for reg_id, value in regs.items():
                self.vcpus.set_reg(i, reg_id, value)
        # a real guest has run before it is migrated: let it tag its heap
        # and check it once before the VMM reports it prepared
        self.vcpus.start()
        first = self.vcpus.reports.wait_check_since_resume(float(params.get("boot_timeout_s", 120)))
        self.vcpus.pause()
        if first is None:
            raise ValueError(
                f"the guest program did not report (vCPU: {self.vcpus.error}; fault: {self.vcpus.reports.fault})"
            )

    # -- the tag view of the validation digest -------------------------------------
    def refresh_tag_view(self, first_page: int = 0, end_page: int | None = None) -> list[tuple[int, int]]:
        """Read the tags of every populated page with KVM_ARM_MTE_COPY_TAGS
        (FROM_GUEST, counted under validation.*) into ``memory.tags``; a page
        is marked tagged when any of its tags is not zero (the tags KVM
        reports for it are then not all zero).  Returns the runs that changed."""
        mem = self.memory
        end_page = mem.npages if end_page is None else end_page
        changed = []
        batch = 256
        buf = bytearray(batch * GRANULES_PER_PAGE)
        for a, b in mem.populated_ranges(first_page, end_page):
            for p in range(a, b, batch):
                n = min(batch, b - p)
                view = memoryview(buf)[: n * GRANULES_PER_PAGE]
                self.vm.mte_copy_tags(
                    self.vm.page_to_ipa(p),
                    n * PAGE_SIZE,
                    view,
                    uapi.KVM_ARM_TAGS_FROM_GUEST,
                    counter_prefix="validation.",
                )
                packed = tagops.pack(view)
                lo, hi = p * PACKED_TAGS_PER_PAGE, (p + n) * PACKED_TAGS_PER_PAGE
                flags = bytes(
                    0 if tagops.all_zero(packed[k * PACKED_TAGS_PER_PAGE : (k + 1) * PACKED_TAGS_PER_PAGE]) else 1
                    for k in range(n)
                )
                if bytes(mem.tags[lo:hi]) != packed or bytes(mem.tagged[p : p + n]) != flags:
                    mem.tags[lo:hi] = packed
                    mem.tagged[p : p + n] = flags
                    changed.append((p, p + n))
        return changed

    def guest_report(self, wait_s: float = 0.0) -> dict | None:
        """The guest program's first self-check that began after this call
        (so after whatever the migration did), if it runs here."""
        t, now = time.perf_counter(), time.time()
        check = self.vcpus.reports.wait_check_since_resume(wait_s, whole_after=now) if self.vcpus.running else None
        reports = self.vcpus.reports
        return {
            "program": self.workload.name,
            "self_check": check,
            "waited_s": round(time.perf_counter() - t, 3),
            "checks_here": len(reports.checks),
            "last_check": reports.last_checks(),
            "fault": reports.fault,
            "vcpu_error": None if self.vcpus.error is None else str(self.vcpus.error),
            "exits": dict(self.vcpus.exits),
        }

    def close(self) -> None:
        if self.vcpus is not None:
            self.vcpus.close()
        if self.vm is not None:
            self.vm.close()
        self.system.close()
