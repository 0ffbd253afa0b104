"""When to stop iterating and do stop-and-copy: a named policy that says why."""

from dataclasses import dataclass


@dataclass
class Decision:
    stop: bool
    reason: str
    forced: bool = False


class DowntimeOrPassLimit:
    """Stop when the estimated downtime (remaining bytes / measured bandwidth)
    fits the limit, or when the pass limit is reached (then stop anyway: the
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
            return Decision(True, f"max passes {self.max_passes} reached with estimated downtime "
                                  f"{shown} > limit {self.downtime_limit_ms:.0f} ms", forced=True)
        return Decision(False, f"estimated downtime {expected:.0f} ms > limit {self.downtime_limit_ms:.0f} ms"
                        if expected is not None else "bandwidth not measured yet")
