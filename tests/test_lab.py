"""One lab migration end to end: two emulated arm64 machines (QEMU 10, TCG)
with a real Linux KVM and MTE, `mte-migrate dest --host kvm` in one and
`mte-migrate source --host kvm` in the other, a live bare-metal guest
program that checks its own tags after it resumes (docs/LAB.md).

It needs what `mte-migrate lab --setup-only` installs (as root: QEMU 10
from bookworm-backports, the aarch64 cross tools, the arm64 packages);
without them it is skipped, saying what is missing.  About 1-2 minutes on
two cores."""

import os
import shutil

import pytest

from migrate.tools.fidelity import record


def _missing() -> str | None:
    version, line = record.qemu_version()
    if version < (10, 0):
        return f"qemu-system-aarch64 10.x is not installed ({line or 'none'})"
    for tool in ("aarch64-linux-gnu-as", "aarch64-linux-gnu-gcc", "dpkg-deb", "apt-get"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    if os.geteuid() != 0:
        return "the lab image is built with apt-get and needs root"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_missing() is not None, reason=f"lab: {_missing()}")]


def test_a_live_mte_guest_migrates_between_two_real_kvm_kernels(tmp_path):
    from migrate.tools.lab.run import run_lab

    report = run_lab(ram=64 << 20, strategy="tag-ioctl", log_dir=tmp_path, progress=lambda msg: None)
    src, dst, verdict = report["source"], report["destination"], report["guest_verdict"]
    assert src is not None and dst is not None, f"no results; consoles in {tmp_path}"
    assert src["status"] == "completed", src["error"]
    assert src["validation"]["ok"] and src["validation"]["state_ok"]
    assert dst["status"] == "completed" and dst["guest_on"] == "destination"
    # live during precopy: at least two dirty syncs, and the dirty passes found pages the guest wrote
    assert src["dirty_sync_count"] >= 2
    assert sum(p["pages"] for p in src["passes"][1:]) > 0
    # the guest's own word, on the destination, after it resumed there
    assert verdict["runs_on"] == "destination"
    assert verdict["mismatches"] == 0 and verdict["granules_checked"] == 256 * 256
    assert verdict["ops_done"] > verdict["ops_at_last_check_on_source"] > 0
    # the tags moved through the ioctl, on both sides
    work = report["tag_work"]
    assert work["source.syscalls.kvm_arm_mte_copy_tags"] > 0 and work["destination.bytes.tags_from_user"] > 0
    assert "QEMU TCG" in report["machine"]
