"""Sending frames on one connection: frames never interleave, even when two
tasks send while the socket is full, and after a send cut off part-way (a
cancel, a timeout) nothing more goes out on that connection -- an ABORT sent
after half a PAGES frame would be read as the rest of its payload."""

import asyncio
import socket
from types import SimpleNamespace

import pytest

from migrate.errors import TransportError
from migrate.net.transport import FrameChannel


class _Conn:
    """Stands in for the protocol core: a frame's bytes are its payload."""

    def __init__(self, sealed: bool = False):
        self.sealed = sealed  # MAC'd: each frame carries a sequence number

    def send(self, frame):
        return [frame.payload]


def _frame(name: str, payload: bytes):
    return SimpleNamespace(type=SimpleNamespace(name=name), payload=payload)


@pytest.fixture
def pair():
    """A connected socket pair with small buffers: a 4 MiB frame waits for room."""
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    yield a, b
    a.close()
    b.close()


async def _read_all(sock: socket.socket, n: int, pause: float = 0.0) -> bytes:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    got = bytearray()
    while len(got) < n:
        chunk = await loop.sock_recv(sock, 1 << 16)
        if not chunk:
            break
        got += chunk
        if pause:
            await asyncio.sleep(pause)
    return bytes(got)


@pytest.mark.asyncio
async def test_two_tasks_sending_at_once_never_interleave_their_frames(pair):
    a, b = pair
    chan = FrameChannel(a, _Conn(), timeout=5)
    big, small = b"A" * (4 << 20), b"B" * 100_000
    reader = asyncio.ensure_future(_read_all(b, len(big) + len(small), pause=0.001))
    first = asyncio.ensure_future(chan.send(_frame("PAGES", big)))
    await asyncio.sleep(0.01)  # the big frame waits for room part-way
    await chan.send(_frame("ERROR", small))
    await first
    assert await reader == big + small


@pytest.mark.asyncio
async def test_after_a_send_cut_off_part_way_nothing_more_goes_out(pair):
    a, b = pair
    chan = FrameChannel(a, _Conn(), timeout=5)
    sending = asyncio.ensure_future(chan.send(_frame("PAGES", b"A" * (4 << 20))))
    await asyncio.sleep(0.05)  # nobody reads: it waits part-way
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    assert chan.cut_frame == "PAGES"
    with pytest.raises(TransportError, match="cannot send ABORT: a PAGES frame was cut off part-way"):
        await chan.send(_frame("ABORT", b"B" * 10))
    a.shutdown(socket.SHUT_WR)
    got = await _read_all(b, 8 << 20)
    assert 0 < len(got) < 4 << 20 and set(got) == {ord("A")}  # part of the frame, and nothing after it


@pytest.mark.asyncio
async def test_a_send_that_times_out_cuts_the_connection_too(pair):
    from migrate.errors import PeerTimeout

    chan = FrameChannel(pair[0], _Conn(), timeout=0.1)
    with pytest.raises(PeerTimeout):
        await chan.send(_frame("PAGES", b"A" * (4 << 20)))
    with pytest.raises(TransportError, match="cut off part-way"):
        await chan.send(_frame("ERROR", b"B"))


@pytest.mark.asyncio
@pytest.mark.parametrize("sealed", [False, True])
async def test_a_send_cancelled_while_paced_cuts_only_a_sealed_connection(pair, sealed):
    """Cancelled in --max-bandwidth's limiter, no byte of the frame went out:
    a plain stream can still carry the ABORT that says why.  But the
    connection already counted the frame sent, and on a MAC'd stream the
    next frame would carry the wrong sequence number."""

    class Slow:
        async def wait(self, n):
            await asyncio.sleep(10)

    chan = FrameChannel(pair[0], _Conn(sealed), timeout=5, limiter=Slow())
    sending = asyncio.ensure_future(chan.send(_frame("PAGES", b"A" * 100)))
    await asyncio.sleep(0.01)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    if sealed:
        with pytest.raises(TransportError, match="a PAGES frame was cut off part-way"):
            await chan.send(_frame("ABORT", b"B"), paced=False)
    else:
        await chan.send(_frame("ABORT", b"B"), paced=False)
        pair[0].shutdown(socket.SHUT_WR)
        assert await _read_all(pair[1], 100) == b"B"


@pytest.mark.asyncio
async def test_a_send_says_whether_it_waited_for_room_in_the_socket(pair):
    """What the link estimate takes from it (Compressor.observe_link)."""
    a, b = pair
    chan = FrameChannel(a, _Conn(), timeout=5)
    assert chan.waited_for_room is False
    await chan.send(_frame("PAGES", b"x" * 1000))
    assert chan.waited_for_room is False  # the socket had room for all of it
    reader = asyncio.ensure_future(_read_all(b, 1000 + (4 << 20)))
    await chan.send(_frame("PAGES", b"y" * (4 << 20)))
    assert chan.waited_for_room is True  # 4 MiB through 64 KiB buffers
    assert await reader == b"x" * 1000 + b"y" * (4 << 20)
    await chan.send(_frame("PAGES", b"z" * 1000))
    assert chan.waited_for_room is False  # each send says for itself
    assert await _read_all(b, 1000) == b"z" * 1000


@pytest.mark.asyncio
@pytest.mark.parametrize("graceful", [True, False])
async def test_a_graceful_close_lets_the_peer_read_the_last_words_and_an_end(graceful):
    """After its last frame, a side that fails closes gracefully: a FIN
    behind the frame, and what the peer still sends is read and dropped
    until the peer closes.  Closed at once with data unread, the socket
    resets the connection instead (the control: ``graceful`` False)."""
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    mine, _ = listener.accept()
    listener.close()
    loop = asyncio.get_running_loop()
    peer.setblocking(False)
    chan = FrameChannel(mine, _Conn(), timeout=5)
    await loop.sock_sendall(peer, b"x" * (1 << 20))  # unread here
    await chan.send(_frame("ERROR", b"why"))

    async def peer_reads_then_closes():
        got = await loop.sock_recv(peer, 100)
        try:
            end = await asyncio.wait_for(loop.sock_recv(peer, 100), 5)
        except ConnectionResetError:
            end = "reset"
        peer.close()
        return got, end

    reading = asyncio.ensure_future(peer_reads_then_closes())
    if graceful:
        await chan.close_gracefully(5)
    else:
        await asyncio.sleep(0.05)  # the frame is in the peer's queue
        chan.close()
    got, end = await reading
    assert got == b"why"
    assert end == (b"" if graceful else "reset")
