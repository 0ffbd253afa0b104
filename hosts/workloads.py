"""Guest workloads: what the vCPUs (and, for device-dma, the VMM's device
emulation) do to memory and tags.  Each vCPU owns a disjoint slice of the
workload's region and its own seeded RNG, so the same seed and the same
number of steps per vCPU give the same memory and tags whatever the thread
interleaving.  A step touches a few pages; bulk set-up happens in prepare().
"""

import random

from .constants import GRANULE, PACKED_TAGS_PER_PAGE, PAGE_SIZE
from .datapool import shared_pool, tag_pool
from .errors import TagCheckFault
from .mapping import TagCheckMode

MiB = 1 << 20


class Workload:
    name = "?"
    description = ""
    #: fraction of RAM populated by prepare() unless the scenario says otherwise
    default_fill = 0.05
    #: fraction of the populated pages given non-zero tags by prepare()
    default_tagged = 1.0

    def __init__(self, vm, *, seed: int = 1, vcpus: int = 1, params: dict | None = None, device=None):
        self.vm = vm
        self.seed = seed
        self.vcpus = vcpus
        self.params = dict(params or {})
        self.device = device
        npages = vm.memory.npages
        fill = float(self.params.get("fill", self.default_fill))
        if not 0.0 <= fill <= 1.0:
            raise ValueError(f"fill must be between 0 and 1, got {fill}")
        self.fill_pages = int(npages * fill)
        self.tagged_fraction = float(self.params.get("tagged", self.default_tagged))
        region = int(self.params.get("region_pages", 0)) or max(self.fill_pages, min(npages, 256))
        self.region_pages = max(vcpus, min(region, npages))
        per = self.region_pages // vcpus
        self.slices = [(i * per, (i + 1) * per) for i in range(vcpus)]
        self.rngs = [random.Random(f"{self.name}:{seed}:{i}") for i in range(vcpus)]
        self.pool = shared_pool(seed)
        self._tag_pool = tag_pool(seed)

    # -- helpers --------------------------------------------------------------
    def ipa(self, page: int, offset: int = 0) -> int:
        return self.vm.page_to_ipa(page) + offset

    def write_pages(self, rng, page: int, npages: int) -> None:
        self.vm.guest_write(self.ipa(page), self.pool.slice(rng, npages * PAGE_SIZE))

    def tag_pages(self, rng, page: int, npages: int) -> int:
        """Store tags from the pool on whole pages; returns where in the pool
        they came from (a guest that checks its tags later remembers that)."""
        n = npages * PACKED_TAGS_PER_PAGE
        start = rng.randrange(len(self._tag_pool) - n + 1) if n < len(self._tag_pool) else 0
        self.vm.guest_store_tags_packed(self.ipa(page), self._tag_pool[start : start + n])
        return start

    # -- the interface ----------------------------------------------------------
    def prepare(self) -> None:
        """Populate fill_pages of RAM in 1 MiB strokes; tag a share of them."""
        rng = random.Random(f"prepare:{self.name}:{self.seed}")
        step = MiB // PAGE_SIZE
        for page in range(0, self.fill_pages, step):
            n = min(step, self.fill_pages - page)
            self.write_pages(rng, page, n)
            if rng.random() < self.tagged_fraction:
                self.tag_pages(rng, page, n)

    def step(self, cpu: int) -> int:
        """One unit of guest activity on vCPU ``cpu``; returns pages touched."""
        raise NotImplementedError

    def get_state(self) -> dict:
        return {"rngs": [_rng_state(r) for r in self.rngs]}

    def set_state(self, state: dict) -> None:
        for rng, s in zip(self.rngs, state["rngs"]):
            rng.setstate(_rng_unstate(s))

    # -- emulated devices ---------------------------------------------------------
    def device_state(self) -> dict:
        """The state of the devices this workload drives, by device name:
        what a VMM would save for them (empty: the guest has none)."""
        return {}

    def set_device_state(self, state: dict) -> None:
        if state:
            raise ValueError(f"this guest has no devices, got state for {', '.join(map(str, state))}")


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_unstate(s) -> tuple:
    return (s[0], tuple(s[1]), s[2])


class Idle(Workload):
    name = "idle"
    description = "a few pages touched now and then"
    default_fill = 0.02

    def step(self, cpu):
        rng = self.rngs[cpu]
        lo, hi = self.slices[cpu]
        page = lo + rng.randrange(max(1, min(hi - lo, 64)))
        self.write_pages(rng, page, 1)
        return 1


