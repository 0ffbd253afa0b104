"""The default run beside the cost of fresh memory on this host, interleaved.

    python3 benchmarks/bench_fresh_memory.py [--runs 5] [--size 1GiB] [--scenario default]

A destination stores each page of guest RAM into memory it has not used
before.  On a virtual machine whose hypervisor takes freed memory back (a
virtio balloon with free page reporting), that first store faults into the
hypervisor as well, and its cost swings with how much the host took back.
Before each `mte-migrate run`, a fresh process stores ``--size`` bytes in
1 MiB blocks into a new file of guest RAM (the destination's kind, as the
landing ceiling does) twice: the first time into memory just freed by the
previous run ("cold"), the second into memory freed a moment ago ("again").
With ``--also-prealloc`` each round then runs the same migration with
``--prealloc`` (the destination allocates its RAM before the migration
starts): the difference is what fresh memory cost inside the window.
Prints one JSON line per round and a summary of medians, so that a run's
total can be read against the floor its destination's RAM set that minute.
The store probe runs before the source's guest takes its RAM, so it may get
memory freed a moment ago that the destination will not: the prealloc run's
``prealloc_ms`` (the destination's RAM, allocated after the source's) is
the closer measure of what the destination met.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from migrate.units import parse_size

_PROBE = (
    "import json, sys\n"
    "from migrate.tools.ceilings import landing_times\n"
    "cold, again = landing_times(False, int(sys.argv[1]), repeat=2)\n"
    "print(json.dumps({'cold_s': round(cold, 4), 'again_s': round(again, 4)}))\n"
)
REPORTED = "/sys/module/page_reporting/parameters/reported_kib"


def reported_mib() -> float | None:
    """MiB the guest kernel has handed back to the hypervisor so far, where
    this kernel reports free pages (None elsewhere)."""
    try:
        with open(REPORTED) as f:
            return int(f.read()) / 1024
    except (OSError, ValueError):
        return None


def probe(size: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, str(size)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def migrate_once(scenario: str, prealloc: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "migrate", "run", "--json", path, "-q"]
        cmd += [] if scenario == "default" else ["--scenario", scenario]
        cmd += ["--prealloc"] if prealloc else []
        done = subprocess.run(cmd, check=False)
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, ValueError):
            raise SystemExit(
                f"bench_fresh_memory: `{' '.join(cmd[1:])}` exited with {done.returncode} and wrote no result"
            ) from None
    dest = r.get("destination") or {}
    return {
        "status": r["status"],
        "ok": (r.get("validation") or {}).get("ok"),
        "total_ms": r["total_time_ms"],
        "downtime_ms": r["downtime_ms"],
        "cpu_src_s": (r.get("cpu") or {}).get("process_s"),
        "cpu_dst_s": (dest.get("cpu") or {}).get("process_s"),
        "prealloc_ms": dest.get("prealloc_ms"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", default="1GiB", help="bytes the probe stores (the guest's RAM)")
    ap.add_argument("--scenario", default="default")
    ap.add_argument("--also-prealloc", action="store_true", help="each round, the same run with --prealloc too")
    args = ap.parse_args()
    size = parse_size(args.size)
    rounds = []
    for i in range(args.runs):
        before = reported_mib()
        row = {"round": i + 1, **probe(size)}
        row.update(migrate_once(args.scenario))
        if args.also_prealloc:
            row.update({"prealloc_" + k: v for k, v in migrate_once(args.scenario, True).items()})
        after = reported_mib()
        row["host_took_back_mib"] = None if before is None else round(after - before)
        row["at"] = time.strftime("%H:%M:%S")
        rounds.append(row)
        print(json.dumps(row), flush=True)

    def med(key):
        values = [r[key] for r in rounds if r.get(key) is not None]
        return statistics.median(values) if values else None

    keys = ["total_ms", "downtime_ms", "cpu_dst_s", "cold_s", "again_s", "host_took_back_mib"]
    keys += ["prealloc_total_ms", "prealloc_downtime_ms", "prealloc_prealloc_ms"] if args.also_prealloc else []
    summary = {k: med(k) for k in keys}
    ok = sum(bool(r["ok"]) and r.get("prealloc_ok", True) is not False for r in rounds)
    summary.update(size=size, runs=args.runs, scenario=args.scenario, rounds_all_validated=ok)
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
