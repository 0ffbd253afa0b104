"""The mte-migrate command line (also `python -m migrate`)."""

import argparse
import logging
import os
import sys

from migrate import __version__
from migrate.config import options
from migrate.errors import ConfigError, MigrationError
from migrate.units import parse_size

DESCRIPTION = """\
Live migration of a simulated Arm64 KVM guest that uses MTE memory tags,
between two host processes over TCP, with pluggable ways for the VMM to reach
the tags (PROT_MTE mapping, KVM_ARM_MTE_COPY_TAGS, ...).  With no command,
`run` migrates the default scenario: a 1 GiB allocator guest with the
tag-ioctl strategy.  Every option and result field: docs/USAGE.md."""

EPILOG = """\
examples:
  mte-migrate run                                  # the default scenario
  mte-migrate run --scenario hot-set --max-passes 5 --json out.json
  mte-migrate run --strategy none --scenario allocator   # validation fails: tags lost
  mte-migrate dest --listen 0.0.0.0:4444 --scenario allocator     # terminal 1
  mte-migrate source --connect HOST:4444 --scenario allocator     # terminal 2
  mte-migrate validate --scenario retag-churn      # compare every page and tag
exit status: 0 migrated and validated; 1 failed; 2 bad usage; 130 cancelled."""


def _add_table_options(parser: argparse.ArgumentParser, command: str) -> None:
    """A migrating command's options, from the option table.  Settings of a
    guest or migration default to None, "not given", so that a scenario's
    value stands unless the command line names one (resolve() parses them);
    the command's own settings are typed and defaulted here."""
    groups = {}
    for option in options.for_command(command):
        where = parser
        if option.help_group is not None:
            if option.help_group not in groups:
                groups[option.help_group] = parser.add_argument_group(*options.GROUPS[option.help_group])
            where = groups[option.help_group]
        own = option.section is None
        if option.flags:
            value = {"choices": option.kind.choices} if option.kind.choices else {"metavar": option.metavar_text}
            where.add_argument(
                *option.flags,
                dest=option.name,
                action="append" if option.repeat else "store",
                type=option.kind.type if own and option.kind.type in (int, float) else None,
                default=option.default if own else None,
                required=option.required,
                help=argparse.SUPPRESS if option.hidden else option.help_text(),
                **value,
            )
        if option.switch:
            where.add_argument(
                *option.switch,
                dest=option.name,
                action="store_const",
                const=option.switch_value,
                default=option.default if own else None,
                help=argparse.SUPPRESS if option.hidden else option.switch_help or _switch_help(option),
            )


