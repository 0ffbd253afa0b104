"""Operation counters: the facts of a run (system calls, EL0 tag instructions,
kernel page-tag operations, tag clears, tag check faults, bytes copied)."""

import threading
from collections import Counter


class Counters:
    """Thread-safe named counters.  Callers add in bulk (one call per batch),
    so the lock is taken once per operation, never per granule."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, name: str, amount: int = 1) -> None:
        if amount:
            with self._lock:
                self._counts[name] += amount

    def add_many(self, *pairs) -> None:
        """add() for several (name, amount) pairs under one lock: the
        per-call bookkeeping of a system call made once a page."""
        with self._lock:
            counts = self._counts
            for name, amount in pairs:
                if amount:
                    counts[name] += amount

    def get(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._counts.items()))

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()

    @staticmethod
    def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
        return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
