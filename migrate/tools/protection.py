"""`mte-migrate speed --protection none,psk,tls`: what protecting the stream
costs.  The same RAM images migrated with each protection in turn,
interleaved (the order rotating from one repeat to the next), and the
medians of total time, guest RAM per second and CPU per GiB on each side,
with the ratio to the unprotected stream:

- ``none``: plain TCP (a CRC on each frame: no protection from the path);
- ``psk``: ``--psk-file``, a MAC on every frame (HMAC-SHA-256);
- ``tls``: mutual TLS 1.3 (``--tls-*``) with throw-away certificates;
- ``tls+psk``: both."""

import json
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from migrate.config.spec import MigrationConfig
from migrate.errors import ConfigError
from migrate.hosting.images import builtin_image
from migrate.tools.pki import have_openssl, make_pki
from migrate.tools.speed import _one
from migrate.units import fmt_bytes

PROTECTIONS = ("none", "psk", "tls", "tls+psk")


def _configs(protections, workdir: Path, prealloc: bool) -> dict:
    base = replace(MigrationConfig(), prealloc=prealloc)
    key = workdir / "key"
    key.write_bytes(b"protection-benchmark-key-0123456789")
    pki = None
    out = {}
    for p in protections:
        if p not in PROTECTIONS:
            raise ConfigError(f"--protection takes {', '.join(PROTECTIONS)}; got {p!r}")
        cfg = base
        if "tls" in p:
            if not have_openssl():
                raise ConfigError("--protection tls needs the openssl command to make throw-away certificates")
            pki = pki or make_pki(workdir, "bench", who=("host",))
            cert, tls_key = pki["host"]
            cfg = replace(cfg, tls_cert=cert, tls_key=tls_key, tls_ca=pki["ca"])
        if "psk" in p:
            cfg = replace(cfg, psk_file=str(key))
        out[p] = cfg.check()
    return out


def run(sizes, kinds, protections, repeat: int, out_dir, quiet: bool, command: str, prealloc: bool = False) -> dict:
    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    for k in kinds:
        for size in sizes:
            say(f"preparing image {k} {fmt_bytes(size)} (cached after the first time)...")
            builtin_image(f"builtin:{k}", size)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="mte-protection-") as tmp:
        configs = _configs(protections, Path(tmp), prealloc)
        order = list(configs)
        for rep in range(repeat):
            turn = order[rep % len(order) :] + order[: rep % len(order)]  # rotate: no case always first
            for size in sizes:
                for k in kinds:
                    for p in turn:
                        r = _one(k, size, configs[p])
                        rows.setdefault((k, size, p), []).append(r)
                        say(f"[{rep + 1}/{repeat}] {k} {fmt_bytes(size)} {p}: {r['status']}, {r['total_ms']:.0f} ms")
    summary = []
    for (k, size, p), rs in rows.items():
        good = [r for r in rs if r["ok"]]
        gib = size / (1 << 30)

        def med(key, rs=good):
            values = [r[key] for r in rs if r[key] is not None]
            return statistics.median(values) if values else None

        summary.append(
            {
                "kind": k,
                "size": size,
                "protection": p,
                "runs": len(rs),
                "validated": len(good),
                "total_ms": med("total_ms"),
                "gb_per_s": med("gb_per_s"),
                "cpu_src_s_per_gib": (med("cpu_src") or 0) / gib if med("cpu_src") is not None else None,
                "cpu_dst_s_per_gib": (med("cpu_dst") or 0) / gib if med("cpu_dst") is not None else None,
            }
        )
    for e in summary:
        plain = next(
            (x for x in summary if (x["kind"], x["size"], x["protection"]) == (e["kind"], e["size"], "none")), None
        )
        e["time_vs_none"] = (
            e["total_ms"] / plain["total_ms"] if plain and plain["total_ms"] and e["total_ms"] is not None else None
        )
    doc = {
        "protection": True,
        "command": command,
        "prealloc": prealloc,
        "summary": summary,
        "runs": {f"{k}-{s}-{p}": rs for (k, s, p), rs in rows.items()},
    }
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "protection.json").write_text(json.dumps(doc, indent=2))
        (out / "protection.md").write_text(markdown(doc))
    return doc


def markdown(doc: dict) -> str:
    def f(v, digits=0):
        return "–" if v is None else f"{v:.{digits}f}"

    lines = [
        f"Command: `{doc['command']}`",
        "",
        "| image | protection | total ms | GB/s of guest RAM | CPU s/GiB source | CPU s/GiB destination "
        "| time vs none | validated |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for e in doc["summary"]:
        lines.append(
            f"| {e['kind']} {fmt_bytes(e['size'])} | {e['protection']} | {f(e['total_ms'])} | {f(e['gb_per_s'], 2)} | "
            f"{f(e['cpu_src_s_per_gib'], 2)} | {f(e['cpu_dst_s_per_gib'], 2)} | {f(e['time_vs_none'], 2)}× | "
            f"{e['validated']}/{e['runs']} |"
        )
    lines += ["", "Medians over the validated runs; the cases ran interleaved, their order rotating each repeat."]
    return "\n".join(lines) + "\n"
