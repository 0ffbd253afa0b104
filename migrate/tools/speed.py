"""`mte-migrate speed`: the same kinds of RAM image QEMU was measured with
(zero, random, mixed), migrated with default settings; medians and min-max of
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
from migrate.hosting.images import data_bytes as image_data_bytes
from migrate.hosting.pair import run_pair
from migrate.tools.ceilings import crc_throughput, landing_times, loopback_throughput, zstd_throughput
from migrate.tools.qemu_peer import IMAGE_OFFSET, find_qemu, migrate_once
from migrate.units import fmt_bytes

# Dated figures from another run, not measured by `speed`: QEMU 10.0.2 on
# these machines, recorded by 2026-11-28 in another run, destination started
# with -mem-prealloc, medians of 5, in ms.  `speed --vs-qemu` measures QEMU
# side by side instead.
QEMU_RECORDED = "QEMU 10.0.2, recorded 2026-11-28 in another run"
QEMU_MS = {
    ("zero", 1 << 30): {"plain": 59, "multifd2": 102},
    ("random", 1 << 30): {"plain": 489, "multifd2": 289},
    ("mixed", 1 << 30): {"plain": 364, "multifd2": 316},
    ("zero", 4 << 30): {"plain": 199, "multifd2": 322},
    ("mixed", 4 << 30): {"plain": 1905, "multifd2": 1275},
}


#: bytes of the landing ceiling's sample
LANDING_SAMPLE = 256 << 20


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
        # the image's non-zero pages: what a migration must move at the least
        # (normal_bytes also counts zero pages sent inside whole chunks)
        "data_bytes": image_data_bytes(kind, size),
        "touched_bytes": r.get("guest_populated_bytes"),
        "source_peak_rss": r.get("peak_rss_bytes"),
        "dest_peak_rss": dest.get("peak_rss_bytes"),
        "cpu_src": (r.get("cpu") or {}).get("process_s"),
        "cpu_dst": (dest.get("cpu") or {}).get("process_s"),
        "protection": r["wire"].get("protection"),
        "dest_ram_backing": dest.get("ram_backing"),
    }


def run(
    sizes, kinds, repeat: int, out_dir: str | None, cap: int | None, quiet: bool, command: str, prealloc: bool = False
) -> dict:
    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    say("measuring ceilings: loopback TCP, zstd on each image kind...")
    landing = landing_times(preallocated=prealloc, size=LANDING_SAMPLE)
    ceilings = {
        "loopback_bytes_per_s": loopback_throughput(1.0),
        "zstd": {k: zstd_throughput(b"".join(block_bytes(k, 1, i) for i in range(64))) for k in kinds},
        "crc_bytes_per_s": crc_throughput(),
        "landing_bytes_per_s": LANDING_SAMPLE / min(landing),
        # the first store, where the hypervisor may have taken the memory back
        "landing_first_bytes_per_s": LANDING_SAMPLE / landing[0],
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
    _write(doc, out_dir)
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


def _first_store_note(c: dict, prealloc: bool) -> str:
    """The first store into fresh memory, when it was much slower than the
    best: memory the hypervisor had taken back, as each migration's
    destination may meet it too."""
    first = c.get("landing_first_bytes_per_s")
    if prealloc or not first or first * 2 > c["landing_bytes_per_s"]:
        return ""
    return (
        f" The first of those stores ran at {first / 1e9:.2f} GB/s: fresh memory the hypervisor had to back "
        "again, as a destination's RAM may be (see BENCHMARKING, fresh memory)."
    )


def markdown(doc: dict) -> str:
    if doc.get("vs_qemu"):
        return vs_qemu_markdown(doc)
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
        f"rate, spread over {c['cores']} cores: no migration with these settings can take less here."
        + _first_store_note(c, doc.get("prealloc")),
        "",
        "| image | runs ok | total ms, median (min–max) | floor ms | downtime ms | GB/s of guest RAM | dated QEMU plain / multifd×2 ms | peak RSS / touched RAM |",
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
    lines += [
        "",
        f"Dated QEMU figures: {QEMU_RECORDED} (-mem-prealloc, medians of 5), not measured here; "
        "`mte-migrate speed --vs-qemu` runs QEMU side by side.",
    ]
    if doc["capped"]:
        a, n = doc["capped"]["auto"], doc["capped"]["none"]
        lines += [
            "",
            f"Mixed 1 GiB under the cap: compression auto {a['median']:.0f} ms "
            f"({a['min']:.0f}–{a['max']:.0f}), raw {n['median']:.0f} ms ({n['min']:.0f}–{n['max']:.0f}): "
            f"{doc['capped_speedup']:.2f}× faster with adaptive compression.",
        ]
    return "\n".join(lines) + "\n"


# --- side by side with QEMU (`speed --vs-qemu`) -------------------------------


def run_vs_qemu(
    sizes,
    kinds,
    repeat: int,
    out_dir: str | None,
    quiet: bool,
    command: str,
    prealloc: bool = False,
    binary: str | None = None,
) -> dict:
    """QEMU and mte-migrate on the same image files, in interleaved pairs:
    for every repeat, size and kind one QEMU migration and one of ours, the
    order alternating from one repeat to the next.  Defaults against
    defaults, or with ``prealloc`` QEMU's -mem-prealloc against --prealloc."""
    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    path, version_line = find_qemu(binary)  # before anything else: say early that QEMU is missing
    images = {}
    for k in kinds:
        for size in sizes:
            say(f"preparing image {k} {fmt_bytes(size)} (cached after the first time)...")
            images[(k, size)] = builtin_image(f"builtin:{k}", size)
    config = replace(MigrationConfig(), prealloc=prealloc).check()
    pairs = {}
    for rep in range(repeat):
        order = ("qemu", "ours") if rep % 2 == 0 else ("ours", "qemu")
        for size in sizes:
            for k in kinds:
                pair = {"repeat": rep + 1, "first": order[0]}
                for who in order:
                    pair[who] = (
                        migrate_once(images[(k, size)], prealloc, path) if who == "qemu" else _one(k, size, config)
                    )
                pairs.setdefault((k, size), []).append(pair)
                q, o = pair["qemu"], pair["ours"]
                say(
                    f"[{rep + 1}/{repeat}] {k} {fmt_bytes(size)}: QEMU {q['status']} {q['total_ms']} ms, "
                    f"mte-migrate {o['status']} {o['total_ms']:.0f} ms"
                )
    doc = {
        "vs_qemu": True,
        "command": command,
        "prealloc": prealloc,
        "qemu": {"binary": path, "version": version_line},
        "host_thp": thp_settings(),
        "image_offset_in_qemu": IMAGE_OFFSET,
        "summary": [vs_qemu_entry(k, size, ps) for (k, size), ps in pairs.items()],
        "runs": {f"{k}-{size}": ps for (k, size), ps in pairs.items()},
    }
    _write(doc, out_dir)
    return doc


