"""The host interface the migration engine and the strategies talk to, and
the registry of its implementations.

A host is what one VMM process owns: one VM with its guest RAM (and the
kernel's tag storage behind it), its vCPUs and what they run, and the VMM's
own mappings of that RAM.  The engine reaches all of it through the handles
below, never through a backend's internals, so that the same engine runs on
the simulator (``sim``, the default, anywhere) and on a real Linux KVM with
MTE (``kvm``, arm64 only; ``hosts/kvm/``).

Handles every backend provides:

``memory``
    guest RAM as a ``GuestMemory`` (hosts/memory.py): the memfd the VM's
    memslots map, with its populated ranges, plus the tag view
    (``tags``/``tagged``) the validation digest reads.  On the simulator that
    view *is* the kernel's tag storage; on KVM it is filled from the hardware
    by ``refresh_tag_view``.
``vm``
    the KVM VM: ``mte_enabled``, ``memslots``, ``page_to_ipa``,
    ``mte_copy_tags`` (KVM_ARM_MTE_COPY_TAGS), ``enable_dirty_logging`` /
    ``disable_dirty_logging`` / ``dirty_logging`` / ``get_dirty_log``
    (get-and-clear per memslot), ``map_guest_ram(prot_mte=...)``.
``vcpus``
    ``count``, ``start``, ``pause`` (returns once every vCPU has stopped),
    ``resume``, ``throttle`` / ``set_throttle``, ``get_states`` /
    ``set_states`` (``VcpuState``: registers and system registers, the MTE
    ones included), ``running``.
``workload``
    what the guest runs: ``name``, ``seed``, ``params``, ``get_state`` /
    ``set_state``, ``device_state`` / ``set_device_state``.
``ram`` / ``device_mapping`` / ``vmm_dirty``
    the VMM's untagged mapping of RAM, the one device emulation writes
    through (PROT_MTE with the prot-mte strategy), and the VMM's own dirty
    bitmap of those writes.
``counters``
    the operation counters (system calls, EL0 tag instructions, ...).
"""

from abc import ABC, abstractmethod

#: the backends ``--host`` names; the first is the default
BACKENDS = ("sim", "kvm")


class HostUnavailable(Exception):
    """This machine cannot run the backend asked for; the message is one
    line that says why (no /dev/kvm, no MTE in KVM, not arm64)."""


class Host(ABC):
    """One host with one guest; see the module docstring for the handles."""

    #: the backend's name, as ``--host`` spells it
    kind: str = "?"

    memory = None
    vm = None
    vcpus = None
    workload = None
    ram = None
    device_mapping = None
    vmm_dirty = None

    @property
    @abstractmethod
    def counters(self): ...

    @abstractmethod
    def prepare_guest(self) -> None:
        """Boot-time population of guest memory (the source only)."""

    @abstractmethod
    def make_workload(self, name: str, *, seed: int, vcpus: int, params: dict):
        """The workload object a destination stages from the source's STATE
        (it runs only after GO)."""

    def refresh_tag_view(self, first_page: int = 0, end_page: int | None = None) -> list[tuple[int, int]]:
        """Bring ``memory.tags``/``memory.tagged`` up to date with the tags
        the guest really has, for the pages given (all by default); returns
        the page runs whose view changed.  Only meaningful with the vCPUs
        stopped.  The simulator's view is the storage itself: nothing to do."""
        return []

    def watch_writes(self, step: int | None = None):
        """A WriteWatch (writewatch.py) over guest RAM from now on, for a
        validation digest that reads again only what the guest wrote; close
        it with ``unwatch_writes``.  Raises WatchUnavailable, saying why,
        where the host cannot.  By default it cannot: the watch sees stores
        through this process's page tables, and a backend must say that
        every store to its guest RAM goes through them."""
        from .writewatch import WatchUnavailable

        raise WatchUnavailable(f"the {self.kind} host's guest stores have not been shown to reach the write watch")

    def unwatch_writes(self, watch) -> None:
        watch.close()

    def watch_tag_writes(self):
        """A WriteWatch over the tag view, in pages of RAM; raises
        WatchUnavailable where this host's tags are not stored through it
        (in hardware, they are read after the pause instead)."""
        from .writewatch import WatchUnavailable

        raise WatchUnavailable(f"the {self.kind} host's tag stores do not reach a write watch")

    def guest_report(self, wait_s: float = 0.0) -> dict | None:
        """What the guest itself says about its memory (a self-checking guest
        program's verdict after the last resume), waiting up to ``wait_s`` for
        one; None when the guest cannot say (the simulator's workloads)."""
        return None

    @abstractmethod
    def close(self) -> None: ...


def make_host(kind: str, ram_size: int, **kw) -> Host:
    """A host of backend ``kind`` ('sim' or 'kvm'); keyword arguments as
    ``SimulatedHost``'s.  Raises HostUnavailable when this machine cannot
    run it."""
    if kind == "sim":
        from .host import SimulatedHost

        return SimulatedHost(ram_size, **kw)
    if kind == "kvm":
        from .kvm import KvmHost, check_kvm

        check_kvm()
        return KvmHost(ram_size, **kw)
    raise ValueError(f"unknown host backend {kind!r}; known: {', '.join(BACKENDS)}")
