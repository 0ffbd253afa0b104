"""Dirty logging against vCPUs that keep running.

vCPU threads write data and tags at full rate (rate=None) while a harvester
thread repeatedly takes each memslot's dirty log and copies the dirty pages'
data and tags into a second host, the way a precopy migration does.  After a
final pause and harvest, the copy must equal the guest byte for byte and tag
for tag.

How the test was checked to fail when the order is reversed
------------------------------------------------------------
``harvest_round`` takes ``order``.  With ``"clear-then-copy"`` (the KVM rule)
it calls get_dirty_log() -- which returns the bitmap and clears it
atomically against guest stores -- and then copies those pages: a store that
lands after the clear dirties the page again and it is resent next round.
With ``"copy-then-clear"`` it reads the bitmap *without* clearing it, copies
those pages, and only then calls get_dirty_log() to clear (discarding what
it returns): a store landing between the copy of a page and the clear is
wiped from the log and never resent.

Before keeping it, the check was run by hand: 20 live copies (seeds 1..20)
per workload and order, with the same helpers as here.  copy-then-clear
ended with a destination that differed from the guest in 20/20 (allocator),
18/20 (hot-set) and 20/20 (retag-churn) runs -- data and tags for the first
two, tags only for retag-churn -- while clear-then-copy was exact in 60/60.
With Python's default 5 ms thread switch interval the reversed order was
caught far less often (0/20, 0/20, 9/20), so the tests here switch threads
every 0.1 ms.  test_copy_then_clear_loses_updates keeps that check: it runs
the reversed variant and asserts the copy differs, allowing up to 5 live
copies (one must lose an update) so it stays reliable on a noisy machine.

The VMM's own writes (device DMA) bypass KVM's log; the same harness shows
that harvesting only KVM's log loses them and merging the VMM's bitmap
(host.vmm_dirty) keeps them.
"""

import random
import sys
import threading
import time

import pytest

from hosts import GRANULES_PER_PAGE, KVM_ARM_TAGS_FROM_GUEST, KVM_ARM_TAGS_TO_GUEST, PAGE_SIZE, SimulatedHost
from hosts.kernel import DirtyLog

MiB = 1 << 20
RAM = 8 * MiB
SLOTS = [2 * MiB, 2 * MiB, 4 * MiB]
WORKLOADS = {
    # data and tags: IRG+STG per allocation, data written, retag on free
    "allocator": {"fill": 0.5, "region_pages": 1024},
    # a small set of pages rewritten fast, a quarter of the writes retag
    "hot-set": {"fill": 0.25, "hot_pages": 256},
    # tags change, data does not
    "retag-churn": {"fill": 0.5},
    # the guest tags a buffer, the VMM's device emulation writes it
    "device-dma": {"fill": 0.25},
    # a few pages touched: used with a separate device-emulation thread
    "idle": {},
}


def copy_pages(src: SimulatedHost, dst: SimulatedHost, first: int, end: int) -> None:
    """Data through the untagged mappings, tags through KVM_ARM_MTE_COPY_TAGS."""
    off, n = first * PAGE_SIZE, (end - first) * PAGE_SIZE
    dst.ram.write(off, src.ram.read(off, n))
    ipa = src.vm.page_to_ipa(first)
    buf = bytearray((end - first) * GRANULES_PER_PAGE)
    assert src.vm.mte_copy_tags(ipa, n, buf, KVM_ARM_TAGS_FROM_GUEST) == n
    assert dst.vm.mte_copy_tags(ipa, n, buf, KVM_ARM_TAGS_TO_GUEST) == n


def harvest_round(src: SimulatedHost, dst: SimulatedHost, order: str, merge_vmm: bool = False) -> int:
    vm = src.vm
    pages = 0
    vmm = src.vmm_dirty.harvest() if merge_vmm else None  # get and clear, like KVM's
    for slot in range(len(vm.memslots)):
        if order == "clear-then-copy":
            log = vm.get_dirty_log(slot)  # get and clear (write-protect) first
            if vmm is not None:
                ms = vm.memslots[slot]
                own = vmm[ms.first_page : ms.first_page + ms.npages]
                log = DirtyLog(ms, bytes(a | b for a, b in zip(log.bitmap, own)))
            runs = log.ranges()
            for a, b in runs:
                copy_pages(src, dst, a, b)
        elif order == "copy-then-clear":  # the bug: peek, copy, then clear
            with vm.mmu_lock:
                peek = DirtyLog(vm.memslots[slot], bytes(vm._dirty[slot]))
            runs = peek.ranges()
            for a, b in runs:
                copy_pages(src, dst, a, b)
            vm.get_dirty_log(slot)
        else:
            raise ValueError(order)
        pages += sum(b - a for a, b in runs)
    return pages


