"""`mte-migrate bench`: the strategy comparison matrix.

Runs every (scenario, strategy) pair ``repeat`` times.  Within each repeat
the strategies run in an order taken from a Latin square (a Williams design:
over as many repeats as there are strategies, each strategy runs once in
every position and follows every other strategy once), so that neither a
slow stretch of the machine nor warming up favours one strategy; each run
records its position.

Every strategy is timed over the same span: from the start to the
destination's CONFIRM, when all data and tags have crossed and been
digested on both sides (``confirm_time_ms``).  What follows -- the digest
comparison and switchover, or for `none` the page-by-page inspection after
its validation fails -- is reported apart and never compared.  Ratios
against `none` are taken per repeat, each strategy against `none`'s run in
the same repeat, and summarised as median and min-max over the repeats.

The machine's ceilings are measured in the same run, and the cost model's
estimate for real hardware is a separate, labelled column."""

import csv
import json
import os
import statistics
import sys
import time
from dataclasses import replace

from migrate.hosting.pair import run_pair
from migrate.strategies import STRATEGIES
from migrate.tools import costmodel
from migrate.tools.ceilings import loopback_throughput, tag_work_per_page, zstd_throughput
from migrate.units import fmt_rate

QUICK_RAM = 64 << 20
BASELINE = "none"
#: the span every strategy is compared on (see the module docstring)
COMPARED = "confirm_time_ms"
#: strategies whose tags go through KVM_ARM_MTE_COPY_TAGS, the path
#: ceilings.tag_work_per_page times
TAG_WORK_STRATEGIES = ("tag-ioctl", "tag-dirty-log")
METRICS = (
    "confirm_time_ms",
    "after_confirm_ms",
    "total_time_ms",
    "downtime_ms",
    "guest_mb_per_s",
    "wire_data_bytes",
    "wire_tag_bytes",
    "cpu_source_s",
    "cpu_dest_s",
    "est_tag_cpu_ms",
    "est_trap_ms",
    "est_cpu_ms",
    "ram_bytes",
    "tagged_pages_sent",
)
#: per-repeat ratios against `none`: name -> (row metric, what it compares)
RATIOS = {
    "time": (COMPARED, "time to CONFIRM"),
    "throughput": ("guest_mb_per_s", "guest RAM over the time to CONFIRM"),
    "wire_bytes": ("wire_payload_bytes", "data and tag bytes on the wire"),
}


def is_proposal(strategy: str) -> bool:
    cls = STRATEGIES.get(strategy)
    return bool(getattr(cls, "proposal", False))


def label(strategy: str) -> str:
    """The strategy's name as tables and charts show it: a proposal says so."""
    return f"{strategy} [PROPOSAL]" if is_proposal(strategy) else strategy


# -- order ---------------------------------------------------------------------------
def _williams_row(n: int, row: int) -> list[int]:
    """Row ``row`` of a Williams design for n treatments: 0, 1, n-1, 2, n-2, ...
    shifted by the row number.  For odd n the design has 2n rows, the second
    n the mirror images of the first; every block of n rows starting at 0
    (or n) is a Latin square."""
    base, lo, hi = [0], 1, n - 1
    while len(base) < n:
        base.append(lo if len(base) % 2 else hi)
        if len(base) % 2:
            hi -= 1
        else:
            lo += 1
    period = n if n % 2 == 0 else 2 * n
    r = row % period
    if r < n:
        return [(b + r) % n for b in base]
    return [(b + r - n) % n for b in base][::-1]


def run_order(strategies, repeat_index: int) -> list[str]:
    """The order the strategies run in within repeat ``repeat_index``."""
    strategies = list(strategies)
    if len(strategies) < 2:
        return strategies
    return [strategies[i] for i in _williams_row(len(strategies), repeat_index)]


