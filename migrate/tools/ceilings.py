"""The machine's ceilings, measured in the same run as the figures they bound:
loopback TCP between two processes, zstd on a sample of guest data, CRC32 in
the digest's pieces, storing into guest RAM (fresh or preallocated), and the
tag conversions of the tag-ioctl path."""

import multiprocessing
import os
import socket
import time

import zstandard

CHUNK = 1 << 20


def _sink(port_queue, seconds: float) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port_queue.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while conn.recv_into(view):
        pass
    conn.close()
    srv.close()


def loopback_throughput(seconds: float = 1.0) -> float:
    """Bytes per second through loopback TCP from this process to another,
    with blocking sendall of 1 MiB buffers into a reused receive buffer."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_sink, args=(q, seconds), daemon=True)
    proc.start()
    try:
        port = q.get(timeout=30)
        sock = socket.create_connection(("127.0.0.1", port))
        payload = bytes(CHUNK)
        sent = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(64):
                sock.sendall(payload)
            sent += 64 * CHUNK
        elapsed = time.perf_counter() - t0
        sock.close()
        return sent / elapsed
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


def zstd_throughput(sample, level: int = 1, batch: int = 1 << 20) -> dict:
    """Compression speed (input bytes/s) and ratio of zstd at ``level`` on
    ``sample`` in ``batch``-sized pieces, as the migration compresses."""
    sample = memoryview(sample)
    c = zstandard.ZstdCompressor(level=level)
    out = 0
    t0 = time.perf_counter()
    for o in range(0, len(sample), batch):
        out += len(c.compress(sample[o : o + batch]))
    elapsed = time.perf_counter() - t0
    return {
        "level": level,
        "bytes_per_s": len(sample) / elapsed if elapsed else 0.0,
        "ratio": out / len(sample) if len(sample) else 1.0,
    }


def tag_work_per_page(packed_tags, chunk_pages: int = 256, repeat: int = 5) -> dict | None:
    """CPU seconds per tagged page of the work the simulation cannot avoid
    when tags move through KVM_ARM_MTE_COPY_TAGS, timed on ``packed_tags``
    (the tag storage of tagged pages, 128 bytes a page) a chunk at a time,
    best of ``repeat``: the source kernel unpacks its storage into the ioctl's
    byte per granule, the VMM packs that for the wire and compresses it; the
    destination VMM decompresses and unpacks for the ioctl, and its kernel
    packs into storage.  The formats are fixed (hardware storage, the ioctl's
    ABI, the wire's 4 bits), so these are four conversions, each already
    a C-level codec pass."""
    from hosts import PACKED_TAGS_PER_PAGE as PER_PAGE
    from hosts import tags as tagops
    from migrate.protocol.compression import TAG_LEVEL

    packed_tags = memoryview(packed_tags)
    step = chunk_pages * PER_PAGE
    pages = len(packed_tags) // PER_PAGE
    if not pages:
        return None
    chunks = [packed_tags[o : o + step] for o in range(0, pages * PER_PAGE, step)]
    comp, decomp = zstandard.ZstdCompressor(level=TAG_LEVEL), zstandard.ZstdDecompressor()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for storage in chunks:
            wire = comp.compress(tagops.pack(tagops.unpack(storage)))  # source: kernel, VMM
            tagops.pack(tagops.unpack(decomp.decompress(wire, max_output_size=len(storage))))  # destination
        best = min(best, time.perf_counter() - t0)
    return {"s_per_page": best / pages, "pages_timed": pages, "level": TAG_LEVEL}


def crc_throughput(sample_bytes: int = 64 << 20, repeat: int = 3) -> float:
    """Bytes per second of CRC32 over random data in the digest's 16 KiB
    pieces, best of ``repeat``: what each side pays per byte of page data
    for the per-frame check that doubles as the validation digest."""
    from migrate.engine.digest import piece_crcs

    sample = os.urandom(sample_bytes)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for o in range(0, sample_bytes, CHUNK):
            piece_crcs(memoryview(sample)[o : o + CHUNK])
        best = min(best, time.perf_counter() - t0)
    return sample_bytes / best


def landing_times(preallocated: bool, size: int = 256 << 20, repeat: int = 3, huge_pages: bool = True) -> list[float]:
    """Seconds to store ``size`` bytes in 1 MiB blocks into guest RAM as a
    destination does, once per repeat, each time new RAM: fresh memory,
    which the kernel must allocate and zero first, or memory allocated and
    touched beforehand.  The RAM is a destination's by default (on huge
    pages where this host can give them, hosts/memory.py), and each block
    lands where the destination would put it: through the mapping, or with
    pwrite() into the file (GuestMemory.stores_in_place).  The first store
    into fresh memory may take memory the hypervisor took back (free page
    reporting); the later ones reuse what the first just freed."""
    from hosts.memory import GuestMemory

    block = os.urandom(CHUNK)
    times = []
    for _ in range(repeat):
        memory = GuestMemory(size, "landing-ceiling", huge_pages=huge_pages)
        try:
            if preallocated:  # as --prealloc does: allocated and touched
                memory.prefault(0, memory.npages)
            in_place, data, fd = memory.stores_in_place(0, memory.npages), memory.data, memory.data_fd
            t0 = time.perf_counter()
            for o in range(0, size, CHUNK):
                if in_place:
                    data[o : o + CHUNK] = block
                else:
                    os.pwrite(fd, block, o)
            times.append(time.perf_counter() - t0)
        finally:
            memory.close()
    return times
