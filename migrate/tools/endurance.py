"""`mte-migrate endurance`: one guest migrated back and forth between two
long-lived host processes, validated on every hop, watching both processes
for growth in memory and file descriptors.

Each worker owns a listener.  On its turn to receive it creates a fresh,
empty VM and waits; on its turn to send it migrates the guest it holds (the
one it received last, still running) to the other worker.  After every hop
each worker reports its RSS and open file descriptors."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

from migrate.engine.dest import DestVmm
from migrate.engine.source import SourceVmm
from migrate.hosting.process import build_host, spec_from_json, spec_to_json


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def worker(spec_path: str, role: str, hops: int, peer_port_file: str) -> int:
    """One host: role 'a' starts with the guest, 'b' starts empty."""
    with open(spec_path) as f:
        guest, config, scenario = spec_from_json(f.read())
    listener = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
    peer_port = int(sys.stdin.readline())
    host = None
    if role == "a":
        host = build_host(guest, config.strategy, "source", config.postcopy)
        host.vcpus.start()
    try:
        for hop in range(hops):
            sending = (hop % 2 == 0) == (role == "a")
            t0 = time.perf_counter()
            if sending:
                result = asyncio.run(SourceVmm(host, config, scenario).migrate(("127.0.0.1", peer_port)))
                if result["status"] == "completed":
                    host.close()  # the guest lives on the other host now
                    host = None
            else:
                host = build_host(guest, config.strategy, "destination", config.postcopy)
                result = asyncio.run(DestVmm(host, config, scenario).serve(listener))
            print(
                json.dumps(
                    {
                        "hop": hop,
                        "role": "source" if sending else "destination",
                        "status": result["status"],
                        "error": result["error"],
                        "validated": result["validation"]["ok"] if sending else None,
                        "ms": round((time.perf_counter() - t0) * 1000, 1),
                        "rss_kib": _rss_kib(),
                        "fds": _fds(),
                    }
                ),
                flush=True,
            )
            if result["status"] != "completed":
                return 1
        return 0
    finally:
        if host is not None:
            host.close()
        listener.close()


def run(guest, config, scenario: str, hops: int, quiet: bool = False) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mte-endurance-") as tmp:
        spec = os.path.join(tmp, "spec.json")
        with open(spec, "w") as f:
            f.write(spec_to_json(guest, config, scenario))
        procs = {
            r: subprocess.Popen(
                [sys.executable, "-m", "migrate", "endurance-worker", "--spec", spec, "--role", r, "--hops", str(hops)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for r in ("a", "b")
        }
        try:
            ports = {r: json.loads(p.stdout.readline())["port"] for r, p in procs.items()}
            for r, p in procs.items():
                p.stdin.write(f"{ports['b' if r == 'a' else 'a']}\n")
                p.stdin.flush()
            reports = {r: [] for r in procs}
            for hop in range(hops):
                for r, p in procs.items():
                    line = p.stdout.readline()
                    if not line:
                        break
                    reports[r].append(json.loads(line))
                done = [reports[r][-1] for r in procs if reports[r] and reports[r][-1]["hop"] == hop]
                src = next((d for d in done if d["role"] == "source"), None)
                if not quiet and src:
                    print(
                        f"hop {hop + 1}/{hops}: {src['status']}, validated {src['validated']}, {src['ms']:.0f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
                if any(d["status"] != "completed" for d in done) or len(done) < 2:
                    break
        finally:
            for p in procs.values():
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
    hops_ok = sum(1 for d in reports["a"] + reports["b"] if d["role"] == "source" and d["validated"])
    growth = {}
    for r, rows in reports.items():
        # Compare like with like: the same role, once the first quarter of
        # the hops has warmed the allocator and caches up.
        for role in ("source", "destination"):
            same = [d for d in rows if d["role"] == role]
            if len(same) >= 3:
                first = same[max(1, len(same) // 4)]
                growth[f"{r}:{role}"] = {
                    "rss_kib_first": first["rss_kib"],
                    "rss_kib_last": same[-1]["rss_kib"],
                    "fds_first": first["fds"],
                    "fds_last": same[-1]["fds"],
                    "from_hop": first["hop"],
                }
    return {"hops": hops, "hops_validated": hops_ok, "growth": growth, "reports": reports}
