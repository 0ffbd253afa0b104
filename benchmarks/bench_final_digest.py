"""The source's validation digest after the pause, alone, in process.

    PYTHONPATH=TREE python3 benchmarks/bench_final_digest.py [--runs 3] [--ram-gib 1]

Builds a guest with the default scenario's workload (allocator, every page
populated and tagged, nothing running) and takes the digest the way the
source's ``_final_digest`` does after the pause: a new digest of all of RAM,
read in two threads.  Prints one JSON line: every run's ms, the median, the
minimum, and how many distinct data digests came out (1, or something is
wrong).  Run it from two checkouts alternately (PYTHONPATH set to each) to
compare them; a checkout whose MemoryDigest has no ``pieces`` argument is
timed as it was then, with the ``populated_pages()`` it asked at the same
moment.
"""

import argparse
import asyncio
import inspect
import json
import statistics
import time

from hosts import SimulatedHost
from migrate.engine.digest import MemoryDigest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ram-gib", type=float, default=1.0)
    args = ap.parse_args()
    host = SimulatedHost(int(args.ram_gib * (1 << 30)), workload="allocator", rate=0, seed=1)
    host.prepare_guest()
    one_shot = "pieces" in inspect.signature(MemoryDigest).parameters

    async def once() -> tuple[float, str]:
        t = time.perf_counter()
        if one_shot:
            digest = MemoryDigest(host.memory, compute=False, pieces=False)
        else:
            digest = MemoryDigest(host.memory, compute=False)
            host.memory.populated_pages()
        await digest.refresh_parallel(asyncio.get_running_loop(), frozen=True)
        return (time.perf_counter() - t) * 1000, digest.data_digest()

    times, digests = [], set()
    try:
        for _ in range(args.runs):
            ms, data_digest = asyncio.run(once())
            times.append(round(ms, 1))
            digests.add(data_digest)
    finally:
        host.close()
    print(json.dumps({"ms": times, "median": statistics.median(times), "min": min(times), "digests": len(digests)}))


if __name__ == "__main__":
    main()
