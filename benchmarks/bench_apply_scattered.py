"""The destination applying a dirty pass's scattered pages, alone, in process.

    PYTHONPATH=TREE python3 benchmarks/bench_apply_scattered.py [--pages 5000] [--runs 3] [--profile]

Builds a 256 MiB allocator guest, picks PAGES scattered pages (as a dirty
pass finds them), builds their PAGES frames as the source would (tag-ioctl,
the default strategy), decodes them on a destination connection and applies
them with the destination's BatchApplier and digest twice: the first time
as an earlier pass would have brought them, the second timed, as a dirty
pass finds them.  Prints one JSON line:
the microseconds per page of building, decoding and applying, each run's
apply time and the median.  ``--profile`` prints cProfile's top functions of
one apply instead.
"""

import argparse
import cProfile
import json
import pstats
import random
import statistics
import time

from hosts import SimulatedHost
from migrate.config.spec import MigrationConfig
from migrate.engine.bitmaps import runs
from migrate.engine.digest import MemoryDigest
from migrate.engine.pages import BatchApplier, BatchBuilder, split_batches
from migrate.protocol import frames as fr
from migrate.protocol.compression import Compressor
from migrate.protocol.machine import Connection, DestState, dest_machine
from migrate.strategies import get as get_strategy

MiB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    src = SimulatedHost(256 * MiB, workload="allocator", rate=0, seed=2)
    src.prepare_guest()
    cfg = MigrationConfig()
    source = get_strategy("tag-ioctl")(src, cfg)
    source.setup_source()
    builder = BatchBuilder(source, Compressor(cfg.compression), 256, checked=True)
    random.seed(1)
    chosen = bytearray(src.memory.npages)
    for p in random.sample(range(src.memory.npages), args.pages):
        chosen[p] = 1
    t = time.perf_counter()
    wire = []
    for batch in split_batches(list(runs(chosen, 1)), 256):
        frame, _ = builder.build(1, batch)
        wire.append(b"".join(bytes(b) for b in fr.encode(frame, "full")))
    build_s = time.perf_counter() - t

    applies, decode_s = [], 0.0
    for _ in range(args.runs):
        dst = SimulatedHost(256 * MiB, workload="idle", workload_params={"fill": 0}, rate=0)
        dest = get_strategy("tag-ioctl")(dst, cfg)
        dest.setup_dest()
        applier = BatchApplier(dest, dst.memory.npages, digest=MemoryDigest(dst.memory))
        conn = Connection(dest_machine())
        conn.machine.state, conn.ram_pages = DestState.RECEIVING, dst.memory.npages
        for f in [f for raw in wire for f in conn.feed(raw)]:
            applier.apply(f)  # an earlier pass brought these pages: a dirty pass finds them there
        applier.digest.refresh()
        t = time.perf_counter()
        frames = [f for raw in wire for f in conn.feed(raw)]
        decode_s = time.perf_counter() - t
        profiler = cProfile.Profile() if args.profile else None
        t = time.perf_counter()
        if profiler:
            profiler.enable()
        for f in frames:
            applier.apply(f)
        if profiler:
            profiler.disable()
        applies.append(time.perf_counter() - t)
        dest.close()
        dst.close()
        if profiler:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
            break
    source.close()
    src.close()
    per_page = 1e6 / args.pages
    print(
        json.dumps(
            {
                "pages": args.pages,
                "build_us_per_page": round(build_s * per_page, 2),
                "decode_us_per_page": round(decode_s * per_page, 2),
                "apply_ms": [round(a * 1e3, 1) for a in applies],
                "apply_us_per_page_median": round(statistics.median(applies) * per_page, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
