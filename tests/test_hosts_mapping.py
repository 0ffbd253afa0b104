"""hosts.mapping.VmmMapping: the VMM's own mappings of guest RAM, untagged or
PROT_MTE -- EL0 tag instructions and their counters, and tag checking of the
VMM's data accesses (none / sync / async, TCO, matching pointer tags)."""

import threading

import pytest

from hosts import GRANULES_PER_PAGE, PACKED_TAGS_PER_PAGE, PAGE_SIZE, Kernel, TagCheckFault, TagCheckMode
from hosts.constants import RAM_BASE_IPA
from hosts.mapping import VMM_MAPPING_BASE

MiB = 1 << 20


@pytest.fixture
def vm():
    vm = Kernel().create_vm(2 * MiB)
    vm.enable_mte()
    yield vm
    vm.close()


@pytest.fixture
def mte_map(vm):
    return vm.map_guest_ram(prot_mte=True)


@pytest.fixture
def plain_map(vm):
    return vm.map_guest_ram(prot_mte=False)


def tag_page(vm, page, tag):
    vm.guest_set_tags(RAM_BASE_IPA + page * PAGE_SIZE, PAGE_SIZE, tag)


def test_map_counts_mmap(vm):
    vm.map_guest_ram()
    vm.map_guest_ram(prot_mte=True)
    assert vm.counters.get("syscalls.mmap") == 2


def test_prot_mte_mapping_needs_mte_enabled():
    vm = Kernel().create_vm(MiB)
    with pytest.raises(ValueError):
        vm.map_guest_ram(prot_mte=True)
    vm.map_guest_ram(prot_mte=False)


# -- untagged mapping ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.load_tags(0, 1),
        lambda m: m.load_tag(0),
        lambda m: m.store_tags(0, bytes(PACKED_TAGS_PER_PAGE)),
        lambda m: m.store_tag_range(0, 32, 1),
    ],
)
def test_untagged_mapping_refuses_tag_instructions(plain_map, call):
    with pytest.raises(PermissionError):
        call(plain_map)
    assert plain_map.counters.get("el0.ldg") == plain_map.counters.get("el0.stg") == 0


@pytest.mark.parametrize("mode", list(TagCheckMode))
def test_untagged_mapping_is_never_tag_checked(vm, plain_map, mode):
    tag_page(vm, 1, 0x9)
    plain_map.set_tag_check_mode(mode)
    plain_map.write(PAGE_SIZE, b"no check", pointer_tag=3)
    assert bytes(plain_map.read(PAGE_SIZE, 8, pointer_tag=5)) == b"no check"
    assert vm.counters.get("tag_check_faults") == 0
    assert not plain_map.take_async_fault()


def test_untagged_mapping_access_does_not_sanitise(vm, plain_map):
    plain_map.write(3 * PAGE_SIZE, b"vmm")
    assert vm.memory.tagged[3] == 0
    assert vm.counters.get("kernel.tag_clears") == 0


def test_read_returns_a_view_of_guest_ram(vm, plain_map):
    vm.guest_write(RAM_BASE_IPA + 100, b"hello")
    view = plain_map.read(100, 5)
    assert isinstance(view, memoryview) and bytes(view) == b"hello"


@pytest.mark.parametrize("offset,length", [(-1, 4), (2 * MiB - 2, 4), (2 * MiB, 1), (0, 2 * MiB + 1)])
def test_access_outside_the_mapping(mte_map, plain_map, offset, length):
    for m in (mte_map, plain_map):
        with pytest.raises(IndexError):
            m.read(offset, length)
        with pytest.raises(IndexError):
            m.write(offset, b"x" * length)


# -- PROT_MTE: EL0 tag instructions ---------------------------------------------------------
def test_load_tags_counts_one_ldg_per_granule(vm, mte_map):
    tag_page(vm, 4, 0x5)
    tag_page(vm, 5, 0xA)
    packed = mte_map.load_tags(4, 2)
    assert packed == b"\x55" * 128 + b"\xaa" * 128
    assert vm.counters.get("el0.ldg") == 2 * GRANULES_PER_PAGE
    assert vm.counters.get("syscalls.kvm_arm_mte_copy_tags") == 0


