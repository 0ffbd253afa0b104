"""The machine's ceilings, measured in the same run as the figures they bound:
loopback TCP between two processes, and zstd on a sample of guest data."""

import multiprocessing
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
        out += len(c.compress(sample[o:o + batch]))
    elapsed = time.perf_counter() - t0
    return {"level": level, "bytes_per_s": len(sample) / elapsed if elapsed else 0.0,
            "ratio": out / len(sample) if len(sample) else 1.0}
