"""Cancel by SIGTERM, retry across destinations, and VM identity (issue 5):
real processes on loopback, small guests."""

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120


def _start(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "migrate", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _listening(proc) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
    assert ready, "destination did not start"
    line = proc.stdout.readline().strip()
    assert line.startswith("listening on "), line
    return line.removeprefix("listening on ")


def _kill(*procs):
    for p in procs:
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_retry_moves_on_to_the_next_destination_and_validates(tmp_path):
    """The first destination refuses (wrong RAM size); with --retry the
    running guest goes to the second, and the result lists both attempts."""
    bad = _start("dest", "--listen", "127.0.0.1:0", "--ram", "64MiB", "--quiet")
    good = _start("dest", "--listen", "127.0.0.1:0", "--ram", "32MiB", "--quiet")
    src = None
    try:
        a, b = _listening(bad), _listening(good)
        out = tmp_path / "src.json"
        src = _start(
            "source",
            "--connect",
            a,
            "--connect",
            b,
            "--retry",
            "2",
            "--ram",
            "32MiB",
            "--scenario",
            "allocator",
            "--quiet",
            "--json",
            str(out),
        )
        _, err = src.communicate(timeout=TIMEOUT)
        assert src.returncode == 0, err
        r = json.loads(out.read_text())
        assert r["status"] == "completed" and r["validation"]["ok"]
        assert [x["status"] for x in r["attempts"]] == ["failed", "completed"]
        assert "RAM size differs" in r["attempts"][0]["error"]
        assert r["attempts"][1]["destination"] == b
    finally:
        _kill(bad, good, src)


def test_sigterm_cancels_and_the_source_keeps_its_guest(tmp_path):
    dest = _start("dest", "--listen", "127.0.0.1:0", "--ram", "64MiB", "--quiet")
    src = None
    try:
        address = _listening(dest)
        out = tmp_path / "src.json"
        src = _start(
            "source",
            "--connect",
            address,
            "--ram",
            "64MiB",
            "--scenario",
            "allocator",
            "--max-bandwidth",
            "10M",
            "--quiet",
            "--json",
            str(out),
        )
        time.sleep(2.0)  # well inside the bulk pass at 10 MB/s
        src.send_signal(signal.SIGTERM)
        _, err = src.communicate(timeout=TIMEOUT)
        dest.communicate(timeout=TIMEOUT)
        assert src.returncode == 130, err
        assert "Traceback" not in err
        r = json.loads(out.read_text())
        assert r["status"] == "cancelled" and r["guest_on"] == "source"
        assert dest.returncode != 0
    finally:
        _kill(dest, src)


def test_destination_refuses_a_guest_it_was_not_told_to_expect(tmp_path):
    dest = _start("dest", "--listen", "127.0.0.1:0", "--ram", "32MiB", "--expect-uuid", "vm-a", "--quiet")
    src = None
    try:
        address = _listening(dest)
        out = tmp_path / "src.json"
        src = _start(
            "source", "--connect", address, "--ram", "32MiB", "--vm-uuid", "vm-b", "--quiet", "--json", str(out)
        )
        _, src_err = src.communicate(timeout=TIMEOUT)
        _, dst_err = dest.communicate(timeout=TIMEOUT)
        assert src.returncode == 1 and dest.returncode == 1
        for text in (src_err, dst_err):
            assert "VM identity differs: source vm-b, destination expects vm-a" in text
        r = json.loads(out.read_text())
        assert r["guest_on"] == "source" and r["ram"]["normal_pages"] == 0
    finally:
        _kill(dest, src)
