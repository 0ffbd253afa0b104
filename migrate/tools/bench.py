"""`mte-migrate bench`: the strategy comparison matrix.

Runs every (scenario, strategy) pair ``repeat`` times with the strategies
interleaved (A B C A B C ...), so that a noisy machine hurts them alike, and
reports medians and min-max, ratios against `none` from the same run, the
machine's ceilings measured in the same run, and -- as a separate, labelled
column -- the cost model's estimate of tag CPU time on real hardware."""

import csv
import json
import os
import statistics
import sys
import time
from dataclasses import replace

from migrate.hosting.pair import run_pair
from migrate.tools import costmodel
from migrate.tools.ceilings import loopback_throughput, tag_work_per_page, zstd_throughput
from migrate.units import fmt_rate

QUICK_RAM = 64 << 20
METRICS = (
    "total_time_ms",
    "downtime_ms",
    "guest_mb_per_s",
    "wire_data_bytes",
    "wire_tag_bytes",
    "cpu_source_s",
    "cpu_dest_s",
    "est_tag_cpu_ms",
    "ram_bytes",
    "tagged_pages_sent",
)


def _row(scenario, strategy, rep, result, model) -> dict:
    ram, wire = result["ram"], result["wire"]
    # Throughput over the time until the destination confirmed all data and
    # tags: the same span for every strategy, including `none`, whose tag
    # validation is meant to fail afterwards.
    total_s = (result.get("confirm_time_ms") or 0) / 1000
    counters = result.get("counters", {})
    dest = result.get("destination") or {}
    row = {
        "scenario": scenario,
        "strategy": strategy,
        "repeat": rep,
        "status": result["status"],
        "validation_ok": result["validation"]["ok"],
        "tag_mismatches": result["validation"]["tag_mismatches"],
        "total_time_ms": result["total_time_ms"],
        "downtime_ms": result["downtime_ms"],
        "passes": len(result.get("passes", [])),
        "guest_mb_per_s": round(ram["total_bytes"] / total_s / 1e6, 1) if total_s else None,
        "wire_data_bytes": wire["data_bytes"],
        "wire_tag_bytes": wire["tag_bytes"],
        "ram_bytes": ram["total_bytes"],
        "tagged_pages_sent": result["tags"]["tagged_pages"],
        "wire_total_bytes": ram["transferred_bytes"],
        "cpu_source_s": (result.get("cpu") or {}).get("process_s"),
        "cpu_dest_s": (dest.get("cpu") or {}).get("process_s"),
        "est_tag_cpu_ms": round(
            costmodel.estimate_ms(counters, model, "source.") + costmodel.estimate_ms(counters, model, "destination."),
            3,
        ),
        "error": result["error"],
    }
    for name, value in sorted(counters.items()):
        row[f"counter:{name}"] = value
    return row


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["scenario"], r["strategy"]), []).append(r)
    out = []
    for (scenario, strategy), rs in groups.items():
        entry = {
            "scenario": scenario,
            "strategy": strategy,
            "runs": len(rs),
            "completed": sum(r["status"] == "completed" for r in rs),
            "validated": sum(bool(r["validation_ok"]) for r in rs),
        }
        for m in METRICS:
            entry[m] = _stats([r[m] for r in rs])
        counters = {}
        for r in rs:
            for k, v in r.items():
                if k.startswith("counter:"):
                    counters.setdefault(k[8:], []).append(v)
        entry["counters_median"] = {k: statistics.median(v) for k, v in sorted(counters.items())}
        out.append(entry)
    for entry in out:  # ratios against `none` of the same scenario, same run
        base = next((e for e in out if e["scenario"] == entry["scenario"] and e["strategy"] == "none"), None)
        entry["vs_none"] = None
        if base and base["total_time_ms"] and entry["total_time_ms"]:
            entry["vs_none"] = {
                "total_time": round(entry["total_time_ms"]["median"] / base["total_time_ms"]["median"], 3),
                "throughput": round(entry["guest_mb_per_s"]["median"] / base["guest_mb_per_s"]["median"], 3)
                if base["guest_mb_per_s"] and entry["guest_mb_per_s"]
                else None,
                "wire_bytes": round(
                    (entry["wire_data_bytes"]["median"] + entry["wire_tag_bytes"]["median"])
                    / max(1, base["wire_data_bytes"]["median"] + base["wire_tag_bytes"]["median"]),
                    4,
                ),
            }
    return out


