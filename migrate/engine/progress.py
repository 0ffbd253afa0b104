"""Progress lines on stderr while a migration runs; silent with --quiet or
when stderr is not a terminal (unless forced)."""

import sys
import time

from migrate.units import fmt_rate


class Progress:
    def __init__(self, enabled: bool | None = None, stream=None, interval: float = 0.25):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.interval = interval
        self._last = 0.0
        self._tty = self.stream.isatty()

    def update(
        self,
        pass_no: int,
        done: int,
        total: int,
        rate: float,
        dirty_rate: float | None,
        expected_ms: float | None,
        force: bool = False,
    ) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        name = "bulk" if pass_no == 0 else f"pass {pass_no}"
        parts = [f"{name:>7}: {pct:5.1f}%", f"{fmt_rate(rate):>11}"]
        if dirty_rate is not None:
            parts.append(f"dirty {dirty_rate:,.0f} pages/s")
        if expected_ms is not None:
            parts.append(f"expected downtime {expected_ms:,.0f} ms")
        line = "  ".join(parts)
        if self._tty:
            self.stream.write("\r\x1b[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\x1b[K" if self._tty else "") + text + "\n")
            self.stream.flush()

    def done(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
