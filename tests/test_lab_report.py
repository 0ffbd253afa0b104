"""The lab's report, from results shaped like the two sides' JSON: the
guest's verdict, the tag work, the comparison table; and the lab command's
argument checks (no QEMU needed for any of this)."""

import subprocess
import sys
from pathlib import Path

from migrate.strategies import STRATEGIES
from migrate.tools.lab.image import Cpio, command_param
from migrate.tools.lab.run import comparison, guest_verdict, tag_work

REPO = Path(__file__).resolve().parent.parent


def _check(mismatches, ops):
    return {"mismatches": mismatches, "granules_checked": 65536, "ops": ops}


def test_the_verdict_is_the_destinations_after_a_handover():
    src = {"guest_on": "destination", "guest": {"self_check": None, "last_check": _check(0, 600)}}
    dst = {"guest": {"self_check": _check(0, 1000)}}
    v = guest_verdict(src, dst)
    assert v == {
        "runs_on": "destination",
        "mismatches": 0,
        "granules_checked": 65536,
        "ops_done": 1000,
        "ops_at_last_check_on_source": 600,
        "ok": True,
    }


def test_the_verdict_is_the_sources_when_the_guest_stayed_and_fails_on_a_mismatch():
    src = {"guest_on": "source", "guest": {"self_check": _check(3, 800), "last_check": _check(3, 800)}}
    v = guest_verdict(src, {"guest": None})
    assert v["runs_on"] == "source" and v["mismatches"] == 3 and not v["ok"]
    assert guest_verdict(None, None)["ok"] is False


def test_tag_work_leaves_the_validation_reads_out_and_compares_side_by_side():
    src = {
        "counters": {
            "source.syscalls.kvm_arm_mte_copy_tags": 51,
            "source.validation.syscalls.kvm_arm_mte_copy_tags": 3,
            "source.bytes.tags_to_user": 99840,
            "source.kernel.something": 7,
        },
        "validation": {"ok": True},
    }
    dst = {"counters": {"destination.syscalls.kvm_arm_mte_copy_tags": 65, "destination.bytes.tags_from_user": 84224}}
    work = tag_work(src, dst)
    assert work == {
        "destination.bytes.tags_from_user": 84224,
        "destination.syscalls.kvm_arm_mte_copy_tags": 65,
        "source.bytes.tags_to_user": 99840,
        "source.syscalls.kvm_arm_mte_copy_tags": 51,
    }
    reports = [
        {
            "strategy": "tag-ioctl",
            "machine": "QEMU TCG x",
            "tag_work": work,
            "source": src,
            "guest_verdict": {"mismatches": 0, "runs_on": "destination"},
        },
        {
            "strategy": "prot-mte",
            "machine": "QEMU TCG x",
            "tag_work": {"source.el0.ldg": 5, "destination.el0.stg": 4},
            "source": {"validation": {"ok": True}},
            "guest_verdict": {"mismatches": 0, "runs_on": "destination"},
        },
    ]
    table = comparison(reports)
    assert "QEMU TCG x" in table and "not speed" in table
    assert "| tag bytes through the ioctl | 184064 | 0 |" in table
    assert "| source LDG | 0 | 5 |" in table


def test_the_machine_script_is_gzipped_and_bounded():
    assert command_param("echo hi\n").startswith("labcmd=")
    try:
        command_param("".join(f"echo {i} {i * 7919}\n" for i in range(2000)))
    except ValueError as exc:
        assert "2048" in str(exc) or "at most" in str(exc)
    else:
        raise AssertionError("an overlong script must be refused")


def test_the_cpio_is_newc_with_a_trailer(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"abc")
    (tmp_path / "l").symlink_to("d/f")
    c = Cpio()
    c.add_tree(tmp_path)
    c.add_node("dev/console", 5, 1)
    raw = c.finish()
    assert raw.startswith(b"070701") and b"TRAILER!!!" in raw and len(raw) % 4 == 0
    assert b"d/f\0" in raw and b"abc" in raw and b"dev/console\0" in raw


def test_lab_refuses_an_unknown_strategy_in_one_line():
    run = subprocess.run(
        [sys.executable, "-m", "migrate", "lab", "--strategy", "tag-ioctl,bogus"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"mte-migrate: error: unknown strategy 'bogus'; known: {', '.join(STRATEGIES)}"
    ]