# -- one run -------------------------------------------------------------------------
def _row(scenario, strategy, rep, position, result, model) -> dict:
    ram, wire = result["ram"], result["wire"]
    confirm_ms = result.get("confirm_time_ms")
    total_ms = result["total_time_ms"]
    confirm_s = (confirm_ms or 0) / 1000
    counters = result.get("counters", {})
    dest = result.get("destination") or {}
    src_cpu, dst_cpu = result.get("cpu") or {}, dest.get("cpu") or {}

    def est(traps):
        return round(
            costmodel.estimate_ms(counters, model, "source.", traps)
            + costmodel.estimate_ms(counters, model, "destination.", traps),
            3,
        )

    row = {
        "scenario": scenario,
        "strategy": strategy,
        "proposal": is_proposal(strategy),
        "repeat": rep,
        "position": position,  # 1 = ran first in its repeat
        "status": result["status"],
        "validation_ok": result["validation"]["ok"],
        "tag_mismatches": result["validation"]["tag_mismatches"],
        # The compared span: start to the destination's CONFIRM.
        "confirm_time_ms": confirm_ms,
        # Not compared: validation and switchover, or for `none` the
        # page-by-page inspection after its validation fails, and teardown.
        "after_confirm_ms": round(total_ms - confirm_ms, 3) if confirm_ms is not None else None,
        "total_time_ms": total_ms,
        "downtime_ms": result["downtime_ms"],
        "passes": len(result.get("passes", [])),
        "guest_mb_per_s": round(ram["total_bytes"] / confirm_s / 1e6, 1) if confirm_s else None,
        "wire_data_bytes": wire["data_bytes"],
        "wire_tag_bytes": wire["tag_bytes"],
        "wire_payload_bytes": wire["data_bytes"] + wire["tag_bytes"],
        "ram_bytes": ram["total_bytes"],
        "tagged_pages_sent": result["tags"]["tagged_pages"],
        "wire_total_bytes": ram["transferred_bytes"],
        # CPU of each host process over its whole migration (all threads,
        # the guest's vCPUs on the source included), past CONFIRM too.
        "cpu_source_s": src_cpu.get("process_s"),
        "cpu_dest_s": dst_cpu.get("process_s"),
        "cpu_source_migration_thread_s": src_cpu.get("migration_thread_s"),
        "cpu_dest_migration_thread_s": dst_cpu.get("migration_thread_s"),
        "est_tag_cpu_ms": est(False),
        "est_trap_ms": est(True),
        "est_cpu_ms": est(None),
        "error": result["error"],
    }
    for name, value in sorted(counters.items()):
        row[f"counter:{name}"] = value
    return row


# -- summary -------------------------------------------------------------------------
def _stats(values, digits=None):
    values = [v for v in values if v is not None]
    if not values:
        return None
    out = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    if digits is not None:
        out = {k: round(v, digits) for k, v in out.items()}
    return out


def paired_ratios(rows: list[dict], metric: str) -> dict[tuple, list[float]]:
    """(scenario, strategy) -> [metric / none's metric, one per repeat in
    which both ran and have the metric], each pair from the same repeat."""
    base = {(r["scenario"], r["repeat"]): r for r in rows if r["strategy"] == BASELINE}
    out: dict[tuple, list[float]] = {}
    for r in rows:
        b = base.get((r["scenario"], r["repeat"]))
        if b is None or r[metric] is None or not b[metric]:
            continue
        out.setdefault((r["scenario"], r["strategy"]), []).append(r[metric] / b[metric])
    return out


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["scenario"], r["strategy"]), []).append(r)
    ratios = {name: paired_ratios(rows, metric) for name, (metric, _) in RATIOS.items()}
    out = []
    for (scenario, strategy), rs in groups.items():
        entry = {
            "scenario": scenario,
            "strategy": strategy,
            "proposal": is_proposal(strategy),
            "runs": len(rs),
            "completed": sum(r["status"] == "completed" for r in rs),
            "validated": sum(bool(r["validation_ok"]) for r in rs),
            "positions": sorted({r["position"] for r in rs if r.get("position") is not None}),
        }
        for m in METRICS:
            entry[m] = _stats([r.get(m) for r in rs])
        counters = {}
        for r in rs:
            for k, v in r.items():
                if k.startswith("counter:"):
                    counters.setdefault(k[8:], []).append(v)
        entry["counters_median"] = {k: statistics.median(v) for k, v in sorted(counters.items())}
        pairs = {name: ratios[name].get((scenario, strategy), []) for name in RATIOS}
        entry["vs_none"] = (
            None
            if strategy == BASELINE or not pairs["time"]
            else {"pairs": len(pairs["time"]), **{name: _stats(v, 3) for name, v in pairs.items()}}
        )
        out.append(entry)
    return out


def _trails(entry) -> bool:
    """Whether the strategy trails `none` by the measured ratio: the median
    of its paired per-repeat throughput ratios is below 1."""
    thr = (entry.get("vs_none") or {}).get("throughput")
    return bool(thr) and thr["median"] < 1


