"""hosts.workloads and hosts.datapool: determinism by seed, what each
workload does to data and tags, device DMA under tag checking, and state
capture for migration."""

import json

import pytest

from hosts import PAGE_SIZE, SimulatedHost
from hosts import tags as T
from hosts.datapool import DataPool, tag_pool
from hosts.workloads import WORKLOADS

MiB = 1 << 20
RAM = 8 * MiB


def make(workload, seed=1, vcpus=2, **kw):
    return SimulatedHost(RAM, vcpus=vcpus, workload=workload, seed=seed, **kw)


def snapshot(host):
    m = host.memory
    return bytes(m.data), bytes(m.tags), bytes(m.tagged)


@pytest.fixture
def hosts_to_close():
    made = []
    yield made
    for h in made:
        h.close()


def run(workload, seed, steps, made, **kw):
    h = make(workload, seed=seed, **kw)
    made.append(h)
    h.prepare_guest()
    h.vcpus.run_steps(steps)
    return h


# -- determinism -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_same_seed_same_memory_and_tags(name, hosts_to_close):
    kw = {"device_prot_mte": True} if name == "device-dma" else {}
    a = run(name, 11, 60, hosts_to_close, **kw)
    b = run(name, 11, 60, hosts_to_close, **kw)
    assert snapshot(a) == snapshot(b)
    assert a.vcpus.steps == b.vcpus.steps == [60, 60]
    assert a.vcpus.get_states()[0].to_wire() == b.vcpus.get_states()[0].to_wire()
    c = run(name, 12, 60, hosts_to_close, **kw)
    assert snapshot(c) != snapshot(a)


@pytest.mark.parametrize("name", ["allocator", "hot-set", "retag-churn", "device-dma"])
def test_threads_give_the_same_result_as_sequential_steps(name, hosts_to_close):
    """vCPU threads interleave arbitrarily, but each owns its slice and RNG:
    replaying the same number of steps per vCPU sequentially gives the same
    memory and tags."""
    a = make(name, seed=5, rate=None, vcpus=2)
    b = make(name, seed=5, rate=0, vcpus=2)
    hosts_to_close += [a, b]
    a.prepare_guest()
    b.prepare_guest()
    a.vcpus.start()
    _wait_for(lambda: min(a.vcpus.steps) >= 50)
    a.vcpus.pause()
    assert a.vcpus.error is None
    for cpu, n in enumerate(a.vcpus.steps):
        for _ in range(n):
            b.vcpus._one_step(cpu)
    assert snapshot(a) == snapshot(b)


