"""The result of a migration: the JSON document scripts read, and the short
human summary.  Field names follow QEMU's query-migrate where they fit."""

import json

from migrate.units import fmt_bytes, fmt_rate


def protection(tls_config, key) -> str:
    """What protects the stream, for wire.protection: "tls" (encrypted and
    authenticated), "psk-mac" (a MAC on every frame: authenticated, readable
    on the path), both, or "none" (a CRC at most: anyone on the path can
    rewrite frames)."""
    parts = [name for name, on in (("tls", tls_config), ("psk-mac", key)) if on]
    return "+".join(parts) or "none"


def empty_result(scenario: str, strategy: str) -> dict:
    return {
        "status": "failed",
        "error": None,
        "scenario": scenario,
        "strategy": strategy,
        "total_time_ms": 0.0,
        "setup_time_ms": 0.0,
        "teardown_ms": None,
        "confirm_time_ms": None,
        "downtime_ms": None,
        "downtime_breakdown_ms": None,
        "expected_downtime_ms": None,
        "dirty_sync_count": 0,
        "passes": [],
        "convergence": None,
        "ram": {
            "total_bytes": 0,
            "transferred_bytes": 0,
            "remaining_bytes": 0,
            "zero_pages": 0,
            "unscanned_pages": 0,
            "torn_pages": 0,
            "normal_pages": 0,
            "normal_bytes": 0,
            "mbps": 0.0,
            "dirty_pages_rate": 0.0,
            "backing": None,
        },
        "tags": {"tagged_pages": 0, "raw_bytes": 0, "wire_bytes": 0},
        "wire": {
            "bytes_sent": 0,
            "bytes_received": 0,
            "data_bytes": 0,
            "tag_bytes": 0,
            "compression": None,
            "congestion_control": None,
        },
        "counters": {},
        "validation": {
            "ok": False,
            "mode": None,
            "pages_checked": 0,
            "data_mismatches": 0,
            "tag_mismatches": 0,
            "state_ok": None,
            "first_mismatches": [],
        },
        "guest_on": "source",
    }


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=False)
        f.write("\n")


def summary(result: dict) -> str:
    ram, tags, val = result["ram"], result["tags"], result["validation"]
    lines = []
    head = f"{result['status'].upper()}: scenario {result['scenario']}, strategy {result['strategy']}"
    if result.get("error"):
        head += f" -- {result['error']}"
    lines.append(head)
    if result["status"] == "completed" or ram["transferred_bytes"]:
        lines.append(
            f"  total {result['total_time_ms']:.0f} ms (setup {result['setup_time_ms']:.0f} ms), "
            f"downtime {_ms(result['downtime_ms'])}, {result['dirty_sync_count']} dirty syncs"
        )
        if result.get("convergence"):
            lines.append(f"  stopped because {result['convergence']['reason']}")
        lines.extend(f"  {line}" for line in downtime_split(result))
        ram_line = (
            f"  RAM {fmt_bytes(ram['total_bytes'])}: {ram['normal_pages']} pages sent, "
            f"{ram['zero_pages']} zero pages, {fmt_bytes(ram['transferred_bytes'])} on the wire"
        )
        if ram.get("guest_bytes_per_s"):
            ram_line += f", {fmt_rate(ram['guest_bytes_per_s'])} of guest RAM end to end"
        lines.append(ram_line)
        lines.append(
            f"  tags: {tags['tagged_pages']} tagged pages, {fmt_bytes(tags['raw_bytes'])} raw, "
            f"{fmt_bytes(tags['wire_bytes'])} on the wire"
        )
    if val.get("mode"):
        verdict = "OK" if val["ok"] else "FAILED"
        lines.append(
            f"  validation ({val['mode']}) {verdict}: {val['pages_checked']} pages checked, "
            f"{val['data_mismatches']} data and {val['tag_mismatches']} tag mismatches"
            + ("" if val.get("state_ok") in (None, True) else ", vCPU/device state differs")
        )
        if val.get("compared"):
            lines.append(f"    compared: {val['compared']}")
        for m in val.get("first_mismatches", [])[:5]:
            if "chunk" in m:
                lines.append(f"    chunk {m['chunk']} differs")
                continue
            lines.append(
                f"    page {m['page']}: {m['kind']}" + (f", granules {m['granules']}" if m.get("granules") else "")
            )
    lines += postcopy_lines(result.get("postcopy"))
    lines.append(f"  guest: {_where(result.get('guest_on', 'source'))}")
    return "\n".join(lines)