class Allocator(Workload):
    """An MTE-aware malloc/free: IRG picks a random tag per allocation (never
    the tag it replaces), STG tags it, then data is written; free retags the
    chunk without touching its data, so use-after-free faults.

    ``write_fraction`` (default 1): the share of allocations written after
    they are tagged.  The rest stay tagged and zero, as memory an allocator
    hands out zeroed or reserves ahead: on fresh RAM that makes pages with
    tags and no data, which a migration must still carry."""

    name = "allocator"
    description = "MTE-aware malloc/free: IRG+STG per allocation, retag on free"
    default_fill = 1.0
    MAX_LIVE = 4096

    def __init__(self, vm, **kw):
        super().__init__(vm, **kw)
        self.live: list[list[tuple[int, int, int]]] = [[] for _ in range(self.vcpus)]
        self.write_fraction = float(self.params.get("write_fraction", 1.0))
        if not 0.0 <= self.write_fraction <= 1.0:
            raise ValueError(f"write_fraction must be between 0 and 1, got {self.write_fraction}")

    def _irg(self, rng, avoid: int) -> int:
        # GCR_EL1.Exclude keeps tag 0 for untagged memory.
        tag = rng.randrange(1, 15)
        return tag + 1 if tag >= avoid else tag

    def step(self, cpu):
        rng, (lo, hi) = self.rngs[cpu], self.slices[cpu]
        live = self.live[cpu]
        touched = 0
        if len(live) >= self.MAX_LIVE or (live and rng.random() < 0.5):
            addr, size, tag = live.pop(rng.randrange(len(live)))
            self.vm.guest_set_tags(addr, size, self._irg(rng, tag))  # free: retag only
            touched += -(-size // PAGE_SIZE)
        size = GRANULE * rng.choice((1, 2, 4, 8, 16, 32, 64, 128, 256))
        granules_in_slice = (hi - lo) * PAGE_SIZE // GRANULE
        start = rng.randrange(max(1, granules_in_slice - size // GRANULE))
        addr = self.ipa(lo) + start * GRANULE
        tag = self._irg(rng, 0)
        self.vm.guest_set_tags(addr, size, tag)
        # (the draw only when asked for: the default guest stays the same guest)
        if self.write_fraction >= 1.0 or rng.random() < self.write_fraction:
            self.vm.guest_write(addr, self.pool.slice(rng, size))
        live.append((addr, size, tag))
        return touched + -(-size // PAGE_SIZE)

    def get_state(self):
        return {**super().get_state(), "live": [[list(a) for a in cpu] for cpu in self.live]}

    def set_state(self, state):
        super().set_state(state)
        self.live = [[tuple(a) for a in cpu] for cpu in state["live"]]


class RetagChurn(Workload):
    name = "retag-churn"
    description = "tags change, data does not"
    default_fill = 0.5

    def step(self, cpu):
        rng, (lo, hi) = self.rngs[cpu], self.slices[cpu]
        npages = rng.choice((1, 1, 2, 4))
        page = lo + rng.randrange(max(1, hi - lo - npages))
        self.tag_pages(rng, page, min(npages, hi - page))
        return npages


class Stream(Workload):
    name = "stream"
    description = "sequential writes over a large region"
    default_fill = 0.5

    def __init__(self, vm, **kw):
        super().__init__(vm, **kw)
        self.pos = [lo for lo, _ in self.slices]
        self.stride = int(self.params.get("pages_per_step", 16))

    def step(self, cpu):
        rng, (lo, hi) = self.rngs[cpu], self.slices[cpu]
        page = self.pos[cpu]
        n = min(self.stride, hi - page)
        self.write_pages(rng, page, n)
        self.pos[cpu] = lo if page + n >= hi else page + n
        return n

    def get_state(self):
        return {**super().get_state(), "pos": list(self.pos)}

    def set_state(self, state):
        super().set_state(state)
        self.pos = list(state["pos"])


class HotSet(Workload):
    name = "hot-set"
    description = "a small set of pages rewritten fast"
    default_fill = 0.25

    def __init__(self, vm, **kw):
        super().__init__(vm, **kw)
        self.hot = int(self.params.get("hot_pages", 4096))
        #: the tags this guest gave each hot page it retagged (where in the tag
        #: pool they came from): before it writes such a page again, it reads
        #: through its tagged pointer, so a wrong tag is a tag check fault
        self.expected: dict[int, int] = {}

    def step(self, cpu):
        rng, (lo, hi) = self.rngs[cpu], self.slices[cpu]
        span = max(1, min(self.hot // self.vcpus, hi - lo))
        page = lo + rng.randrange(span)
        start = self.expected.get(page)
        if start is not None:
            self.vm.guest_check_page_tags(self.ipa(page), self._tag_pool[start : start + PACKED_TAGS_PER_PAGE])
        self.write_pages(rng, page, 1)
        if rng.random() < 0.25:
            self.expected[page] = self.tag_pages(rng, page, 1)
        return 1

    def get_state(self):
        return {**super().get_state(), "expected": [[p, s] for p, s in self.expected.items()]}

    def set_state(self, state):
        super().set_state(state)
        self.expected = {int(p): int(s) for p, s in state.get("expected", [])}


class RandomWrites(Workload):
    name = "random"
    description = "random page writes over the whole region"
    default_fill = 0.5

    def step(self, cpu):
        rng, (lo, hi) = self.rngs[cpu], self.slices[cpu]
        page = lo + rng.randrange(max(1, hi - lo))
        self.write_pages(rng, page, 1)
        return 1


class DeviceDma(Workload):
    """The guest posts tagged buffers; the VMM's device emulation writes them
    (as virtio would).  Through an untagged mapping that just works; through a
    PROT_MTE mapping the device must use TCO, a matching pointer tag, or
    suffer tag check faults, per ``dma_policy`` (tco | match | checked)."""

    name = "device-dma"
    description = "the VMM writes guest buffers as virtio does (tag checks under PROT_MTE)"
    default_fill = 0.25
    POLICIES = ("tco", "match", "checked")

    def __init__(self, vm, **kw):
        super().__init__(vm, **kw)
        self.policy = self.params.get("dma_policy", "tco")
        if self.policy not in self.POLICIES:
            raise ValueError(f"dma_policy must be one of {', '.join(self.POLICIES)}, got {self.policy!r}")
        self.faults = 0
        #: DMA requests the device has completed (its used ring index) and failed
        self.completed = 0

    def device_state(self) -> dict:
        return {"dma0": {"completed": self.completed, "faults": self.faults}}

    def set_device_state(self, state: dict) -> None:
        if set(state) != {"dma0"}:
            raise ValueError(f"device-dma expects state for dma0, got {sorted(map(str, state))}")
        self.completed, self.faults = int(state["dma0"]["completed"]), int(state["dma0"]["faults"])

    def step(self, cpu):
        rng, (lo, hi) = self.rngs[cpu], self.slices[cpu]
        page = lo + rng.randrange(max(1, hi - lo))
        size = PAGE_SIZE * rng.choice((1, 1, 2))
        size = min(size, (hi - page) * PAGE_SIZE)
        addr = self.ipa(page)
        tag = rng.randrange(1, 16)
        self.vm.guest_set_tags(addr, size, tag)  # the driver's tagged buffer
        payload = self.pool.slice(rng, size)
        device = self.device
        if device is None:  # no VMM attached: the guest fills it
            self.vm.guest_write(addr, payload)
            return size // PAGE_SIZE
        offset = page * PAGE_SIZE
        if not device.prot_mte:
            device.write(offset, payload)
        elif self.policy == "tco":
            with device.tco():
                device.write(offset, payload)
        elif self.policy == "match":  # LDG the buffer's tag, write with it in the pointer
            device.write(offset, payload, pointer_tag=device.load_tag(offset))
        else:  # checked: a plain pointer (tag 0) under synchronous checking
            device.set_tag_check_mode(TagCheckMode.SYNC)
            try:
                device.write(offset, payload)
            except TagCheckFault:
                self.faults += 1  # the device request fails; the guest sees an I/O error
                return size // PAGE_SIZE
        self.completed += 1
        return size // PAGE_SIZE


WORKLOADS = {cls.name: cls for cls in (Idle, Allocator, RetagChurn, Stream, HotSet, RandomWrites, DeviceDma)}


def make_workload(name: str, vm, **kw) -> Workload:
    try:
        cls = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}") from None
    return cls(vm, **kw)