def test_load_tags_of_a_never_tagged_page_sanitises_and_reads_zero(vm, mte_map):
    vm.memory.page_tags(7)[:] = b"\xff" * PACKED_TAGS_PER_PAGE  # stale storage
    assert mte_map.load_tags(7, 1) == bytes(PACKED_TAGS_PER_PAGE)
    assert vm.memory.tagged[7] == 1
    assert vm.counters.get("kernel.tag_clears") == 1


def test_store_tags_counts_one_stg_per_granule(vm, mte_map):
    packed = bytes(range(256))
    mte_map.store_tags(10, packed)
    assert bytes(vm.memory.tags[10 * 128 : 12 * 128]) == packed
    assert list(vm.memory.tagged[10:12]) == [1, 1]
    assert vm.counters.get("el0.stg") == 2 * GRANULES_PER_PAGE
    assert vm.guest_tags(RAM_BASE_IPA + 10 * PAGE_SIZE, 32) == b"\x00\x00"
    # packed byte 1 (0x01) holds granules 2 (low nibble) and 3 (high nibble)
    assert vm.guest_tags(RAM_BASE_IPA + 10 * PAGE_SIZE + 16 * 2, 48) == b"\x01\x00\x02"


def test_store_then_load_round_trip(mte_map):
    packed = bytes((i * 37) & 0xFF for i in range(3 * PACKED_TAGS_PER_PAGE))
    mte_map.store_tags(100, packed)
    assert mte_map.load_tags(100, 3) == packed


def test_load_tag_and_store_tag_range(vm, mte_map):
    mte_map.store_tag_range(PAGE_SIZE + 16, 48, 0x6)  # granules 1..3 of page 1: 3 granules
    assert vm.counters.get("el0.st2g") == 1
    assert vm.counters.get("el0.stg") == 1
    assert [mte_map.load_tag(PAGE_SIZE + 16 * g) for g in range(5)] == [0, 6, 6, 6, 0]
    assert vm.counters.get("el0.ldg") == 5
    with pytest.raises(ValueError):
        mte_map.store_tag_range(PAGE_SIZE + 8, 16, 1)
    with pytest.raises(ValueError):
        mte_map.store_tag_range(PAGE_SIZE, 24, 1)


@pytest.mark.parametrize("first,n", [(-1, 1), (511, 2), (512, 1), (600, 0)])
def test_tag_pages_outside_the_mapping(mte_map, first, n):
    with pytest.raises(IndexError):
        mte_map.load_tags(first, n)
    with pytest.raises(IndexError):
        mte_map.store_tags(first, bytes(n * PACKED_TAGS_PER_PAGE))


def test_store_tags_needs_whole_pages(mte_map):
    with pytest.raises(ValueError):
        mte_map.store_tags(0, bytes(PACKED_TAGS_PER_PAGE + 1))


def test_vmm_tag_stores_do_not_dirty_the_kvm_log(vm, mte_map):
    vm.enable_dirty_logging(0)
    mte_map.store_tags(3, bytes(PACKED_TAGS_PER_PAGE))
    mte_map.store_tag_range(5 * PAGE_SIZE, 16, 1)
    assert vm.get_dirty_log(0).count() == 0


# -- PROT_MTE: tag-checked data accesses -----------------------------------------------------
def test_first_access_through_prot_mte_sanitises(vm, mte_map):
    vm.memory.page_tags(8)[:] = b"\x77" * PACKED_TAGS_PER_PAGE
    mte_map.write(8 * PAGE_SIZE, b"abc")
    assert vm.memory.tagged[8] == 1
    assert bytes(vm.memory.page_tags(8)) == bytes(PACKED_TAGS_PER_PAGE)


def test_default_mode_none_never_faults(vm, mte_map):
    tag_page(vm, 2, 0x3)
    mte_map.write(2 * PAGE_SIZE, b"unchecked", pointer_tag=0)
    assert bytes(mte_map.read(2 * PAGE_SIZE, 9)) == b"unchecked"
    assert vm.counters.get("tag_check_faults") == 0


