"""A fuzz campaign against the destination's input path, in process.

Seeds are real streams: a small source guest (4 MiB, the allocator
workload) is turned into the frames a source sends, by the engine's own
builders (handshake HELLO, BatchBuilder's PAGES, the source's state,
COMPLETE with its digests), through a source ``Connection`` so every frame
goes out in a state where the source may send it -- per checksum mode,
strategy, batch size and compression.  Each seed has a control stream and,
with two channels, a data stream (JOIN, PAGES, PASS_END).

Each input is one seed with one to three mutations (header fields, msgpack
meta, payloads, zstd payloads and bombs, frame order, stray bytes), most of
them applied after an untouched prefix of the stream so that the mutation
meets the destination in every protocol state.  ``DestTarget`` drives the
destination as dest.py does, without sockets or threads: the destination's
``Connection`` (control and data machines), the transport's way of reading
a frame (including the landing of whole chunks into guest RAM through the
placer), the handshake checks, ``BatchApplier`` on a fresh SimulatedHost,
the state loader, the digest, CONFIRM, INSPECT and GO, and the JOIN checks
of a data channel (``DestVmm``'s own methods where they need no event loop).

An outcome is "accepted" (the stream was taken, or ended early: a real
destination would then time out), a ``ProtocolError`` of some message class,
or another ``MigrationError``.  Anything else is a crash: a bug.  An input
slower than ``hang_seconds`` is a hang (an interval timer interrupts it on
the main thread).  Memory: ru_maxrss for the process, tracemalloc's peak on
every ``trace_every``-th input.

``mte-migrate fuzz --inputs N --seed S --out DIR``; ``replay(path)`` runs a
reproducer written to DIR again.
"""

import json
import os
import random
import re
import resource
import signal
import struct
import threading
import time
import traceback
import tracemalloc
import types
from dataclasses import dataclass, field

import msgpack
import zstandard

from hosts import SimulatedHost
from hosts.constants import PAGE_SIZE
from migrate.checksum import crc32
from migrate.config.spec import MigrationConfig
from migrate.engine.dest import DestVmm
from migrate.engine.digest import MemoryDigest, page_detail, state_digest
from migrate.engine.handshake import _hello, hello_mismatch
from migrate.engine.pages import BatchApplier, BatchBuilder
from migrate.engine.source import SourceVmm
from migrate.errors import Cancelled, HandshakeMismatch, MigrationError, PeerError, PeerTimeout, ProtocolError
from migrate.protocol import frames as fr
from migrate.protocol.compression import Compressor
from migrate.protocol.machine import (
    RECV,
    Connection,
    DestState,
    data_dest_machine,
    data_source_machine,
    dest_machine,
    source_machine,
)
from migrate.strategies import STRATEGIES

T = fr.FrameType
RAM = 4 << 20
SESSION = "fuzz-session"
H = fr.HEADER_SIZE


# -- seeds: real streams ------------------------------------------------------------------
@dataclass
class Seed:
    """The frames (each encoded) a source sends on the control connection
    and, when ``data`` is not empty, on data channel 1."""

    name: str
    checksum: str
    strategy: str
    control: list
    data: list = field(default_factory=list)


def _send(conn, frame) -> bytes:
    return b"".join(bytes(b) for b in conn.send(frame))


def capture_seeds(ram: int = RAM) -> list[Seed]:
    """The streams a source sends for a small guest, per checksum mode,
    strategy, batch size and compression."""
    plans = [
        # (checksum, strategy, batch pages, compression, channels)
        ("full", "tag-ioctl", 1024, "auto", 1),  # the default: frames of whole chunks, joined
        ("full", "tag-ioctl", 256, "auto", 1),
        ("full", "tag-ioctl", 100, "none", 2),
        ("meta", "tag-ioctl", 256, "1", 2),
        ("none", "tag-ioctl", 64, "none", 1),
        ("full", "prot-mte", 256, "1", 1),
        ("none", "none", 128, "1", 2),
        # postcopy (channels 0: no data channel, the fault channel unused):
        # the switch, then the missing pages with their tables
        ("full", "memfd-continue", 256, "auto", 0),
        ("meta", "uffd-copy-tags", 64, "none", 0),
    ]
    seeds, hosts = [], {}
    try:
        for checksum, strategy_name, batch, compression, channels in plans:
            prot = STRATEGIES[strategy_name].vmm_prot_mte
            if prot not in hosts:
                host = SimulatedHost(ram, workload="allocator", rate=0, seed=7, device_prot_mte=prot)
                host.prepare_guest()
                hosts[prot] = host
            if channels:
                seeds.append(_capture(hosts[prot], checksum, strategy_name, batch, compression, channels))
            else:
                seeds.append(_capture_postcopy(hosts[prot], checksum, strategy_name, batch, compression))
    finally:
        for host in hosts.values():
            host.close()
    return seeds


