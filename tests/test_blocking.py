"""Frames for the fault channel's thread, without an event loop: whole
frames come out however the bytes arrive, each checked by the connection;
a peer gone mid-frame, or one that takes nothing, is an error that names it."""

import os
import select
import socket
import threading
import time

import pytest

from migrate.errors import PeerTimeout, TransportError
from migrate.net.blocking import BlockingFrames
from migrate.net.tls import PlainIO, send_blocking
from migrate.protocol import frames as fr
from migrate.protocol.machine import Connection, dest_machine, source_machine

RAM = 64 * fr.PAGE_SIZE


def wire(buffers) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def receiving_pair():
    """A source and a destination connection through HELLO, WELCOME and AUTH:
    the destination then takes PAGES."""
    src, dst = Connection(source_machine()), Connection(dest_machine())
    hello = fr.Hello(1, RAM, fr.PAGE_SIZE, 16, True, 2, "tag-ioctl", "packed4", "zstd", "vm", nonce=b"\x01" * 32)
    dst.feed(wire(src.send(hello)))
    src.feed(wire(dst.send(fr.Welcome(1, b"\x02" * 32, b"\x03" * 32))))
    dst.feed(wire(src.send(fr.Auth(b"\x04" * 32))))
    return src, dst


def pages(first, data):
    return fr.Pages(0, [(first, len(data) // fr.PAGE_SIZE)], bytes(len(data) // fr.PAGE_SIZE), data)


def collect(frames: BlockingFrames, want: int, deadline_s: float = 5.0) -> list:
    """Poll and read, as the fault thread does, until ``want`` frames came."""
    got, poller = [], select.poll()
    poller.register(frames.fileno(), select.POLLIN)
    end = time.monotonic() + deadline_s
    while len(got) < want and time.monotonic() < end:
        if poller.poll(100):
            got += [(f.ranges[0][0], bytes(f.data)) for f in frames.frames()]  # used before the next
    return got


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_whole_frames_come_out_however_the_bytes_arrive(piece):
    src, dst = receiving_pair()
    sent = [(i * 2, os.urandom((1 + i % 2) * fr.PAGE_SIZE)) for i in range(12)]
    stream = b"".join(wire(src.send(pages(first, data))) for first, data in sent)
    a, b = socket.socketpair()
    frames = BlockingFrames(b, dst, PlainIO(None, b), timeout=5)

    def trickle():
        for i in range(0, len(stream), piece):
            a.sendall(stream[i : i + piece])
            if piece < 4096 and i % (64 * piece) == 0:
                time.sleep(0.001)  # a header or a payload cut across reads

    writer = threading.Thread(target=trickle)
    writer.start()
    try:
        assert collect(frames, len(sent)) == sent
        assert frames.bytes_received == len(stream)
    finally:
        writer.join()
        a.close()
        frames.close()


def test_a_peer_gone_inside_a_frame_is_named():
    src, dst = receiving_pair()
    one = wire(src.send(pages(0, os.urandom(fr.PAGE_SIZE))))
    a, b = socket.socketpair()
    frames = BlockingFrames(b, dst, PlainIO(None, b), timeout=5)
    a.sendall(one + one[:100])
    a.close()
    got = []
    with pytest.raises(TransportError, match=rf"inside a frame \(100 of {len(one)} bytes\)"):
        for _ in range(3):
            select.select([b], [], [], 1)
            got += [f.ranges for f in frames.frames()]
    assert got == [[(0, 1)]]  # the whole frame before it still came out
    frames.close()


def test_a_frame_the_connection_refuses_is_not_returned():
    src, dst = receiving_pair()
    bad = bytearray(wire(src.send(pages(0, os.urandom(fr.PAGE_SIZE)))))
    bad[-1] ^= 0xFF  # a payload byte: the frame's CRC no longer matches
    a, b = socket.socketpair()
    frames = BlockingFrames(b, dst, PlainIO(None, b), timeout=5)
    a.sendall(bytes(bad))
    select.select([b], [], [], 1)
    with pytest.raises(Exception, match="checksum|CRC"):
        list(frames.frames())
    a.close()
    frames.close()


def test_a_send_the_peer_never_takes_times_out():
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a.setblocking(False)
    t = time.monotonic()
    with pytest.raises(TimeoutError):
        send_blocking(a, [bytes(8 << 20)], timeout=0.2)
    assert 0.15 < time.monotonic() - t < 3
    src, _ = receiving_pair()
    frames = BlockingFrames(a, src, PlainIO(None, a), timeout=0.2)
    with pytest.raises(PeerTimeout, match="accepted no data for 0.2 s"):
        frames.send(pages(0, bytes(fr.PAGE_SIZE * 256)))
    frames.close()
    b.close()
