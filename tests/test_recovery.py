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


# -- a captured RECOVER cannot be replayed ---------------------------------------------------------
class _Wiretap:
    """A man in the middle between ``mte-migrate resolve`` and the
    destination: it records every byte the client sends, passes RECOVER on,
    and keeps the AUTH that follows to itself (the destination never acts
    on it), then cuts both ends -- a captured, unspent RECOVER."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.sent = b""  # client -> destination, as captured
        self.answered = b""  # destination -> client
        self.server = None

    async def start(self):
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return ("127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)

        async def back():
            while data := await up_reader.read(65536):
                self.answered += data
                writer.write(data)
                await writer.drain()

        answering = asyncio.ensure_future(back())
        try:
            for forward in (True, False):  # RECOVER passes, AUTH is kept
                head = await reader.readexactly(fr.HEADER_SIZE)
                frame = head + await reader.readexactly(fr.parse_header(head).total - fr.HEADER_SIZE)
                self.sent += frame
                if forward:
                    up_writer.write(frame)
                    await up_writer.drain()
        finally:
            answering.cancel()
            up_writer.close()
            writer.close()

    def close(self):
        self.server.close()


def _key_file(tmp_path) -> str:
    import base64
    import os

    path = tmp_path / "psk"
    path.write_bytes(base64.b64encode(os.urandom(32)))
    return str(path)


async def _raw_recover(address, session, decision, proof_for, key=None):
    """A hand-made recovery connection: RECOVER, read the challenge, AUTH
    with ``proof_for(nonce)`` (sealed with ``key``, as the real one is);
    returns (challenge, the answer or None)."""
    from migrate.net.transport import FrameChannel, connect, secure
    from migrate.protocol.machine import Connection, recovery_source_machine

    sock = await connect(*address, 5.0)
    conn = Connection(recovery_source_machine(), keyed=key is not None)
    chan = FrameChannel(sock, conn, 5.0, io=await secure(sock, None, False, 5.0))
    try:
        await chan.send(fr.Recover(session, decision))
        challenge = await chan.recv()
        if key is not None:
            conn.seal(key, "source")
        await chan.send(fr.Auth(proof_for(challenge.nonce)))
        return challenge, await chan.recv()
    finally:
        chan.close()


async def test_a_captured_recover_is_refused_on_a_new_connection_and_a_fresh_one_resolves(monkeypatch, tmp_path):
    """The destination is in doubt.  An operator's `resolve go` is captured
    on the way (RECOVER and its AUTH) and never arrives.  Sent again, byte
    for byte, on a new connection, it is refused: its AUTH is sealed with
    keys from the connection it was made on ("tampered"), and its proof
    names that connection's nonce, not the fresh challenge.  A proof over
    another nonce, sealed properly, is refused too ("auth"); the guest stays
    paused.  Then
    the real `mte-migrate resolve go` with the key resumes it there."""
    import os
    import sys
    from pathlib import Path

    from migrate.engine.recovery import send_decision
    from migrate.errors import MigrationError, TransportError
    from migrate.net import transport
    from migrate.protocol import auth

    src, dst = _hosts()
    key_path = _key_file(tmp_path)
    key = auth.load_key(key_path)
    config = MigrationConfig(timeout_s=2.0, channels=1, psk_file=key_path, in_doubt_hold_s=60)
    real_send = transport.FrameChannel.send

    async def send(self, frame):
        if frame.type == fr.FrameType.GO:  # lost on the way: the destination is in doubt
            self.close()
            raise TransportError("simulated: link cut while sending GO")
        return await real_send(self, frame)

    monkeypatch.setattr(transport.FrameChannel, "send", send)
    listener = socket.create_server(("127.0.0.1", 0))
    dest_addr = ("127.0.0.1", listener.getsockname()[1])
    dest = DestVmm(dst, config)
    dest_task = asyncio.ensure_future(dest.serve(listener))
    engine = SourceVmm(src, config)
    settled = asyncio.Event()

    async def settle(address, lost):  # the source leaves it to the operator
        await settled.wait()
        return True

    engine._settle_lost_go = settle
    src_task = asyncio.ensure_future(engine.migrate(dest_addr))
    tap = _Wiretap(dest_addr)
    try:
        for _ in range(300):
            if dest.result.get("in_doubt"):
                break
            await asyncio.sleep(0.1)
        session = dest.result["in_doubt"]["session"]
        assert not dst.vcpus.running and not src.vcpus.running

        # 1. The operator's RECOVER go is captured and never arrives.
        tapped = await tap.start()
        try:
            await send_decision(tapped, session, "go", key, None, 5.0)
            raise AssertionError("the wiretap should have cut the operator's connection")
        except MigrationError:
            pass
        captured = tap.sent
        types_sent = [f.type for f in fr.FrameBuffer().feed(captured)]
        assert types_sent == [fr.FrameType.RECOVER, fr.FrameType.AUTH]
        (first_challenge,) = fr.FrameBuffer().feed(tap.answered)
        assert first_challenge.type == fr.FrameType.WELCOME and len(first_challenge.nonce) == auth.NONCE_BYTES

        # 2. Replayed byte for byte on a new connection: refused, nothing changes.
        reader, writer = await asyncio.open_connection(*dest_addr)
        writer.write(captured)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        challenge, refusal = fr.FrameBuffer().feed(answer)
        assert challenge.type == fr.FrameType.WELCOME and challenge.nonce != first_challenge.nonce
        assert refusal.type == fr.FrameType.ERROR and refusal.code == "tampered", refusal
        assert refusal.message.startswith("AUTH frame #0 after the handshake failed its authentication")
        await asyncio.sleep(0.3)
        assert not dst.vcpus.running and not dest_task.done()
        assert dest.result["status"] != "completed"

        # 3. A proof made over another nonce: refused.
        _, refusal = await _raw_recover(
            dest_addr, session, "go", lambda nonce: auth.recover_proof(key, session, "go", os.urandom(len(nonce))), key
        )
        assert refusal.type == fr.FrameType.ERROR and refusal.code == "auth"
        assert "replayed RECOVER" in refusal.message
        # ... and a proof over the challenge for the other decision.
        _, refusal = await _raw_recover(
            dest_addr, session, "go", lambda nonce: auth.recover_proof(key, session, "abort", nonce), key
        )
        assert refusal.type == fr.FrameType.ERROR and refusal.code == "auth"
        assert not dst.vcpus.running and not dest_task.done()

        # 4. The real command, with the key: a fresh proof, accepted.
        repo = Path(__file__).resolve().parent.parent
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "migrate", "resolve", "--connect", f"{dest_addr[0]}:{dest_addr[1]}",
            "--session", session, "--psk-file", key_path, "go",
            cwd=repo, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert "running on the destination" in out.decode()
        dres = await asyncio.wait_for(dest_task, 30)
        assert dres["status"] == "completed", dres["error"]
        assert dst.vcpus.running
        settled.set()
        sres = await asyncio.wait_for(src_task, 30)
        assert sres["status"] == "completed" and not src.vcpus.running  # on one host only
        assert MemoryDigest(src.memory).data_digest() == MemoryDigest(dst.memory).data_digest()
    finally:
        settled.set()
        tap.close() if tap.server else None
        src_task.cancel()
        dest_task.cancel()
        listener.close()
        src.close()
        dst.close()