def _switch_help(option) -> str:
    return f"same as {option.flags[0]} {option.switch_value}" if option.flags else option.help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mte-migrate", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"mte-migrate {__version__}")
    parser.add_argument("--debug", action="store_true", help="log state transitions")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="migrate between a destination and a source process on loopback",
        description="Start a destination and a source host process on loopback, migrate, report.",
    )
    _add_table_options(p, "run")

    p = sub.add_parser(
        "validate",
        help="migrate, then compare every page and every tag",
        description="Run a migration with full validation and print the first mismatches.",
    )
    _add_table_options(p, "validate")

    p = sub.add_parser("dest", help="run the destination host: listen and receive one migration")
    _add_table_options(p, "dest")

    p = sub.add_parser("source", help="run the source host: boot the guest and migrate it to a destination")
    _add_table_options(p, "source")

    p = sub.add_parser(
        "bench",
        help="compare strategies: a matrix of scenarios x strategies, repeated",
        description="Run every scenario with every strategy, interleaved, REPEAT times; report "
        "medians and min-max, ratios against `none`, the machine's ceilings, the best "
        "ratio tag-ioctl could reach given the tag work timed in the same run, and the "
        "cost model's estimate for real hardware. Writes results.json, results.csv, "
        "results.md (and results.png with the plot extra) to --out.",
    )
    p.add_argument(
        "--scenarios",
        metavar="A,B",
        help="comma-separated scenario names or files "
        "(default: allocator,retag-churn,stream,device-dma,idle; --quick: allocator,retag-churn,device-dma)",
    )
    p.add_argument("--strategies", metavar="A,B", help="comma-separated strategies (default: all)")
    p.add_argument(
        "--postcopy",
        action="store_true",
        help="instead: postcopy against precopy on each scenario (default hot-set): precopy with and without "
        "auto-converge, postcopy with each strategy that can; total time, downtime or switch downtime, fault "
        "latency, the guest's progress and its wrong-tag accesses; writes postcopy.md to --out",
    )
    p.add_argument("--repeat", type=int, metavar="N", help="runs of each pair (default 3; --quick 1)")
    p.add_argument("--out", default="bench-out", metavar="DIR", help="output folder (default bench-out)")
    p.add_argument("--quick", action="store_true", help="small guests (64 MiB), one repeat: under 2 minutes")
    p.add_argument("--ram", metavar="SIZE", help="guest RAM for every scenario")
    p.add_argument(
        "--cost-model", metavar="FILE", help="cost model parameters (default: the shipped migrate/tools/costmodel.toml)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress")

    p = sub.add_parser(
        "resolve",
        help="settle a migration left in doubt (the last confirmation was lost)",
        description="After GO was sent but never confirmed, the destination keeps the validated "
        "guest paused and waits. Tell it the source's decision: `go` (the source gave "
        "the guest up: resume it there) or `abort` (the source kept it: discard).",
    )
    p.add_argument("--connect", required=True, metavar="HOST:PORT", help="the destination")
    p.add_argument("--session", required=True, help="the session named in the in-doubt message")
    p.add_argument("decision", choices=("go", "abort"))
    p.add_argument("--psk-file", metavar="FILE", help="the shared key, if the migration used one")
    p.add_argument("--tls-cert", metavar="PEM")
    p.add_argument("--tls-key", metavar="PEM")
    p.add_argument("--tls-ca", metavar="PEM")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S")

    p = sub.add_parser(
        "resume",
        help="resume a postcopy migration whose link broke after the switch",
        description="After the postcopy switch a broken link pauses both sides: the destination runs "
        "the guest without the pages it lacks, the source holds them in its paused copy (for "
        "--postcopy-hold seconds). Once the path works again, tell the source process to reconnect "
        "and finish the same migration (it signals that process, SIGURG; its own key and "
        "address are used). To resume the paused copy on the source instead (only when the "
        "destination is dead), `kill -USR1 PID` as its alert says.",
    )
    p.add_argument("--pid", required=True, type=int, help="the source process named in its POSTCOPY PAUSED alert")

    p = sub.add_parser(
        "speed",
        help="migrate raw images (zero, random, mixed) with defaults; compare with QEMU (--vs-qemu: measured)",
        description="Builds (once) raw images of each kind and size, migrates each REPEAT times "
        "with default settings, and reports medians and min-max of total time, downtime "
        "and guest-RAM throughput beside QEMU's dated figures from another run, the ceilings measured in the "
        "same run and the floor they set for each image, adaptive compression against "
        "raw under a 1 Gbit/s cap, and each "
        "host's peak RSS against the RAM the guest touched.  With --vs-qemu: QEMU 10 and mte-migrate "
        "measured interleaved on the same images instead, with the ratios.",
    )
    p.add_argument("--sizes", default="1GiB,4GiB", metavar="A,B", help="image sizes (default 1GiB,4GiB)")
    p.add_argument(
        "--kinds", default="zero,random,mixed", metavar="A,B", help="image kinds (default zero,random,mixed)"
    )
    p.add_argument("--repeat", type=int, default=5, metavar="N", help="runs of each (default 5)")
    p.add_argument(
        "--cap", default="125M", metavar="RATE", help="bandwidth cap for the compression comparison ('none' to skip)"
    )
    p.add_argument("--out", default="bench-out", metavar="DIR", help="writes speed.json and speed.md here")
    p.add_argument(
        "--prealloc",
        action="store_true",
        help="preallocate the destination's RAM before each migration, as QEMU's reference figures "
        "were taken (-mem-prealloc); default: default settings; with --vs-qemu, QEMU's destination "
        "gets -mem-prealloc too",
    )
    p.add_argument(
        "--vs-qemu",
        action="store_true",
        help="run QEMU 10 (qemu-system-aarch64, TCG) and mte-migrate interleaved on the same images and "
        "report both with the ratios; only that (no ceilings, no capped comparison: --cap is ignored)",
    )
    p.add_argument(
        "--protection",
        metavar="A,B",
        help="instead: what protecting the stream costs; migrate each image with each of none (plain TCP), "
        "psk (--psk-file: a MAC on every frame), tls (mutual TLS 1.3, throw-away certificates made with "
        "openssl) and tls+psk, interleaved, and report time, GB/s and CPU per GiB against none; "
        "writes protection.json and protection.md",
    )
    p.add_argument("--quiet", "-q", action="store_true")

    p = sub.add_parser(
        "endurance",
        help="migrate one guest back and forth N times between two host processes",
        description="Two long-lived host processes pass one running guest back and forth; every "
        "hop is validated and both processes report RSS and open file descriptors.",
    )
    _add_table_options(p, "endurance")
    # internal, so no help= (argparse lists a subcommand only when it has one)
    p = sub.add_parser("endurance-worker")
    p.add_argument("--spec", required=True)
    p.add_argument("--role", choices=("a", "b"), required=True)
    p.add_argument("--hops", type=int, required=True)

    p = sub.add_parser(
        "fuzz",
        help="fuzz the destination's input path in process with mutated real streams",
        description="Captures the streams a source sends for a small guest, mutates them (headers, "
        "msgpack meta, payloads, zstd bombs, frame order, in every protocol state) and feeds each "
        "input to the destination's frame parser, state machines and page applier in process. "
        "Reports outcome classes, crashes (any exception that is not a MigrationError), hangs and "
        "peak memory; exit status 1 on any crash or hang.",
    )
    p.add_argument("--inputs", type=int, default=10000, metavar="N", help="inputs to run (default 10000)")
    p.add_argument("--seed", type=int, default=1, help="the campaign's seed (default 1): same seed, same inputs")
    p.add_argument("--out", default="fuzz-out", metavar="DIR", help="fuzz.json and reproducers (default fuzz-out)")
    p.add_argument(
        "--hang-seconds", type=float, default=10.0, metavar="S", help="an input slower than this is a hang (default 10)"
    )
    p.add_argument(
        "--trace-every",
        type=int,
        default=50,
        metavar="N",
        help="measure tracemalloc's peak on every Nth input (default 50; 0: never)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress")

    p = sub.add_parser(
        "lab",
        help="migrate a live MTE guest between two real KVM kernels in emulated arm64 machines",
        description="Builds (once, cached) an arm64 initramfs with Python, this project and a bare-metal "
        "MTE guest program; boots two QEMU arm64 machines (TCG, EL2, MTE) joined by a socket netdev; runs "
        "`mte-migrate dest --host kvm` in one and `mte-migrate source --host kvm` in the other; reports both "
        "results and the guest's own self-check. Needs root for apt (see docs/LAB.md).",
    )
    p.add_argument("--ram", default="64MiB", metavar="SIZE", help="guest RAM (default 64MiB)")
    p.add_argument(
        "--strategy",
        default="tag-ioctl",
        help="tag-ioctl, prot-mte or none (default tag-ioctl); several, comma-separated, run one after the "
        "other and are compared",
    )
    p.add_argument(
        "--workload", default="allocator", choices=("allocator", "retag-churn", "idle"), help="guest program mode"
    )
    p.add_argument("--vcpus", type=int, default=1, help="guest vCPUs, each with its own heap (default 1)")
    p.add_argument("--rate", type=float, default=200.0, metavar="OPS/S", help="guest operations (pages) a second")
    p.add_argument(
        "--passes",
        type=int,
        metavar="N",
        help="dirty passes before stop-and-copy (default 2; 30 with --cut-link-after)",
    )
    p.add_argument(
        "--cut-link-after",
        type=float,
        metavar="S",
        help="take the source machine's link down S seconds into the migration (the guest must go on there); "
        "unless --max-bandwidth is given, precopy is slowed to 100 kB/s uncompressed so the cut lands in it",
    )
    p.add_argument("--max-bandwidth", metavar="RATE", help="cap the migration's sending rate (e.g. 2M)")
    p.add_argument("--json", metavar="FILE", help="write the report (both results, the guest's verdict) as JSON")
    p.add_argument("--logs", metavar="DIR", help="consoles and outputs (default ~/.cache/mte-migrate/lab/last-run)")
    p.add_argument("--timeout", type=float, default=900.0, metavar="S", help="give up after S seconds (default 900)")
    p.add_argument(
        "--setup-only",
        action="store_true",
        help="install and fetch what the lab needs (QEMU 10, cross tools, packages, kernel), build the image, stop",
    )

    sub.add_parser("scenarios", help="list the scenarios, one a line")
    sub.add_parser("strategies", help="list the tag strategies, one a line")
    return parser


