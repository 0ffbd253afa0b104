"""`mte-migrate lab`: migrate a live MTE guest between two real Linux
kernels with KVM, inside two emulated arm64 machines on this one.

The destination machine boots first and runs ``mte-migrate dest --host
kvm``; once it listens, the source machine boots and runs ``mte-migrate
source --host kvm``: a bare-metal guest program (hosts/kvm/native) tags and
dirties its heap in a real KVM vCPU while precopy runs, then stop-and-copy,
validation and GO.  The guest checks its own tags after it resumes
(wherever that is) and says what it found.  The two machines' virtio-net
cards are joined by a QEMU socket netdev over loopback TCP; inside, the
link is 169.254.0.1 (source) to 169.254.0.2 (destination).

QEMU runs TCG: everything is tens of times slower than on the hardware.
The figures are counters and correctness, not speed.
"""

import json
import os
import socket
import time
from pathlib import Path

from . import image
from .machine import Machine

SOURCE_ADDR, DEST_ADDR, PORT = "169.254.0.1", "169.254.0.2", 7000
#: the lab's own migration settings: a fixed number of dirty passes (the
#: emulated machines' timing would make a downtime target arbitrary), no
#: auto-converge (the guest program paces itself)
SCENARIO = """name = "lab"
description = "a bare-metal MTE guest program in a real KVM vCPU, in an emulated arm64 machine"

[guest]
host = "kvm"
ram = "{ram}"
vcpus = {vcpus}
workload = "{workload}"
rate = {rate}
seed = {seed}
params = {{ heap_pages = {heap_pages}, check_every = {check_every} }}

[migration]
strategy = "{strategy}"
max_passes = {passes}
downtime_limit_ms = 0.001
auto_converge = false
timeout_s = {timeout_s}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scenario_script(scenario: str) -> str:
    return f"cat > /tmp/lab.toml <<'TOML'\n{scenario}TOML\n"


def _dest_script(scenario: str, run_after: float) -> str:
    return (
        _scenario_script(scenario) + f"python3 -m migrate dest --scenario /tmp/lab.toml --listen {DEST_ADDR}:{PORT} "
        f"--json /tmp/dest.json --run-after {run_after:g} > /tmp/dest.out 2> /tmp/dest.err &\n"
        "pid=$!\n"
        "while ! grep -q listening /tmp/dest.out 2>/dev/null; do\n"
        "  kill -0 $pid 2>/dev/null || break; sleep 0.2\n"
        "done\n"
        f'echo "{image.MARK} listening" > /dev/console\n'
        "wait $pid; rc=$?\n"
        "cat /tmp/dest.out /tmp/dest.err\n"
        "exit $rc\n"
    )


def _source_script(scenario: str, warmup: float, cut_link_after: float | None) -> str:
    cut = ""
    if cut_link_after is not None:
        # once the control connection is up (/proc/net/tcp: the port in hex,
        # state 01 ESTABLISHED), wait, then take the link down
        cut = (
            f"(while ! grep -q ':{PORT:04X} 01 ' /proc/net/tcp; do sleep 0.1; done; "
            f'sleep {cut_link_after:g}; ip link set eth0 down; echo "$(date +%T) link down") &\n'
        )
    return (
        _scenario_script(scenario)
        + cut
        + f"python3 -m migrate source --scenario /tmp/lab.toml --connect {DEST_ADDR}:{PORT} "
        f"--json /tmp/source.json --warmup {warmup:g}\n"
    )


def _load(files: dict, name: str) -> dict | None:
    raw = files.get(f"/tmp/{name}.json")
    return json.loads(raw) if raw else None


def run_lab(
    ram: int = 64 << 20,
    strategy: str = "tag-ioctl",
    workload: str = "allocator",
    vcpus: int = 1,
    rate: float = 200.0,
    seed: int = 1,
    heap_pages: int = 256,
    check_every: int = 200,
    passes: int = 2,
    warmup: float = 2.0,
    cut_link_after: float | None = None,
    max_bandwidth: str | None = None,
    log_dir: Path | None = None,
    timeout: float = 900.0,
    progress=print,
) -> dict:
    """Build (or reuse) the image, run the pair, return the report."""
    t0 = time.monotonic()
    vmlinuz, initrd = image.build()
    build_s = time.monotonic() - t0
    scenario = SCENARIO.format(
        ram=f"{ram // 2**20}MiB",
        workload=workload,
        vcpus=vcpus,
        rate=rate,
        seed=seed,
        heap_pages=heap_pages,
        check_every=check_every,
        strategy=strategy,
        passes=passes,
        timeout_s=8.0,
    )
    if cut_link_after is not None and not max_bandwidth:
        # make precopy outlast the cut: the bulk pass of the guest's ~1 MiB,
        # uncompressed, at 100 kB/s takes about 10 s
        max_bandwidth = "100K"
        scenario += 'compression = "none"\n'
    if max_bandwidth:
        scenario += f'max_bandwidth = "{max_bandwidth}"\n'
    log_dir = Path(log_dir or image.cache_dir() / "last-run")
    log_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    progress(f"lab: image {initrd.name} ({initrd.stat().st_size / 2**20:.1f} MiB), kernel {vmlinuz.name}")
    dest = Machine(
        "destination",
        vmlinuz,
        initrd,
        _dest_script(scenario, run_after=60),
        addr=DEST_ADDR,
        net=("listen", port),
        log=log_dir / "destination.log",
    )
    source = None
    try:
        deadline = time.monotonic() + timeout
        while not any(line.endswith(f"{image.MARK} listening") for line in dest.lines):
            if dest.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the destination machine never listened; its console:\n{dest.tail()}")
            time.sleep(0.2)
        progress(f"lab: destination listening after {time.monotonic() - dest.started:.1f} s; booting the source")
        source = Machine(
            "source",
            vmlinuz,
            initrd,
            _source_script(scenario, warmup, cut_link_after),
            addr=SOURCE_ADDR,
            net=("connect", port),
            smp=2,  # the guest's vCPU thread and the VMM's own threads
            log=log_dir / "source.log",
        )
        source.wait(max(1.0, deadline - time.monotonic()))
        left = max(1.0, deadline - time.monotonic())
        # A source that failed may never have connected: then the destination
        # waits for a source that will not come, so give it 20 s, not the rest.
        dest.wait(left if source.rc == 0 else min(20.0, left) if source.rc is not None else 5)
    finally:
        for m in (source, dest):
            if m is not None:
                m.kill()
    files_s, files_d = source.files() if source else {}, dest.files()
    src, dst = _load(files_s, "source"), _load(files_d, "dest")
    for name, files in (("source", files_s), ("destination", files_d)):
        (log_dir / f"{name}.out.txt").write_bytes(files.get("/tmp/out.txt", b""))
    report = {
        "machine": machine_label(),
        "strategy": strategy,
        "ram_bytes": ram,
        "workload": {
            "name": workload,
            "vcpus": vcpus,
            "rate": rate,
            "heap_pages": heap_pages,
            "check_every": check_every,
        },
        "image_build_s": round(build_s, 1),
        "wall_s": round(time.monotonic() - t0, 1),
        "boot_to_init_s": {"source": source.boot_s if source else None, "destination": dest.boot_s},
        "exit": {"source": source.rc if source else None, "destination": dest.rc},
        "source": src,
        "destination": dst,
        "guest_verdict": guest_verdict(src, dst),
        "tag_work": tag_work(src, dst),
        "logs": str(log_dir),
    }
    return report


def machine_label() -> str:
    """What the lab ran on: the emulated CPU, under which host CPU."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"QEMU TCG arm64 'max' CPU (MTE, EL2) on {cpu}, {os.cpu_count()} host CPUs"


