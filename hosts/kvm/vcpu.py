"""KVM vCPUs: one thread each in KVM_RUN, paused and resumed by the VMM.

Pause: set ``immediate_exit`` in the vCPU's kvm_run page (a thread about to
enter KVM_RUN returns at once) and send the thread SIGUSR2 (a thread inside
KVM_RUN leaves it with EINTR).  A thread that left on an MMIO exit enters
KVM_RUN once more with ``immediate_exit`` set before parking: that completes
the access (the PC moves past the store) without running the guest, so the
registers saved afterwards are the ones to resume from.

MMIO writes are the guest program's reports (hosts/kvm/native/mte_guest.S);
MMIO reads return 0.
"""

import ctypes
import mmap
import signal
import threading
import time

from ..vcpu import VcpuState
from . import uapi
from .kvm import KernelError, ioctl

KICK = signal.SIGUSR2
MMIO_BASE = 0x0A00_0000
MMIO_SIZE = 0x1000
REP_MISMATCHES, REP_GRANULES, REP_OPS, REP_FAULT_ESR, REP_FAULT_ELR = 0x00, 0x08, 0x10, 0x18, 0x20


def install_kick_handler() -> None:
    """A Python handler for SIGUSR2 (it does nothing: the point is the EINTR
    in the vCPU thread).  Only the main thread can install one."""
    if signal.getsignal(KICK) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(KICK, lambda signum, frame: None)


class GuestReports:
    """What the guest program said through MMIO: its self-checks and faults.
    Each vCPU runs the program on a heap of its own and reports on its own;
    a verdict is one check from every vCPU, added up."""

    def __init__(self, vcpus: int = 1):
        self.vcpus = vcpus
        self._cond = threading.Condition()
        self.checks: list[dict] = []
        self.fault: dict | None = None
        self._pending: dict = {}
        self.resumes = 0  # how many times the vCPUs were started or resumed

    def write(self, offset: int, value: int, vcpu: int = 0) -> None:
        with self._cond:
            pending = self._pending.setdefault(vcpu, {})
            if offset == REP_MISMATCHES:
                self.checks.append(
                    {
                        "vcpu": vcpu,
                        "mismatches": value,
                        "granules_checked": pending.get(REP_GRANULES, 0),
                        "ops": pending.get(REP_OPS, 0),
                        "after_resume": self.resumes,
                        "at": time.time(),
                    }
                )
                pending.clear()
                self._cond.notify_all()
            elif offset == REP_FAULT_ESR:
                self.fault = {"vcpu": vcpu, "esr": value, "elr": pending.get(REP_FAULT_ELR, 0)}
                self._cond.notify_all()
            else:
                pending[offset] = value

    def resumed(self) -> None:
        with self._cond:
            self.resumes += 1

    def wait_check_since_resume(self, timeout: float, whole_after: float | None = None) -> dict | None:
        """The first self-check of every vCPU completed since the last resume,
        added up (waiting up to ``timeout``), or None.  ``whole_after`` (a
        time.time()): the first ones that also began after that moment (for
        each vCPU, the one after its first to end after it)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                firsts = {}
                for vcpu in range(self.vcpus):
                    mine = [c for c in self.checks if c["vcpu"] == vcpu and c["after_resume"] == self.resumes]
                    if whole_after is not None:
                        mine = [c for c in mine if c["at"] >= whole_after][1:]
                    if mine:
                        firsts[vcpu] = mine[0]
                if len(firsts) == self.vcpus:
                    return self._combine(list(firsts.values()))
                if self.fault:
                    return None
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    return None

    def last_checks(self) -> dict | None:
        """Every vCPU's latest self-check, added up (None until all reported)."""
        with self._cond:
            last = {c["vcpu"]: c for c in self.checks}
            return self._combine([last[v] for v in range(self.vcpus)]) if len(last) == self.vcpus else None

    @staticmethod
    def _combine(checks: list[dict]) -> dict:
        if len(checks) == 1:
            return checks[0]
        return {
            "vcpus": len(checks),
            "mismatches": sum(c["mismatches"] for c in checks),
            "granules_checked": sum(c["granules_checked"] for c in checks),
            "ops": sum(c["ops"] for c in checks),
            "after_resume": checks[0]["after_resume"],
            "at": max(c["at"] for c in checks),
        }


