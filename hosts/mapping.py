"""The VMM's own mappings of guest RAM, untagged or PROT_MTE.

Through a PROT_MTE mapping the VMM can load and store tags one granule per
EL0 instruction (LDG / STG; LDGM/STGM are EL1-only), and its data accesses
are tag checked under the calling thread's tag-check mode unless TCO is set:
a pointer carries a logical tag (bits 59:56) that must equal every granule's
allocation tag.  The checks and tag transfers run in bulk on slices; the
counters record the per-granule instructions and the faults.
"""

import enum
import threading
from contextlib import contextmanager

from . import tags as tagops
from .constants import GRANULE, GRANULES_PER_PAGE, PACKED_TAGS_PER_PAGE, PAGE_SIZE
from .errors import TagCheckFault

# Where the simulated VMM's mapping of guest RAM starts in its address space.
VMM_MAPPING_BASE = 0x0000_7F00_0000_0000


class TagCheckMode(enum.Enum):
    NONE = "none"  # prctl PR_MTE_TCF_NONE: the default for user space
    SYNC = "sync"  # fault at the access, with the address
    ASYNC = "async"  # recorded in TFSRE0_EL1 and reported later, no address


class VmmDirtyTracker:
    """The VMM's own dirty bitmap for its writes to guest RAM (device
    emulation): those bypass stage 2 and never reach KVM's log."""

    def __init__(self, npages: int):
        self._lock = threading.Lock()
        self._bitmap = bytearray(npages)
        self.enabled = False

    def mark(self, first_page: int, end_page: int) -> None:
        if self.enabled:
            with self._lock:
                self._bitmap[first_page:end_page] = b"\x01" * (end_page - first_page)

    def harvest(self) -> bytes:
        """Get and clear, like KVM_GET_DIRTY_LOG (one byte per page)."""
        with self._lock:
            snapshot = bytes(self._bitmap)
            self._bitmap[:] = bytes(len(self._bitmap))
        return snapshot


class _ThreadTagState(threading.local):
    def __init__(self):
        self.mode = TagCheckMode.NONE
        self.tco = False
        self.async_fault = False  # TFSRE0_EL1.TF0