@pytest.mark.parametrize(
    "offset,length,bad_granule",
    [
        (2 * PAGE_SIZE, PAGE_SIZE, 2 * 256 + 5),  # mismatch inside the access
        (2 * PAGE_SIZE + 3, 100, 2 * 256 + 5),  # access starts mid-granule
        (2 * PAGE_SIZE + 5 * 16 + 7, 20, 2 * 256 + 5),  # first granule touched mismatches
        (2 * PAGE_SIZE, 2 * PAGE_SIZE, 3 * 256),  # mismatch on the next page
    ],
)
def test_sync_fault_reports_first_mismatching_granule(vm, mte_map, offset, length, bad_granule):
    tag_page(vm, 2, 0x4)
    tag_page(vm, 3, 0x4)
    vm.guest_set_tags(RAM_BASE_IPA + bad_granule * 16, 16, 0xB)
    mte_map.set_tag_check_mode(TagCheckMode.SYNC)
    before = bytes(vm.memory.data[offset : offset + length])
    with pytest.raises(TagCheckFault) as info:
        mte_map.write(offset, b"\x99" * length, pointer_tag=0x4)
    fault = info.value
    want = max(offset, bad_granule * 16)
    assert fault.address == (VMM_MAPPING_BASE + want) | (0x4 << 56)
    assert (fault.address >> 56) & 0xF == 0x4
    assert fault.logical_tag == 0x4 and fault.allocation_tag == 0xB
    assert f"{fault.address:#x}" in str(fault)
    assert vm.counters.get("tag_check_faults") == 1
    assert bytes(vm.memory.data[offset : offset + length]) == before  # the store did not happen


def test_sync_fault_on_read(vm, mte_map):
    tag_page(vm, 1, 0x2)
    mte_map.set_tag_check_mode(TagCheckMode.SYNC)
    with pytest.raises(TagCheckFault) as info:
        mte_map.read(PAGE_SIZE + 32, 16, pointer_tag=0x7)
    assert info.value.address == (VMM_MAPPING_BASE + PAGE_SIZE + 32) | (0x7 << 56)
    assert info.value.allocation_tag == 0x2
    assert vm.counters.get("tag_check_faults") == 1


def test_matching_pointer_tag_passes(vm, mte_map):
    tag_page(vm, 6, 0xD)
    mte_map.set_tag_check_mode(TagCheckMode.SYNC)
    mte_map.write(6 * PAGE_SIZE, b"ok" * 100, pointer_tag=0xD)
    assert bytes(mte_map.read(6 * PAGE_SIZE, 4, pointer_tag=0xD)) == b"okok"
    # a never-tagged page reads as tag 0, so the plain pointer matches it
    mte_map.write(9 * PAGE_SIZE, b"zero tag", pointer_tag=0)
    assert vm.counters.get("tag_check_faults") == 0


def test_zero_length_access_never_faults(vm, mte_map):
    tag_page(vm, 6, 0xD)
    mte_map.set_tag_check_mode(TagCheckMode.SYNC)
    mte_map.write(6 * PAGE_SIZE, b"")
    assert vm.counters.get("tag_check_faults") == 0


def test_async_mode_records_without_raising(vm, mte_map):
    tag_page(vm, 2, 0x4)
    mte_map.set_tag_check_mode(TagCheckMode.ASYNC)
    assert not mte_map.take_async_fault()
    mte_map.write(2 * PAGE_SIZE, b"async", pointer_tag=0x1)
    assert bytes(vm.memory.data[2 * PAGE_SIZE : 2 * PAGE_SIZE + 5]) == b"async"  # the store happened
    assert vm.counters.get("tag_check_faults") == 1
    assert mte_map.take_async_fault()
    assert not mte_map.take_async_fault()  # read-and-clear
    mte_map.write(2 * PAGE_SIZE, b"fine", pointer_tag=0x4)
    assert not mte_map.take_async_fault()


