"""hosts.kernel: the KVM-like interface checked rule by rule against
DESIGN.md "Domain facts" -- KVM_CAP_ARM_MTE ordering, sanitise on first
guest touch, KVM_ARM_MTE_COPY_TAGS (every EINVAL / EFAULT, buffer format,
partial copies, counters) and KVM_GET_DIRTY_LOG get-and-clear."""

import errno
import threading

import pytest

from hosts import (
    GRANULES_PER_PAGE,
    KVM_ARM_TAGS_FROM_GUEST,
    KVM_ARM_TAGS_TO_GUEST,
    PACKED_TAGS_PER_PAGE,
    PAGE_SIZE,
    Kernel,
    KernelError,
    SimulatedHost,
)
from hosts import tags as T
from hosts.constants import RAM_BASE_IPA

MiB = 1 << 20
BASE = RAM_BASE_IPA
FROM, TO = KVM_ARM_TAGS_FROM_GUEST, KVM_ARM_TAGS_TO_GUEST


@pytest.fixture
def kernel():
    return Kernel()


@pytest.fixture
def vm(kernel):
    vm = kernel.create_vm(4 * MiB)
    vm.enable_mte()
    yield vm
    vm.close()


@pytest.fixture
def vm_slots(kernel):
    """Three contiguous memslots: 1 MiB, 1 MiB, 2 MiB."""
    vm = kernel.create_vm(4 * MiB, [MiB, MiB, 2 * MiB])
    vm.enable_mte()
    yield vm
    vm.close()


def ipa(page: int, offset: int = 0) -> int:
    return BASE + page * PAGE_SIZE + offset


def raise_errno(name):
    """pytest.raises for a KernelError with errno_name ``name``."""

    class _Ctx:
        def __enter__(self):
            self._cm = pytest.raises(KernelError)
            self.info = self._cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self._cm.__exit__(*exc)
            if handled:
                err = self.info.value
                assert err.errno_name == name, err
                assert err.errno == getattr(errno, name)
                assert isinstance(err, OSError)
                assert name in str(err)
            return handled

    return _Ctx()


def stale_tags(vm, page: int, value: int = 0xAB) -> None:
    """Put leftover tag storage on a page that is NOT marked tagged, as a
    recycled host page would have: the kernel must not trust it."""
    vm.memory.page_tags(page)[:] = bytes([value]) * PACKED_TAGS_PER_PAGE
    assert vm.memory.tagged[page] == 0


# -- VM creation, memslots, KVM_CAP_ARM_MTE ---------------------------------------------
def test_memslots_are_contiguous_from_ram_base(vm_slots):
    slots = vm_slots.memslots
    assert [(s.slot, s.guest_phys_addr, s.size, s.ram_offset) for s in slots] == [
        (0, BASE, MiB, 0),
        (1, BASE + MiB, MiB, MiB),
        (2, BASE + 2 * MiB, 2 * MiB, 2 * MiB),
    ]
    assert [s.first_page for s in slots] == [0, 256, 512]
    assert vm_slots.memslot_for(BASE + MiB) is slots[1]
    assert vm_slots.memslot_for(BASE - 1) is None
    assert vm_slots.memslot_for(BASE + 4 * MiB) is None
    assert vm_slots.page_to_ipa(256) == BASE + MiB
    with pytest.raises(ValueError):
        vm_slots.page_to_ipa(1024)


@pytest.mark.parametrize("sizes", [[MiB, MiB], [MiB, 3 * MiB + 1], [0, 4 * MiB], [-MiB, 5 * MiB]])
def test_bad_memslot_sizes(kernel, sizes):
    with pytest.raises(ValueError):
        kernel.create_vm(4 * MiB, sizes)


def test_enable_mte_before_vcpus(kernel):
    vm = kernel.create_vm(MiB)
    assert not vm.mte_enabled
    vm.enable_mte()
    assert vm.mte_enabled
    assert vm.create_vcpu() == 0
    assert vm.create_vcpu() == 1
    c = kernel.counters
    assert c.get("syscalls.kvm_create_vm") == 1
    assert c.get("syscalls.kvm_enable_cap") == 1
    assert c.get("syscalls.kvm_create_vcpu") == 2


def test_enable_mte_after_create_vcpu_is_einval(kernel):
    vm = kernel.create_vm(MiB)
    vm.create_vcpu()
    with raise_errno("EINVAL") as info:
        vm.enable_mte()
    assert "before any vCPU" in info.value.message
    assert not vm.mte_enabled
    assert kernel.counters.get("syscalls.kvm_enable_cap") == 1


def test_enable_mte_after_simulated_host_made_its_vcpus():
    host = SimulatedHost(MiB, mte=False, vcpus=2)
    try:
        with raise_errno("EINVAL"):
            host.vm.enable_mte()
        assert not host.vm.mte_enabled
    finally:
        host.close()