def resolve(args):
    """Scenario + command-line overrides -> (GuestSpec, MigrationConfig, name)."""
    from migrate.config import scenario as scen
    from migrate.hosting.process import spec_from_json

    if getattr(args, "spec", None):
        with open(args.spec) as f:
            guest, config, name = spec_from_json(f.read())
    else:
        s = scen.load(args.scenario)
        guest, config, name = s.guest, s.migration, s.name
    try:
        for option in options.for_command(args.command):
            value = getattr(args, option.name, None)
            if option.section is None or value is None:
                continue  # the command's own setting, or not given: the scenario's value stands
            if isinstance(value, str):
                value = option.kind.parse(value, option.cli_flags[0])
            options.assign(guest if option.section == "guest" else config, option, value)
        from migrate.net.tls import from_options

        from_options(config.tls_cert, config.tls_key, config.tls_ca)  # all three or none
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if guest.ram <= 0 or guest.ram % 4096:
        raise ConfigError(f"guest RAM must be a positive multiple of 4 KiB, got {guest.ram}")
    if guest.vcpus < 1:
        raise ConfigError("a guest needs at least one vCPU")
    from hosts.workloads import WORKLOADS

    if guest.workload not in WORKLOADS:
        raise ConfigError(f"unknown workload {guest.workload!r}; known: {', '.join(WORKLOADS)}")
    if args.command == "validate":
        config.validate = "full"
    from migrate.protocol.auth import load_key

    load_key(config.psk_file)  # unreadable or short keys are usage errors, caught before anything starts
    from migrate.strategies import STRATEGIES

    if not guest.mte and config.strategy in STRATEGIES and STRATEGIES[config.strategy].vmm_prot_mte:
        raise ConfigError(
            f"strategy {config.strategy} maps guest RAM PROT_MTE, which needs an MTE guest "
            f"(the scenario sets mte = false)"
        )
    if config.postcopy and getattr(guest, "host", "sim") != "sim":
        raise ConfigError("--postcopy runs on the simulated host only: the kvm backend has no userfaultfd yet")
    return guest, config.check(), name


