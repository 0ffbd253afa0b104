"""Raw guest RAM images, so that the very same bytes can be migrated here and
by another VMM (e.g. QEMU with -mem-path or a loader) for comparison.

Kinds: ``zero``; ``random``; ``mixed`` -- of every 4 pages one zero, one
random, two of 2 KiB random followed by 2 KiB of repeated text.  Content is
deterministic for a seed (SHAKE-128 of the seed and block number)."""

import hashlib
import os
from pathlib import Path

PAGE = 4096
BLOCK = 1 << 20
KINDS = ("zero", "random", "mixed")
_TEXT = (b"MTE keeps a 4-bit tag for every 16 bytes; the VMM must move them with the data. " * 64)[: PAGE // 2]


def _random(seed: int, block: int, n: int) -> bytes:
    return hashlib.shake_128(f"mte-migrate:{seed}:{block}".encode()).digest(n)


def block_bytes(kind: str, seed: int, block: int) -> bytes:
    if kind == "zero":
        return bytes(BLOCK)
    if kind == "random":
        return _random(seed, block, BLOCK)
    if kind == "mixed":
        rnd = _random(seed, block, BLOCK // 2)
        quad = []
        half = PAGE // 2
        r = 0
        for _ in range(BLOCK // (4 * PAGE)):
            quad.append(bytes(PAGE))  # zero
            quad.append(rnd[r : r + PAGE])
            r += PAGE  # random
            for _ in range(2):  # half random, half text
                quad.append(rnd[r : r + half] + _TEXT)
                r += half
        return b"".join(quad)
    raise ValueError(f"unknown image kind {kind!r}; known: {', '.join(KINDS)}")


def data_bytes(kind: str, size: int, seed: int = 1) -> int:
    """The bytes of a built-in image's non-zero pages: every 1 MiB block of
    a kind has the same pages zero (block 0 is counted, the rest alike)."""
    block = block_bytes(kind, seed, 0)
    zero = bytes(PAGE)
    data_pages = sum(block[o : o + PAGE] != zero for o in range(0, BLOCK, PAGE))
    return size // BLOCK * data_pages * PAGE + (size % BLOCK if data_pages == BLOCK // PAGE else 0)


def make_image(path: str, kind: str, size: int, seed: int = 1) -> str:
    if size <= 0 or size % BLOCK:
        raise ValueError("image size must be a positive multiple of 1 MiB")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        for block in range(size // BLOCK):
            f.write(block_bytes(kind, seed, block))
    os.replace(tmp, path)
    return path


def cache_dir() -> Path:
    base = os.environ.get("MTE_MIGRATE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mte-migrate"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def builtin_image(spec: str, size: int, seed: int = 1) -> str:
    """'builtin:mixed' -> a cached image of that kind, ``size`` bytes, made on first use."""
    kind = spec.removeprefix("builtin:")
    if kind not in KINDS:
        raise ValueError(f"unknown built-in image {spec!r}; known: {', '.join('builtin:' + k for k in KINDS)}")
    path = cache_dir() / f"{kind}-{size // BLOCK}MiB-seed{seed}.img"
    if not path.exists():
        make_image(str(path), kind, size, seed)
    return str(path)