def test_tco_suppresses_checks_and_counts_switches(vm, mte_map):
    tag_page(vm, 2, 0x4)
    mte_map.set_tag_check_mode(TagCheckMode.SYNC)
    with mte_map.tco():
        mte_map.write(2 * PAGE_SIZE, b"under tco", pointer_tag=0)
        with mte_map.tco():  # nesting keeps TCO set
            pass
        mte_map.read(2 * PAGE_SIZE, PAGE_SIZE)
    assert vm.counters.get("tag_check_faults") == 0
    assert vm.counters.get("el0.tco_switches") == 4
    with pytest.raises(TagCheckFault):  # checks are back after the block
        mte_map.write(2 * PAGE_SIZE, b"x")


def test_tco_is_restored_when_the_body_raises(vm, mte_map):
    tag_page(vm, 2, 0x4)
    mte_map.set_tag_check_mode(TagCheckMode.SYNC)
    with pytest.raises(RuntimeError):
        with mte_map.tco():
            raise RuntimeError("device error")
    with pytest.raises(TagCheckFault):
        mte_map.write(2 * PAGE_SIZE, b"x")


def test_set_tag_check_mode_counts_prctl_only_on_change(vm, mte_map):
    mte_map.set_tag_check_mode(TagCheckMode.NONE)
    assert vm.counters.get("syscalls.prctl") == 0
    mte_map.set_tag_check_mode(TagCheckMode.SYNC)
    mte_map.set_tag_check_mode(TagCheckMode.SYNC)
    mte_map.set_tag_check_mode(TagCheckMode.ASYNC)
    assert vm.counters.get("syscalls.prctl") == 2


def test_tag_check_state_is_per_thread(vm, mte_map):
    tag_page(vm, 2, 0x4)
    mte_map.set_tag_check_mode(TagCheckMode.SYNC)
    seen = []

    def other_thread():
        mte_map.write(2 * PAGE_SIZE, b"other thread: mode NONE")
        seen.append(mte_map.take_async_fault())

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert seen == [False]
    assert vm.counters.get("tag_check_faults") == 0
    with pytest.raises(TagCheckFault):
        mte_map.write(2 * PAGE_SIZE, b"this thread: SYNC")


def test_mappings_have_independent_thread_state(vm):
    a = vm.map_guest_ram(prot_mte=True)
    b = vm.map_guest_ram(prot_mte=True)
    tag_page(vm, 2, 0x4)
    a.set_tag_check_mode(TagCheckMode.SYNC)
    b.write(2 * PAGE_SIZE, b"b is unchecked")
    with pytest.raises(TagCheckFault):
        a.write(2 * PAGE_SIZE, b"a is checked")


# -- the VMM's own tag stores ---------------------------------------------------------------
@pytest.mark.parametrize(
    "store",
    [
        lambda m: m.store_tags(3, b"\x77" * (2 * PACKED_TAGS_PER_PAGE)),
        lambda m: m.store_tag_range(3 * PAGE_SIZE + 64, PAGE_SIZE, 0x7),
    ],
)
def test_vmm_tag_stores_reach_the_vmm_dirty_bitmap(vm, store):
    """They bypass stage 2 like the VMM's data stores, so KVM's log never
    sees them: without the VMM's own bitmap a migration would miss them."""
    from hosts.mapping import VmmDirtyTracker

    tracker = VmmDirtyTracker(vm.memory.npages)
    tracker.enabled = True
    mapping = vm.map_guest_ram(prot_mte=True, dirty_tracker=tracker)
    store(mapping)
    dirty = tracker.harvest()
    assert [i for i, b in enumerate(dirty) if b] == [3, 4]


def test_a_vmm_tag_store_faults_an_untouched_page_in(vm, mte_map):
    assert vm.memory.populated_ranges(9, 10) == []
    mte_map.store_tags(9, b"\x55" * PACKED_TAGS_PER_PAGE)
    assert vm.memory.populated_ranges(9, 10) == [(9, 10)]
    assert vm.counters.get("kernel.pages_faulted_in") == 1
    assert mte_map.load_tag(9 * PAGE_SIZE) == 5
