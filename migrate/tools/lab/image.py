"""The lab's arm64 boot image: a Debian arm64 kernel and an initramfs with
Debian's arm64 CPython 3.11, busybox, the aarch64 wheels of msgpack and
zstandard, this project, the kvm backend's guest program and native helper,
and the virtio-net modules.

Everything comes from the package registries (apt-get download, pip
download) and is cached under ~/.cache/mte-migrate/lab
($MTE_MIGRATE_LAB_CACHE overrides it); the initramfs is rebuilt only when
its inputs change.  Setting up apt (arm64, bookworm-backports, QEMU 10, the
cross tools) is the fidelity recorder's job, reused here.
"""

import base64
import compileall
import gzip
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from hosts.kvm import build as kvm_build

from ..fidelity import record

#: the Debian arm64 packages of the root filesystem
DEBS = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libexpat1",
    "zlib1g",
    "libffi8",
    "libssl3",
    "libbz2-1.0",
    "liblzma5",
    "libuuid1",
    "busybox-static",
)
WHEELS = ("msgpack", "zstandard")
KERNEL_SERIES = "6.12"
MODULES = ("net/core/failover.ko", "drivers/net/net_failover.ko", "drivers/net/virtio_net.ko")
#: parts of the standard library the lab never imports
STDLIB_SKIP = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "distutils")
REPO = Path(__file__).resolve().parents[3]
PROJECT_DIRS = ("hosts", "migrate", "scenarios")
MARK = "@@lab@@"

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in failover net_failover virtio_net; do insmod /lib/lab/$m.ko || echo "@@lab@@ insmod $m failed"; done
ip link set lo up
if [ -n "$labaddr" ]; then
  ip link set eth0 up && ip addr add "$labaddr/16" dev eth0 || echo "@@lab@@ no eth0"