def _cap_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives threads their own malloc arenas; with vCPU and channel
    threads coming and going over many migrations, the process RSS creeps up
    in arena-sized steps (measured with `mte-migrate endurance`: flat with 1-2
    arenas, +50 MiB over 60 hops without).  Cap them before threads start."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc: nothing to cap


def main(argv=None) -> int:
    _cap_malloc_arenas()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["run"] + (argv if argv is not None else sys.argv[1:]))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"mte-migrate: error: {exc}", file=sys.stderr)
        return 2
    except MigrationError as exc:
        print(f"mte-migrate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mte-migrate: cancelled", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`mte-migrate scenarios | head -1`): stop
        # quietly, as a shell tool does, and keep Python from complaining
        # again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE


def _resolve(args) -> int:
    import asyncio

    from migrate.engine.recovery import send_decision
    from migrate.net.tls import from_options
    from migrate.net.transport import parse_address
    from migrate.protocol import auth

    try:
        address = parse_address(args.connect, "--connect")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    key = auth.load_key(args.psk_file)
    tls = from_options(args.tls_cert, args.tls_key, args.tls_ca)
    print(asyncio.run(send_decision(address, args.session, args.decision, key, tls, args.timeout)))
    return 0


def _resume(args) -> int:
    from migrate.engine.postcopy_recovery import RESUME_SIGNAL

    try:
        os.kill(args.pid, RESUME_SIGNAL)
    except ProcessLookupError:
        raise ConfigError(f"no process {args.pid}: the source has ended (its result says why)") from None
    except PermissionError:
        raise ConfigError(f"not allowed to signal process {args.pid}: run as the source's user") from None
    print(f"asked source process {args.pid} to reconnect; it reports the outcome")
    return 0


