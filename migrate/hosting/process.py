"""One host process: build the host (the simulator or a real KVM, by
``--host``) from a scenario and run the source or destination side of a
migration on it."""

import asyncio
import gc
import json
import resource
import signal
import socket
import sys
import time

from hosts import Host, HostUnavailable, make_host
from migrate.config.spec import GuestSpec, MigrationConfig
from migrate.engine.dest import DestVmm
from migrate.engine.progress import Progress
from migrate.engine.report import summary, write_json
from migrate.engine.source import SourceVmm
from migrate.errors import ConfigError, one_line
from migrate.net.transport import parse_address
from migrate.strategies import STRATEGIES

#: how long the source waits for a self-checking guest's verdict after the
#: guest resumed there (it returns as soon as one comes)
GUEST_REPORT_WAIT_S = 60.0


def _huge_pages(guest: GuestSpec, role: str, postcopy: bool) -> str | None:
    """How this side's guest RAM goes on huge pages (the huge_pages option),
    "auto" or "on", or None: only a destination's, whose pages all arrive
    fresh."""
    if role != "destination" or guest.huge_pages == "off":
        return None
    if guest.huge_pages == "auto":
        return "auto" if guest.host == "sim" and not postcopy else None
    if guest.host != "sim":
        raise ConfigError("--huge-pages on: only the simulated host can (the kvm backend maps memfds)")
    if postcopy:
        raise ConfigError("--huge-pages on cannot go with --postcopy: userfaultfd needs 4 KiB pages")
    return "on"


def build_host(guest: GuestSpec, strategy: str, role: str, postcopy: bool = False) -> Host:
    """The source boots and fills its guest; the destination only creates an
    empty VM of the same shape (MTE enabled before its vCPUs, as KVM requires).
    ``postcopy``: this migration may switch to postcopy (its config says so)."""
    prot_mte = STRATEGIES[strategy].vmm_prot_mte if strategy in STRATEGIES else False
    huge = _huge_pages(guest, role, postcopy)
    try:
        host = make_host(
            guest.host,
            guest.ram,
            mte=guest.mte,
            vcpus=guest.vcpus,
            workload=guest.workload if role == "source" else "idle",
            workload_params=guest.params if role == "source" else {"fill": 0},
            rate=guest.rate,
            seed=guest.seed,
            device_prot_mte=prot_mte,
            **({"huge_pages": huge} if huge else {}),
        )
    except HostUnavailable as exc:
        raise ConfigError(f"--host {guest.host}: {exc}") from None
    except (ValueError, OSError) as exc:
        raise ConfigError(f"cannot create the {role} guest: {one_line(exc)}") from None
    if huge == "on" and host.memory.backing != "huge":
        host.close()
        raise ConfigError(f"--huge-pages on: {host.memory.backing_note}")
    if role == "source":
        if guest.image:
            try:
                path = guest.image
                if path.startswith("builtin:"):
                    from migrate.hosting.images import builtin_image

                    path = builtin_image(path, guest.ram - guest.image_offset, guest.seed)
                host.memory.load_image(path, guest.image_offset, guest.image_repeat)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot load image {guest.image}: {one_line(exc)}") from None
        host.prepare_guest()
    return host


# _settle_heap: what is alive once the host is built (modules, the guest,
# its data pool) lives to the end of the process.  gc.freeze() takes it out
# of the collector's sight, so that the collections the migration's own
# allocations set off stop walking it (20-40 ms of a 1 GiB migration's CPU
# on each side, in perf).


def _peak_rss() -> int:
    """Peak resident set of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _CpuMeter:
    """CPU seconds of this process (all threads: VMM, vCPUs, helpers) and of
    the calling thread (the VMM's migration event loop) since creation."""

    def __init__(self):
        self._proc = self._process()
        self._thread = time.thread_time()
        self.free_ram_s = 0.0  # the CPU of freeing guest RAM, kept apart (see run_dest)

    @staticmethod
    def _process() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def read(self) -> dict:
        return {
            "process_s": round(self._process() - self._proc, 4),
            "migration_thread_s": round(time.thread_time() - self._thread, 4),
            "free_ram_s": round(self.free_ram_s, 4),
        }

    def apart(self, work) -> None:
        """Run ``work`` with its CPU time left out of process_s and
        migration_thread_s (counted in free_ram_s instead)."""
        before, thread_before = self._process(), time.thread_time()
        try:
            work()
        finally:
            spent = self._process() - before
            self._proc += spent
            self._thread += time.thread_time() - thread_before  # called on the meter's thread
            self.free_ram_s += spent


def _install_cancel(loop, task) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, task.cancel)
        except (NotImplementedError, RuntimeError):
            pass