fi
export PYTHONPATH=/opt/mte-migrate:/opt/wheels PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
export MTE_MIGRATE_KVM_BUILD=/opt/mte-migrate/hosts/kvm/build
cd /tmp
echo "$labcmd" | base64 -d | gunzip > /tmp/cmd.sh
echo "@@lab@@ start $(cut -d' ' -f1 /proc/uptime)"
sh /tmp/cmd.sh > /tmp/out.txt 2>&1
echo "@@lab@@ rc $?"
echo "@@lab@@ uptime $(cut -d' ' -f1 /proc/uptime)"
for f in /tmp/out.txt /tmp/*.json; do
  [ -f "$f" ] || continue
  echo "@@lab@@ file $f $(base64 -w0 < $f)"
done
echo "@@lab@@ end"
poweroff -f
"""


def cache_dir() -> Path:
    return record.cache_root("MTE_MIGRATE_LAB_CACHE", "lab")


def _say(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr, flush=True)


# -- fetching -------------------------------------------------------------------------
def fetch_debs(apt: "record.Apt | None" = None) -> list[Path]:
    """The arm64 .debs, downloaded once into the cache."""
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("_")[0]: p for p in debs.glob("*_arm64.deb")}
    missing = [d for d in DEBS if d not in have]
    if missing:
        _say(f"apt-get download {' '.join(missing)} (arm64)")
        subprocess.run(["apt-get", "download", *(f"{d}:arm64" for d in missing)], cwd=debs, check=True)
        have = {p.name.split("_")[0]: p for p in debs.glob("*_arm64.deb")}
    return [have[d] for d in DEBS]


def fetch_wheels() -> list[Path]:
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = [next(iter(wheels.glob(f"{w}-*aarch64*.whl")), None) for w in WHEELS]
    if None in found:
        _say(f"pip download {' '.join(WHEELS)} (manylinux2014_aarch64, cp311)")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"]
            + ["--platform", "manylinux2014_aarch64", "--python-version", "3.11", "-d", str(wheels), *WHEELS],
            check=True,
        )
        found = [next(iter(wheels.glob(f"{w}-*aarch64*.whl"))) for w in WHEELS]
    return found


def kernel() -> tuple[Path, Path]:
    """(vmlinuz, modules dir) of the newest Debian arm64 6.12 kernel, via
    the fidelity recorder's apt set-up and cache."""
    apt = record.Apt()
    record.ensure_sources(apt)
    record.ensure_tools(apt)
    name, version, _ = record.find_kernel(KERNEL_SERIES, apt)
    vmlinuz = record.fetch_kernel(name, version)
    modules = next((vmlinuz.parent.parent / "lib" / "modules").iterdir())
    return vmlinuz, modules


# -- the initramfs --------------------------------------------------------------------
class Cpio:
    """A newc cpio archive written in Python (no cpio tool, no root for /dev/console)."""

    def __init__(self):
        self.out = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple = (0, 0)) -> None:
        raw = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
        self.ino += 1
        self.out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        self.out.write(b"\0" * (-(110 + len(raw)) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def add_tree(self, root: Path) -> None:
        for path in sorted(root.rglob("*")):
            rel = str(path.relative_to(root))
            st = path.lstat()
            if path.is_symlink():
                self._entry(rel, 0o120777, os.readlink(path).encode())
            elif path.is_dir():
                self._entry(rel, 0o040755)
            else:
                self._entry(rel, 0o100000 | (st.st_mode & 0o777), path.read_bytes())

    def add_node(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def _stage(root: Path, debs: list[Path], wheels: list[Path], modules: Path, native: Path) -> None:
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    for skip in STDLIB_SKIP:
        shutil.rmtree(root / "usr/lib/python3.11" / skip, ignore_errors=True)
    for doc in ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/lintian"):
        shutil.rmtree(root / doc, ignore_errors=True)
    (root / "usr/bin/python3").symlink_to("python3.11")
    site = root / "opt/wheels"
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    project = root / "opt/mte-migrate"
    for d in PROJECT_DIRS:
        if (REPO / d).is_dir():  # an installed package has its scenarios inside migrate/
            shutil.copytree(REPO / d, project / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "build"))
    shutil.copytree(native, project / "hosts/kvm/build")
    lab = root / "lib/lab"
    lab.mkdir(parents=True)
    for rel in MODULES:
        src = modules / "kernel" / rel
        if src.exists():
            shutil.copy2(src, lab / src.name)
        else:
            (lab / src.name).write_bytes(lzma.decompress((modules / "kernel" / (rel + ".xz")).read_bytes()))
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    for d in ("proc", "sys", "dev", "tmp"):
        (root / d).mkdir(exist_ok=True)
    # Debian compiles the standard library at install time; do it here (3.11
    # bytecode is the same for every 3.11.x), so nothing compiles at boot.
    for tree in (root / "usr/lib/python3.11", site, project):
        compileall.compile_dir(
            tree, quiet=2, workers=0, invalidation_mode=compileall.py_compile.PycInvalidationMode.UNCHECKED_HASH
        )


def _inputs_key(debs, wheels, modules: Path, native: Path) -> str:
    h = hashlib.sha256(INIT.encode())
    for p in [*debs, *wheels]:
        h.update(p.name.encode())
    h.update(str(modules).encode())
    for p in sorted(native.iterdir()):
        h.update(p.read_bytes())
    for d in PROJECT_DIRS:
        for p in sorted((REPO / d).rglob("*")) if (REPO / d).is_dir() else ():
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc" and "build" not in p.parts:
                h.update(str(p.relative_to(REPO)).encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build() -> tuple[Path, Path]:
    """(vmlinuz, initramfs): fetched, built and cached."""
    import zstandard

    vmlinuz, modules = kernel()
    debs, wheels = fetch_debs(), fetch_wheels()
    native = cache_dir() / "native"
    key_src = hashlib.sha256(kvm_build.GUEST_SOURCE.read_bytes() + kvm_build.HELPER_SOURCE.read_bytes()).hexdigest()
    if not (native / kvm_build.GUEST_BIN).exists() or (native / ".key").read_text() != key_src:
        _say("building the guest program and the native helper (aarch64-linux-gnu)")
        kvm_build.build(native, "aarch64-linux-gnu-")
        (native / ".key").write_text(key_src)
    key = _inputs_key(debs, wheels, modules, native)
    initrd = cache_dir() / "images" / f"lab-{key}.cpio.zst"
    if initrd.exists():
        return vmlinuz, initrd
    _say("packing the initramfs")
    initrd.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        _stage(root, debs, wheels, modules, native)
        archive = Cpio()
        archive.add_tree(root)
        archive.add_node("dev/console", 5, 1)
        data = zstandard.ZstdCompressor(level=10).compress(archive.finish())
    tmp_path = initrd.with_suffix(".tmp")
    tmp_path.write_bytes(data)
    tmp_path.rename(initrd)
    for old in initrd.parent.glob("lab-*.cpio.zst"):
        if old != initrd:
            old.unlink()
    return vmlinuz, initrd


#: arm64's COMMAND_LINE_SIZE, less what the rest of the line takes
MAX_COMMAND = 2048 - 200


def command_param(script: str) -> str:
    """A shell script as the kernel command-line word /init runs (gzip,
    base64: the whole line must fit in 2048 bytes)."""
    word = "labcmd=" + base64.b64encode(gzip.compress(script.encode(), 9, mtime=0)).decode()
    if len(word) > MAX_COMMAND:
        raise ValueError(f"the machine's script is {len(word)} bytes on the kernel command line; at most {MAX_COMMAND}")
    return word
