"""The mte-migrate command line, end to end: real host processes on loopback
(`python -m migrate ...`), small guests so that each test takes seconds."""

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 180  # generous: the machine is shared and noisy
RAM = "32MiB"
RAM_BYTES = 32 << 20


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("PYTHONWARNINGS", None)
    return env


def _kill_group(proc):
    """Kill a process started with start_new_session and everything it started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def mte(*args, timeout=TIMEOUT):
    """Run `python -m migrate ARGS`; returns the CompletedProcess (text)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "migrate", *map(str, args)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_clean_usage_error(cp, *words):
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    assert "Traceback" not in cp.stderr
    for w in words:
        assert w in cp.stderr, cp.stderr
    assert len(cp.stderr.strip().splitlines()) <= 3, cp.stderr  # a short message, not a dump


# -- run ---------------------------------------------------------------------------------
def test_run_writes_the_result_fields_scripts_rely_on(tmp_path):
    out = tmp_path / "result.json"
    cp = mte("run", "--ram", RAM, "--json", out, "--quiet")
    assert cp.returncode == 0, cp.stderr
    assert "Traceback" not in cp.stderr
    r = json.loads(out.read_text())

    assert r["status"] == "completed"
    assert r["error"] is None
    assert r["scenario"] == "default"
    assert r["strategy"] == "tag-ioctl"
    for key in ("total_time_ms", "setup_time_ms", "downtime_ms"):
        assert isinstance(r[key], (int, float)) and r[key] >= 0, key
    assert r["setup_time_ms"] <= r["total_time_ms"]
    assert 0 < r["downtime_ms"] <= r["total_time_ms"]
    # the migration ends with the guest running on the destination; the
    # source's clean-up after that is reported apart
    assert isinstance(r["teardown_ms"], float) and r["teardown_ms"] >= 0
    assert isinstance(r["dirty_sync_count"], int) and r["dirty_sync_count"] >= 2  # bulk + final at least

    ram = r["ram"]
    assert set(ram) >= {"total_bytes", "transferred_bytes", "zero_pages", "normal_pages", "mbps"}
    assert ram["total_bytes"] == RAM_BYTES
    assert ram["transferred_bytes"] > 0
    assert ram["normal_pages"] > 0 and ram["zero_pages"] >= 0
    assert ram["mbps"] > 0

    tags = r["tags"]
    assert set(tags) >= {"tagged_pages", "raw_bytes", "wire_bytes"}
    assert tags["tagged_pages"] > 0
    assert tags["raw_bytes"] == 128 * tags["tagged_pages"]  # packed: two tags a byte, 128 bytes a page
    assert 0 < tags["wire_bytes"] <= tags["raw_bytes"] + 1024

    counters = r["counters"]
    assert all(isinstance(v, int) for v in counters.values())
    assert counters["source.syscalls.kvm_arm_mte_copy_tags"] > 0
    assert counters["source.syscalls.kvm_get_dirty_log"] > 0
    assert counters["destination.syscalls.kvm_arm_mte_copy_tags"] > 0  # TO_GUEST on the other side
    assert not any(k.startswith(("source.el0.ldg", "destination.el0.stg")) for k in counters)

    val = r["validation"]
    assert set(val) >= {"ok", "pages_checked", "data_mismatches", "tag_mismatches"}
    assert val["ok"] is True
    assert val["pages_checked"] == RAM_BYTES // 4096
    assert val["data_mismatches"] == 0 and val["tag_mismatches"] == 0
    assert r["destination"]["status"] == "completed"


def test_run_with_strategy_none_fails_validation(tmp_path):
    out = tmp_path / "none.json"
    cp = mte("run", "--scenario", "allocator", "--ram", RAM, "--strategy", "none", "--json", out, "--quiet")
    assert cp.returncode == 1, cp.stderr
    assert "Traceback" not in cp.stderr
    r = json.loads(out.read_text())
    assert r["status"] == "failed"
    assert r["strategy"] == "none" and r["scenario"] == "allocator"
    assert "validation" in r["error"] and "\n" not in r["error"]
    assert r["validation"]["ok"] is False
    assert r["validation"]["tag_mismatches"] > 0
    assert r["validation"]["data_mismatches"] == 0
    assert r["guest_on"] == "source"
    assert r["tags"]["tagged_pages"] == 0
    assert r["destination"]["status"] != "completed"


