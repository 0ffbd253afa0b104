"""`mte-migrate bench --postcopy`: postcopy against precopy on one scenario.

The same guest migrated five ways, interleaved (the order rotating each
repeat): precopy with auto-converge, precopy without it (the pass limit
forces the stop), and postcopy with each strategy that can place tags for a
running guest.  Medians of total time, downtime (for postcopy: the switch),
fault latency, the guest's progress (pages its vCPUs touched on either
side while the migration ran) and the wrong-tag accesses the guest saw.
The destination's RAM is on huge pages for precopy (where the host can)
and on 4 KiB pages for postcopy, which needs them: the table says which."""

import statistics
import sys
from dataclasses import replace

from migrate.config import scenario as scen
from migrate.hosting.pair import run_pair
from migrate.strategies import POSTCOPY_STRATEGIES, STRATEGIES

CASES = [("precopy, auto-converge", {"auto_converge": True}), ("precopy, no auto-converge", {"auto_converge": False})]
CASES += [(f"postcopy, {name}", {"postcopy": True, "strategy": name}) for name in POSTCOPY_STRATEGIES]


def _med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _row(r: dict) -> dict:
    pc = r.get("postcopy") or {}
    return {
        "status": r["status"],
        "total_ms": r["total_time_ms"],
        "downtime_ms": pc.get("switch_downtime_ms", r.get("downtime_ms")),
        "fault_p50_ms": (pc.get("fault_latency_ms") or {}).get("p50"),
        "fault_p99_ms": (pc.get("fault_latency_ms") or {}).get("p99"),
        "last_page_ms": pc.get("last_page_ms"),
        "guest_pages": (r.get("guest_pages_touched") or 0) + (pc.get("guest_pages_touched") or 0),
        "wrong_tags": pc.get("guest_wrong_tag_accesses", 0),
        "throttle_max": (r.get("throttle") or {}).get("max"),
        # postcopy needs 4 KiB pages; precopy gets huge ones where the host can
        "dest_ram": (r.get("destination") or {}).get("ram_backing"),
    }


def run(scenario: str, ram: int | None, repeat: int, quiet: bool) -> dict:
    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    sc = scen.load(scenario)
    guest = replace(sc.guest, ram=ram) if ram else sc.guest
    rows: dict[str, list] = {}
    for rep in range(repeat):
        turn = CASES[rep % len(CASES) :] + CASES[: rep % len(CASES)]
        for name, changes in turn:
            config = replace(sc.migration, **changes).check()
            r = _row(run_pair(guest, config, sc.name, quiet=True))
            rows.setdefault(name, []).append(r)
            say(f"[{rep + 1}/{repeat}] {name}: {r['status']}, {r['total_ms']:.0f} ms")
    summary = []
    for name, _ in CASES:
        rs = rows[name]
        summary.append(
            {
                "case": name,
                "runs": len(rs),
                "statuses": sorted({r["status"] for r in rs}),
                "dest_ram": sorted({r["dest_ram"] or "?" for r in rs}),
                **{k: _med([r[k] for r in rs]) for k in rs[0] if k not in ("status", "dest_ram")},
            }
        )
    return {"scenario": sc.name, "ram": guest.ram, "repeat": repeat, "summary": summary, "runs": rows}


def markdown(doc: dict, command: str) -> str:
    def f(v, d=0):
        return "–" if v is None else f"{v:,.{d}f}"

    lines = [
        f"Command: `{command}`; scenario {doc['scenario']}, medians of {doc['repeat']} interleaved runs.",
        "",
        "| case | status | total ms | downtime / switch ms | fault p50 ms | fault p99 ms | last page ms | guest pages touched "
        "| max throttle | wrong-tag accesses | destination RAM |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e in doc["summary"]:
        proposal = " [PROPOSAL]" if any(e["case"].endswith(n) and STRATEGIES[n].proposal for n in STRATEGIES) else ""
        lines.append(
            f"| {e['case']}{proposal} | {', '.join(e['statuses'])} | {f(e['total_ms'])} | {f(e['downtime_ms'], 1)} | "
            f"{f(e['fault_p50_ms'], 1)} | {f(e['fault_p99_ms'], 1)} | {f(e['last_page_ms'])} | {f(e['guest_pages'])} | "
            f"{f(e['throttle_max'], 2)} | {f(e['wrong_tags'])} | {', '.join(e.get('dest_ram') or ['?'])} |"
        )
    return "\n".join(lines) + "\n"