def _exit_code(result: dict) -> int:
    if result["status"] == "completed" and result["validation"].get("ok", True):
        return 0
    return 130 if result["status"] == "cancelled" else 1


def _prefix_counters(result: dict, side: str) -> None:
    result["counters"] = {f"{side}.{k}": v for k, v in result["counters"].items()}


def run_source(
    guest: GuestSpec,
    config: MigrationConfig,
    scenario: str,
    connect,
    json_path: str | None,
    quiet: bool,
    warmup_s: float = 0.2,
    summary_out: bool = True,
    retry: int = 0,
) -> int:
    """Boot the guest and migrate it.  ``connect``: one address or a list,
    tried in order; with ``retry`` N, up to N more attempts follow a failure
    (not a cancel) while the guest keeps running here."""
    addresses = [connect] if isinstance(connect, str) else list(connect)
    try:
        parsed = [parse_address(a, "--connect") for a in addresses]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if retry < 0:
        raise ConfigError("--retry must be 0 or more")
    t0 = time.perf_counter()
    host = build_host(guest, config.strategy, "source", config.postcopy)
    gc.freeze()  # see _settle_heap
    prepare_ms = (time.perf_counter() - t0) * 1000
    progress = Progress(False if quiet else None)
    populated = host.memory.populated_pages() * 4096  # the RAM the guest actually touched
    host.vcpus.start()
    time.sleep(warmup_s)
    attempts = []

    async def main():
        loop = asyncio.get_running_loop()
        result = None
        for n in range(retry + 1):
            address = parsed[n % len(parsed)]
            engine = SourceVmm(host, config, scenario, progress)
            # After a postcopy switch a new migration cannot start: the same
            # one resumes (the retries left are its reconnections).
            engine.postcopy_retries = retry - n
            task = asyncio.ensure_future(engine.migrate(address))
            _install_cancel(loop, task)
            try:
                result = await task
            except asyncio.CancelledError:  # cancelled before migrate() could catch it
                result = engine.result
                result["status"], result["error"] = "cancelled", result["error"] or "cancelled by the user"
            attempts.append(
                {
                    "attempt": n + 1,
                    "destination": f"{address[0]}:{address[1]}",
                    "status": result["status"],
                    "error": result["error"],
                    "total_time_ms": result["total_time_ms"],
                }
            )
            # after a postcopy switch the engine made the retries itself
            postcopy = result["status"] == "postcopy-paused" or (
                "postcopy_recovery" in result and result["guest_on"] != "source"
            )
            if result["status"] in ("completed", "cancelled") or postcopy or n == retry:
                return result
            progress.message(
                f"attempt {n + 1} failed ({result['error']}); the guest runs on here; "
                f"retrying {'with ' + ':'.join(map(str, parsed[(n + 1) % len(parsed)])) if len(parsed) > 1 else ''}".rstrip()
            )
            await asyncio.sleep(min(1.0, 0.2 * (n + 1)))  # the guest keeps running meanwhile
        return result

    cpu = _CpuMeter()
    try:
        result = asyncio.run(main())
        result["cpu"] = cpu.read()
        # A guest that goes on here says what it finds in its memory now
        # (waited for); one handed over says what it last found here.
        report = host.guest_report(GUEST_REPORT_WAIT_S if result["guest_on"] == "source" else 0.0)
        if report is not None:
            result["guest"] = report
    finally:
        cpu.apart(host.close)
    result["cpu"]["free_ram_s"] = round(cpu.free_ram_s, 4)  # after process_s was read, as on the destination
    progress.done()
    result["attempts"] = attempts
    result["guest_prepare_ms"] = round(prepare_ms, 3)
    result["guest_populated_bytes"] = populated
    result["ram"]["backing"] = host.memory.backing
    result["peak_rss_bytes"] = _peak_rss()
    _prefix_counters(result, "source")
    if json_path:
        write_json(result, json_path)
    if not quiet and summary_out:
        print(summary(result), file=sys.stderr)
    elif quiet and summary_out and result["error"]:
        print(f"mte-migrate source: {result['status']}: {result['error']}", file=sys.stderr)
    return _exit_code(result)


