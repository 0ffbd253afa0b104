"""The fault matrix of issue 5, promise 1, with real processes.

For every phase (handshake, bulk, dirty, stop-and-copy, state, completion)
and every fault (link cut, one byte flipped, stream truncated, link stalled
with both sockets open, destination killed, source killed), a destination
and a source host process (`python3 -m migrate dest/source`) migrate a small
running guest through migrate/faultproxy.py, which injects the fault when
the phase is reached; kills are done here, from the proxy's callback, with
SIGKILL.  Each case then checks what the issue promises:

- nothing hangs: every process that was not killed exits within BOUND_S
  seconds of the fault;
- each exits with a one-line reason (its JSON ``error``, also on stderr) and
  no Traceback;
- never on two hosts: the destination and the source never both end up
  with the guest;
- before GO: the source keeps the guest (status failed, ``guest_on ==
  "source"``) unless the source itself died; the destination resumes only if
  the source completed; when the source died the destination discards;
- after GO (the source has given the guest up; the window where neither side
  can be sure): the guest must not be lost.  Either the destination runs it
  and the source's result says so (``guest_on`` starting "destination"), or a
  side keeps it paused and the source's one-line reason gives the command (in
  backquotes, ``mte-migrate ...``) that resumes it: the test runs that command
  against the destination, as an operator would, while the destination still
  waits, and then requires the destination to run the guest.

After the postcopy switch (``test_postcopy_fault_matrix``) the promise is
different, since neither side alone holds the guest: where the link can
come back (cut, flip, truncate, a short stall, a lost RESUMED) the source
reconnects with --retry and the migration completes, validated; where it
cannot (a lasting stall, a killed side) each survivor's status says what is
lost and what is kept (see ``postcopy_violations``).

The cases run concurrently (FAULT_WORKERS, default 4; most of the long ones
only wait) from one module fixture, so the matrix takes about two and a half
minutes on two cores; each parametrized test waits for its own case and
asserts on it.  With $FAULT_REPORT set, the outcomes (exit times, statuses,
reasons, the proxy's event log) are also written there as JSON:
docs/RELIABILITY.md was made from such a run.
"""

import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from migrate.tools.faultproxy import ProxyThread

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 3  # --timeout of both sides: a silent peer is dead after this long
BOUND_S = 45.0  # every surviving process must have exited this long after the fault: detection
#                          (3 x --timeout) plus a destination's bounded in-doubt hold (30 s today)
FIRE_S = 45.0  # the phase must be reached this long after the source started
BULK_BYTES = 4 << 20  # 'bulk': fault after 4 MiB of pass-0 PAGES frames (of ~17 MiB)
WORKERS = int(os.environ.get("FAULT_WORKERS", "4"))
COMMAND = re.compile(r"`(mte-migrate [^`]+)`")

GUEST = ["--scenario", "allocator", "--ram", "32MiB", "--timeout", str(TIMEOUT_S), "--in-doubt-hold", "20"]
SOURCE_ONLY = ["--max-bandwidth", "20M", "--max-passes", "3"]

PHASES = [
    "handshake",
    "bulk",
    "dirty",
    "stop-and-copy",
    "state",
    "completion:COMPLETE",
    "completion:CONFIRM",
    "completion:GO",
]
FAULTS = ["cut", "flip", "truncate", "stall", "kill-dest", "kill-source"]
AFTER_GO = ("completion:GO", "completion:RESUMED")  # the source has sent GO: it has given the guest up

CASES = [pytest.param(p, f, id=f"{p}-{f}") for p in PHASES for f in FAULTS]