def _capture(host, checksum, strategy_name, batch, compression, channels) -> Seed:
    config = MigrationConfig(checksum=checksum, channels=channels, batch_pages=batch, compression=compression)
    strategy = STRATEGIES[strategy_name](host, config)
    strategy.setup_source()
    try:
        builder = BatchBuilder(strategy, Compressor(compression), batch, checked=checksum == "full")
        npages = host.memory.npages
        ctl = Connection(source_machine(), checksum)
        out = [_send(ctl, _hello(host, config, strategy, SESSION if channels > 1 else "", b"n" * 16))]
        ctl.machine.step(RECV, T.WELCOME)
        out.append(_send(ctl, fr.Auth(b"")))
        data = []
        dconn = None
        if channels > 1:
            dconn = Connection(data_source_machine(1), checksum)
            data.append(_send(dconn, fr.Join(SESSION, 1, b"")))
            dconn.machine.step(RECV, T.WELCOME)
        # pass 0: every page; with two channels, the upper half goes on channel 1
        halves = [(ctl, out, (0, npages if dconn is None else npages // 2))]
        if dconn is not None:
            halves.append((dconn, data, (npages // 2, npages)))
        for conn, sink, (lo, hi) in halves:
            sent = 0
            from migrate.engine.pages import split_batches

            for ranges in split_batches([(lo, hi)], batch):
                frame, _ = builder.build(0, ranges)
                sink.append(_send(conn, frame))
                sent += frame.npages
            sink.append(_send(conn, fr.PassEnd(0, sent)))
        ctl.machine.local("pause")
        # pass 1 (the final one): a few dirty pages and a tags-only batch
        frame, _ = builder.build(1, [(3, 2), (300, 7)])
        out.append(_send(ctl, frame))
        frame, _ = builder.build_tags_only(1, [(40, 4)])
        out.append(_send(ctl, frame))
        out.append(_send(ctl, fr.PassEnd(1, 13)))
        if dconn is not None:
            frame, _ = builder.build(1, [(npages - 9, 5)])
            data.append(_send(dconn, frame))
            data.append(_send(dconn, fr.PassEnd(1, 5)))
        state = SourceVmm._collect_state(types.SimpleNamespace(host=host))
        out.append(_send(ctl, fr.State(state)))
        digest = MemoryDigest(host.memory)
        out.append(_send(ctl, fr.Complete(digest.data_digest(), digest.tag_digest(), state_digest(state), 1)))
        ctl.machine.step(RECV, T.CONFIRM)
        out.append(_send(ctl, fr.Inspect([0, 3])))
        ctl.machine.step(RECV, T.INSPECTION)
        out.append(_send(ctl, fr.Go()))
    finally:
        strategy.close()
    name = f"{checksum}/{strategy_name}/b{batch}/z{compression}/c{channels}"
    return Seed(name, checksum, strategy_name, out, data)


#: the pages a postcopy seed leaves missing at the switch, sent after it
POSTCOPY_RANGES = [(3, 2), (300, 7), (700, 1)]


def _capture_postcopy(host, checksum, strategy_name, batch, compression) -> Seed:
    """A postcopy migration: the bulk pass, pages discarded ahead (POSTCOPY
    before the pause, MISSING mode), the switch (STATE, POSTCOPY announcing the missing
    pages), then per batch its table and its pages, and the last PASS_END."""
    from migrate.engine.pages import split_batches
    from migrate.engine.postcopy import page_table

    config = MigrationConfig(checksum=checksum, channels=1, batch_pages=batch, compression=compression, postcopy=True)
    strategy = STRATEGIES[strategy_name](host, config)
    strategy.setup_source()
    try:
        builder = BatchBuilder(strategy, Compressor(compression), batch, checked=checksum == "full")
        ctl = Connection(source_machine(), checksum)
        out = [_send(ctl, _hello(host, config, strategy, "", b"n" * 16))]
        ctl.machine.step(RECV, T.WELCOME)
        out.append(_send(ctl, fr.Auth(b"")))
        sent = 0
        for ranges in split_batches([(0, host.memory.npages)], batch):
            frame, _ = builder.build(0, ranges)
            out.append(_send(ctl, frame))
            sent += frame.npages
        out.append(_send(ctl, fr.PassEnd(0, sent)))
        if strategy.postcopy_mode == "missing":  # discarded ahead
            out.append(_send(ctl, fr.Postcopy(POSTCOPY_RANGES[1:2], b"", last=True)))
        ctl.machine.local("pause")
        state = SourceVmm._collect_state(types.SimpleNamespace(host=host))
        out.append(_send(ctl, fr.State(state)))
        out.append(_send(ctl, fr.Postcopy(POSTCOPY_RANGES[:1], b"", last=False)))
        out.append(_send(ctl, fr.Postcopy(POSTCOPY_RANGES[1:], b"", last=True)))
        ctl.machine.step(RECV, T.CONFIRM)
        for ranges in (POSTCOPY_RANGES[:2], POSTCOPY_RANGES[2:]):
            out.append(_send(ctl, fr.Postcopy(ranges, page_table(host.memory, ranges))))
            frame, _ = builder.build(1, ranges)
            out.append(_send(ctl, frame))
        out.append(_send(ctl, fr.PassEnd(1, sum(c for _, c in POSTCOPY_RANGES))))
    finally:
        strategy.close()
    return Seed(f"{checksum}/{strategy_name}/b{batch}/z{compression}/postcopy", checksum, strategy_name, out)


# -- frame surgery ----------------------------------------------------------------------------
def split_frame(raw: bytes):
    """(type byte, flags, meta bytes, payload bytes) of an encoded frame, or
    None when its lengths do not fit the bytes."""
    if len(raw) < H:
        return None
    _, ftype, flags, ml, pl, _ = fr.HEADER.unpack(raw[:H])
    if len(raw) != H + ml + pl:
        return None
    return ftype, flags, raw[H : H + ml], raw[H + ml :]


def build_frame(ftype: int, flags: int, meta: bytes, payload: bytes, crc: int | None = None) -> bytes:
    """A frame from its parts, with the CRC the encoder would write (or ``crc``)."""
    head = struct.pack("<2sBBII", fr.MAGIC, ftype & 0xFF, flags & 0xFF, len(meta), len(payload))
    if crc is None:
        crc = 0
        if flags & fr.FLAG_CRC:
            crc = crc32(meta, crc32(head))
            if not flags & fr.FLAG_CRC_META_ONLY:
                crc = crc32(payload, crc)
    return head + struct.pack("<I", crc & 0xFFFFFFFF) + meta + payload


def _unpack_meta(meta: bytes):
    try:
        m = msgpack.unpackb(meta, raw=False, strict_map_key=False)
    except Exception:
        return None
    return m if isinstance(m, dict) else None


# -- mutators: each takes (rng, frames, at, ctx) and returns the new list of frames ------------
INTERESTING_INTS = [0, 1, -1, 2, 255, 256, 4095, 4096, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32]
INTERESTING_INTS += [2**48, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), RAM // PAGE_SIZE, RAM // PAGE_SIZE - 1]


def _odd_value(rng: random.Random):
    """A value of a wrong type or an absurd size for a meta field."""
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice(INTERESTING_INTS)
    if kind == 1:
        return rng.choice([None, True, False, 1.5, float("nan"), float("inf"), -0.0])
    if kind == 2:
        return "x" * rng.choice([0, 1, 64, 65, 1000, 20000])
    if kind == 3:
        return bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 7, 15, 16, 17, 64, 65])))
    if kind == 4:
        return b"\xff" * rng.choice([8, 16, 32, 4096, 30000])
    if kind == 5:
        return [rng.choice(INTERESTING_INTS) for _ in range(rng.choice([0, 1, 2, 64, 65, 3000]))]
    if kind == 6:
        nested: object = 1
        for _ in range(rng.choice([2, 50, 200])):
            nested = [nested] if rng.random() < 0.5 else {"k": nested}
        return nested
    if kind == 7:
        return {"a": [1, {"b": b"c"}], 2: "x"}
    if kind == 8:
        return [True, None, "s", b"b", -5]
    if kind == 9:
        return rng.getrandbits(64) - (2**63 if rng.random() < 0.3 else 0)
    if kind == 10:
        return "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace") * 3
    return -rng.randrange(1, 2**20)


def _repack(rng, parts, meta_obj=None, meta=None, payload=None, fix_crc=None) -> bytes:
    ftype, flags, old_meta, old_payload = parts
    if meta is None:
        try:
            meta = msgpack.packb(meta_obj) if meta_obj is not None else old_meta
        except (OverflowError, TypeError, ValueError):
            meta = old_meta
    payload = old_payload if payload is None else payload
    fix = rng.random() < 0.85 if fix_crc is None else fix_crc
    return build_frame(ftype, flags, meta, payload, None if fix else rng.getrandbits(32))


def mut_header(rng, frames, at, ctx):
    raw = bytearray(frames[at])
    if len(raw) < H:
        return frames
    which = rng.randrange(6)
    if which == 0:  # magic
        raw[0:2] = rng.choice([b"MX", b"\x00\x00", b"TM", bytes([rng.getrandbits(8), rng.getrandbits(8)])])
    elif which == 1:  # type: another real type or an unknown one
        raw[2] = rng.choice([rng.randrange(256), rng.choice(list(T)).value, 0, 17, 255])
    elif which == 2:  # flags
        raw[3] = rng.choice([0, 1, 2, 3, 4, 0x80, 0xFF, rng.randrange(256)])
    elif which in (3, 4):  # meta_len / payload_len
        off = 4 if which == 3 else 8
        (old,) = struct.unpack_from("<I", raw, off)
        new = rng.choice(
            [0, old + 1, max(old - 1, 0), old * 2, fr.MAX_META, fr.MAX_META + 1, fr.MAX_PAYLOAD, fr.MAX_PAYLOAD + 1]
            + [2**32 - 1, rng.getrandbits(32), rng.randrange(64)]
        )
        struct.pack_into("<I", raw, off, new & 0xFFFFFFFF)
    else:  # crc
        struct.pack_into("<I", raw, 12, rng.getrandbits(32))
    if which in (1, 2) and rng.random() < 0.5:  # the same change with a CRC that covers it
        parts = split_frame(bytes(raw))
        if parts:
            raw = bytearray(build_frame(*parts))
    return frames[:at] + [bytes(raw)] + frames[at + 1 :]


def mut_meta(rng, frames, at, ctx):
    parts = split_frame(frames[at])
    if parts is None:
        return frames
    m = _unpack_meta(parts[2])
    if m is None or rng.random() < 0.1:
        garbage = rng.choice([b"", b"\xc1", b"\x91\x01", b"\xdf\xff\xff\xff\xff", os.urandom(0)])
        garbage += bytes(rng.getrandbits(8) for _ in range(rng.randrange(8)))
        return frames[:at] + [_repack(rng, parts, meta=garbage)] + frames[at + 1 :]
    op = rng.randrange(4)
    keys = list(m)
    if op == 0 and keys:
        del m[rng.choice(keys)]
    elif op == 1:
        m[rng.choice(["extra", "p", "r", "f", "dl", "dk", "tk", "version", "c", "x" * 200, 7])] = _odd_value(rng)
    elif keys:
        k = rng.choice(keys)
        v = m[k]
        if isinstance(v, int) and not isinstance(v, bool) and rng.random() < 0.5:
            m[k] = rng.choice(INTERESTING_INTS + [v + 1, v - 1, -v])
        elif isinstance(v, bytes) and v and rng.random() < 0.5:
            b = bytearray(v)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.getrandbits(8)
            m[k] = bytes(b) if rng.random() < 0.7 else bytes(b[: rng.randrange(len(b))])
        else:
            m[k] = _odd_value(rng)
    return frames[:at] + [_repack(rng, parts, meta_obj=m)] + frames[at + 1 :]


def mut_payload(rng, frames, at, ctx):
    parts = split_frame(frames[at])
    if parts is None:
        return frames
    p = bytearray(parts[3])
    op = rng.randrange(5)
    if op == 0 and p:
        for _ in range(rng.randrange(1, 8)):
            p[rng.randrange(len(p))] ^= 1 << rng.randrange(8)
    elif op == 1 and p:
        del p[rng.randrange(len(p)) :]
    elif op == 2:
        p += bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 7, 128, 4096])))
    elif op == 3:
        p = bytearray(os.urandom(0)) + bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300)))
    elif parts[0] == T.STATE:  # the guest state: a msgpack value of another shape
        try:
            tree = _mutate_tree(rng, msgpack.unpackb(bytes(p), strict_map_key=False))
            p = bytearray(msgpack.packb(tree))
        except (ValueError, TypeError, OverflowError, msgpack.ExtraData):
            pass  # not msgpack (an earlier mutation), or a value msgpack cannot write
    else:
        p = bytearray(b"")
    return frames[:at] + [_repack(rng, parts, payload=bytes(p))] + frames[at + 1 :]