class KvmVcpuSet:
    """The guest's vCPUs as threads in KVM_RUN; the simulated VcpuSet's surface."""

    def __init__(self, vm, count: int, workload=None):
        if count < 1:
            raise ValueError("a guest needs at least one vCPU")
        self.vm = vm
        self.workload = workload
        self.count = count
        self.throttle = 0.0
        self.reports = GuestReports(count)
        self.error: BaseException | None = None
        install_kick_handler()
        self.fds = [vm.create_vcpu() for _ in range(count)]
        size = ioctl(vm.system.fd, uapi.KVM_GET_VCPU_MMAP_SIZE)
        self._maps = [mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) for fd in self.fds]
        self._runs = [uapi.KvmRun.from_buffer(m) for m in self._maps]
        target = uapi.VcpuInit()
        ioctl(vm.fd, uapi.KVM_ARM_PREFERRED_TARGET, target, counters=vm.counters, name="kvm_arm_preferred_target")
        target.features[0] |= 1 << uapi.KVM_ARM_VCPU_PSCI_0_2
        for fd in self.fds:
            ioctl(fd, uapi.KVM_ARM_VCPU_INIT, target, counters=vm.counters, name="kvm_arm_vcpu_init")
        self.reg_ids = self._reg_list(self.fds[0])
        self._cond = threading.Condition()
        self._running = False
        self._parked = 0
        self._quit = False
        self._threads: list[threading.Thread] = []
        self._throttler: threading.Thread | None = None
        self.exits: dict[str, int] = {}

    def _reg_list(self, fd: int) -> list[int]:
        """KVM_GET_REG_LIST: asked once with n = 0 (E2BIG tells the count)."""
        head = uapi.RegListHeader(0)
        ioctl(fd, uapi.KVM_GET_REG_LIST, head, counters=self.vm.counters, name="kvm_get_reg_list", quiet=(7,))
        buf = (ctypes.c_uint64 * (1 + head.n))(head.n)
        ioctl(fd, uapi.KVM_GET_REG_LIST, buf, counters=self.vm.counters, name="kvm_get_reg_list")
        return [r for r in uapi.parse_reg_list(bytes(buf)) if r not in uapi.COUNTERS]

    # -- control ---------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._running

    def start(self) -> None:
        if not self._threads:
            for i in range(self.count):
                t = threading.Thread(target=self._run, args=(i,), name=f"kvm-vcpu{i}", daemon=True)
                self._threads.append(t)
                t.start()
            with self._cond:  # every thread parked before the first resume
                self._cond.wait_for(lambda: self._parked == self.count, 10)
        self.resume()

    def resume(self) -> None:
        with self._cond:
            for run in self._runs:
                run.immediate_exit = 0
            self._running = True
            self.reports.resumed()
            self._cond.notify_all()

    def pause(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._running = False
            for run in self._runs:
                run.immediate_exit = 1
            for t in self._threads:
                if t.ident is not None:
                    signal.pthread_kill(t.ident, KICK)
            if self._threads and not self._cond.wait_for(lambda: self._parked == self.count, timeout):
                raise TimeoutError("vCPUs did not stop")

    #: auto-converge's period: every THROTTLE_PERIOD_S the vCPUs are kicked
    #: out of KVM_RUN and sleep ``throttle`` of it (QEMU's cpu-throttle does the same)
    THROTTLE_PERIOD_S = 0.05

    def set_throttle(self, fraction: float) -> None:
        """Keep the vCPUs off the CPU ``fraction`` of the time: a thread
        kicks them every period and each sleeps its share before it enters
        KVM_RUN again."""
        if not 0.0 <= fraction <= 0.99:
            raise ValueError("throttle must be between 0 and 0.99")
        self.throttle = fraction
        if fraction and self._throttler is None:
            self._throttler = threading.Thread(target=self._throttle_loop, name="kvm-throttle", daemon=True)
            self._throttler.start()

    def _throttle_loop(self) -> None:
        while not self._quit:
            time.sleep(self.THROTTLE_PERIOD_S)
            with self._cond:
                if not (self._running and self.throttle and self._threads):
                    continue
                for run in self._runs:
                    run.immediate_exit = 1
                for t in self._threads:
                    if t.ident is not None:
                        signal.pthread_kill(t.ident, KICK)

    def _nap(self, run) -> None:
        """After a kick: a throttled vCPU sleeps its share of the period,
        then (unless it is being paused) clears immediate_exit again."""
        share = self.throttle
        if share and self._running:
            time.sleep(share * self.THROTTLE_PERIOD_S)
            self._count("throttle_naps")
        with self._cond:
            if self._running:
                run.immediate_exit = 0

    def shutdown(self) -> None:
        with self._cond:
            self._quit = True
        if self._threads:
            self.pause()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        if self._throttler is not None:
            self._throttler.join(timeout=1)

    def close(self) -> None:
        self.shutdown()
        import os

        for run in self._runs:
            del run
        self._runs = []
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass
        for fd in self.fds:
            os.close(fd)

    # -- the threads -------------------------------------------------------------
    def _run(self, i: int) -> None:
        fd, run = self.fds[i], self._runs[i]
        mmio_pending = False
        try:
            while True:
                with self._cond:
                    if not self._running or self._quit:
                        if mmio_pending:  # complete the access, run nothing
                            run.immediate_exit = 1
                            ioctl(fd, uapi.KVM_RUN, quiet=(4,))
                            mmio_pending = False
                        self._parked += 1
                        self._cond.notify_all()
                        self._cond.wait_for(lambda: self._running or self._quit)
                        self._parked -= 1
                        if self._quit:
                            self._parked += 1
                            self._cond.notify_all()
                            return
                ret = ioctl(fd, uapi.KVM_RUN, quiet=(4,))  # EINTR: kicked
                mmio_pending = False
                if ret < 0:
                    self._count("intr")
                    self._nap(run)
                    continue
                reason = run.exit_reason
                if reason == uapi.KVM_EXIT_MMIO:
                    self._count("mmio")
                    mmio = run.u.mmio
                    mmio_pending = True
                    if mmio.is_write:
                        value = int.from_bytes(bytes(mmio.data)[: mmio.len], "little")
                        self.reports.write(mmio.phys_addr - MMIO_BASE, value, i)
                    else:
                        ctypes.memset(ctypes.addressof(mmio.data), 0, 8)
                elif reason == uapi.KVM_EXIT_INTR:
                    self._count("intr")
                    self._nap(run)
                elif reason == uapi.KVM_EXIT_SYSTEM_EVENT:
                    self._count("system_event")
                    raise RuntimeError(f"the guest stopped itself (system event {run.u.system_event.type})")
                else:
                    raise RuntimeError(
                        f"KVM_RUN exit {reason} (hardware reason {run.u.hardware_entry_failure_reason:#x})"
                    )
        except (KernelError, RuntimeError) as exc:
            self.error = exc
            with self._cond:
                self._parked += 1
                self._running = False
                self._cond.notify_all()

    def _count(self, what: str) -> None:
        self.exits[what] = self.exits.get(what, 0) + 1

    # -- state ---------------------------------------------------------------
    def get_reg(self, i: int, reg_id: int) -> int:
        size = uapi.reg_size(reg_id)
        buf = (ctypes.c_uint8 * size)()
        ioctl(self.fds[i], uapi.KVM_GET_ONE_REG, uapi.OneReg(reg_id, ctypes.addressof(buf)))
        return int.from_bytes(bytes(buf), "little")

    def set_reg(self, i: int, reg_id: int, value: int) -> None:
        size = uapi.reg_size(reg_id)
        buf = (ctypes.c_uint8 * size).from_buffer_copy(value.to_bytes(size, "little"))
        ioctl(self.fds[i], uapi.KVM_SET_ONE_REG, uapi.OneReg(reg_id, ctypes.addressof(buf)))

    def get_states(self) -> list[VcpuState]:
        """Every register KVM_GET_REG_LIST names (the virtual counter aside),
        one KVM_GET_ONE_REG each: core registers under their names (v0..v31
        split in .lo/.hi 64-bit halves), system registers (MTE's included)
        under theirs, the rest by id.  Only with the vCPUs stopped."""
        if self._running:
            raise RuntimeError("vCPU state can only be read with the vCPUs paused")
        states = []
        for i in range(self.count):
            regs, sysregs = {}, {}
            for reg_id in self.reg_ids:
                value = self.get_reg(i, reg_id)
                name = uapi.reg_name(reg_id)
                into = sysregs if (reg_id & uapi.KVM_REG_ARM_COPROC_MASK) == uapi.KVM_REG_ARM64_SYSREG else regs
                if uapi.reg_size(reg_id) > 8:
                    into[f"{name}.lo"], into[f"{name}.hi"] = value & (2**64 - 1), value >> 64
                else:
                    into[name] = value
            self.vm.counters.add("syscalls.kvm_get_one_reg", len(self.reg_ids))
            states.append(VcpuState(i, regs, sysregs))
        return states

    def set_states(self, states: list[VcpuState]) -> None:
        if len(states) != self.count:
            raise ValueError(f"{len(states)} vCPU states for {self.count} vCPUs")
        for i, state in enumerate(states):
            values = {**state.regs, **state.sysregs}
            for reg_id in self.reg_ids:
                name = uapi.reg_name(reg_id)
                if uapi.reg_size(reg_id) > 8:
                    value = values[f"{name}.lo"] | (values[f"{name}.hi"] << 64)
                else:
                    value = values[name]
                try:
                    self.set_reg(i, reg_id, value)
                except KernelError as exc:
                    raise ValueError(f"vCPU {i}: KVM refused {name} = {value:#x}: {exc}") from None
            self.vm.counters.add("syscalls.kvm_set_one_reg", len(self.reg_ids))