# -- sanitise on first guest touch --------------------------------------------------------
@pytest.mark.parametrize("touch", ["write", "read", "set_tags", "store_packed"])
def test_first_guest_touch_clears_tags_and_marks_tagged(vm, touch):
    stale_tags(vm, 3)
    stale_tags(vm, 4)
    before = vm.counters.get("kernel.tag_clears")
    if touch == "write":
        vm.guest_write(ipa(3, 100), b"x" * PAGE_SIZE)  # pages 3 and 4
    elif touch == "read":
        vm.guest_read(ipa(3, 100), PAGE_SIZE)
    elif touch == "set_tags":
        vm.guest_set_tags(ipa(3, 4080), 32, 0)  # last granule of 3, first of 4
    else:
        vm.guest_store_tags_packed(ipa(3), bytes(2 * PACKED_TAGS_PER_PAGE))
    assert vm.memory.tagged[3] == vm.memory.tagged[4] == 1
    assert bytes(vm.memory.page_tags(3)) == bytes(PACKED_TAGS_PER_PAGE)
    assert bytes(vm.memory.page_tags(4)) == bytes(PACKED_TAGS_PER_PAGE)
    assert vm.counters.get("kernel.tag_clears") - before == 2
    assert vm.memory.tagged.count(1) == 2  # nothing else touched


def test_tagged_page_keeps_its_tags(vm):
    vm.guest_set_tags(ipa(7), PAGE_SIZE, 9)
    clears = vm.counters.get("kernel.tag_clears")
    assert clears == 1
    vm.guest_write(ipa(7), b"y" * PAGE_SIZE)
    vm.guest_read(ipa(7), PAGE_SIZE)
    assert vm.guest_tags(ipa(7), PAGE_SIZE) == b"\x09" * GRANULES_PER_PAGE
    assert vm.counters.get("kernel.tag_clears") == clears


def test_page_tagged_by_copy_tags_keeps_its_tags_on_guest_touch(vm):
    tags = bytes(range(16)) * 16
    assert vm.mte_copy_tags(ipa(2), PAGE_SIZE, tags, TO) == PAGE_SIZE
    vm.guest_write(ipa(2), b"z" * 100)
    assert vm.guest_tags(ipa(2), PAGE_SIZE) == tags
    assert vm.counters.get("kernel.tag_clears") == 0


def test_without_mte_no_sanitise_and_tag_stores_are_nops(kernel):
    vm = kernel.create_vm(MiB)
    vm.guest_write(ipa(1), b"a" * 10)
    vm.guest_set_tags(ipa(1), PAGE_SIZE, 5)
    vm.guest_store_tags_packed(ipa(2), b"\x55" * PACKED_TAGS_PER_PAGE)
    assert vm.memory.tagged.count(1) == 0
    assert bytes(vm.memory.tags) == bytes(len(vm.memory.tags))
    assert kernel.counters.get("kernel.tag_clears") == 0
    assert kernel.counters.get("guest.tag_store_granules") == 0
    assert bytes(vm.memory.data[PAGE_SIZE : PAGE_SIZE + 10]) == b"a" * 10


# -- guest accesses -------------------------------------------------------------------------
def test_guest_set_tags_granule_exact_and_counted(vm):
    vm.guest_set_tags(ipa(0, 48), 80, 0xC)  # granules 3..7
    tags = vm.guest_tags(ipa(0), 160)
    assert tags == b"\x00" * 3 + b"\x0c" * 5 + b"\x00" * 2
    assert vm.guest_tags(ipa(0, 48), 16) == b"\x0c"  # odd granule alone
    assert vm.guest_tags(ipa(0, 16 * 7), 32) == b"\x0c\x00"
    assert vm.counters.get("guest.tag_store_granules") == 5


@pytest.mark.parametrize("addr,length", [(ipa(0, 8), 16), (ipa(0), 24), (ipa(0, 1), 15)])
def test_guest_set_tags_must_be_granule_aligned(vm, addr, length):
    with pytest.raises(ValueError):
        vm.guest_set_tags(addr, length, 1)


def test_guest_store_tags_packed(vm):
    packed = bytes(range(256)) * 1  # 2 pages of packed tags
    vm.guest_store_tags_packed(ipa(10), packed)
    assert bytes(vm.memory.tags[10 * 128 : 12 * 128]) == packed
    assert vm.guest_tags(ipa(10), 2 * PAGE_SIZE) == T.unpack(packed)
    with pytest.raises(ValueError):
        vm.guest_store_tags_packed(ipa(10, 16), packed)
    with pytest.raises(ValueError):
        vm.guest_store_tags_packed(ipa(10), packed[:100])


