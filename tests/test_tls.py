"""Mutual TLS 1.3 between the hosts (issue 5, "who may migrate"): the right
certificates migrate and validate; a certificate from another CA is refused
before any guest byte is written."""

import asyncio
import socket

import pytest

from hosts import SimulatedHost
from migrate.config.spec import MigrationConfig
from migrate.engine.dest import DestVmm
from migrate.engine.source import SourceVmm
from migrate.tools.pki import have_openssl, make_pki

MiB = 1 << 20
pytestmark = pytest.mark.skipif(not have_openssl(), reason="needs the openssl command to make certificates")


def _pki(path, name):
    """A CA and a certificate for each side, signed by it."""
    return make_pki(path, name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    path = tmp_path_factory.mktemp("pki")
    return _pki(path, "good"), _pki(path, "other")


def _config(pki_, who, ca=None, **kw):
    cert, key = pki_[who]
    return MigrationConfig(tls_cert=cert, tls_key=key, tls_ca=ca or pki_["ca"], timeout_s=3.0, **kw)


async def _migrate(src_cfg, dst_cfg, ram=16 * MiB):
    src = SimulatedHost(ram, workload="allocator", rate=1000, seed=2)
    src.prepare_guest()
    src.vcpus.start()
    dst = SimulatedHost(ram, workload="idle", workload_params={"fill": 0}, rate=0)
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        dest_task = asyncio.ensure_future(DestVmm(dst, dst_cfg).serve(listener))
        sres = await asyncio.wait_for(SourceVmm(src, src_cfg).migrate(listener.getsockname()), 60)
        return sres, dest_task, src, dst, listener
    except BaseException:
        listener.close()
        src.close()
        dst.close()
        raise


async def test_mutual_tls_migrates_and_validates(pki):
    good, _ = pki
    sres, dest_task, src, dst, listener = await _migrate(_config(good, "source"), _config(good, "dest"))
    try:
        dres = await asyncio.wait_for(dest_task, 30)
        assert sres["status"] == "completed", sres["error"]
        assert sres["validation"]["ok"]
        assert dres["status"] == "completed"
        assert sres["wire"]["channels"] == 2  # the data channel is encrypted and authenticated too
        assert dres["ram"]["spliced_bytes"] == 0  # records to decrypt: nothing is spliced past TLS
    finally:
        src.close()
        dst.close()
        listener.close()


async def test_certificate_from_another_ca_is_refused_and_nothing_written(pki):
    good, other = pki
    sres, dest_task, src, dst, listener = await _migrate(_config(other, "source"), _config(good, "dest"))
    try:
        assert sres["status"] == "failed"
        assert "certificate" in sres["error"] or "TLS" in sres["error"], sres["error"]
        assert sres["guest_on"] == "source" and src.vcpus.running
        assert dst.memory.populated_ranges() == []  # the destination wrote nothing
        assert not dest_task.done()  # and still waits for its real source
    finally:
        dest_task.cancel()
        src.close()
        dst.close()
        listener.close()


async def test_plain_source_against_tls_destination_fails_with_a_hint(pki):
    good, _ = pki
    sres, dest_task, src, dst, listener = await _migrate(MigrationConfig(timeout_s=3.0), _config(good, "dest"))
    try:
        assert sres["status"] == "failed"
        assert "TLS" in sres["error"], sres["error"]
        assert dst.memory.populated_ranges() == []
    finally:
        dest_task.cancel()
        src.close()
        dst.close()
        listener.close()


async def test_tls_with_a_shared_key_seals_inside_tls(pki, tmp_path):
    """Both: TLS encrypts, and every frame inside it carries its MAC too."""
    good, _ = pki
    key = tmp_path / "key"
    key.write_bytes(b"a shared key of enough bytes")
    src_cfg = _config(good, "source", psk_file=str(key), channels=2)
    sres, dest_task, src, dst, listener = await _migrate(src_cfg, _config(good, "dest", psk_file=str(key)))
    try:
        dres = await asyncio.wait_for(dest_task, 30)
        assert sres["status"] == "completed" and sres["validation"]["ok"], sres["error"]
        assert sres["wire"]["protection"] == dres["wire"]["protection"] == "tls+psk-mac"
        assert (
            dres["wire"]["authenticated_frames"] > 2 and sres["wire"]["authenticated_frames"] >= 2
        )  # CONFIRM, RESUMED
    finally:
        src.close()
        dst.close()
        listener.close()


def test_plain_send_parts_gathers_and_survives_partial_sends():
    # One sendmsg() a frame while the socket has room; a full socket buffer
    # (small here, and nobody reading for a while) leaves a send partway
    # through a part, and the rest follows in order once it drains.
    import os

    from migrate.net.tls import PlainIO

    parts = [b"head"] + [os.urandom(12288 + i) for i in range(64)] + [b"", memoryview(b"tags")]
    want = b"".join(bytes(p) for p in parts)

    async def go():
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        a.setblocking(False)
        b.setblocking(False)
        loop = asyncio.get_running_loop()
        sent = asyncio.ensure_future(PlainIO(loop, a).send_parts(parts))
        await asyncio.sleep(0.05)
        assert not sent.done()  # stuck on the full buffer
        got = bytearray()
        while len(got) < len(want):
            got += await loop.sock_recv(b, 65536)
        await sent
        a.close()
        b.close()
        return bytes(got)

    assert asyncio.run(go()) == want


def _tls_socket_pair(pki, *parts):
    """A connected socket pair with mutual TLS up (source end, destination
    end), the source having sent ``parts`` (bytes) through it; returns the
    source socket, the destination socket and its TlsIO."""
    from migrate.net.tls import TlsConfig, TlsIO

    good = pki[0]
    cfg = TlsConfig(good["source"][0], good["source"][1], good["ca"])
    dcfg = TlsConfig(good["dest"][0], good["dest"][1], good["ca"])

    async def go():
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        loop = asyncio.get_running_loop()
        client = TlsIO(loop, a, cfg.context(False), server_side=False)
        server = TlsIO(loop, b, dcfg.context(True), server_side=True)
        await asyncio.gather(client.handshake(), server.handshake())
        for part in parts:
            await client.send_parts([part])
        return a, b, server

    return asyncio.run(go())


def test_blocking_frames_over_tls_return_every_record_read_in_one_go(pki):
    # The fault channel's thread polls the socket: records already read
    # from it, but not decrypted yet, must all come out of the one read the
    # poll woke it for -- the socket has nothing left to wake it again.
    import os
    import select

    from migrate.net.blocking import BlockingFrames
    from migrate.protocol import frames as fr
    from tests.test_blocking import pages, receiving_pair, wire

    src, dst = receiving_pair()
    sent = [(i, os.urandom(fr.PAGE_SIZE)) for i in range(40)]  # ~160 KiB: one RECORD_READ
    a, b, server = _tls_socket_pair(pki, *(wire(src.send(pages(first, data))) for first, data in sent))
    frames = BlockingFrames(b, dst, server, timeout=5)
    assert select.select([b], [], [], 2)[0]
    got = [(f.ranges[0][0], bytes(f.data)) for f in frames.frames()]
    assert got == sent
    a.close()
    frames.close()


def test_blocking_frames_over_tls_name_a_peer_gone_without_close_notify(pki):
    # A TLS peer that just closes its socket (no close_notify) is "peer
    # closed the connection", as on plain TCP, not an OpenSSL error string.
    import os
    import select

    from migrate.errors import TransportError
    from migrate.net.blocking import BlockingFrames
    from migrate.protocol import frames as fr
    from tests.test_blocking import pages, receiving_pair, wire

    src, dst = receiving_pair()
    whole = wire(src.send(pages(0, os.urandom(fr.PAGE_SIZE))))
    a, b, server = _tls_socket_pair(pki, whole, whole[:100])  # a whole frame, then a piece of the next
    a.shutdown(socket.SHUT_WR)  # the end of the stream, no close_notify
    frames = BlockingFrames(b, dst, server, timeout=5)
    got = []
    with pytest.raises(
        TransportError, match=rf"peer closed the connection inside a frame \(100 of {len(whole)} bytes\)"
    ):
        for _ in range(3):
            select.select([b], [], [], 1)
            got += [f.ranges for f in frames.frames()]
    assert got == [[(0, 1)]]
    a.close()
    frames.close()
