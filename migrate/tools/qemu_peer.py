"""QEMU as the peer of `mte-migrate speed --vs-qemu`: one real QEMU migration
of a raw RAM image, driven over QMP on UNIX sockets (standard library only).

Both QEMUs are `-M virt,mte=on -cpu max -accel tcg`, started paused (`-S`),
so no vCPU runs while the RAM moves.  The source loads the image into its RAM
with `-device loader` at RAM + 2 MiB (the device tree sits in the first MiB
at 0x40000000); its RAM is the image plus those 2 MiB.  The destination
listens with `-incoming defer` (and `-mem-prealloc` when asked), on a port
the kernel picks.  The source's `max-bandwidth` is raised to 100 GiB/s:
QEMU's default, 128 MiB/s, would cap the comparison.  The figures are QEMU's
own `total-time`, `downtime` and `setup-time` (ms) from the source's
`query-migrate`, and each process's CPU seconds from /proc/PID/stat.

Every wait has a deadline; both processes and the socket directory go away
whatever happens."""

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

from migrate.errors import ConfigError, MigrationError

BINARY = "qemu-system-aarch64"
MIN_MAJOR = 10
RAM_BASE = 0x40000000
#: where the image starts in guest RAM: the device tree takes the first MiB
IMAGE_OFFSET = 2 << 20
#: the loader reads its file with one read(), which Linux caps near 2 GiB:
#: larger images are loaded as consecutive pieces of at most this size
LOADER_CHUNK = 1 << 30
MAX_BANDWIDTH = 100 << 30
MiB = 1 << 20
FINAL = ("completed", "failed", "cancelled")

INSTALL_HINT = (
    "mte-migrate needs QEMU 10 or later here (Debian bookworm's own QEMU 7.2 mis-stores MTE tags under TCG). "
    "Install it from bookworm-backports: if /etc/apt/sources.list.d/backports.sources is missing, create it with "
    "the lines 'Types: deb', the 'URIs:' line of /etc/apt/sources.list.d/debian.sources, "
    "'Suites: bookworm-backports', 'Components: main' and "
    "'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg'; then run "
    "'sudo apt-get update && sudo apt-get install -t bookworm-backports qemu-system-arm' "
    "and check with 'qemu-system-aarch64 --version'."
)


class QemuUnavailable(ConfigError):
    """qemu-system-aarch64 is missing or older than QEMU 10."""


class QemuError(MigrationError):
    """QEMU did not start, stopped answering, or QMP went wrong."""

    code = "qemu"


class QmpError(QemuError):
    """A QMP command answered with an error."""

    def __init__(self, command: str, error_class: str, desc: str):
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.command, self.error_class, self.desc = command, error_class, desc


def parse_version(text: str) -> tuple[int, int, int] | None:
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", text)
    return (int(m[1]), int(m[2]), int(m[3] or 0)) if m else None


def find_qemu(binary: str | None = None) -> tuple[str, str]:
    """The path of a QEMU 10+ binary and its version line; QemuUnavailable
    (saying how to install it) when there is none."""
    name = binary or BINARY
    path = shutil.which(name)
    if path is None:
        raise QemuUnavailable(f"{name} not found. {INSTALL_HINT}")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QemuUnavailable(f"cannot run {path} --version ({exc}). {INSTALL_HINT}") from None
    line = out.strip().splitlines()[0] if out.strip() else ""
    version = parse_version(line)
    if version is None:
        raise QemuUnavailable(f"{path} --version printed no QEMU version ({line!r}). {INSTALL_HINT}")
    if version[0] < MIN_MAJOR:
        raise QemuUnavailable(f"{path} is QEMU {'.'.join(map(str, version))}, older than {MIN_MAJOR}. {INSTALL_HINT}")
    return path, line


