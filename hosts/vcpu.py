"""vCPU threads.  Each runs its share of a workload at a target rate in pages
per second; pause() returns only once every vCPU has stopped, as a VMM's
vm_stop() does, and resume() lets them go on.  vCPU register state, including
the MTE system registers KVM exposes only when MTE is enabled, travels with
the guest."""

import threading
import time
from dataclasses import dataclass, field

MTE_SYSREGS = ("GCR_EL1", "RGSR_EL1", "TFSR_EL1", "TFSRE0_EL1")
# SCTLR_EL1 TCF (bits 41:40) and TCF0 (39:38): synchronous checking at EL1 and EL0.
SCTLR_TCF_SYNC = (1 << 40) | (1 << 38)


@dataclass
class VcpuState:
    index: int
    regs: dict[str, int] = field(default_factory=dict)
    sysregs: dict[str, int] = field(default_factory=dict)

    def to_wire(self) -> dict:
        return {"index": self.index, "regs": dict(self.regs), "sysregs": dict(self.sysregs)}

    @classmethod
    def from_wire(cls, d: dict) -> "VcpuState":
        return cls(
            int(d["index"]),
            {str(k): int(v) for k, v in d["regs"].items()},
            {str(k): int(v) for k, v in d["sysregs"].items()},
        )


def initial_state(index: int, mte: bool, seed: int) -> VcpuState:
    regs = {
        "pc": 0x4008_0000 + 0x1000 * index,
        "sp": 0x4800_0000 - 0x10000 * index,
        "pstate": 0x3C5,
        **{f"x{i}": (seed * 1_000_003 + index * 97 + i) & (2**64 - 1) for i in range(8)},
    }
    sysregs = {"SCTLR_EL1": 0x30D0_1805}
    if mte:
        sysregs["SCTLR_EL1"] |= SCTLR_TCF_SYNC
        sysregs.update(
            GCR_EL1=0x1_0001,  # RRND=1, exclude tag 0
            RGSR_EL1=(seed * 0x9E37 + index) & 0xFFFF_FFFF,
            TFSR_EL1=0,
            TFSRE0_EL1=0,
        )
    return VcpuState(index, regs, sysregs)


class VcpuSet:
    """The guest's vCPUs as host threads running ``workload``.

    ``rate`` is the target in pages per second for the whole guest (None: as
    fast as the host allows, 0: halted).  Threads start paused; start() lets
    them run.  run_steps() drives the workload synchronously instead (for
    tests that need exact determinism without threads)."""

    def __init__(self, vm, workload, count: int, rate: float | None, seed: int = 1):
        if count < 1:
            raise ValueError("a guest needs at least one vCPU")
        self.vm = vm
        self.workload = workload
        self.count = count
        self.rate = rate
        self.ids = [vm.create_vcpu() for _ in range(count)]
        self.states = [initial_state(i, vm.mte_enabled, seed) for i in range(count)]
        self.steps = [0] * count
        self.pages_touched = 0
        self._cond = threading.Condition()
        self._running = False  # what the VMM asked for
        self._stopped = 0  # vCPU threads currently parked
        self._quit = False
        self._threads: list[threading.Thread] = []
        self.error: BaseException | None = None
        #: share of time the vCPUs are kept off the CPU (QEMU's cpu-throttle), 0..0.99
        self.throttle = 0.0

    # -- control ---------------------------------------------------------------
    def start(self) -> None:
        if not self._threads:
            for i in range(self.count):
                t = threading.Thread(target=self._run, args=(i,), name=f"vcpu{i}", daemon=True)
                self._threads.append(t)
                t.start()
        self.resume()

    def resume(self) -> None:
        with self._cond:
            self._running = True
            self._cond.notify_all()

    def pause(self, timeout: float = 10.0) -> None:
        """Stop every vCPU; returns only when all have parked."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
            if self._threads and not self._cond.wait_for(lambda: self._stopped == self.count, timeout):
                raise TimeoutError("vCPUs did not stop")

    def set_throttle(self, fraction: float) -> None:
        """Throttle the vCPUs to run only (1 - fraction) of the time."""
        if not 0.0 <= fraction <= 0.99:
            raise ValueError("throttle must be between 0 and 0.99")
        self.throttle = fraction

    @property
    def running(self) -> bool:
        return self._running

    def shutdown(self) -> None:
        with self._cond:
            self._quit = True
            self._running = False
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()

    def run_steps(self, steps_per_vcpu: int) -> None:
        """Run the workload synchronously: each vCPU takes ``steps_per_vcpu`` steps, in turn."""
        for _ in range(steps_per_vcpu):
            for i in range(self.count):
                self._one_step(i)

    # -- state -------------------------------------------------------------
    def get_states(self) -> list[VcpuState]:
        if self._running:
            raise RuntimeError("vCPU state can only be read while the vCPUs are paused")
        return [VcpuState(s.index, dict(s.regs), dict(s.sysregs)) for s in self.states]

    def set_states(self, states: list[VcpuState]) -> None:
        if len(states) != self.count:
            raise ValueError(f"guest has {self.count} vCPUs, state has {len(states)}")
        for s in states:
            if any(r in s.sysregs for r in MTE_SYSREGS) and not self.vm.mte_enabled:
                raise ValueError("MTE system registers given to a VM without MTE")
        self.states = [VcpuState(s.index, dict(s.regs), dict(s.sysregs)) for s in states]

    # -- the threads -------------------------------------------------------
    def _one_step(self, i: int) -> int:
        pages = self.workload.step(i)
        state = self.states[i]
        state.regs["pc"] = (state.regs["pc"] + 4 * (pages + 1)) & (2**64 - 1)
        state.regs["x0"] = (state.regs["x0"] * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
        if "RGSR_EL1" in state.sysregs:  # IRG advances the random tag seed
            state.sysregs["RGSR_EL1"] = (state.sysregs["RGSR_EL1"] * 1103515245 + 12345) & 0xFFFF_FFFF
        self.steps[i] += 1
        return pages

    def _nap(self, seconds: float) -> None:
        """Sleep between steps, but wake at once when paused: pause() must not
        wait out a slow guest's pacing (that would be downtime)."""
        if seconds > 0:
            with self._cond:
                self._cond.wait_for(lambda: not self._running or self._quit, seconds)

    def _run(self, i: int) -> None:
        per_vcpu_rate = None if self.rate is None else self.rate / self.count
        deadline = time.monotonic()
        while True:
            with self._cond:
                if not self._running:
                    self._stopped += 1
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: self._running or self._quit)
                    self._stopped -= 1
                    deadline = time.monotonic()
                if self._quit:
                    self._stopped += 1
                    return
            if per_vcpu_rate == 0:
                with self._cond:
                    self._cond.wait(0.05)
                continue
            started = time.monotonic()
            try:
                pages = self._one_step(i)
            except BaseException as exc:  # a guest crash: park and report it
                self.error = exc
                with self._cond:
                    self._running = False
                continue
            self.pages_touched += pages
            throttle = self.throttle
            if per_vcpu_rate is None:
                # Throttled, a vCPU runs only (1 - throttle) of the time.
                self._nap((time.monotonic() - started) * throttle / (1 - throttle) if throttle else 0)
                continue
            deadline += pages / (per_vcpu_rate * (1 - throttle))
            delay = deadline - time.monotonic()
            if delay > 0:
                self._nap(delay)
            elif delay < -0.5:  # far behind (host busy): do not burst to catch up
                deadline = time.monotonic()