def _mutate_tree(rng, obj, depth=0):
    """Replace one value somewhere inside a msgpack value (STATE's guest state)."""
    if isinstance(obj, dict) and obj and depth < 6:
        k = rng.choice(list(obj))
        if rng.random() < 0.15:
            del obj[k]
        else:
            obj[k] = _mutate_tree(rng, obj[k], depth + 1)
        return obj
    if isinstance(obj, list) and obj and depth < 6:
        i = rng.randrange(len(obj))
        if rng.random() < 0.15:
            del obj[i]
        elif rng.random() < 0.1:
            obj.append(obj[i])
        else:
            obj[i] = _mutate_tree(rng, obj[i], depth + 1)
        return obj
    if isinstance(obj, int) and not isinstance(obj, bool) and rng.random() < 0.6:
        return rng.choice(INTERESTING_INTS)
    return _odd_value(rng)


def _zstd_lie(rng, actual: int, declared: int) -> bytes:
    """A zstd frame of ``actual`` zero bytes whose header declares ``declared``
    (a bomb when actual > declared), or the honest frame when it cannot lie."""
    blob = bytearray(_zstd_zeros(actual))
    fhd = blob[4]
    single, did, fcs_flag = (fhd >> 5) & 1, fhd & 3, fhd >> 6
    off = 5 + (0 if single else 1) + (0, 1, 2, 4)[did]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 1 and declared < 256:
        blob[off] = declared
    elif size == 2 and 256 <= declared < 65536 + 256:
        struct.pack_into("<H", blob, off, declared - 256)
    elif size == 4 and declared < 2**32:
        struct.pack_into("<I", blob, off, declared)
    elif size == 8:
        struct.pack_into("<Q", blob, off, declared)
    return bytes(blob)