class VmmMapping:
    """One mmap() of all guest RAM in the VMM.  Offsets are RAM byte offsets;
    ``address_of`` gives the VMM virtual address for error messages."""

    def __init__(self, vm, prot_mte: bool, dirty_tracker: VmmDirtyTracker | None = None):
        if prot_mte and not vm.mte_enabled:
            # A VMM can map PROT_MTE regardless, but the guest's tags would
            # not be there to see; keep the simulation honest and refuse.
            raise ValueError("PROT_MTE mapping of guest RAM needs MTE enabled for the VM")
        self.vm = vm
        self.memory = vm.memory
        self.counters = vm.counters
        self.prot_mte = prot_mte
        self.dirty_tracker = dirty_tracker
        self._thread = _ThreadTagState()

    def address_of(self, offset: int) -> int:
        return VMM_MAPPING_BASE + offset

    # -- per-thread tag-check controls --------------------------------------
    def set_tag_check_mode(self, mode: TagCheckMode) -> None:
        """prctl(PR_SET_TAGGED_ADDR_CTRL) for the calling thread; a no-op
        (and no system call) when the mode is already set."""
        if self._thread.mode is not mode:
            self.counters.add("syscalls.prctl")
            self._thread.mode = mode

    @contextmanager
    def tco(self):
        """Run the body with PSTATE.TCO set (tag checks off), as a VMM does
        around device emulation or bulk copies.  Two MSR writes, counted."""
        previous = self._thread.tco
        self._thread.tco = True
        self.counters.add("el0.tco_switches", 2)
        try:
            yield
        finally:
            self._thread.tco = previous

    def set_tco(self, on: bool) -> None:
        """Set or clear PSTATE.TCO for the calling thread (one MSR, counted
        only when it changes)."""
        if self._thread.tco != on:
            self._thread.tco = on
            self.counters.add("el0.tco_switches")

    def take_async_fault(self) -> bool:
        """Read and clear the thread's asynchronous tag check fault flag."""
        fault, self._thread.async_fault = self._thread.async_fault, False
        return fault

    # -- data access --------------------------------------------------------
    def read(self, offset: int, length: int, pointer_tag: int = 0) -> memoryview:
        """A read of guest RAM; returns a view, no copy."""
        self._touch(offset, length, pointer_tag)
        return self.memory.data[offset : offset + length]

    def write(self, offset: int, data, pointer_tag: int = 0, populated: bool = False) -> None:
        n = len(data)
        self._touch(offset, n, pointer_tag, storing=True)
        self.memory.write(offset, data, populated)
        self._mark_dirty(offset // PAGE_SIZE, -(-(offset + n) // PAGE_SIZE))

    def write_parts(self, offset: int, parts, pointer_tag: int = 0) -> None:
        """Like write() of the parts joined, without joining them."""
        n = sum(len(p) for p in parts)
        self._touch(offset, n, pointer_tag, storing=True)
        self.memory.write_parts(offset, parts)
        self._mark_dirty(offset // PAGE_SIZE, -(-(offset + n) // PAGE_SIZE))

    def _touch(self, offset: int, length: int, pointer_tag: int, storing: bool = False) -> None:
        if offset < 0 or length < 0 or offset + length > self.memory.size:
            raise IndexError(f"access {offset:#x}+{length:#x} is outside the guest RAM mapping")
        if not self.prot_mte:
            return
        # Mapping a page PROT_MTE sanitises it if it was never tagged (a
        # data store then allocates the page itself).
        self._sanitise(offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE), fault_in=not storing)
        state = self._thread
        if state.tco or state.mode is TagCheckMode.NONE or length == 0:
            return
        first = offset // GRANULE
        count = -(-(offset + length) // GRANULE) - first
        bad = tagops.first_mismatch(self.memory.tags, first, count, pointer_tag)
        if bad is None:
            return
        self.counters.add("tag_check_faults")
        if state.mode is TagCheckMode.SYNC:
            address = max(offset, bad * GRANULE)
            raise TagCheckFault(
                self.address_of(address) | ((pointer_tag & 0xF) << 56),
                pointer_tag & 0xF,
                tagops.granule_tag(self.memory.tags, bad),
            )
        state.async_fault = True

    # -- EL0 tag instructions (PROT_MTE only) ----------------------------------
    def load_tags(self, first_page: int, npages: int) -> bytes:
        """LDG once per granule over whole pages: the packed tags of the pages.
        LDG reads the allocation tag, which for a page not yet mapped tagged
        is zero after the sanitise that mapping it performs."""
        self._require_prot_mte()
        end = first_page + npages
        self._check_pages(first_page, end)
        self._sanitise(first_page, end)
        self.counters.add("el0.ldg", npages * GRANULES_PER_PAGE)
        return bytes(self.memory.tags[first_page * PACKED_TAGS_PER_PAGE : end * PACKED_TAGS_PER_PAGE])

    def load_tag(self, offset: int) -> int:
        """One LDG: the allocation tag of the granule at ``offset``."""
        self._require_prot_mte()
        self._sanitise(offset // PAGE_SIZE, offset // PAGE_SIZE + 1)
        self.counters.add("el0.ldg")
        return tagops.granule_tag(self.memory.tags, offset // GRANULE)

    def store_tags(self, first_page: int, packed) -> None:
        """STG once per granule over whole pages, from packed tags."""
        self._require_prot_mte()
        if len(packed) % PACKED_TAGS_PER_PAGE:
            raise ValueError(f"packed tags must cover whole pages ({PACKED_TAGS_PER_PAGE} bytes each)")
        npages = len(packed) // PACKED_TAGS_PER_PAGE
        end = first_page + npages
        self._check_pages(first_page, end)
        self._sanitise(first_page, end)
        self.memory.tags[first_page * PACKED_TAGS_PER_PAGE : end * PACKED_TAGS_PER_PAGE] = packed
        self.counters.add("el0.stg", npages * GRANULES_PER_PAGE)
        self._mark_dirty(first_page, end)

    def store_tag_range(self, offset: int, length: int, tag: int) -> None:
        """STG/ST2G over a granule-aligned byte range with one tag (as a tagged
        allocator in the VMM would)."""
        self._require_prot_mte()
        if offset % GRANULE or length % GRANULE:
            raise ValueError("tag stores are granule aligned")
        self._sanitise(offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE))
        granules = length // GRANULE
        tagops.fill_granules(self.memory.tags, offset // GRANULE, granules, tag)
        self.counters.add("el0.st2g", granules // 2)
        self.counters.add("el0.stg", granules % 2)
        self._mark_dirty(offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE))

    def _mark_dirty(self, first_page: int, end_page: int) -> None:
        """A store of the VMM's own, data or tags, bypasses stage 2 and so
        KVM's log: it goes in the VMM's bitmap."""
        if self.dirty_tracker is not None:
            self.dirty_tracker.mark(first_page, end_page)

    def _sanitise(self, first_page: int, end_page: int, fault_in: bool = True) -> None:
        # Pages already tagged need nothing: test the flags first, without
        # the lock, as the kernel tests PG_mte_tagged before it takes one
        # (a flag is set under the lock and never cleared while the page is
        # mapped), so the VMM's stores do not queue behind the vCPUs' accesses.
        if self.memory.tagged.find(0, first_page, end_page) < 0:
            return
        with self.vm.mmu_lock:
            self.vm.sanitise(first_page, end_page, fault_in)

    def _check_pages(self, first_page: int, end_page: int) -> None:
        if first_page < 0 or end_page < first_page or end_page > self.memory.npages:
            raise IndexError(f"pages [{first_page}, {end_page}) are outside the guest RAM mapping")

    def _require_prot_mte(self) -> None:
        if not self.prot_mte:
            raise PermissionError("tag instructions need a PROT_MTE mapping (this one is untagged)")
