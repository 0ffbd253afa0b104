"""The simulated kernel: the VMM's only way into guest memory and tags.

It follows the KVM/arm64 rules that matter to the design question:
KVM_CAP_ARM_MTE only before vCPUs exist, tag sanitising on the guest's first
touch of an untagged page, KVM_ARM_MTE_COPY_TAGS with the documented checks
and partial-copy return, and KVM_GET_DIRTY_LOG get-and-clear per memslot.
Operations run in bulk on slices; the counters record what a real machine
would have executed.
"""

import threading
from dataclasses import dataclass

from . import tags as tagops
from .constants import GRANULE, GRANULES_PER_PAGE, PACKED_TAGS_PER_PAGE, PAGE_SIZE, RAM_BASE_IPA
from .counters import Counters
from .errors import KernelError, efault, einval
from .memory import GuestMemory

KVM_ARM_TAGS_TO_GUEST = 0
KVM_ARM_TAGS_FROM_GUEST = 1
_INT_MAX = 2**31 - 1
_COPY_FLAGS = (KVM_ARM_TAGS_TO_GUEST, KVM_ARM_TAGS_FROM_GUEST)


def _plain_bytes(buf) -> bool:
    """Whether len(buf) counts bytes and slices of it are bytes (no cast needed)."""
    kind = type(buf)
    return kind is bytearray or kind is bytes or (kind is memoryview and buf.format == "B" and buf.ndim == 1)


@dataclass(frozen=True)
class Memslot:
    """A KVM memory slot: guest IPA range backed by RAM at ``ram_offset``."""

    slot: int
    guest_phys_addr: int
    size: int
    ram_offset: int

    @property
    def first_page(self) -> int:
        """First page of guest RAM (GuestMemory page number) the slot covers."""
        return self.ram_offset // PAGE_SIZE

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    def contains(self, ipa: int) -> bool:
        return self.guest_phys_addr <= ipa < self.guest_phys_addr + self.size


def memslot_layout(ram_size: int, memslot_sizes: list[int] | None) -> list[Memslot]:
    """The memslots of a guest: consecutive from RAM_BASE_IPA over RAM, one
    of all RAM unless ``memslot_sizes`` splits it."""
    sizes = memslot_sizes or [ram_size]
    if sum(sizes) != ram_size or any(s <= 0 or s % PAGE_SIZE for s in sizes):
        raise ValueError("memslot sizes must be page multiples that add up to the RAM size")
    slots, offset = [], 0
    for slot, size in enumerate(sizes):
        slots.append(Memslot(slot, RAM_BASE_IPA + offset, size, offset))
        offset += size
    return slots


class DirtyLog:
    """What KVM_GET_DIRTY_LOG returned for one memslot.  The simulation keeps
    one byte per page instead of one bit (bulk slicing is cheaper in Python);
    page numbers given out are GuestMemory page numbers."""

    def __init__(self, slot: Memslot, bitmap: bytes):
        self.slot = slot
        self.bitmap = bitmap

    def count(self) -> int:
        return self.bitmap.count(1)

    def ranges(self) -> list[tuple[int, int]]:
        """Dirty page runs [start, end), one find per run, not per page."""
        out, bm, base, pos, n = [], self.bitmap, self.slot.first_page, 0, len(self.bitmap)
        while True:
            start = bm.find(1, pos)
            if start < 0:
                return out
            end = bm.find(0, start)
            end = n if end < 0 else end
            out.append((base + start, base + end))
            pos = end


class Kernel:
    """One host's kernel.  Holds the operation counters for everything the
    VMM, the guest and the kernel itself do on this host."""

    def __init__(self):
        self.counters = Counters()

    def create_vm(self, ram_size: int, memslot_sizes: list[int] | None = None, huge_pages: bool | str = False) -> "Vm":
        self.counters.add("syscalls.kvm_create_vm")
        return Vm(self, ram_size, memslot_sizes, huge_pages)


