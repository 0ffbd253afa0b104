"""Record a real arm64 kernel's answers to the fidelity cases.

`python3 -m migrate.tools.fidelity record --kernel 6.12` (or 6.1):

1. sets the machine up from Debian's package registry, once: the
   bookworm-backports suite in apt's sources, the arm64 architecture, the
   cross compiler, cpio and QEMU 10 (bookworm's QEMU 7.2 mis-stores MTE
   tags under TCG);
2. downloads the newest Debian arm64 kernel of that series (apt-get
   download, into the cache) and unpacks its vmlinuz;
3. builds probe.c as a static aarch64 /init and packs it in an initramfs;
4. boots it under qemu-system-aarch64 (virt, EL2, MTE) and reads the case
   lines from the serial console;
5. writes them to tests/fidelity/linux-<version>.txt with a header.

Everything downloaded or built stays in ~/.cache/mte-migrate/fidelity
(MTE_MIGRATE_FIDELITY_CACHE overrides it); only the golden file lands in the
repository.  Needs root (apt-get, dpkg).
"""

import datetime
import functools
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
GOLDEN_DIR = REPO / "tests" / "fidelity"
PROBE = HERE / "probe.c"

#: the kernel series a recording may ask for (Debian arm64 images in bookworm's suites)
SERIES = ("6.12", "6.1")
CROSS_GCC = "aarch64-linux-gnu-gcc"
CFLAGS = ["-static", "-O2", "-Wall", "-Wextra", "-march=armv8.5-a+memtag", "-pthread"]
QEMU = "qemu-system-aarch64"
QEMU_MIN = (10, 0)
BACKPORTS_SOURCES = Path("/etc/apt/sources.list.d/backports.sources")
BOOT_TIMEOUT = 600  # seconds: TCG on two shared cores, with margin

#: the probe's console protocol: every line it means for us starts with this
MARK = "FIDELITY "


def cache_root(env_var: str, name: str) -> Path:
    """``$env_var`` if set, else ``$XDG_CACHE_HOME/mte-migrate/name`` (or ~/.cache)."""
    base = os.environ.get(env_var)
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mte-migrate" / name


def cache_dir() -> Path:
    return cache_root("MTE_MIGRATE_FIDELITY_CACHE", "fidelity")


