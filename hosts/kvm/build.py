"""Build the kvm backend's two native pieces from ``native/``:

- ``mte_guest.bin``: the bare-metal guest program (assembly, linked at the
  start of guest RAM), with binutils for aarch64;
- ``libmtehelper.so``: LDG/STG per granule for the prot-mte strategy.

On an arm64 machine the native ``as``/``ld``/``gcc`` do; elsewhere the
cross tools (``aarch64-linux-gnu-``: Debian's binutils-aarch64-linux-gnu and
gcc-aarch64-linux-gnu).  ``python -m hosts.kvm.build [DIR]`` builds into DIR
(default: ``hosts/kvm/build``, where the backend looks first after
``$MTE_MIGRATE_KVM_BUILD``)."""

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..constants import RAM_BASE_IPA

NATIVE = Path(__file__).resolve().parent / "native"
GUEST_SOURCE = NATIVE / "mte_guest.S"
HELPER_SOURCE = NATIVE / "mte_helper.c"
GUEST_BIN = "mte_guest.bin"
HELPER_SO = "libmtehelper.so"
DEFAULT_DIR = Path(__file__).resolve().parent / "build"


def tool_prefix() -> str:
    """'' on arm64, 'aarch64-linux-gnu-' elsewhere."""
    return "" if platform.machine() in ("aarch64", "arm64") else "aarch64-linux-gnu-"


def missing_tools(prefix: str | None = None) -> list[str]:
    prefix = tool_prefix() if prefix is None else prefix
    return [t for t in (f"{prefix}as", f"{prefix}ld", f"{prefix}objcopy", f"{prefix}gcc") if not shutil.which(t)]


def build(out_dir: Path, prefix: str | None = None) -> tuple[Path, Path]:
    """Assemble and link the guest, compile the helper; (guest, helper)."""
    prefix = tool_prefix() if prefix is None else prefix
    missing = missing_tools(prefix)
    if missing:
        raise RuntimeError(f"cannot build the kvm guest and helper: missing {', '.join(missing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    guest, helper = out_dir / GUEST_BIN, out_dir / HELPER_SO
    with tempfile.TemporaryDirectory() as tmp:
        obj, elf = Path(tmp) / "g.o", Path(tmp) / "g.elf"
        run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731
        run(f"{prefix}as", "-march=armv8.5-a+memtag", "-o", str(obj), str(GUEST_SOURCE))
        run(f"{prefix}ld", f"-Ttext={RAM_BASE_IPA:#x}", "-e", "_start", "-o", str(elf), str(obj))
        run(f"{prefix}objcopy", "-O", "binary", str(elf), str(guest))
        run(
            f"{prefix}gcc",
            "-O2",
            "-march=armv8.5-a+memtag",
            "-shared",
            "-fPIC",
            "-o",
            str(helper),
            str(HELPER_SOURCE),
        )
    return guest, helper


def artifact(name: str) -> Path | None:
    """Where a built piece is: $MTE_MIGRATE_KVM_BUILD, then hosts/kvm/build."""
    for base in filter(None, (os.environ.get("MTE_MIGRATE_KVM_BUILD"), DEFAULT_DIR)):
        path = Path(base) / name
        if path.exists():
            return path
    return None


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR
    for path in build(target):
        print(path)