def _fmt(stat, scale=1.0, digits=0):
    if not stat:
        return "n/a"
    f = f"{{:.{digits}f}}"
    return f"{f.format(stat['median'] * scale)} ({f.format(stat['min'] * scale)}–{f.format(stat['max'] * scale)})"


def markdown(summary: list[dict], ceilings: dict, command: str, bounds: dict | None = None) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        f"Ceilings measured in this run: loopback TCP {fmt_rate(ceilings['loopback_bytes_per_s'])}; "
        + "; ".join(
            f"zstd-{z['level']} on {name} data {fmt_rate(z['bytes_per_s'])} (ratio {z['ratio']:.2f})"
            for name, z in ceilings["zstd"].items()
        ),
        "",
        "Medians (min–max). `est. tag CPU` is the cost model's estimate for real hardware "
        "(migrate/tools/costmodel.toml), not a measurement.",
        "",
        "| scenario | strategy | ok | total ms | downtime ms | guest MB/s | data MiB on wire | tag KiB on wire "
        "| CPU s src / dst | vs none: time, throughput | est. tag CPU ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        vs = e["vs_none"]
        vs_text = "" if not vs else f"{vs['total_time']:.2f}×, {vs['throughput'] or 0:.2f}×"
        lines.append(
            f"| {e['scenario']} | {e['strategy']} | {e['validated']}/{e['runs']} | {_fmt(e['total_time_ms'])} | "
            f"{_fmt(e['downtime_ms'])} | {_fmt(e['guest_mb_per_s'])} | {_fmt(e['wire_data_bytes'], 1 / 2**20, 1)} | "
            f"{_fmt(e['wire_tag_bytes'], 1 / 1024, 1)} | "
            f"{_fmt(e['cpu_source_s'], 1, 2)} / {_fmt(e['cpu_dest_s'], 1, 2)} | "
            f"{vs_text} | {_fmt(e['est_tag_cpu_ms'], 1, 2)} |"
        )
    if bounds:
        lines += [
            "",
            "Why tag-ioctl trails none here: the tag work this simulation cannot avoid (four tag "
            "conversions and zstd per tagged page, timed in this run), spread over every core:",
        ]
        for name, b in bounds.items():
            work = ceilings["tag_work"][name]
            lines.append(
                f"- {name}: {b['tag_work_cpu_ms']:.0f} ms of CPU ({work['s_per_page'] * 1e6:.2f} us a "
                f"tagged page) on {b['cores']} cores adds at least {b['tag_work_cpu_ms'] / b['cores']:.0f} "
                f"ms to none's {b['none_s'] * 1e3:.0f} ms: throughput at best "
                f"{b['best_throughput_vs_none']:.2f}x none's; measured "
                f"{b['measured_throughput_vs_none'] or 0:.2f}x."
            )
    return "\n".join(lines) + "\n"


def measure_ceilings(scenarios, seconds: float = 1.0) -> dict:
    from hosts import PACKED_TAGS_PER_PAGE as PER_PAGE
    from migrate.engine.bitmaps import runs
    from migrate.hosting.process import build_host

    zs, tag_work = {}, {}
    for s in scenarios:
        guest = replace(s.guest, ram=min(s.guest.ram, 64 << 20), rate=0)
        host = build_host(guest, "none", "source")
        try:
            zs[s.name] = zstd_throughput(host.memory.data[: guest.ram])
            mem = host.memory
            tagged = b"".join(mem.tags[a * PER_PAGE : b * PER_PAGE] for a, b in runs(bytes(mem.tagged), 1))
            tag_work[s.name] = tag_work_per_page(tagged)
        finally:
            host.close()
    return {"loopback_bytes_per_s": loopback_throughput(seconds), "zstd": zs, "tag_work": tag_work}