@pytest.mark.parametrize("op", ["write", "read", "set_tags", "store_packed", "tags"])
def test_guest_access_outside_memslots_is_efault(vm, op):
    end = BASE + vm.memory.size
    with raise_errno("EFAULT"):
        if op == "write":
            vm.guest_write(end - 8, b"0123456789abcdef")  # runs past the end
        elif op == "read":
            vm.guest_read(BASE - PAGE_SIZE, 16)
        elif op == "set_tags":
            vm.guest_set_tags(end, 16, 1)
        elif op == "store_packed":
            vm.guest_store_tags_packed(end - PAGE_SIZE, bytes(2 * PACKED_TAGS_PER_PAGE))
        else:
            vm.guest_tags(0, 16)


def test_guest_access_must_stay_inside_one_memslot(vm_slots):
    with raise_errno("EFAULT"):
        vm_slots.guest_write(BASE + MiB - 4, b"12345678")
    vm_slots.guest_write(BASE + MiB, b"12345678")  # inside slot 1: fine
    assert bytes(vm_slots.memory.data[MiB : MiB + 8]) == b"12345678"


# -- KVM_ARM_MTE_COPY_TAGS: errors ------------------------------------------------------------
def test_copy_tags_einval_when_mte_is_off(kernel):
    vm = kernel.create_vm(MiB)
    for flags in (FROM, TO):
        with raise_errno("EINVAL") as info:
            vm.mte_copy_tags(BASE, PAGE_SIZE, bytearray(256), flags)
        assert "MTE" in info.value.message
    assert kernel.counters.get("syscalls.kvm_arm_mte_copy_tags") == 2


@pytest.mark.parametrize("reserved", [(1, 0), (0, 1), (0xFFFF, 0xFFFF)])
def test_copy_tags_einval_for_nonzero_reserved(vm, reserved):
    with raise_errno("EINVAL") as info:
        vm.mte_copy_tags(BASE, PAGE_SIZE, bytearray(256), FROM, reserved=reserved)
    assert "reserved" in info.value.message


@pytest.mark.parametrize("flags", [2, 3, 0x80, 1 << 31])
def test_copy_tags_einval_for_unknown_flags(vm, flags):
    with raise_errno("EINVAL") as info:
        vm.mte_copy_tags(BASE, PAGE_SIZE, bytearray(256), flags)
    assert "flags" in info.value.message