def _wait_for(cond, limit=30.0):
    import time

    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def test_prepare_fill_and_tagged_fraction(hosts_to_close):
    h = make("stream", workload_params={"fill": 0.25, "tagged": 1.0})
    hosts_to_close.append(h)
    h.prepare_guest()
    npages = h.memory.npages
    assert h.memory.populated_ranges() == [(0, npages // 4)]
    assert h.memory.tagged.count(1) == npages // 4
    tags = T.unpack(h.memory.tags[: npages // 4 * 128])
    assert tags.count(0) == 0  # allocator-style tags are never 0
    u = make("stream", workload_params={"fill": 0.25, "tagged": 0.0})
    hosts_to_close.append(u)
    u.prepare_guest()
    assert u.memory.tagged.count(1) == npages // 4  # touched, sanitised, tags all zero
    assert bytes(u.memory.tags) == bytes(len(u.memory.tags))


def test_bad_parameters():
    with pytest.raises(ValueError, match="unknown workload"):
        make("no-such-workload")
    with pytest.raises(ValueError, match="fill"):
        make("idle", workload_params={"fill": 1.5})
    with pytest.raises(ValueError, match="dma_policy"):
        make("device-dma", workload_params={"dma_policy": "yolo"})
    with pytest.raises(ValueError, match="write_fraction"):
        make("allocator", workload_params={"write_fraction": 2})


# -- what each workload does -------------------------------------------------------------
def test_retag_churn_changes_tags_not_data(hosts_to_close):
    h = make("retag-churn")
    hosts_to_close.append(h)
    h.prepare_guest()
    data, tags, _ = snapshot(h)
    h.vm.enable_dirty_logging(0)
    h.vcpus.run_steps(20)
    data2, tags2, _ = snapshot(h)
    assert data2 == data
    assert tags2 != tags
    assert h.vm.get_dirty_log(0).count() > 0  # tag stores dirty pages


def test_allocator_tags_allocations_and_retags_on_free(hosts_to_close):
    h = make("allocator", vcpus=1)
    hosts_to_close.append(h)
    h.vcpus.run_steps(200)
    live = h.workload.live[0]
    assert live
    assert all(1 <= tag <= 15 for _, _, tag in live)  # IRG excludes tag 0
    # allocations may overlap older ones (the model does not track free space),
    # but the newest one carries its tag intact
    addr, size, tag = live[-1]
    assert h.vm.guest_tags(addr, size) == bytes([tag]) * (size // 16)
    assert h.counters.get("guest.tag_store_granules") > 0


def test_allocator_that_tags_before_it_writes_leaves_pages_with_tags_and_no_data(hosts_to_close):
    """write_fraction 0 on fresh RAM: every allocation is tagged, none written.
    The pages it touched hold memory (an STG faults a page in), zero data
    and non-zero tags -- what a migration must carry although no data moves."""
    h = make("allocator", vcpus=1, workload_params={"fill": 0.0, "region_pages": 2048, "write_fraction": 0.0})
    hosts_to_close.append(h)
    h.prepare_guest()
    assert h.memory.populated_pages() == 0
    h.vcpus.run_steps(300)
    populated = h.memory.populated_ranges()
    assert populated and not any(bytes(h.memory.data))
    pages = [p for a, b in populated for p in range(a, b)]
    assert all(h.memory.tagged[p] for p in pages)
    assert sum(1 for p in pages if any(h.memory.page_tags(p))) > 0
    assert h.counters.get("kernel.pages_faulted_in") == len(pages)


def test_allocator_default_draws_are_unchanged_by_write_fraction(hosts_to_close):
    """The write draw happens only when asked for: the default guest is the guest it always was."""
    a = run("allocator", 3, 50, hosts_to_close)
    b = run("allocator", 3, 50, hosts_to_close, workload_params={"write_fraction": 1.0})
    assert snapshot(a) == snapshot(b)


def test_stream_writes_sequentially_and_wraps(hosts_to_close):
    h = make("stream", vcpus=1, workload_params={"fill": 0.0, "region_pages": 64, "pages_per_step": 16})
    hosts_to_close.append(h)
    h.vcpus.run_steps(3)
    assert h.memory.populated_ranges() == [(0, 48)]
    h.vcpus.run_steps(1)
    assert h.workload.pos == [0]
    h.vcpus.run_steps(1)
    assert h.workload.pos == [16]


def test_idle_touches_few_pages(hosts_to_close):
    h = make("idle", vcpus=2)
    hosts_to_close.append(h)
    h.vcpus.run_steps(100)
    assert 0 < h.memory.populated_pages() <= 128


def test_hot_set_stays_in_the_hot_pages(hosts_to_close):
    h = make("hot-set", vcpus=2, workload_params={"fill": 0.0, "hot_pages": 32, "region_pages": 1024})
    hosts_to_close.append(h)
    h.vcpus.run_steps(300)
    pages = {p for s, e in h.memory.populated_ranges() for p in range(s, e)}
    assert pages <= set(range(16)) | set(range(512, 528))


# -- device DMA --------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["checked", "tco", "match"])
def test_device_dma_under_prot_mte(policy, hosts_to_close):
    h = make("device-dma", device_prot_mte=True, workload_params={"dma_policy": policy, "fill": 0.0})
    hosts_to_close.append(h)
    h.vm.enable_dirty_logging(0)
    h.vmm_dirty.enabled = True
    h.vcpus.run_steps(30)
    c = h.counters.snapshot()
    if policy == "checked":
        assert c.get("tag_check_faults", 0) > 0
        assert h.workload.faults == c["tag_check_faults"]
        assert c.get("el0.tco_switches", 0) == 0
    elif policy == "tco":
        assert c.get("tag_check_faults", 0) == 0
        assert c["el0.tco_switches"] == 2 * 60
        assert h.workload.faults == 0
    else:
        assert c.get("tag_check_faults", 0) == 0
        assert c["el0.ldg"] == 60
        assert c.get("el0.tco_switches", 0) == 0
    assert h.device_mapping.prot_mte
    vmm = h.vmm_dirty.harvest()
    if policy == "checked":
        assert vmm.count(1) == 0  # every device write faulted before storing
    else:
        assert vmm.count(1) > 0


def test_device_dma_through_an_untagged_mapping(hosts_to_close):
    h = make("device-dma", workload_params={"dma_policy": "checked", "fill": 0.0})
    hosts_to_close.append(h)
    h.vm.enable_dirty_logging(0)
    h.vmm_dirty.enabled = True
    h.vcpus.run_steps(30)
    c = h.counters.snapshot()
    assert not h.device_mapping.prot_mte
    assert c.get("tag_check_faults", 0) == 0 and c.get("el0.ldg", 0) == 0
    vmm_pages = {p for p, d in enumerate(h.vmm_dirty.harvest()) if d}
    kvm_pages = {p for s, e in h.vm.get_dirty_log(0).ranges() for p in range(s, e)}
    assert vmm_pages and vmm_pages <= kvm_pages  # the guest tagged them (KVM log); the VMM wrote them (own log)
    assert h.workload.faults == 0


def test_device_dma_data_arrives_in_guest_ram(hosts_to_close):
    a = make("device-dma", device_prot_mte=True, workload_params={"dma_policy": "match", "fill": 0.0})
    b = make("device-dma", device_prot_mte=True, workload_params={"dma_policy": "tco", "fill": 0.0})
    hosts_to_close += [a, b]
    a.vcpus.run_steps(20)
    b.vcpus.run_steps(20)
    assert snapshot(a) == snapshot(b)  # same seed: same buffers, however they were written
    assert a.memory.populated_pages() > 0


# -- state for migration -------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload_state_round_trip_continues_identically(name, hosts_to_close):
    """A destination built with the same seed, given the source's memory and
    the workload state (through a wire format), continues exactly as the
    source does."""
    kw = {"device_prot_mte": True} if name == "device-dma" else {}
    a = run(name, 3, 25, hosts_to_close, **kw)
    state = json.loads(json.dumps(a.workload.get_state()))
    b = make(name, seed=3, **kw)  # fresh: no prepare, no steps
    hosts_to_close.append(b)
    b.memory.data[:] = a.memory.data
    b.memory.tags[:] = a.memory.tags
    b.memory.tagged[:] = a.memory.tagged
    b.workload.set_state(state)
    a.vcpus.run_steps(25)
    b.vcpus.run_steps(25)
    assert snapshot(a) == snapshot(b)


# -- data and tag pools ----------------------------------------------------------------------
def test_data_pool_is_deterministic_and_kinds():
    a, b = DataPool(4, pages=64), DataPool(4, pages=64)
    assert bytes(a.data) == bytes(b.data)
    assert bytes(DataPool(5, pages=64).data) != bytes(a.data)
    zero = DataPool(1, kinds={"zero": 1}, pages=8)
    assert bytes(zero.data[: 8 * PAGE_SIZE]) == bytes(8 * PAGE_SIZE)
    with pytest.raises(ValueError):
        DataPool(1, kinds={"nope": 1}, pages=2)


def test_data_pool_slices_up_to_1mib_wrap():
    import random

    pool = DataPool(2, pages=512)
    rng = random.Random(0)
    for _ in range(50):
        assert len(pool.slice(rng, MiB)) == MiB


def test_tag_pool_is_deterministic_and_never_tag_zero():
    a = tag_pool(3, granules=4096)
    assert a == tag_pool(3, granules=4096)
    assert a != tag_pool(4, granules=4096)
    assert len(a) == 2048
    assert 0 not in T.unpack(a)


def test_device_state_is_what_the_device_keeps(hosts_to_close):
    """device-dma's device reports the requests it completed and failed (its
    real state, saved and restored with the guest); other guests have none."""
    h = run("device-dma", 5, 40, hosts_to_close, device_prot_mte=True, workload_params={"dma_policy": "checked"})
    state = h.workload.device_state()
    assert set(state) == {"dma0"} and state["dma0"]["completed"] + state["dma0"]["faults"] > 0
    twin = make("device-dma", workload_params={"dma_policy": "checked"})
    hosts_to_close.append(twin)
    twin.workload.set_device_state(state)
    assert twin.workload.device_state() == state
    with pytest.raises(ValueError, match="dma0"):
        twin.workload.set_device_state({"net0": {}})
    idle = run("idle", 1, 1, hosts_to_close)
    assert idle.workload.device_state() == {}
    with pytest.raises(ValueError, match="no devices"):
        idle.workload.set_device_state(state)