class Qmp:
    """A QMP client on a UNIX socket: reads the greeting, negotiates
    capabilities, then runs one command at a time, setting events aside."""

    def __init__(self, path: str, deadline: float, alive=lambda: True):
        self.path = path
        self.events: list[dict] = []
        self._buf = b""
        self._id = 0
        self.sock = self._connect(deadline, alive)
        try:
            greeting = self._read(deadline)
            if "QMP" not in greeting:
                raise QemuError(f"{path}: expected the QMP greeting, got {greeting!r}")
            v = greeting["QMP"].get("version", {})
            q = v.get("qemu", {})
            self.version = f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}"
            self.package = v.get("package", "")
            self.execute("qmp_capabilities", deadline=deadline)
        except BaseException:
            self.close()
            raise

    def _connect(self, deadline: float, alive) -> socket.socket:
        """QEMU creates the socket while it starts: retry until it answers."""
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                sock.connect(self.path)
                return sock
            except OSError as exc:
                sock.close()
                if not alive():
                    raise QemuError(f"QEMU exited before its QMP socket {self.path} answered") from None
                if time.monotonic() >= deadline:
                    raise QemuError(f"QMP socket {self.path} did not answer in time ({exc})") from None
                time.sleep(0.02)

    def _read(self, deadline: float) -> dict:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QemuError(f"QMP {self.path}: no answer in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise QemuError(f"QMP {self.path}: no answer in time") from None
            except OSError as exc:
                raise QemuError(f"QMP {self.path}: {exc}") from None
            if not chunk:
                raise QemuError(f"QMP {self.path}: QEMU closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise QemuError(f"QMP {self.path}: not JSON: {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise QemuError(f"QMP {self.path}: not an object: {line[:200]!r}")
        return msg

    def execute(self, command: str, arguments: dict | None = None, deadline: float | None = None, timeout=30.0):
        """Run one command; its "return" value, or QmpError."""
        deadline = deadline if deadline is not None else time.monotonic() + timeout
        self._id += 1
        msg = {"execute": command, "id": self._id}
        if arguments:
            msg["arguments"] = arguments
        try:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            raise QemuError(f"QMP {self.path}: cannot send {command}: {exc}") from None
        while True:
            reply = self._read(deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") not in (None, self._id):
                continue  # an answer to an earlier command that timed out
            if "error" in reply:
                err = reply["error"]
                raise QmpError(command, err.get("class", "?"), err.get("desc", "?"))
            if "return" in reply:
                return reply["return"]
            raise QemuError(f"QMP {self.path}: unexpected answer to {command}: {reply!r}")

    def close(self) -> None:
        try:
            self.sock.close()
        except (AttributeError, OSError):
            pass


def wait_status(qmp: Qmp, deadline: float, poll_s: float = 0.01, final=FINAL) -> dict:
    """Poll query-migrate until its status is one of ``final``; the last answer.
    QEMU holds the BQL while it completes, so one query may wait long: the
    deadline is for the whole wait."""
    while True:
        info = qmp.execute("query-migrate", deadline=deadline)
        if info.get("status") in final:
            return info
        if time.monotonic() + poll_s >= deadline:
            raise QemuError(f"migration still {info.get('status')!r} at the deadline")
        time.sleep(poll_s)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is field 3, the state
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loader_pieces(image: str, chunk: int = LOADER_CHUNK) -> list[tuple[str, int]]:
    """(file, offset in the image) for each -device loader: the image itself
    when it fits one read, else pieces cut from it and kept beside it."""
    size = os.path.getsize(image)
    if size <= chunk:
        return [(image, 0)]
    pieces = []
    mtime = os.path.getmtime(image)
    for i, off in enumerate(range(0, size, chunk)):
        n = min(chunk, size - off)
        path = f"{image}.part{i}"
        if not (os.path.exists(path) and os.path.getsize(path) == n and os.path.getmtime(path) >= mtime):
            tmp = f"{path}.tmp{os.getpid()}"
            with open(image, "rb") as src, open(tmp, "wb") as dst:
                done = 0
                while done < n:
                    copied = os.copy_file_range(src.fileno(), dst.fileno(), n - done, off + done)
                    if copied <= 0:
                        raise OSError(f"short copy from {image}")
                    done += copied
            os.replace(tmp, path)
        pieces.append((path, off))
    return pieces


def qemu_args(binary: str, ram_bytes: int, qmp_path: str) -> list[str]:
    return [
        binary,
        "-M",
        "virt,mte=on",
        "-cpu",
        "max",
        "-m",
        f"{ram_bytes // MiB}M",
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "none",
        "-monitor",
        "none",
        "-S",
        "-qmp",
        f"unix:{qmp_path},server=on,wait=off",
    ]


def _tail(path: str, n: int = 400) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read().strip()
    except OSError:
        return ""
    return text[-n:]


def migrate_once(
    image: str, prealloc: bool = False, binary: str | None = None, timeout_s: float = 300.0, poll_s: float = 0.01
) -> dict:
    """Migrate a raw image once between two QEMUs on loopback.  RAM is the
    image rounded up to a MiB plus IMAGE_OFFSET.  Returns status, total_ms,
    downtime_ms, setup_ms, transferred (bytes on the wire), ram_total (every
    RAM block QEMU migrated: guest RAM, flash, MTE tag storage), normal_bytes
    (data pages), cpu_src (the source from the migrate command to the end),
    cpu_dst (the destination from its start, so -mem-prealloc's work is in
    it), cpu_src_total, cpu_dst_window (from migrate-incoming), version."""
    path, version_line = find_qemu(binary)
    size = os.path.getsize(image)
    ram = -(-size // MiB) * MiB + IMAGE_OFFSET
    pieces = loader_pieces(image)
    deadline = time.monotonic() + timeout_s
    tmp = tempfile.mkdtemp(prefix="mte-migrate-qemu-")
    procs: dict[str, subprocess.Popen] = {}
    qmps: dict[str, Qmp] = {}
    try:
        for role in ("dst", "src"):
            args = qemu_args(path, ram, os.path.join(tmp, f"{role}.qmp"))
            if role == "dst":
                args += ["-incoming", "defer"] + (["-mem-prealloc"] if prealloc else [])
            else:
                for piece, off in pieces:
                    args += ["-device", f"loader,file={piece},addr={RAM_BASE + IMAGE_OFFSET + off:#x},force-raw=on"]
            with open(os.path.join(tmp, f"{role}.err"), "wb") as err:
                procs[role] = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            for role in ("dst", "src"):
                p = procs[role]
                qmps[role] = Qmp(os.path.join(tmp, f"{role}.qmp"), deadline, alive=lambda p=p: p.poll() is None)
            src, dst = qmps["src"], qmps["dst"]
            src.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH}, deadline=deadline)
            cpu_dst0 = cpu_seconds(procs["dst"].pid)
            dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}, deadline=deadline)
            listening = dst.execute("query-migrate", deadline=deadline).get("socket-address") or []
            port = next((a.get("port") for a in listening if a.get("type") == "inet"), None)
            if port is None:
                raise QemuError(f"the destination did not say where it listens: {listening!r}")
            cpu_src0 = cpu_seconds(procs["src"].pid)
            src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"}, deadline=deadline)
            info = wait_status(src, deadline, poll_s)
            cpu_src1 = cpu_seconds(procs["src"].pid)
            dinfo = (
                wait_status(dst, deadline, poll_s, final=FINAL)
                if info["status"] == "completed"
                else dst.execute("query-migrate", deadline=deadline)
            )
            cpu_dst1 = cpu_seconds(procs["dst"].pid)
        except (QemuError, OSError) as exc:
            errs = "; ".join(f"{r}: {t}" for r in ("src", "dst") if (t := _tail(os.path.join(tmp, f"{r}.err"))))
            raise QemuError(f"{exc}{' (QEMU said: ' + errs + ')' if errs else ''}") from None
        ram_info = info.get("ram", {})
        status, error = info["status"], info.get("error-desc")
        if status == "completed" and dinfo.get("status") != "completed":
            status = "failed"
            error = f"the destination ended {dinfo.get('status')!r}: {dinfo.get('error-desc') or 'no reason given'}"
        return {
            "status": status,
            "error": error,
            "dest_status": dinfo.get("status"),
            "total_ms": info.get("total-time"),
            "downtime_ms": info.get("downtime"),
            "setup_ms": info.get("setup-time"),
            "transferred": ram_info.get("transferred"),
            "ram_total": ram_info.get("total"),
            "normal_bytes": ram_info.get("normal-bytes"),
            "cpu_src": round(cpu_src1 - cpu_src0, 3),
            "cpu_dst": round(cpu_dst1, 3),
            "cpu_src_total": round(cpu_src1, 3),
            "cpu_dst_window": round(cpu_dst1 - cpu_dst0, 3),
            "ram_bytes": ram,
            "image_bytes": size,
            "prealloc": prealloc,
            "version": qmps["src"].version,
            "version_line": version_line,
        }
    finally:
        _stop(procs, qmps)
        shutil.rmtree(tmp, ignore_errors=True)


def _stop(procs: dict, qmps: dict) -> None:
    """Ask each QEMU to quit over QMP; terminate one that has no QMP or does
    not quit in time, kill it if it still lingers."""
    for role, p in procs.items():
        q = qmps.get(role)
        if q is not None:
            try:
                q.execute("quit", timeout=5)
            except QemuError:
                pass
            q.close()
        try:
            if q is None:
                p.terminate()
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)