def guest_verdict(src: dict | None, dst: dict | None) -> dict:
    """Where the guest runs now and what its own self-check said there."""
    before = ((src or {}).get("guest") or {}).get("last_check") if (src or {}).get("guest_on") != "source" else None
    for side, result in (("destination", dst), ("source", src)):
        if result and result.get("guest") and result["guest"].get("self_check") is not None:
            check = result["guest"]["self_check"]
            return {
                "runs_on": side,
                "mismatches": check["mismatches"],
                "granules_checked": check["granules_checked"],
                "ops_done": check["ops"],
                # the guest's own operation count at its last check on the
                # source: it ran (tagged, dirtied) through precopy
                "ops_at_last_check_on_source": before["ops"] if before else None,
                "ok": check["mismatches"] == 0,
            }
    return {"runs_on": None, "ok": False, "why": "no self-check report from either side"}


def tag_work(src: dict | None, dst: dict | None) -> dict:
    """What moving the tags cost, both sides, as counted on the real kernel:
    system calls, EL0 LDG/STG executed, tag bytes through the ioctl.  The
    validation's own tag reads (validation.*) are left out: every strategy
    pays them alike."""
    out = {}
    for result in (src, dst):
        for name, value in ((result or {}).get("counters") or {}).items():
            side, _, what = name.partition(".")
            if what.startswith("validation.") or not what.startswith(("syscalls.", "el0.", "bytes.tags")):
                continue
            out[f"{side}.{what}"] = value
    return dict(sorted(out.items()))