# After the postcopy switch (the proxy's phase "postcopy": some pages have
# landed, more are owed).  Both sides hold for POSTCOPY_HOLD_S; the source
# reconnects by itself (--retry).  "stall-short" stalls for less than the
# timeout, "stall-long" for more (both sides time out, then the path comes
# back); "stall" never ends (a lasting partition); "cut-resumed" cuts the
# link as the destination's RESUMED (every page landed) goes out.
POSTCOPY_HOLD_S = 10
POSTCOPY_DEST = ["--postcopy-hold", str(POSTCOPY_HOLD_S)]
POSTCOPY_SOURCE = [
    *("--postcopy", "--postcopy-after-passes", "1", "--strategy", "memfd-continue"),
    # a limit no dirty pass meets: precopy never converges first, however
    # fast this machine lands pages, so every row reaches the switch
    *("--downtime-limit", "1"),
    *("--retry", "3", "--postcopy-hold", str(POSTCOPY_HOLD_S)),
]
POSTCOPY_FAULTS = [
    *("cut", "flip", "truncate", "stall-short", "stall-long", "stall", "kill-dest", "kill-source", "cut-resumed")
]
# the link broke and came back: a reconnection completes the migration
POSTCOPY_RECOVERED = ("cut", "flip", "truncate", "stall-long", "cut-resumed")
POSTCOPY_STALLS = {"stall-short": 1.0, "stall-long": 2 * TIMEOUT_S}
# The last confirmation lost: the destination resumed on GO, its RESUMED never
# arrives.  Issue 5 asks for a message that says which side has the guest (and
# a command where one is needed).  This passes with the code of 2026-11-28
# (the source reports guest_on "destination (in doubt: ...)"), so it is not
# marked xfail; see docs/RELIABILITY.md for exactly what happens.
CASES.append(pytest.param("completion:RESUMED", "cut", id="completion:RESUMED-cut"))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("PYTHONWARNINGS", None)
    return env


def _kill_group(proc) -> None:
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc is not None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class Side:
    role: str
    rc: int | None = None
    exited_after_fault_s: float | None = None
    killed_by_test: bool = False  # the fault (kill-*)
    hung: bool = False  # still running BOUND_S after the fault: killed by the test
    result: dict | None = None
    stderr: str = ""

    @property
    def status(self):
        return self.result.get("status") if self.result else None

    @property
    def guest_on(self):
        return self.result.get("guest_on") if self.result else None

    @property
    def error(self):
        return self.result.get("error") if self.result else None


@dataclass
class Outcome:
    phase: str
    fault: str
    fired: bool = False
    fired_frame: str | None = None
    fired_after_start_s: float | None = None
    source: Side = field(default_factory=lambda: Side("source"))
    dest: Side = field(default_factory=lambda: Side("destination"))
    proxy_events: list = field(default_factory=list)
    followed: dict | None = None  # the command the source's message gave, as the test ran it
    operator: str | None = None  # what the test did as the operator of an in-doubt hold
    wall_s: float = 0.0
    harness_error: str | None = None


