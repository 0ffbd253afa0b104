"""One host process: build the simulated host from a scenario and run the
source or destination side of a migration on it."""

import asyncio
import json
import resource
import signal
import socket
import sys
import time

from hosts import SimulatedHost

from .config import GuestSpec, MigrationConfig
from .dest import DestVmm
from .errors import ConfigError, one_line
from .progress import Progress
from .report import empty_result, summary, write_json
from .source import SourceVmm
from .strategies import STRATEGIES
from .transport import parse_address


def build_host(guest: GuestSpec, strategy: str, role: str) -> SimulatedHost:
    """The source boots and fills its guest; the destination only creates an
    empty VM of the same shape (MTE enabled before its vCPUs, as KVM requires)."""
    prot_mte = STRATEGIES[strategy].vmm_prot_mte if strategy in STRATEGIES else False
    try:
        host = SimulatedHost(guest.ram, mte=guest.mte, vcpus=guest.vcpus,
                             workload=guest.workload if role == "source" else "idle",
                             workload_params=guest.params if role == "source" else {"fill": 0},
                             rate=guest.rate, seed=guest.seed, device_prot_mte=prot_mte)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"cannot create the {role} guest: {one_line(exc)}") from None
    if role == "source":
        if guest.image:
            try:
                path = guest.image
                if path.startswith("builtin:"):
                    from .images import builtin_image
                    path = builtin_image(path, guest.ram - guest.image_offset, guest.seed)
                host.memory.load_image(path, guest.image_offset, guest.image_repeat)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot load image {guest.image}: {one_line(exc)}") from None
        host.prepare_guest()
    return host


class _CpuMeter:
    """CPU seconds of this process (all threads: VMM, vCPUs, helpers) and of
    the calling thread (the VMM's migration event loop) since creation."""

    def __init__(self):
        self._proc = self._process()
        self._thread = time.thread_time()

    @staticmethod
    def _process() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def read(self) -> dict:
        return {"process_s": round(self._process() - self._proc, 4),
                "migration_thread_s": round(time.thread_time() - self._thread, 4)}


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


def run_source(guest: GuestSpec, config: MigrationConfig, scenario: str, connect: str,
               json_path: str | None, quiet: bool, warmup_s: float = 0.2, summary_out: bool = True) -> int:
    try:
        address = parse_address(connect, "--connect")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    t0 = time.perf_counter()
    host = build_host(guest, config.strategy, "source")
    prepare_ms = (time.perf_counter() - t0) * 1000
    progress = Progress(False if quiet else None)
    host.vcpus.start()
    time.sleep(warmup_s)
    engine = SourceVmm(host, config, scenario, progress)

    async def main():
        task = asyncio.ensure_future(engine.migrate(address))
        _install_cancel(asyncio.get_running_loop(), task)
        try:
            return await task
        except asyncio.CancelledError:  # cancelled before migrate() could catch it
            return engine.result
    cpu = _CpuMeter()
    try:
        result = asyncio.run(main())
        result["cpu"] = cpu.read()
    finally:
        host.close()
    progress.done()
    result["guest_prepare_ms"] = round(prepare_ms, 3)
    _prefix_counters(result, "source")
    if json_path:
        write_json(result, json_path)
    if not quiet and summary_out:
        print(summary(result), file=sys.stderr)
    return _exit_code(result)


def run_dest(guest: GuestSpec, config: MigrationConfig, scenario: str, listen: str, strategy: str | None,
             expect_uuid: str | None, json_path: str | None, quiet: bool, run_after_s: float = 0.0,
             summary_out: bool = True) -> int:
    try:
        host_name, port = parse_address(listen, "--listen")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    host = build_host(guest, strategy or config.strategy, "destination")
    try:
        listener = socket.create_server((host_name, port), reuse_port=False)
    except OSError as exc:
        host.close()
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror}") from None
    bound = listener.getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    progress = Progress(False if quiet else None)
    engine = DestVmm(host, config, scenario, strategy, expect_uuid, progress)

    cpu = _CpuMeter()

    async def main():
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
        result["cpu"] = cpu.read()
        if result["status"] == "completed" and run_after_s > 0:
            time.sleep(run_after_s)  # the guest runs on here for a while
    finally:
        listener.close()
        host.close()
    _prefix_counters(result, "destination")
    # The destination cannot judge validation; the source compares digests.
    result["validation"]["mode"] = None
    if json_path:
        write_json(result, json_path)
    if not quiet and summary_out:
        print(summary(result), file=sys.stderr)
    return 0 if result["status"] == "completed" else (130 if result["status"] == "cancelled" else 1)


def spec_to_json(guest: GuestSpec, config: MigrationConfig, scenario: str) -> str:
    return json.dumps({"scenario": scenario, "guest": guest.to_dict(), "migration": config.to_dict()})


def spec_from_json(text: str) -> tuple[GuestSpec, MigrationConfig, str]:
    doc = json.loads(text)
    return GuestSpec.from_dict(doc["guest"]), MigrationConfig.from_dict(doc["migration"]), doc["scenario"]