def tag_work_bounds(summary: list[dict], ceilings: dict, cores: int) -> dict:
    """Per scenario: how far tag-ioctl could at best get to none's throughput
    in this run, given only the tag work it cannot avoid here
    (ceilings["tag_work"]) for the tagged pages it sent, spread over every
    core with nothing else slowed down (none's migration keeps the cores busy:
    a bound under that assumption, not a measurement)."""
    out = {}
    for entry in summary:
        if entry["strategy"] != "tag-ioctl":
            continue
        name = entry["scenario"]
        base = next((e for e in summary if e["scenario"] == name and e["strategy"] == "none"), None)
        work = (ceilings.get("tag_work") or {}).get(name)
        sent, ram = entry["tagged_pages_sent"], entry["ram_bytes"]
        if not (base and work and base["guest_mb_per_s"] and sent and sent["median"] and ram):
            continue
        none_s = ram["median"] / 1e6 / base["guest_mb_per_s"]["median"]
        cpu_s = sent["median"] * work["s_per_page"]
        out[name] = {
            "tag_work_cpu_ms": round(cpu_s * 1e3, 1),
            "cores": cores,
            "none_s": round(none_s, 3),
            "best_throughput_vs_none": round(none_s / (none_s + cpu_s / cores), 3),
            "measured_throughput_vs_none": (entry["vs_none"] or {}).get("throughput"),
        }
    return out


def plot(summary: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scenarios = list(dict.fromkeys(e["scenario"] for e in summary))
    strategies = list(dict.fromkeys(e["strategy"] for e in summary))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(strategies))
    for i, strat in enumerate(strategies):
        xs = [j + i * width for j in range(len(scenarios))]
        for ax, metric, label in (
            (axes[0], "total_time_ms", "total time (ms)"),
            (axes[1], "downtime_ms", "downtime (ms)"),
        ):
            vals = []
            for sc in scenarios:
                e = next((e for e in summary if e["scenario"] == sc and e["strategy"] == strat), None)
                vals.append(e[metric]["median"] if e and e[metric] else 0)
            ax.bar(xs, vals, width, label=strat)
            ax.set_ylabel(label)
    for ax in axes:
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(scenarios))])
        ax.set_xticklabels(scenarios, rotation=20)
        ax.legend()
    fig.suptitle("mte-migrate: strategies compared (medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def run_bench(
    scenarios, strategies, repeat: int, out_dir: str, quick: bool, model_path, command: str, quiet: bool = False
) -> int:
    model = costmodel.load(model_path)
    os.makedirs(out_dir, exist_ok=True)
    say = (lambda *a: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say("measuring ceilings (loopback TCP, zstd on each scenario's data)...")
    ceilings = measure_ceilings(scenarios, 0.5 if quick else 1.0)
    rows = []
    total = repeat * len(scenarios) * len(strategies)
    n = 0
    t0 = time.monotonic()
    for rep in range(repeat):
        for s in scenarios:
            for strat in strategies:  # interleaved: A B C A B C ...
                n += 1
                config = replace(s.migration, strategy=strat)
                guest = s.guest
                say(
                    f"[{n}/{total}] {s.name} / {strat} (repeat {rep + 1}/{repeat}, {time.monotonic() - t0:.0f} s elapsed)"
                )
                result = run_pair(guest, config, s.name, quiet=True)
                row = _row(s.name, strat, rep, result, model)
                rows.append(row)
                say(
                    f"    {row['status']}, validation {'ok' if row['validation_ok'] else 'FAILED'}, "
                    f"{row['total_time_ms']:.0f} ms, downtime {row['downtime_ms'] or 0:.0f} ms"
                )
    summary = summarise(rows)
    bounds = tag_work_bounds(summary, ceilings, len(os.sched_getaffinity(0)))
    doc = {
        "command": command,
        "ceilings": ceilings,
        "cost_model": model,
        "summary": summary,
        "tag_work_bounds": bounds,
        "runs": rows,
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(doc, f, indent=2)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    md = markdown(summary, ceilings, command, bounds)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    if plot(summary, os.path.join(out_dir, "results.png")):
        say(f"chart: {os.path.join(out_dir, 'results.png')}")
    else:
        say("no chart: install the plot extra for one (pip install -e '.[plot]')")
    if not quiet:
        print(md)
    say(f"wrote {out_dir}/results.json, results.csv, results.md")
    # Non-zero only when a strategy that should keep tags lost some, or a run failed.
    bad = [r for r in rows if r["strategy"] != "none" and not (r["status"] == "completed" and r["validation_ok"])]
    return 1 if bad else 0