def live_copy(
    workload: str, order: str, rounds: int = 40, seed: int = 1, merge_vmm: bool = False, device_writes: int = 0
):
    """Returns (src, dst, pages resent) after a live copy with ``rounds``
    harvests while the vCPUs run, a pause, and a final harvest.  With
    ``device_writes``, a device-emulation thread of the VMM also writes that
    many pages of guest RAM through its own (untagged) mapping meanwhile."""
    src = SimulatedHost(
        RAM, vcpus=2, workload=workload, rate=None, seed=seed, workload_params=WORKLOADS[workload], memslot_sizes=SLOTS
    )
    dst = SimulatedHost(RAM, vcpus=2, workload=workload, rate=0, seed=seed, memslot_sizes=SLOTS)
    src.prepare_guest()
    for slot in range(len(src.vm.memslots)):
        src.vm.enable_dirty_logging(slot)
    src.vmm_dirty.enabled = True
    src.vcpus.start()
    copy_pages(src, dst, 0, src.memory.npages)  # first pass: everything
    resent = []
    failure = []

    def harvester():
        try:
            for _ in range(rounds):
                resent.append(harvest_round(src, dst, order, merge_vmm))
        except BaseException as exc:  # pragma: no cover - reported below
            failure.append(exc)

    def device():
        rng = random.Random(f"device:{seed}")
        try:
            for i in range(device_writes):
                page = rng.randrange(src.memory.npages)
                src.ram.write(page * PAGE_SIZE + rng.randrange(0, PAGE_SIZE, 64), i.to_bytes(8, "little") * 8)
                time.sleep(0)
        except BaseException as exc:  # pragma: no cover - reported below
            failure.append(exc)

    threads = [threading.Thread(target=harvester, name="harvester")]
    if device_writes:
        threads.append(threading.Thread(target=device, name="virtio"))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive() and not failure, failure
    src.vcpus.pause()
    assert src.vcpus.error is None, src.vcpus.error
    steps_at_pause = list(src.vcpus.steps)
    harvest_round(src, dst, order, merge_vmm)  # final: vCPUs stopped
    assert src.vcpus.steps == steps_at_pause
    return src, dst, resent


def mismatches(src: SimulatedHost, dst: SimulatedHost) -> tuple[int, int]:
    """(pages whose data differ, pages whose tags differ)."""
    sd, dd, st, dt = src.memory.data, dst.memory.data, src.memory.tags, dst.memory.tags
    data = sum(
        sd[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] != dd[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]
        for p in range(src.memory.npages)
    )
    tags = sum(st[p * 128 : (p + 1) * 128] != dt[p * 128 : (p + 1) * 128] for p in range(src.memory.npages))
    return data, tags


def tags_as_seen_by_vmm(host: SimulatedHost) -> bytes:
    buf = bytearray(host.memory.npages * GRANULES_PER_PAGE)
    host.vm.mte_copy_tags(host.vm.page_to_ipa(0), host.memory.size, buf, KVM_ARM_TAGS_FROM_GUEST)
    return bytes(buf)


@pytest.fixture(autouse=True)
def _fast_thread_switches():
    """Switch threads often so that vCPU stores really interleave with the
    harvester's copies (the default 5 ms interval makes races rarer)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)


GUEST_ONLY = ["allocator", "hot-set", "retag-churn"]


@pytest.mark.parametrize("workload", GUEST_ONLY)
def test_clear_then_copy_keeps_every_update(workload):
    src, dst, resent = live_copy(workload, "clear-then-copy")
    try:
        assert sum(src.vcpus.steps) > 0
        assert sum(resent) > 0  # the guest really dirtied pages meanwhile
        assert mismatches(src, dst) == (0, 0)
        assert bytes(src.memory.data) == bytes(dst.memory.data)
        assert bytes(src.memory.tags) == bytes(dst.memory.tags)
        assert tags_as_seen_by_vmm(src) == tags_as_seen_by_vmm(dst)
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("workload", GUEST_ONLY)
def test_copy_then_clear_loses_updates(workload):
    """The reversed order must be caught: at least one of a few live copies
    ends with the destination differing from the guest."""
    seen = []
    for attempt in range(5):
        src, dst, _ = live_copy(workload, "copy-then-clear", seed=attempt + 1)
        try:
            seen.append(mismatches(src, dst))
        finally:
            src.close()
            dst.close()
        if seen[-1] != (0, 0):
            break
    assert seen[-1] != (0, 0), f"no lost update detected in {len(seen)} live copies: {seen}"


@pytest.mark.parametrize("workload", ["device-dma", "idle"])
def test_vmm_writes_are_kept_when_the_vmm_bitmap_is_merged(workload):
    src, dst, resent = live_copy(workload, "clear-then-copy", merge_vmm=True, device_writes=300)
    try:
        assert sum(resent) > 0
        assert mismatches(src, dst) == (0, 0)
    finally:
        src.close()
        dst.close()


def test_kvm_log_alone_loses_vmm_writes():
    """The VMM's device writes never reach KVM's log: harvesting it alone
    leaves stale data on the destination."""
    src, dst, _ = live_copy("idle", "clear-then-copy", merge_vmm=False, device_writes=300)
    try:
        data, tags = mismatches(src, dst)
        assert data > 0 and tags == 0
    finally:
        src.close()
        dst.close()
