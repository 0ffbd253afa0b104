"""Deterministic guest data: a pool of page contents generated once per seed
(random, text-like, half-and-half, zero), sliced in bulk by workloads.
Generating fresh random bytes costs ~7 ns/byte in Python; slicing a pool
costs nothing, and a batch made of pool slices compresses like real data."""

import functools
import random

from .constants import PAGE_SIZE

_TEXT = (
    b"The quick brown fox jumps over the lazy dog; tagged allocation "
    b"granule sixteen bytes, kernel page cache entry, virtio ring buffer. "
)

POOL_PAGES = 2048  # 8 MiB


class DataPool:
    """``page_kinds`` weights: how many of each kind of page the pool holds."""

    def __init__(self, seed: int, kinds: dict[str, int] | None = None, pages: int = POOL_PAGES):
        kinds = kinds or {"random": 1, "text": 1, "half": 2}
        rng = random.Random(f"datapool:{seed}")
        names = list(kinds)
        weights = [kinds[k] for k in names]
        text_page = (_TEXT * (PAGE_SIZE // len(_TEXT) + 1))[:PAGE_SIZE]
        chunks = []
        for _ in range(pages):
            kind = rng.choices(names, weights)[0]
            if kind == "random":
                chunks.append(rng.randbytes(PAGE_SIZE))
            elif kind == "text":
                shift = rng.randrange(len(_TEXT))
                chunks.append(text_page[shift:] + text_page[:shift])
            elif kind == "half":
                half = PAGE_SIZE // 2
                chunks.append(rng.randbytes(half) + text_page[:half])
            elif kind == "zero":
                chunks.append(bytes(PAGE_SIZE))
            else:
                raise ValueError(f"unknown page kind {kind!r}")
        # Repeat the first 1 MiB at the end so any slice up to 1 MiB wraps cleanly.
        self.pages = pages
        self._pool = b"".join(chunks)
        self.data = memoryview(self._pool + self._pool[: 1 << 20])

    def slice(self, rng: random.Random, length: int) -> memoryview:
        """``length`` bytes (at most 1 MiB) from a page-aligned random point."""
        start = rng.randrange(self.pages) * PAGE_SIZE
        return self.data[start : start + length]


@functools.lru_cache(maxsize=8)
def shared_pool(seed: int) -> DataPool:
    """The default pool for a seed, built once per process: its bytes never
    change, so every workload with that seed may share it (a destination
    then stages the migrated workload without rebuilding 8 MiB of data
    inside the downtime)."""
    return DataPool(seed)


@functools.lru_cache(maxsize=8)
def tag_pool(seed: int, granules: int = 1 << 16) -> bytes:
    """Packed tags laid out as an MTE allocator would: runs of random
    granule-rounded sizes (16 B .. 4 KiB), each with a random non-zero tag."""
    rng = random.Random(f"tagpool:{seed}")
    runs, total = [], 0
    while total < granules:
        n = min(rng.choice((1, 1, 2, 2, 3, 4, 4, 8, 16, 32, 64, 256)), granules - total)
        runs.append(bytes([rng.randrange(1, 16)]) * n)
        total += n
    from .tags import pack

    return pack(b"".join(runs))