def postcopy_lines(pc: dict | None) -> list[str]:
    if not pc:
        return []

    def ms(v):
        return "n/a" if v is None else f"{v:.1f} ms"

    lat = pc.get("fault_latency_ms") or {}
    lines = [
        f"  postcopy ({pc.get('reason')}): switch downtime {ms(pc.get('switch_downtime_ms'))}, "
        f"{pc.get('pages', 0)} pages after the switch, last one {ms(pc.get('last_page_ms'))} after it"
    ]
    at_switch = pc.get("pages_discarded_at_switch")
    if pc.get("pages_discarded_ahead"):
        lines.append(
            f"    discarded ahead, the guest still running on the source: {pc['pages_discarded_ahead']} pages in "
            f"{ms(pc.get('discard_ahead_ms'))}" + ("" if at_switch is None else f"; at the switch: {at_switch}")
        )
    elif at_switch is not None:
        lines.append(f"    discarded at the switch: {at_switch} pages")
    if "faults" in pc:
        lines.append(
            f"    guest faults on missing pages: {pc['faults']}, {pc.get('requests', 0)} requests; latency "
            f"p50 {ms(lat.get('p50'))}, p99 {ms(lat.get('p99'))}, max {ms(lat.get('max'))}"
        )
    if "guest_wrong_tag_accesses" in pc:
        wrong = pc["guest_wrong_tag_accesses"]
        lines.append(
            f"    guest tag checks: {pc.get('guest_tag_checked_loads', 0)}, wrong tags seen: {wrong}"
            + (" -- NOT CLEAN: pages went live before their tags" if wrong else "")
        )
    return lines


def downtime_split(result: dict) -> list[str]:
    """Where the downtime went, and the validation digests that ran in it:
    the convergence estimate counts only the pages left to send, so a guest
    that dirtied pages all over RAM shows here why the real downtime is
    longer (each dirty page is read again, in its 16 KiB digest piece)."""
    parts = result.get("downtime_breakdown_ms")
    if not parts:
        return []
    lines = [
        f"downtime split: final pages {parts['final_memory']:.0f} ms, state {parts['state']:.0f} ms, "
        f"completion {parts['completion']:.0f} ms"
    ]
    src = result.get("digest") or {}
    dst = (result.get("destination") or {}).get("final_digest") or {}
    if src.get("final_ms") is not None:
        if src.get("trusts_dirty_tracking"):
            how = f"{_stale(src['mib_read_at_pause'], src['chunks_read_at_pause'])} brought up to date"
        elif src.get("write_watch") == "on":
            how = f"{_stale(src['mib_read_at_pause'], src['chunks_read_at_pause'])} the write watch saw written"
        else:
            how = f"{src['mib_read_at_pause']:g} MiB of populated RAM and its tags read again"
        text = f"validation digests after the pause: source {src['final_ms']:.0f} ms ({how}, alongside the final pages)"
        if dst.get("ms") is not None:
            text += f", destination {dst['ms']:.0f} ms ({_stale(dst.get('stale_mib'), dst['stale_chunks'])})"
        lines.append(text)
    return lines


def _stale(mib, chunks) -> str:
    """What a final digest brought up to date: 1 MiB chunks, and the MiB of
    dirty 16 KiB pieces read again in those read before."""
    return f"{chunks} chunks" if mib is None else f"{chunks} chunks, {mib:g} MiB of dirty pieces"


def _where(guest_on: str) -> str:
    if guest_on in ("source", "destination"):
        return f"running on the {guest_on}"
    return guest_on


def _ms(v) -> str:
    return "n/a" if v is None else f"{v:.0f} ms"
