"""The one window where neither side can be sure: GO sent, RESUMED not heard.

The source never resumes a guest it has given up; it says RECOVER "go" on a
new connection.  The destination, whose control connection broke after
CONFIRM, keeps the validated guest paused until told.  An operator can do
the source's part with `mte-migrate resolve`."""

import asyncio
import socket

from hosts import SimulatedHost
from migrate import frames as fr
from migrate.config import MigrationConfig
from migrate.digest import MemoryDigest
from migrate.dest import DestVmm
from migrate.source import SourceVmm

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
    from migrate import transport
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


async def test_lost_go_with_unreachable_destination_is_reported_in_doubt(monkeypatch):
    """If the destination cannot be reached again, the source still never
    resumes: it reports the guest as the destination's, with the command."""
    src, dst = _hosts()
    config = MigrationConfig(timeout_s=1.0, channels=1)
    from migrate import transport
    real_send = transport.FrameChannel.send
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    async def send(self, frame):
        if frame.type == fr.FrameType.GO:
            listener.close()          # nobody will answer a new connection
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
        assert "mte-migrate resolve" in sres["error"] and "go" in sres["error"]
        assert sres["guest_on"].startswith("destination")
        assert not src.vcpus.running  # given up: never resumed here
    finally:
        dest_task.cancel()
        src.close()
        dst.close()