def thp_settings(root: str = "/sys/kernel/mm/transparent_hugepage") -> dict:
    """The host's transparent huge page modes (the bracketed choice of each
    file), None where unreadable: ``anonymous`` covers QEMU's guest RAM
    (anonymous memory it madvises for huge pages), ``shmem`` our memfd."""
    out = {}
    for key, name in (("anonymous", "enabled"), ("shmem", "shmem_enabled")):
        try:
            with open(os.path.join(root, name)) as f:
                text = f.read()
        except OSError:
            out[key] = None
            continue
        chosen = [w[1:-1] for w in text.split() if w.startswith("[") and w.endswith("]")]
        out[key] = chosen[0] if chosen else None
    return out


def _thp_line(thp: dict | None, backings=()) -> str | None:
    """The host's huge-page modes, and whether both destinations had huge
    pages (``backings``: our destination's ``ram_backing`` in each run)."""
    if not thp:
        return None
    anon, shmem = thp.get("anonymous"), thp.get("shmem")
    ours = sorted({b for b in backings if b})
    line = (
        f"Huge pages on this host: anonymous memory `{anon}` (QEMU's guest RAM, which it madvises for huge "
        f"pages), shmem `{shmem}` (memfds); mte-migrate's destination RAM: {', '.join(ours) or 'not reported'} "
        f"(`huge`: a tmpfs of its own with huge pages, see `--huge-pages`)"
    )
    if anon in ("always", "madvise") and "4k" in ours:
        line += (
            ": QEMU's RAM is backed by transparent huge pages and, in some runs, ours was not, so our "
            "destination allocated its RAM a 4 KiB page at a time (see docs/BENCHMARKING.md)"
        )
    return line + "."


def _dest_backings(doc: dict) -> list:
    return [pair["ours"].get("dest_ram_backing") for pairs in doc.get("runs", {}).values() for pair in pairs]


def _cpu(r: dict) -> float | None:
    return r["cpu_src"] + r["cpu_dst"] if r.get("cpu_src") is not None and r.get("cpu_dst") is not None else None