@pytest.mark.parametrize(
    "addr,length",
    [
        (BASE + 16, PAGE_SIZE),
        (BASE + PAGE_SIZE // 2, PAGE_SIZE),
        (BASE + 1, PAGE_SIZE),
        (BASE, PAGE_SIZE + 16),
        (BASE, 100),
        (BASE, 1),
    ],
)
@pytest.mark.parametrize("flags", [FROM, TO])
def test_copy_tags_einval_for_unaligned_ipa_or_length(vm, addr, length, flags):
    with raise_errno("EINVAL") as info:
        vm.mte_copy_tags(addr, length, bytearray(2 * 256), flags)
    assert "aligned" in info.value.message
    assert vm.memory.tagged.count(1) == 0


def test_copy_tags_einval_for_length_over_int_max(vm):
    with raise_errno("EINVAL"):
        vm.mte_copy_tags(BASE, 1 << 31, bytearray(256), FROM)


def test_copy_tags_checks_run_before_any_work(vm):
    """A bad request changes nothing, even when its range is valid."""
    with raise_errno("EINVAL"):
        vm.mte_copy_tags(BASE, PAGE_SIZE, b"\x05" * 256, 2)
    assert vm.memory.tagged.count(1) == 0
    assert vm.counters.get("kernel.page_tag_writes") == 0


@pytest.mark.parametrize("flags", [FROM, TO])
@pytest.mark.parametrize("where", ["below", "at_end", "far"])
def test_copy_tags_efault_outside_every_memslot(vm_slots, flags, where):
    addr = {"below": BASE - PAGE_SIZE, "at_end": BASE + 4 * MiB, "far": 1 << 40}[where]
    buf = bytearray(b"\xee" * 256)
    with raise_errno("EFAULT"):
        vm_slots.mte_copy_tags(addr, PAGE_SIZE, buf, flags)
    assert buf == b"\xee" * 256
    assert vm_slots.memory.tagged.count(1) == 0


def test_copy_tags_zero_length(vm):
    assert vm.mte_copy_tags(BASE, 0, bytearray(), FROM) == 0
    assert vm.mte_copy_tags(BASE, 0, b"", TO) == 0


# -- KVM_ARM_MTE_COPY_TAGS: transfers ------------------------------------------------------------
def test_from_guest_one_byte_per_granule(vm):
    vm.guest_set_tags(ipa(5), PAGE_SIZE, 0x3)
    vm.guest_set_tags(ipa(5, 32), 16, 0xF)
    vm.guest_set_tags(ipa(6), PAGE_SIZE, 0x7)
    buf = bytearray(b"\xee" * (3 * GRANULES_PER_PAGE))
    assert vm.mte_copy_tags(ipa(5), 2 * PAGE_SIZE, buf, FROM) == 2 * PAGE_SIZE
    page5 = bytearray(b"\x03" * 256)
    page5[2] = 0x0F
    assert buf[:256] == page5
    assert buf[256:512] == b"\x07" * 256
    assert buf[512:] == b"\xee" * 256  # beyond the request: untouched
    assert bytes(buf[:512]) == vm.guest_tags(ipa(5), 2 * PAGE_SIZE)


def test_from_guest_returns_zeros_for_untagged_pages(vm):
    vm.guest_set_tags(ipa(1), PAGE_SIZE, 0x4)
    stale_tags(vm, 2, 0xCD)  # untagged, storage not trusted
    buf = bytearray(b"\xee" * (3 * 256))
    assert vm.mte_copy_tags(ipa(0), 3 * PAGE_SIZE, buf, FROM) == 3 * PAGE_SIZE
    assert buf == bytes(256) + b"\x04" * 256 + bytes(256)
    # reading tags is not a guest touch: page flags and storage unchanged
    assert list(vm.memory.tagged[:3]) == [0, 1, 0]
    assert bytes(vm.memory.page_tags(2)) == b"\xcd" * PACKED_TAGS_PER_PAGE
    c = vm.counters
    assert c.get("kernel.page_tag_reads") == 1
    assert c.get("kernel.page_zero_fills") == 2
    assert c.get("bytes.tags_to_user") == 3 * 256


def test_from_guest_accepts_any_writable_buffer(vm):
    import array

    vm.guest_set_tags(ipa(0), PAGE_SIZE, 0x6)
    buf = array.array("Q", [0] * 32)  # 256 bytes
    assert vm.mte_copy_tags(BASE, PAGE_SIZE, buf, FROM) == PAGE_SIZE
    assert buf.tobytes() == b"\x06" * 256
    with pytest.raises(TypeError):  # a read-only buffer cannot be written
        vm.mte_copy_tags(BASE, PAGE_SIZE, bytes(256), FROM)


def test_to_guest_stores_tags_and_marks_tagged(vm):
    tags = bytes((i * 5) & 0x0F for i in range(2 * 256))
    assert vm.mte_copy_tags(ipa(9), 2 * PAGE_SIZE, tags, TO) == 2 * PAGE_SIZE
    assert vm.memory.tagged[9] == vm.memory.tagged[10] == 1
    assert vm.memory.tagged.count(1) == 2
    assert vm.guest_tags(ipa(9), 2 * PAGE_SIZE) == tags
    assert bytes(vm.memory.tags[9 * 128 : 11 * 128]) == T.pack(tags)
    out = bytearray(2 * 256)
    vm.mte_copy_tags(ipa(9), 2 * PAGE_SIZE, out, FROM)
    assert out == tags
    c = vm.counters
    assert c.get("kernel.page_tag_writes") == 2
    assert c.get("bytes.tags_from_user") == 512
    assert c.get("kernel.tag_clears") == 0


def test_to_guest_reads_any_buffer_by_bytes_and_only_what_length_covers(vm):
    import array

    tags = bytes((i * 7) & 0x0F for i in range(2 * 256))
    wide = array.array("H")
    wide.frombytes(tags)  # 256 items, 512 bytes
    assert vm.mte_copy_tags(ipa(3), 2 * PAGE_SIZE, wide, TO) == 2 * PAGE_SIZE
    assert vm.guest_tags(ipa(3), 2 * PAGE_SIZE) == tags
    longer = b"\x05" * 256 + b"\x0a" * 256  # a page more than length covers
    assert vm.mte_copy_tags(ipa(7), PAGE_SIZE, longer, TO) == PAGE_SIZE
    assert vm.guest_tags(ipa(7), 2 * PAGE_SIZE) == b"\x05" * 256 + bytes(256)
    assert vm.memory.tagged[8] == 0


def test_to_guest_keeps_only_the_low_nibble(vm):
    vm.mte_copy_tags(ipa(0), PAGE_SIZE, b"\xf3" * 256, TO)
    assert vm.guest_tags(ipa(0), PAGE_SIZE) == b"\x03" * 256


def test_to_guest_overwrites_a_tagged_page_and_zero_tags_mark_tagged(vm):
    vm.guest_set_tags(ipa(1), PAGE_SIZE, 0xE)
    vm.mte_copy_tags(ipa(0), 2 * PAGE_SIZE, bytes(512), TO)
    assert vm.guest_tags(ipa(0), 2 * PAGE_SIZE) == bytes(512)
    assert list(vm.memory.tagged[:2]) == [1, 1]


def test_copy_tags_spans_contiguous_memslots(vm_slots):
    for page, tag in ((255, 1), (256, 2), (511, 3), (512, 4)):
        vm_slots.guest_set_tags(ipa(page), PAGE_SIZE, tag)
    buf = bytearray(1024 * 256)
    assert vm_slots.mte_copy_tags(BASE, 4 * MiB, buf, FROM) == 4 * MiB
    for page, tag in ((255, 1), (256, 2), (511, 3), (512, 4), (0, 0), (1023, 0)):
        assert buf[page * 256 : (page + 1) * 256] == bytes([tag]) * 256
    other = Kernel().create_vm(4 * MiB, [MiB, MiB, 2 * MiB])
    other.enable_mte()
    assert other.mte_copy_tags(BASE, 4 * MiB, buf, TO) == 4 * MiB
    assert bytes(other.memory.tags) == bytes(vm_slots.memory.tags)
    assert other.memory.tagged.count(1) == 1024


@pytest.mark.parametrize("flags", [FROM, TO])
def test_partial_copy_past_the_last_memslot_returns_bytes_done(vm, flags):
    last = vm.memory.npages - 2
    vm.guest_set_tags(ipa(last), 2 * PAGE_SIZE, 0x8)
    buf = bytearray(b"\x09" * (4 * 256))
    before = vm.memory.tagged.count(1)
    done = vm.mte_copy_tags(ipa(last), 4 * PAGE_SIZE, buf, flags)
    assert done == 2 * PAGE_SIZE
    if flags == FROM:
        assert buf == b"\x08" * 512 + b"\x09" * 512
    else:
        assert vm.guest_tags(ipa(last), 2 * PAGE_SIZE) == b"\x09" * 512
        assert vm.memory.tagged.count(1) == before


@pytest.mark.parametrize("flags", [FROM, TO])
def test_partial_copy_when_the_buffer_is_too_small(vm, flags):
    vm.guest_set_tags(ipa(20), 3 * PAGE_SIZE, 0xB)
    buf = bytearray(b"\x02" * (256 + 255))  # one page and a bit
    done = vm.mte_copy_tags(ipa(20), 3 * PAGE_SIZE, buf, flags)
    assert done == PAGE_SIZE
    if flags == FROM:
        # The kernel copies tag by tag until the buffer faults: the page that
        # did not fit is not counted, but the tags that fit are in the buffer
        # (recorded on 6.1 and 6.12: tests/fidelity, fault.from_mid_page1).
        assert buf == b"\x0b" * (256 + 255)
    else:
        # The page whose copy from the buffer failed has its tags cleared
        # (not left stale); the page after it is not reached.
        assert vm.guest_tags(ipa(20), 3 * PAGE_SIZE) == b"\x02" * 256 + bytes(256) + b"\x0b" * 256


@pytest.mark.parametrize("flags", [FROM, TO])
def test_buffer_too_small_for_the_first_page_is_efault(vm, flags):
    vm.guest_set_tags(ipa(0), PAGE_SIZE, 0x5)
    with raise_errno("EFAULT"):
        vm.mte_copy_tags(ipa(0), PAGE_SIZE, bytearray(b"\x03" * 255), flags)
    # FROM_GUEST leaves the page alone; a failed TO_GUEST clears its tags
    assert vm.guest_tags(ipa(0), PAGE_SIZE) == (b"\x05" * 256 if flags == FROM else bytes(256))
    assert vm.memory.tagged[0] == 1


def test_a_failed_copy_to_an_untouched_page_leaves_it_tagged_and_present(vm):
    with raise_errno("EFAULT"):
        vm.mte_copy_tags(ipa(7), PAGE_SIZE, bytearray(10), TO)
    assert vm.memory.tagged[7] == 1 and vm.memory.populated_ranges(7, 8) == [(7, 8)]
    assert vm.guest_tags(ipa(7), PAGE_SIZE) == bytes(256)


@pytest.mark.parametrize("flags", [FROM, TO])
def test_the_ioctl_faults_untouched_pages_in(vm, flags):
    assert vm.memory.populated_ranges(40, 44) == []
    before = vm.counters.snapshot().get("kernel.pages_faulted_in", 0)
    buf = bytearray(b"\x06" * (4 * 256))
    assert vm.mte_copy_tags(ipa(40), 4 * PAGE_SIZE, buf, flags) == 4 * PAGE_SIZE
    assert vm.memory.populated_ranges(40, 44) == [(40, 44)]
    assert vm.counters.snapshot()["kernel.pages_faulted_in"] - before == 4
    if flags == FROM:  # read as zeros, and still not marked tagged
        assert buf == bytes(4 * 256) and vm.memory.tagged[40:44] == bytes(4)
    else:
        assert vm.guest_tags(ipa(40), 4 * PAGE_SIZE) == b"\x06" * 1024 and vm.memory.tagged[40:44] == b"\x01" * 4
    # a second call faults nothing in
    vm.mte_copy_tags(ipa(40), 4 * PAGE_SIZE, buf, flags)
    assert vm.counters.snapshot()["kernel.pages_faulted_in"] - before == 4


@pytest.mark.parametrize("store", ["stg", "stgm"])
def test_a_guest_tag_store_faults_an_untouched_page_in(vm, store):
    """STG is a store: at the first stage-2 fault the page is allocated and
    sanitised, then tagged, so it holds memory though no data was written."""
    assert vm.memory.populated_ranges(50, 52) == []
    if store == "stg":
        vm.guest_set_tags(ipa(50), 2 * PAGE_SIZE, 0x9)
    else:
        vm.guest_store_tags_packed(ipa(50), b"\x99" * 256)
    assert vm.memory.populated_ranges(50, 52) == [(50, 52)]
    assert vm.counters.snapshot()["kernel.pages_faulted_in"] == 2
    assert bytes(vm.memory.data[50 * PAGE_SIZE : 52 * PAGE_SIZE]) == bytes(2 * PAGE_SIZE)
    assert vm.guest_tags(ipa(50), 2 * PAGE_SIZE) == b"\x09" * 512


def test_a_guest_data_store_is_not_counted_as_a_tag_fault_in(vm):
    vm.guest_write(ipa(60), b"x" * 100)
    assert vm.memory.populated_ranges(60, 61) == [(60, 61)]
    assert vm.counters.snapshot().get("kernel.pages_faulted_in", 0) == 0


def test_copy_tags_counters(vm):
    buf = bytearray(4 * 256)
    vm.mte_copy_tags(ipa(0), 4 * PAGE_SIZE, buf, FROM)
    vm.mte_copy_tags(ipa(0), 4 * PAGE_SIZE, buf, TO)
    with raise_errno("EINVAL"):
        vm.mte_copy_tags(ipa(0), 3, buf, TO)
    c = vm.counters.snapshot()
    assert c["syscalls.kvm_arm_mte_copy_tags"] == 3
    assert c["bytes.tags_to_user"] == 1024
    assert c["bytes.tags_from_user"] == 1024
    assert c["kernel.page_zero_fills"] == 4
    assert c["kernel.page_tag_writes"] == 4


def test_to_guest_is_serialised_with_guest_first_touch(vm):
    """TO_GUEST stores tags and marks the page under the MMU lock, as KVM
    serialises with try_page_mte_tagging(): a vCPU in the middle of the
    first-touch sanitise of the same page (holding the lock, having seen it
    untagged) must not be able to clear the tags just stored.  While the lock
    is held the ioctl cannot have marked the page; once released, its tags
    stand and a later guest touch keeps them."""
    done = []
    with vm.mmu_lock:
        t = threading.Thread(target=lambda: done.append(vm.mte_copy_tags(ipa(4), PAGE_SIZE, b"\x0d" * 256, TO)))
        t.start()
        t.join(0.2)
        assert vm.memory.tagged[4] == 0  # blocked: the page is not marked yet
    t.join(10)
    assert done == [PAGE_SIZE]
    vm.guest_write(ipa(4), b"after")
    assert vm.guest_tags(ipa(4), PAGE_SIZE) == b"\x0d" * 256


# -- dirty log -------------------------------------------------------------------------------------
def test_dirty_log_enoent_when_not_enabled(vm_slots):
    with raise_errno("ENOENT"):
        vm_slots.get_dirty_log(0)
    vm_slots.enable_dirty_logging(0)
    vm_slots.get_dirty_log(0)
    with raise_errno("ENOENT"):
        vm_slots.get_dirty_log(1)
    vm_slots.disable_dirty_logging(0)
    with raise_errno("ENOENT"):
        vm_slots.get_dirty_log(0)
    assert not vm_slots.dirty_logging()


@pytest.mark.parametrize("slot", [-1, 3, 100])
def test_dirty_log_einval_for_bad_slot(vm_slots, slot):
    with raise_errno("EINVAL"):
        vm_slots.get_dirty_log(slot)


def test_dirty_log_get_and_clear(vm):
    vm.guest_write(ipa(1), b"before logging")
    vm.enable_dirty_logging(0)
    assert vm.dirty_logging()
    log = vm.get_dirty_log(0)
    assert log.count() == 0 and log.ranges() == []
    vm.guest_write(ipa(3, 4000), b"x" * 200)  # pages 3 and 4
    vm.guest_write(ipa(9), b"y")
    vm.guest_read(ipa(20), 100)  # reads do not dirty
    log = vm.get_dirty_log(0)
    assert log.ranges() == [(3, 5), (9, 10)]
    assert log.count() == 3
    assert len(log.bitmap) == vm.memory.npages
    again = vm.get_dirty_log(0)
    assert again.count() == 0 and again.ranges() == []
    vm.guest_write(ipa(9), b"z")
    assert vm.get_dirty_log(0).ranges() == [(9, 10)]
    assert vm.counters.get("syscalls.kvm_get_dirty_log") == 4


def test_write_protect_faults_count_first_dirtying_only(vm):
    vm.enable_dirty_logging(0)
    for _ in range(3):
        vm.guest_write(ipa(2), b"a")
    assert vm.counters.get("kvm.write_protect_faults") == 1
    vm.get_dirty_log(0)
    vm.guest_write(ipa(2), b"b")
    assert vm.counters.get("kvm.write_protect_faults") == 2


def test_dirty_log_per_memslot_with_guest_memory_page_numbers(vm_slots):
    for s in range(3):
        vm_slots.enable_dirty_logging(s)
    vm_slots.guest_write(ipa(10), b"a")
    vm_slots.guest_write(ipa(300), b"b")
    vm_slots.guest_write(ipa(1023), b"c")
    logs = [vm_slots.get_dirty_log(s) for s in range(3)]
    assert [lg.ranges() for lg in logs] == [[(10, 11)], [(300, 301)], [(1023, 1024)]]
    assert [len(lg.bitmap) for lg in logs] == [256, 256, 512]
    assert logs[1].slot is vm_slots.memslots[1]
    # harvesting one slot leaves the others alone
    vm_slots.guest_write(ipa(11), b"a")
    vm_slots.guest_write(ipa(600), b"b")
    assert vm_slots.get_dirty_log(2).ranges() == [(600, 601)]
    assert vm_slots.get_dirty_log(0).ranges() == [(11, 12)]


def test_dirty_log_only_on_enabled_slots(vm_slots):
    vm_slots.enable_dirty_logging(1)
    vm_slots.guest_write(ipa(5), b"slot 0, not logged")
    vm_slots.guest_write(ipa(260), b"slot 1")
    assert vm_slots.get_dirty_log(1).ranges() == [(260, 261)]


@pytest.mark.parametrize("how", ["set_tags", "store_packed"])
def test_guest_tag_store_dirties_the_page_with_data_unchanged(vm, how):
    vm.guest_write(ipa(6), b"data" * 1024)
    vm.enable_dirty_logging(0)
    data = bytes(vm.memory.data[6 * PAGE_SIZE : 7 * PAGE_SIZE])
    if how == "set_tags":
        vm.guest_set_tags(ipa(6, 64), 16, 0xA)
    else:
        vm.guest_store_tags_packed(ipa(6), b"\x21" * PACKED_TAGS_PER_PAGE)
    assert vm.get_dirty_log(0).ranges() == [(6, 7)]
    assert bytes(vm.memory.data[6 * PAGE_SIZE : 7 * PAGE_SIZE]) == data


def test_tag_store_without_mte_dirties_nothing(kernel):
    vm = kernel.create_vm(MiB)
    vm.enable_dirty_logging(0)
    vm.guest_set_tags(ipa(1), PAGE_SIZE, 3)  # a NOP without MTE
    assert vm.get_dirty_log(0).count() == 0


def test_vmm_writes_are_not_in_kvm_log_but_in_the_vmm_tracker():
    host = SimulatedHost(4 * MiB, vcpus=1, device_prot_mte=True)
    try:
        vm = host.vm
        vm.enable_dirty_logging(0)
        host.ram.write(5 * PAGE_SIZE, b"not tracked yet")  # tracker off: nothing recorded
        assert host.vmm_dirty.harvest().count(1) == 0
        host.vmm_dirty.enabled = True
        host.ram.write(7 * PAGE_SIZE + 4000, b"v" * 200)  # untagged mapping, pages 7-8
        with host.device_mapping.tco():
            host.device_mapping.write(12 * PAGE_SIZE, b"w")  # PROT_MTE mapping
        assert vm.get_dirty_log(0).count() == 0  # KVM never saw them
        vmm = host.vmm_dirty.harvest()
        assert [p for p in range(len(vmm)) if vmm[p]] == [7, 8, 12]
        assert host.vmm_dirty.harvest().count(1) == 0  # get-and-clear
        vm.guest_write(ipa(3), b"guest")
        assert vm.get_dirty_log(0).ranges() == [(3, 4)]
        assert host.vmm_dirty.harvest().count(1) == 0
    finally:
        host.close()


def test_dirty_log_ranges_runs():
    from hosts.kernel import DirtyLog, Memslot

    slot = Memslot(1, BASE + MiB, 10 * PAGE_SIZE, MiB)
    assert DirtyLog(slot, bytes(10)).ranges() == []
    assert DirtyLog(slot, b"\x01" * 10).ranges() == [(256, 266)]
    bm = bytes([1, 1, 0, 1, 0, 0, 1, 1, 1, 1])
    log = DirtyLog(slot, bm)
    assert log.ranges() == [(256, 258), (259, 260), (262, 266)]
    assert log.count() == 7
    assert DirtyLog(slot, bytes([0] * 9 + [1])).ranges() == [(265, 266)]


def test_dirty_log_of_a_large_slot_is_a_few_runs():
    kernel = Kernel()
    vm = kernel.create_vm(256 * MiB)
    vm.enable_dirty_logging(0)
    with vm.mmu_lock:
        vm._mark_dirty(0, vm.memory.npages)
    log = vm.get_dirty_log(0)
    assert log.ranges() == [(0, vm.memory.npages)]
    vm.close()


# -- PROPOSAL: a separate tags-only dirty log (no such KVM interface exists) -----------------
def test_tag_dirty_log_needs_mte(kernel):
    vm = kernel.create_vm(MiB)
    with raise_errno("EINVAL"):
        vm.enable_tag_dirty_logging(0)


def test_tag_dirty_log_enoent_when_not_enabled(vm):
    with raise_errno("ENOENT"):
        vm.get_tag_dirty_log(0)
    vm.enable_tag_dirty_logging(0)
    vm.get_tag_dirty_log(0)
    vm.disable_tag_dirty_logging(0)
    with raise_errno("ENOENT"):
        vm.get_tag_dirty_log(0)


def test_tag_only_stores_go_to_the_tag_log_data_stores_to_the_data_log(vm):
    vm.enable_dirty_logging(0)
    vm.enable_tag_dirty_logging(0)
    vm.guest_set_tags(ipa(4), 32, 0x3)
    vm.guest_store_tags_packed(ipa(6), bytes(PACKED_TAGS_PER_PAGE))
    vm.guest_write(ipa(8), b"data")
    assert vm.get_tag_dirty_log(0).ranges() == [(4, 5), (6, 7)]
    assert vm.get_dirty_log(0).ranges() == [(8, 9)]
    assert vm.get_tag_dirty_log(0).count() == 0  # get-and-clear
    assert vm.counters.get("kvm.tag_access_faults") == 2
    vm.disable_tag_dirty_logging(0)
    vm.guest_set_tags(ipa(4), 32, 0x4)  # back to the rule: a tag store dirties
    assert vm.get_dirty_log(0).ranges() == [(4, 5)]


def test_tag_store_in_a_slot_without_tag_log_still_dirties_its_data_log(vm_slots):
    """Tag-dirty logging is per memslot: turning it on for one slot must not
    make tag stores in the other slots vanish from their (data) dirty logs."""
    for s in range(3):
        vm_slots.enable_dirty_logging(s)
    vm_slots.enable_tag_dirty_logging(0)
    vm_slots.guest_set_tags(ipa(10), 16, 1)  # slot 0: tag log
    vm_slots.guest_set_tags(ipa(300), 16, 2)  # slot 1: no tag log
    assert vm_slots.get_tag_dirty_log(0).ranges() == [(10, 11)]
    assert vm_slots.get_dirty_log(0).ranges() == []
    assert vm_slots.get_dirty_log(1).ranges() == [(300, 301)]


# -- answers recorded on a real kernel (tests/fidelity, docs/FIDELITY.md) ------------------
def test_copy_to_guest_is_ebusy_while_any_memslot_logs_dirty_pages(vm_slots):
    tags = b"\x04" * GRANULES_PER_PAGE
    vm_slots.enable_dirty_logging(2)  # another slot than the one written
    for length in (PAGE_SIZE, 0):
        with raise_errno("EBUSY"):
            vm_slots.mte_copy_tags(ipa(0), length, tags, KVM_ARM_TAGS_TO_GUEST)
    assert vm_slots.guest_tags(ipa(0), PAGE_SIZE) == bytes(GRANULES_PER_PAGE)
    # reading is allowed, and writing again once logging is off
    assert vm_slots.mte_copy_tags(ipa(0), PAGE_SIZE, bytearray(256), KVM_ARM_TAGS_FROM_GUEST) == PAGE_SIZE
    vm_slots.disable_dirty_logging(2)
    assert vm_slots.mte_copy_tags(ipa(0), PAGE_SIZE, tags, KVM_ARM_TAGS_TO_GUEST) == PAGE_SIZE


def test_copy_from_guest_faults_in_the_page_whose_tags_did_not_fit(vm):
    # nothing readable for page 2: the kernel pinned it (faulting it in) before the copy faulted
    populated = vm.memory.populated_pages()
    buf = bytearray(b"\xee" * (2 * GRANULES_PER_PAGE + 10))
    assert vm.mte_copy_tags(ipa(0), 3 * PAGE_SIZE, buf, KVM_ARM_TAGS_FROM_GUEST) == 2 * PAGE_SIZE
    assert buf == bytes(len(buf))  # untagged pages read as zeros, the 10 that fit too
    assert vm.memory.populated_pages() == populated + 3