def _readline(proc, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


def _follow_command(out: Outcome, dest_address: str) -> None:
    """The source's one-line reason names a command (in backquotes) that
    settles the in-doubt window: run it, as an operator would, against the
    destination itself (the proxy stands for the broken path)."""
    match = COMMAND.search(out.source.error or "")
    if not match:
        return
    args = shlex.split(match.group(1))[1:]
    if "--connect" in args and args.index("--connect") + 1 < len(args):
        args[args.index("--connect") + 1] = dest_address
    try:
        cp = subprocess.run(
            [sys.executable, "-m", "migrate", *args],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=30,
            start_new_session=True,
        )
        rc, text = cp.returncode, (cp.stdout + cp.stderr).strip()
    except subprocess.TimeoutExpired:
        rc, text = None, "timed out after 30 s"
    out.followed = {
        "command": match.group(1),
        "ran": "mte-migrate " + " ".join(args),
        "rc": rc,
        "output": " | ".join(text.splitlines()[-3:]),
    }


HOLDING = re.compile(r"IN DOUBT: .*\(session (\w+)\).*`kill -USR1 (\d+)`")


def _operator(out: Outcome, procs: dict, files: dict, dest_address: str) -> bool:
    """The source printed that it holds the guest paused in doubt.  An
    operator who can see both hosts settles it: the destination is dead, so
    resume the guest on the source (the printed `kill -USR1`); or it is
    alive, so tell it to resume the guest (`mte-migrate resolve ... go`)."""
    if out.operator is not None:
        return False
    files["source"].flush()
    files["source"].seek(0)
    match = HOLDING.search(files["source"].read())
    files["source"].seek(0, 2)
    if not match:
        return False
    session, pid = match.group(1), int(match.group(2))
    if procs["destination"].poll() is not None:
        os.kill(pid, signal.SIGUSR1)
        out.operator = f"destination dead: kill -USR1 {pid}"
    else:
        cp = subprocess.run(
            [sys.executable, "-m", "migrate", "resolve", "--connect", dest_address, "--session", session, "go"],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        out.operator = f"destination alive: resolve go -> rc {cp.returncode} {(cp.stdout + cp.stderr).strip()!r}"
    return False


def run_case(
    phase: str,
    fault: str,
    workdir: Path,
    dest_args=(),
    source_args=(),
    stall_s: float | None = None,
    operator=None,
) -> Outcome:
    """One cell of the matrix: destination, proxy, source; fault; wait; collect.
    ``operator(out, procs, files, dest_address)`` acts on what the processes
    say while the source runs (default: settle an in-doubt hold)."""
    operator = operator or _operator
    workdir.mkdir(parents=True, exist_ok=True)
    out = Outcome(phase, fault)
    t0 = time.monotonic()
    procs: dict[str, subprocess.Popen] = {}
    proxy = None
    base = [sys.executable, "-m", "migrate"]
    files = {role: open(workdir / f"{role}.stderr", "w+") for role in ("source", "destination")}
    sides = {"source": out.source, "destination": out.dest}

    def load(role):
        side, path = sides[role], workdir / f"{role}.json"
        if side.result is None and path.exists():
            try:
                side.result = json.loads(path.read_text())
            except ValueError:
                side.result = None

    def wait(until, deadline, t_fault):
        while True:
            now = time.monotonic()
            for role, p in procs.items():
                if p.poll() is not None and sides[role].exited_after_fault_s is None:
                    sides[role].exited_after_fault_s = round(now - t_fault, 3)
            if until() or now >= deadline:
                return
            time.sleep(0.05)

    try:
        procs["destination"] = subprocess.Popen(
            base + ["dest", "--listen", "127.0.0.1:0", *GUEST, *dest_args, "--json", str(workdir / "destination.json")],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=files["destination"],
            text=True,
            start_new_session=True,
        )
        line = _readline(procs["destination"], 30)
        if not line.startswith("listening on "):
            out.harness_error = f"destination did not start listening: {line!r}"
            return out
        dest_address = line.removeprefix("listening on ")
        host, _, port = dest_address.rpartition(":")

        def on_phase(name):  # runs in the proxy's loop, before the fault is applied
            if fault in ("kill-dest", "kill-source"):
                role = "destination" if fault == "kill-dest" else "source"
                victim = procs.get(role)
                if victim is not None and victim.poll() is None:
                    os.killpg(victim.pid, signal.SIGKILL)
                    victim.wait()
                    sides[role].killed_by_test = True

        proxy = ProxyThread((host, int(port)), fault, phase, bulk_bytes=BULK_BYTES, on_phase=on_phase, stall_s=stall_s)
        t_src = time.monotonic()
        procs["source"] = subprocess.Popen(
            base
            + [
                "source",
                "--connect",
                f"{proxy.address[0]}:{proxy.address[1]}",
                *GUEST,
                *SOURCE_ONLY,
                *source_args,
                "--json",
                str(workdir / "source.json"),
            ],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=files["source"],
            text=True,
            start_new_session=True,
        )

        # The phase, then the source, then (after following its command, if
        # it gives one) the destination: all within bounds.
        deadline = t_src + FIRE_S
        while time.monotonic() < deadline and not proxy.fired.is_set():
            if all(p.poll() is not None for p in procs.values()):
                break
            time.sleep(0.05)
        out.fired = proxy.fired.is_set()
        t_fault = proxy.proxy.fired_at if out.fired and proxy.proxy.fired_at else time.monotonic()
        if out.fired:
            out.fired_frame = proxy.proxy.fired_frame
            out.fired_after_start_s = round(t_fault - t_src, 3)
        deadline = t_fault + BOUND_S
        # A source that holds the guest in doubt asks the operator; act as one.
        wait(lambda: procs["source"].poll() is not None or operator(out, procs, files, dest_address), deadline, t_fault)
        wait(lambda: procs["source"].poll() is not None, deadline, t_fault)
        if procs["source"].poll() is not None and not out.source.killed_by_test:
            load("source")
            if procs["destination"].poll() is None:
                _follow_command(out, dest_address)
        wait(lambda: all(p.poll() is not None for p in procs.values()), deadline, t_fault)
        for role, p in procs.items():
            if p.poll() is None:
                sides[role].hung = True
                _kill_group(p)
            sides[role].rc = p.returncode
            load(role)
            files[role].seek(0)
            sides[role].stderr = files[role].read()
        out.proxy_events = [f"{t - t_src:+.3f}s {text}" for t, text in proxy.events]
    finally:
        for p in procs.values():
            _kill_group(p)
        if proxy is not None:
            proxy.close()
        for f in files.values():
            f.close()
        out.wall_s = round(time.monotonic() - t0, 3)
    return out


def run_postcopy_case(fault: str, workdir: Path, dest_args=(), source_args=(), operator=None) -> Outcome:
    """A postcopy row: the fault after the switch."""
    stall_s = POSTCOPY_STALLS.get(fault)
    out = run_case(
        "completion:RESUMED" if fault == "cut-resumed" else "postcopy",
        "stall" if fault in POSTCOPY_STALLS else "cut" if fault == "cut-resumed" else fault,
        workdir,
        [*POSTCOPY_DEST, *dest_args],
        [*POSTCOPY_SOURCE, *source_args],
        stall_s=stall_s,
        operator=operator,
    )
    out.fault = fault
    return out


def postcopy_violations(o: Outcome, fault: str) -> list[str]:
    """After the switch: where the link can be restored, nothing is lost
    (completed, validated, no wrong tags); where it cannot, each surviving
    side's status says what is lost and what is kept."""
    if o.harness_error:
        return [o.harness_error]
    v = [] if o.fired else ["phase postcopy was never reached"]
    src, dst = o.source, o.dest
    for side in (src, dst):
        if side.killed_by_test:
            continue
        if side.hung:
            v.append(f"{side.role} still running {BOUND_S:g} s after the fault (killed by the test)")
        elif "Traceback" in side.stderr:
            v.append(f"{side.role} printed a Traceback")
        elif side.result is None:
            v.append(f"{side.role} wrote no JSON result (exit status {side.rc})")
        elif side.status != "completed" and (not side.error or side.error not in side.stderr or side.rc == 0):
            v.append(f"{side.role} failed without a one-line reason on stderr and a failing exit: {side.error!r}")
    if v:
        return v
    if dst.status == "completed" and src.guest_on == "source":
        v.append("the guest runs on two hosts")
    # The one race where the link breaks during the switch itself, before
    # the destination resumed the guest: it discards its copy and tells the
    # source, which runs the guest on.  Nothing is lost that way either.
    unswitched = (
        src.guest_on == "source"
        and "before the guest resumed on the destination" in str(src.error)
        and str(dst.guest_on).startswith("nowhere (partial state discarded)")
    )
    if fault in (*POSTCOPY_RECOVERED, "stall-short") and not unswitched:
        if not (src.status == dst.status == "completed"):
            v.append(f"not completed: source {src.status!r} ({src.error}), destination {dst.status!r} ({dst.error})")
        else:
            pc = dst.result["postcopy"]
            if not src.result["validation"].get("ok"):
                v.append(f"validation failed: {src.result['validation']}")
            if pc["guest_wrong_tag_accesses"] or pc["pages_verified"] != pc["pages"]:
                v.append(f"pages or tags lost on the way: {pc}")
            if fault in POSTCOPY_RECOVERED and not src.result.get("postcopy_recovery", {}).get("pauses"):
                v.append("completed without a recorded pause: the fault did not break the link")
    if fault in ("stall", "kill-dest"):
        if src.status != "postcopy-paused" or not str(src.guest_on).startswith("split"):
            v.append(f"the source should end postcopy-paused, split: {src.status!r}, {src.guest_on!r}")
        elif fault == "kill-dest" and "the destination is gone" not in src.error:
            v.append(f"the source does not say the destination is gone: {src.error!r}")
        elif "paused copy" not in src.error:
            v.append(f"the source does not say it held the paused copy: {src.error!r}")
    if fault in ("stall", "kill-source") and not str(dst.guest_on).startswith("nowhere (partial state discarded)"):
        if dst.status != "postcopy-lost" or "cannot proceed" not in str(dst.error):
            v.append(f"the destination should end postcopy-lost, saying why: {dst.status!r}, {dst.error!r}")
    return v


def violations(o: Outcome) -> list[str]:
    """Every promise of issue 5 (fault matrix) that this outcome breaks."""
    if o.harness_error:
        return [o.harness_error]
    v = []
    if not o.fired:
        v.append(f"phase {o.phase} was never reached")
    src, dst = o.source, o.dest
    for side in (src, dst):
        if side.killed_by_test:
            continue
        if side.hung:
            v.append(f"{side.role} still running {BOUND_S:g} s after the fault (killed by the test)")
            continue
        if "Traceback" in side.stderr:
            v.append(f"{side.role} printed a Traceback")
        if side.result is None:
            v.append(f"{side.role} wrote no JSON result (exit status {side.rc})")
            continue
        if side.status != "completed":
            err = side.error
            if not err or "\n" in err:
                v.append(f"{side.role} failed without a one-line reason: {err!r}")
            elif err not in side.stderr:
                v.append(f"{side.role}'s reason is not on its stderr")
            if side.rc == 0:
                v.append(f"{side.role} failed but exited 0")
    dst_runs = dst.status == "completed" or dst.guest_on == "destination"
    src_kept = not src.killed_by_test and src.guest_on == "source"
    if dst_runs and src_kept:
        v.append("the guest runs on two hosts: the destination resumed it and the source kept it")
    if src.killed_by_test:
        if dst_runs and o.phase != "completion:RESUMED":
            v.append(
                f"the source was killed before GO reached the destination, yet the destination resumed "
                f"(status {dst.status!r}, guest_on {dst.guest_on!r}) instead of discarding"
            )
    elif src.result is not None and not src.hung:
        if o.phase not in AFTER_GO:  # before GO: the guest stays with the source
            if src.status != "completed" and src.guest_on != "source":
                v.append(f"the source failed before GO but reports guest_on {src.guest_on!r}, not 'source'")
            if dst_runs and src.status != "completed":
                v.append(
                    f"the destination resumed (guest_on {dst.guest_on!r}) but the source reports status "
                    f"{src.status!r}: it never sent GO"
                )
        elif src.status != "completed":  # after GO: the window where neither side can be sure
            if not dst_runs and not src_kept:
                how = (
                    f"following the source's command `{o.followed['ran']}` gave: {o.followed['output']!r}"
                    if o.followed
                    else "the source gave no command in backquotes that could resume it"
                    if not COMMAND.search(src.error or "")
                    else "its command names the destination, which was killed"
                    if dst.killed_by_test
                    else "its command names the destination, which had already exited"
                )
                v.append(
                    f"the guest is lost: after GO it runs nowhere (source guest_on {src.guest_on!r}; "
                    f"destination status {dst.status!r}, guest_on {dst.guest_on!r}); {how}"
                )
            elif (
                dst_runs
                and not str(src.guest_on).startswith("destination")
                and not (o.operator and o.operator.startswith("destination alive") and "unknown" in str(src.guest_on))
            ):
                # (when the operator settled it at the destination, the source
                # cannot know and must say "unknown", never "source")
                v.append(f"the destination runs the guest but the source does not say so: guest_on {src.guest_on!r}")
    if src.status == "completed" and not (dst.status == "completed" and src.result["validation"].get("ok")):
        v.append(
            f"the source completed but the destination has status {dst.status!r} "
            f"(validation ok: {src.result['validation'].get('ok')})"
        )
    return v


# -- running the matrix concurrently ---------------------------------------------------
class Matrix:
    def __init__(self, cases, workdir: Path):
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="fault-case")
        # Stalls take longest: start them first.
        order = sorted(cases, key=lambda c: (c[1] != "stall", not c[0].startswith("completion")))
        self._futures = {
            c: self._pool.submit(
                run_postcopy_case if c[0] == "postcopy" else run_case,
                *((c[1],) if c[0] == "postcopy" else c),
                workdir / f"{c[0]}-{c[1]}".replace(":", "_"),
            )
            for c in order
        }

    def get(self, phase, fault) -> Outcome:
        return self._futures[(phase, fault)].result()

    def shutdown(self):
        self._pool.shutdown(wait=True, cancel_futures=True)
        path = os.environ.get("FAULT_REPORT")
        if path:
            done = [f.result() for f in self._futures.values() if f.done() and not f.cancelled() and not f.exception()]
            rows = []
            for o in done:
                d = asdict(o)
                d["violations"] = postcopy_violations(o, o.fault) if o.phase == "postcopy" else violations(o)
                for role in ("source", "dest"):
                    d[role]["stderr"] = d[role]["stderr"][-2000:]
                    if d[role]["result"]:
                        r = d[role]["result"]
                        d[role]["result"] = {k: r.get(k) for k in ("status", "error", "guest_on", "total_time_ms")}
                rows.append(d)
            Path(path).write_text(json.dumps(rows, indent=1))


@pytest.fixture(scope="module")
def matrix(request, tmp_path_factory):
    cases = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if spec is not None and item.originalname == "test_fault_matrix":
            cases.append((spec.params["phase"], spec.params["fault"]))
        if spec is not None and item.originalname == "test_postcopy_fault_matrix":
            cases.append(("postcopy", spec.params["fault"]))
    m = Matrix(cases, tmp_path_factory.mktemp("faults"))
    yield m
    m.shutdown()


def _describe(o: Outcome) -> str:
    def side(s):
        if s.killed_by_test:
            return f"{s.role}: killed by the test"
        tail = " | ".join(s.stderr.strip().splitlines()[-3:])
        return (
            f"{s.role}: rc {s.rc}, exited {s.exited_after_fault_s} s after the fault, status {s.status!r}, "
            f"guest_on {s.guest_on!r}, error {s.error!r}, stderr: {tail}"
        )

    return "\n".join(
        [
            f"fault {o.fault} at {o.phase}: fired on {o.fired_frame} "
            f"{o.fired_after_start_s} s after the source started",
            side(o.source),
            side(o.dest),
            "proxy: " + " / ".join(o.proxy_events[-6:]),
        ]
    )


@pytest.mark.slow
@pytest.mark.parametrize("phase,fault", CASES)
def test_fault_matrix(matrix, phase, fault):
    o = matrix.get(phase, fault)
    problems = violations(o)
    assert not problems, "\n".join(problems) + "\n" + _describe(o)


@pytest.mark.slow
@pytest.mark.parametrize("fault", POSTCOPY_FAULTS)
def test_postcopy_fault_matrix(matrix, fault):
    o = matrix.get("postcopy", fault)
    problems = postcopy_violations(o, fault)
    assert not problems, "\n".join(problems) + "\n" + _describe(o)


# -- the proxy itself -----------------------------------------------------------------
@pytest.mark.slow
def test_proxy_without_fault_sees_every_phase_in_order(tmp_path):
    """Baseline: through the proxy, with the matrix's options, a migration
    completes and passes every marker the matrix uses, in protocol order,
    with at least one dirty pass before stop-and-copy."""
    o = run_case("completion:RESUMED", "none", tmp_path)
    assert o.source.status == "completed", _describe(o)
    assert o.dest.status == "completed" and o.dest.guest_on == "destination", _describe(o)
    markers = [e.split("marker ", 1)[1].split(": ")[0] for e in o.proxy_events if " marker " in e]
    assert markers == [
        "handshake:HELLO",
        "handshake:WELCOME",
        "bulk",
        "dirty",
        "stop-and-copy",
        "state",
        "completion:COMPLETE",
        "completion:CONFIRM",
        "completion:GO",
        "completion:RESUMED",
    ], markers
    passes = json.loads((tmp_path / "source.json").read_text())["passes"]
    assert any(p["pass"] >= 1 and not p["final"] for p in passes), passes


def test_proxy_command_line_cut_at_handshake(tmp_path):
    """The command-line form: 'listening on', 'phase handshake reached', and a
    source that fails cleanly, keeping its guest."""
    env = _env()
    base = [sys.executable, "-m", "migrate"]
    procs = []
    try:
        dest = subprocess.Popen(
            base + ["dest", "--listen", "127.0.0.1:0", "--ram", "16MiB", "--timeout", "3"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        procs.append(dest)
        target = _readline(dest, 30).removeprefix("listening on ")
        proxy = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "migrate.tools.faultproxy",
                "--target",
                target,
                "--fault",
                "cut",
                "--at",
                "handshake",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        procs.append(proxy)
        line = _readline(proxy, 30)
        assert line.startswith("listening on "), line
        src = subprocess.run(
            base
            + [
                "source",
                "--connect",
                line.removeprefix("listening on "),
                "--ram",
                "16MiB",
                "--timeout",
                "3",
                "--json",
                str(tmp_path / "s.json"),
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            start_new_session=True,
        )
        assert _readline(proxy, 10) == "phase handshake:HELLO reached"
        assert src.returncode == 1 and "Traceback" not in src.stderr, src.stderr
        result = json.loads((tmp_path / "s.json").read_text())
        assert result["status"] == "failed" and result["guest_on"] == "source", result
        assert dest.wait(timeout=30) == 1
        assert "Traceback" not in dest.stderr.read()
    finally:
        for p in procs:
            _kill_group(p)


def test_proxy_refuses_unknown_phase_and_fault():
    cp = subprocess.run(
        [
            sys.executable,
            "-m",
            "migrate.tools.faultproxy",
            "--target",
            "127.0.0.1:1",
            "--fault",
            "cut",
            "--at",
            "teatime",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cp.returncode == 2 and "unknown phase" in cp.stderr and "Traceback" not in cp.stderr


def test_the_postcopy_phase_waits_for_the_destinations_first_request():
    # POSTCOPY tables alone do not show that the destination switched: a
    # reset loses the frames it has not read yet, STATE among them.
    from migrate.protocol.frames import FrameType
    from migrate.tools.faultproxy import DOWN, UP, FaultProxy, FrameInfo

    proxy = FaultProxy(("127.0.0.1", 9), "cut", "postcopy")
    link = types.SimpleNamespace(control=True, index=0)

    def frame(ftype, payload_len=0):
        return FrameInfo(0, ftype, 0, 0, payload_len)

    table = frame(FrameType.POSTCOPY, 64)
    assert [proxy._marker(link, UP, table) for _ in range(3)] == [None, None, None]
    assert proxy._marker(link, DOWN, frame(FrameType.REQUEST)) is None
    assert proxy._marker(link, UP, table) == "postcopy"
    proxy.seen["postcopy"] = 0.0
    assert proxy._marker(link, UP, table) is None  # once