def test_run_prot_mte_summary(tmp_path):
    out = tmp_path / "prot.json"
    cp = mte("run", "--scenario", "device-dma", "--ram", RAM, "--strategy", "prot-mte", "--json", out)
    assert cp.returncode == 0, cp.stderr
    assert "COMPLETED" in cp.stderr and "validation (digest) OK" in cp.stderr
    assert "guest: running on the destination" in cp.stderr
    r = json.loads(out.read_text())
    assert r["strategy"] == "prot-mte"
    assert r["counters"]["source.el0.ldg"] > 0
    assert r["counters"].get("source.syscalls.kvm_arm_mte_copy_tags", 0) == 0


# -- listings and help ---------------------------------------------------------------------------
def test_scenarios_one_line_each_name_first():
    cp = mte("scenarios")
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert len(names) == len(set(names)) == len(lines)
    for name in ("default", "idle", "allocator", "retag-churn", "stream", "hot-set", "device-dma", "image"):
        assert name in names
    assert all(len(line.split(None, 1)) == 2 for line in lines)  # a description after the name
    assert "invalid" not in cp.stdout


def test_strategies_one_line_each_name_first():
    cp = mte("strategies")
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert {"tag-ioctl", "prot-mte", "none"} <= set(names)
    assert len(names) == len(set(names))
    assert all(len(line.split(None, 1)) == 2 for line in lines)


def test_help_lists_the_commands():
    cp = mte("--help")
    assert cp.returncode == 0
    for word in ("run", "dest", "source", "scenarios", "strategies", "validate"):
        assert word in cp.stdout
    cp = mte("run", "--help")
    assert cp.returncode == 0
    for option in (
        "--scenario",
        "--strategy",
        "--ram",
        "--image",
        "--seed",
        "--compression",
        "--max-bandwidth",
        "--downtime-limit",
        "--max-passes",
        "--json",
        "--quiet",
    ):
        assert option in cp.stdout, option


# -- bad input --------------------------------------------------------------------------------
def test_bad_ram_size_is_a_usage_error():
    assert_clean_usage_error(mte("run", "--ram", "banana"), "--ram", "banana")


def test_unknown_scenario_is_a_usage_error():
    assert_clean_usage_error(mte("run", "--scenario", "nosuch"), "nosuch")


def test_unknown_strategy_is_a_usage_error():
    assert_clean_usage_error(mte("run", "--ram", RAM, "--strategy", "nosuch"), "nosuch")


@pytest.mark.parametrize(
    "args, words",
    [
        (["run", "--ram", "4097"], ["4 KiB"]),
        (["run", "--ram", RAM, "--max-bandwidth", "fast"], ["--max-bandwidth"]),
        (["run", "--ram", RAM, "--compression", "99"], ["99"]),
        (["source", "--connect", "nowhere", "--ram", RAM], ["--connect"]),
        (["run", "--ram", RAM, "--workload", "nosuch"], ["nosuch"]),
    ],
)
def test_other_bad_input_is_a_usage_error(args, words):
    assert_clean_usage_error(mte(*args), *words)