def _say(msg: str) -> None:
    print(f"fidelity: {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    _say("$ " + " ".join(cmd))
    return subprocess.run(cmd, check=True, **kw)


def _out(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


# -- the machine: apt sources, architecture, tools -----------------------------
class Apt:
    """apt-get update at most once per run, and only when something needs it."""

    def __init__(self):
        self.updated = False

    def update(self) -> None:
        if not self.updated:
            _run(["apt-get", "update", "-q"])
            self.updated = True

    def install(self, packages: list[str], suite: str | None = None) -> None:
        self.update()
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends"]
        if suite:
            cmd += ["-t", suite]
        _run(cmd + packages, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def _debian_mirror() -> str:
    """The URI of the main bookworm stanza in apt's deb822 sources."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith("#")
            )
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            if "bookworm" in fields.get("Suites", "").split() and fields.get("URIs"):
                return fields["URIs"].split()[0]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "bookworm" in parts[2:3]:
                return parts[1] if not parts[1].startswith("[") else parts[2]
    raise SystemExit("fidelity: no bookworm entry in apt's sources to take the mirror from")


def ensure_sources(apt: Apt) -> None:
    """bookworm-backports in apt's sources and arm64 among dpkg's
    architectures; apt-get update when either was added or arm64's lists
    are missing."""
    changed = False
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    if not any(p.is_file() and "bookworm-backports" in p.read_text() for p in sources):
        mirror = _debian_mirror()
        _say(f"adding bookworm-backports from {mirror} as {BACKPORTS_SOURCES}")
        BACKPORTS_SOURCES.write_text(
            f"Types: deb\nURIs: {mirror}\nSuites: bookworm-backports\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        )
        changed = True
    if "arm64" not in _out(["dpkg", "--print-foreign-architectures"]).split():
        _run(["dpkg", "--add-architecture", "arm64"])
        changed = True
    if changed or not _have_arm64_lists():
        apt.update()


def _have_arm64_lists() -> bool:
    lists = Path("/var/lib/apt/lists")
    return any(lists.glob("*bookworm-backports*binary-arm64_Packages*")) and any(
        lists.glob("*bookworm_main_binary-arm64_Packages*")
    )


def qemu_version() -> tuple[tuple[int, ...], str]:
    if not shutil.which(QEMU):
        return (), ""
    line = _out([QEMU, "--version"]).splitlines()[0]
    m = re.search(r"version (\d+)\.(\d+)", line)
    return ((int(m.group(1)), int(m.group(2))) if m else ()), line.strip()


def ensure_tools(apt: Apt) -> None:
    missing = [pkg for tool, pkg in ((CROSS_GCC, "gcc-aarch64-linux-gnu"), ("cpio", "cpio")) if not shutil.which(tool)]
    if missing:
        apt.install(missing + (["libc6-dev-arm64-cross"] if "gcc-aarch64-linux-gnu" in missing else []))
    version, _ = qemu_version()
    if version < QEMU_MIN:
        apt.install(["qemu-system-arm"], suite="bookworm-backports")
        version, line = qemu_version()
        if version < QEMU_MIN:
            raise SystemExit(f"fidelity: need QEMU >= 10 for MTE under TCG, have {line or 'none'}")


# -- the kernel ----------------------------------------------------------------
def _dpkg_compare(a: str, b: str) -> int:
    """dpkg's order of two versions, by asking dpkg (a handful of calls)."""
    if a == b:
        return 0
    return -1 if subprocess.run(["dpkg", "--compare-versions", a, "lt", b]).returncode == 0 else 1


def _kernel_names(series: str) -> list[str]:
    pattern = re.compile(rf"^linux-image-{re.escape(series)}\.[0-9][0-9.+a-z-]*-arm64$")
    names = _out(["apt-cache", "pkgnames", f"linux-image-{series}."]).split()
    return [n for n in names if pattern.match(n) and "-rt-" not in n and "-cloud-" not in n]


def find_kernel(series: str, apt: Apt) -> tuple[str, str, str]:
    """(package, version, suite) of the newest arm64 kernel image of ``series`` in apt's lists."""
    names = _kernel_names(series)
    if not names:
        apt.update()
        names = _kernel_names(series)
    if not names:
        raise SystemExit(f"fidelity: no linux-image-{series}.*-arm64 in apt's lists (is arm64 added?)")
    show = subprocess.run(["apt-cache", "show", *(f"{n}:arm64" for n in names)], capture_output=True, text=True).stdout
    found = re.findall(r"^Package: (\S+)\n(?:.*\n)*?Version: (\S+)$", show, re.M)
    name, version = max(found, key=functools.cmp_to_key(lambda x, y: _dpkg_compare(x[1], y[1])))
    madison = _out(["apt-cache", "madison", f"{name}:arm64"])
    suite = next((line.split("|")[2].split()[1] for line in madison.splitlines() if version in line), "?")
    return name, version, suite


def fetch_kernel(name: str, version: str) -> Path:
    """Download (once) and unpack the package; returns its vmlinuz."""
    root = cache_dir() / "kernels" / f"{name}_{version}"
    done = root / ".unpacked"
    if not done.exists():
        debs = cache_dir() / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        deb = next(iter(debs.glob(f"{name}_{_deb_version(version)}_arm64.deb")), None)
        if deb is None:
            _run(["apt-get", "download", f"{name}:arm64={version}"], cwd=debs)
            deb = next(iter(debs.glob(f"{name}_{_deb_version(version)}_arm64.deb")))
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        done.touch()
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if not images:
        raise SystemExit(f"fidelity: no vmlinuz in {name} {version}")
    return images[0]


def _deb_version(version: str) -> str:
    return version.split(":", 1)[-1].replace(":", "%3a")


# -- the probe -----------------------------------------------------------------
def build_initrd() -> Path:
    """Compile probe.c as a static /init and pack it; cached by the source's hash."""
    source = PROBE.read_bytes()
    key = hashlib.sha256(source + " ".join(CFLAGS).encode()).hexdigest()[:16]
    out = cache_dir() / "build" / key
    initrd = out / "initrd.gz"
    if initrd.exists():
        return initrd
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        root = Path(tmp) / "root"
        for d in ("dev", "proc", "sys", "tmp"):
            (root / d).mkdir(parents=True)
        _run([CROSS_GCC, *CFLAGS, "-o", str(root / "init"), str(PROBE)])
        os.mknod(root / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        archive = subprocess.run(
            ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
            cwd=root,
            input=("\n".join(["."] + files) + "\n").encode(),
            capture_output=True,
            check=True,
        ).stdout
        (out / "initrd.tmp").write_bytes(gzip.compress(archive, mtime=0))
        (out / "initrd.tmp").rename(initrd)
    return initrd


def qemu_command(vmlinuz: Path, initrd: Path, append: str, mem_mib: int, smp: int) -> list[str]:
    """An emulated arm64 machine with EL2 (so KVM works inside it) and MTE,
    booting ``vmlinuz`` with ``initrd``, no display; the caller adds its
    network."""
    return [
        QEMU, "-M", "virt,virtualization=on,mte=on,gic-version=3", "-cpu", "max,pauth-impdef=on",
        "-m", str(mem_mib), "-smp", str(smp), "-nographic", "-no-reboot",
        "-kernel", str(vmlinuz), "-initrd", str(initrd), "-append", append,
    ]  # fmt: skip


def boot(vmlinuz: Path, initrd: Path) -> list[str]:
    """Boot the kernel with the probe as init; the console's lines."""
    cmd = qemu_command(vmlinuz, initrd, "console=ttyAMA0 panic=-1 loglevel=4", mem_mib=1024, smp=1)
    cmd += ["-nic", "none"]
    _say("$ " + " ".join(cmd))
    run = subprocess.run(cmd, capture_output=True, timeout=BOOT_TIMEOUT, stdin=subprocess.DEVNULL)
    text = run.stdout.decode("utf-8", "replace").replace("\r", "")
    log = cache_dir() / "last-console.log"
    log.write_text(text)
    if f"{MARK}end" not in text:
        tail = "\n".join(text.splitlines()[-30:])
        raise SystemExit(f"fidelity: the probe did not finish (exit {run.returncode}); console in {log}:\n{tail}")
    return text.splitlines()


def parse(console: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """The probe's header facts (key -> values) and its case lines."""
    facts: dict[str, list[str]] = {}
    cases: list[str] = []
    for line in console:
        at = line.find(MARK)
        if at < 0:
            continue
        kind, _, rest = line[at + len(MARK) :].partition(" ")
        if kind == "case":
            cases.append(rest.rstrip())
        else:
            facts.setdefault(kind, []).append(rest.rstrip())
    return facts, cases


def golden_path(package_version: str) -> Path:
    upstream = package_version.split(":", 1)[-1].split("-", 1)[0]
    return GOLDEN_DIR / f"linux-{upstream}.txt"


def record(series: str) -> Path:
    if series not in SERIES:
        raise SystemExit(f"fidelity: --kernel must be one of {', '.join(SERIES)}")
    if os.geteuid() != 0:
        raise SystemExit("fidelity: recording needs root (apt-get, dpkg-deb, mknod)")
    started = time.monotonic()
    apt = Apt()
    ensure_sources(apt)
    ensure_tools(apt)
    name, version, suite = find_kernel(series, apt)
    _say(f"kernel {name} {version} from {suite}")
    vmlinuz = fetch_kernel(name, version)
    initrd = build_initrd()
    _, qemu_line = qemu_version()
    booted = time.monotonic()
    facts, cases = parse(boot(vmlinuz, initrd))
    boot_s = time.monotonic() - booted
    release = (facts.get("uname") or ["?"])[0]
    path = golden_path(version)
    header = [
        f"# linux {release}",
        f"# package {name}:arm64 {version} ({suite})",
        f"# qemu {qemu_line}",
        f"# recorded {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"# command python3 -m migrate.tools.fidelity record --kernel {series}",
        *(f"# boot {line}" for line in facts.get("dmesg", [])),
        f"# cases {len(cases)}",
        "# format: case | setup | call | result | observations (docs/FIDELITY.md)",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header + cases) + "\n")
    total = time.monotonic() - started
    print(f"{path.relative_to(REPO)}: {len(cases)} cases from linux {release}")
    print(f"recording took {total:.1f} s (boot and probe {boot_s:.1f} s)")
    return path
