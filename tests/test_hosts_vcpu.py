"""hosts.vcpu.VcpuSet: threads that start paused, pause() that returns only
once every vCPU has parked, resume, vCPU state with the MTE system
registers exactly when MTE is enabled.  No timing assertions: waits poll a
condition with a generous limit."""

import time

import pytest

from hosts import Kernel, SimulatedHost, VcpuSet, VcpuState
from hosts.vcpu import MTE_SYSREGS, SCTLR_TCF_SYNC

MiB = 1 << 20


def wait_for(cond, limit=30.0):
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.002)


@pytest.fixture
def host():
    h = SimulatedHost(4 * MiB, vcpus=3, workload="random", rate=None)
    yield h
    h.close()


def test_pause_returns_only_when_every_vcpu_has_stopped(host):
    v = host.vcpus
    v.start()
    assert v.running
    wait_for(lambda: min(v.steps) > 5)
    v.pause()
    assert not v.running
    assert v._stopped == v.count
    steps = list(v.steps)
    data = bytes(host.memory.data)
    time.sleep(0.05)  # parked threads take no step
    for _ in range(50):
        time.sleep(0)
    assert v.steps == steps
    assert bytes(host.memory.data) == data
    v.resume()
    wait_for(lambda: all(a > b for a, b in zip(v.steps, steps)))
    v.pause()
    assert v.error is None


def test_repeated_pause_resume(host):
    v = host.vcpus
    v.start()
    for _ in range(20):
        v.pause()
        frozen = list(v.steps)
        assert v.steps == frozen
        v.resume()
    v.pause()
    total = sum(v.steps)
    time.sleep(0.02)
    assert sum(v.steps) == total


def test_pause_before_start_and_threads_start_parked():
    h = SimulatedHost(MiB, vcpus=2, workload="idle", rate=None)
    try:
        h.vcpus.pause()  # no threads yet: returns at once
        assert h.vcpus.steps == [0, 0]
        h.vcpus.start()
        wait_for(lambda: min(h.vcpus.steps) > 0)
        h.vcpus.pause()
    finally:
        h.close()


def test_rate_zero_is_halted():
    h = SimulatedHost(MiB, vcpus=2, workload="idle", rate=0)
    try:
        h.vcpus.start()
        time.sleep(0.1)
        assert h.vcpus.steps == [0, 0]
        h.vcpus.pause()
    finally:
        h.close()


def test_limited_rate_still_pauses():
    h = SimulatedHost(MiB, vcpus=2, workload="idle", rate=200)
    try:
        h.vcpus.start()
        wait_for(lambda: sum(h.vcpus.steps) > 0)
        h.vcpus.pause()
        steps = list(h.vcpus.steps)
        time.sleep(0.05)
        assert h.vcpus.steps == steps
    finally:
        h.close()


def test_get_states_raises_while_running(host):
    v = host.vcpus
    v.start()
    with pytest.raises(RuntimeError):
        v.get_states()
    v.pause()
    states = v.get_states()
    assert [s.index for s in states] == [0, 1, 2]
    states[0].regs["pc"] = 0  # a copy: the vCPU is not changed
    assert v.get_states()[0].regs["pc"] != 0


def test_vcpu_state_advances_with_steps():
    h = SimulatedHost(MiB, vcpus=1, workload="idle")
    try:
        before = h.vcpus.get_states()[0]
        h.vcpus.run_steps(3)
        after = h.vcpus.get_states()[0]
        assert after.regs["pc"] != before.regs["pc"]
        assert after.sysregs["RGSR_EL1"] != before.sysregs["RGSR_EL1"]  # IRG advanced the seed
        assert h.vcpus.steps == [3]
    finally:
        h.close()


