"""A plain install works away from the checkout: a wheel built from a copy of
the repository without .git, installed into a fresh venv, lists every
shipped scenario and migrates one from another folder."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IGNORED = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    ".ruff_cache",
    "bench-out",
    "results",
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(mte-migrate executable, a folder outside the copy) after `pip install COPY` in a new venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    copy = tmp / "copy"
    shutil.copytree(REPO, copy, ignore=IGNORED)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(copy)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr[-2000:]
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return venv / "bin" / "mte-migrate", elsewhere, env


@pytest.mark.slow
def test_the_installed_package_lists_every_shipped_scenario(installed):
    exe, elsewhere, env = installed
    out = subprocess.run([str(exe), "scenarios"], cwd=elsewhere, capture_output=True, text=True, env=env, check=True)
    listed = {line.split("\t")[0] for line in out.stdout.splitlines()}
    shipped = {p.stem for p in (REPO / "scenarios").glob("*.toml")}
    assert shipped and listed == shipped
    for p in (REPO / "scenarios").glob("*.toml"):
        tomllib.loads(p.read_text())  # and each one parses


@pytest.mark.slow
def test_the_installed_package_migrates_a_shipped_scenario(installed):
    exe, elsewhere, env = installed
    run = subprocess.run(
        [str(exe), "run", "--scenario", "idle", "--ram", "256MiB", "--json", "out.json", "-q"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((elsewhere / "out.json").read_text())
    assert result["status"] == "completed" and result["validation"]["ok"]
    assert result["scenario"] == "idle" and result["ram"]["total_bytes"] == 256 << 20
