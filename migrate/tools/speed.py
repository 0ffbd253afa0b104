"""`mte-migrate speed`: the same RAM images QEMU was measured with
(PERF-NOTES.md), migrated with default settings; medians and min-max of
total time, downtime and guest-RAM throughput, with the loopback and zstd
ceilings measured in the same run and the floor they set for each image
(the data pages' CRC on both sides, landing and sending, over the cores);
adaptive compression under a 1 Gbit/s cap against raw; and each host's peak
RSS against the RAM the guest touched.

Images: all zero; random; mixed (of every 4 pages: one zero, one random, two
of 2 KiB random followed by 2 KiB of repeated text), made once and cached."""

import json
import os
import statistics
import sys
from dataclasses import replace

from migrate.config.spec import GuestSpec, MigrationConfig
from migrate.hosting.images import block_bytes, builtin_image
from migrate.hosting.pair import run_pair
from migrate.tools.ceilings import crc_throughput, landing_throughput, loopback_throughput, zstd_throughput
from migrate.units import fmt_bytes

# QEMU 10.0.2 on these machines (PERF-NOTES.md), medians of 5, in ms.
QEMU_MS = {
    ("zero", 1 << 30): {"plain": 59, "multifd2": 102},
    ("random", 1 << 30): {"plain": 489, "multifd2": 289},
    ("mixed", 1 << 30): {"plain": 364, "multifd2": 316},
    ("zero", 4 << 30): {"plain": 199, "multifd2": 322},
    ("mixed", 4 << 30): {"plain": 1905, "multifd2": 1275},
}


def _stat(values):
    values = [v for v in values if v is not None]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None


def _one(kind: str, size: int, config: MigrationConfig) -> dict:
    guest = GuestSpec(
        ram=size, vcpus=2, workload="idle", rate=0, params={"fill": 0.0}, image=builtin_image(f"builtin:{kind}", size)
    )
    r = run_pair(guest, config, f"image-{kind}", quiet=True)
    dest = r.get("destination") or {}
    return {
        "status": r["status"],
        "ok": r["validation"]["ok"],
        "error": r["error"],
        "total_ms": r["total_time_ms"],
        "downtime_ms": r["downtime_ms"],
        "gb_per_s": size / (r["total_time_ms"] / 1000) / 1e9 if r["total_time_ms"] else None,
        "wire_bytes": r["ram"]["transferred_bytes"],
        "data_bytes": r["ram"].get("normal_bytes"),
        "touched_bytes": r.get("guest_populated_bytes"),
        "source_peak_rss": r.get("peak_rss_bytes"),
        "dest_peak_rss": dest.get("peak_rss_bytes"),
    }


def run(
    sizes, kinds, repeat: int, out_dir: str | None, cap: int | None, quiet: bool, command: str, prealloc: bool = False
) -> dict:
    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    say("measuring ceilings: loopback TCP, zstd on each image kind...")
    ceilings = {
        "loopback_bytes_per_s": loopback_throughput(1.0),
        "zstd": {k: zstd_throughput(b"".join(block_bytes(k, 1, i) for i in range(64))) for k in kinds},
        "crc_bytes_per_s": crc_throughput(),
        "landing_bytes_per_s": landing_throughput(preallocated=prealloc),
        "cores": len(os.sched_getaffinity(0)),
    }
    for k in kinds:
        for size in sizes:
            say(f"preparing image {k} {fmt_bytes(size)} (cached after the first time)...")
            builtin_image(f"builtin:{k}", size)
    config = replace(MigrationConfig(), prealloc=prealloc).check()
    rows = {}
    for rep in range(repeat):  # interleaved, so noise hits every case alike
        for size in sizes:
            for k in kinds:
                r = _one(k, size, config)
                rows.setdefault((k, size), []).append(r)
                say(
                    f"[{rep + 1}/{repeat}] {k} {fmt_bytes(size)}: {r['status']}, {r['total_ms']:.0f} ms, "
                    f"downtime {r['downtime_ms'] or 0:.0f} ms"
                )
    capped = {}
    if cap:
        for rep in range(repeat):
            for mode in ("auto", "none"):
                r = _one("mixed", 1 << 30, replace(config, max_bandwidth=cap, compression=mode))
                capped.setdefault(mode, []).append(r)
                say(
                    f"[{rep + 1}/{repeat}] mixed 1 GiB at {cap / 1e6:.0f} MB/s, compression {mode}: "
                    f"{r['total_ms']:.0f} ms"
                )
    summary = []
    for (k, size), rs in rows.items():
        entry = {
            "kind": k,
            "size": size,
            "runs": len(rs),
            "validated": sum(bool(r["ok"]) for r in rs),
            "total_ms": _stat([r["total_ms"] for r in rs]),
            "downtime_ms": _stat([r["downtime_ms"] for r in rs]),
            "gb_per_s": _stat([r["gb_per_s"] for r in rs]),
            "rss_over_touched": _stat(
                [
                    max(r["source_peak_rss"] or 0, r["dest_peak_rss"] or 0) / r["touched_bytes"]
                    for r in rs
                    if r["touched_bytes"]
                ]
            ),
            "qemu_ms": QEMU_MS.get((k, size)),
            "floor_ms": floor_ms(_stat([r["data_bytes"] for r in rs]), ceilings),
        }
        summary.append(entry)
    cap_summary = {m: _stat([r["total_ms"] for r in rs]) for m, rs in capped.items()}
    doc = {
        "command": command,
        "prealloc": prealloc,
        "ceilings": ceilings,
        "summary": summary,
        "capped": cap_summary,
        "capped_speedup": (cap_summary["none"]["median"] / cap_summary["auto"]["median"]) if cap_summary else None,
        "runs": {f"{k}-{s}": rs for (k, s), rs in rows.items()},
        "capped_runs": capped,
    }
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "speed.json"), "w") as f:
            json.dump(doc, f, indent=2)
        with open(os.path.join(out_dir, "speed.md"), "w") as f:
            f.write(markdown(doc))
    return doc