def test_mte_sysregs_only_when_mte_enabled():
    on = SimulatedHost(MiB, vcpus=2, mte=True)
    off = SimulatedHost(MiB, vcpus=2, mte=False)
    try:
        for s in on.vcpus.get_states():
            assert set(MTE_SYSREGS) <= set(s.sysregs)
            assert s.sysregs["SCTLR_EL1"] & SCTLR_TCF_SYNC == SCTLR_TCF_SYNC
        for s in off.vcpus.get_states():
            assert not set(MTE_SYSREGS) & set(s.sysregs)
            assert s.sysregs["SCTLR_EL1"] & SCTLR_TCF_SYNC == 0
        with pytest.raises(ValueError, match="MTE"):
            off.vcpus.set_states(on.vcpus.get_states())
        off.vcpus.set_states(off.vcpus.get_states())
        on.vcpus.set_states(on.vcpus.get_states())
    finally:
        on.close()
        off.close()


def test_set_states_needs_the_same_vcpu_count():
    a = SimulatedHost(MiB, vcpus=2)
    b = SimulatedHost(MiB, vcpus=3)
    try:
        with pytest.raises(ValueError):
            b.vcpus.set_states(a.vcpus.get_states())
    finally:
        a.close()
        b.close()


def test_set_states_then_get_states_round_trip():
    a = SimulatedHost(MiB, vcpus=2, seed=1)
    b = SimulatedHost(MiB, vcpus=2, seed=2)
    try:
        a.vcpus.run_steps(4)
        wire = [s.to_wire() for s in a.vcpus.get_states()]
        b.vcpus.set_states([VcpuState.from_wire(w) for w in wire])
        assert [s.to_wire() for s in b.vcpus.get_states()] == wire
    finally:
        a.close()
        b.close()


def test_vcpu_state_wire_round_trip():
    s = VcpuState(1, {"pc": 0x4008_1000, "x0": 2**64 - 1}, {"GCR_EL1": 0x10001})
    w = s.to_wire()
    assert VcpuState.from_wire(w) == s
    w2 = {"index": "1", "regs": {"pc": "4"}, "sysregs": {}}
    assert VcpuState.from_wire(w2) == VcpuState(1, {"pc": 4}, {})


def test_vcpuset_needs_a_vcpu():
    vm = Kernel().create_vm(MiB)
    with pytest.raises(ValueError):
        VcpuSet(vm, None, 0, None)


def test_vcpus_are_created_in_kvm():
    h = SimulatedHost(MiB, vcpus=4)
    try:
        assert h.vcpus.ids == [0, 1, 2, 3]
        assert h.vm.vcpu_count == 4
        assert h.counters.get("syscalls.kvm_create_vcpu") == 4
    finally:
        h.close()


class _Crash:
    def __init__(self, after):
        self.after = after
        self.calls = 0

    def step(self, cpu):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("guest crashed")
        return 1


def test_a_crashing_vcpu_parks_and_reports():
    vm = Kernel().create_vm(MiB)
    v = VcpuSet(vm, _Crash(after=10), 2, None)
    try:
        v.start()
        wait_for(lambda: v.error is not None)
        wait_for(lambda: not v.running)
        v.pause()  # returns: every thread parked
        assert isinstance(v.error, RuntimeError)
    finally:
        v.shutdown()


def test_shutdown_joins_threads(host):
    host.vcpus.start()
    threads = list(host.vcpus._threads)
    host.vcpus.shutdown()
    assert not any(t.is_alive() for t in threads)
    assert host.vcpus._threads == []


def test_pause_does_not_wait_out_a_slow_guest_pacing():
    import time as _time

    from hosts import SimulatedHost

    host = SimulatedHost(8 << 20, workload="idle", rate=2, seed=3)  # one step per vCPU per second
    try:
        host.prepare_guest()
        host.vcpus.start()
        _time.sleep(0.2)  # the vCPUs are inside their pacing sleep now
        t = _time.perf_counter()
        host.vcpus.pause()
        assert _time.perf_counter() - t < 0.2
    finally:
        host.close()