def run_dest(
    guest: GuestSpec,
    config: MigrationConfig,
    scenario: str,
    listen: str,
    strategy: str | None,
    expect_uuid: str | None,
    json_path: str | None,
    quiet: bool,
    run_after_s: float = 0.0,
    summary_out: bool = True,
    attempts: int = 1,
) -> int:
    """Listen and receive a migration; after a failed one, discard the partial
    guest and accept another, up to ``attempts`` in all."""
    try:
        host_name, port = parse_address(listen, "--listen")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if attempts < 1:
        raise ConfigError("--attempts must be at least 1")
    try:
        listener = socket.create_server((host_name, port), reuse_port=False)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror}") from None
    bound = listener.getsockname()
    progress = Progress(False if quiet else None)
    cpu = _CpuMeter()
    history = []
    result = None

    def new_vm():
        """A fresh, empty VM; with --prealloc its RAM allocated now."""
        vm_host = build_host(guest, strategy or config.strategy, "destination", config.postcopy)
        t = time.perf_counter()
        if config.prealloc:
            vm_host.memory.prefault(0, vm_host.memory.npages)
        return vm_host, round((time.perf_counter() - t) * 1000, 3)

    try:
        # The first VM exists (and its RAM, with --prealloc) before this
        # says it listens: whoever starts the source waits for that line.
        first = new_vm()
        gc.freeze()  # see _settle_heap
        print(f"listening on {bound[0]}:{bound[1]}", flush=True)
        for n in range(attempts):
            host, prealloc_ms = first if n == 0 else new_vm()
            engine = DestVmm(host, config, scenario, strategy, expect_uuid, progress)
            if config.prealloc:
                engine.result["prealloc_ms"] = prealloc_ms

            async def main(engine=engine):
                task = asyncio.ensure_future(engine.serve(listener))
                _install_cancel(asyncio.get_running_loop(), task)
                try:
                    return await task
                except asyncio.CancelledError:
                    engine.result["status"] = "cancelled"
                    engine.result["error"] = engine.result["error"] or "cancelled before a source connected"
                    return engine.result

            try:
                result = asyncio.run(main())
                if result["status"] == "completed":
                    # The guest runs on here for a while; a guest that checks
                    # itself says what it found once it has run (that ends the wait).
                    t = time.perf_counter()
                    report = host.guest_report(run_after_s)
                    if report is not None:
                        result["guest"] = report
                    else:
                        time.sleep(max(0.0, run_after_s - (time.perf_counter() - t)))
            finally:
                # A failed attempt's partial guest is discarded here.  Freeing
                # the guest's RAM (0.1-0.2 s a GiB of page freeing) is kept
                # out of process_s, as QEMU's CPU is read while it still runs.
                cpu.apart(host.close)
            result["ram"]["backing"] = host.memory.backing
            history.append({"attempt": n + 1, "status": result["status"], "error": result["error"]})
            if result["status"] in ("completed", "cancelled"):
                break
    finally:
        listener.close()
    result["cpu"] = cpu.read()
    result["attempts"] = history
    result["peak_rss_bytes"] = _peak_rss()
    _prefix_counters(result, "destination")
    # The destination cannot judge validation; the source compares digests.
    result["validation"]["mode"] = None
    if json_path:
        write_json(result, json_path)
    if not quiet and summary_out:
        print(summary(result), file=sys.stderr)
    elif quiet and summary_out and result["error"]:
        print(f"mte-migrate dest: {result['status']}: {result['error']}", file=sys.stderr)
    return 0 if result["status"] == "completed" else (130 if result["status"] == "cancelled" else 1)


def spec_to_json(guest: GuestSpec, config: MigrationConfig, scenario: str) -> str:
    return json.dumps({"scenario": scenario, "guest": guest.to_dict(), "migration": config.to_dict()})


def spec_from_json(text: str) -> tuple[GuestSpec, MigrationConfig, str]:
    doc = json.loads(text)
    return GuestSpec.from_dict(doc["guest"]), MigrationConfig.from_dict(doc["migration"]), doc["scenario"]