def floor_ms(data_bytes, ceilings: dict) -> float | None:
    """The least time the data pages can take with these settings on this
    machine, whatever the code around them: the CPU of a CRC on each side
    (the per-frame check, which is also the validation digest), storing the
    pages on the destination, and sending them over loopback, each at the
    rate measured in this run, spread over every core.  (QEMU does none of
    the CRCs.)"""
    if not data_bytes or not data_bytes["median"]:
        return None
    per_byte = (
        2 / ceilings["crc_bytes_per_s"] + 1 / ceilings["landing_bytes_per_s"] + 1 / ceilings["loopback_bytes_per_s"]
    )
    return data_bytes["median"] * per_byte / ceilings["cores"] * 1000


def markdown(doc: dict) -> str:
    c = doc["ceilings"]
    setting = (
        "destination RAM preallocated before each migration (--prealloc), as QEMU's figures were taken (-mem-prealloc)"
        if doc.get("prealloc")
        else "default settings"
    )
    lines = [
        f"Command: `{doc['command']}` ({setting})",
        "",
        f"Ceilings in the same run: loopback TCP {c['loopback_bytes_per_s'] / 1e9:.2f} GB/s; "
        + "; ".join(
            f"zstd-1 on {k} {z['bytes_per_s'] / 1e9:.2f} GB/s (ratio {z['ratio']:.2f})" for k, z in c["zstd"].items()
        ),
        "",
        f"Floor (`floor ms`): the data pages' CRC on both sides at {c['crc_bytes_per_s'] / 1e9:.2f} GB/s, "
        f"storing them at {c['landing_bytes_per_s'] / 1e9:.2f} GB/s into "
        + ("preallocated" if doc.get("prealloc") else "fresh")
        + " memory and sending them at the loopback "
        f"rate, spread over {c['cores']} cores: no migration with these settings can take less here.",
        "",
        "| image | runs ok | total ms, median (min–max) | floor ms | downtime ms | GB/s of guest RAM | QEMU plain / multifd×2 ms | peak RSS / touched RAM |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(stat, digits=0):
        if not stat:
            return "n/a"
        return f"{stat['median']:.{digits}f} ({stat['min']:.{digits}f}–{stat['max']:.{digits}f})"

    for e in doc["summary"]:
        q = e["qemu_ms"]
        qemu = f"{q['plain']} / {q['multifd2']}" if q else "–"
        floor = f"{e['floor_ms']:.0f}" if e.get("floor_ms") else "–"
        lines.append(
            f"| {e['kind']} {fmt_bytes(e['size'])} | {e['validated']}/{e['runs']} | {f(e['total_ms'])} | "
            f"{floor} | {f(e['downtime_ms'])} | {f(e['gb_per_s'], 2)} | {qemu} | {f(e['rss_over_touched'], 2)} |"
        )
    if doc["capped"]:
        a, n = doc["capped"]["auto"], doc["capped"]["none"]
        lines += [
            "",
            f"Mixed 1 GiB under the cap: compression auto {a['median']:.0f} ms "
            f"({a['min']:.0f}–{a['max']:.0f}), raw {n['median']:.0f} ms ({n['min']:.0f}–{n['max']:.0f}): "
            f"{doc['capped_speedup']:.2f}× faster with adaptive compression.",
        ]
    return "\n".join(lines) + "\n"
