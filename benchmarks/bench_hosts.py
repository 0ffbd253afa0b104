"""Speed of the simulated host's access paths (issue 2, "Speed").

    python3 benchmarks/bench_hosts.py [--reps 5] [--ram-gib 1] [--dirty-gib 16] [--profile]

Figures printed (median and min-max over the repetitions, seconds):

1. A 1 GiB guest with every page populated and tagged is read in full, data
   and tags, and written into a fresh second SimulatedHost
   (a) through PROT_MTE mappings on both hosts: tags with EL0 LDG/STG
       (VmmMapping.load_tags / store_tags), data with read / write, all
       under TCO so that the VMM's own accesses are not tag checked;
   (b) through KVM_ARM_MTE_COPY_TAGS: FROM_GUEST on the source and TO_GUEST
       on the destination in batches, data through the untagged mappings.
   Goal: under 1 s each.  The destination's guest RAM is fresh (never
   touched), so the figure includes the host kernel allocating its pages,
   as a real incoming migration would.  After each run the destination's
   data, tags and PG_mte_tagged flags are checked equal to the source's.
2. Harvesting the dirty log of a 16 GiB guest (KVM_GET_DIRTY_LOG on its
   memslot plus DirtyLog.ranges()), with every page dirty and with a sparse
   1 % of the pages dirty.  Goal: under 0.2 s.  The dirty bitmap is set up
   directly through the kernel's marking routine (writing 16 GiB of guest
   RAM would need 16 GiB of host memory); harvesting is what is timed.
"""

import argparse
import cProfile
import os
import pstats
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hosts import (  # noqa: E402
    GRANULES_PER_PAGE,
    KVM_ARM_TAGS_FROM_GUEST,
    KVM_ARM_TAGS_TO_GUEST,
    PACKED_TAGS_PER_PAGE,
    PAGE_SIZE,
    SimulatedHost,
)
from hosts.constants import RAM_BASE_IPA  # noqa: E402
from hosts.datapool import DataPool, tag_pool  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
BATCH = 4 * MiB  # guest bytes moved per batch / per ioctl
BATCH_PAGES = BATCH // PAGE_SIZE


def populate(host: SimulatedHost, seed: int = 7) -> None:
    """Every page written and tagged, 1 MiB per guest store."""
    vm = host.vm
    pool = DataPool(seed)
    tags = tag_pool(seed, granules=1 << 20)
    rng = random.Random(seed)
    per = MiB // PAGE_SIZE * PACKED_TAGS_PER_PAGE
    for off in range(0, host.memory.size, MiB):
        vm.guest_write(RAM_BASE_IPA + off, pool.slice(rng, MiB))
        start = rng.randrange(len(tags) - per)
        vm.guest_store_tags_packed(RAM_BASE_IPA + off, tags[start : start + per])


def copy_prot_mte(src: SimulatedHost, dst: SimulatedHost) -> tuple[float, float]:
    """(a) The prot-mte path: EL0 tag loads/stores + data through PROT_MTE
    mappings.  Returns the seconds spent on (tags, data)."""
    smap = src.vm.map_guest_ram(prot_mte=True)
    dmap = dst.vm.map_guest_ram(prot_mte=True)
    npages = src.memory.npages
    t_tags = t_data = 0.0
    clock = time.perf_counter
    with smap.tco(), dmap.tco():
        for page in range(0, npages, BATCH_PAGES):
            n = min(BATCH_PAGES, npages - page)
            off = page * PAGE_SIZE
            t0 = clock()
            dmap.store_tags(page, smap.load_tags(page, n))
            t1 = clock()
            dmap.write(off, smap.read(off, n * PAGE_SIZE))
            t2 = clock()
            t_tags += t1 - t0
            t_data += t2 - t1
    return t_tags, t_data


def copy_tag_ioctl(src: SimulatedHost, dst: SimulatedHost) -> tuple[float, float]:
    """(b) The tag-ioctl path: KVM_ARM_MTE_COPY_TAGS in batches + untagged
    data copy.  Returns the seconds spent on (tags, data)."""
    buf = bytearray(BATCH_PAGES * GRANULES_PER_PAGE)
    size = src.memory.size
    t_tags = t_data = 0.0
    clock = time.perf_counter
    for off in range(0, size, BATCH):
        n = min(BATCH, size - off)
        ipa = RAM_BASE_IPA + off
        t0 = clock()
        done = src.vm.mte_copy_tags(ipa, n, buf, KVM_ARM_TAGS_FROM_GUEST)
        assert done == n, done
        done = dst.vm.mte_copy_tags(ipa, n, buf, KVM_ARM_TAGS_TO_GUEST)
        assert done == n, done
        t1 = clock()
        dst.ram.write(off, src.ram.read(off, n))
        t2 = clock()
        t_tags += t1 - t0
        t_data += t2 - t1
    return t_tags, t_data