# -- two host processes by hand ------------------------------------------------------------------
def _start_dest(tmp_path, ram):
    """`mte-migrate dest` on an ephemeral loopback port, its JSON in tmp_path."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "migrate",
            "dest",
            "--listen",
            "127.0.0.1:0",
            "--ram",
            ram,
            "--json",
            str(tmp_path / "dest.json"),
        ],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _readline(proc, timeout):
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the destination printed nothing"
    return proc.stdout.readline().strip()


def test_separate_dest_and_source_processes_report_a_ram_mismatch(tmp_path):
    dest = _start_dest(tmp_path, "64MiB")
    source = None
    try:
        line = _readline(dest, TIMEOUT)
        assert line.startswith("listening on "), line
        addr = line.removeprefix("listening on ")
        host, _, port = addr.rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0
        source = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "migrate",
                "source",
                "--connect",
                addr,
                "--ram",
                RAM,
                "--json",
                str(tmp_path / "source.json"),
            ],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        _, src_err = source.communicate(timeout=TIMEOUT)
        _, dst_err = dest.communicate(timeout=TIMEOUT)
    finally:
        for p in (source, dest):
            if p is not None:
                _kill_group(p)
    expected = "RAM size differs: source 32 MiB, destination 64 MiB"
    assert source.returncode not in (0, None) and dest.returncode not in (0, None)
    assert expected in src_err, src_err
    assert expected in dst_err, dst_err
    assert "Traceback" not in src_err + dst_err
    for side in ("source", "dest"):
        r = json.loads((tmp_path / f"{side}.json").read_text())
        assert r["status"] == "failed"
        assert expected in r["error"]
    assert json.loads((tmp_path / "source.json").read_text())["guest_on"] == "source"


# -- validate ------------------------------------------------------------------------------------
def test_validate_compares_every_page(tmp_path):
    out = tmp_path / "validate.json"
    cp = mte("validate", "--ram", RAM, "--scenario", "retag-churn", "--json", out)
    assert cp.returncode == 0, cp.stderr
    assert "validation (full) OK" in cp.stderr
    assert f"{RAM_BYTES // 4096} pages checked" in cp.stderr
    r = json.loads(out.read_text())
    assert r["status"] == "completed"
    assert r["scenario"] == "retag-churn"
    assert r["validation"]["mode"] == "full"
    assert r["validation"]["ok"] is True
    assert r["validation"]["pages_checked"] == RAM_BYTES // 4096


# -- interrupting a migration between two processes ---------------------------------------------
def _start_pair(tmp_path, source_args=()):
    """A destination and a source (capped, so the migration takes seconds);
    returns both once the source is in precopy (seen in its --debug log)."""
    dest = _start_dest(tmp_path, RAM)
    source = None
    try:
        line = _readline(dest, TIMEOUT)
        assert line.startswith("listening on "), line
        source = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "migrate",
                "--debug",
                "source",
                "--connect",
                line.removeprefix("listening on "),
                "--ram",
                RAM,
                "--max-bandwidth",
                "2M",
                "--json",
                str(tmp_path / "source.json"),
                *source_args,
            ],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        log = []
        while True:
            ready, _, _ = select.select([source.stderr], [], [], TIMEOUT)
            assert ready, "the source logged nothing"
            text = source.stderr.readline()
            assert text, "the source exited before precopy: " + "".join(log)
            log.append(text)
            if "-> precopy" in text:
                return dest, source
    except BaseException:
        for p in (source, dest):
            if p is not None:
                _kill_group(p)
        raise


def test_interrupted_source_cancels_and_keeps_its_guest(tmp_path):
    dest, source = _start_pair(tmp_path)
    try:
        os.kill(source.pid, signal.SIGINT)  # Ctrl-C
        _, src_err = source.communicate(timeout=TIMEOUT)
        _, dst_err = dest.communicate(timeout=TIMEOUT)
    finally:
        _kill_group(source)
        _kill_group(dest)
    assert source.returncode == 130, src_err
    assert dest.returncode != 0
    assert "Traceback" not in src_err + dst_err
    r = json.loads((tmp_path / "source.json").read_text())
    assert r["status"] == "cancelled"
    assert r["guest_on"] == "source"
    assert "cancel" in r["error"]
    d = json.loads((tmp_path / "dest.json").read_text())
    assert d["status"] != "completed"
    assert "abort" in d["error"]
    assert d["guest_on"] != "destination"


def test_destination_killed_source_fails_and_keeps_its_guest(tmp_path):
    dest, source = _start_pair(tmp_path)
    try:
        _kill_group(dest)  # SIGKILL: no goodbye
        _, src_err = source.communicate(timeout=TIMEOUT)
    finally:
        _kill_group(source)
        _kill_group(dest)
    assert source.returncode == 1, src_err
    assert "Traceback" not in src_err
    r = json.loads((tmp_path / "source.json").read_text())
    assert r["status"] == "failed"
    assert r["guest_on"] == "source"
    assert "\n" not in r["error"]
    assert "connection" in r["error"] or "closed" in r["error"], r["error"]
    assert r["error"] in src_err


def test_a_reader_that_stops_early_gets_no_traceback():
    """`mte-migrate scenarios | head -1`: the reader is gone before the writer writes."""
    out = subprocess.run(
        f"{sys.executable} -m migrate scenarios | true", shell=True, capture_output=True, text=True, cwd=REPO
    )
    assert out.stdout == "" and "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr


def test_the_help_lists_no_internal_command():
    out = subprocess.run([sys.executable, "-m", "migrate", "--help"], capture_output=True, text=True, cwd=REPO)
    assert "SUPPRESS" not in out.stdout and "endurance-worker" not in out.stdout and "fuzz" in out.stdout
