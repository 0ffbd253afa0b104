"""Splicing a frame's data from the socket into guest RAM's file (or, into
RAM allocated ahead, reading it straight into place): every byte lands
where it belongs however the peer's sends are cut, no write to the
file crosses the end of a 2 MiB huge page (a write covering part of a fresh
huge page makes tmpfs clear the rest of it first), and a peer that closes
inside the data is named with the bytes that came."""

import asyncio
import os
import re
import socket
import sys

import pytest

from migrate.errors import TransportError
from migrate.net import transport
from migrate.net.transport import FrameChannel

HUGE = 2 << 20


def _file_writes(monkeypatch, fd: int) -> list[tuple[int, int]]:
    """Record (offset, length) of every splice into ``fd``."""
    writes = []
    real = os.splice

    def splice(src, dst, count, offset_src=None, offset_dst=None, flags=0):
        n = real(src, dst, count, offset_src, offset_dst, flags)
        if dst == fd:
            writes.append((offset_dst, n))
        return n

    monkeypatch.setattr(transport.os, "splice", splice)
    return writes


async def _feed(sock: socket.socket, data: bytes, cuts: list[int], pause: float, close: bool) -> None:
    loop = asyncio.get_running_loop()
    pos = 0
    for cut in cuts + [len(data)]:
        await loop.sock_sendall(sock, data[pos:cut])
        pos = cut
        await asyncio.sleep(pause)
    if close:
        sock.shutdown(socket.SHUT_WR)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "offset, length, cuts, pause",
    [
        (0, 2 * HUGE, [], 0),  # aligned, all at once
        (3 * 4096, HUGE + 12345, [1000, 700_000, HUGE - 5], 0.01),  # unaligned, trickled
        (HUGE - 4096, 3 * HUGE, [4096, 4097, HUGE, 2 * HUGE + 1], 0.005),  # straddling three ends
    ],
)
async def test_spliced_bytes_land_in_place_and_no_write_crosses_a_huge_page(monkeypatch, offset, length, cuts, pause):
    data = os.urandom(length)
    fd = os.memfd_create("splice-test")
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        os.ftruncate(fd, offset + length + HUGE)
        writes = _file_writes(monkeypatch, fd)
        chan = FrameChannel(b, conn=None, timeout=5)
        await asyncio.gather(_feed(a, data, cuts, pause, close=False), chan._splice(fd, offset, length))
        assert os.pread(fd, length, offset) == data
        assert os.pread(fd, offset, 0) == bytes(offset)  # nothing before it
        assert chan.bytes_received == length
        assert sum(n for _, n in writes) == length
        for at, n in writes:
            assert at // HUGE == (at + n - 1) // HUGE, f"write at {at} of {n} bytes crosses a huge page's end"
        chan.close()
    finally:
        a.close()
        os.close(fd)


@pytest.mark.asyncio
@pytest.mark.parametrize("have, cuts, pause", [(0, [], 0), (777, [1000, 65536, 300_001], 0.005)])
async def test_data_received_into_place_lands_whole_and_is_told_as_it_comes(have, cuts, pause):
    """Through the mapping the data is read straight into its view: the
    bytes the buffer already held first, then the socket's, however the
    peer's sends are cut; the count told after each read only grows, and
    ends at the whole length."""
    data = os.urandom(HUGE + 4321)
    ram = bytearray(len(data) + 8192)
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        chan = FrameChannel(b, conn=None, timeout=5)
        chan._view[:have] = data[:have]  # as if read ahead with the meta
        chan._end = have
        told = []
        view = memoryview(ram)[4096 : 4096 + len(data)]
        await asyncio.gather(
            _feed(a, data[have:], cuts, pause, close=False),
            chan._receive_into(view, have, told.append),
        )
        assert bytes(ram[4096 : 4096 + len(data)]) == data and not any(ram[:4096]) and not any(ram[-4096:])
        assert told == sorted(told) and told[-1] == len(data) and (have == 0 or told[0] == have)
        assert chan.bytes_received == len(data) - have and chan._start == have
        chan.close()
    finally:
        a.close()


@pytest.mark.asyncio
async def test_a_peer_closing_inside_data_received_into_place_is_named():
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        chan = FrameChannel(b, conn=None, timeout=5)
        view = memoryview(bytearray(65536))
        with pytest.raises(TransportError, match=r"inside a frame \(5000 of 65536 data bytes\)"):
            await asyncio.gather(_feed(a, os.urandom(5000), [], 0, close=True), chan._receive_into(view, 0, int))
        chan.close()
    finally:
        a.close()


@pytest.mark.asyncio
async def test_a_peer_closing_inside_the_data_is_named_with_the_bytes_that_came():
    fd = os.memfd_create("splice-test")
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        os.ftruncate(fd, 2 * HUGE)
        chan = FrameChannel(b, conn=None, timeout=5)
        with pytest.raises(TransportError, match=r"inside a frame \(5000 of 65536 data bytes\)"):
            await asyncio.gather(_feed(a, os.urandom(5000), [], 0, close=True), chan._splice(fd, 0, 65536))
        chan.close()
    finally:
        a.close()
        os.close(fd)


@pytest.mark.asyncio
async def test_the_time_a_receiver_held_the_sender_back_is_read_from_tcp():
    """A receiver that reads nothing closes its window: the sender's channel
    reports the time since (Linux's tcpi_rwnd_limited).  A socket that is not
    TCP reports None, and the send policy falls back to the rate alone."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    a, b = socket.socketpair()
    try:
        chan = FrameChannel(client, conn=None, timeout=5)
        before = chan.receiver_limited_s()
        if before is None:
            # Only a kernel without the counter may say nothing; Linux has it since 4.10.
            release = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
            assert not (sys.platform == "linux" and release >= (4, 10)), os.uname().release
            pytest.skip(f"this kernel ({os.uname().release}) does not report tcpi_rwnd_limited")
        try:
            while True:
                client.send(bytes(1 << 20))
        except BlockingIOError:
            pass
        await asyncio.sleep(0.2)
        assert chan.receiver_limited_s() - before >= 0.1
        assert FrameChannel(a, conn=None, timeout=5).receiver_limited_s() is None
    finally:
        for s in (client, server, listener, a, b):
            s.close()


def test_a_receive_buffer_takes_memory_only_as_frames_fill_it():
    """A connection's 5 MiB receive buffer is an anonymous mapping: creating
    one costs no resident memory (bytearray(n) wrote all n bytes), and what
    a frame fills, reads back."""
    from migrate.net.transport import BUFFER_SIZE, receive_buffer

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    buffers = [receive_buffer() for _ in range(4)]
    grown = rss() - before
    assert all(len(b) == BUFFER_SIZE for b in buffers)
    assert grown < BUFFER_SIZE // 4, f"{grown} bytes resident for four untouched buffers"
    view = memoryview(buffers[0])
    view[100:105] = b"frame"
    assert bytes(view[100:105]) == b"frame" and bytes(view[:100]) == bytes(100)
    view.release()
