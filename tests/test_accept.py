"""Accepting connections on the destination's listener: a cancelled accept
takes no connection and reports nothing, even when the connection arrives in
the same loop turn as the cancellation (the destination cancels its accept
of later channels when a migration ends, while channels may still be
connecting)."""

import asyncio
import socket

import pytest

from migrate.net.transport import accept


def _listener() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    return listener


@pytest.mark.asyncio
async def test_an_accept_cancelled_as_a_connection_arrives_takes_nothing():
    loop = asyncio.get_running_loop()
    reported = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    listener = _listener()
    try:
        for _ in range(20):
            waiting = asyncio.ensure_future(accept(listener))
            await asyncio.sleep(0)  # it found nothing and waits for the listener
            # connect, so the listener is readable in the next turn, and cancel
            # in that same turn, ahead of the reader
            client = socket.create_connection(listener.getsockname())
            loop.call_soon(waiting.cancel)
            with pytest.raises(asyncio.CancelledError):
                await waiting
            for _ in range(3):
                await asyncio.sleep(0)
            # the connection stayed queued for the next accept
            sock, peer = await asyncio.wait_for(accept(listener), 5)
            assert peer == client.getsockname()
            assert not sock.getblocking()
            sock.close()
            client.close()
    finally:
        listener.close()
    assert reported == []


@pytest.mark.asyncio
async def test_accept_waits_for_a_connection():
    listener = _listener()
    waiting = asyncio.ensure_future(accept(listener))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    client = socket.create_connection(listener.getsockname())
    sock, peer = await asyncio.wait_for(waiting, 5)
    assert peer == client.getsockname()
    sock.close()
    client.close()
    listener.close()
