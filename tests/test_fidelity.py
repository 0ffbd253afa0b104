"""The simulated kernel (hosts/) held to a real one's answers.

tests/fidelity/linux-*.txt are recordings of a Debian arm64 kernel under
QEMU (`python3 -m migrate.tools.fidelity record`, docs/FIDELITY.md); each
line is one case.  Here every case is replayed on hosts/ and its line
compared.  A difference fails the test unless the case is not modelled at
all (cases.NOT_MODELLED) or is a deliberate simplification listed in
tests/fidelity/simplifications.toml with what it does to the strategy
comparison.  No QEMU is needed."""

import fnmatch
import tomllib
from pathlib import Path

import pytest

from migrate.tools.fidelity import cases

HERE = Path(__file__).resolve().parent / "fidelity"
GOLDEN = sorted(HERE.glob("linux-*.txt"))
SIMPLIFICATIONS = tomllib.loads((HERE / "simplifications.toml").read_text())["simplification"]


def load(path: Path) -> tuple[str, dict[str, str]]:
    """(the kernel's version from the file name, case name -> line)."""
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    return path.stem.removeprefix("linux-"), {ln.split(" | ", 1)[0]: ln for ln in lines}


def simplification(name: str, kernel: str) -> dict | None:
    for entry in SIMPLIFICATIONS:
        if any(fnmatch.fnmatchcase(name, c) for c in entry["cases"]) and any(
            fnmatch.fnmatchcase(kernel, k) for k in entry.get("kernels", ["*"])
        ):
            return entry
    return None


def compare(path: Path) -> dict:
    kernel, golden = load(path)
    out = {"kernel": kernel, "total": len(golden), "agree": [], "simplified": [], "not_modelled": [], "differ": []}
    for name, line in golden.items():
        try:
            sim = cases.replay(name)
        except KeyError as e:
            sim = f"(no replay: {e})"
        if sim is None:
            out["not_modelled"].append(name)
        elif sim == line:
            out["agree"].append(name)
        elif simplification(name, kernel) is not None:
            out["simplified"].append(name)
        else:
            out["differ"].append((name, line, sim))
    return out


@pytest.fixture(scope="module", params=GOLDEN, ids=[p.stem for p in GOLDEN])
def report(request):
    return compare(request.param)


def test_there_are_recordings():
    assert GOLDEN, "no tests/fidelity/linux-*.txt: record one (docs/FIDELITY.md)"


def test_the_simulation_answers_as_the_kernel(report, capsys):
    r = report
    with capsys.disabled():  # shown in a plain `pytest -q` run too
        print(
            f"\nlinux {r['kernel']}: {len(r['agree'])} of {r['total']} cases agree"
            f" ({len(r['simplified'])} deliberate simplifications, {len(r['not_modelled'])} not modelled)"
        )
    unexplained = [f"{name}\n  kernel: {line}\n  hosts/: {sim}" for name, line, sim in r["differ"]]
    assert not unexplained, (
        f"{len(unexplained)} cases where hosts/ answers unlike linux {r['kernel']}, "
        "neither fixed nor listed in tests/fidelity/simplifications.toml:\n" + "\n".join(unexplained)
    )


def test_every_recorded_case_has_a_replay_and_every_replay_a_recording(report):
    _, golden = load(HERE / f"linux-{report['kernel']}.txt")
    unknown = [n for n in golden if cases.not_modelled(n) is None and n not in cases.CASES]
    unrecorded = sorted(set(cases.CASES) - set(golden))
    assert not unknown, f"recorded cases without a replay in cases.py: {unknown}"
    assert not unrecorded, f"replays the recording lacks (probe.c and cases.py out of step?): {unrecorded}"


def test_every_simplification_explains_a_difference_that_is_still_there():
    """A listed simplification that no longer differs anywhere is stale."""
    reports = [compare(p) for p in GOLDEN]
    for entry in SIMPLIFICATIONS:
        assert entry.get("why") and entry.get("effect"), f"{entry['cases']}: say why and what it does to the comparison"
        hit = [
            n
            for r in reports
            for n in r["simplified"]
            if any(fnmatch.fnmatchcase(n, c) for c in entry["cases"])
            and any(fnmatch.fnmatchcase(r["kernel"], k) for k in entry.get("kernels", ["*"]))
        ]
        assert hit, f"simplification {entry['cases']} explains no difference any more: remove it"


def test_the_line_format_helpers_match_the_probe():
    # describe() and copy_call() are the C functions' twins
    assert cases.describe(cases.fill_pat(2, 15)) == "pf/p0"
    assert cases.describe(bytes(5) + b"\x09" + bytes(250)) == "0*5.9*1.0*250"
    assert cases.describe(b"\xee" * 300) == "ee*256/ee*44"
    assert cases.copy_call(1, cases.BASE + 0x1000, 0x2000, "512") == "COPY_TAGS(FROM, ipa=+0x1000, len=0x2000, buf=512)"
    assert cases.copy_call(2, 0, 0x10, "NULL") == "COPY_TAGS(flags=0x2, ipa=0x0, len=0x10, buf=NULL)"