class Vm:
    def __init__(
        self, kernel: Kernel, ram_size: int, memslot_sizes: list[int] | None = None, huge_pages: bool | str = False
    ):
        self.kernel = kernel
        self.counters = kernel.counters
        self.memory = GuestMemory(ram_size, huge_pages=huge_pages)
        self.mte_enabled = False
        self.vcpu_count = 0
        # The MMU lock orders guest stores + dirty marking against dirty-log
        # harvesting, as KVM's mmu_lock does with write-protection.
        self.mmu_lock = threading.Lock()
        self.memslots: list[Memslot] = []
        self._dirty: dict[int, bytearray] = {}
        # PROPOSAL (no such KVM interface exists): a separate log of pages
        # whose *tags* were stored, kept when the VMM asks for it.  It assumes
        # stage 2 can trap tag stores apart from data stores (FEAT_MTE_PERM's
        # NoTagAccess), so a tag-only store (STG) lands here and not in the
        # data log; a data store still lands in the data log.
        self._tag_dirty: dict[int, bytearray] = {}
        self.memslots.extend(memslot_layout(ram_size, memslot_sizes))
        # (first IPA, end IPA, RAM offset) of the only memslot, for the ioctl's fast path
        only = self.memslots[0]
        self._one_slot = (
            (only.guest_phys_addr, only.guest_phys_addr + only.size, only.ram_offset)
            if len(self.memslots) == 1
            else None
        )
        self._mappings = []
        #: a registered userfaultfd (postcopy): guest accesses wait for missing pages
        self.uffd = None

    # -- KVM_ENABLE_CAP / KVM_CREATE_VCPU -------------------------------------
    def enable_mte(self) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_ARM_MTE): only before any vCPU exists."""
        self.counters.add("syscalls.kvm_enable_cap")
        if self.vcpu_count:
            raise einval("KVM_CAP_ARM_MTE must be enabled before any vCPU is created")
        self.mte_enabled = True

    def create_vcpu(self) -> int:
        self.counters.add("syscalls.kvm_create_vcpu")
        self.vcpu_count += 1
        return self.vcpu_count - 1

    # -- address translation ---------------------------------------------------
    def memslot_for(self, ipa: int) -> Memslot | None:
        for slot in self.memslots:
            if slot.contains(ipa):
                return slot
        return None

    def ipa_to_ram(self, ipa: int, length: int) -> int:
        """RAM byte offset of a guest access that must stay inside one memslot."""
        slot = self.memslot_for(ipa)
        if slot is None or ipa + length > slot.guest_phys_addr + slot.size:
            raise efault(f"guest access {ipa:#x}+{length:#x} is outside every memslot")
        return slot.ram_offset + (ipa - slot.guest_phys_addr)

    def page_to_ipa(self, page: int) -> int:
        offset = page * PAGE_SIZE
        for slot in self.memslots:
            if slot.ram_offset <= offset < slot.ram_offset + slot.size:
                return slot.guest_phys_addr + offset - slot.ram_offset
        raise ValueError(f"page {page} is outside guest RAM")

    # -- MTE page state -------------------------------------------------------
    def sanitise(self, first_page: int, end_page: int, fault_in: bool = True) -> None:
        """Clear tags and set PG_mte_tagged on each untagged page in the range,
        as the host does on the first stage-2 (or PROT_MTE) mapping of a page.
        One bulk clear per run of untagged pages.  That first mapping is a
        fault, which allocates a never-populated page (a tag store or a load
        does too, not only a data store), so a page marked tagged always
        holds memory; ``fault_in=False`` for a caller about to store data
        there, which populates the page itself."""
        if not self.mte_enabled:
            return
        tagged = self.memory.tagged
        pos = first_page
        while pos < end_page:
            start = tagged.find(0, pos, end_page)
            if start < 0:
                return
            end = tagged.find(1, start, end_page)
            end = end_page if end < 0 else end
            n = end - start
            if fault_in:
                self.counters.add("kernel.pages_faulted_in", self.memory.fault_in(start, end))
            self.memory.tags[start * PACKED_TAGS_PER_PAGE : end * PACKED_TAGS_PER_PAGE] = bytes(
                n * PACKED_TAGS_PER_PAGE
            )
            tagged[start:end] = b"\x01" * n
            self.counters.add("kernel.tag_clears", n)
            pos = end

    # -- guest accesses (used only by vCPU threads) -----------------------------
    def guest_write(self, ipa: int, data) -> None:
        """A guest store of ``data`` at ``ipa``: sanitise on first touch, store,
        then log the pages dirty (after the store, as the write-protect fault
        retry guarantees)."""
        n = len(data)
        off = self.ipa_to_ram(ipa, n)
        first, end = off // PAGE_SIZE, -(-(off + n) // PAGE_SIZE)
        self._await_pages(first, end)
        with self.mmu_lock:
            self.sanitise(first, end, fault_in=False)  # the store allocates the page
            self.memory.write(off, data)
            self._mark_dirty(first, end)

    def guest_set_tags(self, ipa: int, length: int, tag: int) -> None:
        """STG/ST2G over ``length`` bytes (granule aligned) with one tag.  A tag
        store is a store: the pages are logged dirty even if data is unchanged."""
        if ipa % GRANULE or length % GRANULE:
            raise ValueError("tag stores are granule aligned")
        if not self.mte_enabled:
            return  # without MTE the tag instructions are NOPs
        off = self.ipa_to_ram(ipa, length)
        first, end = off // PAGE_SIZE, -(-(off + length) // PAGE_SIZE)
        self._await_pages(first, end)
        with self.mmu_lock:
            self.sanitise(first, end)
            tagops.fill_granules(self.memory.tags, off // GRANULE, length // GRANULE, tag)
            self._mark_tag_store(first, end)
        self.counters.add("guest.tag_store_granules", length // GRANULE)

    def guest_store_tags_packed(self, ipa: int, packed) -> None:
        """The guest kernel's bulk tag store (STGM at EL1) over whole pages from
        packed tags; dirties the pages like any store."""
        if ipa % PAGE_SIZE or len(packed) % PACKED_TAGS_PER_PAGE:
            raise ValueError("bulk tag stores cover whole pages")
        if not self.mte_enabled:
            return
        npages = len(packed) // PACKED_TAGS_PER_PAGE
        off = self.ipa_to_ram(ipa, npages * PAGE_SIZE)
        first = off // PAGE_SIZE
        self._await_pages(first, first + npages)
        with self.mmu_lock:
            self.sanitise(first, first + npages)
            self.memory.tags[first * PACKED_TAGS_PER_PAGE : (first + npages) * PACKED_TAGS_PER_PAGE] = packed
            self._mark_tag_store(first, first + npages)
        self.counters.add("guest.tag_store_granules", npages * GRANULES_PER_PAGE)

    def _await_pages(self, first: int, end: int) -> None:
        """Postcopy: a guest access to a page not yet here blocks the vCPU
        until the VMM resolves it (the fault goes to the userfaultfd)."""
        uffd = self.uffd
        if uffd is not None:
            uffd.wait_present(first, end)

    def guest_check_page_tags(self, ipa: int, packed) -> bool:
        """A tag-checked access to whole pages whose tags the guest set and
        remembers (``packed``, two a byte): False, and counted, when any
        granule's tag differs."""
        npages = len(packed) // PACKED_TAGS_PER_PAGE
        first = self.ipa_to_ram(ipa, npages * PAGE_SIZE) // PAGE_SIZE
        self._await_pages(first, first + npages)
        with self.mmu_lock:
            self.sanitise(first, first + npages)
            same = self.memory.tags[first * PACKED_TAGS_PER_PAGE : (first + npages) * PACKED_TAGS_PER_PAGE] == packed
        self.counters.add("guest.tag_checked_loads")
        if not same:
            self.counters.add("guest.wrong_tag_accesses")
        return same

    def guest_check_tags(self, ipa: int, length: int, tag: int) -> bool:
        """A tag-checked load of ``length`` bytes through a pointer tagged
        ``tag`` (as an MTE allocator's user does): False, and counted, when
        any granule's allocation tag differs -- a tag check fault the guest
        would take.  Like any access it faults the pages in and sanitises
        untagged ones first."""
        off = self.ipa_to_ram(ipa, length)
        first, end = off // PAGE_SIZE, -(-(off + length) // PAGE_SIZE)
        self._await_pages(first, end)
        with self.mmu_lock:
            self.sanitise(first, end)
            seen = self.guest_tags(ipa, length)
        self.counters.add("guest.tag_checked_loads")
        if seen.count(tag) == len(seen):
            return True
        self.counters.add("guest.wrong_tag_accesses")
        return False

    def guest_read(self, ipa: int, length: int) -> bytes:
        off = self.ipa_to_ram(ipa, length)
        self._await_pages(off // PAGE_SIZE, -(-(off + length) // PAGE_SIZE))
        with self.mmu_lock:
            self.sanitise(off // PAGE_SIZE, -(-(off + length) // PAGE_SIZE))
            return bytes(self.memory.data[off : off + length])

    def guest_tags(self, ipa: int, length: int) -> bytes:
        """The allocation tags of a granule-aligned range, one byte per granule."""
        off = self.ipa_to_ram(ipa, length)
        g0, n = off // GRANULE, length // GRANULE
        packed_lo, packed_hi = g0 // 2, -(-(g0 + n) // 2)
        unpacked = tagops.unpack(self.memory.tags[packed_lo:packed_hi])
        skip = g0 - 2 * packed_lo
        return bytes(unpacked[skip : skip + n])

    # -- dirty logging (KVM_MEM_LOG_DIRTY_PAGES / KVM_GET_DIRTY_LOG) ------------
    def enable_dirty_logging(self, slot: int) -> None:
        self.counters.add("syscalls.kvm_set_user_memory_region")
        with self.mmu_lock:
            self._dirty.setdefault(slot, bytearray(self.memslots[slot].npages))

    def disable_dirty_logging(self, slot: int) -> None:
        self.counters.add("syscalls.kvm_set_user_memory_region")
        with self.mmu_lock:
            self._dirty.pop(slot, None)

    def dirty_logging(self) -> bool:
        return bool(self._dirty)

    def get_dirty_log(self, slot: int) -> DirtyLog:
        """KVM_GET_DIRTY_LOG: return the slot's dirty pages and clear the log
        (write-protecting the pages again) atomically against guest stores."""
        self.counters.add("syscalls.kvm_get_dirty_log")
        return self._get_and_clear(self._dirty, slot, "dirty logging")

    def _get_and_clear(self, logs: dict, slot: int, what: str) -> DirtyLog:
        if not 0 <= slot < len(self.memslots):
            raise einval(f"no memslot {slot}")
        with self.mmu_lock:
            bitmap = logs.get(slot)
            if bitmap is None:
                raise KernelError("ENOENT", f"{what} is not enabled on memslot {slot}")
            snapshot = bytes(bitmap)
            bitmap[:] = bytes(len(bitmap))
        return DirtyLog(self.memslots[slot], snapshot)

    # -- PROPOSAL: tag-dirty log (KVM_GET_TAG_DIRTY_LOG) ------------------------
    def enable_tag_dirty_logging(self, slot: int) -> None:
        """Proposed: keep a separate log of tag-only stores for this memslot."""
        self.counters.add("syscalls.kvm_enable_tag_dirty_log")
        if not self.mte_enabled:
            raise einval("tag dirty logging needs MTE")
        with self.mmu_lock:
            self._tag_dirty.setdefault(slot, bytearray(self.memslots[slot].npages))

    def disable_tag_dirty_logging(self, slot: int) -> None:
        with self.mmu_lock:
            self._tag_dirty.pop(slot, None)

    def get_tag_dirty_log(self, slot: int) -> DirtyLog:
        """Proposed KVM_GET_TAG_DIRTY_LOG: get-and-clear, as KVM_GET_DIRTY_LOG."""
        self.counters.add("syscalls.kvm_get_tag_dirty_log")
        return self._get_and_clear(self._tag_dirty, slot, "tag dirty logging")

    def _mark_tag_store(self, first_page: int, end_page: int) -> None:
        # Caller holds mmu_lock.  A tag store is a store: it dirties the page
        # in KVM's log -- unless the proposed tag-dirty log is on.
        if self._tag_dirty:
            self._mark(self._tag_dirty, first_page, end_page, "kvm.tag_access_faults")
            # Per memslot: a slot without a tag log still logs the store as a write.
            untracked = {s: b for s, b in self._dirty.items() if s not in self._tag_dirty}
            if untracked:
                self._mark(untracked, first_page, end_page, "kvm.write_protect_faults")
        else:
            self._mark_dirty(first_page, end_page)

    def _mark_dirty(self, first_page: int, end_page: int) -> None:
        # Caller holds mmu_lock.  Pages are in GuestMemory numbering.
        self._mark(self._dirty, first_page, end_page, "kvm.write_protect_faults")

    def _mark(self, logs: dict, first_page: int, end_page: int, fault_counter: str) -> None:
        for slot_no, bitmap in logs.items():
            slot = self.memslots[slot_no]
            a = max(first_page, slot.first_page) - slot.first_page
            b = min(end_page, slot.first_page + slot.npages) - slot.first_page
            if a < b:
                newly = bitmap.count(0, a, b)
                if newly:
                    self.counters.add(fault_counter, newly)
                bitmap[a:b] = b"\x01" * (b - a)

    # -- KVM_ARM_MTE_COPY_TAGS -------------------------------------------------
    def mte_copy_tags(self, guest_ipa: int, length: int, buf, flags: int, reserved: tuple[int, int] = (0, 0)) -> int:
        """KVM_ARM_MTE_COPY_TAGS.  ``buf`` holds one byte per granule (the tag in
        the low nibble): written for FROM_GUEST, read for TO_GUEST.  Returns the
        guest bytes covered; a failure after some pages returns the bytes done."""
        one = self._one_slot
        if (
            one is not None
            and flags in _COPY_FLAGS
            and (flags or not self._dirty)
            and reserved == (0, 0)
            and self.mte_enabled
            and not (guest_ipa | length) % PAGE_SIZE
            and one[0] <= guest_ipa
            and 0 < length <= _INT_MAX
            and guest_ipa + length <= one[1]
        ):
            # The common case, a well-formed call inside the one memslot: the
            # checks in one expression and the call counted with its work (a
            # dirty pass makes one of these per scattered page on each side).
            view = buf if _plain_bytes(buf) else memoryview(buf).cast("B")
            npages = length // PAGE_SIZE
            need = npages * GRANULES_PER_PAGE
            if len(view) >= need:
                if len(view) > need:
                    view = memoryview(view)[:need]
                first = (one[2] + guest_ipa - one[0]) // PAGE_SIZE
                if flags & KVM_ARM_TAGS_FROM_GUEST:
                    self._tags_to_user(first, npages, view, calls=1)
                else:
                    self._tags_from_user(first, npages, view, calls=1)
                return length
        error = self._copy_tags_einval(guest_ipa, length, flags, reserved)
        from_guest = flags & KVM_ARM_TAGS_FROM_GUEST
        if error is None and not from_guest and self._dirty:
            # Measured (docs/FIDELITY.md): KVM refuses to store tags while any
            # memslot logs dirty pages, because the store would not be logged;
            # a zero length is refused too (the check comes first).
            error = KernelError("EBUSY", "tags cannot be copied to the guest while dirty logging is on")
        if error is not None:
            self.counters.add("syscalls.kvm_arm_mte_copy_tags")
            raise error
        view = memoryview(buf).cast("B")
        self.counters.add("syscalls.kvm_arm_mte_copy_tags")
        done = 0
        error: KernelError | None = None
        while done < length:
            ipa = guest_ipa + done
            slot = self.memslot_for(ipa)
            if slot is None:
                error = efault(f"guest address {ipa:#x} is outside every memslot")
                break
            span = min(length - done, slot.guest_phys_addr + slot.size - ipa)
            tag_offset = (done // PAGE_SIZE) * GRANULES_PER_PAGE
            room = (len(view) - tag_offset) // GRANULES_PER_PAGE
            npages = min(span // PAGE_SIZE, max(room, 0))
            first = (slot.ram_offset + ipa - slot.guest_phys_addr) // PAGE_SIZE
            if npages:
                out = view[tag_offset : tag_offset + npages * GRANULES_PER_PAGE]
                if from_guest:
                    self._tags_to_user(first, npages, out)
                else:
                    self._tags_from_user(first, npages, out)
                done += npages * PAGE_SIZE
            if npages * PAGE_SIZE < span:
                # The user buffer ends inside the next page's tags.  The
                # kernel pinned that page first, which faulted it in, then
                # copied tag by tag until the buffer faulted.
                if from_guest:
                    # Measured: the tags that fit are in the buffer (zeros
                    # for an untagged page), the page is faulted in.
                    self._partial_tags_to_user(first + npages, view[tag_offset + npages * GRANULES_PER_PAGE :])
                else:
                    # It clears that page's tags rather than leave a mix of
                    # old and new ones, and marks it tagged.
                    self._clear_failed_page(first + npages)
                error = efault("tag buffer is too small for the requested length")
                break
        if done:
            return done
        if error:
            raise error
        return 0

    def _copy_tags_einval(self, guest_ipa, length, flags, reserved) -> KernelError | None:
        """The EINVAL a KVM_ARM_MTE_COPY_TAGS call fails its argument checks with, or None."""
        if any(reserved):
            return einval("reserved fields must be zero")
        if not self.mte_enabled:
            return einval("MTE is not enabled for this VM")
        if flags & ~KVM_ARM_TAGS_FROM_GUEST:
            return einval(f"unknown flags {flags:#x}")
        if guest_ipa % PAGE_SIZE or length % PAGE_SIZE:
            return einval("guest_ipa and length must be page aligned")
        if length > _INT_MAX:
            return einval("length does not fit the return value")
        return None

    def _partial_tags_to_user(self, page: int, out: memoryview) -> None:
        """FROM_GUEST of ``page`` into a buffer that holds fewer than its
        GRANULES_PER_PAGE tags: the first len(out) tags land, then the copy
        faults (the call counts the page as not done)."""
        mem = self.memory
        with self.mmu_lock:
            self.counters.add("kernel.pages_faulted_in", mem.fault_in(page, page + 1))
            if mem.tagged[page]:
                out[:] = tagops.unpack(mem.page_tags(page))[: len(out)]
            else:
                out[:] = bytes(len(out))

    def _clear_failed_page(self, page: int) -> None:
        with self.mmu_lock:
            self.counters.add("kernel.pages_faulted_in", self.memory.fault_in(page, page + 1))
            self.memory.tags[page * PACKED_TAGS_PER_PAGE : (page + 1) * PACKED_TAGS_PER_PAGE] = bytes(
                PACKED_TAGS_PER_PAGE
            )
            self.memory.tagged[page] = 1
        self.counters.add("kernel.tag_clears")

    def _tags_to_user(self, first: int, npages: int, out: memoryview, calls: int = 0) -> None:
        """FROM_GUEST.  The kernel pins each page first, which faults a
        never-populated page in (guest RAM is a memfd: shared memory
        allocates on a read fault too)."""
        mem = self.memory
        end = first + npages
        if mem.tagged.find(0, first, end) < 0:  # every page tagged: one unpack
            out[:] = tagops.unpack(mem.tags[first * PACKED_TAGS_PER_PAGE : end * PACKED_TAGS_PER_PAGE])
            self.counters.add_many(
                ("syscalls.kvm_arm_mte_copy_tags", calls),
                ("kernel.page_tag_reads", npages),
                ("bytes.tags_to_user", npages * GRANULES_PER_PAGE),
            )
            return
        # Run by run: tagged pages get their storage unpacked, pages not
        # marked tagged read as zeros (clear_user; their storage is not read).
        pos = first
        while pos < end:
            tagged_run = mem.tagged[pos] == 1
            stop = mem.tagged.find(0 if tagged_run else 1, pos, end)
            stop = end if stop < 0 else stop
            lo, hi = (pos - first) * GRANULES_PER_PAGE, (stop - first) * GRANULES_PER_PAGE
            if tagged_run:
                tagops.unpack_into(mem.tags[pos * PACKED_TAGS_PER_PAGE : stop * PACKED_TAGS_PER_PAGE], out, lo)
            else:
                self.counters.add("kernel.pages_faulted_in", mem.fault_in(pos, stop))
                out[lo:hi] = bytes(hi - lo)
            pos = stop
        tagged = mem.tagged.count(1, first, end)
        self.counters.add_many(
            ("syscalls.kvm_arm_mte_copy_tags", calls),
            ("kernel.page_tag_reads", tagged),
            ("kernel.page_zero_fills", npages - tagged),
            ("bytes.tags_to_user", npages * GRANULES_PER_PAGE),
        )

    def _tags_from_user(self, first: int, npages: int, src: memoryview, calls: int = 0) -> None:
        """TO_GUEST.  Pinning a page for writing faults it in, so a page that
        only ever received tags holds memory like any other (a page marked
        tagged always does: see sanitise)."""
        mem = self.memory
        end = first + npages
        packed = tagops.pack(src)
        if mem.tagged.find(0, first, end) >= 0:
            self.counters.add("kernel.pages_faulted_in", mem.fault_in(first, end))
        # Under the MMU lock, as KVM serialises with try_page_mte_tagging():
        # a vCPU's first-touch sanitise must not clear the tags just stored
        # (it saw the page untagged, then cleared it after this store).
        with self.mmu_lock:
            mem.tags[first * PACKED_TAGS_PER_PAGE : end * PACKED_TAGS_PER_PAGE] = packed
            mem.tagged[first:end] = b"\x01" * npages
        self.counters.add_many(
            ("syscalls.kvm_arm_mte_copy_tags", calls),
            ("kernel.page_tag_writes", npages),
            ("bytes.tags_from_user", npages * GRANULES_PER_PAGE),
        )

    # -- VMM mappings ------------------------------------------------------------
    def map_guest_ram(self, prot_mte: bool = False, dirty_tracker=None):
        """mmap() the guest RAM into the VMM, untagged or with PROT_MTE."""
        from .mapping import VmmMapping

        self.counters.add("syscalls.mmap")
        mapping = VmmMapping(self, prot_mte=prot_mte, dirty_tracker=dirty_tracker)
        self._mappings.append(mapping)
        return mapping

    def close(self) -> None:
        self.memory.close()