def same_guest(a: SimulatedHost, b: SimulatedHost) -> bool:
    ma, mb = a.memory, b.memory
    step = 16 * MiB
    if any(ma.data[o : o + step] != mb.data[o : o + step] for o in range(0, ma.size, step)):
        return False
    return ma.tags == mb.tags and ma.tagged == mb.tagged


def summary(times: list[float]) -> str:
    return f"median {statistics.median(times):.3f} s  (min {min(times):.3f}, max {max(times):.3f}, n={len(times)})"


def bench_copy(ram: int, reps: int, profile: bool) -> dict[str, list[float]]:
    src = SimulatedHost(ram, vcpus=1)
    t0 = time.perf_counter()
    populate(src)
    print(
        f"  source populated: {ram // MiB} MiB, every page tagged "
        f"({time.perf_counter() - t0:.2f} s, not part of the figures)"
    )
    results: dict[str, list[float]] = {}
    for name, fn in (
        ("prot-mte mapping (LDG/STG + data, under TCO)", copy_prot_mte),
        ("copy-tags ioctl (FROM_GUEST/TO_GUEST + data)", copy_tag_ioctl),
    ):
        times, tag_times, data_times = [], [], []
        for rep in range(reps):
            dst = SimulatedHost(ram, vcpus=1)
            src_before, dst_before = src.counters.snapshot(), dst.counters.snapshot()
            prof = cProfile.Profile() if profile and rep == 0 else None
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            t_tags, t_data = fn(src, dst)
            if prof:
                prof.disable()
            times.append(time.perf_counter() - t0)
            tag_times.append(t_tags)
            data_times.append(t_data)
            if not same_guest(src, dst):
                raise SystemExit(f"{name}: destination differs from the source")
            if rep == 0:
                src_counts = src.counters.delta(src.counters.snapshot(), src_before)
                dst_counts = dst.counters.delta(dst.counters.snapshot(), dst_before)
            if prof:
                print(f"  --- profile of {name}, first run ---")
                pstats.Stats(prof).sort_stats("cumulative").print_stats(12)
            dst.close()
        results[name] = times
        print(f"  {name}: {summary(times)}  goal < 1 s: {'met' if statistics.median(times) < 1 else 'MISSED'}")
        print(
            f"      of which tags: median {statistics.median(tag_times):.3f} s, "
            f"data: median {statistics.median(data_times):.3f} s"
        )
        print(f"      source counters (one run):      {src_counts}")
        print(f"      destination counters (one run): {dst_counts}")
    src.close()
    return results


def bench_dirty(ram: int, reps: int, profile: bool) -> dict[str, list[float]]:
    host = SimulatedHost(ram, vcpus=1)
    vm = host.vm
    npages = host.memory.npages
    vm.enable_dirty_logging(0)
    rng = random.Random(3)
    sparse = sorted(rng.sample(range(npages), npages // 100))
    cases = {
        "fully dirty": lambda: vm._mark_dirty(0, npages),
        "1% dirty, random pages": lambda: [vm._mark_dirty(p, p + 1) for p in sparse],
        "every other page dirty (worst case for ranges(), no goal)": lambda: vm._dirty[0].__setitem__(
            slice(0, npages, 2), b"\x01" * (npages // 2)
        ),
    }
    results: dict[str, list[float]] = {}
    for name, dirty in cases.items():
        times = []
        for rep in range(reps):
            with vm.mmu_lock:
                dirty()
            prof = cProfile.Profile() if profile and rep == 0 else None
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            log = vm.get_dirty_log(0)
            runs = log.ranges()
            if prof:
                prof.disable()
            times.append(time.perf_counter() - t0)
            pages = sum(e - s for s, e in runs)
            expect = {"fully dirty": npages, "1% dirty, random pages": len(sparse)}.get(name, npages // 2)
            if pages != expect or vm.get_dirty_log(0).count():
                raise SystemExit(f"dirty log {name}: {pages} pages harvested, expected {expect}")
            if prof:
                pstats.Stats(prof).sort_stats("cumulative").print_stats(8)
        results[name] = times
        verdict = (
            "" if "no goal" in name else f"  goal < 0.2 s: {'met' if statistics.median(times) < 0.2 else 'MISSED'}"
        )
        print(f"  {name} ({pages} pages in {len(runs)} runs): {summary(times)}{verdict}")
    host.close()
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ram-gib", type=float, default=1.0)
    ap.add_argument("--dirty-gib", type=float, default=16.0)
    ap.add_argument("--profile", action="store_true", help="cProfile the first run of each figure")
    args = ap.parse_args(argv)
    ram = int(args.ram_gib * GiB) // MiB * MiB
    dirty_ram = int(args.dirty_gib * GiB) // MiB * MiB
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} (figures scale with other load)"
    )
    print(f"1. copy a {ram / GiB:g} GiB fully tagged guest into a fresh host, batches of {BATCH // MiB} MiB")
    bench_copy(ram, args.reps, args.profile)
    print(f"2. harvest the dirty log of a {dirty_ram / GiB:g} GiB guest")
    bench_dirty(dirty_ram, args.reps, args.profile)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