#: the comparison's rows: (label, counter names added up)
COMPARED = (
    ("source KVM_ARM_MTE_COPY_TAGS calls", ("source.syscalls.kvm_arm_mte_copy_tags",)),
    ("destination KVM_ARM_MTE_COPY_TAGS calls", ("destination.syscalls.kvm_arm_mte_copy_tags",)),
    ("source LDG", ("source.el0.ldg",)),
    ("destination STG", ("destination.el0.stg",)),
    ("tag bytes through the ioctl", ("source.bytes.tags_to_user", "destination.bytes.tags_from_user")),
    ("dirty-log calls (source)", ("source.syscalls.kvm_get_dirty_log", "source.syscalls.kvm_clear_dirty_log")),
)


def comparison(reports: list[dict]) -> str:
    """The strategies side by side on the real kernel: tag work and verdicts,
    labelled with the machine (counters and correctness, not speed)."""
    names = [r["strategy"] for r in reports]
    lines = [
        f"strategy comparison on the real kernel, {reports[0]['machine']} (emulated CPU: counters, not speed)",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for label, keys in COMPARED:
        cells = [str(sum((r.get("tag_work") or {}).get(k, 0) for k in keys)) for r in reports]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for r in reports:
        src, v = r["source"] or {}, r["guest_verdict"]
        ok = (src.get("validation") or {}).get("ok")
        cells.append(
            f"{'ok' if ok else 'FAILED'}; guest: {v.get('mismatches', '?')} mismatches on the {v.get('runs_on')}"
        )
    lines.append("| validation; guest self-check | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(report: dict) -> str:
    src, dst, verdict = report["source"] or {}, report["destination"] or {}, report["guest_verdict"]
    lines = [f"lab: {report['strategy']} on {report['machine']}"]
    if src:
        v = src.get("validation", {})
        lines.append(
            f"  source: {src.get('status')}, dirty syncs {src.get('dirty_sync_count')}, validation "
            f"{'ok' if v.get('ok') else 'FAILED'}, guest on {src.get('guest_on')}, "
            f"downtime {src.get('downtime_ms')} ms, total {src.get('total_time_ms')} ms"
        )
        for p in src.get("passes", []):
            lines.append(f"    pass {p.get('pass')}: {p.get('pages')} pages in {p.get('seconds')} s")
    if dst:
        lines.append(f"  destination: {dst.get('status')}, guest on {dst.get('guest_on')}")
    work = report.get("tag_work") or {}
    tags = {k: v for k, v in work.items() if "mte_copy_tags" in k or ".el0." in k or "bytes.tags" in k}
    if tags:
        lines.append("  tag work: " + ", ".join(f"{k} {v}" for k, v in tags.items()))
    if verdict.get("runs_on"):
        lines.append(
            f"  guest self-check on the {verdict['runs_on']}: {verdict['mismatches']} mismatches in "
            f"{verdict['granules_checked']} granules, after {verdict['ops_done']} operations"
            + (
                f" ({verdict['ops_at_last_check_on_source']} at its last check on the source)"
                if verdict.get("ops_at_last_check_on_source") is not None
                else ""
            )
        )
    else:
        lines.append(f"  guest: {verdict.get('why')}")
    lines.append(f"  wall {report['wall_s']} s (image {report['image_build_s']} s); logs in {report['logs']}")
    return "\n".join(lines)