def _bench_postcopy(args) -> int:
    import os

    from migrate.tools import postcopy_bench

    try:
        ram = parse_size(args.ram, "--ram") if args.ram else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    command = "mte-migrate " + " ".join(sys.argv[1:])
    out = []
    for name in (args.scenarios or "hot-set").split(","):
        doc = postcopy_bench.run(name.strip(), ram, args.repeat or 3, args.quiet)
        out.append(postcopy_bench.markdown(doc, command))
    text = "\n".join(out)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "postcopy.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def _bench(args) -> int:
    from dataclasses import replace

    if args.postcopy:
        return _bench_postcopy(args)

    from migrate.config import scenario as scen
    from migrate.strategies import BENCH_STRATEGIES, STRATEGIES
    from migrate.tools.bench import QUICK_RAM, run_bench

    names = (
        args.scenarios.split(",")
        if args.scenarios
        else ["allocator", "retag-churn", "device-dma"]
        if args.quick
        else ["allocator", "retag-churn", "stream", "device-dma", "idle"]
    )
    scenarios = [scen.load(n.strip()) for n in names if n.strip()]
    strategies = args.strategies.split(",") if args.strategies else list(BENCH_STRATEGIES)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"unknown strategy {unknown[0]!r}; known: {', '.join(STRATEGIES)}")
    try:
        ram = parse_size(args.ram, "--ram") if args.ram else (QUICK_RAM if args.quick else None)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for s in scenarios:
        if ram:
            s.guest = replace(s.guest, ram=ram)
    repeat = args.repeat or (1 if args.quick else 3)
    if repeat < 1:
        raise ConfigError("--repeat must be at least 1")
    command = "mte-migrate " + " ".join(sys.argv[1:])
    try:
        return run_bench(scenarios, strategies, repeat, args.out, args.quick, args.cost_model, command, args.quiet)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"bench: {exc}") from None


