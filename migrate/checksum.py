"""CRC-32 (zlib's polynomial) from the fastest implementation installed.

zlib-ng's and ISA-L's crc32 return the same values as the standard library's,
so a host with an accelerator and a host without one agree on every frame and
every digest: only the speed differs (about 28, 21 and 5 GB/s on the machines
this was measured on).  Install the ``fast`` extra for zlib-ng.

``crc32_concat`` joins the CRCs of consecutive pieces into the CRC of their
concatenation without reading the bytes again, so that one side may CRC a
whole 1 MiB chunk in one call while the other keeps per-piece CRCs (to
re-read only the pieces written since) and still arrive at the same value.
"""

import functools
import itertools
import zlib

_POLY = 0xEDB88320  # CRC-32's polynomial, bit-reflected as zlib uses it


def _fastest():
    """(crc32, name) of the first implementation that imports."""
    try:
        from zlib_ng.zlib_ng import crc32 as ng

        return ng, "zlib-ng"
    except ImportError:
        pass
    try:
        from isal.isal_zlib import crc32 as isal

        return isal, "isal"
    except ImportError:
        return zlib.crc32, "zlib"


crc32, IMPLEMENTATION = _fastest()


def _combiner():
    """zlib-ng's crc32_combine (one C call, ~0.7 us), or None."""
    try:
        from zlib_ng.zlib_ng import crc32_combine

        return crc32_combine
    except ImportError:
        return None


_combine = _combiner()


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC polynomial, in zlib's reflected bit order."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) mod P for k = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


@functools.lru_cache(maxsize=8)
def _shift_tables(nbytes: int) -> tuple[list[int], list[int]]:
    """Two 65,536-entry tables of the linear map crc -> crc * x^(8 nbytes)
    mod P, one per half of the CRC: advancing a CRC past ``nbytes`` bytes is
    then two look-ups (about 17 us for the 64 pieces of a 1 MiB chunk, against
    40 us for 63 calls of zlib-ng's crc32_combine).  Built once per length,
    ~30 ms: the lengths used are few -- a 16 KiB piece, the short last piece
    of a chunk."""
    k, n, x = 3, nbytes, 1 << 31  # x^(8 n): the product of x^(2^k) over the set bits of n, k from 3
    while n:
        if n & 1:
            x = _multmodp(_X2N[k & 31], x)
        n >>= 1
        k += 1
    b0, b1, b2, b3 = ([_multmodp(x, b << (8 * j)) for b in range(256)] for j in range(4))
    return [b0[i & 0xFF] ^ b1[i >> 8] for i in range(65536)], [b2[i & 0xFF] ^ b3[i >> 8] for i in range(65536)]


def crc32_concat(crcs, nbytes: int, last_nbytes: int | None = None) -> int:
    """The CRC-32 of the concatenation of pieces whose CRCs are ``crcs``,
    each ``nbytes`` long except the last, ``last_nbytes`` (default
    ``nbytes``).  Equal to crc32() of the joined bytes: CRC-32 is affine, so
    crc(A + B) = crc(A) * x^(8 |B|) mod P  xor  crc(B)."""
    n = len(crcs)
    if n == 0:
        return 0
    lo, hi = _shift_tables(nbytes)
    acc = crcs[0]
    for crc in itertools.islice(crcs, 1, n - 1):
        acc = lo[acc & 0xFFFF] ^ hi[acc >> 16] ^ crc
    if n > 1:
        lo, hi = _shift_tables(nbytes if last_nbytes is None else last_nbytes)
        acc = lo[acc & 0xFFFF] ^ hi[acc >> 16] ^ crcs[n - 1]
    return acc


def crc32_join(crcs, nbytes: int, last_nbytes: int | None = None) -> int:
    """As crc32_concat, for a few long parts (the chunks of a frame): with
    zlib-ng one crc32_combine call a part, and no tables to build."""
    if _combine is None or len(crcs) > 16:
        return crc32_concat(crcs, nbytes, last_nbytes)
    acc, last = crcs[0], len(crcs) - 1
    for i in range(1, len(crcs)):
        acc = _combine(acc, crcs[i], nbytes if i < last or last_nbytes is None else last_nbytes)
    return acc


_POWERS: dict[int, list[tuple[list[int], ...]]] = {}  # piece length -> [k] = byte tables of x^(8 nbytes k)


def _shift_powers(nbytes: int, k: int) -> tuple[list[int], ...]:
    """Four 256-entry tables of c -> c * x^(8 nbytes k) mod P, each power
    derived from the one before with the nbytes shift (1,024 look-ups a
    power, not 1,024 multiplications)."""
    powers = _POWERS.get(nbytes)
    if powers is None or k >= len(powers):
        # Built on a copy and published whole: threads that race here each
        # see a complete list (one may build it twice), never a half one.
        grown = list(powers or [tuple([b << (8 * j) for b in range(256)] for j in range(4))])  # x^0
        lo, hi = _shift_tables(nbytes)
        while k >= len(grown):
            grown.append(tuple([lo[v & 0xFFFF] ^ hi[v >> 16] for v in table] for table in grown[-1]))
        _POWERS[nbytes] = powers = grown
    return powers[k]


def crc32_swap(crc: int, old: int, new: int, nbytes: int, after: int) -> int:
    """The CRC-32 of a block of pieces once one piece, followed by ``after``
    pieces of ``nbytes`` bytes, is replaced by one of the same length: from
    its old and new CRCs.  By crc32_concat's rule a block's CRC is the XOR
    over its pieces of crc(piece) * x^(8 bytes after it), linear in each
    piece's CRC, so a stale piece re-read costs no pass over the others'
    CRCs.  With zlib-ng that product is one crc32_combine call; otherwise
    four look-ups in tables of powers (36 ms to build, once a process)."""
    if _combine is not None:
        return crc ^ _combine(old ^ new, 0, nbytes * after)
    return _swap_by_tables(crc, old, new, nbytes, after)


def swap_needs_tables() -> bool:
    """Whether crc32_swap looks up tables (built on first use) rather than
    calling the library."""
    return _combine is None


def _swap_by_tables(crc: int, old: int, new: int, nbytes: int, after: int) -> int:
    d = old ^ new
    t0, t1, t2, t3 = _shift_powers(nbytes, after)
    return crc ^ t0[d & 0xFF] ^ t1[(d >> 8) & 0xFF] ^ t2[(d >> 16) & 0xFF] ^ t3[d >> 24]
