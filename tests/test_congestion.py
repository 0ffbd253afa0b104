"""The source's TCP congestion control (--tcp-congestion): the host's
default everywhere but within one host, where auto puts a loss-based
algorithm in place of a model-based one; a named one is set or refused with
the kernel's list; the result says which one carried the pages."""

import socket
from dataclasses import replace
from types import SimpleNamespace

import pytest

from migrate.config.spec import MigrationConfig
from migrate.errors import TransportError
from migrate.net import transport
from migrate.net.transport import WITHIN_HOST_CONGESTION, choose_congestion, congestion_of, within_host
from tests.test_migration import assert_completed, migrate_pair

RAM = 8 << 20


def _system_default() -> str:
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        return f.read().strip()


@pytest.fixture
def tcp():
    """A connected TCP socket over loopback (and its peer)."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    yield client
    for s in (client, peer, server):
        s.close()


def _ends(peer: str, own: str):
    return SimpleNamespace(getpeername=lambda: (peer, 1), getsockname=lambda: (own, 2))


@pytest.mark.parametrize(
    "peer, own, inside",
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("127.3.4.5", "127.0.0.1", True),
        ("::1", "::1", True),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1", True),
        ("10.0.0.5", "10.0.0.5", True),  # our own address: the kernel routes it through lo
        ("10.0.0.6", "10.0.0.5", False),
        ("fe80::1", "fe80::2", False),
    ],
)
def test_within_host_is_a_loopback_peer_or_our_own_address(peer, own, inside):
    assert within_host(_ends(peer, own)) is inside


def test_within_host_is_false_for_an_unconnected_socket():
    with socket.socket() as s:
        assert within_host(s) is False


def test_system_leaves_the_hosts_default(tcp):
    assert choose_congestion(tcp, "system") == _system_default() == congestion_of(tcp)


def test_auto_within_the_host_uses_a_loss_based_algorithm(tcp):
    used = choose_congestion(tcp, "auto")
    assert used in WITHIN_HOST_CONGESTION and congestion_of(tcp) == used
    if _system_default() in WITHIN_HOST_CONGESTION:
        assert used == _system_default()  # already loss-based: left alone


def test_auto_across_hosts_keeps_the_hosts_default(tcp, monkeypatch):
    monkeypatch.setattr(transport, "within_host", lambda sock: False)
    assert choose_congestion(tcp, "auto") == _system_default()


def test_a_named_algorithm_is_set(tcp):
    assert choose_congestion(tcp, "reno") == "reno" == congestion_of(tcp)  # reno is built into every kernel


def test_an_algorithm_the_kernel_lacks_is_refused_with_what_it_offers(tcp):
    with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
        offered = f.read().split()
    with pytest.raises(TransportError, match=r"--tcp-congestion nosuch: the kernel refused it .*; it offers: ") as info:
        choose_congestion(tcp, "nosuch")
    assert all(name in str(info.value) for name in offered)


@pytest.mark.parametrize("mode", ["auto", "system", "reno"])
async def test_the_result_names_the_algorithm_that_carried_the_pages(hosts, listener, mode):
    src, dst = hosts.source(), hosts.dest()
    sres, dres = await migrate_pair(src, dst, replace(MigrationConfig(), tcp_congestion=mode), listener)
    assert_completed(sres, dres)
    used = sres["wire"]["congestion_control"]
    if mode == "auto":
        assert used in WITHIN_HOST_CONGESTION  # the test's hosts talk over loopback
    else:
        assert used == (_system_default() if mode == "system" else mode)


async def test_a_refused_algorithm_fails_the_source_before_it_migrates(hosts, listener):
    src, dst = hosts.source(), hosts.dest()
    sres, _ = await migrate_pair(src, dst, replace(MigrationConfig(), tcp_congestion="nosuch"), listener)
    assert sres["status"] == "failed"
    assert "--tcp-congestion nosuch" in sres["error"]
    assert sres["guest_on"] == "source" and src.vcpus.running  # the guest runs on where it was
    assert sres["ram"]["transferred_bytes"] == 0  # no page left