def _lab(args) -> int:
    import json
    from pathlib import Path

    from migrate.strategies import STRATEGIES
    from migrate.tools.lab.run import comparison, run_lab
    from migrate.tools.lab.run import summary as lab_summary

    if args.setup_only:
        import time

        from migrate.tools.lab import image

        t = time.monotonic()
        vmlinuz, initrd = image.build()
        print(f"lab: ready in {time.monotonic() - t:.0f} s: {vmlinuz} {initrd}", file=sys.stderr)
        return 0
    strategies = [s.strip() for s in args.strategy.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ConfigError(f"unknown strategy {(unknown or [''])[0]!r}; known: {', '.join(STRATEGIES)}")
    try:
        ram = parse_size(args.ram, "--ram")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    passes = args.passes if args.passes is not None else (30 if args.cut_link_after is not None else 2)
    if args.vcpus < 1:
        raise ConfigError("--vcpus must be at least 1")
    if passes < 0 or args.rate < 0:
        raise ConfigError("--passes and --rate must be 0 or more")
    reports = []
    for strategy in strategies:
        report = run_lab(
            ram=ram,
            strategy=strategy,
            workload=args.workload,
            vcpus=args.vcpus,
            rate=args.rate,
            passes=passes,
            cut_link_after=args.cut_link_after,
            max_bandwidth=args.max_bandwidth,
            log_dir=Path(args.logs) / strategy if args.logs and len(strategies) > 1 else args.logs,
            timeout=args.timeout,
            progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
        print(lab_summary(report), file=sys.stderr)
        reports.append(report)
    if len(reports) > 1:
        print(comparison(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports[0] if len(reports) == 1 else {"runs": reports}, f, indent=2)

    def good(report) -> bool:
        # none (or a cut link) is expected to fail: the run is good when the
        # guest still checks out wherever it runs
        src = report["source"] or {}
        migrated = src.get("status") == "completed" and (src.get("validation") or {}).get("ok")
        verdict = report["guest_verdict"]
        return verdict["ok"] and (migrated or verdict["runs_on"] == "source")

    return 0 if all(good(r) for r in reports) else 1


def _dispatch(args) -> int:
    from migrate.engine.report import summary, write_json

    if args.command == "scenarios":
        from migrate.config import scenario as scen

        for name, path in scen.available().items():
            try:
                print(f"{name}\t{scen.load(str(path)).description}")
            except ConfigError as exc:
                print(f"{name}\t(invalid: {exc})")
        return 0
    if args.command == "lab":
        return _lab(args)
    if args.command == "strategies":
        from migrate.strategies import STRATEGIES

        for name, cls in STRATEGIES.items():
            label = "[proposal] " if cls.proposal else ""
            postcopy = "postcopy: yes" if cls.postcopy_mode else "postcopy: no"
            print(f"{name}\t{label}{cls.description}\t{postcopy}")
        return 0
    if args.command == "bench":
        return _bench(args)
    if args.command == "resolve":
        return _resolve(args)
    if args.command == "resume":
        return _resume(args)
    if args.command == "speed":
        from migrate.tools.speed import markdown
        from migrate.tools.speed import run as run_speed
        from migrate.units import parse_rate

        try:
            sizes = [parse_size(x, "--sizes") for x in args.sizes.split(",")]
            cap = parse_rate(args.cap, "--cap")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        kinds = args.kinds.split(",")
        from migrate.hosting.images import KINDS

        if any(k not in KINDS for k in kinds) or any(s % (1 << 20) for s in sizes) or args.repeat < 1:
            raise ConfigError(f"--kinds from {', '.join(KINDS)}; --sizes whole MiB; --repeat >= 1")
        command = "mte-migrate " + " ".join(sys.argv[1:])
        if args.protection:
            from migrate.tools import protection

            doc = protection.run(
                sizes, kinds, args.protection.split(","), args.repeat, args.out, args.quiet, command, args.prealloc
            )
            print(protection.markdown(doc))
            return 0 if all(e["validated"] == e["runs"] for e in doc["summary"]) else 1
        if args.vs_qemu:
            from migrate.tools.speed import run_vs_qemu

            doc = run_vs_qemu(sizes, kinds, args.repeat, args.out, args.quiet, command, prealloc=args.prealloc)
            print(markdown(doc))
            ok = all(e["qemu_completed"] == e["ours_validated"] == e["runs"] for e in doc["summary"])
            return 0 if ok else 1
        doc = run_speed(sizes, kinds, args.repeat, args.out, cap, args.quiet, command, prealloc=args.prealloc)
        print(markdown(doc))
        return 0 if all(e["validated"] == e["runs"] for e in doc["summary"]) else 1
    if args.command == "endurance-worker":
        from migrate.tools.endurance import worker

        return worker(args.spec, args.role, args.hops, "")
    if args.command == "fuzz":
        from migrate.tools.fuzz import campaign
        from migrate.tools.fuzz import summary as fuzz_summary

        if args.inputs < 1 or args.hang_seconds <= 0 or args.trace_every < 0:
            raise ConfigError("--inputs >= 1, --hang-seconds > 0, --trace-every >= 0")
        progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
        report = campaign(args.inputs, args.seed, args.out, args.hang_seconds, args.trace_every, progress=progress)
        print(fuzz_summary(report))
        return 1 if report.crashes or report.hangs else 0
    guest, config, name = resolve(args)
    if guest.host == "kvm":  # before anything starts: one line where this machine cannot run it
        from hosts import HostUnavailable
        from hosts.kvm import check_kvm

        try:
            check_kvm()
        except HostUnavailable as exc:
            raise ConfigError(f"--host kvm: {exc}") from None
    if args.command in ("run", "validate"):
        from migrate.hosting.pair import run_pair

        result = run_pair(guest, config, name, args.quiet, retry=getattr(args, "retry", 0))
        if args.json:
            write_json(result, args.json)
        if not args.quiet:
            print(summary(result), file=sys.stderr)
        elif result["error"]:
            print(f"mte-migrate: {result['status']}: {result['error']}", file=sys.stderr)
        ok = result["status"] == "completed" and result["validation"]["ok"]
        return 0 if ok else (130 if result["status"] == "cancelled" else 1)
    if args.command == "endurance":
        import json as _json

        from migrate.tools.endurance import run as run_endurance

        if args.hops < 1:
            raise ConfigError("--hops must be at least 1")
        report = run_endurance(guest, config, name, args.hops, args.quiet)
        if args.json:
            with open(args.json, "w") as f:
                _json.dump(report, f, indent=2)
        print(_json.dumps({k: report[k] for k in ("hops", "hops_validated", "growth")}, indent=2))
        return 0 if report["hops_validated"] == args.hops else 1
    from migrate.hosting.process import run_dest, run_source

    if args.command == "source":
        return run_source(
            guest,
            config,
            name,
            args.connect,
            args.json,
            args.quiet,
            args.warmup,
            summary_out=not args.no_summary,
            retry=args.retry,
        )
    if args.command == "dest":
        return run_dest(
            guest,
            config,
            name,
            args.listen,
            args.strategy or config.strategy if args.spec else args.strategy,
            args.expect_uuid,
            args.json,
            args.quiet,
            args.run_after,
            summary_out=not args.no_summary,
            attempts=args.attempts,
        )
    raise ConfigError(f"unknown command {args.command}")