# -- the report ----------------------------------------------------------------------
def _fmt(stat, scale=1.0, digits=0):
    if not stat:
        return "n/a"
    f = f"{{:.{digits}f}}"
    return f"{f.format(stat['median'] * scale)} ({f.format(stat['min'] * scale)}–{f.format(stat['max'] * scale)})"


def _ratio(stat) -> str:
    if not stat:
        return "n/a"
    crosses = stat["min"] < 1 < stat["max"]  # faster in one repeat, slower in another
    return f"{stat['median']:.2f}× ({stat['min']:.2f}–{stat['max']:.2f})" + (" ~" if crosses else "")


def markdown(summary: list[dict], ceilings: dict, command: str, bounds: dict | None = None) -> str:
    proposals = sorted({e["strategy"] for e in summary if e["proposal"]})
    lines = [
        f"Command: `{command}`",
        "",
        f"Ceilings measured in this run: loopback TCP {fmt_rate(ceilings['loopback_bytes_per_s'])}; "
        + "; ".join(
            f"zstd-{z['level']} on {name} data {fmt_rate(z['bytes_per_s'])} (ratio {z['ratio']:.2f})"
            for name, z in ceilings["zstd"].items()
        ),
        "",
        "Medians (min–max) over the repeats. Within each repeat the strategies ran in the order of a "
        "Latin square (`positions`: where each ran, 1 = first). Every strategy is timed from the start "
        "to the destination's CONFIRM of the digests of all data and tags: the compared span. "
        "`after CONFIRM` is not compared: for `none` (data only) it is the page-by-page inspection "
        "that follows its failed validation, for the others the digest comparison and switchover. "
        "`vs none` divides each run by `none`'s run in the same repeat, then takes the median "
        "(min–max) of those ratios; `~` marks ratios on both sides of 1 across the repeats: no "
        "difference from `none` is established there. CPU is each host process's whole migration, the guest's vCPUs "
        "on the source included, past CONFIRM too. `est.` is the cost model's estimate for real "
        "hardware (migrate/tools/costmodel.toml), not a measurement: tag work + stage-2 traps.",
    ]
    if proposals:
        lines += [
            "",
            f"[PROPOSAL]: {', '.join(proposals)} needs a kernel interface that does not exist, and a "
            "stage-2 permission that lets tag stores through (or reports them apart) while data stores "
            "stay trapped, which FEAT_MTE_PERM's NoTagAccess does not give on a write-protected page by "
            "our reading of the Arm ARM (docs/PROPOSALS.md). Its figures are what the simulation gives "
            "if both existed.",
        ]
    lines += [
        "",
        "| scenario | strategy | positions | validated | time to CONFIRM ms (compared) | vs none: time, "
        "paired | vs none: throughput, paired | guest MB/s | after CONFIRM ms (not compared) "
        "| downtime ms | CPU s src / dst | tag KiB on wire | data MiB on wire | est. ms: tag work + traps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        vs = e["vs_none"] or {}
        base = e["strategy"] == BASELINE
        validated = f"{e['validated']}/{e['runs']}" + (" (data only)" if base else "")
        lines.append(
            f"| {e['scenario']} | {label(e['strategy'])} | {','.join(map(str, e['positions']))} | {validated} | "
            f"{_fmt(e['confirm_time_ms'])} | {'baseline' if base else _ratio(vs.get('time'))} | "
            f"{'baseline' if base else _ratio(vs.get('throughput'))} | {_fmt(e['guest_mb_per_s'])} | "
            f"{_fmt(e['after_confirm_ms'])} | {_fmt(e['downtime_ms'])} | "
            f"{_fmt(e['cpu_source_s'], 1, 2)} / {_fmt(e['cpu_dest_s'], 1, 2)} | "
            f"{_fmt(e['wire_tag_bytes'], 1 / 1024, 1)} | {_fmt(e['wire_data_bytes'], 1 / 2**20, 1)} | "
            f"{_fmt(e['est_tag_cpu_ms'], 1, 2)} + {_fmt(e['est_trap_ms'], 1, 2)} |"
        )
    lines += trails_lines(summary, ceilings, bounds or {})
    return "\n".join(lines) + "\n"


def trails_lines(summary: list[dict], ceilings: dict, bounds: dict) -> list[str]:
    """A "why X trails none" line for each strategy that trails `none` by
    its measured (paired, median) throughput ratio, and for no other."""
    out = []
    for e in summary:
        if e["strategy"] == BASELINE or not _trails(e):
            continue
        thr = e["vs_none"]["throughput"]
        text = (
            f"- Why {label(e['strategy'])} trails none on {e['scenario']}: its throughput is "
            f"{thr['median']:.2f}x none's ({thr['min']:.2f}–{thr['max']:.2f}, {e['vs_none']['pairs']} paired "
            "repeats)"
        )
        if thr["max"] >= 1:
            text += "; in some repeat it did not trail, so the gap is not established"
        b = bounds.get(e["scenario"], {}).get(e["strategy"])
        if b:
            work = ceilings["tag_work"][e["scenario"]]
            text += (
                f". The tag work this simulation cannot avoid (four tag conversions and zstd per tagged "
                f"page, timed in this run), spread over every core: {b['tag_work_cpu_ms']:.0f} ms of CPU "
                f"({work['s_per_page'] * 1e6:.2f} us a tagged page) on {b['cores']} cores adds at least "
                f"{b['tag_work_cpu_ms'] / b['cores']:.0f} ms to none's {b['none_s'] * 1e3:.0f} ms: "
                f"throughput at best {b['best_throughput_vs_none']:.2f}x none's; measured "
                f"{b['measured_throughput_vs_none']:.2f}x."
            )
        else:
            text += ". No bound is computed for it here (the tag-work bound covers the KVM_ARM_MTE_COPY_TAGS path)."
        out.append(text)
    if out:
        out = ["", "Where a strategy trails none (median of paired per-repeat throughput ratios below 1):", *out]
    return out


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
    """{scenario: {strategy: bound}} for the strategies whose tags go through
    KVM_ARM_MTE_COPY_TAGS: how far each could at best get to none's
    throughput in this run, given only the tag work it cannot avoid here
    (ceilings["tag_work"]) for the tagged pages it sent, spread over every
    core with nothing else slowed down (none's migration keeps the cores busy:
    a bound under that assumption, not a measurement).  none's time is its
    median time to CONFIRM, the compared span."""
    out: dict[str, dict] = {}
    for entry in summary:
        if entry["strategy"] not in TAG_WORK_STRATEGIES:
            continue
        name = entry["scenario"]
        base = next((e for e in summary if e["scenario"] == name and e["strategy"] == BASELINE), None)
        work = (ceilings.get("tag_work") or {}).get(name)
        sent = entry["tagged_pages_sent"]
        measured = ((entry.get("vs_none") or {}).get("throughput") or {}).get("median")
        if not (base and work and base[COMPARED] and sent and sent["median"] and measured is not None):
            continue
        none_s = base[COMPARED]["median"] / 1e3
        cpu_s = sent["median"] * work["s_per_page"]
        out.setdefault(name, {})[entry["strategy"]] = {
            "tag_work_cpu_ms": round(cpu_s * 1e3, 1),
            "cores": cores,
            "none_s": round(none_s, 3),
            "best_throughput_vs_none": round(none_s / (none_s + cpu_s / cores), 3),
            "measured_throughput_vs_none": measured,
        }
    return out


# -- the chart -----------------------------------------------------------------------
def chart_panels(summary: list[dict]) -> list[dict]:
    """What the chart shows, without matplotlib: one panel per question,
    each a list of bars (scenario, series label, median and the min-max
    whisker).  The cost model's estimate is a panel of its own, marked."""
    if not summary:
        return []

    def bars(parts):
        out = []
        for e in summary:
            for suffix, metric, scale in parts:
                st = e[metric]
                if not st:
                    continue
                out.append(
                    {
                        "scenario": e["scenario"],
                        "strategy": e["strategy"],
                        "series": label(e["strategy"]) + suffix,
                        "proposal": e["proposal"],
                        "median": st["median"] * scale,
                        "low": st["min"] * scale,
                        "high": st["max"] * scale,
                    }
                )
        return out

    return [
        {
            "title": "guest RAM throughput, start to CONFIRM (measured)",
            "ylabel": "MB/s",
            "estimate": False,
            "bars": bars([("", "guest_mb_per_s", 1.0)]),
        },
        {
            "title": "CPU per host process, whole migration (measured)",
            "ylabel": "CPU s",
            "estimate": False,
            "bars": bars([(" src", "cpu_source_s", 1.0), (" dst", "cpu_dest_s", 1.0)]),
        },
        {
            "title": "tag bytes on the wire (measured)",
            "ylabel": "KiB",
            "estimate": False,
            "bars": bars([("", "wire_tag_bytes", 1 / 1024)]),
        },
        {
            "title": "ESTIMATE, not measured: cost model for real hardware",
            "ylabel": "est. CPU ms",
            "estimate": True,
            "bars": bars([(" tag work", "est_tag_cpu_ms", 1.0), (" traps", "est_trap_ms", 1.0)]),
        },
    ]


def plot(summary: list[dict], path: str) -> bool:
    """Draw chart_panels() to ``path``; False when matplotlib (the `plot`
    extra) is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = chart_panels(summary)
    if not panels:
        return False
    scenarios = list(dict.fromkeys(e["scenario"] for e in summary))
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    for ax, panel in zip(axes.flat, panels):
        series = list(dict.fromkeys(b["series"] for b in panel["bars"]))
        width = 0.8 / max(1, len(series))
        colours = {s: f"C{i}" for i, s in enumerate(series)}
        for i, name in enumerate(series):
            mine = [b for b in panel["bars"] if b["series"] == name]
            xs = [scenarios.index(b["scenario"]) + i * width for b in mine]
            meds = [b["median"] for b in mine]
            err = [[b["median"] - b["low"] for b in mine], [b["high"] - b["median"] for b in mine]]
            ax.bar(
                xs,
                meds,
                width,
                yerr=err,
                capsize=3,
                label=name,
                color=colours[name],
                hatch="//" if mine and mine[0]["proposal"] else None,
                edgecolor="black" if mine and mine[0]["proposal"] else None,
            )
        ax.set_title(panel["title"], fontsize=10, color="darkred" if panel["estimate"] else "black")
        ax.set_ylabel(panel["ylabel"])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(scenarios))])
        ax.set_xticklabels(scenarios, rotation=15)
        ax.legend(fontsize=7)
        if panel["estimate"]:
            ax.set_facecolor("#f3f3f3")
    fig.suptitle(
        "mte-migrate bench: medians, whiskers min–max over repeats; hatched = PROPOSAL "
        "(needs kernel and architecture support not confirmed, docs/PROPOSALS.md)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- the run -------------------------------------------------------------------------
def _csv_value(v):
    return ("true" if v else "false") if isinstance(v, bool) else v


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
        order = run_order(strategies, rep)  # a Latin square over the repeats
        for s in scenarios:
            for position, strat in enumerate(order, 1):
                n += 1
                # Never the 'tracked' digest: it trusts the dirty tracking a
                # strategy comparison must check.
                validate = "digest" if s.migration.validate == "tracked" else s.migration.validate
                config = replace(s.migration, strategy=strat, validate=validate)
                say(
                    f"[{n}/{total}] {s.name} / {strat} (repeat {rep + 1}/{repeat}, position {position}, "
                    f"{time.monotonic() - t0:.0f} s elapsed)"
                )
                result = run_pair(s.guest, config, s.name, quiet=True)
                row = _row(s.name, strat, rep, position, result, model)
                rows.append(row)
                reached = (
                    "no CONFIRM"
                    if row["confirm_time_ms"] is None
                    else f"{row['confirm_time_ms']:.0f} ms to CONFIRM (+{row['after_confirm_ms']:.0f} ms after)"
                )
                say(
                    f"    {row['status']}, validation {'ok' if row['validation_ok'] else 'FAILED'}, {reached}, "
                    f"downtime {row['downtime_ms'] or 0:.0f} ms" + (f": {row['error']}" if row["error"] else "")
                )
    summary = summarise(rows)
    bounds = tag_work_bounds(summary, ceilings, len(os.sched_getaffinity(0)))
    doc = {
        "command": command,
        "method": {
            "order": "Williams Latin square over the strategies, one row per repeat; runs[].position is 1-based",
            "compared_span": COMPARED,
            "not_compared": "after_confirm_ms = total_time_ms - confirm_time_ms (none: inspection after its failed validation)",
            "ratios": "per repeat against none's run in the same repeat; median, min and max over the repeats",
            "trails": "a strategy trails none where the median of its paired throughput ratios is below 1",
        },
        "proposals": sorted({r["strategy"] for r in rows if r["proposal"]}),
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
        w.writerows({k: _csv_value(v) for k, v in r.items()} for r in rows)
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
    bad = [r for r in rows if r["strategy"] != BASELINE and not (r["status"] == "completed" and r["validation_ok"])]
    return 1 if bad else 0