_ZSTD_CACHE: dict = {}


def _zstd_zeros(n: int) -> bytes:
    if n not in _ZSTD_CACHE:
        _ZSTD_CACHE[n] = zstandard.ZstdCompressor(level=3).compress(bytes(n))
    return _ZSTD_CACHE[n]


def _expected_pages_bytes(m: dict) -> tuple[int, int]:
    """(data bytes, tag bytes) a PAGES meta's flags call for."""
    flags = m.get("f", b"")
    if not isinstance(flags, bytes):
        return 0, 0
    ndata = sum(1 for b in flags if not b & (fr.PAGE_ZERO | fr.PAGE_KEEP))
    ntags = sum(1 for b in flags if b & fr.PAGE_TAGS)
    return ndata * PAGE_SIZE, ntags * fr.PACKED_TAGS_PER_PAGE


def mut_pages(rng, frames, at, ctx):
    """Structure-aware PAGES mutations: ranges, flags, data length,
    compressed payloads (corrupt zstd, zstd bombs), self-check CRCs."""
    idx = [i for i, raw in enumerate(frames) if len(raw) >= H and raw[2] == T.PAGES]
    if not idx:
        return mut_meta(rng, frames, at, ctx)
    at = rng.choice([i for i in idx if i >= at] or idx)
    parts = split_frame(frames[at])
    m = _unpack_meta(parts[2]) if parts else None
    if m is None:
        return frames
    payload = parts[3]
    dl = m.get("dl", 0) if isinstance(m.get("dl"), int) else 0
    data, tags = payload[:dl], payload[dl:]
    npages = ctx["npages"]
    op = rng.randrange(9)
    if op == 0:  # ranges
        pairs = []
        for _ in range(rng.choice([1, 1, 2, 3, 200])):
            pairs += [
                rng.choice([0, 1, npages - 1, npages, 2**32, 2**63, 2**64 - 1, rng.randrange(npages)]),
                rng.choice([0, 1, 2, npages, fr.MAX_BATCH_PAGES, fr.MAX_BATCH_PAGES + 1, 2**64 - 1]),
            ]
        m["r"] = struct.pack(f"<{len(pairs)}Q", *pairs)
        if rng.random() < 0.5:  # flags to match the page count
            total = sum(pairs[1::2])
            if total <= 4096:
                m["f"] = bytes(rng.choice(fr.VALID_PAGE_FLAGS) for _ in range(total))
    elif op == 1:  # flags: valid values reshuffled, or unknown ones
        f = bytearray(m.get("f", b"") if isinstance(m.get("f"), bytes) else b"")
        for _ in range(rng.randrange(1, 6)):
            if f:
                f[rng.randrange(len(f))] = rng.choice(list(fr.VALID_PAGE_FLAGS) + [8, 0x80, 0xFF])
        m["f"] = bytes(f)
    elif op == 2:  # data length
        m["dl"] = rng.choice([0, dl + 1, max(dl - 1, 0), len(payload), len(payload) + 1, fr.MAX_PAYLOAD + 1])
    elif op in (3, 4, 5):  # compressed data: corrupt, no size, bombs, lies
        want, _ = _expected_pages_bytes(m)
        kind = rng.randrange(6)
        if kind == 0:
            blob = bytearray(_zstd_zeros(max(want, 1)))
            blob[rng.randrange(len(blob))] ^= 0xFF
            blob = bytes(blob)
        elif kind == 1:  # streaming frame: no declared size
            blob = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(max(want, 1)))
        elif kind == 2:  # declares far more than the batch holds
            blob = _zstd_zeros(rng.choice([64 << 20, fr.MAX_PAYLOAD + 1, want + PAGE_SIZE]))
        elif kind == 3:  # declares the right size, holds far more: a bomb
            blob = _zstd_lie(rng, rng.choice([want + PAGE_SIZE, 16 << 20, 64 << 20]), want)
        elif kind == 4:  # right size, truncated
            blob = _zstd_zeros(max(want, 1))
            blob = blob[: rng.randrange(len(blob))]
        else:  # two frames back to back
            blob = _zstd_zeros(max(want, 1)) + _zstd_zeros(PAGE_SIZE)
        if rng.random() < 0.5:
            data, m["dc"] = blob, True
        else:
            tags, m["tc"] = blob, True
        m["dl"] = len(data)
    elif op == 6:  # compressed flags on raw bytes and back
        m["dc"], m["tc"] = rng.choice([True, False]), rng.choice([True, False])
    elif op == 7:  # payload bytes, with the self-check CRCs recomputed
        b = bytearray(data)
        if b:
            for _ in range(rng.randrange(1, 5)):
                b[rng.randrange(len(b))] ^= 0x5A
        data = bytes(b)
    else:  # the pass number
        m["p"] = rng.choice([0, 1, 2, 2**32 - 1, 2**32, -1])
    if "tk" in m and rng.random() < 0.8:
        m["tk"] = crc32(tags)
    if "dk" in m and rng.random() < 0.8 and not m.get("dc"):
        from migrate.engine.pages import content_crc

        try:
            m["dk"] = content_crc(m["f"], data)
        except Exception:  # malformed fields: leave the CRC as it was
            pass
    new = _repack(rng, parts, meta_obj=m, payload=data + tags)
    return frames[:at] + [new] + frames[at + 1 :]


