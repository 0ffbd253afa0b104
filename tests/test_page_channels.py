"""How many data channels carry pages: all, or with ``channels = 'auto'``
one, when both hosts are on one machine and the destination's RAM is
allocated already (its WELCOME says ``ram_ready``)."""

import pytest
from support import run_engines

from migrate.config.spec import MigrationConfig
from migrate.engine.lanes import pages_channels
from migrate.errors import ConfigError, ProtocolError
from migrate.protocol import frames as fr


@pytest.mark.parametrize(
    "setting, connections, same_host, ready, carrying",
    [
        ("auto", 2, True, True, 1),  # one machine, RAM ready: one stream
        ("auto", 2, True, False, 2),  # fresh RAM: two cores fault it in
        ("auto", 2, False, True, 2),  # hosts of their own: cores to spare
        (2, 2, True, True, 2),  # a number is kept as asked
        (4, 4, True, True, 4),
        (1, 1, False, False, 1),
    ],
)
def test_which_channels_carry_pages(setting, connections, same_host, ready, carrying):
    assert pages_channels(setting, connections, same_host, ready) == carrying


def test_auto_opens_two_connections_and_a_number_that_many():
    assert MigrationConfig().channels == "auto" and MigrationConfig().channel_count == 2
    assert MigrationConfig(channels=3).check().channel_count == 3
    for bad in (0, 17, "two", True):
        with pytest.raises(ConfigError, match="channels must be 'auto' or 1..16"):
            MigrationConfig(channels=bad).check()


def _decode(frame):
    return type(frame).from_meta(frame.meta(), b"")


def test_welcome_says_whether_the_ram_is_ready_and_a_peer_that_does_not_say_means_no():
    assert _decode(fr.Welcome(fr.PROTOCOL_VERSION, b"\1" * 32, ram_ready=True)).ram_ready is True
    plain = fr.Welcome(fr.PROTOCOL_VERSION, b"\1" * 32)
    assert "ram_ready" not in plain.meta() and _decode(plain).ram_ready is False
    meta = dict(plain.meta(), ram_ready=1)
    with pytest.raises(ProtocolError, match="ram_ready"):
        fr.Welcome.from_meta(meta, b"")


@pytest.mark.parametrize(
    "channels, prealloc, carrying",
    [("auto", True, 1), ("auto", False, 2), (2, True, 2)],
)
async def test_pages_go_on_one_channel_only_within_a_host_to_ready_ram(hosts, listener, channels, prealloc, carrying):
    src, dst = hosts.source(rate=0), hosts.dest()
    if prealloc:
        dst.memory.prefault(0, dst.memory.npages)
    sres, dres, source, _ = await run_engines(src, dst, MigrationConfig(channels=channels), listener)
    assert sres["status"] == "completed" and dres["status"] == "completed", (sres["error"], dres["error"])
    assert sres["validation"]["ok"]
    assert sres["wire"]["channels"] == 2 and sres["wire"]["page_channels"] == carrying
    sent = [lane.totals.pages for lane in source.lanes]
    assert sent[0] > 0 and (sent[1] == 0) == (carrying == 1), sent
