"""When to stop iterating and do stop-and-copy: a named policy that says why."""

from dataclasses import dataclass


@dataclass
class Decision:
    stop: bool
    reason: str
    forced: bool = False


class DowntimeOrPassLimit:
    """Stop when the estimated downtime (remaining bytes / measured bandwidth,
    the rate of the last dirty pass: see source.dirty_pass_bandwidth) fits
    the limit, or when the pass limit is reached (then stop anyway: the
    decision says the limit forced it)."""

    name = "downtime-or-pass-limit"

    def __init__(self, downtime_limit_ms: float, max_passes: int):
        self.downtime_limit_ms = downtime_limit_ms
        self.max_passes = max_passes

    @staticmethod
    def expected_downtime_ms(remaining_bytes: int, bandwidth: float | None) -> float | None:
        if remaining_bytes == 0:
            return 0.0
        if not bandwidth:
            return None
        return 1000.0 * remaining_bytes / bandwidth

    def decide(self, dirty_passes_done: int, remaining_bytes: int, bandwidth: float | None) -> Decision:
        expected = self.expected_downtime_ms(remaining_bytes, bandwidth)
        if expected is not None and expected <= self.downtime_limit_ms:
            return Decision(True, f"estimated downtime {expected:.0f} ms <= limit {self.downtime_limit_ms:.0f} ms")
        if dirty_passes_done >= self.max_passes:
            shown = "unknown" if expected is None else f"{expected:.0f} ms"
            return Decision(
                True,
                f"max passes {self.max_passes} reached with estimated downtime "
                f"{shown} > limit {self.downtime_limit_ms:.0f} ms",
                forced=True,
            )
        return Decision(
            False,
            f"estimated downtime {expected:.0f} ms > limit {self.downtime_limit_ms:.0f} ms"
            if expected is not None
            else "bandwidth not measured yet",
        )


class AutoConverge:
    """QEMU-style auto-converge: when a dirty pass did not shrink the dirty
    set enough (the guest dirties memory about as fast as it is sent), throttle
    the vCPUs, starting at ``initial`` and adding ``increment`` each time the
    next pass still does not shrink, up to ``maximum``."""

    def __init__(self, initial: float = 0.2, increment: float = 0.1, maximum: float = 0.99, shrink_needed: float = 0.5):
        self.initial, self.increment, self.maximum = initial, increment, maximum
        self.shrink_needed = shrink_needed
        self.throttle = 0.0
        self._previous: int | None = None
        self.history: list[float] = []

    def after_pass(self, remaining_bytes: int) -> float:
        """Called with what is left after each dirty pass; returns the throttle."""
        previous, self._previous = self._previous, remaining_bytes
        if previous is not None and remaining_bytes > previous * self.shrink_needed:
            self.throttle = self.initial if self.throttle == 0 else min(self.maximum, self.throttle + self.increment)
            self.history.append(round(self.throttle, 2))
        return self.throttle