def mut_order(rng, frames, at, ctx):
    """Swap, repeat, drop, or inject a frame of another state or stream."""
    op = rng.randrange(4)
    j = rng.randrange(len(frames))
    if op == 0 and len(frames) > 1:
        frames = list(frames)
        frames[at], frames[j] = frames[j], frames[at]
        return frames
    if op == 1:
        return frames[: at + 1] + [frames[at]] * rng.choice([1, 1, 2, 5]) + frames[at + 1 :]
    if op == 2:
        return frames[:at] + frames[at + 1 :]
    return frames[:at] + [rng.choice(ctx["strays"])] + frames[at:]


def mut_bytes(rng, frames, at, ctx):
    """Stream-level damage after the untouched prefix: a cut, stray bytes, bit flips."""
    prefix, rest = b"".join(frames[:at]), bytearray(b"".join(frames[at:]))
    op = rng.randrange(3)
    if op == 0 and rest:
        del rest[rng.randrange(len(rest)) :]
    elif op == 1:
        pos = rng.randrange(len(rest) + 1)
        rest[pos:pos] = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 2, 16, 17, 100])))
    elif rest:
        for _ in range(rng.randrange(1, 10)):
            rest[rng.randrange(len(rest))] ^= 1 << rng.randrange(8)
    return [prefix + bytes(rest)]


MUTATORS = {
    "header": mut_header,
    "meta": mut_meta,
    "payload": mut_payload,
    "pages": mut_pages,
    "order": mut_order,
    "bytes": mut_bytes,
}
WEIGHTS = {"header": 3, "meta": 4, "payload": 2, "pages": 5, "order": 3, "bytes": 2}


def stray_frames(seeds: list[Seed]) -> list[bytes]:
    """Frames of other states, other streams and the other direction."""
    strays = []
    for checksum in fr.CHECKSUM_MODES:
        for frame in (
            fr.Welcome(fr.PROTOCOL_VERSION, b"n", b""),
            fr.Confirm("d", "t", "s", b"\x00" * 8),
            fr.Inspection([0], b"\x00" * 132),
            fr.Resumed(),
            fr.Recover(SESSION, "go"),
            fr.Recover(SESSION, "abort"),
            fr.Postcopy([(0, 1)], b"\x00" * 8),
            fr.Request([(0, 1)]),
            fr.Join(SESSION, 1),
            fr.Error("fuzz", "an error"),
            fr.Abort("fuzz"),
            fr.Inspect([2**40]),
            fr.PassEnd(2**31, 0),
            fr.Complete("", "", "", 7),
            fr.State({}),
            fr.Go(),
        ):
            strays.append(b"".join(bytes(b) for b in fr.encode(frame, checksum)))
    for seed in seeds:
        strays += seed.control[:2] + seed.control[-4:] + seed.data[:1]
    return strays


@dataclass
class FuzzInput:
    """One input: a seed with its control (and data) stream as bytes, and
    how the destination reads it (``via``: "channel" as the transport
    does, or "feed" through Connection.feed in ``splits``)."""

    seed: int
    control: bytes
    data: bytes | None
    via: str = "channel"
    splits: tuple = ()
    mutations: tuple = ()


