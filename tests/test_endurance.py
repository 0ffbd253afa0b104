"""Endurance (issue 5): one guest back and forth between two long-lived host
processes; every hop validated, no file descriptors leak.  The documented
long run is `mte-migrate endurance --hops 100 --ram 64MiB --scenario allocator`."""

import json
import subprocess
import sys


def test_back_and_forth_every_hop_validated_no_fd_growth(tmp_path):
    out = tmp_path / "endurance.json"
    cp = subprocess.run(
        [
            sys.executable,
            "-m",
            "migrate",
            "endurance",
            "--hops",
            "8",
            "--ram",
            "16MiB",
            "--scenario",
            "allocator",
            "--quiet",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cp.returncode == 0, cp.stderr
    report = json.loads(out.read_text())
    assert report["hops_validated"] == 8
    for role in "ab":
        hops = report["reports"][role]
        assert [d["hop"] for d in hops] == list(range(8))
        assert all(d["status"] == "completed" for d in hops)
        # each host alternates roles, and the guest is validated on every hop it sends
        assert {d["role"] for d in hops} == {"source", "destination"}
        for role_name in ("source", "destination"):
            fds = [d["fds"] for d in hops if d["role"] == role_name]
            assert max(fds) == min(fds), fds
