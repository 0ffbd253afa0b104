"""`mte-migrate run`: a destination process and a source process on loopback,
their results merged into one report."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from migrate.engine.report import empty_result
from migrate.hosting.process import spec_to_json


def run_pair(
    guest, config, scenario: str, quiet: bool, extra_source_args=(), timeout_s: float = 3600, retry: int = 0
) -> dict:
    """Start both host processes, wait for them, return the merged result."""
    with tempfile.TemporaryDirectory(prefix="mte-migrate-") as tmp:
        spec = os.path.join(tmp, "spec.json")
        with open(spec, "w") as f:
            f.write(spec_to_json(guest, config, scenario))
        src_json, dst_json = os.path.join(tmp, "source.json"), os.path.join(tmp, "dest.json")
        base = [sys.executable, "-m", "migrate"]
        quiet_flag = (["--quiet"] if quiet else []) + ["--no-summary"]  # the parent prints the merged one
        dest = subprocess.Popen(
            base
            + [
                "dest",
                "--listen",
                "127.0.0.1:0",
                "--spec",
                spec,
                "--json",
                dst_json,
                "--strategy",
                config.strategy,
                "--attempts",
                str(retry + 1),
            ]
            + quiet_flag,
            stdout=subprocess.PIPE,
            text=True,
        )
        source = None
        try:
            line = dest.stdout.readline().strip()
            if not line.startswith("listening on "):
                dest.wait(timeout=30)
                return _failed(scenario, config.strategy, dst_json, "destination did not start listening")
            address = line.removeprefix("listening on ")
            source = subprocess.Popen(
                base
                + ["source", "--connect", address, "--spec", spec, "--json", src_json]
                + quiet_flag
                + ["--retry", str(retry)]
                + list(extra_source_args)
            )
            deadline = time.monotonic() + timeout_s
            _wait(source, deadline)  # the results are read from the JSON files
            _wait(dest, time.monotonic() + max(30.0, config.timeout_s * 3))
        except KeyboardInterrupt:
            # The terminal sent SIGINT to the whole group: let both finish cleanly.
            for p in (source, dest):
                if p is not None:
                    _wait(p, time.monotonic() + 30)
        finally:
            for p in (source, dest):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
        result = _load(src_json) or _failed(
            scenario,
            config.strategy,
            None,
            f"source process exited with status {source.returncode if source else '?'} and no result",
        )
        dresult = _load(dst_json)
        if dresult is not None:
            result["destination"] = {
                k: dresult.get(k)
                for k in (
                    "status",
                    "error",
                    "setup_time_ms",
                    "total_time_ms",
                    "guest_on",
                    "cpu",
                    "peak_rss_bytes",
                    "prealloc_ms",
                    "final_digest",
                )
            }
            result["destination"]["spliced_bytes"] = (dresult.get("ram") or {}).get("spliced_bytes")
            result["destination"]["ram_backing"] = (dresult.get("ram") or {}).get("backing")
            result["counters"] = {**result.get("counters", {}), **dresult.get("counters", {})}
            if dresult.get("postcopy"):  # what only the destination sees: faults, latencies, the guest's checks
                result["postcopy"] = {**(result.get("postcopy") or {}), **dresult["postcopy"]}
            if dresult["status"] == "guest-faulted" and result["status"] == "completed":
                result["status"], result["error"] = "guest-faulted", f"destination: {dresult['error']}"
            elif dresult["status"] != "completed" and result["status"] == "completed":
                result["status"] = "failed"
                result["error"] = f"destination: {dresult['error']}"
        return result


def _wait(proc, deadline: float):
    while True:
        try:
            return proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                proc.send_signal(signal.SIGTERM)
                try:
                    return proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    return proc.wait()
        except KeyboardInterrupt:
            continue


def _load(path):
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def _failed(scenario, strategy, dest_json, message) -> dict:
    result = empty_result(scenario, strategy)
    dres = _load(dest_json)
    result["error"] = dres["error"] if dres and dres.get("error") else message
    return result
