"""The one window where neither side can be sure: GO sent, RESUMED not heard.

The source never resumes a guest it has given up; it says RECOVER "go" on a
new connection.  The destination, whose control connection broke after
CONFIRM, keeps the validated guest paused until told.  An operator can do
the source's part with `mte-migrate resolve`."""

import asyncio
import socket

from hosts import SimulatedHost
from migrate.config.spec import MigrationConfig
from migrate.engine.dest import DestVmm
from migrate.engine.digest import MemoryDigest
from migrate.engine.source import SourceVmm
from migrate.protocol import frames as fr

MiB = 1 << 20


def _hosts(ram=16 * MiB):
    src = SimulatedHost(ram, workload="allocator", rate=2000, seed=5)
    src.prepare_guest()
    src.vcpus.start()
    dst = SimulatedHost(ram, workload="idle", workload_params={"fill": 0}, rate=0)
    return src, dst


async def _run(src, dst, config, source_cls):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    dest_task = asyncio.ensure_future(DestVmm(dst, config).serve(listener))
    src_task = asyncio.ensure_future(source_cls(src, config).migrate(("127.0.0.1", port)))
    try:
        return await asyncio.wait_for(src_task, 60), await asyncio.wait_for(dest_task, 60)
    finally:
        listener.close()


async def test_lost_go_is_recovered_on_a_new_connection(monkeypatch):
    """GO never reaches the destination: it waits in doubt; the source says
    RECOVER go; the guest resumes there -- exactly once, never on both."""
    src, dst = _hosts()
    config = MigrationConfig(timeout_s=2.0, channels=1)
    from migrate.net import transport

    real_send = transport.FrameChannel.send

    async def send(self, frame):
        if frame.type == fr.FrameType.GO and not getattr(send, "done", False):
            send.done = True
            self.close()
            from migrate.errors import TransportError

            raise TransportError("simulated: link cut while sending GO")
        return await real_send(self, frame)

    monkeypatch.setattr(transport.FrameChannel, "send", send)
    try:
        sres, dres = await _run(src, dst, config, SourceVmm)
        assert send.done
        assert sres["status"] == "completed", sres["error"]
        assert sres.get("recovered") is True
        assert dres["status"] == "completed", dres["error"]
        assert dres["in_doubt"]["session"]
        assert dst.vcpus.running and not src.vcpus.running  # on one host only
        assert MemoryDigest(src.memory).data_digest() == MemoryDigest(dst.memory).data_digest()
    finally:
        src.close()
        dst.close()


async def test_lost_go_with_the_destination_gone_resumes_here(monkeypatch):
    """GO is lost and nothing listens where the destination was any more: its
    VMM is gone, and the guest with it.  The paused copy on the source is the
    only one left, so the source resumes it -- never on two hosts."""
    src, dst = _hosts()
    config = MigrationConfig(timeout_s=1.0, channels=1)
    from migrate.net import transport

    real_send = transport.FrameChannel.send
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    async def send(self, frame):
        if frame.type == fr.FrameType.GO:
            listener.close()  # the destination VMM dies with the GO in flight
            dest_task.cancel()
            self.close()
            from migrate.errors import TransportError

            raise TransportError("simulated: link cut while sending GO")
        return await real_send(self, frame)

    monkeypatch.setattr(transport.FrameChannel, "send", send)
    dest_task = asyncio.ensure_future(DestVmm(dst, config).serve(listener))
    try:
        sres = await asyncio.wait_for(SourceVmm(src, config).migrate(("127.0.0.1", port)), 60)
        assert sres["status"] == "failed"
        assert "destination is gone" in sres["error"]
        assert sres["guest_on"] == "source" and src.vcpus.running
        assert not dst.vcpus.running
    finally:
        dest_task.cancel()
        src.close()
        dst.close()


async def test_lost_go_with_a_silent_destination_waits_for_the_operator(monkeypatch):
    """GO is lost and the destination accepts connections but says nothing:
    it may be running the guest.  The source keeps the paused guest and waits;
    the operator's SIGUSR1 (the command the source prints) resumes it here."""
    import os
    import signal

    src, dst = _hosts()
    config = MigrationConfig(timeout_s=1.0, channels=1)
    from migrate.net import transport

    real_send = transport.FrameChannel.send
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    silent_port = silent.getsockname()[1]

    async def send(self, frame):
        if frame.type == fr.FrameType.GO:
            dest_task.cancel()
            self.close()
            from migrate.errors import TransportError

            raise TransportError("simulated: link cut while sending GO")
        return await real_send(self, frame)

    monkeypatch.setattr(transport.FrameChannel, "send", send)
    dest_task = asyncio.ensure_future(DestVmm(dst, config).serve(listener))
    engine = SourceVmm(src, config)
    real_settle = engine._settle_lost_go

    async def settle(address, lost):  # the destination is now behind a silent address
        return await real_settle(("127.0.0.1", silent_port), lost)

    engine._settle_lost_go = settle
    task = asyncio.ensure_future(engine.migrate(("127.0.0.1", port)))
    try:
        for _ in range(200):
            await asyncio.sleep(0.1)
            if engine.result.get("in_doubt", {}).get("held_s"):
                break
        assert not src.vcpus.running, "held paused while in doubt"
        await asyncio.sleep(0.5)
        assert not task.done()
        os.kill(os.getpid(), signal.SIGUSR1)  # the operator: the destination is not running it
        sres = await asyncio.wait_for(task, 30)
        assert sres["status"] == "failed"
        assert sres["in_doubt"]["resolution"] == "operator: resumed here"
        assert sres["guest_on"] == "source" and src.vcpus.running
    finally:
        task.cancel()
        dest_task.cancel()
        listener.close()
        silent.close()
        src.close()
        dst.close()