def make_input(rng: random.Random, seeds: list[Seed], strays: list[bytes], seed_index: int | None = None) -> FuzzInput:
    si = rng.randrange(len(seeds)) if seed_index is None else seed_index
    seed = seeds[si]
    ctx = {"npages": RAM // PAGE_SIZE, "strays": strays}
    target = "data" if seed.data and rng.random() < 0.3 else "control"
    frames = list(seed.data if target == "data" else seed.control)
    names = list(WEIGHTS)
    applied = []
    at = rng.randrange(len(frames))  # the untouched prefix: the machine's state when the mutation hits
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        name = rng.choices(names, [WEIGHTS[n] for n in names])[0]
        frames = MUTATORS[name](rng, frames, min(at, len(frames) - 1), ctx) or frames
        applied.append(name)
    stream = b"".join(frames)
    control = stream if target == "control" else b"".join(seed.control)
    data = (stream if target == "data" else b"".join(seed.data)) if seed.data else None
    via, splits = "channel", ()
    if target == "control" and rng.random() < 0.15:
        via = "feed"
        splits = tuple(sorted(rng.randrange(len(control) + 1) for _ in range(rng.randrange(1, 6))))
    return FuzzInput(si, control, data, via, splits, (target, *applied))


# -- the target: the destination's input path ---------------------------------------------------
class _Incomplete(Exception):
    """The stream ended inside a frame, or before the migration did: a real
    destination would wait and time out."""


class _Reader:
    """Frames from a byte string, the way the transport's FrameChannel reads
    them: header, then (for a self-checked PAGES frame when a placer is set)
    the meta, the placer's decision and the data landed straight in guest
    RAM; otherwise the whole frame through Connection.receive."""

    def __init__(self, conn: Connection, stream: bytes):
        self.conn = conn
        self.buf = memoryview(stream)
        self.pos = 0
        self.placer = None

    def more(self) -> bool:
        return self.pos < len(self.buf)

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise _Incomplete()

    def recv(self):
        self._need(H)
        header = self.conn.parse_header(self.buf[self.pos : self.pos + H])
        if self.placer is not None and header.type == T.PAGES and header.flags & fr.FLAG_CRC_META_ONLY:
            head = H + header.meta_len
            self._need(head)
            fields, dl = self.conn.receive_pages_head(header, self.buf[self.pos + H : self.pos + head])
            target = self.placer(fields, dl)
            if target is not None:
                frame = self.conn.accept_landing(fields)
                self._need(head + header.payload_len)
                fd, offset, lock, landed, view = target
                start = self.pos + head
                if view is None:  # into the file, under the writers' lock
                    with lock:
                        os.pwrite(fd, self.buf[start : start + dl], offset)
                else:  # through the mapping: no lock (as the transport)
                    view[:] = self.buf[start : start + dl]
                landed(dl)
                frame.tags = bytes(self.buf[start + dl : start + header.payload_len])
                self.pos += head + header.payload_len
                frame.check_tags()
                return frame
        total = H + header.meta_len + header.payload_len
        self._need(total)
        base = self.pos + H
        meta = self.buf[base : base + header.meta_len]
        payload = self.buf[base + header.meta_len : self.pos + total]
        self.pos += total
        return self.conn.receive(header, meta, payload)


class _FeedReader:
    """HELLO and AUTH as the transport reads them (the destination answers
    WELCOME between the two), then the rest of the stream through
    Connection.feed, cut at ``splits``."""

    def __init__(self, conn: Connection, stream: bytes, splits):
        self.conn = conn
        self.first = _Reader(conn, stream)
        self.handshake = 2
        self.stream = stream
        self.splits = splits
        self.pieces = None
        self.queue: list = []
        self.placer = None

    def more(self) -> bool:
        if self.pieces is None:
            return self.first.more()
        return bool(self.queue or any(self.pieces))

    def recv(self):
        if self.handshake:
            self.handshake -= 1
            return self.first.recv()
        if self.pieces is None:
            start = self.first.pos
            cuts = [start, *(c for c in self.splits if c > start), len(self.stream)]
            self.pieces = [self.stream[a:b] for a, b in zip(cuts, cuts[1:])]
        while not self.queue:
            if not self.pieces:
                raise _Incomplete()
            self.queue += self.conn.feed(self.pieces.pop(0))
        return self.queue.pop(0)


class DestTarget:
    """One destination, fed one input; ``run`` returns the final state name
    or raises what the destination would (MigrationError) or a bug."""

    def __init__(self, checksum: str, ram: int = RAM):
        self.config = MigrationConfig(checksum=checksum)
        self.ram = ram
        self.host = None
        self.vmm = None
        self.strategy = None

    def close(self) -> None:
        if self.strategy is not None:
            self.strategy.close()
        if self.host is not None:
            if self.host.vm.uffd is not None:  # a postcopy input
                self.host.vm.uffd.close()
            self.host.close()

    def run(self, inp: FuzzInput) -> str:
        conn = Connection(dest_machine(), self.config.checksum)
        reader = _Reader(conn, inp.control) if inp.via == "channel" else _FeedReader(conn, inp.control, inp.splits)
        try:
            self._receive(conn, reader, inp.data)
        except _Incomplete:
            return f"incomplete:{conn.state.value}"
        return f"accepted:{conn.state.value}"

    def _receive(self, conn, reader, data) -> None:
        # -- the handshake (dest._handshake, handshake.authenticate)
        hello = reader.recv()
        # as a destination builds it by default: RAM on huge pages where it can
        self.host = SimulatedHost(self.ram, workload="idle", workload_params={"fill": 0}, rate=0, huge_pages="auto")
        vmm = self.vmm = DestVmm(self.host, self.config)
        mismatch = hello_mismatch(hello, self.host, None, None)
        if mismatch:
            conn.send(fr.Error("mismatch", mismatch))
            raise HandshakeMismatch(mismatch)
        self.strategy = vmm.strategy = STRATEGIES[hello.strategy](self.host, self.config)
        self.strategy.setup_dest()
        digest = vmm._digest = MemoryDigest(self.host.memory, compute=False)
        applier = vmm._applier = BatchApplier(
            self.strategy, self.host.memory.npages, on_write=digest.mark_stale, digest=digest
        )
        vmm.machine = conn.machine
        conn.send(fr.Welcome(fr.PROTOCOL_VERSION, b"n" * 16, b""))
        frame = reader.recv()
        if frame.type == T.ERROR:
            raise PeerError(f"source: {frame.message}", frame.code)
        if frame.type == T.ABORT:
            raise Cancelled(f"source aborted: {frame.reason}")
        if hello.postcopy and (why_not := self.host.memory.use_small_pages()):
            conn.send(fr.Error("mismatch", why_not))
            raise HandshakeMismatch(why_not)
        vmm.hello = hello
        pass_seen = vmm._channels.pass_seen
        reader.placer = lambda fields, dl: None if fields["pass_no"] <= pass_seen[0] else applier.placement(fields, dl)
        if data is not None:
            self._data_channel(vmm, data)
        # -- control frames (dest.receive and its handlers)
        state = None
        postcopy = _Postcopy(vmm)
        while True:
            frame = reader.recv()
            if postcopy.takes(frame, state is not None):
                if postcopy.done:
                    conn.send(fr.Resumed())
                    return
                if postcopy.switched and postcopy.pc is None:
                    postcopy.switch(conn, digest, state)
            elif frame.type == T.PAGES:
                if frame.pass_no <= pass_seen[0]:
                    raise ProtocolError(f"PAGES of pass {frame.pass_no} after that pass ended")
                vmm._refuse_after_discard("PAGES")
                applier.apply(frame)
            elif frame.type == T.PASS_END:
                vmm._refuse_after_discard("PASS_END")
                pass_seen[0] = frame.pass_no
            elif frame.type == T.STATE:
                state = frame.state
                vmm._load_state(state)
            elif frame.type == T.COMPLETE:
                vmm._refuse_after_discard("COMPLETE")
                missing = [c for c in range(1, hello.channels) if pass_seen.get(c, -1) < frame.final_pass]
                if missing:
                    raise PeerTimeout(f"data channel {missing[0]} did not deliver the final pass")
                vmm._channels.frozen = True
                digest.refresh(digest.pending_chunks(), frozen=True)
                sdigest = state_digest(vmm._loaded_state()) if state is not None else ""
                conn.send(fr.Confirm(digest.data_digest(), digest.tag_digest(), sdigest, digest.chunk_crcs()))
            elif frame.type == T.INSPECT:
                vmm._check_chunks(frame.chunks)
                conn.send(fr.Inspection(frame.chunks, page_detail(self.host.memory, frame.chunks)))
            elif frame.type == T.GO:
                conn.send(fr.Resumed())
                if reader.more():  # what the destination reads while it lingers
                    try:
                        reader.recv()
                    except (MigrationError, _Incomplete):
                        pass
                return
            elif frame.type == T.ERROR:
                raise PeerError(f"source: {frame.message}", frame.code)
            elif frame.type == T.ABORT:
                raise Cancelled(f"source aborted: {frame.reason}")
            else:  # pragma: no cover - the state machine lets no other type through
                raise AssertionError(f"the machine let {frame.type.name} through")

    def _data_channel(self, vmm, data: bytes) -> None:
        """Data channel 1 joins right after AUTH (dest._admit, _check_join,
        dest_channels.DataChannels._receive), and runs to its end."""
        conn = Connection(data_dest_machine(), self.config.checksum)
        reader = _Reader(conn, data)
        try:
            frame = reader.recv()
            if frame.type == T.RECOVER:
                return  # DestRecovery.take: not in the window before CONFIRM, nothing lands
            vmm._check_join(frame, types.SimpleNamespace(_end=0, _start=0))
            conn.ram_pages = self.host.memory.npages
            conn.send(fr.Welcome(fr.PROTOCOL_VERSION))
            applier = vmm._lane_applier()
            channels = vmm._channels
            channels.pass_seen[frame.channel] = -1
            index, ended = frame.channel, -1
            reader.placer = lambda fields, dl: (
                None if fields["pass_no"] <= ended or channels.frozen else applier.placement(fields, dl)
            )
            while reader.more():
                frame = reader.recv()
                if frame.type == T.PAGES:
                    if frame.pass_no <= ended or channels.frozen:
                        raise ProtocolError(f"PAGES of pass {frame.pass_no} on data channel {index} after it ended")
                    applier.apply(frame)
                elif frame.type == T.PASS_END:
                    ended = max(ended, frame.pass_no)
                    channels.pass_seen[index] = frame.pass_no
                elif frame.type == T.ERROR:
                    raise PeerError(f"source: {frame.message}", frame.code)
                else:
                    raise ProtocolError(f"unexpected {frame.type.name} frame on data channel {index}")
        except _Incomplete:
            return  # the channel stalls; the control connection decides


class _Postcopy:
    """The destination's postcopy handlers (dest._on_postcopy,
    _switch_to_postcopy, _on_pages and _end_postcopy), without threads: no
    guest runs, so nothing faults and no fault channel is served."""

    def __init__(self, vmm):
        self.vmm = vmm
        self.announced: list = []
        self.switched = False
        self.pc = None
        self.done = False

    def takes(self, frame, paused: bool) -> bool:
        """Handle ``frame`` if it is postcopy's; False for the others.
        ``paused``: STATE came (the connection's own state may be ahead:
        fed whole, it decodes every frame at once)."""
        if frame.type == T.POSTCOPY:
            if not self.vmm.hello.postcopy:
                raise ProtocolError("POSTCOPY, but the source's HELLO did not say it may switch to postcopy")
            if frame.table:
                if self.pc is None:
                    raise ProtocolError("a POSTCOPY table before the switch")
                self.pc.add_table(frame)
            elif self.pc is not None:
                raise ProtocolError("POSTCOPY announced pages after the switch")
            elif not paused:  # discard ahead (no APPLIED: nobody reads it here)
                if self.vmm._take_discard_ahead(frame):
                    self.vmm._discard_ahead_now()
            else:
                self.announced += frame.ranges
                self.switched = frame.last
            return True
        if self.pc is not None and frame.type == T.PAGES:
            self.pc.place(frame)
            return True
        if self.pc is not None and frame.type == T.PASS_END:
            if not self.pc.complete:
                raise ProtocolError(f"the source ended postcopy with {self.pc.total - self.pc.landed} pages not sent")
            self.done = True
            return True
        return False

    def switch(self, conn, digest, state) -> None:
        from hosts.uffd import Userfaultfd
        from migrate.engine.postcopy import DestPostcopy

        vmm = self.vmm
        if vmm.strategy.postcopy_mode is None:
            raise ProtocolError(f"strategy {vmm.strategy.name} cannot do postcopy")
        if state is None:
            raise ProtocolError("POSTCOPY before STATE")
        late = vmm._left_to_discard(self.announced)
        vmm._discard(late)
        uffd = Userfaultfd(vmm.host.vm, vmm.strategy.postcopy_mode)
        uffd.mark_missing(self.announced)
        vmm.host.vm.uffd = uffd
        self.pc = DestPostcopy(vmm.host, vmm.strategy, uffd, self.announced)
        vmm._channels.frozen = True
        digest.refresh(digest.pending_chunks(), frozen=True)
        # Fed whole (``via="feed"``), the connection may have decoded the
        # pages after the switch already, as a socket read one frame at a
        # time never does: CONFIRM then has no state to go out in.
        if conn.machine.state == DestState.POSTCOPY:
            conn.send(fr.Confirm(digest.data_digest(), digest.tag_digest(), "", digest.chunk_crcs()))


def run_input(inp: FuzzInput, seeds: list[Seed]) -> str:
    target = DestTarget(seeds[inp.seed].checksum)
    try:
        return target.run(inp)
    finally:
        target.close()


# -- the campaign ------------------------------------------------------------------------------
class Hang(BaseException):
    """Raised by the interval timer inside an input that ran too long."""


_NUM = re.compile(r"0x[0-9a-f]+|-?\d+")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|b'[^']*'")


