"""A pacing limiter for the sending rate (QEMU's max-bandwidth)."""

import asyncio
import threading
import time


class RateLimiter:
    """Each send books the link for nbytes / rate seconds; a send that would
    start before the link is free waits.  Up to ``burst_s`` of credit is kept
    so that small scheduling delays do not lower the rate."""

    def __init__(self, rate: float, burst_s: float = 0.01):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst_s = burst_s
        self._free_at = time.monotonic()
        self._lock = threading.Lock()  # shared by the data channels' threads

    def book(self, nbytes: int) -> float:
        """Reserve the link; returns how long the caller must wait first."""
        with self._lock:
            now = time.monotonic()
            start = max(self._free_at, now - self.burst_s)
            self._free_at = start + nbytes / self.rate
            return max(0.0, start - now)

    async def wait(self, nbytes: int) -> None:
        delay = self.book(nbytes)
        if delay > 0:
            await asyncio.sleep(delay)
