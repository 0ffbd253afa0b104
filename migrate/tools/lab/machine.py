"""One emulated arm64 machine: QEMU 10 (TCG) with EL2 and MTE, booting the
lab image with a shell script as its job; the console is read for the
job's exit code and files (see image.INIT)."""

import base64
import subprocess
import threading
import time
from pathlib import Path

from migrate.tools.fidelity import record

from .image import MARK, command_param


class Machine:
    def __init__(
        self,
        name: str,
        vmlinuz: Path,
        initrd: Path,
        script: str,
        *,
        addr: str | None = None,
        net: tuple[str, int] | None = None,
        smp: int = 1,
        mem_mib: int = 768,
        log: Path | None = None,
    ):
        self.name = name
        append = f"console=ttyAMA0 panic=-1 quiet loglevel=3 {command_param(script)}"
        if addr:
            append += f" labaddr={addr}"
        cmd = record.qemu_command(vmlinuz, initrd, append, mem_mib=mem_mib, smp=smp)
        if net is None:
            cmd += ["-nic", "none"]
        else:
            mode, port = net
            cmd += ["-netdev", f"socket,id=n0,{mode}=127.0.0.1:{port}", "-device", "virtio-net-pci,netdev=n0,romfile="]
        self.cmd = cmd
        self.lines: list[str] = []
        self.log = log
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.job_started: float | None = None

    def _read(self) -> None:
        with open(self.log, "w") if self.log else open("/dev/null", "w") as log:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.lines.append(line)
                if line.startswith(f"{MARK} start"):
                    self.job_started = time.monotonic()
                if not line.startswith(f"{MARK} file"):
                    log.write(line + "\n")
                    log.flush()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        finally:
            self._reader.join(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    # -- what the job left ---------------------------------------------------------
    def marks(self, word: str) -> list[str]:
        prefix = f"{MARK} {word} "
        return [line[len(prefix) :] for line in self.lines if line.startswith(prefix)]

    @property
    def rc(self) -> int | None:
        found = self.marks("rc")
        return int(found[-1]) if found else None

    @property
    def boot_s(self) -> float | None:
        found = self.marks("start")
        return float(found[-1]) if found else None

    def files(self) -> dict[str, bytes]:
        out = {}
        for entry in self.marks("file"):
            path, _, data = entry.partition(" ")
            out[path] = base64.b64decode(data)
        return out

    def tail(self, n: int = 40) -> str:
        return "\n".join(line for line in self.lines[-n:] if not line.startswith(f"{MARK} file"))