def outcome_class(exc: BaseException | None, accepted: str = "") -> str:
    """The outcome of an input, with numbers and quoted values left out."""
    if exc is None:
        return accepted
    msg = _QUOTED.sub("Q", _NUM.sub("N", str(exc).splitlines()[0] if str(exc) else ""))[:90]
    return f"{type(exc).__name__}: {msg}"


@dataclass
class Report:
    inputs: int = 0
    seconds: float = 0.0
    classes: dict = field(default_factory=dict)
    crashes: list = field(default_factory=list)
    hangs: list = field(default_factory=list)
    slowest: tuple = (0.0, -1)
    max_rss_kib: int = 0
    tracemalloc_peak: int = 0
    tracemalloc_peak_input: int = -1
    traced_inputs: int = 0
    generator_errors: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "inputs": self.inputs,
            "seconds": round(self.seconds, 1),
            "crashes": self.crashes,
            "hangs": self.hangs,
            "slowest_input": {"seconds": round(self.slowest[0], 3), "index": self.slowest[1]},
            "peak_rss_kib": self.max_rss_kib,
            "tracemalloc_peak_bytes": self.tracemalloc_peak,
            "tracemalloc_peak_input": self.tracemalloc_peak_input,
            "traced_inputs": self.traced_inputs,
            "generator_errors": self.generator_errors,
            "outcome_classes": dict(sorted(self.classes.items(), key=lambda kv: -kv[1])),
        }