def vs_qemu_entry(kind: str, size: int, pairs: list[dict]) -> dict:
    """Medians and min-max of each side over its good runs (QEMU completed,
    ours completed and validated), and the ratios ours / QEMU taken per pair
    (both good), never as a ratio of medians."""
    q_ok = [p["qemu"]["status"] == "completed" for p in pairs]
    o_ok = [p["ours"]["status"] == "completed" and bool(p["ours"]["ok"]) for p in pairs]
    good_q = [p["qemu"] for p, ok in zip(pairs, q_ok) if ok]
    good_o = [p["ours"] for p, ok in zip(pairs, o_ok) if ok]
    both = [p for p, a, b in zip(pairs, q_ok, o_ok) if a and b]

    def ratio(key):
        return _stat(
            [
                key(p["ours"]) / key(p["qemu"])
                for p in both
                if key(p["ours"]) is not None and key(p["qemu"]) not in (None, 0)
            ]
        )

    def cpu(rs):
        return {
            "src": _stat([r.get("cpu_src") for r in rs]),
            "dst": _stat([r.get("cpu_dst") for r in rs]),
            "sum": _stat([_cpu(r) for r in rs]),
        }

    return {
        "kind": kind,
        "size": size,
        "runs": len(pairs),
        "qemu_completed": sum(q_ok),
        "ours_validated": sum(o_ok),
        "qemu_ms": _stat([r["total_ms"] for r in good_q]),
        "ours_ms": _stat([r["total_ms"] for r in good_o]),
        "ratio": ratio(lambda r: r["total_ms"]),
        "qemu_downtime_ms": _stat([r["downtime_ms"] for r in good_q]),
        "ours_downtime_ms": _stat([r["downtime_ms"] for r in good_o]),
        "qemu_cpu_s": cpu(good_q),
        "ours_cpu_s": cpu(good_o),
        "cpu_ratio": ratio(_cpu),
        "qemu_ram_total": _stat([r.get("ram_total") for r in good_q]),
        "qemu_transferred": _stat([r.get("transferred") for r in good_q]),
        "ours_wire_bytes": _stat([r.get("wire_bytes") for r in good_o]),
    }


def _fmt(stat, digits=0) -> str:
    if not stat:
        return "n/a"
    return f"{stat['median']:.{digits}f} ({stat['min']:.{digits}f}–{stat['max']:.{digits}f})"


def _fmt_cpu(c: dict) -> str:
    if not c["sum"]:
        return "n/a"
    return f"{c['src']['median']:.2f} + {c['dst']['median']:.2f} = {_fmt(c['sum'], 2)}"


def vs_qemu_markdown(doc: dict) -> str:
    setting = (
        "prealloc against prealloc: QEMU's destination with -mem-prealloc, mte-migrate with --prealloc"
        if doc["prealloc"]
        else "defaults against defaults"
    )
    runs = max((e["runs"] for e in doc["summary"]), default=0)
    lines = [
        f"Command: `{doc['command']}` ({setting})",
        "",
        f"QEMU: {doc['qemu']['version']} (`{doc['qemu']['binary']}`), `-M virt,mte=on -cpu max -accel tcg -S`, "
        "max-bandwidth 100 GiB/s; its own total-time and downtime.",
        "",
        *((line, "") if (line := _thp_line(doc.get("host_thp"), _dest_backings(doc))) else ()),
        "Both migrate the same image file: mte-migrate's guest RAM is the image, QEMU's is the image plus "
        f"{doc['image_offset_in_qemu'] >> 20} MiB below it (the image loaded at RAM + 2 MiB, over the device tree's "
        "MiB); QEMU also migrates its two 64 MiB flash devices and the MTE tag storage (`QEMU RAM MiB`), "
        "all zero but the image and the device tree.",
        "",
        f"Interleaved pairs, the order alternating each repeat (QEMU first in odd repeats): medians (min–max) of "
        f"{runs} runs each; `ratio` is ours / QEMU per pair, median (min–max); above 1 mte-migrate is slower. "
        "CPU s: src + dst = sum (min–max of the sum); the source from the start of the migration, the "
        "destination from before its VM exists (its preallocation included) to the end.",
        "",
        "| image | QEMU ms | mte-migrate ms | ratio | QEMU CPU s src+dst | ours CPU s src+dst | CPU ratio | "
        "QEMU downtime ms | ours downtime ms | QEMU RAM MiB | ok QEMU / ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in doc["summary"]:
        ram = e["qemu_ram_total"]
        ram_cell = f"{ram['median'] / (1 << 20):.0f}" if ram else "n/a"
        lines.append(
            f"| {e['kind']} {fmt_bytes(e['size'])} | {_fmt(e['qemu_ms'])} | {_fmt(e['ours_ms'])} | "
            f"{_fmt(e['ratio'], 2)} | {_fmt_cpu(e['qemu_cpu_s'])} | {_fmt_cpu(e['ours_cpu_s'])} | "
            f"{_fmt(e['cpu_ratio'], 2)} | {_fmt(e['qemu_downtime_ms'])} | {_fmt(e['ours_downtime_ms'])} | "
            f"{ram_cell} | {e['qemu_completed']}/{e['runs']} / {e['ours_validated']}/{e['runs']} |"
        )
    lines += [
        "",
        "QEMU's source is paused (-S): no vCPU runs, so nothing is dirtied and its downtime is taken with the "
        "guest already stopped; mte-migrate's guest has 2 idle vCPUs.",
    ]
    return "\n".join(lines) + "\n"


def _write(doc: dict, out_dir: str | None) -> None:
    """speed.json and speed.md in ``out_dir`` (nothing without one)."""
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "speed.json"), "w") as f:
            json.dump(doc, f, indent=2)
        with open(os.path.join(out_dir, "speed.md"), "w") as f:
            f.write(markdown(doc))