def _save(out: str | None, kind: str, index: int, inp: FuzzInput, seeds, detail: str) -> str | None:
    if out is None:
        return None
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, f"{kind}-{index}")
    with open(base + ".control.bin", "wb") as f:
        f.write(inp.control)
    if inp.data is not None:
        with open(base + ".data.bin", "wb") as f:
            f.write(inp.data)
    meta = {
        "seed": inp.seed,
        "seed_name": seeds[inp.seed].name,
        "checksum": seeds[inp.seed].checksum,
        "via": inp.via,
        "splits": list(inp.splits),
        "mutations": list(inp.mutations),
        "detail": detail,
    }
    with open(base + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    return base


def replay(base: str, seeds: list[Seed] | None = None) -> str:
    """Run a reproducer saved by the campaign (``base``: the path without
    ``.json``); raises what the input raises."""
    seeds = seeds or capture_seeds()
    with open(base + ".json") as f:
        meta = json.load(f)
    with open(base + ".control.bin", "rb") as f:
        control = f.read()
    data = None
    if os.path.exists(base + ".data.bin"):
        with open(base + ".data.bin", "rb") as f:
            data = f.read()
    return run_input(FuzzInput(meta["seed"], control, data, meta["via"], tuple(meta["splits"])), seeds)


def campaign(
    inputs: int,
    seed: int = 1,
    out: str | None = None,
    hang_seconds: float = 10.0,
    trace_every: int = 50,
    target=None,
    progress=None,
) -> Report:
    """Run ``inputs`` mutated inputs; ``target(inp, seeds)`` defaults to the
    destination (run_input)."""
    target = target or run_input
    seeds = capture_seeds()
    strays = stray_frames(seeds)
    report = Report()
    alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if alarm:

        def on_alarm(signum, frame):
            raise Hang()

        old_handler = signal.signal(signal.SIGALRM, on_alarm)
    started = time.perf_counter()
    try:
        for i in range(inputs):
            try:
                inp = make_input(random.Random(f"{seed}:{i}"), seeds, strays)
            except Exception:  # a bug of the fuzzer, not of the destination: count it, go on
                report.generator_errors.append({"index": i, "traceback": traceback.format_exc()})
                continue
            traced = trace_every > 0 and i % trace_every == 0
            if traced:
                tracemalloc.start()
            t = time.perf_counter()
            exc: BaseException | None = None
            accepted = ""
            try:
                if alarm:
                    signal.setitimer(signal.ITIMER_REAL, hang_seconds)
                try:
                    accepted = target(inp, seeds)
                finally:
                    if alarm:
                        signal.setitimer(signal.ITIMER_REAL, 0)
            except Hang:
                exc = Hang()
            except Exception as e:  # noqa: BLE001 - every exception is classified below
                exc = e
                tb = traceback.format_exc()
            dt = time.perf_counter() - t
            if traced:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                report.traced_inputs += 1
                if peak > report.tracemalloc_peak:
                    report.tracemalloc_peak, report.tracemalloc_peak_input = peak, i
            report.inputs += 1
            if dt > report.slowest[0]:
                report.slowest = (dt, i)
            if isinstance(exc, Hang) or dt > hang_seconds:
                path = _save(out, "hang", i, inp, seeds, f"{dt:.1f} s")
                report.hangs.append({"index": i, "seconds": round(dt, 2), "reproducer": path})
                cls = "HANG"
            elif exc is not None and not isinstance(exc, MigrationError):
                path = _save(out, "crash", i, inp, seeds, tb)
                report.crashes.append({"index": i, "error": outcome_class(exc), "traceback": tb, "reproducer": path})
                cls = "CRASH " + outcome_class(exc)
            else:
                cls = outcome_class(exc, accepted)
            report.classes[cls] = report.classes.get(cls, 0) + 1
            if progress and (i + 1) % 5000 == 0:
                progress(
                    f"{i + 1} inputs, {time.perf_counter() - started:.0f} s, "
                    f"{len(report.crashes)} crashes, {len(report.hangs)} hangs"
                )
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
    report.seconds = time.perf_counter() - started
    report.max_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if out is not None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "fuzz.json"), "w") as f:
            json.dump({"seed": seed, "hang_seconds": hang_seconds, **report.to_json()}, f, indent=1)
    return report


def summary(report: Report, top: int = 40) -> str:
    lines = [
        f"inputs        {report.inputs}",
        f"time          {report.seconds:.1f} s ({report.inputs / max(report.seconds, 1e-9):.0f} inputs/s)",
        f"crashes       {len(report.crashes)}",
        f"hangs         {len(report.hangs)}",
        f"slowest input {report.slowest[0] * 1000:.1f} ms (#{report.slowest[1]})",
        f"peak RSS      {report.max_rss_kib / 1024:.1f} MiB (ru_maxrss)",
        f"tracemalloc   {report.tracemalloc_peak / 2**20:.1f} MiB peak over {report.traced_inputs} traced inputs "
        f"(#{report.tracemalloc_peak_input})",
        f"outcome classes: {len(report.classes)}",
        f"fuzzer errors {len(report.generator_errors)} (inputs the mutators failed to make)",
        "",
        "| count | outcome |",
        "|---:|---|",
    ]
    for cls, n in sorted(report.classes.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {n} | {cls} |")
    if len(report.classes) > top:
        lines.append(f"| ... | {len(report.classes) - top} more classes in fuzz.json |")
    for c in report.crashes[:5]:
        lines += ["", f"CRASH #{c['index']}: {c['error']} ({c['reproducer']})", c["traceback"]]
    return "\n".join(lines)
